"""RLHF controllers on hand-computed values: the adaptive and fixed KL controllers (and their state round
trip for --resume) and the reward normalizer built from a reward model's stats."""
import pytest
import torch

from training.utils.rlhf.control import AdaptiveKLController, FixedKLController, RewardNormalizer, make_kl_controller


def close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=1e-5, rtol=1e-5)


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
    with pytest.raises(ValueError, match="horizon"):
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
