"""Durable server state: SQLite for clients, rounds and metrics, safetensors for models.

A federated server writes each completed round's global model (and the
strategy's server-side tensors, e.g. FedAvgM's velocity or FedAdam's moments)
to checkpoint files atomically (temporary file, fsync, rename), then commits
the round's row in SQLite. A round is therefore completed exactly when its row
exists, and a server restarted on the same state directory resumes after the
last such round with the same model, strategy state and client ids. Files are
verified against the SHA-256 recorded in the row before they are loaded.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from distml.errors import CheckpointError
from distml.federated.parameters import Parameters, parameters_from_bytes, parameters_to_bytes
from distml.federated.privacy import RDPAccountant
from distml.federated.strategies import Strategy
from distml.federated.transport.wire import sha256_hex

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS clients (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT UNIQUE NOT NULL,
    joined_at REAL NOT NULL,
    last_join REAL NOT NULL,
    joins INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    checkpoint TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    strategy_file TEXT,
    strategy_sha256 TEXT,
    metrics TEXT NOT NULL,
    completed_at REAL NOT NULL
);
"""


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # make the rename itself durable
    finally:
        os.close(fd)


def strategy_state(strategy: Strategy) -> dict[str, torch.Tensor]:
    """The strategy's server-side tensor lists (attributes holding ``list[Tensor]``), flattened.

    Strategies keep optimizer state such as ``velocity``, ``m`` and ``v`` as
    plain tensor lists; saving every such attribute keeps a resumed server's
    next aggregation identical to an uninterrupted one without a per-strategy API.
    """
    out: dict[str, torch.Tensor] = {}
    for attr, value in vars(strategy).items():
        if isinstance(value, list) and value and all(isinstance(t, torch.Tensor) for t in value):
            for i, t in enumerate(value):
                out[f"{attr}.{i}"] = t.detach().contiguous().cpu()
    # A wrapper (DP-FedAvg) keeps its inner strategy's state and its privacy ledger.
    inner = getattr(strategy, "strategy", None)
    if isinstance(inner, Strategy):
        out.update({f"inner/{k}": v for k, v in strategy_state(inner).items()})
    accountant = getattr(strategy, "accountant", None)
    if isinstance(accountant, RDPAccountant):
        out["accountant/rdp"] = torch.from_numpy(accountant.rdp.copy())
        out["accountant/steps"] = torch.tensor(accountant.steps)
    return out


def load_strategy_state(strategy: Strategy, state: Mapping[str, torch.Tensor]) -> None:
    """Inverse of :func:`strategy_state`: set each saved tensor list back on ``strategy``."""
    lists: dict[str, dict[int, torch.Tensor]] = {}
    inner = getattr(strategy, "strategy", None)
    if isinstance(inner, Strategy):
        prefix = "inner/"
        load_strategy_state(
            inner, {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        )
    accountant = getattr(strategy, "accountant", None)
    if isinstance(accountant, RDPAccountant) and "accountant/rdp" in state:
        accountant.rdp = state["accountant/rdp"].double().numpy().copy()
        accountant.steps = int(state["accountant/steps"])
    for key, tensor in state.items():
        if "/" in key:
            continue
        attr, _, index = key.rpartition(".")
        lists.setdefault(attr, {})[int(index)] = tensor
    for attr, items in lists.items():
        setattr(strategy, attr, [items[i] for i in range(len(items))])


class ServerStore:
    """SQLite database plus checkpoint directory under one state directory; thread-safe."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(state_dir)
        self.checkpoint_dir = self.dir / "checkpoints"
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.dir / "state.sqlite", check_same_thread=False)
        with self._lock, self._db:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- metadata ----------------------------------------------------------

    def ensure_meta(self, key: str, value: str, hint: str) -> None:
        """Store ``value`` under ``key``, or check that it equals the stored one."""
        with self._lock, self._db:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, value))
            elif row[0] != value:
                raise CheckpointError(
                    f"state dir {self.dir} was written with a different {key} "
                    f"({row[0][:80]!r}); {hint}"
                )

    # -- clients -----------------------------------------------------------

    def register_client(self, name: str) -> int:
        """The persistent id of client ``name``, created on its first join."""
        now = time.time()
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO clients (name, joined_at, last_join, joins) VALUES (?, ?, ?, 1) "
                "ON CONFLICT(name) DO UPDATE SET last_join = excluded.last_join, joins = joins + 1",
                (name, now, now),
            )
            row = self._db.execute("SELECT id FROM clients WHERE name = ?", (name,)).fetchone()
        return int(row[0])

    def clients(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT name, id FROM clients ORDER BY id").fetchall()
        return {str(name): int(cid) for name, cid in rows}

    # -- rounds ------------------------------------------------------------

    def last_round(self) -> int | None:
        """The last completed round (0 is the initial model), None for a fresh state dir."""
        with self._lock:
            row = self._db.execute("SELECT MAX(round) FROM rounds").fetchone()
        return None if row[0] is None else int(row[0])

    def save_round(
        self,
        server_round: int,
        params: Parameters,
        state: Mapping[str, torch.Tensor],
        metrics: Mapping[str, Any],
    ) -> None:
        """Write the round's checkpoint files atomically, then commit its row."""
        model_bytes = parameters_to_bytes(params)
        model_file = f"round_{server_round:06d}.safetensors"
        atomic_write(self.checkpoint_dir / model_file, model_bytes)
        strategy_file = strategy_sha = None
        if state:
            strategy_bytes = st_save(dict(state))
            strategy_file = f"round_{server_round:06d}.strategy.safetensors"
            strategy_sha = sha256_hex(strategy_bytes)
            atomic_write(self.checkpoint_dir / strategy_file, strategy_bytes)
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO rounds (round, checkpoint, sha256, strategy_file, "
                "strategy_sha256, metrics, completed_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    server_round,
                    model_file,
                    sha256_hex(model_bytes),
                    strategy_file,
                    strategy_sha,
                    json.dumps(dict(metrics)),
                    time.time(),
                ),
            )

    def load_round(self, server_round: int) -> tuple[Parameters, dict[str, torch.Tensor]]:
        """The global model and strategy state saved for ``server_round``, checksums verified."""
        with self._lock:
            row = self._db.execute(
                "SELECT checkpoint, sha256, strategy_file, strategy_sha256 FROM rounds "
                "WHERE round = ?",
                (server_round,),
            ).fetchone()
        if row is None:
            raise CheckpointError(f"no completed round {server_round} in {self.dir}")
        params = parameters_from_bytes(self._read_verified(row[0], row[1]))
        state = st_load(self._read_verified(row[2], row[3])) if row[2] else {}
        return params, dict(state)

    def _read_verified(self, name: str, sha: str) -> bytes:
        path = self.checkpoint_dir / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CheckpointError(
                f"checkpoint {path} recorded in the state database is missing; restore it or "
                "start from a new state_dir"
            ) from None
        if sha256_hex(data) != sha:
            raise CheckpointError(
                f"checkpoint {path} does not match its recorded SHA-256; restore it or start "
                "from a new state_dir"
            )
        return data

    def round_records(self) -> list[dict[str, Any]]:
        """Metrics of every completed round after round 0, in order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT metrics FROM rounds WHERE round > 0 ORDER BY round"
            ).fetchall()
        return [json.loads(r[0]) for r in rows]

    def prune(self, keep: int) -> None:
        """Delete checkpoint files of all but the newest ``keep`` rounds (rows stay)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT checkpoint, strategy_file FROM rounds ORDER BY round DESC LIMIT -1 "
                "OFFSET ?",
                (keep,),
            ).fetchall()
        for files in rows:
            for name in files:
                if name:
                    (self.checkpoint_dir / name).unlink(missing_ok=True)

    def write_metrics_file(self) -> None:
        """Rewrite metrics.jsonl from the database (one line per completed round)."""
        lines = "".join(json.dumps(r) + "\n" for r in self.round_records())
        atomic_write(self.metrics_path, lines.encode())

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(dict(record)) + "\n")
