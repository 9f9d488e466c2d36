"""A huge data line is refused or cut on its length, never tokenized whole; texts that fit keep the same ids."""

import json
import random
import re
import time

import pytest
from tokenizers import Tokenizer, decoders, normalizers
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast

from tokencredit.commands.sft import SFTRunConfig, load_sft_data
from tokencredit.generation import encode_prompts
from tokencredit.models import load_tokenizer
from tokencredit.rewards.labels import SpanLabel, spans_to_token_labels
from tokencredit.rewards.token_rm import TokenRewardModel
from tokencredit.rl.sft import tokenize_examples
from tokencredit.testing import tiny_scalar_model, tiny_word_tokenizer
from tokencredit.textbounds import (
    _bound_from_json,
    encode_within,
    head_within,
    max_chars_per_token,
    tail_within,
)

WORDS = "the reward model reads every token of a response and credits each one , with gains".split()
HUGE = 5_000_000  # characters: tokenizing this whole takes seconds and ~700 MB; the line had 30 MB
LONG = 300_000  # characters: far over the limits below, yet cheap enough to tokenize whole for comparison


@pytest.fixture(scope="module")
def smol():
    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture
def seen(smol, monkeypatch):
    """Lengths of the texts the SmolLM2 tokenizer is called on during the test."""
    lengths = []
    call = type(smol).__call__

    def spy(self, text, *args, **kwargs):
        lengths.extend(len(t) for t in ([text] if isinstance(text, str) else text))
        return call(self, text, *args, **kwargs)

    monkeypatch.setattr(type(smol), "__call__", spy)
    return lengths


def prose(n_chars, seed=0):
    rng = random.Random(seed)
    words = []
    size = 0
    while size < n_chars:
        words.append(rng.choice(WORDS))
        size += len(words[-1]) + 1
    return " ".join(words)[:n_chars]


def test_smollm2_bound_holds_on_texts_made_of_its_longest_tokens(smol):
    bound = max_chars_per_token(smol)
    assert bound == 81  # "\n" + 80 spaces is its longest token
    rng = random.Random(0)
    pieces = ["\n" + " " * 300, " " * 200, "#" * 500, "=" * 300, "-" * 90, "<|im_start|>", "<|im_end|>", "é",
              "e\u0301", "😀", "token", "\t\t\t", "\n\n\n"]
    for _ in range(200):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 20)))
        assert len(text) <= bound * len(smol(text, add_special_tokens=False)["input_ids"])


def test_no_bound_where_unknown_tokens_or_dropped_characters_make_any_length_fit():
    assert max_chars_per_token(tiny_word_tokenizer(["a"])) is None  # word-level: one <unk> per word, spaces dropped
    bpe = {"type": "BPE", "vocab": {"a": 0, "abc": 1}, "unk_token": None}
    assert _bound_from_json({"model": bpe}) == 3
    assert _bound_from_json({"model": {**bpe, "unk_token": "<unk>", "fuse_unk": True}}) is None
    assert _bound_from_json({"model": {**bpe, "unk_token": "<unk>", "fuse_unk": False}}) == 3
    assert _bound_from_json({"model": {"type": "WordPiece", "vocab": {"a": 0}}}) is None
    assert _bound_from_json({"model": bpe, "normalizer": {"type": "NFC"}}) == 12  # up to 4 characters compose
    assert _bound_from_json({"model": bpe, "normalizer": {"type": "StripAccents"}}) is None
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    assert _bound_from_json({"model": bpe, "normalizer": {"type": "Sequence", "normalizers": [replace]}}) == 3
    assert _bound_from_json({"model": bpe, "normalizer": {**replace, "content": ""}}) is None
    assert _bound_from_json({"model": bpe, "pre_tokenizer": {"type": "Whitespace"}}) is None
    assert _bound_from_json({"model": bpe, "pre_tokenizer": {"type": "Split", "behavior": "Removed"}}) is None
    added = {"content": "<|a long special token|>", "normalized": False}
    assert _bound_from_json({"model": bpe, "added_tokens": [added]}) == len(added["content"])
    assert _bound_from_json({"model": bpe, "added_tokens": [{**added, "lstrip": True}]}) is None


def test_composing_normalizer_and_byte_fallback_bound_holds():
    # Llama-style: spaces become "▁", unknown characters fall back to bytes; NFC merges "e" + accent into one.
    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    for token in ["\u2581", "e", "é", "ab", "\u2581ab", "ééé"]:
        vocab[token] = len(vocab)
    merges = [("a", "b"), ("\u2581", "ab"), ("é", "é"), ("éé", "é")]
    vocab.update({"a": len(vocab), "b": len(vocab) + 1, "éé": len(vocab) + 2})
    backend = Tokenizer(BPE(vocab, merges, unk_token=None, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(" ", "\u2581")])
    backend.decoder = decoders.ByteFallback()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    bound = max_chars_per_token(tok)
    assert bound == 4 * 6  # "<0xE2>" is the longest vocabulary string; NFC may merge 4 characters into one
    for text in ["e\u0301" * 300, " ab" * 100, "ẽ\u0301\u0323" * 50, "zzz 漢字 é"]:
        assert len(text) <= bound * len(tok(text)["input_ids"])


def test_a_huge_sft_response_line_is_refused_by_file_and_line_without_tokenizing_it(tmp_path, smol, seen):
    data = tmp_path / "pairs.jsonl"
    lines = [{"prompt": "Say hi.", "response": "Hi!"}, {"prompt": "Write a lot.", "response": prose(HUGE)}]
    data.write_text("".join(json.dumps(r) + "\n" for r in lines))
    prompts, responses, names = load_sft_data(SFTRunConfig(data=str(data)))
    start = time.perf_counter()
    where = re.escape(f"{data}:2")
    with pytest.raises(ValueError, match=rf"{where}: the response is more than 511 tokens long .* max_length=512"):
        tokenize_examples(smol, prompts, responses, 512, names)
    assert time.perf_counter() - start < 2.0  # tokenizing it whole took ~5 s and ~700 MB here
    assert max(seen) < 100_000  # only bounded texts reached the tokenizer


def test_sft_ids_are_unchanged_for_texts_that_fit_and_for_cut_prompts(smol, seen):
    prompts = ["Write a lot.", prose(2000, seed=1), prose(LONG, seed=2)]
    responses = ["Hi!", prose(300, seed=3), prose(200, seed=4)]
    examples = tokenize_examples(smol, prompts, responses, 128)
    assert max(seen) < 100_000
    eos = smol.eos_token_id
    for example, prompt, response in zip(examples, prompts, responses):
        full_response = smol(response, add_special_tokens=False)["input_ids"] + [eos]
        assert example.response_ids == full_response
        # Prompts keep their last tokens, the same as cutting the whole prompt's tokens (the LONG one too).
        assert example.prompt_ids == smol(prompt)["input_ids"][-(128 - len(full_response)):]
    assert len(examples[0].prompt_ids) == len(smol(prompts[0])["input_ids"])  # a prompt that fits is kept whole


def test_encode_prompts_cuts_a_huge_prompt_to_the_same_last_tokens(smol, seen):
    short, long = prose(100, seed=5), prose(LONG, seed=6)
    ids, mask = encode_prompts(smol, [short, long, prose(HUGE, seed=7)], max_length=64)
    assert max(seen) < 100_000
    assert ids[1].tolist() == smol(long)["input_ids"][-64:] and mask[1:].all()
    short_ids = smol(short)["input_ids"]
    assert ids[0, -len(short_ids):].tolist() == short_ids and int(mask[0].sum()) == len(short_ids)


def test_reward_model_responses_keep_the_same_first_tokens_and_labels(smol, seen):
    rm = TokenRewardModel.from_model(tiny_scalar_model(len(smol)), smol)
    fits, long = prose(400, seed=8), prose(LONG, seed=9)
    spans = [SpanLabel(0, 5, -1), SpanLabel(30, 60, 1), SpanLabel(LONG - 50, LONG, -1)]
    assert rm.encode_response(fits, 511) == rm.encode_response(fits)  # EOS included, nothing cut
    head = rm.encode_response(long, 511)
    labelled = spans_to_token_labels(long, spans, smol, max_tokens=100)
    assert spans_to_token_labels(fits, spans, smol, max_tokens=511) == spans_to_token_labels(fits, spans, smol)
    rm.encode_response(prose(HUGE, seed=10), 511)
    assert max(seen) < 100_000
    assert head == rm.encode_response(long)[:511] and smol.eos_token_id not in head
    whole_ids, whole_labels = spans_to_token_labels(long, spans, smol)
    assert labelled == (whole_ids[:100], whole_labels[:100])


def test_helpers_leave_texts_that_may_fit_alone(smol):
    text = prose(81 * 10)
    assert head_within(smol, text, 10) == text and tail_within(smol, text, 10) == text
    assert len(head_within(smol, text * 3, 10)) == 2 * 81 * 10 and tail_within(smol, text * 3, 10).endswith(text)
    assert encode_within(smol, ["a b", "x" * (81 * 10 + 1)], 10, add_special_tokens=False) == [
        smol("a b", add_special_tokens=False)["input_ids"], None]
    word = tiny_word_tokenizer(["a"])  # no bound: texts go to the tokenizer whole, as before
    assert head_within(word, "a " * 1000, 1) == "a " * 1000
    assert encode_within(word, ["a " * 1000], 1, add_special_tokens=False) == [[3] * 1000]


def test_reward_train_length_check_refuses_a_huge_response_without_tokenizing_it(tmp_path, smol, seen):
    from tokencredit.commands.reward import RewardRunConfig, check_lengths
    from tokencredit.rewards.data import RewardDataError

    data = tmp_path / "pairs.jsonl"
    lines = [{"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Go away."},
             {"prompt": "Write a lot.", "chosen": prose(HUGE), "rejected": "No."}]
    data.write_text("".join(json.dumps(r) + "\n" for r in lines))
    cfg = RewardRunConfig(data=str(data), kind="sequence", max_length=512)
    start = time.perf_counter()
    with pytest.raises(RewardDataError, match=rf"{re.escape(str(data))}:2: a response is more than 511 tokens long"):
        check_lengths(cfg, smol, None)
    assert time.perf_counter() - start < 2.0
    assert max(seen) < 100_000


def test_ppo_position_check_reads_a_bounded_end_of_a_huge_prompt(smol, seen):
    from types import SimpleNamespace

    from tokencredit.rl.ppo import PPOConfig, _check_positions

    policy = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=64))
    with pytest.raises(ValueError, match=r"prompt 1 is over \d+ tokens \(kept: 60\)"):
        _check_positions(policy, smol, ["hi", prose(HUGE)], PPOConfig(max_prompt_length=60, max_new_tokens=8))
    _check_positions(policy, smol, ["hi", prose(HUGE)], PPOConfig(max_prompt_length=40, max_new_tokens=8))
    assert max(seen) < 100_000
