"""make_dense_data.py on tiny generated MNIST-format files: a scene's mask is exactly the pixels its garments draw,
the scenes are read back by the segmentation reader (plain layout) and the videos follow the DAVIS layout, the same
seed writes the same files, and bad flags are one-line errors."""
import argparse
import os

import cv2
import numpy as np
import pytest
from PIL import Image

import datasets
import make_dense_data
import utils
from mnist_testdata import make_mnist_folder

TRAIN_LABELS = [0, 1, 2, 3, 0, 1, 2, 3]
VAL_LABELS = [5, 6, 7, 5, 6]  # other classes than train's: a mask tells which split its garments came from
SMALL = ["--num_scenes", "3", "--num_val_scenes", "2", "--num_videos", "2", "--frames", "4", "--canvas", "64",
         "--garments", "2", "3"]


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("dense") / "fashion-mnist")
    return folder, make_mnist_folder(folder, TRAIN_LABELS, VAL_LABELS, gz=True)


def parse(*flags: str) -> argparse.Namespace:
    return argparse.ArgumentParser(parents=[make_dense_data.get_args_parser()]).parse_args(list(flags))


def drawn_by_hand(background, garments, labels, placements, threshold):
    """Image and mask drawn pixel by pixel: each garment in turn, resized, paints its pixels above the threshold."""
    image, mask = background.copy(), np.zeros_like(background)
    for index, top, left, side in placements:
        resized = cv2.resize(garments[index], (side, side), interpolation=cv2.INTER_LINEAR)
        for y in range(side):
            for x in range(side):
                if resized[y, x] > threshold:
                    image[top + y, left + x] = resized[y, x]
                    mask[top + y, left + x] = labels[index] + 1
    return image, mask


def test_scene_mask_is_the_pixels_its_garments_draw(mnist):
    folder, written = mnist
    garments, labels = written["train"]
    args = parse("--data_path", folder, *SMALL, "--threshold", "100")
    for seed in range(4):
        image, mask, placements = make_dense_data.render_scene(np.random.default_rng(seed), garments, labels, args)
        background = make_dense_data.background(np.random.default_rng(seed), 64, texture=True)  # drawn first
        assert 2 <= len(placements) <= 3 and image.shape == mask.shape == (64, 64)
        expected_image, expected_mask = drawn_by_hand(background, garments, labels, placements, 100)
        assert np.array_equal(mask, expected_mask) and np.array_equal(image, expected_image)
        assert set(np.unique(mask)) - {0} <= {label + 1 for label in TRAIN_LABELS}


@pytest.fixture(scope="module")
def generated(mnist, tmp_path_factory):
    folder, _ = mnist
    out = str(tmp_path_factory.mktemp("generated"))
    written = make_dense_data.main(parse("--data_path", folder, "--output_dir", out, "--seed", "3", *SMALL))
    return out, written


def test_scenes_are_read_back_by_the_segmentation_reader(mnist, generated):
    folder, written = mnist
    out, result = generated
    assert result == {"scenes": os.path.join(out, "scenes"), "davis": os.path.join(out, "davis"), "num_classes": 9}
    streams = np.random.SeedSequence(3).spawn(3)
    args = parse("--data_path", folder, *SMALL)
    for split, count, stream in (("train", 3, streams[0]), ("val", 2, streams[1])):
        dataset = datasets.build_segmentation_dataset(result["scenes"], split)
        assert len(dataset) == count
        garments, labels = written[split]
        rng = np.random.default_rng(stream)
        for i in range(count):
            image, mask, _ = make_dense_data.render_scene(rng, garments, labels, args)
            read_image, read_mask = dataset[i]
            assert np.array_equal(read_mask, mask)  # PNG: exact
            assert np.abs(np.asarray(read_image.convert("L"), dtype=float) - image).mean() < 3  # JPEG: close
            assert set(np.unique(read_mask)) - {0} <= {label + 1 for label in labels}


def test_videos_follow_the_davis_layout(generated):
    out, result = generated
    davis = result["davis"]
    with open(os.path.join(davis, "ImageSets", "2017", "val.txt")) as f:
        videos = f.read().split()
    assert videos == ["garments0000", "garments0001"]
    palette = datasets.davis_palette().ravel().tolist()
    assert palette[3:9] == [128, 0, 0, 0, 128, 0] and palette[-3:] == [224, 224, 192]  # DAVIS's object colours
    for video in videos:
        frames = sorted(os.listdir(os.path.join(davis, "JPEGImages", "480p", video)))
        annotations = sorted(os.listdir(os.path.join(davis, "Annotations", "480p", video)))
        assert frames == [f"{t:05d}.jpg" for t in range(4)] and annotations == [f"{t:05d}.png" for t in range(4)]
        masks = []
        for name in annotations:
            with Image.open(os.path.join(davis, "Annotations", "480p", video, name)) as annotation:
                assert annotation.mode == "P" and annotation.getpalette()[:9] == palette[:9]
            masks.append(datasets.read_class_mask(os.path.join(davis, "Annotations", "480p", video, name)))
        objects = int(max(m.max() for m in masks))
        assert 2 <= objects <= 3 and set(np.unique(masks[0])) == set(range(objects + 1))  # all seen in frame 0
        assert not np.array_equal(masks[0], masks[-1])  # they move
        assert datasets.open_image(os.path.join(davis, "JPEGImages", "480p", video, frames[0])).size == (64, 64)


def test_appearance_change_keeps_the_motion_and_changes_the_pixels(mnist):
    """--appearance_change 0: rigid garments over a fixed background; a > 0: the same masks (the motion is drawn
    first), each garment's pixels scaled by its own gain of the frame in [1 - a, 1 + a], a new background."""
    folder, written = mnist
    garments = written["val"][0]
    rigid_args, changing_args = (parse("--data_path", folder, *SMALL, "--appearance_change", a) for a in ("0", "0.5"))
    rigid, rigid_masks = make_dense_data.render_video(np.random.default_rng(5), garments, rigid_args)
    changing, masks = make_dense_data.render_video(np.random.default_rng(5), garments, changing_args)
    assert all(np.array_equal(a, b) for a, b in zip(masks, rigid_masks))
    gains = []
    for frame, fixed, mask in zip(changing, rigid, masks):
        background_now_and_first = (mask == 0) & (rigid_masks[0] == 0)  # (C, C)
        assert np.array_equal(fixed[background_now_and_first], rigid[0][background_now_and_first])
        assert np.abs(frame[mask == 0].astype(int) - fixed[mask == 0]).mean() > 5  # a new background
        for object_id in range(1, int(mask.max()) + 1):
            inside = (mask == object_id) & (fixed > 20) & (fixed < 160)  # not clipped at 255 by a gain up to 1.5
            ratio = frame[inside] / fixed[inside].astype(float)  # (pixels,)
            assert ratio.std() < 0.03 and 0.49 <= ratio.mean() <= 1.51  # one gain per garment and frame
            gains.append(ratio.mean())
    assert np.std(gains) > 0.05  # the gains differ between garments and frames


def test_same_seed_same_files_other_seed_other_files(mnist, generated, tmp_path):
    folder, _ = mnist
    out, _ = generated

    def files(root):
        found = {}
        for where, _, names in os.walk(root):
            for name in names:
                with open(os.path.join(where, name), "rb") as f:
                    found[os.path.relpath(os.path.join(where, name), root)] = f.read()
        return found

    make_dense_data.main(parse("--data_path", folder, "--output_dir", str(tmp_path / "same"), "--seed", "3", *SMALL))
    make_dense_data.main(parse("--data_path", folder, "--output_dir", str(tmp_path / "other"), "--seed", "4", *SMALL))
    first, same, other = files(out), files(str(tmp_path / "same")), files(str(tmp_path / "other"))
    assert same == first and len(first) == 3 * 2 + 2 * 2 + 2 * 4 * 2 + 1
    assert other.keys() == first.keys() and other != first


@pytest.mark.parametrize("flags, message", [
    (["--scale", "1.5", "1.0"], r"--scale 1.5 1.0: the first value \(the minimum\) exceeds the second"),
    (["--canvas", "32", "--scale", "1", "1.5"], "garments of 42 pixels, larger than --canvas 32"),
    (["--data_path", "EMPTY"], "holds no MNIST-format files"),
])
def test_bad_flags_are_one_line_errors(mnist, tmp_path, flags, message):
    folder, _ = mnist
    flags = [str(tmp_path) if flag == "EMPTY" else flag for flag in flags]
    with pytest.raises(utils.UserError, match=message) as caught:
        make_dense_data.main(parse("--data_path", folder, "--output_dir", str(tmp_path), *SMALL, *flags))
    assert "\n" not in str(caught.value)


def test_existing_output_is_refused_not_mixed(mnist, generated):
    folder, _ = mnist
    out, _ = generated
    with pytest.raises(utils.UserError, match=f"{os.path.join(out, 'scenes')} already exists"):
        make_dense_data.main(parse("--data_path", folder, "--output_dir", out, *SMALL))
