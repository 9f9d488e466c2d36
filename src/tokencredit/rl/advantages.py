"""GAE and reward-to-go over response tokens; padding never leaks into real tokens.

The masked statistics live in :mod:`tokencredit.masked` and are re-exported here for the trainers.
"""

from __future__ import annotations

import torch

from tokencredit.masked import masked_mean, masked_sum, masked_var, masked_whiten

__all__ = ["compute_gae", "masked_mean", "masked_sum", "masked_var", "masked_whiten", "reward_to_go"]


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over [B, T] response tokens; returns (advantages, returns).

    The episode of row b ends at its last unmasked token (value after it is 0). Masked positions get zero
    advantage and contribute nothing to earlier tokens, so right padding is inert.
    """
    if not (rewards.shape == values.shape == mask.shape):
        raise ValueError(f"shape mismatch: rewards {tuple(rewards.shape)}, values {tuple(values.shape)}, "
                         f"mask {tuple(mask.shape)}")
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    T = rewards.size(1)
    advantages = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    # Loop over time only; every step is vectorised over the batch.
    for t in reversed(range(T)):
        if t + 1 < T:
            next_mask = mask[:, t + 1]
            next_value = values[:, t + 1]
        else:
            next_mask = torch.zeros_like(last)
            next_value = torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value * next_mask - values[:, t]
        last = (delta + gamma * lam * next_mask * last) * mask[:, t]
        advantages[:, t] = last
    returns = advantages + values
    return advantages, returns * mask


def reward_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Discounted sum of future rewards at every token: G_t = r_t + gamma * G_{t+1}; 0 on padding."""
    mask = mask.to(rewards.dtype)
    rewards = rewards * mask
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        running = rewards[:, t] + gamma * running
        out[:, t] = running
    return out * mask
