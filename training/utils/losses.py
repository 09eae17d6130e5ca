"""Loss functions as pure tensor functions (no DeepSpeed, no model), each with its math."""
import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, compute_fp32: bool = False,
                   reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over labelled positions.

        loss = -(1/N) * sum_{t: labels[t+1] != IGNORE} log p(labels[t+1] | x_<=t)

    `reduction="sum"` returns the sum (for token-weighted averages across batches and ranks).
    `compute_fp32` upcasts the logits first, so fp16/bf16 training keeps an accurate loss.
    """
    shifted_logits = logits[:, :-1, :]
    if compute_fp32:
        shifted_logits = shifted_logits.float()
    shifted_labels = labels[:, 1:]
    return F.cross_entropy(shifted_logits.reshape(-1, shifted_logits.size(-1)), shifted_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction=reduction)


def count_label_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
