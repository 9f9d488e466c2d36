"""Online RLAIF (the demo's relabel_every): PPO's before_update hook swaps rewards by update index, and the
demo's rounds label the policy's own samples, refit the reward model and survive a crash."""

import json

import pytest
import torch

from tokencredit import PPOConfig, PPOTrainer
from tokencredit.recipes import tppo
from tokencredit.recipes.tppo import DemoConfig, run_demo
from tokencredit.runs import read_metrics
from tokencredit.testing import tiny_causal_lm, tiny_word_tokenizer


def _trainer(folder, num_updates, resume=False):
    tok = tiny_word_tokenizer(["a", "b", "c", "d"])
    torch.manual_seed(0)
    model = tiny_causal_lm(len(tok), seed=0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = PPOConfig(output_dir=str(folder), batch_size=2, num_updates=num_updates, max_new_tokens=2,
                       save_every=2, progress=False, log_tensorboard=False, mixed_precision="no", resume=resume)
    return PPOTrainer(config, model, tok, ["a b", "c d"], lambda p, r, ids: [1.0] * len(p))


def _switch_at(update, calls, fail_once=None):
    """A hook that gives reward 5 from update ``update`` on, derived from update_idx alone."""

    def hook(trainer):
        calls.append(trainer.update_idx)
        if fail_once is not None and trainer.update_idx == fail_once[0]:
            fail_once.pop()
            raise RuntimeError("refit crashed")
        value = 5.0 if trainer.update_idx >= update else 1.0
        trainer.reward_fn = lambda p, r, ids, v=value: [v] * len(p)

    return hook


def test_before_update_runs_before_every_update_and_its_reward_is_used(tmp_path):
    calls = []
    _trainer(tmp_path / "run", 4).train(before_update=_switch_at(2, calls))
    assert calls == [0, 1, 2, 3]
    assert [m["reward/mean"] for m in read_metrics(tmp_path / "run")] == [1.0, 1.0, 5.0, 5.0]


def test_a_run_that_crashed_in_the_hook_resumes_with_the_same_rewards(tmp_path):
    calls = []
    with pytest.raises(RuntimeError, match="refit crashed"):
        _trainer(tmp_path / "run", 4).train(before_update=_switch_at(2, calls, fail_once=[2]))
    assert calls == [0, 1, 2]  # the checkpoint at update 2 is on disk
    calls.clear()
    _trainer(tmp_path / "run", 4, resume=True).train(before_update=_switch_at(2, calls))
    assert calls == [2, 3]  # called again right after the resume, before the first resumed update
    assert [m["reward/mean"] for m in read_metrics(tmp_path / "run")] == [1.0, 1.0, 5.0, 5.0]


@pytest.mark.parametrize("value", [0, 2, 3, -1])
def test_relabel_every_must_leave_a_refit_before_the_last_update(value):
    with pytest.raises(ValueError, match="relabel_every must be in"):
        DemoConfig(fast=True, ppo_updates=2, relabel_every=value).validate()


def test_demo_rounds_label_the_policys_samples_refit_and_resume_after_a_crash(tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = dict(output=str(out), fast=True, relabel_every=1, ppo_updates=3, policies=["sft", "tppo"],
               label_prompts=8)
    real_fit = tppo._fit_token_rm
    crashed = []

    def fit_once_crashing(cfg_, start, records, folder, *args):
        if "round2" in str(folder) and not crashed:
            crashed.append(folder)
            raise RuntimeError("killed during round 2's refit")
        return real_fit(cfg_, start, records, folder, *args)

    real_reward_fn = tppo._policy_reward_fn
    used = []  # per reward function made: how many PPO updates it scored

    def counted_reward_fn(*args):
        fn, slot = real_reward_fn(*args), len(used)
        used.append(0)

        def scored(*call):
            used[slot] += 1
            return fn(*call)

        return scored

    monkeypatch.setattr(tppo, "_fit_token_rm", fit_once_crashing)
    monkeypatch.setattr(tppo, "_policy_reward_fn", counted_reward_fn)
    with pytest.raises(RuntimeError, match="round 2"):
        run_demo(DemoConfig(**cfg))
    assert used == [1, 1]  # the offline reward for update 1, round 1's for update 2
    used.clear()
    rounds = out / "tppo" / "reward_rounds"
    assert (rounds / "round1" / "done.json").exists() and not (rounds / "round2" / "done.json").exists()
    round1_labels = (rounds / "round1" / "labels.jsonl").read_text()
    summary = run_demo(DemoConfig(**cfg, resume=True))

    assert (rounds / "round1" / "labels.jsonl").read_text() == round1_labels  # a finished round is not redone
    assert used == [0, 1]  # resumed at update 2's checkpoint: round 2's reward scores update 3
    assert [m["step"] for m in read_metrics(out / "tppo")] == [1, 2, 3]
    info = summary["reward_rounds"]["tppo"]
    assert [r["round"] for r in info] == [1, 2]
    for r in info:
        # Fresh samples of the PPO policy on label_prompts prompts (2 each), refitted with as many replayed labels.
        assert r["labels"]["records"] + r["labels"]["skipped_no_labels"] == 16
        assert r["replayed"] == r["labels"]["records"] and r["examples"] > 0
        assert isinstance(r["mean_label_sum"], float)
    records = [json.loads(line) for line in (rounds / "round2" / "labels.jsonl").read_text().splitlines()]
    assert {"prompt", "response", "spans", "finished", "end_label"} <= set(records[0])
    # Each round fits from the one before: the three reward models differ.
    from safetensors.torch import load_file

    heads = [load_file(folder / "scalar_head.safetensors") for folder in (
        out / "reward_model" / "model", rounds / "round1" / "reward_model" / "model",
        rounds / "round2" / "reward_model" / "model")]
    weights = [next(iter(h.values())) for h in heads]
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])
