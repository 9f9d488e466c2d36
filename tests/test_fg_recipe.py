"""`tokencredit fg` in its fast mode (tiny random model, few steps): the FG pipeline's plumbing and outputs."""

import json
import random

import pytest
import yaml

from tokencredit.cli import main
from tokencredit.config import ConfigError, load_config
from tokencredit.recipes.fg import FAST_OVERRIDES, FGConfig, _reward_fn, distinct_n, run_fg
from tokencredit.runs import read_metrics

GOOD, BAD = ["great", "fine", "nice", "good"], ["awful", "bad", "dull", "poor"]
POLICIES = ("sft", "fine_grained", "sequence")


def write_edits(path, n=24, seed=0):
    """Minimal edits that swap one bad word of a short review for a good one."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        noun, bad = rng.choice(["movie", "plot", "cast", "music"]), rng.choice(BAD)
        original = f"the {noun} was {bad} and the end was {rng.choice(BAD)} ."
        rows.append({"prompt": f"review {i % 8} of the {noun}", "original": original,
                     "edited": original.replace(bad, rng.choice(GOOD), 1)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fg-data")
    gold = folder / "gold.py"
    gold.write_text("def score(prompts, responses):\n"
                    f"    return [sum(w in {GOOD!r} for w in r.split()) - sum(w in {BAD!r} for w in r.split())"
                    " for r in responses]\n")
    return {"edits": write_edits(folder / "edits.jsonl"), "gold": f"{gold}:score"}


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("fg") / "run"
    assert main(["fg", "--fast", f"edits={data['edits']}", f"output={out}", f"gold_scorer={data['gold']}"]) == 0
    return out


def test_pipeline_writes_summary_report_and_both_reward_models(fast_run):
    summary = json.loads((fast_run / "summary.json").read_text())
    for name in POLICIES:
        metrics = summary["policies"][name]
        assert {"gold", "token_rm_reward", "sequence_rm_reward", "mean_length_tokens", "distinct_1",
                "distinct_2", "empty_share"} <= set(metrics), name
        assert 0 <= metrics["mean_length_tokens"] <= 6  # fast mode: max_new_tokens=6
    assert summary["data"]["edits"] == 24 and summary["data"]["heldout_edits"] == 5  # round(0.2 * 24)
    # Both RMs are scored on the same held-out pairs; the gold scorer checked on the held-out edits.
    assert summary["reward_models"]["token_rm"]["pairs"] == summary["reward_models"]["sequence_rm"]["pairs"] == 5
    assert 0 <= summary["reward_models"]["token_rm"]["span_accuracy"] <= 1
    assert summary["gold_on_heldout_edits"]["edited_preferred"] == 1.0  # this gold scorer sees every edit
    for stage, kind in (("token_rm", "token"), ("sequence_rm", "sequence")):
        info = json.loads((fast_run / stage / "model" / "tokencredit_reward.json").read_text())
        assert info["kind"] == kind
    page = (fast_run / "report.html").read_text()
    assert page.count("<svg") == 2 and "<polyline" in page
    assert page.count('class="tok"') >= 6 and "FAST MODE" in page
    for name in POLICIES:
        assert f"<td>{name}</td>" in page
        gens = json.loads((fast_run / f"generations_{name}.json").read_text())
        assert len(gens["texts"]) == len(gens["ids"]) == summary["data"]["eval_answers"]


def test_rewards_are_normalised_so_one_kl_coefficient_is_one_trade_off(fast_run):
    import statistics

    from tokencredit.models import load_tokenizer
    from tokencredit.recipes.fg import _token_scores
    from tokencredit.rewards.saved import load_saved_reward_model

    spreads = json.loads((fast_run / "reward_spread.json").read_text())
    assert set(spreads) == {"token_rm", "sequence_rm"} and all(v > 0 for v in spreads.values())
    for arm, stage in (("fine_grained", "token_rm"), ("sequence", "sequence_rm")):
        assert json.loads((fast_run / arm / "done.json").read_text())["reward_scale"] == pytest.approx(
            1 / spreads[stage])
    # The scaled reward of a response is the RM's score divided by that RM's spread on start-policy samples.
    tok = load_tokenizer(fast_run / "tiny-model")
    ids = [tok("the plot was bad", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    rm = load_saved_reward_model(fast_run / "token_rm" / "model")
    raw = _token_scores(rm, ["review 1"], ids, tok)[0]
    scaled = _reward_fn(fast_run / "token_rm" / "model", tok, {}, 1 / spreads["token_rm"])(
        ["review 1"], ["the plot was bad"], ids)[0]
    assert scaled == pytest.approx([r / spreads["token_rm"] for r in raw], rel=1e-4, abs=1e-6)
    summary = json.loads((fast_run / "summary.json").read_text())
    assert summary["reward_spread"] == spreads
    # Text quality beside the gold score: the start model's perplexity of every policy's answers.
    for name in POLICIES:
        m = summary["policies"][name]
        assert m["start_perplexity"] == pytest.approx(2.718281828 ** m["start_nll"], rel=1e-6)
        assert m["start_nll"] > 0
    # Gold win rate of each arm against the start policy, answer by answer, with its interval.
    for arm in ("fine_grained", "sequence"):
        w = summary["gold_win_rate_vs_sft"][arm]
        assert 0 <= w["ci95"][0] <= w["win_rate"] <= w["ci95"][1] <= 1 and w["judged"] == summary["data"][
            "eval_answers"]
    assert statistics.fmean([1.0, 0.0]) == 0.5


def test_gold_win_rate_counts_ties_half():
    from tokencredit.recipes.fg import gold_win_rate

    w = gold_win_rate([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 5.0, -1.0])
    assert w["win_rate"] == pytest.approx((1 + 0.5 + 0 + 1) / 4) and (w["wins"], w["ties"], w["losses"]) == (2, 1, 1)
    with pytest.raises(ValueError, match="base answers"):
        gold_win_rate([1.0], [1.0, 2.0])


def test_both_arms_start_from_the_same_sft_weights_with_the_same_budget(fast_run):
    sft = json.loads((fast_run / "sft" / "done.json").read_text())
    assert sft["trained"] and sft["model"].endswith("merged")
    arms = {arm: json.loads((fast_run / arm / "done.json").read_text()) for arm in ("fine_grained", "sequence")}
    assert arms["fine_grained"]["start"] == arms["sequence"]["start"] == sft["model"]
    assert arms["fine_grained"]["reward_model"] == "token_rm" and arms["sequence"]["reward_model"] == "sequence_rm"
    for key in ("updates", "samples", "seed", "kl_coef"):
        assert arms["fine_grained"][key] == arms["sequence"][key]
    # The PPO runs' resolved configs differ only in where they write (the reward scale lives in the reward).
    configs = {arm: yaml.safe_load((fast_run / arm / "config.yaml").read_text()) for arm in arms}
    for cfg in configs.values():
        cfg.pop("output_dir")
    assert configs["fine_grained"] == configs["sequence"]
    assert [m["step"] for m in read_metrics(fast_run / "fine_grained")] == [1, 2]
    assert [m["step"] for m in read_metrics(fast_run / "sequence")] == [1, 2]


def test_fine_grained_reward_is_per_token_and_sequence_reward_one_score(fast_run):
    from tokencredit.models import load_tokenizer

    tok = load_tokenizer(fast_run / "tiny-model")
    ids = [tok("the plot was bad", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    token = _reward_fn(fast_run / "token_rm" / "model", tok, {})(["review 1"], ["the plot was bad"], ids)
    seq = _reward_fn(fast_run / "sequence_rm" / "model", tok, {})(["review 1"], ["the plot was bad"], ids)
    assert isinstance(token[0], list) and len(token[0]) == len(ids[0])
    assert isinstance(seq[0], float)


def test_resume_skips_finished_stages_and_reruns_a_missing_one(fast_run, data):
    marks = {s: (fast_run / s / "done.json").stat().st_mtime_ns for s in ("sft", "token_rm", "sequence_rm")}
    (fast_run / "sequence" / "done.json").unlink()
    before = json.loads((fast_run / "summary.json").read_text())
    assert main(["fg", "--fast", "--resume", f"edits={data['edits']}", f"output={fast_run}",
                 f"gold_scorer={data['gold']}"]) == 0
    for stage, mark in marks.items():
        assert (fast_run / stage / "done.json").stat().st_mtime_ns == mark, stage
    assert (fast_run / "sequence" / "done.json").exists()
    assert [m["step"] for m in read_metrics(fast_run / "sequence")] == [1, 2]  # resumed, not redone twice
    after = json.loads((fast_run / "summary.json").read_text())
    assert after["policies"]["fine_grained"] == pytest.approx(before["policies"]["fine_grained"])


def test_judge_win_rate_and_gold_callable(tmp_path, data, monkeypatch):
    from tokencredit.judges import settings
    from tokencredit.judges.backends import ChatResult, JudgeBackend

    class AlwaysA(JudgeBackend):
        """Answers "A" whatever the order: every pair is a tie (position bias), so the win rate is 0.5."""

        def identity(self):
            return {"kind": "always-a"}

        def _ask(self, request):
            return ChatResult("A", "stop")

    monkeypatch.setattr(settings, "make_backend", lambda judge, cache: AlwaysA(cache))
    cfg = load_config(FGConfig, None, [f"edits={data['edits']}", f"output={tmp_path / 'run'}", "fast=true",
                                       "judge.use_logprobs=false", "sft_epochs=0"], base=FAST_OVERRIDES)
    summary = run_fg(cfg, gold_scorer=lambda prompts, responses: [float(len(r)) for r in responses])
    assert summary["judge"]["judged"] == 4 and summary["judge"]["win_rate"] == 0.5  # max_judged=4 in fast mode
    assert summary["policies"]["sft"]["gold"] >= 0
    # sft_epochs=0: both arms start from the base model itself.
    assert json.loads((tmp_path / "run" / "sft" / "done.json").read_text())["trained"] is False


@pytest.mark.parametrize("overrides, message", [
    ([], "needs edits=FILE.jsonl"),
    (["edits=/nonexistent/edits.jsonl"], "no such file"),
    (["token_loss=nope"], "token_loss must be one of"),
    (["test_fraction=1.5"], "test_fraction must be in"),
    (["gold_scorer=no_colon"], "gold_scorer must look like"),
    (["ppo_batch_size=6", "ppo_mini_batch_size=4"], "multiple of ppo_mini_batch_size"),
    (["eval_samples=3"], "greedy evaluation"),
    (["reward_normalize=mean"], "'reward_normalize' from the command line must be one of"),
    (["normalize_samples=1"], "normalize_samples must be"),
])
def test_bad_config_gives_a_clear_error(tmp_path, data, capsys, overrides, message):
    edits = [] if any(o.startswith("edits=") for o in overrides) or not overrides else [f"edits={data['edits']}"]
    code = main(["fg", "--fast", f"output={tmp_path / 'run'}", *edits, *overrides])
    assert code == 2
    assert message in capsys.readouterr().err


def test_too_few_edits_and_a_broken_gold_scorer_are_named(tmp_path, data, capsys):
    few = tmp_path / "few.jsonl"
    few.write_text(json.dumps({"prompt": "p", "original": "a bad movie", "edited": "a good movie"}) + "\n")
    assert main(["fg", "--fast", f"edits={few}", f"output={tmp_path / 'a'}"]) == 2
    assert "need at least 2 to train on" in capsys.readouterr().err
    assert main(["fg", "--fast", f"edits={data['edits']}", f"output={tmp_path / 'b'}",
                 "gold_scorer=tokencredit.recipes.fg:nothing_here"]) == 2
    assert "has no 'nothing_here'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="Did you mean .ppo_updates."):
        load_config(FGConfig, None, ["ppo_updatez=3"])


def test_distinct_n_counts_unique_ngrams():
    assert distinct_n(["a b a b"], 1) == 0.5 and distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert distinct_n([""], 2) == 0.0
