"""`tokencredit fg`: fine-grained RLHF from minimal edits (FG), end to end.

Minimal edits {prompt, original, edited} -> (optional) SFT on the edited answers -> two reward models on the
same pairs, same backbone, seed and epochs: a *token* RM trained with FG's hybrid loss (span Bradley-Terry on
what the edit removed and wrote, plus sequence BT on (chosen or edited, original)) and a *sequence* RM
(Bradley-Terry on the same pairs) -> two PPO runs from the same start, with the same budget, seed and KL:
**fine-grained PPO** (the token RM's reward at every response token) and **sequence-level PPO** (the
sequence RM's score on the last token) -> evaluation on held-out prompts with scorers neither policy was
trained on (a gold scorer you name, an LLM judge's win rate) and both RMs' held-out pair accuracy ->
``summary.json`` and ``report.html``.

Each stage writes its own sub-folder and a ``done.json`` marker; ``resume=true`` skips finished stages and
continues an interrupted SFT or PPO run from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from tokencredit.config import ConfigError, import_object
from tokencredit.evaluate import html_table, svg_line_chart, token_heatmap_html, token_pieces, write_html_report
from tokencredit.generation import generate
from tokencredit.judges.settings import JudgeSettings
from tokencredit.models import LoraSettings, apply_chat, load_critic, load_policy, load_tokenizer, quiet_saves
from tokencredit.precision import release_free_memory, validate_mixed_precision
from tokencredit.recipes.stages import Stage, check_fast_model, claim_recipe_folder, clamp_layers
from tokencredit.rewards.records import EditTriple, PreferencePair, random_split
from tokencredit.rewards.token_rm_training import TOKEN_LOSSES
from tokencredit.run_folders import releases_run_folders
from tokencredit.runs import atomic_write_json, read_metrics

log = logging.getLogger(__name__)

ARMS = {"fine_grained": "token_rm", "sequence": "sequence_rm"}  # PPO arm -> the reward model it learns from
"""The two PPO arms and the RM stage each one reads its reward from."""

GoldScorer = Callable[[list[str], list[str]], list[float]]
"""(prompts, responses) -> one score per response; higher is better."""


@dataclass
class FGConfig:
    """Every knob of the FG recipe; the defaults fit the built-in model on a CPU with a few hundred edits."""

    output: str = "runs/fg"  # folder for every stage, summary.json and report.html
    edits: str | None = None  # required: .jsonl of {prompt, original, edited, chosen?} minimal edits
    prompts: str | None = None  # RL prompts (.txt or .jsonl); None = the prompts of the training edits
    eval_prompts: str | None = None  # held-out prompts (.txt or .jsonl); None = the held-out edits' prompts
    prompt_field: str = "prompt"  # field of the prompt in the .jsonl prompt files
    test_fraction: float = 0.2  # edits kept away from both RMs: their pair accuracy and the eval prompts
    max_edits: int | None = None  # use only the first N edits
    max_eval_prompts: int | None = 64  # cap on the held-out prompts
    model: str = "smollm2-135m-instruct"  # policy base (built-in name, folder or cached hub id)
    policy: str | None = None  # start both arms from this trained policy (model or LoRA-adapter folder): no SFT
    # Reward-model backbone; None = the policy's start (same tokenizer, so token rewards need no mapping). Any
    # other backbone (e.g. "all-minilm-l6-v2") works: token rewards are moved onto the policy's tokens by characters.
    rm_model: str | None = None
    chat_template: bool = True  # policy prompts in its tokenizer's chat template (RMs always read the raw prompt)
    system_prompt: str | None = None  # system turn of the chat template; None = the template's default
    seed: int = 0  # one seed for the split, SFT, both RMs and both PPO arms
    resume: bool = False  # skip finished stages; continue interrupted ones
    overwrite: bool = False  # replace a run already in the output folder (kept aside until this one finishes)
    allow_changed_settings: bool = False  # resume even though settings differ from the saved config.yaml
    fast: bool = False  # tiny random model + word tokenizer, few steps: for tests, not for results
    # Every training stage in bf16 autocast with fp32 trainable weights where bf16 matmuls are native ("auto"),
    # always ("bf16") or never ("no"). See tokencredit.precision.
    mixed_precision: str = "auto"

    # --- sft on (prompt, edited): the start of both PPO arms ---
    sft_epochs: int = 1  # 0 = no SFT: both arms start from `model`
    sft_batch_size: int = 8  # (prompt, edited) pairs per SFT optimiser step
    sft_learning_rate: float = 5e-4  # peak SFT learning rate (AdamW, on the LoRA adapters)
    lora_r: int = 16  # LoRA rank of SFT and of both PPO policies
    # Blocks trained after SFT (RM LoRA, PPO LoRA, critic): backpropagating through the top blocks only makes
    # each step much cheaper on a CPU. None = every block.
    top_layers: int | None = 10

    # --- reward models: the token RM and the sequence RM share all of these ---
    rm_epochs: int = 2  # passes over the training edits
    rm_batch_size: int = 8  # examples (and pairs) per RM optimiser step; also the held-out scoring batch
    rm_learning_rate: float = 3e-4  # reward-model learning rate (AdamW)
    rm_lora_r: int | None = 8  # None = full fine-tuning of the RM backbone
    token_loss: str = "hybrid"  # the token RM's loss: a tokencredit.rewards.token_rm_training.TOKEN_LOSSES name

    # --- ppo: both arms use exactly these ---
    ppo_updates: int = 8  # PPO updates per arm (each = one rollout batch + ppo_epochs of optimisation)
    ppo_batch_size: int = 16  # prompts (= sampled responses) per update
    ppo_mini_batch_size: int = 8  # rows per optimiser step
    ppo_epochs: int = 1  # passes over each rollout batch
    ppo_learning_rate: float = 5e-4  # policy (LoRA) learning rate
    critic_learning_rate: float = 5e-5  # value model learning rate
    kl_coef: float = 0.05  # beta: weight of the per-token KL to the start policy, subtracted from the reward
    # "std": each arm's reward divided by the spread (standard deviation) of its reward model's total reward over
    # the start policy's samples, so that one kl_coef is one trade-off for both arms (the token RM's sums and the
    # sequence RM's scores differ about tenfold in scale); "none": as the reward models give them
    reward_normalize: Literal["none", "std"] = "std"
    normalize_samples: int = 32  # start-policy samples (train prompts, temperature 1) that measure the spread
    max_new_tokens: int = 24  # response length of PPO samples and of the evaluation
    temperature: float = 1.0  # PPO sampling temperature
    # Value head on the policy's own trunk (one backbone, cheaper on a CPU); False = a separate critic started
    # from the PPO start model, the same for both arms.
    shared_critic: bool = False

    # --- evaluation on held-out prompts ---
    eval_temperature: float = 0.0  # 0 = greedy; > 0 samples (eval_samples per prompt, from a fixed generator)
    eval_samples: int = 1  # answers per held-out prompt when sampling
    # "module:name" or "file.py:name": fn(prompts, responses) -> list[float], a scorer neither policy was trained
    # on (e.g. a classifier of the property the edits aim at); None = no gold score. Python code: trusted.
    gold_scorer: str | None = None
    judge: JudgeSettings | None = None  # an LLM judge for the fine-grained vs sequence win rate; None = none
    max_judged: int | None = 64  # held-out prompts the judge sees

    def validate(self) -> None:
        """Check the values that would fail late; raise ConfigError naming the field."""
        check_fast_model(self.fast, self.model)
        if not self.edits:
            raise ConfigError("fg needs edits=FILE.jsonl: minimal edits {prompt, original, edited, chosen?}")
        if not Path(self.edits).is_file():
            raise ConfigError(f"edits={self.edits}: no such file")
        for name in ("prompts", "eval_prompts"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise ConfigError(f"{name}={value}: no such file")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"test_fraction must be in (0, 1) (got {self.test_fraction})")
        if self.token_loss not in TOKEN_LOSSES:
            raise ConfigError(f"token_loss must be one of {', '.join(TOKEN_LOSSES)} (got {self.token_loss!r})")
        for name in ("rm_epochs", "rm_batch_size", "ppo_updates", "ppo_batch_size", "ppo_mini_batch_size",
                     "ppo_epochs", "max_new_tokens", "eval_samples", "sft_batch_size", "lora_r"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.sft_epochs < 0:
            raise ConfigError(f"sft_epochs must be >= 0 (got {self.sft_epochs})")
        if self.reward_normalize not in ("none", "std"):
            raise ConfigError(f"reward_normalize must be none or std (got {self.reward_normalize!r})")
        if self.normalize_samples < 2:
            raise ConfigError(f"normalize_samples must be >= 2: a spread needs two samples "
                              f"(got {self.normalize_samples})")
        if self.ppo_batch_size % self.ppo_mini_batch_size:
            raise ConfigError(f"ppo_batch_size ({self.ppo_batch_size}) must be a multiple of ppo_mini_batch_size "
                              f"({self.ppo_mini_batch_size})")
        if self.eval_temperature < 0 or (self.eval_temperature == 0 and self.eval_samples != 1):
            raise ConfigError("eval_temperature must be >= 0, and greedy evaluation (0) takes eval_samples=1")
        if self.gold_scorer is not None and ":" not in self.gold_scorer:
            raise ConfigError(f"gold_scorer must look like 'package.module:name' or 'file.py:name' "
                              f"(got {self.gold_scorer!r})")
        try:
            validate_mixed_precision(self.mixed_precision)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc


FAST_OVERRIDES = dict(
    max_eval_prompts=8, sft_epochs=1, sft_batch_size=4, rm_epochs=1, rm_batch_size=4, ppo_updates=2,
    ppo_batch_size=4, ppo_mini_batch_size=2, max_new_tokens=6, top_layers=1, lora_r=4, rm_lora_r=4, max_judged=4,
)
"""Sizes of ``--fast`` (tiny random model): a base that a config file and key=value overrides still change."""


@releases_run_folders
def run_fg(cfg: FGConfig, gold_scorer: GoldScorer | None = None) -> dict:
    """Run every stage and write summary.json and report.html; returns the summary.

    ``gold_scorer`` (Python callers) replaces ``cfg.gold_scorer`` with a callable already in memory.
    """
    with quiet_saves():  # transformers' per-load and per-save bars would bury the stage bars
        return _run_fg(cfg, gold_scorer)


def _run_fg(cfg: FGConfig, gold_fn: GoldScorer | None) -> dict:
    """run_fg without the progress-bar settings."""
    from tokencredit.rewards.data import load_edits
    from tokencredit.rl.sft import SFTConfig, SFTTrainer

    cfg.validate()
    if gold_fn is None and cfg.gold_scorer is not None:
        gold_fn = load_gold_scorer(cfg.gold_scorer)
    root = Path(cfg.output)
    drop_replaced = claim_recipe_folder(root, cfg)
    timings: dict[str, float] = {}
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # 1. Edits, split once: the held-out edits are never seen by either RM and give the evaluation prompts.
    edits = load_edits(cfg.edits, prompt_field=cfg.prompt_field)[: cfg.max_edits]
    train_edits, test_edits = random_split(edits, cfg.test_fraction, np.random.default_rng(cfg.seed))
    if len(train_edits) < 2 or not test_edits:
        raise ValueError(f"{cfg.edits}: {len(edits)} usable edit(s); need at least 2 to train on and 1 held out "
                         f"(test_fraction={cfg.test_fraction})")
    train_prompts = _prompt_list(cfg.prompts, cfg.prompt_field) if cfg.prompts else _unique(
        e.prompt for e in train_edits)
    eval_prompts = _prompt_list(cfg.eval_prompts, cfg.prompt_field) if cfg.eval_prompts else _unique(
        e.prompt for e in test_edits)
    eval_prompts = eval_prompts[: cfg.max_eval_prompts]
    model_name = _fast_model(root, edits) if cfg.fast else cfg.model
    tokenizer = load_tokenizer(model_name)
    use_chat = cfg.chat_template and bool(getattr(tokenizer, "chat_template", None))
    render = (lambda ps: apply_chat(tokenizer, ps, cfg.system_prompt)) if use_chat else list
    # PPO hands the reward function the rendered prompt; the RMs were trained on the raw one.
    raw_of = dict(zip(render(train_prompts), train_prompts))
    lora = LoraSettings(r=cfg.lora_r, alpha=2 * cfg.lora_r, dropout=0.0)
    log.info("fg: %d train / %d held-out edits, %d RL prompts, %d eval prompts, output %s", len(train_edits),
             len(test_edits), len(train_prompts), len(eval_prompts), root)

    # 2. The start of both PPO arms: SFT on (prompt, edited), merged into a plain model, or a given policy.
    t0 = time.perf_counter()
    sft = Stage(root, "sft", cfg.resume)
    if not sft.done:
        start = _start_model(cfg, model_name, sft.dir, train_edits, render, lora, tokenizer, SFTConfig, SFTTrainer)
        sft.finish({"model": start, "trained": cfg.policy is None and cfg.sft_epochs > 0})
        release_free_memory()
    start = sft.info()["model"]
    top_layers = clamp_layers(start, cfg.top_layers)
    timings["sft"] = time.perf_counter() - t0

    # 3. Two RMs on the same pairs, backbone, seed and epochs; scored on the same held-out pairs.
    token_stage, seq_stage = _train_reward_models(cfg, root, start, train_edits, test_edits, timings)

    # 4. Fine-grained PPO (token RM at every token) and sequence-level PPO (sequence RM on the last token):
    #    the same start, adapters drawn from the same seed, the same critic start, budget and KL.
    spreads = _reward_spreads(cfg, root, start, tokenizer, train_prompts, render)
    for arm, rm_stage in ARMS.items():
        t0 = time.perf_counter()
        _ppo_arm(cfg, root, arm, rm_stage, start, tokenizer, render(train_prompts), raw_of, lora, top_layers,
                 1.0 / spreads.get(rm_stage, 1.0))
        timings[arm] = time.perf_counter() - t0

    # 5. Held-out evaluation with scorers neither arm was trained on (gold scorer, judge), plus both RMs' scores
    #    of the answers so that reward hacking (RM up, gold flat or down) is visible.
    t0 = time.perf_counter()
    summary, generations = _evaluate_arms(cfg, root, start, tokenizer, eval_prompts, render, gold_fn, test_edits)
    summary["reward_spread"] = spreads
    timings["evaluate"] = time.perf_counter() - t0
    summary["reward_models"] = {"token_rm": token_stage.info()["heldout"], "sequence_rm": seq_stage.info()["heldout"]}
    summary["arms"] = {arm: Stage(root, arm, True).info() for arm in ARMS}
    summary["data"] = {"edits": len(edits), "train_edits": len(train_edits), "heldout_edits": len(test_edits),
                       "rl_prompts": len(train_prompts), "eval_prompts": len(eval_prompts),
                       "eval_answers": len(generations["sft"]["texts"]), "source": cfg.edits}
    summary["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    atomic_write_json(root / "summary.json", summary)
    _write_report(cfg, root, summary, generations, tokenizer)
    drop_replaced()  # a replaced run goes only once this one has finished
    return summary


def _train_reward_models(cfg: FGConfig, root: Path, start: str, train_edits: list[EditTriple],
                         test_edits: list[EditTriple], timings: dict[str, float]) -> tuple[Stage, Stage]:
    """The token RM (FG's loss on the edits) and the sequence RM (Bradley-Terry on the same pairs), on one
    backbone, seed and budget; both scored on the held-out pairs."""
    from tokencredit.rewards.edits import edit_examples
    from tokencredit.rewards.seq_rm import SeqRMConfig, SequenceRewardModel, train_sequence_reward_model
    from tokencredit.rewards.token_rm import TokenRewardModel
    from tokencredit.rewards.token_rm_training import (
        TokenRMConfig,
        evaluate_token_reward_model,
        train_token_reward_model,
    )

    # Fast mode has one tiny vocabulary, so the tiny start stands in for any other RM backbone.
    rm_backbone = start if cfg.rm_model is None or cfg.fast else cfg.rm_model
    rm_lora = (LoraSettings(r=cfg.rm_lora_r, alpha=2 * cfg.rm_lora_r, dropout=0.0,
                            top_layers=clamp_layers(rm_backbone, cfg.top_layers))
               if cfg.rm_lora_r else None)
    held_pairs = [PreferencePair(e.prompt, e.chosen or e.edited, e.original) for e in test_edits]
    train_pairs = [PreferencePair(e.prompt, e.chosen or e.edited, e.original) for e in train_edits]
    common = dict(seed=cfg.seed, num_epochs=cfg.rm_epochs, batch_size=cfg.rm_batch_size,
                  learning_rate=cfg.rm_learning_rate, eval_fraction=0.0, progress=True,
                  mixed_precision=cfg.mixed_precision)
    t0 = time.perf_counter()
    token_stage = Stage(root, "token_rm", cfg.resume)
    if not token_stage.done:
        rm = TokenRewardModel.from_pretrained(rm_backbone, lora=rm_lora, seed=cfg.seed)
        rm_cfg = TokenRMConfig(output_dir=str(token_stage.dir), balance_labels=True, **common,
                               **_token_weights(cfg.token_loss))
        # Every loss reads the same edits: BCE their token labels, BT their (chosen or edited, original) pairs.
        labelled = [ex for e in train_edits for ex in edit_examples(e)[:2]] if rm_cfg.bce_weight else []
        train_token_reward_model(rm, rm_cfg, edits=train_edits, token_examples=labelled,
                                 pairs=train_pairs if rm_cfg.bt_weight else ())
        held = evaluate_token_reward_model(rm, pairs=held_pairs, edits=test_edits, batch_size=cfg.rm_batch_size)
        token_stage.finish({"model": str(token_stage.dir / "model"), "train_edits": len(train_edits),
                            "loss": cfg.token_loss, "heldout": held})
        del rm
        release_free_memory()
    timings["token_rm"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    seq_stage = Stage(root, "sequence_rm", cfg.resume)
    if not seq_stage.done:
        rm = SequenceRewardModel.from_pretrained(rm_backbone, lora=rm_lora, seed=cfg.seed)
        history = train_sequence_reward_model(rm, SeqRMConfig(output_dir=str(seq_stage.dir), **common),
                                              train_pairs, eval_pairs=held_pairs)
        held = history[-1]["eval"]  # scored on held_pairs, as the token RM is
        seq_stage.finish({"model": str(seq_stage.dir / "model"), "train_pairs": len(train_pairs), "heldout": held})
        del rm
        release_free_memory()
    timings["sequence_rm"] = time.perf_counter() - t0
    return token_stage, seq_stage


def _ppo_arm(cfg: FGConfig, root: Path, arm: str, rm_stage: str, start: str, tokenizer: object,
             rl_prompts: list[str], raw_of: dict[str, str], lora: LoraSettings, top_layers: int | None,
             scale: float) -> None:
    """One PPO arm from the start model on the rewards of ``rm_stage``'s model, multiplied by ``scale``."""
    from tokencredit.rl.ppo import PPOConfig, PPOTrainer

    stage = Stage(root, arm, cfg.resume)
    if stage.done:
        return
    reward_fn = _reward_fn(root / rm_stage / "model", tokenizer, raw_of, scale)
    policy = load_policy(start, lora=dataclasses.replace(lora, top_layers=top_layers), seed=cfg.seed)
    critic = None if cfg.shared_critic else _train_top(load_critic(start), top_layers)
    history = PPOTrainer(
        PPOConfig(output_dir=str(stage.dir), seed=cfg.seed, num_updates=cfg.ppo_updates,
                  batch_size=cfg.ppo_batch_size, mini_batch_size=cfg.ppo_mini_batch_size,
                  ppo_epochs=cfg.ppo_epochs, learning_rate=cfg.ppo_learning_rate,
                  critic_learning_rate=cfg.critic_learning_rate, kl_coef=cfg.kl_coef,
                  max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, save_every=2,
                  resume=cfg.resume, log_tensorboard=False, reuse_sampling_logprobs=True,
                  shared_critic=cfg.shared_critic, mixed_precision=cfg.mixed_precision),
        policy=policy, tokenizer=tokenizer, prompts=rl_prompts, reward_fn=reward_fn, critic=critic,
    ).train()
    stage.finish({"policy": str(stage.dir / "policy"), "start": start, "reward_model": rm_stage,
                  "updates": cfg.ppo_updates, "samples": cfg.ppo_updates * cfg.ppo_batch_size,
                  "seed": cfg.seed, "kl_coef": cfg.kl_coef, "reward_scale": scale,
                  "final_train_reward": history[-1].get("reward/mean") if history else None})
    del policy, critic
    release_free_memory()


def _evaluate_arms(cfg: FGConfig, root: Path, start: str, tokenizer: object, eval_prompts: list[str],
                   render: Callable, gold_fn: GoldScorer | None, test_edits: list[EditTriple]) -> tuple[dict, dict]:
    """Every policy's held-out answers and their metrics, gold checks and (with a judge) the win rate."""
    generations = {name: _generate(cfg, root, name, start, tokenizer, eval_prompts, render)
                   for name in ("sft", *ARMS)}
    summary: dict = {"policies": {}}
    for name, gen in generations.items():
        summary["policies"][name] = _policy_metrics(root, gen, tokenizer, gold_fn)
    _start_perplexity(start, generations, summary["policies"])
    if gold_fn is not None:
        summary["gold_on_heldout_edits"] = _gold_edit_check(gold_fn, test_edits)
        # Per held-out answer, does the arm's gold score beat the start policy's? (ties half, bootstrap CI)
        summary["gold_win_rate_vs_sft"] = {arm: gold_win_rate(generations[arm]["gold"], generations["sft"]["gold"],
                                                              cfg.seed) for arm in ARMS}
    if cfg.judge is not None:
        summary["judge"] = _judge(cfg, root, generations)
    return summary, generations


# ------------------------------------------------------------------------------------------------ helpers
def load_gold_scorer(spec: str) -> GoldScorer:
    """The callable a "module:name" or "file.py:name" spec names (a class is constructed with no argument)."""
    obj = import_object(spec, "gold_scorer")
    fn = obj() if isinstance(obj, type) else obj
    if not callable(fn):
        raise ConfigError(f"gold_scorer {spec!r} is not callable")
    return fn


def _gold(fn: GoldScorer, prompts: list[str], responses: list[str]) -> list[float]:
    """Call the gold scorer and check its answer: one finite float per response."""
    scores = list(fn(prompts, responses))
    if len(scores) != len(responses):
        raise ValueError(f"gold_scorer returned {len(scores)} scores for {len(responses)} responses")
    out = [float(s) for s in scores]
    if not all(np.isfinite(out)):
        raise ValueError("gold_scorer returned a non-finite score")
    return out


def _token_weights(name: str) -> dict[str, float]:
    """TokenRMConfig loss weights of a TOKEN_LOSSES entry, every unnamed term switched off."""
    weights = {"bce_weight": 0.0, "bt_weight": 0.0, "span_bt_weight": 0.0, "edit_bt_weight": 0.0}
    weights.update(TOKEN_LOSSES[name])
    return weights


def _prompt_list(path: str, field: str) -> list[str]:
    """Prompts of a .txt / .jsonl file."""
    from tokencredit.record_files import load_prompts

    return load_prompts(path, field)[0]


def _unique(items: object) -> list[str]:
    """Items in first-seen order, without repeats."""
    return list(dict.fromkeys(items))


def _fast_model(root: Path, edits: Sequence[EditTriple]) -> str:
    """Save a tiny random model with a word tokenizer over the edits' words; return its folder."""
    from tokenizers.pre_tokenizers import Whitespace

    from tokencredit.testing import save_tiny_causal_lm

    folder = root / "tiny-model"
    if not (folder / "config.json").exists():
        split = Whitespace()
        words = {w for e in edits for text in (e.prompt, e.original, e.edited, e.chosen or "")
                 for w, _ in split.pre_tokenize_str(text)}
        save_tiny_causal_lm(folder, sorted(words))
    return str(folder)


def _start_model(cfg: FGConfig, model_name: str, folder: Path, train_edits: Sequence[EditTriple],
                 render: Callable, lora: LoraSettings, tokenizer: object, sft_config: type,
                 sft_trainer: type) -> str:
    """Folder of the model both PPO arms start from: a given policy, the base model, or SFT on the edits."""
    from tokencredit.models import load_trained_policy

    if cfg.policy is not None:
        given = Path(cfg.policy)
        if not (given / "adapter_config.json").is_file() or (given / "config.json").is_file():
            return cfg.policy
        model, tok = load_trained_policy(given, dtype="float32")  # a LoRA adapter: merge it once
        model.save_pretrained(folder / "merged")
        tok.save_pretrained(folder / "merged")
        return str(folder / "merged")
    if cfg.sft_epochs == 0:
        return model_name
    policy = load_policy(model_name, lora=lora, seed=cfg.seed)
    sft_trainer(
        sft_config(output_dir=str(folder), seed=cfg.seed, num_epochs=cfg.sft_epochs, batch_size=cfg.sft_batch_size,
                   learning_rate=cfg.sft_learning_rate, save_every=10, resume=cfg.resume, log_tensorboard=False,
                   mixed_precision=cfg.mixed_precision),
        policy=policy, tokenizer=tokenizer, prompts=render([e.prompt for e in train_edits]),
        responses=[e.edited for e in train_edits],
    ).train()
    # Merged, so PPO's fresh adapters sit on a plain model and "adapters off" is exactly the start.
    merged = policy.merge_and_unload()
    merged.save_pretrained(folder / "merged")
    tokenizer.save_pretrained(folder / "merged")
    return str(folder / "merged")


def _train_top(model: torch.nn.Module, top_layers: int | None) -> torch.nn.Module:
    """Train only the top blocks of a critic (and its head)."""
    from tokencredit.models import train_top_layers

    return train_top_layers(model, top_layers)


def _reward_fn(rm_dir: Path, policy_tokenizer: object, raw_of: dict[str, str], scale: float = 1.0) -> Callable:
    """A saved RM as a PPO reward, times ``scale``: a token RM at every token, a sequence RM's score on the last
    token."""
    from tokencredit.rewards.saved import SavedRewardSettings, reward_from_saved_rm
    from tokencredit.rewards.token_rm import read_reward_info

    # A sequence RM reads the answer's text in its own tokens, so any policy tokenizer works.
    placement = "token" if read_reward_info(rm_dir).get("kind") == "token" else "last"
    return reward_from_saved_rm(rm_dir, policy_tokenizer, SavedRewardSettings(placement=placement, scale=scale),
                                raw_prompt=lambda p: raw_of.get(p, p))


def _generate(cfg: FGConfig, root: Path, name: str, start: str, tokenizer: object, prompts: list[str],
              render: Callable) -> dict:
    """Answers of one policy to the held-out prompts (cached in generations_<name>.json)."""
    path = root / f"generations_{name}.json"
    if cfg.resume and path.exists():
        return json.loads(path.read_text())
    from peft import PeftModel

    policy = load_policy(start)
    if name != "sft":
        policy = PeftModel.from_pretrained(policy, root / name / "policy").merge_and_unload()
    policy.eval()
    rows = [p for p in prompts for _ in range(cfg.eval_samples)]
    rendered = render(rows)
    gen = torch.Generator().manual_seed(cfg.seed + 1234)  # the same draws for every policy
    texts: list[str] = []
    ids: list[list[int]] = []
    with torch.no_grad():
        for begin in range(0, len(rows), 16):
            out = generate(policy, tokenizer, rendered[begin : begin + 16], max_new_tokens=cfg.max_new_tokens,
                           greedy=cfg.eval_temperature == 0, temperature=cfg.eval_temperature or 1.0,
                           generator=gen)
            texts.extend(out.texts)
            ids.extend(out.token_ids())
    result = {"prompts": rows, "rendered": rendered, "texts": texts, "ids": ids}
    atomic_write_json(path, result)
    del policy
    release_free_memory()
    return result


def _policy_metrics(root: Path, gen: dict, tokenizer: object, gold_fn: GoldScorer | None) -> dict:
    """Gold score, both RMs' scores, length and diversity of one policy's held-out answers."""
    from tokencredit.rewards.saved import load_saved_reward_model

    texts = [t.strip() for t in gen["texts"]]
    out: dict = {}
    if gold_fn is not None:
        gold = _gold(gold_fn, gen["prompts"], texts)
        gen["gold"] = gold
        out["gold"] = statistics.fmean(gold)
        out["gold_std"] = statistics.pstdev(gold)
    token_rm = load_saved_reward_model(root / "token_rm" / "model")
    gen["token_rewards"] = _token_scores(token_rm, gen["prompts"], gen["ids"], tokenizer)
    out["token_rm_reward"] = statistics.fmean(sum(r) for r in gen["token_rewards"])
    seq_rm = load_saved_reward_model(root / "sequence_rm" / "model")
    out["sequence_rm_reward"] = statistics.fmean(seq_rm.score_sequences(gen["prompts"], texts))
    out["mean_length_tokens"] = statistics.fmean(len(i) for i in gen["ids"])
    out["distinct_1"], out["distinct_2"] = distinct_n(texts, 1), distinct_n(texts, 2)
    out["empty_share"] = sum(not t for t in texts) / len(texts)
    return out


def gold_win_rate(arm: Sequence[float], base: Sequence[float], seed: int = 0) -> dict:
    """Share of paired answers (same prompt, same draw) where the arm's gold score beats the base's, a tie
    counting half, with a 95% percentile-bootstrap interval over the answers."""
    from tokencredit.judges.settings import win_rate

    if len(arm) != len(base):
        raise ValueError(f"{len(arm)} arm answers but {len(base)} base answers")
    return win_rate(["a" if x > y else "b" if x < y else "tie" for x, y in zip(arm, base)], seed=seed)


def _reward_spreads(cfg: FGConfig, root: Path, start: str, tokenizer: object, prompts: list[str],
                    render: Callable) -> dict[str, float]:
    """Per reward-model stage, the standard deviation of its total reward over start-policy samples (1.0 each
    with reward_normalize=none), written to reward_spread.json so a resumed run scales exactly as before."""
    path = root / "reward_spread.json"
    if cfg.reward_normalize == "none":
        return {}
    if path.exists():
        return json.loads(path.read_text())
    from tokencredit.rewards.saved import load_saved_reward_model

    rows = [prompts[i % len(prompts)] for i in range(cfg.normalize_samples)]
    policy = load_policy(start)
    policy.eval()
    texts, ids = [], []
    gen = torch.Generator().manual_seed(cfg.seed + 4321)
    with torch.no_grad():
        for begin in range(0, len(rows), 16):
            out = generate(policy, tokenizer, render(rows[begin : begin + 16]), max_new_tokens=cfg.max_new_tokens,
                           temperature=cfg.temperature, generator=gen)
            texts += [t.strip() for t in out.texts]
            ids += out.token_ids()
    del policy
    spreads = {}
    for stage in ARMS.values():
        rm = load_saved_reward_model(root / stage / "model")
        totals = ([sum(r) for r in _token_scores(rm, rows, ids, tokenizer)] if stage == "token_rm"
                  else rm.score_sequences(rows, texts))
        # A reward model that scores every sample alike has no spread to divide by: leave its scale alone.
        spread = statistics.pstdev(totals)
        spreads[stage] = spread if spread > 1e-6 else 1.0
    atomic_write_json(path, spreads)
    release_free_memory()
    return spreads


def _start_perplexity(start: str, generations: dict, metrics: dict) -> None:
    """Each policy's answers scored by the start model: mean NLL per answer token and its exp (perplexity), the
    text-quality reading beside the gold score (degenerate text scores high)."""
    from tokencredit.generation import encode_prompts
    from tokencredit.rl.rollout import response_logits, token_logprobs

    model = load_policy(start)
    model.eval()
    tok = load_tokenizer(start)
    for name, gen in generations.items():
        nll, count = 0.0, 0
        with torch.no_grad():
            for begin in range(0, len(gen["ids"]), 16):
                chunk = gen["ids"][begin : begin + 16]
                # The prompts as the policies saw them (generations cached before "rendered" was kept: raw)
                prompts = gen.get("rendered", gen["prompts"])[begin : begin + 16]
                keep = [k for k, i in enumerate(chunk) if i]
                if not keep:
                    continue
                p_ids, p_mask = encode_prompts(tok, [prompts[k] for k in keep], None, "cpu")
                width = max(len(chunk[k]) for k in keep)
                resp = torch.full((len(keep), width), tok.pad_token_id, dtype=torch.long)
                r_mask = torch.zeros(len(keep), width, dtype=torch.long)
                for row, k in enumerate(keep):
                    resp[row, : len(chunk[k])] = torch.tensor(chunk[k])
                    r_mask[row, : len(chunk[k])] = 1
                ids, attn = torch.cat([p_ids, resp], 1), torch.cat([p_mask, r_mask], 1)
                # Only the positions that predict answer tokens, in row chunks: no full-vocabulary copy of the prompt.
                logp = token_logprobs(response_logits(model, ids, attn, width), resp)
                nll -= float((logp * r_mask).sum())
                count += int(r_mask.sum())
        mean = nll / count if count else float("nan")
        metrics[name]["start_nll"] = mean
        metrics[name]["start_perplexity"] = float(np.exp(mean)) if count else float("nan")
    del model
    release_free_memory()


def _token_scores(rm: object, prompts: list[str], ids: list[list[int]], policy_tokenizer: object) -> list:
    """The token RM's reward at each policy token of each answer (mapped by characters across tokenizers)."""
    from tokencredit.rewards.token_rm import same_tokenizer

    ids = [i if i else [policy_tokenizer.eos_token_id] for i in ids]
    if same_tokenizer(rm.tokenizer, policy_tokenizer):
        return rm.score_token_ids(prompts, ids)
    return rm.score_for_policy(prompts, ids, policy_tokenizer)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams of whitespace words in the texts (0 when there are none)."""
    grams = [tuple(words[i : i + n]) for t in texts for words in [t.split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _gold_edit_check(gold_fn: GoldScorer, edits: Sequence[EditTriple]) -> dict:
    """How often the gold scorer prefers the edited answer of a held-out edit: the check that it sees the edits."""
    prompts = [e.prompt for e in edits]
    edited, original = _gold(gold_fn, prompts, [e.edited for e in edits]), _gold(
        gold_fn, prompts, [e.original for e in edits])
    gaps = [a - b for a, b in zip(edited, original)]
    return {"edits": len(edits), "edited_preferred": sum(g > 0 for g in gaps) / len(gaps),
            "ties": sum(g == 0 for g in gaps) / len(gaps), "mean_gap": statistics.fmean(gaps)}


def _judge(cfg: FGConfig, root: Path, generations: dict) -> dict:
    """An LLM judge's win rate of fine-grained over sequence-level answers (both orders; ties count half)."""
    from tokencredit.judges.judge_labelers import PairwiseLabeler
    from tokencredit.judges.settings import make_backend, win_rate
    from tokencredit.judges.templates import load_template

    settings = cfg.judge
    backend = make_backend(settings, root / "judge_cache.sqlite")
    labeler = PairwiseLabeler(backend, load_template("pairwise", settings.template), settings.use_logprobs,
                              settings.reask_unreadable)
    a, b = generations["fine_grained"], generations["sequence"]
    n = len(a["texts"]) if cfg.max_judged is None else min(cfg.max_judged, len(a["texts"]))
    rows = [(a["prompts"][i], a["texts"][i].strip(), b["texts"][i].strip()) for i in range(n)]
    verdicts, stats = labeler.label(rows)
    atomic_write_json(root / "judge_verdicts.json", [{"prompt": p, "fine_grained": x, "sequence": y,
                                                      "verdict": v.verdict} for (p, x, y), v in zip(rows, verdicts)])
    return {"a": "fine_grained", "b": "sequence", **win_rate([v.verdict for v in verdicts], seed=cfg.seed),
            "unjudged": sum(v.verdict is None for v in verdicts), "unreadable": stats.unparseable,
            "backend": settings.backend, "model": settings.model}


def _write_report(cfg: FGConfig, root: Path, summary: dict, generations: dict, tokenizer: object) -> None:
    """report.html: held-out metrics, RM accuracies, training curves, per-token credit on held-out answers."""
    rows = [{"policy": name, **m} for name, m in summary["policies"].items()]
    rm_rows = [{"reward model": name, **{k: v for k, v in m.items() if not isinstance(v, dict)}}
               for name, m in summary["reward_models"].items()]
    curves = {arm: [m.get("reward/mean") for m in read_metrics(root / arm)] for arm in ARMS}
    kl = {arm: [m.get("kl/mean") for m in read_metrics(root / arm)] for arm in ARMS}
    charts = (svg_line_chart(curves, "Training reward (each arm's own RM; the scales differ)", ylabel="reward")
              + svg_line_chart(kl, "KL to the start policy (per sequence)", ylabel="KL"))
    examples = []
    for i in range(min(6, len(generations["sft"]["texts"]))):
        cells = []
        for name, gen in generations.items():
            pieces = token_pieces(tokenizer, gen["ids"][i] or [tokenizer.eos_token_id])
            cells.append(f"<b>{name}</b>: {token_heatmap_html(pieces, gen['token_rewards'][i])}")
        examples.append(f"<p class='small'>prompt: <i>{html.escape(generations['sft']['prompts'][i][-300:])}</i>"
                        f"</p><p>{'<br>'.join(cells)}</p>")
    checks = []
    if "gold_on_heldout_edits" in summary:
        checks.append(("Gold scorer on held-out edits", html_table([summary["gold_on_heldout_edits"]])))
    if "judge" in summary:
        judge = {k: v for k, v in summary["judge"].items() if k != "ci95"}
        judge["ci95"] = str(summary["judge"].get("ci95"))
        checks.append(("Judged win rate, fine-grained vs sequence", html_table([judge])))
    gold = cfg.gold_scorer or ("a Python callable" if "gold" in rows[0] else "none configured")
    note = (f"<p class='small'>Held-out prompts; gold = {html.escape(gold)}, a scorer neither policy was "
            "trained on. RM rewards are each RM's score of the answers: a rise there "
            "with no rise in gold is reward hacking."
            + (" FAST MODE: tiny random model, numbers are meaningless." if cfg.fast else "") + "</p>")
    write_html_report(root / "report.html", "tokencredit fg: fine-grained vs sequence-level PPO from minimal edits", [
        ("Held-out evaluation", html_table(rows) + note),
        ("Reward models on held-out edits", html_table(rm_rows)),
        *checks,
        ("Training curves", charts),
        ("Per-token credit of the token RM on held-out answers", "".join(examples)),
        ("Run", html_table([summary["data"]]) + html_table([{"stage": k, "seconds": v}
                                                             for k, v in summary["timings_s"].items()])),
    ])
