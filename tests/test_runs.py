from __future__ import annotations

import json
import math
import random
import signal
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from tokencredit import runs
from tokencredit.runs import (
    CheckpointManager,
    MetricsLogger,
    atomic_write_json,
    atomic_write_text,
    capture_rng_state,
    read_metrics,
    restore_rng_state,
)


def save_checkpoint(manager: CheckpointManager, step: int, payload: str = "") -> Path:
    tmp = manager.begin(step)
    (tmp / "weights.txt").write_text(payload or f"weights at {step}")
    (tmp / "nested").mkdir()
    (tmp / "nested" / "optimizer.txt").write_text("state")
    return manager.commit(step)


def metric_lines(run_dir: Path) -> list[str]:
    return (run_dir / "metrics.jsonl").read_text().splitlines()


# --- atomic files -------------------------------------------------------------------------------------


def test_atomic_write_text_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "file.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert [p.name for p in path.parent.iterdir()] == ["file.txt"]


def test_atomic_write_keeps_old_content_when_replace_fails(tmp_path, monkeypatch):
    path = tmp_path / "file.txt"
    atomic_write_text(path, "old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(runs.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_atomic_write_json_round_trip(tmp_path):
    atomic_write_json(tmp_path / "state.json", {"step": 3, "names": ["a", "b"]})
    assert json.loads((tmp_path / "state.json").read_text()) == {"step": 3, "names": ["a", "b"]}


# --- checkpoints --------------------------------------------------------------------------------------


def test_commit_latest_and_pruning(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    assert manager.latest() is None
    for step in (5, 10, 15):
        final = save_checkpoint(manager, step)
        assert final == tmp_path / "checkpoints" / f"step-{step:08d}"
        assert manager.latest() == final
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step-00000010", "step-00000015"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000015"
    assert (manager.latest() / "nested" / "optimizer.txt").read_text() == "state"


def test_keep_last_one(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=1)
    save_checkpoint(manager, 1)
    save_checkpoint(manager, 2)
    assert [p.name for p in (tmp_path / "checkpoints").glob("step-*")] == ["step-00000002"]


def test_keep_last_must_be_positive(tmp_path):
    with pytest.raises(ValueError):
        CheckpointManager(tmp_path, keep_last=0)


def test_begin_gives_empty_temp_dir(tmp_path):
    manager = CheckpointManager(tmp_path)
    tmp = manager.begin(7)
    assert tmp == tmp_path / "checkpoints" / ".tmp-step-00000007"
    (tmp / "partial.bin").write_text("half")
    tmp_again = manager.begin(7)  # a retry after a crash starts clean
    assert tmp_again == tmp and list(tmp_again.iterdir()) == []


def test_crash_between_begin_and_commit_keeps_previous(tmp_path):
    manager = CheckpointManager(tmp_path)
    previous = save_checkpoint(manager, 10)
    tmp = manager.begin(20)
    (tmp / "weights.txt").write_text("half writ")  # then the process dies: no commit

    restarted = CheckpointManager(tmp_path)
    assert restarted.latest() == previous
    assert (previous / "weights.txt").read_text() == "weights at 10"

    save_checkpoint(restarted, 20)
    assert restarted.latest().name == "step-00000020"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # stale temp dirs are cleaned on commit


def test_killed_process_mid_checkpoint(tmp_path):
    if not hasattr(signal, "SIGKILL"):
        pytest.skip("needs SIGKILL")
    script = textwrap.dedent(
        f"""
        import os, signal
        from tokencredit.runs import CheckpointManager, MetricsLogger
        manager = CheckpointManager({str(tmp_path)!r})
        logger = MetricsLogger({str(tmp_path)!r}, tensorboard=False)
        for step in (1, 2):
            logger.log(step, {{"loss": 1.0 / step}})
            tmp = manager.begin(step)
            (tmp / "weights.txt").write_text(str(step))
            manager.commit(step)
        logger.log(3, {{"loss": 0.3}})
        tmp = manager.begin(3)
        (tmp / "weights.txt").write_text("par")
        logger._file.write('{{"step": 4, "lo')
        logger._file.flush()
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGKILL, result.stderr
    latest = CheckpointManager(tmp_path).latest()
    assert latest.name == "step-00000002" and (latest / "weights.txt").read_text() == "2"
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    with MetricsLogger(tmp_path, tensorboard=False, resume_from_step=2) as logger:
        logger.log(3, {"loss": 0.25})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 0.5), (3, 0.25)]


@pytest.mark.parametrize("content", [None, "", "garbage\n", "step-00000099\n", "../../etc\n"])
def test_missing_or_corrupt_latest_falls_back_to_highest_step(tmp_path, content):
    manager = CheckpointManager(tmp_path, keep_last=3)
    for step in (3, 12, 100):
        save_checkpoint(manager, step)
    manager.begin(200)  # an unfinished checkpoint must never be chosen
    latest_file = tmp_path / "checkpoints" / "latest"
    if content is None:
        latest_file.unlink()
    else:
        latest_file.write_text(content)
    assert manager.latest() == tmp_path / "checkpoints" / "step-00000100"


def test_recommitting_a_step_replaces_it(tmp_path):
    manager = CheckpointManager(tmp_path)
    save_checkpoint(manager, 4, payload="first")
    save_checkpoint(manager, 4, payload="second")
    assert (manager.latest() / "weights.txt").read_text() == "second"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-00000004"]


def test_pruning_leaves_newer_checkpoints_of_an_abandoned_timeline(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=1)
    for step in (1, 2, 3):
        save_checkpoint(manager, step)
    save_checkpoint(manager, 2)  # resumed from an earlier step and saved it again
    assert manager.latest().name == "step-00000002"
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == [
        "step-00000002",
        "step-00000003",
    ]


def test_commit_without_begin_fails(tmp_path):
    with pytest.raises(FileNotFoundError, match="begin"):
        CheckpointManager(tmp_path).commit(1)


def test_step_of(tmp_path):
    assert CheckpointManager.step_of(Path("checkpoints/step-00000012")) == 12
    with pytest.raises(ValueError):
        CheckpointManager.step_of(Path("checkpoints/.tmp-step-00000012"))


# --- RNG ----------------------------------------------------------------------------------------------


def draw() -> tuple:
    return torch.rand(5).tolist(), random.random(), np.random.rand(3).tolist()


def test_rng_round_trip_through_torch_save(tmp_path):
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    draw()
    torch.save(capture_rng_state(), tmp_path / "rng.pt")
    expected = draw()
    draw()  # move every generator on
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=False))
    assert draw() == expected


# --- metrics ------------------------------------------------------------------------------------------


def test_log_writes_one_json_line_per_call(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(1, {"loss": 0.5, "tokens": 12, "phase": "train", "clipped": False, "kl": None})
        logger.log(2, {"loss": np.float32(0.25), "reward": torch.tensor(1.5)})
    lines = metric_lines(tmp_path)
    assert len(lines) == 2
    assert json.loads(lines[0]) == {
        "step": 1,
        "loss": 0.5,
        "tokens": 12,
        "phase": "train",
        "clipped": False,
        "kl": None,
    }
    assert read_metrics(tmp_path)[1] == {"step": 2, "loss": 0.25, "reward": 1.5}


def test_log_rejects_step_key_and_odd_values(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        with pytest.raises(ValueError, match="step"):
            logger.log(1, {"step": 3})
        with pytest.raises(TypeError, match="weights"):
            logger.log(1, {"weights": [1, 2]})


def test_non_finite_values_become_null(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(1, {"loss": math.nan, "grad": math.inf, "low": -math.inf, "ok": 1.0})
    line = metric_lines(tmp_path)[0]
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in output")) == {
        "step": 1,
        "loss": None,
        "grad": None,
        "low": None,
        "ok": 1.0,
    }


def test_resume_drops_torn_line_and_steps_after_checkpoint(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        for step in range(1, 6):
            logger.log(step, {"loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')
    with MetricsLogger(tmp_path, tensorboard=False, resume_from_step=3) as logger:
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
        logger.log(4, {"loss": 40.0})
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["loss"] == 40.0
    assert len(metric_lines(tmp_path)) == 4


def test_reopen_without_resume_repairs_torn_line(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(1, {"loss": 1.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "lo')
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(2, {"loss": 2.0})
    assert [json.loads(line)["step"] for line in metric_lines(tmp_path)] == [1, 2]


def test_read_metrics_skips_torn_last_line_only(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert read_metrics(tmp_path) == [{"step": 1}, {"step": 2}]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=":2"):
        read_metrics(tmp_path)


def test_read_metrics_of_run_without_metrics(tmp_path):
    assert read_metrics(tmp_path) == []
    with pytest.raises(FileNotFoundError):
        read_metrics(tmp_path / "missing")


def test_tensorboard_event_files_appear(tmp_path):
    pytest.importorskip("tensorboard")
    with MetricsLogger(tmp_path) as logger:
        logger.log(1, {"loss": 0.5, "phase": "train"})
        logger.log(2, {"loss": 0.4})
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_missing_tensorboard_says_so_once_and_continues(tmp_path, monkeypatch, caplog):
    import tokencredit.runs as runs_module

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    monkeypatch.setattr(runs_module, "_TENSORBOARD_NOTED", False)
    with caplog.at_level("INFO", logger="tokencredit"):
        logger = MetricsLogger(tmp_path)
        MetricsLogger(tmp_path / "second").close()
    assert [r.levelname for r in caplog.records if "tokencredit[tensorboard]" in r.getMessage()] == ["INFO"]
    with logger:
        logger.log(1, {"loss": 0.5})
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 0.5}]
    assert not (tmp_path / "tensorboard").exists()


def test_wandb_requested_but_not_installed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match="pip install wandb"):
        MetricsLogger(tmp_path, tensorboard=False, wandb=True)


def test_wandb_run_id_is_stable_across_resumes(tmp_path, monkeypatch):
    calls = []

    class FakeRun:
        def __init__(self):
            self.logged = []
            self.finished = False

        def log(self, data, step):
            self.logged.append((step, data))

        def finish(self):
            self.finished = True

    def init(**kwargs):
        calls.append(kwargs)
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    with MetricsLogger(tmp_path, tensorboard=False, wandb=True, wandb_project="p", config={"a": 1}) as logger:
        logger.log(1, {"loss": 0.5, "phase": "train"})
        run = logger._wandb_run
    assert run.logged == [(1, {"loss": 0.5})] and run.finished
    MetricsLogger(tmp_path, tensorboard=False, wandb=True, wandb_project="p", resume_from_step=1).close()
    first, second = calls
    assert first["id"] == second["id"] == (tmp_path / "wandb_id.txt").read_text().strip()
    assert first["project"] == "p" and first["config"] == {"a": 1}
    assert first["resume"] == "allow" and first["dir"] == str(tmp_path)
