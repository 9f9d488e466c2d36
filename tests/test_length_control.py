"""Length control of token rewards (centring, EOS), where a token RM puts its credit, and the demo's options."""

import json

import pytest
import torch

from tokencredit.cli import main
from tokencredit.rewards.credit import credit_profile, token_kinds
from tokencredit.rewards.token_rm import TokenRewardModel, adjust_token_rewards, end_ids, mean_token_reward
from tokencredit.testing import tiny_scalar_model, tiny_word_tokenizer

WORDS = "a b the of x y".split()


def make_rm():
    tok = tiny_word_tokenizer(WORDS)
    model = tiny_scalar_model(len(tok), seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.nn.init.normal_(model.head.weight)
    return TokenRewardModel.from_model(model, tok)


def test_adjusting_rewards_centres_every_token_and_zeroes_a_final_eos():
    eos = 9
    assert adjust_token_rewards([1.0, 2.0, -3.0], [4, 5, eos], center=0.5) == [0.5, 1.5, -3.5]
    assert adjust_token_rewards([1.0, 2.0, -3.0], [4, 5, eos], center=0.5, zero_eos=True,
                                ends=frozenset({eos})) == [0.5, 1.5, 0.0]
    # A response cut by length has no EOS: nothing is zeroed.
    assert adjust_token_rewards([1.0, -3.0], [4, 5], zero_eos=True, ends=frozenset({eos})) == [1.0, -3.0]


def test_an_unfinished_response_is_charged_at_its_last_token_and_a_finished_one_is_not():
    eos = 9
    # Cut at the limit (no end token): the charge lands on the last token.
    assert adjust_token_rewards([0.5, 0.5], [4, 5], ends=frozenset({eos}), unfinished=-0.5) == [0.5, 0.0]
    # Ended with the end token: nothing added, with or without zeroing that token.
    assert adjust_token_rewards([0.5, -0.5], [4, eos], ends=frozenset({eos}), unfinished=-0.5) == [0.5, -0.5]
    assert adjust_token_rewards([0.5, -0.5], [4, eos], zero_eos=True, ends=frozenset({eos}),
                                unfinished=-0.5) == [0.5, 0.0]


def test_repeated_tokens_earn_no_positive_reward_when_clipped():
    eos = 9
    # "hospital hospital hospital": only the first occurrence keeps its positive reward; a repeat's negative
    # reward stays; the end token is never a repeat.
    row, ids = [0.6, 0.5, 0.7, -0.2, 0.1, -0.4], [4, 5, 4, 5, 4, eos]
    assert adjust_token_rewards(row, ids, clip_repeats=True, ends=frozenset({eos})) == [0.6, 0.5, 0.0, -0.2, 0.0, -0.4]
    assert adjust_token_rewards(row, ids) == row  # off by default
    # centred first, then clipped
    assert adjust_token_rewards([0.2, 0.3, 0.3], [7, 7, eos], clip_repeats=True, ends=frozenset({eos}),
                                center=0.1) == pytest.approx([0.1, 0.0, 0.2])
    assert adjust_token_rewards([0.2, 0.3], [eos, eos], clip_repeats=True, ends=frozenset({eos})) == [0.2, 0.3]


def test_repeated_words_are_found_across_token_ids_case_and_punctuation():
    from tokencredit.models import load_tokenizer
    from tokencredit.rewards.token_rm import repeated_words

    smol = load_tokenizer("smollm2-135m-instruct")
    ids = smol.encode("Civil war, civil War civilian -- cause -", add_special_tokens=False) + [smol.eos_token_id]
    # "Civil" and " civil" are different token ids, so the id rule misses the repeat the word rule finds
    assert ids[0] != smol.encode(" civil", add_special_tokens=False)[0]
    marks = repeated_words(ids, smol, end_ids(smol))
    repeated = "".join(smol.decode([token]) for token, mark in zip(ids, marks) if mark)
    assert repeated.split() == ["civil", "War"]  # "civilian" is another word; "--" and "-" are punctuation
    assert marks[-1] is False  # the end token
    # Issue 29 (causal): a repeated multi-token word is marked from the token that completes the repeat, as the
    # prefix reads, no longer on all its pieces ("S", "co", "oter" of "Scooterama" do not repeat a word yet)
    bpe = smol.encode("Scooterama Brands Scooterama", add_special_tokens=False)
    marks = repeated_words(bpe, smol)
    assert marks[-1] is True and not any(marks[:-1])


def test_clip_words_changes_rewards_only_on_repeated_words():
    rm = make_rm()
    ids = [rm.encode_response("a the x of the b")]  # "the" repeats
    plain = rm.score_token_ids(["y"], ids)[0]
    words = rm.as_reward_fn("token", repeats="clip_words")(["y"], [""], ids)[0]
    tokens = rm.tokenizer.convert_ids_to_tokens(ids[0])
    for token, before, after, seen in zip(tokens, plain, words, [False, False, False, False, True, False, False]):
        assert after == pytest.approx(min(before, 0.0) if seen else before), token
    assert plain[4] > 0 and words[4] == 0.0  # the seeded head likes "the": the repeat is what clipping removes
    with pytest.raises(ValueError, match="clip_words"):
        rm.as_reward_fn("token", repeats="words")


def test_reward_fn_options_change_token_and_sequence_rewards_as_documented():
    rm = make_rm()
    tok = rm.tokenizer
    ids = [rm.encode_response("a the x"), rm.encode_response("b")]
    prompts = ["y", "y"]
    raw = rm.score_token_ids(prompts, ids)
    centred = rm.as_reward_fn("token", center=0.25, eos="zero")(prompts, ["", ""], ids)
    for raw_row, row in zip(raw, centred):
        assert row[:-1] == pytest.approx([r - 0.25 for r in raw_row[:-1]]) and row[-1] == 0.0
    sums = rm.as_reward_fn("sequence", center=0.25, eos="zero")(prompts, ["", ""], ids)
    assert sums == pytest.approx([sum(r) for r in centred])
    assert tok.eos_token_id in end_ids(tok)
    with pytest.raises(ValueError, match="eos must be"):
        rm.as_reward_fn("token", eos="drop")
    with pytest.raises(ValueError, match="repeats must be"):
        rm.as_reward_fn("token", repeats="drop")
    twice = [ids[0][:-1] * 2 + ids[0][-1:]]  # "a the x a the x <eos>"
    plain_twice = rm.score_token_ids(["y"], twice)[0]
    clipped = rm.as_reward_fn("token", repeats="clip")(["y"], [""], twice)[0]
    half = len(ids[0]) - 1
    assert clipped[:half] == pytest.approx(plain_twice[:half]) and clipped[-1] == pytest.approx(plain_twice[-1])
    assert clipped[half:-1] == pytest.approx([min(r, 0.0) for r in plain_twice[half:-1]])
    assert rm.as_reward_fn("sequence", repeats="clip")(["y"], [""], twice) == pytest.approx([sum(clipped)])
    cut = [ids[0][:-1], ids[1]]  # the first response without its end token, as if cut at the limit
    charged = rm.as_reward_fn("token", unfinished=-2.0)(prompts, ["", ""], cut)
    plain = rm.score_token_ids(prompts, cut)
    assert charged[0] == pytest.approx([*plain[0][:-1], plain[0][-1] - 2.0]) and charged[1] == pytest.approx(plain[1])
    # length_norm is gone (issue 29: scaling by the final length is not causal); only None is taken
    with pytest.raises(ValueError, match="length_norm was removed"):
        rm.as_reward_fn("sequence", length_norm=1.0)


def test_mean_token_reward_is_the_centre_that_makes_length_neutral_on_those_samples():
    rm = make_rm()
    ids = [rm.encode_response(t) for t in ("a b x", "the of", "y y y y")]
    prompts = ["a"] * 3
    c = mean_token_reward(rm, prompts, ids)
    fn = rm.as_reward_fn("token", center=c)
    rows = fn(prompts, [""] * 3, ids)
    assert sum(sum(r) for r in rows) == pytest.approx(0.0, abs=1e-5)  # zero mean token reward after centring
    c_no_eos = mean_token_reward(rm, prompts, ids, exclude_eos=True)
    raw = rm.score_token_ids(prompts, ids)
    assert c_no_eos == pytest.approx(sum(sum(r[:-1]) for r in raw) / sum(len(r) - 1 for r in raw))


def test_credit_profile_splits_reward_by_kind_position_and_length():
    rm = make_rm()
    tok = rm.tokenizer
    ids = [rm.encode_response(t) for t in ("b the x", "of", "b y the x x")]
    kinds = token_kinds(ids[0], tok, end_ids(tok))
    assert kinds == ["content", "stopword", "content", "eos"]
    raw = rm.score_token_ids(["a"] * 3, ids)
    profile = credit_profile(rm, ["a"] * 3, ids, max_positions=4)
    assert profile["responses"] == 3 and profile["tokens"] == {"eos": 3, "stopword": 3, "content": 6, "first": 3}
    assert profile["mean_reward"]["eos"] == pytest.approx(sum(r[-1] for r in raw) / 3)
    assert profile["mean_reward"]["first"] == pytest.approx(sum(r[0] for r in raw) / 3)
    assert profile["mean_reward_by_position"][1] == pytest.approx((raw[0][1] + raw[1][1] + raw[2][1]) / 3)
    assert profile["mean_length"] == pytest.approx((4 + 2 + 6) / 3)
    # The slope of summed reward on length, by hand.
    xs, ys = [4, 2, 6], [sum(r) for r in raw]
    mx, my = sum(xs) / 3, sum(ys) / 3
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    assert profile["sum_vs_length_slope"] == pytest.approx(slope)
    # Rewards the caller already has are used as they are, not scored again.
    assert credit_profile(rm, ["a"] * 3, ids, max_positions=4, rewards=raw) == profile
    shifted = [[r + 1.0 for r in row] for row in raw]
    assert credit_profile(rm, ["a"] * 3, ids, max_positions=4, rewards=shifted)["mean_sum"] == pytest.approx(
        profile["mean_sum"] + profile["mean_length"])
    assert mean_token_reward(rm, ["a"] * 3, ids, rewards=shifted) == pytest.approx(
        mean_token_reward(rm, ["a"] * 3, ids) + 1.0)


def test_demo_length_control_learning_curves_and_reused_stages(tmp_path):
    base = tmp_path / "base"
    assert main(["demo", "--fast", "--output", str(base)]) == 0
    summary = json.loads((base / "summary.json").read_text())
    assert summary["length_control"] == {"reward_center": "none", "center": 0.0, "reward_eos": "keep",
                                         "reward_length": "sum", "reward_unfinished": "none",
                                         "unfinished": 0.0, "reward_repeat": "clip", "reward_shaping": "none",
                                         "shaping_temperature": None}
    credit = summary["reward_credit"]["labelled_samples"]
    assert credit["responses"] == 32 and set(credit["mean_reward"]) == {"eos", "stopword", "content", "first"}
    assert {"sft", "tppo", "ppo_sequence"} <= set(summary["reward_credit"])
    assert "token_precision" in summary["tppo"] and "token_recall" in summary["tppo"]
    # An ablation of the PPO stages on the same SFT model, labels and reward model.
    variant = tmp_path / "variant"
    assert main(["demo", "--fast", "--output", str(variant), f"reuse_stages={base}", "reward_center=mean",
                 "reward_eos=zero", "reward_unfinished=eos", "reward_repeat=keep",
                 "curve_every=1"]) == 0
    assert not (variant / "sft").exists() and not (variant / "reward_model").exists()
    out = json.loads((variant / "summary.json").read_text())
    control = out["length_control"]
    assert control["reward_center"] == "mean" and control["reward_eos"] == "zero" and control["center"] != 0.0
    assert control["reward_length"] == "sum"  # "mean" was removed (issue 29): not causal
    # The charge for an unfinished query is the mean end-token reward on the labelled samples.
    assert control["unfinished"] == pytest.approx(credit["mean_reward"]["eos"])
    assert control["reward_repeat"] == "keep"
    same = out["reward_credit"]["labelled_samples"]  # the same reward model and samples
    assert same["mean_reward"] == pytest.approx(credit["mean_reward"]) and same["tokens"] == credit["tokens"]
    assert out["sft"] == pytest.approx(summary["sft"])  # the same SFT model
    curves = out["learning_curves"]
    assert [p["update"] for p in curves["tppo"]] == [1, 2] and [p["update"] for p in curves["ppo_sequence"]] == [1, 2]
    assert curves["sft"]["token_f1"] == out["sft"]["token_f1"]
    assert curves["tppo"][-1]["token_f1"] == pytest.approx(out["tppo"]["token_f1"])  # the last point = the final policy
    # Each point keeps its queries, so a fall along the curve can be tested over the same sessions.
    final = json.loads((variant / "generations_tppo.json").read_text())
    assert curves["tppo"][-1]["predictions"] == [row["prediction"] for row in final]
    assert not (variant / "tppo" / "checkpoints").exists()  # measured, then dropped
    # Reusing an unfinished run is refused, naming the stage.
    assert main(["demo", "--fast", "--output", str(tmp_path / "v2"), f"reuse_stages={tmp_path / 'nothing'}"]) == 2
