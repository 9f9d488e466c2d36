import json
import math
import random

import pytest
import torch

from tokencredit.rewards.records import PreferencePair
from tokencredit.rewards.seq_rm import (
    SeqRMConfig,
    SequenceRewardModel,
    bt_loss,
    evaluate_sequence_reward_model,
    train_sequence_reward_model,
)
from tokencredit.testing import tiny_scalar_model, tiny_word_tokenizer

WORDS = "a b c d x y".split()


def make_rm(seed=0):
    tok = tiny_word_tokenizer(WORDS)
    model = tiny_scalar_model(len(tok), seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.nn.init.normal_(model.head.weight)
    return SequenceRewardModel.from_model(model, tok)


def toy_pairs(n, seed=0):
    """The chosen response holds more y than the rejected one (lengths differ too)."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        a, b = (" ".join(rng.choice("xy") for _ in range(rng.randint(2, 6))) for _ in range(2))
        if a.count("y") == b.count("y"):
            continue
        chosen, rejected = (a, b) if a.count("y") > b.count("y") else (b, a)
        out.append(PreferencePair(prompt=rng.choice("abcd"), chosen=chosen, rejected=rejected))
    return out


def test_bt_loss_hand_computed_with_and_without_margin():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))) / 2
    assert bt_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)
    margin = torch.tensor([1.0, -1.0])  # differences become 0 and 0
    assert bt_loss(chosen, rejected, margin).item() == pytest.approx(math.log(2), rel=1e-6)


def test_sequence_score_is_the_head_output_at_the_last_token():
    rm = make_rm()
    ids = [rm.encode_response("x y y"), rm.encode_response("a")]
    rewards, mask = rm.token_rewards(["a b", "c"], ids)
    scores = rm.sequence_scores(["a b", "c"], ids)
    assert scores.shape == (2,)
    for i, row in enumerate(ids):
        assert scores[i].item() == pytest.approx(rewards[i, len(row) - 1].item(), abs=1e-6)
    listed = rm.score_sequences(["a b", "c"], ["x y y", "a"])
    assert listed == pytest.approx(scores.tolist(), abs=1e-6)
    probs = rm.probabilities(["a b", "c"], ["x y y", "a"])
    assert probs == pytest.approx([1 / (1 + math.exp(-s)) for s in listed])
    with pytest.raises(ValueError, match="at least one token"):
        rm.sequence_scores(["a"], [[]])


def test_training_learns_the_preference_and_saves_a_loadable_model(tmp_path):
    rm = make_rm()
    pairs, held = toy_pairs(96, seed=0), toy_pairs(40, seed=1)
    before = evaluate_sequence_reward_model(rm, held)["pair_accuracy"]
    config = SeqRMConfig(output_dir=str(tmp_path / "rm"), num_epochs=4, batch_size=16, learning_rate=3e-3,
                         progress=False, eval_fraction=0.25)
    history = train_sequence_reward_model(rm, config, pairs)
    assert history[-1]["eval"]["pairs"] == 24
    after = evaluate_sequence_reward_model(rm, held)
    assert after["pair_accuracy"] >= 0.9 and after["pair_accuracy"] > before, (before, after)
    assert after["mean_margin"] > 0
    assert json.loads((tmp_path / "rm" / "eval.json").read_text()) == history[-1]["eval"]
    lines = (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 * math.ceil(72 / 16)
    reloaded = SequenceRewardModel.from_pretrained(tmp_path / "rm" / "model")
    texts = [p.chosen for p in held[:5]]
    assert reloaded.score_sequences(["a"] * 5, texts) == pytest.approx(rm.score_sequences(["a"] * 5, texts), abs=1e-5)


def test_margins_enter_the_training_loss(tmp_path):
    pairs = toy_pairs(16, seed=0)
    for margin in (0.0, 3.0):
        rm = make_rm()
        torch.nn.init.zeros_(rm.model.head.weight)  # every score starts at 0: the first loss is softplus(margin)
        config = SeqRMConfig(output_dir=str(tmp_path / str(margin)), num_epochs=1, batch_size=16,
                             learning_rate=1e-3, progress=False, eval_fraction=0.0)
        history = train_sequence_reward_model(rm, config, pairs, margins=[margin] * len(pairs))
        assert history[0]["loss/bt"] == pytest.approx(math.log1p(math.exp(margin)), rel=1e-5)


def test_reward_fn_for_ppo_and_input_errors(tmp_path):
    rm = make_rm()
    scores = rm.score_sequences(["a", "b"], ["x y", "y"])
    fn = rm.as_reward_fn(scale=2.0, baseline=0.5)
    assert fn(["a", "b"], ["x y", "y"], [[1], [2]]) == pytest.approx([2 * (s - 0.5) for s in scores])
    sig = rm.as_reward_fn(sigmoid=True)(["a", "b"], ["x y", "y"], [[1], [2]])
    assert sig == pytest.approx([1 / (1 + math.exp(-s)) for s in scores])
    with pytest.raises(ValueError, match="sequence rewards only"):
        rm.as_reward_fn("token")
    config = SeqRMConfig(output_dir=str(tmp_path / "rm"), progress=False)
    with pytest.raises(ValueError, match="nothing to train on"):
        train_sequence_reward_model(rm, config, [])
    with pytest.raises(ValueError, match="1 margins for 2 pairs"):
        train_sequence_reward_model(rm, config, toy_pairs(2), margins=[1.0])
    with pytest.raises(ValueError, match="batch_size"):
        SeqRMConfig(batch_size=0).validate()


def test_a_cut_response_keeps_its_end_token_where_the_score_is_read():
    rm = make_rm()
    eos = rm.tokenizer.eos_token_id
    short = rm.encode_scored("x y", 8)
    assert short == rm.encode_response("x y") and short[-1] == eos
    cut = rm.encode_scored("x y x y x y x y", 4)
    assert len(cut) == 4 and cut[-1] == eos and cut[:3] == rm.encode_response("x y x y x y x y")[:3]
    with pytest.raises(ValueError, match="end token is always kept"):
        rm.encode_scored("x", 0)


def test_training_and_scoring_read_a_long_response_at_the_same_token():
    from tokencredit.rewards.seq_rm import _pair_scores

    rm = make_rm()
    long_text = " ".join("xy"[i % 2] for i in range(40))
    pair = PreferencePair(prompt="a b c", chosen=long_text, rejected="y")
    with torch.no_grad():
        trained_chosen, trained_rejected = _pair_scores(rm, [pair], max_length=12)
    scored = rm.score_sequences(["a b c", "a b c"], [long_text, "y"], max_length=12)
    assert scored == pytest.approx([trained_chosen.item(), trained_rejected.item()], abs=1e-5)
    # The cut changes the score (the model reads a different text), and the end token is where it is read.
    rewards, mask = rm.token_rewards(["a b c"], [rm.encode_scored(long_text, 11)], max_prompt_length=1)
    assert scored[0] == pytest.approx(rewards[0, int(mask.sum()) - 1].item(), abs=1e-5)
    metrics = evaluate_sequence_reward_model(rm, [pair], max_length=12)
    assert metrics["pair_accuracy"] == float(scored[0] > scored[1])


def test_a_response_past_the_backbone_positions_is_cut_not_an_error():
    rm = make_rm()
    limit = rm.model.backbone.config.max_position_embeddings
    huge = " ".join("x" for _ in range(limit + 20))
    [score] = rm.score_sequences(["a"], [huge])
    [same] = rm.score_sequences(["a"], [huge], max_length=limit)
    assert math.isfinite(score) and score == pytest.approx(same, abs=1e-5)
    with pytest.raises(ValueError, match="max_length must be >= 2"):
        rm.score_sequences(["a"], ["x"], max_length=1)


def test_learning_rate_schedules():
    from tokencredit.rewards.fit import lr_at

    assert [lr_at(s, 4, 1.0) for s in range(4)] == [1.0] * 4
    assert [lr_at(s, 4, 1.0, "linear") for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    warm = [lr_at(s, 10, 1.0, "linear", 0.2) for s in range(10)]
    assert warm[:2] == pytest.approx([1 / 3, 2 / 3]) and warm[2] == 1.0 and warm[-1] == pytest.approx(1 / 8)
    assert all(a > b for a, b in zip(warm[2:], warm[3:]))
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_at(0, 4, 1.0, "cosine")


def test_a_linear_schedule_reaches_the_optimiser(tmp_path):
    pairs = toy_pairs(32)
    rm = make_rm()
    config = SeqRMConfig(output_dir=str(tmp_path / "a"), num_epochs=2, batch_size=8, learning_rate=1e-3,
                         lr_schedule="linear", eval_fraction=0.0, progress=False)
    history = train_sequence_reward_model(rm, config, pairs)
    lrs = [h["lr"] for h in history if "lr" in h]
    assert lrs == pytest.approx([1e-3 * (8 - s) / 8 for s in range(8)])
    with pytest.raises(ValueError, match="lr_schedule"):
        SeqRMConfig(lr_schedule="cosine").validate()
    with pytest.raises(ValueError, match="warmup_ratio"):
        SeqRMConfig(warmup_ratio=1.0).validate()
