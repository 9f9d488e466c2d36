"""Records for reward learning: preference pairs, ranked lists, minimal-edit triples and unlabelled pairs.

Every loader takes a ``.jsonl`` path, a list of dicts, or a Hugging Face ``datasets.Dataset`` (any iterable of
dicts works; ``datasets`` is never imported here) and returns dataclasses. A bad record raises
:class:`RewardDataError` whose message starts with where it is — ``file:line`` for a file, ``row N``
(0-based) for an in-memory source — and names the field. Field names are arguments, so a dataset with other
column names needs no copy; a ``prompt_field`` of ``None`` means the records have no prompt (the responses hold
the whole conversation, as in HH-RLHF) and the prompt is ``""``.

Records that carry no preference — chosen and rejected the same text, an edit that changes nothing, a ranked
list whose scores are all equal — are not errors (real data has them): they are counted, logged as one
warning, and left out. "The same text" means equal up to whitespace (``a.split() == b.split()``).

Record shapes (JSONL, one object a line)::

    {"prompt": ..., "chosen": ..., "rejected": ...}                       load_pairs
    {"prompt": ..., "responses": [...], "scores": [...]}                  load_ranked (higher score = better)
    {"prompt": ..., "responses": [...], "ranking": [...]}                 load_ranked (ranking[i] = rank of
                                                                          responses[i], 0 = best)
    {"prompt": ..., "original": ..., "edited": ..., "chosen": ...}        load_edits (chosen optional)
    {"prompt": ..., "a": ..., "b": ...}                                   load_unlabelled_pairs
    {"prompt": ..., "response": ..., "spans": [{"start", "end", "label"}]} load_span_examples
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from numbers import Real
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from tokencredit.record_files import RecordError, read_jsonl
from tokencredit.rewards.labels import SpanLabel
from tokencredit.rewards.records import (
    EditTriple,
    PreferencePair,
    RankedList,
    TokenExample,
    UnlabelledPair,
    random_split,
    ranked_problem,
)

if TYPE_CHECKING:
    import datasets

    # A .jsonl path, a list (or any iterable) of dicts, or a Hugging Face datasets.Dataset.
    Source = str | Path | Iterable[dict] | datasets.Dataset

log = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = [
    "EditTriple",
    "PreferencePair",
    "RankedList",
    "RewardDataError",
    "UnlabelledPair",
    "load_edits",
    "load_pairs",
    "load_ranked",
    "load_span_examples",
    "load_unlabelled_pairs",
    "split_records",
]


class RewardDataError(RecordError):
    """A reward-learning record that cannot be used; the message starts with "file:line" or "row N"."""


# ---------------------------------------------------------------------------------------------------------
# Record kinds
# ---------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------------------


def load_pairs(
    source: Source,
    prompt_field: str | None = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
) -> list[PreferencePair]:
    """Preference pairs {prompt, chosen, rejected}; pairs whose two texts are the same are left out (warned)."""

    def parse(obj: dict, where: str) -> PreferencePair | None:
        """One pair, or None when both sides are the same text."""
        prompt = _prompt(obj, prompt_field, where)
        # An empty reply is a real answer (HH-RLHF has chosen replies that say nothing); two empty ones are dropped.
        chosen = _text(obj, chosen_field, where, allow_empty=True)
        rejected = _text(obj, rejected_field, where, allow_empty=True)
        return None if _same_text(chosen, rejected) else PreferencePair(prompt, chosen, rejected)

    return _load(source, parse, "pairs", f"{chosen_field!r} and {rejected_field!r} are the same text")


def load_unlabelled_pairs(
    source: Source, prompt_field: str | None = "prompt", a_field: str = "a", b_field: str = "b"
) -> list[UnlabelledPair]:
    """Unlabelled pairs {prompt, a, b}; pairs whose two texts are the same are left out (warned).

    A labelled file can serve as an unlabelled pool: ``a_field="chosen", b_field="rejected"``.
    """

    def parse(obj: dict, where: str) -> UnlabelledPair | None:
        """One pair, or None when both sides are the same text."""
        prompt = _prompt(obj, prompt_field, where)
        a, b = _text(obj, a_field, where), _text(obj, b_field, where)
        return None if _same_text(a, b) else UnlabelledPair(prompt, a, b)

    return _load(source, parse, "unlabelled pairs", f"{a_field!r} and {b_field!r} are the same text")


def load_edits(
    source: Source,
    prompt_field: str | None = "prompt",
    original_field: str = "original",
    edited_field: str = "edited",
    chosen_field: str | None = "chosen",
) -> list[EditTriple]:
    """Edit triples {prompt, original, edited} (+ optional chosen); edits that change nothing are left out."""

    def parse(obj: dict, where: str) -> EditTriple | None:
        """One triple, or None when the edit leaves the text as it was."""
        prompt = _prompt(obj, prompt_field, where)
        original, edited = _text(obj, original_field, where), _text(obj, edited_field, where)
        chosen = None
        if chosen_field is not None and obj.get(chosen_field) is not None:
            chosen = _text(obj, chosen_field, where)
        return None if _same_text(original, edited) else EditTriple(prompt, original, edited, chosen)

    return _load(source, parse, "edit triples", f"{original_field!r} and {edited_field!r} are the same text")


def load_span_examples(
    source: Source, prompt_field: str | None = "prompt", response_field: str = "response", spans_field: str = "spans"
) -> list[TokenExample]:
    """Token labels {prompt, response, spans: [{start, end, label}]} (character offsets into the response,
    label +1 / -1; ``[start, end, label]`` lists are read too), e.g. written by ``tokencredit judge task=spans``."""

    def parse(obj: dict, where: str) -> TokenExample:
        """One labelled response."""
        prompt = _prompt(obj, prompt_field, where)
        response = _text(obj, response_field, where)
        raw = obj.get(spans_field)
        if not isinstance(raw, list):
            raise RewardDataError(f"{where}: field {spans_field!r} must be a list of {{start, end, label}}")
        spans = []
        for k, item in enumerate(raw):
            values = [item.get(n) for n in ("start", "end", "label")] if isinstance(item, dict) else item
            ok = isinstance(values, list) and len(values) == 3 and all(
                isinstance(v, int) and not isinstance(v, bool) for v in values)
            if not ok or not 0 <= values[0] < values[1] <= len(response) or values[2] not in (-1, 1):
                raise RewardDataError(f"{where}: {spans_field}[{k}] = {item!r} is not a span inside the "
                                      f"{len(response)}-character response with label +1 or -1")
            spans.append(SpanLabel(*values))
        return TokenExample(prompt, response, spans)

    return _load(source, parse, "token-labelled responses", "")


def load_ranked(
    source: Source,
    prompt_field: str | None = "prompt",
    responses_field: str = "responses",
    scores_field: str | None = "scores",
    ranking_field: str | None = "ranking",
) -> list[RankedList]:
    """Ranked lists {prompt, responses, scores | ranking}; lists whose scores all tie are left out (warned).

    Scores: higher is better, ties allowed, finite. ``ranking[i]`` is the rank of ``responses[i]`` (0 = best).
    A record must give exactly one of the two; set a field name to None to never read that field.
    """

    def parse(obj: dict, where: str) -> RankedList | None:
        """One ranked list, or None when every score is the same."""
        prompt = _prompt(obj, prompt_field, where)
        responses = _responses(obj, responses_field, where)
        scores = _number_list(obj, scores_field, where, integers=False)
        ranking = _number_list(obj, ranking_field, where, integers=True)
        problem = ranked_problem(len(responses), scores, ranking, responses_field, scores_field, ranking_field)
        if problem is not None:
            raise RewardDataError(f"{where}: {problem}")
        if scores is not None and len(set(scores)) == 1:
            return None
        return RankedList(prompt, responses, scores, ranking)

    return _load(source, parse, "ranked lists", f"every {scores_field!r} value is the same")


def split_records(records: Sequence[T], eval_fraction: float, seed: int = 0) -> tuple[list[T], list[T]]:
    """Seeded random (train, eval) split, the token RM's rule: eval gets round(fraction * n), train >= 1."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1) (got {eval_fraction})")
    return random_split(list(records), eval_fraction, np.random.default_rng(seed))


# ---------------------------------------------------------------------------------------------------------
# Parsing helpers
# ---------------------------------------------------------------------------------------------------------


def _rows(source: Source) -> tuple[str, Iterator[tuple[str, object]]]:
    """The source's name for messages and its (location, record) pairs."""
    if isinstance(source, (str, Path)):
        return str(source), ((f"{source}:{lineno}", obj) for lineno, obj in read_jsonl(source))
    kind = type(source).__name__
    if kind in ("DatasetDict", "IterableDatasetDict"):
        splits = ", ".join(repr(k) for k in source)
        raise TypeError(f"got a {kind} (splits {splits}); pass one split, e.g. dataset['train']")
    if kind == "DataFrame":  # iterating a DataFrame gives its column names, not its rows
        raise TypeError("got a pandas DataFrame; pass df.to_dict('records') or datasets.Dataset.from_pandas(df)")
    if isinstance(source, (dict, bytes)) or not isinstance(source, Iterable):
        raise TypeError(f"source must be a .jsonl path, a list of dicts or a datasets.Dataset, got {kind}")
    return "the given records", ((f"row {i}", obj) for i, obj in enumerate(source))


def _load(source: Source, parse: Callable[[dict, str], T | None], what: str, skip_reason: str) -> list[T]:
    """Parse every record; count, warn about and leave out the ones ``parse`` returns None for."""
    name, rows = _rows(source)
    records: list[T] = []
    skipped: list[str] = []
    try:
        for where, obj in rows:
            if not isinstance(obj, dict):
                raise RewardDataError(f"{where}: expected a record (an object with fields), got {type(obj).__name__}")
            record = parse(obj, where)
            if record is None:
                skipped.append(where)
            else:
                records.append(record)
    except RewardDataError:
        raise
    except RecordError as exc:  # bad JSON or a missing file: one error type for every data problem
        raise RewardDataError(str(exc)) from exc
    total = len(records) + len(skipped)
    if total == 0:
        raise RewardDataError(f"{name}: no records found")
    if not records:
        raise RewardDataError(f"{name}: no usable {what}: all {total} records left out because {skip_reason}")
    if skipped:
        log.warning("%s: left out %d of %d %s because %s (first: %s)", name, len(skipped), total, what,
                    skip_reason, skipped[0])
    return records


def _missing(obj: dict, field: str, where: str, hint: str = "") -> RewardDataError:
    """Error for a missing field, listing the fields the record does have (a wrong column name shows up)."""
    present = ", ".join(repr(k) for k in list(obj)[:12])
    return RewardDataError(f"{where}: field {field!r} is missing or null (record has {present or 'no fields'}){hint}")


def _text(obj: dict, field: str, where: str, allow_empty: bool = False) -> str:
    """A required string field, non-blank unless ``allow_empty``."""
    value = obj.get(field)
    if value is None:
        raise _missing(obj, field, where)
    if not isinstance(value, str):
        hint = ""
        if isinstance(value, list):  # chat datasets store conversations as lists of {"role", "content"} messages
            hint = "; chat messages must be rendered to text first (e.g. with apply_chat_template)"
        raise RewardDataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}{hint}")
    if not value.strip() and not allow_empty:
        raise RewardDataError(f"{where}: field {field!r} is empty")
    return value


def _prompt(obj: dict, field: str | None, where: str) -> str:
    """The prompt, or "" when the records have none (``prompt_field=None``)."""
    if field is None:
        return ""
    if obj.get(field) is None:
        raise _missing(obj, field, where, "; pass prompt_field=None if the responses hold the whole conversation")
    return _text(obj, field, where)


def _same_text(a: str, b: str) -> bool:
    """Equal up to whitespace: such a pair says nothing about which text is better."""
    return a.split() == b.split()


def _responses(obj: dict, field: str, where: str) -> list[str]:
    """A list of at least two non-blank strings."""
    value = obj.get(field)
    if value is None:
        raise _missing(obj, field, where)
    if not isinstance(value, list):
        raise RewardDataError(f"{where}: field {field!r} must be a list of strings, got {type(value).__name__}")
    if len(value) < 2:
        raise RewardDataError(f"{where}: field {field!r} needs at least 2 responses to rank, got {len(value)}")
    for k, item in enumerate(value):
        if not isinstance(item, str):
            raise RewardDataError(f"{where}: field {field!r}[{k}] must be a string, got {type(item).__name__}")
        if not item.strip():
            raise RewardDataError(f"{where}: field {field!r}[{k}] is empty")
    return value


def _number_list(obj: dict, field: str | None, where: str, integers: bool) -> list | None:
    """A list of numbers (ints only when ``integers``), or None when the field is absent or unread."""
    if field is None or obj.get(field) is None:
        return None
    value = obj[field]
    kind = "an integer" if integers else "a number"
    if not isinstance(value, list):
        raise RewardDataError(f"{where}: field {field!r} must be a list, got {type(value).__name__}")
    for k, item in enumerate(value):
        # bool is an int subclass, but true/false is never meant as a score or a rank.
        ok = isinstance(item, int) if integers else isinstance(item, Real)
        if isinstance(item, bool) or not ok:
            raise RewardDataError(f"{where}: field {field!r}[{k}] must be {kind}, got {item!r}")
    return [int(v) for v in value] if integers else [float(v) for v in value]


