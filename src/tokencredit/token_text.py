"""The text of token ids, token by token: what each token adds, where it sits, and causal prefixes.

Decoding growing prefixes is the one way to place tokens in text that works for every tokenizer (byte-level
BPE with its leading spaces, word-level tokenizers that join with spaces); reward labels, the credit reports and
the model server all read tokens through these functions.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["decode_walk", "prefix_texts", "token_char_spans", "token_pieces"]


def decode_walk(
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
    """Decoded text and each token's (start, end) characters in it; spans may share a multi-byte character.

    Not causal: a token's span is placed in the text of the whole sequence; :func:`prefix_texts` reads y<=t only.
    """
    text, walk = decode_walk(token_ids, tokenizer, skip_special_tokens)
    return text, [(start, end) for start, _, end in walk]


def prefix_texts(
    token_ids: Sequence[int], tokenizer: object, skip_special_tokens: bool = True
) -> list[tuple[str, int]]:
    """Per token t, the text of y<=t decoded on its own and where the characters t adds to it start.

    Causal, unlike :func:`token_char_spans`: nothing here reads a token after t. A prefix ending inside a
    multi-byte character leaves that character out until the token completing it arrives, so a byte piece, like
    a skipped special token, adds no characters (its start is the text's length).
    """
    ids = [int(i) for i in token_ids]
    decoded = tokenizer.batch_decode([ids[:k] for k in range(1, len(ids) + 1)],
                                     skip_special_tokens=skip_special_tokens) if ids else []
    out: list[tuple[str, int]] = []
    before = ""
    for text in decoded:
        # A byte piece decodes to U+FFFD; the character it starts belongs to the token that completes it.
        text = text.rstrip("\ufffd")
        same, limit = 0, min(len(before), len(text))
        while same < limit and before[same] == text[same]:
            same += 1
        out.append((text, same))
        before = text
    return out


def token_pieces(tokenizer: object, token_ids: Sequence[int], skip_special_tokens: bool = False) -> list[str]:
    """The text each token adds; the pieces join to the decoded text (a character split over tokens goes to the
    token completing it), so they can be shown side by side, one per token."""
    text, walk = decode_walk(token_ids, tokenizer, skip_special_tokens)
    return [text[start:done] for start, done, _ in walk]
