"""SER self-evolved reward learning: pick confident pairs to pseudo-label, and keep the pool across loops.

The reward model scores both responses of every unlabelled pair; p = sigmoid(r) per response (arXiv 2411.00418).

- Status 1, "tell good from bad": keep (a, b) when p_a > high and p_b < low, or the other way round.
- Status 2, "amplify difference": keep (a, b) when |p_a - p_b| > min_gap.
- ``"both"``: either rule (what the public SER code does; the paper moves to status 2 in later loops).

The chosen response of a kept pair is always the one with the higher p (the two rules never disagree, since
status 1 implies p_chosen > high >= low > p_rejected). Pairs not kept go back to the pool.

This module is the pure bookkeeping; the training loop lives elsewhere. One loop, in the caller's code::

    state = SERState(pool=unlabelled_ids)                    # or SERState.load(run / "ser_state.json")
    while not state.should_stop(patience=1):
        train the RM on the seed labels + state.labels; acc = held-out pair accuracy
        p_a, p_b = sigmoid(RM(a)), sigmoid(RM(b)) for the pairs state.pool names (in that order)
        state.add_selected(select_pairs(p_a, p_b, rule).selected, heldout_accuracy=acc)
        state.save(run / "ser_state.json")
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import torch

from tokencredit.runs import atomic_write_json

PairId = int | str
Side = Literal["a", "b"]

TOLERANCE = 1e-6
"""Probabilities closer than this to a threshold count as on it (not beyond it). Float rounding, e.g.
0.8 - 0.5 = 0.30000000000000004 or float32's 0.55 = 0.5500000119, must not decide a strict inequality;
p = sigmoid(r) from a float32 model is not more precise than this anyway."""

STATE_VERSION = 1


@dataclass(frozen=True)
class SelectionRule:
    """Which confidence rule(s) keep a pair, and their thresholds (the paper's defaults)."""

    status: Literal[1, 2, "both"] = "both"
    """1: p_a > high and p_b < low (or swapped); 2: |p_a - p_b| > min_gap; "both": either."""
    high: float = 0.55
    """Status 1: the chosen response's p must exceed this."""
    low: float = 0.45
    """Status 1: the rejected response's p must be below this."""
    min_gap: float = 0.3
    """Status 2: |p_a - p_b| must exceed this."""

    def __post_init__(self) -> None:
        """Reject impossible settings early, naming the bad field."""
        # bool is an int subclass: status=True would otherwise silently mean status 1.
        if isinstance(self.status, bool) or self.status not in (1, 2, "both"):
            raise ValueError(f"status must be 1, 2 or 'both' (got {self.status!r})")
        if not 0 < self.low <= self.high < 1:
            raise ValueError(f"need 0 < low <= high < 1 (got low={self.low}, high={self.high})")
        if not 0 < self.min_gap < 1:
            raise ValueError(f"min_gap must be in (0, 1) (got {self.min_gap})")

    @property
    def active(self) -> tuple[int, ...]:
        """The rule numbers this setting applies."""
        return (1, 2) if self.status == "both" else (int(self.status),)


@dataclass(frozen=True)
class Selection:
    """A kept pair: its index in the scored list, the side pseudo-labelled chosen, and the rules that fired."""

    index: int
    chosen: Side
    rules: tuple[int, ...]
    p_chosen: float
    p_rejected: float


class Selections(NamedTuple):
    """Result of :func:`select_pairs`: kept pairs, and the indices of the pairs that go back to the pool."""

    selected: list[Selection]
    unselected: list[int]


def _probabilities(p: Sequence[float] | torch.Tensor, name: str) -> list[float]:
    """Flat list of floats in [0, 1]; a clear error names the first bad entry."""
    if isinstance(p, torch.Tensor):
        if p.dim() > 1:
            raise ValueError(f"{name} must be one-dimensional (got shape {tuple(p.shape)})")
        values = p.detach().double().cpu().tolist()
    else:
        values = [float(x) for x in p]
    for i, x in enumerate(values):
        if not 0.0 <= x <= 1.0:  # also false for NaN
            raise ValueError(f"{name}[{i}] = {x} is not a probability in [0, 1]; pass p = sigmoid(r)")
    return values


def select_pairs(
    p_a: Sequence[float] | torch.Tensor, p_b: Sequence[float] | torch.Tensor, rule: SelectionRule | None = None
) -> Selections:
    """Apply the SER rule to pairs scored p_a[i], p_b[i] = sigmoid(r); strict inequalities (see TOLERANCE)."""
    rule = rule or SelectionRule()
    a, b = _probabilities(p_a, "p_a"), _probabilities(p_b, "p_b")
    if len(a) != len(b):
        raise ValueError(f"p_a has {len(a)} entries but p_b has {len(b)}")
    selected: list[Selection] = []
    unselected: list[int] = []
    for i, (pa, pb) in enumerate(zip(a, b)):
        hi, lo = max(pa, pb), min(pa, pb)
        fired = []
        if 1 in rule.active and hi > rule.high + TOLERANCE and lo < rule.low - TOLERANCE:
            fired.append(1)
        if 2 in rule.active and hi - lo > rule.min_gap + TOLERANCE:
            fired.append(2)
        if fired:
            selected.append(Selection(i, "a" if pa > pb else "b", tuple(fired), hi, lo))
        else:
            unselected.append(i)
    return Selections(selected, unselected)


@dataclass(frozen=True)
class PseudoLabel:
    """A pool pair labelled by the reward model in loop ``loop``."""

    pair_id: PairId
    chosen: Side
    loop: int
    rules: tuple[int, ...]
    p_chosen: float
    p_rejected: float

    def __post_init__(self) -> None:
        """A label names side "a" or "b"."""
        if self.chosen not in ("a", "b"):
            raise ValueError(f"chosen must be 'a' or 'b' (got {self.chosen!r})")

    def orient(self, a: object, b: object) -> tuple[object, object]:
        """(chosen, rejected) from the pair's two responses in their original (a, b) order."""
        return (a, b) if self.chosen == "a" else (b, a)


@dataclass(frozen=True)
class LoopRecord:
    """What one loop did: how many pairs it pseudo-labelled (per rule) and its accuracies.

    ``heldout_accuracy`` is the accuracy the stop rule and the choice of the best loop read (on validation pairs
    that are neither trained on nor reported); ``test_accuracy`` is for the report only, so the loop chosen is
    not also the one measured best on the pairs that report it.
    """

    loop: int
    selected: int
    by_rule1: int
    by_rule2: int
    pool_left: int
    labelled_total: int
    heldout_accuracy: float | None
    test_accuracy: float | None = None


def stop_reason(history: Sequence[LoopRecord], patience: int = 1, min_delta: float = 0.0) -> str | None:
    """Why the SER loop should stop after ``history``, or None to go on.

    Stops when the last loop selected nothing new, when the pool is empty, or when the best held-out accuracy
    of the last ``patience`` loops is not more than ``min_delta`` above the best before them (loops without
    an accuracy are skipped for this test).
    """
    if patience < 1:
        raise ValueError(f"patience must be >= 1 (got {patience})")
    if not min_delta >= 0:
        raise ValueError(f"min_delta must be >= 0 (got {min_delta})")
    if not history:
        return None
    last = history[-1]
    if last.selected == 0:
        return f"loop {last.loop} selected no new pair"
    if last.pool_left == 0:
        return f"the pool is empty after loop {last.loop}"
    accuracies = [h.heldout_accuracy for h in history if h.heldout_accuracy is not None]
    if len(accuracies) > patience:
        before, recent = max(accuracies[:-patience]), max(accuracies[-patience:])
        if not recent - before > min_delta:
            return (f"held-out accuracy did not improve by more than {min_delta} in the last {patience} "
                    f"loop(s) (best before {before:.4f}, since {recent:.4f})")
    return None


def should_stop(history: Sequence[LoopRecord], patience: int = 1, min_delta: float = 0.0) -> bool:
    """True when :func:`stop_reason` gives a reason to stop."""
    return stop_reason(history, patience, min_delta) is not None


@dataclass
class SERState:
    """The unlabelled pool, the pseudo-labels given so far and the per-loop history; JSON round-trips.

    Pairs are named by ids (ints or strings) into the caller's dataset, so the state stays small and
    serialisable. The human-labelled seed share is not held here: the caller keeps it and trains on
    seed + :attr:`labels`.
    """

    pool: list[PairId]
    labels: list[PseudoLabel] = field(default_factory=list)
    history: list[LoopRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        """Every id must be a plain int or str, and appear once across pool and labels."""
        self.pool = list(self.pool)
        seen: set[PairId] = set()
        for pair_id in [*self.pool, *(label.pair_id for label in self.labels)]:
            if isinstance(pair_id, bool) or not isinstance(pair_id, (int, str)):
                raise ValueError(f"pair ids must be ints or strings (got {pair_id!r})")
            if pair_id in seen:
                raise ValueError(f"pair id {pair_id!r} appears twice in the pool and labels")
            seen.add(pair_id)

    @property
    def loop(self) -> int:
        """Number of the next loop (0 for the seed model's selection)."""
        return len(self.history)

    def add_selected(
        self,
        selections: Sequence[Selection],
        pair_ids: Sequence[PairId] | None = None,
        heldout_accuracy: float | None = None,
        test_accuracy: float | None = None,
    ) -> LoopRecord:
        """End a loop: move the selected pairs out of the pool with their pseudo-labels, and record the loop.

        ``selections`` index into ``pair_ids``, the ids of the pairs given to :func:`select_pairs` in that
        order (default: the whole current pool, in order). ``heldout_accuracy`` is this loop's RM accuracy on the
        pairs that steer the loop (stop rule, best loop), ``test_accuracy`` its accuracy on reporting pairs.
        """
        ids = list(self.pool) if pair_ids is None else list(pair_ids)
        in_pool = set(self.pool)
        chosen_ids: dict[PairId, Selection] = {}
        for sel in selections:
            if not isinstance(sel, Selection):
                raise ValueError(f"selections must be Selection objects (got {type(sel).__name__}); "
                                 "pass select_pairs(...).selected")
            if not 0 <= sel.index < len(ids):
                raise ValueError(f"selection index {sel.index} is outside the {len(ids)} scored pairs")
            pair_id = ids[sel.index]
            if pair_id not in in_pool:
                raise ValueError(f"pair {pair_id!r} is not in the pool (already labelled or unknown)")
            if pair_id in chosen_ids:
                raise ValueError(f"pair {pair_id!r} is selected twice")
            chosen_ids[pair_id] = sel
        for name, value in (("heldout_accuracy", heldout_accuracy), ("test_accuracy", test_accuracy)):
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be finite or None (got {value})")
        loop = self.loop
        self.labels.extend(
            PseudoLabel(pid, s.chosen, loop, s.rules, s.p_chosen, s.p_rejected) for pid, s in chosen_ids.items()
        )
        self.pool = [pid for pid in self.pool if pid not in chosen_ids]
        record = LoopRecord(
            loop=loop,
            selected=len(chosen_ids),
            by_rule1=sum(1 in s.rules for s in chosen_ids.values()),
            by_rule2=sum(2 in s.rules for s in chosen_ids.values()),
            pool_left=len(self.pool),
            labelled_total=len(self.labels),
            heldout_accuracy=None if heldout_accuracy is None else float(heldout_accuracy),
            test_accuracy=None if test_accuracy is None else float(test_accuracy),
        )
        self.history.append(record)
        return record

    def stop_reason(self, patience: int = 1, min_delta: float = 0.0) -> str | None:
        """Why to stop now (see the module-level :func:`stop_reason`), or None."""
        return stop_reason(self.history, patience, min_delta)

    def should_stop(self, patience: int = 1, min_delta: float = 0.0) -> bool:
        """True when the loop should end (see :func:`stop_reason`)."""
        return self.stop_reason(patience, min_delta) is not None

    def to_dict(self) -> dict:
        """Plain JSON-ready dict."""
        return {
            "version": STATE_VERSION,
            "pool": list(self.pool),
            "labels": [{**asdict(label), "rules": list(label.rules)} for label in self.labels],
            "history": [asdict(record) for record in self.history],
        }

    @classmethod
    def from_dict(cls, data: dict) -> SERState:
        """Rebuild a state written by :meth:`to_dict`."""
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise ValueError(f"not a SER state of version {STATE_VERSION}: "
                             f"{data.get('version') if isinstance(data, dict) else type(data).__name__!r}")
        try:
            labels = [PseudoLabel(**{**item, "rules": tuple(item["rules"])}) for item in data["labels"]]
            history = [LoopRecord(**item) for item in data["history"]]
            pool = list(data["pool"])
        except (KeyError, TypeError) as err:
            raise ValueError(f"malformed SER state: {err}") from err
        return cls(pool=pool, labels=labels, history=history)

    def save(self, path: str | Path) -> None:
        """Write the state as JSON, atomically (a crash never leaves half a file)."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> SERState:
        """Read a state written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))
