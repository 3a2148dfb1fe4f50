"""The field's ReLU MLPs: the chunked CPU forward/backward gives autograd's values and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from nerf.field import FieldConfig, RadianceField
from nerf.mlp import CHUNK_ROWS, ReLUMLP, _ChunkedReLUMLP

_apply = _ChunkedReLUMLP.apply  # the chunked function itself, for the tests that count its calls


def _plain(mlp: ReLUMLP, x: torch.Tensor) -> torch.Tensor:
    return nn.Sequential.forward(mlp, x)  # the layers one after another, through autograd


def _grads(mlp: ReLUMLP, x: torch.Tensor, run) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    mlp.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    y = run(mlp, x)  # [N, 3]
    weights = torch.linspace(-1.0, 1.0, y.numel()).reshape(y.shape)
    (y.square() * weights).sum().backward()
    return y.detach(), [p.grad.clone() for p in mlp.parameters()], x.grad.clone()


def test_chunked_mlp_matches_autograd_over_several_chunks_and_a_partial_one(monkeypatch):
    torch.manual_seed(0)
    mlp = ReLUMLP([6, 16, 16, 3])
    x = torch.randn(2 * CHUNK_ROWS + 123, 6)  # two full chunks and a partial one
    calls = []
    monkeypatch.setattr(_ChunkedReLUMLP, "apply", lambda *a: calls.append(1) or _apply(*a))
    y, grads, gx = _grads(mlp, x, lambda m, t: m(t))
    assert calls == [1]  # the chunked function ran
    y0, grads0, gx0 = _grads(mlp, x, _plain)  # autograd, float32
    y64, grads64, gx64 = _grads(copy.deepcopy(mlp).double(), x.double(), _plain)  # autograd, float64
    assert (y64 > 0).any() and (y64 < 0).any()
    torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-6)
    for g, g0, g64 in zip(grads + [gx], grads0 + [gx0], grads64 + [gx64], strict=True):
        # float32 sums over 33k rows in another order than autograd's: as near float64's gradient as
        # autograd's, up to 2e-5 of the largest (the chunked excess measured at most 0.8e-5; both are off by
        # up to 3.7e-4 of the largest where the rows cancel)
        scale = float(g64.abs().max())
        err, err0 = float((g.double() - g64).abs().max()), float((g0.double() - g64).abs().max())
        assert err <= err0 + 2e-5 * scale, (err / scale, err0 / scale)


def test_chunked_mlp_gradcheck_float64():
    torch.manual_seed(1)
    x = torch.randn(23, 4, dtype=torch.float64, requires_grad=True)
    params = []
    for d_in, d_out in ((4, 5), (5, 5), (5, 2)):
        params += [
            torch.randn(d_out, d_in, dtype=torch.float64, requires_grad=True),
            torch.randn(d_out, dtype=torch.float64, requires_grad=True),
        ]
    # chunks of 7 rows: 3 full and a partial one; ReLU kinks are away from the random points
    assert torch.autograd.gradcheck(lambda x, *p: _ChunkedReLUMLP.apply(x, 7, *p), (x, *params))


def test_chunked_mlp_without_input_gradient_and_plain_path_elsewhere(monkeypatch):
    torch.manual_seed(2)
    mlp = ReLUMLP([3, 8, 2])
    calls = []
    monkeypatch.setattr(_ChunkedReLUMLP, "apply", lambda *a: calls.append(1) or _apply(*a))
    x = torch.randn(CHUNK_ROWS + 5, 3)  # no gradient wanted for x: the weights' only
    mlp(x).sum().backward()
    grads = [p.grad.clone() for p in mlp.parameters()]
    mlp.zero_grad(set_to_none=True)
    _plain(mlp, x).sum().backward()
    for g, p in zip(grads, mlp.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=0, atol=1e-5 * float(p.grad.abs().max()))
    assert calls == [1]
    with torch.no_grad():
        mlp(x)  # inference: the plain layers
    mlp(x[:100])  # a single chunk's worth: the plain layers
    mlp.double()(x.double())  # float64: the plain layers
    assert calls == [1]


def test_relu_mlp_keeps_the_field_parameter_names():
    field = RadianceField(FieldConfig(hidden_dim=8, color_layers=2))
    names = [k for k in field.state_dict() if "mlp" in k]
    assert names == [
        "density_mlp.0.weight",
        "density_mlp.0.bias",
        "density_mlp.2.weight",
        "density_mlp.2.bias",
        "color_mlp.0.weight",
        "color_mlp.0.bias",
        "color_mlp.2.weight",
        "color_mlp.2.bias",
        "color_mlp.4.weight",
        "color_mlp.4.bias",
    ]


@pytest.mark.parametrize("dims", [[3], [3, 0], [3, 2.5]])
def test_relu_mlp_rejects_bad_sizes(dims):
    with pytest.raises(ValueError, match="ReLUMLP needs"):
        ReLUMLP(dims)
