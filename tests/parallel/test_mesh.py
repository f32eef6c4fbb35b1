"""The (dp, pp, tp) mesh: size validation and axis checks (the layout is tested at world 4)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from distml.errors import ConfigError
from distml.parallel.mesh import build_mesh, check_parallel_dims, require_axes


def test_sizes_must_multiply_to_the_world() -> None:
    check_parallel_dims(2, 2, 2, 8)
    with pytest.raises(ConfigError) as info:
        check_parallel_dims(2, 2, 1, 2)
    assert str(info.value) == (
        "parallel.dp x pp x tp = 2 x 2 x 1 = 4 does not match the world size 2; "
        "launch 4 processes or change the sizes"
    )
    with pytest.raises(ConfigError, match=r"^parallel.tp must be a positive integer, got 0$"):
        check_parallel_dims(1, 1, 0, 1)


def test_build_mesh_checks_sizes_before_touching_the_network() -> None:
    # No process group here: the world is this one process.
    with pytest.raises(ConfigError, match=r"= 4 does not match the world size 1;"):
        build_mesh(2, 2, 1)
    with pytest.raises(ConfigError, match=r"^build_mesh needs an initialised process group"):
        build_mesh()


def test_require_axes_names_what_is_missing() -> None:
    mesh = SimpleNamespace(mesh_dim_names=("dp", "tp"))
    require_axes(mesh, "dp", "tp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"lacks \['pp'\]"):
        require_axes(mesh, "tp", "pp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"lacks \['tp'\]"):
        require_axes(SimpleNamespace(mesh_dim_names=None), "tp")  # type: ignore[arg-type]
