"""The triangle mesh that the rasterizer renders and the refine stage produces.

A plain container of tensors. Colour comes from, in this order: an image texture sampled at per-vertex
UVs, per-vertex colours, or one uniform colour. UVs follow the OBJ convention (origin at the bottom-left
of the image, v up); the texture is stored row 0 = top, as images are.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

DEFAULT_COLOR = (0.7, 0.7, 0.7)  # albedo of a mesh that carries no colour at all


@dataclass
class Mesh:
    vertices: Tensor  # [N, 3] float32, world frame (z up)
    faces: Tensor  # [F, 3] int64, counter-clockwise seen from outside
    vertex_normals: Tensor | None = None  # [N, 3] unit; computed from faces when None
    vertex_colors: Tensor | None = None  # [N, 3] albedo in [0, 1]
    uvs: Tensor | None = None  # [N, 2] in [0, 1] (wraps outside), origin bottom-left
    texture: Tensor | None = None  # [H, W, 3] albedo in [0, 1], row 0 = top
    color: tuple[float, float, float] = field(default=DEFAULT_COLOR)  # used when nothing above is set

    def __post_init__(self) -> None:
        if self.vertices.ndim != 2 or self.vertices.shape[-1] != 3:
            raise ValueError(f"vertices must be [N, 3], got {tuple(self.vertices.shape)}")
        if self.faces.ndim != 2 or self.faces.shape[-1] != 3:
            raise ValueError(f"faces must be [F, 3], got {tuple(self.faces.shape)}")
        if (self.uvs is None) != (self.texture is None):
            raise ValueError("uvs and texture must be given together")

    @property
    def device(self) -> torch.device:
        return self.vertices.device

    @property
    def has_texture(self) -> bool:
        return self.texture is not None

    def to(self, device: torch.device | str) -> Mesh:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return replace(
            self,
            vertices=self.vertices.to(device),
            faces=self.faces.to(device),
            vertex_normals=move(self.vertex_normals),
            vertex_colors=move(self.vertex_colors),
            uvs=move(self.uvs),
            texture=move(self.texture),
        )

    def normals(self) -> Tensor:
        """[N, 3] unit vertex normals: the stored ones, else area-weighted face normals."""
        if self.vertex_normals is not None:
            return self.vertex_normals
        return vertex_normals(self.vertices, self.faces)


def face_normals(vertices: Tensor, faces: Tensor, normalize: bool = True) -> Tensor:
    """[F, 3] face normals (right-hand rule); unnormalised ones have length 2 * area."""
    v0, v1, v2 = vertices[faces[:, 0]], vertices[faces[:, 1]], vertices[faces[:, 2]]
    n = torch.cross(v1 - v0, v2 - v0, dim=-1)
    return torch.nn.functional.normalize(n, dim=-1) if normalize else n


def vertex_normals(vertices: Tensor, faces: Tensor) -> Tensor:
    """[N, 3] area-weighted vertex normals; differentiable in the vertices."""
    fn = face_normals(vertices, faces, normalize=False)  # [F, 3], |fn| = 2 * area
    vn = torch.zeros_like(vertices).index_add_(0, faces.reshape(-1), fn.repeat_interleave(3, dim=0))
    return torch.nn.functional.normalize(vn, dim=-1)
