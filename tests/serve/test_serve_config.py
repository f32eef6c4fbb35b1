"""`distml serve CONFIG.yaml`: the serve: section, the latest checkpoint, flag precedence."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from distml.cli import main as cli
from distml.errors import UserError


def _config(tmp_path: Path, serve: str = "") -> Path:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir(parents=True)
    for step in (5, 12):
        (ckpt / f"step_{step:08d}.pt").write_bytes(b"x")
    path = tmp_path / "serve.yaml"
    path.write_text(
        f"checkpoint: {{dir: {ckpt}}}\nserve: {{replicas: 2, max_batch_size: 8{serve}}}\n"
    )
    return path


def test_config_serves_the_latest_checkpoint_with_its_settings(tmp_path: Path) -> None:
    model, settings = cli.serve_target(str(_config(tmp_path)), ["serve.max_delay_ms=1.5"])
    assert model == str(tmp_path / "ckpt" / "step_00000012.pt")
    assert settings["replicas"] == 2 and settings["max_batch_size"] == 8
    assert settings["max_delay_ms"] == 1.5 and settings["port"] == 8000
    explicit = _config(tmp_path / "b", ", checkpoint: /m/model.safetensors")
    assert cli.serve_target(str(explicit), [])[0] == "/m/model.safetensors"


def test_flags_override_the_config_and_defaults_fill_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {}

    def fake_serve_main(model: str, host: str, port: int, **settings: Any) -> None:
        seen.update(model=model, host=host, port=port, **settings)

    monkeypatch.setattr("distml.serve.serve_main", fake_serve_main)
    assert cli.main(["serve", str(_config(tmp_path)), "--replicas", "3", "--port", "9001"]) == 0
    assert seen["model"].endswith("step_00000012.pt")
    assert (seen["replicas"], seen["port"], seen["max_batch_size"]) == (3, 9001, 8)
    assert seen["host"] == "127.0.0.1" and "min_replicas" not in seen
    assert seen["access_log"] is False
    seen.clear()
    assert cli.main(["serve", "model.pt", "--wait-when-idle", "--access-log"]) == 0
    assert (seen["model"], seen["replicas"], seen["wait_when_idle"]) == ("model.pt", 1, True)
    assert seen["access_log"] is True


def test_bad_serve_targets_are_one_line_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text(f"checkpoint: {{dir: {tmp_path / 'none'}}}\n")
    with pytest.raises(UserError) as err:
        cli.serve_target(str(empty), [])
    assert str(err.value) == (
        f"no checkpoint in {tmp_path / 'none'} to serve; train first "
        "(distml train CONFIG) or set serve.checkpoint=PATH"
    )
    with pytest.raises(UserError, match=r"key=value overrides \(serve.port=1\) need a CONFIG"):
        cli.serve_target("model.pt", ["serve.port=1"])
    with pytest.raises(UserError, match="serve.replicas"):
        cli.serve_target(str(_config(tmp_path / "c")), ["serve.replicas=-1"])
