"""Small built-in rewards for the default PPO run and for trying the engine; not a reward model.

`PositiveWords` is a per-token reward: each token that is part of a word in a small positive lexicon gets
+1, each token of a negative word gets -1, everything else 0. It shows credit landing on the tokens that
earned it, with no model to train.
"""

from __future__ import annotations

import re

from tokencredit.token_text import token_pieces

POSITIVE = frozenset(
    "good great lovely wonderful happy nice beautiful delightful pleasant enjoy enjoyed enjoyable fun amazing "
    "excellent fantastic calm sunny bright friendly warm perfect delicious love loved glad cheerful relaxing "
    "peaceful fresh kind best".split()
)
NEGATIVE = frozenset(
    "bad terrible awful sad boring horrible annoying angry cold dull worst hate hated slow ugly noisy "
    "disappointing stressful tired rude broken late miserable".split()
)
_WORD = re.compile(r"[A-Za-z']+")


class PositiveWords:
    """Per-token lexicon reward: +1 on tokens of positive words, -1 on tokens of negative words."""

    def __init__(self, tokenizer: object) -> None:
        """Keep the tokenizer to find each token's characters."""
        self.tokenizer = tokenizer

    def __call__(self, prompts: list[str], responses: list[str], response_token_ids: list[list[int]]) -> list:
        """One list of token rewards per response."""
        return [self._row(ids) for ids in response_token_ids]

    def _row(self, ids: list[int]) -> list[float]:
        """Token rewards of one response, via the character span each token decodes to."""
        pieces = token_pieces(self.tokenizer, ids, skip_special_tokens=True)
        text = "".join(pieces)
        char_score = [0.0] * len(text)
        for m in _WORD.finditer(text):
            word = m.group().lower()
            score = 1.0 if word in POSITIVE else -1.0 if word in NEGATIVE else 0.0
            for c in range(m.start(), m.end()):
                char_score[c] = score
        out, pos = [], 0
        for piece in pieces:
            span = char_score[pos : pos + len(piece)]
            # A token gets its word's score once, whatever the number of its characters.
            out.append(max(span, key=abs) if span else 0.0)
            pos += len(piece)
        return out
