"""What PPO does to a reward model's token scores before GAE, as pure functions: the missing-end charge, the batch's
reward statistics, the KL penalty in the reward and whitening.

Every function takes [B, T] tensors over response tokens with a 0/1 mask and returns new tensors; ``reduce``, where
given, sums a tensor over processes (identity in one process), so batch statistics are those of the global batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from tokencredit.rl.advantages import masked_whiten

__all__ = ["charge_missing_eos", "reward_sums", "reward_stats", "token_rewards"]

Reduce = Callable[[torch.Tensor], torch.Tensor]


def charge_missing_eos(scores: torch.Tensor, response_mask: torch.Tensor, finished: torch.Tensor,
                       penalty: float) -> torch.Tensor:
    """Scores with ``penalty`` subtracted from the last token of every response cut by length (no end token)."""
    out = scores.clone()
    last = (response_mask.sum(-1) - 1).clamp(min=0)
    rows = torch.nonzero(~finished).squeeze(-1)
    out[rows, last[rows]] -= penalty
    return out


def reward_sums(scores: torch.Tensor, mask: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
    """This process's sums behind the batch's reward statistics, as float64: the finite sequence scores, their
    squares, response tokens, finished rows, and 1 when any score is not finite."""
    seq_scores = (scores * mask).sum(-1)
    nonfinite = torch.tensor(float(not bool(torch.isfinite(scores).all())), device=mask.device)
    return torch.stack([
        torch.where(torch.isfinite(seq_scores), seq_scores, 0.0).sum(), seq_scores.pow(2).nan_to_num().sum(),
        mask.sum(), finished.float().sum(), nonfinite,
    ]).double()


def reward_stats(sums: list[float], n_rows: int) -> dict[str, float]:
    """Mean and sample sd of the sequence scores, mean response length and finished share of ``n_rows``
    responses from :func:`reward_sums` summed over processes."""
    total, total_sq, tokens, finished, _ = sums
    mean = total / n_rows
    return {
        "reward/mean": mean,
        "reward/std": math.sqrt(max(total_sq - n_rows * mean**2, 0.0) / (n_rows - 1)) if n_rows > 1 else 0.0,
        "response_length/mean": tokens / n_rows,
        "response/finished_frac": finished / n_rows,
    }


def token_rewards(scores: torch.Tensor, kl_tokens: torch.Tensor, mask: torch.Tensor, kl_coef: float,
                  kl_in_reward: bool, whiten: bool, reduce: Reduce | None = None) -> torch.Tensor:
    """The per-token rewards GAE reads: the scores minus kl_coef x the per-token KL when the KL is in the reward,
    then scaled to unit variance over the batch when ``whiten`` (the mean is kept: a shift would change which
    lengths pay)."""
    rewards = scores - kl_coef * kl_tokens if kl_in_reward else scores.clone()
    if whiten:
        rewards = masked_whiten(rewards, mask, shift_mean=False, reduce=reduce)
    return rewards
