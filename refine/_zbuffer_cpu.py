"""The z-buffer pass of `rasterize` as a compiled CPU loop (numba), one view per thread.

Same arithmetic as the PyTorch path in `rasterizer._visible_triangles` (float32 edge functions relative to
vertex 0, inclusive edges with the same slack, nearest z/w wins, ties to the lower triangle id), so the
two agree pixel for pixel up to float rounding at exact ties; `tests/test_rasterizer.py` checks that. The
PyTorch path stays the reference and the CUDA path. numba compiles this once and caches it on disk.
"""

from __future__ import annotations

import numpy as np

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; the torch path still works without it
    numba = None

__all__ = ["AVAILABLE", "visible_triangles_cpu"]

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
