"""Learned shading of the refinement's colour: refine/shading.py and ColorField(shading=True)."""

from __future__ import annotations

import math

import pytest
import torch

from refine.color_field import ColorField, ColorFieldConfig
from refine.render import lambert
from refine.shading import SHShading, albedo_smoothness, sh_basis


def unit_normals(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1)  # [n, 3]


def test_a_new_shaded_field_is_its_albedo_and_an_unlit_one_ignores_normals():
    points, normals = torch.rand(100, 3) - 0.5, unit_normals(100)
    field = ColorField(ColorFieldConfig())
    assert field.shaded  # the default
    torch.testing.assert_close(field(points, normals), field.albedo(points))  # shading starts at 1
    unlit = ColorField(ColorFieldConfig(shading=False))
    assert not unlit.shaded and unlit.shading is None
    torch.testing.assert_close(unlit(points), unlit.albedo(points))


def test_a_shaded_field_needs_normals_of_its_points_shape():
    with pytest.raises(ValueError, match="needs normals"):
        ColorField()(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="needs normals"):
        ColorField()(torch.zeros(4, 3), torch.zeros(3, 3))


def test_nine_coefficients_hold_the_renderers_lambertian_lighting():
    # refine.render's lambert (three clamped lights fixed in the world, ambient, clamp at 1) by least squares
    normals = unit_normals(20000)
    target = lambert(normals)  # [N, 1]
    solution = torch.linalg.lstsq(sh_basis(normals), target).solution  # [9, 1]
    shading = SHShading()
    with torch.no_grad():
        shading.coefficients.copy_(solution.t().expand(3, 9))
    with torch.no_grad():
        error = (shading(normals) - target).abs()  # [N, 3]
    spread = float(target.max() - target.min())
    print(f"shading range {spread:.3f}, mean |error| {error.mean():.4f}, max {error.max():.4f}")
    # measured: range 0.550, mean |error| 0.0178 (3.4% of the shading on average), max 0.0773 (clamped lights)
    assert float(error.mean()) < 0.05 * spread and float(error.max()) < 0.2 * spread


def test_albedo_smoothness_is_zero_for_a_constant_albedo_and_the_mean_jump_for_a_ramp():
    points = torch.rand(1000, 3) - 0.5
    assert float(albedo_smoothness(lambda p: torch.full_like(p, 0.3), points, 4096, 0.01, 0.05)) == 0.0
    # A ramp a = 0.5 + x in every channel: E|3 dx| = 3 sigma sqrt(2 / pi) with no cap
    torch.manual_seed(0)
    ramp = albedo_smoothness(lambda p: 0.5 + p[:, :1].expand(-1, 3), points, 100_000, 0.01, 10.0)
    expected = 3 * 0.01 * math.sqrt(2 / math.pi)
    assert abs(float(ramp) - expected) < 0.02 * expected, (float(ramp), expected)


def test_albedo_smoothness_caps_a_texture_edge():
    # A black/white step at x = 0: a pair across it differs by 3, and costs the cap, no more
    step = lambda p: (p[:, :1] > 0).float().expand(-1, 3)  # noqa: E731
    points = torch.zeros(1000, 3)
    points[:, 0] = torch.linspace(-0.02, 0.02, 1000)
    torch.manual_seed(0)
    value = float(albedo_smoothness(step, points, 50_000, 0.01, 0.05))
    assert 0.0 < value < 0.05
    torch.manual_seed(0)
    uncapped = float(albedo_smoothness(step, points, 50_000, 0.01, 10.0))
    assert value == pytest.approx(uncapped * 0.05 / 3.0, rel=1e-5)  # the same crossing pairs, each capped


def test_albedo_smoothness_trains_the_albedo_only():
    field = ColorField()
    points = torch.rand(500, 3) - 0.5
    albedo_smoothness(field.albedo, points, 2048, 0.05, 0.05).backward()
    assert field.mlp[0].weight.grad.abs().sum() > 0
    assert field.shading.coefficients.grad is None
