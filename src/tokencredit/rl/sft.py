"""Supervised fine-tuning: mean NLL of the response tokens given their prompt, in a crash-safe run folder.

Read top to bottom: `SFTConfig` documents every knob where it is declared; `SFTTrainer.train` loops
batch -> token-mean NLL -> clip -> AdamW -> LR schedule -> log -> checkpoint. Batches use the rollout layout
(left-padded prompt, right-padded response), so the loss comes from the same forward pass PPO uses for its
log-probs (`response_logits` + `token_logprobs`), and `evaluate_nll` scores held-out data with that same loss.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from torch import nn

from tokencredit.distributed import (
    check_world_size,
    process_group,
    rank_state_of,
)
from tokencredit.models import (
    load_policy_weights,
    quiet_saves,
    resolve_device,
)
from tokencredit.precision import (
    autocast,
    make_adamw,
    resolve_mixed_precision,
    tune_cpu_allocator,
    validate_mixed_precision,
)
from tokencredit.rl.rollout import response_logits, token_logprobs
from tokencredit.rl.trainer_base import RunSettings, Trainer
from tokencredit.runs import (
    capture_rng_state,
    load_trainer_state,
    reading_checkpoint,
    restore_rng_state,
    save_trainer_state,
)
from tokencredit.textbounds import encode_within, tail_within

log = logging.getLogger(__name__)


@dataclass
class SFTConfig(RunSettings):
    """Every SFT hyper-parameter, documented where declared (the run settings in :class:`RunSettings`)."""

    # --- run ---
    output_dir: str = "runs/sft"  # run folder: config.yaml, metrics.jsonl, checkpoints/, policy/
    seed: int = 0  # seeds data order and dropout
    save_every: int = 50  # optimizer steps between checkpoints; the last step is always saved
    progress: bool = True  # progress bar with the loss
    num_epochs: int = 1  # passes over the data
    max_steps: int | None = None  # optimizer steps; overrides num_epochs (passes go on past the last epoch)

    # --- data ---
    batch_size: int = 8  # examples per optimizer step (the last batch of a pass may be smaller)
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step (bounds memory); divides batch_size
    max_length: int = 512  # prompt + response tokens; prompts lose their beginning so the response always fits

    # --- optimisation ---
    # bf16 autocast with fp32 trainable weights; "auto" = bf16 where bf16 matmuls are native (see PPOConfig)
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    fused_optimizer: bool = True  # AdamW's fused kernel where torch has it
    tune_allocator: bool = False  # CPU + glibc: keep freed buffers in the process (see PPOConfig)
    learning_rate: float = 2e-4  # peak learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 0  # the LR rises linearly over these first steps: step k uses lr * k / warmup_steps
    lr_schedule: Literal["constant", "linear"] = "linear"  # after warmup: keep the LR, or decay it linearly
    max_grad_norm: float | None = 1.0  # None = no clipping

    def validate(self) -> None:
        """Check ranges and divisibility; raise ValueError naming the field."""
        self.validate_run()
        for name in ("num_epochs", "batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None (got {self.max_steps})")
        if self.batch_size % self.gradient_accumulation_steps:
            raise ValueError(
                f"batch_size {self.batch_size} must be a multiple of gradient_accumulation_steps "
                f"{self.gradient_accumulation_steps}"
            )
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2: a prompt token and the EOS (got {self.max_length})")
        if self.learning_rate <= 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("learning_rate must be > 0, weight_decay and warmup_steps >= 0")
        if self.lr_schedule not in ("constant", "linear"):
            raise ValueError(f"lr_schedule must be 'constant' or 'linear' (got {self.lr_schedule!r})")
        validate_mixed_precision(self.mixed_precision)
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or None (got {self.max_grad_norm})")


# ---------------------------------------------------------------------- data and loss (shared with evaluate_nll)
class SFTExample(NamedTuple):
    """One tokenized training pair: prompt ids (already cut to fit) and response ids ending in EOS."""

    prompt_ids: list[int]
    response_ids: list[int]


@dataclass
class SFTBatch:
    """Examples in the rollout layout: B rows, P prompt tokens (left-padded), T response tokens (right-padded)."""

    prompt_ids: torch.Tensor  # [B, P] long
    prompt_mask: torch.Tensor  # [B, P] 1 = real token
    response_ids: torch.Tensor  # [B, T] long
    response_mask: torch.Tensor  # [B, T] 1 = response token (EOS included)

    def input_ids(self) -> torch.Tensor:
        """[B, P+T] prompt followed by response."""
        return torch.cat([self.prompt_ids, self.response_ids], 1)

    def attention_mask(self) -> torch.Tensor:
        """[B, P+T] attention over real prompt and response tokens."""
        return torch.cat([self.prompt_mask, self.response_mask], 1)


def tokenize_examples(
    tokenizer: object, prompts: Sequence[str], responses: Sequence[str], max_length: int,
    record_names: Sequence[str] | None = None,
) -> list[SFTExample]:
    """Tokenize pairs; EOS ends every response, prompts keep their last tokens; a row that can't fit raises.

    ``record_names`` (e.g. "data.jsonl:12") name the rows in errors; without it a row is "row N".
    """
    if isinstance(prompts, str) or isinstance(responses, str):
        raise ValueError("prompts and responses must be lists of strings, not one string")
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses; they must pair up")
    if not prompts:
        raise ValueError("no examples: prompts and responses are empty")
    for name, seq in (("prompts", prompts), ("responses", responses)):
        bad = next((i for i, x in enumerate(seq) if not isinstance(x, str)), None)
        if bad is not None:
            raise ValueError(f"row {bad}: {name} must be strings (got {type(seq[bad]).__name__})")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; SFT appends it to every response so the model learns to stop")
    # Prompts are tokenized as encode_prompts does (special tokens included), so training sees what generate sees.
    # They keep at most their last max_length - 1 tokens, and a response of max_length - 1 tokens or more is an
    # error, so a huge text is cut or refused on its length before it is tokenized (tokencredit.textbounds).
    prompt_ids = tokenizer([tail_within(tokenizer, p, max_length - 1) for p in prompts])["input_ids"]
    response_ids = encode_within(tokenizer, list(responses), max_length - 2, add_special_tokens=False)
    examples = []
    def name(row: int) -> str:
        return record_names[row] if record_names is not None else f"row {row}"

    for row, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        if r is None or len(r) + 1 >= max_length:
            size = (f"more than {max_length - 1} tokens long (EOS included; {len(responses[row]):,} characters)"
                    if r is None else f"{len(r) + 1} tokens long (EOS included)")
            raise ValueError(
                f"{name(row)}: the response is {size} but max_length={max_length} "
                "must leave room for at least one prompt token; shorten it or raise max_length"
            )
        r = [*r, eos]
        if not p:
            raise ValueError(f"{name(row)}: the prompt has no tokens; SFT predicts a response from its prompt")
        examples.append(SFTExample(list(p)[-(max_length - len(r)):], r))
    return examples


def collate_examples(examples: Sequence[SFTExample], pad_id: int, device: torch.device | str = "cpu") -> SFTBatch:
    """Left-pad prompts and right-pad responses, so each row is one causal sequence ending in padding."""
    rows = len(examples)
    width_p = max(len(e.prompt_ids) for e in examples)
    width_r = max(len(e.response_ids) for e in examples)
    prompt_ids = torch.full((rows, width_p), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros(rows, width_p, dtype=torch.long)
    response_ids = torch.full((rows, width_r), pad_id, dtype=torch.long)
    response_mask = torch.zeros(rows, width_r, dtype=torch.long)
    for i, (p, r) in enumerate(examples):
        prompt_ids[i, width_p - len(p):] = torch.tensor(p)
        prompt_mask[i, width_p - len(p):] = 1
        response_ids[i, : len(r)] = torch.tensor(r)
        response_mask[i, : len(r)] = 1
    return SFTBatch(prompt_ids.to(device), prompt_mask.to(device), response_ids.to(device), response_mask.to(device))


def response_nll(model: nn.Module, batch: SFTBatch) -> torch.Tensor:
    """NLL [B, T] of each response token given the prompt and the response before it; exactly 0 on padding."""
    logits = response_logits(model, batch.input_ids(), batch.attention_mask(), batch.response_ids.size(1))
    nll = -token_logprobs(logits, batch.response_ids)
    # where, not a product: a NaN at a padded position must not leak into the sum.
    return torch.where(batch.response_mask.bool(), nll, torch.zeros_like(nll))


def _pad_id(tokenizer: object) -> int:
    """Filler id for padding (never attended to nor trained on): the pad token, else EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()
def evaluate_nll(
    policy: nn.Module,
    tokenizer: object,
    prompts: Sequence[str],
    responses: Sequence[str],
    batch_size: int = 8,
    max_length: int = 512,
) -> float:
    """Mean NLL per response token (EOS included) over all pairs: the training loss, for held-out data."""
    examples = tokenize_examples(tokenizer, prompts, responses, max_length)
    device = next(policy.parameters()).device
    was_training = policy.training
    policy.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate_examples(examples[start : start + batch_size], _pad_id(tokenizer), device)
            total += float(response_nll(policy, batch).sum())
            count += int(batch.response_mask.sum())
    finally:
        policy.train(was_training)
    return total / count


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the peak LR for optimizer step `step` (0-based); never 0, so no step is wasted."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    # Linear decay from 1 at the first step after warmup to 1/(steps after warmup) at the last step.
    return max(total_steps - step, 1) / max(total_steps - warmup_steps, 1)


# ---------------------------------------------------------------------- trainer
class SFTTrainer(Trainer):
    """Supervised fine-tuning on (prompt, response) pairs; the loss is the mean NLL of response tokens only."""

    name = "sft"

    def __init__(
        self,
        config: SFTConfig,
        policy: nn.Module,
        tokenizer: object,
        prompts: Sequence[str],
        responses: Sequence[str],
        record_names: Sequence[str] | None = None,
    ) -> None:
        """Tokenize the data and set up optimizer and LR schedule; `train()` runs (or resumes) the run.

        ``record_names`` (one per example, e.g. "data.jsonl:12") name bad examples in errors.
        """
        config.validate()
        self.config = config
        self.tokenizer = tokenizer
        self.examples = tokenize_examples(tokenizer, prompts, responses, config.max_length, record_names)
        self.pad_id = _pad_id(tokenizer)
        # One process, or a rank Accelerate launched: each rank trains on every N-th example of each step.
        self.group = process_group(config.device)
        self.device = self.group.device or resolve_device(config.device)

        torch.manual_seed(config.seed)
        self.policy = policy.to(self.device)
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the policy has no trainable parameters")
        self.group.broadcast_parameters(self.params)  # rank 0's initial weights (e.g. LoRA) on every rank
        self.amp_dtype = resolve_mixed_precision(config.mixed_precision, self.device)
        if config.tune_allocator and self.device.type == "cpu":
            tune_cpu_allocator()
        self.optimizer = make_adamw([{"params": self.params}], lr=config.learning_rate,
                                    weight_decay=config.weight_decay, fused=config.fused_optimizer)
        self.steps_per_epoch = math.ceil(len(self.examples) / config.batch_size)
        self._total_steps = config.max_steps or config.num_epochs * self.steps_per_epoch
        warmup, total, schedule = config.warmup_steps, self._total_steps, config.lr_schedule
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, warmup, total, schedule)
        )
        self._init_run()

    # ------------------------------------------------------------------ data order
    def batch_indices(self, step_idx: int) -> list[int]:
        """Example indices of optimizer step `step_idx` (0-based); each pass is cut into batch_size slices."""
        epoch, k = divmod(step_idx, self.steps_per_epoch)
        bs = self.config.batch_size
        return [int(i) for i in self.data_order(len(self.examples), epoch)[k * bs : (k + 1) * bs]]

    # ------------------------------------------------------------------ the steps (the loop is Trainer.train)
    @property
    def total_steps(self) -> int:
        """Optimizer steps in the whole run."""
        return self._total_steps

    def train_step(self) -> dict:
        """The next optimizer step, with the epoch it reaches."""
        stats = self.step(self.batch_indices(self.step_idx))
        stats["epoch"] = (self.step_idx + 1) / self.steps_per_epoch
        return stats

    def progress_postfix(self, stats: dict) -> dict[str, str]:
        """The loss and the learning rate."""
        return {"loss": f"{stats['loss']:.4f}", "lr": f"{stats['lr']:.2e}"}

    def save_outputs(self) -> None:
        """The trained policy, in eval mode."""
        self.policy.eval()
        super().save_outputs()

    def step(self, indices: Sequence[int]) -> dict:
        """One optimizer step on the examples at `indices` (the global batch; each rank takes every N-th).

        A non-finite gradient skips the update.
        """
        t0 = time.perf_counter()
        cfg = self.config
        group = self.group
        all_examples = [self.examples[i] for i in indices]
        # Strided, not contiguous: the last batch of an epoch may not divide evenly, and a rank may get none.
        examples = all_examples[group.rank::group.world_size]
        n_tokens = sum(len(e.response_ids) for e in all_examples)
        micro = max(1, math.ceil(len(examples) / cfg.gradient_accumulation_steps))
        self.policy.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), dtype=torch.float64)
        for start in range(0, len(examples), micro):
            batch = collate_examples(examples[start : start + micro], self.pad_id, self.device)
            # Divide by the tokens of the whole step, so every response token weighs the same however the step
            # is split into micro-batches (a per-micro-batch mean would favour short responses) or processes.
            with autocast(self.device, self.amp_dtype):
                loss = response_nll(self.policy, batch).sum() / n_tokens
            # x N: the gradient average over N ranks divides by N, and the sum over ranks is the step's loss.
            (loss * group.world_size).backward()
            loss_sum += loss.detach().double().cpu()
        group.average_gradients(self.params)
        loss_sum = float(group.sum(loss_sum.reshape(1))[0])
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        finite = math.isfinite(grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        if finite:
            self.optimizer.step()
        else:
            log.warning("step %d: non-finite gradient, update skipped", self.step_idx + 1)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()  # also after a skipped update: the schedule follows the step count
        return {
            "loss": loss_sum,
            "lr": lr,
            "tokens": n_tokens,
            "examples": len(all_examples),
            "grad_norm": grad_norm,
            "skipped_nonfinite": not finite,
            "time/step": time.perf_counter() - t0,
        }

    # ------------------------------------------------------------------ checkpoints
    def _write_checkpoint(self, tmp: Path) -> None:
        """Rank 0's part of save_checkpoint."""
        with quiet_saves():
            self.save_policy(tmp / "policy")
        epoch, batch_in_epoch = divmod(self.step_idx, self.steps_per_epoch)
        save_trainer_state(
            tmp / "trainer_state.pt",
            {
                "step": self.step_idx,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": capture_rng_state(),
                "data_position": {"epoch": epoch, "batch": batch_in_epoch, "num_examples": len(self.examples),
                                  "batch_size": self.config.batch_size},
                "world_size": self.group.world_size,
            },
        )

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore trainer state written by save_checkpoint (weights-only: a checkpoint cannot run code)."""
        path = Path(path)
        state = load_trainer_state(path / "trainer_state.pt")
        with reading_checkpoint(path, "trainer_state.pt"):
            saved = state["data_position"]
            saved_shape = (saved["num_examples"], saved["batch_size"])
            saved_world = int(state.get("world_size", 1))
        if saved_shape != (len(self.examples), self.config.batch_size):
            raise ValueError(
                f"checkpoint {path} was made with {saved_shape[0]} examples and batch_size "
                f"{saved_shape[1]}, this run has {len(self.examples)} and {self.config.batch_size}; "
                "resume with the same data and batch_size"
            )
        check_world_size(self.group, path, saved_world)
        with reading_checkpoint(path, f"rank{self.group.rank}_state.pt"):
            rank_state = rank_state_of(self.group, path, state)
        with reading_checkpoint(path, "policy weights"):
            load_policy_weights(self.policy, path / "policy")
        with reading_checkpoint(path, "trainer state"):
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            restore_rng_state(rank_state["rng"])
            self.step_idx = int(state["step"])
