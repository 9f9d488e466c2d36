"""The TPPO demo with and without bf16 mixed precision, seeds side by side: do the results hold, what time is saved.

Runs `tokencredit demo` (built-in sessions and model, default settings) once per (seed, precision), with
`mixed_precision=auto` (bf16 autocast with fp32 master weights on CPUs with AMX / AVX512-BF16) and
`mixed_precision=no` (fp32), and writes every policy's test metrics, the stage times and their means to
`results/demo_precision.json`. A run folder that already holds a summary.json is read, not run again, so a cut
run continues where it stopped.

    python benchmarks/demo_precision.py                      # seeds 0 1 2, ~35 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

METRICS = ("token_f1", "bleu", "rouge_l", "exact_match", "mean_length_tokens")
POLICIES = ("sft", "tppo", "ppo_sequence")


def run_folder(work: Path, precision: str, seed: int) -> Path:
    """Where the demo of (precision, seed) writes."""
    return work / f"demo_{precision}_s{seed}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--work-dir", default="/tmp/tokencredit-demo-precision")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "demo_precision.json"))
    a = p.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    work = Path(a.work_dir)
    runs: dict = {}
    for seed in seeds:
        for precision in ("auto", "no"):
            folder = run_folder(work, precision, seed)
            if not (folder / "summary.json").exists():
                cmd = [sys.executable, "-c", "import sys; from tokencredit.cli import main; sys.exit(main())",
                       "demo", "--output", str(folder), f"seed={seed}", f"mixed_precision={precision}"]
                subprocess.run(cmd, check=True)
            summary = json.loads((folder / "summary.json").read_text())
            runs[f"{precision}/seed{seed}"] = {
                "metrics": {pol: {m: summary[pol][m] for m in METRICS} for pol in POLICIES},
                "timings_s": summary["timings_s"], "total_s": round(sum(summary["timings_s"].values()), 1)}
    means: dict = {}
    for precision in ("auto", "no"):
        chosen = [runs[f"{precision}/seed{s}"] for s in seeds]
        means[precision] = {pol: {m: statistics.mean(r["metrics"][pol][m] for r in chosen) for m in METRICS}
                            for pol in POLICIES}
    result = {"seeds": seeds, "runs": runs, "mean_over_seeds": means,
              "note": "mixed_precision=auto is bf16 autocast (fp32 masters) on this CPU; 'no' is fp32"}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    for pol in POLICIES:
        print(pol, {prec: {m: round(means[prec][pol][m], 3) for m in METRICS} for prec in means})
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
