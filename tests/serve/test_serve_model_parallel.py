"""Model-parallel serving: tensor- and pipeline-parallel groups equal single-process inference."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from distml.errors import UserError
from distml.inference.predict import load_for_inference
from distml.serve import build_app
from distml.serve.generation import SamplingParams, generate_batch
from distml.serve.model_parallel import GroupForward, GroupRunner
from distml.testing import run_ranks

ROWS = [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10], [11, 12, 13, 14, 15], [3], [4, 4, 4, 4]]
PARAMS = [SamplingParams(6, 0.0), SamplingParams(5, 0.9, top_k=4, seed=3)]


def _padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.zeros((len(rows), int(lengths.max())), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return ids, lengths


def _group_outputs(
    rank: int, world_size: int, plans: list[tuple[str, int, int]]
) -> list[dict[str, Any]] | None:
    """Per plan (checkpoint, tp, pp): rank 0's logits per row and generated tokens."""
    results = []
    for path, tp, pp in plans:
        # max_rows=4 with 5 rows: the pipeline runs two fixed-shape chunks.
        group = GroupForward(path, tp, pp, microbatches=2, max_rows=4)
        if rank != 0:
            group.follow()
            continue
        ids, lengths = _padded(ROWS)
        logits = group.lead(ids, lengths)
        runner = GroupRunner(group)
        tokens = None
        if group.task == "causal_lm":
            prompts = [torch.tensor(ROWS[0]), torch.tensor(ROWS[1])]
            tokens = generate_batch(runner.causal_logits, prompts, PARAMS, 32)
        group.stop()
        rows = [logits[i, : len(r)].numpy() for i, r in enumerate(ROWS)]
        results.append({"logits": rows, "tokens": tokens})
    return results if rank == 0 else None


def test_tensor_and_pipeline_parallel_groups_equal_the_single_process_model(
    gpt_tp_ckpt: Path, bert_tp_ckpt: Path, gpt_ckpt: Path
) -> None:
    plans = [(str(gpt_tp_ckpt), 2, 1), (str(bert_tp_ckpt), 2, 1), (str(gpt_ckpt), 1, 2)]
    got = run_ranks(_group_outputs, 2, args=(plans,), timeout=120)[0]
    for (path, _, _), out in zip(plans, got, strict=True):
        meta, model = load_for_inference(path, torch.device("cpu"))
        for row, logits in zip(ROWS, out["logits"], strict=True):
            with torch.no_grad():
                expected = model(torch.tensor([row]))[0].numpy()
            np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
        if meta["task"] == "causal_lm":
            for prompt, p, tokens in zip(ROWS[:2], PARAMS, out["tokens"], strict=True):
                gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
                ref = model.generate(
                    torch.tensor([prompt]), p.max_new_tokens, p.temperature, p.top_k, gen
                )
                assert tokens == ref[0, len(prompt) :].tolist()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_tensor_parallel_replica_serves_http_restarts_as_a_group_and_is_reaped(
    gpt_tp_ckpt: Path,
) -> None:
    app = build_app(str(gpt_tp_ckpt), replicas=1, tp=2, max_new_tokens=16)
    _, model = load_for_inference(str(gpt_tp_ckpt), torch.device("cpu"))
    texts = ["the lazy dog", "fox"]
    with TestClient(app) as client:
        pool = app.state.service.pool
        first = pool.replica_list()[0].group_pids
        assert len(first) == 2 and all(_alive(p) for p in first)
        r = client.post("/v1/predict", json={"inputs": ROWS[:2]})
        assert r.status_code == 200, r.text
        for row, logits in zip(ROWS, r.json()["logits"], strict=False):
            with torch.no_grad():
                expected = model(torch.tensor([row]))[0].numpy()
            np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
        # A dead follower takes its whole group down; the pool starts a fresh one.
        os.kill(first[1], signal.SIGKILL)
        deadline = time.monotonic() + 90
        while pool.ready_count() != 1 or pool.pids() == [first[0]] or not pool.pids():
            assert time.monotonic() < deadline, "the group was not restarted"
            time.sleep(0.1)
        second = pool.replica_list()[0].group_pids
        assert not any(_alive(p) for p in first)
        r = client.post("/v1/generate", json={"prompt": texts[0], "max_new_tokens": 4})
        assert r.status_code == 200 and len(r.json()["tokens"]) == 4
    # Shutdown reaps every rank of the group.
    assert not any(_alive(p) for p in second)


def test_model_parallel_settings_are_checked() -> None:
    with pytest.raises(UserError, match="model-parallel serving .* set replicas >= 1"):
        build_app("unused.pt", replicas=0, tp=2)
