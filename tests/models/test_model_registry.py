"""Registry behaviour for the built-in models: names, validation messages, import rules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distml.models
from distml.errors import ConfigError
from distml.models import build_model, get_model_spec, make_model_config, model_names

BUILTINS = {
    "mlp": "classification",
    "cnn": "classification",
    "resnet": "classification",
    "gpt": "causal_lm",
    "bert": "masked_lm",
}


def test_builtins_registered_with_their_tasks() -> None:
    assert set(BUILTINS) <= set(model_names())
    for name, task in BUILTINS.items():
        assert get_model_spec(name).task == task


def test_unknown_model_name_message() -> None:
    with pytest.raises(ConfigError) as info:
        build_model("nope")
    assert str(info.value) == (
        "unknown model 'nope' (model.name); choose one of: " + ", ".join(model_names())
    )
    listed = str(info.value).split("choose one of: ")[1].split(", ")
    assert {"bert", "bert-qa", "cnn", "gpt", "hf-bert", "hf-gpt2", "mlp", "resnet"} <= set(listed)


def test_unknown_arg_message() -> None:
    with pytest.raises(ConfigError) as info:
        build_model("gpt", {"n_layers": 2})
    assert str(info.value) == (
        "unknown key model.args.n_layers for model 'gpt'; valid keys: vocab_size, block_size, "
        "n_layer, n_head, n_embd, dropout, bias, tie_weights"
    )


@pytest.mark.parametrize(
    ("name", "args", "loc", "shown"),
    [
        ("mlp", {"in_features": "abc"}, "model.args.in_features:", "'abc'"),
        ("mlp", {"hidden": "wide"}, "model.args.hidden:", "'wide'"),
        ("mlp", {"hidden": [16, "x"]}, "model.args.hidden.1:", "'x'"),
        ("gpt", {"bias": "maybe"}, "model.args.bias:", "'maybe'"),
    ],
)
def test_wrong_type_rejected(name: str, args: dict[str, object], loc: str, shown: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_model(name, args)
    msg = str(info.value)
    assert msg.startswith(loc) and msg.endswith(f"(got {shown})"), msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        (
            "gpt",
            {"n_embd": 130, "n_head": 4},
            "model.args.n_embd (130) must be divisible by model.args.n_head (4); "
            "pick n_embd as a multiple of n_head",
        ),
        ("bert", {"n_head": 0}, "model.args.n_head must be a positive integer, got 0"),
        (
            "resnet",
            {"norm": "layer"},
            "model.args.norm must be one of batch, group, none, got 'layer'",
        ),
        (
            "resnet",
            {"widths": [8, 16], "blocks_per_stage": [1]},
            "model.args.widths and blocks_per_stage must be non-empty lists of the same length "
            "(one entry per stage); got [8, 16] and [1]",
        ),
        (
            "cnn",
            {"image_size": 5},
            "model.args.image_size=5 is too small for 2 unpadded 3x3 convs and a 2x2 pool; "
            "use image_size >= 6 or fewer channels entries",
        ),
        ("mlp", {"dropout": 1.0}, "model.args.dropout must be in [0, 1), got 1.0"),
    ],
)
def test_bad_values_give_one_line_config_error(
    name: str, args: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        build_model(name, args)
    assert str(info.value) == message


def test_cnn_smallest_image_size_accepted() -> None:
    # Boundary of the image_size check above: 6 - 2*2 = 2 pixels, pooled to 1.
    model = build_model("cnn", {"image_size": 6})
    assert model(torch.randn(2, 1, 6, 6)).shape == (2, 10)


def test_dataset_defaults_fill_known_fields_and_args_win() -> None:
    defaults = {"num_classes": 3, "in_channels": 3, "image_size": 32, "vocab_size": 99}
    cfg = make_model_config("cnn", {"num_classes": 5}, defaults)
    assert (cfg.in_channels, cfg.image_size, cfg.num_classes) == (3, 32, 5)
    model = build_model("cnn", {}, defaults)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_model_files_import_only_registry_layers_and_errors() -> None:
    allowed = {"distml.errors", "distml.models.registry", "distml.models.layers"}
    pkg = Path(distml.models.__file__).parent
    for path in pkg.glob("*.py"):
        if path.name == "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            else:
                continue
            for mod in mods:
                if mod.startswith("distml"):
                    assert mod in allowed or mod == "distml.models", f"{path.name}: {mod}"


def test_importing_a_model_module_first_registers_all_builtins() -> None:
    # A fresh interpreter catches import cycles that a warm sys.modules would hide.
    code = (
        "import distml.models.layers\n"
        "from distml.models.registry import model_names\n"
        "print(','.join(model_names()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert set(BUILTINS) <= set(out.stdout.strip().split(","))
