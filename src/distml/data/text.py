"""Character- or byte-level language-modelling data from any text file.

The corpus is tokenised once into a 1-D tensor; sample ``i`` is the window
``tokens[i*L : i*L + L + 1]`` (non-overlapping windows of ``seq_len``), so a
sample index means the same text on every rank and at every world size. For
the masked objective (BERT) the mask is a hash of (seed, epoch, sample,
position): deterministic, world-size independent and free of RNG state, which
keeps resumed runs bit-identical.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distml.errors import UserError

MASK_IGNORE = -100


class CharTokenizer:
    """Maps each distinct character of the corpus to an id (sorted for stability)."""

    def __init__(self, text: str) -> None:
        self.chars = sorted(set(text))
        self._index = {ch: i for i, ch in enumerate(self.chars)}
        # One extra id is the [MASK] token for the masked objective.
        self.mask_id = len(self.chars)
        self.vocab_size = len(self.chars) + 1

    def encode(self, text: str) -> torch.Tensor:
        try:
            return torch.tensor([self._index[ch] for ch in text], dtype=torch.long)
        except KeyError as exc:
            raise UserError(
                f"character {exc.args[0]!r} is not in the training vocabulary; "
                "use data.tokenizer=byte for open-vocabulary input"
            ) from None

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        values = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return "".join(self.chars[i] if i < len(self.chars) else "?" for i in values)


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; id 256 is [MASK]."""

    mask_id = 256
    vocab_size = 257

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        values = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return bytes(v for v in values if v < 256).decode("utf-8", errors="replace")


Tokenizer = CharTokenizer | ByteTokenizer


def read_text(path: str | Path | None) -> str:
    if path is None:
        raise UserError("dataset 'text' needs a file: set data.path=/path/to/corpus.txt")
    p = Path(path)
    if not p.is_file():
        raise UserError(f"text file not found: {p}; set data.path to an existing UTF-8 file")
    return p.read_text(encoding="utf-8")


def make_tokenizer(kind: str, text: str) -> Tokenizer:
    return CharTokenizer(text) if kind == "char" else ByteTokenizer()


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 64-bit integer hash (splitmix64 finaliser) done with wrapping int64 ops."""
    x = x ^ (x >> 31)
    x = x * 0x7FB5D329728EA185
    x = x ^ (x >> 27)
    x = x * -0x7E25210B43D22E2B  # 0x81DADEF4BC2DD44D as a signed int64
    return x ^ (x >> 33)


class TokenWindows:
    """Non-overlapping windows of a token stream, for causal or masked LM."""

    def __init__(
        self,
        tokens: torch.Tensor,
        seq_len: int,
        objective: str = "causal",
        mask_id: int = 0,
        mask_prob: float = 0.15,
        seed: int = 0,
    ) -> None:
        needed = seq_len + 1
        if len(tokens) < needed:
            raise UserError(
                f"text has {len(tokens)} tokens but data.seq_len={seq_len} needs at least "
                f"{needed}; lower data.seq_len or use a longer file"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.objective = objective
        self.mask_id = mask_id
        self.mask_prob = mask_prob
        self.seed = seed
        self._offsets = torch.arange(seq_len + 1)

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.get_batch(torch.tensor([index]))
        return x[0], y[0]

    def get_batch(self, indices: torch.Tensor, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        starts = indices.to(torch.long) * self.seq_len
        windows = self.tokens[starts[:, None] + self._offsets[None, :]]
        if self.objective == "causal":
            return windows[:, :-1], windows[:, 1:]
        inputs = windows[:, :-1].clone()
        positions = torch.arange(self.seq_len)
        key = (
            (indices.to(torch.long)[:, None] * 1_000_003 + positions[None, :]) * 65_537
            + epoch * 7_919
            + self.seed * 104_729
        )
        uniform = (_mix(key) & 0xFFFFFF).to(torch.float64) / float(1 << 24)
        masked = uniform < self.mask_prob
        targets = torch.where(masked, inputs, torch.full_like(inputs, MASK_IGNORE))
        inputs[masked] = self.mask_id
        return inputs, targets
