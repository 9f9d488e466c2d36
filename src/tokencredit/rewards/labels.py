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
    # Trim whitespace so that a BPE token " sort" (leading space) or a word-level join space only overlaps
    # a span through its visible characters; a whitespace-only token then overlaps nothing.
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    if start >= end:
        return 0
    hits = [s.label for s in spans if s.start < end and start < s.end]
    if -1 in hits:
        return -1
    return 1 if hits else 0


def spans_to_token_labels(
    response: str, spans: Sequence[SpanLabel], tokenizer: object, add_eos: bool = True,
    max_tokens: int | None = None,
) -> tuple[list[int], list[int]]:
    """Tokenize ``response`` (no special tokens) and label each token from the spans; EOS (label 0) appended;
    with ``max_tokens``, only the first ``max_tokens`` (a huge response is cut before it is tokenized)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("spans_to_token_labels needs a fast tokenizer (return_offsets_mapping)")
    if max_tokens is not None:
        response = head_within(tokenizer, response, max_tokens)  # keeps the start, so offsets are unchanged
    enc = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [_label_of(response, a, b, spans) for a, b in enc["offset_mapping"]]
    if add_eos:
        ids.append(end_token_id(tokenizer))
        labels.append(0)
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


def map_rewards_by_chars(
    source_spans: Sequence[tuple[int, int]], source_rewards: Sequence[float], target_spans: Sequence[tuple[int, int]]
) -> list[float]:
    """Move per-token rewards from one tokenization of a text onto another, keeping their sum.

    Each source token's reward goes to the target token holding the source token's last character; a source
    token with no characters (a special token such as EOS or [SEP]) goes to the last target token, where a
    policy's EOS sits. Characters no target token covers (e.g. spaces between word-level tokens) go to the
    nearest target token before them.
    """
    if len(source_spans) != len(source_rewards):
        raise ValueError(f"{len(source_spans)} source spans but {len(source_rewards)} rewards")
    out = [0.0] * len(target_spans)
    if not target_spans:
        return out
    for (start, end), reward in zip(source_spans, source_rewards):
        out[_holder(target_spans, end - 1) if end > start else len(target_spans) - 1] += float(reward)
    return out


def _holder(spans: Sequence[tuple[int, int]], char: int) -> int:
    """Index of the span containing ``char``, else of the last span starting at or before it, else 0."""
    before = 0
    for i, (start, end) in enumerate(spans):
        if start <= char < end:
            return i
        if start <= char and end > start:
            before = i
    return before


def _decode_walk(
    token_ids: Sequence[int], tokenizer: object, skip_special_tokens: bool
) -> tuple[str, list[tuple[int, int, int]]]:
    """Decoded text and, per token, (start, done, end): where it starts, where the text it completes ends, and
    where the characters it holds bytes of end (``end`` > ``done`` inside a multi-byte character)."""
    ids = [int(i) for i in token_ids]
    text = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    # Decoding growing prefixes gives exact characters for byte-level BPE (leading spaces included) and for
    # word-level tokenizers that join with spaces. A token ends where its prefix stops agreeing with the text.
    walk = []
    done = 0  # characters completed by the tokens so far
    for k in range(1, len(ids) + 1):
        prefix = tokenizer.decode(ids[:k], skip_special_tokens=skip_special_tokens)
        agree = 0
        limit = min(len(prefix), len(text))
        while agree < limit and prefix[agree] == text[agree]:
            agree += 1
        start, done = done, max(done, agree)
        end = done
        # A prefix ending inside a multi-byte character decodes to "\ufffd"; the token holds bytes of that
        # character, so it covers it too (as offset mappings say), and a word's label reaches all its bytes.
        if agree < len(prefix) and prefix[agree] == "\ufffd" and done < len(text):
            end = done + 1
        walk.append((start, done, end))
    return text, walk


def token_char_spans(
    token_ids: Sequence[int], tokenizer: object, skip_special_tokens: bool = True
) -> tuple[str, list[tuple[int, int]]]:
    """Decoded text and each token's (start, end) characters in it; spans may share a multi-byte character."""
    text, walk = _decode_walk(token_ids, tokenizer, skip_special_tokens)
    return text, [(start, end) for start, _, end in walk]


def token_pieces(tokenizer: object, token_ids: Sequence[int], skip_special_tokens: bool = False) -> list[str]:
    """The text each token adds; the pieces join to the decoded text (a character split over tokens goes to the
    token completing it), so they can be shown side by side, one per token."""
    text, walk = _decode_walk(token_ids, tokenizer, skip_special_tokens)
    return [text[start:done] for start, done, _ in walk]


def labels_for_token_ids(token_ids: Sequence[int], spans: Sequence[SpanLabel], tokenizer: object) -> list[int]:
    """Label given token ids (e.g. sampled by the policy) from spans over their decoded text.

    The spans must be offsets into ``tokenizer.decode(token_ids, skip_special_tokens=True)``, which is the
    response text a trainer hands to a labeler. Special tokens (EOS, pad) get 0.
    """
    text, char_spans = token_char_spans(token_ids, tokenizer)
    return [_label_of(text, a, b, spans) for a, b in char_spans]
