"""Vision Transformer backbones, the DINO projection head, and the multi-crop wrapper that runs them.

Implements the ViT of Dosovitskiy et al. ("An Image is Worth 16x16 Words", ICLR 2021) in the
configuration of the official DINO checkpoints (Caron et al., "Emerging Properties in
Self-Supervised Vision Transformers", ICCV 2021): pre-norm blocks, qkv bias, LayerNorm eps 1e-6,
a learned [CLS] token and learned absolute position embeddings for a 224x224 grid that are
interpolated (bicubic) to the token grid of any input whose sides are multiples of the patch size.
Parameter names and shapes equal the official DINO state dicts, so their weights load strictly.

Deliberate differences from the DINO reference code:
- attention runs through `torch.nn.functional.scaled_dot_product_attention` (fused kernels); the
  weights are only materialised by `get_last_selfattention`;
- the weight-normalised last layer of `DINOHead` is implemented here with the same parameter names
  (`weight_g`, `weight_v`) instead of the deprecated `torch.nn.utils.weight_norm` hook, which also
  makes the head deep-copyable (the teacher is a copy of the student).
"""
import itertools
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def _init_linear_and_norm(module: nn.Module) -> None:
    """DINO initialisation: truncated normal (std .02) for Linear weights, zero biases, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def resize_pos_embed(pos_embed: torch.Tensor, old_grid: Tuple[int, int],
                     new_grid: Tuple[int, int]) -> torch.Tensor:
    """Bicubically resize the patch part of (1, 1+h*w, D) position embeddings to another token grid.

    Sampled as the DINO reference does, so that its weights give its features at every resolution: the
    scale factor per axis is (new + 0.1) / old (the 0.1 keeps the output size from rounding down), and
    interpolation samples source position (i + 0.5) / scale - 0.5, slightly off the exact ``size=``
    positions. The [CLS] embedding is kept; patches are row-major on both grids. Returns (1, 1+H*W, D).
    """
    cls_pos = pos_embed[:, :1]  # (1, 1, D)
    patch_pos = pos_embed[:, 1:].reshape(1, old_grid[0], old_grid[1], -1).permute(0, 3, 1, 2)  # (1, D, h, w)
    scale = tuple((new + 0.1) / old for new, old in zip(new_grid, old_grid))
    patch_pos = F.interpolate(patch_pos.float(), scale_factor=scale, mode="bicubic",
                              align_corners=False).to(pos_embed.dtype)  # (1, D, H, W)
    if tuple(patch_pos.shape[-2:]) != tuple(new_grid):
        raise ValueError(f"resizing position embeddings from {old_grid} to {new_grid} gave "
                         f"{tuple(patch_pos.shape[-2:])}")
    patch_pos = patch_pos.flatten(2).transpose(1, 2)  # (1, H*W, D)
    return torch.cat((cls_pos, patch_pos), dim=1)  # (1, 1+H*W, D)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch of a sample with probability `drop_prob`.

    Kept samples are rescaled by 1 / (1 - drop_prob) so the expectation is unchanged; identity in eval mode.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob
        # the rate as a tensor too: torch.compile then traces one graph for all blocks instead of one per rate
        self.register_buffer("keep_prob", torch.tensor(1.0 - drop_prob), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        mask_shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        mask = torch.rand(mask_shape, device=x.device).add_(self.keep_prob).floor_()  # (B, 1, 1): 1 w.p. keep
        return x * mask.div_(self.keep_prob).to(x.dtype)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    """Two-layer feed-forward network of a transformer block (Linear, GELU, Linear)."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.fc1(x)))  # (B, T, hidden)
        return self.drop(self.fc2(x))  # (B, T, D)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _qkv(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads)  # (B, T, 3, H, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, d)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self._qkv(x)
        dropout_p = self.attn_drop if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)  # (B, H, T, d)
        x = x.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.proj_drop(self.proj(x))

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax attention weights computed explicitly (no dropout): (B, H, T, T)."""
        q, k, _ = self._qkv(x)
        return torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)  # (B, H, T, T)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)), with stochastic depth."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))  # (B, T, D)
        return x + self.drop_path(self.mlp(self.norm2(x)))  # (B, T, D)


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: a strided convolution, flattened to tokens in row-major order."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class VisionTransformer(nn.Module):
    """ViT backbone returning the [CLS] output after the final norm (the classification head is Identity)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 norm_layer: Optional[Callable[[int], nn.Module]] = None) -> None:
        super().__init__()
        if patch_size < 1 or img_size < patch_size:
            raise ValueError(f"need 1 <= patch_size <= img_size, got patch_size={patch_size}, img_size={img_size}")
        if norm_layer is None:
            norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.embed_dim = self.num_features = embed_dim
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, rate, norm_layer)
            for rate in rates])
        self.norm = norm_layer(embed_dim)
        self.head = nn.Identity()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_linear_and_norm)

    def interpolate_pos_encoding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position embeddings for a grid_h x grid_w token grid: (1, 1+grid_h*grid_w, D)."""
        g = self.patch_embed.grid_size
        if grid_h == g and grid_w == g:
            return self.pos_embed
        return resize_pos_embed(self.pos_embed, (g, g), (grid_h, grid_w))

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch-embed an image batch (B, C, H, W), prepend [CLS], add position embeddings: (B, 1+N, D)."""
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected images of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        B, _, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}; "
                             f"resize or crop the input to multiples of {p}")
        x = self.patch_embed(x)  # (B, N, D)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)  # (B, 1+N, D)
        x = x + self.interpolate_pos_encoding(H // p, W // p)  # (B, 1+N, D)
        return self.pos_drop(x)

    def _run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prepare_tokens(x)  # (B, 1+N, D)
        for blk in self.blocks:
            x = blk(x)  # (B, 1+N, D)
        return x

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """All output tokens after the final norm, [CLS] first: (B, 1+N, D)."""
        return self.norm(self._run_blocks(x))  # (B, 1+N, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[CLS] output after the final norm: (B, D)."""
        cls = self._run_blocks(x)[:, 0]  # (B, D); LayerNorm is per token, so normalising [CLS] alone suffices
        return self.head(self.norm(cls))  # (B, D)

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights of the last block, all heads: (B, heads, 1+N, 1+N)."""
        x = self.prepare_tokens(x)  # (B, 1+N, D)
        for blk in self.blocks[:-1]:
            x = blk(x)  # (B, 1+N, D)
        last = self.blocks[-1]
        return last.attn.attention_weights(last.norm1(x))  # (B, H, 1+N, 1+N)

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> List[torch.Tensor]:
        """Outputs of the last `n` blocks, each passed through the final norm: n x (B, 1+N, D)."""
        if not 1 <= n <= len(self.blocks):
            raise ValueError(f"n must be in [1, {len(self.blocks)}], got {n}")
        x = self.prepare_tokens(x)  # (B, 1+N, D)
        outputs = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)  # (B, 1+N, D)
            if i >= len(self.blocks) - n:
                outputs.append(self.norm(x))  # (B, 1+N, D)
        return outputs


def vit_tiny(patch_size: int = 16, **kwargs) -> VisionTransformer:
    """ViT-Tiny: embed dim 192, 12 blocks, 3 heads."""
    return VisionTransformer(patch_size=patch_size, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4,
                             qkv_bias=True, **kwargs)


def vit_small(patch_size: int = 16, **kwargs) -> VisionTransformer:
    """ViT-Small: embed dim 384, 12 blocks, 6 heads."""
    return VisionTransformer(patch_size=patch_size, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4,
                             qkv_bias=True, **kwargs)


def vit_base(patch_size: int = 16, **kwargs) -> VisionTransformer:
    """ViT-Base: embed dim 768, 12 blocks, 12 heads."""
    return VisionTransformer(patch_size=patch_size, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4,
                             qkv_bias=True, **kwargs)


VIT_ARCHS: Dict[str, Callable[..., VisionTransformer]] = {
    "vit_tiny": vit_tiny,
    "vit_small": vit_small,
    "vit_base": vit_base,
}


class WeightNormLinear(nn.Module):
    """Bias-free Linear with weight = weight_g * weight_v / ||weight_v|| (row-wise norm).

    Same parameters and names as `torch.nn.utils.weight_norm(nn.Linear(in, out, bias=False))`, so
    official DINO heads load strictly; the gain starts at 1.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(nn.Linear(in_features, out_features, bias=False).weight.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight matrix: (out_features, in_features)."""
        return self.weight_v * (self.weight_g / torch.linalg.vector_norm(self.weight_v, dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)  # (..., out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class DINOHead(nn.Module):
    """DINO projection head: MLP to a bottleneck, L2 normalisation, weight-normalised prototype layer.

    Accepts inputs of shape (..., in_dim) and returns (..., out_dim).
    """

    def __init__(self, in_dim: int, out_dim: int, use_bn: bool = False, norm_last_layer: bool = True,
                 nlayers: int = 3, hidden_dim: int = 2048, bottleneck_dim: int = 256) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        self.use_bn = use_bn
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: List[nn.Module] = []
            dims = [in_dim] + [hidden_dim] * (nlayers - 1)
            for d_in, d_out in zip(dims[:-1], dims[1:]):
                layers.append(nn.Linear(d_in, d_out))
                if use_bn:
                    layers.append(nn.BatchNorm1d(d_out))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(_init_linear_and_norm)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.last_layer.weight_g.requires_grad = not norm_last_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead_shape = x.shape[:-1]
        if self.use_bn and x.dim() != 2:
            x = x.reshape(-1, x.shape[-1])  # (M, in_dim): BatchNorm1d needs 2-D input
        x = self.mlp(x)  # (..., bottleneck)
        x = F.normalize(x, dim=-1)  # (..., bottleneck)
        x = self.last_layer(x)  # (..., out_dim)
        return x.reshape(*lead_shape, x.shape[-1])  # (..., out_dim)


class MultiCropWrapper(nn.Module):
    """Backbone on crops of several resolutions (one pass per run of equal sizes), head on chosen rows.

    The backbone outputs of all views are laid out as one flat list of rows: view by view, image by
    image, token by token ([CLS] only unless ``all_tokens``), i.e. row ``start_v + b * T_v + t``.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def features(self, crops: Sequence[torch.Tensor], all_tokens: bool) -> torch.Tensor:
        """Backbone outputs of all views as flat rows: (sum_v B * T_v, D)."""
        outputs = []
        for _, group in itertools.groupby(crops, key=lambda c: tuple(c.shape[-2:])):
            x = torch.cat(list(group))  # (n*B, 3, H, W)
            out = self.backbone.forward_tokens(x) if all_tokens else self.backbone(x)[:, None]  # (n*B, T, D)
            outputs.append(out.flatten(0, 1))  # (n*B*T, D)
        return torch.cat(outputs)

    def forward(self, crops: Sequence[torch.Tensor], rows: Optional[torch.Tensor] = None,
                all_tokens: bool = False) -> torch.Tensor:
        feats = self.features(crops, all_tokens)  # (R, D)
        if rows is not None:
            feats = feats.index_select(0, rows)  # (S, D)
        return self.head(feats)  # (S, K)
