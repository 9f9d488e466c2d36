"""The PGG recipe end to end in fast mode: few-shot prompts and summarisation, arms, resume, bad settings."""

import json

import pytest

import tokencredit.recipes.pgg as pgg
from tokencredit.cli import main
from tokencredit.recipes.pgg import PGGRecipeConfig, run_pgg
from tokencredit.runs import read_metrics


def test_fast_fewshot_trains_each_arm_and_picks_prompts_on_dev(tmp_path, monkeypatch):
    cfg = PGGRecipeConfig(output=str(tmp_path / "fs"), task="fewshot", fast=True, aggregators=["avg", "sum"])
    summary = run_pgg(cfg)
    root = tmp_path / "fs"
    assert set(summary["results"]) == {"hand-written", "no prompt", "pgg-avg", "pgg-sum", "sequence"}
    for arm in ("pgg-avg", "pgg-sum", "sequence"):
        result = summary["results"][arm]
        assert 0 <= result["test_accuracy"] <= 1 and result["candidates"]
        # The kept prompt is the best candidate on dev.
        assert result["dev_accuracy"] == max(c["dev_accuracy"] for c in result["candidates"])
        # The policy's mean over every distinct candidate, which the best-on-dev pick can only beat or equal.
        every = json.loads((root / arm / "done.json").read_text())["candidates"]
        assert result["candidates_seen"] == len(every) >= len(result["candidates"])
        assert result["candidates_dev_mean"] == pytest.approx(sum(c["dev_accuracy"] for c in every) / len(every))
        assert result["candidates_dev_mean"] <= result["dev_accuracy"]
        assert len(summary["score_curves"][arm]) == 3
    assert "ground/index" in read_metrics(root / "pgg-avg")[0]
    assert "ground/index" not in read_metrics(root / "sequence")[0]  # the baseline has no reward model
    # Every grounding's held-out accuracy is reported (fast: num_steps 3, ground_every 2, ground_until 1 -> one)
    fits = summary["results"]["pgg-avg"]["groundings"]
    assert [g["before_step"] for g in fits] == [0] and fits[0]["rm_steps"] <= 4 and fits[0]["metric_calls"] > 0
    assert summary["results"]["sequence"]["groundings"] == []
    assert "held-out pair accuracy" in (root / "report.html").read_text()

    def refuse(*args, **kwargs):
        raise AssertionError("a finished arm ran again")

    monkeypatch.setattr(pgg, "_train_arm", refuse)
    again = run_pgg(PGGRecipeConfig(output=str(root), task="fewshot", fast=True, aggregators=["avg", "sum"],
                                    resume=True))
    assert again["results"]["pgg-avg"] == summary["results"]["pgg-avg"]


def test_fast_summarize_compares_weighted_and_plain_mle(tmp_path):
    summary = run_pgg(PGGRecipeConfig(output=str(tmp_path / "sum"), task="summarize", fast=True))
    assert set(summary["results"]) == {"start", "pgg-avg", "mle"}
    for arm, metrics in summary["results"].items():
        assert 0 <= metrics["rougeL"] <= 1, arm
    assert "loss/weighted_nll" in read_metrics(tmp_path / "sum" / "pgg-avg")[0]
    assert "ground/index" not in read_metrics(tmp_path / "sum" / "mle")[0]


def test_bad_settings_are_refused_with_the_field_named(tmp_path, capsys):
    assert main(["pgg", f"output={tmp_path / 'x'}"]) == 2
    assert "needs data=" in capsys.readouterr().err
    with pytest.raises(ValueError, match="arms for task=summarize"):
        PGGRecipeConfig(task="summarize", fast=True, arms=["sequence"]).validate()
    with pytest.raises(ValueError, match="aggregators must be among"):
        PGGRecipeConfig(fast=True, aggregators=["max"]).validate()
    with pytest.raises(ValueError, match="task must be one of"):
        PGGRecipeConfig(fast=True, task="tldr").validate()
