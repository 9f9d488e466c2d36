import math

import numpy as np
import pytest
import torch

from tokencredit.rewards.tokens import rewards_to_tensor


def test_float_goes_on_last_token_list_goes_per_token():
    out = rewards_to_tensor([2.0, [1.0, -1.0]], lengths=[3, 2])
    assert torch.equal(out, torch.tensor([[0.0, 0.0, 2.0], [1.0, -1.0, 0.0]]))


def test_numpy_and_torch_scalars_accepted():
    out = rewards_to_tensor([np.float32(1.5), torch.tensor(2.0), [np.float64(1), torch.tensor(3.0)]], [1, 2, 2])
    assert out.tolist() == [[1.5, 0.0], [0.0, 2.0], [1.0, 3.0]]


def test_wrong_per_token_length_names_row_and_lengths():
    with pytest.raises(ValueError, match=r"row 1: per-token reward has 3 values but the response has 2 tokens"):
        rewards_to_tensor([1.0, [1.0, 2.0, 3.0]], [4, 2])


def test_wrong_types_are_errors():
    with pytest.raises(ValueError, match="row 0"):
        rewards_to_tensor(["good"], [2])
    with pytest.raises(ValueError, match="row 0.*entry 1"):
        rewards_to_tensor([[1.0, None]], [2])
    with pytest.raises(ValueError, match="row 0"):
        rewards_to_tensor([True], [2])
    with pytest.raises(ValueError, match="2 entries for 3 responses"):
        rewards_to_tensor([1.0, 2.0], [1, 1, 1])
    with pytest.raises(ValueError, match="one entry per response"):
        rewards_to_tensor(None, [1])


def test_non_finite_passes_through_for_the_trainer_to_handle():
    out = rewards_to_tensor([float("nan"), 1.0], [1, 1])
    assert math.isnan(out[0, 0].item())
