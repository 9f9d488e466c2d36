"""`tokencredit evolve`: SER self-evolved reward learning (arXiv 2411.00418) from a few labelled pairs.

A seed sequence RM is trained on ``labelled_fraction`` of the training pairs; the rest form the unlabelled pool
(their labels are hidden from training and used only to report how right the pseudo-labels were). Each loop:
train the RM on seed + pseudo-labelled pairs, measure its accuracy on the validation pairs (``val_fraction`` of the
labelled data, never trained on) and on the test pairs, score every pool pair as p = sigma(r), keep the confident
ones (status 1 / 2 / both) with the RM's own preference as label, and stop when validation accuracy stops
improving, nothing is selected, the pool is empty or ``max_loops`` is reached. The best loop is chosen on the
validation pairs; the test pairs only report, so the accuracy reported for the chosen loop is not optimistic.

The run folder holds ``ser_state.json`` (pool, pseudo-labels, per-loop history; written after every loop, so
``resume=true`` continues after a crash), ``loops.jsonl`` (a view of the state, rewritten whole after each save so
a crash between the two cannot lose a loop's line), ``loop-K/`` (each loop's RM run) and ``report.html`` with
held-out accuracy per loop.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from tokencredit.config import ConfigError, claim_folder_for, save_config
from tokencredit.models import LoraSettings
from tokencredit.rewards.records import PreferencePair
from tokencredit.rewards.ser_selection import SelectionRule, SERState, select_pairs
from tokencredit.run_folders import releases_run_folders
from tokencredit.runs import RunFolderError, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


@dataclass
class EvolveConfig:
    """Settings of `tokencredit evolve`."""

    output_dir: str = "runs/evolve"  # run folder: ser_state.json, loops.jsonl, loop-K/, summary.json, report.html
    model: str = "all-minilm-l6-v2"  # backbone of the sequence RM (retrained from it in every loop)
    data: str | None = None  # .jsonl of {prompt, chosen, rejected}: the seed share and the pool
    eval_data: str | None = None  # held-out pairs; None = eval_fraction of data
    prompt_field: str | None = "prompt"  # None: records have no prompt
    max_pairs: int | None = None  # use only the first N pairs of data
    eval_fraction: float = 0.2  # share of data held out as the test pairs when eval_data is None
    # Share of the remaining (training) pairs kept aside, labelled, as validation pairs: the stop rule and the
    # choice of the best loop read their accuracy, never the test pairs'. 0 = read the test pairs instead (the
    # reported best accuracy is then optimistic; the summary says so)
    val_fraction: float = 0.1
    labelled_fraction: float = 0.15  # share of training pairs whose labels the seed RM may use
    max_loops: int = 5  # loops after the seed loop
    patience: int = 1  # stop after this many loops without held-out improvement
    min_delta: float = 0.0  # held-out accuracy gain that counts as an improvement (patience)
    # pseudo-label rule: 1 = one side's p above high, the other's below low; 2 = |p_a - p_b| > min_gap; "both" = either
    status: Literal[1, 2, "both"] = "both"
    high: float = 0.55  # status 1: the chosen response's p = sigma(r) must exceed this
    low: float = 0.45  # status 1: the rejected response's p must be below this
    min_gap: float = 0.3  # status 2: |p_a - p_b| must exceed this
    # Standardise the pool's scores before sigma: p = sigma((r - mean) / std). A small RM's raw scores can sit
    # so close to 0 that sigma(r) never leaves the 0.45-0.55 band and the fixed thresholds select nothing.
    calibrate: bool = False
    # The public SER code trains its RMs with AdamW at 2e-5 for 2 epochs, a linear decay and no warm-up; LoRA
    # r = 8 (lora.r=8) with those settings is that recipe on a small backbone (docs/ser.md)
    lora: LoraSettings | None = None  # train LoRA adapters of the RM instead of every weight; None = full fine-tuning
    num_epochs: int = 1  # passes over the seed + pseudo-labelled pairs in each loop
    batch_size: int = 8  # pairs per step; also the pool scoring batch
    learning_rate: float = 1e-4  # RM learning rate (AdamW)
    lr_schedule: Literal["constant", "linear"] = "constant"  # "linear": decay to 0 over each loop's training
    warmup_ratio: float = 0.0  # share of each loop's steps with a linear rise of the learning rate from 0
    max_length: int = 256  # prompt + response tokens; responses keep their start, prompts their end
    seed: int = 0  # seeds the held-out split, the seed/pool draw, pair order shown to the RM and RM training
    full_baseline: bool = False  # also train one RM on 100% of the training labels, for comparison
    # Also train an RM on the labelled seed share alone for as many optimiser steps as the 100%-label RM takes
    # (more epochs over fewer pairs): the control that separates "more labels" from "more steps"
    steps_matched_baseline: bool = False
    resume: bool = False  # continue after the last finished loop recorded in output_dir/ser_state.json
    overwrite: bool = False  # replace a run already in output_dir (kept aside until this run's first loop ends)
    allow_changed_settings: bool = False  # resume even though settings differ from the saved config.yaml
    progress: bool = True  # progress bar while training each loop's RM

    def validate(self) -> None:
        """Check what would fail late."""
        if not 0 < self.labelled_fraction < 1:
            raise ValueError(f"labelled_fraction must be in (0, 1) (got {self.labelled_fraction})")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1) (got {self.val_fraction})")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2: one prompt token and the end token (got {self.max_length})")
        if self.max_loops < 0 or self.patience < 1:
            raise ValueError("max_loops must be >= 0 and patience >= 1")
        SelectionRule(self.status, self.high, self.low, self.min_gap)  # validates the thresholds


def _load(cfg: EvolveConfig) -> tuple[list[PreferencePair], list[PreferencePair], list[PreferencePair]]:
    """(training pairs, validation pairs, test pairs); no validation pairs when val_fraction is 0."""
    from tokencredit.rewards.data import load_pairs, split_records

    if cfg.data is None:
        raise ConfigError("evolve needs data=FILE.jsonl of {prompt, chosen, rejected} pairs")
    pairs = load_pairs(cfg.data, prompt_field=cfg.prompt_field)[: cfg.max_pairs]
    if cfg.eval_data is not None:
        train, test = pairs, load_pairs(cfg.eval_data, prompt_field=cfg.prompt_field)
    else:
        train, test = split_records(pairs, cfg.eval_fraction, cfg.seed)
    if not test:
        raise ConfigError("no held-out test pairs: raise eval_fraction or pass eval_data")
    # Its own stream: the validation draw must not move the seed / pool draw of runs with other val_fraction.
    train, val = split_records(train, cfg.val_fraction, cfg.seed + 7919)
    if cfg.val_fraction > 0 and not val and len(train) >= 3:
        # A small set rounds its share down to nothing: one validation pair still keeps the choice off the test.
        train, val = split_records(train, 1 / len(train), cfg.seed + 7919)
    if cfg.val_fraction > 0 and not val:
        raise ConfigError(f"val_fraction={cfg.val_fraction} of {len(train)} training pairs leaves no validation "
                          "pair: raise val_fraction, add data, or val_fraction=0 to choose on the test pairs")
    if len(train) < 2:
        raise ConfigError(f"{len(train)} training pair(s) left after the test and validation splits: SER needs a "
                          "labelled seed and a pool")
    return train, val, test


def _train(cfg: EvolveConfig, pairs: list[PreferencePair], test: list[PreferencePair],
           val: list[PreferencePair], folder: Path) -> tuple[object, float, float]:
    """A fresh sequence RM from the backbone trained on pairs; returns (RM, test accuracy, validation accuracy),
    the validation accuracy being the test one when there are no validation pairs."""
    from tokencredit.rewards.seq_rm import (
        SeqRMConfig,
        SequenceRewardModel,
        evaluate_sequence_reward_model,
        train_sequence_reward_model,
    )

    rm = SequenceRewardModel.from_pretrained(cfg.model, lora=cfg.lora, seed=cfg.seed)
    config = SeqRMConfig(output_dir=str(folder), seed=cfg.seed, num_epochs=cfg.num_epochs,
                         batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, lr_schedule=cfg.lr_schedule,
                         warmup_ratio=cfg.warmup_ratio, max_length=cfg.max_length, eval_fraction=0.0,
                         progress=cfg.progress)
    train_sequence_reward_model(rm, config, pairs, eval_pairs=test)
    test_acc = json.loads((folder / "eval.json").read_text())["pair_accuracy"]
    if not val:
        return rm, test_acc, test_acc
    val_metrics = evaluate_sequence_reward_model(rm, val, cfg.batch_size, cfg.max_length)
    atomic_write_json(folder / "val.json", val_metrics)
    return rm, test_acc, val_metrics["pair_accuracy"]


@releases_run_folders
def run_evolve(cfg: EvolveConfig) -> dict:
    """Run SER loops until the stop rule; returns the summary also written to summary.json."""
    cfg.validate()
    rule = SelectionRule(cfg.status, cfg.high, cfg.low, cfg.min_gap)
    train, val, held = _load(cfg)
    out = Path(cfg.output_dir)
    # Before anything is written: the folder must be this run's (see config.claim_folder_for).
    drop_replaced = claim_folder_for(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    order = list(range(len(train)))
    random.Random(cfg.seed).shuffle(order)
    n_seed = max(1, round(cfg.labelled_fraction * len(train)))
    seed_ids, pool_ids = sorted(order[:n_seed]), sorted(order[n_seed:])
    # Each pool pair is shown to the RM in a fixed random order, so its pseudo-label cannot lean on the file's
    # chosen-first layout; whether the RM picked the true chosen is kept for the report only.
    flip = {i: random.Random(f"{cfg.seed}-{i}").random() < 0.5 for i in pool_ids}
    state_path = out / "ser_state.json"
    seed_pairs = [train[i] for i in seed_ids]
    if cfg.resume and state_path.exists():
        state = _resumed_state(state_path, pool_ids)
        log.info("resuming SER at loop %d (%d pairs in the pool)", state.loop, len(state.pool))
    else:
        state = SERState(pool=pool_ids)
    # loops.jsonl is rewritten whole from the state after every save: a crash between the two can only leave it
    # one loop behind, and the next write (or this one, on resume) brings it level.
    _write_loops(out, state, flip, len(seed_pairs))
    while True:
        loop = state.loop
        pseudo = [_oriented(train[lab.pair_id], flip[lab.pair_id], lab.chosen) for lab in state.labels]
        rm, test_accuracy, accuracy = _train(cfg, seed_pairs + pseudo, held, val, out / f"loop-{loop}")
        shown = [_shown(train[i], flip[i]) for i in state.pool]
        p_a, p_b = _pool_probabilities(rm, shown, cfg.batch_size, cfg.calibrate, cfg.max_length)
        picked = select_pairs(p_a, p_b, rule).selected if state.pool else []
        ids = list(state.pool)
        right = sum((s.chosen == "a") != flip[ids[s.index]] for s in picked)
        record = state.add_selected(picked, heldout_accuracy=accuracy, test_accuracy=test_accuracy)
        state.save(state_path)
        lines = _write_loops(out, state, flip, len(seed_pairs))
        drop_replaced()  # a replaced run goes once this one has finished a loop
        log.info("SER loop %d: validation accuracy %.3f, test %.3f, selected %d (%d right), pool %d", loop,
                 accuracy, test_accuracy, record.selected, right, record.pool_left)
        reason = state.stop_reason(cfg.patience, cfg.min_delta)
        if reason is None and loop >= cfg.max_loops:
            reason = f"reached max_loops={cfg.max_loops}"
        if reason is not None:
            break
    summary = {"stop_reason": reason, "seed_pairs": len(seed_pairs), "pool_pairs": len(pool_ids),
               "heldout_pairs": len(held), "val_pairs": len(val),
               "chosen_on": "validation pairs" if val else "test pairs (optimistic: val_fraction=0)", "loops": lines}
    # The reward model to hand to PPO (`tokencredit ppo reward=rm:<best_model> reward_sigmoid_baseline=0.5`),
    # named by its loop number: the folder is loop-<number>, whatever position the line has in the list. It is
    # chosen on the validation pairs; the accuracies reported are the test pairs'.
    best_line = max(lines, key=lambda r: r["heldout_accuracy"])
    best = best_line["loop"]
    summary["best_loop"], summary["best_model"] = best, str(out / f"loop-{best}" / "model")
    summary["seed_accuracy"], summary["best_accuracy"] = _test_accuracy(lines[0]), _test_accuracy(best_line)
    summary["last_accuracy"] = _test_accuracy(lines[-1])
    summary["seed_val_accuracy"], summary["best_val_accuracy"] = lines[0]["heldout_accuracy"], best_line[
        "heldout_accuracy"]
    if cfg.steps_matched_baseline:
        full_steps = cfg.num_epochs * math.ceil(len(train) / cfg.batch_size)
        epochs = math.ceil(full_steps / math.ceil(len(seed_pairs) / cfg.batch_size))
        matched = EvolveConfig(**{**vars(cfg), "num_epochs": epochs})
        _, matched_test, matched_val = _train(matched, seed_pairs, held, val, out / "seed-steps-matched")
        summary["seed_steps_matched"] = {"epochs": epochs, "steps": epochs * math.ceil(len(seed_pairs) /
                                                                                       cfg.batch_size),
                                         "full_label_steps": full_steps}
        summary["seed_steps_matched_accuracy"] = matched_test
        summary["seed_steps_matched_val_accuracy"] = matched_val
    if cfg.full_baseline:
        # The reference sees every label SER could have used: the training pairs (the validation pairs steer SER
        # and are not trained on by either).
        _, full_test, full_val = _train(cfg, train, held, val, out / "full-labels")
        summary["full_label_accuracy"], summary["full_label_val_accuracy"] = full_test, full_val
    atomic_write_json(out / "summary.json", summary)
    _report(out, summary)
    return summary


def _test_accuracy(line: dict) -> float | None:
    """A loop's test accuracy; a state from before validation splits recorded only the one accuracy."""
    return line.get("test_accuracy", line["heldout_accuracy"])


def _resumed_state(path: Path, pool_ids: list[int]) -> SERState:
    """The saved SER state, checked against this run's pool: its ids must be pool pairs of the same data."""
    try:
        state = SERState.load(path)
    except (OSError, ValueError) as exc:  # JSONDecodeError and a malformed state are ValueErrors
        raise RunFolderError(f"{path} cannot be read ({exc}); resume=false starts the SER run over") from exc
    known = set(pool_ids)
    named = [*state.pool, *(label.pair_id for label in state.labels)]
    stray = [pid for pid in named if isinstance(pid, bool) or pid not in known]
    if stray or len(named) != len(known):
        what = f"pair ids {stray[:5]} that are not" if stray else f"{len(named)} pair ids for the {len(known)}"
        raise RunFolderError(
            f"{path} names {what} unlabelled pairs this run draws from its data (seed, data, max_pairs, "
            "eval_fraction and labelled_fraction decide them): the data or the state changed since the run "
            "started. Resume with the same data, or resume=false to start over")
    return state


def _write_loops(out: Path, state: SERState, flip: dict[int, bool], n_seed: int) -> list[dict]:
    """Write loops.jsonl from the state alone (one line per finished loop) and return its lines.

    Every field is derived from the state: whether a pseudo-label is right comes from the pair's fixed flip, and
    the pairs a loop trained on are the seed plus the labels of the loops before it.
    """
    lines = []
    for record in state.history:
        labels = [lab for lab in state.labels if lab.loop == record.loop]
        right = sum((lab.chosen == "a") != flip[lab.pair_id] for lab in labels)
        lines.append({**asdict(record), "pseudo_label_accuracy": right / len(labels) if labels else None,
                      "train_pairs": n_seed + record.labelled_total - record.selected})
    atomic_write_text(out / "loops.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
    return lines


def _pool_probabilities(
    rm: object, shown: list[PreferencePair], batch_size: int, calibrate: bool, max_length: int
) -> tuple[list[float], list[float]]:
    """p = sigma(r) of both sides of every pool pair (read within max_length tokens, as in training); with
    ``calibrate``, of the pool-standardised r."""
    prompts = [p.prompt for p in shown]
    r_a = rm.score_sequences(prompts, [p.chosen for p in shown], batch_size, max_length)
    r_b = rm.score_sequences(prompts, [p.rejected for p in shown], batch_size, max_length)
    mean, std = 0.0, 1.0
    if calibrate and len(r_a) + len(r_b) > 1:
        everything = r_a + r_b
        mean = sum(everything) / len(everything)
        std = math.sqrt(sum((x - mean) ** 2 for x in everything) / (len(everything) - 1)) or 1.0

    def sigma(x: float) -> float:
        return 1.0 / (1.0 + math.exp(-(x - mean) / std))

    return [sigma(x) for x in r_a], [sigma(x) for x in r_b]


def _shown(pair: PreferencePair, flip: bool) -> PreferencePair:
    """The pair as shown to the RM: (a, b) = (chosen, rejected), or swapped."""
    return PreferencePair(pair.prompt, pair.rejected, pair.chosen) if flip else pair


def _oriented(pair: PreferencePair, flip: bool, chosen_side: str) -> PreferencePair:
    """The pseudo-labelled pair: the side the RM preferred first."""
    a_b = _shown(pair, flip)
    return a_b if chosen_side == "a" else PreferencePair(pair.prompt, a_b.rejected, a_b.chosen)


def _report(out: Path, summary: dict) -> None:
    """report.html: held-out accuracy per loop (and the full-label line), and the loop table."""
    from tokencredit.evaluate import html_table, svg_line_chart, write_html_report

    series = {"SER (test)": [_test_accuracy(r) for r in summary["loops"]]}
    if summary.get("val_pairs"):
        series["SER (validation, steers the loop)"] = [r["heldout_accuracy"] for r in summary["loops"]]
    if "full_label_accuracy" in summary:
        series["100% labels (test)"] = [summary["full_label_accuracy"]] * len(summary["loops"])
    chart = svg_line_chart(series, "Pair accuracy per SER loop (first point: the seed RM)", xlabel="loop + 1",
                           ylabel="accuracy")
    write_html_report(out / "report.html", "tokencredit evolve (SER)", [
        ("Accuracy", chart + f"<p class='small'>stopped: {summary['stop_reason']}</p>"),
        ("Loops", html_table(summary["loops"])),
    ])
