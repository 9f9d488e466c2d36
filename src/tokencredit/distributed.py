"""Data-parallel training across the processes Hugging Face Accelerate launched (or one process, unchanged).

``accelerate launch --multi_gpu --num_processes N -m tokencredit ppo ...`` starts N copies of the command (torchrun
underneath) with ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` set. :func:`process_group` sees them, lets Accelerate's
``PartialState`` open the process group (NCCL on GPUs, gloo on CPUs) and returns a :class:`ProcessGroup` the
trainers use for the few things data parallelism needs:

- each rank works on its contiguous share of every global batch (:meth:`ProcessGroup.share`);
- every loss term is weighted by ``local tokens * N / global tokens`` (:meth:`ProcessGroup.token_weight`) and
  gradients are averaged in flat, bucketed all-reduces once per optimiser step (:meth:`ProcessGroup.average_gradients`),
  so N processes take the step one process takes on the same samples;
- batch statistics (whitening moments, the KL the controller reads, logged means, early stopping) are sums
  over all ranks (:meth:`ProcessGroup.sum`);
- rank 0 alone writes the run folder; what it decides (e.g. that a folder is occupied) reaches every rank
  (:meth:`ProcessGroup.on_main`).

Without a launcher (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) every method is the identity, so a plain run is
exactly what it was. Parameters are replicated on every rank (DDP-style): FSDP and DeepSpeed, which shard
them, are refused with a message (see docs/distributed.md).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")

#: Environment variables Accelerate sets when its config asks for a sharding engine we do not drive.
_SHARDING_ENGINES = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed"}


class ProcessGroup:
    """The processes one run is spread over; a single process when nothing was launched."""

    def __init__(self, world_size: int = 1, rank: int = 0, local_rank: int = 0,
                 device: torch.device | None = None) -> None:
        """Describe the group; build it with :func:`process_group` rather than by hand."""
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.local_rank = int(local_rank)
        self.device = device

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run folder (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1

    # ------------------------------------------------------------------ batches
    def check_divides(self, **sizes: int) -> None:
        """Refuse batch sizes that the ranks cannot share evenly; the error names the field."""
        for name, size in sizes.items():
            if size % self.world_size:
                raise ValueError(f"{name}={size} must be a multiple of the number of processes "
                                 f"({self.world_size}): every rank takes an equal share")

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous share of a global batch (all of it in a single process)."""
        items = list(items)
        if not self.distributed:
            return items
        if len(items) % self.world_size:
            raise ValueError(f"a batch of {len(items)} cannot be shared evenly by {self.world_size} processes")
        k = len(items) // self.world_size
        return items[self.rank * k:(self.rank + 1) * k]

    # ------------------------------------------------------------------ collectives
    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of ``values`` over all ranks (float64 for the reduction, so order barely matters)."""
        if not self.distributed:
            return values
        import torch.distributed as dist

        buf = values.detach().to(self._comm_device(), torch.float64).clone()
        dist.all_reduce(buf)
        return buf.to(values.device, values.dtype)

    def token_weight(self, local_count: torch.Tensor | float) -> torch.Tensor | float:
        """``local * N / global`` for a count of trained tokens: the factor that turns this rank's token mean
        into its share of the global token mean once gradients are averaged over the N ranks."""
        if not self.distributed:
            return 1.0
        local = torch.as_tensor(local_count, dtype=torch.float64).reshape(1)
        total = float(self.sum(local)[0])
        return float(local[0]) * self.world_size / total if total > 0 else 0.0

    def average_gradients(self, params: Sequence[torch.nn.Parameter], bucket_elements: int = 1 << 24) -> None:
        """Mean of every parameter's gradient over the ranks, in flat all-reduces of at most ``bucket_elements``.

        A parameter without a gradient on every rank keeps none (the optimiser then skips it, as a single
        process would); one with a gradient somewhere gets the mean with zeros for the ranks that had none.
        Buckets (64 MB of float32 by default) bound the extra memory: one flat copy of a full critic's
        gradients would add as much again as the gradients themselves.
        """
        if not self.distributed:
            return
        import torch.distributed as dist

        params = list(params)
        device = self._comm_device()
        has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
        dist.all_reduce(has_grad)
        buckets: list[list[torch.nn.Parameter]] = [[]]
        size = 0
        for p, seen in zip(params, has_grad.tolist()):
            if seen == 0:
                continue  # no rank has a gradient for it
            if buckets[-1] and size + p.numel() > bucket_elements:
                buckets.append([])
                size = 0
            buckets[-1].append(p)
            size += p.numel()
        for bucket in buckets:
            if not bucket:
                continue
            flat = torch.cat([p.grad.detach().reshape(-1).to(device, torch.float32) if p.grad is not None
                              else torch.zeros(p.numel(), dtype=torch.float32, device=device) for p in bucket])
            dist.all_reduce(flat)
            flat /= self.world_size
            offset = 0
            for p in bucket:
                mean = flat[offset:offset + p.numel()].view_as(p).to(p.device, p.dtype)
                if p.grad is None:
                    p.grad = mean.clone()
                else:
                    p.grad.copy_(mean)
                offset += p.numel()

    def broadcast_parameters(self, params: Sequence[torch.Tensor]) -> None:
        """Copy rank 0's values into every rank's tensors, so all ranks start from the same weights."""
        if not self.distributed:
            return
        import torch.distributed as dist

        for p in params:
            buf = p.detach().to(self._comm_device()).clone()
            dist.broadcast(buf, src=0)
            with torch.no_grad():
                p.copy_(buf.to(p.device))

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (any picklable object)."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def on_main(self, fn: Callable[[], T], default: T | None = None) -> T | None:
        """Run ``fn`` on rank 0 only; its exception is raised on every rank, so no rank waits for a dead one.

        Returns fn's result on rank 0 and ``default`` elsewhere.
        """
        result, error = default, None
        if self.is_main:
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
                error = exc
        if error is not None:
            try:
                pickle.dumps(error)
            except Exception:  # noqa: BLE001 - an exception that cannot travel goes as its text
                error = RuntimeError(f"rank 0: {type(error).__name__}: {error}")
        error = self.broadcast(error)
        if error is not None:
            raise error
        return result

    def _comm_device(self) -> torch.device:
        """Where collective buffers live: the rank's GPU under NCCL, else the CPU (gloo)."""
        if self.device is not None and self.device.type == "cuda":
            return self.device
        return torch.device("cpu")


_GROUP: ProcessGroup | None = None


def launched_world_size() -> int:
    """The number of processes a launcher (accelerate / torchrun) started; 1 without one."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def process_group(device: str | torch.device = "auto") -> ProcessGroup:
    """The group this process belongs to, opened through Accelerate on first use (a single process needs none).

    ``device`` is the trainer's setting: "auto" takes this rank's GPU (``cuda:LOCAL_RANK``) when there is one,
    else the CPU with gloo.
    """
    global _GROUP
    if _GROUP is not None:
        return _GROUP
    if launched_world_size() <= 1:
        _GROUP = ProcessGroup()
        return _GROUP
    for var, engine in _SHARDING_ENGINES.items():
        if os.environ.get(var, "").lower() in ("1", "true", "yes"):
            raise ValueError(
                f"the Accelerate config asks for {engine}, which shards parameters; tokencredit's trainers keep "
                "the whole policy on every rank (they sample from it), so launch with a DDP config "
                "(`accelerate launch --multi_gpu ...`, see docs/distributed.md)"
            )
    try:
        from accelerate import PartialState
    except ImportError as exc:  # pragma: no cover - accelerate comes with peft, a dependency
        raise ImportError("multi-process runs need Hugging Face Accelerate: pip install accelerate") from exc
    wants_cpu = str(device) == "cpu" or (str(device) == "auto" and not torch.cuda.is_available())
    # cpu=True is what makes Accelerate open a gloo group for CPU processes that torchrun started; without
    # it Accelerate reports a single process even though torch.distributed is initialised.
    state = PartialState(cpu=wants_cpu)
    if state.num_processes != launched_world_size():
        raise RuntimeError(f"Accelerate opened {state.num_processes} process(es) but WORLD_SIZE is "
                           f"{launched_world_size()}; launch with `accelerate launch --multi_gpu ...`")
    if wants_cpu:
        run_device = torch.device("cpu")
    elif str(device) in ("auto", "cuda"):
        run_device = torch.device(state.device)  # this rank's own GPU, cuda:LOCAL_RANK
    else:
        run_device = torch.device(device)
    _GROUP = ProcessGroup(state.num_processes, state.process_index, state.local_process_index, run_device)
    return _GROUP


def is_main_process() -> bool:
    """Whether this process is rank 0 of a launched run, or runs alone (for what only one process may do)."""
    return os.environ.get("RANK", "0") == "0"


def rank_seed(seed: int, rank: int) -> int:
    """The sampling seed of one rank: rank 0 keeps ``seed``, so a single-process run is unchanged."""
    return seed + 1_000_003 * rank


def save_checkpoint_on_ranks(group: ProcessGroup, checkpoints: Any, step: int, write: Callable[[Path], None],
                             rank_state: Callable[[], dict]) -> Path:
    """One checkpoint of a (possibly multi-process) run: ``write(tmp)`` on rank 0, ``rank<R>_state.pt`` elsewhere.

    ``checkpoints`` is the run's :class:`tokencredit.runs.CheckpointManager`. Weights and optimiser state are
    the same on every rank, so rank 0 writes them; each other rank adds its own random streams before rank 0
    commits the folder. Returns the committed folder on every rank.
    """
    from tokencredit.runs import save_trainer_state

    tmp = Path(group.broadcast(str(group.on_main(lambda: checkpoints.begin(step)))))
    if not group.is_main:
        save_trainer_state(tmp / f"rank{group.rank}_state.pt", rank_state())
    group.barrier()

    def write_and_commit() -> Path:
        write(tmp)
        return checkpoints.commit(step)

    return Path(group.broadcast(str(group.on_main(write_and_commit))))


def resume_on_ranks(group: ProcessGroup, checkpoints: Any, resume: bool, run_dir: str | Path,
                    load: Callable[[Path], None]) -> Path | None:
    """Rank 0 picks the newest loadable checkpoint (setting damaged ones aside) and loads it; the others load it."""
    from tokencredit.runs import resume_newest_loadable

    picked = group.on_main(lambda: resume_newest_loadable(checkpoints, resume, run_dir, load))
    ckpt = group.broadcast(str(picked) if picked is not None else None)
    if ckpt is None:
        return None
    if not group.is_main:
        load(Path(ckpt))
    return Path(ckpt)


def rank_state_of(group: ProcessGroup, path: Path, main_state: dict) -> dict:
    """The state holding this rank's random streams in a checkpoint: rank 0's is the main trainer state."""
    if group.is_main:
        return main_state
    from tokencredit.runs import load_trainer_state

    return load_trainer_state(Path(path) / f"rank{group.rank}_state.pt")


def check_world_size(group: ProcessGroup, path: Path, saved: int) -> None:
    """Refuse to resume a checkpoint written by another number of processes (sampling streams are per rank)."""
    if saved != group.world_size:
        raise ValueError(f"checkpoint {path} was written by {saved} process(es), this run has {group.world_size}; "
                         "resume with the same number (each rank has its own sampling stream)")


def open_run(group: ProcessGroup, run_dir: Path, config: Any, resume: Callable[[], bool],
             start_fresh: Callable[[], None], step: Callable[[], int]) -> tuple[Callable[[], None], bool, Any]:
    """Claim the run folder, resume or start over, save config.yaml and open the metrics log, on rank 0.

    ``config`` has the run fields every trainer shares (resume, overwrite, allow_changed_settings,
    log_tensorboard, log_wandb, wandb_project); ``resume()`` loads the newest checkpoint on every rank and says
    whether there was one; ``step()`` is the step reached. Returns (what to call once this run has a checkpoint
    — it drops a replaced run —, whether the run resumed, the metrics logger: a no-op context on other ranks).
    A refusal on rank 0 (an occupied folder, changed settings) is raised on every rank.
    """
    from contextlib import nullcontext

    from tokencredit.config import claim_folder_for, config_to_dict, save_config
    from tokencredit.runs import MetricsLogger

    settings = config_to_dict(config)
    drop = group.on_main(lambda: claim_folder_for(config, run_dir), default=lambda: None)
    resumed = resume()
    if not resumed:
        group.on_main(start_fresh)
    logger: Any = nullcontext()
    if group.is_main:
        save_config(config, run_dir / "config.yaml")
        logger = MetricsLogger(run_dir, tensorboard=config.log_tensorboard, wandb=getattr(config, "log_wandb", False),
                               wandb_project=getattr(config, "wandb_project", None), config=settings,
                               resume_from_step=step())
    group.barrier()  # no rank reads the folder before rank 0 has set it up
    return (lambda: group.on_main(drop)), resumed, logger
