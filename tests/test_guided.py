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
    out = guided_rollout(Scripted(LEARNER), Scripted(GUIDE), rollin, ids, mask, [0, 1, 3, 5], 6, pad_id=0)
    assert out.token_ids[0] == [LEARNER] * 6 and all(out.learner_wrote[0])  # h = 0: plain learner row
    for row, h in zip((1, 2, 3), (1, 3, 5)):
        tokens, wrote = out.token_ids[row], out.learner_wrote[row]
        assert len(tokens) == 6
        first, second = (GUIDE, LEARNER) if rollin == "guide" else (LEARNER, GUIDE)
        assert tokens == [first] * h + [second] * (6 - h)  # PPO++ starts with the guide, AggreVaTeD ends with it
        assert wrote == [t == LEARNER for t in tokens]


def test_a_roll_in_that_ends_the_row_gets_no_roll_out():
    ids, mask = prompts(2)
    learner = Scripted(LEARNER)
    out = guided_rollout(learner, Scripted(GUIDE, stop_after=1), "guide", ids, mask, [4, 4], 6, pad_id=0)
    assert out.token_ids == [[GUIDE, EOS]] * 2 and out.finished == [True, True]
    assert all(b == 0 for call in learner.calls for b in call)


def test_switch_points_follow_beta_and_stay_inside_the_roll_in():
    rng = random.Random(0)
    draws = draw_switches(20000, 0.3, 8, rng)
    assert abs(sum(h > 0 for h in draws) / len(draws) - 0.3) < 0.02
    assert {h for h in draws if h} == set(range(1, 8))
    assert draw_switches(50, 0.0, 8, rng) == [0] * 50
    with pytest.raises(ValueError, match="guide_beta"):
        draw_switches(3, 1.5, 8, rng)


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
    seen = []

    def complete(texts, max_new_tokens):
        seen.extend(texts)
        return ["b c"] * len(texts)

    text = TextWriter(complete, tok).write(ids, mask, [5, 1])
    assert seen == ["a a", "a a"]  # the context is handed over as text
    b, c = tok.convert_tokens_to_ids("b"), tok.convert_tokens_to_ids("c")
    assert text[0] == ([b, c, tok.eos_token_id], True)  # it fit: finished
    assert text[1] == ([b], False)  # cut to the budget


def test_the_generation_output_marks_learner_tokens():
    ids, mask = prompts(2)
    tok = tiny_word_tokenizer("a b c d e f g h".split())
    out = guided_rollout(Scripted(LEARNER), Scripted(GUIDE), "guide", ids, mask, [2, 0], 4, pad_id=0)
    gen, learner = as_generation_output(out, ids, mask, tok, pad_id=0)
    assert gen.response_ids.tolist() == [[GUIDE, GUIDE, LEARNER, LEARNER], [LEARNER] * 4]
    assert learner.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert gen.response_mask.tolist() == [[1] * 4] * 2
