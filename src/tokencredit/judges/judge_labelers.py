"""RLAIF labelers on a judge backend: pairwise preferences, rubric scores, token spans and minimal edits.

Each labeler returns one result per input, in input order, and a :class:`LabelStats` with how many judge
answers could not be read and which inputs failed. An unreadable answer never becomes a label: its result is
``None`` (or a tie for a pair whose two orders disagree, which is a real verdict, not a parse failure). Non-finite
log-probabilities are unreadable too: NaN compares false both ways and would otherwise pass for a tie. An input
whose request the server refused is failed: ``None``, and its index and the reason are in ``stats.failures``.

With ``reask_unreadable`` a labeler asks again, once, for each cached answer it cannot read (a bad answer stays in
the cache otherwise, and every rerun would read the same garbage); answers asked in this run are not re-asked.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from tokencredit.feedback.reference_labeler import REPEATS, repeat_spans
from tokencredit.judges.backends import ChatRequest, ChatResult, JudgeBackend, JudgeFailure, scores_readable
from tokencredit.judges.templates import Template, load_template
from tokencredit.rewards.labels import SpanLabel


@dataclass
class LabelStats:
    """What a labelling pass produced: inputs labelled, ties, unreadable judge answers (with examples), and the
    inputs that failed because the server refused a request (``failures``: (input index, reason))."""

    total: int = 0
    labelled: int = 0
    ties: int = 0
    unparseable: int = 0  # answers, not inputs: a pair asks twice
    examples: list[str] = field(default_factory=list)  # the first few unreadable answers, for the report
    failed: int = 0  # inputs
    failures: list[tuple[int, str]] = field(default_factory=list)

    def add(self, other: LabelStats) -> None:
        """Count another pass's results into this one (examples up to five; failure indices stay per pass)."""
        self.total += other.total
        self.labelled += other.labelled
        self.ties += other.ties
        self.unparseable += other.unparseable
        self.examples = (self.examples + other.examples)[:5]
        self.failed += other.failed
        self.failures += other.failures

    def fail(self, index: int, reason: str) -> None:
        """Count input ``index`` as failed."""
        self.failed += 1
        self.failures.append((index, reason))

    def bad(self, text: str) -> None:
        """Count an unreadable answer and keep the first five."""
        self.unparseable += 1
        if len(self.examples) < 5:
            self.examples.append(text[:300])


def _fitting(template: Template, backend: JudgeBackend) -> Template:
    """``template``, or ValueError when its own text is over the backend's ``max_prompt_chars``.

    Every request would be refused anyway, but only after all of them were built, each holding a copy of it.
    """
    size = template.fixed_chars()
    if size > backend.max_prompt_chars:
        raise ValueError(f"the judge template is {size} characters before any record is filled in, over "
                         f"max_prompt_chars={backend.max_prompt_chars}: every prompt would be refused")
    return template


# ---------------------------------------------------------------------- pairwise
_LETTER = re.compile(r"^\W*(?:answer\s*)?\(?([AB])\b", re.IGNORECASE)


def parse_letter(text: str) -> str | None:
    """"A" or "B" from an answer that starts with it (``"B"``, ``"(A)"``, ``"Answer B: ..."``), else None."""
    m = _LETTER.match(text.strip())
    return m.group(1).upper() if m else None


@dataclass
class PairVerdict:
    """The judge's view of (a, b) in both orders: P(a better) per order and the combined verdict."""

    p_a_first: float | None  # P(a better) when a was shown first
    p_a_second: float | None  # P(a better) when a was shown second
    error: str | None = None  # why the pair failed (a request the server refused)

    @property
    def verdict(self) -> str | None:
        """"a" or "b" when both orders prefer it, "tie" when they disagree, None when an answer was unreadable
        or not finite, or the pair failed."""
        if self.error is not None or not _probability(self.p_a_first) or not _probability(self.p_a_second):
            return None
        if self.p_a_first > 0.5 and self.p_a_second > 0.5:
            return "a"
        if self.p_a_first < 0.5 and self.p_a_second < 0.5:
            return "b"
        return "tie"

    @property
    def p_a(self) -> float | None:
        """P(a better) averaged over both orders (position bias cancels)."""
        if self.verdict is None:
            return None
        return (self.p_a_first + self.p_a_second) / 2


def _no_letter(i: int, result: ChatResult) -> bool:
    """Whether a pairwise answer has no readable letter."""
    return parse_letter(result.text) is None


def _probability(p: float | None) -> bool:
    """Whether p is a usable probability (a number in [0, 1]; NaN is not)."""
    return p is not None and 0.0 <= p <= 1.0


class PairwiseLabeler:
    """Which of two responses is better, asked in both orders; the orders must agree or it is a tie.

    With ``use_logprobs`` the preference is read from the log-probabilities of the answer letters
    (P(A) / (P(A) + P(B))), which a local backend scores exactly and an HTTP backend reads from its top
    alternatives; where a backend gives none, the sampled letter is used (P = 1 or 0).
    """

    def __init__(self, backend: JudgeBackend, template: Template | None = None, use_logprobs: bool = True,
                 reask_unreadable: bool = False) -> None:
        """Label with ``backend`` and the pairwise template (or another one with the same placeholders)."""
        self.backend = backend
        self.template = _fitting(template or load_template("pairwise"), backend)
        self.use_logprobs = use_logprobs
        self.reask_unreadable = reask_unreadable

    def _p_first(self, requests: list[ChatRequest], stats: LabelStats) -> tuple[list[float | None], list[str | None]]:
        """P(the first-shown answer is better) for each request (None where unreadable or failed), and the
        reason of each failed request."""
        out: list[float | None] = [None] * len(requests)
        errors: list[str | None] = [None] * len(requests)
        todo = list(range(len(requests)))
        if self.use_logprobs:
            scored = self.backend.option_logprobs(requests, ["A", "B"], reask_unreadable=self.reask_unreadable)
            todo = []
            for i, lp in enumerate(scored):
                if isinstance(lp, JudgeFailure):
                    errors[i] = lp.message
                    continue
                a, b = lp.get("A", -math.inf), lp.get("B", -math.inf)
                if not scores_readable(lp):
                    stats.bad(f"non-finite log-probabilities: A={a} B={b}")
                elif math.isinf(a) and math.isinf(b):
                    todo.append(i)  # neither letter among the alternatives (or none returned): read the text
                else:
                    p = 1.0 / (1.0 + math.exp(min(b - a, 700.0)))
                    if _probability(p):
                        out[i] = p
                    else:
                        stats.bad(f"no probability from log-probabilities A={a} B={b}")
        for i, result in zip(todo, self.backend.chat([requests[i] for i in todo],
                                                     _no_letter if self.reask_unreadable else None)):
            if result.error is not None:
                errors[i] = result.error
                continue
            letter = parse_letter(result.text)
            if letter is None:
                stats.bad(result.text)
            else:
                out[i] = 1.0 if letter == "A" else 0.0
        return out, errors

    def label(self, items: Sequence[tuple[str, str, str]]) -> tuple[list[PairVerdict], LabelStats]:
        """Verdicts for (prompt, a, b) items."""
        stats = LabelStats(total=len(items))
        requests = []
        for prompt, a, b in items:
            requests.append(ChatRequest(self.template.messages(prompt=prompt, first=a, second=b), max_tokens=8))
            requests.append(ChatRequest(self.template.messages(prompt=prompt, first=b, second=a), max_tokens=8))
        p, errors = self._p_first(requests, stats)
        verdicts = []
        for k in range(len(items)):
            first, second = p[2 * k], p[2 * k + 1]
            error = errors[2 * k] or errors[2 * k + 1]
            verdict = PairVerdict(first, None if second is None else 1.0 - second, error)
            if error is not None:
                stats.fail(k, error)
            stats.ties += verdict.verdict == "tie"
            stats.labelled += verdict.verdict in ("a", "b")
            verdicts.append(verdict)
        return verdicts, stats


# ---------------------------------------------------------------------- rubric
_SCORE = re.compile(r"score\s*[:=]?\s*\**\s*([1-5])\b", re.IGNORECASE)


def parse_score(text: str) -> int | None:
    """The last "Score: N" (N in 1..5) of an answer, else None."""
    found = _SCORE.findall(text)
    return int(found[-1]) if found else None


class _ResponseLabeler:
    """Shared loop of the labelers that judge one (prompt, response) at a time: ask, read, count."""

    task = ""
    default_max_tokens = 512

    def __init__(self, backend: JudgeBackend, template: Template | None = None, max_tokens: int | None = None,
                 reask_unreadable: bool = False) -> None:
        """Label with ``backend`` and the task's template (or another one with the same placeholders)."""
        self.backend = backend
        self.template = _fitting(template or load_template(self.task), backend)
        self.max_tokens = max_tokens or self.default_max_tokens
        self.reask_unreadable = reask_unreadable

    def read(self, text: str, finish_reason: str | None, response: str) -> tuple[object, str]:
        """(label, "label" | "tie" | "bad") of one judge answer."""
        raise NotImplementedError

    def label(self, items: Sequence[tuple[str, str]]) -> tuple[list, LabelStats]:
        """One label per (prompt, response), None where the judge gave none (a tie), could not be read, or the
        request failed."""
        stats = LabelStats(total=len(items))
        requests = [ChatRequest(self.template.messages(prompt=p, response=r), max_tokens=self.max_tokens)
                    for p, r in items]

        def unreadable(i: int, result: ChatResult) -> bool:
            """Whether a cached answer to item i cannot be read (then it is asked again)."""
            return self.read(result.text, result.finish_reason, items[i][1])[1] == "bad"

        reask_if = unreadable if self.reask_unreadable else None
        out = []
        for k, ((_, response), result) in enumerate(zip(items, self.backend.chat(requests, reask_if))):
            if result.error is not None:
                stats.fail(k, result.error)
                out.append(None)
                continue
            value, kind = self.read(result.text, result.finish_reason, response)
            if kind == "bad":
                stats.bad(result.text)
            elif kind == "tie":
                stats.ties += 1
            else:
                stats.labelled += 1
            out.append(value if kind == "label" else None)
        return out, stats


class RubricLabeler(_ResponseLabeler):
    """An additive 1-5 score per (prompt, response); None where the answer had no readable score."""

    task = "rubric"

    def read(self, text: str, finish_reason: str | None, response: str) -> tuple[object, str]:
        """The last 'Score: N'."""
        score = parse_score(text)
        return score, "bad" if score is None else "label"


# ---------------------------------------------------------------------- token spans
def parse_spans(text: str, response: str) -> list[SpanLabel] | None:
    """Span labels from '- phrase' / '+ phrase' lines located in the response; None if the answer is unreadable.

    'none' (alone) means no spans. Each phrase is matched exactly, else case-insensitively, at its first
    occurrence not already used; a line that matches nothing makes the whole answer unreadable, because a
    partial reading would label the response as if the missing phrase were fine.
    """
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if len(lines) == 1 and lines[0].strip(" .").lower() == "none":
        return []
    if not lines:
        return None
    spans: list[SpanLabel] = []
    taken: list[tuple[int, int]] = []
    for line in lines:
        if line[0] not in "+-" or len(line) < 2:
            return None
        phrase = line[1:].strip().strip('"').strip()
        if not phrase:
            return None
        where = _find_free(response, phrase, taken)
        if where is None:
            return None
        taken.append(where)
        spans.append(SpanLabel(where[0], where[1], 1 if line[0] == "+" else -1))
    return sorted(spans, key=lambda s: s.start)


def _find_free(text: str, phrase: str, taken: list[tuple[int, int]]) -> tuple[int, int] | None:
    """First (start, end) of phrase in text (exact, then case-insensitive) that cuts no word in two and
    overlaps no taken span ("is" is not found inside "Paris")."""
    for hay, needle in ((text, phrase), (text.lower(), phrase.lower())):
        start = hay.find(needle)
        while start != -1:
            end = start + len(needle)
            cuts_word = (start > 0 and text[start - 1].isalnum() and text[start].isalnum()) or (
                end < len(text) and text[end].isalnum() and text[end - 1].isalnum())
            if not cuts_word and all(end <= a or start >= b for a, b in taken):
                return start, end
            start = hay.find(needle, start + 1)
    return None


class SpanLabeler(_ResponseLabeler):
    """Good (+1) and bad (-1) character spans of each response, for a token reward model (TPPO)."""

    task = "spans"

    def read(self, text: str, finish_reason: str | None, response: str) -> tuple[object, str]:
        """'- phrase' / '+ phrase' lines located in the response."""
        spans = parse_spans(text, response)
        return spans, "bad" if spans is None else "label"


# ---------------------------------------------------------------------- minimal edits
class EditLabeler(_ResponseLabeler):
    """A minimal edit of each (worse) response, for FG's edit labels.

    Returning the same text counts as a tie (no edit is a verdict that the response needs none); an empty answer
    or one cut at the length limit is unreadable.
    """

    task = "edits"
    default_max_tokens = 1024

    def read(self, text: str, finish_reason: str | None, response: str) -> tuple[object, str]:
        """The edited response."""
        edited = text.strip()
        if not edited or finish_reason == "length":
            return None, "bad"
        return edited, "tie" if edited.split() == response.split() else "label"


class JudgeTokenLabeler:
    """The TokenLabeler protocol (:mod:`tokencredit.feedback.reference_labeler`) on an LLM judge: TPPO's AI feedback.

    An answer that cannot be read, or a request the server refused, gives None for that response (no labels: an
    empty span list would pass for a response with nothing wrong in it) and is counted in ``stats``.
    ``repeats="bad"`` also labels -1 every word repeating an earlier word of the response (stopwords aside), as
    :class:`~tokencredit.feedback.reference_labeler.ReferenceLabeler` does, whatever the judge said of it; the default
    "keep" leaves repeats to the judge, whose prompt asks for them.
    """

    def __init__(self, backend: JudgeBackend, template: Template | None = None, reask_unreadable: bool = False,
                 repeats: str = "keep") -> None:
        """Label with ``backend`` through a :class:`SpanLabeler`."""
        if repeats not in REPEATS:
            raise ValueError(f"repeats must be one of {REPEATS} (got {repeats!r})")
        self.spans = SpanLabeler(backend, template, reask_unreadable=reask_unreadable)
        self.repeats = repeats
        self.stats = LabelStats()

    def label(
        self, prompts: Sequence[str], responses: Sequence[str], contexts: Sequence[dict]
    ) -> list[list[SpanLabel] | None]:
        """Span labels per response, None where the judge's answer could not be read or the request failed; the
        judge sees the prompt and the response (contexts are not shown)."""
        labels, stats = self.spans.label(list(zip(prompts, responses)))
        self.stats.add(stats)
        if self.repeats == "keep":
            return labels
        return [None if spans is None else _with_repeats(spans, response) for spans, response in
                zip(labels, responses)]


def _with_repeats(spans: list[SpanLabel], response: str) -> list[SpanLabel]:
    """The judge's spans plus a -1 span on each repeated word no -1 span covers yet (-1 wins where they overlap)."""
    bad = [s for s in spans if s.label < 0]
    extra = [r for r in repeat_spans(response) if not any(b.start <= r.start and r.end <= b.end for b in bad)]
    return sorted(spans + extra, key=lambda s: (s.start, s.end))
