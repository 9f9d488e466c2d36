"""The optimisation loop every reward model shares: batches -> loss -> AdamW, logged, non-finite steps skipped.

Each reward-model kind supplies only its batches and its loss; logging, clipping, skipping non-finite steps,
the progress bar and the run folder's metrics.jsonl/config.yaml are the same for all of them.

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
from tokencredit.runs import MetricsLogger

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
    validate_mixed_precision(getattr(config, "mixed_precision", "no"))


def fit(
    model: nn.Module,
    config: object,
    epochs: Callable[[int], Iterable[object]],
    loss_fn: LossFn,
    steps_per_epoch: int,
    desc: str,
    invariant: Sequence[nn.Parameter] = (),
) -> list[dict]:
    """Run ``config.num_epochs`` epochs of AdamW over ``epochs(epoch)`` batches; one stats dict per step.

    ``config`` needs output_dir, num_epochs, learning_rate, weight_decay, max_grad_norm, progress and
    log_tensorboard. The run folder gets config.yaml and a fresh metrics.jsonl.

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
        return _fit(model, config, epochs, loss_fn, steps_per_epoch, desc, params, group)
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
) -> list[dict]:
    """The loop of :func:`fit` over the parameters it trains."""
    device = params[0].device
    # Reward-model configs carry mixed_precision like the trainers; an older or custom config means full precision.
    amp_dtype = resolve_mixed_precision(getattr(config, "mixed_precision", "no"), device)
    optimizer = make_adamw([{"params": params}], lr=config.learning_rate, weight_decay=config.weight_decay,
                           fused=True)
    out = Path(config.output_dir)
    if group.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)  # a rerun in the same folder starts a fresh log
        save_config(config, out / "config.yaml")
    bar = None
    if config.progress and group.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.num_epochs * steps_per_epoch, desc=desc, unit="step", dynamic_ncols=True)
    history: list[dict] = []
    step = 0
    try:
        with MetricsLogger(out, tensorboard=config.log_tensorboard) if group.is_main else nullcontext() as logger:
            for epoch in range(config.num_epochs):
                for batch in epochs(epoch):
                    model.train()
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
                        max_norm = config.max_grad_norm if config.max_grad_norm is not None else math.inf
                        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
                        stats["grad_norm"] = float(grad_norm)
                        if torch.isfinite(grad_norm):
                            optimizer.step()
                        else:
                            stats["optim/skipped_nonfinite"] = 1
                    else:
                        # Never step on a non-finite loss (on any rank): the weights and Adam state stay as they were.
                        stats["optim/skipped_nonfinite"] = 1
                    step += 1
                    stats = {"epoch": epoch + 1, **stats}
                    if group.is_main:
                        logger.log(step, stats)
                    history.append({"step": step, **stats})
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{stats['loss/total']:.3f}")
    finally:
        if bar is not None:
            bar.close()
        model.eval()
    return history


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
