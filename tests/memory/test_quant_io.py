"""Quantized safetensors export: tensors only, exact round-trip, ties stored once, clear errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from distml.errors import CheckpointError
from distml.memory import (
    QuantizedEmbedding,
    QuantizedLinear,
    load_quantized,
    quantize_model,
    quantized_state_dict,
    read_quantized_metadata,
    save_quantized,
)


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(60, 32)
        self.mlp = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 32))
        self.ln = nn.LayerNorm(32)
        self.lm_head = nn.Linear(32, 60, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.wte(ids)
        return self.lm_head(self.ln(h + self.mlp(h)))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


@pytest.mark.parametrize(
    "kwargs",
    [{"bits": 8}, {"bits": 8, "compute": "int8"}, {"bits": 4}, {"bits": 4, "symmetric": False}],
)
def test_save_load_roundtrip_gives_identical_outputs(
    tmp_path: Path, trained_mlp: nn.Module, digits: tuple[torch.Tensor, ...], kwargs: dict
) -> None:
    model = quantize_model(copy.deepcopy(trained_mlp), skip=["2"], **kwargs)
    path = tmp_path / "mlp.safetensors"
    save_quantized(model, path, {"model": "mlp", "hidden": 128})
    loaded = load_quantized(path, _mlp)
    assert isinstance(loaded[0], QuantizedLinear) and type(loaded[2]) is nn.Linear
    assert loaded[0].compute == kwargs.get("compute", "dequant")
    x = digits[2]
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert read_quantized_metadata(path) == {"model": "mlp", "hidden": 128}


def test_state_dict_is_tensors_plus_json_metadata() -> None:
    model = quantize_model(TiedLM(), bits=4, group_size=16, symmetric=False, skip=["mlp.2"])
    tensors, meta = quantized_state_dict(model)
    json.dumps(meta)  # JSON-able
    int4 = {"bits": 4, "group_size": 16, "symmetric": False, "compute": "dequant"}
    assert meta["modules"] == {
        "wte": {"kind": "embedding", **int4},
        "mlp.0": {"kind": "linear", **int4},
        "lm_head": {"kind": "linear", **int4},
    }
    assert meta["tied"] == [["wte", "lm_head"]]
    assert meta["aliases"] == {
        f"lm_head.weight_q.{b}": f"wte.weight_q.{b}" for b in ("qweight", "scale", "zero")
    }
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    assert tensors["wte.weight_q.qweight"].dtype == torch.uint8
    assert tensors["wte.weight_q.qweight"].shape == (60, 16)  # 32 codes packed in 16 bytes
    assert tensors["wte.weight_q.scale"].dtype == torch.float32
    assert tensors["mlp.2.weight"].dtype == torch.float32  # skipped stays float
    assert not any(k.startswith("lm_head") for k in tensors)


def test_tied_model_roundtrip_stores_tie_once_and_reties(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = quantize_model(TiedLM(), bits=8)
    path = tmp_path / "lm.safetensors"
    save_quantized(model, path)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert "wte.weight_q.qweight" in keys and "lm_head.weight_q.qweight" not in keys
    loaded = load_quantized(path, TiedLM)
    assert isinstance(loaded.wte, QuantizedEmbedding)
    assert loaded.wte.weight_q.qweight is loaded.lm_head.weight_q.qweight
    ids = torch.randint(0, 60, (3, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    assert not loaded.training


def test_loading_into_a_different_architecture_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "mlp.safetensors"
    save_quantized(quantize_model(_mlp(), bits=8), path)
    with pytest.raises(CheckpointError, match=r"does not fit the built model .*build the saved"):
        load_quantized(path, lambda: nn.Sequential(nn.Linear(64, 99), nn.ReLU(), nn.Linear(99, 10)))
    with pytest.raises(CheckpointError, match=r"names module '2' that the built model lacks"):
        load_quantized(path, lambda: nn.Sequential(nn.Linear(64, 128)))
    with pytest.raises(CheckpointError, match=r"module '0' is Embedding but was saved as"):
        load_quantized(
            path, lambda: nn.Sequential(nn.Embedding(64, 128), nn.ReLU(), nn.Linear(128, 10))
        )


def test_foreign_missing_and_corrupt_files_are_checkpoint_errors(tmp_path: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match=r"has no distml quantization metadata; save it with"):
        load_quantized(plain, _mlp)
    with pytest.raises(CheckpointError, match=r"does not exist; check the path"):
        load_quantized(tmp_path / "nope.safetensors", _mlp)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match=r"is not a readable safetensors file"):
        load_quantized(bad, _mlp)
    assert not list(tmp_path.glob("*.tmp"))
