"""FG: token labels from minimal edits, and the span Bradley-Terry loss they feed.

A minimal edit turns a worse response (``original``) into a better one (``edited``). The diff says which parts
were wrong and which fix them:

- both texts are cut into *units*: the words of :func:`~tokencredit.rewards.labels.word_spans`, and each
  other visible character between them (a punctuation mark, a symbol, an emoji with its modifiers), so a
  punctuation-only edit ("France" -> "France.") is seen, and a word with a full stop keeps the two apart
  ("germany." -> "Germany." marks the words, not the full stop);
- the unit sequences are aligned with ``difflib.SequenceMatcher`` (exact, case-sensitive comparison; no
  "junk" heuristic, which would misalign long texts);
- units of ``original`` that are deleted or replaced get a -1 span over the original text, units of
  ``edited`` that are inserted or replacing get a +1 span over the edited text, one span per unit;
- unchanged units get no span: label 0, "unlabelled", which the token RM's BCE ignores.

Whitespace is never a unit and never inside a span, so whitespace-only changes (extra spaces, new lines)
give no labels, and whitespace-only tokens stay 0 after projection onto a tokenizer.
"""

from __future__ import annotations

import unicodedata
from difflib import SequenceMatcher

import torch
import torch.nn.functional as F

from tokencredit.masked import masked_sum
from tokencredit.rewards.labels import SpanLabel, spans_to_token_labels, word_spans
from tokencredit.rewards.records import EditTriple, PreferencePair, TokenExample

_ZWJ = "\u200d"

Opcode = tuple[str, int, int, int, int]
"""A difflib opcode (tag, i1, i2, j1, j2) over the units of the original (i) and edited (j) texts."""


def edit_units(text: str) -> list[tuple[int, int, str]]:
    """The units a diff aligns, as (start, end, unit): words, and each other visible character."""
    units = []
    pos = 0
    # A sentinel word at the end lets the loop pick up the symbols after the last word.
    for start, end, word in [*word_spans(text), (len(text), len(text), "")]:
        units.extend(_symbols(text, pos, start))
        if word:
            units.append((start, end, word))
        pos = end
    return units


def _symbols(text: str, start: int, end: int) -> list[tuple[int, int, str]]:
    """Visible characters of text[start:end], each with what renders as part of it (marks, emoji joins)."""
    out = []
    i = start
    while i < end:
        if text[i].isspace():
            i += 1
            continue
        j = i + 1
        while j < end and not text[j].isspace() and _joins(text[j - 1], text[j], j - i):
            j += 1
        out.append((i, j, text[i:j]))
        i = j
    return out


def _joins(prev: str, char: str, length: int) -> bool:
    """Whether ``char`` belongs to the symbol before it: an emoji ZWJ sequence, a modifier, a mark, a flag."""
    if prev == _ZWJ or char == _ZWJ:
        return True
    if "\U0001f3fb" <= char <= "\U0001f3ff":  # skin-tone modifiers
        return True
    if length == 1 and "\U0001f1e6" <= prev <= "\U0001f1ff" and "\U0001f1e6" <= char <= "\U0001f1ff":
        return True  # two regional indicators make one flag
    return unicodedata.category(char) in ("Mn", "Mc", "Me")  # combining marks, variation selectors, keycaps


def edit_opcodes(original: str, edited: str) -> list[Opcode]:
    """Opcodes turning the units of ``original`` into those of ``edited`` (indices into :func:`edit_units`)."""
    a = [u for _, _, u in edit_units(original)]
    b = [u for _, _, u in edit_units(edited)]
    return SequenceMatcher(None, a, b, autojunk=False).get_opcodes()


def edit_spans(original: str, edited: str) -> tuple[list[SpanLabel], list[SpanLabel]]:
    """(-1 spans over ``original``, +1 spans over ``edited``): one per deleted/replaced or inserted unit."""
    a, b = edit_units(original), edit_units(edited)
    bad: list[SpanLabel] = []
    good: list[SpanLabel] = []
    for tag, i1, i2, j1, j2 in edit_opcodes(original, edited):
        if tag == "equal":
            continue
        bad.extend(SpanLabel(start, end, -1) for start, end, _ in a[i1:i2])
        good.extend(SpanLabel(start, end, 1) for start, end, _ in b[j1:j2])
    return bad, good


def edit_token_labels(
    prompt: str, original: str, edited: str, tokenizer: object, add_eos: bool = True, max_tokens: int | None = None
) -> tuple[list[int], list[int], list[int], list[int]]:
    """(orig_ids, orig_labels, edit_ids, edit_labels): the edit spans projected onto the tokenizer's tokens.

    Labels are -1/0 on the original and 0/+1 on the edited response. Each response is tokenized on its own
    (no special tokens, EOS appended with label 0 when ``add_eos``), which is how the token RM reads a
    response after its prompt, so ``prompt`` does not change the labels; it is taken to mirror the record.
    ``max_tokens`` keeps the first that many tokens (and labels) of each response.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    bad, good = edit_spans(original, edited)
    orig_ids, orig_labels = spans_to_token_labels(original, bad, tokenizer, add_eos=add_eos, max_tokens=max_tokens)
    edit_ids, edit_labels = spans_to_token_labels(edited, good, tokenizer, add_eos=add_eos, max_tokens=max_tokens)
    return orig_ids, orig_labels, edit_ids, edit_labels


def edit_examples(triple: EditTriple) -> tuple[TokenExample, TokenExample, PreferencePair]:
    """The original with its -1 spans, the edited with its +1 spans, and the pair (edited over original).

    The two examples feed the token RM's per-token BCE, the pair its summed Bradley-Terry loss. The triple's
    optional ``chosen`` is not used here: the hybrid loss's sequence pair is PreferencePair(prompt, chosen,
    original).
    """
    bad, good = edit_spans(triple.original, triple.edited)
    return (
        TokenExample(triple.prompt, triple.original, bad),
        TokenExample(triple.prompt, triple.edited, good),
        PreferencePair(triple.prompt, triple.edited, triple.original),
    )


def span_bt_loss(
    edit_rewards: torch.Tensor,
    edit_plus_mask: torch.Tensor,
    orig_rewards: torch.Tensor,
    orig_minus_mask: torch.Tensor,
) -> torch.Tensor:
    """Span Bradley-Terry: mean over the batch of -log sigma(sum_{E+} r(e) - sum_{O-} r(o)).

    Rewards are [B, T] token rewards of the edited and original responses (T may differ between the two);
    the masks select the +1 tokens of each edited response and the -1 tokens of each original, e.g.
    ``(edit_labels > 0) & edit_response_mask``. An empty set sums to 0: a pure insertion only raises the
    inserted tokens, a pure deletion only lowers the deleted ones.
    """
    if edit_rewards.shape != edit_plus_mask.shape or orig_rewards.shape != orig_minus_mask.shape:
        raise ValueError(
            f"rewards and masks must have the same shape: edited {tuple(edit_rewards.shape)} vs "
            f"{tuple(edit_plus_mask.shape)}, original {tuple(orig_rewards.shape)} vs {tuple(orig_minus_mask.shape)}"
        )
    if edit_rewards.dim() != 2 or edit_rewards.size(0) != orig_rewards.size(0):
        raise ValueError(
            f"expected [B, T] rewards with the same B, got {tuple(edit_rewards.shape)} and {tuple(orig_rewards.shape)}"
        )
    margin = masked_sum(edit_rewards, edit_plus_mask.to(edit_rewards.dtype), -1) - masked_sum(
        orig_rewards, orig_minus_mask.to(orig_rewards.dtype), -1
    )
    return -F.logsigmoid(margin).mean()
