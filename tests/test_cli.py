import json
import textwrap

import pytest
import yaml

from tokencredit.cli import main
from tokencredit.runs import read_metrics
from tokencredit.testing import tiny_causal_lm, tiny_word_tokenizer

WORDS = "a b c d e f g h".split()


@pytest.fixture
def setup(tmp_path):
    tok = tiny_word_tokenizer(WORDS)
    model = tiny_causal_lm(len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "prompts.jsonl").write_text(
        "\n".join(json.dumps({"prompt": f"{w} b", "ref": "a a"}) for w in WORDS) + "\n"
    )
    (tmp_path / "reward.py").write_text(textwrap.dedent(
        """
        def reward(prompts, responses, ids):
            return [float(r.split().count("a")) for r in responses]
        """
    ))
    config = {
        "model": str(tmp_path / "model"), "prompts": str(tmp_path / "prompts.jsonl"),
        "reward": f"{tmp_path / 'reward.py'}:reward", "batch_size": 4, "mini_batch_size": 2, "num_updates": 3,
        "max_new_tokens": 4, "ppo_epochs": 1, "save_every": 1, "log_tensorboard": False, "progress": False,
        "lora": None, "learning_rate": 1e-3, "output_dir": str(tmp_path / "run"),
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def test_cli_ppo_runs_from_yaml_with_overrides(setup, capsys):
    assert main(["ppo", "--config", str(setup / "run.yaml"), "num_updates=2", "reference_field=ref",
                 "target_coef=0.1"]) == 0
    metrics = read_metrics(setup / "run")
    assert [m["step"] for m in metrics] == [1, 2]
    assert "loss/target_nll" in metrics[0]
    saved = yaml.safe_load((setup / "run" / "config.yaml").read_text())
    assert saved["num_updates"] == 2 and saved["target_coef"] == 0.1 and saved["model"] == str(setup / "model")
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["updates"] == 2


def test_cli_resume_continues_to_more_updates(setup):
    assert main(["ppo", "--config", str(setup / "run.yaml"), "num_updates=2"]) == 0
    assert main(["ppo", "--config", str(setup / "run.yaml"), "num_updates=3", "resume=true"]) == 0
    assert [m["step"] for m in read_metrics(setup / "run")] == [1, 2, 3]


def test_cli_errors_are_clear(setup, capsys):
    assert main(["ppo", "--config", str(setup / "run.yaml"), "learning_rat=1"]) == 2
    assert "learning_rate" in capsys.readouterr().err
    assert main(["ppo", "--config", str(setup / "run.yaml"), "reward=nope.py:f"]) == 2
    assert "nope.py does not exist" in capsys.readouterr().err
    assert main(["ppo", "--config", str(setup / "run.yaml"), f"model={setup / 'missing'}"]) == 2
    assert "missing" in capsys.readouterr().err
    (setup / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": 3}\n')
    assert main(["ppo", "--config", str(setup / "run.yaml"), f"prompts={setup / 'bad.jsonl'}"]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err


def one_error_line(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("tokencredit: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_checkpoint_refusals_are_one_error_line_not_a_traceback(setup, capsys):
    import torch

    run = ["ppo", "--config", str(setup / "run.yaml"), "num_updates=2"]
    assert main(run) == 0
    ckpts = sorted((setup / "run" / "checkpoints").glob("step-*"))
    state = torch.load(ckpts[-1] / "trainer_state.pt", weights_only=True)
    state["rng"] = Planted(str(setup / "pwned"))
    torch.save(state, ckpts[-1] / "trainer_state.pt")
    capsys.readouterr()
    assert main([*run, "num_updates=3", "resume=true"]) == 2
    assert "refusing to load" in one_error_line(capsys)
    assert not (setup / "pwned").exists()
    for ckpt in (setup / "run" / "checkpoints").glob("step-*"):
        (ckpt / "trainer_state.pt").write_bytes(b"")
    assert main([*run, "num_updates=3", "resume=true"]) == 2
    assert "could be loaded" in one_error_line(capsys)


class Planted:
    """A payload that would create a file if it were ever unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_full_disk_is_one_error_line_naming_the_file(setup, capsys, monkeypatch):
    import errno

    import tokencredit.rl.ppo as ppo_module

    def full(path, state):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ppo_module, "save_trainer_state", full)
    assert main(["ppo", "--config", str(setup / "run.yaml"), "num_updates=2"]) == 2
    line = one_error_line(capsys)
    assert "No space left on device" in line and "trainer_state.pt" in line and "resume=true" in line
