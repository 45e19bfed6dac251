"""Patch matching of Patch-Wise DINO (Javidani et al. 2023, "Local-Global Self-Supervised Visual
Representation Learning"): which tokens of two augmented views show the same place of the image.

The paper's algorithm: intersect the two crop boxes in source coordinates; in each view, the patches
whose centres fall inside the intersection form a rectangle of patch indices (columns mirrored when the
view is flipped); for rows and for columns independently, the view with more of them is subsampled on a
uniform grid (``floor(linspace(0, n_big - 1, n_small))``) down to the other's count; the rectangles are
then paired element-wise, in source order. Token 0 is [CLS] and is always paired first; patch (r, c)
of a crop with grid g is token 1 + r * g + c of the tensor the network sees (after the flip).

Rounding: a patch belongs to a view's rectangle when its centre lies in the intersection (bounds are
exact integer divisions, so ties do not depend on floating point), and the subsampling floors exactly
in integers. Because the two rectangles are paired end to end, a matched pair's patch centres differ
by at most one patch of the coarser view plus one of the finer view; on random DINO crops they differ
by about a third of a coarse patch on average (tests/test_patch_matching.py).

``python patch_matching.py`` is the demo: it cuts a global and a local view out of ``test.png``, writes
``result.png`` with both views, their patch grids and token numbers and the matched patches linked,
and prints the matched token pairs.
"""
import argparse
import os
from typing import Sequence

import cv2
import numpy as np
import torch

import transforms
import utils
from transforms import CropGeometry


def _axis_ranges(lo: np.ndarray, hi: np.ndarray, start: np.ndarray, length: np.ndarray,
                 grid: np.ndarray) -> tuple:
    """(first, count) of the patches along one axis of each view whose centres lie in [lo, hi] (source px).

    Patch k's centre is start + (2k + 1) * length / (2 * grid): the bounds are exact integer divisions,
    so a centre lying exactly on the intersection's edge is always kept.
    """
    denominator = 2 * length
    first = -((length - 2 * grid * (lo - start)) // denominator)  # ceil((2g(lo - s) - L) / 2L)
    last = (2 * grid * (hi - start) - length) // denominator  # floor((2g(hi - s) - L) / 2L)
    first, last = np.maximum(first, 0), np.minimum(last, grid - 1)
    return first, last - first + 1


def _as_array(geometries: Sequence[CropGeometry], patch_size: int) -> np.ndarray:
    """(N, 6) int64 array of (top, left, height, width, grid, flipped), checking out_size % patch_size."""
    table = np.array(geometries, dtype=np.int64).reshape(-1, 6)  # (N, 6)
    if np.any(table[:, 4] % patch_size):
        raise ValueError(f"crop sizes {sorted(set(table[:, 4].tolist()))} must be multiples of "
                         f"the patch size {patch_size}")
    table[:, 4] //= patch_size
    return table


def _match_many(table: np.ndarray, pairs_a: np.ndarray, pairs_b: np.ndarray) -> list:
    """``match_patches`` for the P view pairs (pairs_a[p], pairs_b[p]) of ``table``, all at once."""
    geo_a, geo_b = table[pairs_a], table[pairs_b]  # (P, 6) each
    columns, kept = [], []
    for s, l in ((0, 2), (1, 3)):  # rows from (top, height), then columns from (left, width)
        lo = np.maximum(geo_a[:, s], geo_b[:, s])  # (P,) intersection in source pixels
        hi = np.minimum(geo_a[:, s] + geo_a[:, l], geo_b[:, s] + geo_b[:, l])  # (P,)
        first_a, count_a = _axis_ranges(lo, hi, geo_a[:, s], geo_a[:, l], geo_a[:, 4])
        first_b, count_b = _axis_ranges(lo, hi, geo_b[:, s], geo_b[:, l], geo_b[:, 4])
        kept.append(np.where(hi > lo, np.minimum(count_a, count_b), 0).clip(min=0))  # (P,) pairs on this axis
        columns += [first_a, count_a - 1, first_b, count_b - 1]
    n_rows, n_cols = kept
    n_rows, n_cols = np.where(n_cols > 0, n_rows, 0), np.where(n_rows > 0, n_cols, 0)
    sizes = n_rows * n_cols + 1  # (P,) tokens per pair, [CLS] included
    ends = np.cumsum(sizes)
    # per pair: 0-7 (first, count - 1) of rows a, rows b, cols a, cols b; 8-9 rows and cols kept - 1;
    # 10 cols kept; 11 start of the pair in the output; 12-15 grid and flip of a, then of b
    per_pair = np.stack(columns + [
        np.maximum(n_rows - 1, 1), np.maximum(n_cols - 1, 1), np.maximum(n_cols, 1), ends - sizes,
        geo_a[:, 4], geo_a[:, 5], geo_b[:, 4], geo_b[:, 5]], axis=1)  # (P, 16)
    entry = per_pair[np.repeat(np.arange(len(sizes)), sizes)]  # (M, 16) one row per output entry
    q = np.arange(ends[-1]) - entry[:, 11] - 1  # (M,) patch number in its pair, -1 for [CLS]
    k_row, k_col = q // entry[:, 10], q % entry[:, 10]  # (M,)
    tokens = []
    for view in (0, 1):
        # first + floor(linspace(0, count - 1, n)), in exact integer arithmetic
        rows = entry[:, 2 * view] + k_row * entry[:, 2 * view + 1] // entry[:, 8]  # (M,)
        cols = entry[:, 4 + 2 * view] + k_col * entry[:, 5 + 2 * view] // entry[:, 9]  # (M,) in source order
        grid, flipped = entry[:, 12 + 2 * view], entry[:, 13 + 2 * view]
        cols = np.where(flipped == 1, grid - 1 - cols, cols)  # column of the mirrored tensor
        tokens.append(np.where(q < 0, 0, 1 + rows * grid + cols))  # (M,)
    bounds = [0] + ends.tolist()
    return [(tokens[0][b0:b1], tokens[1][b0:b1]) for b0, b1 in zip(bounds[:-1], bounds[1:])]


def match_patches(geom_a: CropGeometry, geom_b: CropGeometry, patch_size: int) -> tuple:
    """Token indices ``(idx_a, idx_b)`` (int64 arrays of equal length, [CLS] pair first) showing the same place."""
    table = _as_array([geom_a, geom_b], patch_size)
    return _match_many(table, np.array([0]), np.array([1]))[0]


def match_all_pairs(geometries: Sequence[CropGeometry], patch_size: int, num_global: int = 2) -> list:
    """``(i, v, idx_teacher, idx_student)`` for every teacher global view i and every student view v != i."""
    pairs = [(i, v) for i in range(num_global) for v in range(len(geometries)) if v != i]
    if not pairs:
        return []
    teacher, student = np.array(pairs).T  # (P,) each
    matches = _match_many(_as_array(geometries, patch_size), teacher, student)
    return [(i, v, idx_t, idx_s) for (i, v), (idx_t, idx_s) in zip(pairs, matches)]


def sample_overlapping_views(source: np.ndarray, args: argparse.Namespace, max_tries: int = 100) -> tuple:
    """Random global and local geometries (DINO scales) whose patches match; (geom_global, geom_local)."""
    height, width = source.shape[:2]
    for _ in range(max_tries):
        geom_global = transforms.sample_crop_geometry(height, width, args.global_size, (0.4, 1.0))
        geom_local = transforms.sample_crop_geometry(height, width, args.local_size, (0.05, 0.4))
        if len(match_patches(geom_global, geom_local, args.patch_size)[0]) > 1:
            return geom_global, geom_local
    raise utils.UserError(f"no overlapping views found in {max_tries} tries: try another --seed")


def _draw_view(view: np.ndarray, side: int, grid: int, color: tuple) -> np.ndarray:
    """Enlarge a view to ``side`` pixels and draw its patch grid and token numbers (BGR)."""
    canvas = cv2.cvtColor(cv2.resize(view, (side, side), interpolation=cv2.INTER_CUBIC), cv2.COLOR_RGB2BGR)
    cell = side / grid
    for k in range(grid + 1):
        pos = min(round(k * cell), side - 1)
        cv2.line(canvas, (pos, 0), (pos, side - 1), color, 1)
        cv2.line(canvas, (0, pos), (side - 1, pos), color, 1)
    font_scale = max(0.3, min(0.6, cell / 70))
    for r in range(grid):
        for c in range(grid):
            org = (round(c * cell) + 3, round(r * cell) + int(14 * font_scale / 0.5))
            cv2.putText(canvas, str(1 + r * grid + c), org, cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), 3,
                        cv2.LINE_AA)
            cv2.putText(canvas, str(1 + r * grid + c), org, cv2.FONT_HERSHEY_SIMPLEX, font_scale, (255, 255, 255), 1,
                        cv2.LINE_AA)
    return canvas


def _patch_centre(token: int, grid: int, x0: int, y0: int, cell: float) -> tuple:
    """Pixel (x, y) of the centre of patch token ``token`` in a view panel whose corner is (x0, y0)."""
    row, col = divmod(token - 1, grid)
    return round(x0 + (col + 0.5) * cell), round(y0 + (row + 0.5) * cell)


def render_matches(source: np.ndarray, views: Sequence[np.ndarray], geoms: Sequence[CropGeometry],
                   idx_a: np.ndarray, idx_b: np.ndarray, patch_size: int, side: int = 448) -> np.ndarray:
    """BGR picture: the source with both boxes, then both views with grids, token numbers and linked matches."""
    gap, title_h = 40, 30
    box_colors = ((0, 200, 255), (255, 120, 0))  # BGR: global orange-yellow, local blue
    panel_src = cv2.cvtColor(cv2.resize(source, (side, side), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2BGR)
    sy, sx = side / source.shape[0], side / source.shape[1]
    for geom, color in zip(geoms, box_colors):
        p0 = (round(geom.left * sx), round(geom.top * sy))
        p1 = (round((geom.left + geom.width) * sx) - 1, round((geom.top + geom.height) * sy) - 1)
        cv2.rectangle(panel_src, p0, p1, color, 3)
        label = "flipped" if geom.flipped else ""
        cv2.putText(panel_src, label, (p0[0] + 4, p1[1] - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.5, color, 1, cv2.LINE_AA)
    grids = [g.out_size // patch_size for g in geoms]
    panels = [panel_src] + [_draw_view(v, side, g, c) for v, g, c in zip(views, grids, box_colors)]
    canvas = np.full((side + title_h, 3 * side + 2 * gap, 3), 255, dtype=np.uint8)
    offsets = [k * (side + gap) for k in range(3)]
    titles = ["source (resized) with both boxes",
              f"global view {geoms[0].out_size}px", f"local view {geoms[1].out_size}px"]
    for panel, x, title in zip(panels, offsets, titles):
        canvas[title_h:, x:x + side] = panel
        cv2.putText(canvas, title, (x + 4, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    pairs = list(zip(idx_a[1:].tolist(), idx_b[1:].tolist()))  # [CLS] has no place
    for k, (ta, tb) in enumerate(pairs):
        hue = int(180 * k / max(len(pairs), 1))
        color = tuple(int(v) for v in cv2.cvtColor(np.uint8([[[hue, 255, 230]]]), cv2.COLOR_HSV2BGR)[0, 0])
        pa = _patch_centre(ta, grids[0], offsets[1], title_h, side / grids[0])
        pb = _patch_centre(tb, grids[1], offsets[2], title_h, side / grids[1])
        cv2.circle(canvas, pa, 6, color, -1, cv2.LINE_AA)
        cv2.circle(canvas, pb, 6, color, -1, cv2.LINE_AA)
        cv2.line(canvas, pa, pb, color, 2, cv2.LINE_AA)
    return canvas


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Patch-matching demo", add_help=False)
    parser.add_argument("--image", default="test.png", type=str, help="image to cut the two views from")
    parser.add_argument("--output", default="result.png", type=str, help="where to write the picture of the matches")
    parser.add_argument("--patch_size", default=32, type=int, help="patch size in pixels of the views")
    parser.add_argument("--seed", default=0, type=int, help="random seed of the crop geometries")
    parser.add_argument("--global_size", default=224, type=int, help="side of the global view (multiple of patch_size)")
    parser.add_argument("--local_size", default=96, type=int, help="side of the local view (multiple of patch_size)")
    parser.add_argument("--resize", default=256, type=int,
                        help="resize the image to resize x resize first, as training does (0 keeps its size)")
    return parser


def main(args: argparse.Namespace) -> list:
    for flag, size in (("--global_size", args.global_size), ("--local_size", args.local_size)):
        if args.patch_size <= 0 or size <= 0 or size % args.patch_size:
            raise utils.UserError(f"{flag} {size} must be a positive multiple of --patch_size {args.patch_size}")
    if args.resize < 0:
        raise utils.UserError(f"--resize {args.resize} must be >= 0 (0 keeps the image size)")
    if not cv2.haveImageWriter(args.output):
        raise utils.UserError(f"--output {args.output}: OpenCV cannot write this image type; use .png or .jpg")
    if not os.path.isfile(args.image):
        raise utils.UserError(f"image {args.image} not found: put a test.png here or pass --image")
    source = transforms.to_rgb_array(utils.open_image(args.image))  # (H, W, 3)
    if args.resize:
        source = transforms.resize_image(source, args.resize, args.resize)  # (R, R, 3)
    torch.manual_seed(args.seed)
    geoms = sample_overlapping_views(source, args)
    views = [transforms.crop_image(source, g) for g in geoms]  # (S, S, 3) each
    idx_global, idx_local = match_patches(geoms[0], geoms[1], args.patch_size)
    picture = render_matches(source, views, geoms, idx_global, idx_local, args.patch_size)
    if not cv2.imwrite(args.output, picture):
        raise utils.UserError(f"cannot write {args.output}: check that its folder exists and is writable")
    print(f"global view: {geoms[0]}\nlocal view:  {geoms[1]}")
    print("matched tokens (global -> local; 0 is [CLS], patch (r, c) is 1 + r * grid + c):")
    for ta, tb in zip(idx_global.tolist(), idx_local.tolist()):
        print(f"  {ta:4d} -> {tb:4d}")
    print(f"wrote {args.output}")
    return list(zip(idx_global.tolist(), idx_local.tolist()))


if __name__ == "__main__":
    utils.run_cli(main, argparse.ArgumentParser("Patch-matching demo", parents=[get_args_parser()]).parse_args())
