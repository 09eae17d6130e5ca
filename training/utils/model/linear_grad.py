"""bf16 linear layers on CPU compute their weight gradient from a contiguous transpose of the narrower operand.

The weight gradient of y = x W^T + b is dW = dy^T x, a product over the tokens, whose left operand is a transposed
view (dy^T, or x^T in the orientation [in, out]). oneDNN runs a bf16 product with a transposed left operand at about
half the speed of the same product on a contiguous one; copying the narrower of x and dy into its transposed layout
first (a strided copy of a [tokens, 512] bf16 matrix takes ~1.4 ms on one Xeon core) costs less than that. Measured
on one thread of a Xeon with AMX, 3072 tokens (a step-3 batch of 8 x 384):

    layer (in -> out)        autograd (transposed view)   narrower operand copied first
    512 -> 2048 (OPT fc1)    13.0 ms                      8.9 ms  (x^T copied, dW^T = x^T dy, then transposed)
    2048 -> 512 (OPT fc2)    12.4 ms                      8.0 ms  (dy^T copied, dW = dy^T x)
    512 -> 4096 (the head)   26.9 ms                      19.9 ms
    512 -> 512               2.6 ms                       2.8-3.0 ms (so square layers keep autograd's product)

Small products lose: the copies and the autograd Function's own cost outweigh the gain below ~2^30
multiply-adds (tokens x in x out; 1024 x 192 -> 768 took 1.2x as long, and tiny/opt's SFT in the README's main
command ran 14% slower), so only larger products take this path.

    install_lean_weight_grad()   # idempotent; F.linear then takes this path where it applies

It applies to `F.linear` calls (nn.Linear's forward and the LoRA layers go through it) with gradients on, a bf16 CPU
input and a bf16 2-D weight that needs a gradient, whose width in and out differ at least twofold and whose product
has at least MIN_PRODUCT multiply-adds; every other call goes to the F.linear that was installed before (torch's,
or DeepSpeed's). A ZeRO-3 partitioned weight keeps DeepSpeed's path. The input gradient (dy W) and the bias
gradient (dy summed over the tokens) are autograd's products. The weight gradient is the same sum of the same
products in another order of accumulation: it differs from autograd's in the last bits of bf16
(tests/test_linear_grad.py). RLHF_LEAN_WEIGHT_GRAD=0 (or false / no / off) leaves F.linear alone.
"""
import torch
import torch.nn.functional as F

from training.utils.errors import env_switch

_previous_linear = F.linear  # what F.linear was before install (replaced when something else installs its own)
MIN_PRODUCT = 2 ** 30  # multiply-adds (tokens x in x out) below which autograd's own product is faster


def transposed(matrix: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of the 2-D bf16 `matrix` transposed (copied as int16: torch's strided copy is ~25% faster
    for an integer type than for bf16)."""
    return matrix.view(torch.int16).t().contiguous().view(matrix.dtype)


def weight_gradient(grad_rows: torch.Tensor, input_rows: torch.Tensor) -> torch.Tensor:
    """dW = dy^T x ([out, in], contiguous) from dy [N, out] and x [N, in], transposing the narrower of the two
    first when one is at least twice as wide as the other."""
    width_out, width_in = grad_rows.size(1), input_rows.size(1)
    if width_out >= 2 * width_in:
        return transposed(transposed(input_rows) @ grad_rows)
    if width_in >= 2 * width_out:
        return transposed(grad_rows) @ input_rows
    return grad_rows.t() @ input_rows  # autograd's own product for this layout


class _LinearLeanWeightGrad(torch.autograd.Function):
    """F.linear whose backward computes the weight gradient with `weight_gradient`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _previous_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad
        grad_rows = grad.reshape(-1, grad.size(-1))
        grad_x = grad.matmul(weight) if needs_x else None
        grad_weight = weight_gradient(grad_rows, x.reshape(-1, x.size(-1))) if needs_weight else None
        grad_bias = grad_rows.sum(0) if ctx.has_bias and needs_bias else None
        return grad_x, grad_weight, grad_bias


def _applies(x, weight) -> bool:
    if not (torch.is_grad_enabled() and isinstance(weight, torch.Tensor) and weight.requires_grad
            and weight.dim() == 2 and weight.dtype == torch.bfloat16 and not hasattr(weight, "ds_id")
            and isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16 and x.device.type == "cpu"
            and x.dim() >= 2):
        return False
    wide, narrow = max(weight.shape), min(weight.shape)
    return wide >= 2 * narrow and x.numel() // max(x.size(-1), 1) * weight.numel() >= MIN_PRODUCT


def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear's signature and values; the lean weight gradient where it applies (see the module docstring)."""
    if _applies(input, weight):
        return _LinearLeanWeightGrad.apply(input, weight, bias)
    return _previous_linear(input, weight, bias)


def install_lean_weight_grad() -> bool:
    """Route F.linear through `linear`, or back to the one installed before under RLHF_LEAN_WEIGHT_GRAD=0; returns
    whether the lean path is installed."""
    global _previous_linear
    if F.linear is not linear:
        _previous_linear = F.linear
    installed = env_switch("RLHF_LEAN_WEIGHT_GRAD")
    F.linear = linear if installed else _previous_linear
    return installed
