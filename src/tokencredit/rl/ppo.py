"""Token-level PPO: per-token rewards, per-token KL to a reference, GAE, clipped policy and value losses.

Read top to bottom: `PPOConfig` documents every knob where it is declared; `PPOTrainer.train` loops
rollout -> score -> advantages -> update -> log -> checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from tokencredit.distributed import (
    check_world_size,
    process_group,
    rank_seed,
    rank_state_of,
)
from tokencredit.fastdecode import StaticKVDecoder
from tokencredit.generation import GenerationOutput, LogitsProcessor, encode_prompts
from tokencredit.models import (
    ScalarHeadModel,
    is_peft,
    load_policy_weights,
    make_reference,
    quiet_saves,
    resolve_device,
)
from tokencredit.precision import (
    autocast,
    freeze_to,
    make_adamw,
    resolve_mixed_precision,
    tune_cpu_allocator,
)
from tokencredit.rewards.tokens import RewardFn, rewards_to_tensor
from tokencredit.rl.advantages import compute_gae, masked_mean, masked_sum, masked_whiten
from tokencredit.rl.critics import SharedValueHead, capture_lm_head_input, default_critic, disable_dropout, hidden_size
from tokencredit.rl.guided import GuideTraining
from tokencredit.rl.kl import AdaptiveKLController, FixedKLController, kl_estimate, kl_loss
from tokencredit.rl.losses import entropy_from_logits, policy_loss, value_loss
from tokencredit.rl.ppo_config import PPOConfig
from tokencredit.rl.reward_shaping import charge_missing_eos, reward_stats, reward_sums, token_rewards
from tokencredit.rl.rollout import RolloutBatch, response_logits, response_values, token_logprobs
from tokencredit.rl.rollouts import make_rollout
from tokencredit.rl.trainer_base import Trainer
from tokencredit.runs import (
    capture_rng_state,
    load_trainer_state,
    reading_checkpoint,
    restore_rng_state,
    save_trainer_state,
)
from tokencredit.textbounds import tail_within

log = logging.getLogger(__name__)


class PPOTrainer(Trainer):
    """PPO whose reward is a per-token tensor; a per-sequence score is the special case on the last token."""

    name = "ppo"
    step_unit = "update"
    record_key = "update"

    def __init__(
        self,
        config: PPOConfig,
        policy: nn.Module,
        tokenizer: object,
        prompts: Sequence[str],
        reward_fn: RewardFn,
        critic: nn.Module | None = None,
        reference: nn.Module | None = None,
        reference_responses: Sequence[str | None] | None = None,
        logits_processors: Sequence[LogitsProcessor] = (),
        guide: object | None = None,
    ) -> None:
        """Set up models, optimiser and KL controller; `train()` runs (or resumes) the run.

        ``guide`` (RLGF algorithms): a causal LM sharing the policy's tokenizer, a writer such as
        ``rl.guided.BestOfNWriter``, or any object with ``complete(texts, max_new_tokens)`` returning strings or
        ``(text, finished)`` pairs (a black-box guide; its text is re-tokenised).
        """
        config.validate()
        prompts = _checked_inputs(config, prompts, reward_fn, reference_responses)
        self.config = config
        # One process, or the rank Accelerate launched: each rank samples its share of every batch.
        self.group = process_group(config.device)
        mb = config.mini_batch_size or config.batch_size
        self.group.check_divides(batch_size=config.batch_size, mini_batch_size=mb)
        if (mb // self.group.world_size) % config.gradient_accumulation_steps:
            raise ValueError(f"mini_batch_size / processes = {mb // self.group.world_size} must be a multiple of "
                             f"gradient_accumulation_steps {config.gradient_accumulation_steps}")
        self.device = self.group.device or resolve_device(config.device)
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.prompts = list(prompts)
        self.reward_fn = reward_fn
        self.reference_responses = list(reference_responses) if reference_responses is not None else None
        self.logits_processors = list(logits_processors)
        if config.reuse_sampling_logprobs and self.logits_processors:
            raise ValueError("reuse_sampling_logprobs cannot be used with logits_processors: the sampled "
                             "distribution is then not the policy's")

        _check_positions(policy, tokenizer, self.prompts, config)

        self._setup_models(policy, critic, reference, guide)
        self._setup_optimisation()
        self._init_run()
        self._target_ids = self._tokenize_references() if self.reference_responses else None
        self._rollout = make_rollout(self)  # plain, static or vLLM sampling, or RLGF's guided roll-outs
        # (batch, its first-epoch forward pass) between make_batch and optimize; see reuse_first_epoch_forward
        self._first_forward: tuple[RolloutBatch, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None

    def _setup_models(self, policy: nn.Module, critic: nn.Module | None, reference: nn.Module | None,
                      guide: object | None) -> None:
        """Policy, reference, critic and (RLGF) the guide on the trainer's device, the same on every rank."""
        config = self.config
        torch.manual_seed(config.seed)
        self.policy = policy.to(self.device)
        # Randomly initialised trainable weights (LoRA) may differ between ranks: rank 0's win, as with DDP, before
        # anything (reference, critic) is copied from the policy, so every rank starts from the same point.
        self.group.broadcast_parameters([p for p in self.policy.parameters() if p.requires_grad])
        self.reference = (make_reference(policy) if reference is None else reference)
        if self.reference is not None:
            self.reference = self.reference.to(self.device).eval().requires_grad_(False)
        elif not is_peft(policy):
            raise ValueError("no reference model: pass `reference` or use a LoRA (peft) policy")
        if config.shared_critic:
            if critic is not None:
                raise ValueError("shared_critic=True puts the value head on the policy; do not pass critic=")
            self.critic: nn.Module = SharedValueHead(hidden_size(policy)).to(self.device)
        else:
            self.critic = (critic if critic is not None else default_critic(policy)).to(self.device)
        if config.disable_dropout:
            disable_dropout(self.policy)
            disable_dropout(self.critic)

        if config.algorithm == "ppo":
            if guide is not None:
                raise ValueError("a guide was passed but algorithm='ppo'; pick ppo_pp, aggrevated, lols or d2lols")
            self.guided: GuideTraining | None = None
        else:
            self.guided = GuideTraining(config, guide, self.tokenizer, self.device, self.critic,
                                        self.logits_processors)

    def _setup_optimisation(self) -> None:
        """Trainable parameters, precision, optimiser, KL controller and the random streams."""
        config = self.config

        self.policy_params = [p for p in self.policy.parameters() if p.requires_grad]
        self.critic_params = [p for p in self.critic.parameters() if p.requires_grad]
        if self.guide_critic is not None:
            self.critic_params += [p for p in self.guide_critic.parameters() if p.requires_grad]
        if not self.policy_params:
            raise ValueError("the policy has no trainable parameters")
        self.group.broadcast_parameters(self.critic_params)  # a critic passed in may differ between ranks too
        self.amp_dtype = resolve_mixed_precision(config.mixed_precision, self.device)
        freeze_to([self.policy, self.critic, self.reference, self.guide_critic,
                   getattr(self.guide_writer, "model", None)], self.amp_dtype)
        if config.tune_allocator and self.device.type == "cpu":
            tune_cpu_allocator()
        self.optimizer = make_adamw(
            [
                {"params": self.policy_params, "lr": config.learning_rate},
                {"params": self.critic_params, "lr": config.critic_learning_rate or config.learning_rate},
            ],
            weight_decay=config.weight_decay, eps=config.adam_eps, fused=config.fused_optimizer,
        )
        if config.adaptive_kl:
            self.kl_ctl: FixedKLController | AdaptiveKLController = AdaptiveKLController(
                config.kl_coef, config.kl_target, config.kl_horizon
            )
        else:
            self.kl_ctl = FixedKLController(config.kl_coef)
        # Per-rank streams (rank 0 keeps the single-process seeds): ranks sample different responses.
        self.generator = torch.Generator(device=self.device).manual_seed(rank_seed(config.seed, self.group.rank))
        self.shuffle_generator = torch.Generator().manual_seed(rank_seed(config.seed + 1, self.group.rank))
        if hasattr(self.guide_writer, "generator"):
            self.guide_writer.generator = self.generator

    # ------------------------------------------------------------------ RLGF and the sampling back-ends
    @property
    def guide_writer(self) -> object | None:
        """The guide as a writer (None without a guide)."""
        return self.guided.writer if self.guided is not None else None

    @property
    def guide_critic(self) -> nn.Module | None:
        """The critic of the guide's cost-to-go (None unless some updates roll out with the guide)."""
        return self.guided.critic if self.guided is not None else None

    @property
    def decoder(self) -> StaticKVDecoder | None:
        """The static back-end's decoder (None for the others)."""
        return getattr(self._rollout, "decoder", None)

    @property
    def _vllm(self) -> object | None:
        """The vLLM engine once the first roll-out built it (None for the other back-ends)."""
        return getattr(self._rollout, "engine", None)

    # ------------------------------------------------------------------ data order
    def batch_indices(self, update_idx: int) -> list[int]:
        """Prompt indices of update `update_idx` (0-based); passes over the data wrap around."""
        n, bs = len(self.prompts), self.config.batch_size
        out = []
        for k in range(update_idx * bs, (update_idx + 1) * bs):
            epoch, offset = divmod(k, n)
            out.append(int(self.data_order(len(self.prompts), epoch)[offset]))
        return out

    # ------------------------------------------------------------------ the updates (the loop is Trainer.train)
    @property
    def total_steps(self) -> int:
        """PPO updates in the whole run."""
        return self.config.num_updates

    @property
    def update_idx(self) -> int:
        """PPO updates done."""
        return self.steps_done

    @update_idx.setter
    def update_idx(self, value: int) -> None:
        """Set by load_checkpoint."""
        self.steps_done = value

    def train(self, before_update: Callable[[PPOTrainer], None] | None = None) -> list[dict]:
        """Run (or resume) PPO for config.num_updates updates; returns one metrics dict per update.

        ``before_update`` is called with the trainer before every update (``update_idx`` is the number of
        updates done, also right after a resume), e.g. to swap ``reward_fn`` for a refitted reward model
        (online RLAIF, the demo's ``relabel_every``). It must derive what it does from ``update_idx`` and files
        it wrote, not from calls it saw, so that a resumed run gets the same rewards as an uninterrupted one.
        """
        return super().train(before_update)

    def train_step(self) -> dict:
        """The next PPO update."""
        return self.step(self.batch_indices(self.update_idx))

    def progress_postfix(self, stats: dict) -> dict[str, str]:
        """Mean reward and KL."""
        return {"reward": f"{stats['reward/mean']:.3f}", "kl": f"{stats['kl/mean']:.3f}"}

    def step(self, indices: Sequence[int]) -> dict:
        """One PPO update on the prompts at `indices` (the global batch; each rank takes its share)."""
        t0 = time.perf_counter()
        indices = self.group.share(indices)
        prompts = [self.prompts[i] for i in indices]
        gen = self.rollout(prompts)
        t1 = time.perf_counter()
        batch, stats = self.make_batch(prompts, gen, torch.tensor(list(indices)))
        t2 = time.perf_counter()
        if batch is None:
            log.warning("update %d skipped: %s", self.update_idx + 1, stats["skipped"])
        else:
            stats.update(self.optimize(batch))
        stats["time/rollout"] = t1 - t0
        stats["time/score"] = t2 - t1
        stats["time/update"] = time.perf_counter() - t2
        return stats

    def _amp(self) -> object:
        """The autocast context of config.mixed_precision (a no-op in full precision)."""
        return autocast(self.device, self.amp_dtype)

    def rollout(self, prompts: list[str]) -> GenerationOutput:
        """Sample one response per prompt from the current policy with the configured roll-out."""
        return self._rollout(prompts)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def make_batch(
        self, prompts: list[str], gen: GenerationOutput, row_index: torch.Tensor
    ) -> tuple[RolloutBatch | None, dict]:
        """Score a generation: log-probs, reference log-probs, values, token rewards, KL, GAE."""
        cfg = self.config
        self._first_forward = None
        clock = _PhaseClock()
        mask = gen.response_mask.float()
        scores, stats, sums = self._score(prompts, gen, mask)
        clock.lap("time/reward")
        if sums[4]:  # a non-finite score somewhere: every rank skips together
            bad = torch.nonzero(~torch.isfinite(scores).all(-1)).squeeze(-1).tolist()
            where = f"rows {bad}" if bad else "another process's rows"
            stats.update({"skipped": f"non-finite reward in {where}", "kl/mean": float("nan"),
                          "reward/mean": float("nan")})
            return None, stats
        n_rows, tokens = len(prompts) * self.group.world_size, sums[2]
        ids = torch.cat([gen.prompt_ids, gen.response_ids], 1)
        attn = torch.cat([gen.prompt_mask, gen.response_mask], 1)
        ref_t = self._reference_logprobs(ids, attn, gen.response_ids, mask)
        clock.lap("time/reference")
        logprobs_t, values_t, first_forward, values_from_guide = self._old_logprobs_and_values(ids, attn, gen, mask,
                                                                                               clock)
        train_mask, kl_mask, guide_value_mask, values_t = self._guided_masks(ids, attn, mask, values_t,
                                                                             values_from_guide, tokens, stats)
        kl_tokens = kl_estimate(logprobs_t, ref_t, cfg.kl_estimator or "k1") * kl_mask
        reduce = self.group.sum if self.group.distributed else None
        rewards = token_rewards(scores, kl_tokens, mask, self.kl_ctl.value, cfg.kl_in_reward, cfg.whiten_rewards,
                                reduce)
        advantages, returns = compute_gae(rewards, values_t, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, train_mask, reduce=reduce)
        kl_seq = ((logprobs_t - ref_t) * kl_mask).sum(-1)  # k1 summed per sequence, the number people compare
        kl_sum, penalty_sum, reward_sum, value_sum, return_sum = self.group.sum(torch.stack([
            kl_seq.sum(), (self.kl_ctl.value * kl_tokens).sum(), (rewards * mask).sum(), masked_sum(values_t, mask),
            masked_sum(returns, mask)]).double()).tolist()
        stats.update({
            "kl/mean": kl_sum / n_rows,
            "kl/penalty_mean": penalty_sum / n_rows,
            "rewards/total_mean": reward_sum / n_rows,
            "values/mean": value_sum / max(tokens, 1.0),
            "returns/mean": return_sum / max(tokens, 1.0),
            **clock.laps,
        })
        self.kl_ctl.update(kl_sum / n_rows, n_rows)
        batch = RolloutBatch(
            prompt_ids=gen.prompt_ids, prompt_mask=gen.prompt_mask, response_ids=gen.response_ids,
            response_mask=gen.response_mask, train_mask=train_mask.long(), logprobs=logprobs_t,
            ref_logprobs=ref_t, values=values_t, scores=scores, rewards=rewards, advantages=advantages,
            returns=returns, row_index=row_index.to(self.device), guide_value_mask=guide_value_mask,
        )
        if cfg.fuses_first_epoch():
            self._first_forward = (batch, first_forward)
        return batch, stats

    def _score(self, prompts: list[str], gen: GenerationOutput, mask: torch.Tensor) -> tuple[
            torch.Tensor, dict, list[float]]:
        """The reward function's token scores (with the missing-end charge), the batch's reward statistics and
        their sums over every process (the last says whether any score was not finite)."""
        cfg = self.config
        lengths = gen.response_mask.sum(-1).tolist()
        outputs = self.reward_fn(prompts, gen.texts, gen.token_ids())
        scores = rewards_to_tensor(outputs, lengths, gen.response_ids.size(1)).to(self.device)
        if cfg.missing_eos_penalty is not None:
            scores = charge_missing_eos(scores, gen.response_mask, gen.finished, cfg.missing_eos_penalty)
        # Batch statistics are over the global batch: sums from every rank (identity in a single process).
        sums = self.group.sum(reward_sums(scores, mask, gen.finished)).tolist()
        stats = {**reward_stats(sums, len(prompts) * self.group.world_size), "kl/coef": self.kl_ctl.value}
        return scores, stats, sums

    def _reference_logprobs(self, ids: torch.Tensor, attn: torch.Tensor, response_ids: torch.Tensor,
                            mask: torch.Tensor) -> torch.Tensor:
        """The reference policy's log-probs of the sampled tokens, in row chunks."""
        ref_model, ref_ctx = self._reference()
        with ref_ctx, self._amp():
            return torch.cat([self._logprobs(ref_model, ids[rows], attn[rows], response_ids[rows])
                              for rows in self._row_chunks(len(ids))]) * mask

    def _old_logprobs_and_values(self, ids: torch.Tensor, attn: torch.Tensor, gen: GenerationOutput,
                                 mask: torch.Tensor, clock: _PhaseClock) -> tuple[
            torch.Tensor, torch.Tensor, tuple | None, bool]:
        """The policy's log-probs and the values of the sampled tokens before the update: (log-probs, values, the
        fused first forward pass or None, whether the values came from the guide critic)."""
        cfg = self.config
        T = gen.response_ids.size(1)
        # AggreVaTeD rows are valued by the guide critic alone (see _guided_masks): the learner critic's pass is
        # skipped where the values come from their own pass, and only the fused first epoch computes them anyway.
        guide_valued = self.guided is not None and self.guided.values_rollout()
        if cfg.fuses_first_epoch():
            # The first optimiser step sees exactly this policy and critic on exactly these rows: run its forward
            # pass now, with gradients, and read the old log-probs and values off it.
            with torch.enable_grad():
                first_forward = self._forward((ids, attn, gen.response_ids))
            clock.lap("time/first_forward")
            return first_forward[1].detach() * mask, first_forward[2].detach() * mask, first_forward, False
        chunks = self._row_chunks(len(ids))
        if cfg.shared_critic:
            # The values come off the policy's trunk, so one policy pass gives old log-probs and values together.
            passes = [self._forward((ids[rows], attn[rows], gen.response_ids[rows]))[1:] for rows in chunks]
            logprobs_t = (gen.logprobs.to(self.device) if cfg.reuse_sampling_logprobs
                          else torch.cat([lp for lp, _ in passes])) * mask
            clock.lap("time/values")
            return logprobs_t, torch.cat([v for _, v in passes]) * mask, None, False
        with self._amp():
            if cfg.reuse_sampling_logprobs:
                logprobs_t = gen.logprobs.to(self.device)
            else:
                logprobs_t = torch.cat([self._logprobs(self.policy, ids[rows], attn[rows], gen.response_ids[rows])
                                        for rows in chunks])
            logprobs_t = logprobs_t * mask
            clock.lap("time/logprobs")
            critic = self.guide_critic if guide_valued else self.critic
            values_t = torch.cat([response_values(critic, ids[rows], attn[rows], T) for rows in chunks]) * mask
        clock.lap("time/values")
        return logprobs_t, values_t, None, guide_valued

    def _guided_masks(self, ids: torch.Tensor, attn: torch.Tensor, mask: torch.Tensor, values_t: torch.Tensor,
                      values_from_guide: bool, tokens: float, stats: dict) -> tuple[
            torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(train mask, KL mask, guide-value mask or None, values) of the batch; guided rows add their stats.

        Guided rows: only the learner's tokens are its actions (train mask); guide tokens are context, kept out
        of the KL unless guide_kl. When the guide rolls out (AggreVaTeD), every position is valued by the guide
        critic, so a learner token's advantage is the guide's: how much better the guide expects to finish
        after it (AggreVaTeD's cost-to-go of the expert; TRIL values these rows with its guide critic alone).
        The learner critic sits such updates out: its values are those of the learner's own roll-outs, and
        states judged by the guide's finish would make it optimistic when PPO++ updates follow (D2LOLS).
        """
        if self.guided is None or self.guided.last is None:
            return mask, mask, None, values_t
        cfg = self.config
        guide_valued = self.guided.values_rollout()
        rollin, learner_tokens = self.guided.last
        self.guided.last = None
        train_mask = learner_tokens.float() * mask
        kl_mask = mask if cfg.guide_kl else train_mask
        guide_value_mask = None
        if guide_valued:
            if not values_from_guide:
                T = mask.size(1)
                with torch.no_grad(), self._amp():
                    values_t = torch.cat([response_values(self.guide_critic, ids[rows], attn[rows], T)
                                          for rows in self._row_chunks(len(ids))]) * mask
            guide_value_mask = (mask - train_mask).long()
        learner_tokens_all = float(self.group.sum(train_mask.sum().double().reshape(1))[0])
        stats.update({"guide/rollin_is_guide": float(rollin == "guide"),
                      "guide/learner_token_frac": learner_tokens_all / max(tokens, 1.0)})
        return train_mask, kl_mask, guide_value_mask, values_t

    def _row_chunks(self, n: int) -> tuple[torch.Tensor, ...]:
        """Row indices of n rows split into forward-pass-sized chunks."""
        return torch.arange(n, device=self.device).split(self._micro_batch_size())

    def _micro_batch_size(self) -> int:
        """Rows per forward pass (of this rank's share)."""
        mb = (self.config.mini_batch_size or self.config.batch_size) // self.group.world_size
        return mb // self.config.gradient_accumulation_steps

    def _reference(self) -> tuple[nn.Module, object]:
        """The module that gives reference log-probs and the context to call it in (adapters off for LoRA)."""
        if self.reference is not None:
            return self.reference, nullcontext()
        return self.policy, self.policy.disable_adapter()

    def _logprobs(self, model: nn.Module, ids: torch.Tensor, attn: torch.Tensor, resp: torch.Tensor) -> torch.Tensor:
        """Log-probs [b, T] of the response tokens under model at the sampling temperature."""
        logits = response_logits(model, ids, attn, resp.size(1))
        return token_logprobs(logits, resp, self.config.temperature)

    # ------------------------------------------------------------------ optimisation
    def optimize(self, batch: RolloutBatch) -> dict:
        """ppo_epochs passes of clipped PPO over mini-batches of `batch`; non-finite steps are skipped."""
        cfg = self.config
        group = self.group
        mb_size = (cfg.mini_batch_size or cfg.batch_size) // group.world_size  # this rank's share
        micro = self._micro_batch_size()
        params = self.policy_params + self.critic_params
        sums: dict[str, torch.Tensor] = {}  # statistics summed on the device, read back once at the end
        grad_norm_sum = 0.0
        count = 0
        skipped_steps = 0
        optimizer_steps = 0
        early_stopped = False
        pending, self._first_forward = self._first_forward, None
        # Only the batch that make_batch just scored has its first forward pass done already.
        first_forward = pending[1] if pending is not None and pending[0] is batch else None
        self.policy.train()
        self.critic.train()
        for _epoch in range(cfg.ppo_epochs):
            order = torch.randperm(len(batch), generator=self.shuffle_generator).to(self.device)
            for start in range(0, len(batch), mb_size):
                self.optimizer.zero_grad(set_to_none=True)
                mb_stats: list[dict[str, torch.Tensor]] = []
                finite = torch.ones((), dtype=torch.bool, device=self.device)
                for rows in order[start : start + mb_size].split(micro):
                    if first_forward is not None:
                        # The whole batch in rollout order: the forward pass already ran while scoring. A masked
                        # token mean does not depend on the row order, so this is the same step as `rows`.
                        loss, s = self._loss(batch, first_forward)
                        first_forward = None
                    else:
                        loss, s = self._loss(batch.select(rows))
                    # Checked on the device and read once per optimiser step: a read per micro-batch would
                    # stall the GPU's launch queue every time.
                    finite = finite & torch.isfinite(loss)
                    (loss / cfg.gradient_accumulation_steps).backward()
                    mb_stats.append(s)
                # The mean gradient over the ranks (each loss carries its token weight): every rank now holds the
                # gradient one process would have on the whole mini-batch, so all take the same step.
                group.average_gradients(params)
                max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
                nonfinite, approx_kl = group.sum(torch.stack([
                    1.0 - finite.float(), torch.stack([s["policy/approx_kl"] for s in mb_stats]).mean()]).double()
                ).tolist()
                summary = [nonfinite == 0.0, float(grad_norm), approx_kl / group.world_size]
                ok = summary[0] and math.isfinite(summary[1])
                if ok:
                    self.optimizer.step()
                    optimizer_steps += 1
                    grad_norm_sum += summary[1]
                    count += len(mb_stats)
                    for s in mb_stats:
                        for k, v in s.items():
                            sums[k] = sums[k] + v if k in sums else v
                else:
                    # Never step on a non-finite loss or gradient: the weights and Adam state stay as they were.
                    self.optimizer.zero_grad(set_to_none=True)
                    skipped_steps += 1
                if cfg.target_kl is not None and summary[2] > cfg.target_kl:
                    early_stopped = True
                    break
            if early_stopped:
                break
        # Each rank's statistics carry its token weight; their sum over ranks / N is the global token mean.
        totals = (group.sum(torch.stack(list(sums.values())).double()) / group.world_size).tolist() if sums else []
        stats = {k: v / max(count, 1) for k, v in zip(sums, totals)}
        stats["grad_norm"] = grad_norm_sum / max(optimizer_steps, 1)
        stats["optim/steps"] = optimizer_steps
        stats["optim/skipped_nonfinite"] = skipped_steps
        stats["optim/early_stopped"] = early_stopped
        return stats

    def _forward(
        self, inputs: tuple[torch.Tensor, ...], with_values: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Policy logits (at the sampling temperature), log-probs and critic values [b, T] of the response tokens.

        ``with_values=False``: rows the learner critic does not value (AggreVaTeD's, valued by the guide critic);
        a separate critic's pass is skipped and the values are zeros without gradient.
        """
        ids, attn, resp = inputs
        T = resp.size(1)
        self.policy.train()
        self.critic.train()
        with self._amp():
            if not with_values and not self.config.shared_critic:
                logits = response_logits(self.policy, ids, attn, T)
                values = torch.zeros(resp.shape, device=logits.device, dtype=logits.dtype)
            elif self.config.shared_critic:
                with capture_lm_head_input(self.policy) as hidden:
                    logits = response_logits(self.policy, ids, attn, T)
                # the LM head saw the final hidden states of the T + 1 positions response_logits keeps
                values = self.critic(hidden[0][:, :-1])
            else:
                logits = response_logits(self.policy, ids, attn, T)
                values = response_values(self.critic, ids, attn, T)
        if self.config.temperature != 1.0:
            logits = logits / self.config.temperature
        return logits, token_logprobs(logits, resp), values

    def _loss(
        self, mb: RolloutBatch, forward: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """PPO loss of one micro-batch and its statistics (0-d tensors, read back once per update).

        `forward` is the (logits, log-probs, values) of `mb` when they were already computed with gradients. In a
        multi-process run every term is a token mean weighted by this rank's share of the global tokens
        (ProcessGroup.token_weight), and so are the statistics; a single process has weight 1.
        """
        cfg = self.config
        if forward is None:
            # AggreVaTeD rows train the guide critic, not the learner's: its pass would only be discarded.
            forward = self._forward((mb.input_ids(), mb.attention_mask(), mb.response_ids),
                                    with_values=mb.guide_value_mask is None)
        logits, logprobs, values = forward
        train_mask = mb.train_mask.float()
        weight = self.group.token_weight(train_mask.sum())
        pg_loss, pg_stats = policy_loss(logprobs, mb.logprobs, mb.advantages, train_mask, cfg.cliprange)
        # The learner's critic learns the value of the learner's own roll-outs (all tokens in plain PPO, the
        # learner's continuations under PPO++); under AggreVaTeD the guide critic values the rows (see make_batch).
        learner_value_mask = train_mask if mb.guide_value_mask is None else torch.zeros_like(train_mask)
        vf_loss, vf_stats = value_loss(values, mb.values, mb.returns, learner_value_mask, cfg.cliprange_value)
        # Terms over other token sets than the learner's (the guide's roll-outs, reference answers) carry their own
        # weight: a micro-batch of whole guide answers has no learner token, and its guide critic still learns.
        extra, extra_stats = [], {}
        if self.guide_critic is not None and mb.guide_value_mask is not None:
            # The guide critic learns the guide's cost-to-go on the tokens the guide wrote (AggreVaTeD roll-outs;
            # PPO++ roll-ins are context and are never valued, their returns are the learner's).
            self.guide_critic.train()
            with self._amp():
                guide_values = response_values(self.guide_critic, mb.input_ids(), mb.attention_mask(),
                                               mb.response_ids.size(1))
            guide_vf, _ = value_loss(guide_values, mb.values, mb.returns, mb.guide_value_mask.float(),
                                     cfg.cliprange_value)
            guide_weight = self.group.token_weight(mb.guide_value_mask.sum())
            extra.append(cfg.vf_coef * guide_vf * guide_weight)
            extra_stats["loss/guide_value"] = guide_vf.detach() * guide_weight
        if cfg.entropy_coef > 0:
            entropy = masked_mean(entropy_from_logits(logits), train_mask)
        else:
            with torch.no_grad():
                entropy = masked_mean(entropy_from_logits(logits.detach()), train_mask)
        loss = pg_loss + cfg.vf_coef * vf_loss - cfg.entropy_coef * entropy
        stats = {
            "loss/policy": pg_loss.detach(),
            "loss/value": vf_loss.detach(),
            "policy/entropy": entropy.detach(),
            "policy/clipfrac": pg_stats["clipfrac"],
            "policy/approx_kl": pg_stats["approx_kl"],
            "value/clipfrac": vf_stats["clipfrac"],
        }
        if not cfg.kl_in_reward and self.kl_ctl.value > 0:
            kl_term = masked_mean(kl_loss(logprobs, mb.ref_logprobs, mb.logprobs), train_mask)
            loss = loss + self.kl_ctl.value * kl_term
            stats["loss/kl"] = kl_term.detach()
        if cfg.target_coef > 0:
            nll, nll_tokens = self._target_nll(mb.row_index)
            # Reference tokens have their own global count; rows without a reference add none.
            nll_weight = self.group.token_weight(nll_tokens)
            if nll is not None:
                extra.append(cfg.target_coef * nll * nll_weight)
                extra_stats["loss/target_nll"] = nll.detach() * nll_weight
        if weight != 1.0:
            loss = loss * weight
            stats = {k: v * weight for k, v in stats.items()}
        for term in extra:
            loss = loss + term
        stats.update(extra_stats)
        stats["loss/total"] = loss.detach()
        return loss, stats

    def _tokenize_references(self) -> list[list[int] | None]:
        """Token ids (+EOS) of each reference response, for the target NLL term."""
        out: list[list[int] | None] = []
        for ref in self.reference_responses:
            if ref is None:
                out.append(None)
                continue
            ids = self.tokenizer(ref, add_special_tokens=False)["input_ids"]
            out.append(list(ids) + [self.tokenizer.eos_token_id])
        return out

    def _target_nll(self, row_index: torch.Tensor) -> tuple[torch.Tensor | None, int]:
        """Mean NLL of the reference responses of these rows (rows without one are left out), and their tokens."""
        rows = [int(i) for i in row_index.tolist() if self._target_ids[int(i)] is not None]
        if not rows:
            return None, 0
        prompt_ids, prompt_mask = encode_prompts(
            self.tokenizer, [self.prompts[i] for i in rows], self.config.max_prompt_length, self.device
        )
        targets = [self._target_ids[i] for i in rows]
        width = max(len(t) for t in targets)
        resp = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        resp_mask = torch.zeros(len(rows), width, dtype=torch.long)
        for j, t in enumerate(targets):
            resp[j, : len(t)] = torch.tensor(t)
            resp_mask[j, : len(t)] = 1
        resp, resp_mask = resp.to(self.device), resp_mask.to(self.device)
        with self._amp():
            logits = response_logits(
                self.policy, torch.cat([prompt_ids, resp], 1), torch.cat([prompt_mask, resp_mask], 1), width
            )
        return -masked_mean(token_logprobs(logits, resp), resp_mask.float()), int(resp_mask.sum())

    # ------------------------------------------------------------------ checkpoints
    def _rank_state(self) -> dict:
        """This process's random streams: sampling, mini-batch order, guide draws and the global RNGs."""
        return {
            "rank": self.group.rank,
            "rng": capture_rng_state(),
            "generator": self.generator.get_state(),
            "shuffle_generator": self.shuffle_generator.get_state(),
            **({"guide_rng": self.guided.rng.getstate()} if self.guided is not None else {}),
        }

    def _write_checkpoint(self, tmp: Path) -> None:
        """Rank 0's part of save_checkpoint: everything but the other ranks' streams."""
        with quiet_saves():
            self.save_policy(tmp / "policy")
            self.critic.save_pretrained(tmp / "critic")
            if self.guide_critic is not None:
                self.guide_critic.save_pretrained(tmp / "guide_critic")
        n = len(self.prompts)
        epoch, offset = divmod(self.update_idx * self.config.batch_size, n)
        save_trainer_state(
            tmp / "trainer_state.pt",
            {
                "update_idx": self.update_idx,
                "optimizer": self.optimizer.state_dict(),
                "kl_controller": self.kl_ctl.state_dict(),
                "rng": capture_rng_state(),
                "generator": self.generator.get_state(),
                "shuffle_generator": self.shuffle_generator.get_state(),
                # switch points and the LOLS schedule
                **({"guide_rng": self.guided.rng.getstate()} if self.guided is not None else {}),
                "data_position": {"epoch": epoch, "offset": offset, "num_prompts": n},
                "world_size": self.group.world_size,
            },
        )

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore trainer state written by save_checkpoint (weights-only: a checkpoint cannot run code)."""
        path = Path(path)
        state = load_trainer_state(path / "trainer_state.pt")
        with reading_checkpoint(path, "trainer_state.pt"):
            num_prompts = state["data_position"]["num_prompts"]
            saved_world = int(state.get("world_size", 1))
        if num_prompts != len(self.prompts):
            raise ValueError(
                f"checkpoint {path} was made with {num_prompts} prompts, "
                f"this run has {len(self.prompts)}; resume with the same prompts"
            )
        check_world_size(self.group, path, saved_world)
        with reading_checkpoint(path, f"rank{self.group.rank}_state.pt"):
            rank_state = rank_state_of(self.group, path, state)
        with reading_checkpoint(path, "policy weights"):
            load_policy_weights(self.policy, path / "policy")
        with reading_checkpoint(path, "critic weights"):
            if self.config.shared_critic:
                self.critic.load_pretrained(path / "critic")
            else:
                loaded_critic = ScalarHeadModel.from_pretrained(path / "critic")
                self.critic.load_state_dict(loaded_critic.state_dict())
        if self.guide_critic is not None:
            with reading_checkpoint(path, "guide critic weights"):
                loaded_guide = ScalarHeadModel.from_pretrained(path / "guide_critic")
                self.guide_critic.load_state_dict(loaded_guide.state_dict())
        with reading_checkpoint(path, "trainer state"):
            self.optimizer.load_state_dict(state["optimizer"])
            self.kl_ctl.load_state_dict(state["kl_controller"])
            restore_rng_state(rank_state["rng"])
            self.generator.set_state(rank_state["generator"])
            self.shuffle_generator.set_state(rank_state["shuffle_generator"])
            if "guide_rng" in rank_state and self.guided is not None:
                self.guided.rng.setstate(rank_state["guide_rng"])
            self.update_idx = int(state["update_idx"])



def _checked_inputs(config: PPOConfig, prompts: Sequence[str], reward_fn: object,
                    reference_responses: Sequence[str | None] | None) -> list[str]:
    """The prompts as a list, after checking them, the reward function and the NLL targets."""
    if not isinstance(prompts, str) and hasattr(prompts, "__iter__"):
        # A datasets column, a numpy array, a pandas Series: any iterable of strings (whose truth value
        # may be ambiguous or raise) becomes a plain list first.
        prompts = list(prompts)
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings")
    if not callable(reward_fn):
        raise ValueError("reward_fn must be callable: fn(prompts, responses, response_token_ids)")
    if reference_responses is not None and len(reference_responses) != len(prompts):
        raise ValueError(
            f"reference_responses has {len(reference_responses)} entries for {len(prompts)} prompts"
        )
    if config.target_coef > 0 and reference_responses is None:
        raise ValueError("target_coef > 0 needs reference_responses (the NLL target)")
    return list(prompts)


def _check_positions(policy: nn.Module, tokenizer: object, prompts: Sequence[str], config: PPOConfig) -> None:
    """Refuse a run whose longest prompt (as cut) plus max_new_tokens exceeds the policy's positions."""
    positions = getattr(getattr(policy, "config", None), "max_position_embeddings", None)
    if not isinstance(positions, int):
        return
    limit = config.max_prompt_length
    # Prompts keep their last max_prompt_length tokens: a bounded end of a huge prompt gives the same verdict
    # without tokenizing the whole of it (tokencredit.textbounds).
    texts = list(prompts) if limit is None else [tail_within(tokenizer, p, limit) for p in prompts]
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    kept = min(lengths[longest], limit or lengths[longest])
    if kept + config.max_new_tokens > positions:
        size = f"over {lengths[longest]}" if len(texts[longest]) < len(prompts[longest]) else lengths[longest]
        raise ValueError(
            f"prompt {longest} is {size} tokens (kept: {kept}); with max_new_tokens="
            f"{config.max_new_tokens} that is more than the policy's {positions} positions. Lower "
            "max_prompt_length (prompts keep their last tokens) or max_new_tokens"
        )


class _PhaseClock:
    """Wall-clock seconds of consecutive phases, one `lap(name)` at the end of each."""

    def __init__(self) -> None:
        """Start the first phase now."""
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        """Record the time since the previous lap under name."""
        now = time.perf_counter()
        self.laps[name] = now - self._last
        self._last = now
