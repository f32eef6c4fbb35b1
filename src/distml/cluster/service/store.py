"""The scheduler service's durable state: jobs, slot allocations and events in SQLite.

Everything the service must survive a restart with lives here: each job's
spec, status, placement and the pid plus start time of its current process
(so a restarted scheduler can tell its own live job from a recycled pid);
one allocation row per run of a job on some slots; and an append-only event
log of every scheduling decision with its reason. One connection in WAL
mode, guarded by a lock, serves the scheduler thread and the API threads.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ACTIVE = ("queued", "running", "suspended")
TERMINAL = ("completed", "failed", "cancelled")
STATUSES = ACTIVE + TERMINAL

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    slots INTEGER NOT NULL,
    min_slots INTEGER NOT NULL,
    max_slots INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    submit_time REAL NOT NULL,
    start_time REAL,
    end_time REAL,
    placement TEXT NOT NULL DEFAULT '[]',
    nproc INTEGER NOT NULL DEFAULT 0,
    pid INTEGER,
    pid_start TEXT,
    runs INTEGER NOT NULL DEFAULT 0,
    step INTEGER,
    final_loss REAL,
    message TEXT NOT NULL DEFAULT '',
    job_dir TEXT NOT NULL DEFAULT '',
    workdir TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS allocations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    slots TEXT NOT NULL,
    nproc INTEGER NOT NULL,
    pid INTEGER,
    start REAL NOT NULL,
    end REAL,
    outcome TEXT
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    job_id INTEGER,
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id);
"""


@dataclass
class JobRecord:
    """One row of ``jobs``; ``placement`` holds global slot ids."""

    id: int
    name: str
    status: str
    slots: int
    min_slots: int
    max_slots: int
    priority: int
    submit_time: float
    workdir: str
    start_time: float | None = None
    end_time: float | None = None
    placement: list[int] = field(default_factory=list)
    nproc: int = 0
    pid: int | None = None
    pid_start: str | None = None
    runs: int = 0
    step: int | None = None
    final_loss: float | None = None
    message: str = ""
    job_dir: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_JOB_FIELDS = tuple(JobRecord.__dataclass_fields__)


class Store:
    """Thread-safe access to the service database at ``path``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ jobs
    def add_job(
        self,
        *,
        name: str,
        slots: int,
        min_slots: int,
        max_slots: int,
        priority: int,
        workdir: str,
        submit_time: float | None = None,
    ) -> JobRecord:
        now = time.time() if submit_time is None else submit_time
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO jobs (name, status, slots, min_slots, max_slots, priority, "
                "submit_time, workdir) VALUES (?, 'queued', ?, ?, ?, ?, ?, ?)",
                (name, slots, min_slots, max_slots, priority, now, workdir),
            )
            job_id = int(cur.lastrowid or 0)
        return self.get_job(job_id)

    def update_job(self, job_id: int, **values: Any) -> JobRecord:
        unknown = set(values) - set(_JOB_FIELDS) - {"id"}
        if unknown or "id" in values:
            raise KeyError(f"cannot update job columns {sorted(unknown | ({'id'} & set(values)))}")
        if values:
            cols = ", ".join(f"{k} = ?" for k in values)
            args = [json.dumps(v) if k == "placement" else v for k, v in values.items()]
            with self._lock:
                self._db.execute(f"UPDATE jobs SET {cols} WHERE id = ?", (*args, job_id))
        return self.get_job(job_id)

    def get_job(self, job_id: int) -> JobRecord:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(job_id)
        return _job(row)

    def find_jobs(self, name: str) -> list[JobRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE name = ? ORDER BY id", (name,))
            return [_job(r) for r in rows.fetchall()]

    def list_jobs(self, statuses: Iterable[str] | None = None) -> list[JobRecord]:
        query, args = "SELECT * FROM jobs", tuple[str, ...]()
        wanted = tuple(statuses) if statuses is not None else None
        if wanted is not None:
            query += f" WHERE status IN ({', '.join('?' * len(wanted))})"
            args = wanted
        with self._lock:
            return [_job(r) for r in self._db.execute(query + " ORDER BY id", args).fetchall()]

    # ----------------------------------------------------------- allocations
    def open_allocation(self, job_id: int, slots: list[int], nproc: int, pid: int | None) -> int:
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO allocations (job_id, slots, nproc, pid, start) VALUES (?, ?, ?, ?, ?)",
                (job_id, json.dumps(slots), nproc, pid, time.time()),
            )
            return int(cur.lastrowid or 0)

    def close_allocations(self, job_id: int, outcome: str) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE allocations SET end = ?, outcome = ? WHERE job_id = ? AND end IS NULL",
                (time.time(), outcome, job_id),
            )

    def allocations(self, job_id: int) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM allocations WHERE job_id = ? ORDER BY id", (job_id,)
            ).fetchall()
        return [dict(r, slots=json.loads(r["slots"])) for r in rows]

    # ---------------------------------------------------------------- events
    def add_event(
        self, kind: str, message: str, job_id: int | None = None, reason: str = ""
    ) -> int:
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO events (time, job_id, kind, message, reason) VALUES (?, ?, ?, ?, ?)",
                (time.time(), job_id, kind, message, reason),
            )
            return int(cur.lastrowid or 0)

    def events(
        self, job_id: int | None = None, since: int = 0, limit: int = 1000
    ) -> list[dict[str, Any]]:
        """Events with id > ``since``, oldest first (all jobs, or one job)."""
        query = "SELECT * FROM events WHERE id > ?"
        args: tuple[Any, ...] = (since,)
        if job_id is not None:
            query += " AND job_id = ?"
            args += (job_id,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY id LIMIT ?", (*args, limit)).fetchall()
        return [dict(r) for r in rows]


def _job(row: sqlite3.Row) -> JobRecord:
    values = {k: row[k] for k in _JOB_FIELDS}
    values["placement"] = json.loads(values["placement"] or "[]")
    return JobRecord(**values)
