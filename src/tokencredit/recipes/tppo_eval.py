"""The demo's evaluation and report: greedy queries of every policy on held-out sessions, learning curves over
PPO checkpoints, and report.html with the per-token credit of each policy's queries."""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from tokencredit.evaluate import html_table, svg_line_chart, token_heatmap_html, token_pieces, write_html_report
from tokencredit.generation import generate
from tokencredit.models import (
    load_policy,
)
from tokencredit.precision import release_free_memory
from tokencredit.runs import atomic_write_json, read_metrics

if TYPE_CHECKING:
    pass

from tokencredit.recipes.stages import progress_over

if TYPE_CHECKING:
    from tokencredit.recipes.tppo import DemoConfig

log = logging.getLogger(__name__)


def policy_folder(root: Path, name: str, sft_model: Path) -> Path:
    """Where a finished policy lives."""
    return sft_model if name == "sft" else root / name / "policy"


def evaluate_policies(cfg: DemoConfig, root: Path, sft_model: Path, test: list, prompts: list[str],
                       tokenizer: object, rm: object) -> tuple[dict, dict]:
    """Greedy queries of each policy on the test prompts, their metrics and mean RM reward."""
    summary: dict = {}
    generations: dict = {}
    references = [s.target_query for s in test]
    for name in progress_over(cfg.policies, "evaluate", "policy"):
        adapter = None if name == "sft" else policy_folder(root, name, sft_model)
        metrics, generations[name] = greedy_eval(cfg, sft_model, adapter, prompts, references, tokenizer, rm)
        summary[name] = metrics
        atomic_write_json(root / f"generations_{name}.json",
                          [{"prompt": p, "prediction": t, "target": r}
                           for p, t, r in zip(prompts, generations[name]["texts"], references)])
    return summary, generations


CURVE_METRICS = ("token_f1", "bleu", "rouge_l", "token_precision", "token_recall", "mean_length_tokens", "rm_reward")


def greedy_eval(cfg: DemoConfig, sft_model: Path, adapter: Path | None, prompts: list[str], references: list[str],
                 tokenizer: object, rm: object) -> tuple[dict, dict]:
    """Greedy queries of the SFT model (with a LoRA adapter on top, if given): metrics and what was generated."""
    from peft import PeftModel

    from tokencredit.rewards.credit import credit_profile
    from tokencredit.tasks.querygen import query_metrics

    policy = load_policy(sft_model)
    if adapter is not None:
        policy = PeftModel.from_pretrained(policy, adapter).merge_and_unload()
    texts, ids = [], []
    for start in range(0, len(prompts), 32):
        out = generate(policy, tokenizer, prompts[start : start + 32], max_new_tokens=cfg.max_new_tokens,
                       greedy=True)
        texts.extend(t.strip() for t in out.texts)
        ids.extend(out.token_ids())
    del policy
    release_free_memory()
    token_rewards = rm.score_token_ids(prompts, ids)
    metrics = query_metrics(texts, references)
    metrics["rm_reward"] = sum(sum(r) for r in token_rewards) / len(token_rewards)
    metrics["mean_length_tokens"] = sum(len(i) for i in ids) / len(ids)
    credit = credit_profile(rm, prompts, ids, rewards=token_rewards) if any(ids) else {}
    return metrics, {"texts": texts, "ids": ids, "token_rewards": token_rewards, "credit": credit}


def learning_curve(cfg: DemoConfig, stage_dir: Path, sft_model: Path, test: list, prompts: list[str],
                    tokenizer: object, rm: object) -> list[dict]:
    """The test metrics of every checkpoint a PPO stage kept (one per curve_every updates)."""
    from tokencredit.runs import CheckpointManager

    references = [s.target_query for s in test]
    points = []
    for ckpt in progress_over(CheckpointManager(stage_dir).candidates()[::-1], f"curve {stage_dir.name}", "checkpoint"):
        metrics, generated = greedy_eval(cfg, sft_model, ckpt / "policy", prompts, references, tokenizer, rm)
        # The queries themselves, so that a fall along the curve can be tested pairwise over the same sessions.
        points.append({"update": CheckpointManager.step_of(ckpt), **{k: metrics[k] for k in CURVE_METRICS},
                       "predictions": generated["texts"]})
    return sorted(points, key=lambda p: p["update"])


def write_report(cfg: DemoConfig, root: Path, summary: dict, generations: dict, test: list,
                  tokenizer: object) -> None:
    """report.html: metrics table, training curves, and per-token credit on a few test examples."""
    rows = [{"policy": name, **{k: v for k, v in m.items()}} for name, m in summary.items() if name in cfg.policies]
    curves = {}
    for name in ("tppo", "ppo_sequence"):
        if (root / name / "metrics.jsonl").exists():
            curves[name] = [m.get("reward/mean") for m in read_metrics(root / name)]
    kl_curves = {name: [m.get("kl/mean") for m in read_metrics(root / name)] for name in curves}
    sft_loss = [m.get("loss") for m in read_metrics(root / "sft")] if (root / "sft" / "metrics.jsonl").exists() else []
    charts = (svg_line_chart(curves, "Training reward (RM score of samples, mean per sequence)", ylabel="reward")
              + svg_line_chart(kl_curves, "KL to the SFT reference (per sequence)", ylabel="KL")
              + svg_line_chart({"sft": sft_loss}, "SFT loss", xlabel="step", ylabel="NLL"))
    examples = []
    for i in range(min(8, len(test))):
        session = test[i]
        cells = []
        for name in cfg.policies:
            g = generations[name]
            if name != "sft" and g["ids"][i] == generations["sft"]["ids"][i]:
                cells.append(f"<b>{name}</b>: <span class='small'>same query as sft</span>")
                continue
            pieces = token_pieces(tokenizer, g["ids"][i])
            cells.append(f"<b>{name}</b>: {token_heatmap_html(pieces, g['token_rewards'][i])}")
        last = session.history[-1].query if session.history else ""
        examples.append(f"<p class='small'>last query: <i>{html.escape(last)}</i> &rarr; true next query: "
                        f"<b>{html.escape(session.target_query)}</b></p><p>{'<br>'.join(cells)}</p>")
    source = (f"an LLM judge ({html.escape(str(cfg.judge))}) that marked good and bad words of each sample"
              if cfg.judge else "the reference-based labeler (words of a sampled query supported by the true next "
              "query or clicked titles are good), not from an LLM judge")
    note = (f"<p class='small'>Labels came from {source}. Colours: token rewards of the "
            "trained token reward model (green = positive, red = negative; hover for the value)."
            + (" FAST MODE: tiny random model, numbers are meaningless." if cfg.fast else "") + "</p>")
    run_rows = [{"stage": k, "seconds": v} for k, v in summary.get("timings_s", {}).items()]
    rm_eval = summary.get("reward_model_eval", {})
    run_info = (html_table([summary.get("data", {})]) + html_table([summary.get("labels", {})])
                + "<p class='small'>Reward model on held-out labelled samples:</p>" + html_table([rm_eval])
                + html_table(run_rows))
    write_html_report(root / "report.html", "tokencredit demo: TPPO query generation", [
        ("Test metrics", html_table(rows) + note),
        ("Training curves", charts),
        ("Run", run_info),
        ("Per-token credit on test examples", "".join(examples)),
    ])
