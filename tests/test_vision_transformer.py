"""Tests of vision_transformer.py: official DINO names/shapes, equivalence with timm's ViT, attention,
position-embedding interpolation, the DINO head and stochastic depth (CPU, small models)."""
import copy
from functools import partial

import cv2
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import patch_wise_dino
import vision_transformer as vits

timm_vit = pytest.importorskip("timm.models.vision_transformer")
timm_pos = pytest.importorskip("timm.layers.pos_embed")


def official_vit_shapes(embed_dim: int, num_patches: int, patch_size: int, depth: int = 12) -> dict:
    """Parameter names and shapes of an official DINO ViT checkpoint, written from the spec."""
    D, M = embed_dim, 4 * embed_dim
    shapes = {
        "cls_token": (1, 1, D),
        "pos_embed": (1, 1 + num_patches, D),
        "patch_embed.proj.weight": (D, 3, patch_size, patch_size),
        "patch_embed.proj.bias": (D,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "norm1.weight": (D,), b + "norm1.bias": (D,),
            b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
            b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
            b + "norm2.weight": (D,), b + "norm2.bias": (D,),
            b + "mlp.fc1.weight": (M, D), b + "mlp.fc1.bias": (M,),
            b + "mlp.fc2.weight": (D, M), b + "mlp.fc2.bias": (D,),
        })
    shapes.update({"norm.weight": (D,), "norm.bias": (D,)})
    return shapes


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Perturb every parameter (LayerNorm gains/biases included) so no weight is trivially 1 or 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def timm_twin(img_size, patch_size: int = 16, embed_dim: int = 384, num_heads: int = 6) -> nn.Module:
    """timm ViT configured like a DINO ViT, with the explicit (non-SDPA) attention path."""
    model = timm_vit.VisionTransformer(
        img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=12, num_heads=num_heads,
        mlp_ratio=4.0, qkv_bias=True, num_classes=0, global_pool="token", class_token=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6))
    for blk in model.blocks:
        blk.attn.fused_attn = False
    return model.eval()


@pytest.fixture(scope="module")
def small_pair():
    torch.manual_seed(0)
    ours = randomize_(vits.vit_small(patch_size=16))
    ref = timm_twin(224)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch,dim,patch,n", [("vit_small", 384, 16, 196), ("vit_small", 384, 8, 784),
                                              ("vit_tiny", 192, 16, 196), ("vit_base", 768, 16, 196)])
def test_state_dict_matches_official(arch, dim, patch, n):
    sd = vits.VIT_ARCHS[arch](patch_size=patch).state_dict()
    expected = official_vit_shapes(dim, n, patch)
    assert len(expected) == 150
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert list(sd.keys()) == list(expected.keys())


def test_init_like_dino():
    model = vits.vit_small()
    assert model.blocks[0].norm1.weight.eq(1).all() and model.norm.bias.eq(0).all()
    assert model.blocks[3].mlp.fc1.bias.eq(0).all() and model.blocks[3].attn.qkv.bias.eq(0).all()
    w = model.blocks[5].attn.qkv.weight
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.001
    assert abs(model.pos_embed.std().item() - 0.02) < 0.003
    assert model.norm.eps == 1e-6 and model.blocks[0].norm1.eps == 1e-6


def test_matches_timm(small_pair, images):
    ours, ref = small_pair
    with torch.no_grad():
        tokens = ours.forward_tokens(images)
        cls = ours(images)
        ref_tokens = ref.forward_features(images)
        ref_cls = ref(images)
    assert tokens.shape == (2, 197, 384) and cls.shape == (2, 384)
    torch.testing.assert_close(tokens, ref_tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cls, ref_cls, atol=1e-5, rtol=1e-5)


def test_intermediate_layers_match_timm(small_pair, images):
    ours, ref = small_pair
    with torch.no_grad():
        inter = ours.get_intermediate_layers(images, n=4)
        x = ref._pos_embed(ref.patch_embed(images))
        ref_inter = []
        for blk in ref.blocks:
            x = blk(x)
            ref_inter.append(ref.norm(x))
        last = ours.forward_tokens(images)
    assert len(inter) == 4
    for a, b in zip(inter, ref_inter[-4:]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inter[-1], last, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"^n must be in \[1, 12\], got 13$"):
        ours.get_intermediate_layers(images, n=13)


def explicit_attention(x: torch.Tensor, sd: dict, prefix: str, heads: int):
    """Reference attention from raw weights: LayerNorm, qkv, softmax(QK^T / sqrt(d)), returns (weights, output)."""
    B, T, D = x.shape
    h = F.layer_norm(x, (D,), sd[prefix + "norm1.weight"], sd[prefix + "norm1.bias"], eps=1e-6)
    qkv = h @ sd[prefix + "attn.qkv.weight"].T + sd[prefix + "attn.qkv.bias"]  # (B, T, 3D)
    q, k, v = (t.reshape(B, T, heads, D // heads).transpose(1, 2) for t in qkv.split(D, dim=-1))
    weights = torch.softmax(q @ k.transpose(-1, -2) / (D // heads) ** 0.5, dim=-1)  # (B, H, T, T)
    out = (weights @ v).transpose(1, 2).reshape(B, T, D)
    out = out @ sd[prefix + "attn.proj.weight"].T + sd[prefix + "attn.proj.bias"]
    return weights, out


def test_last_selfattention_explicit(small_pair, images):
    ours, ref = small_pair
    sd = ours.state_dict()
    with torch.no_grad():
        attn = ours.get_last_selfattention(images)
        x = ref._pos_embed(ref.patch_embed(images))
        for blk in ref.blocks[:-1]:
            x = blk(x)
        expected, _ = explicit_attention(x, sd, "blocks.11.", heads=6)
    assert attn.shape == (2, 6, 197, 197)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 6, 197), atol=1e-5, rtol=0)
    torch.testing.assert_close(attn, expected, atol=1e-6, rtol=1e-4)


def test_sdpa_attention_equals_explicit():
    torch.manual_seed(0)
    block = randomize_(vits.Block(dim=48, num_heads=4))
    sd = {"norm1." + k: v for k, v in block.norm1.state_dict().items()}
    sd.update({"attn." + k: v for k, v in block.attn.state_dict().items()})
    x = torch.randn(3, 17, 48)
    with torch.no_grad():
        out = block.attn(block.norm1(x))
        weights = block.attn.attention_weights(block.norm1(x))
        ref_weights, ref_out = explicit_attention(x, sd, "", heads=4)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights, ref_weights, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grid", [(6, 6), (20, 15), (14, 40), (6, 10)])
def test_pos_embed_resampled_where_dino_samples_it(grid):
    """DINO's reference resizes with scale factor (new + 0.1) / old per axis, and its weights were evaluated
    that way. OpenCV's bicubic resize with the same factors (same kernel, clamped border) is an independent
    implementation; the exact-``size=`` resize of timm samples elsewhere and differs by ~0.3 here."""
    torch.manual_seed(0)
    pos_embed = torch.randn(1, 1 + 14 * 14, 8)
    h, w = grid
    got = vits.resize_pos_embed(pos_embed, (14, 14), grid)  # (1, 1+h*w, 8)
    want = cv2.resize(pos_embed[0, 1:].reshape(14, 14, 8).numpy(), (0, 0), fx=(w + 0.1) / 14, fy=(h + 0.1) / 14,
                      interpolation=cv2.INTER_CUBIC)  # (h, w, 8)
    torch.testing.assert_close(got[0, 1:], torch.from_numpy(want).reshape(h * w, 8), atol=2e-5, rtol=0)
    assert torch.equal(got[0, 0], pos_embed[0, 0])
    exact_size = timm_pos.resample_abs_pos_embed(pos_embed, new_size=list(grid), old_size=[14, 14],
                                                 num_prefix_tokens=1, antialias=False)
    assert (exact_size - got).abs().max() > 0.1  # the test tells the two samplings apart


def test_non_square_matches_timm_with_resampled_pos_embed():
    torch.manual_seed(0)
    ours = randomize_(vits.vit_tiny(patch_size=16))
    ref = timm_twin((96, 160), embed_dim=192, num_heads=3)
    sd = ours.state_dict()
    sd["pos_embed"] = vits.resize_pos_embed(sd["pos_embed"], (14, 14), (6, 10))
    ref.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 96, 160)
    with torch.no_grad():
        tokens = ours.forward_tokens(x)
        ref_tokens = ref.forward_features(x)
    assert tokens.shape == (2, 1 + 6 * 10, 192)
    torch.testing.assert_close(tokens, ref_tokens, atol=1e-5, rtol=1e-5)


def test_pos_embed_orientation_non_square():
    """A position embedding that encodes (row, col) keeps its orientation on a non-square grid."""
    model = vits.vit_tiny(patch_size=16)
    rows, cols = torch.meshgrid(torch.arange(14.0), torch.arange(14.0), indexing="ij")
    with torch.no_grad():
        model.pos_embed.zero_()
        model.pos_embed[0, 1:, 0] = rows.flatten()
        model.pos_embed[0, 1:, 1] = cols.flatten()
    pos = model.interpolate_pos_encoding(4, 9)[0, 1:].reshape(4, 9, -1)  # (h, w, D)
    assert (pos[1:, :, 0] > pos[:-1, :, 0]).all() and (pos[:, 1:, 0] - pos[:, :-1, 0]).abs().max() < 1e-5
    assert (pos[:, 1:, 1] > pos[:, :-1, 1]).all() and (pos[1:, :, 1] - pos[:-1, :, 1]).abs().max() < 1e-5


def test_no_interpolation_at_native_grid(small_pair):
    ours, _ = small_pair
    assert ours.interpolate_pos_encoding(14, 14) is ours.pos_embed


@pytest.mark.parametrize("patch,img_size,in_hw,grid", [(4, 32, (32, 32), (8, 8)), (4, 32, (16, 24), (4, 6)),
                                                       (8, 224, (224, 224), (28, 28)), (8, 224, (64, 96), (8, 12))])
def test_shapes_any_patch_size(patch, img_size, in_hw, grid):
    torch.manual_seed(0)
    model = vits.vit_tiny(patch_size=patch, img_size=img_size).eval()
    assert model.pos_embed.shape == (1, 1 + (img_size // patch) ** 2, 192)
    x = torch.randn(2, 3, *in_hw)
    with torch.no_grad():
        tokens = model.forward_tokens(x)
        cls = model(x)
        attn = model.get_last_selfattention(x)
    n = grid[0] * grid[1]
    assert tokens.shape == (2, 1 + n, 192) and cls.shape == (2, 192) and attn.shape == (2, 3, 1 + n, 1 + n)
    torch.testing.assert_close(cls, tokens[:, 0], atol=1e-6, rtol=0)


def test_bad_input_size_raises():
    model = vits.vit_tiny(patch_size=8, img_size=32)
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        model(torch.randn(1, 3, 32, 36))
    with pytest.raises(ValueError, match="expected images"):
        model(torch.randn(1, 1, 32, 32))


def test_dino_head_shapes_and_normalised_bottleneck():
    torch.manual_seed(0)
    head = vits.DINOHead(64, 100, hidden_dim=128, bottleneck_dim=32)
    captured = {}
    head.last_layer.register_forward_hook(lambda m, inp, out: captured.update(z=inp[0]))
    x = torch.randn(5, 7, 64)
    out = head(x)
    assert out.shape == (5, 7, 100)
    assert captured["z"].shape == (5, 7, 32)
    torch.testing.assert_close(captured["z"].norm(dim=-1), torch.ones(5, 7), atol=1e-5, rtol=0)
    torch.testing.assert_close(head(x[2]), out[2], atol=1e-6, rtol=0)
    assert not torch.isnan(out).any()


def test_dino_head_state_dict_and_frozen_gain():
    head = vits.DINOHead(384, 1000)
    sd = head.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        "mlp.0.weight": (2048, 384), "mlp.0.bias": (2048,), "mlp.2.weight": (2048, 2048), "mlp.2.bias": (2048,),
        "mlp.4.weight": (256, 2048), "mlp.4.bias": (256,),
        "last_layer.weight_g": (1000, 1), "last_layer.weight_v": (1000, 256)}
    assert sd["last_layer.weight_g"].eq(1).all()
    assert not head.last_layer.weight_g.requires_grad and head.last_layer.weight_v.requires_grad
    assert vits.DINOHead(384, 10, norm_last_layer=False).last_layer.weight_g.requires_grad
    bn_keys = [k for k in vits.DINOHead(384, 10, use_bn=True).state_dict() if not k.startswith("last_layer")]
    assert [k for k in bn_keys if k.endswith("weight")] == [
        "mlp.0.weight", "mlp.1.weight", "mlp.3.weight", "mlp.4.weight", "mlp.6.weight"]
    assert "mlp.1.running_mean" in bn_keys
    assert list(vits.DINOHead(384, 10, nlayers=1).state_dict())[:2] == ["mlp.weight", "mlp.bias"]


def test_weight_norm_matches_torch_parametrization():
    torch.manual_seed(0)
    ours = vits.WeightNormLinear(32, 20)
    with torch.no_grad():
        ours.weight_g.uniform_(0.5, 2.0)
    ref = torch.nn.utils.parametrizations.weight_norm(nn.Linear(32, 20, bias=False))
    with torch.no_grad():
        ref.parametrizations.weight.original0.copy_(ours.weight_g)
        ref.parametrizations.weight.original1.copy_(ours.weight_v)
    x = torch.randn(6, 32)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.weight.norm(dim=1, keepdim=True), ours.weight_g.detach(), atol=1e-6, rtol=1e-5)


def test_head_loads_official_style_state_dict_and_deepcopies():
    src = vits.DINOHead(64, 50, hidden_dim=128, bottleneck_dim=32, norm_last_layer=False)
    with torch.no_grad():
        src.last_layer.weight_g.uniform_(0.5, 2.0)
    dst = vits.DINOHead(64, 50, hidden_dim=128, bottleneck_dim=32)
    dst.load_state_dict(src.state_dict(), strict=True)
    twin = copy.deepcopy(dst)
    x = torch.randn(4, 64)
    torch.testing.assert_close(dst(x), src(x), atol=0, rtol=0)
    torch.testing.assert_close(twin(x), src(x), atol=0, rtol=0)


@pytest.mark.parametrize("use_bn,norm_last_layer", [(False, True), (True, False)])
def test_gradients_reach_every_trainable_parameter(use_bn, norm_last_layer):
    torch.manual_seed(0)
    backbone = vits.vit_tiny(patch_size=8, img_size=32, drop_path_rate=0.1).train()
    head = vits.DINOHead(192, 64, use_bn=use_bn, norm_last_layer=norm_last_layer, hidden_dim=96,
                         bottleneck_dim=32).train()
    x = torch.randn(3, 3, 32, 32)
    tokens = backbone.forward_tokens(x)  # (3, 17, 192)
    out = head(tokens)  # (3, 17, 64)
    target = torch.randn_like(out).softmax(-1)
    loss = -(target * F.log_softmax(out / 0.1, dim=-1)).sum(-1).mean()
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in list(backbone.named_parameters()) + list(head.named_parameters()):
        if p.requires_grad:
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert head.last_layer.weight_g.requires_grad == (not norm_last_layer)


def test_drop_path_identity_in_eval_and_stochastic_in_train():
    torch.manual_seed(0)
    drop = vits.DropPath(0.3)
    x = torch.randn(4000, 5, 6) + 3.0
    drop.eval()
    assert drop(x) is x
    drop.train()
    y = drop(x)
    kept = (y != 0).flatten(1).all(1)
    dropped = (y == 0).flatten(1).all(1)
    assert (kept | dropped).all()
    assert abs(dropped.float().mean().item() - 0.3) < 0.03
    torch.testing.assert_close(y[kept], x[kept] / 0.7)
    assert not torch.equal(drop(x), y)
    assert vits.DropPath(0.0).train()(x) is x


def test_drop_path_rate_schedule_and_block_behaviour():
    model = vits.vit_tiny(patch_size=8, img_size=32, drop_path_rate=0.2)
    rates = [blk.drop_path.drop_prob for blk in model.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2) and rates == sorted(rates)
    x = torch.randn(8, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.allclose(model(x), model(x))


@pytest.mark.skipif(not patch_wise_dino.cpp_compiler_available(), reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_blocks_share_one_graph_whatever_their_drop_path_rate():
    """--compile compiles each block: a graph per drop-path rate would exhaust dynamo's recompile limit on a
    12-block ViT and silently leave the deeper blocks uncompiled."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = vits.VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=4, num_heads=2,
                                   drop_path_rate=0.3).train()
    for block in model.blocks:
        block.compile()
    try:
        model.forward_tokens(torch.randn(2, 3, 32, 32)).sum().backward()
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert graphs == 2  # the first block (rate 0, identity) and all the others
