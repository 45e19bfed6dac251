"""Semi-supervised video object segmentation on DAVIS-2017 by label propagation (the DINO protocol), with its scores.

Reproduces DINO's ``eval_video_segmentation.py`` (Caron et al., ICCV 2021, after Jabri et al.'s space-time
correspondence walk): for each video of ``ImageSets/2017/val.txt`` the frames are resized (shorter side 480, the
longer one floored to a multiple of 64, OpenCV bilinear) and normalised; the features are the last block's patch
tokens, L2-normalised. The first frame's annotation, resized to the patch grid by nearest neighbour, is one-hot; each
later frame takes its labels from the first frame and the ``--n_last_frames`` previous ones (their propagated soft
labels): affinities exp(cos / 0.1) to sources within +-``--size_mask_neighborhood`` patches in rows and columns, per
target patch every affinity below its ``--topk``-th largest over all context frames set to 0, the rest normalised
to sum 1 and used to average the sources' labels. The result is upsampled bilinearly by the patch size, min-max
normalised per object, arg-maxed, resized (nearest) to the frame's size and written as a palette PNG
``output_dir/<video>/<frame>.png`` (the first frame: its annotation), as the davis2017-evaluation scorer reads them.

Scores as davis2017-evaluation computes them (semi-supervised): per object, J (region IoU) and F (boundary F-measure,
boundaries matched within ceil(0.008 x image diagonal) pixels), over every frame but the first and the last, void
(255) pixels of the ground truth excluded; per object their mean, recall (fraction of frames above 0.5) and decay
(first quarter minus last quarter); the global figures average over all objects, J&F-Mean = (J-Mean + F-Mean) / 2.

Deliberate differences from the reference, one line each:
- affinities per 8 x 8 tile of targets (sources within reach), not dense (N x N) with a loop-built mask: same result;
- features are L2-normalised once per frame (the reference normalises the context again for every target): same values;
- ``--n_last_frames 0`` uses the first frame alone (the reference's ``queue.Queue(0)`` is unbounded: every frame);
- a square frame's annotation uses the frame's grid (the reference's ``read_seg`` transposes it);
- the first output is named after the first frame (the reference always writes ``00000.png``; the same on DAVIS);
- the videos are split over the ``torchrun`` processes, and videos already written are kept unless ``--overwrite``.
"""
import argparse
import json
import math
import os
from collections import deque
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import datasets
import utils

TEMPERATURE = 0.1  # affinity exp(cos / T)
TILE = 8  # targets are propagated in tiles of TILE x TILE patches, against the sources within reach of the tile
TILE_ELEMENTS = 2 ** 22  # largest affinity block (contexts x tile patches x source patches) held at once
BOUND_TH = 0.008  # boundary tolerance, a fraction of the image diagonal (davis2017-evaluation's bound_th)
DECAY_BINS = 4  # decay: the mean of the first of 4 bins of frames minus the mean of the last
STATISTICS = ("Mean", "Recall", "Decay")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Video object segmentation on DAVIS-2017 by label propagation", add_help=False)
    parser.add_argument("--data_path", default="/path/to/davis-2017/DAVIS/", type=str,
                        help="DAVIS-2017 folder holding ImageSets/2017/val.txt, JPEGImages/480p and Annotations/480p.")
    parser.add_argument("--output_dir", default=".", type=str,
                        help="Where the segmentations go: output_dir/<video>/<frame>.png (palette PNGs).")
    parser.add_argument("--n_last_frames", default=7, type=utils.bounded(int, low=0),
                        help="Number of preceding frames whose predictions are propagated, besides the first frame.")
    parser.add_argument("--size_mask_neighborhood", default=12, type=utils.bounded(int, low=0),
                        help="Sources are restricted to +- this many patches in rows and columns of the target "
                        "patch (0: no restriction).")
    parser.add_argument("--topk", default=5, type=utils.bounded(int, low=1),
                        help="Each target patch accumulates the labels of its k most similar source patches.")
    parser.add_argument("--short_side", default=480, type=utils.bounded(int, low=1),
                        help="Frames are resized so that their shorter side is this (a multiple of --patch_size) "
                        "and the longer side is floored to a multiple of 64.")
    parser.add_argument("--overwrite", default=False, type=utils.bool_flag,
                        help="Segment again the videos whose outputs are already all written (default: keep them).")
    utils.eval_model_args(parser)
    return parser


# ----------------------------------------------------------------------------------------------------
# Label propagation
# ----------------------------------------------------------------------------------------------------
def reach(span: Tuple[int, int], length: int, radius: int) -> Tuple[int, int]:
    """The source positions [first, last) within ``radius`` of the target positions ``span`` = [start, stop) on an
    axis of ``length`` patches (the whole axis when ``radius`` is 0: no restriction)."""
    return (max(0, span[0] - radius), min(length, span[1] + radius)) if radius > 0 else (0, length)


def tile_side(grid: Tuple[int, int], radius: int, contexts: int, max_elements: int, side: int = TILE) -> int:
    """Side of the square tiles of target patches: ``side``, or less until the affinity block of a tile (contexts,
    tile patches, source patches within reach) holds at most ``max_elements`` values; at least 1."""
    height, width = grid

    def elements(t: int) -> int:
        def sources(length: int) -> int:  # along one axis, for a tile in the middle
            return min(length, t + 2 * radius) if radius > 0 else length

        return contexts * min(t, height) * min(t, width) * sources(height) * sources(width)

    while side > 1 and elements(side) > max_elements:
        side -= 1
    return side


def neighbourhood_mask(rows: Tuple[int, int], cols: Tuple[int, int], source_rows: Tuple[int, int],
                       source_cols: Tuple[int, int], radius: int, device: torch.device) -> torch.Tensor:
    """True where a source patch lies within ``radius`` rows and columns of a target patch, for the target patches of
    ``rows`` x ``cols`` and the source patches of ``source_rows`` x ``source_cols`` (row-major): (T, S)."""
    def near(targets: Tuple[int, int], sources: Tuple[int, int]) -> torch.Tensor:
        offsets = torch.arange(*targets, device=device)[:, None] - torch.arange(*sources, device=device)[None]
        return offsets.abs() <= radius  # (targets, sources)

    row_ok, col_ok = near(rows, source_rows), near(cols, source_cols)  # (tr, sr), (tc, sc)
    mask = row_ok[:, None, :, None] & col_ok[None, :, None, :]  # (tr, tc, sr, sc)
    return mask.reshape(row_ok.shape[0] * col_ok.shape[0], -1)  # (T, S)


def propagate_tile(target: torch.Tensor, sources: torch.Tensor, labels: torch.Tensor, rows: Tuple[int, int],
                   cols: Tuple[int, int], radius: int, topk: int, temperature: float) -> torch.Tensor:
    """``propagate_labels`` for the target patches of ``rows`` x ``cols``, against the source patches within reach:
    (C, tr, tc). ``target`` (h, w, D), ``sources`` (n, h, w, D), ``labels`` (n, C, h, w)."""
    contexts, classes, height, width = labels.shape
    source_rows, source_cols = reach(rows, height, radius), reach(cols, width, radius)
    queries = target[rows[0]:rows[1], cols[0]:cols[1]].reshape(-1, target.shape[-1])  # (T, D)
    keys = sources[:, source_rows[0]:source_rows[1], source_cols[0]:source_cols[1]]  # (n, sr, sc, D)
    aff = torch.exp(queries @ keys.reshape(contexts, -1, keys.shape[-1]).transpose(1, 2) / temperature)  # (n, T, S)
    if radius > 0:
        aff = aff * neighbourhood_mask(rows, cols, source_rows, source_cols, radius, aff.device)  # (n, T, S)
    aff = aff.transpose(0, 1).reshape(aff.shape[1], -1)  # (T, n * S), context-major as the labels below
    if aff.shape[1] >= topk:  # else the k-th largest over all n * N sources is a masked-out 0: keep them all
        kth = aff.topk(topk, dim=1).values[:, -1:]  # (T, 1)
        aff = torch.where(aff < kth, torch.zeros_like(aff), aff)  # (T, n * S)
    aff = aff / aff.sum(dim=1, keepdim=True)  # (T, n * S)
    tile_labels = labels[:, :, source_rows[0]:source_rows[1], source_cols[0]:source_cols[1]]  # (n, C, sr, sc)
    tile_labels = tile_labels.transpose(0, 1).reshape(classes, -1)  # (C, n * S)
    return (tile_labels @ aff.T).reshape(classes, rows[1] - rows[0], cols[1] - cols[0])  # (C, tr, tc)


@torch.no_grad()
def propagate_labels(target: torch.Tensor, sources: torch.Tensor, labels: torch.Tensor, grid: Tuple[int, int],
                     radius: int, topk: int, temperature: float = TEMPERATURE,
                     max_elements: int = TILE_ELEMENTS) -> torch.Tensor:
    """DINO's label propagation to one frame: (C, N) soft labels of its N = h * w patches.

    ``target`` (N, D) and ``sources`` (n, N, D) are L2-normalised patch features (row-major on the ``grid``) of the
    target frame and of its n context frames; ``labels`` (n, C, N) are the context frames' labels. Affinity
    exp(cos / temperature), zero outside +-``radius`` rows and columns (no restriction when ``radius`` is 0); per
    target patch, affinities below its ``topk``-th largest over all n * N sources are set to zero, the others
    normalised to sum 1, and the labels averaged with them. Computed per square tile of target patches against the
    source patches within reach, at most about ``max_elements`` affinities at a time; equal to the dense computation.
    """
    height, width = grid
    contexts, classes = labels.shape[:2]
    side = tile_side(grid, radius, contexts, max_elements)
    target = target.reshape(height, width, -1)  # (h, w, D)
    sources = sources.reshape(contexts, height, width, -1)  # (n, h, w, D)
    labels = labels.reshape(contexts, classes, height, width)  # (n, C, h, w)
    out = labels.new_empty(classes, height, width)  # (C, h, w)
    for top in range(0, height, side):
        for left in range(0, width, side):
            rows, cols = (top, min(height, top + side)), (left, min(width, left + side))
            out[:, rows[0]:rows[1], cols[0]:cols[1]] = propagate_tile(target, sources, labels, rows, cols, radius,
                                                                      topk, temperature)  # (C, tr, tc)
    return out.reshape(classes, -1)  # (C, N)


class ContextQueue:
    """The context frames of DINO's propagation: the first frame and the ``n_last`` latest ones (a queue), each as
    (features (N, D), labels (C, N)); the first frame's labels are its one-hot annotation, the others' their
    propagated soft labels."""

    def __init__(self, first_features: torch.Tensor, first_labels: torch.Tensor, n_last: int):
        self.first = (first_features, first_labels)
        self.latest: deque = deque(maxlen=n_last)

    def context(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Features (n, N, D) and labels (n, C, N) of the context frames, the first frame first, then oldest first."""
        frames = [self.first, *self.latest]
        return torch.stack([features for features, _ in frames]), torch.stack([labels for _, labels in frames])

    def push(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.latest.append((features, labels))


def first_frame_labels(annotation: np.ndarray, grid: Tuple[int, int]) -> torch.Tensor:
    """The first annotation (H, W) resized to the patch grid by nearest neighbour (PIL, as DINO's ``read_seg``) and
    one-hot over ids 0 .. its largest id: (C, h * w)."""
    small = np.array(Image.fromarray(annotation).resize((grid[1], grid[0]), Image.Resampling.NEAREST))  # (h, w)
    ids = torch.from_numpy(small.astype(np.int64)).flatten()  # (N,)
    return F.one_hot(ids, int(ids.max()) + 1).T.float()  # (C, N)


def labels_to_mask(soft: torch.Tensor, grid: Tuple[int, int], patch_size: int, size: Tuple[int, int]) -> np.ndarray:
    """Object ids of a frame from its propagated (C, N) labels, as DINO writes them: upsampled bilinearly by the patch
    size, each object's map min-max normalised (when its maximum is positive), arg-maxed, resized to ``size`` = (H, W)
    by nearest neighbour: (H, W) uint8."""
    seg = soft.reshape(1, soft.shape[0], *grid)  # (1, C, h, w)
    seg = F.interpolate(seg, scale_factor=patch_size, mode="bilinear", align_corners=False,
                        recompute_scale_factor=False)[0]  # (C, h * p, w * p)
    low = seg.amin(dim=(1, 2), keepdim=True)  # (C, 1, 1)
    high = seg.amax(dim=(1, 2), keepdim=True)  # (C, 1, 1)
    seg = torch.where(high > 0, (seg - low) / (high - low), seg)  # (C, h * p, w * p)
    ids = torch.max(seg, dim=0).indices.to(torch.uint8).cpu().numpy()  # (h * p, w * p)
    return np.array(Image.fromarray(ids).resize((size[1], size[0]), Image.Resampling.NEAREST))  # (H, W)


# ----------------------------------------------------------------------------------------------------
# Videos
# ----------------------------------------------------------------------------------------------------
class FrameList(torch.utils.data.Dataset):
    """The frames of one video read as DINO reads them (``datasets.read_davis_frame``): items ``(frame, (H, W))``."""

    def __init__(self, paths: Sequence[str], short_side: int):
        self.paths, self.short_side = list(paths), short_side

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
        return datasets.read_davis_frame(self.paths[index], self.short_side)


def patch_features(model: nn.Module, frame: torch.Tensor) -> torch.Tensor:
    """The last block's patch tokens of one frame (3, h, w), [CLS] dropped, L2-normalised: (N, D)."""
    tokens = model.get_intermediate_layers(frame[None], n=1)[0]  # (1, 1+N, D)
    return F.normalize(tokens[0, 1:], dim=1, p=2)  # (N, D)


def output_path(folder: str, frame: str) -> str:
    return os.path.join(folder, os.path.splitext(os.path.basename(frame))[0] + ".png")


def check_grid(frame: str, shape: Sequence[int], patch_size: int) -> Tuple[int, int]:
    """The patch grid (h, w) of a resized frame of (3, h * p, w * p); a size that is not a multiple of the patch is
    a ``UserError``."""
    height, width = shape[-2:]
    if height % patch_size or width % patch_size:
        raise utils.UserError(f"frame {frame} resized to {height}x{width} is not a multiple of --patch_size "
                              f"{patch_size}: pass a --short_side that is one (DINO: 480)")
    return height // patch_size, width // patch_size


@torch.inference_mode()
def segment_video(model: nn.Module, frames: List[str], annotation_path: str, folder: str,
                  args: argparse.Namespace) -> None:
    """Propagate the first annotation through the frames of one video; write one palette PNG per frame."""
    annotation = datasets.read_palette_png(annotation_path)  # (H, W)
    palette = datasets.davis_palette()
    loader = torch.utils.data.DataLoader(FrameList(frames, args.short_side), batch_size=None,
                                         num_workers=args.num_workers)
    for index, (frame, size) in enumerate(loader):
        size = tuple(int(side) for side in size)
        if index == 0:
            if annotation.shape != size:
                raise utils.UserError(f"first annotation {annotation_path} is {annotation.shape[0]}x"
                                      f"{annotation.shape[1]} but its frame {frames[0]} is {size[0]}x{size[1]}")
            grid = check_grid(frames[0], frame.shape, args.patch_size)
            queue = ContextQueue(patch_features(model, frame.to(args.device)),
                                 first_frame_labels(annotation, grid).to(args.device), args.n_last_frames)
            datasets.write_palette_png(output_path(folder, frames[0]), annotation, palette)
            continue
        if size != annotation.shape:
            raise utils.UserError(f"frame {frames[index]} is {size[0]}x{size[1]} but the first frame of its video "
                                  f"is {annotation.shape[0]}x{annotation.shape[1]}")
        features = patch_features(model, frame.to(args.device))  # (N, D)
        soft = propagate_labels(features, *queue.context(), grid, args.size_mask_neighborhood, args.topk)  # (C, N)
        queue.push(features, soft)
        ids = labels_to_mask(soft, grid, args.patch_size, size)  # (H, W)
        datasets.write_palette_png(output_path(folder, frames[index]), ids, palette)


# ----------------------------------------------------------------------------------------------------
# Scores (davis2017-evaluation's db_eval_iou, f_measure, _seg2bmap, db_statistics)
# ----------------------------------------------------------------------------------------------------
def region_similarity(gt: np.ndarray, pred: np.ndarray, void: Optional[np.ndarray] = None) -> float:
    """J: intersection over union of two binary masks (H, W), void pixels left out; 1 when both are empty."""
    keep = np.ones_like(gt, dtype=bool) if void is None else ~void  # (H, W)
    union = np.sum((gt | pred) & keep)
    return 1.0 if union == 0 else float(np.sum(gt & pred & keep) / union)


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """One-pixel boundaries of a binary mask (H, W): pixels that differ from their right, lower or lower-right
    neighbour (the last row and column compare along themselves only; the corner is never one)."""
    right, below, diagonal = (np.zeros_like(mask) for _ in range(3))
    right[:, :-1], below[:-1, :], diagonal[:-1, :-1] = mask[:, 1:], mask[1:, :], mask[1:, 1:]
    edges = (mask ^ right) | (mask ^ below) | (mask ^ diagonal)  # (H, W)
    edges[-1, :] = mask[-1, :] ^ right[-1, :]
    edges[:, -1] = mask[:, -1] ^ below[:, -1]
    edges[-1, -1] = False
    return edges


def disk(radius: int) -> np.ndarray:
    """The (2r+1, 2r+1) uint8 disk x^2 + y^2 <= r^2 (scikit-image's ``morphology.disk``)."""
    offsets = np.arange(-radius, radius + 1)  # (2r+1,)
    return (offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius ** 2).astype(np.uint8)  # (2r+1, 2r+1)


def boundary_f_measure(gt: np.ndarray, pred: np.ndarray, void: Optional[np.ndarray] = None,
                       bound_th: float = BOUND_TH) -> float:
    """F: harmonic mean of the boundary precision and recall of two binary masks (H, W), a boundary pixel counting
    as matched within ``ceil(bound_th * diagonal)`` pixels (``bound_th`` >= 1: that many pixels), void pixels left
    out. A missing boundary gives precision 1 and recall 0 (or the reverse); both missing give 1."""
    keep = np.ones_like(gt, dtype=bool) if void is None else ~void  # (H, W)
    radius = int(bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*gt.shape)))
    pred_edges, gt_edges = boundary_map(pred & keep), boundary_map(gt & keep)  # (H, W) each
    kernel = disk(radius)
    pred_near = cv2.dilate(pred_edges.astype(np.uint8), kernel) > 0  # (H, W)
    gt_near = cv2.dilate(gt_edges.astype(np.uint8), kernel) > 0  # (H, W)
    n_pred, n_gt = int(pred_edges.sum()), int(gt_edges.sum())
    if n_pred == 0 or n_gt == 0:
        precision, recall = (1.0 if n_pred == 0 else 0.0), (1.0 if n_gt == 0 else 0.0)
    else:
        precision, recall = np.sum(pred_edges & gt_near) / n_pred, np.sum(gt_edges & pred_near) / n_gt
    return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))


def statistics(values: Sequence[float]) -> Dict[str, float]:
    """Mean, recall (fraction above 0.5) and decay of per-frame scores: the mean over the first of 4 bins of frames
    minus the mean over the last, the bins bounded at round(linspace(1, n, 5)) - 1 (ends included)."""
    values = np.asarray(values, dtype=np.float64)  # (n,)
    bounds = (np.round(np.linspace(1, len(values), DECAY_BINS + 1) + 1e-10) - 1).astype(int)  # (5,)
    bins = [values[bounds[i]:bounds[i + 1] + 1] for i in range(DECAY_BINS)]
    return {"Mean": float(values.mean()), "Recall": float(np.mean(values > 0.5)),
            "Decay": float(bins[0].mean() - bins[-1].mean())}


def score_video(annotations: Dict[str, str], frames: List[str], folder: str) -> Dict[str, dict]:
    """J and F statistics of each object of one video (ids 1 .. the largest id of the first annotation, void 255
    excluded) over every frame but the first and the last: ``{"1": {"J": {"Mean", ...}, "F": {...}}, ...}``."""
    names = [os.path.splitext(os.path.basename(frame))[0] for frame in frames]
    first = datasets.read_palette_png(annotations[names[0]])
    objects = int(np.where(first == 255, 0, first).max())
    scores: Dict[int, Dict[str, list]] = {k: {"J": [], "F": []} for k in range(1, objects + 1)}
    for name in names[1:-1]:
        gt, pred = datasets.read_palette_png(annotations[name]), datasets.read_palette_png(output_path(folder, name))
        if gt.shape != pred.shape:
            raise utils.UserError(f"{output_path(folder, name)} is {pred.shape[0]}x{pred.shape[1]} but its annotation "
                                  f"{annotations[name]} is {gt.shape[0]}x{gt.shape[1]}: rerun with --overwrite true")
        void = gt == 255  # (H, W)
        for k, per_frame in scores.items():
            per_frame["J"].append(region_similarity(gt == k, pred == k, void))
            per_frame["F"].append(boundary_f_measure(gt == k, pred == k, void))
    return {str(k): {m: statistics(v) for m, v in per_frame.items()} for k, per_frame in scores.items()}


def unscored_reason(annotations: Dict[str, str], frames: List[str]) -> Optional[str]:
    """Why a video cannot be scored (not every frame annotated, or no frame between the first and the last)."""
    names = {os.path.splitext(os.path.basename(frame))[0] for frame in frames}
    if not names <= set(annotations):
        return f"ground truth for {len(names & set(annotations))} of its {len(names)} frames: not scored"
    if len(frames) < 3:
        return f"{len(frames)} frames, none between the first and the last to score: not scored"
    return None


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------
def run_video(model: nn.Module, video: str, args: argparse.Namespace) -> dict:
    """Segment one video (unless its outputs are all written and not ``--overwrite``), then score it."""
    frames = datasets.davis_frames(args.data_path, video)
    annotations = datasets.davis_annotations(args.data_path, video)
    first = os.path.splitext(os.path.basename(frames[0]))[0]
    first_annotation = annotations.get(first, os.path.join(args.data_path, "Annotations", datasets.DAVIS_RESOLUTION,
                                                           video, first + ".png"))
    folder = os.path.join(args.output_dir, video)
    if not args.overwrite and all(os.path.isfile(output_path(folder, frame)) for frame in frames):
        print(f"{video}: all {len(frames)} frames already segmented in {folder} (--overwrite true to redo them)",
              force=True)
    else:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise utils.UserError(f"cannot create {folder} ({exc}): choose another --output_dir") from None
        print(f"{video}: segmenting {len(frames)} frames", force=True)
        segment_video(model, frames, first_annotation, folder, args)
    reason = unscored_reason(annotations, frames)
    return {"note": reason} if reason else {"objects": score_video(annotations, frames, folder)}


def summary(results: Dict[str, dict]) -> dict:
    """The global figures (means over all objects of all scored videos) and the per-video results."""
    objects = [scores for result in results.values() for scores in result.get("objects", {}).values()]
    figures = {f"{m}-{s}": float(np.mean([o[m][s] for o in objects])) if objects else None
               for m in ("J", "F") for s in STATISTICS}
    both = (figures["J-Mean"] + figures["F-Mean"]) / 2 if objects else None
    return {"J&F-Mean": both, **figures, "videos": results}


def print_tables(results: Dict[str, dict], figures: dict) -> None:
    """The two tables of davis2017-evaluation: global figures, then J-Mean and F-Mean per object (<video>_<id>)."""
    names = ["J&F-Mean"] + [f"{m}-{s}" for m in ("J", "F") for s in STATISTICS]
    print("Global results:\n" + " ".join(f"{name:>9s}" for name in names))
    print(" ".join(f"{figures[name]:9.3f}" if figures[name] is not None else f"{'-':>9s}" for name in names))
    rows = [(f"{video}_{k}", o["J"]["Mean"], o["F"]["Mean"])
            for video, result in results.items() for k, o in result.get("objects", {}).items()]
    width = max([len(name) for name, _, _ in rows] + [len("Sequence")])
    print(f"Per-sequence results:\n{'Sequence':>{width}s}  J-Mean  F-Mean")
    for name, j, f in rows:
        print(f"{name:>{width}s}  {j:6.3f}  {f:6.3f}")
    for video, result in results.items():
        if "note" in result:
            print(f"Note: {video}: {result['note']}")


def main(args: argparse.Namespace) -> dict:
    args.force_cpu = not args.use_cuda
    videos = datasets.davis_videos(args.data_path)
    utils.init_distributed_mode(args)
    utils.resolve_model_args(args)
    print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))
    model = utils.build_backbone(args.arch, args.patch_size)
    utils.load_pretrained_weights(model, args.pretrained_weights, args.checkpoint_key, args.arch, args.patch_size)
    model.to(args.device).eval()
    print(f"{len(videos)} videos, split over {utils.get_world_size()} processes")
    mine = {video: run_video(model, video, args) for video in videos[utils.get_rank()::utils.get_world_size()]}
    gathered = [mine]
    if utils.get_world_size() > 1:
        gathered = [None] * utils.get_world_size()
        torch.distributed.all_gather_object(gathered, mine)
    merged = {k: v for part in gathered for k, v in part.items()}
    results = summary({video: merged[video] for video in videos})
    if utils.is_main_process():
        print_tables(results["videos"], results)
        print(json.dumps(results), flush=True)
    return results


if __name__ == "__main__":
    parser = utils.ArgumentParser("Video object segmentation on DAVIS-2017", parents=[get_args_parser()])
    utils.run_cli(main, parser.parse_args())
