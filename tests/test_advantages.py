import pytest
import torch

from tokencredit.rl.advantages import compute_gae, masked_mean, masked_whiten, reward_to_go
from tokencredit.rl.kl import AdaptiveKLController, FixedKLController, kl_estimate, kl_loss
from tokencredit.rl.losses import policy_loss


def test_gae_matches_hand_computation():
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 1.0, 0.5]])
    mask = torch.ones(1, 3)
    adv, ret = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # t=2: 2 - .5 = 1.5; t=1: (0 + .9*.5 - 1) + .72*1.5 = .53; t=0: (1 + .9*1 - .5) + .72*.53 = 1.7816
    assert torch.allclose(adv, torch.tensor([[1.7816, 0.53, 1.5]]), atol=1e-5)
    assert torch.allclose(ret, torch.tensor([[2.2816, 1.53, 2.0]]), atol=1e-5)


def test_gae_gamma1_lam1_is_reward_to_go_minus_value():
    torch.manual_seed(0)
    rewards, values = torch.randn(4, 6), torch.randn(4, 6)
    mask = torch.ones(4, 6)
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(ret, reward_to_go(rewards, mask), atol=1e-5)
    assert torch.allclose(adv, reward_to_go(rewards, mask) - values, atol=1e-5)


def test_gae_padding_is_inert():
    rewards = torch.tensor([[1.0, 2.0, 99.0, -50.0]])
    values = torch.tensor([[0.3, -0.2, 7.0, 8.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    adv, ret = compute_gae(rewards, values, mask, gamma=0.95, lam=0.9)
    ref_adv, ref_ret = compute_gae(rewards[:, :2], values[:, :2], torch.ones(1, 2), gamma=0.95, lam=0.9)
    assert torch.allclose(adv[:, :2], ref_adv)
    assert torch.allclose(ret[:, :2], ref_ret)
    assert torch.all(adv[:, 2:] == 0) and torch.all(ret[:, 2:] == 0)


def test_gae_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shape mismatch"):
        compute_gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))


def test_masked_whiten_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 1000.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = masked_whiten(x, mask)
    assert w[0, 3] == 0
    assert abs(masked_mean(w, mask).item()) < 1e-6
    assert torch.allclose(w[0, :3], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-4)


def test_kl_estimators_hand_values():
    logp = torch.log(torch.tensor([0.5]))
    ref = torch.log(torch.tensor([0.25]))
    ln2 = 0.6931472
    assert torch.allclose(kl_estimate(logp, ref, "k1"), torch.tensor([ln2]))
    assert torch.allclose(kl_estimate(logp, ref, "k2"), torch.tensor([0.5 * ln2**2]))
    assert torch.allclose(kl_estimate(logp, ref, "k3"), torch.tensor([-0.5 + ln2]))
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(logp, ref, "k4")


def test_kl_estimators_unbiased_in_expectation():
    # pi = [.7,.3], ref = [.4,.6]: true KL(pi||ref) = .7 ln(.7/.4) + .3 ln(.3/.6)
    pi, ref = torch.tensor([0.7, 0.3]), torch.tensor([0.4, 0.6])
    true_kl = float((pi * (pi / ref).log()).sum())
    lp, lr = pi.log(), ref.log()
    for est in ("k1", "k3"):
        expectation = float((pi * kl_estimate(lp, lr, est)).sum())
        assert abs(expectation - true_kl) < 1e-6
    assert torch.all(kl_estimate(lp, lr, "k3") >= 0)


def test_adaptive_kl_moves_towards_target():
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=100)
    ctl.update(current_kl=5.0, n_steps=10)  # KL too high -> coefficient grows by at most 20%*10/100
    assert ctl.value == pytest.approx(0.1 * 1.02)
    ctl.update(current_kl=0.0, n_steps=10)
    assert ctl.value == pytest.approx(0.1 * 1.02 * 0.98)
    fixed = FixedKLController(0.3)
    fixed.update(100.0, 10)
    assert fixed.value == 0.3
    restored = AdaptiveKLController(0.5, 1.0, 100)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value


def _expected_grad(loss_of_y, theta, weights):
    """Exact E_{y ~ weights}[grad loss(y)] over a categorical: the gradient of sum_y w(y) loss(y)."""
    (grad,) = torch.autograd.grad((weights * loss_of_y).sum(), theta, retain_graph=True)
    return grad


@pytest.mark.parametrize("off_policy", [False, True])
def test_kl_loss_gradient_is_the_exact_reverse_kl_gradient(off_policy):
    torch.manual_seed(0)
    theta = torch.randn(5, requires_grad=True)
    log_ref = torch.randn(5).log_softmax(-1)
    log_pi = theta.log_softmax(-1)
    # Tokens come from pi_old: pi itself on the first PPO epoch, an earlier policy on later ones.
    log_old = (theta.detach() + (0.7 * torch.randn(5) if off_policy else 0)).log_softmax(-1)
    exact_kl = (log_pi.exp() * (log_pi - log_ref)).sum()
    (exact,) = torch.autograd.grad(exact_kl, theta, retain_graph=True)
    ours = _expected_grad(kl_loss(log_pi, log_ref, log_old), theta, log_old.exp())
    torch.testing.assert_close(ours, exact, atol=1e-6, rtol=1e-5)
    assert exact.abs().max() > 1e-2  # a real gradient, not two zeros agreeing


def test_k1_and_k3_as_losses_have_the_wrong_gradients():
    torch.manual_seed(1)
    theta = torch.randn(5, requires_grad=True)
    log_ref = torch.randn(5).log_softmax(-1)
    log_pi = theta.log_softmax(-1)
    pi = log_pi.exp().detach()
    k1 = _expected_grad(kl_estimate(log_pi, log_ref, "k1"), theta, pi)
    torch.testing.assert_close(k1, torch.zeros(5), atol=1e-6, rtol=0)  # E[grad log pi] = 0
    k3 = _expected_grad(kl_estimate(log_pi, log_ref, "k3"), theta, pi)
    (forward_kl,) = torch.autograd.grad((log_ref.exp() * (log_ref - log_pi)).sum(), theta)
    torch.testing.assert_close(k3, forward_kl, atol=1e-6, rtol=1e-5)  # KL(ref || pi), not KL(pi || ref)


def test_approx_kl_is_an_unbiased_estimate_of_kl_old_new():
    torch.manual_seed(2)
    log_old, log_new = (2 * torch.randn(6)).log_softmax(-1), (2 * torch.randn(6)).log_softmax(-1)
    old = log_old.exp()
    # A float mask weights the mean, so weighting by pi_old gives the exact expectation over sampled tokens.
    _, stats = policy_loss(log_new, log_old, torch.zeros(6), old, cliprange=0.2)
    exact = float((old * (log_old - log_new)).sum())
    assert float(stats["approx_kl"]) == pytest.approx(exact, rel=1e-5)
    reverse = float((log_new.exp() * (log_new - log_old)).sum())
    assert abs(exact - reverse) > 0.05  # the two directions differ here, so the test can tell them apart
