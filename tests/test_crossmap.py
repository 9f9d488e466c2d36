"""Token rewards of a reward model whose tokenizer differs from the policy's, mapped through characters."""

import random

import pytest
import torch

from tokencredit.models import load_tokenizer
from tokencredit.rewards.labels import map_rewards_by_chars
from tokencredit.rewards.token_rm import TokenRewardModel
from tokencredit.testing import tiny_scalar_model
from tokencredit.token_text import token_char_spans

TEXT = "Naïve café: GPT-4o costs $20/month 😀"


@pytest.fixture(scope="module")
def smol():
    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def minilm():
    return load_tokenizer("all-minilm-l6-v2")


def test_hand_computed_mapping_takes_the_mean():
    # Issue 29: a target token gets the MEAN of the source tokens it shares characters with, no longer their sum
    # (a sum paid a word once per piece it was cut into); so the old expectations below changed.
    # Text "ab cd": source tokens "a" "b" " cd" and an empty special token; target tokens "ab" " c" "d" + EOS.
    source = [(0, 1), (1, 2), (2, 5), (5, 5)]
    target = [(0, 2), (2, 4), (4, 5), (5, 5)]
    out = map_rewards_by_chars(source, [1.0, 2.0, 4.0, 8.0], target)
    # "ab" holds "a" and "b"; " c" and "d" both hold characters of " cd"; the empty special token meets the empty
    # target token at the same place (the policy's EOS).
    assert out == [1.5, 4.0, 4.0, 8.0]
    # A target token no source token reaches carries the value before it (``start`` for the first), so a constant
    # reward stays constant; a source token on characters no target holds (a join space) is not counted.
    assert map_rewards_by_chars([(2, 3)], [5.0], [(0, 2), (3, 5)]) == [0.0, 0.0]
    assert map_rewards_by_chars([(0, 1), (3, 5)], [0.5, 0.5], [(0, 1), (1, 3), (3, 5)], start=0.5) == [0.5] * 3
    assert map_rewards_by_chars([(0, 1)], [1.0], []) == []
    with pytest.raises(ValueError, match="2 source spans but 1 rewards"):
        map_rewards_by_chars([(0, 1), (1, 2)], [1.0], [(0, 2)])


def test_tokenizations_differ_and_each_token_gets_the_mean_of_the_rm_tokens_it_overlaps(smol, minilm):
    policy_ids = smol(TEXT, add_special_tokens=False)["input_ids"] + [smol.eos_token_id]
    text, policy_spans = token_char_spans(policy_ids, smol)
    assert text == TEXT
    enc = minilm(text, add_special_tokens=False, return_offsets_mapping=True)
    rm_spans = [tuple(o) for o in enc["offset_mapping"]]
    assert [text[a:b] for a, b in rm_spans] != [text[a:b] for a, b in policy_spans]  # really different
    rewards = [float(i + 1) for i in range(len(rm_spans))]
    mapped = map_rewards_by_chars(rm_spans, rewards, policy_spans)
    # Issue 29: means, not sums, so the totals differ and every value stays within the RM's range.
    assert len(mapped) == len(policy_ids) and min(rewards) <= min(mapped) <= max(mapped) <= max(rewards)
    # "GPT": WordPiece "gp" "##t" against SmolLM2's " G" "PT": " G" shares "G" with "gp" alone, "PT" shares
    # characters with both; "20" is one WordPiece but "2" "0" in SmolLM2: each gets its reward, undivided.
    pieces = {text[a:b]: i for i, (a, b) in enumerate(policy_spans)}
    gp, t = rewards[[text[a:b] for a, b in rm_spans].index("GP")], rewards[[text[a:b] for a, b in rm_spans].index("T")]
    assert mapped[pieces["PT"]] == pytest.approx((gp + t) / 2) and mapped[pieces[" G"]] == gp
    twenty = rewards[[text[a:b] for a, b in rm_spans].index("20")]
    assert mapped[pieces["2"]] == mapped[pieces["0"]] == twenty


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
        assert len(row) == len(ids) and total == pytest.approx(sum(row), abs=1e-4)
        assert row[-1] == pytest.approx(mine[-1], abs=1e-5)  # the RM's end token lands on the policy's EOS
    # Issue 29: each policy token is scored on its prefix's text alone, so the row no longer sums to the RM's
    # total. SmolLM2 "che" "ap" " flights" " to" " den" "ver" vs WordPiece "cheap" "flights" "to" "denver": where
    # a prefix ends on a word boundary it reads as the whole text does (the tiny RM is causal), elsewhere ("che",
    # " den") the RM reads a word not yet finished.
    assert [smol.decode([i]) for i in policy_ids[1][:-1]] == ["che", "ap", " flights", " to", " den", "ver"]
    assert [rows[1][k] for k in (1, 2, 3, 5)] == pytest.approx(own[1][:4], abs=1e-5)
