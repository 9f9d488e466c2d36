"""Query generation: write the query a user will search next, given their recent web searches and clicks.

A record (a JSONL line, a dict, or a row of a Hugging Face dataset) looks like::

    {"history": [{"query": "python list sort", "clicked": ["Python List sort() Method - W3Schools"]}, ...],
     "target_query": "python sort list of dicts by key", "id": "u017-2", "user_id": "u017"}

``id`` (or ``session_id``) and ``user_id`` are optional; other fields are ignored. ``clicked`` holds the
titles of the results the user clicked after that query and may be missing (no clicks).

The package ships a small dataset of its own (:func:`builtin_sessions`), written by
``scripts/make_querygen_data.py``; see ``tokencredit/data/querygen/README.md``.
"""

from __future__ import annotations

import functools
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from tokencredit.record_files import RecordError, read_jsonl

if TYPE_CHECKING:
    import datasets

DEFAULT_INSTRUCTION = (
    "Given a user's recent web searches and the results they clicked, write the search query they will "
    "type next. Answer with the query only."
)
BASE_PROMPT_END = "Next query:"
"""Last line of a plain-text (base model) prompt; the response then starts with a space."""

# Quotes and sentence punctuation a model may wrap its answer in; brackets stay ("401(k)").
_EDGE_CHARS = "\"'`“”‘’«»„.,;:!? \t\n"
# A word, with inner apostrophes, dots and hyphens kept ("don't", "node.js", "e-bike").
_WORD = re.compile(r"[^\W_]+(?:['’.\-][^\W_]+)*")


class QueryDataError(RecordError):
    """A query-generation record that cannot be used; the message says where ("file:line" or "record N")."""


@dataclass
class HistoryEntry:
    """One earlier search: the query typed and the titles of the results clicked (possibly none)."""

    query: str
    clicked: list[str]


@dataclass
class QuerySession:
    """Earlier searches of one session (oldest first) and the query the user typed next."""

    history: list[HistoryEntry]
    target_query: str
    id: str | None = None
    user_id: str | None = None


# ---------------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------------


def parse_session(obj: dict, where: str) -> QuerySession:
    """Validate one record and build a QuerySession; errors are QueryDataError starting with ``where``."""
    if not isinstance(obj, dict):
        kind = type(obj).__name__
        raise QueryDataError(f"{where}: expected an object with 'history' and 'target_query', got {kind}")
    history = obj.get("history")
    if history is None:
        raise QueryDataError(f"{where}: missing 'history' (a list of {{'query': ..., 'clicked': [...]}} entries)")
    if isinstance(history, dict) and isinstance(history.get("query"), list):
        # A Hugging Face dataset whose history column was declared as Sequence({...}) yields a dict of lists.
        history = _rows_from_columns(history)
    if not isinstance(history, list):
        raise QueryDataError(f"{where}: 'history' must be a list of entries, got {type(history).__name__}")
    if not history:
        raise QueryDataError(f"{where}: 'history' is empty; a session needs at least one earlier query")
    entries = [_parse_entry(entry, f"{where}: history[{i}]") for i, entry in enumerate(history)]

    target = obj.get("target_query")
    if target is None:
        raise QueryDataError(f"{where}: missing 'target_query' (the query the user typed next)")
    if not isinstance(target, str):
        raise QueryDataError(f"{where}: 'target_query' must be a string, got {type(target).__name__}")
    if not target.strip():
        raise QueryDataError(f"{where}: 'target_query' is empty")
    session_id = obj.get("id") if obj.get("id") is not None else obj.get("session_id")
    user_id = _optional_str(obj.get("user_id"))
    return QuerySession(entries, target.strip(), id=_optional_str(session_id), user_id=user_id)


def _parse_entry(entry: object, where: str) -> HistoryEntry:
    """Validate one history entry; a missing or null ``clicked`` means no clicks."""
    if not isinstance(entry, dict):
        raise QueryDataError(f"{where} must be an object with 'query' and 'clicked', got {type(entry).__name__}")
    query = entry.get("query")
    if not isinstance(query, str) or not query.strip():
        raise QueryDataError(f"{where}: 'query' must be a non-empty string, got {query!r}")
    clicked = entry.get("clicked")
    if clicked is None:
        clicked = []
    if not isinstance(clicked, list) or not all(isinstance(title, str) for title in clicked):
        raise QueryDataError(f"{where}: 'clicked' must be a list of strings (result titles), got {clicked!r}")
    return HistoryEntry(query.strip(), [title.strip() for title in clicked if title.strip()])


def _rows_from_columns(columns: dict) -> list[dict]:
    """Turn {"query": [...], "clicked": [...]} into [{"query": ..., "clicked": ...}, ...]."""
    queries = columns["query"]
    clicked = columns.get("clicked") or [None] * len(queries)
    return [{"query": q, "clicked": c} for q, c in zip(queries, clicked)]


def _optional_str(value: object) -> str | None:
    """Ids may be numbers in some files; keep them as text, and None as None."""
    return None if value is None else str(value)


def load_sessions(source: str | Path | Sequence[dict] | datasets.Dataset) -> list[QuerySession]:
    """Sessions from a .jsonl file (errors name "file:line") or from dicts / an HF dataset ("record N", 0-based)."""
    if isinstance(source, (str, Path)):
        where = str(source)
        try:
            sessions = [parse_session(obj, f"{source}:{lineno}") for lineno, obj in read_jsonl(source)]
        except QueryDataError:
            raise
        except RecordError as exc:  # bad JSON or a missing file: same error type for every data problem
            raise QueryDataError(str(exc)) from exc
    else:
        where = "the given records"
        sessions = [parse_session(obj, f"record {i}") for i, obj in enumerate(source)]
    if not sessions:
        raise QueryDataError(f"{where}: no sessions found")
    return sessions


def builtin_sessions(split: Literal["train", "test"]) -> list[QuerySession]:
    """The built-in sessions shipped with the package (our own data; see data/querygen/README.md)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    resource = resources.files("tokencredit") / "data" / "querygen" / f"{split}.jsonl"
    with resources.as_file(resource) as path:
        return load_sessions(path)


def split_sessions(
    sessions: Sequence[QuerySession], test_fraction: float = 0.2, seed: int = 0, by_user: bool = True
) -> tuple[list[QuerySession], list[QuerySession]]:
    """Split into (train, test), deterministic in ``seed``; with ``by_user`` no user_id is on both sides.

    Whole groups (a user's sessions; a session without user_id is its own group) go to the test side in a
    seeded random order until it holds about ``test_fraction`` of the sessions. Both sides keep input order.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    groups: dict[str, list[int]] = {}
    for i, session in enumerate(sessions):
        key = f"user:{session.user_id}" if by_user and session.user_id is not None else f"row:{i}"
        groups.setdefault(key, []).append(i)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    wanted = round(test_fraction * len(sessions))
    if len(keys) >= 2:
        wanted = max(wanted, 1)
    test_rows: set[int] = set()
    for key in keys[:-1]:  # the last group always stays in train, so train is never empty
        if len(test_rows) >= wanted:
            break
        test_rows.update(groups[key])
    train = [s for i, s in enumerate(sessions) if i not in test_rows]
    test = [s for i, s in enumerate(sessions) if i in test_rows]
    return train, test


# ---------------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------------


@dataclass
class PromptTemplate:
    """How a session is shown to the model; short on purpose, since prompt tokens cost time on a CPU."""

    max_history: int = 4
    """Most recent earlier searches shown (oldest of them first); older ones are left out."""
    max_clicked: int = 2
    """Clicked titles shown per search, in the order they were clicked."""
    instruction: str = DEFAULT_INSTRUCTION
    """Task description put before the history."""
    max_title_chars: int = 80
    """Longer titles are cut and end with "…"."""
    instruction_as_system: bool = False
    """Chat form: send the instruction as the system message (replacing a template's default system prompt,
    which saves prompt tokens); off by default because some chat templates reject a system role."""

    def __post_init__(self) -> None:
        """Reject settings that would show nothing or break the layout."""
        if self.max_history < 1:
            raise ValueError(f"max_history must be at least 1, got {self.max_history}")
        if self.max_clicked < 0:
            raise ValueError(f"max_clicked must be 0 or more, got {self.max_clicked}")
        if self.max_title_chars < 2:
            raise ValueError(f"max_title_chars must be at least 2, got {self.max_title_chars}")


def render_prompt(
    session: QuerySession,
    tokenizer: object | None = None,
    template: PromptTemplate | None = None,
    chat: bool | None = None,
) -> str:
    """The prompt for one session: the tokenizer's chat template if it has one (``chat=None``), else plain text.

    Plain text ends with "Next query:"; the chat form is one user message (instruction + history; or the
    instruction as system message with ``instruction_as_system``) followed by
    the generation prompt, with no system message of ours (a template may add its own default one).
    """
    template = template or PromptTemplate()
    has_chat_template = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
    use_chat = has_chat_template if chat is None else chat
    parts = [template.instruction.strip(), _history_block(session, template)]
    body = "\n\n".join(part for part in parts if part)
    if not use_chat:
        return f"{body}\n{BASE_PROMPT_END}"
    if not has_chat_template:
        raise ValueError("chat=True needs a tokenizer with a chat_template; pass chat=False for plain text")
    if template.instruction_as_system and template.instruction.strip():
        messages = [{"role": "system", "content": template.instruction.strip()},
                    {"role": "user", "content": _history_block(session, template)}]
    else:
        messages = [{"role": "user", "content": body}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _history_block(session: QuerySession, template: PromptTemplate) -> str:
    """Numbered recent searches, each followed by its clicked titles."""
    lines = ["Searches so far:"]
    for number, entry in enumerate(_visible(session, template), 1):
        lines.append(f"{number}. {_one_line(entry.query)}")
        for title in entry.clicked[: template.max_clicked]:
            lines.append(f"   clicked: {_shorten(title, template.max_title_chars)}")
    return "\n".join(lines)


def _visible(session: QuerySession, template: PromptTemplate) -> list[HistoryEntry]:
    """The history entries a prompt shows: the last ``max_history``."""
    return session.history[-template.max_history :]


def _one_line(text: str) -> str:
    """Collapse whitespace so a stray newline in a title or query cannot break the numbered layout."""
    return " ".join(text.split())


def _shorten(text: str, limit: int) -> str:
    """``text`` on one line, cut to at most ``limit`` characters with a trailing "…"."""
    text = _one_line(text)
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def session_context(session: QuerySession, template: PromptTemplate | None = None) -> dict:
    """What a reference-based labeler needs: the target and the queries/clicked titles the prompt shows."""
    template = template or PromptTemplate()
    visible = _visible(session, template)
    return {
        "target": session.target_query,
        "clicked": [title for entry in visible for title in entry.clicked[: template.max_clicked]],
        "queries": [entry.query for entry in visible],
    }


# ---------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------


def normalize_query(q: str) -> str:
    """Lowercase, one space between words, and no quotes or punctuation around the query."""
    text = unicodedata.normalize("NFKC", q).lower()
    return " ".join(text.split()).strip(_EDGE_CHARS)


def query_tokens(q: str) -> list[str]:
    """Words of the normalized query (inner apostrophes, dots and hyphens kept; other punctuation dropped)."""
    return _WORD.findall(normalize_query(q))


def per_example_metrics(pred: str, ref: str) -> dict[str, float]:
    """Exact match (``em``), token F1 (``f1``), its precision (``p``) and recall (``r``), and ROUGE-L F
    (``rouge_l``) of one prediction, each in [0, 1]; ``words`` and ``ref_words`` count the normalized words.

    Precision and recall tell a shorter query's gain from a better one's: dropping words raises precision and
    lowers recall.
    """
    precision, recall = _token_precision_recall(pred, ref)
    return {
        "em": float(normalize_query(pred) == normalize_query(ref)),
        "f1": _token_f1(pred, ref),
        "p": precision,
        "r": recall,
        "rouge_l": _rouge_scorer().score(normalize_query(ref), normalize_query(pred))["rougeL"].fmeasure,
        "words": float(len(query_tokens(pred))),
        "ref_words": float(len(query_tokens(ref))),
    }


def query_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ``exact_match``, ``token_f1`` (with ``token_precision`` and ``token_recall``), ``rouge_l`` and
    ``mean_words`` over examples, and corpus ``bleu``; all but mean_words in [0, 1].

    BLEU is sacrebleu's corpus BLEU on normalized queries with ``effective_order=True`` (n-gram orders that no
    query is long enough for are left out instead of zeroing the score; queries are short), divided by 100.
    """
    if isinstance(predictions, str) or isinstance(references, str):
        raise ValueError("predictions and references must be sequences of strings, not a single string")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    rows = [per_example_metrics(pred, ref) for pred, ref in zip(predictions, references)]
    n = len(rows)
    return {
        "exact_match": sum(row["em"] for row in rows) / n,
        "token_f1": sum(row["f1"] for row in rows) / n,
        "token_precision": sum(row["p"] for row in rows) / n,
        "token_recall": sum(row["r"] for row in rows) / n,
        "bleu": _corpus_bleu(predictions, references),
        "rouge_l": sum(row["rouge_l"] for row in rows) / n,
        "mean_words": sum(row["words"] for row in rows) / n,
    }


def _token_precision_recall(pred: str, ref: str) -> tuple[float, float]:
    """Shared normalized words over the prediction's and over the reference's words; empty queries as in F1."""
    pred_tokens, ref_tokens = query_tokens(pred), query_tokens(ref)
    if not pred_tokens or not ref_tokens:
        same = float(pred_tokens == ref_tokens)
        return same, same
    common = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    return common / len(pred_tokens), common / len(ref_tokens)


def _token_f1(pred: str, ref: str) -> float:
    """SQuAD-style F1 over the bags of normalized words; two empty queries count as a match."""
    pred_tokens, ref_tokens = query_tokens(pred), query_tokens(ref)
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)
    common = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def _corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu corpus BLEU with effective order, scaled to [0, 1]."""
    from sacrebleu.metrics import BLEU  # imported here: only scoring needs it

    score = BLEU(effective_order=True).corpus_score(
        [normalize_query(p) for p in predictions], [[normalize_query(r) for r in references]]
    )
    return min(1.0, max(0.0, score.score / 100.0))


@functools.lru_cache(maxsize=1)
def _rouge_scorer() -> object:
    """One ROUGE-L scorer (no stemming), built on first use because importing rouge_score loads nltk."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
