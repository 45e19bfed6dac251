"""Patch-aware multi-crop augmentation for Patch-Wise DINO.

Reproduces the DINO multi-crop recipe (Caron et al. 2021, ``DataAugmentationDINO``): two global views
and N local views, each a random resized crop (ratio 3/4..4/3, bicubic) with a horizontal flip, colour
jitter (0.4, 0.4, 0.2, 0.1) with p=0.8, grayscale p=0.2, Gaussian blur with sigma ~ U(0.1, 2.0) with
p=1.0 / 0.1 / 0.5 (global 1 / global 2 / locals), solarization at 128 with p=0.2 on global 2 only, and
ImageNet normalisation. Differences from the reference:

- every crop records its ``CropGeometry`` (box in the resized source, output side, flip), which the
  patch matching (``patch_matching.py``) turns into pairs of tokens that show the same place;
- the image is decoded and resized once (to ``resize`` x ``resize``, 256 by default, as the
  Patch-Wise DINO reference did; ``resize_source``) and every op runs on uint8 arrays with OpenCV (``cv2.resize``, HSV
  conversion, ``cv2.GaussianBlur``, look-up tables) rather than on PIL images, which is several times
  faster; the random parameters have the reference distributions (crop boxes come from torchvision's
  ``RandomResizedCrop.get_params``) and every op follows the arithmetic of torchvision's PIL functional
  ops (tests/test_transforms.py compares them). Downscaling uses ``INTER_AREA`` (an antialiased box
  filter) where PIL used an antialiased bicubic/bilinear filter.

All random draws use torch's generator, which DataLoader workers seed per worker.
"""
import functools
import math
from typing import NamedTuple, Sequence, Union

import cv2
import numpy as np
import torch
from PIL import Image
from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
JITTER_RANGES = ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))  # brightness, contrast, saturation, hue
JITTER_P, GRAYSCALE_P, SOLARIZE_THRESHOLD = 0.8, 0.2, 128
BLUR_SIGMA = (0.1, 2.0)


class CropGeometry(NamedTuple):
    """A crop: box in pixels of the (resized) source image, side of the square output, mirrored or not."""
    top: int
    left: int
    height: int
    width: int
    out_size: int
    flipped: bool


class PhotometricParams(NamedTuple):
    """Random photometric parameters of one view; ``jitter_order`` is empty when jitter is skipped."""
    jitter_order: tuple  # permutation of (0 brightness, 1 contrast, 2 saturation, 3 hue)
    brightness: float
    contrast: float
    saturation: float
    hue: float
    grayscale: bool
    blur_sigma: float  # 0.0: no blur
    solarize: bool


def to_rgb_array(image: Union[Image.Image, np.ndarray]) -> np.ndarray:
    """PIL image or uint8 array (H, W) / (H, W, 3) -> contiguous uint8 RGB array (H, W, 3)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError("expected a PIL image or a uint8 numpy array (H, W) or (H, W, 3)")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 array of shape (H, W, 3), got {image.shape}")
    return np.ascontiguousarray(image)


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a uint8 (H, W, 3) array: bicubic, or antialiased INTER_AREA when shrinking a side over 2x.

    Bicubic's 4 taps still reach every input pixel below 2x shrinking, and OpenCV's INTER_AREA is
    ~10x slower than bicubic at non-integer ratios, so it is kept for the strong reductions only.
    """
    if image.shape[0] == height and image.shape[1] == width:
        return image
    strong_shrink = image.shape[0] > 2 * height or image.shape[1] > 2 * width
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if strong_shrink else cv2.INTER_CUBIC)


def resize_source(image: np.ndarray, size: int) -> np.ndarray:
    """The first resize of every training image, to size x size as the authors' ``Resize((256, 256))`` (PIL
    bilinear): OpenCV's bilinear when no side shrinks (within one gray level of PIL's), else ``resize_image``
    (PIL's antialiased bilinear costs about 8x more than bicubic when shrinking)."""
    if image.shape[0] <= size and image.shape[1] <= size:
        return cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
    return resize_image(image, size, size)


def sample_crop_geometry(height: int, width: int, out_size: int, scale: Sequence[float]) -> CropGeometry:
    """Random resized crop box (torchvision's sampling, ratio 3/4..4/3) and a flip with p=0.5."""
    size_only = torch.empty(1, 1, 1).expand(3, height, width)  # get_params only reads the shape
    top, left, h, w = transforms.RandomResizedCrop.get_params(size_only, list(scale), list(CROP_RATIO))
    flipped = bool(torch.rand(()) < 0.5)
    return CropGeometry(int(top), int(left), int(h), int(w), out_size, flipped)


def crop_image(image: np.ndarray, geom: CropGeometry) -> np.ndarray:
    """Cut ``geom``'s box out of a uint8 (H, W, 3) array, resize it to out_size, mirror it if flipped."""
    box = image[geom.top:geom.top + geom.height, geom.left:geom.left + geom.width]
    crop = resize_image(box, geom.out_size, geom.out_size)  # (S, S, 3)
    return cv2.flip(crop, 1) if geom.flipped else crop


def sample_photometric_params(blur_p: float, solarize_p: float) -> PhotometricParams:
    """Draw the DINO photometric parameters of one view (torchvision ColorJitter's sampling)."""
    u = torch.rand(9).tolist()
    order = tuple(torch.randperm(4).tolist()) if u[0] < JITTER_P else ()
    factors = [lo + (hi - lo) * x for (lo, hi), x in zip(JITTER_RANGES, u[1:5])]
    sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u[6] if u[5] < blur_p else 0.0
    return PhotometricParams(order, *factors, u[7] < GRAYSCALE_P, sigma, u[8] < solarize_p)


def _blend_lut(image: np.ndarray, factor: float, other: float) -> np.ndarray:
    """PIL's blend of ``image`` with a constant: floor(other + factor * (x - other)) clipped to uint8."""
    lut = np.clip(np.floor(other + factor * (np.arange(256) - other)), 0, 255).astype(np.uint8)
    return cv2.LUT(image, lut)


def _gray(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)  # (H, W), ITU-R 601 luma as PIL's convert("L")


def adjust_brightness(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with black (torchvision/PIL ``adjust_brightness``)."""
    return _blend_lut(image, factor, 0.0)


def adjust_contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the rounded mean of the grayscale image (torchvision/PIL ``adjust_contrast``)."""
    return _blend_lut(image, factor, float(int(cv2.mean(_gray(image))[0] + 0.5)))


def adjust_saturation(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the grayscale image (torchvision/PIL ``adjust_saturation``); -0.5 turns rounding to floor."""
    gray = cv2.cvtColor(_gray(image), cv2.COLOR_GRAY2RGB)  # (H, W, 3)
    return cv2.addWeighted(image, factor, gray, 1.0 - factor, -0.5)


def adjust_hue(image: np.ndarray, factor: float) -> np.ndarray:
    """Rotate the circular hue channel by ``factor`` turns (factor in [-0.5, 0.5])."""
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL)  # (H, W, 3), hue in 0..255 on a circle of 256
    values = np.arange(256)
    lut = np.stack([(values + int(round(factor * 256))) % 256, values, values], axis=-1)  # (256, 3)
    hsv = cv2.LUT(hsv, lut.astype(np.uint8).reshape(256, 1, 3))
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


def to_grayscale(image: np.ndarray) -> np.ndarray:
    """Grayscale with three equal channels (torchvision ``RandomGrayscale``)."""
    return cv2.cvtColor(_gray(image), cv2.COLOR_GRAY2RGB)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with standard deviation ``sigma`` (PIL's GaussianBlur(radius=sigma)), kernel +-3 sigma."""
    ksize = 2 * math.ceil(3.0 * sigma) + 1
    return cv2.GaussianBlur(image, (ksize, ksize), sigma, borderType=cv2.BORDER_REPLICATE)


def solarize(image: np.ndarray, threshold: int = SOLARIZE_THRESHOLD) -> np.ndarray:
    """Invert the pixels >= threshold (PIL ``ImageOps.solarize``)."""
    values = np.arange(256)
    return cv2.LUT(image, np.where(values >= threshold, 255 - values, values).astype(np.uint8))


def apply_photometric(image: np.ndarray, params: PhotometricParams) -> np.ndarray:
    """Jitter (in its random order), grayscale, blur, solarize: the DINO order."""
    jitter_ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    factors = (params.brightness, params.contrast, params.saturation, params.hue)
    for op_id in params.jitter_order:
        image = jitter_ops[op_id](image, factors[op_id])
    if params.grayscale:
        image = to_grayscale(image)
    if params.blur_sigma > 0:
        image = gaussian_blur(image, params.blur_sigma)
    if params.solarize:
        image = solarize(image)
    return image


@functools.lru_cache(maxsize=1)
def _normalize_constants() -> tuple:
    scale = torch.tensor([1.0 / (255.0 * s) for s in IMAGENET_STD]).view(3, 1, 1)  # (3, 1, 1)
    offset = torch.tensor([m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(3, 1, 1)  # (3, 1, 1)
    return scale, offset


def normalize(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float tensor (3, H, W), scaled to [0, 1] then ImageNet-normalised."""
    scale, offset = _normalize_constants()
    tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()  # (3, H, W)
    return tensor.mul_(scale).sub_(offset)


class DataAugmentationPatchWiseDINO:
    """DINO multi-crop that returns ``(crops, geometries)``: 2 global then N local views, one geometry each."""

    def __init__(self, global_crops_scale: Sequence[float] = (0.4, 1.0),
                 local_crops_scale: Sequence[float] = (0.05, 0.4), local_crops_number: int = 8,
                 patch_size: int = 16, global_size: int = 224, local_size: int = 96, resize: int = 256,
                 photometric: bool = True):
        for flag, size in (("--global_size", global_size), ("--local_size", local_size)):
            if size <= 0 or size % patch_size:
                raise ValueError(f"{flag} {size} is not a positive multiple of the patch size {patch_size}")
        if local_crops_number < 0 or resize < 0:
            raise ValueError("local_crops_number and resize must be >= 0")
        for name, scale in (("global_crops_scale", global_crops_scale), ("local_crops_scale", local_crops_scale)):
            if not 0 < scale[0] <= scale[1] <= 1:
                raise ValueError(f"{name} {tuple(scale)} must satisfy 0 < min <= max <= 1")
        self.global_crops_scale = tuple(global_crops_scale)
        self.local_crops_scale = tuple(local_crops_scale)
        self.local_crops_number = local_crops_number
        self.global_size, self.local_size, self.resize = global_size, local_size, resize
        self.photometric = photometric
        # (out_size, scale, blur p, solarize p) of each view, in output order
        self.views = ([(global_size, self.global_crops_scale, 1.0, 0.0),
                       (global_size, self.global_crops_scale, 0.1, 0.2)]
                      + [(local_size, self.local_crops_scale, 0.5, 0.0)] * local_crops_number)

    def __call__(self, image: Union[Image.Image, np.ndarray]) -> tuple:
        source = to_rgb_array(image)  # (H, W, 3) uint8
        if self.resize:
            source = resize_source(source, self.resize)  # (R, R, 3)
        crops, geometries = [], []
        for out_size, scale, blur_p, solarize_p in self.views:
            geom = sample_crop_geometry(source.shape[0], source.shape[1], out_size, scale)
            crop = crop_image(source, geom)  # (S, S, 3) uint8
            if self.photometric:
                crop = apply_photometric(crop, sample_photometric_params(blur_p, solarize_p))
            crops.append(normalize(crop))  # (3, S, S)
            geometries.append(geom)
        return crops, geometries

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(global {self.global_size} scale={self.global_crops_scale} x2, "
                f"local {self.local_size} scale={self.local_crops_scale} x{self.local_crops_number}, "
                f"resize={self.resize}, photometric={self.photometric})")
