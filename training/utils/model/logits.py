"""Logits only where a loss reads them.

The LM head multiplies every position's hidden state by a [hidden x vocab] matrix: for SmolLM2-135M (49k tokens)
that is a fifth of the model's FLOPs, for a 150k-token vocabulary of a 0.5B model a quarter, and its [B, T, V] logits
(upcast to fp32 by the losses) are the largest activation of a step. SFT reads the reply tokens only, DPO the reply
tokens only, PPO's actor and reference the answer tokens only: the rest of the head's work is thrown away.

transformers' causal LMs take `logits_to_keep`: an int (the last n positions, every model that has the argument) or,
in models that slice through `transformers.modeling_utils.slice_logits_to_keep`, a boolean [B, T] mask whose True
positions come back flattened, [N, V] in row-major order. Models without either fall back to full logits, indexed
the same way, so callers never branch.
"""
import functools
import inspect

import torch

from training.utils.model import round_up
from training.utils.model.build import unwrap_model
from training.utils.model.last_layer import last_layer_from


@functools.cache
def _logits_to_keep_support(model_class: type) -> str | None:
    """'mask' (a boolean [B, T] tensor works), 'last' (only an int of last positions), or None (no argument)."""
    forward = model_class.forward
    if "logits_to_keep" not in inspect.signature(forward).parameters:
        return None
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):  # compiled or generated: assume the oldest behaviour
        return "last"
    return "mask" if "slice_logits_to_keep" in source else "last"


# On CPU the head's row count is rounded up to a multiple of this (more positions computed, their logits dropped):
# oneDNN compiles its kernels for every new row count (~6 ms for each of the head's three matmuls of a training step
# on a Xeon with AMX), and the number of positions a loss reads changes with every batch.
HEAD_ROWS_MULTIPLE = 64
ONEDNN_DTYPES = (torch.bfloat16, torch.float16)  # fp32 runs MKL's kernels, compiled once


def logits_at(model, keep: torch.Tensor, **inputs) -> torch.Tensor:
    """[N, V] logits at the True positions of `keep` [B, T] (N = keep.sum(), row-major order), from `model(**inputs)`
    with the LM head applied at those positions only when the model allows it (in bf16/fp16 on CPU at a few more,
    to a multiple of HEAD_ROWS_MULTIPLE rows, whose logits are dropped). Equal to `model(**inputs).logits[keep]`
    (to the rounding of a matmul over fewer rows)."""
    if _logits_to_keep_support(type(unwrap_model(model))) != "mask":
        return _selected(model(**inputs).logits, keep)
    head = unwrap_model(model).get_output_embeddings()
    if keep.device.type == "cpu" and getattr(head, "weight", None) is not None and head.weight.dtype in ONEDNN_DTYPES:
        rounded, kept = _rounded_up(keep)
        if kept is not None:
            return _selected(model(**inputs, logits_to_keep=rounded).logits, kept)
    return model(**inputs, logits_to_keep=keep).logits


def _selected(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """`logits[keep]` for a boolean `keep` over its leading dimensions, as an index_select: the same values, and a
    backward that adds rows into the gradient instead of a masked scatter (7.7-9.2 -> 3.0 ms for 726 of 768 rows of
    4,096 bf16 logits, one CPU thread)."""
    return logits.flatten(0, keep.dim() - 1).index_select(0, keep.flatten().nonzero().squeeze(1))


def _rounded_up(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`keep` with its first False positions turned True until it holds a multiple of HEAD_ROWS_MULTIPLE (or every
    position), and which of the rounded mask's positions `keep` had (None when nothing was added)."""
    count = int(keep.sum())
    target = min(round_up(count, HEAD_ROWS_MULTIPLE), keep.numel())
    if target == count:
        return keep, None
    flat = keep.flatten()
    rounded = flat.clone()
    rounded[(~flat).nonzero()[:target - count, 0]] = True
    return rounded.view_as(keep), flat[rounded]


def last_logits(model, count: int, **inputs) -> torch.Tensor:
    """[B, count, V] logits of the last `count` positions of every row, from `model(**inputs)` (its last layer
    computed after its attention at those positions only: model.last_layer)."""
    with last_layer_from(model, inputs["input_ids"].size(1) - count if "input_ids" in inputs else 0):
        if _logits_to_keep_support(type(unwrap_model(model))) is not None:
            return model(**inputs, logits_to_keep=count).logits
        return model(**inputs).logits[:, -count:]

