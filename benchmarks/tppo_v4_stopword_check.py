"""Does a reward model still prefer queries padded with stopwords? v3's against v4's labels, before any PPO run.

On AOL seed 2 (`tppo_aol.py`, arm `v3`, 30 updates) TPPO and sequence PPO filled their queries with stopwords that
the reference labeler leaves unlabelled but token F1 counts (40% and 52% of their words; SFT 10%). This check reads
that run's greedy test queries of SFT, TPPO and sequence PPO and scores them with two reward models on the same SFT
model, samples and miss cost: `v3`'s (stopwords unlabelled) and `v4`'s (`label_stopwords=true`). A reward model
that closes the loophole no longer prefers the padded queries to SFT's (paired by test session).

Needs the run folders of `tppo_aol.py --data aol --seeds 2 --arms v3` and of arm `v4` up to its reward model
(for example `v4` run with `policies=[sft]`):

    python benchmarks/tppo_v4_stopword_check.py --workdir /tmp/bench --seed 2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
POLICIES = ("sft", "tppo", "ppo_sequence")


def check(root: Path) -> dict:
    """Mean summed reward of each policy's test queries under each reward model, and how often SFT's is higher."""
    from tokencredit.rewards.token_rm import TokenRewardModel
    from tokencredit.tasks.querygen import per_example_metrics

    gens = {p: json.loads((root / "v3" / f"generations_{p}.json").read_text()) for p in POLICIES}
    out: dict = {}
    for arm in ("v3", "v4"):
        rm = TokenRewardModel.from_pretrained(root / arm / "reward_model" / "model")
        sums = {p: [sum(r) for r in rm.score([g["prompt"] for g in rows], [g["prediction"] for g in rows])]
                for p, rows in gens.items()}
        out[arm] = {"mean_sum": {p: statistics.fmean(v) for p, v in sums.items()},
                    "sft_preferred_over": {p: statistics.fmean(float(a > b) for a, b in zip(sums["sft"], sums[p]))
                                           for p in POLICIES[1:]}}
        print(arm, json.dumps(out[arm]), flush=True)
    out["f1"] = {p: statistics.fmean(per_example_metrics(g["prediction"], g["target"])["f1"] for g in rows)
                 for p, rows in gens.items()}
    return out


def main() -> int:
    """Run the check on one seed's folders and write benchmarks/results/tppo_v4_stopword_check.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="runs/bench-tppo")
    parser.add_argument("--seed", type=int, default=2)
    args = parser.parse_args()
    root = Path(args.workdir) / "aol" / f"seed{args.seed}"
    needed = [root / "v3" / "generations_tppo.json", root / "v4" / "reward_model" / "model"]
    if not all(p.exists() for p in needed):
        print(f"skipped: {', '.join(str(p) for p in needed if not p.exists())} not found (run tppo_aol.py first)")
        return 0
    result = {"what": __doc__.split("\n")[0], "seed": args.seed, **check(root)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tppo_v4_stopword_check.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["f1"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
