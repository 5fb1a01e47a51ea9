"""Small re-implementations of the official forward passes, with the official key names.

For tests only: written from the official sources (facebookresearch/dinov2 ``vision_transformer.py``
``interpolate_pos_encoding`` and ``get_intermediate_layers``; facebookresearch/dinov3
``rope_position_encoding.py``, ``attention.py``, ``LinearKMaskedBias``; facebookresearch/mae
``util/pos_embed.py``; VisionFM/DINO ``interpolate_pos_encoding``). Their state dicts are what the
official checkpoint files hold, so saving them gives tiny files in the official layouts.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class MaskedBiasLinear(nn.Linear):
    """DINOv3 ``LinearKMaskedBias``: the bias is multiplied by a stored 0/1 ``bias_mask``."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__(dim_in, dim_out, bias=True)
        mask = torch.ones(dim_out)
        mask[dim_out // 3 : 2 * dim_out // 3] = 0  # the k part
        self.register_buffer("bias_mask", mask)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias * self.bias_mask)


def rope_rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, masked_bias: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = MaskedBiasLinear(dim, 3 * dim) if masked_bias else nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            sin, cos = rope
            prefix = n - sin.shape[-2]  # cls and storage tokens get no rotation
            q = torch.cat([q[:, :, :prefix], q[:, :, prefix:] * cos + rope_rotate_half(q[:, :, prefix:]) * sin], 2)
            k = torch.cat([k[:, :, :prefix], k[:, :, prefix:] * cos + rope_rotate_half(k[:, :, prefix:]) * sin], 2)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLUPacked(nn.Module):
    """DINOv2 giant: ``w12`` packs gate and value (gate first)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class SwiGLU(nn.Module):
    """DINOv3 plus/7B ``SwiGLUFFN``: ``w3(silu(w1 x) * w2 x)``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim, heads, mlp: nn.Module, eps: float, layerscale: bool, masked_bias: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, masked_bias)
        self.ls1 = LayerScale(dim) if layerscale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = mlp
        self.ls2 = LayerScale(dim) if layerscale else nn.Identity()

    def forward(self, x, rope=None):
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


class ReferenceViT(nn.Module):
    """``style``: ``dinov2`` (offset interpolation), ``dinov2_reg`` (size + antialias, 4 registers),
    ``mae`` (RETFound: size, no antialias, MAE decoder keys), ``visionfm`` (DINO offset rule, no
    LayerScale), ``dinov3`` (RoPE, 4 storage tokens, masked qkv bias)."""

    def __init__(self, style: str, dim: int, depth: int, heads: int, patch: int, img_size: int = 224,
                 mlp: str = "gelu", mae_offset_free: bool = True) -> None:
        super().__init__()
        self.style, self.patch = style, patch
        eps = 1e-5 if style == "dinov3" else 1e-6
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.n_prefix = 1
        if style == "dinov3":
            self.storage_tokens = nn.Parameter(torch.randn(1, 4, dim))
            self.mask_token = nn.Parameter(torch.zeros(1, dim))
            self.rope_embed = nn.Module()
            head_dim = dim // heads
            periods = 100.0 ** (2 * torch.arange(head_dim // 4) / (head_dim // 2))
            self.rope_embed.register_buffer("periods", periods.to(torch.bfloat16).float())  # as in the files
            self.n_prefix = 5
        else:
            grid = img_size // patch
            self.pos_embed = nn.Parameter(torch.randn(1, 1 + grid * grid, dim) * 0.5)
            if style in ("dinov2", "dinov2_reg"):
                self.mask_token = nn.Parameter(torch.zeros(1, dim))
            if style == "dinov2_reg":
                self.register_tokens = nn.Parameter(torch.randn(1, 4, dim))
                self.n_prefix = 5
        hidden = 4 * dim
        mlps = {
            "gelu": lambda: Mlp(dim, hidden),
            "swiglu_packed": lambda: SwiGLUPacked(dim, (int(hidden * 2 / 3) + 7) // 8 * 8),
            "swiglu": lambda: SwiGLU(dim, hidden),
        }
        layerscale = style in ("dinov2", "dinov2_reg", "dinov3")
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlps[mlp](), eps, layerscale, masked_bias=style == "dinov3") for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=eps)
        if style == "dinov3":
            self.local_cls_norm = nn.LayerNorm(dim, eps=eps)
        if style == "mae":  # decoder weights that the MAE files carry
            self.mask_token = nn.Parameter(torch.zeros(1, 1, 16))
            self.decoder_embed = nn.Linear(dim, 16)
            self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + (img_size // patch) ** 2, 16))
            self.decoder_norm = nn.LayerNorm(16)
            self.decoder_pred = nn.Linear(16, patch * patch * 3)
        with torch.no_grad():  # non-trivial values everywhere a wrong mapping could hide
            for name, p in self.named_parameters():
                if name.endswith("gamma") or (name.startswith("blocks") and "norm" in name) or name.startswith("norm."):
                    p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("weight") or name.endswith("gamma") else 0.0))
                elif name.endswith("bias"):
                    p.copy_(torch.randn_like(p) * 0.1)

    # -------------------------------------------------------------- positions
    def interpolate_pos(self, h: int, w: int) -> torch.Tensor:
        pos = self.pos_embed.float()
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        m = int(math.sqrt(patch_pos.shape[1]))
        if h == w == m:
            return pos
        grid = patch_pos.reshape(1, m, m, -1).permute(0, 3, 1, 2)
        if self.style in ("dinov2", "visionfm"):  # scale factor with +0.1 offset, no antialias
            grid = F.interpolate(grid, scale_factor=((h + 0.1) / m, (w + 0.1) / m), mode="bicubic")
        elif self.style == "dinov2_reg":
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=True)
        else:  # mae
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        assert grid.shape[-2:] == (h, w)
        return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1)

    def rope(self, h: int, w: int):
        coords_h = torch.arange(0.5, h, dtype=torch.float32) / h
        coords_w = torch.arange(0.5, w, dtype=torch.float32) / w
        coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)
        coords = 2.0 * coords - 1.0
        angles = 2 * math.pi * coords[:, :, None] / self.rope_embed.periods[None, None, :]
        angles = angles.flatten(1, 2).tile(2)
        return torch.sin(angles), torch.cos(angles)

    def tokens(self, x: torch.Tensor):
        b, _, H, W = x.shape
        h, w = H // self.patch, W // self.patch
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(b, -1, -1)
        if self.style == "dinov3":
            return torch.cat([cls + 0 * self.mask_token, self.storage_tokens.expand(b, -1, -1), x], 1), self.rope(h, w)
        x = torch.cat([cls, x], 1) + self.interpolate_pos(h, w)
        if self.style == "dinov2_reg":
            x = torch.cat([x[:, :1], self.register_tokens.expand(b, -1, -1), x[:, 1:]], 1)
        return x, None

    @torch.no_grad()
    def get_intermediate_layers(self, x: torch.Tensor, indices: Sequence[int]) -> List[torch.Tensor]:
        """Maps ``[B, D, H/p, W/p]`` after the given blocks, final norm applied (``norm=True``)."""
        b, _, H, W = x.shape
        tokens, rope = self.tokens(x)
        outputs = []
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, rope)
            if i in indices:
                outputs.append(self.norm(tokens))
        outputs = [o[:, self.n_prefix:] for o in outputs]
        return [o.reshape(b, H // self.patch, W // self.patch, -1).permute(0, 3, 1, 2) for o in outputs]
