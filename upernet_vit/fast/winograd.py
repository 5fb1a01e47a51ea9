"""3x3 convolution by Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray, 2016), for CPU.

Why: the UperNet head is dominated by 3x3 convs at stride 4 (``fpn_bottleneck`` alone is ~70% of its
FLOPs). F(2x2, 3x3) computes each 2x2 output tile from a 4x4 input tile with 16 multiplies per
(input, output) channel pair instead of 36, so the GEMM work falls 2.25x. The result is the same
linear map as ``F.conv2d(x, w, padding=1)``; the transforms use only 0, +-1 and 1/2, so it is as
accurate as the direct conv in fp32 (in our measurements closer to an fp64 reference than oneDNN's).
cuDNN already picks Winograd itself, so on CUDA, under autocast or while compiling/exporting we leave
the conv to PyTorch (:meth:`WinogradConv2d.use_winograd`).

Per 4x4 input tile ``d`` and 3x3 filter ``g`` (one channel pair):

    U = G g G^T        [4, 4]   filter transform, once per forward
    V = B^T d B        [4, 4]   input transform, tiles overlap by 2 pixels
    Y = A^T (U * V) A  [2, 2]   output tile; the sum over input channels is inside ``U * V``

so for each of the 16 positions (k, l) the channel sum is one GEMM ``V[k,l] [tiles, C_in] @ U[k,l]
[C_in, C_out]``. Tiles are processed a few tile-rows at a time so the transformed tiles (4x the input)
stay in cache and no 4x-sized buffer is ever allocated. Backward runs the same machinery: the input
gradient is the forward conv with the flipped, channel-transposed filter, and the filter gradient is
``sum over tiles V^T @ (A dY A^T)`` mapped back with ``G^T . G``.

Several input maps stand for their channel concat, optionally each bilinearly resized to one size first
(the FPN bottleneck's upsampled levels): neither the concat nor, in backward, the resized maps are kept.
"""
from __future__ import annotations

from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..layers import resize


def resize_unless_same(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``layers.resize``, skipped when ``x`` already has ``size`` (eager only: this module never runs
    traced, where the size test would add a guard)."""
    return x if tuple(x.shape[-2:]) == tuple(size) else resize(x, size)

# rows of the transforms; applied below as explicit adds so no matmul runs over the tiles
G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
TILE_BYTES = 24 << 20  # transformed-tile bytes per chunk: fits the L2/L3 of a server CPU


def filter_transform(weight: torch.Tensor) -> torch.Tensor:
    """``weight [C_out, C_in, 3, 3]`` -> ``U [16, C_in, C_out]`` with ``U[4k+l] = (G g G^T)[k, l]``."""
    g = torch.tensor(G, dtype=weight.dtype, device=weight.device)
    u = torch.einsum("ki,ocij,lj->klco", g, weight, g)
    return u.reshape(16, weight.shape[1], weight.shape[0]).contiguous()


def filter_transform_adjoint(grad_u: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`filter_transform`: ``[16, C_in, C_out]`` -> ``[C_out, C_in, 3, 3]``."""
    g = torch.tensor(G, dtype=grad_u.dtype, device=grad_u.device)
    return torch.einsum("ki,klco,lj->ocij", g, grad_u.view(4, 4, *grad_u.shape[1:]), g)


def _bt(d0: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor, d3: torch.Tensor, out: torch.Tensor) -> None:
    """``out[k] = sum_i B^T[k, i] d_i`` with ``B^T = [[1,0,-1,0], [0,1,1,0], [0,-1,1,0], [0,1,0,-1]]``."""
    torch.sub(d0, d2, out=out[0])
    torch.add(d1, d2, out=out[1])
    torch.sub(d2, d1, out=out[2])
    torch.sub(d1, d3, out=out[3])


def _at(m: torch.Tensor, out0: torch.Tensor, out1: torch.Tensor) -> None:
    """``out_i = sum_k A^T[i, k] m[k]`` with ``A^T = [[1,1,1,0], [0,1,-1,-1]]``."""
    torch.add(m[0], m[1], out=out0).add_(m[2])
    torch.sub(m[1], m[2], out=out1).sub_(m[3])


def _a(g0: torch.Tensor, g1: torch.Tensor, out: torch.Tensor) -> None:
    """Adjoint of :func:`_at`: ``out[k] = sum_i A^T[i, k] g_i`` = ``(g0, g0 + g1, g0 - g1, -g1)``."""
    out[0].copy_(g0)
    torch.add(g0, g1, out=out[1])
    torch.sub(g0, g1, out=out[2])
    torch.neg(g1, out=out[3])


def _tile_rows(tiles_h: int, row_bytes: int) -> Iterator[Tuple[int, int]]:
    """``(first tile row, number of tile rows)`` chunks of about :data:`TILE_BYTES` transformed tiles."""
    step = max(1, min(tiles_h, TILE_BYTES // max(row_bytes, 1)))
    for start in range(0, tiles_h, step):
        yield start, min(step, tiles_h - start)


class _Tiler:
    """Tile transforms of ``[B, H, W, C_i]`` maps (channels-last views) taken as one map with their
    channels concatenated: the concat only ever exists for a chunk of tile rows, in a reused buffer."""

    def __init__(self, maps: Sequence[torch.Tensor]) -> None:
        self.maps = maps
        batch, self.height, self.width, _ = maps[0].shape
        self.channels = sum(m.shape[-1] for m in maps)
        self.tiles_h, self.tiles_w = (self.height + 1) // 2, (self.width + 1) // 2
        self.row_bytes = 16 * batch * self.tiles_w * self.channels * maps[0].element_size()
        rows = next(_tile_rows(self.tiles_h, self.row_bytes))[1]
        new = maps[0].new_empty
        self.padded = maps[0].new_zeros(batch, 2 * rows + 2, 2 * self.tiles_w + 2, self.channels)
        self.rows = new(4, batch, rows, 2 * self.tiles_w + 2, self.channels)
        self.tiles = new(4, 4, batch, rows, self.tiles_w, self.channels)

    def chunks(self) -> Iterator[Tuple[int, int]]:
        return _tile_rows(self.tiles_h, self.row_bytes)

    def transform(self, start: int, n: int) -> torch.Tensor:
        """``V = B^T d B`` for tile rows ``[start, start + n)`` -> ``[16, B * n * tiles_w, C]``."""
        # input rows 2*start-1 .. 2*(start+n) (inclusive); zero where they fall outside the map
        lo, hi = 2 * start - 1, 2 * (start + n) + 1
        src_lo, src_hi = max(lo, 0), min(hi, self.height)
        padded = self.padded[:, : 2 * n + 2]
        if lo < 0 or hi > self.height:
            padded.zero_()
        channel = 0
        for m in self.maps:
            c = m.shape[-1]
            padded[:, src_lo - lo : src_hi - lo, 1 : self.width + 1, channel : channel + c] = m[:, src_lo:src_hi]
            channel += c
        rows = self.rows[:, :, :n]
        _bt(*(padded[:, i : i + 2 * n - 1 : 2] for i in range(4)), out=rows)
        tiles = self.tiles[:, :, :, :n] if n < self.tiles.shape[3] else self.tiles
        for k in range(4):
            _bt(*(rows[k][:, :, j : j + 2 * self.tiles_w - 1 : 2] for j in range(4)), out=tiles[k])
        return tiles.reshape(16, -1, self.channels)


def _conv_nhwc(maps: Sequence[torch.Tensor], u: torch.Tensor) -> torch.Tensor:
    """Maps ``[B, H, W, C_i]`` (views), ``u [16, sum C_i, C_out]`` -> ``[B, C_out, H, W]`` channels_last:
    the 3x3 conv (stride 1, zero padding 1) of the maps' channel concat."""
    tiler = _Tiler(maps)
    batch, height, width, _ = maps[0].shape
    th, tw, c_out = tiler.tiles_h, tiler.tiles_w, u.shape[-1]
    out = torch.empty(
        batch, c_out, 2 * th, 2 * tw, dtype=u.dtype, device=u.device, memory_format=torch.channels_last
    )
    out_nhwc = out.permute(0, 2, 3, 1)
    for start, n in tiler.chunks():
        m = torch.bmm(tiler.transform(start, n), u).view(4, 4, batch, n, tw, c_out)
        half = m.new_empty(2, 4, batch, n, tw, c_out)  # A^T applied along the tile's rows
        _at(m, half[0], half[1])
        y = out_nhwc[:, 2 * start : 2 * (start + n)].view(batch, n, 2, tw, 2, c_out)
        for i in range(2):
            _at(half[i], y[:, :, i, :, 0], y[:, :, i, :, 1])
    if (2 * th, 2 * tw) != (height, width):  # odd H or W: drop the last half tile (a copy, not a view)
        out = out[:, :, :height, :width].contiguous(memory_format=torch.channels_last)
    return out


def _filter_grad_nhwc(x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """``dL/dU [16, C_in, C_out]`` from the input ``x [B, H, W, C_in]`` and ``grad_out [B, H, W, C_out]``."""
    tiler = _Tiler([x])
    batch, height, width, c_out = grad_out.shape
    tw = tiler.tiles_w
    grad_u = grad_out.new_zeros(16, tiler.channels, c_out)
    for start, n in tiler.chunks():
        v = tiler.transform(start, n)
        # dL/dM = A dY A^T per tile; dY is zero beyond the map (odd H or W)
        dy = grad_out.new_zeros(batch, 2 * n, 2 * tw, c_out)
        rows = grad_out[:, 2 * start : min(2 * (start + n), height)]
        dy[:, : rows.shape[1], :width] = rows
        dy = dy.view(batch, n, 2, tw, 2, c_out)
        half = dy.new_empty(4, batch, n, tw, 2, c_out)  # A applied along the tile's rows
        _a(dy[:, :, 0], dy[:, :, 1], half)
        grad_m = dy.new_empty(4, 4, batch, n, tw, c_out)
        for k in range(4):
            _a(half[k][:, :, :, 0], half[k][:, :, :, 1], grad_m[k])
        grad_u.baddbmm_(v.transpose(1, 2), grad_m.view(16, -1, c_out))
    return grad_u


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


class _Winograd3x3(torch.autograd.Function):
    """``conv3x3(cat([resize(x_i, size)]))``, keeping only the weight and the ``x_i`` for backward (as a
    direct conv keeps its input), not the tiles nor the resized maps. Backward handles one map at a
    time: redo its resize, take its slice of the filter gradient (which separates per input channel)
    and its input gradient, and pass that back through the resize; so neither all resized maps nor a
    ``[B, sum C_i, H, W]`` input gradient ever exist at once."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, size: Tuple[int, int], *xs: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.size = size
        ctx.save_for_backward(weight, *xs)
        return _conv_nhwc([_nhwc(resize_unless_same(x, size)) for x in xs], filter_transform(weight))

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:  # type: ignore[override]
        weight, *xs = ctx.saved_tensors
        grad_nhwc = _nhwc(grad_y)
        grad_w_parts: List[torch.Tensor] = []
        grad_xs: List[Optional[torch.Tensor]] = []
        start = 0
        for i, x in enumerate(xs):
            w_i = weight[:, start : start + x.shape[1]]
            start += x.shape[1]
            with torch.enable_grad():
                source = x.detach().requires_grad_(ctx.needs_input_grad[2 + i])
                big = resize_unless_same(source, ctx.size)
            if ctx.needs_input_grad[0]:
                grad_w_parts.append(filter_transform_adjoint(_filter_grad_nhwc(_nhwc(big.detach()), grad_nhwc)))
            grad_x = None
            if ctx.needs_input_grad[2 + i]:
                # the transpose of a 'same' 3x3 conv is the 'same' conv with the flipped, transposed filter
                grad_big = _conv_nhwc([grad_nhwc], filter_transform(w_i.flip(-2, -1).transpose(0, 1)))
                grad_x = grad_big if big is source else torch.autograd.grad(big, source, grad_big)[0]
            grad_xs.append(grad_x)
            del big, source
        grad_w = torch.cat(grad_w_parts, dim=1) if ctx.needs_input_grad[0] else None
        return (grad_w, None, *grad_xs)


def winograd_conv3x3(
    x: Union[torch.Tensor, Sequence[torch.Tensor]],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    size: Optional[Tuple[int, int]] = None,
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` by F(2x2, 3x3), differentiable in ``x`` and ``weight``.

    ``x [B, C_in, H, W]`` (any H, W >= 1; channels_last memory is fastest), or a list of maps
    ``[B, C_i, H, W]`` standing for their channel concat (never materialized), ``weight
    [C_out, C_in, 3, 3]`` -> ``[B, C_out, H, W]`` in channels_last memory.

    ``size=(H, W)``: the maps may have any sizes and stand for their bilinear resize to ``size`` (the
    FPN's upsampled levels); only the maps as given are kept for backward, which treats them one by one.
    """
    xs = [x] if isinstance(x, torch.Tensor) else list(x)
    shapes = [tuple(t.shape) for t in xs]
    if (
        any(
            t.ndim != 4 or t.shape[0] != xs[0].shape[0] or (size is None and t.shape[2:] != xs[0].shape[2:])
            for t in xs
        )
        or weight.ndim != 4
        or weight.shape[-2:] != (3, 3)
        or weight.shape[1] != sum(s[1] for s in shapes)
    ):
        raise ValueError(
            f"winograd_conv3x3 needs maps [B, C_i, H, W] of one batch and size (sizes may differ with size=) "
            f"with sum(C_i) = C_in and a weight [C_out, C_in, 3, 3]; got maps {shapes} and weight "
            f"{tuple(weight.shape)}"
        )
    target = (int(size[0]), int(size[1])) if size is not None else (xs[0].shape[-2], xs[0].shape[-1])
    y = _Winograd3x3.apply(weight, target, *xs)
    return y if bias is None else y + bias.view(1, -1, 1, 1)


class WinogradConv2d(nn.Conv2d):
    """An ``nn.Conv2d(C_in, C_out, 3, padding=1)`` (same parameters and state-dict keys) that runs
    :func:`winograd_conv3x3` where it pays off: CPU, fp32, no autocast, eager mode, and maps of at least
    ``min_size`` pixels (``min_size_train`` when autograd records: the backward's extra transforms only
    pay off on larger maps; both measured with ``benchmarks/head_vs_hf.py`` on a 2-core Xeon).
    Elsewhere it is the plain ``nn.Conv2d``, so CUDA keeps cuDNN (which picks Winograd itself), bf16
    keeps the autocast kernels, and compile/export see a normal conv.
    """

    min_size: int = 32 * 32
    min_size_train: int = 96 * 96

    @classmethod
    def convert(cls, conv: nn.Conv2d) -> "WinogradConv2d":
        """Make ``conv`` (a 3x3, stride 1, padding 1, ungrouped ``nn.Conv2d``) this class, in place."""
        if not (
            type(conv) in (nn.Conv2d, cls) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros"
        ):
            raise ValueError(f"WinogradConv2d replaces a 3x3, stride 1, padding 1, ungrouped conv; got {conv}")
        conv.__class__ = cls
        return conv  # type: ignore[return-value]

    def use_winograd(self, x: torch.Tensor, size: Optional[Sequence[int]] = None) -> bool:
        """For input ``x`` (or maps like ``x`` resized to ``size`` first)."""
        if (  # first: under compile/export a test on the (symbolic) size would add a guard
            torch.compiler.is_compiling()
            or torch.compiler.is_exporting()
            or torch.jit.is_tracing()
            or torch.jit.is_scripting()
        ):
            return False
        records = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        height, width = size if size is not None else x.shape[-2:]
        return (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and height * width >= (self.min_size_train if records else self.min_size)
            and not torch.is_autocast_enabled("cpu")
        )

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        # nn.Conv2d.forward calls this; fast.fpn.split_conv calls it with weight slices for a split concat
        if self.use_winograd(x):
            return winograd_conv3x3(x, weight, bias)
        return super()._conv_forward(x, weight, bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", winograd_min_size={self.min_size}/{self.min_size_train} (eval/train)"
