"""RLGF inside PPOTrainer: guide tokens are context, never actions; schedules, beta = 0, resume, errors."""

import pytest
import torch

from tokencredit import PPOConfig, PPOTrainer
from tokencredit.testing import tiny_causal_lm, tiny_word_tokenizer

WORDS = "a b c d e f g h".split()
PROMPTS = [f"{WORDS[i]} {WORDS[(i + 3) % 8]}" for i in range(8)]


class WordGuide:
    """A black-box guide that always continues with the same words."""

    def __init__(self, text="h h h h h h"):
        self.text, self.calls = text, 0

    def complete(self, texts, max_new_tokens):
        self.calls += 1
        return [self.text] * len(texts)


def make(seed=0):
    tok = tiny_word_tokenizer(WORDS)
    model = tiny_causal_lm(len(tok), seed=seed, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return model, tok


def count_a(tok):
    a = tok.convert_tokens_to_ids("a")
    return lambda prompts, responses, ids: [[1.0 if t == a else 0.0 for t in row] for row in ids]


def cfg(tmp_path, name="run", **kw):
    base = dict(batch_size=8, mini_batch_size=8, max_new_tokens=6, num_updates=2, learning_rate=3e-3, ppo_epochs=2,
                seed=0, output_dir=str(tmp_path / name), progress=False, log_tensorboard=False, save_every=100,
                mixed_precision="no", guide_beta=1.0)
    base.update(kw)
    return PPOConfig(**base)


def trainer(tmp_path, guide=None, name="run", **kw):
    model, tok = make()
    return PPOTrainer(cfg(tmp_path, name, **kw), model, tok, PROMPTS, count_a(tok),
                      guide=guide if guide is not None else WordGuide())


@pytest.mark.parametrize("algorithm", ["ppo_pp", "aggrevated"])
def test_guide_tokens_are_context_not_actions(tmp_path, algorithm):
    t = trainer(tmp_path, algorithm=algorithm)
    h = t.tokenizer.convert_tokens_to_ids("h")
    gen = t.rollout(PROMPTS)
    batch, _ = t.make_batch(PROMPTS, gen, torch.arange(8))
    ids, train, resp = batch.response_ids, batch.train_mask.bool(), batch.response_mask.bool()
    guide_tokens = resp & ~train
    assert guide_tokens.any() and train.any()
    assert bool((ids[guide_tokens] == h).all())  # every token the guide wrote is masked out of training
    first = ids[:, 0]
    if algorithm == "ppo_pp":  # the guide rolls in: every (switched) row starts with its words
        assert bool((first == h).all()) and not bool(train[:, 0].any())
    else:  # the learner rolls in: rows start with the learner's tokens and the guide's words end them
        # (a row whose roll-in was too short to switch is a whole guide answer, with no learner token)
        assert bool((train[:, 0] | ~train.any(-1)).all()) and bool(train[:, 0].any())
        assert batch.guide_value_mask is not None and torch.equal(batch.guide_value_mask.bool(), guide_tokens)

    # Exactly zero policy gradient from guide tokens: changing their advantages changes no gradient.
    t.config.vf_coef, t.config.entropy_coef = 0.0, 0.0

    def grads(b):
        t.optimizer.zero_grad(set_to_none=True)
        loss, _ = t._loss(b)
        loss.backward()
        return [p.grad.clone() for p in t.policy_params]

    before = grads(batch)
    batch.advantages = torch.where(guide_tokens, torch.full_like(batch.advantages, 1e3), batch.advantages)
    after = grads(batch)
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    assert any(x.abs().sum() > 0 for x in before)


def test_beta_zero_reproduces_plain_ppo_and_gives_aggrevated_whole_guide_answers(tmp_path):
    model, tok = make()
    plain = PPOTrainer(cfg(tmp_path, "plain"), model, tok, PROMPTS, count_a(tok)).train()
    guide = WordGuide()
    guided = trainer(tmp_path, guide, name="ppo_pp", algorithm="ppo_pp", guide_beta=0.0).train()
    assert guide.calls == 0
    for x, y in zip(plain, guided):
        for key in ("reward/mean", "kl/mean", "loss/policy", "loss/value", "policy/approx_kl"):
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-7), key
    # AggreVaTeD's unswitched rows are the guide's own answers (the paper's code): they train only the guide critic.
    t = trainer(tmp_path, name="aggrevated", algorithm="aggrevated", guide_beta=0.0)
    batch, stats = t.make_batch(PROMPTS, t.rollout(PROMPTS), torch.arange(8))
    h = t.tokenizer.convert_tokens_to_ids("h")
    assert stats["guide/learner_token_frac"] == 0.0 and not batch.train_mask.any()
    assert bool((batch.response_ids[batch.response_mask.bool()] == h).all())
    assert torch.equal(batch.guide_value_mask, batch.response_mask.long())


def count_h(tok):
    h = tok.convert_tokens_to_ids("h")
    return lambda prompts, responses, ids: [[1.0 if t == h else 0.0 for t in row] for row in ids]


def test_the_guide_critic_learns_the_value_of_guide_answers(tmp_path):
    model, tok = make()
    t = PPOTrainer(cfg(tmp_path, algorithm="aggrevated", guide_beta=0.5, num_updates=8, vf_coef=1.0,
                       learning_rate=1e-2), model, tok, PROMPTS, count_h(tok), guide=WordGuide())
    batch, _ = t.make_batch(PROMPTS, t.rollout(PROMPTS), torch.arange(8))
    guide_tokens = batch.guide_value_mask.float()
    assert guide_tokens.sum() > 0

    def error():
        from tokencredit.rl.ppo import response_values
        with torch.no_grad():
            values = response_values(t.guide_critic, batch.input_ids(), batch.attention_mask(),
                                     batch.response_ids.size(1))
        return float((((values - batch.returns) ** 2) * guide_tokens).sum() / guide_tokens.sum())

    before = error()
    logs = t.train()
    assert error() < 0.5 * before
    assert all(m["loss/guide_value"] > 0 for m in logs)


def test_learner_advantages_bootstrap_from_the_guide_critic_at_the_switch(tmp_path):
    t = trainer(tmp_path, algorithm="aggrevated", lam=0.0, gamma=1.0, whiten_advantages=False)
    with torch.no_grad():
        t.guide_critic.head.bias.fill_(5.0)  # the guide critic says every state is worth 5
        t.critic.head.bias.fill_(-3.0)  # and the learner critic something else, which AggreVaTeD must not use
    batch, _ = t.make_batch(PROMPTS, t.rollout(PROMPTS), torch.arange(8))
    train, resp = batch.train_mask.bool(), batch.response_mask.bool()
    assert torch.allclose(batch.values[resp], torch.full_like(batch.values[resp], 5.0))
    checked = 0
    for i in range(8):
        h = int(train[i].sum())
        if h == 0 or h == int(resp[i].sum()):
            continue
        # one-step TD at the learner's last token: r + V_guide(switch) - V_guide(before it)
        expected = batch.rewards[i, h - 1] + batch.values[i, h] - batch.values[i, h - 1]
        assert float(batch.advantages[i, h - 1]) == pytest.approx(float(expected), abs=1e-5)
        checked += 1
    assert checked > 0
    # The learner critic sits AggreVaTeD updates out: its loss has no gradient from these rows.
    t.optimizer.zero_grad(set_to_none=True)
    t.config.entropy_coef = 0.0
    calls = []
    hook = t.critic.register_forward_hook(lambda *args: calls.append(1))
    loss, _ = t._loss(batch)
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in t.critic.parameters())
    assert any(p.grad is not None and p.grad.any() for p in t.guide_critic.parameters())
    # ... and its forward pass is not even run (a separate critic costs a whole model pass per mini-batch).
    assert not t.config.shared_critic and calls == []
    model, tok = make()
    plain = PPOTrainer(cfg(tmp_path, "plain"), model, tok, PROMPTS, count_a(tok))
    plain_batch, _ = plain.make_batch(PROMPTS, plain.rollout(PROMPTS), torch.arange(8))
    plain_calls = []
    plain.critic.register_forward_hook(lambda *args: plain_calls.append(1))
    plain._loss(plain_batch)
    assert plain_calls
    hook.remove()


def test_schedules_of_lols_and_d2lols_in_the_trainer(tmp_path):
    d2 = trainer(tmp_path, name="d2", algorithm="d2lols", d2lols_switch_update=2, num_updates=4).train()
    assert [m["guide/rollin_is_guide"] for m in d2] == [0.0, 0.0, 1.0, 1.0]
    lols = trainer(tmp_path, name="lols", algorithm="lols", lols_tau=0.5, num_updates=8, ppo_epochs=1).train()
    picks = [m["guide/rollin_is_guide"] for m in lols]
    assert set(picks) == {0.0, 1.0}  # a mixture, drawn from the run's own stream


def test_a_resumed_guided_run_equals_an_uninterrupted_one(tmp_path):
    kw = dict(algorithm="lols", lols_tau=0.5, save_every=1)
    straight = trainer(tmp_path, name="straight", num_updates=4, **kw).train()
    trainer(tmp_path, name="cut", num_updates=2, **kw).train()
    resumed = trainer(tmp_path, name="cut", num_updates=4, resume=True, **kw).train()
    assert (tmp_path / "cut" / "checkpoints" / "step-00000004" / "guide_critic").is_dir()
    for x, y in zip(straight, resumed):
        for key in ("reward/mean", "guide/rollin_is_guide", "loss/value", "policy/approx_kl"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), key


def test_misconfiguration_is_a_value_error_naming_the_field(tmp_path):
    model, tok = make()
    with pytest.raises(ValueError, match="needs guide="):
        PPOTrainer(cfg(tmp_path, algorithm="ppo_pp"), model, tok, PROMPTS, count_a(tok))
    with pytest.raises(ValueError, match="algorithm='ppo'"):
        PPOTrainer(cfg(tmp_path), model, tok, PROMPTS, count_a(tok), guide=WordGuide())
    for field, kw in (("algorithm must be one of", dict(algorithm="dagger")),
                      ("guide_beta", dict(algorithm="ppo_pp", guide_beta=1.5)),
                      ("lols_tau", dict(algorithm="lols", lols_tau=-0.1)),
                      ("d2lols_switch_update", dict(algorithm="d2lols")),
                      ("reuse_sampling_logprobs", dict(algorithm="ppo_pp", reuse_sampling_logprobs=True)),
                      ("guide critic", dict(algorithm="aggrevated", shared_critic=True))):
        with pytest.raises(ValueError, match=field):
            cfg(tmp_path, **kw).validate()
    with pytest.raises(ValueError, match="causal LM .* or have complete"):  # names every kind it takes
        PPOTrainer(cfg(tmp_path, algorithm="ppo_pp"), model, tok, PROMPTS, count_a(tok), guide=object())


def test_a_model_guide_writes_tokens_the_policy_then_continues(tmp_path):
    guide_model, _ = make(seed=5)
    t = trainer(tmp_path, guide=guide_model, algorithm="ppo_pp", guide_rollin_length=3)
    batch, stats = t.make_batch(PROMPTS, t.rollout(PROMPTS), torch.arange(8))
    assert 0 < stats["guide/learner_token_frac"] < 1
    switch = (~batch.train_mask.bool() & batch.response_mask.bool()).sum(-1)
    # h ~ U{1 .. m-1} with m = min(the guide's answer length, L = 3); 0 where the guide's answer was too short
    assert bool((switch <= 2).all()) and bool((switch >= 1).any())


def test_a_best_of_n_guide_keeps_its_best_sample_and_runs_in_the_trainer(tmp_path):
    from tokencredit.rl.guided import BestOfNWriter

    guide_model, tok = make(seed=5)
    h = tok.convert_tokens_to_ids("h")
    ids = torch.tensor([[tok.convert_tokens_to_ids("a")] * 2] * 3)
    mask = torch.ones_like(ids)
    seen = []

    def score(contexts, texts):
        seen.extend(contexts)
        return [t.split().count("h") for t in texts]

    def mean_h(n):
        writer = BestOfNWriter(guide_model, tok, score, n=n, generator=torch.Generator().manual_seed(0))
        rows = writer.write(ids, mask, [6, 0, 6])
        assert rows[1] == ([], False) and all(len(r[0]) <= 6 for r in rows)
        return sum(r[0].count(h) for r in rows) / 2

    one, best = mean_h(1), mean_h(32)
    assert best > one and best >= 2  # keeping the best of 32 by the score finds far more of its word
    assert seen[0] == "a a" and len(seen) == 2 * 1 + 2 * 32  # contexts as text; only rows with a budget
    with pytest.raises(ValueError, match="n must be at least 1"):
        BestOfNWriter(guide_model, tok, score, n=0).write(ids, mask, [6, 6, 6])
    t = trainer(tmp_path, guide=BestOfNWriter(guide_model, tok, score, n=4), algorithm="ppo_pp")
    batch, stats = t.make_batch(PROMPTS, t.rollout(PROMPTS), torch.arange(8))
    assert 0 < stats["guide/learner_token_frac"] < 1 and t.guide_writer.generator is t.generator
