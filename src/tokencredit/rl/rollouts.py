"""How PPO samples a batch: one interface, a back-end per config (plain, static cache, vLLM) and RLGF's guided
roll-outs (:class:`tokencredit.rl.guided.GuideTraining`). Each is a callable ``prompts -> GenerationOutput``
bound to its trainer, so the PPO loop never branches on the back-end."""

from __future__ import annotations

from typing import Protocol

from tokencredit.fastdecode import StaticKVDecoder
from tokencredit.generation import GenerationOutput, eos_ids, generate

__all__ = ["EngineRollout", "PolicyRollout", "Rollout", "make_rollout"]


class Rollout(Protocol):
    """Samples one response per prompt from the trainer's current policy."""

    def __call__(self, prompts: list[str]) -> GenerationOutput:
        """The sampled batch."""


class PolicyRollout:
    """Sampling with tokencredit's own loop: transformers' KV cache ("plain") or a static cache ("static")."""

    def __init__(self, trainer: object) -> None:
        """Bind to ``trainer``; the static back-end builds its decoder once."""
        cfg = trainer.config
        self.trainer = trainer
        self.decoder = (StaticKVDecoder(trainer.policy, cuda_graphs=cfg.cuda_graphs)
                        if cfg.rollout_backend == "static" else None)

    def __call__(self, prompts: list[str]) -> GenerationOutput:
        """Sample with the trainer's generator, logits processors and sampling settings."""
        t, cfg = self.trainer, self.trainer.config
        # One autocast region for the whole decode: autocast caches the bf16 copy of each trainable weight for the
        # region, so the fp32 masters are cast once per rollout, not once per token.
        with t._amp():
            return generate(
                t.policy, t.tokenizer, prompts,
                max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                stop_strings=cfg.stop_strings, logits_processors=t.logits_processors,
                max_prompt_length=cfg.max_prompt_length, generator=t.generator, decoder=self.decoder,
            )


class EngineRollout:
    """Sampling with a vLLM engine that gets the policy's current weights before every roll-out (GPU only)."""

    def __init__(self, trainer: object) -> None:
        """Bind to ``trainer``; the engine is built on the first roll-out (it needs the run folder)."""
        if trainer.logits_processors:
            raise ValueError("rollout_backend='vllm' does not run tokencredit's logits_processors; use 'static'")
        self.trainer = trainer
        self.engine = None

    def __call__(self, prompts: list[str]) -> GenerationOutput:
        """Push the weights (or load the policy once), sample, and move the batch to the trainer's device."""
        from tokencredit.vllm_rollout import VLLMRollout, save_policy_folder

        t, cfg = self.trainer, self.trainer.config
        if self.engine is None:
            # vLLM loads a model from a folder; the policy as it is now (LoRA merged) is written once, and
            # later updates reach the engine through sync_weights. One engine per rank, each on its own GPU,
            # loaded from its own folder.
            name = f"vllm_model_rank{t.group.rank}" if t.group.distributed else "vllm_model"
            folder = save_policy_folder(t.policy, t.tokenizer, t.run_dir / name)
            self.engine = VLLMRollout(str(folder), t.tokenizer, seed=cfg.seed,
                                      gpu_memory_utilization=cfg.vllm_gpu_memory_utilization)
        else:
            self.engine.sync_weights(t.policy)
        gen = self.engine.generate(
            prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
            top_p=cfg.top_p, stop_strings=cfg.stop_strings, max_prompt_length=cfg.max_prompt_length,
            eos_ids=eos_ids(t.policy, t.tokenizer),
        )
        for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "logprobs", "finished"):
            setattr(gen, name, getattr(gen, name).to(t.device))
        return gen


def make_rollout(trainer: object) -> Rollout:
    """The roll-out the trainer's config picks: guided when it trains with a guide, else its back-end."""
    if trainer.guided is not None:
        guided = trainer.guided
        return lambda prompts: guided.rollout(trainer, prompts)
    if trainer.config.rollout_backend == "vllm":
        return EngineRollout(trainer)
    return PolicyRollout(trainer)
