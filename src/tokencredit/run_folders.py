"""Who owns a run folder: a lock held while a run writes it, and the claim that decides whether a run may use a
folder (a new one, its own earlier run to resume, or another run only when told to replace it)."""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from tokencredit.runs import RunFolderError, refuse_links

_T = TypeVar("_T")

# ---------------------------------------------------------------------- who owns a run folder
# Settings a resumed run may change without being a different experiment: how long it goes on, how it is saved,
# logged and shown, where it runs.
RESUMABLE_CHANGES = frozenset({
    "resume", "overwrite", "allow_changed_settings", "num_updates", "num_steps", "num_epochs", "max_steps",
    "save_every", "keep_checkpoints", "progress", "log_tensorboard", "log_wandb", "wandb_project", "device",
    "max_loops", "patience", "min_delta",  # SER's stop rule: when the loops end, not what each loop learns
})
_RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints", "policy", "summary.json")


def holds_run(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds (part of) a run: its settings, metrics, checkpoints or results."""
    run_dir = Path(run_dir)
    return any((run_dir / name).exists() for name in _RUN_MARKERS)


def changed_settings(saved: dict, new: dict, prefix: str = "", defaults: dict | None = None) -> list[str]:
    """``key: old -> new`` for every setting that differs (nested sections as ``section.key``), except those
    in :data:`RESUMABLE_CHANGES` and, given ``defaults``, a key the saved run lacks whose new value is its default
    (a setting added by a later version of tokencredit, left as it was)."""
    out = []
    defaults = defaults or {}
    for key in sorted(set(saved) | set(new)):
        if key in RESUMABLE_CHANGES:
            continue
        old, now = saved.get(key), new.get(key)
        if key not in saved and key in defaults and now == defaults[key]:
            continue
        if isinstance(old, dict) and isinstance(now, dict):
            sub = defaults.get(key)
            out += changed_settings(old, now, prefix=f"{prefix}{key}.", defaults=sub if isinstance(sub, dict) else None)
        elif old != now:
            out.append(f"{prefix}{key}: {old!r} -> {now!r}")
    return out


class RunFolderBusyError(RunFolderError):
    """Another live process holds the run folder's lock: two writers would interleave their steps."""


LOCK_FILE = ".lock"
# Locks this process holds, by the folder's real path: a process may claim a folder again (a trainer built twice
# in one script, a recipe's stages) without locking itself out.
_HELD_LOCKS: dict[str, int] = {}


def lock_run_folder(run_dir: str | Path) -> None:
    """Take ``run_dir``'s writer lock for this process, or raise :class:`RunFolderBusyError` naming the holder.

    The lock is ``flock`` on ``run_dir/.lock``: the kernel releases it when the holding process exits, so a run
    killed with ``kill -9`` never leaves it stuck. Held until :func:`release_run_folder` or the process ends.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(run_dir)
    if key in _HELD_LOCKS:
        return
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no advisory locks to take
        logging.getLogger("tokencredit").warning("no file locks on this platform: nothing stops a second process "
                                                 "from writing %s at the same time", run_dir)
        return
    path = run_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as exc:
        if path.is_symlink():
            raise RunFolderError(f"{path} is a symbolic link; tokencredit does not write through links") from exc
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise RunFolderBusyError(
            f"{run_dir} is being written by another process ({holder}). One process writes a run folder at a "
            "time: wait for it to finish or stop it (its lock goes with it), or choose another folder") from None
    except OSError as exc:  # a filesystem without flock (some network mounts): go on, unlocked, and say so
        logging.getLogger("tokencredit").warning("cannot lock %s (%s): nothing stops a second process from writing "
                                                 "it at the same time", path, exc)
        _HELD_LOCKS[key] = fd
        return
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode() + b"\n")
    _HELD_LOCKS[key] = fd


def _read_holder(fd: int) -> str:
    """Who holds a lock, as its lock file says (the file is only a hint; the lock itself is the kernel's)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {int(info['pid'])} on {info.get('host', '?')}, since {info.get('since', '?')}"
    except (OSError, ValueError, KeyError, TypeError):
        return "pid unknown"


def release_run_folder(run_dir: str | Path) -> None:
    """Drop this process's writer lock on ``run_dir`` (a no-op when it holds none).

    The lock file stays: removing it would let a process that opened it just before lock a file no one else sees.
    """
    fd = _HELD_LOCKS.pop(os.path.realpath(run_dir), None)
    if fd is not None:
        os.close(fd)  # closing the last descriptor of the open file drops the flock


def releases_run_folders(func: Callable[..., _T]) -> Callable[..., _T]:
    """Decorate a run's entry point: the run-folder locks it takes are dropped when it returns or raises.

    Locks held before the call stay held, so a recipe's own folder outlives the trainers it runs inside it.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> _T:
        before = set(_HELD_LOCKS)
        try:
            return func(*args, **kwargs)
        finally:
            for key in set(_HELD_LOCKS) - before:
                os.close(_HELD_LOCKS.pop(key))

    return wrapper


def holds_lock(run_dir: str | Path) -> bool:
    """Whether this process holds ``run_dir``'s writer lock."""
    return os.path.realpath(run_dir) in _HELD_LOCKS


def claim_run_folder(run_dir: str | Path, settings: dict, resume: bool, overwrite: bool = False,
                     allow_changed_settings: bool = False, defaults: dict | None = None) -> Callable[[], None]:
    """Make ``run_dir`` this run's alone, before anything is written; returns what to call after the new run's
    first checkpoint (it deletes a replaced run).

    - ``resume``: the folder's saved ``config.yaml`` must match ``settings`` except :data:`RESUMABLE_CHANGES`,
      unless ``allow_changed_settings`` (a :class:`RunFolderError` names the fields otherwise); a setting the
      saved run does not have at all passes when its new value is its entry in ``defaults``.
    - a fresh run into a folder that holds a run: refused unless ``overwrite``; then the old run is moved aside to
      ``<name>.replaced-<time>`` and deleted only once the new run has a checkpoint, so a crash before that
      loses nothing.
    """
    run_dir = Path(run_dir)
    # Links first, before the lock file is made (the lock is a write too); a run that overwrites moves the whole
    # folder aside, links and all, and writes into a new one.
    if resume or not (overwrite and holds_run(run_dir)):
        refuse_links(run_dir)
    newly_locked = not holds_lock(run_dir)
    lock_run_folder(run_dir)
    try:
        return _claim_locked(run_dir, settings, resume, overwrite, allow_changed_settings, defaults)
    except BaseException:
        if newly_locked:  # a refused run leaves the folder as free as it found it
            release_run_folder(run_dir)
        raise


def _claim_locked(run_dir: Path, settings: dict, resume: bool, overwrite: bool, allow_changed_settings: bool,
                  defaults: dict | None) -> Callable[[], None]:
    """claim_run_folder's decision, taken while holding the folder's lock."""
    if resume:
        saved_path = run_dir / "config.yaml"
        if saved_path.exists() and not allow_changed_settings:
            import yaml

            try:
                saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
                raise RunFolderError(f"{saved_path} cannot be read ({exc}); resume needs the run's settings to "
                                     "check them (allow_changed_settings=true skips the check)") from exc
            changed = changed_settings(saved, settings, defaults=defaults)
            if changed:
                raise RunFolderError(
                    f"resume=true, but these settings differ from the run in {run_dir}: {'; '.join(changed)}. "
                    "Resume with the run's settings, choose another folder, or pass allow_changed_settings=true "
                    "to continue with the new ones")
        return lambda: None
    if not holds_run(run_dir):
        return lambda: None
    if not overwrite:
        raise RunFolderError(
            f"{run_dir} already holds a run. Pass resume=true to continue it, overwrite=true to replace it (the "
            "old run is kept aside until the new one writes its first checkpoint), or choose another folder")
    aside = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")
    # The lock travels with the renamed folder until the new one is locked: no other process can slip in between.
    os.rename(run_dir, aside)
    run_dir.mkdir(parents=True)
    old_lock = _HELD_LOCKS.pop(os.path.realpath(run_dir), None)
    lock_run_folder(run_dir)
    if old_lock is not None:
        os.close(old_lock)
    logging.getLogger("tokencredit").warning("overwrite=true: the earlier run in %s is kept in %s until this run "
                                             "writes its first checkpoint", run_dir, aside)

    def drop_replaced() -> None:
        shutil.rmtree(aside, ignore_errors=True)

    return drop_replaced


