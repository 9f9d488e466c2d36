"""`reward train` checkpoints and resumes like the trainers: a run killed mid-way and resumed with resume=true ends
with the same model and the same metrics as one that never stopped."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from safetensors.torch import load_file

from tokencredit.cli import main
from tokencredit.rewards import fit as fit_module
from tokencredit.runs import read_metrics
from tokencredit.testing import save_tiny_causal_lm, toy_preference_pairs

WORDS = "a b c d x y".split()


@pytest.fixture
def setup(tmp_path):
    save_tiny_causal_lm(tmp_path / "backbone", WORDS)
    pairs = toy_preference_pairs(48, random.Random(0))
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in pairs) + "\n")
    return tmp_path


def args(setup, kind, out, *extra):
    return ["reward", "train", f"kind={kind}", f"model={setup / 'backbone'}", f"data={setup / 'pairs.jsonl'}",
            f"output_dir={setup / out}", "progress=false", "num_epochs=3", "learning_rate=3e-3", "batch_size=8",
            "save_every=2", "seed=0", *extra]


def weights(folder):
    model = folder / "model"
    return {f.name: load_file(str(f)) for f in sorted(model.glob("*.safetensors"))}


def assert_same_run(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and wa
    for name in wa:
        for key in wa[name]:
            assert wa[name][key].equal(wb[name][key]), (name, key)
    ma, mb = read_metrics(a), read_metrics(b)
    assert [m["step"] for m in mb] == list(range(1, len(mb) + 1))
    assert ma == mb
    assert json.loads((a / "eval.json").read_text()) == json.loads((b / "eval.json").read_text())


@pytest.mark.parametrize("kind", ["sequence", "token", "pgg"])
def test_a_crashed_reward_run_resumes_to_the_same_model(setup, kind, monkeypatch, capsys):
    assert main(args(setup, kind, "straight")) == 0  # 5 steps an epoch, 15 in all
    log = fit_module.MetricsLogger.log

    def crash_after_step_7(self, step, metrics):
        log(self, step, metrics)
        if step == 7:  # the last checkpoint is step 6: step 7 is redone
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(fit_module.MetricsLogger, "log", crash_after_step_7)
    with pytest.raises(KeyboardInterrupt):
        main(args(setup, kind, "crashed"))
    monkeypatch.setattr(fit_module.MetricsLogger, "log", log)
    capsys.readouterr()
    assert main(args(setup, kind, "crashed")) == 2  # a fresh run may not take over the crashed one's folder
    assert "resume=true" in capsys.readouterr().err
    assert main(args(setup, kind, "crashed", "resume=true")) == 0
    assert_same_run(setup / "straight", setup / "crashed")


def test_resume_refuses_changed_settings_and_other_data(setup, capsys):
    log = fit_module.MetricsLogger.log
    assert main(args(setup, "sequence", "run", "num_epochs=1")) == 0
    capsys.readouterr()
    assert main(args(setup, "sequence", "run", "learning_rate=1e-2", "resume=true")) == 2
    assert "learning_rate: 0.003 -> 0.01" in capsys.readouterr().err
    (setup / "more.jsonl").write_text((setup / "pairs.jsonl").read_text() * 2)
    assert main([*args(setup, "sequence", "run", "resume=true", "allow_changed_settings=true"),
                 f"data={setup / 'more.jsonl'}"]) == 2
    assert "steps per epoch" in capsys.readouterr().err
    assert fit_module.MetricsLogger.log is log


KILLABLE = textwrap.dedent("""
    import sys, time
    from tokencredit.rewards import fit
    log = fit.MetricsLogger.log
    def slow(self, step, metrics):
        log(self, step, metrics)
        time.sleep(0.5)  # a window in which the test kills this process between checkpoints
    fit.MetricsLogger.log = slow
    from tokencredit.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_kill_9_mid_run_then_resume_matches_the_uninterrupted_run(setup):
    assert main(args(setup, "token", "straight")) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, *args(setup, "token", "killed")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = setup / "killed"
    deadline = time.time() + 120
    while not (run / "checkpoints" / "step-00000004").is_dir():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    while len(read_metrics(run)) < 5:  # past the checkpoint: the killed run has steps to redo
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "model").exists()
    assert main(args(setup, "token", "killed", "resume=true")) == 0
    assert_same_run(setup / "straight", run)
