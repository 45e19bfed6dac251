"""Patch features of a ViT made visible: PCA colour maps and mutual nearest-neighbour correspondences.

Patch-Wise DINO trains every patch token, so its patch features are what to look at. For the given images
(``--image_paths``, resized to ``--image_size`` and cut at the bottom and right to a multiple of the patch size)
the script takes the last layer's patch tokens (after the final norm) and writes:

- PCA colours, as popularised by the DINOv2 paper (Oquab et al. 2023): the first three principal components of
  the patch features, fitted jointly over all the given images, mapped to red, green and blue (each scaled from its
  1st to its 99th percentile over all patches), one ``pca-<name>.png`` per image at the image's size and
  ``pca.png`` with every image next to its map. With ``--pca_threshold t`` the background is removed first: the
  first component is oriented so that the patches on the image borders lie lower than the average patch (the
  background usually touches the borders), scaled to [0, 1], and patches at or below t are drawn black; the colours
  then come from a PCA of the remaining (foreground) patches. Signs of the other components follow the largest
  projection (positive), so the colours do not depend on the solver's sign choice, nor on the scale of the features.
- For two images, correspondences: the cosine similarity of every patch of the first image to every patch of the
  second; pairs that are each other's nearest neighbour (mutual nearest neighbours), the ``--topk`` most similar
  of them, drawn as coloured lines between the two images (``matches.png``, as ``patch_matching.py``'s demo draws
  its pairs) and printed with their similarities.

Pictures are drawn on matplotlib's Agg canvas without pyplot (no display needed, no global backend set).
"""
import argparse
import os
from collections import Counter
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imsave
from torch import nn

import datasets
import utils

DEFAULT_MODEL = ("vit_small", 8)  # as visualize_attention.py, used without saved args
RANK_TOLERANCE = 1e-9  # singular values below this share of the largest are rounding noise
COLOUR_PERCENTILES = (0.01, 0.99)  # each PCA channel is scaled from the first to the second quantile
PANEL_INCHES = 3.2  # side of one image panel of pca.png
MATCHES_INCHES = 10.0  # width of matches.png


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Visualize the patch features of a ViT", add_help=False)
    utils.model_args(parser, *DEFAULT_MODEL)
    parser.add_argument("--image_paths", default=[os.path.join(utils.REPO_DIR, "test.png")], type=str, nargs="+",
                        help="One or more images for the PCA colours (default: the shipped test.png); with two, also "
                             "their correspondences.")
    parser.add_argument("--image_size", default=(480,), type=int, nargs="+",
                        help="Resize each image's shorter side to this size (default 480; aspect kept), or with two "
                             "values to HEIGHT WIDTH; it is then cut to a multiple of the patch size.")
    parser.add_argument("--output_dir", default=".", type=str,
                        help="Folder for the PNGs (created if needed; default: the current one).")
    parser.add_argument("--pca_threshold", default=None, type=float,
                        help="Remove the background: patches whose first principal component, scaled to [0, 1], "
                             "is at or below this (e.g. 0.5) are drawn black and the colours come from the rest; "
                             "default: keep every patch.")
    parser.add_argument("--topk", default=20, type=int,
                        help="With two images: how many mutual nearest-neighbour pairs to draw and print "
                             "(the most similar; default 20; 0: none).")
    return parser


# ----------------------------------------------------------------------------------------------------
# Features, PCA, correspondences
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def patch_features(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """The last layer's patch tokens (after the final norm) of an image (3, H, W): (h, w, D), row-major grid."""
    h, w = image.shape[-2] // model.patch_size, image.shape[-1] // model.patch_size
    tokens = model.forward_tokens(image[None])  # (1, 1+h*w, D)
    return tokens[0, 1:].reshape(h, w, -1)  # (h, w, D)


def pca_projections(features: torch.Tensor, n_components: int = 3) -> torch.Tensor:
    """Projections of the rows of ``features`` (M, D) on their first ``n_components`` principal axes, in float64:
    (M, n_components); each column's sign makes its largest absolute value positive. Components that do not exist
    (fewer than n_components directions of variance, up to rounding) are zero columns."""
    centred = features.double() - features.double().mean(dim=0)  # (M, D)
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)  # vh: (min(M, D), D)
    real = singular[:n_components] > RANK_TOLERANCE * singular[0]  # (<=n,) rounding noise is not a direction
    projections = centred @ vh[:n_components].T * real  # (M, <=n)
    largest = projections.gather(0, projections.abs().argmax(dim=0, keepdim=True))  # (1, <=n)
    projections = projections * torch.where(largest < 0, -1.0, 1.0)  # (M, <=n)
    return F.pad(projections, (0, n_components - projections.shape[1]))  # (M, n)


def scale_to_unit(values: torch.Tensor, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """Columns of ``values`` (M, C) mapped linearly from their ``low`` to their ``high`` quantile onto [0, 1],
    clipped; a constant column becomes 0."""
    lo, hi = torch.quantile(values, low, dim=0), torch.quantile(values, high, dim=0)  # (C,) each
    return ((values - lo) / (hi - lo).clamp_min(1e-12)).clamp(0.0, 1.0)  # (M, C)


def pca_colours(features: Sequence[torch.Tensor], threshold: Optional[float] = None) -> List[torch.Tensor]:
    """PCA colours of the patch features of several images, fitted jointly: one (h, w, 3) tensor in [0, 1] per
    image of ``features`` (each (h, w, D)). With ``threshold`` the background (first component, oriented so that
    border patches lie below the mean and scaled to [0, 1], at or below ``threshold``) is black and the colours
    come from a PCA of the foreground alone."""
    grids = [f.shape[:2] for f in features]
    flat = torch.cat([f.reshape(-1, f.shape[-1]) for f in features]).double()  # (M, D)
    keep = torch.ones(flat.shape[0], dtype=torch.bool)  # (M,)
    if threshold is not None:
        first = pca_projections(flat, 1)[:, 0]  # (M,)
        border = torch.cat([_border_mask(h, w).flatten() for h, w in grids])  # (M,)
        if first[border].mean() > first.mean():
            first = -first
        keep = scale_to_unit(first[:, None], 0.0, 1.0)[:, 0] > threshold  # (M,)
        if not keep.any():
            raise utils.UserError(f"no patch lies above --pca_threshold {threshold}: lower it")
    colours = torch.zeros(flat.shape[0], 3, dtype=torch.float64)  # (M, 3)
    colours[keep] = scale_to_unit(pca_projections(flat[keep]), *COLOUR_PERCENTILES)  # (K, 3)
    sizes = [h * w for h, w in grids]
    return [c.reshape(h, w, 3).float() for c, (h, w) in zip(colours.split(sizes), grids)]


def _border_mask(h: int, w: int) -> torch.Tensor:
    """(h, w) booleans, true on the outermost rows and columns of the patch grid."""
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
    return mask


def mutual_nearest_neighbours(features_a: torch.Tensor, features_b: torch.Tensor,
                              topk: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs (i, j) where patch j of b is the most similar (cosine) to patch i of a and i the most similar to j,
    the ``topk`` most similar first. Features are (Na, D) and (Nb, D); returns indices (K,), (K,) and
    similarities (K,)."""
    similarity = F.normalize(features_a.float(), dim=1) @ F.normalize(features_b.float(), dim=1).T  # (Na, Nb)
    best_b = similarity.argmax(dim=1)  # (Na,)
    best_a = similarity.argmax(dim=0)  # (Nb,)
    index_a = torch.nonzero(best_a[best_b] == torch.arange(len(best_b)))[:, 0]  # (P,)
    index_b = best_b[index_a]  # (P,)
    sims = similarity[index_a, index_b]  # (P,)
    order = sims.argsort(descending=True, stable=True)[:topk]  # (K,)
    return index_a[order], index_b[order], sims[order]


# ----------------------------------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------------------------------
def _figure(width: float, height: float) -> Figure:
    return FigureCanvasAgg(Figure(figsize=(width, height), layout="constrained")).figure


def upsample(grid: torch.Tensor, patch_size: int) -> np.ndarray:
    """A (h, w, C) patch grid repeated over each patch's pixels: (h*p, w*p, C) numpy array."""
    return grid.repeat_interleave(patch_size, 0).repeat_interleave(patch_size, 1).numpy()  # (H, W, C)


def save_pca_figure(images: Sequence[np.ndarray], colour_maps: Sequence[np.ndarray], names: Sequence[str],
                    path: str, title: str) -> None:
    """``pca.png``: one row per image, the image next to its PCA colours."""
    aspect = max(image.shape[0] / image.shape[1] for image in images)
    fig = _figure(2 * PANEL_INCHES, len(images) * PANEL_INCHES * aspect + 0.6)
    axes = fig.subplots(len(images), 2, squeeze=False)
    for row, image, colours, name in zip(axes, images, colour_maps, names):
        row[0].imshow(image)
        row[0].set_title(name, fontsize=10)
        row[1].imshow(colours)
        row[1].set_title("PCA colours (components 1, 2, 3 as R, G, B)", fontsize=9)
        for ax in row:
            ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)


def patch_centre(index: int, grid_width: int, patch_size: int) -> Tuple[float, float]:
    """Pixel (x, y) of the centre of patch ``index`` (row-major on a grid ``grid_width`` patches wide)."""
    row, col = divmod(index, grid_width)
    return (col + 0.5) * patch_size, (row + 0.5) * patch_size


def save_matches_figure(images: Sequence[np.ndarray], pairs: Sequence[Tuple[int, int, float]],
                        grid_widths: Sequence[int], patch_size: int, path: str, title: str) -> None:
    """``matches.png``: both images side by side, each pair's patch centres joined by a line of its own colour and
    numbered by rank (1 = most similar)."""
    gap = 0.05 * images[0].shape[1]
    offset = images[0].shape[1] + gap
    height = max(image.shape[0] for image in images)
    width = offset + images[1].shape[1]
    fig = _figure(MATCHES_INCHES, MATCHES_INCHES * height / width + 0.8)
    ax = fig.subplots()
    ax.imshow(images[0], extent=(0, images[0].shape[1], images[0].shape[0], 0))
    ax.imshow(images[1], extent=(offset, width, images[1].shape[0], 0))
    hues = colormaps["hsv"]
    for rank, (index_a, index_b, _) in enumerate(pairs):
        colour = hues(rank / max(len(pairs), 1))
        xa, ya = patch_centre(index_a, grid_widths[0], patch_size)
        xb, yb = patch_centre(index_b, grid_widths[1], patch_size)
        ax.plot((xa, xb + offset), (ya, yb), "-", color=colour, linewidth=1.3)
        ax.plot((xa, xb + offset), (ya, yb), "o", color=colour, markersize=4, markeredgecolor="black",
                markeredgewidth=0.5)
        ax.annotate(str(rank + 1), (xa, ya), xytext=(3, 3), textcoords="offset points", fontsize=7, color="white",
                    bbox=dict(boxstyle="round,pad=0.1", facecolor=colour, edgecolor="none", alpha=0.8))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    fig.savefig(path, dpi=100)


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------
def output_names(paths: Sequence[str]) -> List[str]:
    """``pca-<file name without extension>.png`` per image; the position is added when names repeat."""
    stems = [os.path.splitext(os.path.basename(path))[0] for path in paths]
    repeated = any(count > 1 for count in Counter(stems).values())
    return [f"pca-{i}-{stem}.png" if repeated else f"pca-{stem}.png" for i, stem in enumerate(stems)]


def write_pca(images: Sequence[np.ndarray], features: Sequence[torch.Tensor], args: argparse.Namespace) -> list:
    """Compute the PCA colours, write one PNG per image and ``pca.png``; returns the (h, w, 3) colour grids."""
    colours = pca_colours(features, args.pca_threshold)
    pixels = [upsample(c, args.patch_size) for c in colours]  # (H, W, 3) each
    for name, picture in zip(output_names(args.image_paths), pixels):
        imsave(os.path.join(args.output_dir, name), picture)
        print(f"wrote {os.path.join(args.output_dir, name)}")
    title = f"{args.arch}/{args.patch_size}, PCA fitted jointly over {len(images)} image(s)"
    if args.pca_threshold is not None:
        title += f", background (first component <= {args.pca_threshold}) black"
    save_pca_figure(images, pixels, [os.path.basename(p) for p in args.image_paths],
                    os.path.join(args.output_dir, "pca.png"), title)
    print(f"wrote {os.path.join(args.output_dir, 'pca.png')}")
    return colours


def write_matches(images: Sequence[np.ndarray], features: Sequence[torch.Tensor],
                  args: argparse.Namespace) -> List[Tuple[int, int, float]]:
    """Find, print and draw the ``--topk`` mutual nearest neighbours of two images: [(patch a, patch b, sim)]."""
    (ha, wa, dim), (hb, wb, _) = features[0].shape, features[1].shape
    index_a, index_b, sims = mutual_nearest_neighbours(features[0].reshape(-1, dim), features[1].reshape(-1, dim),
                                                       args.topk)
    pairs = list(zip(index_a.tolist(), index_b.tolist(), sims.tolist()))
    names = [os.path.basename(p) for p in args.image_paths]
    print(f"{len(pairs)} most similar mutual nearest neighbours, {names[0]} ({ha}x{wa} patches) -> {names[1]} "
          f"({hb}x{wb} patches); patch (row, col) is token 1 + row * width + col:")
    for rank, (a, b, sim) in enumerate(pairs):
        print(f"  {rank + 1:3d}  {str(divmod(a, wa)):>10} -> {str(divmod(b, wb)):<10} cosine {sim:.4f}")
    spread = f"cosine {pairs[-1][2]:.3f} to {pairs[0][2]:.3f}" if pairs else "none found"
    title = (f"{args.arch}/{args.patch_size}: the {len(pairs)} most similar mutual nearest neighbours among the patch "
             f"features of {names[0]} and {names[1]}\n({spread}; numbers are ranks, 1 = most similar)")
    path = os.path.join(args.output_dir, "matches.png")
    save_matches_figure(images, pairs, (wa, wb), args.patch_size, path, title)
    print(f"wrote {path}")
    return pairs


def main(args: argparse.Namespace) -> dict:
    """Write the PCA pictures (and, for two images, the correspondences); returns ``{"pca": [(h, w, 3) colour
    grids], "matches": [(patch a, patch b, cosine)]}``."""
    if args.pca_threshold is not None and not 0.0 <= args.pca_threshold < 1.0:
        raise utils.UserError(f"--pca_threshold {args.pca_threshold} must be in [0, 1), e.g. 0.5")
    if args.topk < 0:
        raise utils.UserError(f"--topk must be 0 or more, got {args.topk}")
    utils.resolve_model_args(args, *DEFAULT_MODEL)
    loaded = [datasets.image_for_vit(path, args.image_size, args.patch_size) for path in args.image_paths]
    device = torch.device("cuda" if args.use_cuda and torch.cuda.is_available() else "cpu")
    model = utils.build_backbone(args.arch, args.patch_size)
    utils.load_pretrained_weights(model, args.pretrained_weights, args.checkpoint_key, args.arch, args.patch_size)
    model.to(device).eval()
    images = [np.asarray(image) for image, _ in loaded]  # (H, W, 3) each
    features = [patch_features(model, tensor.to(device)).float().cpu() for _, tensor in loaded]  # (h, w, D) each
    try:
        os.makedirs(args.output_dir, exist_ok=True)
        result = {"pca": write_pca(images, features, args), "matches": []}
        if len(images) == 2 and args.topk:
            result["matches"] = write_matches(images, features, args)
    except OSError as exc:
        raise utils.UserError(f"cannot write the PNGs to --output_dir {args.output_dir}: {exc.strerror or exc}") \
            from None
    if len(images) > 2 and args.topk:
        print("Correspondences are drawn for exactly two images: pass two --image_paths to see them")
    return result


if __name__ == "__main__":
    parser = utils.ArgumentParser("Visualize the patch features of a ViT", parents=[get_args_parser()])
    utils.run_cli(main, parser.parse_args())
