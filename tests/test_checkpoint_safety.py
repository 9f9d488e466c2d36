"""Checkpoints are read without running code, and a damaged newest one falls back to the one before."""

import logging
import random

import numpy as np
import pytest
import torch

from tokencredit import PPOConfig, PPOTrainer
from tokencredit.rl.sft import SFTConfig, SFTTrainer
from tokencredit.runs import (
    DamagedCheckpointError,
    MetricsLogger,
    UnsafeCheckpointError,
    capture_rng_state,
    load_trainer_state,
    read_metrics,
    restore_rng_state,
    save_trainer_state,
)
from tokencredit.testing import tiny_causal_lm, tiny_word_tokenizer

WORDS = "a b c d e f g h".split()
PROMPTS = [f"{WORDS[i]} {WORDS[(i + 1) % 8]}" for i in range(8)]
RESPONSES = [f"{WORDS[(3 * i + 2) % 8]} {WORDS[(5 * i + 7) % 8]}" for i in range(8)]


class Planted:
    """A pickle payload that would create a marker file if it were ever unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def make():
    tok = tiny_word_tokenizer(WORDS)
    model = tiny_causal_lm(len(tok), seed=0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return model, tok


def sft(tmp_path, **kw):
    model, tok = make()
    kw = {"keep_checkpoints": 3, **kw}
    cfg = SFTConfig(output_dir=str(tmp_path / "run"), batch_size=4, max_steps=4, save_every=1, learning_rate=1e-2,
                    progress=False, log_tensorboard=False, mixed_precision="no", **kw)
    return SFTTrainer(cfg, policy=model, tokenizer=tok, prompts=PROMPTS, responses=RESPONSES)


def ppo(tmp_path, **kw):
    model, tok = make()
    cfg = PPOConfig(output_dir=str(tmp_path / "run"), batch_size=4, mini_batch_size=4, num_updates=3, save_every=1,
                    max_new_tokens=4, progress=False, log_tensorboard=False, mixed_precision="no",
                    keep_checkpoints=3, **kw)
    return PPOTrainer(cfg, policy=model, tokenizer=tok, prompts=PROMPTS,
                      reward_fn=lambda p, r, ids: [float(len(x)) for x in r])


def test_rng_state_round_trips_through_the_weights_only_loader(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_trainer_state(tmp_path / "s.pt", {"rng": capture_rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(load_trainer_state(tmp_path / "s.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_a_planted_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "x": Planted(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match="refusing to load .*evil.pt.*GLOBAL"):
        load_trainer_state(tmp_path / "evil.pt")
    assert not marker.exists()


@pytest.mark.parametrize("trainer", [sft, ppo])
def test_resume_refuses_a_planted_checkpoint(tmp_path, trainer):
    trainer(tmp_path).train()
    ckpt = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1]
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    marker = tmp_path / "pwned"
    state["rng"] = Planted(str(marker))
    torch.save(state, ckpt / "trainer_state.pt")
    with pytest.raises(UnsafeCheckpointError, match="not unpickled"):
        trainer(tmp_path, resume=True).train()
    assert not marker.exists()
    assert ckpt.is_dir()  # refused, not set aside: someone changed the folder and the user must look


def nan_safetensors(path):
    """Overwrite every tensor byte of a safetensors file with float32 NaNs: same size, same header, loads fine."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    nan = b"\x00\x00\xc0\x7f"
    data[start:] = (nan * ((len(data) - start) // 4 + 1))[: len(data) - start]
    path.write_bytes(bytes(data))


def nan_optimizer_state(path):
    state = torch.load(path, weights_only=True)
    for param_state in state["optimizer"]["state"].values():
        param_state["exp_avg"].fill_(float("nan"))
    torch.save(state, path)


@pytest.mark.parametrize("damage", ["truncate_state", "truncate_weights", "delete_state", "garble_state",
                                    "nan_weights", "nan_optimizer"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, caplog, damage):
    sft(tmp_path).train()
    straight = read_metrics(tmp_path / "run")
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    newest = ckpts[-1]
    target = {"truncate_state": newest / "trainer_state.pt", "delete_state": newest / "trainer_state.pt",
              "garble_state": newest / "trainer_state.pt",
              "truncate_weights": newest / "policy" / "model.safetensors",
              "nan_weights": newest / "policy" / "model.safetensors",
              "nan_optimizer": newest / "trainer_state.pt"}[damage]
    if damage == "nan_weights":
        nan_safetensors(target)
    elif damage == "nan_optimizer":
        nan_optimizer_state(target)
    elif damage == "delete_state":
        target.unlink()
    elif damage == "garble_state":
        target.write_bytes(b"\x80\x02garbage" * 20)
    else:
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])

    with caplog.at_level(logging.WARNING, logger="tokencredit"):
        history = sft(tmp_path, resume=True).train()
    warnings = [r for r in caplog.records if "could not resume" in r.getMessage()]
    assert len(warnings) == 1 and newest.name in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()
    assert (tmp_path / "run" / "checkpoints" / f"damaged-{newest.name}").is_dir()
    # The redone last step matches the uninterrupted run: resuming from step 3 is exact.
    assert [m["step"] for m in history] == [1, 2, 3, 4]
    assert history[-1]["loss"] == pytest.approx(straight[-1]["loss"], rel=1e-5)
    assert read_metrics(tmp_path / "run") == history


def test_when_no_checkpoint_loads_resume_stops_with_a_clear_error(tmp_path):
    sft(tmp_path, keep_checkpoints=2).train()
    for ckpt in (tmp_path / "run" / "checkpoints").glob("step-*"):
        (ckpt / "trainer_state.pt").write_bytes(b"")
    with pytest.raises(DamagedCheckpointError, match="none of the 2 checkpoints .* resume=false"):
        sft(tmp_path, resume=True).train()


def test_unreadable_metrics_lines_are_reported_and_kept_aside(tmp_path, caplog):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(1, {"loss": 1.0})
        logger.log(2, {"loss": 0.5})
    path = tmp_path / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text(f"{lines[0]}\nnot json at all\n{lines[1]}\n{{\"no_step\": 1}}\n{{\"step\": 3, \"lo")
    with caplog.at_level(logging.WARNING, logger="tokencredit"):
        MetricsLogger(tmp_path, tensorboard=False).close()
    messages = [r.getMessage() for r in caplog.records]
    assert any("2 line(s) are not metrics records (line 2, 4)" in m for m in messages), messages
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    # Only the two bad lines go aside; the torn last line, which a crash leaves, is dropped quietly.
    assert (tmp_path / "metrics.jsonl.rejected").read_text() == "not json at all\n{\"no_step\": 1}\n"


def test_a_planted_pickle_in_a_model_folder_is_not_run(tmp_path):
    from tokencredit.models import load_policy

    model, _ = make()
    model.config.save_pretrained(tmp_path / "model")
    marker = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": Planted(str(marker))}, tmp_path / "model" / "pytorch_model.bin")
    with pytest.raises(Exception, match="(?i)weights.only|unsupported global|GLOBAL"):
        load_policy(tmp_path / "model")
    assert not marker.exists()
