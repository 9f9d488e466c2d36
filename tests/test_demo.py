"""`tokencredit demo` in its fast mode (tiny random model, few steps): the pipeline's plumbing and outputs."""

import json

import pytest

from tokencredit.cli import main
from tokencredit.recipes.tppo import DemoConfig, run_demo
from tokencredit.runs import read_metrics
from tokencredit.tasks.querygen import builtin_sessions

METRICS = {"exact_match", "token_f1", "bleu", "rouge_l", "rm_reward", "mean_length_tokens"}


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--fast", "--output", str(out)]) == 0
    return out


def test_summary_has_a_block_per_policy_with_test_metrics(fast_run):
    summary = json.loads((fast_run / "summary.json").read_text())
    for name in ("sft", "tppo", "ppo_sequence"):
        assert METRICS <= set(summary[name]), name
        for key in ("exact_match", "token_f1", "bleu", "rouge_l"):
            assert 0.0 <= summary[name][key] <= 1.0
        assert 1 <= summary[name]["mean_length_tokens"] <= 6  # fast mode: max_new_tokens=6
    assert summary["data"]["test_sessions"] == 12 and summary["data"]["train_sessions"] == 48
    assert summary["data"]["labelled_samples"] == 16 * 2
    assert "reference-based" in summary["labeler"]
    assert summary["labels"]["records"] == 32 and "pair_accuracy" in summary["reward_model_eval"]
    assert set(summary["timings_s"]) == {"sft", "labels", "reward_model", "tppo", "ppo_sequence", "evaluate"}


def test_each_stage_left_its_run_folder(fast_run):
    assert len(read_metrics(fast_run / "sft")) == 12  # 48 sessions / batch 8 * 2 epochs
    assert [m["step"] for m in read_metrics(fast_run / "tppo")] == [1, 2]
    assert [m["step"] for m in read_metrics(fast_run / "ppo_sequence")] == [1, 2]
    assert (fast_run / "reward_model" / "model" / "scalar_head.safetensors").is_file()
    labels = [json.loads(line) for line in (fast_run / "labels" / "token_labels.jsonl").read_text().splitlines()]
    assert len(labels) == 32
    for rec in labels:
        for start, end, value in rec["spans"]:
            assert 0 <= start < end <= len(rec["response"]) and value in (-1, 0, 1)
        # Each sample says whether it ended by itself; one cut at max_new_tokens has its last token labelled -1.
        assert isinstance(rec["finished"], bool) and rec["end_label"] in (-1, 1)
        assert rec["finished"] or rec["end_label"] == -1
    info = json.loads((fast_run / "labels" / "done.json").read_text())
    assert info["skipped_no_labels"] == 0 and info["unfinished"] == sum(not r["finished"] for r in labels)
    # The reference's verdict on each sample and on the SFT policy's greedy query for its prompt (the same for the
    # samples of one prompt) prices a miss (label_miss_cost=auto): the F1 break-even F / (2 - F) of the latter.
    assert all(0 <= r["f1"] <= 1 and 0 <= r["greedy_f1"] <= 1 for r in labels)
    by_session = {}
    for r in labels:
        assert by_session.setdefault(r["session"], r["greedy_f1"]) == r["greedy_f1"]
    mean_f1 = sum(r["greedy_f1"] for r in labels) / len(labels)
    rm_info = json.loads((fast_run / "reward_model" / "done.json").read_text())
    assert rm_info["miss_cost"] == pytest.approx(max(mean_f1 / (2 - mean_f1), 0.01))
    gens = json.loads((fast_run / "generations_tppo.json").read_text())
    targets = [s.target_query for s in builtin_sessions("test")[:12]]
    assert [g["target"] for g in gens] == targets


def test_report_has_curves_table_and_token_colours(fast_run):
    page = (fast_run / "report.html").read_text()
    assert page.count("<svg") == 3  # reward, KL, SFT loss
    assert "<polyline" in page  # curves have data
    for name in ("sft", "tppo", "ppo_sequence"):
        assert f"<td>{name}</td>" in page
    # Every shown generated token is a coloured span with its reward on hover.
    assert page.count('class="tok"') >= 8
    assert "FAST MODE" in page


def test_resume_skips_finished_stages_and_reruns_a_missing_one(fast_run, tmp_path):
    sft_done = (fast_run / "sft" / "done.json").stat().st_mtime_ns
    (fast_run / "ppo_sequence" / "done.json").unlink()
    before = json.loads((fast_run / "summary.json").read_text())
    assert main(["demo", "--fast", "--resume", "--output", str(fast_run)]) == 0
    assert (fast_run / "sft" / "done.json").stat().st_mtime_ns == sft_done
    assert (fast_run / "ppo_sequence" / "done.json").exists()
    # The unfinished PPO run resumed from its last checkpoint: no update was logged twice.
    assert [m["step"] for m in read_metrics(fast_run / "ppo_sequence")] == [1, 2]
    after = json.loads((fast_run / "summary.json").read_text())
    for name in ("sft", "tppo", "ppo_sequence"):
        assert after[name] == pytest.approx(before[name])


def test_own_data_is_split_into_train_and_test(tmp_path):
    data = tmp_path / "sessions.jsonl"
    rows = [{"history": [{"query": s.history[-1].query, "clicked": list(s.history[-1].clicked)}],
             "target_query": s.target_query} for s in builtin_sessions("train")[:40]]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = DemoConfig(output=str(tmp_path / "run"), data=str(data), fast=True, test_fraction=0.25,
                     max_train_sessions=None, max_test_sessions=None, label_prompts=4, ppo_updates=1,
                     ppo_batch_size=4, ppo_mini_batch_size=2, sft_epochs=1, max_new_tokens=4,
                     policies=["sft", "tppo"])
    summary = run_demo(cfg)
    assert summary["data"] == {"train_sessions": 30, "test_sessions": 10, "labelled_samples": 8,
                               "source": str(data)}
    assert "ppo_sequence" not in summary and not (tmp_path / "run" / "ppo_sequence").exists()


def test_bad_settings_fail_before_any_work(tmp_path, capsys):
    assert main(["demo", "--fast", "--output", str(tmp_path / "a"), "policies=[tppo]"]) == 2
    assert "policies" in capsys.readouterr().err
    assert main(["demo", "--fast", "--output", str(tmp_path / "b"), "--judge", "gpt"]) == 2
    assert "judge must be an http(s) base URL" in capsys.readouterr().err
    assert main(["demo", "--fast", "--data", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "c")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"history": [{"query": "a", "clicked": []}], "target_query": "b"}\n{"history": []}\n')
    assert main(["demo", "--fast", "--data", str(bad), "--output", str(tmp_path / "d")]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_model_flag_runs_the_pipeline_on_another_model(fast_run, tmp_path):
    from tokencredit.recipes.tppo import FAST_OVERRIDES

    small = [f"{k}={v}" for k, v in FAST_OVERRIDES.items()] + ["ppo_updates=1", "policies=[sft,ppo_sequence]"]
    model = fast_run / "tiny-model"  # a plain model folder; without --fast it is used as given
    assert main(["demo", "--model", str(model), "--output", str(tmp_path / "run"), *small]) == 0
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert f"model: {model}" in saved and "fast: false" in saved
    assert not (tmp_path / "run" / "tiny-model").exists()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary) >= {"sft", "ppo_sequence"} and "tppo" not in summary


class WordJudge:
    """A judge stand-in that marks the first word of each answer bad and the last one good."""

    def __new__(cls, cache):
        from tokencredit.judges.backends import ChatResult, JudgeBackend

        class Backend(JudgeBackend):
            def identity(self):
                return {"kind": "words"}

            def _ask(self, request):
                text = request.messages[-1]["content"]
                answer = text.split("Answer:\n", 1)[1].split("\n\nCopy", 1)[0].split()
                if len(answer) < 2:
                    return ChatResult("none")
                if len(answer[0]) % 2:  # an answer the demo cannot read: it must skip that sample
                    return ChatResult("I cannot tell")
                return ChatResult(f"- {answer[0]}\n+ {answer[-1]}")

        return Backend(cache)


def test_demo_labels_with_an_llm_judge(tmp_path, monkeypatch):
    import tokencredit.recipes.tppo as demo
    from tokencredit.judges.backends import HFBackend, OpenAIBackend
    from tokencredit.judges.judge_labelers import JudgeTokenLabeler

    monkeypatch.setattr(demo, "make_labeler", lambda cfg, folder: JudgeTokenLabeler(
        WordJudge(folder / "judge_cache.sqlite")))
    cfg = DemoConfig(output=str(tmp_path / "run"), fast=True, judge="http://127.0.0.1:9/v1", label_prompts=4,
                     ppo_updates=1, ppo_batch_size=4, ppo_mini_batch_size=2, max_new_tokens=4,
                     policies=["sft", "tppo"])
    summary = run_demo(cfg)
    assert summary["labeler"].startswith("LLM judge http://127.0.0.1:9/v1")
    records = [json.loads(x) for x in (tmp_path / "run" / "labels" / "token_labels.jsonl").read_text().splitlines()]
    # An unreadable answer labels nothing: the sample is skipped (no record, so no example and no pair), not kept
    # with an empty span list that would pass for a query with nothing wrong in it.
    skipped = summary["labels"]["skipped_no_labels"]
    assert skipped > 0 and summary["labels"]["judge_unparseable"] == skipped and len(records) + skipped == 4 * 2
    assert not any(len(r["response"].split()) >= 2 and len(r["response"].split()[0]) % 2 for r in records)
    two_words = [r for r in records if len(r["response"].split()) >= 2]
    assert two_words and all(sorted(s[2] for s in r["spans"]) == [-1, 1] for r in two_words)
    assert "LLM judge" in (tmp_path / "run" / "report.html").read_text()
    assert not any("f1" in r for r in records)  # a judge sees no reference: its misses cost 1
    assert json.loads((tmp_path / "run" / "reward_model" / "done.json").read_text())["miss_cost"] == 1.0
    # The real factory picks the backend from the judge setting.
    monkeypatch.undo()
    url = demo.make_labeler(DemoConfig(judge="http://127.0.0.1:9/v1", judge_model="m"), tmp_path)
    assert isinstance(url.spans.backend, OpenAIBackend) and url.spans.backend.model == "m"
    local_dir = tmp_path / "judge_model"
    from tokencredit.testing import save_tiny_causal_lm

    save_tiny_causal_lm(local_dir, ["a", "b"])
    assert isinstance(demo.make_labeler(DemoConfig(judge=f"hf:{local_dir}"), tmp_path).spans.backend, HFBackend)


def test_potential_shaping_runs_both_policies_on_one_bounded_objective(tmp_path):
    out = tmp_path / "shaped"
    assert main(["demo", "--fast", "--output", str(out), "reward_shaping=potential"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    control = summary["length_control"]
    assert control["reward_shaping"] == "potential" and control["shaping_temperature"] > 0
    for name in ("tppo", "ppo_sequence"):
        rewards = [m["reward/mean"] for m in read_metrics(out / name)]
        # Phi = sigmoid(...) in (0, 1): a query's total shaped reward lies in (-1, 1) whatever its length.
        assert all(-1 < r < 1 for r in rewards), (name, rewards)
