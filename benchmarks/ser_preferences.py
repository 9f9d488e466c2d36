"""SER (15% labels + self-evolution) vs 100% labels on preference data where a small RM is above chance.

``ser_hh_harmless.py`` cannot separate the arms: there even the RM trained on every label scores ~0.50 held-out.
This benchmark first checks the upper reference (the RM on 100% of the training labels) and then compares, on the
same splits per seed:

- ``seed RM``: SER loop 0, trained on the ``--labelled`` share (15% by default) of the training labels;
- ``seed RM, steps matched``: the same seed pairs trained for as many optimiser steps as the 100% reference (more
  epochs): SER's loops and the reference train more steps than the seed RM, so without this control "more labels"
  and "more steps" are one variable;
- ``SER best`` / ``SER last``: the loop chosen on validation pairs (``--val-fraction`` of the training pairs, never
  trained on and never reported) and the last loop, both measured on the held-out test pairs;
- ``100% labels``: the same RM recipe on every training label.

Selection uses the paper's thresholds on raw sigma(r) unless ``--calibrate``. ``--recipe paper`` trains every RM
with the public SER code's settings (LoRA r = 8, AdamW 2e-5, 2 epochs, linear decay; results in
``ser_preferences_paper.json``) instead of ours (full fine-tuning, 2e-4 constant). Per dataset the gap
"100% labels - seed RM" gets a paired bootstrap 95% interval over the test pairs of all seeds: a data set only
shows SER when that gap is clearly above 0.

Data (read from ../shared/data, "skipped" when absent; not part of the product). Every split is by group
(article / question / dialogue; IMDB: train vs test file), so no text is shared between training and held-out pairs:

- ``frank``: FRANK human factuality judgments on CNN/DM summaries, pairs with a factuality gap >= ``--frank-gap``;
  the prompt is the article's lead (CNN/DM summaries draw on it) so it fits the RM's context.
- ``qa``: QA-Feedback (FineGrainedRLHF) human pairwise preferences; prompt = start of the passages + question
  (probed only: the 100% reference is at chance).
- ``imdb``: DERIVED, easy: "Write a positive review" with a real positive review chosen over a real negative one
  (IMDB human labels define the preference); train pairs from imdb/train.jsonl, held-out pairs from imdb/test.jsonl.
- ``hh``: HH-RLHF harmless-base, kept as the hard case (the 100% reference is at chance there).

    python benchmarks/ser_preferences.py --probe --datasets frank qa imdb   # 100% vs 15% only, first seed
    python benchmarks/ser_preferences.py --seeds 0 1 2                      # frank, hh, imdb; ~50 min on 2 cores

Results go to benchmarks/results/ser_preferences.json after every seed (the probe to ser_preferences_probe.json),
the chart to ser_preferences.svg; ``--report`` redoes the tables and chart from a results file.
"""

from __future__ import annotations

import argparse
import html
import json
import random
import re
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
RESULTS = Path(__file__).parent / "results"
ARMS = ("seed RM", "seed RM, steps matched", "SER best", "SER last", "100% labels")
ARM_KEYS = {"seed RM": "seed_accuracy", "seed RM, steps matched": "seed_steps_matched_accuracy",
            "SER best": "best_accuracy", "SER last": "last_accuracy", "100% labels": "full_label_accuracy"}
RECIPES = {"ours": {}, "paper": {"lr": 2e-5, "epochs": 2, "lr_schedule": "linear", "lora_r": 8}}

Pair = dict[str, str]
Builder = Callable[[argparse.Namespace, int], tuple[list[Pair], list[Pair]]]


def _words(text: str, n: int) -> str:
    """The first n whitespace words of text, with IMDB's <br /> markup removed."""
    return " ".join(text.replace("<br />", " ").split()[:n])


def _head(text: str, n: int) -> str:
    """text up to the end of its n-th whitespace word, layout kept."""
    words = list(re.finditer(r"\S+", text))
    return text if len(words) <= n else text[: words[n - 1].end()]


def _tail(text: str, n: int) -> str:
    """text from the start of its n-th last whitespace word, layout kept."""
    words = list(re.finditer(r"\S+", text))
    return text if len(words) <= n else text[words[-n].start() :]


def _read(path: Path) -> list[dict]:
    """Rows of a .jsonl file."""
    # split on "\n" only: str.splitlines() would also break at U+2028 inside review texts
    return [json.loads(line) for line in path.read_text().split("\n") if line.strip()]


def _group_split(rows: list[tuple[str, Pair]], n_train: int, n_held: int, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, held) from (group, pair) rows: whole groups go to one side, so held-out texts are never trained on."""
    groups: dict[str, list[Pair]] = defaultdict(list)
    for key, pair in rows:
        groups[key].append(pair)
    keys = sorted(groups)
    rng = random.Random(seed)
    rng.shuffle(keys)
    held: list[Pair] = []
    train: list[Pair] = []
    for key in keys:
        (held if len(held) < n_held else train).extend(groups[key])
    rng.shuffle(train)
    return train[:n_train], held


def build_frank(args: argparse.Namespace, seed: int) -> tuple[list[Pair], list[Pair]]:
    """FRANK factuality pairs with a large human-score gap, split by article."""
    rows = []
    for r in _read(DATA / "preferences" / "frank_factuality_pairs.jsonl"):
        if r["chosen_factuality"] - r["rejected_factuality"] < args.frank_gap - 1e-9:
            continue
        # The stored prompt is the whole article; the RM keeps a prompt's END when truncating, which for news
        # would drop the lead the summaries are written from, so the lead is cut here instead.
        article = r["prompt"].split("Article:", 1)[1].rsplit("Summary:", 1)[0]
        prompt = f"Summarize the following news article.\n\nArticle: {_words(article, args.prompt_words)}\n\nSummary:"
        rows.append((r["prompt"], {"prompt": prompt, "chosen": _head(r["chosen"], args.response_words),
                                   "rejected": _head(r["rejected"], args.response_words)}))
    return _group_split(rows, args.train_pairs, args.heldout_pairs, seed)


def build_qa(args: argparse.Namespace, seed: int) -> tuple[list[Pair], list[Pair]]:
    """QA-Feedback human pairwise preferences, split by question."""
    rows = []
    for r in _read(DATA / "preferences" / "qa_feedback_pairs.jsonl"):
        context = r["prompt"].split("context:", 1)[-1].rsplit("answer:", 1)[0]
        # The question goes last: when prompt + response is too long the RM keeps the prompt's end.
        prompt = f"context: {_words(context, args.prompt_words)} question: {r['question']} answer:"
        rows.append((str(r["qid"]), {"prompt": prompt, "chosen": r["chosen"], "rejected": r["rejected"]}))
    return _group_split(rows, args.train_pairs, args.heldout_pairs, seed)


IMDB_PROMPT = "Write a positive review of a movie.\n\nReview:"


def _imdb_pairs(path: Path, n: int, words: int, seed: int) -> list[Pair]:
    """n derived pairs from one IMDB file: a real positive review chosen over a real negative one (no reuse)."""
    rows = _read(path)
    rng = random.Random(seed)
    pos = [r["text"] for r in rows if r["label"] == 1]
    neg = [r["text"] for r in rows if r["label"] == 0]
    rng.shuffle(pos)
    rng.shuffle(neg)
    return [{"prompt": IMDB_PROMPT, "chosen": " " + _words(p, words), "rejected": " " + _words(q, words)}
            for p, q in zip(pos[:n], neg[:n])]


def build_imdb(args: argparse.Namespace, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Derived IMDB pairs: train from imdb/train.jsonl, held-out from imdb/test.jsonl."""
    return (_imdb_pairs(DATA / "imdb" / "train.jsonl", args.train_pairs, args.response_words, seed),
            _imdb_pairs(DATA / "imdb" / "test.jsonl", args.heldout_pairs, args.response_words, seed + 1000))


def build_hh(args: argparse.Namespace, seed: int) -> tuple[list[Pair], list[Pair]]:
    """HH-RLHF harmless-base pairs (dialogue end, response start), split by dialogue; empty chosen dropped."""
    rows = [(r["prompt"], {"prompt": _tail(r["prompt"], args.prompt_words),
                           "chosen": _head(r["chosen"], args.response_words),
                           "rejected": _head(r["rejected"], args.response_words)})
            for r in _read(DATA / "preferences" / "hh_harmless.jsonl") if r["chosen"].strip()]
    return _group_split(rows, args.train_pairs, args.heldout_pairs, seed)


BUILDERS: dict[str, tuple[Builder, str, Path]] = {
    "frank": (build_frank, "FRANK factuality (CNN/DM), human scores, gap-filtered",
              DATA / "preferences" / "frank_factuality_pairs.jsonl"),
    "qa": (build_qa, "QA-Feedback human pairwise preferences", DATA / "preferences" / "qa_feedback_pairs.jsonl"),
    "imdb": (build_imdb, "IMDB-derived: positive over negative review (easy, derived)", DATA / "imdb" / "train.jsonl"),
    "hh": (build_hh, "HH-RLHF harmless-base (hard case)", DATA / "preferences" / "hh_harmless.jsonl"),
}

# Texts are cut here so that prompt + response mostly fits max_length: the RM's training truncates to it, but its
# held-out evaluation and SER's pool scoring (score_sequences) do not, so longer texts would be scored on more context
# than the RM was trained on (and a response over 512 tokens stops run_evolve with a ValueError).
# Per-dataset sizes: one seed (4 SER trainings + the 100% RM) takes a few minutes on 2 idle CPU cores (several
# times that while other jobs share them).
DEFAULTS: dict[str, dict] = {
    "frank": {"train_pairs": 320, "heldout_pairs": 200, "max_length": 128, "prompt_words": 30, "response_words": 60},
    "qa": {"train_pairs": 240, "heldout_pairs": 160, "max_length": 128, "prompt_words": 30},
    "imdb": {"train_pairs": 320, "heldout_pairs": 200, "max_length": 128, "response_words": 60},
    "hh": {"train_pairs": 240, "heldout_pairs": 160, "max_length": 128, "prompt_words": 40, "response_words": 50},
}


def _dataset_args(args: argparse.Namespace, name: str) -> argparse.Namespace:
    """args with the dataset's size defaults filled in where the command line left them unset."""
    values = vars(args).copy()
    for key, value in {"prompt_words": 40, "response_words": 60, **DEFAULTS[name]}.items():
        if values.get(key) is None:
            values[key] = value
    return argparse.Namespace(**values)


def _write_pairs(path: Path, pairs: list[Pair]) -> None:
    """pairs as .jsonl."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))


def run_seed(args: argparse.Namespace, name: str, seed: int) -> dict:
    """One seed of one dataset: SER from the labelled share, plus the 100%-label RM on the same split."""
    from tokencredit.rewards.data import load_pairs
    from tokencredit.rewards.evolve import EvolveConfig, run_evolve

    a = _dataset_args(args, name)
    train, held = BUILDERS[name][0](a, seed)
    out = Path(args.output) / name / f"seed{seed}"
    _write_pairs(out / "train.jsonl", train)
    _write_pairs(out / "held.jsonl", held)
    # patience = max_loops: every loop runs (unless nothing is selected), so "last loop" is a fixed budget and
    # "best loop" shows what held-out early stopping could at most pick.
    from tokencredit.models import LoraSettings

    lora = LoraSettings(r=args.lora_r, alpha=2 * args.lora_r) if args.lora_r else None
    cfg = EvolveConfig(output_dir=str(out / "ser"), model=args.model, data=str(out / "train.jsonl"),
                       eval_data=str(out / "held.jsonl"), seed=seed, labelled_fraction=args.labelled,
                       val_fraction=args.val_fraction, max_loops=args.max_loops, patience=max(1, args.max_loops),
                       num_epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
                       lr_schedule=args.lr_schedule, lora=lora, max_length=a.max_length, full_baseline=True,
                       steps_matched_baseline=True, progress=False, calibrate=args.calibrate)
    started = time.perf_counter()
    summary = run_evolve(cfg)
    loops = []
    for r in summary["loops"]:
        right = None if r["pseudo_label_accuracy"] is None else round(r["pseudo_label_accuracy"] * r["selected"])
        loops.append({"loop": r["loop"], "train_pairs": r["train_pairs"], "val_accuracy": r["heldout_accuracy"],
                      "test_accuracy": r["test_accuracy"], "selected": r["selected"], "selected_right": right,
                      "pseudo_label_accuracy": r["pseudo_label_accuracy"]})
    # Per test pair, whether the seed RM and the 100% reference order it right: the paired interval of their gap.
    held_pairs = load_pairs(out / "held.jsonl")
    right = {key: _pair_right(out / "ser" / folder / "model", held_pairs, a.max_length)
             for key, folder in (("seed", "loop-0"), ("full", "full-labels"))}
    return {"train_pairs": len(train), "heldout_pairs": len(held), "val_pairs": summary["val_pairs"],
            "seed_pairs": summary["seed_pairs"], "pool_pairs": summary["pool_pairs"],
            **{key: summary[key] for key in ARM_KEYS.values()}, "best_loop": summary["best_loop"],
            "seed_steps_matched": summary["seed_steps_matched"], "stop_reason": summary["stop_reason"],
            "loops": loops, "pair_right": right, "wall_s": round(time.perf_counter() - started, 1)}


def _pair_right(model: Path, pairs: list, max_length: int) -> list[int]:
    """1 where the saved sequence RM scores a pair's chosen response above its rejected one, else 0."""
    from tokencredit.rewards.seq_rm import SequenceRewardModel

    rm = SequenceRewardModel.from_pretrained(str(model))
    prompts = [p.prompt for p in pairs]
    chosen = rm.score_sequences(prompts, [p.chosen for p in pairs], 16, max_length)
    rejected = rm.score_sequences(prompts, [p.rejected for p in pairs], 16, max_length)
    return [int(c > r) for c, r in zip(chosen, rejected)]


def paired_gap(runs: list[dict], resamples: int = 2000, seed: int = 0) -> dict | None:
    """Mean of (100% reference right - seed RM right) over the test pairs of every run, with a percentile 95%
    interval from resampling the pairs within each run (None when no run kept its per-pair results)."""
    rows = [(f, s) for r in runs if "pair_right" in r for f, s in zip(r["pair_right"]["full"], r["pair_right"]["seed"])]
    if not rows:
        return None
    diffs = [f - s for f, s in rows]
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return {"mean": sum(diffs) / n, "low": means[int(0.025 * resamples)], "high": means[int(0.975 * resamples) - 1],
            "pairs": n}


def probe(args: argparse.Namespace, name: str, seed: int) -> dict:
    """Quick check: held-out accuracy of the RM on 100% and on the labelled share of the training labels."""
    from tokencredit.rewards.data import load_pairs
    from tokencredit.rewards.seq_rm import SeqRMConfig, SequenceRewardModel, train_sequence_reward_model

    a = _dataset_args(args, name)
    train, held = BUILDERS[name][0](a, seed)
    out = Path(args.output) / "probe" / name
    _write_pairs(out / "train.jsonl", train)
    _write_pairs(out / "held.jsonl", held)
    train_p, held_p = load_pairs(out / "train.jsonl"), load_pairs(out / "held.jsonl")
    result: dict = {"train_pairs": len(train_p), "heldout_pairs": len(held_p)}
    shares = {"full_label_accuracy": train_p,
              "seed_accuracy": random.Random(seed).sample(train_p, max(1, round(args.labelled * len(train_p))))}
    for key, pairs in shares.items():
        started = time.perf_counter()
        rm = SequenceRewardModel.from_pretrained(args.model, seed=seed)
        cfg = SeqRMConfig(output_dir=str(out / key), seed=seed, num_epochs=args.epochs, batch_size=args.batch_size,
                          learning_rate=args.lr, max_length=a.max_length, eval_fraction=0.0, progress=False)
        history = train_sequence_reward_model(rm, cfg, pairs, eval_pairs=held_p)
        result[key] = history[-1]["eval"]["pair_accuracy"]
        result[key.replace("accuracy", "wall_s")] = round(time.perf_counter() - started, 1)
        print(f"probe {name} seed {seed} {key}: {result[key]:.3f} ({result[key.replace('accuracy', 'wall_s')]} s)",
              flush=True)
    return result


def _stat(values: list[float]) -> dict:
    """Mean and sample std (0 for one value)."""
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def _settings(args: argparse.Namespace) -> dict:
    """The settings that make results of different calls comparable."""
    return {"model": args.model, "threads": args.threads, "labelled_fraction": args.labelled,
            "max_loops": args.max_loops, "epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": args.lr,
            "lr_schedule": args.lr_schedule, "lora_r": args.lora_r, "recipe": args.recipe,
            "val_fraction": args.val_fraction, "calibrate": args.calibrate, "frank_gap": args.frank_gap,
            "sizes": {name: {k: v for k, v in vars(_dataset_args(args, name)).items() if k in DEFAULTS[name]}
                      for name in BUILDERS}}


def aggregate(per_seed: dict[str, dict[int, dict]]) -> dict:
    """Per dataset: mean ± std of every arm, the gap to the 100% reference, and pseudo-label counts per loop."""
    out: dict = {}
    for name, seeds in per_seed.items():
        if not seeds:
            continue
        runs = list(seeds.values())
        arms = {arm: _stat([r[key] for r in runs]) for arm, key in ARM_KEYS.items() if all(key in r for r in runs)}
        full = arms["100% labels"]["mean"]
        for arm in arms:
            vals = [r[ARM_KEYS[arm]] - r["full_label_accuracy"] for r in runs]
            arms[arm]["minus_full"] = _stat(vals)["mean"]
            arms[arm]["ratio_to_full"] = arms[arm]["mean"] / full if full else None
        loops: dict[int, dict] = {}
        for r in runs:
            for row in r["loops"]:
                agg = loops.setdefault(row["loop"], {"runs": 0, "heldout": [], "selected": 0, "right": 0})
                agg["runs"] += 1
                agg["heldout"].append(row.get("test_accuracy", row.get("heldout_accuracy")))
                agg["selected"] += row["selected"]
                agg["right"] += row["selected_right"] or 0
        per_loop = [{"loop": k, "runs": v["runs"], "heldout_accuracy": _stat(v["heldout"]),
                     "selected_total": v["selected"], "right_total": v["right"],
                     "pseudo_label_accuracy": v["right"] / v["selected"] if v["selected"] else None}
                    for k, v in sorted(loops.items())]
        out[name] = {"seeds": sorted(seeds), "arms": arms, "per_loop": per_loop, "full_minus_seed": paired_gap(runs)}
    return out


def table(agg: dict) -> str:
    """Markdown table: arm x dataset, mean ± std and the difference / ratio to the 100% reference."""
    names = list(agg)
    lines = ["| arm | " + " | ".join(f"{n} (n={len(agg[n]['seeds'])})" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for arm in ARMS:
        if not all(arm in agg[n]["arms"] for n in names):
            continue
        cells = []
        for n in names:
            s = agg[n]["arms"][arm]
            cell = f"{s['mean']:.3f} ± {s['std']:.3f}"
            if arm != "100% labels":
                cell += f" ({s['minus_full']:+.3f}, ×{s['ratio_to_full']:.2f})"
            cells.append(cell)
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    gaps = [agg[n].get("full_minus_seed") for n in names]
    if any(gaps):
        lines.append("| 100% − seed, paired 95% CI over test pairs | " + " | ".join(
            "—" if g is None else f"{g['mean']:+.3f} [{g['low']:+.3f}, {g['high']:+.3f}]" for g in gaps) + " |")
    return "\n".join(lines)


def loop_table(agg: dict) -> str:
    """Markdown table: per dataset and loop, held-out accuracy and pseudo-labels selected / right (all seeds)."""
    lines = ["| dataset | loop | test acc. | pseudo-labels selected | right | pseudo-label acc. |",
             "|---|---|---|---|---|---|"]
    for n, a in agg.items():
        for row in a["per_loop"]:
            acc = row["pseudo_label_accuracy"]
            h = row["heldout_accuracy"]
            lines.append(f"| {n} | {row['loop']} ({row['runs']} runs) | {h['mean']:.3f} ± {h['std']:.3f} | "
                         f"{row['selected_total']} | {row['right_total']} | "
                         f"{'—' if acc is None else f'{acc:.3f}'} |")
    return "\n".join(lines)


def bar_chart(agg: dict, title: str) -> str:
    """A grouped bar chart (SVG) of held-out accuracy per arm and dataset, with ±std whiskers and a chance line."""
    colours = {"seed RM": "#9ecae1", "seed RM, steps matched": "#c6dbef", "SER best": "#3182bd",
               "SER last": "#08519c", "100% labels": "#e6550d"}
    names = list(agg)
    width, height, pad_l, pad_b, pad_t = 190 + 200 * max(1, len(names)), 300, 50, 40, 40
    plot_h = height - pad_t - pad_b
    lo, hi = 0.3, 1.0

    def y(v: float) -> float:
        return pad_t + (hi - max(lo, min(hi, v))) / (hi - lo) * plot_h

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="11">', f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">'
             f'{html.escape(title)}</text>']
    for tick in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0):
        dash = ' stroke-dasharray="4,3"' if tick == 0.5 else ""
        parts.append(f'<line x1="{pad_l}" x2="{width - 170}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" '
                     f'stroke="{"#888" if tick == 0.5 else "#eee"}"{dash}/>')
        parts.append(f'<text x="{pad_l - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:.1f}</text>')
    bar = 30
    for i, n in enumerate(names):
        x0 = pad_l + 20 + i * 200
        for j, arm in enumerate(a for a in ARMS if a in agg[n]["arms"]):
            s = agg[n]["arms"][arm]
            x = x0 + j * (bar + 4)
            parts.append(f'<rect x="{x}" y="{y(s["mean"]):.1f}" width="{bar}" height="{y(lo) - y(s["mean"]):.1f}" '
                         f'fill="{colours[arm]}"><title>{html.escape(arm)}: {s["mean"]:.3f} ± {s["std"]:.3f}'
                         f'</title></rect>')
            cx = x + bar / 2
            parts.append(f'<line x1="{cx}" x2="{cx}" y1="{y(s["mean"] - s["std"]):.1f}" '
                         f'y2="{y(s["mean"] + s["std"]):.1f}" stroke="#333"/>')
        parts.append(f'<text x="{x0 + 2 * (bar + 4)}" y="{height - pad_b + 16}" text-anchor="middle">'
                     f'{html.escape(n)} (n={len(agg[n]["seeds"])})</text>')
    for j, arm in enumerate(ARMS):
        ly = pad_t + 10 + j * 18
        parts.append(f'<rect x="{width - 162}" y="{ly - 9}" width="10" height="10" fill="{colours[arm]}"/>')
        parts.append(f'<text x="{width - 148}" y="{ly}">{html.escape(arm)}</text>')
    parts.append(f'<text x="{width - 162}" y="{pad_t + 108}" fill="#888">dashed: chance</text>')
    parts.append(f'<text x="14" y="{pad_t + plot_h / 2}" transform="rotate(-90 14 {pad_t + plot_h / 2})" '
                 f'text-anchor="middle">held-out pair accuracy</text></svg>')
    return "".join(parts)


def _load_earlier(path: Path, settings: dict, rerun: set[tuple[str, int]]) -> dict[str, dict[int, dict]]:
    """Seeds already in the results file with the same settings (kept, so a cut run can be continued)."""
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    if old.get("settings") != settings:
        print(f"{path} holds results of other settings; they will be replaced", flush=True)
        return {}
    return {name: {int(s): r for s, r in seeds.items() if (name, int(s)) not in rerun}
            for name, seeds in old.get("per_seed", {}).items()}


def _write(args: argparse.Namespace, per_seed: dict[str, dict[int, dict]], started: float) -> dict:
    """Write the JSON results and the SVG chart for the seeds finished so far; returns the aggregate."""
    agg = aggregate(per_seed)
    result = {"what": "SER (15% labels + self-evolution loops) vs the same sequence RM on 100% of the labels",
              "settings": _settings(args), "datasets": {n: BUILDERS[n][1] for n in per_seed},
              "wall_minutes_this_call": round((time.perf_counter() - started) / 60, 1),
              "aggregate": agg, "per_seed": {n: {str(s): r for s, r in sorted(v.items())}
                                             for n, v in per_seed.items()}}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=1) + "\n")
    if agg:
        Path(args.svg).write_text(bar_chart(agg, f"SER from {args.labelled:.0%} labels: held-out pair accuracy "
                                                 "(mean ± std over seeds)"))
    return agg


def _print_tables(agg: dict, labelled: float) -> None:
    """The side-by-side table and the per-loop pseudo-label table."""
    print(f"\nHeld-out pair accuracy, mean ± std over seeds (seed RM on {labelled:.0%} of the labels; in brackets: "
          "difference and ratio to the 100% reference):\n")
    print(table(agg))
    print("\nPer loop, all seeds together:\n")
    print(loop_table(agg))


def report(path: Path, svg: Path) -> int:
    """Recompute the aggregate of a results file, rewrite it and its chart, and print the tables."""
    result = json.loads(path.read_text())
    per_seed = {n: {int(s): r for s, r in seeds.items()} for n, seeds in result["per_seed"].items()}
    result["aggregate"] = agg = aggregate(per_seed)
    path.write_text(json.dumps(result, indent=1) + "\n")
    labelled = result["settings"]["labelled_fraction"]
    svg.write_text(bar_chart(agg, f"SER from {labelled:.0%} labels: held-out pair accuracy (mean ± std over seeds)"))
    _print_tables(agg, labelled)
    print(f"\nwrote {path} and {svg}")
    return 0


def main() -> int:
    """Run the probe or the benchmark and write benchmarks/results/ser_preferences*.json."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["frank", "hh", "imdb"], choices=list(BUILDERS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--probe", action="store_true", help="only the 100%% and 15%% RMs, first seed")
    parser.add_argument("--model", default="all-minilm-l6-v2")
    parser.add_argument("--labelled", type=float, default=0.15)
    parser.add_argument("--max-loops", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--calibrate", action="store_true",
                        help="standardise the pool's scores before the thresholds (default: the paper's raw sigma(r))")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="share of the training pairs that chooses the best loop (never trained on)")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="ours",
                        help="ours: full fine-tuning at --lr; paper: the public SER code's LoRA r=8, 2e-5, linear")
    parser.add_argument("--frank-gap", type=float, default=0.5, help="min chosen - rejected factuality score")
    parser.add_argument("--train-pairs", type=int, default=None, help="override the dataset's default")
    parser.add_argument("--heldout-pairs", type=int, default=None, help="override the dataset's default")
    parser.add_argument("--max-length", type=int, default=None, help="override the dataset's default")
    parser.add_argument("--prompt-words", type=int, default=None, help="override the dataset's default")
    parser.add_argument("--response-words", type=int, default=None, help="IMDB review words kept")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 by default: on 2 cores shared with other jobs, 2 threads ran 6x "
                             "slower than 1 (the threads wait on each other whenever one is descheduled)")
    parser.add_argument("--output", default="runs/bench-ser-preferences")
    parser.add_argument("--results", default=None)
    parser.add_argument("--svg", default=str(RESULTS / "ser_preferences.svg"))
    parser.add_argument("--report", action="store_true",
                        help="only redo the aggregate, tables and chart from --results")
    args = parser.parse_args()
    args.lr_schedule, args.lora_r = "constant", None
    for key, value in RECIPES[args.recipe].items():
        setattr(args, key, value)
    if args.recipe != "ours" and args.results is None:
        args.results = str(RESULTS / f"ser_preferences_{args.recipe}.json")
        args.svg = str(RESULTS / f"ser_preferences_{args.recipe}.svg")
    if args.report:
        return report(Path(args.results or RESULTS / "ser_preferences.json"), Path(args.svg))
    missing = [n for n in args.datasets if not BUILDERS[n][2].exists()]
    if missing:
        print(f"skipped: data for {missing} not found under {DATA}")
        return 0
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if args.probe:
        path = Path(args.results or RESULTS / "ser_preferences_probe.json")
        old = json.loads(path.read_text()) if path.exists() else {}
        for name in args.datasets:
            old[name] = {"settings": {**_settings(args), "sizes": _settings(args)["sizes"][name]},
                         "seed": args.seeds[0], **probe(args, name, args.seeds[0])}
            path.write_text(json.dumps(old, indent=1) + "\n")
        print(json.dumps(old, indent=1))
        return 0
    args.results = args.results or str(RESULTS / "ser_preferences.json")
    settings = _settings(args)
    per_seed = _load_earlier(Path(args.results), settings, {(n, s) for n in args.datasets for s in args.seeds})
    # Seed-major order: after each round every dataset has the same number of seeds, so a cut run stays balanced.
    for seed in args.seeds:
        for name in args.datasets:
            row = run_seed(args, name, seed)
            per_seed.setdefault(name, {})[seed] = row
            print(json.dumps({"dataset": name, "seed": seed, **{k: v for k, v in row.items()
                                                                 if k not in ("loops", "pair_right")}}),
                  flush=True)
            for r in row["loops"]:
                print(f"  loop {r['loop']}: val {r['val_accuracy']:.3f}, test {r['test_accuracy']:.3f}, "
                      f"train {r['train_pairs']}, "
                      f"selected {r['selected']} ({r['selected_right']} right)", flush=True)
            _write(args, per_seed, started)
    agg = _write(args, per_seed, started)
    _print_tables(agg, args.labelled)
    print(f"\nwrote {args.results} and {args.svg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
