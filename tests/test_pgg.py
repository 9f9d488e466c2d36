import math
import random

import pytest
import torch
import torch.nn.functional as F

from tokencredit.rewards.pgg_rm import (
    aggregate,
    bounded,
    group_mean_length,
    listmle_loss,
    pgg_rm_loss,
    ranking_order,
)
from tokencredit.rewards.token_rm import TokenRewardModel
from tokencredit.testing import tiny_scalar_model, tiny_word_tokenizer

# Two rows of uneven length; the padded slot holds a huge value that must not leak into any aggregate.
R = torch.tensor([[0.2, 0.4, 0.6], [0.5, 0.1, 100.0]])
M = torch.tensor([[1, 1, 1], [1, 1, 0]])


def lse(*xs):
    return math.log(sum(math.exp(x) for x in xs))


# ------------------------------------------------------------------ bounded / aggregate
def test_bounded_is_sigmoid_in_unit_interval():
    raw = torch.tensor([-50.0, -1.0, 0.0, 2.0, 50.0])
    out = bounded(raw)
    assert torch.allclose(out, torch.sigmoid(raw))
    assert out[2] == 0.5
    assert ((out >= 0) & (out <= 1)).all()


def test_aggregate_hand_computed_without_scale():
    assert torch.allclose(aggregate(R, M, "sum"), torch.tensor([1.2, 0.6]))
    assert torch.allclose(aggregate(R, M, "avg"), torch.tensor([0.4, 0.3]))
    soft_max = aggregate(R, M, "softmax", beta=2.0)
    assert soft_max[0].item() == pytest.approx(2 * lse(0.1, 0.2, 0.3), rel=1e-6)
    assert soft_max[1].item() == pytest.approx(2 * lse(0.25, 0.05), rel=1e-6)
    soft_min = aggregate(R, M, "softmin", beta=2.0)
    assert soft_min[0].item() == pytest.approx(-2 * lse(-0.1, -0.2, -0.3), rel=1e-6)
    assert soft_min[1].item() == pytest.approx(-2 * lse(-0.25, -0.05), rel=1e-6)


def test_aggregate_with_group_mean_length_scale():
    C = group_mean_length(M, k=2)  # lengths 3 and 2 in one group
    assert torch.equal(C, torch.tensor([2.5, 2.5]))
    assert torch.allclose(aggregate(R, M, "avg", C), torch.tensor([1.0, 0.75]))
    # The paper's sum has no C: it already grows with length.
    assert torch.allclose(aggregate(R, M, "sum", C), torch.tensor([1.2, 0.6]))
    assert aggregate(R, M, "softmax", C, beta=1.0)[1].item() == pytest.approx(2.5 * lse(0.5, 0.1), rel=1e-6)
    assert aggregate(R, M, "softmin", 3.0, beta=0.5)[0].item() == pytest.approx(
        -3 * 0.5 * lse(-0.4, -0.8, -1.2), rel=1e-6)


def test_avg_removes_length_bias_of_sum():
    rewards = torch.full((2, 6), 0.5)
    mask = torch.tensor([[1] * 6, [1] * 2 + [0] * 4])
    assert aggregate(rewards, mask, "sum")[0] == 3 * aggregate(rewards, mask, "sum")[1]
    C = group_mean_length(mask, k=2)
    avg = aggregate(rewards, mask, "avg", C)
    assert avg[0] == avg[1] == pytest.approx(2.0)


@pytest.mark.parametrize("beta", [0.5, 2.0, 5.0])
def test_soft_aggregates_bound_max_and_min(beta):
    gen = torch.Generator().manual_seed(1)
    rewards = torch.rand(64, 9, generator=gen)
    lengths = torch.randint(1, 10, (64,), generator=gen)
    mask = (torch.arange(9) < lengths[:, None]).long()
    C = group_mean_length(mask, k=4)
    top = rewards.masked_fill(mask == 0, -1).max(-1).values
    bottom = rewards.masked_fill(mask == 0, 2).min(-1).values
    log_n = beta * lengths.float().log()
    soft_max = aggregate(rewards, mask, "softmax", beta=beta)
    soft_min = aggregate(rewards, mask, "softmin", beta=beta)
    eps = 1e-5
    # beta*log sum exp(r/beta) >= max r, and <= max r + beta*log n; mirrored for the soft-min.
    assert (soft_max >= top - eps).all() and (soft_max <= top + log_n + eps).all()
    assert (soft_min <= bottom + eps).all() and (soft_min >= bottom - log_n - eps).all()
    assert (aggregate(rewards, mask, "softmax", C, beta) >= C * top - eps).all()
    assert (aggregate(rewards, mask, "softmin", C, beta) <= C * bottom + eps).all()


def test_softmax_approaches_max_as_beta_shrinks():
    assert aggregate(R, M, "softmax", beta=1e-3)[0].item() == pytest.approx(0.6, abs=1e-3)
    assert aggregate(R, M, "softmin", beta=1e-3)[1].item() == pytest.approx(0.1, abs=1e-3)


@pytest.mark.parametrize("how", ["sum", "avg", "softmax", "softmin"])
def test_padding_contributes_nothing_and_gets_no_gradient(how):
    rewards = R.clone().requires_grad_(True)
    out = aggregate(rewards, M, how, 2.0)
    other = R.clone()
    other[1, 2] = float("inf")
    assert torch.allclose(out, aggregate(other, M, how, 2.0))
    out.sum().backward()
    assert rewards.grad[1, 2] == 0
    assert (rewards.grad[M.bool()] != 0).all()


@pytest.mark.parametrize("how", ["sum", "avg", "softmax", "softmin"])
def test_all_padding_row_scores_zero_with_finite_gradient(how):
    rewards = torch.rand(3, 4, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    out = aggregate(rewards, mask, how, 1.5)
    assert out[1] == 0
    out.sum().backward()
    assert torch.isfinite(rewards.grad).all()
    assert (rewards.grad[1] == 0).all()


def test_aggregate_accepts_grouped_shape():
    gen = torch.Generator().manual_seed(0)
    rewards = torch.rand(2, 3, 5, generator=gen)
    mask = (torch.rand(2, 3, 5, generator=gen) > 0.3).long()
    mask[..., 0] = 1
    C = group_mean_length(mask)
    assert C.shape == (2, 3)
    flat = aggregate(rewards.view(6, 5), mask.view(6, 5), "softmin", group_mean_length(mask.view(6, 5), k=3))
    assert torch.allclose(aggregate(rewards, mask, "softmin", C).view(6), flat)


def test_aggregate_rejects_bad_input():
    with pytest.raises(ValueError, match="how must be one of"):
        aggregate(R, M, "max")
    with pytest.raises(ValueError, match="same shape"):
        aggregate(R, M[:, :2], "sum")
    with pytest.raises(ValueError, match="beta"):
        aggregate(R, M, "softmax", beta=0.0)


# ------------------------------------------------------------------ group_mean_length
def test_group_mean_length_layouts_and_valid():
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]])
    assert torch.equal(group_mean_length(mask, k=2), torch.tensor([3.0, 3.0, 2.0, 2.0]))
    assert torch.equal(group_mean_length(mask, k=4), torch.full((4,), 2.5))
    assert torch.equal(group_mean_length(mask.view(2, 2, 4)), torch.tensor([[3.0, 3.0], [2.0, 2.0]]))
    valid = torch.tensor([True, True, False, True])
    assert torch.equal(group_mean_length(mask, k=2, valid=valid), torch.tensor([3.0, 3.0, 3.0, 3.0]))


def test_group_mean_length_rejects_bad_layout():
    with pytest.raises(ValueError, match="divide"):
        group_mean_length(torch.ones(5, 3), k=2)
    with pytest.raises(ValueError, match=r"\[G, K, T\]"):
        group_mean_length(torch.ones(4, 3))
    with pytest.raises(ValueError, match="one per sample"):
        group_mean_length(torch.ones(4, 3), k=2, valid=torch.ones(3, dtype=torch.bool))


# ------------------------------------------------------------------ ListMLE
def test_listmle_hand_computed_k3():
    scores = torch.tensor([[1.0, 2.0, 0.5]])
    true = torch.tensor([[3.0, 1.0, 2.0]])  # best first: sample 0, sample 2, sample 1
    expected = -(1.0 - lse(1.0, 0.5, 2.0)) - (0.5 - lse(0.5, 2.0))
    assert listmle_loss(scores, true).item() == pytest.approx(expected, rel=1e-6)
    assert listmle_loss(scores, order=torch.tensor([[0, 2, 1]])).item() == pytest.approx(expected, rel=1e-6)


def test_listmle_averages_over_groups():
    scores = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]])
    true = torch.tensor([[3.0, 1.0, 2.0], [1.0, 2.0, 3.0]])
    first = -(1.0 - lse(1.0, 0.5, 2.0)) - (0.5 - lse(0.5, 2.0))
    second = math.log(3) + math.log(2)
    assert listmle_loss(scores, true).item() == pytest.approx((first + second) / 2, rel=1e-6)


def test_listmle_k2_is_bradley_terry():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        scores = torch.randn(16, 2, generator=gen) * 3
        true = torch.randn(16, 2, generator=gen)
        best_first = true[:, 0] > true[:, 1]
        best = torch.where(best_first, scores[:, 0], scores[:, 1])
        worst = torch.where(best_first, scores[:, 1], scores[:, 0])
        bt = -F.logsigmoid(best - worst).mean()
        assert torch.allclose(listmle_loss(scores, true), bt, rtol=1e-6, atol=1e-7)


def test_listmle_invariant_to_a_constant_per_group():
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(5, 4, generator=gen)
    true = torch.randn(5, 4, generator=gen)
    shift = torch.randn(5, 1, generator=gen) * 10
    assert torch.allclose(listmle_loss(scores, true), listmle_loss(scores + shift, true), atol=1e-5)


def test_listmle_is_lower_for_the_right_order():
    true = torch.tensor([[3.0, 2.0, 1.0]])
    assert listmle_loss(torch.tensor([[3.0, 2.0, 1.0]]), true) < listmle_loss(torch.tensor([[1.0, 2.0, 3.0]]), true)


def test_tie_break_is_seeded():
    scores = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    true = torch.zeros(8, 4)  # every sample tied

    def loss(seed):
        return listmle_loss(scores, true, generator=torch.Generator().manual_seed(seed)).item()

    assert loss(7) == loss(7)
    assert len({loss(seed) for seed in range(10)}) > 1


def test_ranking_order_breaks_only_ties_at_random():
    true = torch.tensor([[1.0, 5.0, 1.0, 3.0, 1.0]])
    seen = set()
    for seed in range(30):
        order = ranking_order(true, generator=torch.Generator().manual_seed(seed))[0].tolist()
        assert order[:2] == [1, 3]
        assert sorted(order[2:]) == [0, 2, 4]
        seen.add(tuple(order[2:]))
    assert len(seen) > 1  # the three tied samples come out in different orders


def test_invalid_samples_are_dropped():
    scores = torch.tensor([[1.0, 2.0, 0.5, 9.0], [0.3, -1.0, 4.0, 2.0]], requires_grad=True)
    true = torch.tensor([[3.0, 1.0, 2.0, float("nan")], [1.0, 2.0, 0.0, 5.0]])
    valid = torch.tensor([[True, True, True, False], [False, False, True, False]])
    loss = listmle_loss(scores, true, valid=valid)
    # The second group has one valid sample, so only the first (as a K=3 group) counts.
    expected = listmle_loss(scores[:1, :3].detach(), true[:1, :3])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(scores.grad).all()
    assert scores.grad[0, 3] == 0 and (scores.grad[1] == 0).all()


def test_no_rankable_group_gives_zero_loss():
    scores = torch.randn(2, 3, requires_grad=True)
    loss = listmle_loss(scores, torch.randn(2, 3), valid=torch.tensor([[True, False, False]] * 2))
    assert loss.item() == 0
    loss.backward()


def test_listmle_rejects_bad_input():
    scores = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="exactly one"):
        listmle_loss(scores)
    with pytest.raises(ValueError, match="exactly one"):
        listmle_loss(scores, torch.zeros(2, 3), order=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="must match"):
        listmle_loss(scores, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="permutation"):
        listmle_loss(scores, order=torch.tensor([[0, 0, 1], [0, 1, 2]]))
    with pytest.raises(ValueError, match="NaN"):
        listmle_loss(scores, torch.tensor([[0.0, float("nan"), 1.0], [0, 1, 2]]))
    with pytest.raises(ValueError, match=r"\[G, K\]"):
        listmle_loss(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="invalid sample before"):
        listmle_loss(scores, order=torch.tensor([[1, 0, 2], [0, 1, 2]]),
                     valid=torch.tensor([[True, False, True], [True, True, True]]))


# ------------------------------------------------------------------ pgg_rm_loss on a tiny model
WORDS = "a b c d".split()


def make_rm(seed=0):
    tok = tiny_word_tokenizer(WORDS)
    return TokenRewardModel(tiny_scalar_model(len(tok), seed=seed), tok)


def toy_groups(rm, n_groups, k, seed):
    """Responses of a/b tokens of uneven length; the more "a" tokens, the better."""
    rng = random.Random(seed)
    a, b = rm.tokenizer.convert_tokens_to_ids(["a", "b"])
    prompts, groups, truth = [], [], []
    for _ in range(n_groups):
        prompts.append(" ".join(rng.choice("cd") for _ in range(rng.randint(1, 3))))
        group = [[rng.choice([a, b]) for _ in range(rng.randint(2, 6))] for _ in range(k)]
        groups.append(group)
        truth.append([float(sum(t == a for t in ids)) for ids in group])
    return prompts, groups, truth


def test_pgg_rm_loss_gradient_reaches_the_model():
    rm = make_rm()
    prompts, groups, truth = toy_groups(rm, 3, 3, seed=0)
    loss, stats = pgg_rm_loss(rm, prompts, groups, truth, how="avg", generator=torch.Generator().manual_seed(0))
    assert loss.requires_grad and torch.isfinite(loss)
    assert stats["pgg/loss"] == pytest.approx(loss.item())
    # A zero head scores every token sigmoid(0) = 0.5.
    assert stats["pgg/mean_token_reward"] == pytest.approx(0.5)
    loss.backward()
    assert rm.model.head.weight.grad.abs().sum() > 0
    backbone_grads = [p.grad for p in rm.model.backbone.parameters() if p.grad is not None]
    assert backbone_grads and all(torch.isfinite(g).all() for g in backbone_grads)


def test_pgg_rm_loss_rejects_bad_groups():
    rm = make_rm()
    prompts, groups, truth = toy_groups(rm, 2, 3, seed=0)
    with pytest.raises(ValueError, match="same K"):
        pgg_rm_loss(rm, prompts, [groups[0], groups[1][:2]], truth)
    with pytest.raises(ValueError, match="empty"):
        pgg_rm_loss(rm, prompts, [groups[0], [[], *groups[1][1:]]], truth)
    with pytest.raises(ValueError, match="true_scores"):
        pgg_rm_loss(rm, prompts, groups, [row[:2] for row in truth])
    with pytest.raises(ValueError, match="one group of responses per prompt"):
        pgg_rm_loss(rm, prompts[:1], groups, truth)
    with pytest.raises(ValueError, match="at least 2"):
        pgg_rm_loss(rm, prompts, [g[:1] for g in groups], [row[:1] for row in truth])


@pytest.mark.parametrize("how", ["avg", "softmax"])
def test_pgg_rm_training_learns_a_toy_ranking(how):
    torch.manual_seed(0)
    rm = make_rm(seed=1)
    prompts, groups, truth = toy_groups(rm, 6, 3, seed=1)
    gen = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(rm.model.parameters(), lr=1e-2)

    def best_minus_worst():
        with torch.no_grad():
            flat = [ids for g in groups for ids in g]
            raw, mask = rm.token_rewards([p for p in prompts for _ in range(3)], flat)
            scores = aggregate(bounded(raw), mask, how, group_mean_length(mask, k=3)).view(6, 3)
        t = torch.tensor(truth)
        return (scores.gather(1, t.argmax(1, keepdim=True)) - scores.gather(1, t.argmin(1, keepdim=True))).mean()

    before = best_minus_worst()
    first = None
    for _ in range(25):
        optimizer.zero_grad()
        loss, stats = pgg_rm_loss(rm, prompts, groups, truth, how=how, generator=gen)
        first = first if first is not None else loss.item()
        loss.backward()
        optimizer.step()
    if how == "avg":
        assert before.abs() < 1e-6  # zero head and C-scaled mean: every response scores the same at the start
    assert best_minus_worst() > before + 0.1
    assert loss.item() < first
    assert stats["pgg/pair_accuracy"] > 0.75


def test_train_pgg_reward_model_on_ranked_lists_of_mixed_k(tmp_path):
    from tokencredit.rewards.data import RankedList
    from tokencredit.rewards.pgg_rm import PGGRMConfig, evaluate_pgg_reward_model, train_pgg_reward_model

    rng = random.Random(0)
    lists = []
    for i in range(90):
        k = 2 + i % 2  # lists of two and of three responses, batched by K
        responses = [" ".join(rng.choice("ab") for _ in range(rng.randint(2, 6))) for _ in range(k)]
        fraction_a = [r.split().count("a") / len(r.split()) for r in responses]
        if i % 3 == 0:  # some lists come as rankings (0 = best) instead of scores
            order = sorted(range(k), key=lambda j: -fraction_a[j])
            lists.append(RankedList(rng.choice("cd"), responses, ranking=[order.index(j) for j in range(k)]))
        else:
            lists.append(RankedList(rng.choice("cd"), responses, scores=fraction_a))
    rm = make_rm(seed=1)
    config = PGGRMConfig(output_dir=str(tmp_path / "pgg"), num_epochs=4, batch_size=8, learning_rate=5e-3,
                         progress=False, eval_fraction=0.2)
    before = evaluate_pgg_reward_model(rm, lists[:20])
    history = train_pgg_reward_model(rm, config, lists)
    final = history[-1]["eval"]
    assert final["lists"] == 18 and final["aggregator"] == "avg"
    assert final["rank_pair_accuracy"] > 0.8, final
    assert final["listmle_loss"] < before["listmle_loss"]
    loaded = TokenRewardModel.from_pretrained(tmp_path / "pgg" / "model")
    assert loaded.bounded
    scores = loaded.score(["c"], ["a b a"])[0]
    assert all(0 < s < 1 for s in scores)
    a_score, b_score = scores[:2]
    assert a_score > b_score
    with pytest.raises(ValueError, match="aggregator"):
        PGGRMConfig(aggregator="max").validate()
    with pytest.raises(ValueError, match="nothing to train on"):
        train_pgg_reward_model(rm, config, [])
