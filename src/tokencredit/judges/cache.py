"""A persistent cache of judge answers keyed by the full request, so an interrupted labelling job resumes.

One SQLite file (stdlib, atomic commits, safe across threads and processes). Each answer is committed the moment
it arrives; a job killed mid-way loses at most the requests in flight, and a rerun asks only for what is not
stored. The key is the SHA-256 of the canonical JSON of everything that can change the answer: the backend's
identity (kind, base URL, model) and the request (messages, sampling settings, log-probability settings).

Only answers that arrived whole and parsed as a chat completion are stored; refused requests never are. An
answer that parsed but that a labeler could not read is stored like any other; re-asking it (``delete`` then a
fresh ``put``) keeps the same key, so the cache stays a pure function of the request.

A file that is not a judge cache (not SQLite, another program's database, a folder) is a :class:`CacheError`
naming the file, never a traceback. A single row that cannot be read back is :class:`MalformedEntry` from
:meth:`JudgeCache.get`; the backend treats it as a miss, warns, and asks again, so one damaged row never ends a
long job.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tokencredit.judges.errors import JudgeError

_COLUMNS = ("key", "request", "response", "created")


class CacheError(JudgeError):
    """The cache file cannot be used: it is not a SQLite judge cache, or it cannot be opened, read or written."""


class MalformedEntry(ValueError):
    """A stored answer that is not a JSON object (a damaged row); the caller treats it as a miss."""


def request_key(identity: dict, request: dict) -> str:
    """SHA-256 hex of the canonical JSON of (backend identity, request)."""
    blob = json.dumps({"backend": identity, "request": request}, sort_keys=True, ensure_ascii=False,
                      separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class JudgeCache:
    """Answers stored by request key in a SQLite file (``path``), or in memory for ``":memory:"``."""

    def __init__(self, path: str | Path) -> None:
        """Open (and create when missing) the cache file; CacheError if it is not a judge cache."""
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            # One connection shared by the backend's worker threads, serialised by the lock.
            self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=60)
        except sqlite3.Error as exc:
            raise self._error(exc) from exc
        try:
            with self._guard(), self._db:
                if self.path != ":memory:":
                    self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, request TEXT NOT NULL, "
                                 "response TEXT NOT NULL, created REAL NOT NULL)")
                columns = [row[1] for row in self._db.execute("PRAGMA table_info(answers)")]
        except CacheError:
            self._db.close()
            raise
        if tuple(columns) != _COLUMNS:
            self._db.close()
            # Writing our rows into someone else's table would damage their data as well as ours.
            raise CacheError(f"judge cache {self.path} is a SQLite database whose 'answers' table is not a judge "
                             f"cache's (columns {columns}, expected {list(_COLUMNS)}): delete or move it, or set "
                             "cache= to another path")

    def _error(self, exc: sqlite3.Error) -> CacheError:
        """A CacheError naming the file, what SQLite said, and what to do about it."""
        text = str(exc)
        if "locked" in text or "busy" in text:
            advice = "another job is probably writing to it: wait for that job, or set cache= to another path"
        elif "disk is full" in text:
            advice = "free some disk space, or set cache= to a path on another disk"
        elif "readonly" in text or "read-only" in text:
            advice = "make it writable, or delete or move it, or set cache= to another path"
        elif isinstance(exc, sqlite3.OperationalError) and "unable to open" in text:
            advice = ("it may be a folder or in a folder you cannot write: delete or move it, or set cache= to "
                      "another path")
        elif isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
            # "file is not a database", "database disk image is malformed": nothing in it can be trusted.
            return CacheError(f"judge cache {self.path} is not a SQLite database or is damaged ({text}): delete or "
                              "move it; the next run starts a fresh cache and asks again for what it held")
        else:
            advice = "delete or move it, or set cache= to another path"
        return CacheError(f"judge cache {self.path}: {text}; {advice}")

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """Hold the lock, and turn any SQLite error inside into a CacheError naming the file."""
        with self._lock:
            try:
                yield
            except sqlite3.Error as exc:
                raise self._error(exc) from exc

    def get(self, key: str) -> dict | None:
        """The stored response of a key, or None; MalformedEntry when the stored text is not a JSON object."""
        with self._guard():
            row = self._db.execute("SELECT response FROM answers WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        try:
            value = json.loads(row[0])
        except (TypeError, ValueError, RecursionError) as exc:
            raise MalformedEntry(f"not JSON ({exc})") from exc
        if not isinstance(value, dict):
            raise MalformedEntry(f"a JSON {type(value).__name__}, not an object")
        return value

    def put(self, key: str, request: dict, response: dict) -> None:
        """Store a response (committed at once); a key already stored keeps its first answer."""
        with self._guard(), self._db:
            self._db.execute("INSERT OR IGNORE INTO answers VALUES (?, ?, ?, ?)",
                             (key, json.dumps(request, sort_keys=True), json.dumps(response), time.time()))

    def delete(self, key: str) -> None:
        """Forget a key's answer (committed at once), so the next put stores a fresh one under the same key."""
        with self._guard(), self._db:
            self._db.execute("DELETE FROM answers WHERE key = ?", (key,))

    def __len__(self) -> int:
        """Number of stored answers."""
        with self._guard():
            return self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._db.close()
