"""Tiny, random, offline models and tokenizers for fast tests and the fast demo mode.

They load in milliseconds and need no files, so a whole RL loop can run in seconds on a CPU. Their
outputs are meaningless, but deterministic given the seed.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel, PreTrainedModel, PreTrainedTokenizerFast

from tokencredit.models import ScalarHeadModel

SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")
"""Ids 0, 1 and 2 of every tiny tokenizer."""


def tiny_word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: ``<pad>``=0, ``<eos>``=1, ``<unk>``=2, then ``words``; left padding."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    # Whitespace splits punctuation off words too, so "a, b" gives "a" "," "b".
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    # No decoder on purpose: the tokenizers library then joins tokens with single spaces.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    return tokenizer


def _tiny_llama_config(
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    eos_token_id: int | None,
    pad_token_id: int | None,
) -> LlamaConfig:
    """Config shared by the tiny policy and the tiny scalar model."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=None,
    )


def _seeded(seed: int, build: type[PreTrainedModel], config: LlamaConfig) -> PreTrainedModel:
    """Build a model from a private RNG so the caller's random state is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build(config).eval()


def tiny_causal_lm(
    vocab_size: int,
    seed: int = 0,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> PreTrainedModel:
    """Random-init LlamaForCausalLM (intermediate 64, 512 positions, untied head), deterministic in seed."""
    config = _tiny_llama_config(vocab_size, hidden_size, num_layers, num_heads, eos_token_id, pad_token_id)
    return _seeded(seed, LlamaForCausalLM, config)


def tiny_scalar_model(vocab_size: int, seed: int = 0, hidden_size: int = 32) -> ScalarHeadModel:
    """ScalarHeadModel over a random tiny LlamaModel; its zero head makes every initial output 0."""
    config = _tiny_llama_config(vocab_size, hidden_size, 2, 4, None, None)
    return ScalarHeadModel.from_backbone(_seeded(seed, LlamaModel, config))


def save_tiny_causal_lm(folder: str | Path, words: list[str]) -> Path:
    """Save a tiny random causal LM with a word tokenizer over ``words`` to ``folder``, loadable by name."""
    tok = tiny_word_tokenizer(words)
    model = tiny_causal_lm(len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return Path(folder)


def toy_preference_pairs(n: int, rng: random.Random) -> list[dict]:
    """``n`` {prompt, chosen, rejected} records over x/y words where chosen holds more "y": a learnable preference."""
    pairs: list[dict] = []
    while len(pairs) < n:
        a, b = (" ".join(rng.choice("xy") for _ in range(rng.randint(2, 5))) for _ in range(2))
        if a.count("y") != b.count("y"):
            chosen, rejected = (a, b) if a.count("y") > b.count("y") else (b, a)
            pairs.append({"prompt": rng.choice("abcd"), "chosen": chosen, "rejected": rejected})
    return pairs
