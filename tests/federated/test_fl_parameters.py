"""Parameters: fixed state_dict order, round trips through modules and bytes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distml.errors import UserError
from distml.federated.parameters import (
    add_update,
    flatten,
    get_parameters,
    num_bytes,
    parameter_names,
    parameters_from_bytes,
    parameters_to_bytes,
    set_parameters,
    subtract,
    unflatten,
)


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_get_set_round_trip_follows_state_dict_order() -> None:
    torch.manual_seed(0)
    src, dst = _model(), _model()
    params = get_parameters(src)
    assert parameter_names(src) == list(src.state_dict())
    assert [tuple(p.shape) for p in params] == [tuple(t.shape) for t in src.state_dict().values()]
    set_parameters(dst, params)
    for a, b in zip(src.state_dict().values(), dst.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # get_parameters copies: training the source later does not change them.
    with torch.no_grad():
        src[0].weight.add_(1.0)
    assert not torch.equal(params[0], src[0].weight)


def test_set_parameters_rejects_wrong_count_and_shape() -> None:
    model = _model()
    params = get_parameters(model)
    with pytest.raises(UserError, match="got 2 tensors for a model with 9 state entries"):
        set_parameters(model, params[:2])
    params[0] = torch.zeros(5, 5)
    with pytest.raises(UserError, match=r"parameter '0.weight' has shape \(5, 5\)"):
        set_parameters(model, params)


def test_flatten_unflatten_and_updates_keep_integer_buffers() -> None:
    params = get_parameters(_model())
    vec = flatten(params)
    assert vec.numel() == sum(p.numel() for p in params)
    back = unflatten(vec, params)
    for a, b in zip(params, back, strict=True):
        assert torch.equal(a.float(), b)
    new = [p + 1 for p in params]
    update = subtract(new, params)
    assert all(u.is_floating_point() for u in update)
    restored = add_update(params, update)
    for a, b in zip(new, restored, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)  # num_batches_tracked stays int64


def test_bytes_round_trip_is_exact() -> None:
    params = get_parameters(_model())
    data = parameters_to_bytes(params)
    back = parameters_from_bytes(data)
    assert len(back) == len(params)
    for a, b in zip(params, back, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert num_bytes(params) == sum(p.numel() * p.element_size() for p in params)
