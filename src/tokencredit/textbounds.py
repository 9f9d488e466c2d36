"""Token limits checked on a text's length before tokenizing it, so a huge data line costs no more than a short one.

Tokenizing is the expensive step (about 150 bytes of memory per token, seconds per megabyte), and a data file
may hold a line of tens of megabytes. Most tokenizers tokencredit trains with have a bound ``M``
(:func:`max_chars_per_token`): no token stands for more than ``M`` characters of the input text and no
character is dropped, so a text of more than ``k * M`` characters has more than ``k`` tokens. That decides
"too long" from the length alone (:func:`encode_within`), and lets a text that will be cut to ``k`` tokens be
cut to a bounded number of characters first (:func:`head_within`, :func:`tail_within`). A text that could fit
is never changed, so its token ids are exactly those of the whole text.

``M`` is read once per tokenizer from its ``tokenizer.json`` and is only claimed where the pipeline provably
has one: byte-level or byte-fallback BPE (GPT-2, Llama, Qwen, SmolLM2, Mistral, Gemma), byte-fallback Unigram,
with normalizers that never merge more than a few characters into one. Tokenizers whose unknown token can
swallow any run of characters (WordPiece, word-level) or that drop characters (whitespace splitting,
accent stripping) get no bound, and their texts are tokenized whole as before.
"""

from __future__ import annotations

import json
import math
import weakref
from collections.abc import Sequence
from fractions import Fraction

# Canonical composition (NFC, NFKC) turns at most this many characters into one: no character's full
# canonical decomposition is longer (e.g. U+1F82), and composition only inverts such decompositions.
_MAX_COMPOSED = 4

# Normalizers after which every input character is still at least one character (they expand or map 1:1).
_NORMALIZERS_KEEPING = {"NFD", "NFKD", "Lowercase", "Prepend", "ByteLevel"}
# Pre-tokenizers that only split or map characters, never drop them.
_PRE_TOKENIZERS_KEEPING = {"ByteLevel", "Metaspace", "Punctuation", "Digits", "UnicodeScripts", "FixedLength"}

_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _normalizer_factor(spec: dict | None) -> Fraction | None:
    """Most input characters one normalized character can come from, or None when unbounded or unknown."""
    if spec is None:
        return Fraction(1)
    kind = spec.get("type")
    if kind == "Sequence":
        factor = Fraction(1)
        for part in spec.get("normalizers", []):
            inner = _normalizer_factor(part)
            if inner is None:
                return None
            factor *= inner
        return factor
    if kind in _NORMALIZERS_KEEPING:
        return Fraction(1)
    if kind in ("NFC", "NFKC"):
        return Fraction(_MAX_COMPOSED)
    if kind == "Replace":
        pattern, content = spec.get("pattern", {}), spec.get("content", "")
        if "String" not in pattern or not pattern["String"] or not content:
            return None  # a regex, or a deletion: any number of characters may vanish
        return max(Fraction(1), Fraction(len(pattern["String"]), len(content)))
    return None  # Strip, StripAccents, BertNormalizer, Precompiled, Nmt... may delete characters


def _pre_tokenizer_keeps(spec: dict | None) -> bool:
    """Whether the pre-tokenizer keeps every character (so each one ends up in some token)."""
    if spec is None:
        return True
    kind = spec.get("type")
    if kind == "Sequence":
        return all(_pre_tokenizer_keeps(part) for part in spec.get("pretokenizers", []))
    if kind == "Split":
        return spec.get("behavior") != "Removed"
    return kind in _PRE_TOKENIZERS_KEEPING


def _model_bound(spec: dict) -> int | None:
    """Most (normalized) characters one token of the model can cover, or None when unbounded or unknown."""
    kind = spec.get("type")
    if kind == "BPE":
        vocab = spec.get("vocab") or {}
        unk = spec.get("unk_token")
        has_bytes = spec.get("byte_fallback") and all(f"<0x{b:02X}>" in vocab for b in range(256))
        if unk is not None and not has_bytes and spec.get("fuse_unk"):
            return None  # one fused unknown token covers any run of unknown characters
        # A vocabulary string is at least as long as the text it stands for: byte-level strings hold one
        # character per byte, "<0xE2>" stands for one byte, subword prefixes and suffixes only add length.
        return max((len(token) for token in vocab), default=1) or 1
    if kind == "Unigram" and spec.get("byte_fallback"):
        return max((len(piece) for piece, _ in spec.get("vocab") or []), default=1) or 1
    return None  # WordPiece and WordLevel map a whole unknown word, of any length, to one token


def _bound_from_json(spec: dict) -> int | None:
    """max_chars_per_token computed from a tokenizer.json object."""
    factor = _normalizer_factor(spec.get("normalizer"))
    model = _model_bound(spec.get("model") or {})
    if factor is None or model is None or not _pre_tokenizer_keeps(spec.get("pre_tokenizer")):
        return None
    bound = factor * model
    for added in spec.get("added_tokens") or []:
        if added.get("lstrip") or added.get("rstrip"):
            return None  # such a token also swallows all the whitespace beside it
        length = len(added.get("content", ""))
        bound = max(bound, factor * length if added.get("normalized") else Fraction(length))
    return math.ceil(bound)


def max_chars_per_token(tokenizer: object) -> int | None:
    """Most characters of input text one token can stand for, or None when the tokenizer has no such bound."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None  # a slow (Python) tokenizer: nothing to read the bound from
    size = len(tokenizer)  # tokens added later change the bound
    try:
        cached = _cache.get(tokenizer)
    except TypeError:
        cached = None
    if cached is not None and cached[0] == size:
        return cached[1]
    bound = _bound_from_json(json.loads(backend.to_str()))
    try:
        _cache[tokenizer] = (size, bound)
    except TypeError:
        pass
    return bound


def char_budget(tokenizer: object, max_tokens: int) -> int | None:
    """Characters past which a text surely has more than ``max_tokens`` tokens; None when unknown."""
    bound = max_chars_per_token(tokenizer)
    return None if bound is None else max(max_tokens, 0) * bound


def surely_over(tokenizer: object, text: str, max_tokens: int) -> bool:
    """True when ``text`` has more than ``max_tokens`` tokens by its length alone (nothing is tokenized)."""
    budget = char_budget(tokenizer, max_tokens)
    return budget is not None and len(text) > budget


def encode_within(
    tokenizer: object, texts: Sequence[str], max_tokens: int, add_special_tokens: bool = True
) -> list[list[int] | None]:
    """Token ids of each text, as ``tokenizer(texts)`` gives them; None for a text that its length alone
    shows has more than ``max_tokens`` tokens, which is then not tokenized. A text with None is surely too
    long; one with ids may still be (the caller compares their count)."""
    over = [surely_over(tokenizer, text, max_tokens) for text in texts]
    kept = [text for text, skip in zip(texts, over) if not skip]
    encoded = iter(tokenizer(kept, add_special_tokens=add_special_tokens)["input_ids"] if kept else [])
    return [None if skip else list(next(encoded)) for skip in over]


def _cut_length(tokenizer: object, max_tokens: int) -> int | None:
    """Characters kept when a text is cut before tokenizing: twice the budget of ``max_tokens`` tokens."""
    # The kept tokens lie within the budget; the other half keeps the cut, where tokens may differ from the
    # whole text's, far from them.
    budget = char_budget(tokenizer, max_tokens)
    return None if budget is None else 2 * budget


def head_within(tokenizer: object, text: str, max_tokens: int) -> str:
    """A start of ``text`` whose first ``max_tokens`` tokens are those of the whole text; the text itself when
    it could have ``max_tokens`` tokens or fewer."""
    cut = _cut_length(tokenizer, max_tokens)
    return text if cut is None or len(text) <= cut else text[:cut]


def tail_within(tokenizer: object, text: str, max_tokens: int) -> str:
    """An end of ``text`` whose last ``max_tokens`` tokens are those of the whole text; the text itself when
    it could have ``max_tokens`` tokens or fewer."""
    cut = _cut_length(tokenizer, max_tokens)
    return text if cut is None or len(text) <= cut else text[len(text) - cut:]
