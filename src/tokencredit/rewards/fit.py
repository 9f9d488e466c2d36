"""The optimisation loop every reward model shares: batches -> loss -> AdamW, logged, non-finite steps skipped.

Each reward-model kind supplies only its batches and its loss; logging, clipping, skipping non-finite steps,
the progress bar, checkpoints and the run folder's metrics.jsonl/config.yaml are the same for all of them.

Checkpoints (``checkpoints/step-N``, every ``save_every`` steps and at the end; none when it is None) hold the
trained parameters, the optimiser, every random stream and the step; ``resume=true`` continues from the newest
one that loads and makes the same steps as a run that never stopped. The data order is replayed rather than
stored: each kind draws its epochs' orders from a generator seeded by its config, so drawing the finished
epochs again lands on the same batches.

Under ``accelerate launch`` every rank takes every N-th item of each batch (a batch is a list, or a tuple of
lists for the token RM's kinds), its loss weighted by its share of the batch's items, and the gradients are
averaged: for losses that are means over items (Bradley-Terry pairs, ListMLE lists, edits) that is the step one
process takes; token-level BCE is weighted by items, not tokens. Rank 0 alone writes the run folder.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from tokencredit.config import save_config
from tokencredit.distributed import ProcessGroup, process_group
from tokencredit.precision import (
    autocast,
    make_adamw,
    resolve_mixed_precision,
    validate_mixed_precision,
)
from tokencredit.runs import (
    CheckpointManager,
    DamagedCheckpointError,
    MetricsLogger,
    capture_rng_state,
    load_trainer_state,
    read_metrics,
    reading_checkpoint,
    restore_rng_state,
    save_trainer_state,
    start_fresh,
)

LossFn = Callable[[object], tuple[torch.Tensor, dict[str, float]]]


def validate_fit_config(config: object) -> None:
    """Checks shared by every reward-model config: epochs, batch size, length, rates, clipping, eval share."""
    for name in ("num_epochs", "batch_size"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1 (got {getattr(config, name)})")
    if config.max_length < 2:
        raise ValueError(f"max_length must be >= 2 (got {config.max_length})")
    if config.learning_rate <= 0 or config.weight_decay < 0:
        raise ValueError("learning_rate must be > 0 and weight_decay >= 0")
    if config.max_grad_norm is not None and config.max_grad_norm <= 0:
        raise ValueError(f"max_grad_norm must be > 0 or None (got {config.max_grad_norm})")
    if not 0 <= config.eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1) (got {config.eval_fraction})")
    if getattr(config, "lr_schedule", "constant") not in ("constant", "linear"):
        raise ValueError(f"lr_schedule must be constant or linear (got {config.lr_schedule!r})")
    if not 0 <= getattr(config, "warmup_ratio", 0.0) < 1:
        raise ValueError(f"warmup_ratio must be in [0, 1) (got {config.warmup_ratio})")
    save_every = getattr(config, "save_every", None)
    if save_every is not None and save_every < 1:
        raise ValueError(f"save_every must be >= 1 or None (got {save_every})")
    if getattr(config, "keep_checkpoints", 1) < 1:
        raise ValueError(f"keep_checkpoints must be >= 1 (got {config.keep_checkpoints})")
    validate_mixed_precision(getattr(config, "mixed_precision", "no"))


def fit(
    model: nn.Module,
    config: object,
    epochs: Callable[[int], Iterable[object]],
    loss_fn: LossFn,
    steps_per_epoch: int,
    desc: str,
    invariant: Sequence[nn.Parameter] = (),
    streams: Sequence[torch.Generator] = (),
    settings: object | None = None,
) -> list[dict]:
    """Run ``config.num_epochs`` epochs of AdamW over ``epochs(epoch)`` batches; one stats dict per step.

    ``config`` needs output_dir, num_epochs, learning_rate, weight_decay, max_grad_norm, progress and
    log_tensorboard; ``resume``, ``save_every`` and ``keep_checkpoints`` are read when present. The run folder
    gets config.yaml (``settings``, default ``config``: a command that claimed the folder passes its own) and
    metrics.jsonl, fresh unless resuming. ``epochs(e)`` must draw its order from a generator that starts from the
    same seed in every run (see the module docstring). ``streams``: the loss's own random generators, saved and
    restored with the checkpoints.

    ``lr_schedule`` ("constant", the default, or "linear": decay to 0 at the last step) and ``warmup_ratio`` (the
    share of steps with a linear rise from 0) are read when present; the rate is a function of the step alone,
    so a resumed run continues on the same curve.

    ``invariant``: parameters the loss does not depend on at all, such as the head's bias under Bradley-Terry.
    They are held fixed (still copied from rank 0) and their ``requires_grad`` is restored afterwards.
    """
    # Their exact gradient is 0, so what backward gives them is rounding noise of either sign; Adam divides it
    # by its own size and would step them by about the learning rate each time, in a direction set by the order
    # of the sums (and so by the CPU and the number of processes).
    held = [p for p in dict.fromkeys(invariant) if p.requires_grad]
    trainable = [p for p in model.parameters() if p.requires_grad]
    params = [p for p in trainable if all(p is not h for h in held)]
    if not params:
        raise ValueError("the reward model has no trainable parameters the loss depends on")
    group = process_group(getattr(config, "device", "auto"))
    group.broadcast_parameters(trainable)  # a freshly initialised head (or LoRA) starts equal on every rank
    for p in held:
        p.requires_grad_(False)
    try:
        return _fit(model, config, epochs, loss_fn, steps_per_epoch, desc, params, group, list(streams),
                    config if settings is None else settings)
    finally:
        for p in held:
            p.requires_grad_(True)


def _fit(
    model: nn.Module,
    config: object,
    epochs: Callable[[int], Iterable[object]],
    loss_fn: LossFn,
    steps_per_epoch: int,
    desc: str,
    params: list[nn.Parameter],
    group: ProcessGroup,
    streams: list[torch.Generator],
    settings: object,
) -> list[dict]:
    """The loop of :func:`fit` over the parameters it trains."""
    device = params[0].device
    # Reward-model configs carry mixed_precision like the trainers; an older or custom config means full precision.
    amp_dtype = resolve_mixed_precision(getattr(config, "mixed_precision", "no"), device)
    optimizer = make_adamw([{"params": params}], lr=config.learning_rate, weight_decay=config.weight_decay,
                           fused=True)
    out = Path(config.output_dir)
    save_every = getattr(config, "save_every", None)
    checkpoints = CheckpointManager(out, keep_last=getattr(config, "keep_checkpoints", 1))
    named = {name: p for name, p in model.named_parameters() if any(p is q for q in params)}
    state = _FitState(model, named, optimizer, streams, steps_per_epoch, group)
    from tokencredit.distributed import resume_on_ranks, save_checkpoint_on_ranks

    resumed = resume_on_ranks(group, checkpoints, bool(getattr(config, "resume", False)), out, state.load)
    if group.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if resumed is None:
            start_fresh(out, checkpoints)  # a rerun in the same folder starts a fresh log and checkpoints
        save_config(settings, out / "config.yaml")
    group.barrier()
    step = state.step
    bar = None
    if config.progress and group.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.num_epochs * steps_per_epoch, initial=step, desc=desc, unit="step",
                   dynamic_ncols=True)
    logger_cm = MetricsLogger(out, tensorboard=config.log_tensorboard, resume_from_step=step if resumed else None) \
        if group.is_main else nullcontext()
    try:
        with logger_cm as logger:
            # Read once the logger has dropped the lines of steps the resumed run redoes.
            history = [r for r in read_metrics(out) if r["step"] <= step] if resumed is not None else []
            if not group.is_main and resumed is not None:
                history = []  # only rank 0 keeps the folder's log; the others start their history here
            for epoch in range(config.num_epochs):
                batches = iter(epochs(epoch))
                if (epoch + 1) * steps_per_epoch <= step:
                    for _ in batches:  # a finished epoch: drawn again only to move the order's generator on
                        pass
                    continue
                for _ in range(step - epoch * steps_per_epoch):  # the finished start of the epoch resumed in
                    next(batches, None)
                for batch in batches:
                    model.train()
                    for g in optimizer.param_groups:
                        g["lr"] = lr_at(step, config.num_epochs * steps_per_epoch, config.learning_rate,
                                        getattr(config, "lr_schedule", "constant"),
                                        getattr(config, "warmup_ratio", 0.0))
                    stats = _optimizer_step(loss_fn, batch, group, params, optimizer, amp_dtype,
                                            config.max_grad_norm)
                    step += 1
                    stats = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], **stats}
                    if group.is_main:
                        logger.log(step, stats)
                    history.append({"step": step, **stats})
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{stats['loss/total']:.3f}")
                    last = step == config.num_epochs * steps_per_epoch
                    if save_every is not None and (last or step % save_every == 0):
                        state.step = step
                        save_checkpoint_on_ranks(group, checkpoints, step, state.write, state.rank_state)
    finally:
        if bar is not None:
            bar.close()
        model.eval()
    return history


def _optimizer_step(loss_fn: LossFn, batch: object, group: ProcessGroup, params: list[nn.Parameter],
                    optimizer: torch.optim.Optimizer, amp_dtype: torch.dtype | None,
                    max_grad_norm: float | None) -> dict:
    """One optimizer step on this rank's share of ``batch``; its stats averaged over ranks."""
    device = params[0].device
    optimizer.zero_grad(set_to_none=True)
    local, weight = _share(batch, group)
    loss, stats = None, {}
    if weight > 0:
        with autocast(device, amp_dtype):
            loss, stats = loss_fn(local)
    stats = _mean_over_ranks(group, stats, weight)
    stats["optim/skipped_nonfinite"] = 0
    finite = loss is None or bool(torch.isfinite(loss))
    if group.sum(torch.tensor([float(not finite)]))[0] == 0:
        if loss is not None:
            (loss * weight).backward()
        group.average_gradients(params)
        max_norm = max_grad_norm if max_grad_norm is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        stats["grad_norm"] = float(grad_norm)
        if torch.isfinite(grad_norm):
            optimizer.step()
        else:
            stats["optim/skipped_nonfinite"] = 1
    else:
        # Never step on a non-finite loss (on any rank): the weights and Adam state stay as they were.
        stats["optim/skipped_nonfinite"] = 1
    return stats


def lr_at(step: int, total: int, peak: float, schedule: str = "constant", warmup_ratio: float = 0.0) -> float:
    """The learning rate of optimiser step ``step`` (0-based) of ``total``: a linear rise over the first
    ``warmup_ratio`` of the steps, then ``peak`` ("constant") or a linear decay that reaches 0 after the last step
    ("linear")."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    if schedule == "constant":
        return peak
    if schedule != "linear":
        raise ValueError(f"lr_schedule must be constant or linear (got {schedule!r})")
    return peak * max(total - step, 0) / max(total - warmup, 1)


class _FitState:
    """What a reward-model checkpoint holds: trained parameters, optimiser, random streams and the step."""

    def __init__(self, model: nn.Module, named: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
                 streams: list[torch.Generator], steps_per_epoch: int, group: ProcessGroup) -> None:
        """Track the trained parameters ``named`` of ``model`` (frozen ones never change, so are not saved)."""
        self.model, self.named, self.optimizer = model, named, optimizer
        self.streams, self.steps_per_epoch, self.group = streams, steps_per_epoch, group
        self.step = 0

    def rank_state(self) -> dict:
        """This process's random streams (dropout and the loss's own generators)."""
        return {"rng": capture_rng_state(), "streams": [g.get_state() for g in self.streams]}

    def write(self, tmp: Path) -> None:
        """Rank 0's part of a checkpoint: the weights, the optimiser, the step and its own streams."""
        from safetensors.torch import save_file

        save_file({name: p.detach().contiguous().cpu() for name, p in self.named.items()},
                  str(tmp / "trained.safetensors"))
        save_trainer_state(tmp / "trainer_state.pt", {
            "step": self.step, "steps_per_epoch": self.steps_per_epoch, "world_size": self.group.world_size,
            "optimizer": self.optimizer.state_dict(), **self.rank_state()})

    def load(self, path: Path) -> None:
        """Put back everything :meth:`write` saved (and this rank's streams)."""
        from safetensors.torch import load_file

        from tokencredit.distributed import check_world_size, rank_state_of

        state = load_trainer_state(path / "trainer_state.pt")
        with reading_checkpoint(path, "trainer_state.pt"):
            saved_steps, saved_world = int(state["steps_per_epoch"]), int(state.get("world_size", 1))
        if saved_steps != self.steps_per_epoch:
            raise ValueError(f"checkpoint {path} was made with {saved_steps} steps per epoch, this run has "
                             f"{self.steps_per_epoch}: resume with the same data and batch_size")
        check_world_size(self.group, path, saved_world)
        with reading_checkpoint(path, "trained weights"):
            weights = load_file(str(path / "trained.safetensors"))
        if set(weights) != set(self.named):
            raise DamagedCheckpointError(f"{path}: its weights are not this model's trained parameters "
                                         f"({len(weights)} saved, {len(self.named)} trained)")
        with reading_checkpoint(path, "trainer state"):
            rank_state = rank_state_of(self.group, path, state)
            with torch.no_grad():
                for name, p in self.named.items():
                    p.copy_(weights[name].to(p.device, p.dtype))
            self.optimizer.load_state_dict(state["optimizer"])
            restore_rng_state(rank_state["rng"])
            for generator, saved in zip(self.streams, rank_state["streams"], strict=True):
                generator.set_state(saved)
            self.step = int(state["step"])


def _share(batch: object, group: ProcessGroup) -> tuple[object, float]:
    """This rank's every-N-th items of a batch (a list, or a tuple of lists) and its weight, local * N / global."""
    if not group.distributed:
        return batch, 1.0
    parts = list(batch) if isinstance(batch, tuple) else [batch]
    local = [list(part)[group.rank::group.world_size] for part in parts]
    total = sum(len(part) for part in parts)
    weight = sum(len(part) for part in local) * group.world_size / total if total else 0.0
    return (tuple(local) if isinstance(batch, tuple) else local[0]), weight


def _mean_over_ranks(group: ProcessGroup, stats: dict[str, float], weight: float) -> dict[str, float]:
    """Each statistic's item-weighted mean over the ranks that computed it (a rank may lack a kind)."""
    if not group.distributed:
        return stats
    import torch.distributed as dist

    seen: list = [None] * group.world_size
    dist.all_gather_object(seen, (stats, weight))
    out: dict[str, float] = {}
    for key in sorted({k for s, _ in seen for k in s}):
        pairs = [(s[key], w) for s, w in seen if key in s and w > 0]
        total = sum(w for _, w in pairs)
        out[key] = sum(v * w for v, w in pairs) / total if total else float("nan")
    return out
