"""Self-attention maps of a ViT's [CLS] token, as DINO's ``visualize_attention.py`` draws them.

Reproduces the command line and outputs of the DINO reference (Caron et al., "Emerging Properties in
Self-Supervised Vision Transformers", ICCV 2021): one image (``--image_path``, the shipped ``test.png`` by
default) is resized to ``--image_size`` and cut at the bottom and right to a multiple of the patch size; the
attention of the last block's [CLS] query to every patch, one map per head, is upsampled (nearest) to the image
and written as ``attn-head{j}.png`` beside the image (``img.png``). With ``--threshold t`` each head keeps the
fewest patches that hold the share t of its patch-attention mass (the reference's rule), written as
``mask_th{t}_head{j}.png``: the image with the rest dimmed and the kept region outlined.

Beyond the reference: ``attention.png`` shows the image and every head side by side on one colour scale with a
colour bar (and the kept regions outlined with ``--threshold``); ``--image_size`` also takes one value (the
shorter side, aspect kept); ``--arch`` and ``--patch_size`` come from a training checkpoint's saved args when not
passed; the reference's download of a sample image is replaced by the shipped ``test.png``. Pictures are drawn on
matplotlib's Agg canvas without pyplot (no display needed, no global backend set).
"""
import argparse
import os
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imsave
from torch import nn

import datasets
import utils

DEFAULT_MODEL = ("vit_small", 8)  # the reference's defaults, used without saved args
MAX_COLUMNS = 7  # panels per row of attention.png
DIMMED = 0.25  # brightness of the patches a threshold mask drops
COLORMAP = "viridis"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Visualize the [CLS] self-attention of a ViT", add_help=False)
    utils.model_args(parser, *DEFAULT_MODEL)
    parser.add_argument("--image_path", default=os.path.join(utils.REPO_DIR, "test.png"), type=str,
                        help="Image to look at (default: the shipped test.png).")
    parser.add_argument("--image_size", default=(480, 480), type=int, nargs="+",
                        help="Resize the image to HEIGHT WIDTH (default 480 480, as DINO), or with one value its "
                             "shorter side to that size (aspect kept); then it is cut to a multiple of the patch "
                             "size.")
    parser.add_argument("--output_dir", default=".", type=str,
                        help="Folder for the PNGs (created if needed; default: the current one).")
    parser.add_argument("--threshold", default=None, type=float,
                        help="Also write masks keeping, per head, the fewest patches that hold this share of the "
                             "attention mass (e.g. 0.6); default: no masks.")
    return parser


@torch.no_grad()
def cls_attention(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Attention of the last block's [CLS] query to every patch, per head: (heads, h, w) for an image (3, H, W),
    (B, heads, h, w) for a batch (B, 3, H, W); sides are multiples of the patch size (h = H / patch, w = W / patch)."""
    h, w = images.shape[-2] // model.patch_size, images.shape[-1] // model.patch_size
    batch = images.reshape(-1, *images.shape[-3:])  # (B, 3, H, W)
    attention = model.get_last_selfattention(batch)  # (B, heads, 1+N, 1+N)
    maps = attention[:, :, 0, 1:].reshape(len(batch), -1, h, w)  # (B, heads, h, w)
    return maps.reshape(*images.shape[:-3], *maps.shape[1:])  # (heads, h, w) or (B, heads, h, w)


def mass_mask(maps: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per map (first dimension), the fewest largest entries whose sum reaches ``threshold`` of the map's sum:
    an entry is kept when the entries larger than it hold less than that share (ties in sorted order)."""
    flat = maps.flatten(1)  # (heads, N)
    values, order = flat.sort(dim=1, descending=True)  # (heads, N)
    share = values / values.sum(dim=1, keepdim=True)  # (heads, N)
    before = share.cumsum(dim=1) - share  # (heads, N) mass of the larger entries
    keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order, before < threshold)  # (heads, N)
    return keep.reshape(maps.shape)  # (heads, h, w)


def upsample(maps: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Each patch value repeated over its patch_size x patch_size pixels (nearest): (heads, h*p, w*p)."""
    return F.interpolate(maps[None].float(), scale_factor=patch_size, mode="nearest")[0]  # (heads, H, W)


def masked_image(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image (H, W, 3) uint8 with the pixels outside ``mask`` (H, W) dimmed: (H, W, 3) float in [0, 1]."""
    return image / 255.0 * np.where(mask, 1.0, DIMMED)[..., None]  # (H, W, 3)


def save_mask_png(image: np.ndarray, mask: np.ndarray, path: str, title: str) -> None:
    """One head's mask: the image with the dropped region dimmed and the kept region outlined, titled."""
    height, width = mask.shape
    fig = FigureCanvasAgg(Figure(figsize=(width / 100, height / 100 + 0.3), dpi=100)).figure
    ax = fig.add_axes((0, 0, 1, height / (height + 30)))
    ax.imshow(masked_image(image, mask))
    if mask.any() and not mask.all():
        ax.contour(mask.astype(float), levels=[0.5], colors="yellow", linewidths=1.2)
    ax.set_axis_off()
    fig.text(0.5, 1 - 15 / (height + 30), title, ha="center", va="center", fontsize=9)
    fig.savefig(path)


def save_figure(image: np.ndarray, maps: np.ndarray, masks: Optional[np.ndarray], path: str, title: str) -> None:
    """``attention.png``: the image, then one panel per head (maps (heads, H, W)) on one colour scale (from the
    smallest to the largest value of all heads) with a colour bar; with ``masks`` (heads, H, W) the kept regions
    are outlined."""
    panels = 1 + len(maps)
    columns = min(panels, MAX_COLUMNS)
    rows = -(-panels // columns)
    aspect = image.shape[0] / image.shape[1]
    size = (2.4 * columns + 0.8, 2.4 * rows * aspect + 0.7)
    fig = FigureCanvasAgg(Figure(figsize=size, layout="constrained")).figure
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=10)
    shown = None
    for j, head in enumerate(maps):
        ax = axes[j + 1]
        shown = ax.imshow(head, cmap=COLORMAP, vmin=float(maps.min()), vmax=float(maps.max()))
        label = f"head {j}"
        if masks is not None:
            if masks[j].any() and not masks[j].all():
                ax.contour(masks[j].astype(float), levels=[0.5], colors="white", linewidths=1.0)
            label += f" ({masks[j].mean():.0%} of the image)"
        ax.set_title(label, fontsize=10)
    for ax in axes:
        ax.set_axis_off()
    fig.colorbar(shown, ax=axes[1:panels].tolist(), shrink=0.8, label="[CLS] attention to the patch")
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=100)


def write_outputs(image: np.ndarray, maps: torch.Tensor, args: argparse.Namespace) -> list:
    """Write img.png, attn-head{j}.png, mask_th{t}_head{j}.png (with --threshold) and attention.png; return
    the paths written. ``maps`` is (heads, h, w) at patch resolution."""
    os.makedirs(args.output_dir, exist_ok=True)
    written = [os.path.join(args.output_dir, "img.png")]
    imsave(written[0], image)
    pixels = upsample(maps, args.patch_size).cpu().numpy()  # (heads, H, W)
    for j, head in enumerate(pixels):
        written.append(os.path.join(args.output_dir, f"attn-head{j}.png"))
        imsave(written[-1], head, cmap=COLORMAP, format="png")
    masks = None
    if args.threshold is not None:
        masks = upsample(mass_mask(maps, args.threshold), args.patch_size).cpu().numpy() > 0.5  # (heads, H, W)
        for j, mask in enumerate(masks):
            written.append(os.path.join(args.output_dir, f"mask_th{args.threshold}_head{j}.png"))
            save_mask_png(image, mask, written[-1], f"head {j}: {args.threshold:.0%} of the attention mass")
    title = (f"[CLS] attention of the last block, {args.arch}/{args.patch_size}, "
             f"{os.path.basename(args.image_path)} at {image.shape[1]}x{image.shape[0]}")
    if args.threshold is not None:
        title += f"; outlined: {args.threshold:.0%} of the mass"
    written.append(os.path.join(args.output_dir, "attention.png"))
    save_figure(image, pixels, masks, written[-1], title)
    return written


def main(args: argparse.Namespace) -> torch.Tensor:
    """Compute and write the attention maps; returns them at patch resolution, (heads, h, w)."""
    if args.threshold is not None and not 0.0 < args.threshold <= 1.0:
        raise utils.UserError(f"--threshold {args.threshold} must be a share of the mass in (0, 1], e.g. 0.6")
    utils.resolve_model_args(args, *DEFAULT_MODEL)
    image, tensor = datasets.image_for_vit(args.image_path, args.image_size, args.patch_size)  # (3, H, W)
    device = torch.device("cuda" if args.use_cuda and torch.cuda.is_available() else "cpu")
    model = utils.build_backbone(args.arch, args.patch_size)
    utils.load_pretrained_weights(model, args.pretrained_weights, args.checkpoint_key, args.arch, args.patch_size)
    model.to(device).eval()
    maps = cls_attention(model, tensor.to(device)).float().cpu()  # (heads, h, w)
    try:
        written = write_outputs(np.asarray(image), maps, args)
    except OSError as exc:
        raise utils.UserError(f"cannot write the PNGs to --output_dir {args.output_dir}: {exc.strerror or exc}") \
            from None
    for path in written:
        print(f"wrote {path}")
    return maps


if __name__ == "__main__":
    parser = utils.ArgumentParser("Visualize the [CLS] self-attention of a ViT", parents=[get_args_parser()])
    utils.run_cli(main, parser.parse_args())
