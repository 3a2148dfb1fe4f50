"""Differentiable marching tetrahedra: the iso-surface of a signed field on a tet mesh.

Follows DMTet (Shen et al. 2021, sec. 3.1.2, "Marching Tetrahedra for Iso-surface Extraction") as used by
threestudio / nvdiffrec: each tet whose vertices do not all share the SDF's sign contributes one triangle
(1 or 3 vertices inside) or two (2 inside), with vertices at the linear zero crossings of the SDF along
the tet's edges,

    v = (v_a * s_b - v_b * s_a) / (s_b - s_a),

which is differentiable in both the SDF values s and the grid positions v_a, v_b (so DMTet can learn
both). Conventions:

- sdf < 0 is INSIDE, sdf >= 0 is outside (an exact zero counts as outside, everywhere, so that the
  choice of crossing edges is consistent between neighbouring tets).
- One output vertex per crossed grid edge, shared by all tets around that edge, so the surface is
  watertight and manifold wherever it does not reach the boundary of the grid.
- Faces are counter-clockwise seen from outside: normals point towards increasing sdf. This needs the
  tets to have positive volume, det(v1 - v0, v2 - v0, v3 - v0) > 0 (as `refine.tetgrid` builds them);
  an inverted tet gives inverted triangles.

The triangle table (16 sign cases) is derived at import from a reference tet rather than typed in, and
every triangle's orientation is checked there against the inside-to-outside direction.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .tetgrid import TET_EDGES

__all__ = ["crossed_tets", "marching_tets"]


def _triangle_table() -> tuple[np.ndarray, np.ndarray]:
    """[16, 6] local edge ids (two triangles, -1 padded) and [16] triangle counts per sign case.

    Case index = sum over local vertices i of inside_i << i. Built on the reference tet
    (0,0,0), (1,0,0), (0,1,0), (0,0,1) (positive volume); orientation is affine invariant for maps of
    positive determinant, so the table holds for every positively oriented tet.
    """
    ref = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float64)
    edge_id = {frozenset(e): k for k, e in enumerate(TET_EDGES)}
    table = np.full((16, 6), -1, dtype=np.int64)
    counts = np.zeros(16, dtype=np.int64)
    for case in range(16):  # a loop over the 16 cases of the table, once at import
        inside = [i for i in range(4) if case >> i & 1]
        outside = [i for i in range(4) if not case >> i & 1]
        if len(inside) in (1, 3):
            lone, others = (inside[0], outside) if len(inside) == 1 else (outside[0], inside)
            tris = [[edge_id[frozenset((lone, o))] for o in others]]
        elif len(inside) == 2:
            (a, b), (c, d) = inside, outside
            # The 4 crossed edges form a quad in the cyclic order ac, ad, bd, bc; split along ac-bd.
            ac, ad, bd, bc = (edge_id[frozenset(p)] for p in ((a, c), (a, d), (b, d), (b, c)))
            tris = [[ac, ad, bd], [ac, bd, bc]]
        else:
            continue
        towards_out = ref[outside].mean(0) - ref[inside].mean(0)  # crosses the cut plane inside -> out
        for t, tri in enumerate(tris):
            mids = np.stack([ref[list(TET_EDGES[e])].mean(0) for e in tri])  # [3, 3]
            normal = np.cross(mids[1] - mids[0], mids[2] - mids[0])
            if normal @ towards_out < 0:
                tri = [tri[0], tri[2], tri[1]]
            table[case, 3 * t : 3 * t + 3] = tri
        counts[case] = len(tris)
    return table, counts


_TABLE, _COUNTS = _triangle_table()


def crossed_tets(inside: Tensor, tets: Tensor) -> Tensor:
    """[T] bool: the tets [T, 4] whose corners are neither all inside nor all outside (inside [N] bool)."""
    # The 4 inside flags of a tet as bytes of one int32 (a cheap reduction over 4 bytes): the tet is
    # crossed unless they are all 0 or all 1 (0x01010101 reads the same in either byte order).
    packed = inside.to(torch.uint8)[tets].view(torch.int32).squeeze(1)  # [T, 4] uint8 -> [T] int32
    return (packed != 0) & (packed != 0x01010101)


def marching_tets(
    vertices: Tensor,  # [N, 3] float, grid vertex positions (may require grad)
    tets: Tensor,  # [T, 4] int64, positive volume
    sdf: Tensor,  # [N] float, < 0 inside (may require grad)
    edges: Tensor | None = None,  # [T, 6] int64 optional: global edge id per tet edge (see below)
    all_crossed: bool = False,  # the caller passes only tets the surface crosses: skip selecting them
) -> tuple[Tensor, Tensor]:
    """Iso-surface sdf = 0 as (verts [M, 3], faces [K, 3] int64), differentiable in sdf and vertices.

    Only tets with mixed signs are processed (`all_crossed`: the caller found them already). `edges`,
    the second output of `tet_edges(tets, return_tet_edges=True)`, names the crossed edges directly
    instead of deduplicating them per call; results are the same either way (same vertex order: sorted
    by edge). Returns empty [0, 3] tensors when the surface is empty. `verts` has the dtype of `vertices`
    and `sdf` combined; `faces` are CCW seen from outside (normals towards increasing sdf). Runs on the
    inputs' device.
    """
    # 1. Check inputs
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise ValueError(f"vertices must be [N, 3], got {tuple(vertices.shape)}")
    if tets.ndim != 2 or tets.shape[1] != 4 or tets.dtype != torch.int64:
        raise ValueError(f"tets must be [T, 4] int64, got {tuple(tets.shape)} {tets.dtype}")
    if sdf.shape != (vertices.shape[0],):
        raise ValueError(f"sdf must be [N] = [{vertices.shape[0]}], got {tuple(sdf.shape)}")
    if edges is not None and (edges.shape != (tets.shape[0], 6) or edges.dtype != torch.int64):
        raise ValueError(f"edges must be [T, 6] = [{tets.shape[0]}, 6] int64, got {tuple(edges.shape)}")
    device = vertices.device
    dtype = torch.promote_types(vertices.dtype, sdf.dtype)

    # 2. Select the tets that the surface crosses
    inside = sdf.detach() < 0  # [N] bool; an exact zero is outside
    crossed = None if all_crossed else crossed_tets(inside, tets)  # [T]
    if tets.shape[0] == 0 or (crossed is not None and not bool(crossed.any())):
        # Still attached to the graph, so that a caller's backward() does not fail on an empty surface.
        empty_v = vertices.new_zeros((0, 3), dtype=dtype) + 0.0 * (vertices.sum() + sdf.sum())
        return empty_v, torch.zeros((0, 3), dtype=torch.int64, device=device)
    sel = None if crossed is None else crossed.nonzero().squeeze(1)  # [Tc]
    tets_c = tets if sel is None else tets[sel]  # [Tc, 4]
    inside_c = inside[tets_c]  # [Tc, 4]

    # 3. One output vertex per crossed grid edge
    local = torch.tensor(TET_EDGES, device=device)  # [6, 2]
    pairs = tets_c[:, local]  # [Tc, 6, 2] global vertex ids of each tet edge
    edge_crossed = inside_c[:, local[:, 0]] != inside_c[:, local[:, 1]]  # [Tc, 6]
    if edges is None:
        pairs_sorted = torch.sort(pairs, dim=2).values
        keys = pairs_sorted[..., 0] * vertices.shape[0] + pairs_sorted[..., 1]  # [Tc, 6]
    else:
        keys = edges if sel is None else edges[sel]  # [Tc, 6]
    uniq, inverse = torch.unique(keys[edge_crossed], return_inverse=True)  # [M], [n_crossed]
    vert_of_edge = torch.full(keys.shape, -1, dtype=torch.int64, device=device)  # [Tc, 6]
    vert_of_edge[edge_crossed] = inverse
    # Endpoints of each output vertex's edge: the first occurrence of each unique edge.
    first = torch.full((uniq.shape[0],), pairs.shape[0] * 6, dtype=torch.int64, device=device)
    flat_pos = torch.arange(pairs.shape[0] * 6, device=device).reshape(-1, 6)[edge_crossed]
    first = first.scatter_reduce(0, inverse, flat_pos, reduce="amin")  # [M]
    ends = torch.sort(pairs.reshape(-1, 2)[first], dim=1).values  # [M, 2], a < b: same maths either side

    # 4. Zero crossings, differentiable in the positions and the sdf
    va, vb = vertices[ends[:, 0]].to(dtype), vertices[ends[:, 1]].to(dtype)  # [M, 3]
    sa, sb = sdf[ends[:, 0]].to(dtype)[:, None], sdf[ends[:, 1]].to(dtype)[:, None]  # [M, 1]
    verts = (va * sb - vb * sa) / (sb - sa)  # [M, 3]; |sb - sa| >= |s_inside| > 0

    # 5. Triangles from the 16-case table
    weights = torch.tensor([1, 2, 4, 8], device=device)
    case = (inside_c.long() * weights).sum(dim=1)  # [Tc]
    table = torch.as_tensor(_TABLE, device=device)[case].reshape(-1, 2, 3)  # [Tc, 2, 3] local edge ids
    count = torch.as_tensor(_COUNTS, device=device)[case]  # [Tc] in {1, 2}
    keep = torch.arange(2, device=device)[None, :] < count[:, None]  # [Tc, 2]
    tri_edges = table[keep]  # [K, 3]
    tri_tet = torch.arange(tets_c.shape[0], device=device)[:, None].expand(-1, 2)[keep]  # [K]
    faces = vert_of_edge[tri_tet[:, None], tri_edges]  # [K, 3]
    return verts, faces
