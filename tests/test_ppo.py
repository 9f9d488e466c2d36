import copy
import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from tokencredit import PPOConfig, PPOTrainer
from tokencredit.generation import generate
from tokencredit.runs import read_metrics
from tokencredit.testing import tiny_causal_lm, tiny_word_tokenizer

WORDS = "a b c d e f g h i j k l".split()


def make(seed=0):
    tok = tiny_word_tokenizer(WORDS)
    model = tiny_causal_lm(len(tok), seed=seed, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return model, tok


PROMPTS = [" ".join(WORDS[i : i + 3]) for i in range(8)]


def count_a_per_token(tok):
    a = tok.convert_tokens_to_ids("a")
    return lambda prompts, responses, ids: [[1.0 if t == a else 0.0 for t in row] for row in ids]


def cfg(tmp_path, **kw):
    base = dict(batch_size=16, max_new_tokens=6, num_updates=2, learning_rate=3e-3, kl_coef=0.01, ppo_epochs=2,
                seed=0, output_dir=str(tmp_path / "run"), mini_batch_size=8, progress=False,
                log_tensorboard=False, save_every=100, mixed_precision="no")
    base.update(kw)
    return PPOConfig(**base)


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_token_level_reward_rises_on_toy_task(tmp_path, precision):
    model, tok = make()
    trainer = PPOTrainer(cfg(tmp_path, num_updates=10, ppo_epochs=4, mixed_precision=precision), policy=model,
                         tokenizer=tok,
                         prompts=PROMPTS, reward_fn=count_a_per_token(tok))
    history = trainer.train()
    assert len(history) == 10 and all("reward/mean" in h and "kl/mean" in h for h in history)
    first = sum(h["reward/mean"] for h in history[:3]) / 3
    last = sum(h["reward/mean"] for h in history[-3:]) / 3
    assert last > first + 1.5, (first, last)
    assert history[-1]["kl/mean"] > 0
    lines = read_metrics(tmp_path / "run")
    assert [line["step"] for line in lines] == list(range(1, 11))
    assert (tmp_path / "run" / "policy" / "config.json").exists()
    assert (tmp_path / "run" / "config.yaml").exists()


def test_sequence_reward_equals_per_token_reward_on_last_token(tmp_path):
    """A float per sequence is exactly a per-token list that is zero except on the last token."""
    a = None

    def seq_fn(prompts, responses, ids):
        return [float(sum(t == a for t in row)) for row in ids]

    def last_token_fn(prompts, responses, ids):
        return [[0.0] * (len(row) - 1) + [float(sum(t == a for t in row))] for row in ids]

    histories = []
    for fn, name in ((seq_fn, "s"), (last_token_fn, "t")):
        model, tok = make()
        a = tok.convert_tokens_to_ids("a")
        trainer = PPOTrainer(cfg(tmp_path, output_dir=str(tmp_path / name), num_updates=3), policy=model,
                             tokenizer=tok, prompts=PROMPTS, reward_fn=fn)
        histories.append(trainer.train())
    for h1, h2 in zip(*histories):
        for key in ("reward/mean", "kl/mean", "loss/policy", "loss/value"):
            assert h1[key] == pytest.approx(h2[key], rel=1e-5, abs=1e-6), key


def test_padding_is_masked_in_the_rollout_batch(tmp_path):
    model, tok = make()
    trainer = PPOTrainer(cfg(tmp_path, max_new_tokens=12), policy=model, tokenizer=tok, prompts=PROMPTS,
                         reward_fn=count_a_per_token(tok))
    idx = trainer.batch_indices(0)
    gen = generate(model, tok, [PROMPTS[i] for i in idx], max_new_tokens=12, generator=trainer.generator)
    assert (gen.response_mask.sum(-1) < 12).any(), "the tiny model should end some responses early"
    batch, _ = trainer.make_batch([PROMPTS[i] for i in idx], gen, torch.tensor(idx))
    pad = 1 - gen.response_mask.float()
    for name in ("logprobs", "ref_logprobs", "values", "scores", "rewards", "advantages", "returns"):
        assert float((getattr(batch, name) * pad).abs().sum()) == 0.0, name
    assert (gen.response_ids[pad.bool()] == tok.pad_token_id).all()


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda p, r, ids: [[1.0] * (len(x) + 1) for x in ids], r"row 0: per-token reward has \d+ values"),
        (lambda p, r, ids: ["nice"] * len(ids), "row 0: reward must be a float or a list"),
        (lambda p, r, ids: [1.0], r"1 entries for 16 responses"),
        (lambda p, r, ids: {"score": 1}, "one entry per response"),
    ],
)
def test_bad_reward_fn_outputs_raise_clear_errors(tmp_path, bad, message):
    model, tok = make()
    trainer = PPOTrainer(cfg(tmp_path), policy=model, tokenizer=tok, prompts=PROMPTS, reward_fn=bad)
    with pytest.raises(ValueError, match=message):
        trainer.train()


def test_non_finite_reward_skips_update_and_keeps_weights(tmp_path):
    model, tok = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def nan_fn(prompts, responses, ids):
        return [float("nan") if i == 3 else 1.0 for i in range(len(ids))]

    history = PPOTrainer(cfg(tmp_path), policy=model, tokenizer=tok, prompts=PROMPTS, reward_fn=nan_fn).train()
    assert all("rows [3]" in h["skipped"] for h in history)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    lines = read_metrics(tmp_path / "run")
    assert len(lines) == 2 and "skipped" in lines[0]


def test_non_finite_loss_never_reaches_the_weights(tmp_path, monkeypatch):
    model, tok = make()
    trainer = PPOTrainer(cfg(tmp_path, num_updates=1), policy=model, tokenizer=tok, prompts=PROMPTS,
                         reward_fn=count_a_per_token(tok))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real_loss = trainer._loss

    def poisoned(mb):
        loss, stats = real_loss(mb)
        return loss * float("inf"), stats

    monkeypatch.setattr(trainer, "_loss", poisoned)
    history = trainer.train()
    assert history[0]["optim/steps"] == 0
    assert history[0]["optim/skipped_nonfinite"] == 4  # 2 epochs x 2 mini-batches
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(len(s) == 0 for s in trainer.optimizer.state.values())


def test_weights_change_and_reference_stays_frozen(tmp_path):
    model, tok = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = PPOTrainer(cfg(tmp_path), policy=model, tokenizer=tok, prompts=PROMPTS,
                         reward_fn=count_a_per_token(tok))
    trainer.train()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) > 0
    for k, v in trainer.reference.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_lora_policy_uses_adapters_off_as_reference(tmp_path):
    from peft import LoraConfig, get_peft_model

    model, tok = make()
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    policy = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainer = PPOTrainer(cfg(tmp_path, num_updates=3, learning_rate=1e-2), policy=policy, tokenizer=tok,
                         prompts=PROMPTS, reward_fn=count_a_per_token(tok))
    assert trainer.reference is None
    history = trainer.train()
    assert history[-1]["kl/mean"] != 0.0
    base_after = policy.get_base_model().state_dict()
    for k, v in base_before.items():
        # Base weights are untouched; only lora_A/lora_B moved.
        key = k
        for proj in ("q_proj", "v_proj"):
            key = key.replace(f"{proj}.weight", f"{proj}.base_layer.weight")
        assert torch.equal(base_after[key], v), k
    assert (tmp_path / "run" / "policy" / "adapter_model.safetensors").exists()


def test_kl_as_loss_term_and_adaptive_controller(tmp_path):
    model, tok = make()
    history = PPOTrainer(
        cfg(tmp_path, kl_in_reward=False, adaptive_kl=True, kl_target=0.01, kl_horizon=16,
            num_updates=3, kl_coef=0.1),
        policy=model, tokenizer=tok, prompts=PROMPTS, reward_fn=count_a_per_token(tok),
    ).train()
    assert "loss/kl" in history[-1] and math.isfinite(history[-1]["loss/kl"])
    assert history[0]["kl/coef"] == pytest.approx(0.1)
    # Update 1 samples from pi == ref (KL 0 < target): beta drops by the full 20% (n_steps == horizon).
    assert history[0]["kl/mean"] == pytest.approx(0.0, abs=1e-6)
    assert history[1]["kl/coef"] == pytest.approx(0.08)
    # Update 2 sees KL far above the tiny target: beta grows by 20%.
    assert history[1]["kl/mean"] > 0.01 * 1.2
    assert history[2]["kl/coef"] == pytest.approx(0.096)


def test_target_nll_term_on_reference_responses(tmp_path):
    model, tok = make()
    refs = ["a a a"] * len(PROMPTS)
    history = PPOTrainer(cfg(tmp_path, target_coef=0.5, num_updates=2), policy=model, tokenizer=tok,
                         prompts=PROMPTS, reward_fn=count_a_per_token(tok), reference_responses=refs).train()
    assert all(math.isfinite(h["loss/target_nll"]) for h in history)
    with pytest.raises(ValueError, match="needs reference_responses"):
        PPOTrainer(cfg(tmp_path, target_coef=0.5), policy=model, tokenizer=tok, prompts=PROMPTS,
                   reward_fn=count_a_per_token(tok))


def test_config_validation_errors(tmp_path):
    with pytest.raises(ValueError, match="mini_batch_size"):
        cfg(tmp_path, batch_size=10, mini_batch_size=4).validate()
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        cfg(tmp_path, mini_batch_size=8, gradient_accumulation_steps=3).validate()
    model, tok = make()
    with pytest.raises(ValueError, match="prompts"):
        PPOTrainer(cfg(tmp_path), policy=model, tokenizer=tok, prompts="one string", reward_fn=lambda *a: [])


def test_gradient_accumulation_runs_expected_optimizer_steps(tmp_path):
    model, tok = make()
    history = PPOTrainer(cfg(tmp_path, num_updates=1, ppo_epochs=3, mini_batch_size=4, gradient_accumulation_steps=2),
                         policy=model, tokenizer=tok, prompts=PROMPTS, reward_fn=count_a_per_token(tok)).train()
    assert history[0]["optim/steps"] == 3 * 4


def test_early_stop_on_approx_kl(tmp_path):
    model, tok = make()
    history = PPOTrainer(cfg(tmp_path, num_updates=2, ppo_epochs=8, learning_rate=5e-2, target_kl=1e-6),
                         policy=model, tokenizer=tok, prompts=PROMPTS, reward_fn=count_a_per_token(tok)).train()
    assert any(h["optim/early_stopped"] for h in history)
    assert min(h["optim/steps"] for h in history) < 8 * 2


RESUME_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from tokencredit import PPOConfig, PPOTrainer
    from tokencredit.testing import tiny_causal_lm, tiny_word_tokenizer
    WORDS = "a b c d e f g h i j k l".split()
    tok = tiny_word_tokenizer(WORDS)
    model = tiny_causal_lm(len(tok), seed=0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    a = tok.convert_tokens_to_ids("a")
    calls = {"n": 0}
    kill_at = int(sys.argv[2])
    def fn(prompts, responses, ids):
        calls["n"] += 1
        if calls["n"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # a crash in the middle of an update, no clean-up
        return [[1.0 if t == a else 0.0 for t in row] for row in ids]
    prompts = [" ".join(WORDS[i : i + 3]) for i in range(8)]
    cfg = PPOConfig(batch_size=16, max_new_tokens=6, num_updates=6, learning_rate=3e-3, kl_coef=0.01,
                    ppo_epochs=2, seed=0, output_dir=sys.argv[1], mini_batch_size=8, progress=False,
                    log_tensorboard=False, save_every=2, resume=sys.argv[3] == "1")
    PPOTrainer(cfg, policy=model, tokenizer=tok, prompts=prompts, reward_fn=fn).train()
    """
)


def test_resume_after_kill_9_matches_uninterrupted_run(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(RESUME_SCRIPT)
    env = {**os.environ, "PYTHONHASHSEED": "0"}

    def run(out, kill_at, resume):
        return subprocess.run([sys.executable, str(script), str(out), str(kill_at), resume], env=env,
                              capture_output=True, text=True, timeout=300)

    straight = run(tmp_path / "straight", 0, "0")
    assert straight.returncode == 0, straight.stderr[-2000:]
    crashed = run(tmp_path / "crashed", 5, "0")  # killed inside update 5; update 4 was checkpointed
    assert crashed.returncode == -signal.SIGKILL
    assert [m["step"] for m in read_metrics(tmp_path / "crashed")] == [1, 2, 3, 4]
    resumed = run(tmp_path / "crashed", 0, "1")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "crashed")
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        for key in ("reward/mean", "kl/mean", "loss/policy", "loss/value", "kl/coef"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), (x["step"], key)
    from safetensors.torch import load_file

    wa = load_file(tmp_path / "straight" / "policy" / "model.safetensors")
    wb = load_file(tmp_path / "crashed" / "policy" / "model.safetensors")
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_reused_sampling_logprobs_match_recomputed_ones(tmp_path, temperature):
    """The fast path (sampler's log-probs as old log-probs) gives the same batch and update as the plain path."""
    histories, batches = [], []
    for reuse in (False, True):
        model, tok = make()
        trainer = PPOTrainer(cfg(tmp_path, output_dir=str(tmp_path / str(reuse)), num_updates=2,
                                 reuse_sampling_logprobs=reuse, temperature=temperature),
                             policy=model, tokenizer=tok, prompts=PROMPTS, reward_fn=count_a_per_token(tok))
        idx = trainer.batch_indices(0)
        gen = generate(model, tok, [PROMPTS[i] for i in idx], max_new_tokens=6, temperature=temperature,
                       generator=torch.Generator().manual_seed(1))
        batches.append(trainer.make_batch([PROMPTS[i] for i in idx], gen, torch.tensor(idx))[0])
        histories.append(trainer.train())
    torch.testing.assert_close(batches[1].logprobs, batches[0].logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batches[1].advantages, batches[0].advantages, atol=1e-4, rtol=1e-4)
    for h_plain, h_fast in zip(*histories):
        for key in ("reward/mean", "kl/mean", "loss/policy", "loss/value"):
            assert h_fast[key] == pytest.approx(h_plain[key], rel=1e-4, abs=1e-5), key


def test_reused_sampling_logprobs_refuse_filtered_sampling(tmp_path):
    model, tok = make()
    with pytest.raises(ValueError, match="top_k=0"):
        PPOTrainer(cfg(tmp_path, reuse_sampling_logprobs=True, top_k=5), policy=model, tokenizer=tok,
                   prompts=PROMPTS, reward_fn=count_a_per_token(tok))
    with pytest.raises(ValueError, match="logits_processors"):
        PPOTrainer(cfg(tmp_path, reuse_sampling_logprobs=True), policy=model, tokenizer=tok, prompts=PROMPTS,
                   reward_fn=count_a_per_token(tok), logits_processors=[lambda seq, scores: scores])


def test_static_rollout_backend_gives_the_same_run_as_the_plain_one(tmp_path):
    """The fast path (static KV cache decoder) and the plain path: same samples, log-probs, losses, weights."""
    histories, policies = [], []
    for backend in ("plain", "static"):
        model, tok = make()
        trainer = PPOTrainer(cfg(tmp_path, output_dir=str(tmp_path / backend), num_updates=3, temperature=0.8,
                                 rollout_backend=backend),
                             policy=model, tokenizer=tok, prompts=PROMPTS, reward_fn=count_a_per_token(tok))
        assert (trainer.decoder is not None) == (backend == "static")
        histories.append(trainer.train())
        policies.append(model)
    for h_plain, h_fast in zip(*histories):
        for key in ("reward/mean", "kl/mean", "response_length/mean", "loss/policy", "loss/value", "loss/total",
                    "policy/entropy", "policy/approx_kl", "grad_norm"):
            assert h_fast[key] == pytest.approx(h_plain[key], rel=1e-4, abs=1e-5), key
    for (name, a), b in zip(policies[0].named_parameters(), policies[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def test_rollout_backend_is_validated(tmp_path):
    model, tok = make()
    with pytest.raises(ValueError, match="rollout_backend"):
        PPOTrainer(cfg(tmp_path, rollout_backend="fast"), policy=model, tokenizer=tok, prompts=PROMPTS,
                   reward_fn=count_a_per_token(tok))
    with pytest.raises(ValueError, match="vllm"):
        PPOTrainer(cfg(tmp_path, rollout_backend="vllm", reuse_sampling_logprobs=True), policy=model,
                   tokenizer=tok, prompts=PROMPTS, reward_fn=count_a_per_token(tok))


def test_vllm_backend_gets_the_model_folder_once_and_weights_after_each_update(tmp_path, monkeypatch):
    """The trainer's side of the vLLM backend, with a stand-in engine that samples with the plain path."""
    import tokencredit.vllm_rollout as vr

    calls = {"init": [], "sync": 0, "generate": 0}

    class FakeEngine:
        def __init__(self, model_path, tokenizer, **kw):
            calls["init"].append(model_path)
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(model_path)
            self.tokenizer = tokenizer

        def sync_weights(self, policy):
            calls["sync"] += 1
            self.model.load_state_dict(dict(vr.policy_weights(policy)))

        def generate(self, prompts, *, eos_ids, **kw):
            calls["generate"] += 1
            kw.pop("stop_strings")
            return generate(self.model, self.tokenizer, prompts, **kw)

    monkeypatch.setattr(vr, "VLLMRollout", FakeEngine)
    model, tok = make()
    trainer = PPOTrainer(cfg(tmp_path, num_updates=3, rollout_backend="vllm"), policy=model, tokenizer=tok,
                         prompts=PROMPTS, reward_fn=count_a_per_token(tok))
    trainer.train()
    assert calls == {"init": [str(tmp_path / "run" / "vllm_model")], "sync": 2, "generate": 3}
    # after the last sync the engine holds the weights the policy had before the last update
    assert not torch.equal(trainer._vllm.model.lm_head.weight, make()[0].lm_head.weight)


def _run(tmp_path, name, **kw):
    model, tok = make()
    trainer = PPOTrainer(cfg(tmp_path, output_dir=str(tmp_path / name), **kw), policy=model, tokenizer=tok,
                         prompts=PROMPTS, reward_fn=count_a_per_token(tok))
    return trainer, trainer.train()


def _assert_same_runs(a, b, keys=("reward/mean", "kl/mean", "loss/policy", "loss/value", "policy/approx_kl",
                                  "grad_norm")):
    (ta, ha), (tb, hb) = a, b
    for x, y in zip(ha, hb):
        for key in keys:
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-5), key
    for (name, p), q in zip(ta.policy.named_parameters(), tb.policy.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)


def test_first_epoch_forward_reuse_gives_the_same_run(tmp_path):
    """Old log-probs and values read off the first epoch's forward pass: the same run, two passes fewer."""
    kw = dict(num_updates=3, mini_batch_size=16, ppo_epochs=2, temperature=0.8)
    fused = _run(tmp_path, "fused", reuse_first_epoch_forward=True, **kw)
    plain = _run(tmp_path, "plain", reuse_first_epoch_forward=False, **kw)
    assert fused[0].config.fuses_first_epoch() and not plain[0].config.fuses_first_epoch()
    assert all("time/first_forward" in h and "time/values" not in h for h in fused[1])
    assert all("time/values" in h and "time/first_forward" not in h for h in plain[1])
    _assert_same_runs(plain, fused)
    # Only when one optimiser step covers the whole batch; with mini-batches the flag changes nothing.
    assert not cfg(tmp_path, mini_batch_size=8).fuses_first_epoch()
    assert not cfg(tmp_path, mini_batch_size=16, gradient_accumulation_steps=2).fuses_first_epoch()


def test_fused_adamw_gives_the_same_run(tmp_path):
    fused = _run(tmp_path, "fused", fused_optimizer=True)
    plain = _run(tmp_path, "plain", fused_optimizer=False)
    assert fused[0].optimizer.defaults.get("fused") and not plain[0].optimizer.defaults.get("fused")
    _assert_same_runs(plain, fused)


def test_bf16_mixed_precision_keeps_fp32_masters_and_fp32_statistics(tmp_path):
    from peft import LoraConfig, get_peft_model

    model, tok = make()
    policy = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainer = PPOTrainer(cfg(tmp_path, mixed_precision="bf16", mini_batch_size=16), policy=policy, tokenizer=tok,
                         prompts=PROMPTS, reward_fn=count_a_per_token(tok))
    assert trainer.amp_dtype == torch.bfloat16
    trained = [p for p in policy.parameters() if p.requires_grad]
    frozen = [p for p in policy.parameters() if not p.requires_grad]
    assert trained and frozen
    assert all(p.dtype == torch.float32 for p in trained), "trainable weights are the fp32 masters"
    assert all(p.dtype == torch.bfloat16 for p in frozen), "frozen weights are stored in bf16"
    history = trainer.train()
    assert all(math.isfinite(h["loss/total"]) and h["optim/steps"] == 2 for h in history)
    for state in trainer.optimizer.state.values():
        assert state["exp_avg"].dtype == torch.float32
    idx = trainer.batch_indices(0)
    prompts = [PROMPTS[i] for i in idx]
    batch, _ = trainer.make_batch(prompts, trainer.rollout(prompts), torch.tensor(idx))
    for name in ("logprobs", "ref_logprobs", "values", "advantages", "returns"):
        assert getattr(batch, name).dtype == torch.float32, name
    # The first step's ratio is exactly 1 in bf16 too: old log-probs and the loss come from one forward pass.
    trainer.config.ppo_epochs = 1
    stats = trainer.optimize(batch)
    assert stats["policy/approx_kl"] == 0.0 and stats["policy/clipfrac"] == 0.0


def test_mixed_precision_auto_follows_the_hardware(tmp_path, monkeypatch):
    from tokencredit import precision

    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    assert precision.resolve_mixed_precision("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    assert precision.resolve_mixed_precision("auto", "cpu") is None
    assert precision.resolve_mixed_precision("bf16", "cpu") == torch.bfloat16
    assert precision.resolve_mixed_precision("no", "cpu") is None
    with pytest.raises(ValueError, match="mixed_precision"):
        cfg(tmp_path, mixed_precision="fp8").validate()


def test_first_epoch_forward_is_used_only_for_the_batch_it_was_computed_for(tmp_path):
    model, tok = make()
    trainer = PPOTrainer(cfg(tmp_path, mini_batch_size=16, ppo_epochs=1), policy=model, tokenizer=tok,
                         prompts=PROMPTS, reward_fn=count_a_per_token(tok))
    calls = []
    trainer.policy.register_forward_hook(lambda *args: calls.append(torch.is_grad_enabled()))
    batches = []
    for update in range(2):
        idx = trainer.batch_indices(update)
        prompts = [PROMPTS[i] for i in idx]
        batches.append(trainer.make_batch(prompts, trainer.rollout(prompts), torch.tensor(idx))[0])
    calls.clear()
    trainer.optimize(batches[0])  # the pending forward belongs to batches[1]: recompute
    assert calls == [True]
    idx = trainer.batch_indices(2)
    prompts = [PROMPTS[i] for i in idx]
    batch = trainer.make_batch(prompts, trainer.rollout(prompts), torch.tensor(idx))[0]
    calls.clear()
    trainer.optimize(batch)  # its own pending forward: no new policy pass
    assert calls == []


def test_shared_critic_learns_and_resumes_like_an_uninterrupted_run(tmp_path):
    """The value head on the policy's trunk: rewards rise, values are learned, and a resumed run is the same run."""
    kw = dict(num_updates=8, ppo_epochs=4, shared_critic=True, mini_batch_size=16, save_every=4)
    trainer, history = _run(tmp_path, "shared", **kw)
    assert not any(isinstance(m, type(trainer.policy)) for m in trainer.critic.modules()), "no second backbone"
    assert sum(h["reward/mean"] for h in history[-3:]) > sum(h["reward/mean"] for h in history[:3]) + 1.5
    assert abs(history[-1]["values/mean"]) > 1e-3
    model, tok = make()
    with pytest.raises(ValueError, match="shared_critic"):
        PPOTrainer(cfg(tmp_path, shared_critic=True), policy=model, tokenizer=tok, prompts=PROMPTS,
                   reward_fn=count_a_per_token(tok), critic=copy.deepcopy(trainer.critic))
    # the same run cut after 4 updates and resumed from its checkpoint
    part, _ = _run(tmp_path, "cut", **{**kw, "num_updates": 4})
    model, tok = make()
    resumed = PPOTrainer(cfg(tmp_path, output_dir=str(tmp_path / "cut"), resume=True, **kw), policy=model,
                         tokenizer=tok, prompts=PROMPTS, reward_fn=count_a_per_token(tok))
    resumed.train()
    torch.testing.assert_close(resumed.critic.head.weight, trainer.critic.head.weight, atol=1e-5, rtol=1e-4)
    for (name, p), q in zip(trainer.policy.named_parameters(), resumed.policy.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)


def test_shared_critic_without_the_first_epoch_forward_scores_values_from_the_policy(tmp_path):
    kw = dict(num_updates=2, shared_critic=True, mini_batch_size=16)
    fused = _run(tmp_path, "fused", **kw)
    plain = _run(tmp_path, "plain", reuse_first_epoch_forward=False, **kw)
    _assert_same_runs(plain, fused, keys=("reward/mean", "kl/mean", "loss/policy", "loss/value", "values/mean"))


def test_static_decoder_and_shared_critic_run_under_bf16(tmp_path):
    trainer, history = _run(tmp_path, "static-bf16", num_updates=2, mixed_precision="bf16", rollout_backend="static",
                            shared_critic=True, mini_batch_size=16)
    assert trainer.amp_dtype == torch.bfloat16
    assert all(math.isfinite(h["loss/total"]) and h["optim/steps"] == 2 for h in history)


def test_prompt_plus_new_tokens_beyond_the_positions_is_refused_naming_the_prompt(tmp_path):
    model, tok = make()
    long_prompts = [*PROMPTS, " ".join(["a"] * 500)]
    reward = count_a_per_token(tok)
    with pytest.raises(ValueError, match="prompt 8 is 50[0-9] tokens .* 512 positions"):
        PPOTrainer(cfg(tmp_path, max_new_tokens=20, max_prompt_length=None), model, tok, long_prompts, reward)
    # Cut to max_prompt_length, the same prompts fit.
    PPOTrainer(cfg(tmp_path, max_new_tokens=20, max_prompt_length=64), model, tok, long_prompts, reward)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_an_explicit_kl_estimator_with_kl_as_a_loss_is_refused(tmp_path, estimator):
    with pytest.raises(ValueError, match="kl_estimator=.* with kl_in_reward=false.*KL\\(pi\\|\\|ref\\)"):
        cfg(tmp_path, kl_in_reward=False, kl_estimator=estimator).validate()
    cfg(tmp_path, kl_in_reward=True, kl_estimator=estimator).validate()
