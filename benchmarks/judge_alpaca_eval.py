"""Judged win rate on AlpacaEval instructions, and how far a small local judge can be trusted.

Reads ../shared/data/alpaca_eval/alpaca_eval.jsonl (instruction + text-davinci-003 reference output; research
only, not part of the product; "skipped" when absent). For the first ``--prompts`` instructions:

1. the policy (default: the built-in SmolLM2-135M-Instruct, greedy) answers them;
2. ``tokencredit evaluate`` judges policy vs reference in both orders with the judge model (default: the same
   SmolLM2, local backend, preferences from the answer letters' log-probabilities): win rate with a 95%
   bootstrap interval, ties when the two orders disagree;
3. a sanity check of the judge: reference vs the same reference with its words shuffled (a clearly worse answer).
   A judge worth using prefers the intact reference nearly always; the tie share measures its position bias.

    python benchmarks/judge_alpaca_eval.py --prompts 40
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from tokencredit.commands.judge import EvaluateConfig, run_evaluate

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_eval" / "alpaca_eval.jsonl"


def main() -> int:
    """Run both comparisons and write benchmarks/results/judge_alpaca_eval.json."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--policy", default="smollm2-135m-instruct")
    parser.add_argument("--judge", default="smollm2-135m-instruct")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--output", default="runs/bench-alpaca")
    parser.add_argument("--results", default=str(Path(__file__).parent / "results" / "judge_alpaca_eval.json"))
    args = parser.parse_args()
    if not Path(args.data).exists():
        print(f"skipped: {args.data} not found")
        return 0
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()][: args.prompts]
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": r["instruction"], "reference": r["output"]}) + "\n"
                               for r in rows))
    rng = random.Random(0)
    shuffled = out / "shuffled_reference.jsonl"
    lines = []
    for r in rows:
        words = r["output"].split()
        rng.shuffle(words)
        lines.append(json.dumps({"prompt": r["instruction"], "response": " ".join(words)}) + "\n")
    shuffled.write_text("".join(lines))
    judge = dict(backend="hf", model=args.judge, batch_size=4, device="auto")
    started = time.perf_counter()
    policy = run_evaluate(EvaluateConfig(prompts=str(prompts), a=args.policy, b="reference",
                                         output_dir=str(out / "policy_vs_reference"),
                                         max_new_tokens=args.max_new_tokens, **judge))
    policy_s = time.perf_counter() - started
    sanity = run_evaluate(EvaluateConfig(prompts=str(prompts), a="reference", b=str(shuffled),
                                         output_dir=str(out / "reference_vs_shuffled"), **judge))
    def p_a(name: str) -> dict:
        """Mean, min and max over prompts of P(side a better), averaged over the two orders."""
        rows_ = [json.loads(line) for line in (out / name / "verdicts.jsonl").read_text().splitlines()]
        values = [r["p_a"] for r in rows_ if r["p_a"] is not None]
        return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)} if values else {}

    result = {
        "what": "judged win rate on AlpacaEval instructions vs text-davinci-003 references, and a judge sanity check",
        "prompts": len(rows), "policy": args.policy, "judge": args.judge, "max_new_tokens": args.max_new_tokens,
        "policy_vs_reference": {k: policy[k] for k in ("win_rate", "ci95", "judged", "wins", "losses", "ties",
                                                       "metrics_vs_reference", "mean_length_words")}
        | {"p_a_over_orders": p_a("policy_vs_reference")},
        "reference_vs_shuffled_reference": {k: sanity[k] for k in ("win_rate", "ci95", "judged", "wins", "losses",
                                                                   "ties")}
        | {"p_a_over_orders": p_a("reference_vs_shuffled")},
        "policy_minutes": round(policy_s / 60, 1),
        "wall_minutes": round((time.perf_counter() - started) / 60, 1),
    }
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
