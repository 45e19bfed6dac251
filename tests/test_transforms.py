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


# ---------------------------------------------------------------------------------------------------------------
# Per-patch augmentation (--patch_augmentation)
# ---------------------------------------------------------------------------------------------------------------
def tile_of(strip: np.ndarray, i: int) -> torch.Tensor:
    """Tile i of a strip (p, m*p, 3) as the uint8 tensor (3, p, p) torchvision's functional ops take."""
    p = len(strip)
    return torch.from_numpy(np.ascontiguousarray(strip[:, i * p:(i + 1) * p])).permute(2, 0, 1)


def assert_tiles_close(ours: np.ndarray, reference: list, tolerance: int) -> None:
    """Every tile of the strip ``ours`` against its torchvision tensor, within ``tolerance`` gray levels."""
    for i, expected in enumerate(reference):
        diff = np.abs(tile_of(ours, i).numpy().astype(int) - expected.numpy().astype(int))
        assert diff.max() <= tolerance, (i, diff.max())


@pytest.mark.parametrize("patch_size", [8, 5])
def test_each_patch_op_equals_torchvision_on_every_tile(photos, patch_size):
    """Brightness, sharpness and posterize exactly, hue and the vertical blur within one gray level, each tile
    with its own drawn parameters (plus hue factors up to +-0.5, which wrap around the hue circle)."""
    side = 6 * patch_size
    views = [np.asarray(photo)[:side, :side] for photo in photos[:3]]
    strip = np.concatenate([transforms.to_strip(np.ascontiguousarray(v), patch_size) for v in views], axis=1)
    n = strip.shape[1] // patch_size
    torch.manual_seed(0)
    params = transforms.sample_patch_params(n, 4)
    tiles = [tile_of(strip, i) for i in range(n)]
    assert_tiles_close(transforms.tile_brightness(strip, params.brightness),
                       [F.adjust_brightness(t, float(b)) for t, b in zip(tiles, params.brightness)], 0)
    assert_tiles_close(transforms.tile_sharpness(strip), [F.adjust_sharpness(t, 2.0) for t in tiles], 0)
    assert_tiles_close(transforms.tile_posterize(strip), [F.posterize(t, 3) for t in tiles], 0)
    hues = np.concatenate([params.hue[:n - 4], [-0.5, 0.5, 0.37, -0.29]]).astype(np.float32)
    assert_tiles_close(transforms.tile_hue(strip, hues), [F.adjust_hue(t, float(h)) for t, h in zip(tiles, hues)], 1)
    assert_tiles_close(transforms.tile_gaussian_blur(strip, params.blur_sigma),
                       [F.gaussian_blur(t, [1, 5], [float(s)] * 2) for t, s in zip(tiles, params.blur_sigma)], 1)
    thin = np.array([0.14, 0.145, 0.15, 2.0], np.float32)  # outer taps of the first three are float32 subnormals
    taps = transforms.blur_weights(thin)  # (4, 5)
    assert not ((taps > 0) & (taps < np.finfo(np.float32).tiny)).any()  # flushed: subnormal arithmetic is slow
    assert_tiles_close(transforms.tile_gaussian_blur(np.ascontiguousarray(strip[:, :4 * patch_size]), thin),
                       [F.gaussian_blur(tiles[i], [1, 5], [float(s)] * 2) for i, s in enumerate(thin)], 1)
    # ColorJitter applies its two ops in the order it drew; they differ where brightening saturates a colour
    bright = np.concatenate([strip, np.tile(np.array([250, 100, 50], np.uint8), (patch_size, 2 * patch_size, 1))], 1)
    params = params._replace(brightness=np.append(params.brightness, [1.1, 1.1]).astype(np.float32),
                             hue=np.append(params.hue, [0.1, 0.1]).astype(np.float32),
                             brightness_first=np.append(params.brightness_first, [True, False]))
    jittered = transforms.tile_color_jitter(bright, params.brightness, params.hue, params.brightness_first)
    for i in range(n + 2):
        t, b, h = tile_of(bright, i), float(params.brightness[i]), float(params.hue[i])
        expected = (F.adjust_hue(F.adjust_brightness(t, b), h) if params.brightness_first[i]
                    else F.adjust_brightness(F.adjust_hue(t, h), b))
        assert np.abs(tile_of(jittered, i).numpy().astype(int) - expected.numpy().astype(int)).max() <= 2
    assert np.abs(tile_of(jittered, n).numpy().astype(int) - tile_of(jittered, n + 1).numpy()).max() > 10


def test_tiles_draw_independent_parameters_and_orders():
    torch.manual_seed(0)
    n = 4800
    params = transforms.sample_patch_params(n, 4)
    assert params.order.shape == (n, 4) and (np.sort(params.order, axis=1) == np.arange(4)).all()
    orders, counts = np.unique(params.order, axis=0, return_counts=True)
    assert len(orders) == 24 and np.abs(counts / n - 1 / 24).max() < 0.015  # every order, uniformly
    for values, (low, high) in ((params.brightness, (0.9, 1.1)), (params.hue, (-0.1, 0.1)),
                                (params.blur_sigma, (0.1, 2.0))):
        assert len(np.unique(values)) > n - 10  # one draw per tile
        assert low <= values.min() < low + 0.01 and high - 0.01 < values.max() <= high
    for coin in (params.brightness_first, params.sharpen, params.posterize):
        assert abs(coin.mean() - 0.5) < 0.03
    assert abs(np.corrcoef(params.sharpen, params.posterize)[0, 1]) < 0.05
    two = transforms.sample_patch_params(n, 2).order
    assert two.shape == (n, 2) and (two[:, 0] != two[:, 1]).all()
    assert len(np.unique(two, axis=0)) == 12  # ordered pairs without replacement
    assert transforms.sample_patch_params(n, 0).order.shape == (n, 0)


def one_tile_at_a_time(strip: np.ndarray, params: transforms.PatchParams) -> np.ndarray:
    """The authors' loop: tile by tile, its ops in its order, each op on that tile alone."""
    p, out = len(strip), strip.copy()
    for i in range(strip.shape[1] // p):
        tile = np.ascontiguousarray(out[:, i * p:(i + 1) * p])
        for op in params.order[i]:
            skipped = (op == transforms.SHARPNESS and not params.sharpen[i]) or \
                      (op == transforms.POSTERIZE and not params.posterize[i])  # p = 0.5 each
            if not skipped:
                tile = transforms.run_patch_op(op, tile, params, np.array([i]))
        out[:, i * p:(i + 1) * p] = tile
    return out


@pytest.mark.parametrize("num_ops", [4, 2])
def test_tiles_get_their_own_ops_in_their_own_order(photos, num_ops):
    """The batched pass equals a tile-by-tile loop; the same tile under different orders changes."""
    p = 8
    strip = transforms.to_strip(np.ascontiguousarray(np.asarray(photos[1])[:48, :48]), p)
    torch.manual_seed(1)
    params = transforms.sample_patch_params(36, num_ops)
    assert np.array_equal(transforms.augment_tiles(strip, params), one_tile_at_a_time(strip, params))
    assert len(np.unique(params.order, axis=0)) > 5
    # one tile, the same parameters, every order of the 4 ops: they do not commute
    tile = np.ascontiguousarray(strip[:, 3 * p:4 * p])
    same = transforms.PatchParams(transforms.PATCH_OP_ORDERS, *(np.full(24, v, np.float32) for v in (1.1, 0.05)),
                                  np.ones(24, bool), np.full(24, 1.5, np.float32), np.ones(24, bool), np.ones(24, bool))
    outcomes = transforms.augment_tiles(np.tile(tile, (1, 24, 1)), same)
    assert len({outcomes[:, k * p:(k + 1) * p].tobytes() for k in range(24)}) >= 12


def test_patch_augmentation_changes_pixels_only(photos):
    """Same seed: the same geometry (hence the same matches) and the same views with 0 ops; with 4 ops every
    view changes; the same seed twice gives the same views."""
    def draw(patch_ops: int, seed: int = 3) -> tuple:
        torch.manual_seed(seed)
        return transforms.DataAugmentationPatchWiseDINO(local_crops_number=2, patch_size=8, global_size=32,
                                                        local_size=16, resize=48, patch_ops=patch_ops)(photos[2])

    (plain, geoms), (zero, geoms_zero), (patched, geoms_patched) = draw(0), draw(0), draw(4)
    assert geoms == geoms_zero == geoms_patched
    assert all(torch.equal(a, b) for a, b in zip(plain, zero))
    assert all(a.shape == b.shape and not torch.equal(a, b) for a, b in zip(plain, patched))
    again, geoms_again = draw(4)
    assert geoms_again == geoms and all(torch.equal(a, b) for a, b in zip(patched, again))
    views = [np.asarray(photos[2])[:16, :16]] * 2
    assert all(np.array_equal(a, b) for a, b in zip(transforms.augment_patches(views, 8, 0), views))


def test_patch_augmentation_settings_are_checked():
    with pytest.raises(ValueError, match="--global_size 200 .* patch size 16"):
        transforms.DataAugmentationPatchWiseDINO(global_size=200, patch_ops=4)
    with pytest.raises(ValueError, match="patch size >= 3"):
        transforms.DataAugmentationPatchWiseDINO(patch_size=2, global_size=32, local_size=16, patch_ops=1)
    with pytest.raises(ValueError, match="patch_ops 5 must be in 0..4"):
        transforms.DataAugmentationPatchWiseDINO(patch_ops=5)
    assert "patch_ops=4" in repr(transforms.DataAugmentationPatchWiseDINO(patch_ops=4))
