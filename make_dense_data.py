"""Dense datasets generated from Fashion-MNIST: scenes of several garments, and short videos of moving garments.

Reads a folder of MNIST-format files (Fashion-MNIST as Debian's ``dataset-fashion-mnist`` installs it, read by
``datasets.MNISTFolder``) and writes under ``--output_dir``:

- ``scenes/``, the plain layout of ``eval_segmentation.py``: ``train/images/NNNNNN.jpg`` with
  ``train/masks/NNNNNN.png`` made of the train split's garments, ``val/...`` of the t10k split's. A scene holds
  ``--garments`` garments (2 to 4) at random places, each resized to ``--scale`` x 28 pixels (bilinear), on a
  ``--canvas`` square; a garment's pixels are those of its resized image brighter than ``--threshold``, pasted over
  what lies below (later garments cover earlier ones). Mask (grayscale PNG): 0 for the background, class + 1
  (1..10) for a garment's pixels.
- ``davis/``, the DAVIS-2017 layout that ``eval_video_segmentation.py`` reads: ``JPEGImages/480p/<video>/00000.jpg``,
  ``Annotations/480p/<video>/00000.png`` (palette PNGs of object ids: 0 background, 1..n in drawing order, DAVIS's
  colours), ``ImageSets/2017/val.txt``. Each video (``--frames`` frames) moves t10k garments at constant speeds
  (up to ``MAX_SPEED`` pixels per frame), bouncing off the borders, so that they cross and cover one another.
  In the first frame, whose annotation a semi-supervised method starts from, they do not overlap: each has its own
  cell of a k x k grid (k = ceil(sqrt(n))), and a garment larger than its cell is shrunk to it. The folder name
  ``480p`` is DAVIS's, whatever ``--canvas``.

The background is by default a texture over the garments' own range of brightness (smooth random blobs plus pixel
noise), so that a pixel's brightness alone does not tell a garment from the background; ``--texture false`` keeps
Fashion-MNIST's black. The single-object set to pretrain on is the MNIST-format folder itself
(``patch_wise_dino.py --data_path``).

Deterministic: the same ``--seed`` and flags give the same files; train scenes, val scenes and videos draw from
independent streams, so that ``--num_videos`` does not change the scenes.

The script sits at the top level with the others (the flat layout of DINO's repository; run from the repository
root, it imports ``datasets.py`` as they do): it prepares the data of an experiment, it measures nothing, so it is
not one of ``benchmarks/``.
"""
import argparse
import json
import math
import os
from typing import List, Tuple

import cv2
import numpy as np
from PIL import Image

import datasets
import utils

GARMENT_SIDE = 28  # pixels of a Fashion-MNIST image
MAX_SPEED = 3.0  # pixels per frame, per axis
TEXTURE_CELLS = 6  # the background's smooth part: a TEXTURE_CELLS^2 random grid upsampled to the canvas
TEXTURE_NOISE = 20.0  # standard deviation of the background's pixel noise
JPEG_QUALITY = 95


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Scenes and videos of Fashion-MNIST garments", add_help=False)
    parser.add_argument("--data_path", default="root/usr/share/datasets/fashion-mnist", type=str,
                        help="Folder of MNIST-format files (train-* and t10k-*, gzipped or not).")
    parser.add_argument("--output_dir", default="dense_data", type=str, help="Where scenes/ and davis/ are "
                        "written (refused when they already exist).")
    parser.add_argument("--num_scenes", default=2000, type=utils.bounded(int, low=0),
                        help="Train scenes (from the train split's garments).")
    parser.add_argument("--num_val_scenes", default=500, type=utils.bounded(int, low=0),
                        help="Val scenes (from the t10k split's garments).")
    parser.add_argument("--num_videos", default=30, type=utils.bounded(int, low=0),
                        help="Videos in the DAVIS layout (t10k garments).")
    parser.add_argument("--frames", default=10, type=utils.bounded(int, low=2), help="Frames per video.")
    parser.add_argument("--canvas", default=96, type=utils.bounded(int, low=GARMENT_SIDE),
                        help="Side of the square scenes and frames, in pixels.")
    parser.add_argument("--garments", default=[2, 4], nargs=2, type=utils.bounded(int, low=1), metavar=("MIN", "MAX"),
                        help="Number of garments per scene or video, drawn uniformly in [MIN, MAX].")
    parser.add_argument("--scale", default=[0.8, 1.6], nargs=2, type=utils.bounded(float, low=0, low_open=True),
                        metavar=("MIN", "MAX"), help="Garment side as a multiple of 28 pixels, uniform in [MIN, MAX].")
    parser.add_argument("--threshold", default=16, type=utils.bounded(int, low=0, high=254),
                        help="A garment's pixels are those of its resized image brighter than this (0..255).")
    parser.add_argument("--appearance_change", default=0.5, type=utils.bounded(float, low=0, high=1),
                        help="Videos only: each frame draws every garment's brightness gain in [1 - a, 1 + a] and "
                        "mixes a fresh background into the first one with weight a, so that raw appearance stops "
                        "tracking the objects (0: rigid garments over a fixed background).")
    parser.add_argument("--texture", default=True, type=utils.bool_flag,
                        help="Textured background (false: black).")
    parser.add_argument("--seed", default=0, type=int, help="Random seed.")
    return parser


# ----------------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------------
def background(rng: np.random.Generator, canvas: int, texture: bool) -> np.ndarray:
    """(canvas, canvas) uint8: smooth random blobs + pixel noise, or black."""
    if not texture:
        return np.zeros((canvas, canvas), dtype=np.uint8)
    cells = rng.uniform(0, 255, size=(TEXTURE_CELLS, TEXTURE_CELLS)).astype(np.float32)
    smooth = cv2.resize(cells, (canvas, canvas), interpolation=cv2.INTER_CUBIC)  # (canvas, canvas)
    noisy = smooth + rng.normal(0.0, TEXTURE_NOISE, size=(canvas, canvas))  # (canvas, canvas)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def resized_garment(garment: np.ndarray, side: int) -> np.ndarray:
    """A 28x28 garment resized (bilinear) to side x side, uint8."""
    return cv2.resize(garment, (side, side), interpolation=cv2.INTER_LINEAR)


def paste(image: np.ndarray, mask: np.ndarray, garment: np.ndarray, label: int, top: int, left: int,
          threshold: int, gain: float = 1.0) -> None:
    """Draw a resized garment at (top, left), in place: its pixels brighter than ``threshold`` replace the image's,
    their brightness times ``gain`` (clipped to 0..255), and take ``label`` in the mask; the rest of its square
    leaves what lies below."""
    side = garment.shape[0]
    shown = garment > threshold  # (side, side)
    pixels = garment[shown] if gain == 1.0 else np.clip(np.rint(garment[shown] * gain), 0, 255).astype(np.uint8)
    image[top:top + side, left:left + side][shown] = pixels
    mask[top:top + side, left:left + side][shown] = label


def garment_sides(rng: np.random.Generator, count: int, args: argparse.Namespace) -> np.ndarray:
    """(count,) garment sides in pixels, at most the canvas."""
    scales = rng.uniform(args.scale[0], args.scale[1], size=count)
    return np.clip(np.rint(scales * GARMENT_SIDE), 1, args.canvas).astype(int)


def render_scene(rng: np.random.Generator, garments: np.ndarray, labels: np.ndarray,
                 args: argparse.Namespace) -> Tuple[np.ndarray, np.ndarray, list]:
    """One scene: (image (C, C) uint8, mask (C, C) uint8 of class + 1, placements), a placement being
    ``(garment index, top, left, side)`` in drawing order."""
    image = background(rng, args.canvas, args.texture)  # (C, C)
    mask = np.zeros_like(image)  # (C, C)
    count = int(rng.integers(args.garments[0], args.garments[1] + 1))
    placements = []
    for index, side in zip(rng.integers(0, len(garments), size=count), garment_sides(rng, count, args)):
        top, left = (int(v) for v in rng.integers(0, args.canvas - side + 1, size=2))
        paste(image, mask, resized_garment(garments[index], side), int(labels[index]) + 1, top, left, args.threshold)
        placements.append((int(index), top, left, int(side)))
    return image, mask, placements


def first_positions(rng: np.random.Generator, sides: np.ndarray, canvas: int) -> np.ndarray:
    """(n, 2) float top-left corners of n squares of ``sides`` that do not overlap: the canvas is cut into k x k
    cells (k = ceil(sqrt(n))), each square takes its own random cell and a random place inside it. The sides must
    be at most ``canvas // k``."""
    k = math.ceil(math.sqrt(len(sides)))
    cell = canvas // k
    cells = rng.permutation(k * k)[:len(sides)]  # (n,)
    corners = np.stack([cells // k, cells % k], axis=1) * cell  # (n, 2)
    return corners + rng.uniform(0, 1, size=(len(sides), 2)) * (cell - sides)[:, None]  # (n, 2)


def render_video(rng: np.random.Generator, garments: np.ndarray,
                 args: argparse.Namespace) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """``--frames`` frames (C, C) uint8 and their masks of object ids 1..n (drawing order), garments moving at
    constant speeds and bouncing off the borders. With ``--appearance_change`` a > 0 every frame also draws each
    garment's brightness gain in [1 - a, 1 + a] and mixes a fresh background into the first one (weight a)."""
    change = args.appearance_change
    count = int(rng.integers(args.garments[0], args.garments[1] + 1))
    sides = np.minimum(garment_sides(rng, count, args), args.canvas // math.ceil(math.sqrt(count)))  # (n,)
    positions = first_positions(rng, sides, args.canvas)  # (n, 2)
    shapes = [resized_garment(garments[i], side) for i, side in zip(rng.integers(0, len(garments), len(sides)), sides)]
    velocities = rng.uniform(-MAX_SPEED, MAX_SPEED, size=positions.shape)  # (n, 2) pixels per frame
    limits = (args.canvas - sides)[:, None].astype(np.float64)  # (n, 1) largest top/left
    backdrop = background(rng, args.canvas, args.texture)  # (C, C)
    frames, masks = [], []
    for _ in range(args.frames):
        mask = np.zeros_like(backdrop)  # (C, C)
        if change:
            fresh = background(rng, args.canvas, args.texture)  # (C, C)
            frame = np.rint((1 - change) * backdrop + change * fresh).astype(np.uint8)  # (C, C)
            gains = rng.uniform(1 - change, 1 + change, size=count)  # (n,)
        else:
            frame, gains = backdrop.copy(), np.ones(count)  # (C, C), (n,)
        for object_id, (shape, (top, left), gain) in enumerate(
                zip(shapes, np.rint(positions).astype(int), gains), start=1):
            paste(frame, mask, shape, object_id, top, left, args.threshold, float(gain))
        frames.append(frame)
        masks.append(mask)
        positions = positions + velocities  # (n, 2)
        low, high = positions < 0, positions > limits  # (n, 2) each: bounce off the borders
        positions = np.clip(np.where(low, -positions, np.where(high, 2 * limits - positions, positions)), 0, limits)
        velocities = np.where(low | high, -velocities, velocities)
    return frames, masks


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------
def write_scenes(split_dir: str, garments: np.ndarray, labels: np.ndarray, count: int,
                 rng: np.random.Generator, args: argparse.Namespace) -> None:
    """``count`` scenes: ``split_dir/images/NNNNNN.jpg`` and ``split_dir/masks/NNNNNN.png``."""
    for folder in ("images", "masks"):
        os.makedirs(os.path.join(split_dir, folder))
    for i in range(count):
        image, mask, _ = render_scene(rng, garments, labels, args)
        Image.fromarray(image).save(os.path.join(split_dir, "images", f"{i:06d}.jpg"), quality=JPEG_QUALITY)
        Image.fromarray(mask).save(os.path.join(split_dir, "masks", f"{i:06d}.png"))


def write_videos(root: str, garments: np.ndarray, count: int, rng: np.random.Generator,
                 args: argparse.Namespace) -> None:
    """``count`` videos in the DAVIS-2017 layout under ``root``."""
    palette = datasets.davis_palette()  # (256, 3)
    names = [f"garments{i:04d}" for i in range(count)]
    for name in names:
        frames_dir = os.path.join(root, "JPEGImages", "480p", name)
        masks_dir = os.path.join(root, "Annotations", "480p", name)
        os.makedirs(frames_dir)
        os.makedirs(masks_dir)
        for t, (frame, mask) in enumerate(zip(*render_video(rng, garments, args))):
            Image.fromarray(frame).save(os.path.join(frames_dir, f"{t:05d}.jpg"), quality=JPEG_QUALITY)
            datasets.write_palette_png(os.path.join(masks_dir, f"{t:05d}.png"), mask, palette)
    os.makedirs(os.path.join(root, "ImageSets", "2017"))
    with open(os.path.join(root, "ImageSets", "2017", "val.txt"), "w") as f:
        f.write("".join(f"{name}\n" for name in names))


def check_args(args: argparse.Namespace) -> None:
    for name in ("garments", "scale"):
        low, high = getattr(args, name)
        if low > high:
            raise utils.UserError(f"--{name} {low} {high}: the first value (the minimum) exceeds the second")
    if args.scale[1] * GARMENT_SIDE > args.canvas:
        raise utils.UserError(f"--scale up to {args.scale[1]} makes garments of {args.scale[1] * GARMENT_SIDE:.0f} "
                              f"pixels, larger than --canvas {args.canvas}: lower --scale or raise --canvas")
    datasets.require_folder(args.data_path)
    if datasets.find_mnist(args.data_path) is None:
        raise utils.UserError(f"--data_path {args.data_path} holds no MNIST-format files (train-images-idx3-ubyte, "
                              f"t10k-images-idx3-ubyte, ..., gzipped or not)")
    for name in ("scenes", "davis"):
        if os.path.exists(os.path.join(args.output_dir, name)):
            raise utils.UserError(f"{os.path.join(args.output_dir, name)} already exists: pass another --output_dir "
                                  f"or delete it")


def main(args: argparse.Namespace) -> dict:
    check_args(args)
    train, val = (datasets.MNISTFolder(args.data_path, train=split) for split in (True, False))
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(args.seed).spawn(3)]
    scenes, davis = os.path.join(args.output_dir, "scenes"), os.path.join(args.output_dir, "davis")
    for split, source, count, rng in (("train", train, args.num_scenes, streams[0]),
                                      ("val", val, args.num_val_scenes, streams[1])):
        if count:
            write_scenes(os.path.join(scenes, split), source.data, np.asarray(source.targets), count, rng, args)
    if args.num_videos:
        write_videos(davis, val.data, args.num_videos, streams[2], args)
    written = {"scenes": scenes if args.num_scenes or args.num_val_scenes else None,
               "davis": davis if args.num_videos else None, "num_classes": len(train.classes) + 1}
    print(json.dumps(written), flush=True)
    return written


if __name__ == "__main__":
    parser = utils.ArgumentParser("Scenes and videos of Fashion-MNIST garments", parents=[get_args_parser()])
    utils.run_cli(main, parser.parse_args())
