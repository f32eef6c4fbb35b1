"""Config schema: defaults, overrides, and one-line errors naming the key."""

from __future__ import annotations

import pytest

from distml.config import Config, build_config, load_config, parse_overrides
from distml.errors import ConfigError


def test_default_config_is_the_digits_cnn_on_two_workers() -> None:
    cfg = load_config()
    assert (cfg.model.name, cfg.data.name, cfg.parallel.nproc) == ("cnn", "digits", 2)
    assert cfg.checkpoint.dir == "runs/digits-cnn/checkpoints"


def test_every_field_has_a_default() -> None:
    cfg = Config()
    assert cfg.optimizer.name == "sgd" and cfg.schedule.epochs > 0


def test_overrides_are_parsed_as_yaml_and_nested() -> None:
    cfg = load_config(
        overrides=["optimizer.lr=0.25", "schedule.decay=linear", "model.args={hidden: 32}"]
    )
    assert cfg.optimizer.lr == 0.25
    assert cfg.schedule.decay == "linear"
    assert cfg.model.args == {"hidden": 32}
    assert parse_overrides(["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["optimizer.lrr=1"])
    assert str(err.value) == (
        "unknown config key 'optimizer.lrr' in the default config; check the spelling "
        "(see `distml config`)"
    )


def test_unknown_section_in_file_is_named(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("optimiser:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'optimiser' in .*c\.yaml"):
        load_config(path)


def test_wrong_type_is_named() -> None:
    with pytest.raises(ConfigError) as err:
        build_config({"schedule": {"epochs": "ten"}})
    assert str(err.value).startswith("invalid config value for 'schedule.epochs' in config:")
    assert "(got 'ten')" in str(err.value)


def test_out_of_range_and_bad_choice() -> None:
    with pytest.raises(ConfigError, match="data.global_batch_size"):
        build_config({"data": {"global_batch_size": 0}})
    with pytest.raises(ConfigError, match="optimizer.name"):
        build_config({"optimizer": {"name": "adagrad"}})


def test_malformed_override_and_yaml(tmp_path) -> None:
    with pytest.raises(ConfigError, match="is not of the form key=value"):
        parse_overrides(["=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML at line \d+"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_round_trip_through_dict() -> None:
    cfg = load_config(overrides=["optimizer.name=lamb"])
    assert build_config(cfg.to_dict()) == cfg
