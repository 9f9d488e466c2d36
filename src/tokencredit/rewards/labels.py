"""Token labels kept as character spans of the response text, projected onto any tokenizer's tokens.

A labeler (an LLM judge, a reference heuristic, a minimal edit) says which *words* are good or bad. Keeping
that as character offsets makes the labels independent of the tokenizer; :func:`spans_to_token_labels` and
:func:`labels_for_token_ids` turn them into one label per token (+1 good, -1 bad, 0 unlabelled).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from tokencredit.textbounds import head_within
from tokencredit.token_text import token_char_spans

STOPWORDS = frozenset(
    "a an the and or but if of to in on at by for with from as is are was were be been being it its this that "
    "these those i me my we our you your he she his her they them their what which who whom how when where why "
    "do does did not no so than too very can will just about into over up down out off then there here".split()
)
"""A small English stopword list; with ``stopwords_neutral`` these words get no label."""

_RUN = re.compile(r"(?:[^\W_]|['/-])+")
"""Maximal runs of letters, digits, apostrophes, slashes and hyphens."""


@dataclass(frozen=True)
class SpanLabel:
    """A label on the characters ``text[start:end]`` of a response: +1 good, -1 bad."""

    start: int
    end: int
    label: int

    def __post_init__(self) -> None:
        """Reject empty or reversed spans and labels other than +1/-1."""
        if not 0 <= self.start < self.end:
            raise ValueError(f"span needs 0 <= start < end, got ({self.start}, {self.end})")
        if self.label not in (1, -1):
            raise ValueError(f"span label must be +1 or -1, got {self.label!r}")


def word_spans(text: str) -> list[tuple[int, int, str]]:
    """Words of ``text`` as (start, end, word): maximal runs of letters/digits/'/- holding a letter or digit."""
    # A lone "-" or "/" between words is punctuation, not a word a labeler could judge.
    return [(m.start(), m.end(), m.group()) for m in _RUN.finditer(text) if any(c.isalnum() for c in m.group())]


def _label_of(text: str, start: int, end: int, spans: Sequence[SpanLabel]) -> int:
    """Label of the characters text[start:end]: -1 wins over +1; whitespace never counts as overlap."""
    start, end = _visible(text, start, end)
    if start >= end:
        return 0
    hits = [s.label for s in spans if s.start < end and start < s.end]
    if -1 in hits:
        return -1
    return 1 if hits else 0


def _visible(text: str, start: int, end: int) -> tuple[int, int]:
    """text[start:end] without leading and trailing whitespace, as (start, end); start >= end when blank."""
    # A BPE token " sort" (leading space) or a word-level join space must only overlap a span through its
    # visible characters; a whitespace-only token then overlaps nothing.
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def word_units(text: str, spans: Sequence[SpanLabel]) -> list[SpanLabel]:
    """The units of credit of some spans: each word of ``text`` a span reaches, from the first character a span
    covers to the word's end, with the label of the spans on it (-1 wins); a span that reaches no word
    (punctuation) is one unit of its own."""
    units = []
    reached = [False] * len(spans)
    for start, end, _ in word_spans(text):
        hits = [k for k, s in enumerate(spans) if s.start < end and start < s.end]
        if not hits:
            continue
        for k in hits:
            reached[k] = True
        label = -1 if any(spans[k].label < 0 for k in hits) else 1
        units.append(SpanLabel(max(start, min(spans[k].start for k in hits)), end, label))
    for k, s in enumerate(spans):
        a, b = _visible(text, s.start, min(s.end, len(text)))
        if not reached[k] and a < b:
            units.append(SpanLabel(a, b, s.label))
    return sorted(units, key=lambda u: u.start)


def _first_token_labels(text: str, offsets: Sequence[tuple[int, int]], spans: Sequence[SpanLabel]) -> list[int]:
    """One label per token where each word unit's label sits on the first token overlapping it (-1 wins where
    two units start on one token); every other token 0."""
    visible = [_visible(text, a, b) for a, b in offsets]
    labels = [0] * len(offsets)
    for unit in word_units(text, spans):
        for i, (a, b) in enumerate(visible):
            if a < b and a < unit.end and unit.start < b:
                labels[i] = -1 if -1 in (labels[i], unit.label) else 1
                break
    return labels


LABEL_UNITS = ("token", "word")
"""How span labels reach tokens: "token" = every token of a labelled word; "word" = its first token only."""


def spans_to_token_labels(
    response: str, spans: Sequence[SpanLabel], tokenizer: object, add_eos: bool = True,
    max_tokens: int | None = None, unit: str = "token", end_label: int = 0,
) -> tuple[list[int], list[int]]:
    """Tokenize ``response`` (no special tokens) and label each token from the spans; EOS appended; with
    ``max_tokens``, only the first ``max_tokens`` (a huge response is cut before it is tokenized).

    ``unit="token"``: every token overlapping a span carries its label. ``unit="word"``: each word a span reaches
    is one unit of credit, whatever its number of tokens: its label sits on the word's first token (where the
    policy commits to the word) and its other tokens are 0, so a word split into k tokens is not paid k times.
    ``end_label`` labels where the response ends: the appended EOS, or without ``add_eos`` (a response cut at a
    length limit) its last token, replacing that token's word label; 0 = EOS unlabelled, last token as it was.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("spans_to_token_labels needs a fast tokenizer (return_offsets_mapping)")
    if unit not in LABEL_UNITS:
        raise ValueError(f"unit must be one of {LABEL_UNITS} (got {unit!r})")
    if end_label not in (-1, 0, 1):
        raise ValueError(f"end_label must be -1, 0 or +1 (got {end_label!r})")
    whole = response
    if max_tokens is not None:
        response = head_within(tokenizer, response, max_tokens)  # keeps the start, so offsets are unchanged
    enc = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if unit == "word":
        labels = _first_token_labels(response, enc["offset_mapping"], spans)
    else:
        labels = [_label_of(response, a, b, spans) for a, b in enc["offset_mapping"]]
    if add_eos:
        ids.append(end_token_id(tokenizer))
        labels.append(end_label)
    elif end_label and labels and len(response) == len(whole):
        # Only the true last token: a text cut by head_within ends mid-response.
        labels[-1] = end_label
    if max_tokens is not None:
        ids, labels = ids[: max(max_tokens, 0)], labels[: max(max_tokens, 0)]
    return ids, labels


def end_token_id(tokenizer: object) -> int:
    """The token that closes a response: EOS, or [SEP] for encoder tokenizers (BERT) that have no EOS."""
    for name in ("eos_token_id", "sep_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ValueError("the tokenizer has neither an EOS nor a SEP token to close a response")


def overlapping(spans: Sequence[tuple[int, int]], span: tuple[int, int]) -> list[int]:
    """Indices of the ``spans`` sharing a character with ``span``; an empty span (a special token such as EOS or
    [SEP]) meets only an empty span at the same place."""
    start, end = span
    if start >= end:
        return [i for i, (a, b) in enumerate(spans) if a >= b and a == start]
    return [i for i, (a, b) in enumerate(spans) if a < b and a < end and start < b]


def map_rewards_by_chars(
    source_spans: Sequence[tuple[int, int]], source_rewards: Sequence[float], target_spans: Sequence[tuple[int, int]],
    start: float = 0.0,
) -> list[float]:
    """Move per-token rewards from one tokenization of a text onto another, keeping their scale.

    Each target token gets the mean reward of the source tokens that share a character with it
    (:func:`overlapping`): a sum would pay a word once per piece the target tokenizer cuts it into, and a
    bounded reward would leave its range. A target token that no source token reaches (a space between
    word-level tokens, a byte piece of a character, an empty special token) carries the value of the target
    token before it, ``start`` for the first, so a constant reward maps to the same constant everywhere.
    """
    if len(source_spans) != len(source_rewards):
        raise ValueError(f"{len(source_spans)} source spans but {len(source_rewards)} rewards")
    out, value = [], float(start)
    for span in target_spans:
        hits = overlapping(source_spans, span)
        if hits:
            value = sum(float(source_rewards[i]) for i in hits) / len(hits)
        out.append(value)
    return out


def labels_for_token_ids(token_ids: Sequence[int], spans: Sequence[SpanLabel], tokenizer: object) -> list[int]:
    """Label given token ids (e.g. sampled by the policy) from spans over their decoded text.

    The spans must be offsets into ``tokenizer.decode(token_ids, skip_special_tokens=True)``, which is the
    response text a trainer hands to a labeler. Special tokens (EOS, pad) get 0.
    """
    text, char_spans = token_char_spans(token_ids, tokenizer)
    return [_label_of(text, a, b, spans) for a, b in char_spans]
