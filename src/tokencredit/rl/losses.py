"""PPO's clipped policy and value losses and the entropy of token distributions, all masked."""

from __future__ import annotations

import torch

from tokencredit.rl.advantages import masked_mean


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate loss averaged over masked tokens; also returns clip fraction and approximate KL."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            # k3 estimate of KL(old || new) from tokens sampled by old: with r = new/old, (r - 1) - log r.
            # Unbiased and non-negative; target_kl early stopping reads it.
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
    cliprange_value: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Half squared error to the returns, clipped around the rollout values when cliprange_value is set."""
    err = (values - returns) ** 2
    if cliprange_value is None:
        loss = 0.5 * masked_mean(err, mask)
        clipfrac = torch.zeros((), device=values.device)
    else:
        clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
        err_clipped = (clipped_values - returns) ** 2
        loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
        # Only where clipping moved the value: inside the range old + (values - old) can differ from values by
        # rounding, and that noise would count as clipping.
        moved = (values - old_values).abs() > cliprange_value
        clipfrac = masked_mean(((err_clipped > err) & moved).float(), mask).detach()
    return loss, {"clipfrac": clipfrac}


def entropy_from_logits(logits: torch.Tensor, chunk_rows: int = 1024) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim, computed in chunks of rows to bound float32 memory."""
    flat = logits.reshape(-1, logits.size(-1))
    parts = []
    for chunk in flat.split(chunk_rows):
        chunk = chunk.float()
        logz = torch.logsumexp(chunk, -1)
        parts.append(logz - (chunk.softmax(-1) * chunk).sum(-1))
    return torch.cat(parts).reshape(logits.shape[:-1])
