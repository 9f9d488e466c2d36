"""Labelers: who says which words of a sampled response are good or bad (the training data of a token RM).

Every labeler returns, per response, a list of :class:`~tokencredit.rewards.labels.SpanLabel` over the
response's words; words it has no opinion on get no span. An LLM-judge labeler implements the same
:class:`TokenLabeler` protocol and drops in wherever :class:`ReferenceLabeler` is used; it returns None for a
response it could not label (an unreadable judge answer), which a caller must skip rather than train on.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal, Protocol

from tokencredit.rewards.labels import STOPWORDS, SpanLabel, word_spans


class TokenLabeler(Protocol):
    """Anything that labels the words of responses: one list of word spans per response."""

    def label(
        self, prompts: Sequence[str], responses: Sequence[str], contexts: Sequence[dict]
    ) -> list[list[SpanLabel] | None]:
        """Return, for each response, SpanLabels over its words (unlabelled words get no span), or None where
        the labeler has no labels for it (skip that response)."""
        ...


def _normalise(word: str) -> str:
    """Lower case with punctuation removed, so "Python's," and "pythons" compare equal."""
    return "".join(c for c in word.lower() if c.isalnum())


def _vocabulary(texts: Iterable[str]) -> set[str]:
    """Normalised words of some texts."""
    return {w for text in texts for _, _, word in word_spans(text) if (w := _normalise(word))}


REPEATS = ("bad", "keep")
"""What a labeler does with a word repeating an earlier word of the response: "bad" = label it -1; "keep" = as
any other word."""


def repeat_spans(response: str, stopwords_neutral: bool = True, min_len: int = 1) -> list[SpanLabel]:
    """A -1 span on every word of ``response`` whose normalised form occurred earlier in it; stopwords (with
    ``stopwords_neutral``) and words shorter than ``min_len`` get none, repeated or not."""
    seen: set[str] = set()
    out = []
    for start, end, word in word_spans(response):
        norm = _normalise(word)
        if len(norm) < min_len or (stopwords_neutral and norm in STOPWORDS):
            continue
        if norm in seen:
            out.append(SpanLabel(start, end, -1))
        seen.add(norm)
    return out


class ReferenceLabeler:
    """Reference-based heuristic labels for query generation; NOT AI feedback (no judge is consulted).

    A word of the sampled query is +1 when (case-insensitively, punctuation stripped) it occurs in the true
    next query (``context["target"]``) or, with ``use_clicked``, in a clicked title (``context["clicked"]``);
    otherwise -1. Stopwords (with ``stopwords_neutral``) and words shorter than ``min_len`` get no label.
    With ``repeats="bad"`` (the default) a word whose normalised form occurred earlier in the same response is -1
    whatever its support, so a supported word pays once, not once per repetition; a word that gets no label
    (a stopword, a short word) stays unlabelled when repeated, since queries repeat function words naturally
    ("history of the city of london") and an unlabelled word earns nothing to repeat. ``repeats="keep"``: every
    occurrence is labelled on its own (the behaviour before this option).
    ``context["queries"]`` (earlier queries) is accepted but not used. This is the default when no judge is
    configured: cheap and reproducible, but it rewards copying the reference rather than judging quality.
    """

    def __init__(self, use_clicked: bool = True, stopwords_neutral: bool = True, min_len: int = 1,
                 repeats: Literal["bad", "keep"] = "bad") -> None:
        """Choose whether clicked titles count as evidence, whether stopwords stay neutral, a minimum length,
        and whether repeated words are bad."""
        if min_len < 1:
            raise ValueError(f"min_len must be >= 1 (got {min_len})")
        if repeats not in REPEATS:
            raise ValueError(f"repeats must be one of {REPEATS} (got {repeats!r})")
        self.use_clicked = use_clicked
        self.stopwords_neutral = stopwords_neutral
        self.min_len = min_len
        self.repeats = repeats

    def label(
        self, prompts: Sequence[str], responses: Sequence[str], contexts: Sequence[dict]
    ) -> list[list[SpanLabel]]:
        """Label each word of each response +1 (in the reference) or -1 (not in it)."""
        if not len(prompts) == len(responses) == len(contexts):
            raise ValueError(
                f"got {len(prompts)} prompts, {len(responses)} responses and {len(contexts)} contexts"
            )
        return [self._label_one(i, response, context) for i, (response, context) in
                enumerate(zip(responses, contexts))]

    def _label_one(self, row: int, response: str, context: dict) -> list[SpanLabel]:
        """Spans of one response."""
        if "target" not in context:
            raise ValueError(f"context {row} has no 'target' (the true next query); keys: {sorted(context)}")
        texts = [context["target"]]
        if self.use_clicked:
            clicked = context.get("clicked", [])
            if isinstance(clicked, str):
                raise ValueError(f"context {row}: 'clicked' must be a list of titles, not a string")
            texts += list(clicked)
        reference = _vocabulary(texts)
        repeated = ({s.start for s in repeat_spans(response, self.stopwords_neutral, self.min_len)}
                    if self.repeats == "bad" else set())
        spans = []
        for start, end, word in word_spans(response):
            norm = _normalise(word)
            if len(norm) < self.min_len or (self.stopwords_neutral and norm in STOPWORDS):
                continue
            spans.append(SpanLabel(start, end, 1 if norm in reference and start not in repeated else -1))
        return spans


def label_stats(labels: list[list[SpanLabel]]) -> dict:
    """Counts of +1 and -1 spans and the fraction of responses with at least one -1."""
    positive = sum(s.label > 0 for row in labels for s in row)
    negative = sum(s.label < 0 for row in labels for s in row)
    with_negative = sum(any(s.label < 0 for s in row) for row in labels)
    return {
        "responses": len(labels),
        "positive": positive,
        "negative": negative,
        "frac_responses_with_negative": with_negative / len(labels) if labels else 0.0,
    }
