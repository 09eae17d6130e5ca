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

from training.utils.model.build import unwrap_model


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


def logits_at(model, keep: torch.Tensor, **inputs) -> torch.Tensor:
    """[N, V] logits at the True positions of `keep` [B, T] (N = keep.sum(), row-major order), from `model(**inputs)`
    with the LM head applied at those positions only when the model allows it. Equal to
    `model(**inputs).logits[keep]` (to the rounding of a matmul over fewer rows)."""
    if _logits_to_keep_support(type(unwrap_model(model))) == "mask":
        return model(**inputs, logits_to_keep=keep).logits
    return model(**inputs).logits[keep]


def last_logits(model, count: int, **inputs) -> torch.Tensor:
    """[B, count, V] logits of the last `count` positions of every row, from `model(**inputs)`."""
    if _logits_to_keep_support(type(unwrap_model(model))) is not None:
        return model(**inputs, logits_to_keep=count).logits
    return model(**inputs).logits[:, -count:]

