"""One decoding step's attention on CPU from a small C++ kernel (training/utils/csrc/decode_attention.cpp) instead of
SDPA.

A decoding step's attention reads every cached key and value of its row once to produce one vector per head: it is
bound by reading memory (8 rows x ~260 positions of tiny/opt-20m: ~4 MB a layer, a token). SDPA's flash kernel on
CPU reaches ~7 GB/s on that stream when the cache is cold, as it is in decoding (the step's weights pass through the
cache in between). The kernel here skips the padding positions, reads the keys and then the values of one head
with the positions ahead prefetched (16 rows), and keeps the scores and the weighted sum in fp32: one step of 8 x
(200 + 128) tokens of tiny/opt-20m decodes in 1.60 s against SDPA's 1.80 s (one Xeon core with AMX, alternated
runs). Its values are the attention's to bf16 rounding, not SDPA's bit for bit (the sums run in another order, and
SDPA rounds the softmax to bf16 before its product with the values), so a sampled token can come out differently
where two candidates were nearly tied.

It is built on first use (training/utils/native.py: ~25 s once per machine, then cached) and used by
model.lean_decode's one-token steps where sampling.decode_attention picks SDPA (a bf16 model on a CPU with
AMX-BF16, whose cores all have the AVX-512 the kernel is compiled for), for heads whose width is a multiple of 16 up
to 256 and layers without a sliding window. Elsewhere, or where the build fails (one warning line), SDPA as before.
RLHF_DECODE_ATTENTION_KERNEL=0 (or false / no / off) turns it off.
"""
import functools

import torch

from training.utils import native, precision
from training.utils.errors import env_switch


@functools.cache
def _extension():
    """The compiled kernel module, or None (with one warning line) where it cannot be built or loaded."""
    return native.build("decode_attention", "the decoding attention kernel", "decoding steps use SDPA",
                        "RLHF_DECODE_ATTENTION_KERNEL")


def kernel_applies(model) -> bool:
    """Whether `model`'s decoding steps may use the kernel: a bf16 model on CPU with SDPA as its attention (as
    sampling.decode_attention picks it on a CPU with AMX-BF16), heads a multiple of 16 wide up to 256, the switch on
    and the kernel built."""
    parameter = next(model.parameters(), None)
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    return (parameter is not None and parameter.dtype == torch.bfloat16 and parameter.device.type == "cpu"
            and model.config._attn_implementation == "sdpa" and head_dim % 16 == 0 and head_dim <= 256
            and env_switch("RLHF_DECODE_ATTENTION_KERNEL") and precision.cpu_has_amx_bf16()
            and native.cpu_runs_avx512() and _extension() is not None)


def kernel_attention(sdpa):
    """An attention function (transformers' signature) for one-token decoding steps that runs the kernel, and hands
    any other call (a sliding window, dropout, a non-boolean mask, several query positions) to `sdpa`."""

    def attention(module, query, key, value, mask, dropout=0.0, scaling=None, sliding_window=None, **kwargs):
        if (sliding_window is not None or dropout or mask is None or mask.dtype != torch.bool or mask.dim() != 4
                or mask.shape[1:3] != (1, 1) or query.size(2) != 1 or kwargs):
            return sdpa(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                        sliding_window=sliding_window, **kwargs)
        scale = query.size(-1) ** -0.5 if scaling is None else scaling
        return _extension().decode_attention(query.squeeze(2), key, value, mask[:, 0, 0], scale), None
    return attention
