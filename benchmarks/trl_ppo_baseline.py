"""Baseline for the PPO throughput benchmark: TRL 1.12's PPOTrainer on random-init Llama-architecture models.

TRL is not a project dependency; install it (and `datasets`) beside the venv, e.g. into a --target folder on
PYTHONPATH. CPU smoke run:
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=/tmp/trlsite .venv/bin/python benchmarks/trl_ppo_baseline.py
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

SMOLLM2_TOKENIZER = Path.home() / ".cache/tokencredit/models/smollm2-135m-instruct"
BENCH_PAD_TOKEN = "<|trl_bench_pad|>"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _tokenizer_with_unreachable_pad(tokenizer: Any, vocab_size: int) -> Any:
    # TRL masks every position equal to pad_token_id (and cuts the response before the first one). SmolLM2's pad is
    # its EOS, which a random policy samples now and then; a pad id >= the model's vocab can never be sampled, so
    # every response keeps all its tokens. TRL replaces pad ids by 0 before any embedding lookup, so the id is safe.
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id >= vocab_size:
        return tokenizer
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"pad_token": BENCH_PAD_TOKEN})
    if tokenizer.pad_token_id < vocab_size:
        raise ValueError(f"pad id {tokenizer.pad_token_id} still inside the model vocab ({vocab_size})")
    return tokenizer


def _prompt_rows(
    prompts: Sequence[str] | Sequence[Sequence[int]] | None,
    tokenizer: Any,
    n_rows: int,
    prompt_len: int,
    vocab_size: int,
    seed: int,
) -> list[list[int]]:
    if not prompts:
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (n_rows, prompt_len), generator=gen).tolist()
    token_lists = [
        tokenizer(p, add_special_tokens=False)["input_ids"] if isinstance(p, str) else list(p) for p in prompts
    ]
    if any(not ids for ids in token_lists):
        raise ValueError("every prompt needs at least one token")
    # Tiling keeps all rows exactly prompt_len long, so TRL's collator never pads.
    rows = [(ids * (prompt_len // len(ids) + 1))[:prompt_len] for ids in token_lists]
    return [rows[i % len(rows)] for i in range(max(n_rows, len(rows)))]


def run_trl_ppo(
    model_config: dict[str, Any],
    *,
    tokenizer: Any,
    prompts: Sequence[str] | Sequence[Sequence[int]] | None,
    batch_size: int,
    prompt_len: int,
    new_tokens: int,
    ppo_epochs: int,
    num_updates: int,
    warmup_updates: int,
    seed: int,
    dtype: torch.dtype,
    device: str,
    output_dir: str,
    models: tuple[torch.nn.Module, ...] | None = None,
    mixed_precision: str = "no",
    time_phases: bool = False,
) -> dict[str, Any]:
    """Time TRL PPOTrainer updates on random-init Llama policy, reference, value and reward models.

    `models` = (policy, reference, value model, reward model) already built (e.g. from real weights) instead of
    random ones from `model_config`. `mixed_precision="bf16"` makes TRL's Accelerator autocast the trained models'
    forward passes (fp32 weights). `time_phases` adds seconds per update spent in sampling, the reference forward,
    the value forward, the reward model and (the rest) optimisation, by timing TRL's own module-level helpers.
    """
    import trl
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig, TrainerCallback
    from transformers import set_seed as hf_set_seed
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    if num_updates < 1 or warmup_updates < 0:
        raise ValueError("need num_updates >= 1 and warmup_updates >= 0")
    on_cuda = device.startswith("cuda")
    hf_set_seed(seed)
    config = LlamaConfig(**model_config)
    tokenizer = _tokenizer_with_unreachable_pad(tokenizer, config.vocab_size)

    def build(auto_cls: Any, model_seed: int, **overrides: Any) -> torch.nn.Module:
        cfg = copy.deepcopy(config)
        for key, value in overrides.items():
            setattr(cfg, key, value)
        torch.manual_seed(model_seed)
        with torch.device(device):
            return auto_cls.from_config(cfg, dtype=dtype)

    if models is not None:
        policy, ref_policy, value_model, reward_model = models
    else:
        # Policy and reference share a seed, so they start identical as after SFT.
        policy = build(AutoModelForCausalLM, seed)
        ref_policy = build(AutoModelForCausalLM, seed)
        value_model = build(AutoModelForSequenceClassification, seed + 1, num_labels=1)
        reward_model = build(AutoModelForSequenceClassification, seed + 2, num_labels=1)

    rows = _prompt_rows(prompts, tokenizer, batch_size, prompt_len, config.vocab_size, seed)
    # PPOTrainer only takes len() of the dataset and indexes it through a DataLoader, so a list of rows will do. A
    # datasets.Dataset would fingerprint itself with dill, which pickles pyarrow by value (and fails) whenever pyarrow
    # is installed outside a site-packages folder, as with `pip install --target`.
    dataset = [{"input_ids": row} for row in rows]

    args = PPOConfig(
        output_dir=output_dir,
        seed=seed,
        total_episodes=batch_size * (warmup_updates + num_updates),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1,
        num_mini_batches=1,
        num_ppo_epochs=ppo_epochs,
        # One generate call for the whole batch instead of TRL's default chunks of 64 rows.
        local_rollout_forward_batch_size=batch_size,
        response_length=new_tokens,
        stop_token=None,
        stop_token_id=None,
        missing_eos_penalty=None,
        temperature=1.0,
        # Only records the dtype: PPOTrainer builds its own Accelerator without a mixed_precision argument, and
        # transformers 5.x no longer exports bf16 through ACCELERATE_MIXED_PRECISION, so no autocast is added and the
        # models compute in `dtype` (the result's "mixed_precision" shows what accelerate used).
        bf16=dtype == torch.bfloat16,
        fp16=False,
        # TRL's default is True, but PPOTrainer never calls gradient_checkpointing_enable; False says what runs.
        gradient_checkpointing=False,
        use_cpu=not on_cuda,
        num_sample_generations=0,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )

    durations: list[float] = []

    class _UpdateTimer(TrainerCallback):
        # PPOTrainer.train fires on_step_end once per update (rollout, then every PPO epoch's optimiser step), after
        # lr_scheduler.step. Timing from one on_step_end to the next also charges TRL's own per-update cleanup
        # (empty_cache, gc.collect) and the next batch fetch, which our PPO pays its equivalent of too.
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            _sync(device)
            self.last = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            _sync(device)
            now = time.perf_counter()
            durations.append(now - self.last)
            self.last = now

    if on_cuda:
        # Reset after the four models exist, so the peak counts their weights plus optimiser state and activations.
        torch.cuda.reset_peak_memory_stats()
    if mixed_precision not in ("no", "bf16"):
        raise ValueError(f"mixed_precision must be 'no' or 'bf16' (got {mixed_precision!r})")
    # PPOTrainer builds its Accelerator without a mixed_precision argument, so accelerate reads this variable.
    previous_mp = os.environ.get("ACCELERATE_MIXED_PRECISION")
    os.environ["ACCELERATE_MIXED_PRECISION"] = mixed_precision
    phase_totals: dict[str, float] = {}
    restore = _time_trl_phases(phase_totals, reward_model, device) if time_phases else (lambda: None)
    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref_policy,
        reward_model=reward_model,
        train_dataset=dataset,
        value_model=value_model,
        callbacks=[_UpdateTimer()],
    )
    if trainer.accelerator.device.type != torch.device(device).type:
        raise ValueError(f"asked for {device} but accelerate placed the models on {trainer.accelerator.device}")
    # The printer callback would dump a metrics dict to stdout every update.
    for cb in list(trainer.callback_handler.callbacks):
        if type(cb).__name__ in ("PrinterCallback", "ProgressCallback"):
            trainer.remove_callback(cb)
    phase_log: list[dict[str, float]] = []

    class _PhaseSnapshot(TrainerCallback):
        def on_step_end(self, *a: Any, **k: Any) -> None:
            phase_log.append(dict(phase_totals))
            phase_totals.clear()

    if time_phases:
        trainer.add_callback(_PhaseSnapshot())
    try:
        trainer.train()
    finally:
        restore()
        if previous_mp is None:
            os.environ.pop("ACCELERATE_MIXED_PRECISION", None)
        else:
            os.environ["ACCELERATE_MIXED_PRECISION"] = previous_mp

    timed = durations[warmup_updates:]
    if len(timed) != num_updates:
        raise RuntimeError(f"expected {warmup_updates + num_updates} updates, TRL ran {len(durations)}")
    mean = sum(timed) / len(timed)
    return {
        "seconds_per_update": mean,
        "episodes_per_s": batch_size / mean,
        "tokens_per_s": batch_size * new_tokens / mean,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if on_cuda else None,
        "updates_timed": len(timed),
        "trl_version": trl.__version__,
        "mixed_precision": trainer.accelerator.mixed_precision,
        "update_seconds": timed,
        "phases": phase_log[warmup_updates:] if time_phases else None,
    }


def _time_trl_phases(totals: dict[str, float], reward_model: torch.nn.Module, device: str) -> Any:
    """Wrap TRL's batch_generation / forward / get_reward to add their seconds to totals; returns an undo function.

    No-grad `forward` calls are the reference pass (TRL reuses the sampling logits for old log-probs); `get_reward`
    on the reward model is scoring, on anything else the value pass. Forward passes with gradients are optimisation.
    """
    from trl.experimental.ppo import ppo_trainer as mod

    originals = {name: getattr(mod, name) for name in ("batch_generation", "forward", "get_reward")}

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if name == "forward" and torch.is_grad_enabled():
                return fn(*args, **kwargs)
            if name == "get_reward":
                phase = "reward" if args[0] is reward_model else "values"
            else:
                phase = {"batch_generation": "sampling", "forward": "reference"}[name]
            _sync(device)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            _sync(device)
            totals[phase] = totals.get(phase, 0.0) + time.perf_counter() - t0
            return out
        return wrapper

    for name, fn in originals.items():
        setattr(mod, name, timed(name, fn))

    def restore() -> None:
        for name, fn in originals.items():
            setattr(mod, name, fn)

    return restore


def main() -> None:
    """CPU smoke run on a tiny random Llama with the SmolLM2 tokenizer; prints the result as JSON."""
    from transformers import AutoTokenizer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", default=str(SMOLLM2_TOKENIZER))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--ppo-epochs", type=int, default=1)
    p.add_argument("--num-updates", type=int, default=2)
    p.add_argument("--warmup-updates", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--output-dir", default="/tmp/trl_ppo_baseline")
    a = p.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(a.tokenizer)
    model_config = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    prompts = ["Write a short poem about the sea.", "What is the capital of France?", "Explain PPO in one line."]
    result = run_trl_ppo(
        model_config,
        tokenizer=tokenizer,
        prompts=prompts,
        batch_size=a.batch_size,
        prompt_len=a.prompt_len,
        new_tokens=a.new_tokens,
        ppo_epochs=a.ppo_epochs,
        num_updates=a.num_updates,
        warmup_updates=a.warmup_updates,
        seed=a.seed,
        dtype=getattr(torch, a.dtype),
        device=a.device,
        output_dir=a.output_dir,
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
