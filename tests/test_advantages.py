import pytest
import torch

from tokencredit.rl.advantages import compute_gae, masked_mean, masked_whiten, reward_to_go
from tokencredit.rl.kl import AdaptiveKLController, FixedKLController, kl_estimate


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
