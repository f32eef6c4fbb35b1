"""Text generation: batching/padding/cropping equal a hand-rolled loop, seeded sampling, CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distml.cli.main import main
from distml.config import build_config
from distml.errors import UserError
from distml.inference.generate import filter_logits, generate, generate_text
from distml.models.gpt import GPT, GPTConfig
from distml.train.trainer import Trainer


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gpt(block_size: int = 8) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=block_size, n_layer=2, n_head=2, n_embd=16))
    return model.eval()


def _argmax_loop(model: GPT, prompt: list[int], steps: int) -> list[int]:
    seq = list(prompt)
    for _ in range(steps):
        ctx = torch.tensor([seq[-model.config.block_size :]])
        seq.append(int(model(ctx)[0, -1].argmax()))
    return seq[len(prompt) :]


def test_greedy_equals_hand_rolled_argmax_loop_with_padding_and_cropping() -> None:
    model = _gpt(block_size=8)
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 1, 2, 3]]  # the last exceeds block_size
    got = generate(model, prompts, max_new_tokens=7, temperature=0)
    assert got == [_argmax_loop(model, p, 7) for p in prompts]
    # A left-padded tensor with its mask means the same prompts.
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.tensor(p)
        mask[r, width - len(p) :] = 1
    assert generate(model, ids, 7, temperature=0, attention_mask=mask) == got


def test_logits_fn_is_the_only_model_call() -> None:
    model = _gpt()
    calls: list[tuple[int, ...]] = []

    def logits_fn(ids: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(ids.shape))
        return model(ids)

    got = generate(None, [[1, 2]], 3, temperature=0, logits_fn=logits_fn, block_size=8)
    assert got == [_argmax_loop(model, [1, 2], 3)]
    assert calls == [(1, 2), (1, 3), (1, 4)]


def test_seeded_sampling_is_reproducible_and_respects_suppression() -> None:
    model = _gpt()
    prompts = [[1, 2], [3]]
    a = generate(model, prompts, 12, temperature=1.5, top_k=5, top_p=0.9, seed=7, suppress_ids=[0])
    b = generate(model, prompts, 12, temperature=1.5, top_k=5, top_p=0.9, seed=7, suppress_ids=[0])
    c = generate(model, prompts, 12, temperature=1.5, top_k=5, top_p=0.9, seed=8, suppress_ids=[0])
    assert a == b
    assert a != c
    assert all(0 not in row and len(row) == 12 for row in a + c)


def test_filter_logits_top_k_and_top_p() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, 1.0, top_k=2, top_p=None))
    assert kept.tolist() == [[True, True, False, False]]
    # Nucleus 0.8: 0.5 + 0.3 reaches it, so the rest go.
    kept = torch.isfinite(filter_logits(logits, 1.0, top_k=None, top_p=0.8))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(logits, 1.0, top_k=None, top_p=0.81))
    assert kept.tolist() == [[True, True, True, False]]


def test_eos_stops_a_row_and_bad_arguments_are_user_errors() -> None:
    model = _gpt()
    first = _argmax_loop(model, [1, 2], 1)[0]
    assert generate(model, [[1, 2]], 5, temperature=0, eos_id=first) == [[first]]
    with pytest.raises(UserError, match="at least one token"):
        generate(model, [[]], 3)
    with pytest.raises(UserError, match=r"^--top-p must be in \(0, 1\], got 1.5$"):
        generate(model, [[1]], 3, top_p=1.5)


@pytest.fixture(scope="module")
def shakespeare_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tinyshakespeare.txt"
    if not source.is_file():
        pytest.skip(f"{source} not present")
    root = tmp_path_factory.mktemp("gen")
    # A slice keeps the test fast; it still holds most of the play's character set.
    corpus = root / "shakespeare.txt"
    corpus.write_text(source.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    threads = torch.get_num_threads()
    cfg = build_config(
        {
            "model": {"name": "gpt", "args": {"n_layer": 1, "n_head": 2, "n_embd": 32}},
            "data": {"name": "text", "path": str(corpus), "seq_len": 32, "global_batch_size": 16},
            "optimizer": {"name": "adamw", "lr": 0.003},
            "schedule": {"epochs": 1, "max_steps": 15},
            "parallel": {"nproc": 1, "device": "cpu", "threads_per_worker": 1},
            "logging": {"run_dir": str(root / "run"), "progress": False},
            "checkpoint": {"dir": str(root / "ckpt")},
        }
    )
    try:
        summary = Trainer(cfg).fit()
    finally:
        torch.set_num_threads(threads)
    return Path(summary["checkpoint"])


def test_char_gpt_generates_only_in_vocabulary_characters(shakespeare_ckpt: Path) -> None:
    state = torch.load(shakespeare_ckpt, weights_only=True)
    vocab = set(state["tokenizer"]["chars"])
    [text] = generate_text(str(shakespeare_ckpt), ["ROMEO:"], 80, temperature=1.0, seed=3)
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 80
    assert set(text) <= vocab
    again = generate_text(str(shakespeare_ckpt), ["ROMEO:"], 80, temperature=1.0, seed=3)
    assert again == [text]


def test_cli_generate_prints_text(
    shakespeare_ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", "--checkpoint", str(shakespeare_ckpt), "--prompt", "To be"]
    assert main([*argv, "--max-new-tokens", "20", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("To be") and len(out.rstrip("\n")) >= len("To be")
    # Greedy decoding is deterministic: the CLI prints what the library returns.
    [want] = generate_text(str(shakespeare_ckpt), ["To be"], 20, temperature=0)
    assert out == want + "\n"


def test_cli_generate_missing_checkpoint_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.pt"
    assert main(["generate", "--checkpoint", str(missing), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        f"distml: error: checkpoint not found: {missing}; pass the path of a step_*.pt file"
    )
