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
