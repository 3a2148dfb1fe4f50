"""The hash-grid encoding's forward and backward passes as compiled CPU loops (numba).

Same arithmetic as the PyTorch paths in `nerf/encoding.py` (`hash_encode_reference`, `hash_encode_torch`):
instant-ngp's multiresolution hash encoding (Müller et al. 2022, sec. 3), trilinear interpolation of the
8 grid vertices around each point at each level, dense indexing for the coarse levels whose grid fits in
the table and the spatial hash (primes 1, 2654435761, 805459861, XOR) for the others.

* `hash_forward_cpu`: the features, parallel over (level, chunk of points) tasks.
* `hash_backward_table_cpu`: the scatter-add of the table gradient, parallel over levels (each level owns
  a disjoint slice of the table, so no two threads ever add to the same row: no atomics needed).
* `hash_backward_input_cpu`: the gradient w.r.t. the input points through the trilinear weights'
  derivatives, parallel over points.
* `hash_backward_both_cpu`: both gradients in one pass, parallel over levels (each point's corners found
  once): what autograd calls when the points need a gradient too (the refinement's colour field).

The kernels compile lazily for float32 and float64 (the float64 versions serve `gradcheck`) and are cached
on disk. The PyTorch paths stay the reference and the path for other devices.
"""

from __future__ import annotations

import numpy as np

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; the torch path still works without it
    numba = None

__all__ = [
    "AVAILABLE",
    "hash_backward_both_cpu",
    "hash_backward_input_cpu",
    "hash_backward_table_cpu",
    "hash_forward_cpu",
]

AVAILABLE = numba is not None

_CHUNK = 4096  # points per forward task: enough work per task, many tasks for load balance


if AVAILABLE:

    @numba.njit(inline="always")
    def _unit(v, zero, one):  # pragma: no cover
        # v clamped to [zero, one]; NaN -> zero
        return min(max(v, zero), one) if v == v else zero

    @numba.njit(inline="always")
    def _corners(
        x, i, level, scales, consts, resolutions, offsets, n_dense, hash_mask, rows, ws
    ):  # pragma: no cover
        # fills rows[8] (table rows) and ws[8] (trilinear weights) of the 8 grid vertices around point i at
        # `level`, corner c = bx + 2*by + 4*bz; returns the fractions (fx, fy, fz) for the input gradient
        zero, half, one = consts[0], consts[1], consts[2]
        s = scales[level]
        # clamp to [0, 1] as the torch paths do (the gradient there is zero outside the box); NaN goes to 0
        # (floor(NaN) as an index read outside the table: numba does not check bounds)
        px = _unit(x[i, 0], zero, one) * s + half
        py = _unit(x[i, 1], zero, one) * s + half
        pz = _unit(x[i, 2], zero, one) * s + half
        flx = np.floor(px)
        fly = np.floor(py)
        flz = np.floor(pz)
        fx = px - flx
        fy = py - fly
        fz = pz - flz
        ix = np.int64(flx)
        iy = np.int64(fly)
        iz = np.int64(flz)
        off = offsets[level]
        if level < n_dense:  # dense: x + y*R + z*R^2
            r = resolutions[level]
            hx0 = ix
            hx1 = ix + 1
            hy0 = iy * r
            hy1 = hy0 + r
            hz0 = iz * r * r
            hz1 = hz0 + r * r
            rows[0] = off + hx0 + hy0 + hz0
            rows[1] = off + hx1 + hy0 + hz0
            rows[2] = off + hx0 + hy1 + hz0
            rows[3] = off + hx1 + hy1 + hz0
            rows[4] = off + hx0 + hy0 + hz1
            rows[5] = off + hx1 + hy0 + hz1
            rows[6] = off + hx0 + hy1 + hz1
            rows[7] = off + hx1 + hy1 + hz1
        else:  # hashed: (x * 1) ^ (y * 2654435761) ^ (z * 805459861) mod 2**k
            hx0 = ix
            hx1 = ix + 1
            hy0 = iy * np.int64(2654435761)
            hy1 = hy0 + np.int64(2654435761)
            hz0 = iz * np.int64(805459861)
            hz1 = hz0 + np.int64(805459861)
            rows[0] = off + ((hx0 ^ hy0 ^ hz0) & hash_mask)
            rows[1] = off + ((hx1 ^ hy0 ^ hz0) & hash_mask)
            rows[2] = off + ((hx0 ^ hy1 ^ hz0) & hash_mask)
            rows[3] = off + ((hx1 ^ hy1 ^ hz0) & hash_mask)
            rows[4] = off + ((hx0 ^ hy0 ^ hz1) & hash_mask)
            rows[5] = off + ((hx1 ^ hy0 ^ hz1) & hash_mask)
            rows[6] = off + ((hx0 ^ hy1 ^ hz1) & hash_mask)
            rows[7] = off + ((hx1 ^ hy1 ^ hz1) & hash_mask)
        gx = one - fx
        gy = one - fy
        gz = one - fz
        w00 = gy * gz  # (by, bz) = (0, 0)
        w10 = fy * gz
        w01 = gy * fz
        w11 = fy * fz
        ws[0] = gx * w00
        ws[1] = fx * w00
        ws[2] = gx * w10
        ws[3] = fx * w10
        ws[4] = gx * w01
        ws[5] = fx * w01
        ws[6] = gx * w11
        ws[7] = fx * w11
        return fx, fy, fz

    @numba.njit(inline="always")
    def _fraction_gradient(gs, fx, fy, fz, one):  # pragma: no cover
        # d out / d (fx, fy, fz) at one level, from gs[8] = grad_out . table[corner c] (corner c = bx + 2*by
        # + 4*bz): w_c = wx * wy * wz with wx = fx or 1 - fx, so d w_c / d fx = +-(wy * wz), etc.
        gx = one - fx
        gy = one - fy
        gz = one - fz
        lx = (gs[1] - gs[0]) * gy * gz + (gs[3] - gs[2]) * fy * gz
        lx += (gs[5] - gs[4]) * gy * fz + (gs[7] - gs[6]) * fy * fz
        ly = (gs[2] - gs[0]) * gx * gz + (gs[3] - gs[1]) * fx * gz
        ly += (gs[6] - gs[4]) * gx * fz + (gs[7] - gs[5]) * fx * fz
        lz = (gs[4] - gs[0]) * gx * gy + (gs[5] - gs[1]) * fx * gy
        lz += (gs[6] - gs[2]) * gx * fy + (gs[7] - gs[3]) * fx * fy
        return lx, ly, lz

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _forward(x, table, scales, consts, resolutions, offsets, n_dense, hash_mask, out):  # pragma: no cover
        # x: [N, 3] (float32 or float64), table: [T, F], scales: [L] and consts: [3] in x's dtype,
        # resolutions/offsets: [L] int64; out: [N, L*F] (x's dtype, written fully)
        n = x.shape[0]
        n_levels = scales.shape[0]
        n_feat = table.shape[1]
        zero = consts[0]
        n_chunks = (n + _CHUNK - 1) // _CHUNK
        for task in numba.prange(n_levels * n_chunks):
            level = task // n_chunks
            start = (task % n_chunks) * _CHUNK
            stop = min(start + _CHUNK, n)
            col = level * n_feat
            rows = np.empty(8, dtype=np.int64)
            ws = np.empty(8, dtype=x.dtype)
            for i in range(start, stop):
                _corners(x, i, level, scales, consts, resolutions, offsets, n_dense, hash_mask, rows, ws)
                if n_feat == 2:  # instant-ngp's default, kept in registers
                    a0 = zero
                    a1 = zero
                    for c in range(8):
                        a0 += ws[c] * table[rows[c], 0]
                        a1 += ws[c] * table[rows[c], 1]
                    out[i, col] = a0
                    out[i, col + 1] = a1
                else:
                    for f in range(n_feat):
                        acc = zero
                        for c in range(8):
                            acc += ws[c] * table[rows[c], f]
                        out[i, col + f] = acc

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _backward_table(
        x, grad_out, scales, consts, resolutions, offsets, n_dense, hash_mask, grad_table
    ):  # pragma: no cover
        # grad_out: [N, L*F]; grad_table: [T, F] zero-initialised, accumulated. One task per level: the
        # levels own disjoint rows, so the scatter-add needs no atomics.
        n = x.shape[0]
        n_levels = scales.shape[0]
        n_feat = grad_table.shape[1]
        for level in numba.prange(n_levels):
            col = level * n_feat
            rows = np.empty(8, dtype=np.int64)
            ws = np.empty(8, dtype=x.dtype)
            for i in range(n):
                _corners(x, i, level, scales, consts, resolutions, offsets, n_dense, hash_mask, rows, ws)
                if n_feat == 2:  # instant-ngp's default
                    g0 = grad_out[i, col]
                    g1 = grad_out[i, col + 1]
                    for c in range(8):
                        grad_table[rows[c], 0] += ws[c] * g0
                        grad_table[rows[c], 1] += ws[c] * g1
                else:
                    for f in range(n_feat):
                        g = grad_out[i, col + f]
                        for c in range(8):
                            grad_table[rows[c], f] += ws[c] * g

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _backward_input(
        x, table, grad_out, scales, consts, resolutions, offsets, n_dense, hash_mask, grad_x
    ):  # pragma: no cover
        # grad_x: [N, 3] (written fully);
        # d out / d x_d = scale * sum_c (grad_out . table[c]) * d w_c / d frac_d.
        # Levels outermost (sequential), chunks of points in parallel: one level's slice of the table stays
        # in cache, and each chunk owns its rows of grad_x.
        n = x.shape[0]
        n_levels = scales.shape[0]
        n_feat = table.shape[1]
        zero, one = consts[0], consts[2]
        n_chunks = (n + _CHUNK - 1) // _CHUNK
        grad_x[:] = zero
        for level in range(n_levels):
            s = scales[level]
            col = level * n_feat
            for chunk in numba.prange(n_chunks):
                rows = np.empty(8, dtype=np.int64)
                ws = np.empty(8, dtype=x.dtype)
                gs = np.empty(8, dtype=x.dtype)
                for i in range(chunk * _CHUNK, min((chunk + 1) * _CHUNK, n)):
                    fx, fy, fz = _corners(
                        x, i, level, scales, consts, resolutions, offsets, n_dense, hash_mask, rows, ws
                    )
                    for c in range(8):
                        g = zero  # grad_out . table[row]
                        for f in range(n_feat):
                            g += grad_out[i, col + f] * table[rows[c], f]
                        gs[c] = g
                    lx, ly, lz = _fraction_gradient(gs, fx, fy, fz, one)
                    grad_x[i, 0] += lx * s
                    grad_x[i, 1] += ly * s
                    grad_x[i, 2] += lz * s
        # clamp's gradient: zero outside [0, 1]
        for i in numba.prange(n):
            for d in range(3):
                if not (x[i, d] >= zero and x[i, d] <= one):
                    grad_x[i, d] = zero

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _backward_both(
        x, table, grad_out, scales, consts, resolutions, offsets, n_dense, hash_mask, grad_table, per_level
    ):  # pragma: no cover
        # Both gradients in one pass over the points per level (the corners are found once): grad_table
        # [T, F] zero-initialised, accumulated as in _backward_table; per_level [L, N, 3] each level's input
        # gradient (written fully), summed over the levels in order by the caller's kernel below.
        n = x.shape[0]
        n_levels = scales.shape[0]
        n_feat = table.shape[1]
        zero, one = consts[0], consts[2]
        for level in numba.prange(n_levels):
            s = scales[level]
            col = level * n_feat
            rows = np.empty(8, dtype=np.int64)
            ws = np.empty(8, dtype=x.dtype)
            gs = np.empty(8, dtype=x.dtype)
            for i in range(n):
                fx, fy, fz = _corners(
                    x, i, level, scales, consts, resolutions, offsets, n_dense, hash_mask, rows, ws
                )
                for c in range(8):
                    g = zero  # grad_out . table[row]
                    for f in range(n_feat):
                        go = grad_out[i, col + f]
                        g += go * table[rows[c], f]
                        grad_table[rows[c], f] += ws[c] * go
                    gs[c] = g
                lx, ly, lz = _fraction_gradient(gs, fx, fy, fz, one)
                per_level[level, i, 0] = lx * s
                per_level[level, i, 1] = ly * s
                per_level[level, i, 2] = lz * s

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _sum_levels(x, per_level, consts, grad_x):  # pragma: no cover
        # grad_x [N, 3] = the levels' gradients added in level order (as _backward_input adds them), zero
        # outside [0, 1] (the clamp's gradient)
        zero, one = consts[0], consts[2]
        for i in numba.prange(x.shape[0]):
            for d in range(3):
                acc = zero
                for level in range(per_level.shape[0]):
                    acc += per_level[level, i, d]
                grad_x[i, d] = acc if (x[i, d] >= zero and x[i, d] <= one) else zero


def _consts(dtype):
    # (0, 0.5, 1) in the points' dtype, so float32 arithmetic never widens to float64 inside the kernels
    return np.array([0.0, 0.5, 1.0], dtype=dtype)


def hash_forward_cpu(x, table, scales, resolutions, offsets, n_dense, hash_mask):
    """Features [N, L*F] of points x [N, 3] (contiguous numpy arrays of one float dtype)."""
    out = np.empty((x.shape[0], scales.shape[0] * table.shape[1]), dtype=x.dtype)
    _forward(x, table, scales, _consts(x.dtype), resolutions, offsets, n_dense, hash_mask, out)
    return out


def hash_backward_table_cpu(x, grad_out, scales, resolutions, offsets, n_dense, hash_mask, n_rows):
    """Gradient [n_rows, F] of the table from grad_out [N, L*F]."""
    n_feat = grad_out.shape[1] // scales.shape[0]
    grad_table = np.empty((n_rows, n_feat), dtype=grad_out.dtype)
    # zero by a sequential pass, so the pages are mapped in order rather than faulted in by the random scatter
    grad_table.fill(0)
    _backward_table(
        x, grad_out, scales, _consts(x.dtype), resolutions, offsets, n_dense, hash_mask, grad_table
    )
    return grad_table


def hash_backward_input_cpu(x, table, grad_out, scales, resolutions, offsets, n_dense, hash_mask):
    """Gradient [N, 3] of the points from grad_out [N, L*F]."""
    grad_x = np.empty_like(x)
    _backward_input(
        x, table, grad_out, scales, _consts(x.dtype), resolutions, offsets, n_dense, hash_mask, grad_x
    )
    return grad_x


def hash_backward_both_cpu(x, table, grad_out, scales, resolutions, offsets, n_dense, hash_mask, n_rows):
    """(gradient [N, 3] of the points, gradient [n_rows, F] of the table) in one pass over the corners.

    Equal, bit for bit, to `hash_backward_input_cpu` and `hash_backward_table_cpu` (same sums in the same
    order); it finds each point's corners once instead of twice. Holds [L, N, 3] level gradients meanwhile.
    """
    consts = _consts(x.dtype)
    grad_table = np.empty((n_rows, table.shape[1]), dtype=grad_out.dtype)
    grad_table.fill(0)  # sequential zeroing, as in hash_backward_table_cpu
    per_level = np.empty((scales.shape[0], x.shape[0], 3), dtype=x.dtype)
    _backward_both(
        x, table, grad_out, scales, consts, resolutions, offsets, n_dense, hash_mask, grad_table, per_level
    )
    grad_x = np.empty_like(x)
    _sum_levels(x, per_level, consts, grad_x)
    return grad_x, grad_table
