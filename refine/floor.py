"""Floor height: how far down every view sees the surface, for cutting the hidden bottom flat.

Masks seen from above leave a solid wedge under an object that no frame sees, and a fit leaves a belly
there (the NeRF's density, the refined surface). Objects rest on something, so both stages take the hidden
bottom as flat at the height down to which the views see the surface (`sv3d.fit_nerf` empties the density
below it; `refine.fit.refine_surface` cuts its init there and keeps the surface above it after every step).

Each view's lowest seen point is the object's bottom edge for a flat base; a fit's corners droop a little
below it in some views (a refined box: lowest seen point 0.013 under its true edge, the highest of the
views' lowest points 0.006 under it). The highest of the views' lowest points is taken: every view sees
the surface down to it. On a symmetric orbit around an object standing on a flat base the views agree; a
base that some views see lower than others (a sloped or tilted bottom) loses what only those views see.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .camera import Cameras, transform_points
from .rasterizer import interpolate_covered, rasterize


@torch.no_grad()
def seen_floor_height(
    vertices: Tensor,  # [N, 3] world positions
    faces: Tensor,  # [F, 3] int
    cameras: Cameras,  # V views
    resolution: int,  # pixels per side of each view
) -> float | None:
    """The highest of the views' lowest visible surface points (first hits at pixel centres): every view
    that sees the surface sees it down to this z. None when no view sees it."""
    vertices = vertices.detach().float()
    faces = faces.to(device=vertices.device, dtype=torch.int64)
    cameras = cameras.to(vertices.device)
    rast = rasterize(transform_points(vertices, cameras.world_to_clip()), faces, resolution)  # [V, S, S, 4]
    covered, points = interpolate_covered(vertices, rast, faces)  # [P], [P, 3]
    if len(covered) == 0:
        return None
    view = torch.div(covered, resolution * resolution, rounding_mode="floor")  # [P] view of each pixel
    lowest = torch.full((len(cameras),), float("inf"), device=vertices.device)  # [V]
    lowest = lowest.scatter_reduce(0, view, points[:, 2], reduce="amin")
    seen = torch.isfinite(lowest)  # views that see some surface
    return float(lowest[seen].max())
