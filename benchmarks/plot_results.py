"""Draw the reward-learning benchmark results as SVG charts next to their JSON files.

    python benchmarks/plot_results.py      # reads benchmarks/results/*.json, writes *.svg beside them

- ser_hh_harmless.svg: held-out pair accuracy per SER loop (loop 0 = the seed RM on 15% of the labels), one
  line per seed, with each seed's RM on 100% of the labels as a flat line.
- fg_qa_feedback.svg: per seed, each RM's pair accuracy on held-out human preferences and its sentence-level
  agreement (AUC) with the human error spans.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tokencredit.evaluate import svg_line_chart

RESULTS = Path(__file__).parent / "results"


def ser_chart(result: dict) -> str:
    """Per-loop held-out accuracy of every seed, and its 100%-label accuracy as a flat line."""
    series: dict[str, list[float | None]] = {}
    longest = max(len(s["loops"]) for s in result["per_seed"].values())
    for seed, s in sorted(result["per_seed"].items(), key=lambda kv: int(kv[0])):
        series[f"seed {seed}: SER"] = [loop["heldout_accuracy"] for loop in s["loops"]]
        series[f"seed {seed}: 100% labels"] = [s["full_label_accuracy"]] * longest
    return svg_line_chart(series, "SER on HH-RLHF harmless: held-out pair accuracy per loop (loop 0 = seed RM)",
                          xlabel="loop + 1", ylabel="accuracy", width=640, height=300)


def fg_chart(result: dict) -> str:
    """Per seed: human pair accuracy and sentence-level span AUC of each reward model."""
    seeds = sorted(result["per_seed"], key=int)
    series: dict[str, list[float | None]] = {}
    for variant in result["args"]["variants"]:
        rows = [result["per_seed"][s]["variants"][variant] for s in seeds]
        series[f"{variant}: human pair acc."] = [r["human_pair_accuracy"] for r in rows]
        series[f"{variant}: error-sentence AUC"] = [r["sentence_auc"] for r in rows]
    return svg_line_chart(series, "FG on QA-Feedback: token RM from edits vs sequence RM (x = seed + 1)",
                          xlabel="seed + 1", ylabel="accuracy / AUC", width=640, height=300)


def main() -> int:
    """Write an SVG for each results file present."""
    for name, chart in (("ser_hh_harmless", ser_chart), ("fg_qa_feedback", fg_chart)):
        path = RESULTS / f"{name}.json"
        if path.exists():
            (RESULTS / f"{name}.svg").write_text(chart(json.loads(path.read_text())) + "\n")
            print(f"wrote {RESULTS / name}.svg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
