"""A fixed occupancy grid that lets the renderer skip samples in space known to be empty.

On CUDA, nerfacc's `OccGridEstimator` does this with its own kernels; on CPU we keep nerfacc's batched
volume rendering and only evaluate the field where the grid says "maybe occupied" (density 0 elsewhere).
The grid comes from the caller (e.g. the visual hull of the frames' masks, dilated): where it is
conservative, i.e. covers the object, renders are the same as without it.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["OccupancyGrid"]


class OccupancyGrid:
    """Boolean grid over [-bound, bound]^3, index order (x, y, z), cells as in `density_grid`."""

    def __init__(self, occupied: Tensor, bound: float, dilate: int = 2) -> None:
        if occupied.ndim != 3 or len(set(occupied.shape)) != 1:
            raise ValueError(f"occupied must be a cubic [R, R, R] grid, got {tuple(occupied.shape)}")
        if dilate < 0:
            raise ValueError(f"dilate must be >= 0 cells, got {dilate}")
        grid = occupied.bool()[None, None].float()  # [1, 1, R, R, R]
        if dilate:
            # A max filter: every cell within `dilate` cells of an occupied one counts as occupied.
            grid = torch.nn.functional.max_pool3d(grid, 2 * dilate + 1, stride=1, padding=dilate)
        self.occupied = grid[0, 0] > 0  # [R, R, R]
        self.bound = float(bound)
        self.resolution = occupied.shape[0]

    def to(self, device: torch.device | str) -> OccupancyGrid:
        out = OccupancyGrid.__new__(OccupancyGrid)
        out.occupied, out.bound, out.resolution = self.occupied.to(device), self.bound, self.resolution
        return out

    @property
    def fraction(self) -> float:
        """Share of the cells that are occupied."""
        return float(self.occupied.float().mean())

    def __call__(self, points: Tensor) -> Tensor:
        """[N, 3] world points -> [N] bool: inside the cube and in an occupied cell."""
        cell = ((points / self.bound + 1.0) * 0.5 * self.resolution).floor().long()  # [N, 3]
        inside = ((cell >= 0) & (cell < self.resolution)).all(-1)
        cell = cell.clamp(0, self.resolution - 1)
        return inside & self.occupied[cell[:, 0], cell[:, 1], cell[:, 2]]

    def ray_bounds(self, origins: Tensor, directions: Tensor) -> tuple[Tensor, Tensor]:
        """(near, far) [R] where rays [R, 3] cross the box around the occupied cells (slab method).

        Rays that miss the box get near == far, so `far > near` marks the rays worth sampling; sampling
        only this span puts all of a ray's samples where the object can be.
        """
        cells = self.occupied.nonzero()  # [K, 3]
        if cells.numel() == 0:
            zero = origins.new_zeros(origins.shape[0])
            return zero, zero
        size = 2.0 * self.bound / self.resolution
        lo = cells.min(0).values.to(origins) * size - self.bound  # [3], on the rays' device
        hi = (cells.max(0).values + 1).to(origins) * size - self.bound  # [3]
        inv = 1.0 / torch.where(directions.abs() < 1e-12, torch.full_like(directions, 1e-12), directions)
        t0, t1 = (lo - origins) * inv, (hi - origins) * inv  # [R, 3] each
        near = torch.minimum(t0, t1).amax(-1).clamp(min=0.0)  # [R]
        far = torch.maximum(t0, t1).amin(-1).clamp(min=0.0)  # [R]
        return near, torch.maximum(far, near)
