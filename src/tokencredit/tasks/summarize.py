"""Summarisation: a document in, a one-sentence summary out, scored by ROUGE against human references.

A record (a JSONL line, a dict, or a row of a Hugging Face dataset) looks like::

    {"document": "Due to the success of deep learning ...", "summary": "We provide ...", "references": ["..."]}

``summary`` is the primary reference; ``references`` (optional) may add more, and the metrics take the best
match over all of them. ROUGE comes from Google's ``rouge-score`` package (stemmed, F-measure).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tokencredit.record_files import RecordError, read_jsonl

if TYPE_CHECKING:
    import datasets

INSTRUCTION = "Summarize the following text in one sentence.\n\n{document}"
BASE_PROMPT_END = "TL;DR:"
DEFAULT_DOCUMENT_WORDS = 200  # documents are cut to their first words so prompts stay CPU-sized


class SummaryDataError(RecordError):
    """A summarisation record that cannot be used."""


@dataclass
class Document:
    """A document and its reference summaries (the first is the primary one)."""

    document: str
    references: list[str] = field(default_factory=list)
    id: str | None = None


def parse_document(obj: dict, where: str) -> Document:
    """Validate one record; errors are SummaryDataError starting with ``where``."""
    if not isinstance(obj, dict):
        raise SummaryDataError(f"{where}: expected an object with 'document' and 'summary', got {type(obj).__name__}")
    document = obj.get("document")
    if not isinstance(document, str) or not document.strip():
        raise SummaryDataError(f"{where}: 'document' must be a non-empty string")
    summary = obj.get("summary")
    if summary is not None and not isinstance(summary, str):
        raise SummaryDataError(f"{where}: 'summary' must be a string, got {type(summary).__name__}")
    extra = obj.get("references") or []
    if not isinstance(extra, list) or not all(isinstance(r, str) for r in extra):
        raise SummaryDataError(f"{where}: 'references' must be a list of strings")
    references = []
    for ref in ([summary] if summary else []) + extra:
        ref = " ".join(ref.split())
        if ref and ref not in references:
            references.append(ref)
    record_id = obj.get("id")
    return Document(document.strip(), references, None if record_id is None else str(record_id))


def load_documents(source: str | Path | Sequence[dict] | datasets.Dataset) -> list[Document]:
    """Documents from a .jsonl file (errors name "file:line") or from dicts / an HF dataset ("record N")."""
    if isinstance(source, (str, Path)):
        where = str(source)
        try:
            docs = [parse_document(obj, f"{source}:{lineno}") for lineno, obj in read_jsonl(source)]
        except SummaryDataError:
            raise
        except RecordError as exc:
            raise SummaryDataError(str(exc)) from exc
    else:
        where = "the given records"
        docs = [parse_document(obj, f"record {i}") for i, obj in enumerate(source)]
    if not docs:
        raise SummaryDataError(f"{where}: no documents found")
    return docs


def summary_prompt(document: Document | str, tokenizer: object | None = None, max_words: int = DEFAULT_DOCUMENT_WORDS,
                   chat: bool | None = None) -> str:
    """The prompt for a document (its first ``max_words`` words): the chat template when the tokenizer has one."""
    text = document.document if isinstance(document, Document) else document
    text = " ".join(text.split()[:max_words])
    instruction = INSTRUCTION.format(document=text)
    has_template = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
    if not (has_template if chat is None else chat):
        return f"{instruction}\n{BASE_PROMPT_END}"
    if not has_template:
        raise ValueError("chat=True needs a tokenizer with a chat_template")
    return tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                         add_generation_prompt=True)


def clean_summary(text: str) -> str:
    """A generated summary as it is scored: whitespace collapsed, cut at the first blank line."""
    return " ".join(text.strip().split("\n\n")[0].split())


@functools.lru_cache(maxsize=1)
def _rouge() -> object:
    """ROUGE-1/2/L with Porter stemming."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def rouge_scores(prediction: str, references: Sequence[str]) -> dict[str, float]:
    """Best F-measure over the references of ROUGE-1, -2 and -L; all 0 for an empty prediction."""
    if isinstance(references, str) or not references:
        raise ValueError("references must be a non-empty list of strings")
    if not prediction.strip():
        return {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    scores = _rouge().score_multi(list(references), prediction)
    return {k: float(v.fmeasure) for k, v in scores.items()}


def summary_metrics(predictions: Sequence[str], documents: Sequence[Document]) -> dict[str, float]:
    """Mean ROUGE-1/2/L (best reference each) and mean length in words of cleaned predictions."""
    if isinstance(predictions, str) or len(predictions) != len(documents) or not predictions:
        raise ValueError(f"need one prediction per document ({len(predictions)} predictions, {len(documents)} "
                         "documents)")
    rows = [rouge_scores(clean_summary(p), d.references) for p, d in zip(predictions, documents)]
    out = {k: sum(r[k] for r in rows) / len(rows) for k in ("rouge1", "rouge2", "rougeL")}
    out["mean_length"] = sum(len(clean_summary(p).split()) for p in predictions) / len(predictions)
    return out


def rouge_l_score_fn(documents: Sequence[Document], prompts: Sequence[str]) -> object:
    """A PGG ``score_fn``: ROUGE-L F of each response against its prompt's references (the ranking metric)."""
    if len(prompts) != len(documents):
        raise ValueError(f"{len(prompts)} prompts for {len(documents)} documents")
    by_prompt = {}
    for i, (p, d) in enumerate(zip(prompts, documents)):
        if not d.references:
            raise ValueError(f"document {i} has no reference summary to score against")
        by_prompt[p] = d.references

    def score(prompts: list[str], responses: list[str]) -> list[float]:
        """ROUGE-L F per response."""
        out = []
        for i, (p, r) in enumerate(zip(prompts, responses)):
            refs = by_prompt.get(p)
            if refs is None:
                raise ValueError(f"row {i}: prompt is not one of this task's prompts: {p[:80]!r}")
            out.append(rouge_scores(clean_summary(r), refs)["rougeL"])
        return out

    return score
