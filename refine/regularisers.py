"""Surface regularisers of the refinement (SV3D paper, fine stage; nvdiffrec / threestudio's DMTet losses).

Both take the current marching-tets mesh, whose topology changes every step, so adjacency is rebuilt
each step with sorts (no Python loops): the normal consistency takes the antialiasing's edge topology.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .rasterizer import edge_topology

__all__ = ["laplacian_loss", "normal_consistency_loss"]


def laplacian_loss(vertices: Tensor, faces: Tensor) -> Tensor:
    """Mean squared uniform Laplacian |mean(neighbours) - v|^2 over the vertices [N, 3] of faces [F, 3]."""
    if faces.shape[0] == 0:
        return vertices.sum() * 0.0
    n = vertices.shape[0]
    a = faces[:, [0, 1, 2, 1, 2, 0]].reshape(-1)  # [6F] each directed edge of every face
    b = faces[:, [1, 2, 0, 0, 1, 2]].reshape(-1)
    neighbour_sum = torch.zeros_like(vertices).index_add_(0, a, vertices[b])  # [N, 3]
    degree = torch.bincount(a, minlength=n).clamp(min=1).to(vertices.dtype)[:, None]  # [N, 1]
    used = torch.bincount(a, minlength=n) > 0
    delta = neighbour_sum / degree - vertices  # [N, 3]; an edge shared by 2 faces counts twice, evenly
    return delta[used].pow(2).sum(-1).mean()


def normal_consistency_loss(vertices: Tensor, faces: Tensor, topology: Tensor | None = None) -> Tensor:
    """Mean (1 - cos) between the normals of faces that share an edge; 0 for a flat surface.

    `topology` [F, 3]: `edge_topology(faces)` (the face across each edge), when the caller has it already
    (the refinement's antialiasing needs it too). Each edge shared by exactly two faces counts once.
    """
    if faces.shape[0] == 0:
        return vertices.sum() * 0.0
    v0, v1, v2 = vertices[faces[:, 0]], vertices[faces[:, 1]], vertices[faces[:, 2]]
    normals = torch.nn.functional.normalize(torch.cross(v1 - v0, v2 - v0, dim=-1), dim=-1)  # [F, 3]
    opposite = edge_topology(faces) if topology is None else topology  # [F, 3]; < 0: no single neighbour
    face = torch.arange(faces.shape[0], device=faces.device)[:, None].expand_as(opposite)  # [F, 3]
    once = opposite > face  # the pair (f, g) is seen from f and from g: keep it where f < g
    if not bool(once.any()):
        return vertices.sum() * 0.0
    fa, fb = face[once], opposite[once]
    return (1.0 - (normals[fa] * normals[fb]).sum(-1)).mean()
