"""Fixtures for the serving tests: tiny trained checkpoints and a real uvicorn server.

Checkpoints come from the real Trainer (a few steps, one process), once per
session. ``live_server`` runs an app under uvicorn on a free port in a thread
and always shuts it down, so tests can exercise streaming, sockets and
process replicas exactly as clients see them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import uvicorn

from distml.config import build_config
from distml.testing import free_port
from distml.train.trainer import Trainer

CORPUS = "the quick brown fox jumps over the lazy dog. " * 60


def _train(root: Path, name: str, cfg: dict[str, Any]) -> Path:
    threads = torch.get_num_threads()  # the Trainer sets its own; session fixtures run first
    base = {
        "schedule": {"epochs": 1, "max_steps": 3},
        "parallel": {"nproc": 1, "device": "cpu", "threads_per_worker": 1},
        "logging": {"run_dir": str(root / name), "progress": False},
        "checkpoint": {"dir": str(root / name / "ckpt")},
    }
    try:
        summary = Trainer(build_config({**base, **cfg})).fit()
    finally:
        torch.set_num_threads(threads)
    return Path(summary["checkpoint"])


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # The box is shared by several agents: more threads than free cores only spin.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("serve-data") / "corpus.txt"
    path.write_text(CORPUS, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def cnn_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("serve-cnn"), "cnn", {"model": {"name": "cnn"}})


@pytest.fixture(scope="session")
def gpt_ckpt(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> Path:
    model = {"name": "gpt", "args": {"n_layer": 2, "n_head": 2, "n_embd": 32}}
    data = {"name": "text", "path": str(corpus_file), "seq_len": 32, "global_batch_size": 16}
    return _train(tmp_path_factory.mktemp("serve-gpt"), "gpt", {"model": model, "data": data})


@pytest.fixture(scope="session")
def bert_ckpt(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> Path:
    model = {"name": "bert", "args": {"n_layer": 2, "n_head": 2, "n_embd": 32}}
    data = {"name": "text", "path": str(corpus_file), "seq_len": 32, "global_batch_size": 16}
    return _train(tmp_path_factory.mktemp("serve-bert"), "bert", {"model": model, "data": data})


@pytest.fixture(scope="session")
def gpt_tp_ckpt(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> Path:
    """A GPT whose vocabulary (padded to 32) splits over 2 tensor-parallel ranks."""
    model = {"name": "gpt", "args": {"n_layer": 2, "n_head": 2, "n_embd": 32, "vocab_size": 32}}
    data = {"name": "text", "path": str(corpus_file), "seq_len": 32, "global_batch_size": 16}
    return _train(tmp_path_factory.mktemp("serve-gpt-tp"), "gpt", {"model": model, "data": data})


@pytest.fixture(scope="session")
def bert_tp_ckpt(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> Path:
    model = {"name": "bert", "args": {"n_layer": 2, "n_head": 2, "n_embd": 32, "vocab_size": 32}}
    data = {"name": "text", "path": str(corpus_file), "seq_len": 32, "global_batch_size": 16}
    return _train(tmp_path_factory.mktemp("serve-bert-tp"), "bert", {"model": model, "data": data})


class LiveServer:
    def __init__(self, app: Any) -> None:
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            timeout_graceful_shutdown=20,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout: float = 90.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn exited during startup")
            if time.monotonic() > deadline:
                raise TimeoutError("server did not start in time")
            time.sleep(0.05)

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(10)
        assert not self.thread.is_alive(), "server thread did not stop"


@pytest.fixture
def live_server() -> Iterator[Callable[[Any], LiveServer]]:
    started: list[LiveServer] = []

    def start(app: Any) -> LiveServer:
        server = LiveServer(app)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()
