"""Few-shot discrete prompt generation: the policy writes a short prompt; a frozen LM classifies with it.

A *prompted classifier* puts each example text and the prompt into a template (``"{text} {prompt}"``) and
reads the frozen model's next-token log-probabilities of one label word per class (``" terrible"`` /
``" great"``); the predicted class is the likeliest label word. The score of a prompt on labelled examples is
the mean classification margin, log p(correct word) - max log p(other words), so a prompt is rewarded for
being right by a wide margin, not only for being right (RLPrompt's signal, arXiv 2205.12548, as PGG uses it).

Records are the 16-shot splits of RLPrompt: TSV files with a header (``sentence`` or ``text``, then ``label``).
"""

from __future__ import annotations

import copy
import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tokencredit.generation import cache_keyword, encode_prompts, output_cache, position_ids_from_mask
from tokencredit.precision import autocast, resolve_mixed_precision
from tokencredit.record_files import RecordError
from tokencredit.textbounds import head_within

# Label words per class (distinct first tokens under the built-in tokenizer); see the module docstring.
LABEL_WORDS: dict[str, list[str]] = {
    "sst-2": ["negative", "positive"],
    "yelp-2": ["negative", "positive"],
    "agnews": ["World", "Sports", "Business", "Tech"],
}
# A hand-written prompt per dataset: the baseline a generated prompt has to beat.
HAND_PROMPTS: dict[str, str] = {
    "sst-2": "All in all, the movie was",
    "yelp-2": "All in all, the place was",
    "agnews": "This news article is about",
}
# What the policy is asked to write (the policy sees this, never the examples).
INSTRUCTIONS: dict[str, str] = {
    "sst-2": "Write a short phrase to put after a movie review, so that the next word says if the review is "
             "positive or negative.",
    "yelp-2": "Write a short phrase to put after a restaurant review, so that the next word says if the review "
              "is positive or negative.",
    "agnews": "Write a short phrase to put after a news article, so that the next word names its topic.",
}
TEMPLATE = "{text} {prompt}"
CONTENT_FREE = "N/A"


class FewShotDataError(RecordError):
    """A few-shot file that cannot be read as labelled examples."""


@dataclass
class LabelledText:
    """One example: its text and its class index."""

    text: str
    label: int


def load_labelled_tsv(path: str | Path, num_classes: int | None = None) -> list[LabelledText]:
    """Examples from a TSV with a header row (a ``sentence`` or ``text`` column and a ``label`` column)."""
    path = Path(path)
    if not path.is_file():
        raise FewShotDataError(f"{path}: no such file")
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            raise FewShotDataError(f"{path}: the file is empty")
        columns = [c.strip().lower() for c in header]
        text_col = next((columns.index(c) for c in ("sentence", "text") if c in columns), None)
        if text_col is None or "label" not in columns:
            raise FewShotDataError(f"{path}:1: the header must name a 'sentence' or 'text' column and a 'label' "
                                   f"column (got {header})")
        label_col = columns.index("label")
        out = []
        for lineno, row in enumerate(reader, start=2):
            if not row or not any(cell.strip() for cell in row):
                continue
            if len(row) <= max(text_col, label_col):
                raise FewShotDataError(f"{path}:{lineno}: expected {len(header)} tab-separated fields, got {len(row)}")
            try:
                label = int(row[label_col])
            except ValueError:
                raise FewShotDataError(f"{path}:{lineno}: label must be an integer (got {row[label_col]!r})") from None
            if label < 0 or (num_classes is not None and label >= num_classes):
                raise FewShotDataError(f"{path}:{lineno}: label {label} is outside 0..{(num_classes or 1) - 1}")
            text = " ".join(row[text_col].split())
            if not text:
                raise FewShotDataError(f"{path}:{lineno}: empty text")
            out.append(LabelledText(text, label))
    if not out:
        raise FewShotDataError(f"{path}: no examples")
    return out


def load_fewshot_split(folder: str | Path, dataset: str | None = None) -> dict[str, list[LabelledText]]:
    """``{"train", "dev", "test"}`` examples of one split folder (e.g. ``fewshot/sst-2/16-42``); test may be absent."""
    folder = Path(folder)
    dataset = dataset or folder.parent.name
    classes = len(LABEL_WORDS[dataset]) if dataset in LABEL_WORDS else None
    out = {}
    for name in ("train", "dev", "test"):
        if (folder / f"{name}.tsv").exists():
            out[name] = load_labelled_tsv(folder / f"{name}.tsv", classes)
    if "train" not in out:
        raise FewShotDataError(f"{folder}: no train.tsv")
    return out


def clean_prompt(text: str, max_words: int = 12) -> str:
    """A generated prompt as it goes into the template: its first line, at most ``max_words`` words."""
    for line in text.splitlines():
        if line.strip():
            return " ".join(line.split()[:max_words])
    return ""


class PromptedClassifier:
    """A frozen causal LM that classifies a text with a prompt by its next-token log-probs of the label words."""

    KEEP_BATCHES = 16  # text batches whose KV caches stay kept (PGG's train and dev sets need one or two)

    def __init__(self, model: nn.Module, tokenizer: object, label_words: Sequence[str], template: str = TEMPLATE,
                 batch_size: int = 32, max_text_tokens: int = 128, calibrate: bool = True,
                 mixed_precision: str = "auto", max_rows: int = 128, keep_texts: int = 128) -> None:
        """``label_words`` in class order; each must start with a different token (with a leading space).
        ``calibrate``: subtract each word's log-prob after a content-free text with the same prompt;
        ``mixed_precision``: "auto" runs the forward under bf16 autocast where bf16 matmuls are native;
        ``max_rows``: (text, prompt) pairs per batched pass over the prompt tokens (bounds the repeated KV cache;
        at 128, 96 SmolLM2 prompts on 33 SST-2 texts took 30 s on one core with a 1.5 GB peak);
        ``keep_texts``: a call on at most this many texts keeps their KV cache for later calls on the same texts."""
        if len(label_words) < 2:
            raise ValueError("a classifier needs at least two label words")
        if "{text}" not in template or "{prompt}" not in template or template.index("{text}") > template.index(
                "{prompt}"):
            raise ValueError("template must contain {text} and then {prompt} (the text's KV cache is shared)")
        self._before, self._after = template.split("{text}", 1)
        ids = [tokenizer(" " + w.strip(), add_special_tokens=False)["input_ids"] for w in label_words]
        if any(not i for i in ids):
            raise ValueError(f"a label word has no tokens: {label_words}")
        firsts = [i[0] for i in ids]
        if len(set(firsts)) != len(firsts):
            raise ValueError(f"label words {list(label_words)} must start with different tokens")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.label_ids = torch.tensor(firsts)
        self.template = template
        self.batch_size = batch_size
        self.max_text_tokens = max_text_tokens
        self.calibrate = calibrate
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1 (got {max_rows})")
        self.max_rows = max_rows
        self.keep_texts = keep_texts
        # insertion-ordered: the least recently used batch goes first once more than KEEP_BATCHES are kept
        self._kept: dict[tuple[str, ...], tuple] = {}
        self.amp_dtype = resolve_mixed_precision(mixed_precision, next(model.parameters()).device)

    def _head(self, text: str) -> str:
        """The template up to and including the text; long texts keep their first ``max_text_tokens`` tokens."""
        # A text that may fit is tokenized whole; a longer one only far enough to give the same first tokens.
        ids = self.tokenizer(head_within(self.tokenizer, text, self.max_text_tokens), add_special_tokens=False)[
            "input_ids"]
        if len(ids) > self.max_text_tokens:
            text = self.tokenizer.decode(ids[: self.max_text_tokens])
        return self._before + text

    def _tail_ids(self, prompt: str) -> list[int]:
        """Tokens of the template after the text, with the prompt filled in (trailing spaces dropped)."""
        tail = self._after.format(prompt=prompt).rstrip()
        return list(self.tokenizer(tail, add_special_tokens=False)["input_ids"]) if tail else []

    def _text_pass(self, heads: tuple[str, ...], keep: bool) -> tuple:
        """Token ids, mask, KV cache and no-prompt label log-probs of a batch of texts; kept when ``keep``, since
        a PGG run scores every sampled prompt on the same few training texts."""
        if heads in self._kept:
            self._kept[heads] = self._kept.pop(heads)  # most recently used last
            return self._kept[heads]
        device = next(self.model.parameters()).device
        ids, mask = encode_prompts(self.tokenizer, list(heads), None, device)
        first = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                           use_cache=True, logits_to_keep=1)
        alone = torch.log_softmax(first.logits[:, -1].float(), -1)[:, self.label_ids.to(device)].cpu()
        result = (ids, mask, output_cache(first), alone)
        if keep:
            self._kept[heads] = result
            while len(self._kept) > self.KEEP_BATCHES:  # a caller scoring many different text sets stays bounded
                self._kept.pop(next(iter(self._kept)))
        return result

    @torch.no_grad()
    def label_logprobs_many(self, texts: Sequence[str], prompts: Sequence[str]) -> torch.Tensor:
        """[P, N, C] log-probability of each class's label word as the next token, for every prompt and text.

        Each batch of texts is run once; its KV cache is then repeated for a group of prompts and every
        (text, prompt) pair's tail runs in one forward pass, so scoring P prompts costs one pass over the texts plus
        a few batched passes over the short prompt tokens (8 prompts on 33 SST-2 texts: 3.1 s against 4.5 s with
        one small pass per prompt, 2 CPU cores).
        """
        device = next(self.model.parameters()).device
        tails = [self._tail_ids(p) for p in prompts]
        keyword = cache_keyword(self.model)
        label_ids = self.label_ids.to(device)
        pad = self.tokenizer.pad_token_id
        out = torch.empty(len(prompts), len(texts), len(self.label_ids))
        with_tail = [j for j, tail in enumerate(tails) if tail]
        for begin in range(0, len(texts), self.batch_size):
            heads = tuple(self._head(t) for t in texts[begin : begin + self.batch_size])
            rows, n = slice(begin, begin + len(heads)), len(heads)
            with autocast(device, self.amp_dtype):
                ids, mask, cache, alone = self._text_pass(heads, keep=len(texts) <= self.keep_texts)
                for j, tail in enumerate(tails):
                    if not tail:
                        out[j, rows] = alone
                group_size = max(1, self.max_rows // n)
                for g in range(0, len(with_tail), group_size):
                    group = with_tail[g : g + group_size]
                    width = max(len(tails[j]) for j in group)
                    # Text-major rows (text i, prompt j) as batch_repeat_interleave lays the cache out; short tails
                    # are padded on the left, masked, so every row's last position is its own last token.
                    tail_ids = torch.tensor([[pad] * (width - len(tails[j])) + tails[j] for _ in range(n)
                                             for j in group], device=device)
                    tail_mask = torch.tensor([[0] * (width - len(tails[j])) + [1] * len(tails[j]) for _ in range(n)
                                              for j in group], device=device, dtype=mask.dtype)
                    full = torch.cat([mask.repeat_interleave(len(group), 0), tail_mask], 1)
                    repeated = copy.deepcopy(cache)  # the texts' own cache is kept for the next group or call
                    repeated.batch_repeat_interleave(len(group))
                    logits = self.model(input_ids=tail_ids, attention_mask=full,
                                        position_ids=position_ids_from_mask(full)[:, ids.size(1):],
                                        use_cache=True, logits_to_keep=1, **{keyword: repeated}).logits[:, -1]
                    scores = torch.log_softmax(logits.float(), -1)[:, label_ids].cpu().view(n, len(group), -1)
                    out[group, rows] = scores.transpose(0, 1)
                    del repeated
        return out

    def label_logprobs(self, texts: Sequence[str], prompt: str) -> torch.Tensor:
        """[N, C] log-probability of each class's label word as the next token (normalised over the vocabulary)."""
        return self.label_logprobs_many(texts, [prompt])[0]

    def label_scores_many(self, texts: Sequence[str], prompts: Sequence[str]) -> torch.Tensor:
        """[P, N, C] score per class: label-word log-probs, minus the content-free text's when calibrated."""
        scores = self.label_logprobs_many(list(texts) + ([CONTENT_FREE] if self.calibrate else []), prompts)
        if self.calibrate:
            scores = scores[:, :-1] - scores[:, -1:]
        return scores

    def label_scores(self, texts: Sequence[str], prompt: str) -> torch.Tensor:
        """[N, C] :meth:`label_scores_many` for one prompt."""
        return self.label_scores_many(texts, [prompt])[0]

    def margins_many(self, examples: Sequence[LabelledText], prompts: Sequence[str]) -> torch.Tensor:
        """[P, N] score of the correct class - the best other class's: > 0 exactly when an example is right."""
        lp = self.label_scores_many([e.text for e in examples], prompts)
        labels = torch.tensor([e.label for e in examples])
        if int(labels.max()) >= lp.size(-1):
            raise ValueError(f"label {int(labels.max())} but only {lp.size(-1)} label words")
        index = labels[None, :, None].expand(lp.size(0), -1, 1)
        correct = lp.gather(-1, index).squeeze(-1)
        others = lp.scatter(-1, index, float("-inf")).max(-1).values
        return correct - others

    def margins(self, examples: Sequence[LabelledText], prompt: str) -> torch.Tensor:
        """[N] :meth:`margins_many` for one prompt."""
        return self.margins_many(examples, [prompt])[0]

    def accuracy(self, examples: Sequence[LabelledText], prompt: str) -> float:
        """Share of examples whose best-scoring class is the correct one."""
        return float((self.margins(examples, prompt) > 0).float().mean())

    def accuracy_many(self, examples: Sequence[LabelledText], prompts: Sequence[str]) -> list[float]:
        """:meth:`accuracy` of each prompt, sharing one pass over the examples."""
        return (self.margins_many(examples, prompts) > 0).float().mean(-1).tolist()

    def score_fn(self, examples: Sequence[LabelledText], max_words: int = 12) -> object:
        """A PGG ``score_fn``: each response, used as the prompt, scores its mean margin on ``examples``."""
        cache: dict[str, float] = {}

        def score(prompts: list[str], responses: list[str]) -> list[float]:
            """Mean classification margin of each generated prompt (its first line)."""
            cleaned = [clean_prompt(r, max_words) for r in responses]
            new = sorted(set(cleaned) - set(cache))
            if new:
                cache.update(zip(new, self.margins_many(examples, new).mean(-1).tolist()))
            return [cache[p] for p in cleaned]

        return score
