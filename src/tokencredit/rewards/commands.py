"""`tokencredit reward train|eval|show`: train and evaluate token or sequence reward models from files, and
draw where a token reward model puts credit.

Data formats (see :mod:`tokencredit.rewards.data`): ``pairs`` ({prompt, chosen, rejected}) or ``edits``
({prompt, original, edited}); edits give a token RM FG token labels (-1 on what the edit removed, +1 on what it
wrote) plus the (edited > original) pair, and give a sequence RM just that pair.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tokencredit.config import ConfigError
from tokencredit.models import LoraSettings
from tokencredit.runs import atomic_write_json


@dataclass
class RewardRunConfig:
    """Settings of `tokencredit reward train|eval|show`."""

    kind: Literal["token", "sequence"] = "token"
    model: str = "smollm2-135m-instruct"  # train: backbone to start from; eval/show: a trained RM folder
    data: str | None = None  # train/eval: a .jsonl of pairs or edits
    data_format: Literal["pairs", "edits"] = "pairs"
    prompt_field: str | None = "prompt"  # None: records have no prompt (the responses hold everything)
    max_examples: int | None = None  # use only the first N records
    output_dir: str = "runs/reward"  # train: run folder (model/ inside); eval: eval.json; show: show.html
    lora: LoraSettings | None = None  # train LoRA adapters (merged when saved) instead of every weight
    num_epochs: int = 1
    batch_size: int = 8
    learning_rate: float = 1e-4
    eval_fraction: float = 0.1
    balance_labels: bool = True  # token RM: good and bad tokens weigh equally in the BCE
    seed: int = 0
    progress: bool = True
    # show: texts to draw, each {"prompt": ..., "response": ...} (or a .jsonl file of them in `data`)
    texts: list[dict] = field(default_factory=list)


def _records(cfg: RewardRunConfig) -> tuple[list, list, list]:
    """(token examples, pairs, edit token examples for eval) from cfg.data."""
    from tokencredit.rewards.data import load_edits, load_pairs
    from tokencredit.rewards.edits import edit_examples

    if cfg.data is None:
        raise ConfigError("reward train/eval needs data=FILE.jsonl (pairs or edits, see data_format)")
    if cfg.data_format == "pairs":
        pairs = load_pairs(cfg.data, prompt_field=cfg.prompt_field)[: cfg.max_examples]
        return [], pairs, []
    triples = load_edits(cfg.data, prompt_field=cfg.prompt_field)[: cfg.max_examples]
    examples, pairs = [], []
    for triple in triples:
        original, edited, pair = edit_examples(triple)
        examples += [original, edited]
        pairs.append(pair)
    return examples, pairs, examples


def reward_train(cfg: RewardRunConfig) -> dict:
    """Train the configured reward model; returns its held-out evaluation."""
    from tokencredit.rewards.seq_rm import SeqRMConfig, SequenceRewardModel, train_sequence_reward_model
    from tokencredit.rewards.token_rm import TokenRewardModel, TokenRMConfig, train_token_reward_model

    examples, pairs, _ = _records(cfg)
    common = dict(output_dir=cfg.output_dir, seed=cfg.seed, num_epochs=cfg.num_epochs, batch_size=cfg.batch_size,
                  learning_rate=cfg.learning_rate, eval_fraction=cfg.eval_fraction, progress=cfg.progress)
    if cfg.kind == "sequence":
        rm = SequenceRewardModel.from_pretrained(cfg.model, lora=cfg.lora)
        history = train_sequence_reward_model(rm, SeqRMConfig(**common), pairs)
    else:
        rm = TokenRewardModel.from_pretrained(cfg.model, lora=cfg.lora)
        history = train_token_reward_model(rm, TokenRMConfig(**common, balance_labels=cfg.balance_labels),
                                           token_examples=examples, pairs=pairs)
    return history[-1]["eval"]


def reward_eval(cfg: RewardRunConfig) -> dict:
    """Pairwise accuracy (summed token rewards for a token RM) and, for a token RM on edits, token P/R."""
    from tokencredit.rewards.seq_rm import SequenceRewardModel, evaluate_sequence_reward_model
    from tokencredit.rewards.token_rm import TokenRewardModel, evaluate_token_reward_model

    examples, pairs, edit_examples_ = _records(cfg)
    if cfg.kind == "sequence":
        metrics = evaluate_sequence_reward_model(SequenceRewardModel.from_pretrained(cfg.model), pairs,
                                                 cfg.batch_size)
    else:
        rm = TokenRewardModel.from_pretrained(cfg.model)
        metrics = evaluate_token_reward_model(rm, edit_examples_, pairs, batch_size=cfg.batch_size)
    metrics = {"kind": cfg.kind, "model": cfg.model, "data": cfg.data, **metrics}
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "eval.json", metrics)
    return metrics


def reward_show(cfg: RewardRunConfig) -> Path:
    """Write show.html: each text's tokens coloured by the token RM's reward (hover for values)."""
    from tokencredit.evaluate import html_table, token_heatmap_html, token_pieces, write_html_report
    from tokencredit.records import read_jsonl
    from tokencredit.rewards.token_rm import TokenRewardModel

    items = list(cfg.texts)
    if cfg.data is not None:
        items += [obj for _, obj in read_jsonl(cfg.data)]
    if not items:
        raise ConfigError('reward show needs texts=[{"prompt": ..., "response": ...}] or data=FILE.jsonl')
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("response"), str):
            raise ConfigError(f"text {i}: needs a string 'response' (and optionally a 'prompt')")
    rm = TokenRewardModel.from_pretrained(cfg.model)
    prompts = [str(item.get("prompt", "")) for item in items]
    responses = [item["response"] for item in items]
    ids = [rm.encode_response(r) for r in responses]
    rewards = rm.score_token_ids(prompts, ids, cfg.batch_size)
    scale = max((abs(r) for row in rewards for r in row), default=1.0) or 1.0
    blocks, rows = [], []
    for prompt, row_ids, row in zip(prompts, ids, rewards):
        blocks.append(f"<p class='small'>{html.escape(prompt)}</p>"
                      f"<p>{token_heatmap_html(token_pieces(rm.tokenizer, row_ids), row, scale)}</p>")
        rows.append({"sum": sum(row), "min": min(row), "max": max(row), "tokens": len(row)})
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "show.html"
    note = ("<p class='small'>Green: positive token reward, red: negative; one colour scale for the page "
            f"(|r| = {scale:.3g} is full colour). Model: {html.escape(cfg.model)}.</p>")
    write_html_report(path, "tokencredit: per-token rewards", [("Texts", note + "".join(blocks)),
                                                                ("Totals", html_table(rows))])
    return path


def run_reward(action: str, cfg: RewardRunConfig) -> None:
    """Dispatch `tokencredit reward ACTION` and print its result as JSON."""
    if action == "train":
        print(json.dumps(reward_train(cfg), indent=1))
    elif action == "eval":
        print(json.dumps(reward_eval(cfg), indent=1))
    elif action == "show":
        print(json.dumps({"html": str(reward_show(cfg))}))
    else:
        raise ConfigError(f"unknown reward action {action!r}; use train, eval or show")
