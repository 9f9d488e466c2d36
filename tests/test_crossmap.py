"""Token rewards of a reward model whose tokenizer differs from the policy's, mapped through characters."""

import random

import pytest
import torch

from tokencredit.models import load_tokenizer
from tokencredit.rewards.labels import map_rewards_by_chars, token_char_spans
from tokencredit.rewards.token_rm import TokenRewardModel
from tokencredit.testing import tiny_scalar_model

TEXT = "Naïve café: GPT-4o costs $20/month 😀"


@pytest.fixture(scope="module")
def smol():
    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def minilm():
    return load_tokenizer("all-minilm-l6-v2")


def test_hand_computed_mapping_keeps_the_sum():
    # Text "ab cd": source tokens "a" "b" " cd" and an empty special token; target tokens "ab" " c" "d" + EOS.
    source = [(0, 1), (1, 2), (2, 5), (5, 5)]
    target = [(0, 2), (2, 4), (4, 5), (5, 5)]
    out = map_rewards_by_chars(source, [1.0, 2.0, 4.0, 8.0], target)
    # "a" and "b" end inside "ab"; " cd" ends on "d"; the special token goes to the last target token (EOS).
    assert out == [3.0, 0.0, 4.0, 8.0]
    # A character covered by no target token (the space of a word-level tokenization) goes to the one before.
    assert map_rewards_by_chars([(2, 3)], [5.0], [(0, 2), (3, 5)]) == [5.0, 0.0]
    assert map_rewards_by_chars([(0, 1)], [1.0], []) == []
    with pytest.raises(ValueError, match="2 source spans but 1 rewards"):
        map_rewards_by_chars([(0, 1), (1, 2)], [1.0], [(0, 2)])


def test_tokenizations_differ_and_each_reward_lands_on_the_token_holding_its_last_character(smol, minilm):
    policy_ids = smol(TEXT, add_special_tokens=False)["input_ids"] + [smol.eos_token_id]
    text, policy_spans = token_char_spans(policy_ids, smol)
    assert text == TEXT
    enc = minilm(text, add_special_tokens=False, return_offsets_mapping=True)
    rm_spans = [tuple(o) for o in enc["offset_mapping"]]
    assert [text[a:b] for a, b in rm_spans] != [text[a:b] for a, b in policy_spans]  # really different
    rewards = [float(i + 1) for i in range(len(rm_spans))]
    mapped = map_rewards_by_chars(rm_spans, rewards, policy_spans)
    assert len(mapped) == len(policy_ids) and sum(mapped) == pytest.approx(sum(rewards))
    for (_start, end), reward in zip(rm_spans, rewards):
        holders = [i for i, (a, b) in enumerate(policy_spans) if a <= end - 1 < b]
        assert mapped[holders[0]] >= reward
    # "GPT": WordPiece "gp" "##t" both end inside SmolLM2's "PT" (after " G"), so their rewards add up there;
    # "20" is one WordPiece but "2" "0" in SmolLM2: its reward goes to "0", none to "2".
    pieces = {text[a:b]: i for i, (a, b) in enumerate(policy_spans)}
    gp, t = rewards[[text[a:b] for a, b in rm_spans].index("GP")], rewards[[text[a:b] for a, b in rm_spans].index("T")]
    assert mapped[pieces["PT"]] == pytest.approx(gp + t) and mapped[pieces[" G"]] == 0.0
    assert mapped[pieces["2"]] == 0.0 and mapped[pieces["0"]] == rewards[[text[a:b] for a, b in rm_spans].index("20")]


def test_reward_fn_maps_a_minilm_vocab_reward_model_onto_smollm2_tokens(smol, minilm):
    rng = random.Random(0)
    model = tiny_scalar_model(len(minilm), seed=0)
    torch.nn.init.normal_(model.head.weight)
    rm = TokenRewardModel.from_model(model, minilm)
    texts = [TEXT, "cheap flights to denver", "unbelievably fine-grained rewards"]
    policy_ids = [smol(t, add_special_tokens=False)["input_ids"] + [smol.eos_token_id] for t in texts]
    prompts = [f"query {rng.randint(0, 9)}" for _ in texts]
    with pytest.raises(ValueError, match="policy_tokenizer"):
        rm.as_reward_fn("token")(prompts, texts, policy_ids)  # SmolLM2 ids are outside MiniLM's vocabulary
    token_fn = rm.as_reward_fn("token", policy_tokenizer=smol)
    sequence_fn = rm.as_reward_fn("sequence", policy_tokenizer=smol)
    rows, sums = token_fn(prompts, texts, policy_ids), sequence_fn(prompts, texts, policy_ids)
    own = rm.score(prompts, texts)  # the RM on its own tokens of the same text, [SEP] appended
    for row, ids, total, mine in zip(rows, policy_ids, sums, own):
        assert len(row) == len(ids)
        assert sum(row) == pytest.approx(sum(mine), abs=1e-4) and total == pytest.approx(sum(mine), abs=1e-4)
        assert row[-1] == pytest.approx(mine[-1], abs=1e-5)  # the RM's end token lands on the policy's EOS
