"""IMDB review continuation: given the opening words of a movie review, continue it so that it reads positive.

A record (a JSONL line, a dict, or a row of a Hugging Face dataset) looks like::

    {"text": "With the possible exception of John Wayne, ...", "label": 1, "rating": 10, "id": "train/pos/6923_10.txt"}

``label`` is 1 for a positive review and 0 for a negative one; ``rating`` (1-10) and ``id`` are optional and
other fields are ignored. The review text may hold HTML line breaks (``<br />``) as in the original dump.

The reward of a continuation is P(positive) from a sentiment scorer. Two scorers are provided:
:class:`VaderScorer` (a lexicon, needs no training; the default reward) and :class:`BagOfWordsScorer` (logistic
regression trained here on labelled reviews). Training against one and reporting the other shows whether the
policy learned sentiment or learned to please one scorer's quirks.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from tokencredit.record_files import RecordError, read_jsonl

if TYPE_CHECKING:
    import datasets
    import torch

    from tokencredit.rewards.tokens import RewardFn

DEFAULT_PROMPT_WORDS = 48
"""Words of the review shown as the prompt; about 64 GPT-2 tokens, the prompt length used by RLGF for IMDB."""

_TAG = re.compile(r"<[^>]{0,200}>")
# Lowercase words with inner apostrophes ("don't", "wasn't"), so negations stay one feature.
_BOW_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
BOW_FORMAT = "tokencredit.bow_sentiment"
"""The ``format`` field of a saved :class:`BagOfWordsScorer`; a JSON file without it is refused."""


class ReviewDataError(RecordError):
    """An IMDB record that cannot be used; the message says where ("file:line" or "record N")."""


@dataclass
class Review:
    """One movie review: its text (as stored, HTML included), sentiment label (1 = positive) and optional rating."""

    text: str
    label: int
    rating: int | None = None
    id: str | None = None


# ---------------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------------


def parse_review(obj: dict, where: str) -> Review:
    """Validate one record and build a Review; errors are ReviewDataError starting with ``where``."""
    if not isinstance(obj, dict):
        raise ReviewDataError(f"{where}: expected an object with 'text' and 'label', got {type(obj).__name__}")
    text = obj.get("text")
    if not isinstance(text, str):
        got = "nothing" if text is None else type(text).__name__
        raise ReviewDataError(f"{where}: 'text' must be a string (the review), got {got}")
    if not clean_review(text):
        raise ReviewDataError(f"{where}: 'text' is empty")
    label = obj.get("label")
    # bool is an int subclass; true/false in a file is more likely a mistake than a label.
    if isinstance(label, bool) or label not in (0, 1):
        raise ReviewDataError(f"{where}: 'label' must be 0 (negative) or 1 (positive), got {label!r}")
    rating = obj.get("rating")
    if rating is not None and (isinstance(rating, bool) or not isinstance(rating, int)):
        raise ReviewDataError(f"{where}: 'rating' must be an integer or absent, got {rating!r}")
    review_id = obj.get("id")
    return Review(text, int(label), rating, None if review_id is None else str(review_id))


def load_reviews(source: str | Path | Sequence[dict] | datasets.Dataset) -> list[Review]:
    """Reviews from a .jsonl file (errors name "file:line") or from dicts / an HF dataset ("record N", 0-based)."""
    if isinstance(source, (str, Path)):
        where = str(source)
        try:
            reviews = [parse_review(obj, f"{source}:{lineno}") for lineno, obj in read_jsonl(source)]
        except ReviewDataError:
            raise
        except RecordError as exc:  # bad JSON or a missing file: one error type for every data problem
            raise ReviewDataError(str(exc)) from exc
    else:
        where = "the given records"
        reviews = [parse_review(obj, f"record {i}") for i, obj in enumerate(source)]
    if not reviews:
        raise ReviewDataError(f"{where}: no reviews found")
    return reviews


# ---------------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------------


def clean_review(text: str) -> str:
    """The review as plain text: HTML tags become spaces, entities are decoded, whitespace is collapsed."""
    return " ".join(html.unescape(_TAG.sub(" ", text)).split())


def review_prompt(review: Review | str, words: int = DEFAULT_PROMPT_WORDS) -> str:
    """The first ``words`` words of the cleaned review, the text the policy continues (no trailing space)."""
    if words < 1:
        raise ValueError(f"words must be at least 1, got {words}")
    text = review.text if isinstance(review, Review) else review
    return " ".join(clean_review(text).split()[:words])


# ---------------------------------------------------------------------------------------------------------
# Sentiment scorers
# ---------------------------------------------------------------------------------------------------------


@runtime_checkable
class SentimentScorer(Protocol):
    """Anything that gives P(positive) in [0, 1] for each text."""

    def prob_positive(self, texts: Sequence[str]) -> list[float]:
        """P(positive) of each text, in [0, 1]."""
        ...


class VaderScorer:
    """VADER's lexicon and rules: P(positive) = (compound + 1) / 2, so neutral text scores 0.5.

    Needs the ``vaderSentiment`` package, which ships its lexicon (nothing is downloaded). VADER is fast
    (no model), deterministic, and does not know movie-review jargon, which makes it a coarse but honest reward.
    """

    def __init__(self) -> None:
        """Load the lexicon (a few milliseconds); raises ImportError with the install command if VADER is absent."""
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError as exc:
            raise ImportError("VaderScorer needs vaderSentiment: pip install 'vaderSentiment>=3.3'") from exc
        self._analyzer = SentimentIntensityAnalyzer()

    def prob_positive(self, texts: Sequence[str]) -> list[float]:
        """(compound + 1) / 2 of each cleaned text; an empty text scores 0.5 (neutral)."""
        _check_texts(texts)
        return [(self._analyzer.polarity_scores(clean_review(t))["compound"] + 1.0) / 2.0 for t in texts]


def bow_terms(text: str, ngrams: int = 2) -> list[str]:
    """The bag-of-words features of a text: lowercase words, plus word n-grams up to ``ngrams`` joined by spaces."""
    words = _BOW_WORD.findall(clean_review(text).lower())
    terms = list(words)
    for n in range(2, ngrams + 1):
        terms.extend(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))
    return terms


class BagOfWordsScorer:
    """Logistic regression on a bag of words and word bigrams, trained in numpy; saved as JSON (never pickle).

    Each text becomes a vector over the vocabulary with value 1 for every term present, scaled to unit
    length, so long and short reviews are on one scale. Weights are fit by full-batch gradient descent
    (Adam) on the mean log loss plus an L2 penalty; the problem is convex, so the result barely depends on
    the step schedule. Meant as a held-out judge of sentiment, not a state-of-the-art classifier.
    """

    def __init__(self, vocabulary: Sequence[str] = (), weights: Sequence[float] | None = None, bias: float = 0.0,
                 ngrams: int = 2) -> None:
        """A scorer over ``vocabulary`` with one weight per term; build an untrained one with no arguments."""
        if ngrams < 1:
            raise ValueError(f"ngrams must be at least 1, got {ngrams}")
        self.vocabulary = list(vocabulary)
        self.index = {term: i for i, term in enumerate(self.vocabulary)}
        if len(self.index) != len(self.vocabulary):
            raise ValueError("vocabulary has repeated terms")
        self.weights = np.zeros(len(self.vocabulary)) if weights is None else np.asarray(weights, dtype=np.float64)
        if self.weights.shape != (len(self.vocabulary),):
            raise ValueError(f"{self.weights.size} weights for {len(self.vocabulary)} vocabulary terms")
        self.bias = float(bias)
        self.ngrams = ngrams

    # -- training ----------------------------------------------------------------------------------------

    def fit(self, texts: Sequence[str], labels: Sequence[int], *, min_df: int = 2, max_features: int = 30_000,
            l2: float = 1e-4, steps: int = 300, lr: float = 0.05) -> BagOfWordsScorer:
        """Build the vocabulary (terms in at least ``min_df`` texts, the ``max_features`` most common) and fit."""
        _check_texts(texts)
        y = np.asarray(labels, dtype=np.float64)
        if len(texts) != len(y):
            raise ValueError(f"{len(texts)} texts but {len(y)} labels")
        if not set(np.unique(y)) <= {0.0, 1.0} or len(np.unique(y)) < 2:
            raise ValueError("labels must be 0/1 and hold both classes")
        docs = [set(bow_terms(t, self.ngrams)) for t in texts]
        df = Counter(term for doc in docs for term in doc)
        # Ties broken by the term itself, so the vocabulary does not depend on hash order.
        kept = sorted((term for term, count in df.items() if count >= min_df), key=lambda t: (-df[t], t))
        self.vocabulary = sorted(kept[:max_features])
        self.index = {term: i for i, term in enumerate(self.vocabulary)}
        rows, cols, vals = self._features_of(docs)

        n, d = len(docs), len(self.vocabulary)
        w, b = np.zeros(d), 0.0
        m_w, v_w, m_b, v_b = np.zeros(d), np.zeros(d), 0.0, 0.0
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        for step in range(1, steps + 1):
            p = _sigmoid(np.bincount(rows, weights=vals * w[cols], minlength=n) + b)
            residual = (p - y) / n
            grad_w = np.bincount(cols, weights=vals * residual[rows], minlength=d) + l2 * w
            grad_b = float(residual.sum())
            m_w = beta1 * m_w + (1 - beta1) * grad_w
            v_w = beta2 * v_w + (1 - beta2) * grad_w**2
            m_b = beta1 * m_b + (1 - beta1) * grad_b
            v_b = beta2 * v_b + (1 - beta2) * grad_b**2
            scale = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
            w -= scale * m_w / (np.sqrt(v_w) + eps)
            b -= scale * m_b / (math.sqrt(v_b) + eps)
        self.weights, self.bias = w, float(b)
        return self

    def _features_of(self, docs: Sequence[set[str]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sparse unit-length presence vectors as (row, column, value) triples; unknown terms are dropped."""
        rows: list[int] = []
        cols: list[int] = []
        vals: list[float] = []
        for r, doc in enumerate(docs):
            hits = sorted(self.index[t] for t in doc if t in self.index)
            if hits:
                rows.extend([r] * len(hits))
                cols.extend(hits)
                vals.extend([1.0 / math.sqrt(len(hits))] * len(hits))
        return np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64), np.asarray(vals)

    # -- scoring -----------------------------------------------------------------------------------------

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """P(positive) of each text as a float array; a text with no known term gets sigmoid(bias)."""
        _check_texts(texts)
        rows, cols, vals = self._features_of([set(bow_terms(t, self.ngrams)) for t in texts])
        logits = np.bincount(rows, weights=vals * self.weights[cols], minlength=len(texts)) + self.bias
        return _sigmoid(logits)

    def prob_positive(self, texts: Sequence[str]) -> list[float]:
        """P(positive) of each text, in [0, 1] (the SentimentScorer protocol)."""
        return [float(p) for p in self.predict_proba(texts)]

    def accuracy(self, texts: Sequence[str], labels: Sequence[int]) -> float:
        """Share of texts whose thresholded P(positive) (> 0.5) matches the 0/1 label."""
        predicted = self.predict_proba(texts) > 0.5
        return float(np.mean(predicted == np.asarray(labels, dtype=bool)))

    # -- persistence -------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """Everything needed to rebuild the scorer, as plain JSON types."""
        return {"format": BOW_FORMAT, "version": 1, "ngrams": self.ngrams, "bias": self.bias,
                "vocabulary": self.vocabulary, "weights": [float(x) for x in self.weights]}

    @classmethod
    def from_dict(cls, obj: dict, where: str = "scorer") -> BagOfWordsScorer:
        """Rebuild from :meth:`to_dict` output; a ValueError starting with ``where`` names what is wrong."""
        if not isinstance(obj, dict) or obj.get("format") != BOW_FORMAT:
            raise ValueError(f"{where}: not a saved bag-of-words scorer (no format {BOW_FORMAT!r})")
        if obj.get("version") != 1:
            raise ValueError(f"{where}: unsupported version {obj.get('version')!r}; this code reads version 1")
        vocabulary, weights = obj.get("vocabulary"), obj.get("weights")
        if not isinstance(vocabulary, list) or not all(isinstance(t, str) for t in vocabulary):
            raise ValueError(f"{where}: 'vocabulary' must be a list of strings")
        if not isinstance(weights, list) or not all(_is_real(x) for x in weights):
            raise ValueError(f"{where}: 'weights' must be a list of numbers")
        if not _is_real(obj.get("bias")) or not isinstance(obj.get("ngrams"), int):
            raise ValueError(f"{where}: 'bias' must be a number and 'ngrams' an integer")
        try:
            return cls(vocabulary, weights, obj["bias"], obj["ngrams"])
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc

    def save(self, path: str | Path) -> Path:
        """Write the scorer as one JSON file (readable, and loading it cannot run code) and return its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict()), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> BagOfWordsScorer:
        """Read a scorer written by :meth:`save`; a missing or malformed file raises ValueError naming it."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: no such file")
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not a JSON file ({exc})") from exc
        return cls.from_dict(obj, where=str(path))


def train_bow_scorer(reviews: Sequence[Review], **fit_args: object) -> BagOfWordsScorer:
    """A BagOfWordsScorer fit on the texts and labels of ``reviews`` (``fit_args`` go to :meth:`fit`)."""
    return BagOfWordsScorer().fit([r.text for r in reviews], [r.label for r in reviews], **fit_args)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function, written so large |x| neither overflows nor loses the small side."""
    return np.exp(-np.logaddexp(0.0, -x))


def _is_real(x: object) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_texts(texts: object) -> None:
    """Refuse a bare string (it would be scored letter by letter) and non-string entries."""
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise ValueError(f"texts must be a list of strings, got {type(texts).__name__}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"text {i} is {type(text).__name__}, not a string")


# ---------------------------------------------------------------------------------------------------------
# Reward
# ---------------------------------------------------------------------------------------------------------


def imdb_reward_fn(scorer: SentimentScorer | None = None, include_prompt: bool = False) -> RewardFn:
    """The reward contract for IMDB: P(positive) of each response under ``scorer`` (default VADER), in [0, 1].

    By default only the continuation is scored. With the prompt included, a strongly negative opening
    saturates the score (VADER's compound is a squashed sum, a random review opening moves it far), so what
    the policy wrote changes the reward little and the opening adds variance the policy cannot control.
    ``include_prompt=True`` scores prompt + " " + response instead, as RL4LMs' IMDB setup does.
    The prompt-to-record map other tasks keep is not needed here: the reward depends on the text alone.
    """
    scorer = scorer if scorer is not None else VaderScorer()

    def reward(prompts: list[str], responses: list[str], response_token_ids: list[list[int]]) -> list[float]:
        """P(positive) per response (the reward contract)."""
        if not (len(prompts) == len(responses) == len(response_token_ids)):
            raise ValueError(f"{len(prompts)} prompts, {len(responses)} responses and "
                             f"{len(response_token_ids)} token lists; expected one of each per row")
        texts = [f"{p} {r}" for p, r in zip(prompts, responses)] if include_prompt else list(responses)
        return [float(min(1.0, max(0.0, s))) for s in scorer.prob_positive(texts)]

    return reward


# ---------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------


def fluency(model: torch.nn.Module, tokenizer: object, prompts: Sequence[str], continuations: Sequence[str],
            batch_size: int = 8) -> dict[str, float]:
    """Mean negative log-likelihood per continuation token under ``model`` (``nll``) and ``perplexity`` = exp(nll).

    Prompt and continuation are tokenized separately (the prompt with the tokenizer's special tokens, the
    continuation without) and joined, so a word split across the boundary does not change which tokens are
    scored. The mean is over all continuation tokens of all rows (corpus perplexity); an empty continuation,
    or a prompt with no tokens (its first token would have no context), leaves the row out.
    Pass the starting model: the number then says how far the policy's text drifted from that LM.
    """
    import torch

    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rows = []
    for prompt, cont in zip(prompts, continuations):
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        cont_ids = tokenizer(cont, add_special_tokens=False)["input_ids"] if cont else []
        if cont_ids and prompt_ids:
            rows.append((prompt_ids, cont_ids))
    if not rows:
        raise ValueError("no continuation tokens to score")
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            width = max(len(p) + len(c) for p, c in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            scored = torch.zeros(len(batch), width, dtype=torch.bool)
            for i, (p, c) in enumerate(batch):  # right padding: positions then need no adjusting
                ids[i, : len(p) + len(c)] = torch.tensor(p + c)
                mask[i, : len(p) + len(c)] = 1
                scored[i, len(p) : len(p) + len(c)] = True
            ids, mask, scored = ids.to(device), mask.to(device), scored.to(device)
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
            # Token t is predicted by the logits at t - 1.
            logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            target = scored[:, 1:]
            total_nll -= float(logprobs[target].sum())
            total_tokens += int(target.sum())
    finally:
        model.train(was_training)
    nll = total_nll / total_tokens
    return {"nll": nll, "perplexity": math.exp(nll)}


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Distinct n-grams over all n-grams in all texts (lowercase whitespace words); 0.0 when there are none."""
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        words = text.lower().split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else 0.0


def imdb_metrics(prompts: Sequence[str], continuations: Sequence[str], reward_scorer: SentimentScorer | None = None,
                 heldout_scorer: SentimentScorer | None = None, model: torch.nn.Module | None = None,
                 tokenizer: object | None = None) -> dict[str, float]:
    """Evaluation of IMDB continuations; a key is left out when what it needs is not given.

    ``reward_p_pos`` / ``heldout_p_pos``: mean P(positive) of the continuations under the reward scorer and
    the held-out scorer; ``nll`` / ``perplexity``: under ``model`` (the starting model) via :func:`fluency`;
    ``mean_length``: mean whitespace words per continuation; ``distinct_1`` / ``distinct_2``: corpus-level
    share of distinct word unigrams / bigrams (low values mean repetitive, collapsed text).
    """
    if isinstance(continuations, str) or isinstance(prompts, str):
        raise ValueError("prompts and continuations must be lists of strings, not a single string")
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    if not continuations:
        raise ValueError("no continuations to score")
    out: dict[str, float] = {}
    if reward_scorer is not None:
        out["reward_p_pos"] = float(np.mean(reward_scorer.prob_positive(list(continuations))))
    if heldout_scorer is not None:
        out["heldout_p_pos"] = float(np.mean(heldout_scorer.prob_positive(list(continuations))))
    if model is not None:
        if tokenizer is None:
            raise ValueError("perplexity needs the model's tokenizer too")
        out.update(fluency(model, tokenizer, prompts, continuations))
    out["mean_length"] = float(np.mean([len(c.split()) for c in continuations]))
    out["distinct_1"] = distinct_n(continuations, 1)
    out["distinct_2"] = distinct_n(continuations, 2)
    return out
