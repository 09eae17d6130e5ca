"""Small stateful controllers of PPO: the KL penalty coefficient and reward normalisation.

Each keeps plain numbers only and has `state_dict()` / `load_state_dict()`, so a checkpoint can
store it as JSON and a resumed run continues with the same coefficient.
"""
import math

import torch

from training.utils import distributed


class FixedKLController:
    """A constant KL coefficient (DeepSpeed-Chat's behaviour, 0.1 there)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt; present so the trainer treats both controllers alike."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """The KL coefficient steered towards a target KL (Ziegler et al. 2019, "Fine-Tuning Language
    Models from Human Preferences"):

        error = clip(current_kl / target - 1, -0.2, 0.2)
        value = value * (1 + error * n_steps / horizon)

    `n_steps` is the number of samples (answers) the measured KL covers and `horizon` is in the same
    unit: the coefficient moves by at most 20% per `horizon` samples.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if not target > 0 or not horizon > 0:
            # (the flags --target_kl / --kl_horizon are checked where they are defined; this guards other callers)
            raise ValueError(f"adaptive KL needs a positive target and horizon (got {target}, {horizon})")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


def make_kl_controller(kl_coef: float, target: float | None, horizon: float
                       ) -> FixedKLController | AdaptiveKLController:
    """Adaptive when a positive KL target is given, fixed at `kl_coef` otherwise."""
    if target is not None and target > 0:
        return AdaptiveKLController(kl_coef, target, horizon)
    return FixedKLController(kl_coef)


class RewardNormalizer:
    """Reward-model scores standardised with the statistics step 2 measured on its eval split:

        normalised = (score - mean) / std

    With mean 0 and std 1 it is the identity.
    """

    def __init__(self, mean: float = 0.0, std: float = 1.0):
        self.mean = float(mean)
        self.std = float(std)

    @classmethod
    def from_reward_model_meta(cls, meta: dict, enabled: bool) -> "RewardNormalizer":
        """From reward_model.json's "reward_stats" (see model/reward_model.py). When normalisation is
        asked for but the stats are missing or unusable (std not positive), warn once on rank 0 and
        return the identity, so a reward model from elsewhere still trains."""
        if not enabled:
            return cls()
        stats = meta.get("reward_stats") or {}
        mean, std = stats.get("mean"), stats.get("std")
        if not (_is_number(mean) and _is_number(std) and std > 0):
            distributed.print_rank_0(f"WARNING: reward normalisation is on but the reward model has no usable "
                                     f"reward_stats (mean {mean}, std {std}) in reward_model.json: using raw "
                                     "scores; step 2 of this project records them from its eval split (none when "
                                     "that split is empty), so retrain the reward model with eval data to use them")
            return cls()
        return cls(mean, std)

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        return (scores - self.mean) / self.std

    def state_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.std = float(state["mean"]), float(state["std"])


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
