import math

import pytest
import torch
from transformers import BertConfig, BertModel

from tokencredit import PPOConfig, PPOTrainer
from tokencredit.models import ScalarHeadModel, load_tokenizer
from tokencredit.rewards.seq_rm import SequenceRewardModel
from tokencredit.rewards.shaping import (
    bounded,
    potential_differences,
    potential_reward_fn,
    sequence_rm_potentials,
    token_rm_potentials,
)
from tokencredit.rewards.token_rm import TokenRewardModel
from tokencredit.testing import tiny_causal_lm, tiny_scalar_model, tiny_word_tokenizer

WORDS = "a b c d x y".split()
EOS = 1


def random_head(model, seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.nn.init.normal_(model.head.weight)
    return model


def token_rm(seed=0):
    tok = tiny_word_tokenizer(WORDS)
    return TokenRewardModel.from_model(random_head(tiny_scalar_model(len(tok), seed=seed), seed), tok)


def seq_rm(seed=0, words=WORDS):
    tok = tiny_word_tokenizer(words)
    return SequenceRewardModel.from_model(random_head(tiny_scalar_model(len(tok), seed=seed), seed), tok)


def bert_seq_rm(seed=0):
    tok = tiny_word_tokenizer(WORDS)
    config = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = BertModel(config).eval()
    rm = SequenceRewardModel.from_model(random_head(ScalarHeadModel.from_backbone(backbone), seed), tok)
    rm.model.eval()  # BERT has dropout: scores read outside the scoring methods must not draw it
    return rm


def ids_of(tokenizer, text, eos=True):
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) + ([EOS] if eos else [])


PROMPTS = ["a b", "c", "d a b"]
TEXTS = ["x y y a", "b", "y x d c a b"]


def batch(rm):
    # The middle response has no end token: cut at the length limit.
    return [ids_of(rm.tokenizer, t, eos=i != 1) for i, t in enumerate(TEXTS)]


# ---------------------------------------------------------------------- pure pieces
def test_potential_differences_telescope():
    phi = [0.5, 0.7, 0.6, 0.9]
    diffs = potential_differences(phi)
    assert diffs == pytest.approx([0.2, -0.1, 0.3])
    assert sum(diffs) == pytest.approx(phi[-1] - phi[0])
    assert potential_differences([0.3]) == []
    with pytest.raises(ValueError, match="Phi_0"):
        potential_differences([])


def test_bounded_transforms():
    assert bounded(0.0) == 0.5
    assert bounded(2.0, "sigmoid", temperature=2.0) == pytest.approx(1 / (1 + math.exp(-1)))
    assert bounded(-1000.0) == 0.0 and bounded(1000.0) == 1.0  # no overflow at either end
    assert bounded(1.0, "tanh") == pytest.approx(math.tanh(1.0))
    assert bounded(-7.5, "none", temperature=3.0) == -7.5
    assert math.isnan(bounded(float("inf"))) and math.isnan(bounded(float("nan"), "none"))


def test_reward_fn_from_any_potential_and_its_errors():
    def liked_count(prompts, response_token_ids):
        # Phi = sigmoid(number of liked tokens (7) so far): a potential that saturates
        return [[bounded(sum(t == 7 for t in ids[:k])) for k in range(len(ids) + 1)] for ids in response_token_ids]

    fn = potential_reward_fn(liked_count, scale=2.0)
    (rewards,) = fn(["p"], ["..."], [[7] * 12])
    expected = [2 * (bounded(k) - bounded(k - 1)) for k in range(1, 13)]
    assert rewards == pytest.approx(expected)
    # Each repeat of the liked token earns less than the one before, and all of them less than 1 in total.
    assert all(a > b > 0 for a, b in zip(rewards, rewards[1:]))
    assert sum(rewards) == pytest.approx(2 * (bounded(12) - 0.5)) and sum(rewards) < 1.0
    # Tokens that leave Phi where it is earn exactly 0.
    assert fn(["p"], ["..."], [[3, 7, 3, 3]])[0] == pytest.approx([0.0, 2 * (bounded(1) - 0.5), 0.0, 0.0])

    with pytest.raises(ValueError, match="expected 3"):
        potential_reward_fn(lambda p, ids: [[0.0, 1.0]])(["p"], [""], [[4, 5]])
    with pytest.raises(ValueError, match="potential 1 is nan"):
        potential_reward_fn(lambda p, ids: [[0.0, float("nan"), 1.0]])(["p"], [""], [[4, 5]])
    with pytest.raises(ValueError, match="returned 1 rows for 2 responses"):
        potential_reward_fn(lambda p, ids: [[0.0, 1.0]])(["p", "q"], ["", ""], [[4], [5]])
    with pytest.raises(ValueError, match="scale"):
        potential_reward_fn(liked_count, scale=float("inf"))
    with pytest.raises(ValueError, match="callable"):
        potential_reward_fn(None)


# ---------------------------------------------------------------------- sequence reward model
def test_prefix_scores_of_a_causal_rm_read_in_one_pass_equal_each_prefix_alone():
    rm = seq_rm()
    responses = batch(rm)
    one_pass = rm.prefix_scores(PROMPTS, responses)
    separately = rm.prefix_scores(PROMPTS, responses, batch_size=3, one_pass=False)
    assert [len(row) for row in one_pass] == [len(r) + 1 for r in responses]
    for got, want in zip(one_pass, separately):
        assert got == pytest.approx(want, abs=1e-5)
    # Phi_0 is the score of the prompt alone; batch neighbours and batch size change nothing.
    assert [row[0] for row in one_pass] == pytest.approx(
        [row[0] for row in rm.prefix_scores(PROMPTS, [[], [], []])], abs=1e-5)
    assert rm.prefix_scores(PROMPTS[2:], responses[2:], batch_size=1)[0] == pytest.approx(one_pass[2], abs=1e-5)
    # For a causal model the prompt "a b" alone is the same input as the prompt "a" with the response "b".
    b = ids_of(rm.tokenizer, "b", eos=False)
    assert one_pass[0][0] == pytest.approx(rm.sequence_scores(["a"], [b]).item(), abs=1e-5)
    # A response ending in EOS ends on the RM's sequence score of its text.
    finished = [0, 2]
    scores = rm.score_sequences([PROMPTS[i] for i in finished], [TEXTS[i] for i in finished])
    assert [one_pass[i][-1] for i in finished] == pytest.approx(scores, abs=1e-5)
    with pytest.raises(ValueError, match="prompt 0 has no tokens"):
        rm.prefix_scores([""], [[4]])
    with pytest.raises(ValueError, match="outside the reward model's vocabulary"):
        rm.prefix_scores(["a"], [[4, 10_000]])


def test_bidirectional_rm_scores_every_prefix_on_its_own():
    rm = bert_seq_rm()
    prompt, ids = "a b", ids_of(rm.tokenizer, "x y y a c")
    auto = rm.prefix_scores([prompt], [ids])[0]
    alone = [rm.prefix_scores([prompt], [[]])[0][0]]
    alone += [rm.sequence_scores([prompt], [ids[:t]]).item() for t in range(1, len(ids) + 1)]
    assert auto == pytest.approx(alone, abs=1e-5)
    # Read in one pass, earlier positions of an encoder have seen later tokens: those are not prefix scores.
    leaky = rm.prefix_scores([prompt], [ids], one_pass=True)[0]
    assert leaky[-1] == pytest.approx(alone[-1], abs=1e-5)
    assert max(abs(a - b) for a, b in zip(leaky[:-1], alone[:-1])) > 1e-3


@pytest.mark.parametrize("make", [seq_rm, bert_seq_rm], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("bound", ["sigmoid", "tanh", "none"])
def test_sequence_rm_rewards_telescope(make, bound):
    rm = make()
    responses = batch(rm)
    potentials = sequence_rm_potentials(rm, bound=bound, temperature=2.0)
    phis = potentials(PROMPTS, responses)
    rewards = potential_reward_fn(potentials, scale=3.0)(PROMPTS, TEXTS, responses)
    raw = rm.prefix_scores(PROMPTS, responses)
    for row, phi, r, ids in zip(rewards, phis, raw, responses):
        assert len(row) == len(ids)
        assert sum(row) == pytest.approx(3.0 * (phi[-1] - phi[0]), abs=1e-9)
        assert phi == pytest.approx([bounded(s, bound, 2.0) for s in r], abs=1e-12)
    if bound == "none":
        # Unbounded, the return of a finished response is its sequence score minus that of the prompt alone.
        seq = rm.score_sequences(PROMPTS[:1], TEXTS[:1])[0]
        assert sum(rewards[0]) == pytest.approx(3.0 * (seq - raw[0][0]), abs=1e-4)


@pytest.mark.parametrize("make", [seq_rm, bert_seq_rm], ids=["causal", "bidirectional"])
def test_sequence_rm_rewards_are_causal(make):
    rm = make()
    fn = potential_reward_fn(sequence_rm_potentials(rm, bound="none"))
    tok = rm.tokenizer
    base = ids_of(tok, "x y y a b")
    variants = [base, base[:3] + ids_of(tok, "d d c c"), base[:3], base[:2] + ids_of(tok, "a", eos=False)]
    rows = fn(["c d"] * 4, [""] * 4, variants)
    for row in rows[1:]:
        assert row[:2] == pytest.approx(rows[0][:2], abs=1e-5)
    assert rows[1][:3] == pytest.approx(rows[0][:3], abs=1e-5)
    assert rows[2][:3] == pytest.approx(rows[0][:3], abs=1e-5)
    assert rows[1][3:] != pytest.approx(rows[0][3:], abs=1e-5)  # the tokens that did change are scored anew


def test_a_long_repetition_earns_a_bounded_total_from_a_sequence_rm():
    rm = seq_rm()
    y = ids_of(rm.tokenizer, "y", eos=False)[0]
    with torch.no_grad():
        rm.model.head.weight.mul_(10.0)  # raw scores of tens: unbounded, a long response could collect them
    raw = potential_reward_fn(sequence_rm_potentials(rm, bound="none"))
    shaped = potential_reward_fn(sequence_rm_potentials(rm, temperature=10.0))
    for n in (5, 50, 200):
        assert abs(sum(shaped(["a"], [""], [[y] * n])[0])) < 1.0
    # Unbounded, every token's reward is a score change of several units: far more than 1 to collect.
    assert max(abs(r) for r in raw(["a"], [""], [[y] * 50])[0]) > 1.0


# ---------------------------------------------------------------------- token reward model
def test_token_rm_with_no_bound_gives_the_plain_token_rewards():
    rm = token_rm()
    responses = batch(rm)
    shaped = potential_reward_fn(token_rm_potentials(rm, bound="none"), scale=0.5)(PROMPTS, TEXTS, responses)
    plain = rm.as_reward_fn("token", scale=0.5)(PROMPTS, TEXTS, responses)
    for got, want in zip(shaped, plain):
        assert got == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize("bound", ["sigmoid", "tanh"])
def test_token_rm_rewards_telescope_and_are_causal(bound):
    rm = token_rm()
    responses = batch(rm)
    potentials = token_rm_potentials(rm, bound=bound, temperature=4.0)
    phis = potentials(PROMPTS, responses)
    rewards = potential_reward_fn(potentials)(PROMPTS, TEXTS, responses)
    plain = rm.score_token_ids(PROMPTS, responses)
    for row, phi, r in zip(rewards, phis, plain):
        assert phi[0] == bounded(0.0, bound)
        assert phi[-1] == pytest.approx(bounded(sum(r), bound, 4.0), abs=1e-12)
        assert sum(row) == pytest.approx(phi[-1] - phi[0], abs=1e-12)
    base = ids_of(rm.tokenizer, "x y y a b")
    changed = base[:3] + ids_of(rm.tokenizer, "c d")
    a, b = potential_reward_fn(potentials)(["c d"] * 2, [""] * 2, [base, changed])
    assert b[:3] == pytest.approx(a[:3], abs=1e-6)


def test_repeating_a_liked_token_pays_less_each_time_with_shaping_and_linearly_without():
    rm = token_rm()
    with torch.no_grad():
        rm.model.head.weight.zero_()
        rm.model.head.bias.fill_(1.0)  # every token is liked: reward 1 wherever it stands
    ids = [[ids_of(rm.tokenizer, "y", eos=False)[0]] * n for n in (20, 40)]
    plain = rm.as_reward_fn("token")(["a"] * 2, [""] * 2, ids)
    # temperature 5: Phi = sigmoid(sum / 5) saturates over a few tens of repeats
    shaped = potential_reward_fn(token_rm_potentials(rm, temperature=5.0))(["a"] * 2, [""] * 2, ids)
    assert sum(plain[0]) == pytest.approx(20) and sum(plain[1]) == pytest.approx(40)
    assert all(a > b > 0 for a, b in zip(shaped[1], shaped[1][1:]))
    assert sum(shaped[1]) < 0.5 and sum(shaped[1]) - sum(shaped[0]) < 0.02


# ---------------------------------------------------------------------- another policy tokenizer
def test_policy_with_another_word_tokenizer_gets_the_rewards_of_its_text():
    rm, srm = token_rm(), seq_rm()
    policy_tok = tiny_word_tokenizer(list(reversed(WORDS)))  # same words, other ids
    policy_ids = [ids_of(policy_tok, t, eos=i != 1) for i, t in enumerate(TEXTS)]
    assert policy_ids != batch(rm)
    for model, make in ((rm, token_rm_potentials), (srm, sequence_rm_potentials)):
        cross = potential_reward_fn(make(model, policy_tokenizer=policy_tok))(PROMPTS, TEXTS, policy_ids)
        own = potential_reward_fn(make(model, policy_tokenizer=model.tokenizer))(PROMPTS, TEXTS, batch(model))
        for got, want in zip(cross, own):
            assert got == pytest.approx(want, abs=1e-9)


def test_policy_with_a_subword_tokenizer_scores_each_prefix_as_its_own_text():
    policy_tok = load_tokenizer("smollm2-135m-instruct")
    srm = seq_rm(words=WORDS + ["xy", "xyzzy"])
    text = " a xyzzy b"
    ids = policy_tok(text, add_special_tokens=False)["input_ids"] + [policy_tok.eos_token_id]
    prefix_texts = [policy_tok.decode(ids[:t], skip_special_tokens=True) for t in range(1, len(ids) + 1)]
    assert any(t.endswith("xy") for t in prefix_texts)  # a prefix that is not a prefix of the RM's tokens

    phi = sequence_rm_potentials(srm, bound="none", policy_tokenizer=policy_tok)(["c"], [ids])[0]
    want = [srm.prefix_scores(["c"], [[]])[0][0]]
    for k, prefix in enumerate(prefix_texts, 1):
        rm_ids = list(srm.tokenizer(prefix, add_special_tokens=False)["input_ids"]) + ([EOS] if k == len(ids) else [])
        want.append(srm.prefix_scores(["c"], [rm_ids])[0][-1] if rm_ids else want[0])
    assert phi == pytest.approx(want, abs=1e-5)
    assert phi[-1] == pytest.approx(srm.score_sequences(["c"], [text])[0], abs=1e-5)

    trm = token_rm()
    phi = token_rm_potentials(trm, bound="none", policy_tokenizer=policy_tok)(["c"], [ids])[0]
    want = [0.0]
    for k, prefix in enumerate(prefix_texts, 1):
        rm_ids = list(trm.tokenizer(prefix, add_special_tokens=False)["input_ids"]) + ([EOS] if k == len(ids) else [])
        want.append(sum(trm.score_token_ids(["c"], [rm_ids])[0]))
    assert phi == pytest.approx(want, abs=1e-5)


def test_tokens_that_add_no_text_earn_nothing_under_shaping_but_echo_a_summed_reward():
    # Newlines and spaces are tokens of the policy that the RM's word tokenizer drops: the text the RM reads does
    # not change, so the potential does not either. The summed cross-tokenizer reward instead gives such a token
    # the reward before it (the mean mapping keeps a constant RM constant), which reward_repeat=clip bounds.
    policy_tok = load_tokenizer("smollm2-135m-instruct")
    rm = token_rm()
    word = policy_tok(" a", add_special_tokens=False)["input_ids"]
    blank = [i for i in policy_tok("\n\n", add_special_tokens=False)["input_ids"]]
    ids = word + blank + blank + [policy_tok.eos_token_id]
    shaped = potential_reward_fn(token_rm_potentials(rm, policy_tokenizer=policy_tok))(["c"], [""], [ids])[0]
    assert shaped[len(word):-1] == [0.0] * (2 * len(blank))
    summed = rm.as_reward_fn("token", policy_tokenizer=policy_tok)(["c"], [""], [ids])[0]
    assert summed[len(word):-1] == pytest.approx([summed[len(word) - 1]] * (2 * len(blank)))
    clipped = rm.as_reward_fn("token", policy_tokenizer=policy_tok, repeats="clip")(["c"], [""], [ids])[0]
    repeats = clipped[len(word) + len(blank):-1]
    assert all(r <= 0.0 for r in repeats) and len(repeats) == len(blank)


def test_provider_errors():
    rm, srm, bert = token_rm(), seq_rm(), bert_seq_rm()
    other = tiny_word_tokenizer(["foo", "bar"])
    with pytest.raises(ValueError, match="bidirectional"):
        sequence_rm_potentials(bert, policy_tokenizer=other)
    sequence_rm_potentials(bert, policy_tokenizer=bert.tokenizer)  # its own tokenizer: each prefix scored alone
    with pytest.raises(ValueError, match="use token_rm_potentials"):
        sequence_rm_potentials(rm)
    with pytest.raises(ValueError, match="use sequence_rm_potentials"):
        token_rm_potentials(srm)
    with pytest.raises(ValueError, match="bound must be"):
        token_rm_potentials(rm, bound="clip")
    with pytest.raises(ValueError, match="temperature"):
        sequence_rm_potentials(srm, temperature=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        token_rm_potentials(rm, batch_size=0)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        token_rm_potentials(rm)(["a", "b"], [[4]])


def test_ppo_trains_on_shaped_sequence_rm_rewards(tmp_path):
    rm = seq_rm()
    tok = rm.tokenizer
    policy = tiny_causal_lm(len(tok), seed=1, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = PPOConfig(batch_size=4, mini_batch_size=4, max_new_tokens=5, num_updates=1, ppo_epochs=1,
                       learning_rate=1e-3, output_dir=str(tmp_path / "ppo"), progress=False, log_tensorboard=False)
    reward_fn = potential_reward_fn(sequence_rm_potentials(rm, policy_tokenizer=tok))
    history = PPOTrainer(config, policy=policy, tokenizer=tok, prompts=["a b", "c d", "x", "y a"],
                         reward_fn=reward_fn).train()
    assert len(history) == 1 and math.isfinite(history[0]["reward/mean"])
    assert abs(history[0]["reward/mean"]) < 1.0  # a sigmoid potential's return lies in (-1, 1)
