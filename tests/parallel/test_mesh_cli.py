"""`distml train` and `distml predict` with parallel.pp/tp: bad plans, end to end, equal outputs.

Bad plans are rejected before any worker starts, with one line and exit code
2 (checked in-process through the CLI's ``main``). End to end: a tiny GPT
trains on tinyshakespeare at tp=2, its sharded checkpoint predicts the same
logits at pp=2 (two processes) as the whole model in this process.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from distml.cli.main import main
from distml.testing import run_cli

SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare.txt"


def _gpt_args(text: Path, n_head: int = 2, n_layer: int = 2) -> list[str]:
    return [
        "model.name=gpt",
        f"model.args={{n_layer: {n_layer}, n_head: {n_head}, n_embd: 24}}",
        "data.name=text",
        f"data.path={text}",
        "data.seq_len=16",
        "data.global_batch_size=8",
    ]


@pytest.fixture
def text(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("abcdefghijklmnopqrstuvwxyz ABCD.\n" * 40)  # 33 characters + 1 = 34 tokens
    return path


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (
            ["parallel.tp=2", "parallel.pp=2", "--nproc", "2"],
            "parallel.dp x pp x tp = 1 x 2 x 2 = 4 does not match the world size 2; "
            "launch 4 processes or change the sizes",
        ),
        (
            ["parallel.tp=2", "--nproc", "2", "model.args={n_layer: 2, n_head: 3, n_embd: 24}"],
            "parallel.tp=2 does not divide model.args.n_head=3 (attention is split by whole "
            "heads); choose a tp that divides 3",
        ),
        (
            ["parallel.pp=4", "parallel.pp_schedule=gpipe", "--nproc", "4"],
            "parallel.pp=4 exceeds the model's 2 transformer blocks (each stage needs one); "
            "lower parallel.pp or raise model.args.n_layer",
        ),
        (
            ["parallel.pp=2", "parallel.pp_microbatches=1", "--nproc", "2"],
            "parallel.pp_microbatches=1 is less than parallel.pp=2; the 1f1b schedule needs at "
            "least one micro-batch per stage: set pp_microbatches >= 2 or use pp_schedule=gpipe",
        ),
        (
            ["parallel.pp=2", "parallel.pp_microbatches=3", "--nproc", "2"],
            "parallel.pp_microbatches=3 does not divide the per-replica batch 8 "
            "(data.global_batch_size / dp); choose a divisor",
        ),
        (
            ["parallel.tp=2", "parallel.sequence_parallel=true", "data.seq_len=15"],
            "parallel.sequence_parallel splits the sequence over parallel.tp=2 ranks, but the "
            "sequence length 15 (data.seq_len) is not divisible by 2; set data.seq_len to a "
            "multiple of 2",
        ),
    ],
)
def test_bad_plans_exit_2_with_one_line(text, tmp_path, capsys, items, message) -> None:
    code = main(["train", *_gpt_args(text), f"logging.run_dir={tmp_path}", *items])
    err = capsys.readouterr().err
    assert code == 2
    assert err == f"distml: error: {message}\n"


def test_tp_vocab_check_names_the_padded_size(tmp_path, capsys) -> None:
    odd = tmp_path / "odd.txt"
    odd.write_text("abcdefghijklmnopqrstuvwxyz ABC.\n" * 40)  # 33 tokens: tp=2 cannot split
    code = main(
        ["train", *_gpt_args(odd), f"logging.run_dir={tmp_path}", "parallel.tp=2", "--nproc", "2"]
    )
    assert code == 2
    assert capsys.readouterr().err == (
        "distml: error: parallel.tp=2 does not divide the vocabulary size 33 (the embedding "
        "is split by rows); set model.args.vocab_size=34\n"
    )


@pytest.mark.slow
def test_train_tp2_then_predict_pp2_equals_single_process(tmp_path) -> None:
    from distml.parallel.mesh_checkpoint import load_full_model

    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not present")

    run_dir = tmp_path / "run"
    train = run_cli(
        [
            "train",
            *_gpt_args(SHAKESPEARE),
            "parallel.tp=2",
            "schedule.max_steps=3",
            "schedule.eval_every_epochs=0",
            f"logging.run_dir={run_dir}",
            f"checkpoint.dir={run_dir / 'ckpt'}",
            "--no-progress",
            "--nproc",
            "2",
        ],
        timeout=240,
    )
    assert train.returncode == 0, train.stderr
    ckpt = run_dir / "ckpt" / "step_00000003.dcp"
    assert (ckpt / "meta.pt").is_file() and (ckpt / ".metadata").is_file()
    tokens = np.random.default_rng(0).integers(0, 66, size=(5, 16))
    np.save(tmp_path / "tokens.npy", tokens)
    common = [
        "predict",
        *_gpt_args(SHAKESPEARE),
        "--checkpoint",
        str(ckpt),
        "--input",
        str(tmp_path / "tokens.npy"),
    ]
    piped = run_cli(
        [
            *common,
            "parallel.pp=2",
            "parallel.pp_schedule=gpipe",
            "parallel.pp_microbatches=2",
            "--output",
            str(tmp_path / "pp.npy"),
            "--nproc",
            "2",
        ]
    )
    assert piped.returncode == 0, piped.stderr
    _, model = load_full_model(ckpt)  # the same checkpoint, whole, in this process
    with torch.no_grad():
        one = model(torch.from_numpy(tokens)).numpy()
    pp = np.load(tmp_path / "pp.npy")
    assert one.shape == (5, 16, 66)
    np.testing.assert_allclose(pp, one, rtol=1e-5, atol=1e-5)
    # Text generation from the same sharded checkpoint, tensor-parallel on 2 workers,
    # samples exactly the single-process text for the same seed.
    from distml.inference.generate import generate_text

    sampled = run_cli(
        [
            "generate",
            *_gpt_args(SHAKESPEARE),
            "parallel.tp=2",
            "--checkpoint",
            str(ckpt),
            "--prompt",
            "ROMEO:",
            "--max-new-tokens",
            "12",
            "--seed",
            "3",
            "--nproc",
            "2",
        ]
    )
    assert sampled.returncode == 0, sampled.stderr
    [want] = generate_text(str(ckpt), ["ROMEO:"], 12, temperature=1.0, seed=3)
    assert sampled.stdout == want + "\n"
