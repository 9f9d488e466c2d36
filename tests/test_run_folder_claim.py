"""A run folder belongs to one run: fresh runs refuse occupied folders unless told to overwrite, and resume
refuses changed settings unless told otherwise."""

import pytest
import yaml

from tokencredit.run_folders import changed_settings, claim_run_folder, holds_run
from tokencredit.runs import RunFolderError


def occupied(tmp_path, settings=None):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(settings or {"learning_rate": 0.001, "batch_size": 8}))
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    return run


def test_fresh_run_into_an_empty_or_missing_folder_is_fine(tmp_path):
    assert not holds_run(tmp_path / "nothing")
    claim_run_folder(tmp_path / "nothing", {}, resume=False)()
    (tmp_path / "empty").mkdir()
    claim_run_folder(tmp_path / "empty", {}, resume=False)()


def test_fresh_run_into_an_occupied_folder_is_refused_and_touches_nothing(tmp_path):
    run = occupied(tmp_path)
    with pytest.raises(RunFolderError, match="already holds a run.*resume=true.*overwrite=true"):
        claim_run_folder(run, {}, resume=False)
    assert (run / "metrics.jsonl").exists() and (run / "checkpoints").is_dir()


def test_overwrite_keeps_the_old_run_aside_until_the_first_checkpoint(tmp_path):
    run = occupied(tmp_path)
    after_first_checkpoint = claim_run_folder(run, {}, resume=False, overwrite=True)
    assert run.is_dir() and not holds_run(run)  # the new run starts in an empty folder
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and (aside[0] / "metrics.jsonl").exists()  # a crash now loses nothing
    after_first_checkpoint()
    assert not aside[0].exists()


def test_resume_refuses_changed_settings_naming_them(tmp_path):
    run = occupied(tmp_path, {"learning_rate": 0.001, "batch_size": 8, "num_updates": 10, "lora": {"r": 8}})
    claim_run_folder(run, {"learning_rate": 0.001, "batch_size": 8, "num_updates": 20, "lora": {"r": 8}}, resume=True)
    with pytest.raises(RunFolderError, match=r"batch_size: 8 -> 16; learning_rate: 0.001 -> 0.01; lora.r: 8 -> 4"):
        claim_run_folder(run, {"learning_rate": 0.01, "batch_size": 16, "num_updates": 10, "lora": {"r": 4}},
                         resume=True)
    claim_run_folder(run, {"learning_rate": 0.01}, resume=True, allow_changed_settings=True)
    assert yaml.safe_load((run / "config.yaml").read_text())["learning_rate"] == 0.001  # nothing rewritten


def test_changed_settings_ignores_length_and_logging():
    assert changed_settings({"num_updates": 5, "progress": True, "seed": 1}, {"num_updates": 9, "progress": False,
                                                                               "seed": 1}) == []


def test_a_setting_added_later_resumes_at_its_default_but_not_changed():
    # A run saved before reward_unfinished existed must resume when the new setting is left at its default.
    saved = {"learning_rate": 0.001, "lora": {"r": 8}}
    defaults = {"learning_rate": 0.01, "reward_unfinished": "none", "lora": {"r": 8, "alpha": 16}}
    assert changed_settings(saved, {"learning_rate": 0.001, "reward_unfinished": "none",
                                    "lora": {"r": 8, "alpha": 16}}, defaults=defaults) == []
    assert changed_settings(saved, {"learning_rate": 0.001, "reward_unfinished": "eos", "lora": {"r": 8, "alpha": 32}},
                            defaults=defaults) == ["lora.alpha: None -> 32", "reward_unfinished: None -> 'eos'"]
    # without defaults every new key is a change, as before
    assert changed_settings(saved, {"learning_rate": 0.001, "reward_unfinished": "none", "lora": {"r": 8}}) == [
        "reward_unfinished: None -> 'none'"]


def test_demo_config_defaults_let_an_older_run_folder_resume(tmp_path):
    from tokencredit.config import config_defaults, config_to_dict
    from tokencredit.recipes.tppo import DemoConfig

    settings = config_to_dict(DemoConfig())
    older = {k: v for k, v in settings.items() if k != "reward_unfinished"}
    run = occupied(tmp_path, older)
    claim_run_folder(run, settings, resume=True, defaults=config_defaults(DemoConfig))
    with pytest.raises(RunFolderError, match="reward_unfinished"):
        claim_run_folder(run, {**settings, "reward_unfinished": "eos"}, resume=True,
                         defaults=config_defaults(DemoConfig))


def test_a_default_that_changed_after_a_run_was_saved_is_not_taken_for_its_behaviour(tmp_path):
    # reward_repeat arrived with default "clip"; runs saved before it did "keep", so resuming one with the new
    # default would silently change its reward: refused, while asking for "keep" resumes.
    from tokencredit.config import config_defaults, config_to_dict
    from tokencredit.recipes.tppo import DemoConfig

    settings = config_to_dict(DemoConfig())
    assert settings["reward_repeat"] == "clip" and config_defaults(DemoConfig)["reward_repeat"] == "keep"
    run = occupied(tmp_path, {k: v for k, v in settings.items() if k != "reward_repeat"})
    with pytest.raises(RunFolderError, match="reward_repeat: None -> 'clip'"):
        claim_run_folder(run, settings, resume=True, defaults=config_defaults(DemoConfig))
    claim_run_folder(run, {**settings, "reward_repeat": "keep"}, resume=True, defaults=config_defaults(DemoConfig))


def test_claim_folder_for_a_config_judges_older_runs_by_its_class_defaults(tmp_path):
    # the one call the recipes, SER and the trainers share: settings, resume flags and defaults from the config
    from tokencredit.config import claim_folder_for, config_to_dict
    from tokencredit.recipes.tppo import DemoConfig

    saved = {k: v for k, v in config_to_dict(DemoConfig()).items() if k not in ("reward_repeat", "reward_unfinished")}
    run = occupied(tmp_path, saved)
    with pytest.raises(RunFolderError, match="reward_repeat"):
        claim_folder_for(DemoConfig(resume=True), run)
    claim_folder_for(DemoConfig(resume=True, reward_repeat="keep"), run)
    claim_folder_for(DemoConfig(resume=True, allow_changed_settings=True), run)
    with pytest.raises(RunFolderError, match="already holds a run"):
        claim_folder_for(DemoConfig(), run)
