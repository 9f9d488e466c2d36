"""PPO's reward shaping as pure functions (rl/reward_shaping.py): each on hand-made tensors."""

import math

import torch

from tokencredit.rl.reward_shaping import charge_missing_eos, reward_stats, reward_sums, token_rewards

MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])


def test_the_missing_end_charge_lands_on_the_last_token_of_unfinished_rows_only():
    scores = torch.zeros(3, 4)
    finished = torch.tensor([True, False, False])
    out = charge_missing_eos(scores, MASK, finished, 2.0)
    assert out.tolist() == [[0, 0, 0, 0], [0, -2, 0, 0], [0, 0, 0, -2]]
    assert scores.abs().sum() == 0  # the input is left alone


def test_reward_statistics_are_the_sequence_scores_mean_and_sample_sd():
    scores = torch.tensor([[1.0, 1.0, 1.0, 9.0], [2.0, 0.0, 9.0, 9.0], [0.5, 0.5, 0.5, 0.5]])  # padding ignored
    finished = torch.tensor([True, True, False])
    sums = reward_sums(scores, MASK.float(), finished)
    assert sums.dtype == torch.float64 and sums[4] == 0
    stats = reward_stats(sums.tolist(), 3)
    seq = torch.tensor([3.0, 2.0, 2.0], dtype=torch.float64)
    assert math.isclose(stats["reward/mean"], seq.mean().item())
    assert math.isclose(stats["reward/std"], seq.std().item())  # the n - 1 sample sd
    assert stats["response_length/mean"] == 3.0 and math.isclose(stats["response/finished_frac"], 2 / 3)
    assert reward_stats(reward_sums(scores[:1], MASK[:1].float(), finished[:1]).tolist(), 1)["reward/std"] == 0.0


def test_a_non_finite_score_is_flagged_and_kept_out_of_the_sums():
    scores = torch.ones(3, 4)
    scores[1, 0] = float("nan")
    sums = reward_sums(scores, MASK.float(), torch.tensor([True, True, True]))
    assert sums[4] == 1 and math.isfinite(sums[0]) and sums[0] == 3 + 4


def test_token_rewards_subtract_the_kl_only_when_it_is_in_the_reward_and_whitening_keeps_the_sign():
    scores = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    kl = torch.tensor([[0.5, 0.5, 0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert torch.allclose(token_rewards(scores, kl, mask, 0.2, True, False), torch.tensor([[0.9, 1.9, 2.9, 0.0]]))
    assert torch.equal(token_rewards(scores, kl, mask, 0.2, False, False), scores)
    spread = torch.tensor([[1.0, 3.0, 5.0, 7.0]])
    white = token_rewards(spread, kl, mask, 0.0, False, True)
    # unit sample variance over the three tokens, their mean (3) kept, padding 0: (x - 3) / 2 + 3
    assert torch.allclose(white, torch.tensor([[2.0, 3.0, 4.0, 0.0]]))
