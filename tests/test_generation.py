import pytest
import torch

from tokencredit.generation import encode_prompts, filter_logits, generate
from tokencredit.rl.rollout import response_logits, token_logprobs
from tokencredit.testing import tiny_causal_lm, tiny_word_tokenizer

WORDS = "a b c d e f g h i j k l".split()


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_word_tokenizer(WORDS)
    model = tiny_causal_lm(len(tok), seed=1, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return model, tok


def force(tok, words):
    """A processor that forces `words` one per step (the roll-in hook), then lets the model go on."""
    ids = tok.convert_tokens_to_ids(words)

    def proc(seq, scores):
        step = seq.size(1) - proc.prompt_len
        if step < len(ids):
            forced = torch.full_like(scores, float("-inf"))
            forced[:, ids[step]] = 0.0
            return forced
        return scores

    return proc


def test_left_padding_does_not_change_greedy_outputs(tiny):
    model, tok = tiny
    prompts = ["a", "b c d e f g", "h i"]
    batched = generate(model, tok, prompts, max_new_tokens=6, greedy=True)
    for i, p in enumerate(prompts):
        alone = generate(model, tok, [p], max_new_tokens=6, greedy=True)
        n = int(alone.response_mask.sum())
        assert batched.response_ids[i, :n].tolist() == alone.response_ids[0, :n].tolist()
        assert int(batched.response_mask[i].sum()) == n
        assert torch.allclose(batched.logprobs[i, :n], alone.logprobs[0, :n], atol=1e-5)


def test_sampling_logprobs_match_a_full_forward(tiny):
    model, tok = tiny
    g = torch.Generator().manual_seed(0)
    out = generate(model, tok, ["a b", "c d e f"], max_new_tokens=8, temperature=0.7, generator=g)
    ids = torch.cat([out.prompt_ids, out.response_ids], 1)
    attn = torch.cat([out.prompt_mask, out.response_mask], 1)
    with torch.no_grad():
        lp = token_logprobs(response_logits(model, ids, attn, out.response_ids.size(1)), out.response_ids, 0.7)
    mask = out.response_mask.bool()
    assert torch.allclose(lp[mask], out.logprobs[mask], atol=1e-5)
    assert (out.logprobs[~mask] == 0).all()


def test_logits_processor_forces_prefix_and_stop_string_cuts_text(tiny):
    model, tok = tiny
    proc = force(tok, ["a", "b", "c", "d", "e"])
    prompts = ["f g", "h"]
    ids, mask = encode_prompts(tok, prompts)
    proc.prompt_len = ids.size(1)
    out = generate(model, tok, prompt_ids=ids, prompt_mask=mask, max_new_tokens=8, logits_processors=[proc],
                   stop_strings=["c"])
    # The stop token stays in the ids (so it can be learned); the text is cut before it.
    assert out.token_ids() == [tok.convert_tokens_to_ids(["a", "b", "c"])] * 2
    assert [t.strip() for t in out.texts] == ["a b", "a b"]
    assert out.finished.all()
    assert torch.allclose(out.logprobs[:, :3], torch.zeros(2, 3))  # forced tokens have probability 1


def test_eos_ends_rows_and_pads_after(tiny):
    model, tok = tiny
    proc = force(tok, ["a", "<eos>"])
    ids = tok(["b", "c"], return_tensors="pt", padding=True)
    proc.prompt_len = ids["input_ids"].size(1)
    out = generate(model, tok, prompt_ids=ids["input_ids"], prompt_mask=ids["attention_mask"], max_new_tokens=5,
                   logits_processors=[proc])
    assert out.response_ids.size(1) == 2  # stopped early: every row finished
    assert out.token_ids() == [[tok.convert_tokens_to_ids("a"), tok.eos_token_id]] * 2
    assert out.texts == ["a", "a"]
    assert out.finished.all()


def test_length_limited_rows_are_not_finished(tiny):
    model, tok = tiny
    # Forbid EOS: every row must run to max_new_tokens.
    def no_eos(seq, scores):
        scores[:, tok.eos_token_id] = float("-inf")
        return scores

    out = generate(model, tok, ["a", "b"], max_new_tokens=4, logits_processors=[no_eos],
                   generator=torch.Generator().manual_seed(0))
    assert out.response_mask.sum().item() == 8
    assert not out.finished.any()


def test_top_k_one_is_greedy(tiny):
    model, tok = tiny
    greedy = generate(model, tok, ["a b c"], max_new_tokens=5, greedy=True)
    top1 = generate(model, tok, ["a b c"], max_new_tokens=5, top_k=1, generator=torch.Generator().manual_seed(3))
    assert greedy.token_ids() == top1.token_ids()


def test_filter_logits_top_k_and_top_p_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    k2 = filter_logits(logits, top_k=2)
    assert torch.isinf(k2[0, 2:]).all() and torch.isfinite(k2[0, :2]).all()
    p = filter_logits(logits, top_p=0.75)  # 0.5 < 0.75 so the 0.3 token is still needed; 0.8 >= 0.75 stops
    assert torch.isfinite(p[0, :2]).all() and torch.isinf(p[0, 2:]).all()
    assert torch.isfinite(filter_logits(logits, top_p=0.1)[0, 0])  # the best token always survives


def test_bad_arguments():
    tok = tiny_word_tokenizer(WORDS)
    model = tiny_causal_lm(len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, tok, ["a"], temperature=0)
    with pytest.raises(TypeError, match="list of strings"):
        generate(model, tok, "a")


def test_encode_prompts_keeps_the_limit_below_the_tokenizers_special_tokens():
    from tokencredit.models import load_tokenizer

    bert = load_tokenizer("all-minilm-l6-v2")  # adds [CLS] ... [SEP]: a limit of 1 or 2 cannot hold both
    for limit in (1, 2, 5):
        ids, mask = encode_prompts(bert, ["a fairly long prompt about pens and pranks", "short"], max_length=limit)
        assert ids.shape == (2, limit) and mask.shape == (2, limit)
        assert ids[0, -1].item() == bert.sep_token_id  # the end of the prompt is what is kept
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        encode_prompts(bert, ["a b c"], max_length=0)


def test_sample_next_draws_from_the_softmax_and_never_a_filtered_token():
    from tokencredit.generation import sample_next

    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 3.0, -20.0])
    scores = logits.repeat(20000, 1)
    gen = torch.Generator().manual_seed(0)
    tok, logp = sample_next(scores, greedy=False, temperature=1.0, top_k=0, top_p=1.0, generator=gen)
    freq = torch.bincount(tok, minlength=6).float() / len(tok)
    torch.testing.assert_close(freq, logits.softmax(-1), atol=0.012, rtol=0)
    torch.testing.assert_close(logp, logits.log_softmax(-1)[tok])
    tok, _ = sample_next(scores, greedy=False, temperature=1.0, top_k=2, top_p=1.0, generator=gen)
    assert set(tok.tolist()) == {0, 4}, "top-k filtered tokens are never drawn"
    again, _ = sample_next(scores[:50], greedy=False, temperature=0.7, top_k=0, top_p=1.0,
                           generator=torch.Generator().manual_seed(3))
    same, _ = sample_next(scores[:50], greedy=False, temperature=0.7, top_k=0, top_p=1.0,
                          generator=torch.Generator().manual_seed(3))
    assert torch.equal(again, same), "seeded"
