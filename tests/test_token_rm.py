import json
import math
import random

import pytest
import torch

from tokencredit import PPOConfig, PPOTrainer
from tokencredit.models import LoraSettings, ScalarHeadModel
from tokencredit.rewards.labels import SpanLabel, word_spans
from tokencredit.rewards.records import PreferencePair, TokenExample
from tokencredit.rewards.token_rm import TokenRewardModel, same_tokenizer
from tokencredit.rewards.token_rm_training import (
    TokenRMConfig,
    summed_bt_loss,
    token_bce_loss,
    train_token_reward_model,
)
from tokencredit.runs import read_metrics
from tokencredit.testing import tiny_causal_lm, tiny_scalar_model, tiny_word_tokenizer

WORDS = "a b c d x y".split()


def make_rm(seed=0, random_head=True):
    tok = tiny_word_tokenizer(WORDS)
    model = tiny_scalar_model(len(tok), seed=seed)
    if random_head:
        # A zero head scores every token 0; a random one makes comparisons between scores meaningful.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            torch.nn.init.normal_(model.head.weight)
    return TokenRewardModel.from_model(model, tok)


def cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "rm"), num_epochs=3, batch_size=16, learning_rate=3e-3, progress=False,
                eval_fraction=0.2, seed=0)
    base.update(kw)
    return TokenRMConfig(**base)


def toy_token_examples(n, seed=0):
    """Responses of x/y/a/b; the span rule: x is bad, y is good, others unlabelled."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        response = " ".join(rng.choice("xyab") for _ in range(rng.randint(2, 7)))
        spans = [SpanLabel(s, e, -1 if w == "x" else 1) for s, e, w in word_spans(response) if w in "xy"]
        out.append(TokenExample(prompt=" ".join(rng.choice("abcd") for _ in range(rng.randint(1, 4))),
                                response=response, spans=spans))
    return out


def toy_pairs(n, seed=0):
    """Pairs of equal length where the chosen response holds more y than the rejected one."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        length = rng.randint(2, 6)
        a, b = (" ".join(rng.choice("xy") for _ in range(length)) for _ in range(2))
        if a.count("y") == b.count("y"):
            continue
        chosen, rejected = (a, b) if a.count("y") > b.count("y") else (b, a)
        out.append(PreferencePair(prompt=rng.choice("abcd"), chosen=chosen, rejected=rejected))
    return out


# ---------------------------------------------------------------------- losses
def test_token_bce_loss_hand_computed():
    ln3 = math.log(3.0)
    rewards = torch.tensor([[0.0, ln3, 5.0], [-ln3, 7.0, 9.0]])
    labels = torch.tensor([[1, -1, 0], [-1, 1, 1]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # Labelled and unmasked: (0, good) -> ln 2; (ln3, bad) -> -ln(1 - 3/4) = ln 4; (-ln3, bad) -> ln(4/3);
    # (7, good) -> ln(1 + e^-7). The 0-labelled token and the masked 9 are left out.
    expected = (math.log(2) + math.log(4) + math.log(4 / 3) + math.log1p(math.exp(-7))) / 4
    assert token_bce_loss(rewards, labels, mask).item() == pytest.approx(expected, rel=1e-6)
    # Nothing labelled: 0, and still differentiable.
    rewards.requires_grad_(True)
    zero = token_bce_loss(rewards, torch.zeros_like(labels), mask)
    zero.backward()
    assert zero.item() == 0.0 and rewards.grad is not None
    # Balanced: good tokens (ln 2, ln(1 + e^-7)) and bad tokens (ln 4, ln 4/3) are averaged separately.
    good = (math.log(2) + math.log1p(math.exp(-7))) / 2
    bad = (math.log(4) + math.log(4 / 3)) / 2
    assert token_bce_loss(rewards, labels, mask, balanced=True).item() == pytest.approx((good + bad) / 2, rel=1e-6)
    only_bad = torch.tensor([[0, -1, 0], [-1, 0, 0]])
    assert token_bce_loss(rewards, only_bad, mask, balanced=True).item() == pytest.approx(
        token_bce_loss(rewards, only_bad, mask).item())


def test_summed_bt_loss_hand_computed():
    chosen = torch.tensor([[1.0, 2.0, 100.0], [0.0, 0.0, 0.0]])
    chosen_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    rejected = torch.tensor([[0.5, 0.5], [1.0, -100.0]])
    rejected_mask = torch.tensor([[1, 1], [1, 0]])
    # Margins: (1 + 2) - (0.5 + 0.5) = 2 and 0 - 1 = -1.
    expected = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(1.0))) / 2
    loss = summed_bt_loss(chosen, chosen_mask, rejected, rejected_mask)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------- scoring
def test_reward_fn_gives_one_value_per_token_and_sequence_is_the_sum():
    rm = make_rm()
    tok = rm.tokenizer
    ids = [tok.convert_tokens_to_ids(t) for t in (["x", "y", "<eos>"], ["a"], ["b", "b", "b", "b", "<eos>"])]
    prompts = ["a b", "c", "d d d"]
    responses = tok.batch_decode(ids, skip_special_tokens=True)
    token = rm.as_reward_fn("token")(prompts, responses, ids)
    assert [len(r) for r in token] == [3, 1, 5]
    assert all(isinstance(v, float) for row in token for v in row)
    assert len({v for row in token for v in row}) > 3  # a random head gives distinct rewards
    sequence = rm.as_reward_fn("sequence", scale=2.0)(prompts, responses, ids)
    assert sequence == pytest.approx([2 * sum(row) for row in token], rel=1e-6)
    assert rm.as_reward_fn("token", scale=-1.0)(prompts, responses, ids)[0] == pytest.approx([-v for v in token[0]])
    with pytest.raises(ValueError, match="kind"):
        rm.as_reward_fn("tokens")


def test_score_tokenizes_text_with_eos():
    rm = make_rm()
    tok = rm.tokenizer
    scores = rm.score(["a"], ["x y"])
    ids = tok.convert_tokens_to_ids(["x", "y", "<eos>"])
    assert scores == [pytest.approx(rm.score_token_ids(["a"], [ids])[0])]
    assert len(scores[0]) == 3


def test_reward_reads_the_token_itself():
    """r_t is read at token t (it has seen y<=t): changing token t changes r_t but not r_<t."""
    rm = make_rm()
    tok = rm.tokenizer
    one, two = (tok.convert_tokens_to_ids(t) for t in (["a", "x", "b"], ["a", "y", "b"]))
    s1, s2 = rm.score_token_ids(["c", "c"], [one, two])
    assert s1[0] == pytest.approx(s2[0], abs=1e-6)
    assert abs(s1[1] - s2[1]) > 1e-4


def test_left_padding_does_not_change_scores():
    rm = make_rm()
    tok = rm.tokenizer
    ids = tok.convert_tokens_to_ids(["x", "a", "y", "<eos>"])
    alone = rm.score_token_ids(["b c"], [ids])[0]
    long_prompt = " ".join(["d"] * 12)
    batched = rm.score_token_ids([long_prompt, "b c", "a"], [ids[:1], ids, ids[:2]])
    assert batched[1] == pytest.approx(alone, abs=1e-5)
    assert rm.score_token_ids(["b c", "a"], [ids, ids[:2]], batch_size=1)[0] == pytest.approx(alone, abs=1e-5)


def test_empty_response_and_mismatched_tokenizers():
    rm = make_rm()
    assert rm.score_token_ids(["a", "b"], [[], [4]])[0] == []
    other = tiny_word_tokenizer(["foo", "bar"])
    assert same_tokenizer(rm.tokenizer, tiny_word_tokenizer(WORDS))
    assert not same_tokenizer(rm.tokenizer, other)
    # Another tokenizer given to as_reward_fn: rewards are mapped through characters (tests/test_crossmap.py).
    ids = other("foo bar", add_special_tokens=False)["input_ids"] + [other.eos_token_id]
    mapped = rm.as_reward_fn("token", policy_tokenizer=other)(["a"], ["foo bar"], [ids])
    assert len(mapped[0]) == len(ids)
    with pytest.raises(ValueError, match="differs from the policy's"):
        rm.score_token_ids(["a"], [[3]], policy_tokenizer=other)
    with pytest.raises(ValueError, match="outside the reward model's vocabulary"):
        rm.score_token_ids(["a"], [[3, 10_000]])


def test_save_load_round_trip(tmp_path):
    rm = make_rm()
    prompts, responses = ["a b", "c"], ["x y a", "b"]
    before = rm.score(prompts, responses)
    rm.save_pretrained(tmp_path / "rm")
    loaded = TokenRewardModel.from_pretrained(tmp_path / "rm")
    assert loaded.score(prompts, responses) == before
    assert same_tokenizer(loaded.tokenizer, rm.tokenizer)
    # The folder is also a critic initialised from the reward model.
    assert isinstance(ScalarHeadModel.from_pretrained(tmp_path / "rm"), ScalarHeadModel)


# ---------------------------------------------------------------------- training
def test_bce_training_learns_a_token_rule(tmp_path):
    rm = make_rm(random_head=False)
    history = train_token_reward_model(rm, cfg(tmp_path), token_examples=toy_token_examples(200))
    final = history[-1]["eval"]
    assert final["labelled_tokens"] > 50
    assert final["token_accuracy"] > 0.9, final
    assert final["token_precision"] > 0.9 and final["token_recall"] > 0.9
    assert final["pair_accuracy"] is None and final["pairs"] == 0
    run = tmp_path / "rm"
    assert json.loads((run / "eval.json").read_text()) == final
    lines = read_metrics(run)
    assert [line["step"] for line in lines] == list(range(1, len(history)))
    assert "loss/bce" in lines[0] and "loss/bt" not in lines[0]
    assert lines[-1]["loss/bce"] < lines[0]["loss/bce"]
    assert (run / "config.yaml").exists()
    reloaded = TokenRewardModel.from_pretrained(run / "model")
    assert reloaded.score(["a"], ["x y"])[0] == pytest.approx(rm.score(["a"], ["x y"])[0], abs=1e-6)
    x_reward, y_reward, _ = reloaded.score(["a"], ["x y"])[0]
    assert x_reward < 0 < y_reward


def test_bt_training_learns_pair_preferences(tmp_path):
    rm = make_rm(random_head=False)
    history = train_token_reward_model(rm, cfg(tmp_path, num_epochs=4), pairs=toy_pairs(200))
    final = history[-1]["eval"]
    assert final["pairs"] == 40 and final["pair_accuracy"] > 0.9, final
    assert final["token_accuracy"] is None
    assert "loss/bt" in history[0] and "loss/bce" not in history[0]


def test_training_on_both_kinds_and_config_checks(tmp_path):
    rm = make_rm(random_head=False)
    history = train_token_reward_model(rm, cfg(tmp_path, num_epochs=1, eval_fraction=0.0),
                                       token_examples=toy_token_examples(20), pairs=toy_pairs(40))
    assert "loss/bce" in history[0] and "loss/bt" in history[0]
    assert "loss/bce" not in history[-2]  # 20 examples run out after 2 of the 3 steps that 40 pairs need
    assert len(history) == 4 and history[-1]["eval"]["pairs"] == 0
    with pytest.raises(ValueError, match="nothing to train on"):
        train_token_reward_model(rm, cfg(tmp_path))
    with pytest.raises(ValueError, match="nothing to train on"):
        train_token_reward_model(rm, cfg(tmp_path, bt_weight=0.0), pairs=toy_pairs(4))
    with pytest.raises(ValueError, match="eval_fraction"):
        cfg(tmp_path, eval_fraction=1.0).validate()
    with pytest.raises(ValueError, match="ends beyond the response"):
        bad = TokenExample("a", "x", [SpanLabel(0, 5, 1)])
        train_token_reward_model(rm, cfg(tmp_path), token_examples=[bad, bad])


def test_max_length_truncates_long_inputs(tmp_path):
    rm = make_rm(random_head=False)
    examples = [TokenExample(" ".join(["a"] * 30), " ".join(["x"] * 30), [SpanLabel(0, 1, -1)])] * 4
    history = train_token_reward_model(rm, cfg(tmp_path, num_epochs=1, max_length=8, eval_fraction=0.0),
                                       token_examples=examples)
    assert math.isfinite(history[0]["loss/total"])


def test_lora_reward_model_trains_adapters_and_head_only(tmp_path):
    make_rm().save_pretrained(tmp_path / "base")
    rm = TokenRewardModel.from_pretrained(tmp_path / "base", lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    trainable = {n for n, p in rm.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    assert {"head.weight", "head.bias"} <= trainable
    frozen = {n: p.detach().clone() for n, p in rm.model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in rm.model.named_parameters() if "lora_B" in n}
    train_token_reward_model(rm, cfg(tmp_path, num_epochs=1, eval_fraction=0.0),
                             token_examples=toy_token_examples(32))
    params = dict(rm.model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    assert any(not torch.equal(params[n], v) for n, v in adapters.items())
    # Saving merges the adapters into a plain folder; the live model keeps its adapters.
    assert (tmp_path / "rm" / "model" / "config.json").exists()
    assert not (tmp_path / "rm" / "model" / "adapter_config.json").exists()
    assert any("lora_" in n for n, _ in rm.model.named_parameters())
    reloaded = TokenRewardModel.from_pretrained(tmp_path / "rm" / "model")
    prompts, responses = ["a b", "c"], ["x y a", "b y"]
    for got, want in zip(reloaded.score(prompts, responses), rm.score(prompts, responses)):
        assert got == pytest.approx(want, abs=1e-5)


def test_ppo_runs_with_the_token_reward_model(tmp_path):
    rm = make_rm()
    tok = rm.tokenizer
    policy = tiny_causal_lm(len(tok), seed=1, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = PPOConfig(batch_size=8, mini_batch_size=4, max_new_tokens=5, num_updates=2, ppo_epochs=1,
                       learning_rate=1e-3, output_dir=str(tmp_path / "ppo"), progress=False, log_tensorboard=False)
    trainer = PPOTrainer(config, policy=policy, tokenizer=tok, prompts=["a b", "c d", "x", "y a"] * 2,
                         reward_fn=rm.as_reward_fn("token", policy_tokenizer=tok))
    history = trainer.train()
    assert len(history) == 2 and all(math.isfinite(h["reward/mean"]) for h in history)
    assert any(h["reward/mean"] != 0.0 for h in history)


@pytest.mark.slow
def test_smollm2_lora_reward_model_scores_policy_tokens(tmp_path):
    from tokencredit.models import load_tokenizer

    rm = TokenRewardModel.from_pretrained("smollm2-135m-instruct", lora=LoraSettings(r=4))
    policy_tokenizer = load_tokenizer("smollm2-135m-instruct")
    trainable = [n for n, p in rm.model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or n.startswith("head.") for n in trainable)
    torch.nn.init.normal_(rm.model.head.weight, std=0.02)
    ids = policy_tokenizer(" python sort list", add_special_tokens=False)["input_ids"] + [policy_tokenizer.eos_token_id]
    fn = rm.as_reward_fn("token", policy_tokenizer=policy_tokenizer)
    alone = fn(["Previous queries: python"], [" python sort list"], [ids])[0]
    long_prompt = "Previous queries: python, java streams, rust borrow checker, go channels"
    batched = fn([long_prompt, "Previous queries: python"], ["x", " python sort list"], [ids[:2], ids])
    assert len(alone) == len(ids)
    assert batched[1] == pytest.approx(alone, abs=1e-4)


def test_long_prompts_are_cut_to_the_backbones_positions():
    rm = make_rm()
    limit = rm.model.backbone.config.max_position_embeddings
    ids = rm.encode_response("x y")
    long_prompt = " ".join(["a"] * (limit + 50))
    short_prompt = " ".join(["a"] * (limit - len(ids)))
    # The long prompt keeps its last tokens, which are all "a": the same input as the longest prompt that fits.
    assert rm.score_token_ids([long_prompt], [ids])[0] == pytest.approx(
        rm.score_token_ids([short_prompt], [ids])[0], abs=1e-5)
    with pytest.raises(ValueError, match="does not fit the reward model's"):
        rm.score_token_ids(["a"], [[3] * limit])


def toy_edits(n, seed=0):
    """Minimal edits: one word of an a/b response was an "x", the edit wrote "y" in its place."""
    from tokencredit.rewards.data import EditTriple

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice("ab") for _ in range(rng.randint(2, 6))]
        bad = list(words)
        i = rng.randrange(len(words))
        bad[i], words[i] = "x", "y"
        out.append(EditTriple(rng.choice("cd"), " ".join(bad), " ".join(words)))
    return out


def test_span_bt_training_learns_which_words_the_edit_fixed(tmp_path):
    rm = make_rm(random_head=False)
    config = cfg(tmp_path, bce_weight=0.0, bt_weight=0.0, span_bt_weight=1.0)
    history = train_token_reward_model(rm, config, edits=toy_edits(120))
    assert "loss/span_bt" in history[0] and "loss/bce" not in history[0] and "loss/bt" not in history[0]
    assert history[0]["loss/span_bt"] == pytest.approx(math.log(2))  # a zero head: margin 0 on every edit
    final = history[-1]["eval"]
    assert final["edits"] == 24 and final["span_accuracy"] > 0.9, final
    x_reward, y_reward = rm.score(["c"], ["x y"])[0][:2]
    assert y_reward > x_reward
    assert read_metrics(tmp_path / "rm")[-1]["train/span_accuracy"] > 0.9


def test_hybrid_loss_combines_span_bt_and_sequence_bt(tmp_path):
    from tokencredit.rewards.data import EditTriple
    from tokencredit.rewards.token_rm_training import _edit_rows, _loss, _pair_rows

    rm = make_rm(seed=3)
    edits = toy_edits(6, seed=1)
    # The last edit comes from a pair whose preferred side is another text: its sequence BT uses that text.
    edits[-1] = EditTriple(edits[-1].prompt, edits[-1].original, edits[-1].edited, chosen="y y a")
    pairs = [PreferencePair(e.prompt, e.chosen or e.edited, e.original) for e in edits]
    hybrid = cfg(tmp_path, bce_weight=0.0, bt_weight=0.0, span_bt_weight=2.0, edit_bt_weight=1.0)
    loss, stats = _loss(rm, hybrid, [], [], _edit_rows(rm, edits))
    assert stats["loss/total"] == pytest.approx(stats["loss/edit_bt"] + 2 * stats["loss/span_bt"], rel=1e-5)
    # The hybrid's sequence BT, scored inside the edit forward pass, equals BT on the same pairs scored apart.
    _, separate = _loss(rm, cfg(tmp_path, bce_weight=0.0), [], _pair_rows(rm, pairs))
    assert stats["loss/edit_bt"] == pytest.approx(separate["loss/bt"], rel=1e-5)
    assert stats["train/edit_pair_accuracy"] == pytest.approx(separate["train/pair_accuracy"])
    # Span BT sees only the changed tokens: "x" in each original, "y" in each edit, not the shared words.
    rows = _edit_rows(rm, edits)
    x, y = rm.tokenizer.convert_tokens_to_ids(["x", "y"])
    for row in rows:
        assert [t for t, lab in zip(row.orig_ids, row.orig_labels) if lab] == [x]
        assert [t for t, lab in zip(row.edit_ids, row.edit_labels) if lab] == [y]
    with torch.no_grad():
        expected = torch.stack([
            -torch.nn.functional.logsigmoid(
                rm.token_rewards([r.prompt], [r.edit_ids])[0][0][r.edit_labels.index(1)]
                - rm.token_rewards([r.prompt], [r.orig_ids])[0][0][r.orig_labels.index(-1)])
            for r in rows]).mean()
    assert stats["loss/span_bt"] == pytest.approx(expected.item(), rel=1e-4)
    history = train_token_reward_model(rm, cfg(tmp_path, bce_weight=0.0, bt_weight=0.0, span_bt_weight=1.0,
                                               edit_bt_weight=1.0, num_epochs=1), edits=toy_edits(40))
    assert "loss/edit_bt" in history[0] and "loss/span_bt" in history[0]
    with pytest.raises(ValueError, match="nothing to train on"):
        train_token_reward_model(rm, cfg(tmp_path, span_bt_weight=0.0, bt_weight=0.0), edits=edits)
    with pytest.raises(ValueError, match="not all 0"):
        cfg(tmp_path, bce_weight=0.0, bt_weight=0.0, span_bt_weight=0.0).validate()


def _rewards_before_last(rm, last_token):
    prompt_ids = rm.tokenizer("good answers", add_special_tokens=False)["input_ids"]
    response = [*prompt_ids, last_token]
    with torch.no_grad():
        rewards, _ = rm.token_rewards(["the question"], [response])
    return rewards[0, :-1]


@pytest.mark.parametrize("backbone", ["tiny causal LM", "all-minilm-l6-v2"])
def test_token_rewards_only_look_back(backbone, tmp_path):
    if backbone == "all-minilm-l6-v2":
        rm = TokenRewardModel.from_pretrained(backbone)
    else:
        rm = make_rm()
    torch.nn.init.normal_(rm.model.head.weight, std=1.0)  # a head that reads the hidden states
    vocab = len(rm.tokenizer)
    a, b = _rewards_before_last(rm, 5 % vocab), _rewards_before_last(rm, 11 % vocab)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # Saved and loaded again, the reward model still looks back only.
    rm.save_pretrained(tmp_path / "rm")
    again = TokenRewardModel.from_pretrained(tmp_path / "rm")
    torch.testing.assert_close(_rewards_before_last(again, 5 % vocab), _rewards_before_last(again, 11 % vocab),
                               atol=1e-5, rtol=0)


def test_a_sequence_rm_on_an_encoder_stays_bidirectional():
    from tokencredit.models import attends_only_back
    from tokencredit.rewards.seq_rm import SequenceRewardModel

    rm = SequenceRewardModel.from_pretrained("all-minilm-l6-v2")
    assert not attends_only_back(rm.model.backbone)  # its one score at the last token may read everything


def test_a_backbone_without_a_causal_mode_is_refused():
    from types import SimpleNamespace

    from tokencredit.models import make_causal

    class Pooled(torch.nn.Module):
        """Every position sees the mean of the whole sequence, and there is no switch to stop it."""

        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.config = SimpleNamespace(vocab_size=10)

        def forward(self, input_ids, attention_mask):
            h = self.embed(input_ids)
            return SimpleNamespace(last_hidden_state=h + h.mean(1, keepdim=True))

    with pytest.raises(ValueError, match="Pooled.*no causal mode.*read the future"):
        make_causal(Pooled(), "Pooled")
