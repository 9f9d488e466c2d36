"""A persistent cache of judge answers keyed by the full request, so an interrupted labelling job resumes.

One SQLite file (stdlib, atomic commits, safe across threads and processes). Each answer is committed the moment
it arrives; a job killed mid-way loses at most the requests in flight, and a rerun asks only for what is not
stored. The key is the SHA-256 of the canonical JSON of everything that can change the answer: the backend's
identity (kind, base URL, model) and the request (messages, sampling settings, log-probability settings).

Only answers that arrived whole and parsed as a chat completion are stored; refused requests never are. An
answer that parsed but that a labeler could not read is stored like any other; re-asking it (``delete`` then a
fresh ``put``) keeps the same key, so the cache stays a pure function of the request.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path


def request_key(identity: dict, request: dict) -> str:
    """SHA-256 hex of the canonical JSON of (backend identity, request)."""
    blob = json.dumps({"backend": identity, "request": request}, sort_keys=True, ensure_ascii=False,
                      separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class JudgeCache:
    """Answers stored by request key in a SQLite file (``path``), or in memory for ``":memory:"``."""

    def __init__(self, path: str | Path) -> None:
        """Open (and create when missing) the cache file."""
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # One connection shared by the backend's worker threads, serialised by the lock.
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=60)
        with self._lock, self._db:
            if self.path != ":memory:":
                self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, request TEXT NOT NULL, "
                             "response TEXT NOT NULL, created REAL NOT NULL)")

    def get(self, key: str) -> dict | None:
        """The stored response of a key, or None."""
        with self._lock:
            row = self._db.execute("SELECT response FROM answers WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, request: dict, response: dict) -> None:
        """Store a response (committed at once); a key already stored keeps its first answer."""
        with self._lock, self._db:
            self._db.execute("INSERT OR IGNORE INTO answers VALUES (?, ?, ?, ?)",
                             (key, json.dumps(request, sort_keys=True), json.dumps(response), time.time()))

    def delete(self, key: str) -> None:
        """Forget a key's answer (committed at once), so the next put stores a fresh one under the same key."""
        with self._lock, self._db:
            self._db.execute("DELETE FROM answers WHERE key = ?", (key,))

    def __len__(self) -> int:
        """Number of stored answers."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._db.close()
