"""Benchmark of the data pipeline of one data-loading worker: images/s from a JPEG file to the crop tensors.

(a) ours: ``datasets.open_image`` -> ``transforms.DataAugmentationPatchWiseDINO`` (OpenCV on uint8 arrays)
    -> ``patch_matching.match_all_pairs`` (the matches the training data workers compute);
(b) a plain DINO-style multi-crop written here from torchvision transforms on PIL images, as the DINO
    reference does it (RandomResizedCrop bicubic, flip, ColorJitter p=0.8, grayscale, PIL Gaussian blur,
    solarization, ToTensor, Normalize), after the same resize to 256x256 so that both do the same work;
(c) the per-patch augmentation (``--patch_augmentation``, 4 ops per patch): (a) with and without it at each
    of ``--patch_augmentation_sizes``, and, as a reference, (b) with the authors' way of doing it, a loop over
    the tiles of every view applying torchvision's transforms to each PIL tile (timed on fewer images).

Inputs: 500x375 JPEGs (quality 90) made from the sample photos in a temporary folder; 2 global crops of
224 and 8 local crops of 96 by default. One thread (``torch.set_num_threads(1)``, ``cv2.setNumThreads(1)``)
and freed memory kept for reuse (``utils.keep_freed_memory``; ``--keep_freed_memory false`` to compare)
as in a data worker. The pipelines run in alternating rounds and each keeps its best round, so load
from other processes hits all alike. PASS when (a) reaches ``--target`` times the images/s of (b), and
when (a) with the per-patch augmentation at patch 8 keeps ``--patch_augmentation_target`` of its images/s.

    python benchmarks/bench_data_pipeline.py
"""
import argparse
import os
import random
import sys
import tempfile
import time
from typing import Callable, Optional

import cv2
import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import datasets  # noqa: E402
import patch_matching  # noqa: E402
import transforms  # noqa: E402
import utils  # noqa: E402


class PILGaussianBlur:
    """DINO's blur: with probability p, PIL GaussianBlur with a radius drawn uniformly in [0.1, 2.0]."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, image: Image.Image) -> Image.Image:
        if torch.rand(()) >= self.p:
            return image
        return image.filter(ImageFilter.GaussianBlur(radius=float(torch.empty(()).uniform_(0.1, 2.0))))


class TilewisePatchAugmentation:
    """The authors' per-patch augmentation, done their way: every patch_size x patch_size tile of a PIL view is
    cut out, gets ``num_ops`` of the four torchvision transforms (``random.sample``, shuffled) and is pasted back."""

    def __init__(self, patch_size: int, num_ops: int = 4):
        self.ops = [T.ColorJitter(brightness=0.1, hue=0.1), T.GaussianBlur(kernel_size=(1, 5), sigma=(0.1, 2)),
                    T.RandomAdjustSharpness(sharpness_factor=2), T.RandomPosterize(bits=3)]
        self.patch_size, self.num_ops = patch_size, num_ops

    def __call__(self, image: Image.Image) -> Image.Image:
        p, out = self.patch_size, image.copy()
        for top in range(0, image.height, p):
            for left in range(0, image.width, p):
                chosen = random.sample(self.ops, self.num_ops)
                random.shuffle(chosen)
                out.paste(T.Compose(chosen)(image.crop((left, top, left + p, top + p))), (left, top))
        return out


class DinoStyleMultiCrop:
    """The DINO reference's DataAugmentationDINO on PIL images, after a resize to resize x resize; with
    ``patch_augmentation``, that transform runs on every view before the normalisation."""

    def __init__(self, local_crops_number: int, global_size: int, local_size: int, resize: int,
                 patch_augmentation: Optional[TilewisePatchAugmentation] = None):
        flip_and_color_jitter = T.Compose([
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            T.RandomGrayscale(p=0.2)])
        normalize = T.Compose([T.ToTensor(), T.Normalize(transforms.IMAGENET_MEAN, transforms.IMAGENET_STD)])
        if patch_augmentation is not None:
            normalize = T.Compose([patch_augmentation, normalize])
        bicubic = T.InterpolationMode.BICUBIC
        self.resize = T.Resize((resize, resize))
        self.global_1 = T.Compose([T.RandomResizedCrop(global_size, scale=(0.4, 1.0), interpolation=bicubic),
                                   flip_and_color_jitter, PILGaussianBlur(1.0), normalize])
        self.global_2 = T.Compose([T.RandomResizedCrop(global_size, scale=(0.4, 1.0), interpolation=bicubic),
                                   flip_and_color_jitter, PILGaussianBlur(0.1), T.RandomSolarize(128, p=0.2),
                                   normalize])
        self.local = T.Compose([T.RandomResizedCrop(local_size, scale=(0.05, 0.4), interpolation=bicubic),
                                flip_and_color_jitter, PILGaussianBlur(0.5), normalize])
        self.local_crops_number = local_crops_number

    def __call__(self, image: Image.Image) -> list:
        image = self.resize(image)
        local_crops = [self.local(image) for _ in range(self.local_crops_number)]
        return [self.global_1(image), self.global_2(image)] + local_crops


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Data pipeline benchmark", add_help=False)
    parser.add_argument("--sample_dir", default=os.path.join(REPO, "data", "sample"), type=str,
                        help="Photos to make the 500x375 JPEG inputs from.")
    parser.add_argument("--images", default=60, type=int, help="Images per timed round.")
    parser.add_argument("--rounds", default=5, type=int, help="Timed rounds per pipeline (alternating); best kept.")
    parser.add_argument("--local_crops_number", default=8, type=int, help="Local crops per image.")
    parser.add_argument("--patch_size", default=16, type=int, help="Patch size of the matches.")
    parser.add_argument("--target", default=1.5, type=float, help="PASS when ours / baseline images/s >= this.")
    parser.add_argument("--patch_augmentation_sizes", default=[8, 16], type=int, nargs="+",
                        help="Patch sizes at which ours runs with and without the per-patch augmentation.")
    parser.add_argument("--patch_augmentation_target", default=2 / 3, type=float,
                        help="PASS when ours with the per-patch augmentation at patch 8 keeps this fraction of its "
                             "images/s without it.")
    parser.add_argument("--reference_images", default=2, type=int,
                        help="Images on which the authors' tile-by-tile PIL loop is timed (once: it is slow).")
    parser.add_argument("--keep_freed_memory", default=True, type=utils.bool_flag,
                        help="Keep freed memory for the next allocations, as the training's data workers do "
                             "(utils.keep_freed_memory; glibc only).")
    parser.add_argument("--seed", default=0, type=int, help="Random seed.")
    return parser


def make_inputs(sample_dir: str, folder: str, count: int) -> list:
    """Write ``count`` 500x375 JPEGs made from the photos of ``sample_dir`` into ``folder``."""
    photos = [datasets.open_image(p) for p in datasets.list_images(sample_dir)]
    if not photos:
        raise utils.UserError(f"no images in {sample_dir}: pass --sample_dir with a few photos")
    paths = []
    for k in range(count):
        path = os.path.join(folder, f"input_{k:03d}.jpg")
        photos[k % len(photos)].resize((500, 375), Image.BICUBIC).save(path, quality=90)
        paths.append(path)
    return paths


def images_per_second(process: Callable[[str], object], paths: list) -> float:
    start = time.perf_counter()
    for path in paths:
        process(path)
    return len(paths) / (time.perf_counter() - start)


def build_pipelines(args: argparse.Namespace) -> dict:
    """name -> a function from a JPEG path to what a data worker hands over, (crops, matches): ours at every
    patch size, without and with the per-patch augmentation, and the DINO-style baseline (no matches)."""
    def ours(patch_size: int, patch_ops: int) -> Callable[[str], tuple]:
        transform = transforms.DataAugmentationPatchWiseDINO(local_crops_number=args.local_crops_number,
                                                             patch_size=patch_size, patch_ops=patch_ops)

        def run(path: str) -> tuple:
            crops, geometries = transform(datasets.open_image(path))
            return crops, patch_matching.match_all_pairs(geometries, patch_size)
        return run

    baseline_transform = DinoStyleMultiCrop(args.local_crops_number, 224, 96, 256)
    pipelines = {"baseline": lambda path: (baseline_transform(datasets.open_image(path)), [])}  # no matches
    for patch_size in dict.fromkeys([args.patch_size, *args.patch_augmentation_sizes]):
        pipelines[f"ours/{patch_size}"] = ours(patch_size, 0)
        if patch_size in args.patch_augmentation_sizes:
            pipelines[f"patch_augmentation/{patch_size}"] = ours(patch_size, len(transforms.PATCH_OPS))
    return pipelines


def reference_images_per_second(args: argparse.Namespace, patch_size: int, paths: list) -> float:
    """images/s of the DINO-style multi-crop with the authors' tile-by-tile per-patch augmentation."""
    pipeline = DinoStyleMultiCrop(args.local_crops_number, 224, 96, 256, TilewisePatchAugmentation(patch_size))
    return images_per_second(lambda path: pipeline(datasets.open_image(path)), paths[:args.reference_images])


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    kept_memory = args.keep_freed_memory and utils.keep_freed_memory()
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    pipelines = build_pipelines(args)
    with tempfile.TemporaryDirectory() as folder:
        paths = make_inputs(args.sample_dir, folder, args.images)
        shapes = {name: [crop.shape for crop in run(paths[0])[0]] for name, run in pipelines.items()}
        assert all(s == shapes["baseline"] for s in shapes.values()), shapes
        best = dict.fromkeys(pipelines, 0.0)
        for _ in range(args.rounds):
            for name, run in pipelines.items():
                best[name] = max(best[name], images_per_second(run, paths))
        reference = {p: reference_images_per_second(args, p, paths) for p in args.patch_augmentation_sizes}
    ours, baseline = best[f"ours/{args.patch_size}"], best["baseline"]
    ratio = ours / baseline
    crops_text = f"2x224 + {args.local_crops_number}x96 crops"
    print(f"500x375 JPEG -> {crops_text}, one thread, best of {args.rounds} rounds of {args.images} images; "
          f"freed memory {'kept' if kept_memory else 'returned to the system'} (--keep_freed_memory)")
    print(f"  ours (OpenCV uint8 + match_all_pairs at patch {args.patch_size}): {ours:7.1f} images/s")
    print(f"  DINO-style torchvision/PIL multi-crop:                {baseline:7.1f} images/s")
    print(f"  ratio {ratio:.2f}x (target >= {args.target}x): {'PASS' if ratio >= args.target else 'FAIL'}")
    print(f"Per-patch augmentation ({len(transforms.PATCH_OPS)} ops per patch), images/s with matches; the authors' "
          f"tile-by-tile PIL loop on the DINO-style multi-crop timed on {args.reference_images} images:")
    print("  patch | ours without | ours with | kept | authors' loop (with) | ours with / authors'")
    kept = {}
    for p in args.patch_augmentation_sizes:
        without, with_it = best[f"ours/{p}"], best[f"patch_augmentation/{p}"]
        kept[p] = with_it / without
        print(f"  {p:5d} | {without:12.1f} | {with_it:9.1f} | {kept[p]:4.2f} | {reference[p]:20.2f} | "
              f"{with_it / reference[p]:6.0f}x")
    if 8 in kept:
        verdict = "PASS" if kept[8] >= args.patch_augmentation_target else "FAIL"
        print(f"  patch 8 keeps {kept[8]:.2f} of its images/s with the per-patch augmentation "
              f"(target >= {args.patch_augmentation_target:.2f}): {verdict}")
    return {"ours": ours, "baseline": baseline, "ratio": ratio, "images_per_second": best,
            "kept_freed_memory": kept_memory,
            "patch_augmentation_kept": kept, "authors_loop": reference}


if __name__ == "__main__":
    utils.run_cli(main, argparse.ArgumentParser("Data pipeline benchmark", parents=[get_args_parser()]).parse_args())
