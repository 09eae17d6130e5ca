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


def last_real_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] index of the last 1 in each row of the mask: where a sequence's reward sits.

        last[b] = max { t : mask[b, t] = 1 }

    Found from the mask, never from token ids, so it is the same for right and left padding and
    correct when pad == EOS. A row without any 1 gives 0.
    """
    positions = torch.arange(attention_mask.size(-1), device=attention_mask.device)
    return (positions * (attention_mask != 0)).amax(dim=-1)


def pairwise_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                  margin: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Bradley-Terry preference loss, averaged over pairs.

        loss = -(1/B) * sum_b log sigmoid(r_c[b] - r_r[b] - margin)

    `logsigmoid` keeps it finite for large score gaps. A margin (scalar or per pair, as in Llama 2's
    reward model) asks the chosen score to win by at least that much.
    """
    return -F.logsigmoid(chosen_scores - rejected_scores - margin).mean()


def span_pairwise_loss(chosen_values: torch.Tensor, rejected_values: torch.Tensor,
                       chosen_mask: torch.Tensor, rejected_mask: torch.Tensor,
                       chosen_ids: torch.Tensor, rejected_ids: torch.Tensor) -> torch.Tensor:
    """DeepSpeed-Chat's per-token pairwise loss over the span where the two replies differ.

    Rows are right-padded (as PairCollator builds them), so both sequences of a pair start at t = 0.
    With l_c, l_r the last real index of each and e = max(l_c, l_r):

        d        = first t <= e where the ids differ or exactly one sequence has ended
                   (a prefix pair diverges at the shorter one's length; ids are never compared
                   with pad, so pad == EOS is safe); d = e when the pair is identical
        v~_x[t]  = v_x[min(t, l_x)]   (past its end a sequence keeps its end score: the values a
                                       model computes on pad positions mean nothing)
        loss_b   = mean_{t = d..e} -log sigmoid(v~_c[t] - v~_r[t])
        loss     = (1/B) * sum_b loss_b
    """
    positions = torch.arange(chosen_values.size(1), device=chosen_values.device).expand_as(chosen_values)
    last_c, last_r = last_real_token_index(chosen_mask), last_real_token_index(rejected_mask)
    end = torch.maximum(last_c, last_r).unsqueeze(1)
    differs = (chosen_ids != rejected_ids) | ((chosen_mask != 0) != (rejected_mask != 0))
    differs &= positions <= end
    first = torch.where(differs.any(dim=1), differs.int().argmax(dim=1), end.squeeze(1)).unsqueeze(1)
    span = (positions >= first) & (positions <= end)
    held_c = chosen_values.gather(1, torch.minimum(positions, last_c.unsqueeze(1)))
    held_r = rejected_values.gather(1, torch.minimum(positions, last_r.unsqueeze(1)))
    per_token = -F.logsigmoid(held_c - held_r)
    per_pair = (per_token * span).sum(dim=1) / span.sum(dim=1)
    return per_pair.mean()


def pairwise_accuracy(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Share of pairs ranked right: (1/B) * sum_b [r_c[b] > r_r[b]] (a tie counts as wrong)."""
    return (chosen_scores > rejected_scores).float().mean()
