"""Camera rays of pinhole frames and their entry/exit of the scene's bounding sphere.

Cameras are camera-to-world matrices in the OpenGL/Blender convention (x right, y up, looking along -z), as
in the team's orbit directories and instant-ngp's `transforms.json`. Pixel (i, j) (column i, row j, row 0 at
the top) spans [i, i + 1) x [j, j + 1); its ray goes through its centre (i + 0.5, j + 0.5), so the principal
point (W/2, H/2) is the image centre. Pure functions over tensors; nothing here knows the orbit.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["generate_rays", "ray_sphere_bounds", "sample_bounds"]


def generate_rays(
    c2w: Tensor,  # [V, 4, 4] (or [4, 4]) camera-to-world, OpenGL convention
    focal_px: float,  # focal length in pixels (square pixels: fx = fy)
    width: int,  # image width W in pixels
    height: int,  # image height H in pixels
) -> tuple[Tensor, Tensor]:
    """Rays through every pixel centre of V pinhole cameras.

    Returns `(origins, directions)`, each `[V, H, W, 3]` in the dtype and device of `c2w` (a `[4, 4]` input
    gives `[H, W, 3]`); directions have unit length. Row 0 is the top of the image. Differentiable in `c2w`.
    """
    # 1. Check inputs
    single = c2w.ndim == 2
    if single:
        c2w = c2w[None]  # [4, 4] -> [1, 4, 4]
    if c2w.ndim != 3 or c2w.shape[-2:] != (4, 4):
        raise ValueError(f"c2w must be [V, 4, 4] or [4, 4], got shape {tuple(c2w.shape)}")
    if not c2w.is_floating_point():
        raise ValueError(f"c2w must be a floating-point tensor, got dtype {c2w.dtype}")
    if not (math.isfinite(float(focal_px)) and float(focal_px) > 0):
        raise ValueError(f"focal_px must be a finite number > 0, got {focal_px}")
    for name, size in (("width", width), ("height", height)):
        if isinstance(size, bool) or int(size) != size or size < 1:
            raise ValueError(f"{name} must be a positive integer, got {size}")
    width, height, focal = int(width), int(height), float(focal_px)

    # 2. Directions in the camera frame: x right, y up (rows go down), -z forward
    kw = {"dtype": c2w.dtype, "device": c2w.device}
    u = torch.arange(width, **kw) + 0.5  # [W] pixel-centre columns
    v = torch.arange(height, **kw) + 0.5  # [H] pixel-centre rows
    x = ((u - 0.5 * width) / focal)[None, :].expand(height, width)  # [H, W]
    y = (-(v - 0.5 * height) / focal)[:, None].expand(height, width)  # [H, W]
    d_cam = torch.stack([x, y, -torch.ones_like(x)], dim=-1)  # [H, W, 3]

    # 3. To world: rotate by the camera's axes, normalise; every ray starts at the camera centre
    rot = c2w[:, :3, :3]  # [V, 3, 3]
    directions = torch.einsum("vij,hwj->vhwi", rot, d_cam)  # [V, H, W, 3]
    directions = directions / directions.norm(dim=-1, keepdim=True)
    origins = c2w[:, None, None, :3, 3].expand_as(directions)  # [V, 3] -> [V, H, W, 3]
    if single:
        return origins[0], directions[0]
    return origins, directions


def ray_sphere_bounds(
    origins: Tensor,  # [..., 3] ray origins
    directions: Tensor,  # [..., 3] unit ray directions
    radius: float,  # sphere radius, centred at the world origin
) -> tuple[Tensor, Tensor]:
    """Distances `(near, far)`, each `[...]`, at which rays enter and leave the sphere |x| = radius.

    Solves |o + t d|^2 = r^2 for unit d: t^2 + 2 b t + c = 0 with b = o.d, c = |o|^2 - r^2, so
    t = -b -/+ sqrt(b^2 - c). `near` is clamped to 0 for origins inside the sphere. Rays that miss the
    sphere (or whose sphere lies behind them) get an empty interval near == far (at the closest approach,
    clamped to >= 0), so `far > near` marks the rays that hit.
    """
    if origins.shape[-1] != 3 or directions.shape != origins.shape:
        raise ValueError(
            f"origins and directions must both be [..., 3] of one shape, got {tuple(origins.shape)} "
            f"and {tuple(directions.shape)}"
        )
    if not (math.isfinite(float(radius)) and float(radius) > 0):
        raise ValueError(f"radius must be a finite number > 0, got {radius}")
    b = (origins * directions).sum(-1)  # [...]
    c = (origins * origins).sum(-1) - float(radius) ** 2  # [...]
    disc = b * b - c  # [...] < 0: the line misses the sphere
    half = disc.clamp(min=0.0).sqrt()
    near = (-b - half).clamp(min=0.0)
    far = (-b + half).clamp(min=0.0)
    miss = disc <= 0
    near = torch.where(miss, (-b).clamp(min=0.0), near)
    far = torch.where(miss, near, far)
    return near, far


def sample_bounds(
    origins: Tensor,  # [..., 3] ray origins
    directions: Tensor,  # [..., 3] unit ray directions
    radius: float,  # the scene's bounding sphere
    occupancy=None,  # has ray_bounds(origins [R, 3], directions [R, 3]) -> (near, far) [R]; or None
) -> tuple[Tensor, Tensor]:
    """The span `(near, far)`, each `[...]`, over which a ray's samples are spread: its chord of the
    bounding sphere, narrowed to the box of the occupied cells when `occupancy` has one. Training and every
    render of a field use this one span, so that a render's n samples lie as densely as training's did."""
    near, far = ray_sphere_bounds(origins, directions, radius)
    if occupancy is not None and hasattr(occupancy, "ray_bounds"):
        box_near, box_far = occupancy.ray_bounds(origins.reshape(-1, 3), directions.reshape(-1, 3))
        near = torch.maximum(near, box_near.to(near).reshape(near.shape))
        far = torch.minimum(far, box_far.to(far).reshape(far.shape))
    return near, far
