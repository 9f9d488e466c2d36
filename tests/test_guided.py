"""Guided roll-ins (RLGF): who writes which tokens, the switch draws and the algorithm schedules."""

import random

import pytest
import torch

from tokencredit.rl.guided import (
    ModelWriter,
    TextWriter,
    as_generation_output,
    draw_switches,
    guided_rollout,
    rollin_of,
    switch_point,
)
from tokencredit.testing import tiny_causal_lm, tiny_word_tokenizer

GUIDE, LEARNER, EOS = 7, 3, 2


class Scripted:
    """Writes one fixed token, ending with EOS after ``stop_after`` tokens if given."""

    def __init__(self, token, stop_after=None):
        self.token, self.stop_after, self.calls = token, stop_after, []

    def write(self, prompt_ids, prompt_mask, budgets):
        self.calls.append(list(budgets))
        out = []
        for b in budgets:
            if self.stop_after is not None and self.stop_after < b:
                out.append(([self.token] * self.stop_after + [EOS], True))
            else:
                out.append(([self.token] * b, False))
        return out


def prompts(n=4):
    return torch.ones(n, 3, dtype=torch.long), torch.ones(n, 3, dtype=torch.long)


@pytest.mark.parametrize("rollin", ["guide", "learner"])
def test_rows_start_or_end_with_guide_tokens_and_record_who_wrote_them(rollin):
    ids, mask = prompts()
    # u = 0, 0.4, 0.9 on a roll-in of 6 tokens: h = 1 + floor(u * 5) = 1, 3, 5
    out = guided_rollout(Scripted(LEARNER), Scripted(GUIDE), rollin, ids, mask, [None, 0.0, 0.4, 0.9], 6, pad_id=0)
    assert out.switches == [0, 1, 3, 5]
    first, second = (GUIDE, LEARNER) if rollin == "guide" else (LEARNER, GUIDE)
    # No switch: the roll-out policy writes the row alone (PPO++: the learner; AggreVaTeD: a whole guide answer).
    assert out.token_ids[0] == [second] * 6
    for row, h in zip((1, 2, 3), (1, 3, 5)):
        tokens, wrote = out.token_ids[row], out.learner_wrote[row]
        assert tokens == [first] * h + [second] * (6 - h)  # PPO++ starts with the guide, AggreVaTeD ends with it
    for tokens, wrote in zip(out.token_ids, out.learner_wrote):
        assert wrote == [t == LEARNER for t in tokens]


@pytest.mark.parametrize("rollin", ["guide", "learner"])
def test_the_switch_falls_inside_the_roll_ins_own_length(rollin):
    # The roll-in writer ends after 3 tokens (+ EOS) of a 12-token budget: h must be 1 or 2, so every switched
    # row really switches and the roll-out writes the rest (drawing h from {1 .. 11} left most rows unswitched).
    ids, mask = prompts(64)
    short = Scripted(LEARNER if rollin == "learner" else GUIDE, stop_after=3)
    other = Scripted(GUIDE if rollin == "learner" else LEARNER, stop_after=4)
    learner, guide = (short, other) if rollin == "learner" else (other, short)
    draws = draw_switches(64, 1.0, random.Random(0))
    out = guided_rollout(learner, guide, rollin, ids, mask, draws, 12, pad_id=0)
    assert set(out.switches) == {1, 2}
    for tokens, h, done in zip(out.token_ids, out.switches, out.finished):
        assert EOS not in tokens[:h] and tokens[h] == other.token and done  # the roll-out writes from h to its end
    # A roll-in too short to leave a switch point (one token, then EOS): the row is the roll-out's alone.
    one = Scripted(short.token, stop_after=1)
    learner, guide = (one, other) if rollin == "learner" else (other, one)
    out = guided_rollout(learner, guide, rollin, *prompts(2), [0.5, None], 12, pad_id=0)
    assert out.switches == [0, 0] and all(t[0] == other.token for t in out.token_ids)


def test_switch_draws_follow_beta_and_place_h_uniformly_inside_the_roll_in():
    rng = random.Random(0)
    draws = draw_switches(20000, 0.3, rng)
    assert abs(sum(u is not None for u in draws) / len(draws) - 0.3) < 0.02
    assert draw_switches(50, 0.0, rng) == [None] * 50
    with pytest.raises(ValueError, match="guide_beta"):
        draw_switches(3, 1.5, rng)
    hs = [switch_point(u, [LEARNER] * 8, False, 12) for u in draws if u is not None]
    assert set(hs) == set(range(1, 8))  # m = 8 content tokens: h in 1 .. 7, each about equally often
    assert max(hs.count(h) for h in range(1, 8)) < 1.3 * min(hs.count(h) for h in range(1, 8))
    assert switch_point(0.99, [LEARNER] * 5 + [EOS], True, 12) == 4  # the EOS is not a place to switch at
    assert switch_point(0.99, [LEARNER] * 8, False, 3) == 2  # capped by guide_rollin_length
    assert switch_point(0.5, [LEARNER, EOS], True, 12) == 0 and switch_point(None, [LEARNER] * 8, False, 12) == 0
    with pytest.raises(ValueError, match="switch draw"):
        switch_point(1.0, [LEARNER] * 8, False, 12)


def test_lols_mixes_with_tau_and_d2lols_switches_once():
    rng = random.Random(1)
    picks = [rollin_of("lols", k, 0.8, None, rng) for k in range(5000)]
    assert abs(picks.count("guide") / len(picks) - 0.8) < 0.02 and set(picks) == {"guide", "learner"}
    assert [rollin_of("d2lols", k, 0.8, 3, rng) for k in range(6)] == ["learner"] * 3 + ["guide"] * 3
    assert rollin_of("ppo", 0, 0.8, None, rng) is None
    with pytest.raises(ValueError, match="d2lols_switch_update"):
        rollin_of("d2lols", 0, 0.8, None, rng)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        rollin_of("dagger", 0, 0.8, None, rng)


def test_model_and_text_writers_produce_the_same_kind_of_rows():
    words = "a b c d".split()
    tok = tiny_word_tokenizer(words)
    model = tiny_causal_lm(len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    ids = torch.tensor([[tok.convert_tokens_to_ids("a")] * 2] * 2)
    mask = torch.ones_like(ids)
    writer = ModelWriter(model, tok, generator=torch.Generator().manual_seed(0))
    rows = writer.write(ids, mask, [3, 0])
    assert 1 <= len(rows[0][0]) <= 3 and rows[1] == ([], False)
    seen, asked = [], []

    def complete(texts, max_new_tokens):
        seen.extend(texts)
        asked.append(max_new_tokens)
        return ["b c"] * len(texts)

    text = TextWriter(complete, tok).write(ids, mask, [5, 1])
    assert seen == ["a a", "a a"]  # the context is handed over as text
    assert asked == [10]  # headroom: twice the largest budget, so a text the guide's limit cut runs past ours
    b, c = tok.convert_tokens_to_ids("b"), tok.convert_tokens_to_ids("c")
    assert text[0] == ([b, c, tok.eos_token_id], True)  # it fit: finished
    assert text[1] == ([b], False)  # cut to the budget


def test_a_text_guide_cut_by_its_own_limit_is_not_finished():
    tok = tiny_word_tokenizer("a b c d".split())
    ids, mask = torch.tensor([[4, 4]] * 3), torch.ones(3, 2, dtype=torch.long)
    b, c = tok.convert_tokens_to_ids("b"), tok.convert_tokens_to_ids("c")
    replies = [("b c", False), ("b c", True), "b c"]  # (text, finished) pairs say it exactly; a bare string fits
    rows = TextWriter(lambda texts, n: replies, tok).write(ids, mask, [5, 5, 5])
    assert rows == [([b, c], False), ([b, c, tok.eos_token_id], True), ([b, c, tok.eos_token_id], True)]
    with pytest.raises(ValueError, match="string or a"):
        TextWriter(lambda texts, n: [3] * len(texts), tok).write(ids, mask, [5, 5, 5])
    with pytest.raises(ValueError, match="returned 1 continuations"):
        TextWriter(lambda texts, n: ["b"], tok).write(ids, mask, [5, 5, 5])


def test_the_generation_output_marks_learner_tokens():
    ids, mask = prompts(2)
    tok = tiny_word_tokenizer("a b c d e f g h".split())
    out = guided_rollout(Scripted(LEARNER), Scripted(GUIDE), "guide", ids, mask, [0.4, None], 4, pad_id=0)
    gen, learner = as_generation_output(out, ids, mask, tok, pad_id=0)
    assert gen.response_ids.tolist() == [[GUIDE, GUIDE, LEARNER, LEARNER], [LEARNER] * 4]
    assert learner.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert gen.response_mask.tolist() == [[1] * 4] * 2
