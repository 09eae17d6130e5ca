"""Decoding steps' linear layers on AMX tiles, from a small C++ kernel (training/utils/csrc/amx_linear.cpp).

A decoding step multiplies a few rows (one new token per sequence: 8 in step 3) by every weight of the model: it is
bound by reading the weights, 42 MB a token for tiny/opt-20m. oneDNN's linear on its packed weights
(packed_linear.py) has a fixed cost of ~50 us a call and reads a weight at about half the speed the memory gives:
the 37 linear layers of one step of 8 rows took 5.2 ms on one Xeon core, where reading their bytes takes ~2.4 ms.
The kernel reads each weight once, front to back, in the order AMX's tile products consume it (laid out once per
block as [out / 64, in / 32, 4 blocks of 16 outputs, 16 pairs of inputs, 16 outputs x 2]), with the tiles ahead
prefetched, and accumulates in fp32 tile by tile along the input as oneDNN's AMX kernel does: the same outputs bit
for bit (a probe at first use checks this on the running torch and keeps oneDNN's linear for good if they differ).
Measured on one Xeon core: the 37 layers of a step of 8 rows 5.2 -> 2.4 ms; a [512, 512] layer 65 -> 10 us.

    layer = layer_forward(weight, bias, relu=False)  # lays the weight out (~1 ms per million weights)
    layer(x)                                         # x [..., in] with at most MAX_ROWS rows -> [..., out]

Used by packed_linear's inference forward for calls of at most MAX_ROWS rows (the layer is made at its first such
call in a block; a block without one, such as a scoring pass, never builds the kernel) on a bf16 weight whose out
width is a multiple of 64 and in width a multiple of 32, on a CPU with AMX-BF16 (and the AVX-512 native.py compiles
for), where the kernel built and Linux gives the process the tile state. RLHF_AMX_LINEAR_KERNEL=0 (or false / no /
off) turns it off.
"""
import functools

import torch

from training.utils import native, precision
from training.utils.distributed import print_rank_0
from training.utils.errors import env_switch

MAX_ROWS = 16  # rows a call may have: one pass over the weight per 16 rows pays off only for a few of them
AMX_FLAGS = ("-mamx-tile", "-mamx-bf16")
_OUT_MULTIPLE, _IN_MULTIPLE = 64, 32  # the kernel's blocks of outputs and inputs


@functools.cache
def _extension():
    return native.build("amx_linear", "the AMX linear kernel", "decoding steps use oneDNN's linear",
                        "RLHF_AMX_LINEAR_KERNEL", AMX_FLAGS)


def available() -> bool:
    """Whether the kernel may run here: the switch on, a CPU with AMX-BF16 and the kernels' AVX-512, the kernel
    built, the tile state granted, and its outputs oneDNN's (the probe)."""
    return (env_switch("RLHF_AMX_LINEAR_KERNEL") and precision.cpu_has_amx_bf16() and native.cpu_runs_avx512()
            and _extension() is not None and _extension().amx_ready() and _kernel_matches_onednn())


def fits(weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the kernel takes this layer's shape and dtypes."""
    return (weight.dim() == 2 and weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
            and weight.size(0) % _OUT_MULTIPLE == 0 and weight.size(1) % _IN_MULTIPLE == 0 and weight.numel() > 0
            and (bias is None or bias.dtype == torch.bfloat16))


def tile_layout(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] bf16 -> [out / 64, in / 32, 4, 16, 32]: for each block of 64 outputs and 32 inputs, four B tiles
    of 16 outputs, each 16 rows of input pairs (2i, 2i + 1) side by side for its 16 outputs (AMX's bf16 layout).
    A pair of bf16 values is moved as one int32, so this is a transpose of 16 x 16 blocks of pairs."""
    out_width, in_width = weight.shape
    weight = weight.detach().contiguous()
    if weight.storage_offset() % 2:  # a view at an odd place of a flat buffer (ZeRO's) cannot be read as pairs
        weight = weight.clone()
    pairs = weight.view(torch.int32)  # [out, in / 2]
    blocks = pairs.view(out_width // _OUT_MULTIPLE, 4, 16, in_width // _IN_MULTIPLE, 16)
    return blocks.permute(0, 3, 1, 4, 2).contiguous().view(torch.bfloat16)


def layer_forward(weight: torch.Tensor, bias: torch.Tensor | None, relu: bool = False):
    """x W^T + bias (ReLU'd when `relu`) for x [..., in] of at most MAX_ROWS rows, as a callable holding the weight
    laid out (tile_layout) and what every call needs (a decoding step calls each layer once a token); the weight must
    not change while it is in use."""
    kernel, out_width, tiles = _extension().amx_linear, weight.size(0), tile_layout(weight)
    bias = weight.new_empty(0) if bias is None else bias.detach().contiguous()

    def forward(x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.size(-1))
        out = kernel(rows if rows.is_contiguous() else rows.contiguous(), tiles, bias, relu)
        return out if x.dim() == 2 else out.view(*x.shape[:-1], out_width)
    return forward


@functools.cache
def _kernel_matches_onednn() -> bool:
    """Whether the kernel gives oneDNN's packed linear bit for bit here (probed once on random layers: rows 1 to
    MAX_ROWS, with and without bias and ReLU); one warning line, and never the kernel, where it does not."""
    generator = torch.Generator().manual_seed(0)
    ops = torch.ops.mkldnn
    try:
        for out_width, in_width, rows, with_bias, relu in ((128, 96, 8, True, False), (64, 64, 1, False, True),
                                                           (192, 32, 16, True, True), (64, 160, 5, False, False)):
            weight = (torch.randn(out_width, in_width, generator=generator) * 0.1).to(torch.bfloat16)
            bias = torch.randn(out_width, generator=generator).to(torch.bfloat16) if with_bias else None
            x = torch.randn(rows, in_width, generator=generator).to(torch.bfloat16)
            expected = ops._linear_pointwise(x, ops._reorder_linear_weight(weight, rows), bias,
                                             "relu" if relu else "none", [], "")
            got = _extension().amx_linear(x, tile_layout(weight), x.new_empty(0) if bias is None else bias, relu)
            if not torch.equal(got, expected):
                raise ValueError("its outputs differ from oneDNN's")
    except (RuntimeError, ValueError) as err:
        print_rank_0(f"warning: the AMX linear kernel is not used ({err}); decoding steps use oneDNN's linear")
        return False
    return True
