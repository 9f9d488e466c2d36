"""PGG's LM side: both objectives against hand-computed values, metric rankings, the alternating trainer."""

import json
import math

import pytest
import torch

from tokencredit.rewards.token_rm import TokenRewardModel
from tokencredit.rl.losses import pgg_reinforce_loss, token_weights_to_go, weighted_mle_loss
from tokencredit.rl.pgg_trainer import PGGConfig, PGGTrainer, rank_by_score, ranked_lists
from tokencredit.runs import read_metrics
from tokencredit.testing import tiny_causal_lm, tiny_scalar_model, tiny_word_tokenizer

LOGPROBS = [[-1.0, -2.0], [-0.5, 0.0]]
REWARDS = [[0.5, 0.25], [1.0, 9.0]]  # the 9 sits on padding and must count for nothing
MASK = [[1, 1], [1, 0]]


def test_reinforce_loss_matches_hand_computation_and_weights_carry_no_gradient():
    logprobs = torch.tensor(LOGPROBS, requires_grad=True)
    rewards = torch.tensor(REWARDS, requires_grad=True)
    entropy = torch.tensor([[1.0, 2.0], [3.0, 100.0]])
    loss, stats = pgg_reinforce_loss(logprobs, rewards, torch.tensor(MASK), entropy, entropy_coef=0.125)
    # (0.5*1 + 0.25*2 + 1*0.5) / 3 tokens = 0.5; entropy mean (1+2+3)/3 = 2; 0.5 - 0.125*2
    assert loss.item() == pytest.approx(0.25)
    assert stats["loss/pg"] == pytest.approx(0.5) and stats["entropy/mean"] == pytest.approx(2.0)
    loss.backward()
    assert torch.allclose(logprobs.grad, torch.tensor([[-0.5 / 3, -0.25 / 3], [-1.0 / 3, 0.0]]))
    assert rewards.grad is None


def test_reinforce_reward_to_go_sums_later_rewards_within_the_mask():
    mask = torch.tensor(MASK)
    assert torch.allclose(token_weights_to_go(torch.tensor(REWARDS), mask), torch.tensor([[0.75, 0.25], [1.0, 0.0]]))
    loss, _ = pgg_reinforce_loss(torch.tensor(LOGPROBS), torch.tensor(REWARDS), mask, reward_to_go=True)
    assert loss.item() == pytest.approx((0.75 * 1 + 0.25 * 2 + 1.0 * 0.5) / 3)


def test_weighted_mle_normalises_rewards_per_row():
    logprobs = torch.tensor(LOGPROBS, requires_grad=True)
    loss, stats = weighted_mle_loss(logprobs, torch.tensor(REWARDS), torch.tensor(MASK))
    # row 0: w = (2/3, 1/3), NLL (1, 2) -> 4/3; row 1: w = (1), NLL 0.5 -> 0.5; mean over rows
    assert loss.item() == pytest.approx((4 / 3 + 0.5) / 2)
    assert stats["loss/plain_nll"] == pytest.approx(0.5 * (1 + 2 + 0.5) / 3 * 2)
    loss.backward()
    assert torch.allclose(logprobs.grad, torch.tensor([[-1 / 3, -1 / 6], [-0.5, 0.0]]))
    with pytest.raises(ValueError, match="non-negative"):
        weighted_mle_loss(torch.zeros(1, 2), torch.tensor([[0.5, -0.1]]), torch.ones(1, 2))
    empty, _ = weighted_mle_loss(torch.zeros(2, 2), torch.ones(2, 2), torch.tensor([[1, 0], [0, 0]]))
    assert empty.item() == 0.0  # a row without tokens is left out, not a division by zero


def test_rankings_follow_scores_and_ties_break_at_random_but_seeded():
    assert rank_by_score([0.1, 0.9, 0.5]) == [2, 0, 1]
    draws = {tuple(rank_by_score([1.0, 1.0, 0.0], torch.Generator().manual_seed(s))) for s in range(20)}
    assert draws == {(0, 1, 2), (1, 0, 2)}  # both tie orders occur; the lower score is always last
    assert rank_by_score([1.0, 1.0], torch.Generator().manual_seed(3)) == rank_by_score(
        [1.0, 1.0], torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="NaN"):
        rank_by_score([0.1, math.nan])
    lists = ranked_lists(["p", "p", "q", "q"], ["a", "b", "c", "d"], [0.0, 1.0, 5.0, 2.0], k=2)
    assert [(lst.prompt, lst.ranking) for lst in lists] == [("p", [1, 0]), ("q", [0, 1])]
    with pytest.raises(ValueError, match="multiple of k"):
        ranked_lists(["p"] * 3, ["a"] * 3, [0.0] * 3, k=2)


WORDS = "a b x y".split()
PROMPTS = ["a", "b", "a b", "b a"]


def share_of_y(prompts, responses):
    return [r.split().count("y") / max(1, len(r.split())) for r in responses]


def make(tmp_path, name="run", rm_seed=0, references=None, **kw):
    tok = tiny_word_tokenizer(WORDS)
    policy = tiny_causal_lm(len(tok), seed=0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    rm = TokenRewardModel(tiny_scalar_model(len(tok), seed=rm_seed), tok, bounded=True)
    base = dict(output_dir=str(tmp_path / name), num_steps=4, batch_size=4, max_new_tokens=5, samples_per_prompt=3,
                ground_prompts=4, ground_every=2, ground_until=3, rm_epochs=1, rm_batch_size=2, learning_rate=1e-2,
                rm_max_steps=6, rm_eval_every=2, rm_patience=2, rm_eval_prompts=2,
                rm_learning_rate=1e-2, progress=False, log_tensorboard=False, mixed_precision="no", save_every=2)
    base.update(kw)
    return PGGTrainer(PGGConfig(**base), policy, tok, PROMPTS, share_of_y, references=references, reward_model=rm)


def test_schedule_grounds_early_and_stops():
    cfg = PGGConfig(num_steps=100, ground_every=10)
    assert [s for s in range(100) if cfg.grounds_at(s)] == [0, 10, 20, 30, 40]  # until half of num_steps
    assert [s for s in range(9) if PGGConfig(ground_every=3, ground_until=7).grounds_at(s)] == [0, 3, 6]


def test_trainer_alternates_grounding_and_lm_steps_and_resumes_exactly(tmp_path):
    straight = make(tmp_path, "straight")
    history = straight.train()
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert all(0 <= h["score/mean"] <= 1 for h in history)
    assert [h.get("ground/index") for h in history] == [1, None, 2, None]  # steps 0 and 2 (< ground_until 3)
    assert all(h["reward/token_mean"] > 0 and h["reward/token_mean"] < 1 for h in history)  # bounded reward
    run = tmp_path / "straight"
    fits = [json.loads((run / "grounding" / f"00{i}" / "fit.json").read_text()) for i in (0, 1)]
    for fit, row in zip(fits, [history[0], history[2]]):
        # a check before the first step and every rm_eval_every=2 steps, up to rm_max_steps=6 or patience
        assert [c["step"] for c in fit["curve"]][:2] == [0, 2] and fit["steps"] <= 6
        assert row["ground/rm_steps"] == fit["steps"] and row["ground/rm_rank_accuracy"] == fit["best"][
            "rank_pair_accuracy"]
        # held-out (2 prompts x K=3) and training draws (4 prompts x 3 per draw) are all metric calls
        assert row["ground/metric_calls"] == fit["metric_calls"] >= 2 * 3 + 4 * 3
    assert history[-1]["metric/calls"] == sum(r["ground/metric_calls"] for r in history if "ground/index" in r) + 4 * 4
    assert (run / "policy").is_dir() and (run / "reward_model").is_dir()
    loaded = TokenRewardModel.from_pretrained(run / "reward_model")
    assert loaded.bounded

    # Interrupted after step 2 (a checkpoint), then resumed: the same numbers as the straight run.
    first = make(tmp_path, "cut", num_steps=2)
    first.train()
    resumed = make(tmp_path, "cut", resume=True)
    again = resumed.train()
    assert len(again) == 4
    for a, b in zip(history, again):
        assert a["score/mean"] == pytest.approx(b["score/mean"]) and a["loss/total"] == pytest.approx(b["loss/total"])
    for p, q in zip(straight.policy.parameters(), resumed.policy.parameters()):
        assert torch.allclose(p, q)
    assert len(read_metrics(tmp_path / "cut")) == 4


def test_weighted_mle_trains_on_references_and_needs_them(tmp_path):
    with pytest.raises(ValueError, match="needs references"):
        make(tmp_path, objective="weighted_mle")
    with pytest.raises(ValueError, match="one text per prompt"):
        make(tmp_path, objective="weighted_mle", references=["y y"])
    trainer = make(tmp_path, objective="weighted_mle", references=["y y", "y x", "y", "x y y"], num_steps=2)
    history = trainer.train()
    assert all("loss/weighted_nll" in h and "score/mean" in h for h in history)
    assert history[-1]["loss/plain_nll"] < history[0]["loss/plain_nll"]  # it is learning the references


def test_baselines_share_the_loop_without_a_reward_model(tmp_path):
    tok = tiny_word_tokenizer(WORDS)
    policy = tiny_causal_lm(len(tok), seed=0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = PGGConfig(output_dir=str(tmp_path / "seq2"), num_steps=2, batch_size=4, max_new_tokens=5,
                       guidance="sequence", progress=False, log_tensorboard=False, mixed_precision="no")
    history = PGGTrainer(config, policy, tok, PROMPTS, share_of_y).train()
    assert all("ground/index" not in h for h in history) and not (tmp_path / "seq2" / "grounding").exists()
    assert not (tmp_path / "seq2" / "reward_model").exists()
    with pytest.raises(ValueError, match="uses no reward model"):
        PGGTrainer(config, policy, tok, PROMPTS, share_of_y,
                   reward_model=TokenRewardModel(tiny_scalar_model(len(tok)), tok))
    # guidance="none" with weighted MLE is plain MLE: the loss is the mean over rows of each row's mean NLL.
    plain = PGGConfig(output_dir=str(tmp_path / "mle"), num_steps=1, batch_size=4, objective="weighted_mle",
                      guidance="none", progress=False, log_tensorboard=False, mixed_precision="no")
    refs = ["y y", "y x", "y", "x y y"]
    trainer = PGGTrainer(plain, policy, tok, PROMPTS, share_of_y, references=refs)
    from tokencredit.rl.sft import collate_examples, response_nll

    batch = collate_examples([trainer._examples[i] for i in trainer.batch_indices(0, 4)], tok.pad_token_id)
    with torch.no_grad():
        nll = response_nll(policy, batch)
    expected = (nll.sum(-1) / batch.response_mask.sum(-1)).mean().item()
    assert trainer.train()[0]["loss/total"] == pytest.approx(expected, rel=1e-4)


def test_sequence_weights_are_the_standardised_scores(tmp_path):
    tok = tiny_word_tokenizer(WORDS)
    policy = tiny_causal_lm(len(tok), seed=0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = PGGConfig(output_dir=str(tmp_path / "s"), num_steps=1, batch_size=4, max_new_tokens=5,
                       guidance="sequence", entropy_coef=0.0, progress=False, log_tensorboard=False,
                       mixed_precision="no")
    seen = {}

    def scored(prompts, responses):
        seen["scores"] = share_of_y(prompts, responses)
        return seen["scores"]

    trainer = PGGTrainer(config, policy, tok, PROMPTS, scored)
    real = pgg_reinforce_loss

    def spy(logprobs, rewards, mask, *args):
        seen["rewards"], seen["mask"] = rewards.clone(), mask.clone()
        return real(logprobs, rewards, mask, *args)

    import tokencredit.rl.pgg_trainer as pgg_module

    pgg_module.pgg_reinforce_loss, saved = spy, pgg_module.pgg_reinforce_loss
    try:
        stats = trainer.train()[0]
    finally:
        pgg_module.pgg_reinforce_loss = saved
    per_row = seen["rewards"][:, 0]
    assert per_row.sum().item() == pytest.approx(0.0, abs=1e-5)  # centred on the batch mean
    assert torch.allclose(seen["rewards"], per_row[:, None].expand_as(seen["rewards"]))  # one weight per sample
    scores = torch.tensor(seen["scores"])
    assert scores.std() > 0  # the tiny policy's samples differ in their share of "y"
    expected = (scores - scores.mean()) / scores.std(unbiased=False)  # RLPrompt-style z-score: unit scale
    assert torch.allclose(per_row, expected, atol=1e-5)
    assert stats["score/std"] == pytest.approx(scores.std(unbiased=False).item(), abs=1e-6)


@pytest.mark.parametrize("field,value,match", [
    ("samples_per_prompt", 1, "samples_per_prompt"), ("objective", "dpo", "objective"),
    ("aggregator", "max", "aggregator"), ("ground_every", 0, "ground_every"), ("entropy_coef", -1.0, "entropy"),
    ("guidance", "none", "guidance must be one of")])
def test_bad_settings_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        PGGConfig(**{field: value}).validate()


@pytest.mark.parametrize("word", ["x", "y"])
def test_guidance_grounded_in_the_metric_raises_the_metric(tmp_path, word):
    # The metric rewards one word; the LM never sees the metric, only the token reward fitted to its rankings, so
    # whichever word the metric names is the one that spreads.
    tok = tiny_word_tokenizer(WORDS)
    policy = tiny_causal_lm(len(tok), seed=0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    rm = TokenRewardModel(tiny_scalar_model(len(tok), seed=0), tok, bounded=True)
    config = PGGConfig(output_dir=str(tmp_path / word), num_steps=20, batch_size=8, max_new_tokens=5,
                       samples_per_prompt=3, ground_prompts=8, ground_every=5, ground_until=15, rm_epochs=3,
                       rm_batch_size=2, rm_max_steps=24, rm_eval_every=4, rm_patience=2, rm_eval_prompts=4,
                       learning_rate=1e-2, rm_learning_rate=1e-2, entropy_coef=0.0, progress=False,
                       log_tensorboard=False, mixed_precision="no", save_every=100)

    def share(prompts, responses):
        return [r.split().count(word) / max(1, len(r.split())) for r in responses]

    history = PGGTrainer(config, policy, tok, PROMPTS, share, reward_model=rm).train()
    early = sum(h["score/mean"] for h in history[:3]) / 3
    late = sum(h["score/mean"] for h in history[-3:]) / 3
    assert late > early + 0.3, (early, late)
