from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from tokencredit.config import ConfigError, config_to_dict, load_config, save_config


@dataclass
class LoraSettings:
    r: int = 8
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class TrainConfig:
    model: str = "HuggingFaceTB/SmolLM2-135M"
    learning_rate: float = 1e-5
    kl_coef: float = 0.05
    steps: int = 100
    resume: bool = False
    seed: int | None = None
    stop_strings: list[str] = field(default_factory=list)
    reward_weights: list[float] = field(default_factory=lambda: [1.0])
    credit: Literal["token", "sequence"] = "token"
    output_dir: Path = Path("runs/default")
    lora: LoraSettings | None = None

    def validate(self) -> None:
        if self.steps <= 0:
            raise ConfigError(f"steps must be positive, got {self.steps}")


@dataclass
class WithDefaultSection:
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(r=4))


@dataclass
class NeedsModel:
    model: str
    steps: int = 1


def write_yaml(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_defaults_when_nothing_given():
    assert load_config(TrainConfig) == TrainConfig()


def test_precedence_defaults_base_file_overrides(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"kl_coef": 0.2, "steps": 30})
    base = {"kl_coef": 0.1, "steps": 20, "learning_rate": 3e-4}
    cfg = load_config(TrainConfig, path, ["steps=40"], base=base)
    assert cfg.learning_rate == 3e-4  # base beats default
    assert cfg.kl_coef == 0.2  # file beats base
    assert cfg.steps == 40  # override beats file
    assert cfg.model == TrainConfig().model  # untouched default


def test_override_values_parsed_as_yaml():
    cfg = load_config(
        TrainConfig,
        overrides=["kl_coef=0.1", "resume=true", 'stop_strings=["\\n", "</s>"]', "model=foo/bar", "seed=7"],
    )
    assert cfg.kl_coef == 0.1
    assert cfg.resume is True
    assert cfg.stop_strings == ["\n", "</s>"]
    assert cfg.model == "foo/bar"
    assert cfg.seed == 7


def test_override_value_may_contain_equals_sign():
    assert load_config(TrainConfig, overrides=["model=a=b"]).model == "a=b"


def test_coercions():
    cfg = load_config(
        TrainConfig,
        overrides=["learning_rate=1", "reward_weights=[1, 0.5]", "output_dir=/tmp/x", "seed=null"],
    )
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert cfg.reward_weights == [1.0, 0.5] and all(isinstance(w, float) for w in cfg.reward_weights)
    assert cfg.output_dir == Path("/tmp/x")
    assert cfg.seed is None


def test_exponent_without_dot_is_a_float():
    # YAML 1.1 reads 1e-5 as a string; a learning rate written that way must still work.
    assert load_config(TrainConfig, overrides=["learning_rate=1e-5"]).learning_rate == 1e-5


def test_str_field_keeps_the_text_yaml_would_change():
    assert load_config(TrainConfig, overrides=["model=2024"]).model == "2024"
    assert load_config(TrainConfig, overrides=["model=yes"]).model == "yes"


def test_unknown_override_suggests_closest_key():
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, overrides=["learning_rat=1"])
    message = str(info.value)
    assert "learning_rat" in message
    assert "command line" in message
    assert "Did you mean 'learning_rate'" in message
    assert "kl_coef" in message  # valid keys are listed


def test_unknown_file_key_names_the_file(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", {"kl_cof": 0.1})
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, path)
    assert str(path) in str(info.value)
    assert "'kl_coef'" in str(info.value)


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        load_config(TrainConfig, overrides=["nope=1"])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("steps=1.5", "int"),
        ("steps=true", "int"),
        ("resume=1", "bool"),
        ("kl_coef=abc", "float"),
        ("reward_weights=[1, x]", "float"),
        ("stop_strings=5", "list[str]"),
    ],
)
def test_wrong_type_names_key_type_and_value(override, expected):
    key, _, value = override.partition("=")
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, overrides=[override])
    message = str(info.value)
    assert key in message
    assert expected in message
    assert "got" in message


def test_wrong_type_in_file(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"steps": "many"})
    with pytest.raises(ConfigError, match=r"'steps'.*must be int \(got 'many'\)"):
        load_config(TrainConfig, path)


def test_literal_accepts_listed_values_only():
    assert load_config(TrainConfig, overrides=["credit=sequence"]).credit == "sequence"
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, overrides=["credit=sentence"])
    assert "credit" in str(info.value)
    assert "'token', 'sequence'" in str(info.value)
    assert "sentence" in str(info.value)


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="kl_coef"):
        load_config(TrainConfig, overrides=["kl_coef"])


def test_dotted_override_creates_default_section():
    cfg = load_config(TrainConfig, overrides=["lora.r=16"])
    assert cfg.lora == LoraSettings(r=16)


def test_nested_section_from_file_then_override(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"lora": {"r": 4, "targets": ["q_proj"]}})
    cfg = load_config(TrainConfig, path, ["lora.alpha=8"])
    assert cfg.lora == LoraSettings(r=4, alpha=8.0, targets=["q_proj"])


def test_nested_override_keeps_non_none_default_section():
    cfg = load_config(WithDefaultSection, overrides=["lora.alpha=2"])
    assert cfg.lora == LoraSettings(r=4, alpha=2.0)


def test_nested_section_can_be_switched_off(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"lora": {"r": 4}})
    assert load_config(TrainConfig, path, ["lora=null"]).lora is None


def test_nested_unknown_key_and_wrong_type():
    with pytest.raises(ConfigError, match=r"'lora\.rr'.*Did you mean 'lora\.r'"):
        load_config(TrainConfig, overrides=["lora.rr=16"])
    with pytest.raises(ConfigError, match=r"'lora\.r'.*must be int"):
        load_config(TrainConfig, overrides=["lora.r=big"])


def test_dotted_key_on_plain_field_is_an_error():
    with pytest.raises(ConfigError, match="not a section"):
        load_config(TrainConfig, overrides=["steps.x=1"])


def test_validate_is_called():
    with pytest.raises(ConfigError, match="steps must be positive"):
        load_config(TrainConfig, overrides=["steps=0"])


def test_missing_required_key():
    with pytest.raises(ConfigError, match="model"):
        load_config(NeedsModel)
    assert load_config(NeedsModel, overrides=["model=x"]).model == "x"


def test_file_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, path)
    assert str(path) in str(info.value) and "mapping" in str(info.value)


def test_file_that_does_not_parse(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("steps: [1, 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(TrainConfig, path)


def test_empty_file_means_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n", encoding="utf-8")
    assert load_config(TrainConfig, path) == TrainConfig()


def test_save_load_round_trip(tmp_path):
    cfg = load_config(
        TrainConfig,
        overrides=["lora.r=16", 'stop_strings=["\\n"]', "credit=sequence", "seed=3", "output_dir=out/run1"],
    )
    path = tmp_path / "sub" / "config.yaml"
    save_config(cfg, path)
    assert load_config(TrainConfig, path) == cfg
    text = path.read_text(encoding="utf-8")
    assert text.index("model:") < text.index("lora:")  # declaration order, not sorted
    assert "output_dir: out/run1" in text
    assert not list(path.parent.glob(".*.tmp"))  # the temp file was renamed into place


def test_config_to_dict_gives_plain_values():
    data = config_to_dict(TrainConfig(lora=LoraSettings()))
    assert data["output_dir"] == "runs/default"
    assert data["lora"] == {"r": 8, "alpha": 16.0, "targets": ["q_proj", "v_proj"]}
    yaml.safe_dump(data)  # plain types only, or this raises
