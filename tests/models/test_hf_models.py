"""Hugging Face GPT-2 / BERT built from YAML args: same outputs as transformers, trained by the
normal loop, and generation from an hf-gpt2 checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distml.config import build_config
from distml.inference.generate import generate, generate_text
from distml.models import build_model, get_model_spec
from distml.train.trainer import Trainer

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

CORPUS = "to be or not to be, that is the question. " * 40
TINY = {"n_layer": 2, "n_head": 2, "n_embd": 16}


def test_hf_gpt2_from_config_equals_transformers_model() -> None:
    model = build_model("hf-gpt2", {**TINY, "vocab_size": 40, "block_size": 12})
    hf = model.hf
    assert type(hf).__name__ == "GPT2LMHeadModel"
    cfg = hf.config
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.n_positions, cfg.vocab_size) == (
        2, 2, 16, 12, 40,
    )  # fmt: skip
    assert get_model_spec("hf-gpt2").task == "causal_lm"
    ids = torch.randint(0, 40, (3, 12))
    model.eval()
    torch.testing.assert_close(model(ids), hf(input_ids=ids).logits)
    assert len(model.blocks) == 2 and model.blocks is hf.transformer.h
    # Greedy generation through the wrapper equals an argmax loop on the HF model itself.
    got = generate(model, [[1, 2, 3]], 4, temperature=0)
    seq = [1, 2, 3]
    for _ in range(4):
        seq.append(int(hf(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    assert got == [seq[3:]]


def test_hf_bert_and_qa_heads_shapes_and_masking() -> None:
    mlm = build_model("hf-bert", {**TINY, "vocab_size": 30, "block_size": 10})
    assert type(mlm.hf).__name__ == "BertForMaskedLM"
    assert mlm.hf.config.intermediate_size == 64
    assert mlm(torch.randint(0, 30, (2, 10))).shape == (2, 10, 30)
    qa = build_model("hf-bert-qa", {**TINY, "vocab_size": 30, "block_size": 10}).eval()
    x = torch.zeros(2, 3, 10, dtype=torch.long)
    x[:, 0] = torch.randint(0, 30, (2, 10))
    x[:, 2, :7] = 1  # seven real tokens, three pads
    out = qa(x)
    assert out.shape == (2, 2, 10)
    assert bool((out[:, :, 7:] == -1e4).all()) and bool((out[:, :, :7] > -1e3).all())
    ref = qa.hf(input_ids=x[:, 0], token_type_ids=x[:, 1], attention_mask=x[:, 2])
    torch.testing.assert_close(out[:, 0, :7], ref.start_logits[:, :7])


def _train(tmp_path: Path, model: str, **schedule: int) -> dict:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    cfg = build_config(
        {
            "model": {"name": model, "args": TINY},
            "data": {"name": "text", "path": str(corpus), "seq_len": 16, "global_batch_size": 8},
            "optimizer": {"name": "adamw", "lr": 0.01},
            "schedule": {"epochs": 2, "max_steps": 12, **schedule},
            "parallel": {"nproc": 1, "device": "cpu", "threads_per_worker": 1},
            "logging": {"run_dir": str(tmp_path / "run"), "progress": False},
            "checkpoint": {"dir": str(tmp_path / "ckpt")},
        }
    )
    threads = torch.get_num_threads()
    try:
        trainer = Trainer(cfg)
        summary = trainer.fit()
    finally:
        torch.set_num_threads(threads)
    losses = [r["loss"] for r in trainer.history] or [summary["test_loss"]]
    return {"summary": summary, "losses": losses, "trainer": trainer}


def test_hf_gpt2_trains_in_the_loop_and_generates_from_its_checkpoint(tmp_path: Path) -> None:
    out = _train(tmp_path, "hf-gpt2")
    summary = out["summary"]
    assert summary["steps"] == 12
    # Character LM on a repeated sentence: 12 AdamW steps get far below uniform (ln 15 ~ 2.7).
    assert summary["test_loss"] < 2.2
    vocab = set(CORPUS)
    [text] = generate_text(summary["checkpoint"], ["to be"], 30, temperature=0.8, seed=1)
    assert text.startswith("to be") and len(text) == 35 and set(text) <= vocab


def test_hf_bert_trains_masked_lm_in_the_loop(tmp_path: Path) -> None:
    out = _train(tmp_path, "hf-bert")
    trainer = out["trainer"]
    assert trainer.task == "masked_lm" and out["summary"]["steps"] == 12
    assert out["summary"]["test_loss"] < 2.7
