"""The run loop every trainer shares (rl/trainer_base.py), on a toy trainer: steps, logs, checkpoints, resume."""

import dataclasses
import json
from pathlib import Path

import pytest
from torch import nn

from tokencredit.distributed import ProcessGroup
from tokencredit.rl.pgg_trainer import PGGConfig, PGGTrainer
from tokencredit.rl.ppo import PPOConfig, PPOTrainer
from tokencredit.rl.sft import SFTConfig, SFTTrainer
from tokencredit.rl.trainer_base import RunSettings, Trainer
from tokencredit.runs import load_trainer_state, save_trainer_state


class Counter(Trainer):
    """Counts its steps; crashes at step ``fail_at`` (0-based) to test resume."""

    name = "count"

    def __init__(self, config: RunSettings, total: int = 5, fail_at: int | None = None) -> None:
        self.config, self.group, self.tokenizer = config, ProcessGroup(), None
        self.policy = nn.Linear(1, 1)
        self.total, self.fail_at, self.ran = total, fail_at, []
        self._init_run()

    @property
    def total_steps(self) -> int:
        return self.total

    def train_step(self) -> dict:
        if self.steps_done == self.fail_at:
            raise RuntimeError("crash")
        self.ran.append(self.steps_done)
        return {"value": float(self.steps_done) * 10}

    def save_policy(self, path):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "steps.txt").write_text(str(self.steps_done))

    def _write_checkpoint(self, tmp):
        save_trainer_state(tmp / "trainer_state.pt", {"steps": self.steps_done})

    def load_checkpoint(self, path):
        self.steps_done = int(load_trainer_state(Path(path) / "trainer_state.pt")["steps"])


def settings(tmp_path, **kw):
    return RunSettings(output_dir=str(tmp_path / "run"), save_every=2, progress=False, log_tensorboard=False, **kw)


def test_the_loop_logs_every_step_checkpoints_on_schedule_and_saves_the_policy(tmp_path):
    seen = []
    trainer = Counter(settings(tmp_path))
    history = trainer.train(before_step=lambda t: seen.append(t.steps_done))
    assert seen == [0, 1, 2, 3, 4] and trainer.ran == [0, 1, 2, 3, 4]
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5] and history[2]["value"] == 20.0
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5]
    # every save_every steps and the last one; keep_checkpoints=2 keeps the newest two
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*")) == ["step-00000004",
                                                                                         "step-00000005"]
    assert (tmp_path / "run" / "policy" / "steps.txt").read_text() == "5"


def test_a_crashed_run_resumes_from_its_last_checkpoint_and_ends_as_an_uninterrupted_one(tmp_path):
    with pytest.raises(RuntimeError):
        Counter(settings(tmp_path), fail_at=3).train()
    again = Counter(settings(tmp_path, resume=True))
    history = again.train()
    assert again.ran == [2, 3, 4]  # steps 0 and 1 came from the checkpoint at step 2
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5]
    assert [h["value"] for h in history] == [0.0, 10.0, 20.0, 30.0, 40.0]


def test_a_record_key_puts_the_step_number_into_the_logged_metrics(tmp_path):
    class Updates(Counter):
        record_key = "update"

    history = Updates(settings(tmp_path), total=2).train()
    assert history == [{"update": 1, "value": 0.0}, {"update": 2, "value": 10.0}]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[1]["step"] == 2 and lines[1]["update"] == 2


def test_run_settings_are_checked_and_shared_by_every_trainer_config():
    with pytest.raises(ValueError, match="save_every"):
        RunSettings(save_every=0).validate_run()
    shared = {f.name for f in dataclasses.fields(RunSettings)}
    for config, trainer in ((PPOConfig, PPOTrainer), (SFTConfig, SFTTrainer), (PGGConfig, PGGTrainer)):
        assert issubclass(config, RunSettings) and issubclass(trainer, Trainer)
        assert shared <= {f.name for f in dataclasses.fields(config)}
        with pytest.raises(ValueError, match="keep_checkpoints"):
            config(keep_checkpoints=0).validate()
    # each keeps its own defaults where they differ
    assert (PPOConfig().save_every, SFTConfig().save_every, PGGConfig().save_every) == (10, 50, 20)
