import copy
import json
import os
import runpy
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from tokencredit.cli import main
from tokencredit.generation import generate
from tokencredit.rl.sft import (
    SFTConfig,
    SFTExample,
    SFTTrainer,
    collate_examples,
    evaluate_nll,
    lr_factor,
    response_nll,
    tokenize_examples,
)
from tokencredit.runs import RunFolderError, read_metrics
from tokencredit.testing import tiny_causal_lm, tiny_word_tokenizer

WORDS = "a b c d e f g h i j k l".split()
# A fixed toy mapping: two-word prompt -> two-word response, no pattern a model could guess without learning it.
PROMPTS = [f"{WORDS[i]} {WORDS[(i + 1) % 12]}" for i in range(8)]
RESPONSES = [f"{WORDS[(3 * i + 2) % 12]} {WORDS[(5 * i + 7) % 12]}" for i in range(8)]


def make(seed=0):
    tok = tiny_word_tokenizer(WORDS)
    model = tiny_causal_lm(len(tok), seed=seed, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return model, tok


def cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "run"), batch_size=8, max_steps=3, learning_rate=1e-2, progress=False,
                log_tensorboard=False, save_every=1000, mixed_precision="no")
    base.update(kw)
    return SFTConfig(**base)


def test_toy_mapping_is_learned_and_generated_greedily(tmp_path):
    model, tok = make()
    history = SFTTrainer(cfg(tmp_path, max_steps=50, warmup_steps=2, batch_size=4), policy=model, tokenizer=tok,
                         prompts=PROMPTS, responses=RESPONSES).train()
    assert len(history) == 50
    assert {"step", "loss", "lr", "epoch", "tokens"} <= set(history[0])
    assert history[0]["tokens"] == 4 * 3  # 4 examples x (2 words + EOS)
    assert history[1]["epoch"] == 1.0 and history[-1]["epoch"] == 25.0
    assert history[-1]["loss"] < 0.05 * history[0]["loss"], (history[0]["loss"], history[-1]["loss"])
    gen = generate(model, tok, PROMPTS, max_new_tokens=5, greedy=True)
    assert gen.texts == RESPONSES
    assert gen.finished.all(), "EOS is trained too, so every response stops by itself"
    assert read_metrics(tmp_path / "run") == history
    assert (tmp_path / "run" / "policy" / "config.json").exists()
    assert (tmp_path / "run" / "policy" / "tokenizer.json").exists()
    assert (tmp_path / "run" / "config.yaml").exists()


def test_lr_warmup_then_linear_decay():
    assert [lr_factor(k, 2, 6, "linear") for k in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert [lr_factor(k, 2, 6, "constant") for k in range(6)] == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert [lr_factor(k, 0, 4, "linear") for k in range(4)] == [1.0, 0.75, 0.5, 0.25]


def test_logged_lr_follows_the_schedule(tmp_path):
    model, tok = make()
    history = SFTTrainer(cfg(tmp_path, max_steps=6, warmup_steps=2, batch_size=4, learning_rate=0.1),
                         policy=model, tokenizer=tok, prompts=PROMPTS, responses=RESPONSES).train()
    assert [h["lr"] for h in history] == pytest.approx([0.05, 0.1, 0.1, 0.075, 0.05, 0.025])


def hand_nll(model, prompt_ids, response_ids):
    """Per-token NLL of the response by hand: one unpadded sequence, log-softmax, pick the next token."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    p = len(prompt_ids)
    return torch.stack([-logp[p - 1 + t, tok] for t, tok in enumerate(response_ids)])


def test_loss_counts_response_tokens_only_and_padding_changes_nothing():
    model, tok = make()
    prompts = ["a", "b c d e f g", "h i j"]
    responses = ["k l a b c", "d", ""]
    examples = tokenize_examples(tok, prompts, responses, max_length=64)
    assert examples[1] == SFTExample(tok("b c d e f g")["input_ids"], [tok.convert_tokens_to_ids("d"), 1])
    assert examples[2].response_ids == [tok.eos_token_id]  # an empty response still learns to stop

    batch = collate_examples(examples, tok.pad_token_id)
    assert batch.prompt_mask.sum(-1).tolist() == [1, 6, 3] and batch.response_mask.sum(-1).tolist() == [6, 2, 1]
    with torch.no_grad():
        nll = response_nll(model, batch)
    assert (nll[batch.response_mask == 0] == 0).all()
    total, count = 0.0, 0
    for i, e in enumerate(examples):
        expected = hand_nll(model, e.prompt_ids, e.response_ids)
        n = len(e.response_ids)
        # Row i is padded on both sides in the batch, yet scores exactly like the unpadded sequence.
        torch.testing.assert_close(nll[i, :n], expected, atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            alone = response_nll(model, collate_examples([e], tok.pad_token_id))[0]
        torch.testing.assert_close(alone, expected, atol=1e-5, rtol=1e-5)
        total, count = total + float(expected.sum()), count + n
    # evaluate_nll: the mean over all response tokens, whatever the batching.
    for bs in (1, 2, 3):
        assert evaluate_nll(model, tok, prompts, responses, batch_size=bs) == pytest.approx(total / count, rel=1e-5)


def test_prompts_are_cut_from_the_left_so_the_response_fits():
    _, tok = make()
    examples = tokenize_examples(tok, ["a b c d e f"], ["g h"], max_length=5)
    assert examples[0].prompt_ids == tok("e f")["input_ids"]
    assert len(examples[0].response_ids) == 3


def test_first_step_loss_is_evaluate_nll_and_accumulation_changes_nothing(tmp_path):
    results = []
    for accum in (1, 4):
        model, tok = make()
        start = evaluate_nll(copy.deepcopy(model), tok, PROMPTS, RESPONSES)
        history = SFTTrainer(cfg(tmp_path, output_dir=str(tmp_path / f"acc{accum}"), gradient_accumulation_steps=accum),
                             policy=model, tokenizer=tok, prompts=PROMPTS, responses=RESPONSES).train()
        assert history[0]["loss"] == pytest.approx(start, rel=1e-5)
        results.append((history, model.state_dict()))
    (h1, w1), (h4, w4) = results
    assert [h["loss"] for h in h1] == pytest.approx([h["loss"] for h in h4], rel=1e-4)
    for k in w1:
        torch.testing.assert_close(w1[k], w4[k], atol=1e-5, rtol=1e-4)


def test_lora_sft_changes_only_adapters(tmp_path):
    from peft import LoraConfig, get_peft_model

    model, tok = make()
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    policy = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    lora_before = {k: v.clone() for k, v in policy.state_dict().items() if "lora_" in k}
    history = SFTTrainer(cfg(tmp_path, max_steps=5), policy=policy, tokenizer=tok, prompts=PROMPTS,
                         responses=RESPONSES).train()
    assert history[-1]["loss"] < history[0]["loss"]
    after = policy.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in lora_before.items())
    base_after = policy.get_base_model().state_dict()
    for k, v in base_before.items():
        key = k
        for proj in ("q_proj", "v_proj"):
            key = key.replace(f"{proj}.weight", f"{proj}.base_layer.weight")
        assert torch.equal(base_after[key], v), k
    assert (tmp_path / "run" / "policy" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "run" / "policy" / "model.safetensors").exists()


def test_bad_inputs_raise_clear_errors(tmp_path):
    model, tok = make()
    with pytest.raises(ValueError, match="8 prompts but 7 responses"):
        SFTTrainer(cfg(tmp_path), model, tok, PROMPTS, RESPONSES[:-1])
    with pytest.raises(ValueError, match="no examples"):
        SFTTrainer(cfg(tmp_path), model, tok, [], [])
    long = list(RESPONSES)
    long[2] = "a b c d e f g h"
    with pytest.raises(ValueError, match=r"row 2: the response is 9 tokens long .* max_length=8"):
        SFTTrainer(cfg(tmp_path, max_length=8), model, tok, PROMPTS, long)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        cfg(tmp_path, batch_size=8, gradient_accumulation_steps=3).validate()


def test_a_second_run_into_the_folder_is_refused_unless_told_to_overwrite(tmp_path):
    model, tok = make()
    SFTTrainer(cfg(tmp_path, max_steps=3, save_every=1), model, tok, PROMPTS, RESPONSES).train()
    model, tok = make()
    with pytest.raises(RunFolderError, match="already holds a run"):
        SFTTrainer(cfg(tmp_path, max_steps=2, save_every=1), model, tok, PROMPTS, RESPONSES).train()
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3]  # untouched
    SFTTrainer(cfg(tmp_path, max_steps=2, save_every=1, overwrite=True), model, tok, PROMPTS, RESPONSES).train()
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*")) == ["step-00000001",
                                                                                          "step-00000002"]
    assert not [p for p in tmp_path.iterdir() if ".replaced-" in p.name]  # dropped after the first checkpoint


def test_resume_with_changed_settings_is_refused_naming_them(tmp_path):
    model, tok = make()
    SFTTrainer(cfg(tmp_path, max_steps=2, save_every=1), model, tok, PROMPTS, RESPONSES).train()
    with pytest.raises(RunFolderError, match=r"learning_rate: .* -> 0\.5"):
        SFTTrainer(cfg(tmp_path, max_steps=3, resume=True, learning_rate=0.5), model, tok, PROMPTS, RESPONSES).train()
    SFTTrainer(cfg(tmp_path, max_steps=3, resume=True), model, tok, PROMPTS, RESPONSES).train()  # longer is fine
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3]


RESUME_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from tokencredit.rl.sft import SFTConfig, SFTTrainer
    from tokencredit.testing import tiny_causal_lm, tiny_word_tokenizer

    def make_trainer(out, resume):
        words = "a b c d e f g h i j k l".split()
        tok = tiny_word_tokenizer(words)
        model = tiny_causal_lm(len(tok), seed=0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        for module in model.modules():  # dropout on, so the restored RNG state matters
            if hasattr(module, "attention_dropout"):
                module.attention_dropout = 0.2
        prompts = [f"{words[i]} {words[(i + 1) % 12]}" for i in range(10)]
        responses = [" ".join(words[(3 * i + 2) % 12 : (3 * i + 2) % 12 + 1 + i % 3]) for i in range(10)]
        cfg = SFTConfig(output_dir=str(out), batch_size=4, gradient_accumulation_steps=2, max_steps=7,
                        learning_rate=5e-3, warmup_steps=2, save_every=2, resume=resume, progress=False,
                        log_tensorboard=False, seed=3)
        return SFTTrainer(cfg, policy=model, tokenizer=tok, prompts=prompts, responses=responses)

    if __name__ == "__main__":
        trainer = make_trainer(sys.argv[1], resume=False)
        real_step, kill_at, calls = trainer.step, int(sys.argv[2]), [0]

        def step(indices):
            out = real_step(indices)
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # weights already updated in memory, nothing saved
            return out

        trainer.step = step
        trainer.train()
    """
)


def test_resume_after_kill_9_matches_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "run.py"
    script.write_text(RESUME_SCRIPT)
    make_trainer = runpy.run_path(str(script), run_name="setup")["make_trainer"]
    crashed = subprocess.run([sys.executable, str(script), str(tmp_path / "crashed"), "5"],
                             env={**os.environ, "PYTHONHASHSEED": "0"}, capture_output=True, text=True, timeout=300)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    assert [m["step"] for m in read_metrics(tmp_path / "crashed")] == [1, 2, 3, 4]  # step 4 was checkpointed

    straight = make_trainer(tmp_path / "straight", resume=False).train()
    resumed = make_trainer(tmp_path / "crashed", resume=True).train()
    assert [m["step"] for m in resumed] == list(range(1, 8))
    assert read_metrics(tmp_path / "crashed") == resumed
    for x, y in zip(straight, resumed):
        for key in ("loss", "lr", "epoch", "tokens", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), (x["step"], key)
    wa = load_file(tmp_path / "straight" / "policy" / "model.safetensors")
    wb = load_file(tmp_path / "crashed" / "policy" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)

    # Resuming a finished run trains nothing more but still leaves the final policy.
    again = make_trainer(tmp_path / "crashed", resume=True).train()
    assert again == resumed


@pytest.fixture
def cli_setup(tmp_path):
    model, tok = make()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "data.jsonl").write_text(
        "\n".join(json.dumps({"q": p, "a": r}) for p, r in zip(PROMPTS, RESPONSES)) + "\n"
    )
    config = {
        "model": str(tmp_path / "model"), "data": str(tmp_path / "data.jsonl"), "prompt_field": "q",
        "response_field": "a", "batch_size": 4, "num_epochs": 5, "save_every": 1, "log_tensorboard": False,
        "progress": False, "learning_rate": 1e-3, "output_dir": str(tmp_path / "run"),
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def test_cli_sft_runs_from_yaml_with_overrides(cli_setup, capsys):
    assert main(["sft", "--config", str(cli_setup / "run.yaml"), "max_steps=3", "lr_schedule=constant"]) == 0
    run = cli_setup / "run"
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["max_steps"] == 3 and saved["lr_schedule"] == "constant" and saved["response_field"] == "a"
    assert (run / "policy" / "model.safetensors").exists() and (run / "policy" / "tokenizer.json").exists()
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 3
    assert main(["sft", "--config", str(cli_setup / "run.yaml"), "max_steps=4", "max_examples=8",
                 "lr_schedule=constant", "resume=true"]) == 2  # other data: not the same run
    assert "max_examples: None -> 8" in capsys.readouterr().err
    assert main(["sft", "--config", str(cli_setup / "run.yaml"), "max_steps=4", "lr_schedule=constant",
                 "resume=true"]) == 0
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 4]


def test_cli_sft_errors_name_the_line(cli_setup, capsys):
    args = ["sft", "--config", str(cli_setup / "run.yaml")]
    (cli_setup / "bad.jsonl").write_text('{"q": "a", "a": "b"}\n{"q": "a", "a": 3}\n')
    assert main([*args, f"data={cli_setup / 'bad.jsonl'}"]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    (cli_setup / "broken.jsonl").write_text('{"q": "a", "a": "b"}\n\n{"q": "a",\n')
    assert main([*args, f"data={cli_setup / 'broken.jsonl'}"]) == 2
    assert "broken.jsonl:3" in capsys.readouterr().err
    assert main([*args, "data=null"]) == 2
    assert "needs data" in capsys.readouterr().err
    assert main([*args, "max_length=3"]) == 2
    assert "data.jsonl:1: the response" in capsys.readouterr().err
    assert main([*args, "learning_rat=1"]) == 2
    assert "learning_rate" in capsys.readouterr().err


def test_cli_sft_querygen_task_renders_sessions(cli_setup, tmp_path):
    sessions = tmp_path / "sessions.jsonl"
    sessions.write_text("\n".join(json.dumps({"history": [{"query": f"a {w}", "clicked": [f"b {w}"]}],
                                               "target_query": f"c {w}"}) for w in "abcdefgh") + "\n")
    args = ["sft", "--config", str(cli_setup / "run.yaml"), "task=querygen", f"data={sessions}", "max_steps=2"]
    assert main(args) == 0
    from tokencredit.commands.sft import SFTRunConfig, load_sft_data

    cfg = SFTRunConfig(task="querygen", data=str(sessions), max_examples=3)
    prompts, responses, _ = load_sft_data(cfg, tiny_word_tokenizer(["a"]))
    assert responses == ["c a", "c b", "c c"]
    assert prompts[1].endswith("1. a b\n   clicked: b b\nNext query:")  # no chat template: the plain form
    builtin_prompts, builtin_targets, _ = load_sft_data(SFTRunConfig(task="querygen", max_examples=2))
    assert len(builtin_prompts) == 2 and all(builtin_targets)
    assert main(["sft", "--config", str(cli_setup / "run.yaml"), "task=qg"]) == 2


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_lora_sft_learns_in_both_precisions_and_keeps_fp32_adapters(tmp_path, precision):
    from peft import LoraConfig, get_peft_model

    model, tok = make()
    policy = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    trainer = SFTTrainer(cfg(tmp_path, max_steps=20, learning_rate=3e-2, mixed_precision=precision), policy=policy,
                         tokenizer=tok,
                         prompts=PROMPTS, responses=RESPONSES)
    assert trainer.amp_dtype == (torch.bfloat16 if precision == "bf16" else None)
    history = trainer.train()
    assert history[-1]["loss"] < 0.9 * history[0]["loss"], (history[0]["loss"], history[-1]["loss"])
    # autocast computes in bf16; the weights themselves (adapters and the frozen base) keep their dtype
    assert all(p.dtype == torch.float32 for p in policy.parameters())


def test_sft_config_rejects_an_unknown_precision(tmp_path):
    with pytest.raises(ValueError, match="mixed_precision"):
        cfg(tmp_path, mixed_precision="fp16").validate()


def test_cli_lora_runs_with_the_same_seed_are_identical(cli_setup):
    from safetensors.torch import load_file

    args = ["sft", "--config", str(cli_setup / "run.yaml"), "max_steps=2", "lora={r: 4, alpha: 8}"]
    weights = []
    for run, seed in (("a", 3), ("b", 3), ("c", 4)):
        torch.rand(17)  # the global RNG stream differs before each run, as it would between processes
        assert main([*args, f"seed={seed}", f"output_dir={cli_setup / run}"]) == 0
        weights.append(load_file(cli_setup / run / "policy" / "adapter_model.safetensors"))
    assert weights[0].keys() == weights[2].keys() and weights[0]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    assert any(not torch.equal(weights[0][k], weights[2][k]) for k in weights[0] if "lora_A" in k)
