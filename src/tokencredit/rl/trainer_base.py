"""The run loop every trainer shares: its settings, logging, progress bar, checkpoints and resume.

:class:`Trainer` owns what does not depend on the method: claim the run folder (or resume from its newest loadable
checkpoint), call :meth:`Trainer.train_step` until :attr:`Trainer.total_steps`, log every step to
``metrics.jsonl`` (TensorBoard, W&B), show a progress bar, checkpoint every ``save_every`` steps and at the end,
and save the policy. A trainer subclass says what one step is, what its checkpoint holds beyond the policy, and
how to restore it. PPO, SFT and PGG are its subclasses.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from tokencredit.distributed import (
    ProcessGroup,
    open_run,
    resume_on_ranks,
    save_checkpoint_on_ranks,
)
from tokencredit.models import quiet_saves, save_hf_policy
from tokencredit.run_folders import releases_run_folders
from tokencredit.runs import CheckpointManager, capture_rng_state, read_metrics, start_fresh

log = logging.getLogger("tokencredit")

__all__ = ["RunSettings", "Trainer", "progress_bar"]


@dataclass
class RunSettings:
    """The settings of a run that every trainer shares: folder, seed, resume, checkpoints, logging, device."""

    output_dir: str = "runs/run"  # run folder: config.yaml, metrics.jsonl, checkpoints/, policy/
    seed: int = 0  # seeds sampling, data order and dropout
    resume: bool = False  # continue from the newest checkpoint in output_dir
    overwrite: bool = False  # replace a run already in output_dir (kept aside until this run's first checkpoint)
    allow_changed_settings: bool = False  # resume even though settings differ from the saved config.yaml
    save_every: int = 10  # steps between checkpoints; the last step is always saved
    keep_checkpoints: int = 2  # complete checkpoints kept on disk
    device: str = "auto"  # "auto" = cuda when available, else cpu
    log_tensorboard: bool = True  # scalars to output_dir/tensorboard when tensorboard is installed
    log_wandb: bool = False  # also log to Weights & Biases (needs `pip install wandb`)
    wandb_project: str | None = None  # Weights & Biases project for log_wandb; None = wandb's default
    progress: bool = True  # a progress bar with the step's main numbers

    def validate_run(self) -> None:
        """Check the run settings; raise ValueError naming the field."""
        for name in ("save_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")


def progress_bar(total: int, initial: int, enabled: bool, desc: str, unit: str = "step") -> object | None:
    """A tqdm bar named ``desc`` (the run folder's name tells a recipe's stages apart), or None when disabled."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)


class Trainer:
    """Base of every trainer: the run loop, logging, progress and checkpoint/resume around a method's step.

    A subclass sets ``config`` (a :class:`RunSettings`), ``policy``, ``tokenizer`` and ``group`` and calls
    :meth:`_init_run`; it implements :attr:`total_steps`, :meth:`train_step`, :meth:`_write_checkpoint` and
    :meth:`load_checkpoint`, and may extend :meth:`_rank_state`, :meth:`progress_postfix` and
    :meth:`save_outputs`. ``steps_done`` counts finished steps (PPO calls them updates: ``update_idx``).
    """

    config: RunSettings
    policy: nn.Module
    tokenizer: object
    group: ProcessGroup
    name = "train"  # the progress bar's label, before the run folder's name
    step_unit = "step"  # what one step is called in the progress bar and the resume message
    # The key under which the step number goes into the logged metrics as well (PPO's "update"); None = only the
    # logger's own "step", and history records get {"step": n, ...}.
    record_key: str | None = None
    fresh_extra: tuple[str, ...] = ()  # folders of an earlier run that a fresh start clears besides checkpoints

    def _init_run(self) -> None:
        """The run's folder, checkpoints and counters (call once the config is set)."""
        self.steps_done = 0
        self.history: list[dict] = []
        self.run_dir = Path(self.config.output_dir)
        self.checkpoints = CheckpointManager(self.run_dir, keep_last=self.config.keep_checkpoints)

    @property
    def step_idx(self) -> int:
        """Steps done (``steps_done`` under the name SFT and PGG use)."""
        return self.steps_done

    @step_idx.setter
    def step_idx(self, value: int) -> None:
        """Set by load_checkpoint."""
        self.steps_done = value

    def data_order(self, n: int, epoch: int, stream: tuple[int, ...] = ()) -> np.ndarray:
        """The order of one pass over ``n`` items: a function of (seed, stream, epoch) alone, so a resumed run needs
        no state for it. The current pass of each stream is kept, so a step does not draw it again."""
        cache = self.__dict__.setdefault("_order_cache", {})
        held = cache.get(stream)
        if held is None or held[0] != epoch:
            held = cache[stream] = (epoch, np.random.default_rng([self.config.seed, *stream, epoch]).permutation(n))
        return held[1]

    # ------------------------------------------------------------------ what a subclass defines
    @property
    def total_steps(self) -> int:
        """Steps in the whole run."""
        raise NotImplementedError

    def train_step(self) -> dict:
        """Run step ``steps_done`` (0-based) and return its metrics."""
        raise NotImplementedError

    def progress_postfix(self, stats: dict) -> dict[str, str]:
        """What the progress bar shows after a step."""
        return {}

    def _write_checkpoint(self, tmp: Path) -> None:
        """Rank 0's part of a checkpoint: policy, optimiser, schedule, RNG and data position into ``tmp``."""
        raise NotImplementedError

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore what :meth:`_write_checkpoint` wrote (weights-only: a checkpoint cannot run code)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the run loop
    @releases_run_folders
    def train(self, before_step: Callable[[Trainer], None] | None = None) -> list[dict]:
        """Run (or resume) to ``total_steps``; returns one metrics dict per step.

        ``before_step`` is called with the trainer before every step (also right after a resume); it must derive
        what it does from ``steps_done`` and files it wrote, so that a resumed run behaves as an uninterrupted one.
        """
        cfg, group = self.config, self.group
        # Before anything is written: the folder must be this run's (see run_folders.claim_run_folder); rank 0 writes.
        self._drop_replaced_run, resumed, logger = open_run(group, self.run_dir, cfg, self._maybe_resume,
                                                            self._start_fresh, lambda: self.steps_done)
        self.history = read_metrics(self.run_dir) if resumed else []
        bar = progress_bar(self.total_steps, self.steps_done, cfg.progress and group.is_main,
                           f"{self.name} {self.run_dir.name}", self.step_unit)
        try:
            with logger:
                while self.steps_done < self.total_steps:
                    if before_step is not None:
                        before_step(self)
                    self._record(self.train_step(), logger, bar)
                    if self.steps_done % cfg.save_every == 0 or self.steps_done == self.total_steps:
                        self.save_checkpoint()
                        self._drop_replaced_run()  # a replaced run goes once this one has a checkpoint
        finally:
            if bar is not None:
                bar.close()
        self.save_outputs()
        group.barrier()  # the run is over for every rank once its outputs are on disk
        return self.history

    def _record(self, stats: dict, logger: object, bar: object | None) -> None:
        """Count the finished step, log it (rank 0), keep it in history and move the progress bar."""
        self.steps_done += 1
        if self.record_key is not None:
            stats = {self.record_key: self.steps_done, **stats}
            entry = stats
        else:
            entry = {"step": self.steps_done, **stats}  # the same record read_metrics gives
        if self.group.is_main:
            logger.log(self.steps_done, stats)
        self.history.append(entry)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(self.progress_postfix(stats))

    def save_outputs(self) -> None:
        """What a finished run leaves besides its checkpoints: the policy (rank 0)."""
        if self.group.is_main:
            with quiet_saves():
                self.save_policy(self.run_dir / "policy")

    # ------------------------------------------------------------------ checkpoints
    def _start_fresh(self) -> None:
        """Clear an earlier run's checkpoints and metrics in output_dir so the new run's files are its own."""
        start_fresh(self.run_dir, self.checkpoints, extra=self.fresh_extra)

    def save_policy(self, path: str | Path) -> None:
        """Save the policy (the LoRA adapter for a peft policy) and the tokenizer as an HF folder."""
        save_hf_policy(self.policy, self.tokenizer, path)

    def save_checkpoint(self) -> Path:
        """Write the checkpoint of ``steps_done`` atomically.

        In a multi-process run rank 0 writes it (weights and optimiser are the same on every rank) and every
        other rank adds its own random streams as ``rank<R>_state.pt`` before rank 0 commits.
        """
        return save_checkpoint_on_ranks(self.group, self.checkpoints, self.steps_done, self._write_checkpoint,
                                        self._rank_state)

    def _rank_state(self) -> dict:
        """This process's random streams (what a rank other than 0 adds to a checkpoint)."""
        return {"rank": self.group.rank, "rng": capture_rng_state()}

    def _maybe_resume(self) -> bool:
        """Load the newest checkpoint that loads when config.resume is set (older ones if it is damaged).

        Rank 0 picks the checkpoint (setting damaged ones aside); the other ranks load the one it picked.
        """
        ckpt = resume_on_ranks(self.group, self.checkpoints, self.config.resume, self.run_dir, self.load_checkpoint)
        if ckpt is None:
            return False
        log.info("resumed from %s (%s %d)", ckpt, self.step_unit, self.steps_done)
        return True
