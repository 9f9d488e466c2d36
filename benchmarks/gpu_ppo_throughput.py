"""PPO and rollout throughput on one GPU: tokencredit's PPO update against TRL 1.12's PPOTrainer, side by side.

Both run in this one process on the same random-init models (bf16 weights, no autocast on either side), the same
prompt token ids (batch 64 x 48 tokens), 64 new tokens per response (nothing stops early), 4 PPO epochs of one
whole-batch optimiser step, and the same seeds. For each setup it reports seconds per update, episodes/s,
response tokens/s, peak GPU memory, and the ratio to TRL; tokencredit is run once per lever so each lever's
gain is measured:

    plain         transformers' KV cache (the CPU-tested reference path), log-probs recomputed
    static        tokencredit's own decode loop over a static KV cache, eager
    static+graph  the same with every decode step replayed as one CUDA graph
    +reuse        ... and the sampler's log-probs used as PPO's old log-probs (one policy forward less)

plus generation alone: new tokens/s of the static+graph decoder vs transformers `generate` at batch 64 and 256,
and a correctness check on the GPU (sampled log-probs of the graph path vs a full forward of the plain model).

TRL and `datasets` are not dependencies: carry their wheels (see benchmarks/README.md). On a machine without
CUDA the script says so and exits 0; `--smoke` runs tiny shapes on the CPU to check the script itself.

    python benchmarks/gpu_ppo_throughput.py                    # GPU: writes benchmarks/results/gpu_ppo_throughput.json
    python benchmarks/gpu_ppo_throughput.py --smoke --out /tmp/smoke.json
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from trl_ppo_baseline import SMOLLM2_TOKENIZER, run_trl_ppo  # noqa: E402

from tokencredit import PPOConfig, PPOTrainer  # noqa: E402
from tokencredit.fastdecode import StaticKVDecoder  # noqa: E402
from tokencredit.generation import generate  # noqa: E402
from tokencredit.models import ScalarHeadModel  # noqa: E402
from tokencredit.rl.rollout import response_logits, token_logprobs  # noqa: E402

# The two setups of the issue: SmolLM2-135M's architecture, and a Llama-shaped 1.1B (hidden 2048, 16 layers,
# GQA 32/8; with SmolLM2's 49k vocabulary and an 8192 MLP that is 1.07B parameters).
SETUPS = {
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0),
    "1.1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=8, tie_word_embeddings=False, rope_theta=500000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10000.0),
}
LEVERS = {
    "plain": dict(rollout_backend="plain"),
    "static": dict(rollout_backend="static", cuda_graphs=False),
    "static+graph": dict(rollout_backend="static", cuda_graphs=True),
    "static+graph+reuse": dict(rollout_backend="static", cuda_graphs=True, reuse_sampling_logprobs=True),
}
BENCH_EOS = "<|bench_eos|>"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb() -> float | None:
    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None


def bench_tokenizer(path: str):
    """SmolLM2's tokenizer whose EOS is a token the models cannot emit, so every response is full length (TRL is
    run with the same property: no stop token, min length = max length)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    vocab = len(tok)
    tok.add_special_tokens({"eos_token": BENCH_EOS})
    assert tok.eos_token_id >= vocab
    tok.pad_token = tok.convert_ids_to_tokens(0)
    return tok, vocab


def prompt_rows(tok, vocab: int, n: int, length: int, seed: int) -> tuple[list[str], list[list[int]]]:
    """n prompts of exactly `length` tokens: words that are one token each, joined by spaces, so the text
    encodes back to the same ids (our trainer takes text, TRL takes ids; both then see identical tokens)."""
    words = []
    for i in range(vocab):
        piece = tok.convert_ids_to_tokens(i)
        if piece.startswith("Ġ") and piece[1:].isalpha() and piece[1:].islower() and len(piece) > 3:
            if tok(" " + piece[1:], add_special_tokens=False)["input_ids"] == [i]:
                words.append(piece[1:])
        if len(words) >= 2000:
            break
    g = torch.Generator().manual_seed(seed)
    texts, rows = [], []
    for _ in range(n):
        pick = torch.randint(len(words), (length,), generator=g).tolist()
        text = "".join(" " + words[j] for j in pick)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == length, (len(ids), length)
        texts.append(text)
        rows.append(ids)
    return texts, rows


def build_models(arch: dict, vocab: int, seed: int, dtype: torch.dtype, device: str):
    """Policy and reference (same seed), critic and reward model (own seeds): what TRL's side builds too."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    config = LlamaConfig(vocab_size=vocab, max_position_embeddings=2048, pad_token_id=0, bos_token_id=None,
                         eos_token_id=None, **arch)

    def make(cls, s):
        torch.manual_seed(s)
        with torch.device(device):
            return cls._from_config(config, dtype=dtype)

    policy, reference = make(LlamaForCausalLM, seed), make(LlamaForCausalLM, seed)
    policy.generation_config.eos_token_id = None
    critic = ScalarHeadModel.from_backbone(make(LlamaModel, seed + 1)).to(device)
    reward = ScalarHeadModel.from_backbone(make(LlamaModel, seed + 2)).to(device)
    torch.nn.init.normal_(reward.head.weight, std=0.02)
    return policy, reference, critic, reward.eval().requires_grad_(False)


class RewardModelScore:
    """Sequence reward from a reward model's value at the last token (as TRL's reward model gives)."""

    def __init__(self, model: ScalarHeadModel, prompt_ids: dict[str, list[int]], device: str) -> None:
        self.model, self.prompt_ids, self.device = model, prompt_ids, device

    @torch.no_grad()
    def __call__(self, prompts, responses, ids):
        rows = [self.prompt_ids[p] + list(r) for p, r in zip(prompts, ids)]
        width = max(map(len, rows))
        batch = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(batch)
        for i, r in enumerate(rows):  # left padding: the last position is every row's last token
            batch[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        values = self.model(input_ids=batch.to(self.device), attention_mask=mask.to(self.device))
        return values[:, -1].float().tolist()


def run_tokencredit(arch, lever, tok, vocab, texts, rows, a, device, dtype) -> dict:
    """Time tokencredit PPO updates with one lever set."""
    free_memory()
    policy, reference, critic, reward = build_models(arch, vocab, a.seed, dtype, device)
    free_memory()  # peak counted from here: weights + optimiser state + activations, as on TRL's side
    cfg = PPOConfig(
        output_dir=str(Path(a.work_dir) / f"tc-{lever}"), seed=a.seed, num_updates=a.warmup + a.updates,
        batch_size=a.batch, mini_batch_size=a.batch, ppo_epochs=a.epochs, max_new_tokens=a.new_tokens,
        max_prompt_length=None, temperature=1.0, learning_rate=3e-6, kl_coef=0.05, progress=False,
        log_tensorboard=False, device=device,
        # TRL clips no gradients; neither do we here, so both do the same optimiser work.
        max_grad_norm=None, **LEVERS[lever],
    )
    trainer = PPOTrainer(cfg, policy=policy, tokenizer=tok, prompts=texts, reward_fn=RewardModelScore(
        reward, dict(zip(texts, rows)), device), critic=critic, reference=reference)
    times, phases = [], []
    for i in range(a.warmup + a.updates):
        sync()
        t0 = time.perf_counter()
        stats = trainer.step(trainer.batch_indices(i))
        sync()
        times.append(time.perf_counter() - t0)
        phases.append({k: stats[k] for k in ("time/rollout", "time/score", "time/update")})
        assert stats["response_length/mean"] == a.new_tokens, stats["response_length/mean"]
    timed = times[a.warmup:]
    mean = sum(timed) / len(timed)
    phase_means = {k: sum(p[k] for p in phases[a.warmup:]) / len(timed) for k in phases[0]}
    out = {"seconds_per_update": mean, "episodes_per_s": a.batch / mean, "tokens_per_s": a.batch * a.new_tokens / mean,
           "peak_memory_gb": peak_gb(), "updates_timed": len(timed), **phase_means,
           "graph_captures": trainer.decoder.graph_captures if trainer.decoder is not None else 0}
    del trainer, policy, reference, critic, reward
    return out


def run_trl(arch, tok, vocab, rows, a, device, dtype) -> dict:
    """TRL 1.12 PPOTrainer on the same shapes (see trl_ppo_baseline.py)."""
    try:
        import trl  # noqa: F401
    except ImportError:
        return {"skipped": "trl is not installed (carry trl 1.12.0 and datasets wheels, see benchmarks/README.md)"}
    free_memory()
    model_config = dict(vocab_size=vocab, max_position_embeddings=2048, pad_token_id=0, bos_token_id=None,
                        eos_token_id=None, **arch)
    return run_trl_ppo(model_config, tokenizer=tok, prompts=rows, batch_size=a.batch, prompt_len=a.prompt_len,
                       new_tokens=a.new_tokens, ppo_epochs=a.epochs, num_updates=a.updates,
                       warmup_updates=a.warmup, seed=a.seed, dtype=dtype, device=device,
                       output_dir=str(Path(a.work_dir) / "trl"))


@torch.no_grad()
def run_generation(arch, tok, vocab, a, device, dtype) -> dict:
    """New tokens/s: transformers generate vs tokencredit plain and static+graph decoding, per batch size."""
    free_memory()
    policy = build_models(arch, vocab, a.seed, dtype, device)[0].eval()
    out: dict = {}
    for batch in a.gen_batches:
        texts, rows = prompt_rows(tok, vocab, batch, a.prompt_len, a.seed + batch)
        ids = torch.tensor(rows, device=device)
        decoder = StaticKVDecoder(policy, cuda_graphs=True)
        row = {name: tokens_per_s(policy, tok, ids, name, decoder, a) for name in
               ("transformers_generate", "tokencredit_plain", "tokencredit_static_graph")}
        row["ratio_static_graph_vs_generate"] = row["tokencredit_static_graph"] / row["transformers_generate"]
        out[str(batch)] = row
    # Correctness on this device: the graph path's sampling log-probs against a full forward of the model.
    texts, rows = prompt_rows(tok, vocab, 16, a.prompt_len, a.seed)
    ids = torch.tensor(rows, device=device)
    gen = generate(policy, tok, prompt_ids=ids, prompt_mask=torch.ones_like(ids), max_new_tokens=a.new_tokens,
                   decoder=StaticKVDecoder(policy, cuda_graphs=True),
                   generator=torch.Generator(device).manual_seed(0))
    full = token_logprobs(response_logits(policy, torch.cat([ids, gen.response_ids], 1),
                                          torch.cat([torch.ones_like(ids), gen.response_mask], 1),
                                          gen.response_ids.size(1)), gen.response_ids)
    diff = (full - gen.logprobs).abs()
    out["logprob_check"] = {"dtype": str(dtype), "max_abs_diff": float(diff.max()),
                            "mean_abs_diff": float(diff.mean())}
    return out


def tokens_per_s(policy, tok, ids, name, decoder, a) -> float:
    """New tokens per second of one decoding path, after one warm-up call (which also captures graphs)."""
    mask = torch.ones_like(ids)

    def once():
        if name == "transformers_generate":
            return policy.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                   top_p=1.0, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                                   pad_token_id=0)
        return generate(policy, tok, prompt_ids=ids, prompt_mask=mask, max_new_tokens=a.new_tokens,
                        decoder=decoder if name == "tokencredit_static_graph" else None)

    once()
    sync()
    t0 = time.perf_counter()
    for _ in range(a.gen_repeats):
        once()
    sync()
    return ids.size(0) * a.new_tokens * a.gen_repeats / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setups", default="135m,1.1b")
    p.add_argument("--levers", default=",".join(LEVERS))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=48)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--updates", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gen-batches", default="64,256")
    p.add_argument("--gen-repeats", type=int, default=3)
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--tokenizer", default=str(SMOLLM2_TOKENIZER), help="folder with SmolLM2's tokenizer files")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, to check the script runs")
    p.add_argument("--work-dir", default="/tmp/tokencredit-gpu-bench")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_ppo_throughput.json"))
    a = p.parse_args()
    if a.smoke:
        a.setups, a.batch, a.prompt_len, a.new_tokens, a.epochs, a.updates, a.warmup = "tiny", 4, 8, 8, 1, 2, 1
        a.gen_batches, a.gen_repeats = "4", 1
    a.gen_batches = [int(b) for b in a.gen_batches.split(",")]
    if not torch.cuda.is_available() and not a.smoke:
        print("gpu_ppo_throughput: no CUDA GPU here; nothing measured (use --smoke to check the script on CPU)")
        return 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tok, vocab = bench_tokenizer(a.tokenizer)
    import transformers

    result: dict = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "dtype": str(dtype),
        "shapes": {"batch": a.batch, "prompt_tokens": a.prompt_len, "new_tokens": a.new_tokens,
                   "ppo_epochs": a.epochs, "mini_batches": 1, "updates_timed": a.updates, "warmup": a.warmup},
        "setups": {},
    }
    for setup in a.setups.split(","):
        arch = SETUPS[setup]
        texts, rows = prompt_rows(tok, vocab, a.batch, a.prompt_len, a.seed)
        entry: dict = {"arch": arch, "tokencredit": {}}
        for lever in a.levers.split(","):
            entry["tokencredit"][lever] = run_tokencredit(arch, lever, tok, vocab, texts, rows, a, device, dtype)
            print(setup, lever, json.dumps(entry["tokencredit"][lever]), flush=True)
        entry["trl"] = {"skipped": "--skip-trl"} if a.skip_trl else run_trl(arch, tok, vocab, rows, a, device, dtype)
        print(setup, "trl", json.dumps(entry["trl"]), flush=True)
        if "episodes_per_s" in entry["trl"]:
            trl_eps = entry["trl"]["episodes_per_s"]
            entry["ratio_episodes_per_s_vs_trl"] = {
                lever: r["episodes_per_s"] / trl_eps for lever, r in entry["tokencredit"].items()}
            if device == "cuda":
                entry["peak_memory_vs_trl"] = {
                    lever: r["peak_memory_gb"] / entry["trl"]["peak_memory_gb"]
                    for lever, r in entry["tokencredit"].items()}
        if setup in ("135m", "tiny"):
            entry["generation"] = run_generation(arch, tok, vocab, a, device, dtype)
            print(setup, "generation", json.dumps(entry["generation"]), flush=True)
        result["setups"][setup] = entry
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
