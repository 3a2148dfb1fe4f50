"""Pinhole cameras as matrices: the only camera type the rasterizer and the refine stage know.

The conventions (orbits, field of view, how angles map to matrices) live in `sv3d/cameras.py`, which
builds these. Here: OpenGL/Blender camera frames (x right, y up, looking along -z) and OpenGL clip space.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Cameras:
    c2w: Tensor  # [V, 4, 4] camera-to-world, OpenGL convention
    projection: Tensor  # [4, 4] or [V, 4, 4] camera -> clip (OpenGL, z/w in [-1, 1] between near and far)

    def __post_init__(self) -> None:
        if self.c2w.ndim != 3 or self.c2w.shape[-2:] != (4, 4):
            raise ValueError(f"c2w must be [V, 4, 4], got {tuple(self.c2w.shape)}")
        if self.projection.shape[-2:] != (4, 4):
            raise ValueError(f"projection must be [4, 4] or [V, 4, 4], got {tuple(self.projection.shape)}")

    def __len__(self) -> int:
        return self.c2w.shape[0]

    def to(self, device: torch.device | str) -> Cameras:
        return Cameras(self.c2w.to(device), self.projection.to(device))

    def __getitem__(self, idx) -> Cameras:
        c2w = self.c2w[idx]
        if c2w.ndim == 2:
            c2w = c2w[None]
        proj = self.projection if self.projection.ndim == 2 else self.projection[idx]
        return Cameras(c2w, proj)

    def world_to_camera(self) -> Tensor:
        """[V, 4, 4] view matrices."""
        return torch.linalg.inv(self.c2w)

    def world_to_clip(self) -> Tensor:
        """[V, 4, 4] model-view-projection matrices."""
        return self.projection.to(self.c2w) @ self.world_to_camera()

    def positions(self) -> Tensor:
        """[V, 3] camera centres in the world."""
        return self.c2w[:, :3, 3]


def transform_points(points: Tensor, matrices: Tensor) -> Tensor:
    """Homogeneous transform: points [N, 3], matrices [V, 4, 4] -> [V, N, 4]."""
    homo = torch.cat([points, torch.ones_like(points[:, :1])], dim=-1)  # [N, 4]
    return torch.einsum("vij,nj->vni", matrices, homo)
