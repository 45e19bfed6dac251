"""Tests of transforms.py: crops agree with their recorded geometry, size checks, and the OpenCV
photometric ops keep DINO's distributions (compared with torchvision's PIL ops on the sample photos)."""
import glob
import os

import cv2
import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image, ImageFilter, ImageOps

import transforms
from transforms import CropGeometry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEAN = torch.tensor(transforms.IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(transforms.IMAGENET_STD).view(3, 1, 1)


@pytest.fixture(scope="module")
def photos() -> list:
    """The colour sample photos, shrunk to 64x48 so that hundreds of augmentations stay fast."""
    paths = sorted(glob.glob(os.path.join(REPO, "data", "sample", "*.jpg")))
    images = [Image.open(p).convert("RGB").resize((64, 48), Image.BILINEAR) for p in paths]
    colour = [im for im in images if np.asarray(im).std(axis=2).mean() > 2]
    assert len(colour) >= 5
    return colour


def to_pixels(crop: torch.Tensor) -> np.ndarray:
    """Undo the normalisation: (3, S, S) float -> (S, S, 3) float in 0..255."""
    return ((crop * STD + MEAN) * 255).permute(1, 2, 0).numpy()


def expected_source_coords(geom: CropGeometry) -> tuple:
    """Source (x, y) pixel coordinates that the centre of every output pixel samples -> two (S, S) arrays."""
    s = geom.out_size
    cols = np.arange(s)[::-1] if geom.flipped else np.arange(s)
    xs = geom.left + (cols + 0.5) * geom.width / s - 0.5
    ys = geom.top + (np.arange(s) + 0.5) * geom.height / s - 0.5
    return np.broadcast_to(xs[None, :], (s, s)), np.broadcast_to(ys[:, None], (s, s))


def test_crops_show_their_geometry():
    ys, xs = np.mgrid[0:256, 0:256]
    image = np.stack([xs, ys, np.zeros_like(xs)], axis=-1).astype(np.uint8)  # R = x, G = y
    aug = transforms.DataAugmentationPatchWiseDINO(photometric=False, local_crops_number=6)
    torch.manual_seed(0)
    flips = 0
    for _ in range(8):
        crops, geoms = aug(image)
        assert len(crops) == len(geoms) == 8
        for k, (crop, geom) in enumerate(zip(crops, geoms)):
            size = 224 if k < 2 else 96
            assert crop.shape == (3, size, size) and crop.dtype == torch.float32 and geom.out_size == size
            assert all(isinstance(v, int) for v in geom[:5]) and isinstance(geom.flipped, bool)
            assert 0 <= geom.top and geom.top + geom.height <= 256 and 0 <= geom.left and geom.left + geom.width <= 256
            area = geom.height * geom.width / 256 ** 2
            assert (0.4 <= area <= 1.0) if k < 2 else (0.05 <= area <= 0.4)
            pixels = to_pixels(crop)
            exp_x, exp_y = expected_source_coords(geom)
            assert np.abs(pixels[..., 0] - exp_x).max() < 1.0
            assert np.abs(pixels[..., 1] - exp_y).max() < 1.0
            flips += geom.flipped
    assert 10 < flips < 54


def test_resize_first_and_keep_size():
    height, width = 200, 320
    ys, xs = np.mgrid[0:height, 0:width]
    image = np.stack([xs * 255 / (width - 1), ys * 255 / (height - 1), np.zeros(xs.shape)], -1).round().astype(np.uint8)
    torch.manual_seed(1)
    crops, geoms = transforms.DataAugmentationPatchWiseDINO(photometric=False, local_crops_number=2)(image)
    for crop, geom in zip(crops, geoms):  # geometry is in the 256x256 resized image
        assert geom.top + geom.height <= 256 and geom.left + geom.width <= 256
        exp_x, exp_y = expected_source_coords(geom)  # resized coordinates -> original ones -> encoded values
        exp_r = ((exp_x + 0.5) * width / 256 - 0.5).clip(0, width - 1) * 255 / (width - 1)
        exp_g = ((exp_y + 0.5) * height / 256 - 0.5).clip(0, height - 1) * 255 / (height - 1)
        pixels = to_pixels(crop)
        assert np.abs(pixels[..., 0] - exp_r).mean() < 0.5 and np.abs(pixels[..., 0] - exp_r).max() < 2.5
        assert np.abs(pixels[..., 1] - exp_g).mean() < 0.5 and np.abs(pixels[..., 1] - exp_g).max() < 2.5
    _, geoms = transforms.DataAugmentationPatchWiseDINO(resize=0, local_crops_number=2)(Image.fromarray(image))
    assert max(g.left + g.width for g in geoms) <= width and max(g.top + g.height for g in geoms) <= height
    assert any(g.width > 256 for g in geoms[:2]) or any(g.left + g.width > 256 for g in geoms)


@pytest.mark.parametrize("size", [(32, 32), (120, 90), (256, 200)])
def test_enlarging_source_resize_is_pil_bilinear(size):
    """An image no side of which shrinks is resized as the authors' Resize((256, 256)): PIL's bilinear."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "sample", "coffee.jpg")
    image = np.asarray(Image.open(path).convert("RGB").resize(size, Image.BICUBIC))
    ours = transforms.resize_source(image, 256).astype(float)  # (256, 256, 3)
    pil = np.asarray(Image.fromarray(image).resize((256, 256), Image.BILINEAR)).astype(float)
    assert ours.shape == (256, 256, 3)
    assert np.abs(ours - pil).max() <= 1 and np.abs(ours - pil).mean() < 0.3


def test_sizes_must_be_multiples_of_patch_size():
    with pytest.raises(ValueError, match="--global_size 200 .* patch size 16"):
        transforms.DataAugmentationPatchWiseDINO(global_size=200)
    with pytest.raises(ValueError, match="--local_size 96 .* patch size 14"):
        transforms.DataAugmentationPatchWiseDINO(patch_size=14, global_size=224)
    transforms.DataAugmentationPatchWiseDINO(patch_size=8, global_size=224, local_size=96)


def test_inputs_and_reproducibility(photos):
    aug = transforms.DataAugmentationPatchWiseDINO(local_crops_number=2)
    gray = np.asarray(photos[0].convert("L"))
    assert transforms.to_rgb_array(gray).shape == (48, 64, 3)
    assert transforms.to_rgb_array(photos[0].convert("L")).shape == (48, 64, 3)
    with pytest.raises(ValueError, match=r"^expected a PIL image or a uint8 numpy array \(H, W\) or \(H, W, 3\)$"):
        aug(np.zeros((10, 10, 3), dtype=np.float32))
    torch.manual_seed(5)
    first = aug(photos[0])
    torch.manual_seed(5)
    second = aug(np.asarray(photos[0]))
    assert first[1] == second[1] and all(torch.equal(a, b) for a, b in zip(first[0], second[0]))


def test_parameter_distributions():
    torch.manual_seed(0)
    n = 20000
    for blur_p, solarize_p in ((1.0, 0.0), (0.1, 0.2), (0.5, 0.0)):
        params = [transforms.sample_photometric_params(blur_p, solarize_p) for _ in range(n)]
        jittered = [p for p in params if p.jitter_order]
        assert abs(len(jittered) / n - 0.8) < 0.015
        assert abs(np.mean([p.grayscale for p in params]) - 0.2) < 0.015
        assert abs(np.mean([p.solarize for p in params]) - solarize_p) < 0.015
        sigmas = np.array([p.blur_sigma for p in params if p.blur_sigma > 0])
        assert abs(len(sigmas) / n - blur_p) < 0.015
        assert 0.1 <= sigmas.min() < 0.15 and 1.95 < sigmas.max() <= 2.0 and abs(sigmas.mean() - 1.05) < 0.03
        dino_ranges = ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))  # ColorJitter(0.4, 0.4, 0.2, 0.1)
        for name, (lo, hi) in zip(("brightness", "contrast", "saturation", "hue"), dino_ranges):
            values = np.array([getattr(p, name) for p in jittered])
            assert lo <= values.min() < lo + 0.01 and hi - 0.01 < values.max() <= hi
            assert abs(values.mean() - (lo + hi) / 2) < 0.02 * (hi - lo)
        assert all(sorted(p.jitter_order) == [0, 1, 2, 3] for p in jittered)
        firsts = np.bincount([p.jitter_order[0] for p in jittered], minlength=4) / len(jittered)
        assert np.abs(firsts - 0.25).max() < 0.02


def test_views_use_dino_probabilities(photos, monkeypatch):
    calls = []
    sample = transforms.sample_photometric_params
    monkeypatch.setattr(transforms, "sample_photometric_params", lambda *a: calls.append(a) or sample(*a))
    crops, _ = transforms.DataAugmentationPatchWiseDINO(local_crops_number=3)(photos[0])
    assert calls == [(1.0, 0.0), (0.1, 0.2), (0.5, 0.0), (0.5, 0.0), (0.5, 0.0)] and len(crops) == 5
    calls.clear()
    transforms.DataAugmentationPatchWiseDINO(photometric=False)(photos[0])
    assert calls == []


def test_ops_match_torchvision_pil(photos):
    rng = np.random.default_rng(0)
    for image in photos:
        pixels = np.asarray(image)

        def diff(ours: np.ndarray, reference: Image.Image) -> np.ndarray:
            return np.abs(ours.astype(int) - np.asarray(reference, dtype=int))

        for _ in range(4):
            b, c, s, h = (rng.uniform(lo, hi) for lo, hi in transforms.JITTER_RANGES)
            assert diff(transforms.adjust_brightness(pixels, b), F.adjust_brightness(image, b)).max() <= 1
            assert diff(transforms.adjust_contrast(pixels, c), F.adjust_contrast(image, c)).max() <= 1
            assert diff(transforms.adjust_saturation(pixels, s), F.adjust_saturation(image, s)).max() <= 1
            d = diff(transforms.adjust_hue(pixels, h), F.adjust_hue(image, h))
            assert d.mean() < 2.5 and np.quantile(d, 0.99) <= 12, (h, d.mean())
            sigma = rng.uniform(*transforms.BLUR_SIGMA)
            d = diff(transforms.gaussian_blur(pixels, sigma), image.filter(ImageFilter.GaussianBlur(sigma)))
            assert d.mean() < 1.5, (sigma, d.mean())
        assert diff(transforms.to_grayscale(pixels), image.convert("L").convert("RGB")).max() <= 1
        assert diff(transforms.solarize(pixels), ImageOps.solarize(image, 128)).max() == 0
        reference = F.normalize(F.to_tensor(image), MEAN.flatten(), STD.flatten())
        assert torch.allclose(transforms.normalize(pixels), reference, atol=1e-5)


def image_statistics(pixels: np.ndarray) -> np.ndarray:
    """Brightness, contrast, saturation and sharpness of a uint8 (H, W, 3) image."""
    gray = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY).astype(np.float32)
    saturation = cv2.cvtColor(pixels, cv2.COLOR_RGB2HSV)[..., 1].astype(np.float32)
    sharpness = np.abs(cv2.Laplacian(gray, cv2.CV_32F)).mean()
    return np.array([gray.mean(), gray.std(), saturation.mean(), sharpness])


def dino_reference(blur_p: float, solarize_p: float) -> T.Compose:
    """The DINO reference's photometric pipeline on PIL images (colour jitter, grayscale, blur, solarize)."""
    def blur(image: Image.Image) -> Image.Image:
        if torch.rand(()) >= blur_p:
            return image
        return image.filter(ImageFilter.GaussianBlur(radius=float(torch.empty(()).uniform_(0.1, 2.0))))

    return T.Compose([T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(p=0.2), blur,
                      T.RandomSolarize(128, p=solarize_p)])


@pytest.mark.parametrize("blur_p, solarize_p", [(1.0, 0.0), (0.1, 0.2), (0.5, 0.0)])
def test_output_statistics_match_dino_reference(photos, blur_p, solarize_p):
    """Each statistic of an output divided by that of its input: its mean and spread over 600 draws agree."""
    n = 600
    inputs = [np.asarray(photos[k % len(photos)]) for k in range(n)]
    before = np.array([image_statistics(x) for x in inputs])  # (n, 4)
    reference = dino_reference(blur_p, solarize_p)
    torch.manual_seed(1)
    ours = np.array([image_statistics(transforms.apply_photometric(x, transforms.sample_photometric_params(
        blur_p, solarize_p))) for x in inputs]) / before  # (n, 4)
    torch.manual_seed(2)
    theirs = np.array([image_statistics(np.asarray(reference(Image.fromarray(x)))) for x in inputs]) / before
    stderr = np.sqrt((ours.var(axis=0) + theirs.var(axis=0)) / n)
    assert np.all(np.abs(ours.mean(axis=0) - theirs.mean(axis=0)) < 4 * stderr), (ours.mean(0), theirs.mean(0))
    assert np.all(np.abs(ours.std(axis=0) / theirs.std(axis=0) - 1) < 0.2), (ours.std(0), theirs.std(0))
