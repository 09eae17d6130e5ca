"""Loss functions on hand-computed values."""
import math

import torch

from training.utils.losses import IGNORE_INDEX, causal_lm_loss, count_label_tokens


def test_causal_lm_loss_hand_computed():
    # vocab 2; position t predicts labels[t + 1]. Uniform logits give ln 2 per token; a logit gap of
    # ln 3 in favour of the label gives -ln(3/4).
    logits = torch.zeros(1, 4, 2)
    logits[0, 1, 1] = math.log(3.0)
    labels = torch.tensor([[IGNORE_INDEX, 0, 1, IGNORE_INDEX]])
    # labelled: position 0 -> label 0 (uniform: ln 2), position 1 -> label 1 (p = 3/4)
    expected = (math.log(2.0) - math.log(0.75)) / 2
    assert math.isclose(causal_lm_loss(logits, labels).item(), expected, rel_tol=1e-6)
    assert math.isclose(causal_lm_loss(logits, labels, reduction="sum").item(), 2 * expected, rel_tol=1e-6)
    assert count_label_tokens(labels) == 2


def test_fp32_loss_from_low_precision_logits():
    torch.manual_seed(0)
    logits = (torch.randn(2, 5, 11) * 4).to(torch.bfloat16)
    labels = torch.randint(0, 11, (2, 5))
    fp32 = causal_lm_loss(logits, labels, compute_fp32=True)
    assert fp32.dtype == torch.float32
    assert math.isclose(fp32.item(), causal_lm_loss(logits.float(), labels).item(), rel_tol=1e-6)
