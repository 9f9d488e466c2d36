"""Potential-based shaping: token rewards that are the prefix differences of a bounded sequence score.

Given a score Phi(x, y) of a prompt and any response prefix, the reward of response token t is
r_t = Phi(x, y<=t) - Phi(x, y<t), with Phi(x, y<1) = Phi(x, empty response). The sum telescopes to
Phi(x, y) - Phi(x, empty), a per-prompt constant away from the sequence score, so token-level and sequence-level
PPO share one optimum, while each token is still credited with what it changed. A word repeated pays only as far
as it raises Phi. Summed token rewards are additive instead: a word a token reward model likes pays again each
time it appears, so "hospital hospital hospital ..." earns without limit. With a bounded Phi (the default
sigmoid) the return of any response, however long, lies in an interval of width 1, so nothing can pump it.

:func:`potential_reward_fn` turns any ``prefix_potentials(prompts, response_token_ids)`` into a PPO reward_fn;
:func:`sequence_rm_potentials` and :func:`token_rm_potentials` build Phi from a saved reward model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

from tokencredit.models import attends_only_back
from tokencredit.rewards.labels import end_token_id
from tokencredit.rewards.seq_rm import SequenceRewardModel
from tokencredit.rewards.token_rm import TokenRewardModel, end_ids, same_tokenizer
from tokencredit.rewards.tokens import RewardFn
from tokencredit.token_text import prefix_texts

Bound = Literal["sigmoid", "tanh", "none"]
PrefixPotentials = Callable[[list[str], list[list[int]]], Sequence[Sequence[float]]]
"""fn(prompts, response_token_ids) -> per response, Phi of the empty prefix then of every prefix (T + 1 floats)."""

BOUNDS = ("sigmoid", "tanh", "none")


def potential_differences(phi: Sequence[float]) -> list[float]:
    """The T differences Phi_t - Phi_{t-1} of potentials Phi_0 (empty prefix) ... Phi_T."""
    if len(phi) < 1:
        raise ValueError("potentials need at least Phi_0, the potential of the empty prefix")
    values = [float(v) for v in phi]
    return [b - a for a, b in zip(values, values[1:])]


def bounded(score: float, bound: Bound = "sigmoid", temperature: float = 1.0) -> float:
    """Phi of a raw score: sigmoid(score / temperature) in (0, 1), tanh(score / temperature) in (-1, 1), or the
    score unchanged ("none", temperature unused); a non-finite score gives nan."""
    score = float(score)
    if not math.isfinite(score):
        # inf would saturate to a finite Phi and hide a broken model; nan makes the reward_fn refuse it
        return float("nan")
    if bound == "none":
        return score
    z = score / temperature
    if bound == "tanh":
        return math.tanh(z)
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)  # exp(-z) would overflow for a very negative z
    return e / (1.0 + e)


def _check_bound(bound: str, temperature: float) -> None:
    """Raise ValueError for an unknown bound or a temperature that is not a positive finite number."""
    if bound not in BOUNDS:
        raise ValueError(f"bound must be one of {', '.join(BOUNDS)} (got {bound!r})")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number (got {temperature})")


def potential_reward_fn(prefix_potentials: PrefixPotentials, scale: float = 1.0) -> RewardFn:
    """A PPO reward_fn giving token t of each response scale * (Phi_t - Phi_{t-1}), Phi from ``prefix_potentials``."""
    if not callable(prefix_potentials):
        raise ValueError("prefix_potentials must be callable: fn(prompts, response_token_ids) -> potentials")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number (got {scale})")

    def reward_fn(prompts: list[str], responses: list[str], response_token_ids: list[list[int]]) -> list:
        """Token rewards from the prefix potentials of the sampled token ids."""
        ids = [list(r) for r in response_token_ids]
        phis = prefix_potentials(list(prompts), ids)
        if len(phis) != len(ids):
            raise ValueError(f"prefix_potentials returned {len(phis)} rows for {len(ids)} responses")
        out = []
        for i, (phi, row) in enumerate(zip(phis, ids)):
            if len(phi) != len(row) + 1:
                raise ValueError(
                    f"row {i}: {len(phi)} potentials for a response of {len(row)} tokens; expected {len(row) + 1} "
                    "(the empty prefix, then every prefix)"
                )
            bad = [j for j, v in enumerate(phi) if not math.isfinite(float(v))]
            if bad:
                raise ValueError(f"row {i}: potential {bad[0]} is {float(phi[bad[0]])}, not a finite number")
            out.append([scale * d for d in potential_differences(phi)])
        return out

    return reward_fn


# ---------------------------------------------------------------------- reward-model potentials
def _policy_prefixes(ids: Sequence[int], policy_tokenizer: object, rm_tokenizer: object) -> list[list[int]]:
    """The reward model's ids of each policy prefix y<=t, t = 0 .. T: the prefix decoded on its own (so nothing
    after t is read) and re-tokenized, with the RM's end token where the prefix ends on a policy end token."""
    ends = end_ids(policy_tokenizer)
    rm_end = end_token_id(rm_tokenizer)
    out: list[list[int]] = [[]]
    for t, (text, _) in enumerate(prefix_texts(ids, policy_tokenizer), 1):
        rm_ids = list(rm_tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
        out.append(rm_ids + [rm_end] if int(ids[t - 1]) in ends else rm_ids)
    return out


def _plan(
    response_token_ids: Sequence[Sequence[int]], policy_tokenizer: object | None, rm_tokenizer: object
) -> tuple[list[int], list[list[int]], list[list[tuple[int, int]]]]:
    """Rows for a causal reward model to score and, per response and prefix, (row, tokens of it read).

    In the RM's own tokens the response is one row. Across tokenizers each prefix is re-tokenized; a prefix
    whose ids start the row of a later prefix is read from that row, so growing prefixes share one row.
    """
    owners: list[int] = []
    rows: list[list[int]] = []
    where: list[list[tuple[int, int]]] = []
    for i, ids in enumerate(response_token_ids):
        if policy_tokenizer is None:
            owners.append(i)
            rows.append([int(t) for t in ids])
            where.append([(len(rows) - 1, t) for t in range(len(ids) + 1)])
            continue
        prefixes = _policy_prefixes(ids, policy_tokenizer, rm_tokenizer)
        spots: list[tuple[int, int]] = [(0, 0)] * len(prefixes)
        first = len(rows)
        for t in reversed(range(len(prefixes))):
            p = prefixes[t]
            if len(rows) == first or rows[-1][: len(p)] != p:
                owners.append(i)
                rows.append(p)
            spots[t] = (len(rows) - 1, len(p))
        where.append(spots)
    return owners, rows, where


def _other_tokenizer(rm: TokenRewardModel, policy_tokenizer: object | None) -> object | None:
    """The policy's tokenizer when it differs from the reward model's, else None."""
    if policy_tokenizer is None or same_tokenizer(rm.tokenizer, policy_tokenizer):
        return None
    return policy_tokenizer


def sequence_rm_potentials(
    rm: SequenceRewardModel,
    bound: Bound = "sigmoid",
    temperature: float = 1.0,
    batch_size: int = 16,
    policy_tokenizer: object | None = None,
) -> PrefixPotentials:
    """Phi from a :class:`~tokencredit.rewards.seq_rm.SequenceRewardModel`: :func:`bounded` raw score of the
    prompt alone and of every response prefix (:meth:`~SequenceRewardModel.prefix_scores`).

    An unfinished prefix is scored as it stands, at its last token with no end token appended; a response that
    ends in EOS ends on the RM's own sequence score of it. With ``policy_tokenizer`` differing from the RM's, each
    prefix is decoded alone and re-tokenized by the RM (EOS mapped to the RM's end token), which only a causal
    backbone can score without a row per prefix; a bidirectional one is refused there.
    """
    if not isinstance(rm, SequenceRewardModel):
        raise ValueError(f"a SequenceRewardModel is needed (got {type(rm).__name__}); for a token reward model "
                         "use token_rm_potentials")
    _check_bound(bound, temperature)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    causal = attends_only_back(rm.model.backbone)
    other = _other_tokenizer(rm, policy_tokenizer)
    if other is not None and not causal:
        raise ValueError(
            "the sequence reward model's backbone is bidirectional and the policy's tokenizer differs from its "
            "own: every re-tokenized prefix would need a pass of its own. Use a policy with the reward model's "
            "tokenizer, or a reward model on a causal-LM backbone"
        )

    def prefix_potentials(prompts: list[str], response_token_ids: list[list[int]]) -> list[list[float]]:
        """Bounded prefix scores of the sequence reward model."""
        if len(prompts) != len(response_token_ids):
            raise ValueError(f"{len(prompts)} prompts but {len(response_token_ids)} responses")
        owners, rows, where = _plan(response_token_ids, other, rm.tokenizer)
        scores = rm.prefix_scores([prompts[i] for i in owners], rows, batch_size, one_pass=causal)
        return [[bounded(scores[r][n], bound, temperature) for r, n in spots] for spots in where]

    return prefix_potentials


def token_rm_potentials(
    rm: TokenRewardModel,
    bound: Bound = "sigmoid",
    temperature: float = 1.0,
    batch_size: int = 16,
    policy_tokenizer: object | None = None,
) -> PrefixPotentials:
    """Phi from a :class:`~tokencredit.rewards.token_rm.TokenRewardModel`: Phi_t = bounded(sum_{s<=t} r_s), r_s
    its token scores (:meth:`~TokenRewardModel.score_token_ids`, sigmoid of the head for a PGG model).

    Phi_0 = bounded(0). With ``bound="none"`` the differences of the prefix sums are the token rewards themselves:
    shaping then changes nothing. With ``policy_tokenizer`` differing from the RM's, each prefix is decoded alone,
    re-tokenized by the RM (EOS mapped to the RM's end token) and its RM token scores summed.
    """
    if not isinstance(rm, TokenRewardModel) or isinstance(rm, SequenceRewardModel):
        raise ValueError(f"a TokenRewardModel is needed (got {type(rm).__name__}); for a sequence reward model "
                         "use sequence_rm_potentials")
    _check_bound(bound, temperature)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    other = _other_tokenizer(rm, policy_tokenizer)

    def prefix_potentials(prompts: list[str], response_token_ids: list[list[int]]) -> list[list[float]]:
        """Bounded prefix sums of the token reward model's scores."""
        if len(prompts) != len(response_token_ids):
            raise ValueError(f"{len(prompts)} prompts but {len(response_token_ids)} responses")
        owners, rows, where = _plan(response_token_ids, other, rm.tokenizer)
        rewards = rm.score_token_ids([prompts[i] for i in owners], rows, batch_size)
        sums = []
        for row in rewards:
            running, acc = [0.0], 0.0
            for r in row:
                acc += r
                running.append(acc)
            sums.append(running)
        return [[bounded(sums[r][n], bound, temperature) for r, n in spots] for spots in where]

    return prefix_potentials


__all__: Sequence[str] = ["BOUNDS", "Bound", "PrefixPotentials", "bounded", "potential_differences",
                          "potential_reward_fn", "sequence_rm_potentials", "token_rm_potentials"]
