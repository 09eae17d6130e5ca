"""Inference passes of a bf16 model on CPU run its linear layers on weights reordered once for oneDNN.

`F.linear` on a bf16 CPU tensor calls oneDNN, which reorders (packs) the weight into its blocked layout on every
call. A pass without gradients (generation, step 3's scoring passes, evaluation) can pack each weight once and
call oneDNN's linear on the packed copy: the same kernel on the same layout, so the outputs are bitwise the same
(tests/test_packed_linear.py), with less memory traffic per call. Measured (tiny/opt-20m, one thread of an AMD EPYC
with avx512_bf16): the linear layers of one decoding step of 8 rows 8.9 -> 5.0 ms, of a 2,000-token forward 489 ->
384 ms when weights do not stay in cache; packing all of that model's weights takes ~30 ms.

    with packed_linears(model):        # a no-op where it does not apply
        output = model.generate(...)   # or any forward under torch.no_grad()

In OPT's decoder layers (ReLU MLPs) the ReLU runs inside fc1's oneDNN call (its post-op, the same values as
torch.relu after it): the layer's activation_fn is nn.Identity inside the block. A [3072, 2048] bf16 ReLU reads and
writes 12 MB (~1.7 ms on one Xeon core), ~1.5% of a step-3 PPO step over all its inference passes.

On a CPU with AMX, calls of a few rows (decoding steps) run the AMX kernel of model/amx_linear.py instead, on the
weight laid out for it at the layer's first such call in the block: the same outputs, bit for bit, twice as fast.

It applies to modules whose type is exactly `nn.Linear` with a materialised bf16 weight on CPU (a ZeRO-3
partitioned weight, LoRA layers, GPT-2's Conv1D and subclasses keep their own forward), and only while gradients
are off: a call with gradients on inside the block runs the plain `F.linear`. The packed copies hold one more
copy of those weights for the duration of the block; a frozen model's (a reference or reward model, whose weights
do not change) are kept with its layers and reused by its next blocks while each weight is unchanged. fp32 keeps
MKL's kernels (oneDNN's give different values there). RLHF_PACKED_WEIGHTS=0 (or false / no / off) turns it off.
"""
import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn

from training.utils.errors import env_switch
from training.utils.model import amx_linear


@functools.cache
def _kernels_match() -> bool:
    """Whether this torch has oneDNN's packed bf16 linear and it gives F.linear's values bit for bit (probed once
    on a small random layer)."""
    ops = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise")
            and hasattr(ops, "_reorder_linear_weight") and ops._is_mkldnn_bf16_supported()):
        return False
    generator = torch.Generator().manual_seed(0)
    weight, bias, x = (torch.randn(*shape, generator=generator).to(torch.bfloat16)
                       for shape in ((48, 32), (48,), (5, 32)))
    try:
        packed = ops._reorder_linear_weight(weight, 8)
        return (torch.equal(ops._linear_pointwise(x, packed, bias, "none", [], ""), F.linear(x, weight, bias))
                and torch.equal(ops._linear_pointwise(x, packed, bias, "relu", [], ""),
                                torch.relu(F.linear(x, weight, bias))))
    except RuntimeError:
        return False


def _packable(module: nn.Module) -> bool:
    if type(module) is not nn.Linear or "forward" in vars(module):
        return False
    weight = module.weight
    return weight.dim() == 2 and weight.numel() > 0 and weight.device.type == "cpu" and weight.dtype == torch.bfloat16


def _packed_weight(module: nn.Linear, rows_hint: int) -> torch.Tensor:
    """`module`'s weight reordered for oneDNN. A frozen weight's (a reference or reward model's) is kept on the module
    and reused while the weight is unchanged (same storage, no in-place write since: its version counter): one
    packed copy per frozen model for the run instead of a reorder of every weight at every pass (~16 ms a pass of
    tiny/opt-20m)."""
    weight = module.weight
    if weight.requires_grad:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows_hint)
    key = (weight.data_ptr(), weight._version, rows_hint)
    kept = vars(module).setdefault("_packed_weights", {})
    if key not in kept:
        kept.clear()  # (a changed weight's or another hint's copy is not kept beside it)
        kept[key] = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows_hint)
    return kept[key]


def _packed_forward(module: nn.Linear, rows_hint: int, relu: bool = False, amx=None):
    """`module`'s forward on its packed weight; `relu`: relu(linear(x)) (the layer's own ReLU is switched off);
    `amx`: the block's `amx_linear.available` (asked at the first call of at most amx_linear.MAX_ROWS rows, so a
    block without one never builds the kernel): such calls (decoding steps) run the AMX kernel where it applies."""
    packed = _packed_weight(module, rows_hint)
    bias = None if module.bias is None else module.bias.detach()
    few_rows = []  # the AMX kernel's layer (or None: oneDNN's), from the first call of few rows on
    few_rows_limit = amx_linear.MAX_ROWS * module.in_features  # (elements of an input of at most MAX_ROWS rows)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.dtype != torch.bfloat16:
            out = F.linear(x, module.weight, module.bias)
            return torch.relu(out) if relu else out
        if amx is not None and x.numel() <= few_rows_limit:
            if not few_rows:
                few_rows.append(amx_linear.layer_forward(module.weight, bias, relu)
                                if amx_linear.fits(module.weight, bias) and amx() else None)
            if few_rows[0] is not None:
                return few_rows[0](x)
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "relu" if relu else "none", [], "")
    return forward


def _relu_mlp_layers(modules: list[nn.Module], model: nn.Module) -> list[nn.Module]:
    """OPT decoder layers whose fc1 is among the packed `modules` and whose activation is exactly nn.ReLU (the
    layer applies it to fc1's output and nothing else)."""
    from transformers.models.opt.modeling_opt import OPTDecoderLayer

    packed = {id(module) for module in modules}
    return [layer for layer in model.modules() if type(layer) is OPTDecoderLayer
            and type(layer.activation_fn) is nn.ReLU and id(layer.fc1) in packed]


@contextlib.contextmanager
def packed_linears(model, rows_hint: int = 8):
    """Run `model`'s bf16 CPU linear layers on packed weights inside the block (see the module docstring); a
    `model` that is not an nn.Module (e.g. DPO's cached reference log-probs) is left alone.
    `rows_hint`: the rows per call oneDNN's layout is chosen for (the batch of a decoding step); any row count
    works. The weights must not change inside the block."""
    modules, relu_layers = [], []
    if isinstance(model, nn.Module) and env_switch("RLHF_PACKED_WEIGHTS") and _kernels_match():
        modules = [m for m in model.modules() if _packable(m)]
        relu_layers = _relu_mlp_layers(modules, model)
    amx = functools.cache(amx_linear.available)  # one answer per block, asked only by a call of few rows
    activations = [layer.activation_fn for layer in relu_layers]
    try:
        fused = {id(layer.fc1) for layer in relu_layers}
        for module in modules:
            module.forward = _packed_forward(module, rows_hint, relu=id(module) in fused, amx=amx)
        for layer in relu_layers:
            layer.activation_fn = nn.Identity()
        yield
    finally:
        for module in modules:
            vars(module).pop("forward", None)
        for layer, activation in zip(relu_layers, activations):
            layer.activation_fn = activation
