"""eval_segmentation.py and the segmentation folders of datasets.py: the scores against a confusion matrix worked by
hand, the probe on images whose patches are solid colours per class, two torchrun processes equal to one, the
Pascal VOC layout (palette PNGs) and one-line errors for bad data."""
import argparse
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
import eval_segmentation
import utils
from eval_testdata import last_json, one_thread, run_script, write_dino_checkpoint
from transforms import IMAGENET_MEAN, IMAGENET_STD

pytestmark = pytest.mark.usefixtures(one_thread.__name__)  # tiny models: one thread is fastest on shared CPUs

CELL = 32  # 2 x 2 patches of 16 pixels
CLASS_COLOURS = ((30, 30, 30), (220, 40, 30), (30, 60, 220))  # class 0, 1, 2


def patch_scene(rng: np.random.Generator, cells: int = 2) -> tuple:
    """A (cells*32)^2 image made of 32-pixel squares (2 x 2 patches of 16 pixels) each of one class's colour
    (+ noise), and its mask, in which a 2-pixel line along a square's border is 255 (not scored), as VOC's
    outlines."""
    classes = rng.integers(0, len(CLASS_COLOURS), size=(cells, cells))  # (g, g)
    mask = np.kron(classes, np.ones((CELL, CELL), dtype=np.int64)).astype(np.uint8)  # (S, S)
    pixels = np.array(CLASS_COLOURS)[mask] + rng.integers(-20, 21, size=(*mask.shape, 3))  # (S, S, 3)
    mask[CELL - 1:CELL + 1, :CELL] = datasets.SEGMENTATION_IGNORE
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), mask


def write_plain_layout(root: str, counts: dict, seed: int = 0) -> str:
    """``root/{split}/images/NNN.png`` and ``root/{split}/masks/NNN.png`` (grayscale class ids) of ``patch_scene``s."""
    rng = np.random.default_rng(seed)
    for split, count in counts.items():
        for folder in ("images", "masks"):
            os.makedirs(os.path.join(root, split, folder), exist_ok=True)
        for i in range(count):
            image, mask = patch_scene(rng)
            image.save(os.path.join(root, split, "images", f"{i:03d}.png"))
            Image.fromarray(mask).save(os.path.join(root, split, "masks", f"{i:03d}.png"))
    return root


def parse(*flags: str) -> argparse.Namespace:
    return argparse.ArgumentParser(parents=[eval_segmentation.get_args_parser()]).parse_args(list(flags))


@pytest.fixture(scope="module")
def seg_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    data = write_plain_layout(str(root / "data"), {"train": 8, "val": 4})
    checkpoint = write_dino_checkpoint(str(root / "checkpoint.pth"))
    common = ["--data_path", data, "--pretrained_weights", checkpoint, "--arch", "vit_tiny", "--patch_size", "16",
              "--image_size", "64", "--num_workers", "0", "--batch_size_per_gpu", "4"]
    return root, common


def test_scores_equal_a_confusion_matrix_worked_by_hand():
    target = torch.tensor([[0, 0, 1, 255], [1, 2, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 3], [1, 2, 4, 0]])  # class 3 only where the target is ignored
    confusion = eval_segmentation.confusion_matrix(pred, target, num_classes=5)
    expected = torch.zeros(5, 5, dtype=torch.int64)
    expected[0, 0] = expected[0, 1] = expected[2, 2] = expected[2, 4] = 1
    expected[1, 1] = 2
    assert torch.equal(confusion, expected)
    scores = eval_segmentation.segmentation_scores(confusion)
    # IoU = TP / (TP + FP + FN): 0: 1/2, 1: 2/3, 2: 1/2, 3: absent from both (None), 4: predicted only, 0
    assert scores["per_class_IoU"] == pytest.approx([50.0, 200 / 3, 50.0, None, 0.0])
    assert scores["per_class_IoU"][3] is None
    assert scores["mIoU"] == pytest.approx((50 + 200 / 3 + 50 + 0) / 4)  # class 3 left out of the mean
    assert scores["pixel_acc"] == pytest.approx(100 * 4 / 6)  # the two ignored pixels are not counted
    assert json.loads(json.dumps(scores))["per_class_IoU"][3] is None  # null in the JSON line


def test_probe_separates_solid_colour_patches_then_evaluates_the_same(seg_setup, fresh_process_group):
    root, common = seg_setup
    out = str(root / "run")
    result = eval_segmentation.main(parse(*common, "--epochs", "15", "--lr", "5", "--val_freq", "5",
                                          "--output_dir", out))
    assert set(result) == {"mIoU", "pixel_acc", "per_class_IoU"} and len(result["per_class_IoU"]) == 3
    assert result["mIoU"] > 90 and result["pixel_acc"] > 95
    with open(os.path.join(out, "log.txt")) as f:
        log = [json.loads(line) for line in f]
    assert [entry["epoch"] for entry in log] == [0, 5, 10, 14]
    assert log[-1]["train_loss"] < log[0]["train_loss"] and log[-1]["test_mIoU"] == result["mIoU"]
    saved = torch.load(os.path.join(out, eval_segmentation.CHECKPOINT_NAME))
    assert saved["epoch"] == 15 and saved["num_classes"] == 3 and saved["setup"]["--image_size"] == 64
    assert eval_segmentation.main(parse(*common, "--evaluate", "--output_dir", out)) == result
    with pytest.raises(utils.UserError, match=r"--resize_mode stretch \(saved: crop\)"):
        eval_segmentation.main(parse(*common, "--evaluate", "--resize_mode", "stretch", "--output_dir", out))


def test_without_the_cache_train_crops_cut_image_and_mask_alike(seg_setup, fresh_process_group):
    torch.manual_seed(0)
    image, mask = patch_scene(np.random.default_rng(1))
    transform = eval_segmentation.PairTransform(48, "crop", train=True)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    colours = torch.tensor(CLASS_COLOURS, dtype=torch.float32)  # (3 classes, 3)
    for _ in range(4):
        pixels, cut = transform(image, mask)  # (3, 48, 48), (48, 48)
        rgb = (pixels * std + mean).permute(1, 2, 0) * 255  # (48, 48, 3)
        nearest = (rgb[:, :, None] - colours).norm(dim=-1).argmin(dim=-1)  # (48, 48) class of the closest colour
        scored = cut != datasets.SEGMENTATION_IGNORE
        assert (nearest[scored] == cut[scored]).float().mean() > 0.95  # only blended borders may differ
    root, common = seg_setup
    result = eval_segmentation.main(parse(*common, "--cache_features", "false", "--epochs", "4", "--lr", "5",
                                          "--output_dir", str(root / "uncached")))
    assert result["mIoU"] > 80


def test_two_processes_score_as_one(seg_setup, fresh_process_group):
    """Two torchrun processes train the head (DDP) for one epoch at a low lr, so that it is still poor, and sum
    their confusion matrices: one process evaluating the saved head over all val images gives the same scores."""
    root, common = seg_setup
    out = str(root / "two")
    flags = [*common, "--epochs", "1", "--lr", "0.05", "--output_dir", out]
    two = last_json(run_script("eval_segmentation.py", flags, nproc=2))
    assert two["mIoU"] < 90  # a poor head: each process's share alone would score otherwise
    assert eval_segmentation.main(parse(*flags, "--evaluate")) == two


def write_voc(root: str) -> dict:
    """A two-image Pascal VOC folder with palette PNG masks (VOC's colour map), 255 outlines; returns the masks."""
    palette = [0] * 768
    palette[3:6], palette[6:9], palette[765:768] = (128, 0, 0), (0, 128, 0), (224, 224, 192)
    masks = {}
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    for i, name in enumerate(("2007_000032", "2007_000039")):
        mask = np.zeros((24, 40), dtype=np.uint8)
        mask[4:12, 5:20] = 1 + i
        mask[3, 4:21] = 255
        image = Image.fromarray(mask)
        image.putpalette(palette)  # mode P: the class ids are the palette indices
        image.save(os.path.join(root, "SegmentationClass", f"{name}.png"))
        Image.new("RGB", (40, 24), (90, 120, 150)).save(os.path.join(root, "JPEGImages", f"{name}.jpg"))
        masks[name] = mask
    Image.new("RGB", (40, 24)).save(os.path.join(root, "JPEGImages", "2008_000001.jpg"))  # not in a list
    for split, names in (("train", ["2007_000032"]), ("val", ["2007_000039"])):
        with open(os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt"), "w") as f:
            f.write("\n".join(names) + "\n")
    return masks


def test_voc_layout_reads_palette_indices_not_colours(tmp_path):
    masks = write_voc(str(tmp_path))
    for split, name in (("train", "2007_000032"), ("val", "2007_000039")):
        dataset = datasets.build_segmentation_dataset(str(tmp_path), split)
        assert len(dataset) == 1 and dataset.samples[0][0].endswith(f"{name}.jpg")
        image, mask = dataset[0]
        assert image.size == (40, 24) and np.array_equal(mask, masks[name])
    val = datasets.build_segmentation_dataset(str(tmp_path), "val", eval_segmentation.PairTransform(16, "crop", False))
    image, mask = val[0]
    assert image.shape == (3, 16, 16) and mask.shape == (16, 16) and mask.dtype == torch.uint8
    assert set(mask.unique().tolist()) == {0, 2, 255}  # nearest neighbour: no blended ids
    assert val.largest_class_id([0]) == (2, val.samples[0][1])


def _fails(match: str, data_path: str, split: str = "train"):
    with pytest.raises(utils.UserError, match=match) as caught:
        dataset = datasets.build_segmentation_dataset(data_path, split)
        for i in range(len(dataset)):
            dataset[i]
    assert "\n" not in str(caught.value)


def test_bad_folders_and_masks_are_one_line_errors(tmp_path):
    data = write_plain_layout(str(tmp_path / "plain"), {"train": 2, "val": 1})
    _fails("does not exist", str(tmp_path / "absent"))
    _fails("neither the Pascal VOC layout", str(tmp_path))
    _fails("the plain layout needs test/images/ and test/masks/", data, "test")
    os.rename(os.path.join(data, "val", "masks"), os.path.join(data, "val", "labels"))
    _fails(f"mask folder {os.path.join(data, 'val', 'masks')} does not exist", data, "val")
    os.remove(os.path.join(data, "train", "masks", "001.png"))
    _fails(f"image {os.path.join(data, 'train', 'images', '001.png')} has no mask", data)
    Image.fromarray(np.zeros((64, 60), np.uint8)).save(os.path.join(data, "train", "masks", "001.png"))
    _fails(r"is 60x64 pixels but its image .*001.png is 64x64", data)
    Image.new("RGB", (64, 64)).save(os.path.join(data, "train", "masks", "001.png"))
    _fails("is a RGB image: a mask holds one class id per pixel", data)
    voc = str(tmp_path / "voc")
    write_voc(voc)
    with open(os.path.join(voc, "ImageSets", "Segmentation", "val.txt"), "a") as f:
        f.write("2009_000404\n")
    _fails(r"image .*2009_000404.jpg, listed in .*val.txt, does not exist", voc, "val")
    os.remove(os.path.join(voc, "SegmentationClass", "2007_000032.png"))
    _fails("2007_000032.jpg has no mask", voc)


def test_class_out_of_range_and_bad_image_size_are_one_line_errors(seg_setup, tmp_path, fresh_process_group):
    _, common = seg_setup
    for flags, match in ((["--num_classes", "2"], r"mask .*\.png holds class 2, out of range for --num_classes 2 "
                                                   r"\(class ids 0..1, 255 = ignore\)"),
                         (["--image_size", "40"], "--image_size 40 is not a multiple of --patch_size 16")):
        with pytest.raises(utils.UserError, match=match) as caught:
            eval_segmentation.main(parse(*common, *flags, "--output_dir", str(tmp_path)))
        assert "\n" not in str(caught.value)
