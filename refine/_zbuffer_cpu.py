"""The rasterizer's non-differentiable passes as compiled CPU loops (numba), one view per thread.

* `visible_triangles_cpu`: the z-buffer pass of `rasterize`. Same arithmetic as the PyTorch path in
  `rasterizer._visible_triangles` (float32 edge functions relative to vertex 0, inclusive edges with the
  same slack, nearest z/w wins, ties to the lower triangle id).
* `fill_rast_cpu`: the (u, v, z/w, id + 1) values at the covered pixels, the same formulas as
  `rasterizer._barycentrics`, for renders that need no gradient.
* `silhouette_crossings_cpu`: the search of `antialias` for pixel pairs split by a silhouette edge, the
  same rules as `rasterizer._silhouette_crossings_torch`.

The two agree with their PyTorch references up to float rounding at exact ties (`tests/test_rasterizer.py`
checks that); the PyTorch paths stay the reference and the CUDA path. numba compiles these once and
caches them on disk. Everything differentiable stays in PyTorch.
"""

from __future__ import annotations

import numpy as np

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; the torch path still works without it
    numba = None

__all__ = ["AVAILABLE", "fill_rast_cpu", "silhouette_crossings_cpu", "visible_triangles_cpu"]

AVAILABLE = numba is not None

if AVAILABLE:

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _zbuffer(px, py, pz, pw, tri, height, width, eps, w_eps, out_depth, out_id):  # pragma: no cover
        # px, py, pz, pw: [V, N] float32 pixel x, pixel y (row 0 = top), z/w, w
        # tri: [F, 3] int64; out_depth: [V, H*W] float32 (init +inf); out_id: [V, H*W] int64 (init -1)
        n_views = px.shape[0]
        n_faces = tri.shape[0]
        half = np.float32(0.5)
        one = np.float32(1.0)
        for v in numba.prange(n_views):
            for f in range(n_faces):
                i0, i1, i2 = tri[f, 0], tri[f, 1], tri[f, 2]
                if pw[v, i0] <= w_eps or pw[v, i1] <= w_eps or pw[v, i2] <= w_eps:
                    continue
                x0f, y0f, z0 = px[v, i0], py[v, i0], pz[v, i0]
                e1x, e1y = px[v, i1] - x0f, py[v, i1] - y0f
                e2x, e2y = px[v, i2] - x0f, py[v, i2] - y0f
                det = e1x * e2y - e2x * e1y
                if abs(det) <= 1e-12:
                    continue
                zmin = min(z0, pz[v, i1], pz[v, i2])
                zmax = max(z0, pz[v, i1], pz[v, i2])
                if zmin > one or zmax < -one:
                    continue
                xmin = min(x0f, px[v, i1], px[v, i2])
                xmax = max(x0f, px[v, i1], px[v, i2])
                ymin = min(y0f, py[v, i1], py[v, i2])
                ymax = max(y0f, py[v, i1], py[v, i2])
                bx0 = max(int(np.ceil(xmin - half)), 0)
                bx1 = min(int(np.floor(xmax - half)), width - 1)
                by0 = max(int(np.ceil(ymin - half)), 0)
                by1 = min(int(np.floor(ymax - half)), height - 1)
                if bx1 < bx0 or by1 < by0:
                    continue
                inv_det = one / det
                m00, m01 = e2y * inv_det, -e2x * inv_det
                m10, m11 = -e1y * inv_det, e1x * inv_det
                dz1, dz2 = pz[v, i1] - z0, pz[v, i2] - z0
                for y in range(by0, by1 + 1):
                    ddy = np.float32(y) + half - y0f
                    row = y * width
                    for x in range(bx0, bx1 + 1):
                        ddx = np.float32(x) + half - x0f
                        b1 = m00 * ddx + m01 * ddy
                        b2 = m10 * ddx + m11 * ddy
                        if b1 < -eps or b2 < -eps or b1 + b2 > one + eps:
                            continue
                        z = z0 + b1 * dz1 + b2 * dz2
                        if z < -one or z > one:
                            continue
                        p = row + x
                        d = out_depth[v, p]
                        if z < d or (z == d and f < out_id[v, p]):
                            out_depth[v, p] = z
                            out_id[v, p] = f


if AVAILABLE:

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _silhouettes(px, py, tri, topo, far, rings, sil, near):  # pragma: no cover
        # sil [V, F, 3]: edge k (tri[f, k] -> tri[f, k+1]) has no single neighbour, or the neighbour's far
        # vertex lies on the triangle's own side of it; near [V, F]: within two edge-steps of such an edge
        n_views, n_faces = px.shape[0], tri.shape[0]
        for v in numba.prange(n_views):
            level = np.zeros(n_faces, dtype=np.bool_)
            for f in range(n_faces):
                for k in range(3):
                    a, b, c, o = tri[f, k], tri[f, (k + 1) % 3], tri[f, (k + 2) % 3], far[f, k]
                    edge = topo[f, k] < 0
                    if not edge:
                        ex, ey = px[v, b] - px[v, a], py[v, b] - py[v, a]
                        own = ex * (py[v, c] - py[v, a]) - ey * (px[v, c] - px[v, a])
                        other = ex * (py[v, o] - py[v, a]) - ey * (px[v, o] - px[v, a])
                        edge = (own >= 0) == (other >= 0)
                    sil[v, f, k] = edge
                    level[f] = level[f] or edge
            for _ in range(rings):
                grown = level.copy()
                for f in range(n_faces):
                    if not level[f]:
                        for k in range(3):
                            o = topo[f, k]
                            if o >= 0 and level[o]:
                                grown[f] = True
                level = grown
            for f in range(n_faces):
                near[v, f] = level[f]

    @numba.njit(cache=True, nogil=True)
    def _best_edge(face, horizontal, front_a, cx, cy, px_v, py_v, tri, topo, sil_v, cand):  # pragma: no cover
        # The silhouette edge of `face` or its rings of edge neighbours (cand: (3^(rings+1) - 1) / 2
        # entries, filled breadth first as rasterizer's torch path orders them) that crosses the pair's
        # segment nearest the front pixel: returns its two vertex indices, or (-1, -1).
        cand[0] = face
        start, end, n = 0, 1, 1
        while n < cand.shape[0]:
            for i in range(start, end):
                g = cand[i]
                for k in range(3):
                    cand[n] = topo[g, k] if g >= 0 else -1
                    n += 1
            start, end = end, n
        best = np.float32(2.0)
        b0, b1 = -1, -1
        one = np.float32(1.0)
        for c in range(cand.shape[0]):
            f = cand[c]
            if f < 0:
                continue
            for k in range(3):
                if not sil_v[f, k]:
                    continue
                i0, i1 = tri[f, k], tri[f, (k + 1) % 3]
                if horizontal:
                    num, den = cy - py_v[i0], py_v[i1] - py_v[i0]
                    a0, a1, start = px_v[i0], px_v[i1], cx
                else:
                    num, den = cx - px_v[i0], px_v[i1] - px_v[i0]
                    a0, a1, start = py_v[i0], py_v[i1], cy
                if not (num * (num - den) < 0) or abs(den) < abs(a1 - a0):  # crossing, steep (nvdiffrast)
                    continue
                t = a0 + num / den * (a1 - a0) - start
                if t <= 0 or t >= one:
                    continue
                dist = t if front_a else one - t
                if dist < best:
                    best, b0, b1 = dist, i0, i1
        return b0, b1

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _crossings(
        ids,
        zw,
        px,
        py,
        tri,
        topo,
        sil,
        near,
        rings,
        offsets,
        count_only,
        out_pix,
        out_hor,
        out_front,
        out_e0,
        out_e1,
        counts,
    ):  # pragma: no cover
        # Two passes: count_only fills counts[v]; then, with offsets, each view writes its own slice.
        n_views, height, width = ids.shape
        half = np.float32(0.5)
        for v in numba.prange(n_views):
            n = 0
            base = offsets[v]
            cand = np.empty((3 ** (rings + 1) - 1) // 2, dtype=np.int64)
            for y in range(height):
                for x in range(width):
                    ia = ids[v, y, x]
                    for h in range(2):
                        horizontal = h == 0
                        if horizontal:
                            if x + 1 >= width:
                                continue
                            ib, zb = ids[v, y, x + 1], zw[v, y, x + 1]
                        else:
                            if y + 1 >= height:
                                continue
                            ib, zb = ids[v, y + 1, x], zw[v, y + 1, x]
                        if ia == ib:
                            continue
                        front_a = ib == 0 or (ia > 0 and zw[v, y, x] < zb)
                        face = (ia if front_a else ib) - 1
                        if not near[v, face]:
                            continue
                        e0, e1 = _best_edge(
                            face,
                            horizontal,
                            front_a,
                            np.float32(x) + half,
                            np.float32(y) + half,
                            px[v],
                            py[v],
                            tri,
                            topo,
                            sil[v],
                            cand,
                        )
                        if e0 < 0:
                            continue
                        if not count_only:
                            out_pix[base + n] = (v * height + y) * width + x
                            out_hor[base + n] = horizontal
                            out_front[base + n] = front_a
                            out_e0[base + n] = e0
                            out_e1[base + n] = e1
                        n += 1
            counts[v] = n


def silhouette_edges_cpu(
    px: np.ndarray,  # [V, N] float32 pixel x
    py: np.ndarray,  # [V, N] float32 pixel y
    tri: np.ndarray,  # [F, 3] int64
    topo: np.ndarray,  # [F, 3] int64 from edge_topology
    far: np.ndarray,  # [F, 3] int64 the neighbour's vertex off edge k (any vertex where there is none)
    rings: int,  # edge-steps from a silhouette edge that count as near it
) -> tuple[np.ndarray, np.ndarray]:
    """rasterizer.silhouette_edges compiled: ([V, F, 3] silhouette edges, [V, F] near one)."""
    sil = np.empty((px.shape[0], tri.shape[0], 3), dtype=np.bool_)
    near = np.empty((px.shape[0], tri.shape[0]), dtype=np.bool_)
    _silhouettes(px, py, tri, topo, far, rings, sil, near)
    return sil, near


def silhouette_crossings_cpu(
    ids: np.ndarray,  # [V, H, W] int64 triangle id + 1, 0 = empty
    zw: np.ndarray,  # [V, H, W] float32 z/w
    px: np.ndarray,  # [V, N] float32 pixel x
    py: np.ndarray,  # [V, N] float32 pixel y
    tri: np.ndarray,  # [F, 3] int64
    topo: np.ndarray,  # [F, 3] int64 from edge_topology
    sil: np.ndarray,  # [V, F, 3] bool: silhouette edges (rasterizer.silhouette_edges)
    near: np.ndarray,  # [V, F] bool: triangles within `rings` edge-steps of one
    rings: int,  # edge-steps from the front pixel's triangle searched for the silhouette edge
) -> tuple[np.ndarray, ...]:
    """[Q] arrays: view, pixel a (flat over V*H*W), horizontal pair, front is a, edge vertices v0, v1."""
    n_views = ids.shape[0]
    counts = np.zeros(n_views, dtype=np.int64)
    empty_i, empty_b = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.bool_)
    offsets = np.zeros(n_views, dtype=np.int64)
    _crossings(
        ids,
        zw,
        px,
        py,
        tri,
        topo,
        sil,
        near,
        rings,
        offsets,
        True,
        empty_i,
        empty_b,
        empty_b,
        empty_i,
        empty_i,
        counts,
    )
    offsets[1:] = np.cumsum(counts)[:-1]
    total = int(counts.sum())
    pix, e0, e1 = (np.empty(total, dtype=np.int64) for _ in range(3))
    hor, front = np.empty(total, dtype=np.bool_), np.empty(total, dtype=np.bool_)
    _crossings(ids, zw, px, py, tri, topo, sil, near, rings, offsets, False, pix, hor, front, e0, e1, counts)
    height, width = ids.shape[1], ids.shape[2]
    view = pix // (height * width)
    return view, pix, hor, front, e0, e1


if AVAILABLE:

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _fill_rast(ids, px, py, pz, pw, tri, width, out):  # pragma: no cover
        # ids: [V, H*W] int64 (-1 = empty); out: [V, H*W, 4] float32 zeros
        n_views, n_pix = ids.shape
        half = np.float32(0.5)
        one = np.float32(1.0)
        for v in numba.prange(n_views):
            for p in range(n_pix):
                f = ids[v, p]
                if f < 0:
                    continue
                i0, i1, i2 = tri[f, 0], tri[f, 1], tri[f, 2]
                cx = np.float32(p % width) + half
                cy = np.float32(p // width) + half
                e1x, e1y = px[v, i1] - px[v, i0], py[v, i1] - py[v, i0]
                e2x, e2y = px[v, i2] - px[v, i0], py[v, i2] - py[v, i0]
                det = e1x * e2y - e2x * e1y
                if abs(det) < 1e-20:
                    det = np.float32(1e-20)
                dx, dy = cx - px[v, i0], cy - py[v, i0]
                s1 = (dx * e2y - e2x * dy) / det
                s2 = (e1x * dy - dx * e1y) / det
                s0 = one - s1 - s2
                q0, q1, q2 = s0 / pw[v, i0], s1 / pw[v, i1], s2 / pw[v, i2]
                norm = q0 + q1 + q2
                out[v, p, 0] = q0 / norm
                out[v, p, 1] = q1 / norm
                out[v, p, 2] = s0 * pz[v, i0] + s1 * pz[v, i1] + s2 * pz[v, i2]
                out[v, p, 3] = np.float32(f + 1)


def fill_rast_cpu(
    ids: np.ndarray,  # [V * H * W] int64 from visible_triangles_cpu
    px: np.ndarray,  # [V, N] float32
    py: np.ndarray,
    pz: np.ndarray,
    pw: np.ndarray,
    tri: np.ndarray,  # [F, 3] int64
    height: int,
    width: int,
) -> np.ndarray:
    """[V, H, W, 4] float32 rasterizer output (u, v, z/w, id + 1), zeros where empty."""
    n_views = px.shape[0]
    out = np.zeros((n_views, height * width, 4), dtype=np.float32)
    _fill_rast(ids.reshape(n_views, height * width), px, py, pz, pw, tri, width, out)
    return out.reshape(n_views, height, width, 4)


def visible_triangles_cpu(
    px: np.ndarray,  # [V, N] float32 pixel x
    py: np.ndarray,  # [V, N] float32 pixel y, row 0 = top
    pz: np.ndarray,  # [V, N] float32 z/w
    pw: np.ndarray,  # [V, N] float32 w
    tri: np.ndarray,  # [F, 3] int64
    height: int,
    width: int,
    eps: float,
    w_eps: float,
) -> np.ndarray:
    """[V * H * W] int64 index of the nearest triangle per pixel, -1 where none."""
    n_views = px.shape[0]
    depth = np.full((n_views, height * width), np.inf, dtype=np.float32)
    ids = np.full((n_views, height * width), -1, dtype=np.int64)
    _zbuffer(px, py, pz, pw, tri, height, width, np.float32(eps), np.float32(w_eps), depth, ids)
    return ids.reshape(-1)
