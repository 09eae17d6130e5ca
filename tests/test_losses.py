"""Every loss and RL quantity of training/utils/losses.py on hand-computed values: the SFT loss, the reward
model's pairwise losses, DPO / IPO, and the PPO math (GAE, KL-penalised rewards, clipped policy and value
losses, masked statistics, log-probs and entropy, the truncation penalty).

PPO rows used throughout: an answer that ended with EOS before the last column, an answer truncated at the
length limit (all columns are actions), and an empty answer (no action at all).
"""
import math

import pytest
import torch

from training.utils.losses import (
    IGNORE_INDEX,
    apply_truncation_penalty,
    causal_lm_loss,
    count_label_tokens,
    dpo_loss,
    entropy_from_logits,
    gae_advantages_and_returns,
    gather_log_probs,
    kl_penalty_rewards,
    masked_mean,
    masked_whiten,
    pairwise_accuracy,
    pairwise_loss,
    policy_loss,
    span_pairwise_loss,
    value_loss,
)

EOS_ENDED, TRUNCATED, EMPTY = [1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]
EOS = 0  # the shipped tokenizer's EOS id; its pad is 1


# ---------------------------------------------------------------- step 1: SFT


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


# ---------------------------------------------------------------- step 2: reward model (pairwise)


def padded_pair(chosen: list[int], rejected: list[int], pad_id: int):
    """(chosen_ids, rejected_ids, chosen_mask, rejected_mask), right-padded together as PairCollator does."""
    length = max(len(chosen), len(rejected))
    ids = [row + [pad_id] * (length - len(row)) for row in (chosen, rejected)]
    mask = [[1] * len(row) + [0] * (length - len(row)) for row in (chosen, rejected)]
    ids, mask = torch.tensor(ids), torch.tensor(mask)
    return ids[:1], ids[1:], mask[:1], mask[1:]


def test_pairwise_loss_and_accuracy_hand_computed():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])
    assert math.isclose(pairwise_loss(chosen[:1], rejected[:1]).item(), math.log(1 + math.exp(-2)), rel_tol=1e-6)
    assert math.isclose(pairwise_loss(chosen[:1], rejected[:1], margin=1.0).item(), math.log(1 + math.exp(-1)),
                        rel_tol=1e-6)
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(2))) / 2
    assert math.isclose(pairwise_loss(chosen, rejected).item(), expected, rel_tol=1e-6)
    assert math.isclose(pairwise_loss(torch.tensor([1000.0]), torch.tensor([0.0])).item(), 0.0, abs_tol=1e-6)
    assert pairwise_accuracy(torch.tensor([2.0, 0.0, 1.0, 1.0]), torch.tensor([0.0, 2.0, 0.5, 1.0])).item() == 0.5


def neg_log_sigmoid(x: float) -> float:
    return math.log(1 + math.exp(-x))


def test_span_pairwise_loss_hand_computed():
    # chosen  7 8 9  10 EOS      (5 real)   values .5 .5 1 2 3
    # rejected 7 8 11 EOS pad    (4 real)   values .5 .5 0 1 99 (99 sits on pad: must not be used)
    # divergence at t=2, span t=2..4; past its end the rejected row keeps its end value 1.
    chosen_ids, rejected_ids, chosen_mask, rejected_mask = padded_pair([7, 8, 9, 10, EOS], [7, 8, 11, EOS], pad_id=1)
    chosen_values = torch.tensor([[0.5, 0.5, 1.0, 2.0, 3.0]])
    rejected_values = torch.tensor([[0.5, 0.5, 0.0, 1.0, 99.0]])
    loss = span_pairwise_loss(chosen_values, rejected_values, chosen_mask, rejected_mask, chosen_ids, rejected_ids)
    assert math.isclose(loss.item(), (neg_log_sigmoid(1.0) * 2 + neg_log_sigmoid(2.0)) / 3, rel_tol=1e-6)


def test_span_pairwise_loss_prefix_pair_with_pad_equal_to_eos():
    # rejected (7 8 9) is a prefix of chosen (7 8 9 EOS) and pad == EOS: the ids agree everywhere, the
    # pair diverges where the rejected row ends (t=3), and the rejected row is held at its value at t=2.
    chosen_ids, rejected_ids, chosen_mask, rejected_mask = padded_pair([7, 8, 9, EOS], [7, 8, 9], pad_id=EOS)
    assert torch.equal(chosen_ids, rejected_ids)
    chosen_values = torch.tensor([[0.0, 0.0, 0.0, 3.0]])
    rejected_values = torch.tensor([[0.0, 0.0, 1.0, -50.0]])
    loss = span_pairwise_loss(chosen_values, rejected_values, chosen_mask, rejected_mask, chosen_ids, rejected_ids)
    assert math.isclose(loss.item(), neg_log_sigmoid(2.0), rel_tol=1e-6)
    # an identical pair is scored at its last token only: equal values give log 2
    same = span_pairwise_loss(chosen_values, chosen_values, chosen_mask, chosen_mask, chosen_ids, chosen_ids)
    assert math.isclose(same.item(), math.log(2.0), rel_tol=1e-6)


# ---------------------------------------------------------------- step 2: DPO / IPO


def test_dpo_losses_on_hand_computed_log_probs():
    # pair 1: chosen log-ratio +1, rejected -1 -> h = 2; pair 2: chosen -2, rejected +1 -> h = -3
    policy_chosen, policy_rejected = torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -1.0])
    ref_chosen, ref_rejected = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])
    beta = 0.5  # beta * h = 1 and -1.5

    losses, chosen, rejected = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    # -log sigmoid(x) = log(1 + e^-x)
    assert torch.allclose(losses, torch.tensor([math.log1p(math.exp(-1.0)), math.log1p(math.exp(1.5))]))
    assert torch.allclose(losses, torch.tensor([0.3132617, 1.7014132]))
    assert torch.equal(chosen, torch.tensor([0.5, -1.0])) and torch.equal(rejected, torch.tensor([-0.5, 0.5]))

    smoothed, _, _ = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, label_smoothing=0.1)
    # 0.9 * -log sigmoid(1) + 0.1 * -log sigmoid(-1) = 0.9 * 0.3132617 + 0.1 * 1.3132617
    assert smoothed[0].item() == pytest.approx(0.4132617, abs=1e-6)
    assert smoothed[1].item() == pytest.approx(0.9 * 1.7014132 + 0.1 * 0.2014132, abs=1e-6)

    ipo, chosen_ipo, _ = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss_type="ipo")
    # (h - 1 / (2 beta))^2 with 1 / (2 beta) = 1
    assert torch.equal(ipo, torch.tensor([1.0, 16.0])) and torch.equal(chosen_ipo, chosen)


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    policy_chosen = torch.tensor([-5.0], requires_grad=True)
    policy_rejected = torch.tensor([-5.0], requires_grad=True)
    losses, chosen, _ = dpo_loss(policy_chosen, policy_rejected, torch.tensor([-5.0]), torch.tensor([-5.0]), 0.1)
    losses.sum().backward()
    # d/dh -log sigmoid(beta h) at h = 0 is -beta / 2
    assert policy_chosen.grad.item() == pytest.approx(-0.05) and policy_rejected.grad.item() == pytest.approx(0.05)
    assert not chosen.requires_grad  # rewards are reported, never trained on
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(policy_chosen, policy_rejected, policy_chosen, policy_rejected, 0.1, loss_type="hinge")


# ---------------------------------------------------------------- step 3: PPO


def close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=1e-5, rtol=1e-5)


def test_gae_stops_at_each_rows_end():
    gamma, lam = 0.9, 0.8
    mask = torch.tensor([EOS_ENDED, TRUNCATED, EMPTY])
    # Past the end of row 0 (and everywhere in row 2) the reward and value are garbage: none may leak in.
    rewards = torch.tensor([[0.1, -0.2, 1.0, 50.0], [0.0, 0.0, 0.0, 2.0], [7.0, 7.0, 7.0, 7.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 100.0], [1.0, 1.0, 1.0, 1.0], [9.0, 9.0, 9.0, 9.0]])
    advantages, returns = gae_advantages_and_returns(rewards, values, mask, gamma, lam)
    # row 0, backwards from its EOS at t = 2:
    #   A2 = r2 - V2 = 0.7                                 (the last action: no bootstrap from t = 3)
    #   A1 = (-0.2 + 0.9 * 0.3 - 0.4) + 0.72 * 0.7   = -0.33 + 0.504   = 0.174
    #   A0 = (0.1 + 0.9 * 0.4 - 0.5) + 0.72 * 0.174  = -0.04 + 0.12528 = 0.08528
    # row 1 (truncated): A3 = 2 - 1 = 1, then delta = 0.9 - 1 = -0.1 each step:
    #   A2 = -0.1 + 0.72 * 1 = 0.62, A1 = -0.1 + 0.72 * 0.62 = 0.3464, A0 = -0.1 + 0.72 * 0.3464 = 0.149408
    close(advantages, [[0.08528, 0.174, 0.7, 0.0], [0.149408, 0.3464, 0.62, 1.0], [0.0] * 4])
    close(returns, [[0.58528, 0.574, 1.0, 0.0], [1.149408, 1.3464, 1.62, 2.0], [0.0] * 4])
    assert advantages[0, 2].item() == pytest.approx(rewards[0, 2].item() - values[0, 2].item())


def test_kl_penalty_rewards_put_the_clipped_score_on_the_last_action():
    mask = torch.tensor([EOS_ENDED, EMPTY, TRUNCATED])
    ref_log_probs = torch.full((3, 4), -2.0)
    log_probs = ref_log_probs + torch.tensor([[0.2, -0.1, 0.4, 9.0], [1.0, 1.0, 1.0, 1.0], [0.1, 0.0, 0.0, 0.2]])
    end_scores = torch.tensor([3.0, 7.0, -1.5])
    rewards, kl = kl_penalty_rewards(log_probs, ref_log_probs, mask, end_scores, kl_coef=0.5, clip_reward_value=2.0)
    close(kl, [[0.2, -0.1, 0.4, 0.0], [0.0] * 4, [0.1, 0.0, 0.0, 0.2]])
    # row 0: score 3 clipped to 2 lands on its EOS (t = 2); row 1 gets nothing; row 2: -1.5 at t = 3.
    close(rewards, [[-0.1, 0.05, -0.2 + 2.0, 0.0], [0.0] * 4, [-0.05, 0.0, 0.0, -0.1 - 1.5]])


def test_kl_penalty_rewards_ignore_prompt_padding():
    # The same two answers behind prompts left-padded to 2 and to 5 columns: only the action region
    # (the columns after the prompt) is passed in, so the prompt layout cannot move the reward.
    torch.manual_seed(0)
    answer_log_probs, answer_ref = torch.randn(2, 4), torch.randn(2, 4)
    mask = torch.tensor([EOS_ENDED, TRUNCATED])
    scores = torch.tensor([0.7, -0.3])
    results = []
    for prompt_width in (2, 5):
        full_log_probs = torch.cat([torch.randn(2, prompt_width), answer_log_probs], dim=1)
        full_ref = torch.cat([torch.randn(2, prompt_width), answer_ref], dim=1)
        results.append(kl_penalty_rewards(full_log_probs[:, prompt_width:], full_ref[:, prompt_width:], mask,
                                          scores, kl_coef=0.1, clip_reward_value=5.0)[0])
    torch.testing.assert_close(results[0], results[1])
    assert results[0][0, 2] - (-0.1 * (answer_log_probs[0, 2] - answer_ref[0, 2])) == pytest.approx(0.7)


def test_masked_statistics_ignore_masked_entries():
    x = torch.tensor([[1.0, 2.0, 3.0, 1000.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.0)
    close(masked_mean(torch.tensor([[1.0, 3.0], [5.0, 9.0]]), torch.tensor([[1, 1], [0, 0]]), dim=1), [2.0, 0.0])
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0
    # mean 2, population variance 2/3 over the three real entries
    scale = 1 / math.sqrt(2 / 3)
    close(masked_whiten(x, mask), [[-scale, 0.0, scale, 0.0]])
    close(masked_whiten(x, mask, shift_mean=False), [[2 - scale, 2.0, 2 + scale, 0.0]])


def test_policy_loss_clips_both_sides():
    ratios = torch.tensor([[1.5, 0.5, 1.1, 0.7, 3.0]])
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    old_log_probs = torch.full((1, 5), -1.0)
    log_probs = (old_log_probs + ratios.log()).requires_grad_()
    loss, stats = policy_loss(log_probs, old_log_probs, advantages, mask, cliprange=0.2)
    # max(-A r, -A clip(r, 0.8, 1.2)) per action:
    #   r 1.5, A  1: max(-1.5, -1.2) = -1.2  (clipped above)   r 0.5, A  1: max(-0.5, -0.8) = -0.5
    #   r 1.1, A -1: max( 1.1,  1.1) =  1.1                    r 0.7, A -1: max( 0.7,  0.8) =  0.8 (clipped below)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1 + 0.8) / 4)
    assert stats["clip_fraction"].item() == pytest.approx(0.5)
    k3 = [(r - 1) - math.log(r) for r in (1.5, 0.5, 1.1, 0.7)]
    assert stats["approx_kl"].item() == pytest.approx(sum(k3) / 4, rel=1e-5)
    loss.backward()
    # d loss / d log pi = -A * r / 4 where the unclipped term is chosen, 0 where the clip holds or masked.
    close(log_probs.grad, [[0.0, -0.5 / 4, 1.1 / 4, 0.0, 0.0]])


def test_value_loss_clips_both_sides():
    values = torch.tensor([[1.0, 1.0, 0.0, 0.0, 10.0]])
    old_values = torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.0]])
    returns = torch.tensor([[2.0, 0.0, -1.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    # V clipped into [0.3, 0.7]; per action max((V - R)^2, (V_clip - R)^2):
    #   (1 - 2)^2 = 1 vs (0.7 - 2)^2 = 1.69 -> 1.69     (1 - 0)^2 = 1 vs 0.7^2 = 0.49 -> 1
    #   (0 + 1)^2 = 1 vs (0.3 + 1)^2 = 1.69 -> 1.69     (0 - 1)^2 = 1 vs (0.3 - 1)^2 = 0.49 -> 1
    loss = value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1 + 1.69 + 1) / 4)


def test_log_probs_and_entropy():
    torch.manual_seed(0)
    logits, labels = torch.randn(3, 5, 11) * 3, torch.randint(0, 11, (3, 5))
    expected = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(gather_log_probs(logits, labels), expected)
    low = logits.to(torch.bfloat16)
    from_low = gather_log_probs(low, labels)
    assert from_low.dtype == torch.float32
    torch.testing.assert_close(from_low, gather_log_probs(low.float(), labels))

    close(entropy_from_logits(torch.zeros(2, 3, 7)), [[math.log(7)] * 3] * 2)
    probs = torch.softmax(logits, dim=-1)
    torch.testing.assert_close(entropy_from_logits(logits), -(probs * probs.log()).sum(-1))


def test_truncation_penalty_only_hits_answers_without_eos():
    scores = apply_truncation_penalty(torch.tensor([1.0, 2.0]), torch.tensor([True, False]), penalty=-0.5)
    close(scores, [1.0, 1.5])
