"""PPO throughput on this CPU: tokencredit against TRL 1.12's PPOTrainer on the real SmolLM2-135M, side by side.

Both sides run in this one process, one after the other, on the built-in SmolLM2-135M-Instruct (real weights, full
fine-tuning): policy and reference from the checkpoint, a value model and a reward model on the same backbone (the
reward head seeded and shared by both sides), the same prompt token ids (batch 8 x 32 tokens), 32 new tokens per
response (EOS made unreachable on both sides, so every response is full length), 2 PPO epochs of one whole-batch
optimiser step, no gradient clipping on either side, learning rate 3e-6, KL coefficient 0.05, the same seeds.

Two comparisons, each arm timed over several updates after a warm-up (min and median are reported):

    fp32   TRL with fp32 models  vs  tokencredit with mixed_precision="no": all levers off ("plain"), then each lever
           alone, then the kept ones together, then with a value head on the policy's trunk (an option that
           changes the method: no separate critic)
    bf16   TRL with bf16 models (pure bf16) and TRL with fp32 models under accelerate's bf16 autocast  vs
           tokencredit pure bf16, tokencredit bf16 autocast with fp32 masters alone, and with the kept levers
           (tokencredit's default on this CPU), and with the shared value head
    Last, with glibc's allocator told to keep freed memory (process-wide, so these arms run at the end): that
    setting alone, with the other levers, and TRL with it.

The reward model is stored in the comparison's dtype (fp32, or bf16 in the bf16 comparison) on both sides. Per arm:
seconds per update, episodes/s, response tokens/s, peak RSS (the process's high-water mark, reset before each arm),
time per phase (sampling, reward model, reference, old log-probs, values, optimisation) and the ratio to TRL.
Then sampling alone: new tokens/s of tokencredit's sampler vs transformers `generate` at batch 8 and 32 in fp32,
pure bf16 and bf16 autocast.

TRL and `datasets` are not dependencies: put their wheels in the git-ignored `.whl/` and install them beside the venv
(see benchmarks/README.md), then:

    PYTHONPATH=/tmp/trlsite HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python benchmarks/cpu_ppo_throughput.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_ppo_throughput import RewardModelScore, bench_tokenizer, prompt_rows  # noqa: E402
from trl_ppo_baseline import run_trl_ppo  # noqa: E402

from tokencredit import PPOConfig, PPOTrainer  # noqa: E402
from tokencredit.fastdecode import StaticKVDecoder  # noqa: E402
from tokencredit.generation import generate  # noqa: E402
from tokencredit.models import ScalarHeadModel, resolve_model  # noqa: E402
from tokencredit.precision import release_free_memory  # noqa: E402

OFF = dict(mixed_precision="no", fused_optimizer=False, reuse_first_epoch_forward=False,
           reuse_sampling_logprobs=False, rollout_backend="plain", tune_allocator=False, shared_critic=False)
FP32_LEVERS = dict(fused_optimizer=True, reuse_first_epoch_forward=True)
# Every arm in the order it runs: (comparison, name, side, model dtype, settings). The allocator setting is
# process-wide and cannot be undone, so every arm without it runs first; the last arms show what it adds, TRL
# included (TRL with it is not what TRL users get, but it shows the lever is not ours alone).
ARMS = [
    ("fp32", "trl_fp32", "trl", torch.float32, "no"),
    ("bf16", "trl_pure_bf16", "trl", torch.bfloat16, "no"),
    ("bf16", "trl_autocast_bf16", "trl", torch.float32, "bf16"),
    ("fp32", "plain", "tc", torch.float32, {}),
    ("fp32", "+fused_adamw", "tc", torch.float32, dict(fused_optimizer=True)),
    ("fp32", "+reuse_first_epoch_forward", "tc", torch.float32, dict(reuse_first_epoch_forward=True)),
    ("fp32", "+reuse_sampling_logprobs", "tc", torch.float32, dict(reuse_sampling_logprobs=True)),
    ("fp32", "+static_decoder", "tc", torch.float32, dict(rollout_backend="static")),
    ("fp32", "fp32_levers", "tc", torch.float32, FP32_LEVERS),
    ("bf16", "pure_bf16_plain", "tc", torch.bfloat16, {}),
    ("bf16", "autocast_bf16", "tc", torch.float32, dict(mixed_precision="bf16")),
    ("bf16", "autocast_bf16+levers (default)", "tc", torch.float32, dict(mixed_precision="bf16", **FP32_LEVERS)),
    ("fp32", "fp32_levers+shared_critic", "tc", torch.float32, dict(shared_critic=True, **FP32_LEVERS)),
    ("bf16", "autocast_bf16+levers+shared_critic", "tc", torch.float32,
     dict(mixed_precision="bf16", shared_critic=True, **FP32_LEVERS)),
    # --- from here on the process runs with the tuned allocator ---
    ("fp32", "+tuned_allocator", "tc", torch.float32, dict(tune_allocator=True)),
    ("fp32", "fp32_levers+tuned_allocator", "tc", torch.float32, dict(tune_allocator=True, **FP32_LEVERS)),
    ("bf16", "autocast_bf16+levers+tuned_allocator", "tc", torch.float32,
     dict(mixed_precision="bf16", tune_allocator=True, **FP32_LEVERS)),
    ("fp32", "trl_fp32 (tuned allocator)", "trl", torch.float32, "no"),
    ("bf16", "trl_autocast_bf16 (tuned allocator)", "trl", torch.float32, "bf16"),
]


# ---------------------------------------------------------------------------------------------- memory
def reset_peak_rss() -> None:
    """Reset this process's RSS high-water mark (Linux: writing 5 to clear_refs)."""
    release_free_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_gb() -> float | None:
    """VmHWM of this process in GB, or None where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        return None
    return None


# ---------------------------------------------------------------------------------------------- models
def load_models(path: Path, dtype: torch.dtype, seed: int, for_trl: bool):
    """Policy, reference, value model and reward model from the real checkpoint, in dtype.

    The reward head is drawn from `seed` on both sides, so the two sides score with the same reward model.
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    policy = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    policy.generation_config.eos_token_id = None
    g = torch.Generator().manual_seed(seed + 2)
    head = torch.randn(1, policy.config.hidden_size, generator=g) * 0.02
    if for_trl:
        value = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, num_labels=1)
        reward = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, num_labels=1)
        for m in (value, reward):
            m.config.pad_token_id = 0
        torch.nn.init.zeros_(value.score.weight)
        with torch.no_grad():
            reward.score.weight.copy_(head.to(dtype))
        return policy, reference, value, reward.eval().requires_grad_(False)
    critic = ScalarHeadModel.from_backbone(AutoModel.from_pretrained(path, dtype=dtype))
    reward = ScalarHeadModel.from_backbone(AutoModel.from_pretrained(path, dtype=dtype))
    with torch.no_grad():
        reward.head.weight.copy_(head)
    return policy, reference, critic, reward.eval().requires_grad_(False)


def _allocator_tuned() -> bool:
    """Whether an earlier arm switched on the (process-wide) allocator setting."""
    from tokencredit import precision

    return precision._ALLOCATOR_TUNED


def summarise(seconds: list[float], batch: int, new_tokens: int) -> dict:
    """min / median seconds per update and the rates they give."""
    med, best = statistics.median(seconds), min(seconds)
    return {"seconds_per_update_median": med, "seconds_per_update_min": best,
            "episodes_per_s_median": batch / med, "episodes_per_s_best": batch / best,
            "tokens_per_s_median": batch * new_tokens / med, "update_seconds": seconds}


# ---------------------------------------------------------------------------------------------- arms
def run_tokencredit_arm(path, tok, vocab, texts, rows, dtype, overrides, a) -> dict:
    """Time tokencredit PPO updates with one set of levers."""
    reset_peak_rss()
    policy, reference, critic, reward = load_models(path, dtype, a.seed, for_trl=False)
    if overrides.get("shared_critic"):
        critic = None  # the value head sits on the policy
    if overrides.get("mixed_precision") == "bf16" or dtype == torch.bfloat16:
        reward.to(torch.bfloat16)  # the bf16 comparison's reward model, as on TRL's side
    cfg = PPOConfig(
        output_dir=str(Path(a.work_dir) / "tc"), seed=a.seed, num_updates=a.warmup + a.updates,
        batch_size=a.batch, mini_batch_size=a.batch, ppo_epochs=a.epochs, max_new_tokens=a.new_tokens,
        max_prompt_length=None, temperature=1.0, learning_rate=3e-6, kl_coef=0.05, progress=False,
        log_tensorboard=False, device="cpu", max_grad_norm=None, **{**OFF, **overrides},
    )
    trainer = PPOTrainer(cfg, policy=policy, tokenizer=tok, prompts=texts,
                         reward_fn=RewardModelScore(reward, dict(zip(texts, rows)), "cpu"),
                         critic=critic, reference=reference)
    seconds, phases = [], []
    for i in range(a.warmup + a.updates):
        t0 = time.perf_counter()
        stats = trainer.step(trainer.batch_indices(i))
        seconds.append(time.perf_counter() - t0)
        phases.append({
            "sampling": stats["time/rollout"], "reward": stats.get("time/reward", 0.0),
            "reference": stats.get("time/reference", 0.0),
            "old_logprobs": stats.get("time/logprobs", 0.0), "values": stats.get("time/values", 0.0),
            # the first epoch's forward, which replaced the old log-prob and value passes, is optimisation work
            "optimisation": stats["time/update"] + stats.get("time/first_forward", 0.0),
        })
        assert stats["response_length/mean"] == a.new_tokens, stats["response_length/mean"]
    out = summarise(seconds[a.warmup:], a.batch, a.new_tokens)
    out["phases_median"] = {k: statistics.median(p[k] for p in phases[a.warmup:]) for k in phases[0]}
    out["peak_rss_gb"] = peak_rss_gb()
    out["config"] = {**OFF, **overrides, "model_dtype": str(dtype).removeprefix("torch.")}
    out["allocator_tuned_in_process"] = _allocator_tuned()
    out["last_stats"] = {k: stats[k] for k in ("reward/mean", "kl/mean", "loss/policy", "loss/value")}
    del trainer, policy, reference, critic, reward
    release_free_memory()
    return out


def run_trl_arm(path, tok, vocab, rows, dtype, mixed_precision, a) -> dict:
    """Time TRL 1.12 PPOTrainer updates on the same models, prompts and shapes."""
    try:
        import trl  # noqa: F401
    except ImportError:
        return {"skipped": "trl is not importable (see benchmarks/README.md for its wheels)"}
    reset_peak_rss()
    models = load_models(path, dtype, a.seed, for_trl=True)
    if dtype == torch.bfloat16 or mixed_precision == "bf16":
        models[3].to(torch.bfloat16)
    res = run_trl_ppo({"vocab_size": vocab}, tokenizer=tok, prompts=rows, batch_size=a.batch, prompt_len=a.prompt_len,
                      new_tokens=a.new_tokens, ppo_epochs=a.epochs, num_updates=a.updates, warmup_updates=a.warmup,
                      seed=a.seed, dtype=dtype, device="cpu", output_dir=str(Path(a.work_dir) / "trl"),
                      models=models, mixed_precision=mixed_precision, time_phases=True)
    out = summarise(res["update_seconds"], a.batch, a.new_tokens)
    phases = [{**p, "optimisation": s - sum(p.values())} for p, s in zip(res["phases"], res["update_seconds"])]
    keys = ("sampling", "reward", "reference", "values", "optimisation")
    out["phases_median"] = {k: statistics.median(p.get(k, 0.0) for p in phases) for k in keys}
    out["peak_rss_gb"] = peak_rss_gb()
    out["allocator_tuned_in_process"] = _allocator_tuned()
    out["config"] = {"model_dtype": str(dtype).removeprefix("torch."), "accelerate_mixed_precision":
                     res["mixed_precision"], "trl_version": res["trl_version"]}
    del models
    release_free_memory()
    return out


@torch.no_grad()
def run_sampling(path, tok, vocab, a) -> dict:
    """New tokens/s: transformers `generate` vs tokencredit's sampler (plain and static decoders), per batch and
    precision. Same model, prompts, length (EOS unreachable) and sampling settings (temperature 1, no top-k/p)."""
    from transformers import AutoModelForCausalLM

    from tokencredit.precision import autocast

    out: dict = {}
    for precision in ("fp32", "pure_bf16", "autocast_bf16"):
        dtype = torch.bfloat16 if precision == "pure_bf16" else torch.float32
        amp = torch.bfloat16 if precision == "autocast_bf16" else None
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        if amp is not None:
            # what PPO does: trainable (fp32) weights are cast once per rollout by autocast's cache
            model.requires_grad_(True)
        model.generation_config.eos_token_id = None
        for batch in a.gen_batches:
            _texts, rows = prompt_rows(tok, vocab, batch, a.prompt_len, a.seed + batch)
            ids = torch.tensor(rows)
            mask = torch.ones_like(ids)
            static = StaticKVDecoder(model, cuda_graphs=False)

            def run(name: str, model=model, ids=ids, mask=mask, static=static, amp=amp) -> None:
                with autocast("cpu", amp):
                    if name == "transformers_generate":
                        model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                       top_p=1.0, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                                       pad_token_id=0)
                    else:
                        generate(model, tok, prompt_ids=ids, prompt_mask=mask, max_new_tokens=a.new_tokens,
                                 decoder=static if name == "tokencredit_static" else None,
                                 generator=torch.Generator().manual_seed(0))

            row: dict = {}
            for name in ("transformers_generate", "tokencredit_plain", "tokencredit_static"):
                run(name)  # warm-up
                secs = []
                for _ in range(a.gen_repeats):
                    t0 = time.perf_counter()
                    run(name)
                    secs.append(time.perf_counter() - t0)
                row[name] = {"tokens_per_s_median": batch * a.new_tokens / statistics.median(secs),
                             "tokens_per_s_best": batch * a.new_tokens / min(secs), "seconds": secs}
            base = row["transformers_generate"]["tokens_per_s_median"]
            row["ratio_vs_generate"] = {k: v["tokens_per_s_median"] / base for k, v in row.items()
                                        if k != "transformers_generate"}
            out.setdefault(precision, {})[str(batch)] = row
            print("sampling", precision, batch, json.dumps(row["ratio_vs_generate"]),
                  {k: round(v["tokens_per_s_median"], 1) for k, v in row.items() if "tokens_per_s_median" in v},
                  flush=True)
        del model
        release_free_memory()
    # The autocast sampler against generate in fp32: the lever a user gets by default on this CPU.
    for batch in a.gen_batches:
        b = str(batch)
        if b in out.get("fp32", {}) and b in out.get("autocast_bf16", {}):
            out.setdefault("autocast_sampler_vs_fp32_generate", {})[b] = (
                out["autocast_bf16"][b]["tokencredit_plain"]["tokens_per_s_median"]
                / out["fp32"][b]["transformers_generate"]["tokens_per_s_median"])
    return out


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write(result: dict, path: Path) -> None:
    """Write the results so far (a cut run still leaves numbers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)


def ratios(result: dict) -> None:
    """Episodes/s of every arm relative to the TRL arms of its comparison, and peak RSS relative to TRL."""
    for arms in result["comparisons"].values():
        trl = {k: v for k, v in arms.items() if k.startswith("trl") and "episodes_per_s_median" in v}
        for arm in arms.values():
            if "episodes_per_s_median" not in arm:
                continue
            arm["vs_trl"] = {t: {"episodes_per_s": arm["episodes_per_s_median"] / v["episodes_per_s_median"],
                                 "peak_rss": (arm["peak_rss_gb"] / v["peak_rss_gb"]) if v.get("peak_rss_gb") else None}
                             for t, v in trl.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--updates", type=int, default=3, help="timed updates per arm (min and median are reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--comparisons", default="fp32,bf16")
    p.add_argument("--arms", default=None, help="comma-separated arm names to run (default: all)")
    p.add_argument("--gen-batches", default="8,32")
    p.add_argument("--gen-repeats", type=int, default=3)
    p.add_argument("--skip-sampling", action="store_true")
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--work-dir", default="/tmp/tokencredit-cpu-bench")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_ppo_throughput.json"))
    a = p.parse_args()
    a.gen_batches = [int(b) for b in a.gen_batches.split(",")]
    only = set(a.arms.split(",")) if a.arms else None
    path = resolve_model(a.model)
    tok, vocab = bench_tokenizer(str(path))
    texts, rows = prompt_rows(tok, vocab, a.batch, a.prompt_len, a.seed)
    import transformers

    out = Path(a.out)
    result: dict = {
        "cpu": cpu_model(), "nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__, "model": a.model,
        "shapes": {"batch": a.batch, "prompt_tokens": a.prompt_len, "new_tokens": a.new_tokens, "ppo_epochs": a.epochs,
                   "mini_batches": 1, "updates_timed": a.updates, "warmup": a.warmup, "weights": "full",
                   "learning_rate": 3e-6, "kl_coef": 0.05, "grad_clip": None},
        "comparisons": {},
    }
    comps = set(a.comparisons.split(","))
    for comp, name, side, dtype, spec in ARMS:
        if comp not in comps or (only and name not in only) or (side == "trl" and a.skip_trl):
            continue
        arms = result["comparisons"].setdefault(comp, {})
        if side == "trl":
            arms[name] = run_trl_arm(path, tok, vocab, rows, dtype, spec, a)
        else:
            arms[name] = run_tokencredit_arm(path, tok, vocab, texts, rows, dtype, spec, a)
        ratios(result)
        print(comp, name, json.dumps({k: v for k, v in arms[name].items() if k != "update_seconds"}), flush=True)
        write(result, out)
    if not a.skip_sampling:
        result["sampling"] = run_sampling(path, tok, vocab, a)
        write(result, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
