"""In-process checks of the library-backed subcommands: fl partition/simulate, sim, config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distml.cli.main import main

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def test_fl_partition_prints_histograms(capsys) -> None:
    assert main(["fl", "partition", "model.name=mlp", "federated.clients=5",
                 "federated.partition=shards", "federated.classes_per_client=2"]) == 0
    out = capsys.readouterr().out
    assert "shards partition" in out and "samples" in out


def test_fl_simulate_writes_rounds(tmp_path, capsys) -> None:
    out = tmp_path / "h.json"
    code = main(["fl", "simulate", "model.name=mlp", "federated.rounds=2",
                 "federated.clients_per_round=3", "--clients", "6", "--out", str(out)])
    assert code == 0
    rounds = json.loads(out.read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and all(len(r["clients"]) == 3 for r in rounds)
    assert "final test accuracy" in capsys.readouterr().out


def test_fl_bad_strategy_is_exit_2(capsys) -> None:
    assert main(["fl", "simulate", "model.name=mlp", "federated.strategy=fedbogus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("distml: error: unknown") and "fedbogus" in err[0]


def test_sim_compares_policies_on_the_philly_trace(tmp_path, capsys) -> None:
    trace = SHARED_DATA / "philly_jobs.csv"
    if not trace.is_file():
        pytest.skip(f"{trace} not present")
    plot, js = tmp_path / "jct.png", tmp_path / "s.json"
    assert main(["sim", str(trace), "--compare", "fifo,las", "--gpus", "32", "--limit", "150",
                 "--plot", str(plot), "--json", str(js)]) == 0
    assert plot.stat().st_size > 1000
    summaries = json.loads(js.read_text())
    assert set(summaries) == {"fifo", "las"}
    assert summaries["las"]["avg_jct"] <= summaries["fifo"]["avg_jct"]


def test_sim_missing_trace_is_exit_2(tmp_path, capsys) -> None:
    assert main(["sim", str(tmp_path / "none.csv"), "--gpus", "8"]) == 2
    assert capsys.readouterr().err.startswith("distml: error: ")


def test_config_prints_resolved_yaml(capsys) -> None:
    assert main(["config", "optimizer.lr=0.3"]) == 0
    assert "lr: 0.3" in capsys.readouterr().out
