"""A persistent cache of model calls in one SQLite file.

The key is a hash of everything that can change an answer: the backend's identity (kind, model, model
file hash or base URL), the operation, the full messages and every sampling parameter, including the
sample index, so n samples of one prompt stay n distinct entries and a temperature change is a miss.
The cache only saves model calls; a run's progress lives in its run directory, so clearing the cache
never breaks a resume.

Concurrency: WAL journal plus a busy timeout, so several processes (parallel runs, a resumed run next
to `picaco cache info`) can read and write at once; writes are single statements and idempotent.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from picaco import paths

_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    key     TEXT PRIMARY KEY,
    op      TEXT NOT NULL,
    model   TEXT NOT NULL,
    value   TEXT NOT NULL,
    created REAL NOT NULL
)
"""


def cache_key(identity: dict, op: str, payload: dict) -> str:
    """A stable hash of a call; dict key order and float formatting cannot change it."""
    blob = json.dumps(
        {"identity": identity, "op": op, "payload": payload},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CacheInfo:
    path: Path
    entries: int
    bytes: int
    by_model: dict[str, int]
    by_op: dict[str, int]


class CallCache:
    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path is not None else paths.calls_db_path()
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path, timeout=60.0, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=60000")
            conn.execute(_SCHEMA)
            self._conn = conn
        return self._conn

    def get(self, key: str) -> dict | None:
        with self._lock:
            row = self._connect().execute("SELECT value FROM calls WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        try:
            return json.loads(row[0])
        except json.JSONDecodeError:  # a damaged row is a miss, never an error
            return None

    def put(self, key: str, op: str, model: str, value: dict) -> None:
        blob = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        with self._lock:
            self._connect().execute(
                "INSERT OR REPLACE INTO calls (key, op, model, value, created) VALUES (?, ?, ?, ?, ?)",
                (key, op, model, blob, time.time()),
            )

    def info(self) -> CacheInfo:
        if not self.path.exists():
            return CacheInfo(self.path, 0, 0, {}, {})
        with self._lock:
            conn = self._connect()
            entries = conn.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
            by_model = dict(conn.execute("SELECT model, COUNT(*) FROM calls GROUP BY model").fetchall())
            by_op = dict(conn.execute("SELECT op, COUNT(*) FROM calls GROUP BY op").fetchall())
        size = sum(p.stat().st_size for p in self.path.parent.glob(self.path.name + "*") if p.is_file())
        return CacheInfo(self.path, entries, size, by_model, by_op)

    def clear(self) -> int:
        """Delete every entry; returns how many there were."""
        if not self.path.exists():
            return 0
        with self._lock:
            conn = self._connect()
            n = conn.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
            conn.execute("DELETE FROM calls")
            conn.execute("VACUUM")
        return n

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
