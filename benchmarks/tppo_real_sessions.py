"""TPPO vs SFT vs sequence-level PPO on real query sessions (TREC 2013 Session track), over several seeds.

Reads ../shared/data/querygen/trec2013_sessions.jsonl (real data, not part of the product; the script says
"skipped" and exits 0 when it is absent). Each seed runs the whole demo pipeline: its own train/test split by
user, SFT, sampled and labelled queries, token reward model, then TPPO and sequence-level PPO from the same
SFT model and reward model, all evaluated on that seed's held-out users. Policies of one seed share
everything but the RL step, so the per-seed differences (TPPO - SFT, TPPO - PPO-sequence) are paired.

    python benchmarks/tppo_real_sessions.py                  # seeds 0 1 2, about 12 minutes each on 2 cores
    python benchmarks/tppo_real_sessions.py --fast --seeds 0 # tiny model: checks the script only

Writes benchmarks/results/tppo_real_sessions.json: per-seed metrics, mean/std over seeds, paired differences.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from tokencredit.recipes.tppo import DemoConfig, run_demo

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "querygen" / "trec2013_sessions.jsonl"
POLICIES = ("sft", "tppo", "ppo_sequence")


def _mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def main() -> int:
    """Run the seeds and write the results file."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", default="runs/bench-trec")
    parser.add_argument("--fast", action="store_true", help="tiny model, for checking the script only")
    parser.add_argument("--results", default=str(Path(__file__).parent / "results" / "tppo_real_sessions.json"))
    parser.add_argument("overrides", nargs="*", help="DemoConfig fields as key=value, e.g. ppo_updates=8")
    args = parser.parse_args()
    if not Path(args.data).exists():
        print(f"skipped: {args.data} not found")
        return 0
    from tokencredit.config import load_config
    from tokencredit.recipes.tppo import FAST_OVERRIDES

    per_seed: dict[int, dict] = {}
    started = time.perf_counter()
    for seed in args.seeds:
        overrides = [*args.overrides, f"output={Path(args.output) / f'seed{seed}'}", f"data={args.data}",
                     f"seed={seed}", "resume=true", "max_test_sessions=null", f"fast={str(args.fast).lower()}"]
        cfg = load_config(DemoConfig, None, overrides, base=FAST_OVERRIDES if args.fast else None)
        summary = run_demo(cfg)
        per_seed[seed] = {k: summary[k] for k in (*POLICIES, "data", "timings_s")}
        print(json.dumps({"seed": seed, **{k: summary[k] for k in POLICIES}}, indent=1), flush=True)

    metrics = [k for k in per_seed[args.seeds[0]]["sft"]]
    aggregate = {p: {m: _mean_std([per_seed[s][p][m] for s in args.seeds]) for m in metrics} for p in POLICIES}
    paired = {}
    for a, b in (("tppo", "sft"), ("tppo", "ppo_sequence"), ("ppo_sequence", "sft")):
        diffs = {m: [per_seed[s][a][m] - per_seed[s][b][m] for s in args.seeds] for m in metrics}
        paired[f"{a} - {b}"] = {m: {**_mean_std(d), "per_seed": d, "wins": sum(x > 0 for x in d)}
                                for m, d in diffs.items()}
    result = {
        "what": "TPPO vs SFT vs sequence-level PPO on TREC 2013 Session track sessions, demo pipeline per seed",
        "data": args.data, "seeds": args.seeds, "fast": args.fast, "overrides": args.overrides,
        "config": {k: v for k, v in vars(load_config(DemoConfig, None, args.overrides)).items()
                   if k not in ("output", "data", "seed", "resume")},
        "machine": {"cpu_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "wall_minutes": round((time.perf_counter() - started) / 60, 1),
        "per_seed": per_seed, "aggregate": aggregate, "paired_differences": paired,
    }
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"aggregate": aggregate, "paired": {k: {m: v[m]["mean"] for m in v}
                                                         for k, v in paired.items()}}, indent=1))
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
