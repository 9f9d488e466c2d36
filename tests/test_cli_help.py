"""Every subcommand's --help lists each setting of its config dataclass: type, default and description."""

import importlib
from dataclasses import dataclass

import pytest

from tokencredit.cli import main
from tokencredit.commands import COMMANDS as TABLE
from tokencredit.config import describe_fields, field_docs

COMMANDS = {"ppo": "PPORunConfig", "sft": "SFTRunConfig", "demo": "DemoConfig", "fg": "FGConfig",
            "reward": "RewardRunConfig", "evolve": "EvolveConfig", "rlgf": "RLGFConfig", "pgg": "PGGRecipeConfig",
            "ser": "SERRecipeConfig", "judge": "JudgeRunConfig", "evaluate": "EvaluateConfig", "serve": "ServeConfig"}


def config_class(name):
    module, _, attr = next(c.config for c in TABLE.values() if c.config.endswith(f":{name}")).partition(":")
    return getattr(importlib.import_module(module), attr)


@pytest.mark.parametrize("command,config", sorted(COMMANDS.items()))
def test_help_lists_every_field_with_type_default_and_description(command, config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    rows = describe_fields(config_class(config))
    assert rows
    for key, tp, default, doc in rows:
        assert f"  {key}  ({tp}; default {default})" in out, key
        assert doc, f"{config}.{key} has no description: add a '# ...' comment to the field"
        assert doc.split()[0] in out
    assert "%%" not in out


@dataclass
class _Documented:
    # not used: the trailing comment wins
    a: int = 1  # trailing wins
    # first line
    # second line
    b: int = 2
    # --- section ---
    c: int = 3


@dataclass
class _Child(_Documented):
    d: int = 4  # added by the child


def test_descriptions_come_from_trailing_comments_or_the_lines_above():
    assert field_docs(_Documented) == {"a": "trailing wins", "b": "first line second line", "c": ""}
    assert field_docs(_Child) == {**field_docs(_Documented), "d": "added by the child"}


def test_every_command_of_the_table_is_a_subcommand_with_its_help_tested():
    assert set(TABLE) == set(COMMANDS)
    assert all(TABLE[name].config.endswith(f":{config}") for name, config in COMMANDS.items())
