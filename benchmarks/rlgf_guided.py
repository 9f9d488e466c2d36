"""RLGF on real data: PPO vs PPO++ vs AggreVaTeD vs LOLS vs D2LOLS at the same sample budget, over seeds.

Each seed runs `tokencredit rlgf` (recipes/rlgf.py) with every algorithm from the same start, guide, seed and
budget. The start and the guide are fine-tuned once (first seed) and reused by the other seeds, so the spread
between seeds is the RL's own (sampling, adapters), not the SFT's.

Data (read from ../shared/data; the run stops with "skipped" when it is absent; not part of the product):
- ``imdb``: imdb/train.jsonl (first ``--records`` reviews) to fine-tune, prompt and train the held-out bag-of-words
  scorer; prompts for evaluation from imdb/test.jsonl. Reward: VADER P(positive) of the continuation.
  Upper references: VADER's and the bag-of-words scorer's accuracy on the 2,000 labelled test reviews, and the
  guide (fine-tuned on positive reviews) as a policy.
- ``commongen``: commongen/train.jsonl to fine-tune the guide and prompt; commongen/dev.jsonl to evaluate.
  Reward: 0.5 concept coverage + 0.25 ROUGE-L + 0.25 BLEU against the references. Held-out metric: chrF (no
  reward uses it). References: a held-out human sentence scored against the other references (upper) and
  another record's sentence (chance).

Reward per sample = the mean training reward over all updates (the area under the reward curve): the paper's
"more reward per sample" claim. Every arm sees ``updates x batch`` prompts.

    python benchmarks/rlgf_guided.py --task imdb --seeds 0 1 2          # ~70 min on 2 cores
    python benchmarks/rlgf_guided.py --task commongen --seeds 0 1 2
    python benchmarks/rlgf_guided.py --report                            # tables + chart from the results
    python benchmarks/rlgf_guided.py --task commongen --check-guide 8 --eval-prompts 32   # is best-of-8 a guide?

Results go to benchmarks/results/rlgf_<task>.json after every seed; the chart to rlgf_<task>.svg. The runs measured
before issue 31's fixes (switch points, AggreVaTeD's rows and values, beta, whitening) are kept as
rlgf_<task>_before_issue31.*.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from seedstats import mean_curve, mean_sd  # noqa: E402 - a sibling module of this script

DATA = HERE.parent.parent / "shared" / "data"
RESULTS = HERE / "results"
ALGORITHMS = ["ppo", "ppo_pp", "aggrevated", "lols", "d2lols"]
METRICS = {"imdb": ["reward_p_pos", "heldout_p_pos", "perplexity", "mean_length", "distinct_2"],
           "commongen": ["reward", "coverage", "bleu", "rouge_l", "chrf", "perplexity", "mean_length"]}


def paths(task: str) -> tuple[Path, Path]:
    """(training file, evaluation file) of a task under ../shared/data."""
    if task == "imdb":
        return DATA / "imdb" / "train.jsonl", DATA / "imdb" / "test.jsonl"
    return DATA / "commongen" / "train.jsonl", DATA / "commongen" / "dev.jsonl"


def run(args: argparse.Namespace) -> dict:
    """Every seed in turn; the results file is rewritten after each."""
    from tokencredit.recipes.rlgf import RLGFConfig, run_rlgf

    train, test = paths(args.task)
    if not train.exists():
        print(f"skipped: {train} not found (../shared/data is not part of the product)")
        sys.exit(0)
    out = RESULTS / f"rlgf_{args.task}.json"
    result = json.loads(out.read_text()) if args.resume and out.exists() else {"per_seed": {}}
    result["args"] = {k: v for k, v in vars(args).items() if k not in ("report", "resume")}
    work = Path(args.workdir) / args.task
    first = work / f"seed{args.seeds[0]}"
    for seed in args.seeds:
        if str(seed) in result["per_seed"]:
            continue
        shared = {} if seed == args.seeds[0] else {
            "start": (str(first / "learner_sft" / "merged") if args.task == "imdb" else None),
            "guide": str(first / "guide_sft" / "merged")}
        if args.guide is not None:
            shared["guide"] = args.guide
        cfg = RLGFConfig(output=str(work / f"seed{seed}"), task=args.task, data=str(train), test_data=str(test),
                         max_records=args.records, seed=seed, resume=True, ppo_updates=args.updates,
                         ppo_batch_size=args.batch, eval_prompts=args.eval_prompts, sft_examples=args.sft_examples,
                         max_new_tokens=args.max_new_tokens, algorithms=args.algorithms,
                         guide_best_of=args.guide_best_of,
                         **{k: v for k, v in shared.items() if v is not None})
        began = time.time()
        summary = run_rlgf(cfg)
        summary["seconds"] = round(time.time() - began, 1)
        result["per_seed"][str(seed)] = summary
        aggregate(result, args.task)
        RESULTS.mkdir(exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"seed {seed} done in {summary['seconds']:.0f} s -> {out}", flush=True)
        report(result, args.task)
    return result


def aggregate(result: dict, task: str) -> None:
    """Per policy: mean and sd over seeds of every held-out metric and of the reward per sample."""
    seeds = list(result["per_seed"].values())
    names = list(seeds[0]["policies"])
    agg: dict[str, dict] = {}
    for name in names:
        row = {k: mean_sd([s["policies"][name][k] for s in seeds if k in s["policies"][name]])
               for k in METRICS[task] if all(k in s["policies"][name] for s in seeds)}
        curves = [s["reward_curves"].get(name) for s in seeds]
        if all(curves):
            row["reward_per_sample"] = mean_sd([statistics.fmean(c) for c in curves])
            row["last_update_reward"] = mean_sd([c[-1] for c in curves])
            row["mean_curve"] = mean_curve(curves)
        agg[name] = row
    result["aggregate"] = agg


def report(result: dict, task: str) -> None:
    """Print the side-by-side table (ratios against PPO) and write the chart."""
    from tokencredit.evaluate import svg_line_chart

    agg = result["aggregate"]
    keys = ["reward_per_sample", *METRICS[task]]
    ppo = agg.get("ppo", {})
    print(f"\n{task}: mean (sd) over {len(result['per_seed'])} seed(s); x PPO = ratio to plain PPO")
    print("policy".ljust(12) + "".join(k[:22].rjust(24) for k in keys))
    for name, row in agg.items():
        cells = []
        for k in keys:
            if k not in row:
                cells.append("-".rjust(24))
                continue
            m, sd = row[k]["mean"], row[k]["sd"]
            ratio = f" x{m / ppo[k]['mean']:.2f}" if k in ppo and ppo[k]["mean"] and name != "ppo" else ""
            cells.append(f"{m:.3f} ({sd:.3f}){ratio}".rjust(24))
        print(name.ljust(12) + "".join(cells))
    curves = {name: row["mean_curve"] for name, row in agg.items() if "mean_curve" in row}
    if curves:
        what = "VADER P(positive)" if task == "imdb" else "coverage + ROUGE-L + BLEU"
        chart = svg_line_chart(curves, f"RLGF on {task}: training reward ({what}) per update, mean over "
                                       f"{len(result['per_seed'])} seeds", xlabel="update", ylabel="reward",
                               width=640, height=300)
        (RESULTS / f"rlgf_{task}.svg").write_text(chart + "\n")


def markdown(result: dict, task: str) -> str:
    """The aggregate as a markdown table (mean ± sd over seeds), for the docs."""
    agg = result["aggregate"]
    keys = ["reward_per_sample", *METRICS[task]]
    lines = ["| policy | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, row in agg.items():
        cells = [f"{row[k]['mean']:.3f} ± {row[k]['sd']:.3f}" if k in row else "—" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_guide(args: argparse.Namespace) -> dict:
    """Is a best-of-N guide better than the start? The base model alone and as a best-of-N writer on the held-out
    prompts, same metrics as the recipe's evaluation; written to results/rlgf_guide_check_<task>.json."""
    import torch

    from tokencredit.models import load_policy, load_tokenizer
    from tokencredit.recipes.rlgf import RLGFConfig, _answers, _commongen_data, _guide_writer, _imdb_data

    train, test = paths(args.task)
    if not train.exists():
        print(f"skipped: {train} not found (../shared/data is not part of the product)")
        sys.exit(0)
    torch.set_num_threads(1)
    tok = load_tokenizer("smollm2-135m-instruct")
    model = load_policy("smollm2-135m-instruct")
    out: dict = {"task": args.task, "eval_prompts": args.eval_prompts, "max_new_tokens": args.max_new_tokens,
                 "model": "smollm2-135m-instruct (as shipped, no fine-tuning)", "rows": {}}
    for n in sorted({1, args.check_guide}):
        cfg = RLGFConfig(task=args.task, data=str(train), test_data=str(test), max_records=args.records,
                         eval_prompts=args.eval_prompts, guide_best_of=n, output=str(Path(args.workdir) / "check"))
        cfg = cfg.resolved()
        task = (_imdb_data(cfg, str(train), Path(cfg.output)) if args.task == "imdb"
                else _commongen_data(cfg, str(train), tok))
        writer = _guide_writer(cfg, model, tok, task, heldout=True)
        began = time.time()
        texts = _answers(model, writer, tok, task.test_prompts, args.max_new_tokens,
                         lambda begin: torch.Generator().manual_seed(begin), chunk=8)
        metrics = task.evaluate(task.test_prompts, texts, model, tok)
        out["rows"][f"best_of_{n}"] = {**{k: v for k, v in metrics.items() if isinstance(v, float)},
                                       "seconds": round(time.time() - began, 1), "examples": texts[:3]}
        print(f"best of {n}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float)),
              flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"rlgf_guide_check_{args.task}.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


def main() -> int:
    """Parse arguments and run or report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=["imdb", "commongen"], default="imdb")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--algorithms", nargs="+", default=ALGORITHMS)
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--updates", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--sft-examples", type=int, default=512)
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument("--guide", default=None, help="'base' = the model as it is as the guide (else SFT)")
    parser.add_argument("--guide-best-of", type=int, default=1,
                        help="the guide keeps the best of N samples by the training reward")
    parser.add_argument("--workdir", default="runs/bench-rlgf")
    parser.add_argument("--resume", action="store_true", help="keep the seeds already in the results file")
    parser.add_argument("--report", action="store_true", help="only redo the table and chart from the results")
    parser.add_argument("--markdown", action="store_true", help="with --report: also print a markdown table")
    parser.add_argument("--check-guide", type=int, default=0, metavar="N",
                        help="only compare the base model with its best-of-N writer on the held-out prompts")
    args = parser.parse_args()
    if args.check_guide:
        check_guide(args)
        return 0
    if args.report:
        result = json.loads((RESULTS / f"rlgf_{args.task}.json").read_text())
        aggregate(result, args.task)
        report(result, args.task)
        if args.markdown:
            print(markdown(result, args.task))
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
