"""Patch matching of Patch-Wise DINO (Javidani et al. 2023, "Local-Global Self-Supervised Visual
Representation Learning"): which tokens of two augmented views show the same place of the image.

The authors' rule (their ``augment.py``), reproduced token for token: intersect the two crop boxes in
source pixels, ``[lo, hi)`` per axis; in each view of grid g whose box starts at s and spans L source
pixels, keep the patches ``start = round(g * (lo - s) / L)`` to ``start + round(g * (hi - lo) / L)``
(Python's round, half to even, in float64 as their code computes it), cut at the grid; columns counted
from the mirrored side when the view is flipped, and read in source order. For rows and for columns
independently, the view with more of them is subsampled with ``floor(linspace(0, n_big - 1, n_small))``
(numpy's own float arithmetic) down to the other's count; the two rectangles are paired element-wise in
row-major source order. Token 0 is [CLS] and always comes first; boxes that do not overlap, or an axis
with nothing kept, give only the [CLS] pair. Patch (r, c) of a crop with grid g is token 1 + r * g + c
of the tensor the network sees (after the flip).

Because each view's range is rounded to its own grid and the two ranges are paired end to end, a matched
pair's patches can be up to about one coarse plus one fine patch apart; on random DINO crops they differ
by a third of a coarse patch on average (tests/test_patch_matching.py). One deliberate difference: a range
whose rounded end passes the grid is cut at the grid before mirroring; the authors' slicing does this for
unflipped views but turns it into a negative index on flipped ones (a rare case of odd grids).

``python patch_matching.py`` is the demo: it cuts a global and a local view out of ``test.png``, writes
``result.png`` with both views, their patch grids and token numbers and the matched patches linked,
and prints the matched token pairs.
"""
import argparse
import os
from typing import NamedTuple, Sequence

import cv2
import numpy as np
import torch

import datasets
import transforms
import utils
from transforms import CropGeometry


class _Views(NamedTuple):
    """Crop geometries as named int64 arrays, one entry per view; ``grid`` is patches per side."""
    top: np.ndarray
    left: np.ndarray
    height: np.ndarray
    width: np.ndarray
    grid: np.ndarray
    flipped: np.ndarray

    @classmethod
    def from_geometries(cls, geometries: Sequence[CropGeometry], patch_size: int) -> "_Views":
        top, left, height, width, out_size, flipped = np.array(geometries, dtype=np.int64).reshape(-1, 6).T
        if np.any(out_size % patch_size):
            raise ValueError(f"crop sizes {sorted(set(out_size.tolist()))} must be multiples of "
                             f"the patch size {patch_size}")
        return cls(top, left, height, width, out_size // patch_size, flipped.astype(bool))

    def take(self, index: np.ndarray) -> "_Views":
        return _Views(*(field[index] for field in self))


def _kept_range(lo: np.ndarray, hi: np.ndarray, start: np.ndarray, length: np.ndarray,
                grid: np.ndarray) -> tuple:
    """``(first, count)`` of the patches of each view along one axis that show [lo, hi) (source pixels).

    The authors' rounding, in their float64 arithmetic: ``first = round(g * ((lo - s) / L))``,
    ``count = round(g * ((hi - lo) / L))``, half to even, the end cut at the grid. ``first`` is counted
    in source order (from the crop's left edge even when the view is flipped).
    """
    first = np.round(grid * ((lo - start) / length)).astype(np.int64)
    count = np.round(grid * ((hi - lo) / length)).astype(np.int64)
    return first, np.clip(np.minimum(first + count, grid) - first, 0, None)


def _subsample(k: np.ndarray, count: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """``floor(linspace(0, count - 1, kept))[k]`` elementwise, with numpy's own arithmetic: k times the float64
    step, the last point exactly ``count - 1``. (Exact integer division differs in a few cases, e.g. 31 -> 23.)"""
    step = (count - 1) / np.maximum(kept - 1, 1)
    return np.where((k == kept - 1) & (kept > 1), count - 1, np.floor(k * step)).astype(np.int64)


class _AxisMatch(NamedTuple):
    """Per view pair, along one axis: the kept patch range of view a and of view b, and how many are paired."""
    first_a: np.ndarray
    count_a: np.ndarray
    first_b: np.ndarray
    count_b: np.ndarray
    paired: np.ndarray  # min(count_a, count_b), 0 when the boxes do not overlap on this axis


def _match_axis(a: _Views, b: _Views, start: str, length: str) -> _AxisMatch:
    """Rows (``start="top"``) or columns (``start="left"``) of every view pair (a[p], b[p])."""
    s_a, l_a, s_b, l_b = getattr(a, start), getattr(a, length), getattr(b, start), getattr(b, length)
    lo, hi = np.maximum(s_a, s_b), np.minimum(s_a + l_a, s_b + l_b)  # (P,) intersection in source pixels
    first_a, count_a = _kept_range(lo, hi, s_a, l_a, a.grid)
    first_b, count_b = _kept_range(lo, hi, s_b, l_b, b.grid)
    return _AxisMatch(first_a, count_a, first_b, count_b, np.where(hi > lo, np.minimum(count_a, count_b), 0))


def _tokens(view: _Views, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Token 1 + r * g + c of patch (row, source-order column) in the tensor the network sees (after the flip)."""
    cols = np.where(view.flipped, view.grid - 1 - cols, cols)
    return 1 + rows * view.grid + cols


def _match_many(views: _Views, pairs_a: np.ndarray, pairs_b: np.ndarray) -> list:
    """``match_patches`` for the P view pairs (pairs_a[p], pairs_b[p]) of ``views``, all at once."""
    a, b = views.take(pairs_a), views.take(pairs_b)
    rows, cols = _match_axis(a, b, "top", "height"), _match_axis(a, b, "left", "width")
    n_rows, n_cols = rows.paired, cols.paired  # (P,) each
    sizes = 1 + n_rows * n_cols  # (P,) entries of each pair, [CLS] included
    ends = np.cumsum(sizes)  # (P,)
    pair = np.repeat(np.arange(len(sizes)), sizes)  # (M,) the pair of each output entry
    q = np.arange(ends[-1]) - (ends - sizes)[pair] - 1  # (M,) patch number within its pair, -1 for [CLS]
    k_row, k_col = np.divmod(q, np.maximum(n_cols[pair], 1))  # (M,) each, in source order
    tokens = []
    for view, row_first, row_count, col_first, col_count in (
            (a, rows.first_a, rows.count_a, cols.first_a, cols.count_a),
            (b, rows.first_b, rows.count_b, cols.first_b, cols.count_b)):
        r = row_first[pair] + _subsample(k_row, row_count[pair], n_rows[pair])  # (M,)
        c = col_first[pair] + _subsample(k_col, col_count[pair], n_cols[pair])  # (M,)
        tokens.append(np.where(q < 0, 0, _tokens(view.take(pair), r, c)))  # (M,)
    bounds = [0] + ends.tolist()
    return [(tokens[0][b0:b1], tokens[1][b0:b1]) for b0, b1 in zip(bounds[:-1], bounds[1:])]


def match_patches(geom_a: CropGeometry, geom_b: CropGeometry, patch_size: int) -> tuple:
    """Token indices ``(idx_a, idx_b)`` (int64 arrays of equal length, [CLS] pair first) showing the same place."""
    views = _Views.from_geometries([geom_a, geom_b], patch_size)
    return _match_many(views, np.array([0]), np.array([1]))[0]


def match_all_pairs(geometries: Sequence[CropGeometry], patch_size: int, num_global: int = 2) -> list:
    """``(i, v, idx_teacher, idx_student)`` for every teacher global view i and every student view v != i."""
    pairs = [(i, v) for i in range(num_global) for v in range(len(geometries)) if v != i]
    if not pairs:
        return []
    teacher, student = np.array(pairs).T  # (P,) each
    matches = _match_many(_Views.from_geometries(geometries, patch_size), teacher, student)
    return [(i, v, idx_t, idx_s) for (i, v), (idx_t, idx_s) in zip(pairs, matches)]


def cls_only_matches(num_views: int, num_global: int = 2) -> list:
    """The view pairs of ``match_all_pairs`` with the [CLS] pair only (vanilla DINO's loss)."""
    cls = np.zeros(1, dtype=np.int64)
    return [(i, v, cls, cls) for i in range(num_global) for v in range(num_views) if v != i]


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
    parser.add_argument("--image", default=os.path.join(utils.REPO_DIR, "test.png"), type=str,
                        help="image to cut the two views from (default: the shipped test.png)")
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
        raise utils.UserError(f"image {args.image} not found: pass --image with the path of an image")
    source = transforms.to_rgb_array(datasets.open_image(args.image))  # (H, W, 3)
    if args.resize:
        source = transforms.resize_source(source, args.resize)  # (R, R, 3)
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
    utils.run_cli(main, utils.ArgumentParser("Patch-matching demo", parents=[get_args_parser()]).parse_args())
