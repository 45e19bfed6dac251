"""Videos of a ViT's [CLS] self-attention, as DINO's ``video_generation.py`` makes them.

Reproduces the command line and outputs of the DINO reference (Caron et al., "Emerging Properties in
Self-Supervised Vision Transformers", ICCV 2021): a video (``--input_path``, any file OpenCV reads) is split into
``OUTPUT/frames/frame-NNNN.png``; each frame (or each image of a folder of frames) is read as
``visualize_attention.py`` reads an image (``--resize``, then cut to a multiple of the patch size); the attention of
the last block's [CLS] query to every patch, averaged over the heads and upsampled (nearest), is drawn with the
inferno colour map on the frame's own scale (its smallest to largest value, as matplotlib's ``imsave``) into
``OUTPUT/attention/attn-<frame>.png``; these frames become ``OUTPUT/video.mp4`` (``--video_format avi``: XVID) at the
video's frame rate, or ``--fps`` for a folder. ``--video_only`` only encodes a folder of ``attn-*`` frames.

Deliberate differences from the reference: frames are PNG, not JPEG (lossless: the maps are those of the decoded
frames, and a run on ``OUTPUT/frames`` gives the same video); ``--threshold t`` draws, per patch, the share of the
heads whose ``t`` mass mask (``visualize_attention.py``'s rule) keeps it, on a 0..1 scale (the reference computes
these masks and writes the plain mean); frames are resized as ``visualize_attention.py`` resizes images (PIL bicubic;
``--resize HEIGHT WIDTH`` or the shorter side); frame folders may hold any image format, in natural name order
(frame2 before frame10); frames go through the model in batches and stream into the video (never all in memory),
with progress and ETA; ``--arch`` and ``--patch_size`` come from a training checkpoint's saved args when not passed;
without ``--pretrained_weights`` the official weights are those ``visualize_attention.py`` takes (for ViT-S/8 the
reference's video script took the 300-epoch ones).
Bad inputs (a file OpenCV cannot read, a folder without images, frames of different sizes) are one-line errors.
"""
import argparse
import itertools
import math
import os
import re
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from PIL import Image
from torch import nn

import datasets
import utils
import visualize_attention as va

DEFAULT_MODEL = ("vit_small", 8)  # the reference's defaults, used without saved args
COLORMAP = "inferno"  # the reference's
FOURCC = {"mp4": "mp4v", "avi": "XVID"}  # the reference's codecs; OpenCV's FFmpeg encodes both
FRAMES, ATTENTION, PREFIX = "frames", "attention", "attn-"  # the reference's output layout
PRINT_FREQ = 10  # batches between progress lines


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Videos of the [CLS] self-attention of a ViT", add_help=False)
    utils.model_args(parser, *DEFAULT_MODEL)
    parser.add_argument("--input_path", required=True, type=str,
                        help="A video file (any format OpenCV reads), a folder of frames (images of one size, in "
                             "natural name order: frame2 before frame10), or with --video_only a folder of "
                             "attention frames (attn-*).")
    parser.add_argument("--output_path", default=".", type=str,
                        help="Folder for frames/ (a video's frames as PNG), attention/ (attn-<frame>.png) and "
                             "video.<format> (created if needed; default: the current one).")
    parser.add_argument("--resize", default=None, type=utils.bounded(int, low=1), nargs="+",
                        help="Resize every frame to HEIGHT WIDTH, or with one value its shorter side to that size "
                             "(aspect kept), before cutting it to a multiple of the patch size; default: the "
                             "frames' own size. Smaller frames need less memory and time.")
    parser.add_argument("--threshold", default=None, type=float,
                        help="Draw, per patch, the share of the heads whose mask keeping this share of their "
                             "attention mass (e.g. 0.6) holds it; default: the heads' mean attention (DINO's "
                             "video).")
    parser.add_argument("--video_only", default=False, type=utils.bool_flag, nargs="?", const=True,
                        help="Only encode the attention frames (attn-*) of the --input_path folder into a video; "
                             "no model is loaded.")
    parser.add_argument("--fps", default=30.0, type=utils.bounded(float, low=0, low_open=True),
                        help="Frame rate of the video made from a folder (a video input keeps its own; default 30).")
    parser.add_argument("--video_format", default="mp4", choices=sorted(FOURCC),
                        help="Container of the video: mp4 (MPEG-4 part 2) or avi (XVID).")
    parser.add_argument("--batch_size", default=8, type=utils.bounded(int, low=1),
                        help="Frames per forward pass (memory grows with it and with the frame size).")
    return parser


def natural_key(path: str) -> list:
    """Sort key of a file name with its digit runs compared as numbers: frame2 before frame10."""
    parts = re.split(r"(\d+)", os.path.basename(path))
    return [int(part) if i % 2 else part for i, part in enumerate(parts)]


def list_frames(folder: str, prefix: str = "") -> List[str]:
    """The images of ``folder`` whose names start with ``prefix``, in natural order; none is a ``UserError``."""
    paths = sorted((p for p in datasets.list_images(folder) if os.path.basename(p).startswith(prefix)), key=natural_key)
    if not paths:
        what = f"images named {prefix}*" if prefix else "images"
        raise utils.UserError(f"no {what} in {folder} (extensions {' '.join(datasets.IMAGE_EXTENSIONS)})")
    return paths


def frame_size(path: str) -> Tuple[int, int]:
    """(height, width) of an image file, from its header."""
    try:
        with Image.open(path) as image:
            return image.height, image.width
    except (OSError, ValueError, SyntaxError) as exc:
        raise utils.UserError(f"cannot decode image {path}: {exc}") from None


def check_one_size(paths: Sequence[str]) -> None:
    """A ``UserError`` naming the first image whose size differs from the first one's (a video has one size)."""
    first = frame_size(paths[0])
    for path in paths[1:]:
        size = frame_size(path)
        if size != first:
            raise utils.UserError(f"frames of different sizes: {paths[0]} is {first[1]}x{first[0]} but {path} is "
                                  f"{size[1]}x{size[0]} (width x height): pass frames of one size, or --resize "
                                  f"HEIGHT WIDTH to bring them to one")


def open_video(path: str) -> cv2.VideoCapture:
    """The video opened for reading; a file OpenCV cannot read is a ``UserError``."""
    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        raise utils.UserError(f"OpenCV cannot read {path} as a video (not a video, or a codec its FFmpeg lacks): "
                              f"pass another file, or a folder of its frames")
    return capture


def extract_frames(capture: cv2.VideoCapture, video: str, folder: str) -> Iterator[str]:
    """Decode the video one frame at a time into ``folder/frame-NNNN.png``, yielding each path once written; a
    video without a decodable frame is a ``UserError``."""
    count = 0
    try:
        while True:
            ok, frame = capture.read()  # (H, W, 3) BGR uint8
            if not ok:
                break
            path = os.path.join(folder, f"frame-{count:04d}.png")
            Image.fromarray(frame[..., ::-1]).save(path, compress_level=1)
            count += 1
            yield path
    finally:
        capture.release()
    if count == 0:
        raise utils.UserError(f"OpenCV opened {video} but decoded no frame from it: pass another file, or a folder "
                              f"of its frames")


def batched(items: Iterable[str], size: int) -> Iterator[List[str]]:
    """Consecutive lists of ``size`` items (the last may be shorter), taken lazily."""
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def colour_attention(maps: torch.Tensor, patch_size: int, threshold: Optional[float]) -> np.ndarray:
    """One frame of the video from a frame's maps (heads, h, w): the heads' mean attention on its own smallest to
    largest value (DINO's frame), or with ``threshold`` the share of the heads whose mass mask keeps the patch on
    0..1; upsampled (nearest) and drawn with inferno. Returns RGB (H, W, 3) uint8."""
    if threshold is None:
        combined, scale = maps.mean(dim=0), Normalize()  # (h, w)
    else:
        combined, scale = va.mass_mask(maps, threshold).float().mean(dim=0), Normalize(0.0, 1.0)  # (h, w)
    pixels = va.upsample(combined[None], patch_size)[0].numpy()  # (H, W)
    return ScalarMappable(scale, COLORMAP).to_rgba(pixels, bytes=True)[..., :3]  # (H, W, 3)


def attention_frames(model: nn.Module, frames: Iterable[str], folder: str, total: int,
                     args: argparse.Namespace) -> Iterator[np.ndarray]:
    """For each frame file, in batches of ``--batch_size``: the coloured attention (RGB (H, W, 3) uint8), also
    written as ``folder/attn-<frame name>.png``; ``total`` (the expected number of frames) sets the progress ETA."""
    device = next(model.parameters()).device
    size = args.resize
    logger = utils.MetricLogger()
    for batch in logger.log_every(batched(frames, args.batch_size), PRINT_FREQ, "Attention frames, batch",
                                  total=max(1, math.ceil(total / args.batch_size))):
        size = size or frame_size(batch[0])  # without --resize, the frames' own size
        images = torch.stack([datasets.image_for_vit(p, size, args.patch_size)[1] for p in batch])  # (B, 3, H, W)
        maps = va.cls_attention(model, images.to(device)).float().cpu()  # (B, heads, h, w)
        for path, frame_maps in zip(batch, maps):
            rgb = colour_attention(frame_maps, args.patch_size, args.threshold)  # (H, W, 3)
            name = os.path.splitext(os.path.basename(path))[0]
            Image.fromarray(rgb).save(os.path.join(folder, f"{PREFIX}{name}.png"), compress_level=1)
            yield rgb


def write_video(frames: Iterable[np.ndarray], path: str, fps: float, video_format: str, frames_folder: str) -> int:
    """Encode RGB frames (H, W, 3) uint8 of one size into ``path`` as they come; returns their number. When OpenCV
    cannot encode, the frames are still consumed (their PNGs written) and then it is a ``UserError``."""
    writer, encoding, count = None, False, 0
    try:
        for frame in frames:
            if writer is None:
                writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*FOURCC[video_format]), fps,
                                         (frame.shape[1], frame.shape[0]))
                encoding = writer.isOpened()
            if encoding:
                writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))  # (H, W, 3) BGR
            count += 1
    finally:
        if writer is not None:
            writer.release()
    if not encoding:
        raise utils.UserError(f"OpenCV cannot write {path} with the {FOURCC[video_format]} codec here; the "
                              f"{count} attention frames are in {frames_folder}: try --video_format "
                              f"{'avi' if video_format == 'mp4' else 'mp4'}, or make the video with another tool")
    return count


def check_args(args: argparse.Namespace) -> None:
    if args.threshold is not None and not 0.0 < args.threshold <= 1.0:
        raise utils.UserError(f"--threshold {args.threshold} must be a share of the mass in (0, 1], e.g. 0.6")
    if args.resize is not None and len(args.resize) not in (1, 2):
        raise utils.UserError(f"--resize takes one size (the shorter side) or two (height width), got "
                              f"{' '.join(map(str, args.resize))}")
    if not os.path.exists(args.input_path):
        raise utils.UserError(f"--input_path {args.input_path} does not exist: pass a video file or a folder of "
                              f"frames")
    if args.video_only and not os.path.isdir(args.input_path):
        raise utils.UserError(f"--video_only takes a folder of attention frames (attn-*) as --input_path, not the "
                              f"file {args.input_path}")


def make_folders(*folders: str) -> None:
    try:
        for folder in folders:
            os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise utils.UserError(f"cannot create {folder}: {exc.strerror or exc}") from None


def main(args: argparse.Namespace) -> dict:
    """Write the attention frames and the video (with ``--video_only``, the video of existing attention frames);
    returns ``{"frames": number of frames, "video": its path}``."""
    check_args(args)
    video = os.path.join(args.output_path, f"video.{args.video_format}")
    if args.video_only:
        paths = list_frames(args.input_path, PREFIX)
        check_one_size(paths)
        make_folders(args.output_path)
        frames = (np.asarray(datasets.open_image(p)) for p in paths)  # (H, W, 3) each
        count = write_video(frames, video, args.fps, args.video_format, args.input_path)
        print(f"wrote {video} ({count} frames at {args.fps:g} fps)")
        return {"frames": count, "video": video}
    attention_folder = os.path.join(args.output_path, ATTENTION)
    if os.path.isdir(args.input_path):
        paths = list_frames(args.input_path)
        if args.resize is None or len(args.resize) == 1:
            check_one_size(paths)
        make_folders(attention_folder)
        sources, total, fps = paths, len(paths), args.fps
    else:
        capture = open_video(args.input_path)
        fps = capture.get(cv2.CAP_PROP_FPS)
        fps = fps if math.isfinite(fps) and fps > 0 else args.fps
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        print(f"Video {args.input_path}: {fps:g} fps, about {total} frames")
        make_folders(os.path.join(args.output_path, FRAMES), attention_folder)
        sources = extract_frames(capture, args.input_path, os.path.join(args.output_path, FRAMES))
    utils.resolve_model_args(args, *DEFAULT_MODEL)
    device = torch.device("cuda" if args.use_cuda and torch.cuda.is_available() else "cpu")
    model = utils.build_backbone(args.arch, args.patch_size)
    utils.load_pretrained_weights(model, args.pretrained_weights, args.checkpoint_key, args.arch, args.patch_size)
    model.to(device).eval()
    frames = attention_frames(model, sources, attention_folder, total, args)
    count = write_video(frames, video, fps, args.video_format, attention_folder)
    print(f"wrote {count} attention frames to {attention_folder} and {video} ({fps:g} fps)")
    return {"frames": count, "video": video}


if __name__ == "__main__":
    parser = utils.ArgumentParser("Videos of the [CLS] self-attention of a ViT", parents=[get_args_parser()])
    utils.run_cli(main, parser.parse_args())
