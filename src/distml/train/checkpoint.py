"""Atomic, self-checking training checkpoints.

A checkpoint is one ``torch.save`` file of tensors and plain values (model,
optimizer, LR schedule, data position, RNG states, step), loadable with
``weights_only=True`` so a checkpoint from elsewhere cannot execute code. It is
written to a temporary file in the same directory, fsynced and renamed into
place, so a crash never leaves a half-written ``step_*.pt``; the last K are
kept. A truncated or corrupt file is reported as such, with the fix.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from distml.errors import CheckpointError

FORMAT = "distml-checkpoint/1"
_NAME = re.compile(r"^step_(\d{8})\.pt$")


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """Write ``obj`` to ``path`` via a temporary file, fsync and rename."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load a distml checkpoint safely (``weights_only=True``); clear errors otherwise."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}; pass the path of a step_*.pt file")
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError/EOFError/UnpicklingError variants
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {p} is truncated or corrupt ({reason}); delete it to resume from "
            "the previous checkpoint"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{p} is not a distml checkpoint (missing format tag {FORMAT!r})")
    return state


class CheckpointManager:
    """Saves ``step_XXXXXXXX.pt`` files in one directory and keeps the last ``keep_last``."""

    def __init__(self, directory: str | os.PathLike[str], keep_last: int = 3) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last

    def path_for(self, step: int) -> Path:
        return self.directory / f"step_{step:08d}.pt"

    def list(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if _NAME.match(p.name)]
        return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))  # type: ignore[union-attr]

    def latest(self) -> Path | None:
        paths = self.list()
        return paths[-1] if paths else None

    def save(self, state: dict[str, Any], step: int) -> Path:
        state = dict(state, format=FORMAT, step=step)
        path = self.path_for(step)
        atomic_torch_save(state, path)
        for old in self.list()[: -self.keep_last]:
            old.unlink(missing_ok=True)
        return path

    def resolve_resume(self, resume: bool | str) -> Path | None:
        """The checkpoint to resume from: a given path, the latest in the dir, or None."""
        if resume is False or resume in ("", "false", "no"):
            return None
        if isinstance(resume, str) and resume not in ("true", "auto", "latest"):
            return Path(resume)
        return self.latest()
