"""What a new user meets first: hub ids and downloads, merged LoRA saves, prompts from any column, quiet runs."""

import json
import logging
import warnings

import pytest
import torch

import tokencredit.models as models
from tokencredit import PPOConfig, PPOTrainer
from tokencredit.models import (
    LoraSettings,
    ModelNotFoundError,
    downloads_allowed,
    hub_id_of,
    record_base_model,
    resolve_model,
    save_merged,
    wrap_with_lora,
)
from tokencredit.testing import tiny_causal_lm, tiny_word_tokenizer


def test_a_missing_hub_id_says_how_to_allow_the_download_and_a_missing_folder_does_not(tmp_path, monkeypatch):
    monkeypatch.delenv("TOKENCREDIT_ALLOW_DOWNLOAD", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("someone/not-cached-model")
    assert "TOKENCREDIT_ALLOW_DOWNLOAD=1" in str(err.value) and "hf download someone/not-cached-model" in str(err.value)
    assert "huggingface-cli" not in str(err.value)
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model(str(tmp_path / "no" / "such" / "folder"))
    assert "does not exist" in str(err.value) and "download" not in str(err.value)


def test_downloads_happen_only_when_allowed(tmp_path, monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, local_files_only=False, **kwargs):
        calls.append((repo_id, local_files_only))
        if local_files_only:
            raise FileNotFoundError("not cached")
        folder = tmp_path / "snapshot"
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text("{}")
        return str(folder)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.delenv("TOKENCREDIT_ALLOW_DOWNLOAD", raising=False)
    assert not downloads_allowed()
    with pytest.raises(ModelNotFoundError):
        resolve_model("org/model")
    assert calls == [("org/model", True)]  # only the cache was asked
    assert resolve_model("org/model", allow_download=True) == tmp_path / "snapshot"
    monkeypatch.setenv("TOKENCREDIT_ALLOW_DOWNLOAD", "1")
    assert downloads_allowed() and resolve_model("org/model") == tmp_path / "snapshot"
    assert calls[-1] == ("org/model", False)


def tiny():
    tok = tiny_word_tokenizer("a b c d".split())
    return tiny_causal_lm(len(tok), seed=0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id), tok


def test_adapters_name_the_base_models_hub_id_and_merge_into_a_plain_folder(tmp_path, monkeypatch):
    assert hub_id_of("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id_of("org/model") == "org/model" and hub_id_of("./local/folder") is None
    model, tok = tiny()
    policy = wrap_with_lora(model, models.lora_config(model, LoraSettings(r=2)))
    record_base_model(policy, "smollm2-135m-instruct")
    # Saving never asks the Hub about that id (peft's default would, to see whether the vocabulary changed).
    import peft.utils.save_and_load as peft_save

    asked = []
    monkeypatch.setattr(peft_save, "check_file_exists_on_hf_hub", lambda *a, **k: asked.append(a))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Could not find a config file in ..." would fail here
        models.save_hf_policy(policy, tok, tmp_path / "adapter")
    assert asked == []
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"

    with torch.no_grad():  # make the adapters matter, so merging is visible in the outputs
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
    ids = torch.tensor([[1, 2, 3]])
    policy.eval()  # no adapter dropout
    with torch.no_grad():
        expected = policy(input_ids=ids).logits
    save_merged(policy, tok, tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, expected, atol=1e-5)
    assert any("lora_" in name for name, _ in policy.named_parameters())  # the live policy keeps its adapters


def test_wrapping_with_lora_prints_no_deprecation_warning():
    model, _ = tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrap_with_lora(model, models.lora_config(model, LoraSettings(r=2)))


class Column:
    """Like a datasets/pandas column: iterable and sized, but its truth value is an error."""

    def __init__(self, values):
        self.values = list(values)

    def __iter__(self):
        return iter(self.values)

    def __len__(self):
        return len(self.values)

    def __bool__(self):
        raise ValueError("the truth value of a column is ambiguous")


def test_prompts_may_come_from_a_dataset_column(tmp_path):
    model, tok = tiny()
    policy = wrap_with_lora(model, models.lora_config(model, LoraSettings(r=2)))
    config = PPOConfig(output_dir=str(tmp_path / "run"), batch_size=2, num_updates=1, max_new_tokens=2,
                       progress=False, log_tensorboard=False, mixed_precision="no")
    trainer = PPOTrainer(config, policy, tok, Column(["a b", "c d"]), lambda p, r, ids: [1.0] * len(p))
    assert trainer.prompts == ["a b", "c d"]
    with pytest.raises(ValueError, match="non-empty list of strings"):
        PPOTrainer(config, policy, tok, Column([1, 2]), lambda p, r, ids: [1.0] * len(p))


def test_the_cli_keeps_absl_quiet_and_the_download_flag_sets_the_variable(monkeypatch, capsys):
    from tokencredit.cli import main

    # setenv first, so that teardown restores the variable's absence after main() sets it.
    monkeypatch.setenv("TOKENCREDIT_ALLOW_DOWNLOAD", "0")
    main(["--allow-download", "rlgf", "task=nothing"])  # a config error, after the global settings applied
    import os

    assert os.environ.get("TOKENCREDIT_ALLOW_DOWNLOAD") == "1"
    assert logging.getLogger("absl").level == logging.WARNING


@pytest.mark.parametrize("module,cls,field", [("tppo", "DemoConfig", "model"), ("rlgf", "RLGFConfig", "model"),
                                              ("pgg", "PGGRecipeConfig", "model"), ("fg", "FGConfig", "model"),
                                              ("ser", "SERRecipeConfig", "policy_model")])
def test_fast_with_a_model_contradicts_itself_and_is_refused(module, cls, field):
    import importlib

    config_class = getattr(importlib.import_module(f"tokencredit.recipes.{module}"), cls)
    with pytest.raises(ValueError, match=f"would ignore {field}='gpt2'"):
        config_class(fast=True, **{field: "gpt2"}).validate()


def test_demo_flags_fast_and_model_are_refused_together(capsys):
    from tokencredit.cli import main

    assert main(["demo", "--fast", "--model", "gpt2"]) == 2
    assert "would ignore model='gpt2'" in capsys.readouterr().err


def test_progress_bars_carry_the_stage_name(tmp_path, capsys):
    model, tok = tiny()
    policy = wrap_with_lora(model, models.lora_config(model, LoraSettings(r=2)))
    config = PPOConfig(output_dir=str(tmp_path / "tppo"), batch_size=2, num_updates=1, max_new_tokens=2,
                       progress=True, log_tensorboard=False, mixed_precision="no")
    PPOTrainer(config, policy, tok, ["a b", "c d"], lambda p, r, ids: [1.0] * len(p)).train()
    assert "ppo tppo" in capsys.readouterr().err


def test_a_built_in_models_hub_id_resolves_to_the_built_in_copy():
    assert resolve_model("sentence-transformers/all-MiniLM-L6-v2") == resolve_model("all-minilm-l6-v2")
