"""Smoke test of benchmarks/ddp_overhead.py: tiny sizes, a few steps, real 2-rank gloo run.

Beyond the JSON shape it checks what makes the comparison fair: both sides
train (finite loss, weights move) and, doing the same math on the same
batches, end with the same parameters and the same per-step losses.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))  # spawned ranks inherit sys.path and import it from here

import ddp_overhead  # noqa: E402

STEPS, REPEATS, WARMUP = 3, 2, 1


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> ddp_overhead.BenchResult:
    corpus = tmp_path_factory.mktemp("text") / "corpus.txt"
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "cat"]
    gen = torch.Generator().manual_seed(0)
    picks = torch.randint(0, len(words), (3000,), generator=gen).tolist()
    corpus.write_text(" ".join(words[i] for i in picks), encoding="utf-8")
    workloads = {
        "cnn": ddp_overhead.workload_config("cnn", tiny=True),
        "gpt": ddp_overhead.workload_config("gpt", corpus, tiny=True),
    }
    return ddp_overhead.run_benchmark(
        workloads, steps=STEPS, repeats=REPEATS, warmup=WARMUP, keep_params=True, timeout=150
    )


def test_report_structure_and_numbers(result: ddp_overhead.BenchResult) -> None:
    report = json.loads(json.dumps(result.report))  # must be plain JSON
    assert report["benchmark"] == "ddp_overhead"
    assert {"torch", "cpu_count", "load_average"} <= report["machine"].keys()
    assert report["settings"]["steps_per_block"] == STEPS
    assert set(report["workloads"]) == {"cnn", "gpt"}
    for w in report["workloads"].values():
        assert w["threads_per_rank"] == 1
        assert w["bucket_cap_mb"] == 25.0 and w["gradient_as_bucket_view"] is True
        assert w["per_rank_batch"] * 2 == w["global_batch"]
        for side in ("distml", "torch"):
            per_rank = w["block_medians_s"][side]
            assert len(per_rank) == 2 and all(len(b) == REPEATS for b in per_rank)
            assert all(t > 0 for b in per_rank for t in b)
            # Timings are rank 0's: the median of its block medians.
            assert w["median_step_s"][side] == pytest.approx(statistics.median(per_rank[0]))
            assert w["samples_per_s"][side] == pytest.approx(
                w["global_batch"] / w["median_step_s"][side]
            )
        distml, hand = w["block_medians_s"]["distml"][0], w["block_medians_s"]["torch"][0]
        pairs = [d / t for d, t in zip(distml, hand, strict=True)]
        assert w["ratio_paired_median"] == pytest.approx(statistics.median(pairs))
        assert w["meets_target"] == (w["ratio_paired_median"] <= 1.03)
        split = w["distml_split"]
        assert all(split[k] >= 0 for k in ("t_data_s", "t_compute_s", "t_comm_s"))
        assert split["t_step_s"] > 0 and split["t_compute_s"] <= split["t_step_s"]


def test_both_sides_trained_and_agree(result: ddp_overhead.BenchResult) -> None:
    steps = WARMUP + STEPS * REPEATS
    for name, w in result.report["workloads"].items():
        for side in ("distml", "torch"):
            t = w["training"][side]
            assert t["steps"] == steps and t["loss_finite"] and t["params_changed"], (name, side)
        assert w["parity"]["losses_equal"], name
        params: dict[str, Any] = result.params[name]
        assert params["distml"].keys() == params["torch"].keys() == params["init"].keys()
        for key, value in params["distml"].items():
            torch.testing.assert_close(value, params["torch"][key], rtol=1e-5, atol=1e-7)
        moved = [not torch.equal(params["init"][k], params["torch"][k]) for k in params["init"]]
        assert any(moved), name


def test_table_and_json_output(
    result: ddp_overhead.BenchResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ddp_overhead.print_report(result.report)
    table = capsys.readouterr().out
    assert "cnn (G=16)" in table and "gpt (G=8)" in table and "distml" in table
    out = ddp_overhead.write_json(result.report, tmp_path / "r.json")
    assert json.loads(out.read_text())["workloads"]["cnn"]["global_batch"] == 16


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--workloads", "cnn,resnet"], "unknown workload resnet"),
        (["--workloads", "gpt", "--text", "/nonexistent/corpus.txt"], "not found"),
        (["--steps", "0", "--workloads", "cnn"], "must be >= 1"),
    ],
)
def test_cli_rejects_bad_arguments(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ddp_overhead.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
