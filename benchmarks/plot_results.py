"""Draw the reward-learning benchmark results as SVG charts next to their JSON files.

    python benchmarks/plot_results.py      # reads benchmarks/results/*.json, writes *.svg beside them

- ser_hh_harmless.svg: held-out pair accuracy per SER loop (loop 0 = the seed RM on 15% of the labels), one
  line per seed, with each seed's RM on 100% of the labels as a flat line.
- fg_qa_feedback.svg: per seed, each RM's pair accuracy on held-out human preferences and its sentence-level
  agreement (AUC) with the human error spans.
- cpu_ppo_throughput.svg: PPO episodes/s of every arm (TRL and tokencredit, fp32 and bf16 comparisons, median
  over the timed updates, with the best update as a tick) and sampling tokens/s against transformers `generate`.
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


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def svg_bars(groups: list[tuple[str, list[tuple[str, float, float | None, str]]]], title: str, unit: str,
             width: int = 760) -> str:
    """Horizontal bars in titled groups, each group on its own scale: (label, value, best or None, colour) per bar;
    the value is printed at the end and the best value drawn as a tick."""
    row, label_w, top = 18, 300, 34
    height = top + sum(len(bars) * row + 26 for _, bars in groups) + 10
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
           f'<text x="10" y="20" font-size="14" font-weight="bold">{_esc(title)}</text>']
    y = top
    for name, bars in groups:
        # each group on its own scale: episodes/s and tokens/s differ by two orders of magnitude
        vmax = max((max(v, b or 0) for _, v, b, _ in bars), default=1.0) or 1.0
        scale = (width - label_w - 90) / vmax
        out.append(f'<text x="10" y="{y + 14}" font-weight="bold">{_esc(name)}</text>')
        y += 22
        for label, value, best, colour in bars:
            w = max(value * scale, 1)
            out.append(f'<text x="{label_w - 6}" y="{y + 12}" text-anchor="end">{_esc(label)}</text>')
            out.append(f'<rect x="{label_w}" y="{y + 2}" width="{w:.1f}" height="{row - 5}" fill="{colour}"/>')
            if best is not None:
                bx = label_w + best * scale
                out.append(f'<line x1="{bx:.1f}" x2="{bx:.1f}" y1="{y}" y2="{y + row - 1}" stroke="black"/>')
            out.append(f'<text x="{label_w + max(w, (best or 0) * scale) + 6:.1f}" y="{y + 12}">'
                       f'{value:.2f} {_esc(unit)}</text>')
            y += row
        y += 4
    out.append("</svg>")
    return "\n".join(out)


def cpu_throughput_chart(result: dict) -> str:
    """PPO episodes/s per arm and comparison, then sampling tokens/s per precision and batch."""
    groups = []
    for comp, arms in result["comparisons"].items():
        bars = [(name, arm["episodes_per_s_median"], arm["episodes_per_s_best"],
                 "#d62728" if name.startswith("trl") else "#1f77b4")
                for name, arm in arms.items() if "episodes_per_s_median" in arm]
        groups.append((f"PPO update, {comp} comparison (episodes/s; red = TRL 1.12)", bars))
    for precision, batches in result.get("sampling", {}).items():
        if not isinstance(batches, dict) or not all(isinstance(v, dict) for v in batches.values()):
            continue
        bars = []
        for batch, rowd in batches.items():
            for name in ("transformers_generate", "tokencredit_plain", "tokencredit_static"):
                r = rowd[name]
                bars.append((f"batch {batch}: {name}", r["tokens_per_s_median"], r["tokens_per_s_best"],
                             "#d62728" if name == "transformers_generate" else "#2ca02c"))
        groups.append((f"sampling alone, {precision} (new tokens/s)", bars))
    shapes = result["shapes"]
    title = (f"SmolLM2-135M PPO on {result['nproc']} CPU cores ({result['cpu']}): batch {shapes['batch']}, "
             f"{shapes['prompt_tokens']}+{shapes['new_tokens']} tokens, {shapes['ppo_epochs']} epochs")
    return svg_bars(groups, title, "")


def main() -> int:
    """Write an SVG for each results file present."""
    for name, chart in (("ser_hh_harmless", ser_chart), ("fg_qa_feedback", fg_chart),
                        ("cpu_ppo_throughput", cpu_throughput_chart)):
        path = RESULTS / f"{name}.json"
        if path.exists():
            (RESULTS / f"{name}.svg").write_text(chart(json.loads(path.read_text())) + "\n")
            print(f"wrote {RESULTS / name}.svg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
