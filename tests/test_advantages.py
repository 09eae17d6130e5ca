"""The critic-free RL math of training/utils/losses.py on hand-computed values: the group / batch advantage
estimators (GRPO, Dr. GRPO, RLOO, REINFORCE++, REINFORCE++-baseline, ReMax), returns-to-go, the k1/k2/k3 KL
estimators, the three loss aggregation modes, the asymmetric (clip-higher) PPO clip and DAPO's equal-group filter.

The batch used throughout: two prompts with group size 4; the first group's samples scored 1, 0, 0, 1, the
second group's all 0.5 (all equal: no signal).
"""
import math

import pytest
import torch

from training.utils.losses import (
    ADVANTAGE_ESTIMATORS,
    GROUP_BASELINE_ESTIMATORS,
    aggregate_token_loss,
    clipped_policy_loss_tokens,
    discounted_token_returns,
    equal_reward_groups,
    gae_advantages_and_returns,
    group_advantages,
    kl_estimate,
    masked_mean,
    policy_loss,
    token_advantages,
)

SCORES = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
G = 4
SQRT2 = math.sqrt(2.0)


def close(actual: torch.Tensor, expected: list, atol: float = 1e-5) -> bool:
    return torch.allclose(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol)


# ---------------------------------------------------------------- group / batch advantages


def test_grpo_divides_by_the_sample_std_of_the_group():
    # group 1: mean 0.5, deviations +-0.5; sample variance = 4 * 0.25 / (4 - 1) = 1/3, std = 0.57735
    #          A = 0.5 / 0.57735 = sqrt(3)/2 = 0.866025
    # group 2: all 0.5: deviations 0, std 0 -> 0 / (0 + eps) = 0
    a = math.sqrt(3.0) / 2
    assert close(group_advantages(SCORES, G, "grpo"), [a, -a, -a, a, 0, 0, 0, 0])


def test_dr_grpo_only_subtracts_the_group_mean():
    # group 1: r - 0.5; group 2: 0.5 - 0.5
    assert close(group_advantages(SCORES, G, "dr_grpo"), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])


def test_rloo_subtracts_the_mean_of_the_other_samples():
    # r_0 = 1, the others 0, 0, 1: mean 1/3 -> 2/3;  r_1 = 0, the others 1, 0, 1: mean 2/3 -> -2/3
    # = G/(G-1) * (r - mean_g) = 4/3 * +-0.5
    assert close(group_advantages(SCORES, G, "rloo"), [2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0])


def test_reinforce_plus_plus_whitens_over_the_batch():
    # batch mean = (1 + 1 + 4 * 0.5) / 8 = 0.5; deviations +-0.5 (group 1), 0 (group 2)
    # population variance = 4 * 0.25 / 8 = 0.125, std = 0.353553 -> 0.5 / 0.353553 = sqrt(2)
    assert close(group_advantages(SCORES, G, "reinforce_plus_plus"), [SQRT2, -SQRT2, -SQRT2, SQRT2, 0, 0, 0, 0])
    # the groups do not matter: any group size gives the same
    assert close(group_advantages(SCORES, 1, "reinforce_plus_plus"), [SQRT2, -SQRT2, -SQRT2, SQRT2, 0, 0, 0, 0])


def test_reinforce_plus_plus_baseline_removes_each_groups_offset_first():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # group 2 now all 2
    # plain REINFORCE++: batch mean (2 + 8) / 8 = 1.25; deviations -0.25, -1.25 (x2), -0.25, 0.75 (x4)
    # population variance = (2 * 0.0625 + 2 * 1.5625 + 4 * 0.5625) / 8 = 5.5 / 8 = 0.6875, std = 0.829156
    std = math.sqrt(0.6875)
    expected = [-0.25 / std, -1.25 / std, -1.25 / std, -0.25 / std] + [0.75 / std] * 4
    assert close(group_advantages(scores, G, "reinforce_plus_plus"), expected)
    # with the group baseline: centred = +-0.5 (group 1), 0 (group 2); mean 0, population std sqrt(0.125)
    # -> +-0.5 / 0.353553 = +-sqrt(2): the constant group gets no advantage
    assert close(group_advantages(scores, G, "reinforce_plus_plus_baseline"),
                 [SQRT2, -SQRT2, -SQRT2, SQRT2, 0, 0, 0, 0])


def test_remax_subtracts_the_greedy_replys_score():
    greedy = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.5, 0.5])
    # [1-1, 0-1, 0-0, 1-0, 0.5-0, 0.5-1, 0.5-0.5, 0.5-0.5]
    expected = [0, -1, 0, 1, 0.5, -0.5, 0, 0]
    assert close(group_advantages(SCORES, G, "remax", baseline_scores=greedy), expected)
    assert close(group_advantages(SCORES, 1, "remax", baseline_scores=greedy), expected)  # one sample per prompt


def test_integer_scores_are_taken_as_floats():
    assert close(group_advantages(torch.tensor([1, 0, 0, 1]), 4, "dr_grpo"), [0.5, -0.5, -0.5, 0.5])


@pytest.mark.parametrize("estimator", GROUP_BASELINE_ESTIMATORS)
def test_an_all_equal_group_gets_zero_advantage(estimator):
    # (the equal group alone: batch whitening of all zeros stays zero)
    assert close(group_advantages(torch.full((4,), 0.7), 4, estimator), [0.0] * 4)


def test_bad_estimator_arguments_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="not whole groups of group_size=4"):
        group_advantages(SCORES[:6], 4, "grpo")  # 6 rows, groups of 4
    for estimator in GROUP_BASELINE_ESTIMATORS:
        with pytest.raises(ValueError, match="group_size must be at least 2"):
            group_advantages(SCORES, 1, estimator)
    with pytest.raises(ValueError, match="remax' needs baseline_scores"):
        group_advantages(SCORES, G, "remax")
    with pytest.raises(ValueError, match="remax' needs baseline_scores"):
        group_advantages(SCORES, G, "remax", baseline_scores=torch.zeros(4))  # wrong shape
    with pytest.raises(ValueError, match="gae_advantages_and_returns"):
        group_advantages(SCORES, G, "gae")
    with pytest.raises(ValueError, match="estimator must be one of"):
        group_advantages(SCORES, G, "group_norm")
    with pytest.raises(ValueError, match=r"one number per sequence \(\[B\]\)"):
        group_advantages(SCORES.view(2, 4), G, "grpo")
    assert ADVANTAGE_ESTIMATORS[0] == "gae" and len(set(ADVANTAGE_ESTIMATORS)) == 7


def test_token_advantages_broadcast_over_the_actions_only():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    assert close(token_advantages(torch.tensor([2.0, -1.0, 3.0]), mask), [[2, 2, 0], [-1, 0, 0], [0, 0, 0]])


# ---------------------------------------------------------------- returns-to-go (REINFORCE++ with per-token KL)


def test_discounted_returns_stop_at_each_rows_end():
    rewards = torch.tensor([[0.1, -0.2, 1.0, 9.0],  # 9.0 sits past the end: it must not leak in
                            [0.5, 0.5, 0.5, 0.5],
                            [3.0, 3.0, 3.0, 3.0]])  # an empty answer
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    # gamma = 0.5. row 0: G2 = 1.0; G1 = -0.2 + 0.5 * 1.0 = 0.3; G0 = 0.1 + 0.5 * 0.3 = 0.25; G3 = 0 (masked)
    # row 1: G3 = 0.5; G2 = 0.5 + 0.25 = 0.75; G1 = 0.5 + 0.375 = 0.875; G0 = 0.5 + 0.4375 = 0.9375
    expected = [[0.25, 0.3, 1.0, 0.0], [0.9375, 0.875, 0.75, 0.5], [0, 0, 0, 0]]
    assert close(discounted_token_returns(rewards, mask, gamma=0.5), expected)
    # gamma = 1: suffix sums. row 0: 0.9, 0.8, 1.0; row 1: 2.0, 1.5, 1.0, 0.5
    assert close(discounted_token_returns(rewards, mask, gamma=1.0), [[0.9, 0.8, 1.0, 0], [2.0, 1.5, 1.0, 0.5],
                                                                        [0, 0, 0, 0]])
    # the same as GAE's returns with no critic (V = 0) and lam = 1
    _, gae_returns = gae_advantages_and_returns(rewards, torch.zeros_like(rewards), mask, gamma=0.5, lam=1.0)
    assert torch.allclose(discounted_token_returns(rewards, mask, gamma=0.5), gae_returns)


# ---------------------------------------------------------------- KL estimators


def test_kl_estimators_hand_computed():
    log_probs = torch.tensor([[math.log(0.5), math.log(0.25), math.log(0.3)]], requires_grad=True)
    ref_log_probs = torch.tensor([[math.log(0.25), math.log(0.5), math.log(0.3)]])
    # log r = [ln 2, -ln 2, 0]
    ln2 = math.log(2.0)
    assert close(kl_estimate(log_probs, ref_log_probs, "k1"), [[ln2, -ln2, 0.0]])
    # k2 = 0.5 * (ln 2)^2 = 0.240227 either way
    assert close(kl_estimate(log_probs, ref_log_probs, "k2"), [[0.5 * ln2 ** 2, 0.5 * ln2 ** 2, 0.0]])
    # k3(ln 2) = e^-ln2 - 1 + ln 2 = 0.5 - 1 + 0.693147 = 0.193147
    # k3(-ln 2) = e^ln2 - 1 - ln 2 = 2 - 1 - 0.693147 = 0.306853
    k3 = kl_estimate(log_probs, ref_log_probs, "k3")
    assert close(k3, [[0.5 - 1 + ln2, 2 - 1 - ln2, 0.0]])
    # differentiable in log_probs: d k3 / d log r = 1 - e^{-log r} = [1 - 0.5, 1 - 2, 0]
    k3.sum().backward()
    assert close(log_probs.grad, [[0.5, -1.0, 0.0]])
    with pytest.raises(ValueError, match="kind must be one of"):
        kl_estimate(log_probs, ref_log_probs, "k4")


# ---------------------------------------------------------------- loss aggregation


def test_the_three_aggregation_modes_hand_computed():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # token_mean: (1 + 2 + 4) / 3 tokens = 7/3
    assert math.isclose(aggregate_token_loss(loss, mask, "token_mean").item(), 7 / 3, rel_tol=1e-6)
    # seq_mean_token_mean: row means (1 + 2) / 2 = 1.5 and 4 / 1 = 4 -> (1.5 + 4) / 2 = 2.75
    assert math.isclose(aggregate_token_loss(loss, mask, "seq_mean_token_mean").item(), 2.75, rel_tol=1e-6)
    # seq_mean_token_sum_norm with constant 4 (max generation length): 7 / (2 rows * 4) = 0.875
    assert math.isclose(aggregate_token_loss(loss, mask, "seq_mean_token_sum_norm", constant=4).item(), 0.875,
                        rel_tol=1e-6)


def test_aggregation_with_an_empty_row_and_an_empty_mask():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    # token_mean: 3 / 2 = 1.5; seq_mean_token_mean: the empty row is left out -> 1.5; sum_norm: 3 / (2 * 4)
    assert math.isclose(aggregate_token_loss(loss, mask, "token_mean").item(), 1.5, rel_tol=1e-6)
    assert math.isclose(aggregate_token_loss(loss, mask, "seq_mean_token_mean").item(), 1.5, rel_tol=1e-6)
    assert math.isclose(aggregate_token_loss(loss, mask, "seq_mean_token_sum_norm", 4).item(), 0.375, rel_tol=1e-6)
    empty = torch.zeros_like(mask)
    for mode in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"):
        assert aggregate_token_loss(loss, empty, mode, constant=4).item() == 0.0  # finite, not NaN
    with pytest.raises(ValueError, match="needs constant > 0"):
        aggregate_token_loss(loss, mask, "seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="mode must be one of"):
        aggregate_token_loss(loss, mask, "token-mean")


# ---------------------------------------------------------------- asymmetric clip (DAPO clip-higher)


def test_asymmetric_clip_hand_computed():
    ratios = torch.tensor([[1.5, 0.5, 1.1, 0.9, 1.5, 0.5, 1.25]])
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0, -1.0, 1.0, 1.0]])
    log_probs = ratios.log().requires_grad_()
    old_log_probs = torch.zeros_like(ratios)
    # clip range [1 - 0.2, 1 + 0.28] = [0.8, 1.28]; loss = max(-A * ratio, -A * clip(ratio))
    #   1.5,  A=+1: max(-1.5, -1.28) = -1.28   clipped above 1 + clip_high
    #   0.5,  A=-1: max(0.5, 0.8)    = 0.8     clipped below 1 - clip_low
    #   1.1,  A=+1: -1.1;  0.9, A=-1: 0.9      inside the range
    #   1.5,  A=-1: max(1.5, 1.28)   = 1.5     the pessimistic side keeps the unclipped term
    #   0.5,  A=+1: max(-0.5, -0.8)  = -0.5
    #   1.25, A=+1: -1.25 (inside [0.8, 1.28]; a symmetric 0.2 clip would give -1.2)
    loss = clipped_policy_loss_tokens(log_probs, old_log_probs, advantages, clip_low=0.2, clip_high=0.28)
    assert close(loss, [[-1.28, 0.8, -1.1, 0.9, 1.5, -0.5, -1.25]])
    symmetric = clipped_policy_loss_tokens(log_probs, old_log_probs, advantages, 0.2, 0.2)
    assert close(symmetric[:, -1], [-1.2])
    # d loss / d log pi = -A * ratio where unclipped, 0 where the clip bites
    loss.sum().backward()
    assert close(log_probs.grad, [[0.0, 0.0, -1.1, 0.9, 1.5, -0.5, -1.25]])


def test_policy_loss_is_the_symmetric_clip_token_mean():
    torch.manual_seed(0)
    log_probs, old_log_probs, advantages = torch.randn(3, 4) * 0.3, torch.randn(3, 4) * 0.3, torch.randn(3, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    loss, stats = policy_loss(log_probs, old_log_probs, advantages, mask, cliprange=0.2)
    tokens = clipped_policy_loss_tokens(log_probs, old_log_probs, advantages, 0.2, 0.2)
    assert torch.allclose(loss, masked_mean(tokens, mask))
    assert torch.allclose(loss, aggregate_token_loss(tokens, mask, "token_mean"))
    ratio = (log_probs - old_log_probs).exp()
    clipped = -advantages * ratio.clamp(0.8, 1.2) > -advantages * ratio
    assert torch.allclose(stats["clip_fraction"], masked_mean(clipped.float(), mask))


# ---------------------------------------------------------------- DAPO's dynamic-sampling filter


def test_equal_reward_groups():
    # groups of 4: [1, 0, 0, 1] differ, [0.5] * 4 are equal
    assert equal_reward_groups(SCORES, 4).tolist() == [False] * 4 + [True] * 4
    # groups of 2: [1, 0] differ, [0, 1] differ, [0.5, 0.5] and [0.5, 0.5] are equal
    assert equal_reward_groups(SCORES, 2).tolist() == [False] * 4 + [True] * 4
    assert equal_reward_groups(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2).tolist() == [True, True, False, False]
    with pytest.raises(ValueError, match="not whole groups"):
        equal_reward_groups(SCORES, 3)
    # every group the filter flags gets zero advantage from a group-baseline estimator
    flagged = equal_reward_groups(SCORES, 4)
    for estimator in GROUP_BASELINE_ESTIMATORS:
        assert (group_advantages(SCORES, 4, estimator)[flagged] == 0).all()
