"""Few-shot discrete prompt generation: the policy writes a short prompt; a frozen LM classifies with it.

A *prompted classifier* puts each example text and the prompt into a template (``"{text} {prompt}"``) and
reads the frozen model's next-token log-probabilities of one label word per class (``" terrible"`` /
``" great"``); the predicted class is the likeliest label word. The score of a prompt on labelled examples is
the mean classification margin, log p(correct word) - max log p(other words), so a prompt is rewarded for
being right by a wide margin, not only for being right (RLPrompt's signal, arXiv 2205.12548, as PGG uses it).

Records are the 16-shot splits of RLPrompt: TSV files with a header (``sentence`` or ``text``, then ``label``).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tokencredit.generation import encode_prompts, position_ids_from_mask
from tokencredit.precision import autocast, resolve_mixed_precision
from tokencredit.records import RecordError

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

    def __init__(self, model: nn.Module, tokenizer: object, label_words: Sequence[str], template: str = TEMPLATE,
                 batch_size: int = 32, max_text_tokens: int = 128, calibrate: bool = True,
                 mixed_precision: str = "auto") -> None:
        """``label_words`` in class order; each must start with a different token (with a leading space).
        ``calibrate``: subtract each word's log-prob after a content-free text with the same prompt;
        ``mixed_precision``: "auto" runs the forward under bf16 autocast where bf16 matmuls are native."""
        if len(label_words) < 2:
            raise ValueError("a classifier needs at least two label words")
        if "{text}" not in template or "{prompt}" not in template:
            raise ValueError("template must contain {text} and {prompt}")
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
        self.amp_dtype = resolve_mixed_precision(mixed_precision, next(model.parameters()).device)

    def _inputs(self, texts: Sequence[str], prompt: str) -> list[str]:
        """The template filled in; long texts keep their first ``max_text_tokens`` tokens."""
        out = []
        for text in texts:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) > self.max_text_tokens:
                text = self.tokenizer.decode(ids[: self.max_text_tokens])
            out.append(self.template.format(text=text, prompt=prompt).rstrip())
        return out

    def label_scores(self, texts: Sequence[str], prompt: str) -> torch.Tensor:
        """[N, C] the classifier's score per class: label-word log-probs, minus the content-free ones if calibrated."""
        scores = self.label_logprobs(texts, prompt)
        if self.calibrate:
            scores = scores - self.label_logprobs([CONTENT_FREE], prompt)
        return scores

    @torch.no_grad()
    def label_logprobs(self, texts: Sequence[str], prompt: str) -> torch.Tensor:
        """[N, C] log-probability of each class's label word as the next token (normalised over the vocabulary)."""
        device = next(self.model.parameters()).device
        rows = []
        inputs = self._inputs(texts, prompt)
        for begin in range(0, len(inputs), self.batch_size):
            ids, mask = encode_prompts(self.tokenizer, inputs[begin : begin + self.batch_size], None, device)
            with autocast(device, self.amp_dtype):
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                                    use_cache=False, logits_to_keep=1).logits[:, -1].float()
            rows.append(torch.log_softmax(logits, -1)[:, self.label_ids.to(device)].cpu())
        return torch.cat(rows)

    def margins(self, examples: Sequence[LabelledText], prompt: str) -> torch.Tensor:
        """[N] score of the correct class - the best other class's: > 0 exactly when the example is classified right."""
        lp = self.label_scores([e.text for e in examples], prompt)
        labels = torch.tensor([e.label for e in examples])
        if int(labels.max()) >= lp.size(1):
            raise ValueError(f"label {int(labels.max())} but only {lp.size(1)} label words")
        correct = lp.gather(1, labels[:, None]).squeeze(1)
        others = lp.scatter(1, labels[:, None], float("-inf")).max(1).values
        return correct - others

    def accuracy(self, examples: Sequence[LabelledText], prompt: str) -> float:
        """Share of examples whose best-scoring class is the correct one."""
        return float((self.margins(examples, prompt) > 0).float().mean())

    def score_fn(self, examples: Sequence[LabelledText], max_words: int = 12) -> object:
        """A PGG ``score_fn``: each response, used as the prompt, scores its mean margin on ``examples``."""
        cache: dict[str, float] = {}

        def score(prompts: list[str], responses: list[str]) -> list[float]:
            """Mean classification margin of each generated prompt (its first line)."""
            out = []
            for response in responses:
                prompt = clean_prompt(response, max_words)
                if prompt not in cache:
                    cache[prompt] = float(self.margins(examples, prompt).mean())
                out.append(cache[prompt])
            return out

        return score
