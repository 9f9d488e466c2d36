import copy
import subprocess
import sys
import textwrap
import types
from types import SimpleNamespace

import pytest
import torch

from tokencredit import vllm_rollout
from tokencredit.generation import encode_prompts
from tokencredit.testing import tiny_causal_lm
from tokencredit.vllm_rollout import VLLMRollout, _to_generation_output, policy_weights

EOS = 2  # SmolLM2's <|im_end|>, also its pad token


@pytest.fixture(autouse=True)
def _sandbox_env(monkeypatch):
    # VLLMRollout sets this process-wide; let monkeypatch restore it after each test.
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


@pytest.fixture(scope="module")
def smol():
    from tokencredit.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


def lp(value):
    """Stand-in for vllm.logprobs.Logprob."""
    return SimpleNamespace(logprob=value, rank=1, decoded_token=None)


def completion(token_ids, logprobs, finish_reason, text, stop_reason=None):
    return SimpleNamespace(
        token_ids=list(token_ids), logprobs=logprobs, finish_reason=finish_reason, text=text, stop_reason=stop_reason
    )


def fake_vllm(outputs, version="0.33.0"):
    """A module standing in for vllm: LLM records its arguments and returns canned RequestOutputs."""
    module = types.ModuleType("vllm")
    module.__version__ = version

    class SamplingParams:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    class LLM:
        def __init__(self, **kwargs):
            self.init_kwargs = kwargs
            self.calls = []
            self.prefix_cache_resets = 0

        def generate(self, prompts, sampling_params, use_tqdm=True):
            self.calls.append(SimpleNamespace(prompts=prompts, params=sampling_params, use_tqdm=use_tqdm))
            return [SimpleNamespace(outputs=[c]) for c in outputs]

        def reset_prefix_cache(self):
            self.prefix_cache_resets += 1

    module.SamplingParams = SamplingParams
    module.LLM = LLM
    return module


# ---------------------------------------------------------------- without vllm


def test_constructing_without_vllm_raises_an_install_hint(monkeypatch, smol):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm now fails even where it is installed
    with pytest.raises(ImportError, match=r"tokencredit\[vllm\]") as info:
        VLLMRollout("some/model", smol)
    assert "default rollout backend" in str(info.value)


def test_importing_tokencredit_and_the_module_needs_no_vllm():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["vllm"] = None
        import tokencredit, tokencredit.vllm_rollout
        assert sys.modules["vllm"] is None
        assert hasattr(tokencredit.vllm_rollout, "VLLMRollout")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- conversion


def test_to_generation_output_pads_and_marks_each_way_of_ending():
    prompt_ids = torch.tensor([[0, 0, 7, 8], [0, 9, 9, 9], [5, 6, 7, 8]])
    prompt_mask = (prompt_ids != 0).long()
    out = _to_generation_output(
        prompt_ids,
        prompt_mask,
        token_ids=[[11, 12, EOS], [13, 14, 15, 16], [17, 18]],
        logprobs=[
            [{11: lp(-0.1)}, {12: lp(-0.2)}, {EOS: lp(-0.3)}],  # dicts of Logprob, as vLLM returns
            [{13: -1.0}, {14: -1.5}, {15: -2.0}, {16: -2.5}],  # dicts of floats
            [-0.7, -0.8],  # plain floats
        ],
        finish_reasons=["stop", "length", "stop"],
        texts=["eos row", "length row", "stop row STOP"],
        pad_id=0,
        stop_strings=["STOP"],
    )
    assert torch.equal(out.prompt_ids, prompt_ids) and torch.equal(out.prompt_mask, prompt_mask)
    assert out.response_ids.tolist() == [[11, 12, EOS, 0], [13, 14, 15, 16], [17, 18, 0, 0]]
    assert out.response_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    expected = torch.tensor([[-0.1, -0.2, -0.3, 0.0], [-1.0, -1.5, -2.0, -2.5], [-0.7, -0.8, 0.0, 0.0]])
    assert torch.allclose(out.logprobs, expected)
    assert out.logprobs.dtype == torch.float32
    assert out.finished.tolist() == [True, False, True]
    assert out.texts == ["eos row", "length row", "stop row "]
    assert out.token_ids() == [[11, 12, EOS], [13, 14, 15, 16], [17, 18]]


def test_to_generation_output_rejects_missing_or_misaligned_logprobs():
    ids, mask = torch.tensor([[1, 2]]), torch.ones(1, 2, dtype=torch.long)
    common = {"finish_reasons": ["length"], "texts": ["x"], "pad_id": 0}
    with pytest.raises(ValueError, match="1 logprobs"):
        _to_generation_output(ids, mask, token_ids=[[3, 4]], logprobs=[[-1.0]], **common)
    with pytest.raises(ValueError, match="no logprobs"):
        _to_generation_output(ids, mask, token_ids=[[3, 4]], logprobs=[None], **common)
    with pytest.raises(ValueError, match="sampled token 4"):
        _to_generation_output(ids, mask, token_ids=[[3, 4]], logprobs=[[{3: -1.0}, {5: -1.0}]], **common)


# ---------------------------------------------------------------- generate through a fake vllm


def test_generate_hands_unpadded_ids_to_vllm_and_pads_what_comes_back(monkeypatch, smol):
    answer, counting = smol.encode(" Paris."), smol.encode(" one two three")
    canned = [
        completion(answer + [EOS], [{t: lp(-0.5)} for t in answer + [EOS]], "stop", " Paris."),
        completion(counting, [{t: lp(-1.0)} for t in counting], "length", " one two three"),
    ]
    module = fake_vllm(canned)
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING")
    rollout = VLLMRollout("/models/smol", smol, seed=3, max_model_len=512)
    assert rollout.llm.init_kwargs == {
        "model": "/models/smol",
        "gpu_memory_utilization": 0.3,
        "dtype": "auto",
        "seed": 3,
        "max_model_len": 512,
        "enforce_eager": False,
        "logprobs_mode": "processed_logprobs",
    }
    import os

    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"

    prompts = ["What is the capital of France?", "Count:"]
    out = rollout.generate(
        prompts, max_new_tokens=16, temperature=0.7, top_k=5, top_p=0.9, stop_strings=["\n\n"], eos_ids=[EOS]
    )

    (call,) = rollout.llm.calls
    assert call.prompts == [{"prompt_token_ids": smol(p)["input_ids"]} for p in prompts]
    assert call.use_tqdm is False
    params = call.params
    assert (params.n, params.max_tokens, params.temperature, params.top_k, params.top_p) == (1, 16, 0.7, 5, 0.9)
    assert params.logprobs == 0 and params.stop_token_ids == [EOS] and params.stop == ["\n\n"]
    assert params.include_stop_str_in_output is False and params.skip_special_tokens is True

    ids, mask = encode_prompts(smol, prompts)
    assert torch.equal(out.prompt_ids, ids) and torch.equal(out.prompt_mask, mask)
    width = max(len(answer) + 1, len(counting))
    assert out.response_ids.shape == out.response_mask.shape == out.logprobs.shape == (2, width)
    assert out.token_ids() == [answer + [EOS], counting]  # the EOS token stays in the response
    assert out.response_ids[0, len(answer)].item() == EOS and out.response_mask[0, len(answer)].item() == 1
    assert out.logprobs[0, : len(answer) + 1].eq(-0.5).all() and out.logprobs[0, len(answer) + 1 :].eq(0).all()
    assert out.logprobs[1, : len(counting)].eq(-1.0).all() and out.logprobs[1, len(counting) :].eq(0).all()
    assert out.finished.tolist() == [True, False]
    assert out.texts == [" Paris.", " one two three"]


def test_generate_greedy_truncation_and_bad_arguments(monkeypatch, smol):
    canned = [completion([EOS], [{EOS: lp(0.0)}], "stop", "")]
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm(canned))
    rollout = VLLMRollout("m", smol)
    prompt = "one two three four five"
    out = rollout.generate([prompt], max_new_tokens=4, greedy=True, temperature=0.0, max_prompt_length=3, eos_ids=[EOS])
    (call,) = rollout.llm.calls
    assert call.params.temperature == 0.0 and call.params.stop is None
    # Over-long prompts lose their beginning, as with the plain sampler.
    assert call.prompts == [{"prompt_token_ids": smol(prompt)["input_ids"][-3:]}]
    assert out.prompt_ids.shape == (1, 3) and out.token_ids() == [[EOS]] and out.finished.tolist() == [True]
    with pytest.raises(ValueError, match="temperature"):
        rollout.generate([prompt], max_new_tokens=4, temperature=0.0, eos_ids=[EOS])
    with pytest.raises(ValueError, match="max_new_tokens"):
        rollout.generate([prompt], max_new_tokens=0, eos_ids=[EOS])
    with pytest.raises(ValueError, match="eos_ids"):
        rollout.generate([prompt], max_new_tokens=4, eos_ids=[])


def test_old_vllm_warns_that_its_logprobs_ignore_temperature(monkeypatch, smol):
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm([], version="0.10.0"))
    with pytest.warns(UserWarning, match="0.10.1"):
        VLLMRollout("m", smol)


# ---------------------------------------------------------------- sync_weights


class RecordingModel:
    def __init__(self):
        self.loaded = {}

    def load_weights(self, weights):
        for name, tensor in weights:
            self.loaded[name] = tensor.clone()
        return set(self.loaded)


def rollout_with_engine(monkeypatch, smol, llm):
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm([]))
    rollout = VLLMRollout("m", smol)
    rollout.llm = llm
    return rollout


def in_process_llm(model):
    worker = SimpleNamespace(worker=SimpleNamespace(model_runner=SimpleNamespace(model=model)))
    llm = SimpleNamespace(llm_engine=SimpleNamespace(model_executor=SimpleNamespace(driver_worker=worker)))
    llm.resets = 0

    def reset_prefix_cache():
        llm.resets += 1

    llm.reset_prefix_cache = reset_prefix_cache
    return llm


def test_sync_weights_loads_a_plain_policy_in_process(monkeypatch, smol):
    policy = tiny_causal_lm(vocab_size=20)
    target = RecordingModel()
    rollout = rollout_with_engine(monkeypatch, smol, in_process_llm(target))
    rollout.sync_weights(policy)
    expected = dict(policy.named_parameters())
    assert set(target.loaded) == set(expected)
    assert all(torch.equal(target.loaded[n], p) for n, p in expected.items())
    assert rollout.llm.resets == 1


def test_sync_weights_merges_lora_without_touching_the_policy(monkeypatch, smol):
    from peft import LoraConfig, get_peft_model

    base = tiny_causal_lm(vocab_size=20)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    policy = get_peft_model(base, config)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for name, param in policy.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    expected = dict(copy.deepcopy(policy).merge_and_unload().named_parameters())

    target = RecordingModel()
    rollout_with_engine(monkeypatch, smol, in_process_llm(target)).sync_weights(policy)

    assert set(target.loaded) == set(expected)
    for name, param in expected.items():
        assert torch.allclose(target.loaded[name], param, atol=1e-6), name
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(target.loaded[q], base.model.layers[0].self_attn.q_proj.base_layer.weight)
    after = dict(policy.named_parameters())
    assert set(after) == set(before) and all(torch.equal(after[n], t) for n, t in before.items())
    assert not any(getattr(m, "merged", False) for m in policy.modules())


def test_policy_weights_falls_back_to_a_merged_copy_for_dora(smol):
    from peft import LoraConfig, get_peft_model

    policy = get_peft_model(tiny_causal_lm(vocab_size=20), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.fill_(0.1)
    expected = dict(copy.deepcopy(policy).merge_and_unload().named_parameters())
    got = dict(policy_weights(policy))
    assert set(got) == set(expected) and all(torch.allclose(got[n], p, atol=1e-6) for n, p in expected.items())


def test_sync_weights_uses_collective_rpc_when_the_engine_is_out_of_process(monkeypatch, smol):
    policy = tiny_causal_lm(vocab_size=20)
    worker_model = RecordingModel()
    calls = []

    def collective_rpc(method, timeout=None, args=(), kwargs=None):
        calls.append(method)
        return [method(SimpleNamespace(model_runner=SimpleNamespace(model=worker_model)), *args)]

    llm = SimpleNamespace(llm_engine=SimpleNamespace(), collective_rpc=collective_rpc)
    rollout_with_engine(monkeypatch, smol, llm).sync_weights(policy)
    assert len(calls) == 1
    assert set(worker_model.loaded) == {n for n, _ in policy.named_parameters()}
    assert all(t.device.type == "cpu" for t in worker_model.loaded.values())


def test_sync_weights_names_the_vllm_version_when_no_path_exists(monkeypatch, smol):
    rollout = rollout_with_engine(monkeypatch, smol, SimpleNamespace(llm_engine=SimpleNamespace()))
    with pytest.raises(RuntimeError, match=r"vLLM 0\.33\.0"):
        rollout.sync_weights(tiny_causal_lm(vocab_size=20))


def test_version_parsing():
    assert vllm_rollout._version_tuple("0.10.1rc2+cu128") == (0, 10, 1)
    assert vllm_rollout._version_tuple("0.33.0") == (0, 33, 0)
    assert vllm_rollout._version_tuple("unknown") == ()


def test_saved_policy_folder_loads_as_the_merged_policy(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tokencredit.testing import tiny_word_tokenizer
    from tokencredit.vllm_rollout import save_policy_folder

    tok = tiny_word_tokenizer(["a", "b", "c"])
    policy = get_peft_model(tiny_causal_lm(vocab_size=len(tok)),
                            LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    policy.eval()
    folder = save_policy_folder(policy, tok, tmp_path / "vllm_model")
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([[3, 4, 5, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, policy(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        with policy.disable_adapter():
            base_logits = policy(input_ids=ids).logits
    assert not torch.allclose(loaded(input_ids=ids).logits, base_logits, atol=1e-3)  # the adapter is in it
    assert not any(getattr(m, "merged", False) for m in policy.modules())
    assert (folder / "tokenizer.json").is_file()
