"""The losses of the trainers, all masked over response tokens: PPO's clipped policy and value losses and the
entropy of token distributions; PGG's REINFORCE with token weights and its reward-weighted MLE."""

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


# ---------------------------------------------------------------------- PGG's objectives
def token_weights_to_go(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reward-to-go [B, T]: sum of the rewards at t and after, over unmasked tokens only."""
    masked = torch.where(mask.bool(), rewards, torch.zeros_like(rewards))
    return masked.flip(-1).cumsum(-1).flip(-1)


def pgg_reinforce_loss(
    logprobs: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.125,
    reward_to_go: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PGG's REINFORCE: mean_t[w_t * NLL_t] - entropy_coef * mean_t H_t over unmasked tokens, w = r (or its to-go).

    ``logprobs`` [B, T] of the sampled tokens (with gradient), ``rewards`` [B, T] token guidance (no gradient is
    taken through it), ``mask`` [B, T] 1 on response tokens, ``entropy`` [B, T] of the policy at each position
    (None: no bonus). Means are over all unmasked tokens of the batch.
    """
    if logprobs.shape != rewards.shape or logprobs.shape != mask.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)}, rewards {tuple(rewards.shape)} and mask "
                         f"{tuple(mask.shape)} must have the same [B, T] shape")
    if entropy_coef < 0:
        raise ValueError(f"entropy_coef must be >= 0 (got {entropy_coef})")
    weights = (token_weights_to_go(rewards, mask) if reward_to_go else rewards).detach().to(logprobs.dtype)
    mask = mask.to(logprobs.dtype)
    pg = masked_mean(-logprobs * weights, mask)
    loss = pg
    stats = {"loss/pg": float(pg.detach())}
    if entropy is not None:
        ent = masked_mean(entropy, mask)
        loss = loss - entropy_coef * ent
        stats["entropy/mean"] = float(ent.detach())
    stats["loss/total"] = float(loss.detach())
    return loss, stats


def weighted_mle_loss(
    logprobs: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """Reward-weighted MLE: mean over rows of sum_t w_t * NLL_t, w_t = r_t / sum_t' r_t' per row (no gradient).

    ``rewards`` must be positive on unmasked tokens (PGG's bounded reward is in (0, 1)); a row without tokens
    contributes nothing and is left out of the mean.
    """
    if logprobs.shape != rewards.shape or logprobs.shape != mask.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)}, rewards {tuple(rewards.shape)} and mask "
                         f"{tuple(mask.shape)} must have the same [B, T] shape")
    on = mask.bool()
    r = torch.where(on, rewards.detach(), torch.zeros_like(rewards)).to(logprobs.dtype)
    if (r < 0).any():
        raise ValueError("weighted MLE needs non-negative token rewards (a bounded PGG reward is in (0, 1))")
    totals = r.sum(-1, keepdim=True)
    rows = on.any(-1)
    weights = r / totals.clamp(min=torch.finfo(r.dtype).tiny)
    per_row = (-logprobs * weights).where(on, torch.zeros_like(logprobs)).sum(-1)
    loss = per_row[rows].mean() if rows.any() else per_row.sum() * 0.0
    plain = masked_mean(-logprobs.detach(), mask.to(logprobs.dtype))
    return loss, {"loss/total": float(loss.detach()), "loss/weighted_nll": float(loss.detach()),
                  "loss/plain_nll": float(plain)}
