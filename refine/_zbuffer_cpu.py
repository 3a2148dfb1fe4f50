"""The rasterizer's non-differentiable passes as compiled CPU loops (numba), one view per thread.

* `visible_triangles_cpu`: the z-buffer pass of `rasterize`. Same arithmetic as the PyTorch path in
  `rasterizer._visible_triangles` (float32 edge functions relative to vertex 0, inclusive edges with the
  same slack, nearest z/w wins, ties to the lower triangle id).
* `fill_rast_cpu`: the (u, v, z/w, id + 1) values at the covered pixels, the same formulas as
  `rasterizer._barycentrics`, for renders that need no gradient.
* `silhouette_edges_cpu`: the silhouette edges that `antialias` follows (`rasterizer.silhouette_edges`).

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

__all__ = ["AVAILABLE", "fill_rast_cpu", "silhouette_edges_cpu", "visible_triangles_cpu"]

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
    def _silhouettes(px, py, tri, topo, far, sil):  # pragma: no cover
        # sil [V, F, 3]: edge k (tri[f, k] -> tri[f, k+1]) has no single neighbour, or the neighbour's far
        # vertex lies on the triangle's own side of it
        n_views, n_faces = px.shape[0], tri.shape[0]
        for v in numba.prange(n_views):
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


def silhouette_edges_cpu(
    px: np.ndarray,  # [V, N] float32 pixel x
    py: np.ndarray,  # [V, N] float32 pixel y
    tri: np.ndarray,  # [F, 3] int64
    topo: np.ndarray,  # [F, 3] int64 from edge_topology
    far: np.ndarray,  # [F, 3] int64 the neighbour's vertex off edge k (any vertex where there is none)
) -> np.ndarray:
    """rasterizer.silhouette_edges compiled: [V, F, 3] bool silhouette edges."""
    sil = np.empty((px.shape[0], tri.shape[0], 3), dtype=np.bool_)
    _silhouettes(px, py, tri, topo, far, sil)
    return sil


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
