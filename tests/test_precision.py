import platform

import pytest
import torch
from torch import nn

from tokencredit import precision


def test_freeze_to_converts_only_frozen_floating_parameters():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    shared = nn.Linear(4, 4)  # the same frozen module in two models is converted once
    shared.requires_grad_(False)
    other = nn.Sequential(shared)
    assert precision.freeze_to([model, other, None], torch.bfloat16) == 4
    assert model[0].weight.dtype == torch.bfloat16 and model[0].bias.dtype == torch.bfloat16
    assert model[1].weight.dtype == torch.float32, "trainable weights stay the fp32 masters"
    assert shared.weight.dtype == torch.bfloat16
    assert precision.freeze_to([model], None) == 0


def test_frozen_output_head_gets_contiguous_input_and_the_same_logits():
    from tokencredit.testing import tiny_causal_lm

    model = tiny_causal_lm(40, seed=0).requires_grad_(False).eval()
    ids = torch.randint(0, 40, (3, 7))
    with torch.no_grad(), precision.autocast("cpu", torch.bfloat16):
        before = model(input_ids=ids, logits_to_keep=1).logits
    seen = []
    precision.freeze_to([model], torch.bfloat16)
    precision.freeze_to([model], torch.bfloat16)  # again: one hook, not two
    head = model.get_output_embeddings()
    head.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    with torch.no_grad(), precision.autocast("cpu", torch.bfloat16):
        after = model(input_ids=ids, logits_to_keep=1).logits
    # The prefill's last-position slice is strided; with a bf16 weight that made the CPU matmul copy the whole
    # weight per row (seconds and GBs on a real vocabulary).
    assert seen == [True] and len(head._forward_pre_hooks) == 2
    assert torch.allclose(after.float(), before.float(), atol=0.05)


def test_autocast_runs_matmuls_in_bf16_and_is_a_no_op_without_a_dtype():
    x, w = torch.randn(3, 4), torch.randn(4, 5)
    with precision.autocast("cpu", torch.bfloat16):
        assert (x @ w).dtype == torch.bfloat16
    with precision.autocast("cpu", None):
        assert (x @ w).dtype == torch.float32


def test_make_adamw_falls_back_when_the_fused_kernel_is_refused(monkeypatch):
    params = [nn.Parameter(torch.zeros(3))]
    assert precision.make_adamw([{"params": params}], fused=True, lr=1e-3).defaults["fused"]
    real = torch.optim.AdamW

    def refusing(groups, fused=None, **kw):
        if fused:
            raise RuntimeError("fused=True requires all the params to be on a supported device")
        return real(groups, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", refusing)
    opt = precision.make_adamw([{"params": params}], fused=True, lr=1e-3)
    assert not opt.defaults.get("fused")


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_allocator_tuning_takes_effect_once_on_glibc():
    assert precision.tune_cpu_allocator() is True
    assert precision.tune_cpu_allocator() is True  # idempotent
    assert precision._ALLOCATOR_TUNED
