"""Tests of patch_matching.py: the coordinate-image test of DESIGN.md (matched patches show the same
place), a hand-worked case, the vectorised matcher against a plain per-patch reference, and the demo."""
import math
import os
import shutil
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

import patch_matching
import transforms
import utils
from transforms import CropGeometry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = 256  # side of the resized source image, as in training
VIEW_KINDS = {"global": (224, (0.4, 1.0)), "local": (96, (0.05, 0.4))}


def reference_match(geom_a: CropGeometry, geom_b: CropGeometry, patch_size: int) -> tuple:
    """The paper's algorithm written plainly, one axis and one patch at a time."""
    axes = []
    for start, length in (("top", "height"), ("left", "width")):
        lo = max(getattr(geom_a, start), getattr(geom_b, start))
        hi = min(getattr(geom_a, start) + getattr(geom_a, length), getattr(geom_b, start) + getattr(geom_b, length))
        kept = []
        for geom in (geom_a, geom_b):
            grid = geom.out_size // patch_size
            size = Fraction(getattr(geom, length), grid)  # exact: centres on the edge count as inside
            kept.append([k for k in range(grid) if lo <= getattr(geom, start) + (k + Fraction(1, 2)) * size <= hi])
        n = min(len(kept[0]), len(kept[1])) if hi > lo else 0
        axes.append([[ks[math.floor(Fraction(j * (len(ks) - 1), max(n - 1, 1)))] for j in range(n)] for ks in kept])
    (rows_a, rows_b), (cols_a, cols_b) = axes
    idx_a, idx_b = [0], [0]
    for ra, rb in zip(rows_a, rows_b):
        for ca, cb in zip(cols_a, cols_b):
            for idx, geom, r, c in ((idx_a, geom_a, ra, ca), (idx_b, geom_b, rb, cb)):
                grid = geom.out_size // patch_size
                idx.append(1 + r * grid + (grid - 1 - c if geom.flipped else c))
    return idx_a, idx_b


def random_pairs(n: int, seed: int) -> list:
    """n random (geom_a, geom_b) on a 256x256 source, cycling through global/local combinations."""
    torch.manual_seed(seed)
    kinds = [("global", "global"), ("global", "local"), ("local", "global"), ("local", "local")]
    pairs = []
    for k in range(n):
        ka, kb = kinds[k % 4]
        pairs.append((transforms.sample_crop_geometry(SOURCE, SOURCE, *VIEW_KINDS[ka]),
                      transforms.sample_crop_geometry(SOURCE, SOURCE, *VIEW_KINDS[kb])))
    return pairs


def patch_mean_coords(coords: np.ndarray, geom: CropGeometry, patch_size: int) -> np.ndarray:
    """Cut the coordinate image like the transform does; mean (x, y) of every patch in token order -> (g*g, 2)."""
    crop = transforms.crop_image(coords, geom)  # (S, S, 2) source coordinates of each output pixel
    g = geom.out_size // patch_size
    return crop.reshape(g, patch_size, g, patch_size, 2).mean(axis=(1, 3)).reshape(g * g, 2)


@pytest.fixture(scope="module")
def coordinate_image() -> np.ndarray:
    """(256, 256, 2) float32 image whose pixels hold their own (x, y) centre in source coordinates."""
    ys, xs = np.mgrid[0:SOURCE, 0:SOURCE].astype(np.float32) + 0.5
    return np.ascontiguousarray(np.stack([xs, ys], axis=-1))


@pytest.mark.parametrize("patch_size", [16, 32])
def test_coordinate_image(coordinate_image, patch_size):
    errors, overlapping, empty = [], 0, 0
    for geom_a, geom_b in random_pairs(600, seed=patch_size):
        idx_a, idx_b = patch_matching.match_patches(geom_a, geom_b, patch_size)
        assert idx_a.dtype == np.int64 and idx_b.dtype == np.int64 and len(idx_a) == len(idx_b)
        assert idx_a[0] == 0 and idx_b[0] == 0
        assert np.all(idx_a[1:] >= 1) and np.all(idx_b[1:] >= 1)
        for idx, geom in ((idx_a, geom_a), (idx_b, geom_b)):
            assert idx.max() < 1 + (geom.out_size // patch_size) ** 2
            assert len(np.unique(idx)) == len(idx)  # the paper subsamples: no patch is used twice
        if len(idx_a) == 1:
            empty += 1
            continue
        overlapping += 1
        mean_a = patch_mean_coords(coordinate_image, geom_a, patch_size)[idx_a[1:] - 1]  # (K, 2)
        mean_b = patch_mean_coords(coordinate_image, geom_b, patch_size)[idx_b[1:] - 1]  # (K, 2)
        grids = [g.out_size // patch_size for g in (geom_a, geom_b)]
        coarse = np.array([max(geom_a.width / grids[0], geom_b.width / grids[1]),
                           max(geom_a.height / grids[0], geom_b.height / grids[1])])  # (x, y) source px
        errors.append(np.abs(mean_a - mean_b) / coarse)  # (K, 2) in patches of the coarser view
    errors = np.concatenate(errors)
    assert overlapping > 300 and empty > 10
    # Uniform subsampling pairs the two rectangles' ends and floors in between, so a pair can be off by
    # up to one coarse patch plus one fine patch; over thousands of pairs it stays within 1.3.
    assert errors.max() < 1.4, errors.max()
    assert errors.mean(axis=0).max() < 0.4, errors.mean(axis=0)  # an off-by-one patch pushes this over 0.5


def test_no_overlap_and_thin_overlap():
    a = CropGeometry(0, 0, 100, 100, 224, False)
    for b in (CropGeometry(0, 100, 100, 100, 96, False),  # touching edges
              CropGeometry(150, 150, 50, 50, 96, True),  # apart
              CropGeometry(0, 95, 100, 100, 96, False)):  # overlap thinner than half a patch of either view
        idx_a, idx_b = patch_matching.match_patches(a, b, 16)
        assert idx_a.tolist() == [0] and idx_b.tolist() == [0]


def test_hand_worked_case():
    # a: 96 px box at the origin seen at 96 px (grid 6, 16 source px per patch), not flipped.
    # b: box rows 16..80, cols 40..104 seen at 32 px (grid 2, 32 source px per patch), flipped.
    # Intersection rows 16..80, cols 40..96. Patch centres inside: a rows 1..4, cols 2..5 (4 x 4);
    # b rows 0..1, source cols 0..1 (2 x 2). a subsampled by floor(linspace(0, 3, 2)) = [0, 3]:
    # rows 1, 4 and cols 2, 5. b's source cols 0, 1 are tensor cols 1, 0.
    a = CropGeometry(0, 0, 96, 96, 96, False)
    b = CropGeometry(16, 40, 64, 64, 32, True)
    idx_a, idx_b = patch_matching.match_patches(a, b, 16)
    assert idx_a.tolist() == [0, 1 + 6 + 2, 1 + 6 + 5, 1 + 24 + 2, 1 + 24 + 5]
    assert idx_b.tolist() == [0, 1 + 0 + 1, 1 + 0 + 0, 1 + 2 + 1, 1 + 2 + 0]
    back_b, back_a = patch_matching.match_patches(b, a, 16)  # the algorithm is symmetric
    assert back_a.tolist() == idx_a.tolist() and back_b.tolist() == idx_b.tolist()
    flipped_a = a._replace(flipped=True)  # mirroring a mirrors its columns only
    idx_fa, idx_fb = patch_matching.match_patches(flipped_a, b, 16)
    assert idx_fa.tolist() == [0, 1 + 6 + 3, 1 + 6 + 0, 1 + 24 + 3, 1 + 24 + 0] and idx_fb.tolist() == idx_b.tolist()


def test_vectorised_matcher_equals_reference():
    for patch_size in (8, 16, 32):
        for geom_a, geom_b in random_pairs(300, seed=100 + patch_size):
            idx_a, idx_b = patch_matching.match_patches(geom_a, geom_b, patch_size)
            ref_a, ref_b = reference_match(geom_a, geom_b, patch_size)
            assert idx_a.tolist() == ref_a and idx_b.tolist() == ref_b, (geom_a, geom_b)


def test_match_all_pairs_order_and_content():
    torch.manual_seed(0)
    geoms = ([transforms.sample_crop_geometry(SOURCE, SOURCE, *VIEW_KINDS["global"]) for _ in range(2)]
             + [transforms.sample_crop_geometry(SOURCE, SOURCE, *VIEW_KINDS["local"]) for _ in range(8)])
    matches = patch_matching.match_all_pairs(geoms, 16)
    assert [(i, v) for i, v, _, _ in matches] == [(i, v) for i in range(2) for v in range(10) if v != i]
    for i, v, idx_t, idx_s in matches:
        ref_t, ref_s = patch_matching.match_patches(geoms[i], geoms[v], 16)
        assert np.array_equal(idx_t, ref_t) and np.array_equal(idx_s, ref_s)
    assert len(patch_matching.match_all_pairs(geoms[:3], 16, num_global=1)) == 2


def test_sizes_not_multiple_of_patch_size():
    with pytest.raises(ValueError, match="multiple"):
        patch_matching.match_patches(CropGeometry(0, 0, 50, 50, 100, False), CropGeometry(0, 0, 50, 50, 96, False), 16)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """The repository's scripts and test.png in a fresh folder: the demo reads and writes relative paths."""
    folder = tmp_path_factory.mktemp("demo")
    for name in [f for f in os.listdir(REPO) if f.endswith(".py")] + ["test.png"]:
        shutil.copy(os.path.join(REPO, name), folder / name)
    return folder


def run_demo(folder, *flags):
    return subprocess.run([sys.executable, "patch_matching.py", *flags], cwd=folder, capture_output=True, text=True,
                          timeout=120)


def test_demo_writes_result(demo_dir):
    done = run_demo(demo_dir, "--seed", "3")
    assert done.returncode == 0, done.stderr
    with Image.open(demo_dir / "result.png") as picture:
        assert picture.height > 300 and picture.width > 3 * 300
    pairs = [line.split("->") for line in done.stdout.splitlines() if "->" in line and "global" not in line]
    assert pairs[0] == ["     0 ", "    0"] and len(pairs) > 1


def test_demo_missing_image(demo_dir):
    done = run_demo(demo_dir, "--image", "missing.png", "--output", "other.png")
    assert done.returncode != 0
    assert len(done.stderr.strip().splitlines()) == 1 and "missing.png" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (demo_dir / "other.png").exists()


def test_demo_bad_image_and_flags(tmp_path):
    (tmp_path / "broken.png").write_text("not an image")
    parser = patch_matching.get_args_parser()
    for flags, message in ((["--image", str(tmp_path / "broken.png")], "broken.png"),
                           (["--image", os.path.join(REPO, "test.png"), "--local_size", "100"], "--local_size")):
        args = parser.parse_args(flags + ["--output", str(tmp_path / "out.png")])
        with pytest.raises(utils.UserError, match=message):
            patch_matching.main(args)
    assert not (tmp_path / "out.png").exists()
