"""Run folders that survive a crash: atomic files, checkpoints, RNG state and metrics.

A run folder looks like::

    run_dir/
        config.yaml
        metrics.jsonl                   one JSON object per logged step
        checkpoints/step-00000012/...   complete checkpoints, newest keep_last kept
        checkpoints/latest              name of the newest complete checkpoint
        tensorboard/                    optional
        wandb_id.txt                    only when wandb is used

Every file is either written atomically (temp file + fsync + rename) or appended one fsynced line at a time,
so a ``kill -9`` at any moment leaves a folder that a resumed run can read.

A run folder is a jail: a run refuses a folder holding symbolic links (tokencredit never makes one, so a link was
planted, and writing through it would reach files outside the folder), appends only to files it can open without
following a link, and removes links rather than what they point to. One process writes a run folder at a time:
claiming it takes an advisory lock on ``run_dir/.lock`` that the kernel drops when the process ends, however
it ends.

torch and numpy are imported inside the functions that need them, so that loading a config (which uses
``atomic_write_text``) does not pay for importing torch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

METRICS_FILE = "metrics.jsonl"
LATEST_FILE = "latest"
WANDB_ID_FILE = "wandb_id.txt"

_STEP_DIR = re.compile(r"step-(\d+)")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that readers see either the old or the new content, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory as the target: os.replace is only atomic within one filesystem.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes files private; these are ordinary output files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Replace ``path`` with ``obj`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _fsync_dir(path: str | Path) -> None:
    # A rename is durable only once its directory is synced; some platforms cannot open directories.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(dirpath)


def remove_path(path: str | Path) -> None:
    """Delete ``path`` whatever it is, never following a symbolic link: a link is unlinked, not its target."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path)  # rmtree itself unlinks the links it meets inside and refuses a top-level one
    else:
        path.unlink()


def find_links(root: str | Path, limit: int = 5) -> list[Path]:
    """Up to ``limit`` symbolic links inside ``root`` (``root`` itself may be one: the user named it)."""
    found: list[Path] = []
    if not os.path.isdir(root):
        return found
    for dirpath, dirnames, filenames in os.walk(root):  # os.walk lists linked folders but never enters them
        for name in [*dirnames, *filenames]:
            full = Path(dirpath, name)
            if full.is_symlink():
                found.append(full)
                if len(found) >= limit:
                    return found
    return found


def refuse_links(run_dir: str | Path) -> None:
    """Raise :class:`RunFolderError` when ``run_dir`` holds a symbolic link anywhere inside it.

    tokencredit never writes a link into a run folder, so one there was planted; a run that wrote, moved or
    deleted through it would act on files outside the folder.
    """
    links = find_links(run_dir)
    if links:
        shown = "; ".join(f"{p.relative_to(run_dir)} -> {_link_target(p)}" for p in links)
        raise RunFolderError(
            f"{run_dir} holds symbolic links ({shown}{' ...' if len(links) >= 5 else ''}). tokencredit never "
            "writes links into a run folder and will not write through one (it could reach files outside the "
            "folder): remove them, or choose another folder")


def _link_target(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def open_append(path: str | Path) -> Any:
    """Open ``path`` for appending text without following a link, and on a file no other name shares.

    A hard link would make an append land in a file outside the run folder too, so a file with more than one
    name is first replaced by a copy of its own (atomically).
    """
    path = Path(path)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if path.is_symlink():
            raise RunFolderError(f"{path} is a symbolic link; tokencredit does not write through links") from exc
        raise
    if os.fstat(fd).st_nlink > 1:
        os.close(fd)
        atomic_write_text(path, path.read_text(encoding="utf-8", errors="replace"))
        fd = os.open(path, flags, 0o644)
    return os.fdopen(fd, "a", encoding="utf-8")


class RunFolderError(ValueError):
    """A run would mix with another run's files, or resume one with different settings."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the folder and why."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint with a missing, truncated or unreadable file; resuming may fall back to an older one."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holding objects other than tensors and plain data: refused, never unpickled."""


def save_trainer_state(path: str | Path, state: dict) -> None:
    """Write trainer state (tensors, numbers, strings, lists, tuples, dicts) for :func:`load_trainer_state`."""
    import torch

    torch.save(state, path)


def load_trainer_state(path: str | Path) -> dict:
    """Read a file from :func:`save_trainer_state` with the weights-only unpickler: it cannot run code.

    A file that names any Python object to build (a class, a function) is refused with
    :class:`UnsafeCheckpointError`; a missing, truncated or garbled one raises :class:`DamagedCheckpointError`.
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise DamagedCheckpointError(f"{path} is missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _unpickler_reason(str(exc))
        # The weights-only unpickler names the global it blocked; any other refusal is a garbled stream.
        if "GLOBAL" in reason:
            raise UnsafeCheckpointError(
                f"refusing to load {path}: it asks to build Python objects, not only tensors and plain data "
                f"({reason}). tokencredit never writes such a file; it was changed by someone or written by "
                "another program (or by tokencredit < 0.2, whose RNG state held numpy arrays). Loading it could "
                "run code, so it was not unpickled. Delete the checkpoint (or the run folder) to start over."
            ) from exc
        raise DamagedCheckpointError(f"{path} is damaged: {reason}") from exc
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise DamagedCheckpointError(f"{path} is damaged or truncated: {exc}") from exc
    if not isinstance(state, dict):
        raise DamagedCheckpointError(f"{path} holds a {type(state).__name__}, not trainer state")
    bad = _first_non_finite(state)
    if bad is not None:
        raise DamagedCheckpointError(f"{path} holds non-finite values ({bad}): resuming from it would train NaN")
    return state


def _first_non_finite(obj: Any, where: str = "") -> str | None:
    """The path of the first floating tensor in ``obj`` (nested dicts, lists, tuples) with a NaN or inf."""
    import torch

    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
            return where or "a tensor"
        return None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        found = _first_non_finite(value, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


def check_checkpoint_finite(path: str | Path) -> None:
    """Raise :class:`DamagedCheckpointError` when a weight file of checkpoint ``path`` holds a NaN or inf.

    A weight file overwritten with NaN bytes of the same size loads without complaint; training from it would
    skip every update and save a NaN model. Tensors are read one at a time, so memory stays at one tensor.
    """
    import torch
    from safetensors import safe_open

    path = Path(path)
    for file in sorted(path.rglob("*.safetensors")):
        if file.is_symlink():
            continue  # not ours, and a link is never read: refuse_links names it when the run is claimed
        with reading_checkpoint(path, file.relative_to(path).as_posix()):
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    tensor = f.get_tensor(name)
                    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                        raise DamagedCheckpointError(
                            f"{file} holds non-finite weights ({name} has NaN or inf): a damaged or diverged "
                            "checkpoint")


def _unpickler_reason(message: str) -> str:
    """The line of torch's weights-only refusal that says what was refused (the rest is boilerplate)."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation", "Re-running",
                   "In PyTorch")
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(boilerplate)]
    return useful[-1] if useful else (lines[0] if lines else "unreadable")


@contextlib.contextmanager
def reading_checkpoint(path: str | Path, what: str) -> Iterator[None]:
    """Turn any failure to read ``what`` from checkpoint ``path`` into a :class:`DamagedCheckpointError`."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors, transformers and torch each raise their own types for a bad file
        raise DamagedCheckpointError(f"{path}: {what} could not be read ({type(exc).__name__}: {exc})") from exc


def checkpoint_to_resume(checkpoints: CheckpointManager, resume: bool, run_dir: str | Path) -> Path | None:
    """The newest checkpoint when ``resume`` is set, else None (warning when resume finds none)."""
    if not resume:
        return None
    ckpt = checkpoints.latest()
    if ckpt is None:
        logging.getLogger("tokencredit").warning("resume=true but %s has no checkpoint; starting from scratch", run_dir)
    return ckpt


def resume_newest_loadable(
    checkpoints: CheckpointManager, resume: bool, run_dir: str | Path, load: Callable[[Path], None]
) -> Path | None:
    """Call ``load`` on the newest checkpoint that loads and return it (None: not resuming, or none saved).

    A damaged checkpoint is moved aside to ``checkpoints/damaged-step-N`` with one warning and the next older
    one is tried; an unsafe one (:class:`UnsafeCheckpointError`) stops the run, since someone changed the
    folder. ``load`` must overwrite all trainer state, so a half-applied damaged checkpoint leaves no trace.
    """
    if checkpoints.latest() is None:
        return checkpoint_to_resume(checkpoints, resume, run_dir)  # warns when resume finds nothing
    if not resume:
        return None
    logger = logging.getLogger("tokencredit")
    candidates = checkpoints.candidates()
    for ckpt in candidates:
        try:
            check_checkpoint_finite(ckpt)
            load(ckpt)
        except DamagedCheckpointError as exc:
            aside = checkpoints.set_aside(ckpt)
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            logger.warning("could not resume from %s (%s); moved it to %s and trying the one before", ckpt.name,
                           reason, aside.name)
            continue
        return ckpt
    raise DamagedCheckpointError(
        f"none of the {len(candidates)} checkpoints in {checkpoints.dir} could be loaded (moved to damaged-*); "
        "resume=false starts the run over"
    )


class CheckpointManager:
    """Numbered checkpoint folders under ``run_dir/checkpoints``; a crash never breaks the latest one.

    Usage: ``tmp = manager.begin(step)``, write files into ``tmp``, then ``manager.commit(step)``.
    """

    def __init__(self, run_dir: str | Path, keep_last: int = 2) -> None:
        """Manage checkpoints of ``run_dir``, keeping the newest ``keep_last`` complete ones."""
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {keep_last}")
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        self.keep_last = keep_last

    def begin(self, step: int) -> Path:
        """Return a fresh, empty temp folder to write the checkpoint of ``step`` into."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        tmp = self._temp_dir(step)
        remove_path(tmp)  # left by a crash in an earlier attempt at this step
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, step: int) -> Path:
        """Make the folder from ``begin(step)`` the latest checkpoint, prune old ones, and return it."""
        tmp = self._temp_dir(step)
        if not tmp.is_dir():
            raise FileNotFoundError(
                f"{tmp} does not exist: call begin({step}) and write the checkpoint first"
            )
        _fsync_tree(tmp)
        final = self.dir / f"step-{step:08d}"
        if final.exists():
            # Saving a step again (e.g. after resuming from it): set the old copy aside rather than delete it
            # before the new one is in place; pruning removes it below.
            aside = self.dir / f".tmp-old-{final.name}"
            remove_path(aside)
            os.rename(final, aside)
        os.rename(tmp, final)
        _fsync_dir(self.dir)
        atomic_write_text(self.dir / LATEST_FILE, final.name + "\n")
        self._prune(step)
        return final

    def latest(self) -> Path | None:
        """Return the newest complete checkpoint folder, or None when there is none."""
        try:
            name = (self.dir / LATEST_FILE).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            name = ""
        if _STEP_DIR.fullmatch(name) and (self.dir / name).is_dir() and not (self.dir / name).is_symlink():
            return self.dir / name
        # `latest` missing or damaged: the folders can be trusted, as only commit() names them step-*.
        complete = self._complete()
        return complete[-1] if complete else None

    def candidates(self) -> list[Path]:
        """Complete checkpoints to resume from, newest first (the one `latest` names leads)."""
        found = self._complete()[::-1]
        latest = self.latest()
        if latest is not None and latest in found:
            found.remove(latest)
            found.insert(0, latest)
        return found

    def set_aside(self, path: Path) -> Path:
        """Rename a checkpoint that failed to load to ``damaged-<name>`` (kept for inspection, never resumed)."""
        aside = self.dir / f"damaged-{path.name}"
        n = 1
        while aside.exists():
            n += 1
            aside = self.dir / f"damaged-{path.name}.{n}"
        os.rename(path, aside)
        _fsync_dir(self.dir)
        return aside

    @staticmethod
    def step_of(path: Path) -> int:
        """Return the step number of a checkpoint folder such as ``checkpoints/step-00000012``."""
        match = _STEP_DIR.fullmatch(Path(path).name)
        if match is None:
            raise ValueError(f"{path} is not a checkpoint folder (expected a name like step-00000012)")
        return int(match.group(1))

    def _temp_dir(self, step: int) -> Path:
        return self.dir / f".tmp-step-{step:08d}"

    def _complete(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        # A link named like a checkpoint is not one of ours: never resumed from, pruned or followed.
        found = [p for p in self.dir.iterdir()
                 if _STEP_DIR.fullmatch(p.name) and not p.is_symlink() and p.is_dir()]
        return sorted(found, key=self.step_of)

    def _prune(self, step: int) -> None:
        # Only checkpoints older than the one just committed: newer ones belong to a timeline the caller
        # abandoned by resuming from an earlier step, and deleting them is not this call's decision.
        older = [p for p in self._complete() if self.step_of(p) < step]
        for path in older[: max(0, len(older) - (self.keep_last - 1))]:
            remove_path(path)
        for path in self.dir.glob(".tmp-*"):
            remove_path(path)


def capture_rng_state() -> dict:
    """Return the state of Python's, numpy's and torch's (CPU and CUDA) random generators.

    Only tensors, numbers and tuples, so that :func:`load_trainer_state` reads it back with the weights-only
    unpickler: numpy's key array is stored as a tensor.
    """
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Put back the random generator state returned by ``capture_rng_state``."""
    import numpy as np
    import torch

    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "torch_cuda" in state and torch.cuda.is_available():
        # Resuming on fewer GPUs than were saved: restore those that exist rather than fail.
        cuda_states = state["torch_cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda_states)


class MetricsLogger:
    """Log metrics to ``metrics.jsonl`` (always), TensorBoard (when installed) and wandb (when asked).

    Non-finite floats (NaN, inf) are written to ``metrics.jsonl`` as ``null``: JSON has no NaN, and strict
    readers (jq, JavaScript) must still parse the file. TensorBoard and wandb get the raw value.

    With ``resume_from_step=k`` the lines after step ``k`` (and a torn last line) are dropped first, because
    the resumed run redoes those steps; the file then holds exactly one line per step. TensorBoard events
    after ``k`` are purged likewise. wandb ignores steps it has already seen, so after a resume it shows the
    crashed run's values for the redone steps.
    """

    def __init__(
        self,
        run_dir: str | Path,
        tensorboard: bool = True,
        wandb: bool = False,
        wandb_project: str | None = None,
        config: dict | None = None,
        resume_from_step: int | None = None,
    ) -> None:
        """Open the metrics of ``run_dir``; see the class docstring for what ``resume_from_step`` does."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        # wandb first: it is the one that can refuse, and then nothing else has been opened or rewritten.
        self._wandb_run = _start_wandb(self.run_dir, wandb_project, config) if wandb else None
        _repair_metrics(self.path, resume_from_step)
        self._tensorboard = (
            _open_tensorboard(self.run_dir / "tensorboard", resume_from_step) if tensorboard else None
        )
        self._file = open_append(self.path)  # kept open: one fsynced append per log()

    def log(self, step: int, metrics: dict[str, float | int | str | bool | None]) -> None:
        """Write one line for ``step``; it is on disk when this returns."""
        if "step" in metrics:
            raise ValueError("'step' is reserved for the step number; pass it as the step argument")
        record: dict[str, Any] = {"step": int(step)}
        numeric: dict[str, float] = {}
        for key, value in metrics.items():
            value = _scalar(key, value)
            finite = not (isinstance(value, float) and not math.isfinite(value))
            record[key] = value if finite else None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                numeric[key] = value
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._tensorboard is not None:
            for key, value in numeric.items():
                self._tensorboard.add_scalar(key, value, int(step))
        if self._wandb_run is not None:
            self._wandb_run.log(numeric, step=int(step))

    def close(self) -> None:
        """Flush and close every sink; calling it twice is harmless."""
        if not self._file.closed:
            self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> MetricsLogger:
        """Return the logger itself."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the logger."""
        self.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Return the records of ``run_dir/metrics.jsonl`` in order, skipping a torn (unfinished) last line."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    records = []
    # The piece after the last newline is "" for a clean file, or a line that was being written.
    for number, line in enumerate(lines[:-1], start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number} is not valid JSON: {exc}") from exc
    return records


def _scalar(key: str, value: Any) -> float | int | str | bool | None:
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()  # numpy scalars and one-element tensors, which training code hands over freely
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"metric {key!r} must be a number, string, bool or None, got {type(value).__name__}")


def _parse_record(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    if not isinstance(step, int) or isinstance(step, bool):
        return None
    return record


def _repair_metrics(path: Path, resume_from_step: int | None) -> None:
    """Keep only complete, parseable lines (and, when resuming, those with step <= resume_from_step).

    A line that is not a metrics record (edited by hand, a disk error) is moved to ``metrics.jsonl.rejected``
    with a warning naming its line numbers; only a torn last line, which a crash mid-write leaves, goes quietly.
    """
    if path.is_symlink():
        raise RunFolderError(f"{path} is a symbolic link; tokencredit does not read or write run files through links")
    if not path.exists():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    kept, rejected = [], []
    for number, line in enumerate(text.split("\n")[:-1], start=1):  # after the last newline: empty or torn
        record = _parse_record(line)
        if record is None:
            if line.strip():
                rejected.append((number, line))
            continue
        if resume_from_step is not None and record["step"] > resume_from_step:
            continue
        kept.append(line + "\n")
    if rejected:
        with open_append(path.with_name(path.name + ".rejected")) as f:
            f.writelines(f"{line}\n" for _, line in rejected)
        numbers = ", ".join(str(n) for n, _ in rejected[:10]) + (" ..." if len(rejected) > 10 else "")
        logging.getLogger("tokencredit").warning(
            "%s: %d line(s) are not metrics records (line %s); moved to %s.rejected", path, len(rejected),
            numbers, path.name)
    new_text = "".join(kept)
    # Even without a resume a torn last line must go: the next line would be appended onto it.
    if new_text != text:
        atomic_write_text(path, new_text)


_TENSORBOARD_NOTED = False


def _open_tensorboard(log_dir: Path, resume_from_step: int | None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        # tensorboard is an optional extra: say so once per process, quietly, rather than warn on every run.
        global _TENSORBOARD_NOTED
        if not _TENSORBOARD_NOTED:
            logging.getLogger("tokencredit").info(
                "tensorboard is not installed (pip install 'tokencredit[tensorboard]'); metrics go to metrics.jsonl")
            _TENSORBOARD_NOTED = True
        return None
    purge_step = None if resume_from_step is None else resume_from_step + 1
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def _start_wandb(run_dir: Path, project: str | None, config: dict | None) -> Any:
    try:
        import wandb
    except ImportError as exc:
        raise ImportError(
            "wandb logging was requested but wandb is not installed: run `pip install wandb` "
            "(or `pip install 'tokencredit[wandb]'`), or turn wandb off"
        ) from exc
    id_path = run_dir / WANDB_ID_FILE
    run_id = id_path.read_text(encoding="utf-8").strip() if id_path.exists() else ""
    if not run_id:
        # Stored so that every resume of this folder continues the same wandb run, not a new one.
        run_id = uuid.uuid4().hex[:16]
        atomic_write_text(id_path, run_id + "\n")
    return wandb.init(project=project, config=config, dir=str(run_dir), resume="allow", id=run_id)


def start_fresh(run_dir: str | Path, checkpoints: CheckpointManager, extra: Sequence[str] = ()) -> None:
    """Clear an earlier run's checkpoints and metrics (and the folders named in ``extra``) so that a run that
    found nothing to resume writes only files of its own."""
    run_dir = Path(run_dir)
    if checkpoints.latest() is not None or (run_dir / "metrics.jsonl").exists():
        logging.getLogger("tokencredit").warning("%s: no checkpoint to resume from; starting this run over", run_dir)
        for name in ("checkpoints", *extra, METRICS_FILE):
            remove_path(run_dir / name)
    run_dir.mkdir(parents=True, exist_ok=True)
