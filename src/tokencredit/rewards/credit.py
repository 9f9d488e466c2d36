"""Where a token reward model puts its credit: by kind of token, by position, and against response length.

A token RM trained with Bradley-Terry on summed rewards is free to move reward between tokens as long as the
sums order the pairs; if the longer response of a pair tends to lose, the cheapest fit is a negative reward on
every token or on the end token, and PPO then learns that stopping early pays. :func:`credit_profile` measures
that on a set of responses, so a length-control option (``center``, ``eos`` of
:meth:`~tokencredit.rewards.token_rm.TokenRewardModel.as_reward_fn`) is chosen by numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from tokencredit.rewards.labels import STOPWORDS
from tokencredit.rewards.token_rm import TokenRewardModel, end_ids

KINDS = ("eos", "stopword", "content")


def token_kinds(ids: Sequence[int], tokenizer: object, ends: frozenset[int],
                stopwords: frozenset[str] = STOPWORDS) -> list[str]:
    """Each token's kind: "eos" (an end token), "stopword" (its text, stripped and lower-cased, is a stopword)
    or "content" (anything else)."""
    out = []
    for t in ids:
        if int(t) in ends:
            out.append("eos")
            continue
        piece = tokenizer.decode([int(t)]).strip().lower()
        out.append("stopword" if piece in stopwords else "content")
    return out


def _fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares slope of y on x and Pearson's correlation (0 where x or y does not vary)."""
    n = len(xs)
    if n < 2:
        return 0.0, 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    slope = sxy / sxx if sxx > 0 else 0.0
    corr = sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else 0.0
    return slope, corr


def credit_profile(rm: TokenRewardModel, prompts: Sequence[str], response_token_ids: Sequence[Sequence[int]],
                   max_positions: int = 12, batch_size: int = 16,
                   rewards: Sequence[Sequence[float]] | None = None) -> dict:
    """The RM's rewards on these responses, summarised: mean reward per token kind (and of the first token),
    mean reward at each position, mean sum and length, and the slope and correlation of summed reward on length.

    The response ids are the RM's own tokens (as PPO passes them with a shared tokenizer); ``rewards``, when the
    caller already scored them with ``rm.score_token_ids``, saves scoring them again.
    """
    if not response_token_ids:
        raise ValueError("credit_profile needs at least one response")
    rows = rewards if rewards is not None else rm.score_token_ids(prompts, response_token_ids, batch_size)
    ends = end_ids(rm.tokenizer)
    sums: dict[str, float] = {k: 0.0 for k in (*KINDS, "first")}
    counts: dict[str, int] = {k: 0 for k in (*KINDS, "first")}
    position_sums = [0.0] * max_positions
    position_counts = [0] * max_positions
    lengths, totals = [], []
    for row, ids in zip(rows, response_token_ids):
        if not row:
            continue
        for kind, r in zip(token_kinds(ids[: len(row)], rm.tokenizer, ends), row):
            sums[kind] += r
            counts[kind] += 1
        sums["first"] += row[0]
        counts["first"] += 1
        for i, r in enumerate(row[:max_positions]):
            position_sums[i] += r
            position_counts[i] += 1
        lengths.append(float(len(row)))
        totals.append(float(sum(row)))
    slope, corr = _fit_line(lengths, totals)
    return {
        "responses": len(totals),
        "mean_reward": {k: (sums[k] / counts[k] if counts[k] else None) for k in sums},
        "tokens": dict(counts),
        "mean_reward_by_position": [s / c if c else None for s, c in zip(position_sums, position_counts)],
        "mean_token_reward": sum(totals) / max(sum(lengths), 1.0),
        "mean_sum": sum(totals) / max(len(totals), 1),
        "mean_length": sum(lengths) / max(len(lengths), 1),
        "sum_vs_length_slope": slope,
        "sum_vs_length_corr": corr,
    }
