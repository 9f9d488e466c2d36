"""A tiny PPO or SFT run for tests/test_distributed.py, alone or under `accelerate launch` (one copy per rank).

    python tests/distributed_worker.py MODE OUT [key=value ...]

MODE: ``ppo-scripted`` (responses fixed per prompt, so one and two processes see the same samples), ``ppo``
(sampled), ``ppo-guided`` (LOLS with a black-box guide and greedy learner tokens: the same samples again),
``sft``, ``seq-rm`` (Bradley-Terry reward model: the loop every `reward train` kind shares).
Each rank writes OUT/rank<R>.json: world size, rank, the run's metrics, a hash of its
trainable weights after every update, and OUT/rank<R>.safetensors with the final trainable weights.
``kill_after=K`` ends every rank with exit code 17 right after the checkpoint of update K (a crash).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from tokencredit import PPOConfig, PPOTrainer
from tokencredit.generation import GenerationOutput, encode_prompts
from tokencredit.rl.sft import SFTConfig, SFTTrainer
from tokencredit.testing import tiny_causal_lm, tiny_word_tokenizer

WORDS = "a b c d e f g h i j k l".split()
PROMPTS = [" ".join(WORDS[i: i + 3]) for i in range(9)] + ["l k", "j", "h g f e"]
KILL_EXIT = 17


def weights_hash(params: list[torch.Tensor]) -> str:
    """sha256 of the exact bytes of the trainable weights: equal only when the ranks hold identical weights."""
    digest = hashlib.sha256()
    for p in params:
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def scripted_response(index: int, eos: str) -> str:
    """A fixed response per prompt: lengths 2-6, some ending with EOS, some cut."""
    words = [WORDS[(index * 5 + j * 3) % len(WORDS)] for j in range(2 + index % 5)]
    return " ".join(words) + (eos if index % 3 else "")


class Recording:
    """Per-update weight hashes and an optional simulated crash after a checkpoint."""

    kill_after: int | None = None
    hashes: list[str]

    def record(self, params: list[torch.Tensor]) -> None:
        """Hash the trainable weights now."""
        self.hashes.append(weights_hash(params))

    def crash_after(self, step: int) -> None:
        """Exit every rank abruptly once the checkpoint of the chosen step is on disk."""
        if self.kill_after is not None and step == self.kill_after:
            sys.stdout.flush()
            os._exit(KILL_EXIT)


class WorkerPPO(PPOTrainer, Recording):
    """PPO that records its weights after every update; scripted responses when asked."""

    scripted = False

    def step(self, indices):  # noqa: ANN001, ANN201 - test helper
        """One update, then the weight hash."""
        stats = super().step(indices)
        self.record(self.policy_params + self.critic_params)
        return stats

    def rollout(self, prompts):  # noqa: ANN001, ANN201
        """The configured sampler, or a fixed response per prompt."""
        if not self.scripted:
            return super().rollout(prompts)
        eos = self.tokenizer.eos_token
        texts = [scripted_response(PROMPTS.index(p), eos) for p in prompts]
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, prompts, None, self.device)
        rows = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        finished = torch.tensor([t.endswith(eos) for t in texts])
        return GenerationOutput(prompt_ids, prompt_mask, ids, mask, torch.zeros(ids.shape), texts, finished)

    def save_checkpoint(self):  # noqa: ANN201
        """Save, then crash if this is the chosen update."""
        path = super().save_checkpoint()
        self.crash_after(self.update_idx)
        return path


class WordGuide:
    """A black-box guide that always continues with the same words."""

    def complete(self, texts: list[str], max_new_tokens: int) -> list[str]:
        """The same continuation for every text."""
        return ["a c a c a c"] * len(texts)


class WorkerSFT(SFTTrainer, Recording):
    """SFT that records its weights after every step."""

    def step(self, indices):  # noqa: ANN001, ANN201
        """One step, then the weight hash."""
        stats = super().step(indices)
        self.record(self.params)
        return stats

    def save_checkpoint(self):  # noqa: ANN201
        """Save, then crash if this is the chosen step."""
        path = super().save_checkpoint()
        self.crash_after(self.step_idx)
        return path


def train_seq_rm(out: Path) -> None:
    """Bradley-Terry on 11 fixed pairs (batch 4: the last batch of each epoch does not split evenly)."""
    from tokencredit.distributed import process_group
    from tokencredit.rewards.records import PreferencePair
    from tokencredit.rewards.seq_rm import SeqRMConfig, SequenceRewardModel, train_sequence_reward_model
    from tokencredit.testing import tiny_scalar_model

    tok = tiny_word_tokenizer(WORDS)
    model = tiny_scalar_model(len(tok), seed=0)
    if os.environ.get("RANK", "0") != "0":
        with torch.no_grad():
            model.head.weight.add_(0.5)  # must be replaced by rank 0's
            model.head.bias.add_(0.5)  # held fixed by Bradley-Terry, but still rank 0's
    rm = SequenceRewardModel.from_model(model, tok)
    pairs = [PreferencePair(prompt=WORDS[i % 4], chosen=" ".join(["b"] * (1 + i % 3) + ["a"]),
                            rejected=" ".join(["c"] * (2 + i % 2))) for i in range(11)]
    cfg = SeqRMConfig(output_dir=str(out / "run"), num_epochs=2, batch_size=4, learning_rate=1e-2, progress=False,
                      log_tensorboard=False, eval_fraction=0.0, seed=1, mixed_precision="no")
    history = train_sequence_reward_model(rm, cfg, pairs, eval_pairs=pairs[:3])
    group = process_group()
    params = [p for p in rm.model.parameters() if p.requires_grad]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{group.rank}.json").write_text(json.dumps({
        "world_size": group.world_size, "rank": group.rank, "history": history[:-1], "hashes": [],
        "final_hash": weights_hash(params), "eval": history[-1]["eval"]}))
    save_file({f"p{i}": p.detach().cpu().contiguous() for i, p in enumerate(params)},
              str(out / f"rank{group.rank}.safetensors"))


def main() -> None:
    """Run MODE into OUT with the key=value settings."""
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "seq-rm":
        train_seq_rm(out)
        return
    settings = dict(arg.split("=", 1) for arg in sys.argv[3:])
    kill_after = int(settings.pop("kill_after")) if "kill_after" in settings else None
    torch.manual_seed(0)
    tok = tiny_word_tokenizer(WORDS)
    # Different initial weights on each rank: the trainer must start every rank from rank 0's.
    model = tiny_causal_lm(len(tok), seed=0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if os.environ.get("RANK", "0") != "0":
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
    common = dict(output_dir=str(out / "run"), progress=False, log_tensorboard=False, mixed_precision="no", seed=3,
                  resume=settings.pop("resume", "false") == "true",
                  allow_changed_settings=settings.pop("allow_changed_settings", "false") == "true")
    if mode.startswith("ppo"):
        cfg = PPOConfig(batch_size=8, max_new_tokens=5, num_updates=int(settings.pop("updates", "2")),
                        learning_rate=3e-3, ppo_epochs=3, whiten_rewards=True, adaptive_kl=True, kl_coef=0.05,
                        kl_target=0.5, kl_horizon=16, target_kl=float(settings.pop("target_kl", "1e9")),
                        save_every=int(settings.pop("save_every", "100")), **common)
        a = tok.convert_tokens_to_ids("a")

        def reward(prompts, responses, ids):  # noqa: ANN001, ANN202
            return [[1.0 if t == a else -0.1 for t in row] for row in ids]

        guided = {}
        if mode == "ppo-guided":
            # top_k=1: the learner's tokens are its argmax, so one and two processes write the same rows, and
            # the switch points drawn for the global batch must land on the same rows too.
            cfg.algorithm, cfg.guide_beta, cfg.lols_tau, cfg.top_k = "lols", 0.5, 0.5, 1
            cfg.validate()
            guided = {"guide": WordGuide()}
        trainer: Recording = WorkerPPO(cfg, policy=model, tokenizer=tok, prompts=PROMPTS[:8] * 2, reward_fn=reward,
                                       **guided)
        trainer.scripted = mode == "ppo-scripted"
        params = trainer.policy_params + trainer.critic_params
    else:
        cfg = SFTConfig(batch_size=5, max_steps=int(settings.pop("updates", "3")), learning_rate=1e-2,
                        save_every=int(settings.pop("save_every", "100")), **common)
        responses = [scripted_response(i, "") for i in range(len(PROMPTS))]
        trainer = WorkerSFT(cfg, policy=model, tokenizer=tok, prompts=PROMPTS, responses=responses)
        params = trainer.params
    if settings:
        raise SystemExit(f"unknown settings {sorted(settings)}")
    trainer.hashes = []
    trainer.kill_after = kill_after
    history = trainer.train()
    group = trainer.group
    out.mkdir(parents=True, exist_ok=True)
    keep = [{k: v for k, v in h.items() if not k.startswith("time/")} for h in history]
    (out / f"rank{group.rank}.json").write_text(json.dumps({
        "world_size": group.world_size, "rank": group.rank, "history": keep, "hashes": trainer.hashes,
        "final_hash": weights_hash(params),
    }))
    save_file({f"p{i}": p.detach().cpu().contiguous() for i, p in enumerate(params)},
              str(out / f"rank{group.rank}.safetensors"))


if __name__ == "__main__":
    main()
