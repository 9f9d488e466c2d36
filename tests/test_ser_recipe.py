"""The SER recipe end to end in fast mode: evolve -> PPO on the evolved RM and on the seed RM -> evaluation."""

import json

import pytest
from safetensors.torch import load_file

import tokencredit.rewards.evolve as evolve_module
from tokencredit.cli import main
from tokencredit.recipes.ser import SERRecipeConfig, run_ser


def test_fast_recipe_runs_end_to_end_and_resumes_without_redoing_stages(tmp_path, monkeypatch):
    summary = run_ser(SERRecipeConfig(output=str(tmp_path / "ser"), fast=True))
    root = tmp_path / "ser"
    assert set(summary["policies"]) == {"start", "ppo_seed", "ppo_ser"}
    assert 0.5 < summary["evolve"]["full_label_accuracy"] <= 1.0  # the reference learnt the toy preference
    # The judge trained on other prompts' pairs than the SER arms, and neither on the test prompts'.
    def prompts(name):
        return {json.loads(line)["prompt"] for line in (root / name).read_text().splitlines()}

    judge_prompts, ser_prompts = prompts("judge_pairs.jsonl"), prompts("ser_pairs.jsonl")
    assert judge_prompts and ser_prompts and not judge_prompts & ser_prompts
    test_prompts = {ex["prompt"] for ex in summary["policies"]["start"]["examples"]}
    assert not test_prompts & (judge_prompts | ser_prompts)
    assert summary["scorer"] == str(root / "judge" / "model") and summary["judge"]["pairs"] > 0
    assert summary["evolve"]["chosen_on"] == "validation pairs"
    for policy in summary["policies"].values():
        assert 0 < policy["scorer_mean_sigma"] < 1 and policy["examples"]
    seed_rm = json.loads((root / "ppo_seed" / "done.json").read_text())["reward_model"]
    ser_rm = json.loads((root / "ppo_ser" / "done.json").read_text())["reward_model"]
    assert seed_rm.endswith("loop-0/model")
    assert ser_rm == json.loads((root / "evolve" / "done.json").read_text())["best_model"]
    # Both arms trained their adapters from the same start: LoRA B starts at zero, so any change is training.
    for arm in ("ppo_seed", "ppo_ser"):
        weights = load_file(root / arm / "policy" / "adapter_model.safetensors")
        assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k), arm
    assert (root / "report.html").exists() and json.loads((root / "summary.json").read_text()) == summary

    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(evolve_module, "run_evolve", refuse)
    monkeypatch.setattr("tokencredit.recipes.ser._ppo", refuse)
    monkeypatch.setattr("tokencredit.recipes.ser._train_judge", refuse)
    again = run_ser(SERRecipeConfig(output=str(tmp_path / "ser"), fast=True, resume=True))
    assert again["evolve"] == summary["evolve"]


def test_the_command_needs_data_and_names_the_field(tmp_path, capsys):
    assert main(["ser", f"output={tmp_path / 'x'}"]) == 2
    assert "data=PAIRS.jsonl" in capsys.readouterr().err
    with pytest.raises(ValueError, match="test_prompts"):
        SERRecipeConfig(data="x.jsonl", test_prompts=0).validate()
    with pytest.raises(ValueError, match="judge_fraction"):
        SERRecipeConfig(data="x.jsonl", judge_fraction=1.0).validate()
