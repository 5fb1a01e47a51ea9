"""Small building blocks shared by the decoder modules: norm factory, conv-norm-act, BN folding."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, Iterator, Literal, Optional, Sequence, Tuple, Type, Union

import torch
from timm.layers import LayerNorm2d
from torch import nn

from .sizes import resize
from .winograd import WinogradConv2d, winograd_conv3x3

NormName = Literal["layernorm", "groupnorm", "batchnorm", "none"]
NORM_NAMES: tuple[str, ...] = ("layernorm", "groupnorm", "batchnorm", "none")


def build_norm2d(norm: str, channels: int) -> nn.Module:
    """A norm layer for `[B, C, H, W]` maps.

    - ``"layernorm"``: LayerNorm over channels at every pixel. Independent of batch size and
      map size, so batch size 1 trains and a 1x1 pooled PPM map is fine. The default.
    - ``"groupnorm"``: GroupNorm with up to 32 groups of at least 8 channels (fewer groups where the
      channel count asks for it; one group below 16 channels), so any channel count works and a
      1x1 map still has several values per group.
    - ``"batchnorm"``: BatchNorm2d, as mmsegmentation and HuggingFace; needed to load their weights.
      It cannot train on a batch of one 1x1 map (the PPM's pool scale 1).
    - ``"none"``: identity (the conv before it then gets a bias).
    """
    if norm == "layernorm":
        return LayerNorm2d(channels)
    if norm == "groupnorm":
        return nn.GroupNorm(group_count(channels), channels)
    if norm == "batchnorm":
        return nn.BatchNorm2d(channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORM_NAMES)}")


def group_count(channels: int, max_groups: int = 32, min_group_size: int = 8) -> int:
    """Most groups (<= ``max_groups``) that divide ``channels`` with >= ``min_group_size`` channels each."""
    for groups in range(min(max_groups, channels // min_group_size), 1, -1):
        if channels % groups == 0:
            return groups
    return 1


class ConvNormAct(nn.Module):
    """Conv (no bias before a norm) -> norm -> activation: `[B, C_in, H, W] -> [B, C_out, H, W]`.

    Submodule names ``conv``/``norm`` map one to one onto mmsegmentation's ``conv``/``bn`` and
    HuggingFace's ``conv``/``batch_norm`` (see :mod:`upernet_vit.convert`).

    ``winograd=True`` makes a 3x3 conv a :class:`~upernet_vit.winograd.WinogradConv2d` (same weights, faster
    on CPU). ``forward`` also takes a list of maps, meaning their channel concat, which it never builds:
    a conv is linear in its input channels, so the weight is split per map and the partial convs summed.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        norm: str = "layernorm",
        act_layer: Type[nn.Module] = nn.ReLU,
        winograd: bool = False,
    ) -> None:
        super().__init__()
        bias = norm == "none"
        if winograd and kernel_size == 3:
            self.conv: nn.Conv2d = WinogradConv2d(in_channels, out_channels, bias=bias)
        else:
            self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
        self.norm = build_norm2d(norm, out_channels)
        # in place: the norm's backward needs its input, not its output, so this saves a map per layer
        self.act = act_layer(inplace=True) if act_layer is nn.ReLU else act_layer()

    def forward(
        self, x: Union[torch.Tensor, Sequence[torch.Tensor]], size: Optional[Sequence[int]] = None
    ) -> torch.Tensor:
        """``x [B, C_in, H, W]``, or maps ``[B, C_i, H, W]`` with ``sum(C_i) = C_in`` (concat order).

        With ``size=(H, W)`` the maps may have any sizes and are bilinearly resized to it first (see
        :func:`resize`); in training the resized maps are not kept for backward but recomputed there.
        """
        if isinstance(x, torch.Tensor):
            return self.act(self.norm(self.conv(x)))
        return self.act(self.norm(self._conv_concat(x, size)))

    def _conv_concat(self, parts: Sequence[torch.Tensor], size: Optional[Sequence[int]]) -> torch.Tensor:
        channels = [p.shape[1] for p in parts]
        if sum(channels) != self.conv.in_channels:
            raise ValueError(
                f"ConvNormAct expects maps whose channels sum to {self.conv.in_channels}, got {channels}"
            )
        if isinstance(self.conv, WinogradConv2d) and self.conv.use_winograd(parts[0], size):
            # concats per tile chunk; with a size, resizes inside and keeps only the given maps
            return winograd_conv3x3(parts, self.conv.weight, self.conv.bias, size=size)
        if size is None:
            return self._split_conv(parts)
        resized = [resize(p, size) for p in parts]
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():  # nothing saved / compile plans memory
            return self._split_conv(resized)
        with recompute_resizes(list(zip(parts, resized))):
            return self._split_conv(resized)

    def _split_conv(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        weights = self.conv.weight.split([p.shape[1] for p in parts], dim=1)
        out = self.conv._conv_forward(parts[0], weights[0], self.conv.bias)
        for part, weight in zip(parts[1:], weights[1:]):
            # in place is safe: no conv keeps its output for backward
            out = out.add_(self.conv._conv_forward(part, weight, None))
        return out


@contextmanager
def recompute_resizes(pairs: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Within the block, autograd keeps the small source of each ``(source, resize(source))`` pair instead
    of the resized map and redoes the resize in backward.

    The upsampled pyramid levels are among the largest tensors of the head (``[B, C, H/4, W/4]`` each)
    while bilinear upsampling is cheap, so recomputing them trades almost no time for memory.
    """
    def key(t: torch.Tensor) -> Tuple[Any, ...]:
        return t.data_ptr(), t.shape, t.stride(), t.dtype

    sources: Dict[Tuple[Any, ...], torch.Tensor] = {key(big): small for small, big in pairs if big is not small}
    size = pairs[0][1].shape[-2:]

    def pack(t: torch.Tensor) -> Any:
        small = sources.get(key(t))
        return t if small is None else ("resize", small)

    def unpack(saved: Any) -> torch.Tensor:
        if isinstance(saved, tuple):
            with torch.no_grad():
                return resize(saved[1], size)
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def fuse_conv_bn(module: nn.Module) -> None:
    """In place: every ``ConvNormAct`` with BatchNorm, and every (transposed) conv directly followed by a
    BatchNorm in an ``nn.Sequential``, becomes one conv with the BN folded in (eval statistics)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for child in module.modules():
        if isinstance(child, ConvNormAct) and isinstance(child.norm, nn.BatchNorm2d):
            child.conv = fuse_conv_bn_eval(child.conv, child.norm)
            child.norm = nn.Identity()
        elif isinstance(child, nn.Sequential):
            for i in range(len(child) - 1):
                conv, bn = child[i], child[i + 1]
                if isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)) and isinstance(bn, nn.BatchNorm2d):
                    child[i] = fuse_conv_bn_eval(conv, bn, transpose=isinstance(conv, nn.ConvTranspose2d))
                    child[i + 1] = nn.Identity()
