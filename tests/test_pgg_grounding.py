"""PGG as the paper runs it (issue 30): weights in (0, 1) under any tokenizer, groundings that fit on fresh samples
until held-out ranking stops improving, log-probs at the sampling temperature, and a trainer that learns."""

import json

import pytest
import torch

import tokencredit.rl.pgg_trainer as pgg_module
from tokencredit.rewards.pgg_rm import GroundingFitConfig, RankedGroup, fit_grounding
from tokencredit.rewards.token_rm import TokenRewardModel
from tokencredit.rl.pgg_trainer import PGGConfig, PGGTrainer
from tokencredit.rl.rollout import response_logits
from tokencredit.testing import tiny_causal_lm, tiny_scalar_model, tiny_word_tokenizer

WORDS = "a b x y".split()
PROMPTS = ["a", "b", "a b", "b a"]


def count_y(prompts, responses):
    """A metric that is a sum over tokens: how many times the response says "y"."""
    return [float(r.split().count("y")) for r in responses]


def policy_and_tokenizer(seed=0):
    tok = tiny_word_tokenizer(WORDS)
    return tiny_causal_lm(len(tok), seed=seed, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id), tok


def config(tmp_path, name, **kw):
    base = dict(output_dir=str(tmp_path / name), batch_size=8, max_new_tokens=5, progress=False,
                log_tensorboard=False, mixed_precision="no", save_every=1000)
    base.update(kw)
    return PGGConfig(**base)


def constant_rm(tok, level):
    model = tiny_scalar_model(len(tok), seed=1)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(level)
    return TokenRewardModel(model, tok, bounded=True)


def test_a_constant_reward_model_under_another_tokenizer_gives_constant_weights(tmp_path):
    policy, tok = policy_and_tokenizer()
    other = tiny_word_tokenizer(["y", "b", "z", "x", "a", "q"])  # the same words under other ids: another tokenizer
    assert other("x y")["input_ids"] != tok("x y")["input_ids"]
    trainer = PGGTrainer(config(tmp_path, "c"), policy, tok, PROMPTS, count_y, reward_model=constant_rm(other, 0.7))
    eos = tok.eos_token_id
    rows = [tok("x y y")["input_ids"] + [eos], tok("a b x b a")["input_ids"], [eos], tok("y")["input_ids"]]
    weights = trainer._token_rewards(["a"] * 4, rows, torch.Size([4, 6]))
    expected = torch.sigmoid(torch.tensor(0.7)).item()
    for row, ids in zip(weights, rows):
        assert row[: len(ids)].tolist() == pytest.approx([expected] * len(ids))  # never a sum of pieces
        assert (row[len(ids) :] == 0).all()


def test_grounding_reads_what_the_lm_step_reads(tmp_path):
    # Same tokenizer: the sampled ids themselves. Another tokenizer: the RM's tokens of the text, with the RM's end
    # token only where the policy ended (an unfinished answer is never graded as finished).
    policy, tok = policy_and_tokenizer()
    same = PGGTrainer(config(tmp_path, "s"), policy, tok, PROMPTS, count_y,
                      reward_model=TokenRewardModel(tiny_scalar_model(len(tok)), tok, bounded=True))
    gen, _ = same._sample(["a", "b", "a b", "b a"] * 4, score=False)
    assert same._rm_ids(gen) == [r[: int(m.sum())].tolist() for r, m in zip(gen.response_ids, gen.response_mask)]
    other = tiny_word_tokenizer(["y", "b", "z", "x", "a"])
    cross = PGGTrainer(config(tmp_path, "x"), policy, tok, PROMPTS, count_y, reward_model=constant_rm(other, 0.0))
    ids = cross._rm_ids(gen)
    ended = [bool(m.sum()) and int(r[int(m.sum()) - 1]) == tok.eos_token_id
             for r, m in zip(gen.response_ids, gen.response_mask)]
    assert any(ended) and not all(ended)  # both kinds occur in this draw
    for text, row, done in zip(gen.texts, ids, ended):
        words = other(text, add_special_tokens=False)["input_ids"]
        assert row == words + ([other.eos_token_id] if done else [])


def _toy_groups(rm_tok, rng, n, k=4, length=5):
    """n groups of K random x/y responses ranked by their count of "y" (a sum over tokens)."""
    groups = []
    for _ in range(n):
        texts = [" ".join(rng.choice(["x", "y", "a", "b"]) for _ in range(length)) for _ in range(k)]
        ids = [rm_tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        groups.append(RankedGroup("a", ids, [float(t.split().count("y")) for t in texts]))
    return groups


def test_fit_grounding_stops_when_held_out_accuracy_stalls_and_keeps_the_best_weights():
    import random

    tok = tiny_word_tokenizer(WORDS)
    rm = TokenRewardModel(tiny_scalar_model(len(tok), seed=0), tok, bounded=True)
    rng = random.Random(0)
    held_out = _toy_groups(tok, rng, 16)
    draws = []

    def draw():
        draws.append(1)
        return _toy_groups(tok, rng, 8)  # fresh lists every step

    result = fit_grounding(rm, draw, held_out, GroundingFitConfig(learning_rate=1e-2, aggregator="sum"),
                           torch.Generator().manual_seed(0))
    assert result["start"]["rank_pair_accuracy"] == 0.0  # zero head: every score ties, and a tie orders no pair
    assert result["best"]["rank_pair_accuracy"] >= 0.9
    assert result["stopped"] == "patience" and result["steps"] < 300 and len(draws) == result["steps"]
    # After the best check, `patience` checks did not improve on it, and the weights are the best check's.
    steps = [c["step"] for c in result["curve"]]
    assert steps[-1] - result["best"]["step"] == 4 * 10
    from tokencredit.rewards.pgg_rm import PGGRMConfig, _evaluate_groups

    again = _evaluate_groups(rm, held_out, PGGRMConfig(aggregator="sum"))
    assert again["rank_pair_accuracy"] == pytest.approx(result["best"]["rank_pair_accuracy"])
    assert again["listmle_loss"] == pytest.approx(result["best"]["listmle_loss"], rel=1e-5)


def test_no_patience_stop_before_min_steps():
    # A reward model that never improves on its start: patience alone stops it at the 3rd check, min_steps holds it.
    tok = tiny_word_tokenizer(WORDS)
    rm = TokenRewardModel(tiny_scalar_model(len(tok), seed=0), tok, bounded=True)
    import random

    rng = random.Random(0)
    held_out = _toy_groups(tok, rng, 4)
    fixed = _toy_groups(tok, rng, 8)
    settings = dict(learning_rate=1e-12, eval_every=5, patience=3)
    early = fit_grounding(rm, lambda: fixed, held_out, GroundingFitConfig(**settings), torch.Generator())
    held = fit_grounding(rm, lambda: fixed, held_out, GroundingFitConfig(**settings, min_steps=40), torch.Generator())
    assert early["stopped"] == held["stopped"] == "patience"
    assert early["steps"] == 15 and held["steps"] == 40
    with pytest.raises(ValueError, match="min_steps"):
        GroundingFitConfig(min_steps=400).validate()


@pytest.mark.parametrize("field", ["max_steps", "eval_every", "patience", "batch_size"])
def test_bad_fit_settings_name_the_field(field):
    with pytest.raises(ValueError, match=field):
        GroundingFitConfig(**{field: 0}).validate()
    tok = tiny_word_tokenizer(WORDS)
    rm = TokenRewardModel(tiny_scalar_model(len(tok)), tok, bounded=True)
    with pytest.raises(ValueError, match="held-out"):
        fit_grounding(rm, lambda: [], [], GroundingFitConfig(), torch.Generator())


def test_default_grounding_fits_a_sum_metric_above_0_8_and_logs_it(tmp_path):
    # The trainer's default fit (fresh samples, held-out stopping) on the tiny policy's own samples.
    policy, tok = policy_and_tokenizer()
    rm = TokenRewardModel(tiny_scalar_model(len(tok), seed=0), tok, bounded=True)
    cfg = config(tmp_path, "g", num_steps=1, aggregator="sum", rm_learning_rate=1e-2)
    row = PGGTrainer(cfg, policy, tok, PROMPTS, count_y, reward_model=rm).train()[0]
    assert row["ground/rm_start_accuracy"] < 0.7 and row["ground/rm_rank_accuracy"] >= 0.8, row
    fit = json.loads((tmp_path / "g" / "grounding" / "000" / "fit.json").read_text())
    assert fit["best"]["rank_pair_accuracy"] == row["ground/rm_rank_accuracy"]
    assert row["ground/rm_steps"] == fit["steps"] > cfg.rm_eval_every  # more than a token number of steps
    # fresh draws of 8 prompts x K=8, each used for 4 passes of 8 lists = 4 steps; plus 4 x 8 held out
    draws = -(-fit["steps"] // 4)
    assert row["ground/metric_calls"] == 8 * 8 * draws + 4 * 8


def test_log_probs_and_entropy_are_those_of_the_sampling_temperature(tmp_path):
    policy, tok = policy_and_tokenizer()
    cfg = config(tmp_path, "t", num_steps=1, batch_size=4, guidance="sequence", temperature=2.0, learning_rate=1e-9)
    trainer = PGGTrainer(cfg, policy, tok, PROMPTS, count_y)
    seen = {}
    real_loss, real_sample = pgg_module.pgg_reinforce_loss, trainer._sample

    def spy_loss(logprobs, rewards, mask, entropy, *args):
        seen["logprobs"], seen["entropy"], seen["mask"] = logprobs.detach(), entropy.detach(), mask
        return real_loss(logprobs, rewards, mask, entropy, *args)

    def spy_sample(prompts, score=True):
        seen["gen"] = real_sample(prompts, score)
        return seen["gen"]

    pgg_module.pgg_reinforce_loss, trainer._sample = spy_loss, spy_sample
    try:
        trainer.train()
    finally:
        pgg_module.pgg_reinforce_loss = real_loss
    gen = seen["gen"][0]
    with torch.no_grad():
        logits = response_logits(policy, torch.cat([gen.prompt_ids, gen.response_ids], 1),
                                 torch.cat([gen.prompt_mask, gen.response_mask], 1), gen.response_ids.size(1))
    tempered = torch.log_softmax(logits.float() / 2.0, -1)
    expected = tempered.gather(-1, gen.response_ids.unsqueeze(-1)).squeeze(-1)
    on = seen["mask"].bool()
    assert torch.allclose(seen["logprobs"][on], expected[on], atol=1e-4)
    entropy = -(tempered.exp() * tempered).sum(-1)
    assert torch.allclose(seen["entropy"][on], entropy[on], atol=1e-4)
    assert not torch.allclose(torch.log_softmax(logits.float(), -1).gather(
        -1, gen.response_ids.unsqueeze(-1)).squeeze(-1)[on], expected[on], atol=1e-2)  # T = 1 would differ


def test_forty_reinforce_steps_with_the_default_objective_raise_the_metric_word(tmp_path):
    # A tiny random policy; the metric counts one word; the LM only sees the token reward grounded in rankings.
    # Defaults: alpha = 0.01, avg aggregator, the default grounding fit.
    policy, tok = policy_and_tokenizer()
    cfg = config(tmp_path, "learn", num_steps=40, ground_every=10, learning_rate=1e-2, rm_learning_rate=1e-2,
                 log_score=True)
    assert cfg.entropy_coef == 0.01 and cfg.aggregator == "avg"

    def share_of_x(prompts, responses):
        return [r.split().count("x") / max(1, len(r.split())) for r in responses]

    history = PGGTrainer(cfg, policy, tok, PROMPTS, share_of_x,
                         reward_model=TokenRewardModel(tiny_scalar_model(len(tok)), tok, bounded=True)).train()
    early = sum(h["score/mean"] for h in history[:3]) / 3
    late = sum(h["score/mean"] for h in history[-5:]) / 5
    assert late > early + 0.25, (early, late)
    accuracies = [h["ground/rm_rank_accuracy"] for h in history if "ground/index" in h]
    assert len(accuracies) == 2 and accuracies[0] > 0.7  # groundings before steps 0 and 10 (until 20)


def test_without_score_logging_only_groundings_call_the_metric(tmp_path):
    policy, tok = policy_and_tokenizer()
    cfg = config(tmp_path, "quiet", num_steps=3, ground_every=2, log_score=False, rm_max_steps=4, rm_eval_every=2,
                 rm_eval_prompts=2, ground_prompts=2)
    history = PGGTrainer(cfg, policy, tok, PROMPTS, count_y,
                         reward_model=TokenRewardModel(tiny_scalar_model(len(tok)), tok, bounded=True)).train()
    assert all("score/mean" not in h for h in history)
    assert history[-1]["metric/calls"] == sum(h["ground/metric_calls"] for h in history if "ground/index" in h)
