"""Tokenizers for extractive QA: token ids plus each token's character span in the text.

Mapping an answer's characters to token positions (and a predicted token span
back to text) needs every token's ``(start, end)`` character offsets. Two
implementations share that interface: :class:`WordTokenizer`, a built-in
lower-cased word/punctuation tokenizer whose vocabulary comes from the
training file (for tests and small experiments), and :class:`HFTokenizer`,
any *fast* Hugging Face tokenizer saved in a local directory (never
downloaded).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from distml.errors import UserError

Offsets = list[tuple[int, int]]

_WORD = re.compile(r"\w+|[^\w\s]")


class QATokenizer(Protocol):
    cls_id: int
    sep_id: int
    pad_id: int
    vocab_size: int

    def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]: ...


class WordTokenizer:
    """Words and single punctuation marks, lower-cased; unknown words map to [UNK]."""

    SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

    def __init__(self, texts: Iterable[str]) -> None:
        words = {m.group().lower() for text in texts for m in _WORD.finditer(text)}
        self.vocab = [*self.SPECIALS, *sorted(words)]
        self._index = {w: i for i, w in enumerate(self.vocab)}
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = range(5)
        self.vocab_size = len(self.vocab)

    def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
        ids, offsets = [], []
        for m in _WORD.finditer(text):
            ids.append(self._index.get(m.group().lower(), self.unk_id))
            offsets.append((m.start(), m.end()))
        return ids, offsets


class HFTokenizer:
    """A local fast Hugging Face tokenizer (``AutoTokenizer``, ``local_files_only``)."""

    def __init__(self, path: str | Path | Any) -> None:
        if isinstance(path, (str, Path)):
            self.tok = load_hf_tokenizer(path)
        else:
            self.tok = path  # an already-built tokenizer object
        if not getattr(self.tok, "is_fast", False):
            raise UserError(
                "data.tokenizer_path must hold a fast Hugging Face tokenizer (tokenizer.json); "
                "character offsets are needed to map answers to tokens"
            )
        for name in ("cls_token_id", "sep_token_id", "pad_token_id"):
            if getattr(self.tok, name) is None:
                raise UserError(f"the tokenizer has no {name[:-3]}; use a BERT-style tokenizer")
        self.cls_id = int(self.tok.cls_token_id)
        self.sep_id = int(self.tok.sep_token_id)
        self.pad_id = int(self.tok.pad_token_id)
        self.vocab_size = len(self.tok)

    def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [(int(a), int(b)) for a, b in enc["offset_mapping"]]


def load_hf_tokenizer(path: str | Path) -> Any:
    p = Path(path)
    if not p.is_dir():
        raise UserError(
            f"tokenizer directory not found: {p}; set data.tokenizer_path to a local folder "
            "saved with tokenizer.save_pretrained()"
        )
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UserError(
            "data.tokenizer_path needs transformers: pip install 'distml[hf]', or unset it "
            "to use the built-in word tokenizer"
        ) from None
    try:
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0][:120]
        raise UserError(f"cannot load a tokenizer from {p} ({reason}); check the folder") from None


def make_qa_tokenizer(path: str | None, texts: Iterable[str]) -> QATokenizer:
    """A Hugging Face tokenizer from ``path`` if given, else a word tokenizer over ``texts``."""
    return HFTokenizer(path) if path else WordTokenizer(texts)
