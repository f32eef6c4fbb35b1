"""SQuAD v2.0-format extractive QA data: reader, answer-span mapping and windowed features.

A file holds ``data -> paragraphs -> {context, qas -> {id, question, answers
[{text, answer_start}], is_impossible}}``. Each question becomes one or more
*features*: ``[CLS] question [SEP] context window [SEP] [PAD]...`` of
``data.seq_len`` tokens, with context windows ``data.doc_stride`` tokens apart
so long contexts are covered with overlap. An answer's character span maps to
the first and last context token it touches; when it is not wholly inside a
window, or the question is unanswerable, the target is the [CLS] position 0
(the "no answer" option). A feature's input is one (3, seq_len) tensor of
token ids, token types and attention mask, so the one training loop moves it
like any other input; its target is (start, end).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distml.config import DataSection
from distml.data.base import DataBundle, DataInfo
from distml.data.qa_tokenizer import QATokenizer, make_qa_tokenizer
from distml.data.registry import register_dataset
from distml.errors import UserError

Span = tuple[int, int]


@dataclass(frozen=True)
class SquadExample:
    qid: str
    question: str
    context: str
    answers: tuple[str, ...]
    answer_starts: tuple[int, ...]
    is_impossible: bool


def read_squad(path: str | Path | None) -> list[SquadExample]:
    """All questions of a SQuAD v1.1/v2.0-format JSON file, in file order."""
    if path is None:
        raise UserError("dataset 'squad' needs a file: set data.path=/path/to/train-v2.0.json")
    p = Path(path)
    if not p.is_file():
        raise UserError(f"SQuAD file not found: {p}; set data.path to a SQuAD-format JSON file")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{p} is not valid JSON ({exc}); pass a SQuAD-format file") from None
    examples = []
    try:
        for article in raw["data"]:
            for para in article["paragraphs"]:
                context = str(para["context"])
                for qa in para["qas"]:
                    answers = qa.get("answers") or []
                    impossible = bool(qa.get("is_impossible", not answers))
                    examples.append(
                        SquadExample(
                            qid=str(qa["id"]),
                            question=str(qa["question"]),
                            context=context,
                            answers=() if impossible else tuple(str(a["text"]) for a in answers),
                            answer_starts=()
                            if impossible
                            else tuple(int(a["answer_start"]) for a in answers),
                            is_impossible=impossible,
                        )
                    )
    except (KeyError, TypeError) as exc:
        raise UserError(
            f"{p} is not in SQuAD format (missing or bad key {exc}); expected "
            "data -> paragraphs -> context, qas -> id, question, answers"
        ) from None
    if not examples:
        raise UserError(f"{p} holds no questions; pass a SQuAD file with data")
    return examples


def answer_char_span(context: str, text: str, start: int) -> Span | None:
    """[start, end) of the answer in ``context``, surrounding whitespace trimmed; None if absent."""
    stripped = text.strip()
    if not stripped:
        return None
    start += len(text) - len(text.lstrip())
    if context[start : start + len(stripped)] == stripped:
        return start, start + len(stripped)
    # Some files carry offsets that are off by a few characters: take the nearest occurrence.
    hits = [i for i in range(len(context)) if context.startswith(stripped, i)]
    if not hits:
        return None
    best = min(hits, key=lambda i: abs(i - start))
    return best, best + len(stripped)


def char_span_to_tokens(offsets: Sequence[Span], span: Span) -> Span | None:
    """First and last token (inclusive) overlapping the character span [start, end)."""
    start, end = span
    first = next((i for i, (_, e) in enumerate(offsets) if e > start), None)
    last = next((i for i in range(len(offsets) - 1, -1, -1) if offsets[i][0] < end), None)
    if first is None or last is None or first > last:
        return None
    return first, last


def context_windows(n_tokens: int, room: int, stride: int) -> list[Span]:
    """[lo, hi) token windows of at most ``room`` tokens, ``stride`` apart, covering all tokens."""
    step = min(stride, room)  # a stride wider than the window would skip tokens
    windows, lo = [], 0
    while True:
        hi = min(n_tokens, lo + room)
        windows.append((lo, hi))
        if hi >= n_tokens:
            return windows
        lo += step


class SquadFeatures:
    """Windowed QA features: ``get_batch`` gives ((B, 3, L) ids/types/mask, (B, 2) start/end)."""

    def __init__(
        self,
        examples: list[SquadExample],
        tokenizer: QATokenizer,
        seq_len: int,
        doc_stride: int,
        training: bool,
    ) -> None:
        if seq_len < 8:
            raise UserError(f"data.seq_len={seq_len} is too short for squad; use at least 8")
        self.examples = examples
        self.seq_len = seq_len
        inputs: list[torch.Tensor] = []
        targets: list[Span] = []
        owners: list[int] = []
        #: Per feature and position: the context character span, or None (question/special/pad).
        self.offsets: list[list[Span | None]] = []
        self.skipped = 0
        for index, ex in enumerate(examples):
            q_ids, _ = tokenizer.encode_with_offsets(ex.question)
            q_ids = q_ids[: seq_len // 2]  # long questions keep their start
            c_ids, c_offsets = tokenizer.encode_with_offsets(ex.context)
            answer: Span | None = None
            if not ex.is_impossible:
                char_span = answer_char_span(ex.context, ex.answers[0], ex.answer_starts[0])
                answer = char_span_to_tokens(c_offsets, char_span) if char_span else None
                if answer is None and training:
                    self.skipped += 1  # a broken label would teach "no answer"; leave it out
                    continue
            base = len(q_ids) + 2
            room = seq_len - base - 1
            for lo, hi in context_windows(len(c_ids), room, doc_stride):
                ids = [tokenizer.cls_id, *q_ids, tokenizer.sep_id, *c_ids[lo:hi], tokenizer.sep_id]
                n = len(ids)
                row = torch.full((3, seq_len), 0, dtype=torch.long)
                row[0].fill_(tokenizer.pad_id)
                row[0, :n] = torch.tensor(ids)
                row[1, base:n] = 1
                row[2, :n] = 1
                target = (0, 0)
                if answer is not None and lo <= answer[0] and answer[1] < hi:
                    target = (base + answer[0] - lo, base + answer[1] - lo)
                offs: list[Span | None] = [None] * seq_len
                offs[base : base + hi - lo] = c_offsets[lo:hi]
                inputs.append(row)
                targets.append(target)
                owners.append(index)
                self.offsets.append(offs)
        if not inputs:
            raise UserError("no usable SQuAD questions (every answer span failed to map)")
        self.inputs = torch.stack(inputs)
        self.targets = torch.tensor(targets, dtype=torch.long)
        self.example_index = torch.tensor(owners, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.targets[index]

    def get_batch(self, indices: torch.Tensor, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[indices], self.targets[indices]


def split_examples(
    examples: list[SquadExample], test_fraction: float, seed: int
) -> tuple[list[SquadExample], list[SquadExample]]:
    """A seeded hold-out by question (all windows of a question stay on one side)."""
    gen = torch.Generator().manual_seed(seed + 17)
    perm = torch.randperm(len(examples), generator=gen).tolist()
    n_test = max(1, round(len(examples) * test_fraction))
    if n_test >= len(examples):
        raise UserError(
            f"{len(examples)} questions cannot be split with data.test_fraction={test_fraction}; "
            "add questions or set data.eval_path"
        )
    test = sorted(perm[:n_test])
    train = sorted(perm[n_test:])
    return [examples[i] for i in train], [examples[i] for i in test]


def build_squad(cfg: DataSection, seed: int) -> DataBundle:
    examples = read_squad(cfg.path)
    if cfg.eval_path is not None:
        train_ex, test_ex = examples, read_squad(cfg.eval_path)
    else:
        train_ex, test_ex = split_examples(examples, cfg.test_fraction, seed)
    # The word vocabulary comes from data.path only, so it is the same at train and eval time.
    texts = [t for ex in examples for t in (ex.context, ex.question)]
    tokenizer = make_qa_tokenizer(cfg.tokenizer_path, dict.fromkeys(texts))
    train = SquadFeatures(train_ex, tokenizer, cfg.seq_len, cfg.doc_stride, training=True)
    test = SquadFeatures(test_ex, tokenizer, cfg.seq_len, cfg.doc_stride, training=False)
    extra: dict[str, Any] = {"qa_tokenizer": tokenizer}
    info = DataInfo(
        "extractive_qa", vocab_size=tokenizer.vocab_size, seq_len=cfg.seq_len, extra=extra
    )
    return DataBundle(train, test, info)


@register_dataset("squad")
def _squad(cfg: DataSection, seed: int, model_task: str) -> DataBundle:
    return build_squad(cfg, seed)
