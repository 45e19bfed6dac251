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

Optionally (``patch_ops`` > 0, ``--patch_augmentation``), the authors' later per-patch augmentation
(alijavidani/dino, ``image_to_patches.PatchAugmentation``): after the photometric ops and before normalisation,
every view is cut into patch_size x patch_size tiles on the ViT's patch grid and each tile gets ``patch_ops`` of
ColorJitter(brightness=0.1, hue=0.1), GaussianBlur(kernel_size=(1, 5), sigma=(0.1, 2)),
RandomAdjustSharpness(2, p=0.5) and RandomPosterize(3, p=0.5), drawn without replacement, in a random order,
with its own parameters. The authors loop over the tiles in PIL; here the tiles of all views of an image are
side by side in one uint8 image (p, tiles * p, 3), every op runs once per step on the tiles that draw it, with
per-tile parameter vectors, and equals torchvision's functional op on a uint8 tensor tile with the same
parameters (hue and blur to within one gray level, the others exactly).

All random draws use torch's generator, which DataLoader workers seed per worker.
"""
import functools
import itertools
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
# Per-patch augmentation: the authors' op list, in their order (the values of PatchParams.order)
PATCH_OPS = ("color_jitter", "gaussian_blur", "sharpness", "posterize")
COLOR_JITTER, GAUSSIAN_BLUR, SHARPNESS, POSTERIZE = range(len(PATCH_OPS))
PATCH_OP_ORDERS = np.array(list(itertools.permutations(range(len(PATCH_OPS)))))  # (24, 4) every order of the ops
PATCH_BRIGHTNESS, PATCH_HUE = (0.9, 1.1), (-0.1, 0.1)  # ColorJitter(brightness=0.1, hue=0.1)
PATCH_BLUR_SIGMA, PATCH_BLUR_HALF = (0.1, 2.0), 2  # GaussianBlur(kernel_size=(1, 5)): 5 taps down the columns
PATCH_SHARPNESS, PATCH_SHARPNESS_P = 2.0, 0.5  # RandomAdjustSharpness(sharpness_factor=2)
PATCH_POSTERIZE_BITS, PATCH_POSTERIZE_P = 3, 0.5  # RandomPosterize(bits=3)


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


class PatchParams(NamedTuple):
    """Random parameters of the per-patch augmentation, one row per tile (numpy arrays)."""
    order: np.ndarray  # (n, k) int64: the k ops of each tile in the order they run (indices into PATCH_OPS)
    brightness: np.ndarray  # (n,) float32 factor in [0.9, 1.1]
    hue: np.ndarray  # (n,) float32 in [-0.1, 0.1] turns
    brightness_first: np.ndarray  # (n,) bool: ColorJitter's own order, brightness before hue
    blur_sigma: np.ndarray  # (n,) float32 in [0.1, 2]
    sharpen: np.ndarray  # (n,) bool: RandomAdjustSharpness fires (p = 0.5)
    posterize: np.ndarray  # (n,) bool: RandomPosterize fires (p = 0.5)


def sample_patch_params(num_tiles: int, num_ops: int) -> PatchParams:
    """Draw the per-patch parameters of ``num_tiles`` tiles: ``num_ops`` of the 4 ops without replacement in a
    uniformly random order (the first ``num_ops`` of a uniformly drawn permutation), and each op's parameters."""
    u = torch.rand(num_tiles, 7).numpy()  # (n, 7)
    order = PATCH_OP_ORDERS[(u[:, 0].astype(np.float64) * len(PATCH_OP_ORDERS)).astype(np.int64), :num_ops]  # (n, k)

    def uniform(column: int, low_high: tuple) -> np.ndarray:
        return np.float32(low_high[0]) + np.float32(low_high[1] - low_high[0]) * u[:, column]  # (n,)

    return PatchParams(order, uniform(1, PATCH_BRIGHTNESS), uniform(2, PATCH_HUE), u[:, 3] < 0.5,
                       uniform(4, PATCH_BLUR_SIGMA), u[:, 5] < PATCH_SHARPNESS_P, u[:, 6] < PATCH_POSTERIZE_P)


# The tile ops work on a strip: an image (p, m * p, 3) of m tiles of p x p pixels side by side, whose long rows
# suit OpenCV and numpy; a per-tile parameter is repeated for each value of its columns (``_per_value``).
def to_strip(image: np.ndarray, patch_size: int) -> np.ndarray:
    """uint8 (S, S, 3) -> the strip of its tiles on the patch grid (p, g*g*p, 3), in the ViT's token order."""
    g, p = image.shape[0] // patch_size, patch_size
    grid = image.reshape(g, p, g * p * 3).transpose(1, 0, 2)  # (p, g, g*p*3): row r of every tile
    return np.ascontiguousarray(grid).reshape(p, g * g * p, 3)


def from_strip(strip: np.ndarray) -> np.ndarray:
    """Inverse of ``to_strip``: (p, g*g*p, 3) -> (g*p, g*p, 3)."""
    p = strip.shape[0]
    g = math.isqrt(strip.shape[1] // p)
    grid = strip.reshape(p, g, g * p * 3).transpose(1, 0, 2)  # (g, p, g*p*3)
    return np.ascontiguousarray(grid).reshape(g * p, g * p, 3)


def _per_value(values: np.ndarray, strip: np.ndarray) -> np.ndarray:
    """One float32 value per tile (m,) -> one per value of a strip's row (m * p * 3,)."""
    return np.repeat(values.astype(np.float32), 3 * strip.shape[0])


def _scale_truncate(rows: np.ndarray, factors: np.ndarray) -> None:
    """In place on float32 strip rows (p, m*p*3) holding uint8 values, per-value ``factors`` (m*p*3,): what
    ``adjust_brightness`` does to uint8, ``(factor * x).clamp(0, 255)`` truncated; a factor of 1 changes nothing."""
    rows *= factors
    cv2.min(rows, 255.0, dst=rows)  # no value is negative
    np.floor(rows, out=rows)


def _hue_float(rows: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """``adjust_hue`` of float32 strip rows (p, m*p*3) holding uint8 values by per-tile ``factors`` (m,) ->
    float32 rows holding uint8 values: float HSV (OpenCV's conversions: torchvision's formulas), hue rotated,
    back to RGB, in [0, 1] scaled by 255.999 and truncated as ``convert_image_dtype``. Hue and saturation do not
    depend on the scale of the values and RGB is proportional to V, so the values stay in 0..255."""
    p = len(rows)
    hsv = cv2.cvtColor(rows.reshape(p, -1, 3), cv2.COLOR_RGB2HSV)  # hue in degrees, V in 0..255
    shifts = (factors.astype(np.float32) * 360) % 360  # (m,) in [0, 360): OpenCV wraps the hues below 720
    hsv[..., 0] += np.repeat(shifts, p)  # one shift per column
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB).reshape(p, -1)  # (p, m*p*3) in 0..255
    rgb *= np.float32(255.999 / 255)
    return np.floor(rgb, out=rgb)


def tile_brightness(strip: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """torchvision ``adjust_brightness`` of each tile of a uint8 strip (p, m*p, 3) by its factor (m,)."""
    rows = strip.reshape(len(strip), -1).astype(np.float32)  # (p, m*p*3)
    _scale_truncate(rows, _per_value(factors, strip))
    return rows.astype(np.uint8).reshape(strip.shape)


def tile_hue(strip: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """torchvision ``adjust_hue`` of each tile of a uint8 strip (p, m*p, 3) by its factor (m,), in turns."""
    rows = strip.reshape(len(strip), -1).astype(np.float32)  # (p, m*p*3)
    return _hue_float(rows, factors).astype(np.uint8).reshape(strip.shape)


def tile_color_jitter(strip: np.ndarray, brightness: np.ndarray, hue: np.ndarray,
                      brightness_first: np.ndarray) -> np.ndarray:
    """ColorJitter(brightness=0.1, hue=0.1) of each tile of a uint8 strip (p, m*p, 3) with its factors (m,),
    brightness before hue where ``brightness_first`` (m,), after it elsewhere; between the two the values are
    uint8 as in torchvision (float32, truncated)."""
    ones = np.ones_like(brightness)
    rows = strip.reshape(len(strip), -1).astype(np.float32)  # (p, m*p*3)
    if brightness_first.any():  # a factor of 1 changes nothing: the pass is skipped where every factor is 1
        _scale_truncate(rows, _per_value(np.where(brightness_first, brightness, ones), strip))
    rows = _hue_float(rows, hue)
    if not brightness_first.all():
        _scale_truncate(rows, _per_value(np.where(brightness_first, ones, brightness), strip))
    return rows.astype(np.uint8).reshape(strip.shape)


def blur_weights(sigmas: np.ndarray) -> np.ndarray:
    """The taps of torchvision's 5-tap Gaussian kernel for each sigma (m,) -> (m, 5), in float32 as torchvision.
    Subnormal taps (under 1.2e-38: the outer ones of sigma 0.14-0.15) are flushed to zero: arithmetic on subnormals
    is tens of times slower, and they move no sum of 8-bit values by anything a rounding to 0..255 could see."""
    x = np.arange(-PATCH_BLUR_HALF, PATCH_BLUR_HALF + 1, dtype=np.float32)  # (5,)
    pdf = np.exp(np.float32(-0.5) * np.square(x / sigmas.astype(np.float32)[:, None]))  # (m, 5)
    weights = pdf / pdf.sum(axis=1, keepdims=True)  # (m, 5)
    weights[weights < np.finfo(np.float32).tiny] = 0
    return weights


def tile_gaussian_blur(strip: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """torchvision ``gaussian_blur(kernel_size=(1, 5), sigma)`` of each tile of a uint8 strip (p, m*p, 3): a
    5-tap blur down the columns, rows reflected at the tile's edges (needs p >= 3), rounded to uint8."""
    p, half = len(strip), PATCH_BLUR_HALF
    rows = np.abs(np.arange(-half, p + half))  # reflect at the top...
    rows = np.where(rows > p - 1, 2 * (p - 1) - rows, rows)  # ... and at the bottom: (p + 4,)
    padded = strip.reshape(p, -1)[rows].astype(np.float32)  # (p + 4, m*p*3)
    weights = blur_weights(sigmas)  # (m, 5), symmetric
    out = padded[half:half + p] * _per_value(weights[:, half], strip)  # (p, m*p*3)
    for k in range(half):
        pair = padded[k:k + p] + padded[2 * half - k:2 * half - k + p]  # exact sums of integers
        pair *= _per_value(weights[:, k], strip)
        out += pair
    return cv2.convertScaleAbs(out).reshape(strip.shape)  # rounded half to even, as torch.round


def tile_sharpness(strip: np.ndarray, factor: float = PATCH_SHARPNESS) -> np.ndarray:
    """torchvision ``adjust_sharpness`` of each tile of a uint8 strip (p, m*p, 3): blend with the tile smoothed
    by [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 (rounded); the tile's edge pixels stay as they are."""
    p = len(strip)
    # an inner pixel's window stays inside its tile; the sums are exact and k / 13 is never a rounding tie
    sums = cv2.boxFilter(strip, cv2.CV_32F, (3, 3), normalize=False)  # (p, m*p, 3)
    sums = cv2.scaleAdd(strip.astype(np.float32), 4.0, sums)  # + 4 x the centre
    smooth = cv2.convertScaleAbs(sums, alpha=1 / 13)  # rounded to uint8
    out = cv2.addWeighted(strip, factor, smooth, 1 - factor, 0)  # saturated: exact for an integer factor
    edge = np.zeros((p, p), dtype=np.uint8)
    edge[[0, -1]] = edge[:, [0, -1]] = 1
    cv2.copyTo(strip, np.tile(edge, (1, strip.shape[1] // p)), out)  # the tiles' edge pixels are kept
    return out


def tile_posterize(strip: np.ndarray, bits: int = PATCH_POSTERIZE_BITS) -> np.ndarray:
    """torchvision ``posterize``: keep the ``bits`` high bits of every value."""
    return strip & np.uint8(256 - 2 ** (8 - bits))


def run_patch_op(op_id: int, strip: np.ndarray, params: PatchParams, tiles: np.ndarray) -> np.ndarray:
    """``PATCH_OPS[op_id]`` on a uint8 strip of m tiles, tile i with the parameters of row ``tiles[i]`` (m,)."""
    if op_id == COLOR_JITTER:
        return tile_color_jitter(strip, params.brightness[tiles], params.hue[tiles], params.brightness_first[tiles])
    if op_id == GAUSSIAN_BLUR:
        return tile_gaussian_blur(strip, params.blur_sigma[tiles])
    return tile_sharpness(strip) if op_id == SHARPNESS else tile_posterize(strip)


def augment_tiles(strip: np.ndarray, params: PatchParams) -> np.ndarray:
    """Each tile's ops of ``params.order`` in turn. At every step the tiles are reordered so that those running
    the same op lie side by side, and each op runs once on its slice; ColorJitter's tiles form two slices,
    brightness before hue and after it, so that neither runs a brightness pass of factor 1.
    uint8 strip (p, n*p, 3) -> the same."""
    p, n = len(strip), len(params.order)
    idle = len(PATCH_OPS) + 1  # the key of a tile whose op does not fire at a step
    skipped = (((params.order == SHARPNESS) & ~params.sharpen[:, None])
               | ((params.order == POSTERIZE) & ~params.posterize[:, None]))  # (n, k) the coin said no
    keys = params.order + 1 - ((params.order == COLOR_JITTER) & params.brightness_first[:, None])  # (n, k)
    keys = np.where(skipped, idle, keys).astype(np.uint8)  # (n, k): 0, 1 ColorJitter; op + 1 the others
    tiles = strip.reshape(p, n, 3 * p)  # row r of the tile in slot t is tiles[r, t]
    slot_tile = np.arange(n)  # (n,) the tile in each slot
    for key in keys.T:  # (n,) what every tile runs at this step
        order = np.argsort(key[slot_tile], kind="stable")  # (n,) new slot -> old slot
        tiles, slot_tile = np.take(tiles, order, axis=1), slot_tile[order]  # grouped by op
        ends = np.cumsum(np.bincount(key, minlength=idle + 1))  # (7,) end slot of each key's group
        for group_key, (start, end) in enumerate(zip([0, *ends[:idle - 1]], ends[:idle])):
            if end > start:
                group = tiles[:, start:end].reshape(p, -1, 3)  # (p, m*p, 3)
                out = run_patch_op(max(group_key - 1, COLOR_JITTER), group, params, slot_tile[start:end])
                tiles[:, start:end] = out.reshape(p, -1, 3 * p)
    return np.take(tiles, np.argsort(slot_tile), axis=1).reshape(strip.shape)  # back in tile order


def augment_patches(views: Sequence[np.ndarray], patch_size: int, num_ops: int) -> list:
    """The per-patch augmentation of all views of an image, their tiles in one strip: uint8 (S, S, 3) views
    -> the same views with every tile augmented (parameters drawn view by view, tiles in token order)."""
    strips = [to_strip(view, patch_size) for view in views]  # V x (p, g*g*p, 3)
    strip = np.concatenate(strips, axis=1)  # (p, n*p, 3)
    strip = augment_tiles(strip, sample_patch_params(strip.shape[1] // patch_size, num_ops))
    ends = np.cumsum([s.shape[1] for s in strips])[:-1]
    return [from_strip(s) for s in np.split(strip, ends, axis=1)]


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
    """DINO multi-crop that returns ``(crops, geometries)``: 2 global then N local views, one geometry each;
    ``patch_ops`` > 0 adds the per-patch augmentation with that many ops per tile (0: none)."""

    def __init__(self, global_crops_scale: Sequence[float] = (0.4, 1.0),
                 local_crops_scale: Sequence[float] = (0.05, 0.4), local_crops_number: int = 8,
                 patch_size: int = 16, global_size: int = 224, local_size: int = 96, resize: int = 256,
                 photometric: bool = True, patch_ops: int = 0):
        for flag, size in (("--global_size", global_size), ("--local_size", local_size)):
            if size <= 0 or size % patch_size:
                raise ValueError(f"{flag} {size} is not a positive multiple of the patch size {patch_size}")
        if not 0 <= patch_ops <= len(PATCH_OPS):
            raise ValueError(f"patch_ops {patch_ops} must be in 0..{len(PATCH_OPS)}")
        if patch_ops and patch_size < 1 + PATCH_BLUR_HALF:
            raise ValueError(f"the per-patch augmentation needs a patch size >= {1 + PATCH_BLUR_HALF} (its blur "
                             f"reflects {PATCH_BLUR_HALF} rows inside each patch), got {patch_size}")
        if local_crops_number < 0 or resize < 0:
            raise ValueError("local_crops_number and resize must be >= 0")
        for name, scale in (("global_crops_scale", global_crops_scale), ("local_crops_scale", local_crops_scale)):
            if not 0 < scale[0] <= scale[1] <= 1:
                raise ValueError(f"{name} {tuple(scale)} must satisfy 0 < min <= max <= 1")
        self.global_crops_scale = tuple(global_crops_scale)
        self.local_crops_scale = tuple(local_crops_scale)
        self.local_crops_number = local_crops_number
        self.global_size, self.local_size, self.resize = global_size, local_size, resize
        self.photometric, self.patch_size, self.patch_ops = photometric, patch_size, patch_ops
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
            crops.append(crop)
            geometries.append(geom)
        if self.patch_ops:  # drawn after every crop: the same geometry and photometry as without it
            crops = augment_patches(crops, self.patch_size, self.patch_ops)
        return [normalize(crop) for crop in crops], geometries  # V x (3, S, S)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(global {self.global_size} scale={self.global_crops_scale} x2, "
                f"local {self.local_size} scale={self.local_crops_scale} x{self.local_crops_number}, "
                f"resize={self.resize}, photometric={self.photometric}, patch_ops={self.patch_ops})")
