"""Colour smoothness: a truncated L1 difference of a colour field between surface points and jittered copies.

Used by the NeRF's training (`nerf.train`, `color_smooth_weight`) and by the refinement's albedo
(`refine.shading.albedo_smoothness`). Plain surfaces that the frames see only at grazing angles (a box's top
seen from elevation 10°) are otherwise painted in streaks along the views' rays, which views from higher up
show; the truncation (`cap`) leaves texture edges (a checker's, a stripe's) free, since a jump larger than the
cap costs the same at any size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["color_smoothness"]


def color_smoothness(
    color: Callable[[Tensor], Tensor],  # points [2P, 3] -> rgb [2P, 3]
    points: Tensor,  # [P, 3] surface points (no gradient needed)
    jitter: float,  # standard deviation of the offsets, world units
    cap: float,  # summed |difference| over RGB above this costs no more
) -> Tensor:
    """Mean over the points of min(|color(p) - color(p + jitter * N(0, I))|_1, cap); `color` gets the points
    and then their jittered copies in one batch."""
    if points.shape[0] == 0:
        return points.new_zeros(())
    here = points.detach()
    moved = here + jitter * torch.randn_like(here)
    rgb_here, rgb_moved = color(torch.cat([here, moved])).split(here.shape[0])  # [P, 3] each
    return (rgb_here - rgb_moved).abs().sum(dim=-1).clamp(max=cap).mean()
