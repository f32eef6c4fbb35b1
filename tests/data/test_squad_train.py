"""SQuAD end to end: bert-qa trains through the normal loop, `distml eval` reports EM/F1;
a Hugging Face BERT tokenizer built locally drives the same features."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from distml.cli.main import main
from distml.config import build_config
from distml.data.squad import SquadFeatures, read_squad
from distml.data.squad_metrics import squad_scores
from distml.errors import ConfigError
from distml.inference.qa import evaluate_squad
from distml.train.trainer import Trainer

NAMES = ["ann", "bob", "cid", "dan", "eve", "fay", "gus", "hal", "ivy", "jon", "kim", "lea"]
CITIES = ["rome", "oslo", "lima", "kyiv", "doha", "baku", "riga", "bern", "nice", "ulm"]


def write_squad(path: Path, n_questions: int = 24) -> Path:
    """One question per paragraph, "Where does X live?"; every third is unanswerable.

    The answer is the city after "lives in", behind 0-2 filler sentences, so a tiny
    model can learn it from the context's local pattern in a few dozen steps.
    """
    paragraphs = []
    for p in range(n_questions):
        name, city = NAMES[p % len(NAMES)].title(), CITIES[(p * 7) % len(CITIES)].title()
        other, town = NAMES[(p + 5) % len(NAMES)].title(), CITIES[(p * 3 + 1) % len(CITIES)].title()
        filler = " ".join(f"{other} likes {town}." for _ in range((p // 3) % 3))
        qa: dict[str, Any] = {"id": f"q{p}", "question": f"Where does {name} live?"}
        if p % 3 == 2:
            context = f"{filler} {name} likes {city}.".strip()
            qa.update(answers=[], is_impossible=True)
        else:
            context = f"{filler} {name} lives in {city}.".strip()
            start = context.index(f"lives in {city}") + len("lives in ")
            qa.update(answers=[{"text": city, "answer_start": start}], is_impossible=False)
        paragraphs.append({"context": context, "qas": [qa]})
    doc = {"version": "v2.0", "data": [{"title": "t", "paragraphs": paragraphs}]}
    path.write_text(json.dumps(doc))
    return path


def _cfg(root: Path, data_path: Path, **data: Any) -> dict[str, Any]:
    return {
        "model": {"name": "bert-qa", "args": {"n_layer": 1, "n_head": 2, "n_embd": 32}},
        "data": {
            "name": "squad",
            "path": str(data_path),
            "seq_len": 16,
            "doc_stride": 4,
            "global_batch_size": 8,
            "eval_batch_size": 16,
            **data,
        },
        "optimizer": {"name": "adamw", "lr": 0.003},
        "schedule": {"epochs": 3, "max_steps": 6},
        "parallel": {"nproc": 1, "device": "cpu", "threads_per_worker": 1},
        "logging": {"run_dir": str(root / "run"), "progress": False},
        "checkpoint": {"dir": str(root / "ckpt")},
    }


def test_bert_qa_trains_on_squad_and_eval_reports_em_f1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_squad(tmp_path / "squad.json")
    cfg_dict = _cfg(tmp_path, data)
    threads = torch.get_num_threads()
    try:
        trainer = Trainer(build_config(cfg_dict))
        # seq_len 16 leaves 8 context tokens per window: longer contexts get several windows.
        assert len(trainer.bundle.train) > len(trainer.bundle.train.examples)
        summary = trainer.fit()
    finally:
        torch.set_num_threads(threads)
    assert summary["steps"] == 6 and summary["test_loss"] is not None
    assert torch.isfinite(torch.tensor(summary["test_loss"]))
    cfg_file = tmp_path / "qa.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg_dict))
    capsys.readouterr()  # drop the training log
    assert main(["eval", str(cfg_file), "--checkpoint", summary["checkpoint"], "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    # The CLI's EM/F1 are the library's, recomputed here from the same checkpoint.
    test = trainer.bundle.test
    scores, preds = evaluate_squad(trainer.raw_model, test, 16, "cpu", 30, 0.0)
    assert set(preds) == {ex.qid for ex in test.examples}
    assert scores == squad_scores(test.examples, preds)
    for key in ("exact", "f1", "HasAns_exact", "NoAns_exact", "total"):
        assert metrics[key] == pytest.approx(scores[key])
    assert 0.0 <= metrics["exact"] <= metrics["f1"] <= 100.0
    assert metrics["total"] == len(test.examples)
    assert main(["eval", str(cfg_file), "--checkpoint", summary["checkpoint"]]) == 0
    assert "exact match" in capsys.readouterr().out


def test_bert_qa_learns_the_training_questions(tmp_path: Path) -> None:
    """A tiny file memorised: training EM rises far above the no-answer baseline (1/3)."""
    data = write_squad(tmp_path / "squad.json", n_questions=12)
    cfg = _cfg(tmp_path, data, seq_len=32, eval_path=str(data), global_batch_size=4)
    cfg["schedule"] = {"epochs": 20, "max_steps": 60, "eval_every_epochs": 0}
    cfg["model"]["args"] = {"n_layer": 2, "n_head": 2, "n_embd": 32}
    threads = torch.get_num_threads()
    try:
        trainer = Trainer(build_config(cfg))
        trainer.fit()
    finally:
        torch.set_num_threads(threads)
    scores, _ = evaluate_squad(trainer.raw_model, trainer.bundle.test, 16)
    assert scores["exact"] >= 75.0, scores


def test_task_mismatch_is_a_config_error(tmp_path: Path) -> None:
    data = write_squad(tmp_path / "squad.json", n_questions=9)
    cfg = _cfg(tmp_path, data)
    cfg["model"] = {"name": "bert"}
    with pytest.raises(ConfigError, match=r"\(extractive_qa\); use model.name=bert-qa$"):
        Trainer(build_config(cfg))


def test_hugging_face_bert_tokenizer_built_locally(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    data = write_squad(tmp_path / "squad.json", n_questions=9)
    words = sorted(set(NAMES) | set(CITIES) | {"lives", "likes", "in", "where", "does", "live"})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?", *words]
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("\n".join(tokens) + "\n")
    if int(transformers.__version__.split(".")[0]) >= 5:
        # transformers 5 takes the vocabulary itself; 4.x reads a vocab.txt file.
        built = transformers.BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)})
    else:
        built = transformers.BertTokenizerFast(vocab_file=str(vocab_file))
    tok_dir = tmp_path / "tok"
    built.save_pretrained(tok_dir)
    cfg = build_config(_cfg(tmp_path, data, tokenizer_path=str(tok_dir)))
    from distml.data import build_datasets

    bundle = build_datasets(cfg.data, 0, "extractive_qa")
    assert bundle.info.vocab_size == len(tokens)
    feats: SquadFeatures = bundle.train
    hits = 0
    for f in range(len(feats)):
        s, e = feats.targets[f].tolist()
        ex = feats.examples[int(feats.example_index[f])]
        if (s, e) != (0, 0):
            offs = feats.offsets[f]
            assert ex.context[offs[s][0] : offs[e][1]] == ex.answers[0]
            assert feats.inputs[f, 0, 0] == 2 and feats.inputs[f, 1, s] == 1
            hits += 1
    assert hits >= len([ex for ex in read_squad(data) if not ex.is_impossible]) // 2
    # A folder without a tokenizer gives one line naming the setting.
    from distml.errors import UserError

    with pytest.raises(
        UserError, match=r"^tokenizer directory not found: .*set data.tokenizer_path"
    ):
        build_datasets(cfg.data.model_copy(update={"tokenizer_path": str(tmp_path / "x")}), 0)
