"""Benchmark of the data pipeline of one data-loading worker: images/s from a JPEG file to the crop tensors.

(a) ours: ``datasets.open_image`` -> ``transforms.DataAugmentationPatchWiseDINO`` (OpenCV on uint8 arrays)
    -> ``patch_matching.match_all_pairs`` (the matches the training data workers compute);
(b) a plain DINO-style multi-crop written here from torchvision transforms on PIL images, as the DINO
    reference does it (RandomResizedCrop bicubic, flip, ColorJitter p=0.8, grayscale, PIL Gaussian blur,
    solarization, ToTensor, Normalize), after the same resize to 256x256 so that both do the same work.

Inputs: 500x375 JPEGs (quality 90) made from the sample photos in a temporary folder; 2 global crops of
224 and 8 local crops of 96 by default. One thread (``torch.set_num_threads(1)``, ``cv2.setNumThreads(1)``)
as in a data worker. The two pipelines run in alternating rounds and each keeps its best round, so load
from other processes hits both alike. PASS when (a) reaches ``--target`` times the images/s of (b).

    python benchmarks/bench_data_pipeline.py
"""
import argparse
import os
import sys
import tempfile
import time
from typing import Callable

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


class DinoStyleMultiCrop:
    """The DINO reference's DataAugmentationDINO on PIL images, after a resize to resize x resize."""

    def __init__(self, local_crops_number: int, global_size: int, local_size: int, resize: int):
        flip_and_color_jitter = T.Compose([
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            T.RandomGrayscale(p=0.2)])
        normalize = T.Compose([T.ToTensor(), T.Normalize(transforms.IMAGENET_MEAN, transforms.IMAGENET_STD)])
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


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    torch.manual_seed(args.seed)
    ours_transform = transforms.DataAugmentationPatchWiseDINO(local_crops_number=args.local_crops_number,
                                                              patch_size=args.patch_size)
    baseline_transform = DinoStyleMultiCrop(args.local_crops_number, 224, 96, 256)

    def ours(path: str) -> tuple:
        crops, geometries = ours_transform(datasets.open_image(path))
        return crops, patch_matching.match_all_pairs(geometries, args.patch_size)

    def baseline(path: str) -> list:
        return baseline_transform(datasets.open_image(path))

    with tempfile.TemporaryDirectory() as folder:
        paths = make_inputs(args.sample_dir, folder, args.images)
        crops, matches = ours(paths[0])
        reference_crops = baseline(paths[0])
        assert [c.shape for c in crops] == [c.shape for c in reference_crops]
        best = {"ours": 0.0, "baseline": 0.0}
        for _ in range(args.rounds):
            best["ours"] = max(best["ours"], images_per_second(ours, paths))
            best["baseline"] = max(best["baseline"], images_per_second(baseline, paths))
    ratio = best["ours"] / best["baseline"]
    crops_text = f"2x224 + {args.local_crops_number}x96 crops"
    print(f"500x375 JPEG -> {crops_text}, one thread, best of {args.rounds} rounds of {args.images} images")
    print(f"  ours (OpenCV uint8 + match_all_pairs, {len(matches)} view pairs): {best['ours']:7.1f} images/s")
    print(f"  DINO-style torchvision/PIL multi-crop:            {best['baseline']:7.1f} images/s")
    print(f"  ratio {ratio:.2f}x (target >= {args.target}x): {'PASS' if ratio >= args.target else 'FAIL'}")
    return {"ours": best["ours"], "baseline": best["baseline"], "ratio": ratio}


if __name__ == "__main__":
    utils.run_cli(main, argparse.ArgumentParser("Data pipeline benchmark", parents=[get_args_parser()]).parse_args())
