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
    assert set(summary["policies"]) == {"start", "guide", "ppo", "ppo_pp", "d2lols"}
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
    again = run_rlgf(RLGFConfig(output=str(root), fast=True, algorithms=["ppo", "ppo_pp", "d2lols"], guide_beta=1.0,
                                resume=True))
    assert again["reward_curves"] == summary["reward_curves"]


def test_bad_settings_are_refused_with_the_field_named(tmp_path, capsys):
    assert main(["rlgf", f"output={tmp_path / 'x'}"]) == 2
    assert "data=REVIEWS.jsonl" in capsys.readouterr().err
    with pytest.raises(ValueError, match="algorithms must be among"):
        RLGFConfig(fast=True, algorithms=["dagger"]).validate()
    with pytest.raises(ValueError, match="task must be one of"):
        RLGFConfig(fast=True, task="tldr").validate()
    with pytest.raises(ValueError, match="CONCEPTS.jsonl"):
        RLGFConfig(task="commongen").validate()
    with pytest.raises(ValueError, match="start must be"):
        RLGFConfig(fast=True, start=str(tmp_path / "nowhere")).validate()
    with pytest.raises(ValueError, match="guide must be .base. or a model folder"):
        RLGFConfig(fast=True, guide=str(tmp_path / "nowhere")).validate()
    with pytest.raises(ValueError, match="ppo_updates must be at least 1"):
        RLGFConfig(fast=True, ppo_updates=0).validate()


def test_task_defaults_are_the_papers_and_explicit_values_win():
    imdb = RLGFConfig(task="imdb").resolved()
    assert (imdb.kl_coef, imdb.start, imdb.whiten_advantages) == (0.001, "sft", False)
    # TRIL: beta .6 for PPO++ on IMDB, .8 for the others and for every CommonGen algorithm
    assert [imdb.beta(a) for a in ("ppo_pp", "aggrevated", "lols", "d2lols")] == [0.6, 0.8, 0.8, 0.8]
    cg = RLGFConfig(task="commongen").resolved()
    assert (cg.kl_coef, cg.start) == (0.0, "base") and {cg.beta(a) for a in ("ppo_pp", "d2lols")} == {0.8}
    explicit = RLGFConfig(task="commongen", guide_beta=0.3, kl_coef=0.01).resolved()
    assert (explicit.beta("ppo_pp"), explicit.beta("d2lols"), explicit.kl_coef) == (0.3, 0.3, 0.01)


def test_fast_commongen_scores_concepts_and_reuses_a_given_start_and_guide(tmp_path, monkeypatch):
    first = run_rlgf(RLGFConfig(output=str(tmp_path / "a"), task="commongen", fast=True, start="sft",
                                algorithms=["ppo_pp"]))
    assert set(first["policies"]) == {"start", "guide", "ppo_pp"}
    for name, metrics in first["policies"].items():
        for key in ("reward", "coverage", "bleu", "rouge_l", "chrf"):
            assert 0 <= metrics[key] <= 1, (name, key)
    # The references bracket the metrics: a held-out human sentence covers its concepts, another record's does not.
    assert first["human_reference"]["coverage"] > first["other_record_reference"]["coverage"]
    assert len(first["reward_curves"]["ppo_pp"]) == 2

    # A second run given the first run's start and guide trains neither again.
    def refuse(*args, **kwargs):
        raise AssertionError("SFT ran although start and guide were given")

    monkeypatch.setattr(rlgf, "_sft", refuse)
    start, guide = tmp_path / "a" / "learner_sft" / "merged", tmp_path / "a" / "guide_sft" / "merged"
    second = run_rlgf(RLGFConfig(output=str(tmp_path / "b"), task="commongen", fast=True, start=str(start),
                                 guide=str(guide), algorithms=["ppo_pp"]))
    assert second["settings"]["start"] == str(start)
    # Same start, guide and seed -> the same run.
    assert second["reward_curves"] == first["reward_curves"]


def test_a_best_of_n_guide_is_what_the_learner_and_the_evaluation_see(tmp_path, monkeypatch):
    from tokencredit.rl.guided import BestOfNWriter

    seen = []
    real = rlgf._guide_writer

    def spy(cfg, model, tokenizer, task, heldout=False):
        writer = real(cfg, model, tokenizer, task, heldout)
        seen.append(writer)
        return writer

    monkeypatch.setattr(rlgf, "_guide_writer", spy)
    summary = run_rlgf(RLGFConfig(output=str(tmp_path / "bon"), fast=True, algorithms=["ppo_pp"], guide_best_of=4,
                                  guide="base"))
    assert not (tmp_path / "bon" / "guide_sft").exists()  # guide=base: the model as it is, no fine-tuning
    assert summary["settings"]["guide_best_of"] == 4 and summary["settings"]["guide_beta"] == {"ppo_pp": 0.6}
    assert len(seen) == 2 and all(isinstance(w, BestOfNWriter) and w.n == 4 for w in seen)  # training, evaluation
    assert (seen[0].top_k, seen[0].top_p) == (50, 0.92)  # TRIL's IMDB guide sampling
    # CommonGen's reward looks the record up by prompt: the score finds the prompt inside the guide's context
    # (training prompts in training, held-out ones in the evaluation) and rates the whole answer.
    seen.clear()
    cg = run_rlgf(RLGFConfig(output=str(tmp_path / "cg"), task="commongen", fast=True, algorithms=["aggrevated"],
                             guide_best_of=3))
    assert len(seen) == 2 and 0 <= cg["policies"]["guide"]["reward"] <= 1
    score = seen[0].score
    assert score(["nowhere"] * 0, []) == []
    with pytest.raises(ValueError, match="matches no training prompt"):
        score(["not a prompt"], ["dog"])
    with pytest.raises(ValueError, match="guide_best_of must be at least 1"):
        RLGFConfig(fast=True, guide_best_of=0).validate()
