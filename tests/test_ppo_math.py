"""PPO math and controllers on hand-computed values.

Rows used throughout: an answer that ended with EOS before the last column, an answer truncated at the
length limit (all columns are actions), and an empty answer (no action at all).
"""
import math

import pytest
import torch

from training.utils.errors import UserInputError
from training.utils.losses import (apply_truncation_penalty, entropy_from_logits, gae_advantages_and_returns,
                                   gather_log_probs, kl_penalty_rewards, masked_mean, masked_whiten, policy_loss,
                                   value_loss)
from training.utils.rlhf.control import (AdaptiveKLController, FixedKLController, RewardNormalizer,
                                         make_kl_controller)

EOS_ENDED, TRUNCATED, EMPTY = [1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]


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


def test_adaptive_kl_controller_hand_computed_and_resumable():
    controller = make_kl_controller(0.1, target=6.0, horizon=10000)
    assert isinstance(controller, AdaptiveKLController)
    controller.update(7.5, n_steps=1000)  # error 0.25 clipped to 0.2: 0.1 * (1 + 0.2 * 0.1)
    assert controller.value == pytest.approx(0.102)
    controller.update(3.0, n_steps=1000)  # error -0.5 clipped to -0.2
    assert controller.value == pytest.approx(0.102 * 0.98)
    resumed = AdaptiveKLController(0.5, target=6.0, horizon=10000)
    resumed.load_state_dict(controller.state_dict())
    for c in (controller, resumed):
        c.update(6.6, n_steps=500)  # error 0.1, unclipped
    assert resumed.value == controller.value == pytest.approx(0.102 * 0.98 * 1.005)
    with pytest.raises(UserInputError, match="horizon"):
        make_kl_controller(0.1, target=6.0, horizon=0)


def test_fixed_kl_controller_stays_fixed():
    for target in (None, 0):
        controller = make_kl_controller(0.2, target=target, horizon=10000)
        assert isinstance(controller, FixedKLController)
        controller.update(100.0, n_steps=1000)
        assert controller.value == 0.2
    restored = FixedKLController(0.0)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == 0.2


def test_reward_normalizer_from_stats(capsys):
    normalizer = RewardNormalizer.from_reward_model_meta({"reward_stats": {"mean": 1.0, "std": 2.0}}, enabled=True)
    close(normalizer(torch.tensor([3.0, -1.0])), [1.0, -1.0])
    restored = RewardNormalizer()
    restored.load_state_dict(normalizer.state_dict())
    close(restored(torch.tensor([5.0])), [2.0])
    disabled = RewardNormalizer.from_reward_model_meta({"reward_stats": {"mean": 1.0, "std": 2.0}}, enabled=False)
    close(disabled(torch.tensor([3.0])), [3.0])
    assert "WARNING" not in capsys.readouterr().out


@pytest.mark.parametrize("meta", [{}, {"reward_stats": {"mean": 1.0}}, {"reward_stats": {"mean": 1.0, "std": 0.0}}])
def test_reward_normalizer_without_stats_warns_and_is_identity(capsys, meta):
    normalizer = RewardNormalizer.from_reward_model_meta(meta, enabled=True)
    close(normalizer(torch.tensor([3.0, -1.0])), [3.0, -1.0])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("WARNING:")]
    assert len(lines) == 1 and "reward_stats" in lines[0]
