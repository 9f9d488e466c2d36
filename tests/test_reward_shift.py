"""Parameters that shift every score alike are held fixed under Bradley-Terry, and trained where a loss reads them."""

import random

import pytest
import torch
from transformers import GPT2Config, GPT2Model

from tokencredit.models import ScalarHeadModel
from tokencredit.rewards.fit import fit
from tokencredit.rewards.records import PreferencePair
from tokencredit.rewards.seq_rm import (
    SeqRMConfig,
    SequenceRewardModel,
    score_shift_parameters,
    train_sequence_reward_model,
)
from tokencredit.rewards.token_rm import TokenRewardModel
from tokencredit.rewards.token_rm_training import TokenRMConfig, train_token_reward_model
from tokencredit.testing import tiny_scalar_model, tiny_word_tokenizer

WORDS = "a b c d x y".split()


def pairs(n, seed=0):
    """Chosen holds more y than rejected; lengths differ, so summed token rewards depend on a bias."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        a, b = (" ".join(rng.choice("xy") for _ in range(rng.randint(2, 6))) for _ in range(2))
        if a.count("y") != b.count("y"):
            chosen, rejected = (a, b) if a.count("y") > b.count("y") else (b, a)
            out.append(PreferencePair(prompt=rng.choice("abcd"), chosen=chosen, rejected=rejected))
    return out


def config(tmp_path, **kw):
    return SeqRMConfig(output_dir=str(tmp_path / "run"), progress=False, eval_fraction=0.0, mixed_precision="no",
                       **{"num_epochs": 3, "batch_size": 4, "learning_rate": 1e-2, "seed": 1, **kw})


def llama_rm():
    tok = tiny_word_tokenizer(WORDS)
    model = tiny_scalar_model(len(tok), seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.nn.init.normal_(model.head.weight, std=0.1)
    with torch.no_grad():
        model.head.bias.fill_(0.3)
    return SequenceRewardModel.from_model(model, tok)


def gpt2_rm(freeze_backbone=False):
    tok = tiny_word_tokenizer(WORDS)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ScalarHeadModel.from_backbone(GPT2Model(cfg).eval())
        torch.nn.init.normal_(model.head.weight, std=0.1)
        torch.nn.init.normal_(model.backbone.ln_f.bias, std=0.1)
    model.backbone.requires_grad_(not freeze_backbone)
    return SequenceRewardModel.from_model(model, tok)


def test_bradley_terry_leaves_the_head_bias_bit_identical(tmp_path):
    # Its exact gradient is 0; the rounding noise backward gives it used to move it by about lr per step.
    rm = llama_rm()
    bias, weight = rm.model.head.bias.detach().clone(), rm.model.head.weight.detach().clone()
    train_sequence_reward_model(rm, config(tmp_path), pairs(16), margins=[0.5] * 16, eval_pairs=[])
    assert torch.equal(rm.model.head.bias, bias)
    assert not torch.equal(rm.model.head.weight, weight)  # the rest did train
    assert rm.model.head.bias.requires_grad  # handed back as it came
    saved = SequenceRewardModel.from_pretrained(tmp_path / "run" / "model")
    assert torch.equal(saved.model.head.bias, bias)


def test_a_final_layernorm_bias_is_a_shift_too(tmp_path):
    rm = gpt2_rm()
    ln_f, head = rm.model.backbone.ln_f, rm.model.head
    assert [id(p) for p in score_shift_parameters(rm, pairs(1)[0])] == [id(head.bias), id(ln_f.bias)]
    before = {k: v.detach().clone() for k, v in rm.model.state_dict().items()}
    train_sequence_reward_model(rm, config(tmp_path, num_epochs=2), pairs(8), eval_pairs=[])
    after = rm.model.state_dict()
    assert torch.equal(after["backbone.ln_f.bias"], before["backbone.ln_f.bias"])
    assert torch.equal(after["head.bias"], before["head.bias"])
    assert not torch.equal(after["backbone.ln_f.weight"], before["backbone.ln_f.weight"])
    # Not a shift: an RMSNorm has no bias, and a frozen layer is not trained anyway.
    llama = llama_rm()
    assert [id(p) for p in score_shift_parameters(llama, pairs(1)[0])] == [id(llama.model.head.bias)]
    frozen = gpt2_rm(freeze_backbone=True)
    assert [id(p) for p in score_shift_parameters(frozen, pairs(1)[0])] == [id(frozen.model.head.bias)]


def test_fit_holds_invariant_parameters_even_against_a_gradient(tmp_path):
    # A gradient of 1e-9 is noise-sized: Adam still steps by about lr, which is why such parameters are held.
    def run(invariant):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        x, y = torch.randn(8, 3), torch.randn(8)
        start = model.bias.detach().clone()

        def loss_fn(batch):
            loss = ((model(x).squeeze(-1) - y) ** 2).mean() + 1e-9 * model.bias.sum()
            return loss, {"loss/total": loss.item()}

        fit(model, config(tmp_path), lambda epoch: [[0]] * 2, loss_fn, 2, "test",
            invariant=[model.bias] if invariant else ())
        return (model.bias.detach() - start).abs().item(), model.bias.requires_grad

    assert run(invariant=False)[0] > 1e-3
    assert run(invariant=True) == (0.0, True)


def test_fit_refuses_when_nothing_but_invariant_parameters_train(tmp_path):
    model = torch.nn.Linear(3, 1)
    model.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters the loss depends on"):
        fit(model, config(tmp_path), lambda epoch: [], lambda b: (None, {}), 0, "test", invariant=[model.bias])
    assert model.bias.requires_grad


def test_summed_token_bradley_terry_still_trains_the_bias(tmp_path):
    # sum r(chosen) - sum r(rejected) moves by the bias times the length difference: not a shift there.
    tok = tiny_word_tokenizer(WORDS)
    rm = TokenRewardModel.from_model(tiny_scalar_model(len(tok), seed=0), tok)
    cfg = TokenRMConfig(output_dir=str(tmp_path / "run"), num_epochs=1, batch_size=4, learning_rate=1e-2,
                        bce_weight=0.0, bt_weight=1.0, eval_fraction=0.0, progress=False, mixed_precision="no")
    train_token_reward_model(rm, cfg, pairs=pairs(8))
    assert rm.model.head.bias.item() != 0.0
