"""Stage modules: a model's embeddings, a run of its blocks, or its head, as one module.

A :class:`ModelParts` says how a plain model decomposes (which submodules are
the embeddings, the block list and the head, and how to call them); GPT and
BERT have one. A :class:`StageModule` registers the original submodules under
their original names (``wte``, ``blocks.3``, ``lm_head``), so its parameters
are the model's own objects with the model's own state-dict keys: optimizers
built on the plain model keep working and checkpoints merge by key.

A stage runs its body under the autocast of its ``precision`` (bf16 mixed
precision) and hands its output on in its parameters' dtype, so what crosses
a stage boundary is always fp32 for an fp32 model (see :meth:`StageModule.forward`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distml.errors import ConfigError
from distml.models.bert import BERT
from distml.models.gpt import GPT
from distml.models.layers import check_sequence_length

# The stage is typed Any: it reaches the model's submodules by attribute name.
Forward = Callable[[Any, torch.Tensor], torch.Tensor]
#: (stage, its blocks in order, hidden states) -> hidden states after them.
RunBlocks = Callable[[Any, list[nn.Module], torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ModelParts:
    """How a model splits: embedding and head submodule names, and how to run them."""

    embed_names: tuple[str, ...]
    head_names: tuple[str, ...]
    embed_forward: Forward
    head_forward: Forward
    tied: tuple[tuple[str, str], ...]  # (first-stage parameter, last-stage parameter)
    #: Where the model registers its block list (the blocks' state-dict prefix).
    blocks_name: str = "blocks"
    #: How to run blocks (None: ``x = block(x)`` in turn); Hugging Face blocks need a mask.
    run_blocks: RunBlocks | None = None


def _gpt_embed(stage: Any, idx: torch.Tensor) -> torch.Tensor:
    t = idx.shape[1]
    check_sequence_length(t, stage.wpe.num_embeddings)
    pos = torch.arange(t, device=idx.device)
    out: torch.Tensor = stage.drop(stage.wte(idx) + stage.wpe(pos))
    return out


def _gpt_head(stage: Any, x: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = stage.lm_head(stage.ln_f(x))
    return out


def _bert_embed(stage: Any, idx: torch.Tensor) -> torch.Tensor:
    check_sequence_length(idx.shape[1], stage.embeddings.pos.num_embeddings)
    out: torch.Tensor = stage.embeddings(idx, torch.zeros_like(idx))
    return out


def _bert_head(stage: Any, x: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = stage.head(x)
    return out


def model_parts(model: nn.Module) -> ModelParts:
    """The decomposition of a supported model (distml's GPT and BERT, Hugging Face's GPT-2/BERT)."""
    from distml.parallel.pipeline.hf_parts import hf_model_parts

    hf = hf_model_parts(model)
    if hf is not None:
        return hf
    if isinstance(model, GPT):
        tied = model.lm_head.weight is model.wte.weight
        return ModelParts(
            ("wte", "wpe", "drop"),
            ("ln_f", "lm_head"),
            _gpt_embed,
            _gpt_head,
            (("wte.weight", "lm_head.weight"),) if tied else (),
        )
    if isinstance(model, BERT):
        tied = model.head.decoder.weight is model.embeddings.tok.weight
        return ModelParts(
            ("embeddings",),
            ("head",),
            _bert_embed,
            _bert_head,
            (("embeddings.tok.weight", "head.decoder.weight"),) if tied else (),
        )
    raise ConfigError(
        f"no pipeline plan for model {type(model).__name__}; use parallel.pp=1 or one of: "
        "gpt, bert, hf-gpt2, hf-bert"
    )


def run_blocks(parts: ModelParts, stage: Any, blocks: list[nn.Module], x: torch.Tensor) -> Any:
    if parts.run_blocks is not None:
        return parts.run_blocks(stage, blocks, x)
    for block in blocks:
        x = block(x)
    return x


def _attach(root: nn.Module, dotted: str, module: nn.Module) -> None:
    """Register ``module`` under ``root`` at a dotted path, adding empty parents as needed."""
    *parents, leaf = dotted.split(".")
    for name in parents:
        if name not in root._modules:
            root.add_module(name, nn.Module())
        child = root._modules[name]
        assert child is not None
        root = child
    root.add_module(leaf, module)


def _blocks(model: nn.Module) -> nn.ModuleList:
    blocks = model.blocks
    assert isinstance(blocks, nn.ModuleList)
    return blocks


class StageModule(nn.Module):
    """Blocks ``block_range`` of ``model``, plus the embeddings (first) and head (last).

    ``precision`` (``schedule.precision``: fp32 or bf16) is the autocast the
    stage's forward runs under; master weights stay in their own dtype.
    """

    def __init__(
        self,
        model: nn.Module,
        parts: ModelParts,
        block_range: range,
        first: bool,
        last: bool,
        precision: str = "fp32",
    ) -> None:
        super().__init__()
        self.parts = parts
        self.first, self.last = first, last
        self.block_range = block_range
        self.precision = precision
        # Registered at the model's own (possibly dotted) paths: same state-dict keys.
        for name in parts.embed_names if first else ():
            _attach(self, name, model.get_submodule(name))
        blocks = _blocks(model)
        _attach(self, parts.blocks_name, nn.ModuleDict({str(i): blocks[i] for i in block_range}))
        for name in parts.head_names if last else ():
            _attach(self, name, model.get_submodule(name))

    @property
    def stage_blocks(self) -> nn.ModuleDict:
        """This stage's blocks, keyed by their index in the model."""
        blocks = self.get_submodule(self.parts.blocks_name)
        assert isinstance(blocks, nn.ModuleDict)
        return blocks

    def refresh_blocks(self, model: nn.Module) -> None:
        """Run ``model``'s blocks as they are now (e.g. wrapped for recomputation since the cut).

        Full/every_k recomputation replaces entries of ``model.blocks`` by
        wrappers around the same blocks (same parameters, same state-dict keys);
        the stage must call the wrappers, not the blocks it captured at the cut.
        """
        blocks = _blocks(model)
        for i in self.block_range:
            self.stage_blocks[str(i)] = blocks[i]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from distml.memory.precision import autocast  # here: keeps `import distml.parallel` light

        dtype = next(self.parameters()).dtype
        with autocast(self.precision, x.device.type):
            if self.first:
                x = self.parts.embed_forward(self, x)
            x = run_blocks(self.parts, self, list(self.stage_blocks.values()), x)
            if self.last:
                x = self.parts.head_forward(self, x)
        # Autocast may leave the output in bf16 (the head's logits). Cast it back at the
        # stage boundary: torch.distributed.pipelining sizes its send/recv buffers from a
        # metadata pass, MeshForward allocates its buffers in the parameters' dtype, and the
        # loss takes fp32 logits (as the trainer's task_loss does). A no-op in fp32.
        return x.to(dtype) if x.is_floating_point() else x

    def extra_repr(self) -> str:
        return f"blocks={self.block_range.start}..{self.block_range.stop - 1}"


def _numel(modules: list[nn.Module]) -> float:
    return float(sum(p.numel() for m in modules for p in m.parameters()))


def param_costs(model: nn.Module, parts: ModelParts) -> tuple[list[float], float, float]:
    """(per-block, embeddings, head) parameter counts: the ``params`` balance."""
    embed = _numel([model.get_submodule(n) for n in parts.embed_names])
    head = _numel([model.get_submodule(n) for n in parts.head_names])
    return [_numel([b]) for b in _blocks(model)], embed, head


def _timed(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn().sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_costs(
    model: nn.Module, parts: ModelParts, example: torch.Tensor, repeats: int = 3
) -> tuple[list[float], float, float]:
    """(per-block, embeddings, head) forward+backward seconds: the ``time`` balance.

    Every rank measures and the results are averaged over the world, so all
    ranks agree on the cut (a rank that cut differently would deadlock).
    """
    holder = StageModule(model, parts, range(0), first=True, last=True)
    with torch.enable_grad():
        embed = _timed(lambda: parts.embed_forward(holder, example), repeats)
        hidden = parts.embed_forward(holder, example).detach().requires_grad_()
        blocks = [
            _timed(lambda b=b: run_blocks(parts, holder, [b], hidden), repeats)  # type: ignore[misc]
            for b in _blocks(model)
        ]
        head = _timed(lambda: parts.head_forward(holder, hidden), repeats)
    model.zero_grad(set_to_none=True)
    costs = torch.tensor([*blocks, embed, head], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(costs)
        costs /= dist.get_world_size()
    values = costs.tolist()
    return values[:-2], values[-2], values[-1]
