"""`tokencredit ppo`: token-level PPO on prompts with a reward function (a Python callable or a saved RM)."""

from __future__ import annotations

import importlib.resources
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tokencredit.config import ConfigError, import_object
from tokencredit.models import LoraSettings, apply_chat
from tokencredit.rl.ppo import PPOConfig


@dataclass
class PPORunConfig(PPOConfig):
    """`tokencredit ppo`: the PPO knobs plus where the model, prompts and reward come from."""

    model: str = "smollm2-135m-instruct"  # built-in name, local folder or (cached) hub id
    adapter: str | None = None  # saved LoRA adapter to continue training
    lora: LoraSettings | None = None  # train new LoRA adapters; the reference is the policy with them off
    save_merged: bool = False  # LoRA: also write policy-merged/, the adapters merged into a plain model folder
    critic_model: str | None = None  # value model backbone (e.g. a reward model folder); None = policy copy
    dtype: str = "float32"  # torch dtype the policy (and critic) weights are loaded in, e.g. bfloat16
    prompts: str | None = None  # .txt (one a line) or .jsonl; None = the built-in example prompts
    prompt_field: str = "prompt"  # .jsonl field holding each prompt
    reference_field: str | None = None  # .jsonl field with reference responses, for target_coef
    max_prompts: int | None = None  # use only the first N prompts; None = all
    # "module:name", "file.py:name" (Python code: trusted), or "rm:PATH", a saved reward model folder (data)
    reward: str = "tokencredit.rewards.examples:PositiveWords"
    # rm:PATH only: auto (token RM: every token; sequence RM: its score), token, sum (token scores summed onto
    # the last token) or last (the score at the last token)
    reward_placement: Literal["auto", "token", "sum", "last"] = "auto"
    # rm:PATH with one score per response (sum, last, or a sequence RM): reward sigma(score) - baseline, as SER
    # does (0.5 centres it); None = the raw score
    reward_sigmoid_baseline: float | None = None
    reward_scale: float = 1.0  # rm:PATH only: multiplies every reward
    chat_template: bool = True  # wrap prompts in the tokenizer's chat template when it has one
    system_prompt: str | None = None  # system message before each prompt when chat_template applies; None = none


# The embedded default: a short LoRA run of the built-in model on the example prompts and per-token reward.
PPO_DEFAULTS = {
    "output_dir": "runs/ppo-example",
    "num_updates": 8,
    "batch_size": 8,
    "mini_batch_size": 4,
    "ppo_epochs": 2,
    "max_new_tokens": 24,
    "learning_rate": 5e-4,
    "critic_learning_rate": 1e-5,
    "kl_coef": 0.05,
    "save_every": 2,
    "lora": {"r": 8, "alpha": 32, "dropout": 0.0},
}


def make_reward_fn(spec: str, tokenizer: object) -> object:
    """The reward callable named by spec; a class is constructed with the tokenizer as its one argument."""
    obj = import_object(spec)
    fn = obj(tokenizer) if isinstance(obj, type) else obj
    if not callable(fn):
        raise ConfigError(f"reward {spec!r} is not callable")
    return fn



def saved_rm_reward(cfg: PPORunConfig, tokenizer: object, raw_of: dict[str, str]) -> object:
    """The reward_fn of ``reward=rm:PATH``: prompts go back to their raw text, then the RM's own format."""
    from tokencredit.models import resolve_device
    from tokencredit.rewards.saved import SavedRewardSettings, reward_from_saved_rm

    settings = SavedRewardSettings(placement=cfg.reward_placement, sigmoid_baseline=cfg.reward_sigmoid_baseline,
                                   scale=cfg.reward_scale)
    try:
        return reward_from_saved_rm(cfg.reward[3:], tokenizer, settings, raw_prompt=lambda p: raw_of.get(p, p),
                                    device=resolve_device(cfg.device))
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"reward={cfg.reward}: {exc}") from exc


def run_ppo(cfg: PPORunConfig) -> list[dict]:
    """Load everything the config names and train."""
    from tokencredit.models import load_critic, load_policy, load_tokenizer
    from tokencredit.record_files import load_prompts
    from tokencredit.rl.ppo import PPOTrainer

    if cfg.prompts is None:
        text = importlib.resources.files("tokencredit").joinpath("data/ppo_example_prompts.txt").read_text()
        prompts, refs = [line for line in text.splitlines() if line.strip()], None
    else:
        prompts, refs = load_prompts(cfg.prompts, cfg.prompt_field, cfg.reference_field)
    if not cfg.reward.startswith("rm:") and (cfg.reward_placement != "auto" or cfg.reward_scale != 1.0
                                             or cfg.reward_sigmoid_baseline is not None):
        raise ConfigError("reward_placement, reward_scale and reward_sigmoid_baseline apply to reward=rm:PATH only")
    if cfg.max_prompts:
        prompts = prompts[: cfg.max_prompts]
        refs = refs[: cfg.max_prompts] if refs is not None else None
    tokenizer = load_tokenizer(cfg.model)
    raw_prompts = list(prompts)
    if cfg.chat_template and tokenizer.chat_template:
        prompts = apply_chat(tokenizer, prompts, cfg.system_prompt)
    reward_fn = make_reward_fn(cfg.reward, tokenizer) if not cfg.reward.startswith("rm:") else (
        saved_rm_reward(cfg, tokenizer, dict(zip(prompts, raw_prompts))))
    policy = load_policy(cfg.model, lora=cfg.lora, adapter=cfg.adapter, dtype=cfg.dtype, seed=cfg.seed)
    critic = load_critic(cfg.critic_model, dtype=cfg.dtype) if cfg.critic_model else None
    trainer = PPOTrainer(cfg, policy=policy, tokenizer=tokenizer, prompts=prompts, reward_fn=reward_fn,
                         critic=critic, reference_responses=refs)
    history = trainer.train()
    if not trainer.group.is_main:
        return history  # rank 0 writes the merged policy and reports
    if cfg.save_merged:
        from tokencredit.models import save_merged

        save_merged(trainer.policy, tokenizer, Path(cfg.output_dir) / "policy-merged")
    if history:
        first, last = history[0], history[-1]
        print(json.dumps({"updates": len(history), "first_reward": first.get("reward/mean"),
                          "last_reward": last.get("reward/mean"), "last_kl": last.get("kl/mean"),
                          "run": str(cfg.output_dir)}))
    return history
