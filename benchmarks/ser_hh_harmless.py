"""SER on real preference pairs (Anthropic HH-RLHF harmless-base test split): 15% labels + self-evolution vs 100%.

Reads ../shared/data/preferences/hh_harmless.jsonl (not part of the product; "skipped" when absent). Per seed:
a random subset of ``--pairs`` pairs, 20% held out; a sequence RM on the MiniLM backbone trained on 100% of the
training labels, and SER starting from ``--labelled`` of them (loop 0 = the seed RM), each loop retraining from
the backbone. Prints and writes per-loop held-out accuracy, pseudo-label accuracy and the full-label accuracy.

    python benchmarks/ser_hh_harmless.py --seeds 0 1 2     # about 12 minutes a seed on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from tokencredit.rewards.evolve import EvolveConfig, run_evolve

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "preferences" / "hh_harmless.jsonl"


def main() -> int:
    """Run the seeds and write benchmarks/results/ser_hh_harmless.json."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pairs", type=int, default=600, help="pairs sampled per seed (train + held out)")
    parser.add_argument("--labelled", type=float, default=0.15)
    parser.add_argument("--max-loops", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                        help="threshold raw sigma(r) (the paper's rule); by default the pool's scores are standardised")
    parser.add_argument("--output", default="runs/bench-ser")
    parser.add_argument("--results", default=str(Path(__file__).parent / "results" / "ser_hh_harmless.json"))
    args = parser.parse_args()
    if not Path(args.data).exists():
        print(f"skipped: {args.data} not found")
        return 0
    rows = [line for line in Path(args.data).read_text().splitlines() if line.strip()]
    per_seed = _earlier_seeds(args)
    started = time.perf_counter()
    for seed in args.seeds:
        out = Path(args.output) / f"seed{seed}"
        out.mkdir(parents=True, exist_ok=True)
        subset = out / "pairs.jsonl"
        subset.write_text("\n".join(random.Random(seed).sample(rows, min(args.pairs, len(rows)))) + "\n")
        cfg = EvolveConfig(output_dir=str(out), model="all-minilm-l6-v2", data=str(subset), seed=seed,
                           labelled_fraction=args.labelled, max_loops=args.max_loops, patience=2,
                           num_epochs=args.epochs, batch_size=16, learning_rate=args.lr, max_length=128,
                           full_baseline=True, progress=False, calibrate=args.calibrate)
        summary = run_evolve(cfg)
        per_seed[seed] = {k: summary[k] for k in ("seed_pairs", "pool_pairs", "heldout_pairs", "seed_accuracy",
                                                   "best_accuracy", "full_label_accuracy", "stop_reason")}
        per_seed[seed]["loops"] = [{k: r[k] for k in ("loop", "heldout_accuracy", "selected",
                                                      "pseudo_label_accuracy", "train_pairs")}
                                   for r in summary["loops"]]
        per_seed[seed]["final_accuracy"] = summary["loops"][-1]["heldout_accuracy"]
        print(json.dumps({"seed": seed, **per_seed[seed]}, indent=1), flush=True)
        _write(args, per_seed, started)
    return 0


_SETTINGS = ("pairs_per_seed", "labelled_fraction", "epochs", "learning_rate", "calibrate")


def _settings(args: argparse.Namespace) -> dict:
    """The settings that make results of different runs comparable."""
    return {"pairs_per_seed": args.pairs, "labelled_fraction": args.labelled, "epochs": args.epochs,
            "learning_rate": args.lr, "calibrate": args.calibrate}


def _earlier_seeds(args: argparse.Namespace) -> dict:
    """Seeds already in the results file with the same settings (kept, so seeds can run in separate calls)."""
    path = Path(args.results)
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    if {k: old.get(k) for k in _SETTINGS} != _settings(args):
        print(f"{path} holds results of other settings; they will be replaced")
        return {}
    return {int(s): v for s, v in old["per_seed"].items() if int(s) not in args.seeds}


def _write(args: argparse.Namespace, per_seed: dict, started: float) -> None:
    """Write the results of the seeds finished so far (a long run leaves numbers behind as it goes)."""
    seeds = list(per_seed)

    def stat(key: str) -> dict:
        vals = [per_seed[s][key] for s in seeds]
        return {"mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}

    result = {
        "what": "SER (15% labels + loops) vs a sequence RM on 100% labels, HH-RLHF harmless-base, MiniLM backbone",
        "data": args.data, **_settings(args), "seeds": sorted(seeds),
        "wall_minutes_this_call": round((time.perf_counter() - started) / 60, 1),
        "aggregate": {k: stat(k) for k in ("seed_accuracy", "best_accuracy", "final_accuracy",
                                           "full_label_accuracy")},
        "per_seed": per_seed,
    }
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["aggregate"], indent=1))
    print(f"wrote {args.results}")


if __name__ == "__main__":
    sys.exit(main())
