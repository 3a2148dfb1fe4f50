"""Learned lighting for the refined surface's colour: colour(x) = albedo(x) * shading(n(x)).

The frames' lighting is baked in and fixed in the world (SV3D's frames; `sv3d render-orbit`'s lambert), so a
point's colour depends on its normal as well as on its material. A colour field over positions alone can
paint any shape in the frames' colours, so on a plain surface nothing tells a dome from a flat top, or a
lid from a cup's inner wall. Factoring the colour into an albedo field and a shading of the world normal
lets the normals explain smooth brightness changes (shape from shading), so the photometric loss reaches
the geometry through its normals:

- `SHShading`: Lambertian reflection of distant light is, to within a few percent, a quadratic in the normal:
  nine spherical-harmonic coefficients per colour channel (Ramamoorthi & Hanrahan, "An efficient
  representation for irradiance environment maps", SIGGRAPH 2001). They are learned with the surface, since
  the frames' lighting is unknown; they start at shading 1 (the unlit colour field).
- `albedo_smoothness`: a truncated L1 difference of the albedo between surface points and jittered copies.
  Without it the albedo absorbs the shading and the normals learn nothing; the truncation (`cap`) leaves
  texture edges (a checker's, a stripe's) free, since a jump larger than the cap costs the same at any size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from nerf import color_smoothness

__all__ = ["SHShading", "albedo_smoothness", "sh_basis"]


def sh_basis(normals: Tensor) -> Tensor:
    """Real spherical harmonics up to degree 2 (unnormalised) of unit vectors [..., 3] -> [..., 9]."""
    x, y, z = normals.unbind(-1)
    return torch.stack(
        [torch.ones_like(x), x, y, z, x * y, y * z, 3.0 * z * z - 1.0, x * z, x * x - y * y], dim=-1
    )


class SHShading(nn.Module):
    """World unit normals [..., 3] -> RGB shading factors [..., 3] >= 0; nine learned coefficients each."""

    def __init__(self) -> None:
        super().__init__()
        coefficients = torch.zeros(3, 9)
        coefficients[:, 0] = 1.0  # shading 1 everywhere: starts as the unlit colour field
        self.coefficients = nn.Parameter(coefficients)  # [3, 9]

    def forward(self, normals: Tensor) -> Tensor:
        if normals.shape[-1] != 3:
            raise ValueError(f"normals must be [..., 3], got {tuple(normals.shape)}")
        return (sh_basis(normals) @ self.coefficients.t()).clamp(min=0.0)


def albedo_smoothness(
    albedo: Callable[[Tensor], Tensor],  # points [P, 3] -> rgb [P, 3]
    points: Tensor,  # [P, 3] surface points (no gradient needed)
    samples: int,  # points drawn (with replacement) from `points`
    jitter: float,  # standard deviation of the offsets, world units
    cap: float,  # summed |difference| over RGB above this costs no more
) -> Tensor:
    """Mean over `samples` surface points of min(|albedo(p) - albedo(p + jitter * N(0, I))|_1, cap)
    (`nerf.smoothness.color_smoothness` at points drawn from `points`)."""
    if points.shape[0] == 0 or samples < 1:
        return points.new_zeros(())
    pick = points.detach()[torch.randint(points.shape[0], (samples,), device=points.device)]  # [S, 3]
    return color_smoothness(albedo, pick, jitter, cap)
