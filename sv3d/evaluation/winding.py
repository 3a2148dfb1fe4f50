"""Generalized winding numbers of query points with respect to a triangle soup.

The winding number w(q) = (1 / 4π) Σ_f Ω_f(q) sums the signed solid angles that the triangles subtend at q
(Jacobson, Kavan and Sorkine-Hornung, "Robust inside-outside segmentation using generalized winding
numbers", SIGGRAPH 2013). It is 1 inside and 0 outside a closed, outward-oriented surface, and degrades
gracefully on the open, self-intersecting or doubled surfaces that scanned meshes have, which is why the
evaluation protocol (ARCHITECTURE.md) decides inside/outside with it for the volume IoU.

Two implementations, tested against each other:
- `winding_numbers_exact`: every (query, triangle) pair, the Van Oosterom–Strackee solid angle,
  chunked so that memory stays bounded. O(Q·F).
- `winding_numbers_fast`: a Barnes–Hut style approximation (Barill et al., "Fast winding numbers for
  soups and clouds", SIGGRAPH 2018, §3): triangles are grouped into an octree built from the Morton codes
  of their centroids; a node that is far from the query (distance > beta × its radius) contributes the
  Taylor expansion of its double-layer potential about its area centroid (the dipole Σ a·n, then the
  first- and second-order moments: order 2 by default, as in Barill et al.), and near leaves are summed
  exactly. The tree is walked breadth-first for a whole chunk of queries at once, so the only Python
  loop is over tree levels (at most `max_depth` + 1).

Measured on 2 CPU cores (one thread): 64³ cell centres against an 81,920-face non-convex sphere in about
9 s, with |w_fast − w_exact| < 0.005 (beta = 2, order 2); the exact float32 sum would take ~25 minutes.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

_FOUR_PI = 4.0 * math.pi


def solid_angles(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """Signed solid angles of triangles (a, b, c) given as vectors from the query point.

    Van Oosterom and Strackee (1983): tan(Ω/2) = a·(b×c) / (|a||b||c| + (a·b)|c| + (b·c)|a| + (c·a)|b|).
    Positive when the triangle is seen clockwise from the query, i.e. from inside a surface whose faces
    are counter-clockwise seen from outside. A query on a vertex gives atan2(0, 0) = 0, not NaN.

    Args:
        a, b, c: [..., 3] vertex positions minus the query position.
    Returns:
        [...] solid angles in steradians, in [-2π, 2π].
    """
    la, lb, lc = a.norm(dim=-1), b.norm(dim=-1), c.norm(dim=-1)  # [...]
    num = (a * torch.cross(b, c, dim=-1)).sum(-1)  # [...] triple product
    den = la * lb * lc + (a * b).sum(-1) * lc + (b * c).sum(-1) * la + (c * a).sum(-1) * lb  # [...]
    return 2.0 * torch.atan2(num, den)


def _check_inputs(points: Tensor, vertices: Tensor, faces: Tensor) -> None:
    if points.ndim != 2 or points.shape[-1] != 3:
        raise ValueError(f"points must be [Q, 3], got {tuple(points.shape)}")
    if vertices.ndim != 2 or vertices.shape[-1] != 3:
        raise ValueError(f"vertices must be [N, 3], got {tuple(vertices.shape)}")
    if faces.ndim != 2 or faces.shape[-1] != 3:
        raise ValueError(f"faces must be [F, 3], got {tuple(faces.shape)}")


def winding_numbers_exact(
    points: Tensor,  # [Q, 3]
    vertices: Tensor,  # [N, 3]
    faces: Tensor,  # [F, 3] int
    max_pairs: int = 1 << 20,  # (query, face) pairs per chunk: bounds temporaries to ~0.2 GB in float64
) -> Tensor:
    """[Q] exact generalized winding numbers: the sum over all faces of the solid angle / 4π.

    Computed in the dtype and on the device of `points` (use float64 for a reference).
    """
    _check_inputs(points, vertices, faces)
    tri = vertices.to(points)[faces.long()]  # [F, 3, 3]
    n_q, n_f = points.shape[0], tri.shape[0]
    out = torch.zeros(n_q, dtype=points.dtype, device=points.device)
    if n_q == 0 or n_f == 0:
        return out
    f_chunk = max(1, min(n_f, max_pairs))
    q_chunk = max(1, max_pairs // f_chunk)
    for q0 in range(0, n_q, q_chunk):
        q = points[q0 : q0 + q_chunk, None, :]  # [Qc, 1, 3]
        for f0 in range(0, n_f, f_chunk):
            t = tri[None, f0 : f0 + f_chunk]  # [1, Fc, 3, 3]
            omega = solid_angles(t[..., 0, :] - q, t[..., 1, :] - q, t[..., 2, :] - q)  # [Qc, Fc]
            out[q0 : q0 + q_chunk] += omega.sum(-1) / _FOUR_PI
    return out


# Far-field expansion of a node, with y = (node centre − query), r = |y|, N = Σ a·n, M = Σ a·n ⊗ δ,
# C = Σ a·n ⊗ E[δ ⊗ δ] (δ = face point − centre; a, n = face area and unit normal): Taylor-expanding the
# double-layer kernel y/|y|³ about the centre (J = its Jacobian, H = its Hessian),
#   4π·w ≈ N·y/r³ + J:M + ½ H:C
#        = (N·y + tr M)/r³ + (−3 yᵀMy − 1.5 e·y)/r⁵ + 7.5 C:(y⊗y⊗y)/r⁷,   e_k = 2 Σ_i C_iik + Σ_j C_kjj,
# using J_ij = δ_ij/r³ − 3 y_i y_j/r⁵ and H_ijk = −3(δ_ij y_k + δ_ik y_j + δ_jk y_i)/r⁵ + 15 y_i y_j y_k/r⁷.
# Each node stores the 23 coefficients of that polynomial in the distinct monomials of y, so a (query,
# node) pair costs one gather and one dot product: [N (3) | tr M (1) | −3·M over y_i y_j (6) | −1.5·e (3) |
# 7.5·C over y_i y_j y_k (10)]. Orders 0, 1 and 2 use the first 3, 10 and 23 terms.
_PAIRS = list(itertools.combinations_with_replacement(range(3), 2))  # 6 monomials y_i y_j, i <= j
_TRIPLES = list(itertools.combinations_with_replacement(range(3), 3))  # 10 monomials y_i y_j y_k
_N_TERMS = {0: 3, 1: 10, 2: 23}


def _symmetrize(tensor: Tensor, monomials: list[tuple[int, ...]]) -> Tensor:
    """Sum the entries of [M, 3, ..., 3] (flattened) that multiply the same monomial: [M, len(monomials)]."""
    rank = len(monomials[0])
    fold = torch.zeros(3**rank, len(monomials), dtype=tensor.dtype, device=tensor.device)
    for flat, index in enumerate(itertools.product(range(3), repeat=rank)):  # 9 or 27 entries
        fold[flat, monomials.index(tuple(sorted(index)))] = 1.0
    return tensor.reshape(tensor.shape[0], -1) @ fold


def _monomials(y: Tensor, monomials: list[tuple[int, ...]]) -> Tensor:
    """[K, 3] -> [K, len(monomials)] products of coordinates."""
    idx = torch.tensor(monomials, device=y.device)  # [T, rank]
    return y[:, idx].prod(dim=-1)


@dataclass
class FaceTree:
    """An octree over a triangle soup, stored level by level as flat arrays (nodes of all levels
    concatenated; a node's faces and a node's children are contiguous ranges).

    Built by `build_face_tree`; consumed by `winding_numbers_fast`. All tensors on one device.
    """

    tri: Tensor  # [F, 3, 3] triangle corners, sorted by Morton code of the centroid
    sphere: Tensor  # [M, 4] node bounding sphere: area centroid (xyz) and radius reaching every corner
    expansion: Tensor  # [M, 23] far-field coefficients (see the comment above `_PAIRS`)
    face_start: Tensor  # [M] int64 first face of the node (in `tri`)
    face_count: Tensor  # [M] int64
    child_start: Tensor  # [M] int64 first child (global node index); meaningless for leaves
    child_count: Tensor  # [M] int64 number of children; 0 for leaves
    is_leaf: Tensor  # [M] bool

    @property
    def n_faces(self) -> int:
        return self.tri.shape[0]


def _spread_bits(x: Tensor) -> Tensor:
    """Insert two zero bits between each of the low 10 bits of x (int64) for a 30-bit Morton code."""
    x = (x | (x << 16)) & 0x030000FF
    x = (x | (x << 8)) & 0x0300F00F
    x = (x | (x << 4)) & 0x030C30C3
    x = (x | (x << 2)) & 0x09249249
    return x


def build_face_tree(
    vertices: Tensor,  # [N, 3]
    faces: Tensor,  # [F, 3] int
    leaf_size: int = 8,  # a node with at most this many faces is summed exactly when near
    max_depth: int = 10,  # octree levels below the root; 10 ↔ a 1024³ grid of centroids (Morton code)
) -> FaceTree:
    """Builds the octree used by `winding_numbers_fast` (in the dtype/device of `vertices`)."""
    if not 1 <= max_depth <= 10:
        raise ValueError(f"max_depth must be in [1, 10] (30-bit Morton codes), got {max_depth}")
    _check_inputs(vertices[:0], vertices, faces)
    if faces.shape[0] == 0:
        raise ValueError("cannot build a face tree of a mesh without faces")
    tri = vertices[faces.long()]  # [F, 3, 3]
    centroid = tri.mean(dim=1)  # [F, 3]
    lo = centroid.min(dim=0).values
    extent = (centroid.max(dim=0).values - lo).max().clamp_min(1e-12)
    cells = 1 << max_depth
    ijk = ((centroid - lo) / extent * cells).long().clamp_(0, cells - 1)  # [F, 3]
    code = _spread_bits(ijk[:, 0]) | (_spread_bits(ijk[:, 1]) << 1) | (_spread_bits(ijk[:, 2]) << 2)  # [F]
    code, order = torch.sort(code)
    tri, centroid = tri[order], centroid[order]
    cross = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)  # [F, 3], |cross| = 2·area
    area = 0.5 * cross.norm(dim=-1)  # [F]
    an = 0.5 * cross  # [F, 3] area · unit normal

    def segment_sum(values: Tensor, segment: Tensor, n: int) -> Tensor:  # [F, ...] -> [n, ...]
        return torch.zeros((n, *values.shape[1:]), dtype=values.dtype, device=values.device).index_add_(
            0, segment, values
        )

    spheres, expansions, f_starts, f_counts, c_counts, leaves, keys = [], [], [], [], [], [], []
    for level in range(max_depth + 1):  # one pass per octree level, vectorised over faces
        key = code >> (3 * (max_depth - level))  # [F] octree cell of each face at this level
        ukey, count = torch.unique_consecutive(key, return_counts=True)  # [M_l]
        n_nodes = ukey.shape[0]
        node = torch.repeat_interleave(torch.arange(n_nodes, device=code.device), count)  # [F] node of face
        a_sum = segment_sum(area, node, n_nodes)  # [M_l]
        c_mean = segment_sum(centroid, node, n_nodes) / count[:, None]  # fallback for zero-area nodes
        c_area = segment_sum(area[:, None] * centroid, node, n_nodes) / a_sum.clamp_min(1e-30)[:, None]
        center = torch.where((a_sum > 0)[:, None], c_area, c_mean)  # [M_l, 3]
        u = tri - center[node][:, None, :]  # [F, 3, 3] corners relative to the node centre
        radius = torch.zeros(n_nodes, dtype=tri.dtype, device=tri.device)
        radius.scatter_reduce_(0, node, u.norm(dim=-1).amax(dim=-1), reduce="amax", include_self=True)
        # Moments. A triangle's mean of δ is its centroid offset; its second moment about the centre is
        # exact: E[u uᵀ] = (Σ u_i u_iᵀ + (Σ u_i)(Σ u_i)ᵀ) / 12.
        us = u.sum(dim=1)  # [F, 3]
        first = segment_sum(an[:, :, None] * (us / 3.0)[:, None, :], node, n_nodes)  # [M_l, 3, 3] M
        second_face = (torch.einsum("fci,fcj->fij", u, u) + us[:, :, None] * us[:, None, :]) / 12.0
        second = segment_sum(an[:, :, None, None] * second_face[:, None], node, n_nodes)  # [M_l, 3, 3, 3] C
        e = 2.0 * torch.einsum("miik->mk", second) + torch.einsum("mkjj->mk", second)  # [M_l, 3]
        expansions.append(
            torch.cat(
                [
                    segment_sum(an, node, n_nodes),  # N
                    first.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True),  # tr M
                    -3.0 * _symmetrize(first, _PAIRS),
                    -1.5 * e,
                    7.5 * _symmetrize(second, _TRIPLES),
                ],
                dim=-1,
            )
        )  # [M_l, 23]
        spheres.append(torch.cat([center, radius[:, None]], dim=-1))
        f_counts.append(count)
        f_starts.append(torch.cumsum(count, 0) - count)
        leaves.append((count <= leaf_size) | (level == max_depth))
        keys.append(ukey)

    level_offset = [0]
    for k in keys:
        level_offset.append(level_offset[-1] + k.shape[0])
    for level in range(max_depth + 1):
        n_nodes = keys[level].shape[0]
        if level == max_depth:
            c_counts.append(torch.zeros(n_nodes, dtype=torch.long, device=code.device))
            continue
        parent = torch.searchsorted(keys[level], keys[level + 1] >> 3)  # [M_{l+1}] index within level l
        c_counts.append(torch.bincount(parent, minlength=n_nodes))
    child_start = [
        level_offset[level + 1] + torch.cumsum(c, 0) - c for level, c in enumerate(c_counts)
    ]  # first child of each node, as a global index
    is_leaf = torch.cat(leaves)
    return FaceTree(
        tri=tri,
        sphere=torch.cat(spheres),
        expansion=torch.cat(expansions),
        face_start=torch.cat(f_starts),
        face_count=torch.cat(f_counts),
        child_start=torch.cat(child_start),
        child_count=torch.where(is_leaf, 0, torch.cat(c_counts)),
        is_leaf=is_leaf,
    )


def _expand_ranges(owner: Tensor, start: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """For each i, the pairs (owner[i], start[i] + k) for k < count[i], flattened: ([P], [P])."""
    total = int(count.sum())
    rep_owner = torch.repeat_interleave(owner, count, output_size=total)  # [P]
    first = torch.cumsum(count, 0) - count  # [K] position of each range's first pair
    within = torch.arange(total, device=owner.device)
    within = within - torch.repeat_interleave(first, count, output_size=total)
    return rep_owner, torch.repeat_interleave(start, count, output_size=total) + within


def _far_field(y: Tensor, coef: Tensor, order: int) -> Tensor:
    """[K] 4π × the expansion's value for offsets y [K, 3] (centre − query) and coefficients [K, T]."""
    r2 = (y * y).sum(-1, keepdim=True)  # [K, 1]
    inv3 = r2.rsqrt() / r2  # 1/r³
    terms = [y * inv3, inv3]  # [K, 3], [K, 1]
    if order >= 1:
        inv5 = inv3 / r2
        terms.append(_monomials(y, _PAIRS) * inv5)  # [K, 6]
    if order >= 2:
        terms += [y * inv5, _monomials(y, _TRIPLES) * (inv5 / r2)]  # [K, 3], [K, 10]
    return (torch.cat(terms, dim=-1)[:, : coef.shape[-1]] * coef).sum(-1)


def winding_numbers_fast(
    points: Tensor,  # [Q, 3]
    tree: FaceTree,
    beta: float = 2.0,  # a node is far when distance > beta × radius; larger = more exact, slower
    order: int = 2,  # far-field Taylor order: 0 = dipole only, 1 and 2 add the first and second moments
    query_chunk: int = 2048,  # queries walked together: small temporaries stay in cache (measured)
    max_pairs: int = 1 << 21,  # exact (query, face) pairs evaluated at once
) -> Tensor:
    """[Q] approximate generalized winding numbers (Barnes–Hut over `tree`; see the module docstring).

    Exact (up to rounding) for queries near every face (beta → ∞); the error of a far node falls as
    (radius / distance)^(order + 2) relative to its contribution. Computed in the tree's dtype.
    """
    if points.ndim != 2 or points.shape[-1] != 3:
        raise ValueError(f"points must be [Q, 3], got {tuple(points.shape)}")
    if order not in _N_TERMS:
        raise ValueError(f"order must be 0, 1 or 2, got {order}")
    pts = points.to(tree.sphere)
    coef_all = tree.expansion[:, : _N_TERMS[order]]  # [M, T]
    out = torch.zeros(pts.shape[0], dtype=pts.dtype, device=pts.device)
    for q0 in range(0, pts.shape[0], query_chunk):
        q = pts[q0 : q0 + query_chunk]  # [Qc, 3]
        w = torch.zeros(q.shape[0], dtype=q.dtype, device=q.device)
        qi = torch.arange(q.shape[0], device=q.device)  # [K] frontier: (query, node) pairs
        ni = torch.zeros_like(qi)  # the root is global node 0
        while qi.numel() > 0:  # one iteration per tree level
            sphere = tree.sphere[ni]  # [K, 4]
            y = sphere[:, :3] - q[qi]  # [K, 3] from the query to the node's centre
            far = (y * y).sum(-1) > (beta * sphere[:, 3]) ** 2  # [K]
            f_idx = far.nonzero().squeeze(1)
            if f_idx.numel() > 0:
                value = _far_field(y[f_idx], coef_all[ni[f_idx]], order)  # [Kf]
                w.index_add_(0, qi[f_idx], value / _FOUR_PI)
            leaf = ~far & tree.is_leaf[ni]
            if leaf.any():
                pq, pf = _expand_ranges(qi[leaf], tree.face_start[ni[leaf]], tree.face_count[ni[leaf]])
                for p0 in range(0, pq.shape[0], max_pairs):
                    sq, sf = pq[p0 : p0 + max_pairs], pf[p0 : p0 + max_pairs]
                    t = tree.tri[sf] - q[sq][:, None, :]  # [P, 3, 3]
                    w.index_add_(0, sq, solid_angles(t[:, 0], t[:, 1], t[:, 2]) / _FOUR_PI)
            inner = (~far & ~tree.is_leaf[ni]).nonzero().squeeze(1)
            qi, ni = _expand_ranges(qi[inner], tree.child_start[ni[inner]], tree.child_count[ni[inner]])
        out[q0 : q0 + query_chunk] = w
    return out


def winding_numbers(
    points: Tensor,  # [Q, 3]
    vertices: Tensor,  # [N, 3]
    faces: Tensor,  # [F, 3] int
    method: str = "fast",  # "fast" (octree, Barnes–Hut) or "exact" (all pairs)
    beta: float = 2.0,
) -> Tensor:
    """[Q] generalized winding numbers of `points` w.r.t. the triangle soup (vertices, faces)."""
    _check_inputs(points, vertices, faces)
    if method == "exact":
        return winding_numbers_exact(points, vertices.to(points), faces)
    if method != "fast":
        raise ValueError(f"method must be 'fast' or 'exact', got {method!r}")
    if faces.shape[0] == 0:
        return torch.zeros(points.shape[0], dtype=points.dtype, device=points.device)
    tree = build_face_tree(vertices.to(points), faces)
    return winding_numbers_fast(points, tree, beta=beta)
