"""The distml CLI end to end: the default demo, predict/eval, info, bad input, failures."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from distml.testing import free_port, run_cli

FAST = ["schedule.epochs=2", "data.global_batch_size=128", "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """The default `distml train` (digits CNN, 2 workers), run once for this module."""
    run_dir = tmp_path_factory.mktemp("default")
    summary_path = run_dir / "summary.json"
    result = run_cli(
        [
            "train",
            "--no-progress",
            f"logging.run_dir={run_dir}",
            "--summary-json",
            str(summary_path),
        ],
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(summary_path.read_text())
    return {"result": result, "summary": summary, "run_dir": run_dir}


def test_default_train_reaches_the_accuracy_bar_within_two_minutes(trained) -> None:
    summary = trained["summary"]
    assert summary["world_size"] == 2 and summary["backend"] == "gloo"
    assert summary["test_accuracy"] >= 0.95
    assert trained["result"].elapsed_s < 120
    out = trained["result"].stdout
    assert "distml run summary" in out and "bound by" in out
    lines = (Path(trained["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line) for line in lines if '"event"' not in line]
    assert len(steps) == summary["steps"]
    assert {"loss", "lr", "samples_per_s", "t_data", "t_compute", "t_comm", "t_step"} <= steps[
        0
    ].keys()


def test_predict_two_workers_equals_one(trained, tmp_path) -> None:
    ckpt = trained["summary"]["checkpoint"]
    common = [f"logging.run_dir={tmp_path}", "--checkpoint", ckpt, "--input", "split:test"]
    one = run_cli(["predict", *common, "--output", str(tmp_path / "one.npy"), "--nproc", "1"])
    two = run_cli(["predict", *common, "--output", str(tmp_path / "two.npy"), "--nproc", "2"])
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    a, b = np.load(tmp_path / "one.npy"), np.load(tmp_path / "two.npy")
    assert a.shape == (359, 10)
    np.testing.assert_array_equal(a, b)
    # A .npy input file and CSV output work too and agree with the split run.
    from distml.config import DataSection
    from distml.data import build_datasets

    test = build_datasets(DataSection(name="digits"), 0).test
    np.save(tmp_path / "inputs.npy", test.inputs.numpy())
    csv_run = run_cli(
        [
            "predict",
            "--checkpoint",
            ckpt,
            "--input",
            str(tmp_path / "inputs.npy"),
            "--output",
            str(tmp_path / "p.csv"),
            "--nproc",
            "2",
        ]
    )
    assert csv_run.returncode == 0, csv_run.stderr
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert rows[0] == "index,prediction,confidence" and len(rows) == 360
    assert [int(r.split(",")[1]) for r in rows[1:]] == a.argmax(axis=1).tolist()


def test_eval_matches_the_training_summary(trained) -> None:
    ckpt = trained["summary"]["checkpoint"]
    result = run_cli(["eval", "--checkpoint", ckpt, "--json", "--nproc", "2"])
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert metrics["accuracy"] == pytest.approx(trained["summary"]["test_accuracy"], abs=1e-9)
    assert metrics["samples"] == 359


def test_info_and_help() -> None:
    info = run_cli(["info", "--json"], timeout=60)
    assert info.returncode == 0
    facts = json.loads(info.stdout)
    assert facts["backends"]["gloo"] is True and facts["cpu_cores"] >= 1
    helps = run_cli(["train", "--help"], timeout=60)
    assert helps.returncode == 0 and "--nnodes" in helps.stdout and "key=value" in helps.stdout


def _one_line_error(result, expected: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"distml: error: {expected}"], result.stderr


@pytest.mark.parametrize(
    "args,expected",
    [
        (
            ["optimizer.lrr=0.1"],
            "unknown config key 'optimizer.lrr' in the default config; check the spelling (see `distml config`)",
        ),
        (
            ["data.name=imagenet"],
            "unknown dataset 'imagenet' (data.name); choose one of: cifar10, digits, mnist, squad, synthetic-classification, synthetic-images, text",
        ),
        (
            ["model.name=vgg"],
            "unknown model 'vgg' (model.name); choose one of: bert, bert-qa, cnn, gpt, hf-bert, hf-bert-qa, hf-gpt2, mlp, resnet",
        ),
        (["missing.yaml"], "config file not found: missing.yaml; pass an existing YAML file"),
        (
            ["data.global_batch_size=63"],
            "data.global_batch_size=63 is not divisible by workers x accumulation steps = 2 x 1 = 2; use a multiple of 2 such as 62 or 64",
        ),
        (
            ["data.name=text", "model.name=gpt"],
            "dataset 'text' needs a file: set data.path=/path/to/corpus.txt",
        ),
        (
            ["model.name=gpt"],
            "model 'gpt' (causal_lm) cannot train on dataset 'digits' (classification); use data.name=text",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, expected, tmp_path) -> None:
    result = run_cli(["train", *args, f"logging.run_dir={tmp_path}"], timeout=90, cwd=str(tmp_path))
    _one_line_error(result, expected)


def test_missing_checkpoint_and_port_in_use(tmp_path) -> None:
    missing = run_cli(["eval", "--checkpoint", str(tmp_path / "x.pt")], timeout=60)
    _one_line_error(
        missing, f"checkpoint not found: {tmp_path / 'x.pt'}; pass the path of a step_*.pt file"
    )
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli(
            [
                "train",
                *FAST,
                f"logging.run_dir={tmp_path}",
                "--nnodes",
                "2",
                "--node-rank",
                "0",
                "--nproc",
                "1",
                "--master",
                f"127.0.0.1:{port}",
            ],
            timeout=90,
        )
    _one_line_error(
        result,
        f"port {port} on 127.0.0.1 is already in use; pick another with --master 127.0.0.1:PORT",
    )


def test_debug_shows_the_traceback(tmp_path) -> None:
    result = run_cli(["--debug", "train", "optimizer.lrr=1"], timeout=60, cwd=str(tmp_path))
    assert result.returncode != 0 and "Traceback" in result.stderr


def _worker_pids(parent: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"spawn_main" in cmdline:
            pids.append(int(entry))
    return sorted(pids)


def test_killed_worker_stops_the_job_within_30s(tmp_path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distml",
            "train",
            "--no-progress",
            "schedule.epochs=500",
            f"logging.run_dir={tmp_path}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        metrics = tmp_path / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.stat().st_size > 0):
            assert proc.poll() is None and time.monotonic() < deadline, "training never started"
            time.sleep(0.2)
        workers = _worker_pids(proc.pid)
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = proc.communicate(timeout=60)
        assert time.monotonic() - killed_at < 30
        assert proc.returncode == 1
        assert "distml: worker rank 1 failed: killed by signal 9" in err
        for pid in workers:
            assert (
                not Path(f"/proc/{pid}").exists()
                or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
            )
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def test_two_nodes_form_one_job(tmp_path) -> None:
    port = free_port()
    base = [
        sys.executable,
        "-m",
        "distml",
        "train",
        *FAST,
        "--nnodes",
        "2",
        "--nproc",
        "1",
        "--master",
        f"127.0.0.1:{port}",
    ]
    procs = []
    try:
        for rank in (0, 1):
            run_dir = tmp_path / f"node{rank}"
            procs.append(
                subprocess.Popen(
                    [
                        *base,
                        "--node-rank",
                        str(rank),
                        f"logging.run_dir={run_dir}",
                        "--summary-json",
                        str(tmp_path / f"s{rank}.json"),
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    start_new_session=True,
                )
            )
        for proc in procs:
            _, err = proc.communicate(timeout=180)
            assert proc.returncode == 0, err
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    summary = json.loads((tmp_path / "s0.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2 * (1438 // 128)
    assert summary["test_accuracy"] > 0.5


def test_ctrl_c_stops_all_workers_and_keeps_the_last_checkpoint(tmp_path) -> None:
    from distml.train.checkpoint import CheckpointManager, load_checkpoint

    proc = subprocess.Popen(
        [sys.executable, "-m", "distml", "train", "--no-progress", "schedule.epochs=500",
         "checkpoint.every_steps=10", f"logging.run_dir={tmp_path}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        manager = CheckpointManager(tmp_path / "checkpoints")
        deadline = time.monotonic() + 120
        while manager.latest() is None:
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.2)
        workers = _worker_pids(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130
        assert err.strip().splitlines()[-1] == "distml: interrupted; checkpoints already written are intact"
        time.sleep(0.5)
        assert all(not Path(f"/proc/{pid}").exists() for pid in workers)
        state = load_checkpoint(manager.latest())
        assert state["step"] % 10 == 0 or state["batch_in_epoch"] == 0
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def test_quantize_then_predict_and_eval_the_quantized_model(trained, tmp_path) -> None:
    ckpt = trained["summary"]["checkpoint"]
    out = tmp_path / "cnn-int8.safetensors"
    result = run_cli(["quantize", ckpt, "--bits", "8", "--out", str(out)], timeout=90)
    assert result.returncode == 0, result.stderr
    assert out.is_file() and out.stat().st_size * 3 < Path(ckpt).stat().st_size
    metrics = run_cli(["eval", "--checkpoint", str(out), "--json"], timeout=90)
    assert metrics.returncode == 0, metrics.stderr
    accuracy = json.loads(metrics.stdout.strip().splitlines()[-1])["accuracy"]
    assert accuracy >= trained["summary"]["test_accuracy"] - 0.01  # within 1 point of fp32
    pred = run_cli(["predict", "--checkpoint", str(out), "--input", "split:test",
                    "--output", str(tmp_path / "q.npy"), "--nproc", "2"], timeout=120)
    assert pred.returncode == 0, pred.stderr
    assert np.load(tmp_path / "q.npy").shape == (359, 10)
    bad = run_cli(["quantize", ckpt, "--bits", "8", "--out", str(tmp_path / "x.pt")], timeout=60)
    _one_line_error(bad, f"--out '{tmp_path / 'x.pt'}' must end in .safetensors")
