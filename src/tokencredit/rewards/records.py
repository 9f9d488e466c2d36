"""The records reward learning works on: pairs, token-labelled responses, edits, ranked lists.

Shared by the loaders (``rewards.data``), the reward models and the FG edit labels, so that none of those
modules has to import another to name a record.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from tokencredit.rewards.labels import SpanLabel


@dataclass
class TokenExample:
    """A response with span labels over its characters (+1 good / -1 bad words).

    ``finished``: the response ended by itself (the reward model reads it with EOS appended); False for one cut
    at a length limit, which is read without EOS. ``end_label`` labels where it ends: the EOS of a finished
    response, the last token of an unfinished one (-1 / 0 = no label / +1).
    """

    prompt: str
    response: str
    spans: list[SpanLabel] = field(default_factory=list)
    finished: bool = True
    end_label: int = 0

    def __post_init__(self) -> None:
        """Reject an end label other than -1, 0 or +1."""
        if self.end_label not in (-1, 0, 1):
            raise ValueError(f"end_label must be -1, 0 or +1, got {self.end_label!r}")


@dataclass
class PreferencePair:
    """Two responses to one prompt, the first preferred."""

    prompt: str
    chosen: str
    rejected: str


@dataclass
class RankedList:
    """Two or more responses to one prompt, ordered by ``scores`` (higher is better) or by ``ranking``.

    ``ranking[i]`` is the rank of ``responses[i]``, 0 = best, and is a permutation of ``0..K-1``; exactly one
    of ``scores`` and ``ranking`` is given. Scores may tie and are kept raw, so a listwise loss can break
    ties its own way (see :meth:`order`).
    """

    prompt: str
    responses: list[str]
    scores: list[float] | None = None
    ranking: list[int] | None = None

    def __post_init__(self) -> None:
        """Reject lists that cannot be ordered (the loaders check the same, naming file, line and field)."""
        problem = ranked_problem(len(self.responses), self.scores, self.ranking, "responses", "scores", "ranking")
        if problem is not None:
            raise ValueError(problem)

    def order(self, rng: random.Random | None = None) -> list[int]:
        """Indices of the responses, best first; tied scores keep input order, or a random one given ``rng``."""
        indices = list(range(len(self.responses)))
        if rng is not None:
            rng.shuffle(indices)  # the sort below is stable, so shuffling first breaks ties at random
        if self.ranking is not None:
            indices.sort(key=self.ranking.__getitem__)
        else:
            indices.sort(key=lambda i: -self.scores[i])
        return indices

    def best_first(self) -> list[str]:
        """The responses, best first (ties in input order)."""
        return [self.responses[i] for i in self.order()]

    def preference_pairs(self) -> list[PreferencePair]:
        """Every pair of responses where one is strictly better, as PreferencePair (tied scores give none)."""
        order = self.order()
        pairs = []
        for a, better in enumerate(order):
            for worse in order[a + 1 :]:
                if self.scores is not None and self.scores[better] == self.scores[worse]:
                    continue
                pairs.append(PreferencePair(self.prompt, self.responses[better], self.responses[worse]))
        return pairs


@dataclass
class EditTriple:
    """A response (``original``) and a minimal edit of it that is better (``edited``).

    ``chosen`` is optional: the preferred response of the pair the original came from, when the original was
    the rejected side of a preference pair; the hybrid FG loss adds sequence BT on (chosen, original).
    """

    prompt: str
    original: str
    edited: str
    chosen: str | None = None


@dataclass
class UnlabelledPair:
    """Two responses to one prompt with no preference between them (e.g. SER's pool)."""

    prompt: str
    a: str
    b: str


def random_split(items: Sequence, fraction: float, rng: np.random.Generator) -> tuple[list, list]:
    """Random (train, eval) split; eval gets round(fraction * n) items but train keeps at least one."""
    n = len(items)
    n_eval = min(n - 1, round(n * fraction)) if n > 1 else 0
    order = rng.permutation(n)
    return [items[i] for i in order[n_eval:]], [items[i] for i in order[:n_eval]]


def ranked_problem(
    n: int,
    scores: Sequence[float] | None,
    ranking: Sequence[int] | None,
    responses_field: str,
    scores_field: str | None,
    ranking_field: str | None,
) -> str | None:
    """What makes a ranked list unusable, naming the fields, or None when it is fine."""
    if n < 2:
        return f"field {responses_field!r} needs at least 2 responses to rank, got {n}"
    if scores is not None and ranking is not None:
        return (f"give either {scores_field!r} (higher is better) or {ranking_field!r} (0 = best), not both; "
                "set scores_field or ranking_field to None to read only one")
    if scores is None and ranking is None:
        fields = " or ".join(repr(f) for f in (scores_field, ranking_field) if f is not None) or "scores or ranking"
        return f"missing {fields}: a ranked list needs scores (higher is better) or a ranking (0 = best)"
    if scores is not None:
        if len(scores) != n:
            return f"field {scores_field!r} has {len(scores)} values but {responses_field!r} has {n} responses"
        bad = [k for k, s in enumerate(scores) if not math.isfinite(s)]
        if bad:
            return f"field {scores_field!r}[{bad[0]}] is {scores[bad[0]]}; scores must be finite numbers"
        return None
    if len(ranking) != n:
        return f"field {ranking_field!r} has {len(ranking)} values but {responses_field!r} has {n} responses"
    if sorted(ranking) != list(range(n)):
        hint = " (it looks 1-based)" if sorted(ranking) == list(range(1, n + 1)) else ""
        return (f"field {ranking_field!r} must be a permutation of 0..{n - 1} (ranking[i] is the rank of "
                f"response i, 0 = best), got {list(ranking)}{hint}")
    return None
