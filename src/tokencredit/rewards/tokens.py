"""The reward contract: a user's reward function becomes a per-token reward tensor [B, T]."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch

RewardFn = Callable[[list[str], list[str], list[list[int]]], Sequence]
"""fn(prompts, responses, response_token_ids) -> a float per sequence or a list of floats per token."""


def _is_number(x: object) -> bool:
    """A real number, including numpy and 0-d torch scalars, but not bool."""
    if isinstance(x, bool):
        return False
    if isinstance(x, torch.Tensor):
        return x.ndim == 0 and not x.dtype.is_complex
    return isinstance(x, numbers.Real)


def rewards_to_tensor(
    outputs: object, lengths: Sequence[int], width: int | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Turn reward_fn outputs into TokenRewards [B, T]: a float goes on the row's last token, a list per token.

    Raises ValueError naming the row when an output is neither a number nor a list of one number per
    response token. Non-finite values pass through; the trainer decides to skip such an update.
    """
    if isinstance(outputs, torch.Tensor):
        outputs = outputs.tolist() if outputs.ndim > 0 else outputs
    if isinstance(outputs, (str, bytes)) or not isinstance(outputs, Sequence):
        raise ValueError(
            f"reward_fn must return a list with one entry per response ({len(lengths)}), got {type(outputs).__name__}"
        )
    if len(outputs) != len(lengths):
        raise ValueError(f"reward_fn returned {len(outputs)} entries for {len(lengths)} responses")
    width = max(lengths, default=0) if width is None else width
    out = torch.zeros(len(lengths), width, dtype=dtype)
    for i, (value, n) in enumerate(zip(outputs, lengths)):
        if n < 1:
            raise ValueError(f"row {i}: response has no tokens, nothing to reward")
        if _is_number(value):
            out[i, n - 1] = float(value)
            continue
        if isinstance(value, torch.Tensor):
            value = value.tolist()
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ValueError(
                f"row {i}: reward must be a float or a list of {n} floats (one per response token), "
                f"got {type(value).__name__}"
            )
        if len(value) != n:
            raise ValueError(
                f"row {i}: per-token reward has {len(value)} values but the response has {n} tokens"
            )
        bad = [j for j, v in enumerate(value) if not _is_number(v)]
        if bad:
            raise ValueError(
                f"row {i}: per-token reward entry {bad[0]} is {type(value[bad[0]]).__name__}, not a number"
            )
        out[i, :n] = torch.tensor([float(v) for v in value], dtype=dtype)
    return out


def all_finite(x: torch.Tensor) -> bool:
    """True when every entry is finite."""
    return bool(torch.isfinite(x).all())


def sequence_scores(token_rewards: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """Per-sequence sum of token rewards (the score a sequence-level method would see)."""
    sums = (token_rewards * mask).sum(-1).tolist()
    return [s if math.isfinite(s) else float("nan") for s in sums]
