"""visualize_attention.py: the maps against attention weights computed by hand from the last block's q and k,
the threshold against the DINO reference's rule and the mass it keeps, the files written, and one-line errors."""
import argparse
import os

import numpy as np
import pytest
import torch
from PIL import Image

import utils
import visualize_attention as va
import vision_transformer as vits
from eval_testdata import assert_one_line_error, random_image, run_script

pytestmark = pytest.mark.usefixtures("one_thread")


def attention_by_hand(model: vits.VisionTransformer, image: torch.Tensor) -> torch.Tensor:
    """[CLS]-to-patch attention of the last block written out: LayerNorm, the qkv projection split per head,
    softmax(q . k / sqrt(d)) in float64; returned as (heads, h, w) filled patch by patch in row-major order."""
    x = model.prepare_tokens(image[None])  # (1, 1+N, D)
    for block in model.blocks[:-1]:
        x = block(x)  # (1, 1+N, D)
    last = model.blocks[-1]
    y = torch.nn.functional.layer_norm(x[0].double(), (x.shape[-1],), last.norm1.weight.double(),
                                       last.norm1.bias.double(), last.norm1.eps)  # (1+N, D)
    qkv = y @ last.attn.qkv.weight.double().T + last.attn.qkv.bias.double()  # (1+N, 3D)
    dim, heads = x.shape[-1], model.num_heads
    d = dim // heads
    h, w = image.shape[1] // model.patch_size, image.shape[2] // model.patch_size
    out = torch.zeros(heads, h, w, dtype=torch.float64)
    for j in range(heads):
        q = qkv[0, j * d:(j + 1) * d]  # (d,) the [CLS] query
        k = qkv[:, dim + j * d:dim + (j + 1) * d]  # (1+N, d)
        weights = torch.softmax(k @ q / d ** 0.5, dim=0)  # (1+N,)
        for r in range(h):
            for c in range(w):
                out[j, r, c] = weights[1 + r * w + c]
    return out


@torch.no_grad()
def test_maps_equal_the_softmax_of_q_dot_k_of_the_last_block():
    torch.manual_seed(0)
    model = vits.VisionTransformer(patch_size=8, embed_dim=48, depth=3, num_heads=3).eval()
    image = torch.randn(3, 24, 40)  # a 3 x 5 grid: a transposed reshape would not fit
    maps = va.cls_attention(model, image)
    assert maps.shape == (3, 3, 5)
    torch.testing.assert_close(maps.double(), attention_by_hand(model, image), atol=1e-6, rtol=1e-5)
    assert (maps.sum(dim=(1, 2)) < 1).all()  # the [CLS]-to-[CLS] weight is left out


def dino_reference_mask(maps: torch.Tensor, threshold: float) -> torch.Tensor:
    """The DINO reference's rule: sort ascending, normalise, keep where the cumulative mass exceeds 1 - t."""
    flat = maps.flatten(1)  # (heads, N)
    values, order = torch.sort(flat)
    cumulative = torch.cumsum(values / values.sum(dim=1, keepdim=True), dim=1)
    kept_sorted = cumulative > (1 - threshold)
    keep = torch.zeros_like(kept_sorted)
    for head in range(flat.shape[0]):
        keep[head, order[head]] = kept_sorted[head]
    return keep.reshape(maps.shape)


@pytest.mark.parametrize("threshold", [0.1, 0.3, 0.6, 0.9, 1.0])
def test_threshold_keeps_the_fewest_largest_patches_holding_that_mass(threshold):
    maps = torch.rand(4, 6, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64) ** 3  # (4, 6, 7)
    mask = va.mass_mask(maps, threshold)
    assert mask.shape == maps.shape and mask.dtype == torch.bool
    for head, keep in zip(maps, mask):
        total, kept = head.sum(), head[keep]
        assert kept.sum() >= threshold * total - 1e-12  # holds the mass
        assert kept.sum() - kept.min() < threshold * total  # and no patch of it is superfluous
        if (~keep).any():
            assert kept.min() >= head[~keep].max()  # the largest ones
    if threshold < 1.0:  # at 1.0 the reference's strict > drops the smallest patch
        assert torch.equal(mask, dino_reference_mask(maps, threshold))


def _args(tmp_path, *flags):
    parser = argparse.ArgumentParser(parents=[va.get_args_parser()])
    return parser.parse_args(["--output_dir", str(tmp_path / "out"), "--use_cuda", "false", *flags])


def test_writes_the_reference_files_and_the_figure(tmp_path, checkpoint8, capsys):
    image_path = str(tmp_path / "photo.png")
    random_image(5, size=(90, 70)).save(image_path)
    maps = va.main(_args(tmp_path, "--pretrained_weights", checkpoint8, "--image_path", image_path,
                         "--image_size", "50", "70", "--threshold", "0.5"))  # cut to 48 x 64: a 6 x 8 grid
    assert "--arch vit_tiny and --patch_size 8 from the checkpoint's args" in capsys.readouterr().out
    assert maps.shape == (3, 6, 8)
    out = tmp_path / "out"
    expected = {"img.png", "attention.png"} | {f"attn-head{j}.png" for j in range(3)} | \
        {f"mask_th0.5_head{j}.png" for j in range(3)}
    assert set(os.listdir(out)) == expected
    assert Image.open(out / "img.png").size == (64, 48)
    for j in range(3):
        heat = np.asarray(Image.open(out / f"attn-head{j}.png").convert("RGB")).astype(int)  # (48, 64, 3)
        assert heat.shape == (48, 64, 3)
        blocks = heat.reshape(6, 8, 8, 8, 3)  # (row, y, col, x, rgb): one colour per 8x8 patch
        assert (blocks == blocks[:, :1, :, :1]).all()
        brightest = np.unravel_index(blocks[:, 0, :, 0].sum(-1).argmax(), (6, 8))  # viridis: yellow is the top
        assert maps[j][brightest] == maps[j].max()
    width, height = Image.open(out / "attention.png").size
    assert width > 3 * height  # image and three heads side by side


def test_bad_input_is_a_one_line_error(tmp_path, checkpoint8):
    result = run_script("visualize_attention.py", ["--pretrained_weights", checkpoint8, "--image_path",
                                                   str(tmp_path / "absent.png"), "--use_cuda", "false"])
    assert_one_line_error(result, "absent.png", "not found")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(utils.UserError, match="cannot decode image .*notes.png") as error:
        va.main(_args(tmp_path, "--pretrained_weights", checkpoint8, "--image_path", str(text)))
    assert "\n" not in str(error.value)
    with pytest.raises(utils.UserError, match="--patch_size 16 contradicts .*--patch_size 8"):
        va.main(_args(tmp_path, "--pretrained_weights", checkpoint8, "--patch_size", "16"))
    for flags, message in ((["--threshold", "1.5"], "--threshold 1.5 must be"),
                           (["--image_size", "4"], "smaller than one 8-pixel patch"),
                           (["--image_size", "4", "5", "6"], "--image_size takes one")):
        with pytest.raises(utils.UserError, match=message):
            va.main(_args(tmp_path, "--pretrained_weights", checkpoint8, "--image_path", "test.png", *flags))


def test_flag_errors_and_an_unwritable_output_dir_are_one_line_errors(tmp_path, checkpoint8):
    result = run_script("visualize_attention.py", ["--patch_size", "0", "--use_cuda", "false"])
    assert_one_line_error(result, "--patch_size", "at least 1")
    result = run_script("visualize_attention.py", ["--threshold", "most"])
    assert_one_line_error(result, "--threshold", "most")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(utils.UserError, match="cannot write the PNGs to --output_dir .*a_file"):
        va.main(_args(tmp_path, "--pretrained_weights", checkpoint8, "--image_size", "32",
                      "--output_dir", str(blocker)))


def test_the_default_image_is_found_from_any_working_directory(tmp_path):
    path = _args(tmp_path).image_path
    assert os.path.isabs(path) and os.path.basename(path) == "test.png" and os.path.isfile(path)
