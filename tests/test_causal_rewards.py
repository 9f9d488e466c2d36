"""Issue 29, "causal everywhere": a PPO token reward r_t reads the prompt and y<=t only, in every path and option.

Backbones: a tiny causal LM with a word tokenizer (the policy's own), a tiny causal LM over SmolLM2's BPE (the
policy's own), and two reward models with MiniLM's WordPiece under the SmolLM2 policy tokenizer: a tiny causal LM
and the real MiniLM encoder (run causally by TokenRewardModel). The last two go through score_for_policy.
"""

import random

import pytest
import torch

from tokencredit.config import load_config
from tokencredit.models import load_tokenizer
from tokencredit.recipes.tppo import DemoConfig
from tokencredit.rewards.token_rm import TokenRewardModel, repeated_words
from tokencredit.testing import tiny_scalar_model, tiny_word_tokenizer

WORDS = "a b the of x y civil war".split()
# SmolLM2 pieces that re-tokenize differently once followed by more text (" bas" "ket" is one WordPiece word,
# " civil" "ian" one word, " 😀" is two byte pieces), plus whitespace and punctuation.
PIECES = ["civil", " civil", "ian", " war", ",", " G", "PT", "-", "4", "o", " 😀", " café", "........", " =",
          "===", " bas", "ket", "ball", "\n", " the"]
BACKBONES = ["same-words", "same-bpe", "cross-causal", "cross-encoder"]
OPTIONS = [
    {},
    {"center": 0.3},
    {"eos": "keep"},
    {"eos": "zero"},
    {"repeats": "keep"},
    # a negative centre makes every reward positive, so that clipping (at most 0) always shows
    {"repeats": "clip", "center": -50.0},
    {"repeats": "clip_words", "center": -50.0},
    {"unfinished": -1.0},
]


@pytest.fixture(scope="module")
def smol():
    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def minilm():
    return load_tokenizer("all-minilm-l6-v2")


def _random_head(rm, seed=0, std=1.0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.nn.init.normal_(rm.model.head.weight, std=std)
        torch.nn.init.normal_(rm.model.head.bias, std=std)
    return rm


_MADE: dict = {}


def make_backbone(name, smol, minilm):
    """(reward model, policy tokenizer, piece ids responses are built from) for a backbone name."""
    if name not in _MADE:
        if name == "same-words":
            tok = tiny_word_tokenizer(WORDS)
            rm, policy = TokenRewardModel.from_model(tiny_scalar_model(len(tok)), tok), tok
            pieces = [[i] for i in tok.convert_tokens_to_ids(WORDS)]
        else:
            if name == "same-bpe":
                rm = TokenRewardModel.from_model(tiny_scalar_model(len(smol)), smol)
            elif name == "cross-causal":
                rm = TokenRewardModel.from_model(tiny_scalar_model(len(minilm)), minilm)
            else:
                rm = TokenRewardModel.from_pretrained("all-minilm-l6-v2")
            policy, pieces = smol, [smol.encode(p, add_special_tokens=False) for p in PIECES]
        _MADE[name] = (_random_head(rm), policy, pieces)
    return _MADE[name]


def ids_of(policy, *pieces):
    return [i for p in pieces for i in policy.encode(p, add_special_tokens=False)]


def responses(policy, pieces, rng):
    """A few responses: designed ones that merge across tokens, and random piece sequences."""
    if len(policy) < 100:  # the word tokenizer
        fixed = [ids_of(policy, "civil war civil civil the"), ids_of(policy, "a b the of civil x")]
    else:
        fixed = [ids_of(policy, "civil", " civil", "ian", " bas", "ket", " 😀", "\n", " civil"),
                 ids_of(policy, " 😀", " G", "PT", "-", "4", "........", " =", "===")]
    return fixed + [[i for _ in range(4) for i in rng.choice(pieces)]]


def continuations(policy, pieces, rng):
    """Non-empty continuations: the end token alone, and random pieces."""
    return [[policy.eos_token_id], [i for _ in range(3) for i in rng.choice(pieces)]]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
@pytest.mark.parametrize("backbone", BACKBONES)
def test_changing_tokens_after_t_never_changes_the_rewards_up_to_t(backbone, options, smol, minilm):
    rm, policy, pieces = make_backbone(backbone, smol, minilm)
    rng = random.Random(f"{backbone}{options}")
    fn = rm.as_reward_fn("token", policy_tokenizer=policy, **options)
    batch, cuts = [], []
    for ids in responses(policy, pieces, rng):
        for k in range(1, len(ids)):
            # the response itself and other continuations of its first k tokens
            group = [ids] + [ids[:k] + c for c in continuations(policy, pieces, rng)]
            cuts.append((len(batch), len(group), k))
            batch += group
    rows = fn(["the prompt"] * len(batch), [""] * len(batch), batch)
    for first, n, k in cuts:
        for row, ids in zip(rows[first + 1 : first + n], batch[first + 1 : first + n]):
            assert row[:k] == pytest.approx(rows[first][:k], rel=1e-5, abs=1e-5), (
                backbone, options, policy.decode(batch[first][:k]), "|", policy.decode(ids[k:]))


@pytest.mark.parametrize("bounded", [False, True])
@pytest.mark.parametrize("backbone", ["cross-causal", "cross-encoder"])
def test_a_constant_reward_model_gives_its_constant_on_every_policy_token(backbone, bounded, smol, minilm):
    rm, policy, _ = make_backbone(backbone, smol, minilm)
    const = TokenRewardModel(rm.model, rm.tokenizer, bounded=bounded)
    head = const.model.head
    saved = head.weight.detach().clone(), head.bias.detach().clone()
    try:
        with torch.no_grad():
            head.weight.zero_()
            head.bias.fill_(0.5)
        value = torch.sigmoid(torch.tensor(0.5)).item() if bounded else 0.5
        # Word pieces ("........" was 4.0 and "================" 8.0 when RM rewards were summed, " bas" 0.0), a
        # byte piece first (nothing before it to carry), whitespace a WordPiece RM drops, finished or not.
        texts = [["........"], [" =", "===", "============"], [" bas"], [" 😀", " hi"], ["\n", "\n", "x"],
                 ["Na", "ïve", " café", ":", " G", "PT", "-", "4", "o", " 😀"]]
        batch = [ids_of(policy, *t) + end for t in texts for end in ([], [policy.eos_token_id])]
        for prompt in ("the prompt", ""):
            rows = const.as_reward_fn("token", policy_tokenizer=policy)([prompt] * len(batch), [""] * len(batch),
                                                                        batch)
            for row, ids in zip(rows, batch):
                assert row == pytest.approx([value] * len(ids), abs=1e-6), policy.decode(ids)
    finally:
        with torch.no_grad():
            head.weight.copy_(saved[0])
            head.bias.copy_(saved[1])


@pytest.mark.parametrize("backbone", ["cross-causal", "cross-encoder"])
def test_a_bounded_reward_model_maps_into_0_1(backbone, smol, minilm):
    rm, policy, pieces = make_backbone(backbone, smol, minilm)
    bounded = TokenRewardModel(rm.model, rm.tokenizer, bounded=True)
    rng = random.Random(1)
    batch = responses(policy, pieces, rng) + [ids_of(policy, "........", " ================", " bas")]
    batch += [ids + [policy.eos_token_id] for ids in batch]
    rows = bounded.score_for_policy(["q"] * len(batch), batch, policy)
    assert all(0.0 < r < 1.0 for row in rows for r in row)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_an_unfinished_answer_never_gets_the_end_token_reward(backbone, smol, minilm):
    rm, policy, pieces = make_backbone(backbone, smol, minilm)
    eos = policy.eos_token_id
    fn = rm.as_reward_fn("token", policy_tokenizer=policy)
    for ids in responses(policy, pieces, random.Random(2)):
        cut, more, ended = fn(["q"] * 3, [""] * 3, [ids, ids + ids[:2], ids + [eos]])
        # cut at the limit: its last token gets what the same prefix gets when more tokens follow
        assert cut == pytest.approx(more[: len(ids)], rel=1e-5, abs=1e-5)
        assert cut == pytest.approx(ended[: len(ids)], rel=1e-5, abs=1e-5)
        # ended: the end token's reward is the RM's own end token after the same ids, or across tokenizers after
        # the same text
        if rm.tokenizer is policy:
            own = rm.score_token_ids(["q"], [ids + [eos]])[0]
        else:
            own = rm.score(["q"], [policy.decode(ids, skip_special_tokens=True)])[0]
        assert ended[-1] == pytest.approx(own[-1], rel=1e-5, abs=1e-5)


def test_clip_words_judges_a_word_as_the_prefix_reads_it(smol):
    # "civil" " civil" "ian" " civil": as written so far, the second token completes "civil civil" (a repeat, even
    # though "ian" turns it into "civilian" later), "ian" makes a new word, the last " civil" repeats again.
    ids = ids_of(smol, "civil", " civil", "ian", " civil")
    assert repeated_words(ids, smol) == [False, True, False, True]
    # "civil civ" does not repeat "civil" yet; a byte piece adds no characters and is never a repeat
    assert repeated_words(ids_of(smol, "civil", " civ"), smol) == [False, False]
    emoji = ids_of(smol, " 😀", " 😀")
    assert len(emoji) == 4 and repeated_words(emoji, smol) == [False] * 4
    # the prefix texts behind it: a trailing byte piece adds nothing until its character is complete
    from tokencredit.token_text import prefix_texts

    assert prefix_texts(ids_of(smol, "x", " 😀"), smol) == [("x", 0), ("x ", 1), ("x 😀", 2)]


def test_length_norm_is_refused_because_it_reads_the_final_length(smol, minilm, tmp_path):
    rm, policy, _ = make_backbone("same-words", smol, minilm)
    with pytest.raises(ValueError, match="length_norm was removed"):
        rm.as_reward_fn("token", length_norm=8.0)
    saved = tmp_path / "config.yaml"
    saved.write_text("fast: true\nreward_length: mean\n")
    with pytest.raises(ValueError, match="reward_length=mean was removed"):
        load_config(DemoConfig, saved)
    saved.write_text("fast: true\nreward_length: sum\n")
    assert load_config(DemoConfig, saved).reward_length == "sum"
