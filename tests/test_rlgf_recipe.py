"""The RLGF recipe end to end in fast mode: start and guide SFT -> each algorithm -> held-out evaluation."""

import pytest

import tokencredit.recipes.rlgf as rlgf
from tokencredit.cli import main
from tokencredit.recipes.rlgf import RLGFConfig, run_rlgf
from tokencredit.runs import read_metrics


def test_fast_recipe_runs_each_algorithm_from_the_same_start_and_resumes(tmp_path, monkeypatch):
    cfg = RLGFConfig(output=str(tmp_path / "rlgf"), fast=True, algorithms=["ppo", "ppo_pp", "d2lols"],
                     guide_beta=1.0)
    summary = run_rlgf(cfg)
    root = tmp_path / "rlgf"
    assert set(summary["policies"]) == {"start", "ppo", "ppo_pp", "d2lols"}
    assert all(len(summary["reward_curves"][a]) == 2 for a in ("ppo", "ppo_pp", "d2lols"))
    for name, metrics in summary["policies"].items():
        assert 0 <= metrics["reward_p_pos"] <= 1 and 0 <= metrics["heldout_p_pos"] <= 1, name
        assert metrics["perplexity"] > 1
    guided = read_metrics(root / "ppo_pp")
    assert all(m["guide/learner_token_frac"] < 1 for m in guided)  # the guide wrote part of every batch
    assert "guide/learner_token_frac" not in read_metrics(root / "ppo")[0]
    assert [m["guide/rollin_is_guide"] for m in read_metrics(root / "d2lols")] == [0.0, 1.0]  # switch at 2 // 2
    assert (root / "report.html").exists() and (root / "data" / "heldout_scorer.json").exists()

    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(rlgf, "_rl", refuse)
    monkeypatch.setattr(rlgf, "_sft", lambda cfg, model, tok, pairs, folder: str(folder / "merged"))
    again = run_rlgf(RLGFConfig(output=str(root), fast=True, algorithms=["ppo", "ppo_pp", "d2lols"], resume=True))
    assert again["reward_curves"] == summary["reward_curves"]


def test_bad_settings_are_refused_with_the_field_named(tmp_path, capsys):
    assert main(["rlgf", f"output={tmp_path / 'x'}"]) == 2
    assert "data=REVIEWS.jsonl" in capsys.readouterr().err
    with pytest.raises(ValueError, match="algorithms must be among"):
        RLGFConfig(fast=True, algorithms=["dagger"]).validate()
    with pytest.raises(ValueError, match="task must be 'imdb'"):
        RLGFConfig(fast=True, task="commongen").validate()
