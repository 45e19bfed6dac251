"""eval_video_segmentation.py and its DAVIS readers in datasets.py: the propagation against a transcription of DINO's
loops, J and F against hand-computed masks, the palette PNG round trip, end-to-end runs on a generated tiny DAVIS
folder (identical frames, one and two torchrun processes, reruns, videos without ground truth) and one-line errors."""
import argparse
import builtins
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import datasets
import eval_video_segmentation as vos
import utils
from dino_video_reference import dino_propagation, loop_neighbourhood_mask
from eval_testdata import (assert_one_line_error, last_json, one_thread, random_image, run_script,
                           write_dino_checkpoint)

pytestmark = pytest.mark.usefixtures(one_thread.__name__)
HEIGHT, WIDTH = 64, 96  # frames; resized to 64 x 64 with --short_side 64 (the long side floored to 64 px)
PATCH = 8  # an 8 x 8 patch grid; a patch covers 8 rows and 12 columns of a frame
FRAMES = 4


# ----------------------------------------------------------------------------------------------------
# A tiny DAVIS folder
# ----------------------------------------------------------------------------------------------------
def block_mask(blocks) -> np.ndarray:
    """Object ids on whole patches: ``blocks`` maps an id to (top, left, bottom, right) in patch units."""
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    for obj, (top, left, bottom, right) in blocks.items():
        mask[top * 8:bottom * 8, left * 12:right * 12] = obj
    return mask


# Full-height stripes: bilinear upsampling rounds the corners of objects (as in DINO), not straight borders. They
# lie in the left half of the frame, so that they can slide right.
FIRST_MASK = block_mask({1: (0, 0, 8, 1), 2: (0, 2, 8, 4)})


def write_video(root: str, name: str, frames, masks) -> None:
    """Frames as JPEGs and the given annotations (``masks[i]`` None: frame i has none) as palette PNGs."""
    image_dir = os.path.join(root, "JPEGImages", "480p", name)
    mask_dir = os.path.join(root, "Annotations", "480p", name)
    os.makedirs(image_dir)
    os.makedirs(mask_dir)
    for i, (frame, mask) in enumerate(zip(frames, masks)):
        frame.save(os.path.join(image_dir, f"{i:05d}.jpg"), quality=95)
        if mask is not None:
            datasets.write_palette_png(os.path.join(mask_dir, f"{i:05d}.png"), mask, datasets.davis_palette())


def make_davis(root: str) -> str:
    """Three videos: ``still`` (one frame repeated), ``moving`` (a textured picture sliding right, annotated on
    every frame) and ``first_only`` (annotated on its first frame only)."""
    os.makedirs(os.path.join(root, "ImageSets", "2017"))
    still = random_image(0, size=(WIDTH, HEIGHT))
    write_video(root, "still", [still] * FRAMES, [FIRST_MASK] * FRAMES)
    wide = random_image(1, size=(WIDTH + 12 * FRAMES, HEIGHT))
    moving = [wide.crop((12 * (FRAMES - i), 0, 12 * (FRAMES - i) + WIDTH, HEIGHT)) for i in range(FRAMES + 1)]
    write_video(root, "moving", moving, [np.roll(FIRST_MASK, 12 * i, axis=1) for i in range(FRAMES + 1)])
    write_video(root, "first_only", [random_image(2, size=(WIDTH, HEIGHT))] * 3, [FIRST_MASK, None, None])
    with open(os.path.join(root, "ImageSets", "2017", "val.txt"), "w") as f:
        f.write("still\nmoving\n\nfirst_only\n")
    return root


@pytest.fixture(scope="module")
def davis(tmp_path_factory):
    root = tmp_path_factory.mktemp("davis")
    data = make_davis(str(root / "DAVIS"))
    checkpoint = write_dino_checkpoint(str(root / "checkpoint.pth"), patch_size=PATCH)
    flags = ["--data_path", data, "--pretrained_weights", checkpoint, "--short_side", "64", "--topk", "1",
             "--size_mask_neighborhood", "3", "--num_workers", "0", "--use_cuda", "false"]
    return root, data, flags


def parse(flags) -> argparse.Namespace:
    return argparse.ArgumentParser(parents=[vos.get_args_parser()]).parse_args(flags)


@pytest.fixture(scope="module")
def single_run(davis):
    """One in-process run over the three videos."""
    root, data, flags = davis
    output = str(root / "one")
    saved_print, threads = builtins.print, torch.get_num_threads()  # main wraps print and joins a process group
    torch.set_num_threads(1)  # as one_thread, which a module fixture cannot use
    try:
        results = vos.main(parse([*flags, "--output_dir", output]))
    finally:
        if utils.is_dist_avail_and_initialized():
            torch.distributed.destroy_process_group()
        builtins.print = saved_print
        torch.set_num_threads(threads)
    return output, results


# ----------------------------------------------------------------------------------------------------
# Propagation
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid, radius, topk, contexts, max_elements", [
    ((6, 9), 2, 5, 3, 10 ** 9), ((6, 9), 2, 5, 3, 1), ((5, 7), 0, 3, 2, 500), ((8, 8), 1, 20, 4, 10 ** 9),
    ((7, 11), 2, 5, 8, 2000), ((3, 3), 1, 7, 1, 10 ** 9), ((9, 2), 1, 7, 1, 1), ((13, 17), 3, 5, 8, 10 ** 9)])
def test_propagation_equals_dino_loops(grid, radius, topk, contexts, max_elements):
    """Small and large tiles, no restriction (radius 0), fewer sources within reach than k (all are kept)."""
    g = torch.Generator().manual_seed(sum(grid) + radius)
    n = grid[0] * grid[1]
    target = F.normalize(torch.randn(n, 16, generator=g), dim=1)  # (N, D)
    sources = F.normalize(torch.randn(contexts, n, 16, generator=g), dim=2)  # (n, N, D)
    labels = torch.softmax(3 * torch.randn(contexts, 4, n, generator=g), dim=1)  # (n, C, N)
    expected, _ = dino_propagation(target, sources, labels, grid, radius, topk)
    got = vos.propagate_labels(target, sources, labels, grid, radius, topk, max_elements=max_elements)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert torch.equal(got.argmax(0), expected.argmax(0))


def test_neighbourhood_mask_equals_the_loops():
    for height, width, radius in ((5, 7, 1), (6, 4, 2), (3, 9, 5)):
        mask = vos.neighbourhood_mask((0, height), (0, width), (0, height), (0, width), radius, torch.device("cpu"))
        assert torch.equal(mask.float(), loop_neighbourhood_mask(height, width, radius))
    part = vos.neighbourhood_mask((2, 4), (1, 3), (0, 6), (0, 5), 1, torch.device("cpu"))  # (2*2, 6*5)
    full = loop_neighbourhood_mask(6, 5, 1).reshape(6, 5, 6, 5)[2:4, 1:3].reshape(4, 30)
    assert torch.equal(part.float(), full)


def test_context_is_the_first_frame_and_the_latest_ones():
    queue = vos.ContextQueue(torch.zeros(2, 3), torch.zeros(1, 2), n_last=2)
    for value in (1.0, 2.0, 3.0):
        queue.push(torch.full((2, 3), value), torch.full((1, 2), value))
    features, labels = queue.context()
    assert features[:, 0, 0].tolist() == [0.0, 2.0, 3.0] and labels.shape == (3, 1, 2)
    alone = vos.ContextQueue(torch.zeros(2, 3), torch.zeros(1, 2), n_last=0)  # DINO's Queue(0) would keep all
    alone.push(torch.ones(2, 3), torch.ones(1, 2))
    assert alone.context()[0].shape == (1, 2, 3)


def test_labels_to_mask_follows_dino_upsampling():
    """Bilinear upsampling splits two patches at their border; a label that is nowhere positive stays 0; the
    result is resized to the frame by nearest neighbour."""
    soft = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # (C=3, N=2): grid 1 x 2
    ids = vos.labels_to_mask(soft, (1, 2), 4, (2, 12))  # upsampled to 4 x 8, resized to 2 x 12
    assert ids.tolist() == [[0] * 6 + [1] * 6] * 2
    first = vos.first_frame_labels(FIRST_MASK, (8, 8))  # (3, 64)
    assert first.shape == (3, 64) and torch.equal(first.sum(0), torch.ones(64))
    assert first[1].reshape(8, 8)[:, 0].all() and first[1].sum() == 8
    assert first[2].reshape(8, 8)[:, 2:4].all() and first[2].sum() == 16


# ----------------------------------------------------------------------------------------------------
# J and F (davis2017-evaluation's definitions)
# ----------------------------------------------------------------------------------------------------
def pixels(shape, *points) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for y, x in points:
        mask[y, x] = True
    return mask


def test_region_similarity_hand_computed():
    empty = np.zeros((10, 10), dtype=bool)
    square = pixels((10, 10), *[(y, x) for y in range(2, 5) for x in range(2, 5)])  # 9 pixels
    assert vos.region_similarity(empty, empty) == 1.0  # absent from both: counts as 1
    assert vos.region_similarity(square, empty) == 0.0  # empty prediction
    assert vos.region_similarity(empty, square) == 0.0  # object missing from the frame but predicted
    shifted = np.roll(square, 1, axis=1)
    assert vos.region_similarity(square, shifted) == pytest.approx(6 / 12)
    void = pixels((10, 10), *[(y, 5) for y in range(10)])  # the column the shift adds is void
    assert vos.region_similarity(square, shifted, void) == pytest.approx(6 / 9)


def test_boundary_map_of_one_pixel_and_of_the_borders():
    """A pixel's boundary is the 2 x 2 block up-left of its lower-right corner; the last row and column only
    compare along themselves, and the bottom-right corner is never a boundary."""
    edges = vos.boundary_map(pixels((6, 6), (3, 3)))
    assert sorted(zip(*np.nonzero(edges))) == [(2, 2), (2, 3), (3, 2), (3, 3)]
    corner = vos.boundary_map(pixels((4, 4), (3, 3)))
    assert sorted(zip(*np.nonzero(corner))) == [(2, 2), (2, 3), (3, 2)]
    assert vos.disk(1).tolist() == [[0, 1, 0], [1, 1, 1], [0, 1, 0]]


def test_boundary_f_measure_hand_computed():
    """10 x 10 frames: boundaries match within ceil(0.008 x 14.1) = 1 pixel (the disk of radius 1)."""
    shape = (10, 10)
    gt = pixels(shape, (5, 5))  # boundary (4,4) (4,5) (5,4) (5,5)
    empty = np.zeros(shape, dtype=bool)
    assert vos.boundary_f_measure(empty, empty) == 1.0
    assert vos.boundary_f_measure(gt, empty) == 0.0  # no predicted boundary: precision 1, recall 0
    assert vos.boundary_f_measure(empty, gt) == 0.0  # object missing from the frame: precision 0, recall 1
    assert vos.boundary_f_measure(gt, pixels(shape, (5, 6))) == 1.0  # no overlap (J = 0), boundaries 1 px apart
    assert vos.boundary_f_measure(gt, pixels(shape, (5, 7))) == 0.5  # cols 4-5 vs 6-7: half of each within 1 px
    assert vos.boundary_f_measure(gt, pixels(shape, (5, 8))) == 0.0  # cols 4-5 vs 7-8: 2 px apart
    run = pixels(shape, (5, 5), (5, 6), (5, 7))  # boundary: rows 4-5, cols 4-7; (4,7) and (5,7) are 2 px away
    assert vos.boundary_f_measure(gt, run) == pytest.approx(2 * 0.75 * 1 / 1.75)  # precision 6/8, recall 4/4
    assert vos.region_similarity(gt, run) == pytest.approx(1 / 3)
    void = pixels(shape, (5, 7))  # the run's last pixel is void: its boundary shrinks to rows 4-5, cols 4-6
    assert vos.boundary_f_measure(gt, run, void) == 1.0
    big = (400, 400)  # diagonal 565.7: a 5 px tolerance
    assert vos.boundary_f_measure(pixels(big, (200, 200)), pixels(big, (200, 205))) == 1.0
    assert vos.boundary_f_measure(pixels(big, (200, 200)), pixels(big, (200, 207))) == 0.0


def test_statistics_hand_computed():
    """Decay bins of 4 frames: [0, 1], [1, 2], [2, 2], [2, 3]; of 3: [0, 1], [1], [1, 2], [2]."""
    stats = vos.statistics([1.0, 0.8, 0.6, 0.2])
    assert stats == pytest.approx({"Mean": 0.65, "Recall": 0.75, "Decay": 0.9 - 0.4})
    assert vos.statistics([0.5, 0.7, 0.1]) == pytest.approx({"Mean": 1.3 / 3, "Recall": 1 / 3, "Decay": 0.5})
    assert vos.statistics([0.3]) == pytest.approx({"Mean": 0.3, "Recall": 0.0, "Decay": 0.0})


# ----------------------------------------------------------------------------------------------------
# DAVIS files
# ----------------------------------------------------------------------------------------------------
def test_palette_png_round_trip(tmp_path):
    palette = datasets.davis_palette()
    assert palette[:9].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128],
                                    [128, 0, 128], [0, 128, 128], [128, 128, 128], [64, 0, 0]]
    assert palette[255].tolist() == [224, 224, 192]
    ids = np.arange(256, dtype=np.uint8).reshape(16, 16)
    path = str(tmp_path / "ids.png")
    datasets.write_palette_png(path, ids, palette)
    assert np.array_equal(datasets.read_palette_png(path), ids)
    with Image.open(path) as image:
        assert image.mode == "P" and np.array_equal(np.array(image.convert("RGB"))[0, :3], palette[:3])
    assert os.listdir(tmp_path) == ["ids.png"]  # no temporary file left


def test_frames_are_read_and_resized_as_dino_does(tmp_path):
    assert datasets.davis_frame_size(480, 854, 480) == (480, 832)  # DAVIS 480p: a 30 x 52 grid at patch 16
    assert datasets.davis_frame_size(854, 480, 480) == (832, 480)
    assert datasets.davis_frame_size(HEIGHT, WIDTH, 64) == (64, 64)
    path = str(tmp_path / "white.png")
    Image.new("RGB", (WIDTH, HEIGHT), (255, 255, 255)).save(path)
    frame, size = datasets.read_davis_frame(path, 64)
    assert size == (HEIGHT, WIDTH) and frame.shape == (3, 64, 64)
    expected = [(1 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.228, 0.224, 0.225))]
    torch.testing.assert_close(frame[:, 0, 0], torch.tensor(expected))


# ----------------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------------
def test_identical_frames_propagate_the_first_mask_exactly(davis, single_run):
    _, data, _ = davis
    output, results = single_run
    for i in range(FRAMES):
        assert np.array_equal(datasets.read_palette_png(os.path.join(output, "still", f"{i:05d}.png")), FIRST_MASK)
    still = results["videos"]["still"]["objects"]
    assert set(still) == {"1", "2"}
    for scores in still.values():
        assert scores == {"J": {"Mean": 1.0, "Recall": 1.0, "Decay": 0.0}, "F": {"Mean": 1.0, "Recall": 1.0,
                                                                                "Decay": 0.0}}
    assert set(results["videos"]["moving"]["objects"]) == {"1", "2"}
    assert "ground truth for 1 of its 3 frames" in results["videos"]["first_only"]["note"]
    assert sorted(os.listdir(os.path.join(output, "first_only"))) == ["00000.png", "00001.png", "00002.png"]
    objects = [o for v in ("still", "moving") for o in results["videos"][v]["objects"].values()]
    assert results["J-Mean"] == pytest.approx(np.mean([o["J"]["Mean"] for o in objects]))
    assert results["J&F-Mean"] == pytest.approx((results["J-Mean"] + results["F-Mean"]) / 2)


def test_scores_are_those_of_the_written_pngs(davis, single_run):
    """The moving video's J per object equals the IoU of its PNGs with the annotations, frames 1 .. T-2."""
    _, data, _ = davis
    output, results = single_run
    for obj in (1, 2):
        per_frame = []
        for i in range(1, FRAMES):
            gt = datasets.read_palette_png(os.path.join(data, "Annotations", "480p", "moving", f"{i:05d}.png"))
            pred = datasets.read_palette_png(os.path.join(output, "moving", f"{i:05d}.png"))
            inter, union = np.sum((gt == obj) & (pred == obj)), np.sum((gt == obj) | (pred == obj))
            per_frame.append(1.0 if union == 0 else inter / union)
        assert results["videos"]["moving"]["objects"][str(obj)]["J"]["Mean"] == pytest.approx(np.mean(per_frame))


def test_two_processes_write_and_print_what_one_does(davis, single_run):
    root, _, flags = davis
    one, results = single_run
    two = str(root / "two")
    run = run_script("eval_video_segmentation.py", [*flags, "--output_dir", two, "--num_workers", "1"], nproc=2)
    assert last_json(run) == json.loads(json.dumps(results))  # frames read by a loader worker here
    for video in ("still", "moving", "first_only"):
        names = sorted(os.listdir(os.path.join(one, video)))
        assert sorted(os.listdir(os.path.join(two, video))) == names
        for name in names:
            assert np.array_equal(datasets.read_palette_png(os.path.join(one, video, name)),
                                  datasets.read_palette_png(os.path.join(two, video, name)))


def test_rerun_keeps_written_videos_unless_overwrite(davis, single_run, tmp_path, capsys, fresh_process_group):
    _, _, flags = davis
    one, results = single_run
    output = str(tmp_path / "out")
    shutil.copytree(one, output)
    marked = os.path.join(output, "still", "00002.png")
    datasets.write_palette_png(marked, np.zeros((HEIGHT, WIDTH), dtype=np.uint8), datasets.davis_palette())
    os.remove(os.path.join(output, "moving", "00003.png"))  # an interrupted video is segmented again
    again = vos.main(parse([*flags, "--output_dir", output]))
    out = capsys.readouterr().out
    assert "still: all 4 frames already segmented" in out and "moving: segmenting 5 frames" in out
    assert again["videos"]["still"]["objects"]["1"]["J"]["Mean"] < 1.0  # scored from the kept (marked) PNGs
    assert again["videos"]["moving"] == results["videos"]["moving"]
    redone = vos.main(parse([*flags, "--output_dir", output, "--overwrite", "true"]))
    assert redone == results


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------
def broken_copy(data: str, tmp_path) -> str:
    copy = str(tmp_path / "DAVIS")
    shutil.copytree(data, copy)
    return copy


@pytest.mark.parametrize("folder", ["ImageSets", "JPEGImages", "Annotations"])
def test_missing_davis_folder_is_an_error_naming_it(davis, tmp_path, folder):
    copy = broken_copy(davis[1], tmp_path)
    shutil.rmtree(os.path.join(copy, folder))
    message = f"{os.path.join(copy, folder)} not found: --data_path must be the DAVIS-2017 folder"
    with pytest.raises(utils.UserError, match=re.escape(message)):
        datasets.davis_videos(copy)


def test_bad_videos_and_annotations_are_errors_naming_the_file(davis, tmp_path, fresh_process_group):
    _, data, flags = davis
    copy = broken_copy(data, tmp_path)
    run = parse([*flags, "--data_path", copy, "--output_dir", str(tmp_path / "out"), "--overwrite", "true"])
    frames = os.path.join(copy, "JPEGImages", "480p", "still")
    for name in os.listdir(frames):
        os.remove(os.path.join(frames, name))
    with pytest.raises(utils.UserError, match=re.escape(f"video still has no frames: no .jpg files in {frames}")):
        vos.main(run)
    shutil.rmtree(os.path.join(copy, "JPEGImages", "480p", "still"))
    shutil.copytree(os.path.join(data, "JPEGImages", "480p", "still"), frames)
    first = os.path.join(copy, "Annotations", "480p", "still", "00000.png")
    Image.fromarray(FIRST_MASK).save(first)  # grayscale, not a palette image
    with pytest.raises(utils.UserError, match=re.escape(f"{first} is not a palette image")):
        vos.run_video(None, "still", run)
    datasets.write_palette_png(first, FIRST_MASK[:, :90], datasets.davis_palette())
    message = f"first annotation {first} is 64x90 but its frame {frames}/00000.jpg is 64x96"
    with pytest.raises(utils.UserError, match=re.escape(message)):
        vos.run_video(torch.nn.Identity(), "still", run)
    os.remove(first)
    with pytest.raises(utils.UserError, match=re.escape(f"annotation {first} not found")):
        vos.run_video(None, "still", run)


def test_errors_are_one_line_from_the_command_line(davis, tmp_path):
    _, data, flags = davis
    copy = broken_copy(data, tmp_path)
    shutil.rmtree(os.path.join(copy, "Annotations"))
    result = run_script("eval_video_segmentation.py", [*flags, "--data_path", copy, "--output_dir", str(tmp_path)])
    assert_one_line_error(result, os.path.join(copy, "Annotations"), "not found")
