"""`tokencredit evolve` (SER loops) on a tiny backbone and a learnable toy preference."""

import json
import random

import pytest

from tokencredit.cli import main
from tokencredit.rewards.ser_selection import SERState
from tokencredit.testing import save_tiny_causal_lm, toy_preference_pairs

WORDS = "a b c d x y".split()


@pytest.fixture
def setup(tmp_path):
    save_tiny_causal_lm(tmp_path / "backbone", WORDS)
    pairs = toy_preference_pairs(120, random.Random(0))
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in pairs) + "\n")
    return tmp_path


def args(setup, *extra):
    return ["evolve", f"model={setup / 'backbone'}", f"data={setup / 'pairs.jsonl'}", f"output_dir={setup / 'run'}",
            "progress=false", "num_epochs=2", "learning_rate=3e-3", "batch_size=8", "labelled_fraction=0.2",
            "status=2", "min_gap=0.2", *extra]


def test_loops_grow_the_labelled_set_from_the_pool(setup, capsys):
    assert main(args(setup, "max_loops=2", "patience=3", "full_baseline=true")) == 0
    run = setup / "run"
    summary = json.loads((run / "summary.json").read_text())
    # 120 pairs: 24 test, then 10 of the 96 left kept aside as validation, 17 labelled seed pairs and a pool of 69.
    assert summary["seed_pairs"] == 17 and summary["pool_pairs"] == 69 and summary["heldout_pairs"] == 24
    assert summary["val_pairs"] == 10 and summary["chosen_on"] == "validation pairs"
    loops = summary["loops"]
    assert [r["loop"] for r in loops] == [0, 1, 2] and summary["stop_reason"] == "reached max_loops=2"
    state = SERState.load(run / "ser_state.json")
    assert len(state.labels) + len(state.pool) == 69  # every pool pair is either still pooled or labelled once
    assert len({lab.pair_id for lab in state.labels}) == len(state.labels)
    assert sum(r["selected"] for r in loops) == len(state.labels) > 0
    assert [r["train_pairs"] for r in loops] == [17, 17 + loops[0]["selected"],
                                                 17 + loops[0]["selected"] + loops[1]["selected"]]
    # The best loop is the validation pairs' choice; what is reported for it is its test accuracy.
    best = max(loops, key=lambda r: r["heldout_accuracy"])
    assert summary["best_loop"] == best["loop"] and summary["best_accuracy"] == best["test_accuracy"]
    assert summary["seed_accuracy"] == loops[0]["test_accuracy"] and summary["last_accuracy"] == loops[-1][
        "test_accuracy"]
    for k, line in enumerate(loops):
        assert json.loads((run / f"loop-{k}" / "val.json").read_text())["pair_accuracy"] == line["heldout_accuracy"]
        assert json.loads((run / f"loop-{k}" / "eval.json").read_text())["pair_accuracy"] == line["test_accuracy"]
    picked = [r for r in loops if r["selected"]]
    # The toy preference is learnable, so the seed RM's confident picks are mostly right.
    assert picked[0]["pseudo_label_accuracy"] >= 0.7
    assert all(0 <= r["heldout_accuracy"] <= 1 for r in loops) and 0 <= summary["full_label_accuracy"] <= 1
    for k in range(3):
        assert (run / f"loop-{k}" / "model" / "scalar_head.safetensors").is_file()
    page = (run / "report.html").read_text()
    assert "<polyline" in page and "100% labels" in page


def test_resume_continues_the_loop_numbering(setup):
    assert main(args(setup, "max_loops=0")) == 0
    first = SERState.load(setup / "run" / "ser_state.json")
    assert first.loop == 1
    assert main(args(setup, "max_loops=1", "patience=5", "resume=true")) == 0
    state = SERState.load(setup / "run" / "ser_state.json")
    assert state.loop == 2 and state.labels[: len(first.labels)] == first.labels
    lines = (setup / "run" / "loops.jsonl").read_text().splitlines()
    assert [json.loads(x)["loop"] for x in lines] == [0, 1]


def test_a_run_folder_belongs_to_one_run(setup, capsys):
    assert main(args(setup, "max_loops=0")) == 0
    capsys.readouterr()
    assert main(args(setup, "max_loops=0")) == 2  # a second fresh run would mix its loops with the first's
    assert "already holds a run" in capsys.readouterr().err
    assert main(args(setup, "max_loops=0", "resume=true", "high=0.6")) == 2  # changed what a loop learns
    assert "high: 0.55 -> 0.6" in capsys.readouterr().err
    assert main(args(setup, "max_loops=0", "overwrite=true")) == 0
    assert [json.loads(x)["loop"] for x in (setup / "run" / "loops.jsonl").read_text().splitlines()] == [0]
    assert not list(setup.glob("run.replaced-*"))  # the replaced run went once the new one finished a loop


def test_errors_are_clear(setup, capsys):
    assert main(["evolve", f"output_dir={setup / 'e'}"]) == 2
    assert "needs data" in capsys.readouterr().err
    assert main(args(setup, "labelled_fraction=1.5")) == 2
    assert "labelled_fraction" in capsys.readouterr().err
    assert main(args(setup, "high=0.4", "low=0.6")) == 2
    assert "low" in capsys.readouterr().err


def test_calibration_lets_small_scores_pass_the_thresholds():
    from tokencredit.rewards.evolve import _pool_probabilities
    from tokencredit.rewards.records import PreferencePair

    class TinyScores:
        """Scores that never leave (-0.01, 0.01): sigma of them stays inside the 0.45-0.55 band."""

        def score_sequences(self, prompts, responses, batch_size, max_length):
            return [0.01 if r == "good" else -0.01 for r in responses]

    shown = [PreferencePair("q", "good", "bad"), PreferencePair("q", "bad", "good")]
    raw_a, raw_b = _pool_probabilities(TinyScores(), shown, 8, calibrate=False, max_length=64)
    assert all(0.49 < p < 0.51 for p in raw_a + raw_b)
    cal_a, cal_b = _pool_probabilities(TinyScores(), shown, 8, calibrate=True, max_length=64)
    assert cal_a[0] > 0.7 and cal_b[0] < 0.3 and cal_a[1] < 0.3 and cal_b[1] > 0.7


def test_a_crash_between_the_state_and_the_log_loses_no_loop_line(setup, monkeypatch):
    # Crash right after loop 1's state is on disk, before loops.jsonl has its line (the issue saw [0, 1, 3, 4]).
    original, calls = SERState.save, []

    def save_then_crash(self, path):
        original(self, path)
        calls.append(self.loop)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between ser_state.json and loops.jsonl")

    monkeypatch.setattr(SERState, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        main(args(setup, "max_loops=3", "patience=5"))
    monkeypatch.setattr(SERState, "save", original)
    assert main(args(setup, "max_loops=3", "patience=5", "resume=true")) == 0
    run = setup / "run"
    lines = [json.loads(x) for x in (run / "loops.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    loops = [r["loop"] for r in lines]
    assert loops == list(range(len(loops))) and loops == [r["loop"] for r in summary["loops"]]
    assert len(loops) >= 3
    assert [r["train_pairs"] for r in lines][1] == 17 + lines[0]["selected"]
    best = max(lines, key=lambda r: r["heldout_accuracy"])
    assert summary["best_loop"] == best["loop"] and summary["best_model"].endswith(f"loop-{best['loop']}/model")


def test_a_state_naming_pairs_outside_the_pool_is_refused_clearly(setup, capsys):
    assert main(args(setup, "max_loops=0")) == 0
    path = setup / "run" / "ser_state.json"
    state = json.loads(path.read_text())
    state["pool"][0] = 999_999
    path.write_text(json.dumps(state))
    capsys.readouterr()
    assert main(args(setup, "max_loops=1", "patience=5", "resume=true")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tokencredit: error:") and "999999" in err[0]
    path.write_text("{not json")
    assert main(args(setup, "max_loops=1", "patience=5", "resume=true")) == 2
    assert "ser_state.json cannot be read" in capsys.readouterr().err


def test_without_validation_pairs_the_choice_reads_the_test_pairs_and_says_so(setup):
    assert main(args(setup, "max_loops=1", "patience=3", "val_fraction=0")) == 0
    summary = json.loads((setup / "run" / "summary.json").read_text())
    assert summary["val_pairs"] == 0 and "optimistic" in summary["chosen_on"]
    assert summary["seed_pairs"] == 19 and summary["pool_pairs"] == 77
    assert all(r["heldout_accuracy"] == r["test_accuracy"] for r in summary["loops"])


def test_long_responses_are_cut_in_pool_scoring_too(setup):
    """A response far past max_length (and past the backbone's positions) neither crashes nor loses its EOS."""
    pairs = [json.loads(line) for line in (setup / "pairs.jsonl").read_text().splitlines()]
    for p in pairs[::7]:
        p["chosen"] = " ".join(["y"] * 3000)
    (setup / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in pairs) + "\n")
    assert main(args(setup, "max_loops=1", "patience=3", "max_length=16")) == 0
    summary = json.loads((setup / "run" / "summary.json").read_text())
    assert len(summary["loops"]) == 2


def test_the_papers_schedule_reaches_every_loop(setup):
    assert main(args(setup, "max_loops=0", "lr_schedule=linear", "warmup_ratio=0.1")) == 0
    lrs = [json.loads(line).get("lr") for line in (setup / "run" / "loop-0" / "metrics.jsonl").read_text()
           .splitlines() if '"lr"' in line]
    assert lrs[0] < lrs[1] and lrs[-1] < max(lrs) and lrs == sorted(lrs[:2]) + lrs[2:]


def test_the_steps_matched_control_trains_the_seed_share_as_long_as_the_full_reference(setup):
    assert main(args(setup, "max_loops=0", "full_baseline=true", "steps_matched_baseline=true")) == 0
    run = setup / "run"
    summary = json.loads((run / "summary.json").read_text())
    matched = summary["seed_steps_matched"]
    # 86 training pairs in batches of 8 for 2 epochs = 22 steps; the 17 seed pairs take 3 steps an epoch.
    assert matched["full_label_steps"] == 22 and matched["epochs"] == 8 and matched["steps"] == 24
    steps = [json.loads(line)["step"] for line in (run / "seed-steps-matched" / "metrics.jsonl").read_text()
             .splitlines()]
    full = [json.loads(line)["step"] for line in (run / "full-labels" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 24 and max(full) == 22
    assert 0 <= summary["seed_steps_matched_accuracy"] <= 1


def test_a_small_set_still_keeps_one_validation_pair(setup):
    from tokencredit.rewards.evolve import EvolveConfig, _load

    pairs = [json.loads(line) for line in (setup / "pairs.jsonl").read_text().splitlines()][:6]
    (setup / "few.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    train, val, test = _load(EvolveConfig(data=str(setup / "few.jsonl")))
    # 6 pairs: 1 test, and 10% of the 5 left rounds to 0, so one pair is kept aside anyway.
    assert (len(train), len(val), len(test)) == (4, 1, 1)
