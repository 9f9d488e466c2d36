"""Per-token KL estimators against the reference policy, and the fixed and adaptive KL coefficients."""

from __future__ import annotations

from typing import Literal

import torch

KLEstimator = Literal["k1", "k2", "k3"]


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from tokens sampled by pi (Schulman's k1, k2, k3).

    With log r = log ref(y) - log pi(y): k1 = -log r (unbiased, can be negative), k2 = (log r)^2 / 2 (biased,
    low variance), k3 = (r - 1) - log r (unbiased, always >= 0).
    """
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.pow(2)
    if estimator == "k3":
        # Clamp before exp: a huge ratio would overflow to inf and poison the whole batch.
        return torch.expm1(log_ratio.clamp(max=20.0)) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; choose 'k1', 'k2' or 'k3'")


def kl_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, old_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token loss whose expected gradient is that of KL(pi || ref), for tokens sampled by pi_old.

    ``w * (log pi - log ref)^2 / 2`` with ``w = pi / pi_old`` held constant: its gradient is
    ``w (log pi - log ref) grad log pi``, and the expectation under pi_old is
    ``sum_y pi(y) (log pi(y) - log ref(y)) grad log pi(y)`` = grad KL(pi || ref) (the dropped
    ``sum_y grad pi(y)`` is zero). k1 as a loss has expected gradient zero (E[grad log pi] = 0), and k3 as a
    loss follows KL(ref || pi), so neither is offered. On the first PPO epoch w = 1 and this is k2.
    """
    weight = torch.exp((logprobs - old_logprobs).detach().clamp(max=20.0))
    return weight * 0.5 * (logprobs - ref_logprobs).pow(2)


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, value: float) -> None:
        """Start at value."""
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Keep the coefficient as it is."""

    def state_dict(self) -> dict:
        """State for checkpoints."""
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        """Restore from a checkpoint."""
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller that steers the observed KL towards a target (Ziegler et al., 2019)."""

    def __init__(self, init_value: float, target: float, horizon: int) -> None:
        """Start at init_value, aim for `target` KL per sequence, adapt on a timescale of `horizon` samples."""
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0 (got {target}, {horizon})")
        self.value = float(init_value)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move the coefficient by at most ±20% of n_steps/horizon towards the target."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        """State for checkpoints."""
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        """Restore from a checkpoint."""
        self.value = float(state["value"])
