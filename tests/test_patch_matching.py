"""Tests of patch_matching.py: the matcher against a per-pair transcription of the authors' rule, the
coordinate-image test of DESIGN.md (matched patches show the same place), a hand-worked case, and the demo."""
import os
import shutil
import subprocess
import sys

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


def authors_rule(geom_a: CropGeometry, geom_b: CropGeometry, patch_size: int) -> tuple:
    """The authors' matching rule (their augment.py), transcribed one view pair at a time with Python's round,
    2-D token grids, slicing and np.floor(np.linspace(...)), as their code computes it."""
    box = {}
    for name, (s, length) in (("rows", ("top", "height")), ("cols", ("left", "width"))):
        starts = [getattr(g, s) for g in (geom_a, geom_b)]
        ends = [getattr(g, s) + getattr(g, length) for g in (geom_a, geom_b)]
        box[name] = (max(starts), min(ends))
    if any(lo >= hi for lo, hi in box.values()):
        return [0], [0]
    kept = []
    for geom in (geom_a, geom_b):
        g = geom.out_size // patch_size
        tokens = np.arange(1, g * g + 1).reshape(g, g)  # the tensor's token grid, after the flip
        ranges = []
        for name, s, length in (("rows", geom.top, geom.height), ("cols", geom.left, geom.width)):
            lo, hi = box[name]
            first = round(g * ((lo - s) / length))
            count = round(g * ((hi - lo) / length))
            ranges.append((first, min(first + count, g)))
        (r0, r1), (c0, c1) = ranges
        if geom.flipped:  # source columns [c0, c1) are tensor columns [g - c1, g - c0), read backwards
            kept.append(np.fliplr(tokens[r0:r1, g - c1:g - c0]))
        else:
            kept.append(tokens[r0:r1, c0:c1])
    (rows_a, cols_a), (rows_b, cols_b) = kept[0].shape, kept[1].shape
    n_rows, n_cols = min(rows_a, rows_b), min(cols_a, cols_b)
    picked = []
    for grid, rows, cols in ((kept[0], rows_a, cols_a), (kept[1], rows_b, cols_b)):
        pick_rows = [int(x) for x in np.floor(np.linspace(0, rows - 1, n_rows))]
        pick_cols = [int(x) for x in np.floor(np.linspace(0, cols - 1, n_cols))]
        picked.append([0] + [int(t) for t in grid[pick_rows][:, pick_cols].flatten()])
    return picked[0], picked[1]


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
    # Each view's range is rounded to its own grid (half a patch at either end) and the longer one is subsampled
    # with a floor, so a pair can be off by up to one coarse plus one fine patch (1.8 at most, 0.30-0.41 on
    # average over 2,000 DINO pairs at patch 8-32); a mirrored or shifted column pushes the mean past 0.5.
    assert errors.max() < 2.0, errors.max()
    assert errors.mean(axis=0).max() < 0.45, errors.mean(axis=0)


def test_no_overlap_and_thin_overlap():
    a = CropGeometry(0, 0, 100, 100, 224, False)
    for b in (CropGeometry(0, 100, 100, 100, 96, False),  # touching edges
              CropGeometry(150, 150, 50, 50, 96, True),  # apart
              CropGeometry(0, 95, 100, 100, 96, False)):  # overlap thinner than half a patch of either view
        idx_a, idx_b = patch_matching.match_patches(a, b, 16)
        assert idx_a.tolist() == [0] and idx_b.tolist() == [0]


def test_hand_worked_case():
    # a: 96 px box at the origin seen at 96 px (grid 6), not flipped.
    # b: box rows 16..80, cols 40..104 seen at 32 px (grid 2), flipped.
    # Intersection rows [16, 80), cols [40, 96). a: rows start round(6 * 16/96) = 1, count round(6 * 64/96) = 4;
    # cols start round(6 * 40/96) = round(2.5) = 2 (half to even), count round(6 * 56/96) = round(3.5) = 4:
    # rows 1..4, cols 2..5. b: rows 0..1; cols start 0, count round(2 * 56/64) = 2: source cols 0..1, which are
    # tensor cols 1, 0. a is subsampled by floor(linspace(0, 3, 2)) = [0, 3]: rows 1, 4 and cols 2, 5.
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


def random_geometry(rng: np.random.Generator, out_size: int, kind: str) -> CropGeometry:
    """A box on the 256x256 source: DINO's random crop, one touching the image border, or any box."""
    flipped = bool(rng.integers(2))
    if kind in VIEW_KINDS:
        torch.manual_seed(int(rng.integers(2 ** 31)))
        return transforms.sample_crop_geometry(SOURCE, SOURCE, out_size, VIEW_KINDS[kind][1])._replace(flipped=flipped)
    height, width = (int(x) for x in rng.integers(8, SOURCE + 1, size=2))
    top, left = (int(x) for x in rng.integers(0, SOURCE - np.array([height, width]) + 1))
    if kind == "border":  # flush with one or two edges of the image
        top = [0, SOURCE - height, top][int(rng.integers(3))]
        left = [0, SOURCE - width, left][int(rng.integers(3))]
    return CropGeometry(top, left, height, width, out_size, flipped)


def rule_test_pairs(n: int, seed: int) -> list:
    """(geom_a, geom_b, patch_size): globals and locals at 224/96 and small crops of 1 to 7 patches, patch 4,
    8, 16; DINO boxes, boxes touching the border, arbitrary boxes (often disjoint); and two pairs whose rounded
    range ends past the grid (3 patches of 16 px over 60 source px: start round(1.5) = 2, count round(1.5) = 2)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for k in range(n):
        patch_size = (4, 8, 16)[k % 3]
        kinds = [("global", "local", "border", "any")[int(i)] for i in rng.integers(4, size=2)]
        geoms = []
        for kind in kinds:
            grid = int(rng.choice([1, 2, 3, 4, 5, 7]))  # small and odd grids make rounding ties likely
            out_size = VIEW_KINDS[kind][0] if kind in VIEW_KINDS else grid * patch_size
            geoms.append(random_geometry(rng, out_size, kind))
        pairs.append((*geoms, patch_size))
    past_the_grid = CropGeometry(0, 0, 60, 60, 48, False)
    for flipped in (False, True):
        pairs.append((past_the_grid._replace(flipped=flipped), CropGeometry(30, 30, 100, 100, 96, False), 16))
    return pairs


def test_matcher_equals_authors_rule():
    pairs = rule_test_pairs(3000, seed=7)
    seen = {"no overlap": 0, "empty axis": 0, "ties": 0, "end cut at the grid": 0, "flipped": 0}
    for geom_a, geom_b, patch_size in pairs:
        idx_a, idx_b = patch_matching.match_patches(geom_a, geom_b, patch_size)
        ref_a, ref_b = authors_rule(geom_a, geom_b, patch_size)
        assert idx_a.tolist() == ref_a and idx_b.tolist() == ref_b, (geom_a, geom_b, patch_size)
        back_b, back_a = patch_matching.match_patches(geom_b, geom_a, patch_size)  # the rule is symmetric
        assert back_a.tolist() == ref_a and back_b.tolist() == ref_b
        lo = max(geom_a.left, geom_b.left), max(geom_a.top, geom_b.top)
        hi = min(geom_a.left + geom_a.width, geom_b.left + geom_b.width), min(geom_a.top + geom_a.height,
                                                                              geom_b.top + geom_b.height)
        seen["no overlap"] += lo[0] >= hi[0] or lo[1] >= hi[1]
        seen["empty axis"] += lo[0] < hi[0] and lo[1] < hi[1] and len(ref_a) == 1
        seen["flipped"] += (geom_a.flipped or geom_b.flipped) and len(ref_a) > 1
        for geom in (geom_a, geom_b):
            g = geom.out_size // patch_size
            for axis, s, length in ((0, geom.left, geom.width), (1, geom.top, geom.height)):
                first, count = g * ((lo[axis] - s) / length), g * ((hi[axis] - lo[axis]) / length)
                seen["ties"] += first % 1 == 0.5 or count % 1 == 0.5
                seen["end cut at the grid"] += lo[axis] < hi[axis] and round(first) + round(count) > g
    assert all(count >= 2 for count in seen.values()), seen  # every case of the rule was exercised


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
    with pytest.raises(ValueError, match=r"^crop sizes \[96, 100\] must be multiples of the patch size 16$"):
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
