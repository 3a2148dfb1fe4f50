"""The Triton kernels behind `nerf/_hash_triton.py` (imported on first use, so that TRITON_INTERPRET=1, when
set before, makes Triton's interpreter run them on CPU tensors)."""

import triton
import triton.language as tl

__all__ = ["backward_kernel", "forward_kernel"]


@triton.jit
def _cell(x, scale):
    """Grid position x * scale + 0.5 of points x [B] in [0, 1]: (fraction in the cell, lower vertex int64)."""
    q = x * scale + 0.5
    c = tl.floor(q)
    return q - c, c.to(tl.int64)


@triton.jit
def _rows(j0, j1, j2, dense, res, off, hash_mask, p0, p1, p2):
    """Table rows [B] int64 of grid vertices (j0, j1, j2) of a level: dense index or instant-ngp's hash."""
    hashed = ((j0 * p0) ^ (j1 * p1) ^ (j2 * p2)) & hash_mask
    return off + tl.where(dense, j0 + j1 * res + j2 * res * res, hashed)


@triton.jit
def forward_kernel(
    x_ptr,
    table_ptr,
    out_ptr,
    scales_ptr,
    res_ptr,
    offsets_ptr,
    n,
    n_levels,
    n_dense,
    hash_mask,
    p0,
    p1,
    p2,
    F: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    idx = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # [B]
    valid = idx < n
    feat = tl.arange(0, F)  # [F]
    x0 = tl.minimum(tl.maximum(tl.load(x_ptr + idx * 3 + 0, mask=valid, other=0.0), 0.0), 1.0)
    x1 = tl.minimum(tl.maximum(tl.load(x_ptr + idx * 3 + 1, mask=valid, other=0.0), 0.0), 1.0)
    x2 = tl.minimum(tl.maximum(tl.load(x_ptr + idx * 3 + 2, mask=valid, other=0.0), 0.0), 1.0)
    mask2 = valid[:, None] & (feat[None, :] < F)  # [B, F]
    for level in range(0, n_levels):
        scale = tl.load(scales_ptr + level)
        res = tl.load(res_ptr + level)
        off = tl.load(offsets_ptr + level)
        dense = level < n_dense
        f0, i0 = _cell(x0, scale)
        f1, i1 = _cell(x1, scale)
        f2, i2 = _cell(x2, scale)
        acc = tl.zeros([BLOCK_N, F], dtype=x0.dtype)
        for corner in tl.static_range(8):
            b0 = corner & 1  # which side of the cell, per axis (compile-time 0 or 1)
            b1 = (corner >> 1) & 1
            b2 = (corner >> 2) & 1
            w = (f0 * b0 + (1.0 - f0) * (1 - b0)) * (f1 * b1 + (1.0 - f1) * (1 - b1))
            w = w * (f2 * b2 + (1.0 - f2) * (1 - b2))
            rows = _rows(i0 + b0, i1 + b1, i2 + b2, dense, res, off, hash_mask, p0, p1, p2)  # [B]
            values = tl.load(table_ptr + rows[:, None] * F + feat[None, :], mask=mask2, other=0.0)
            acc += w[:, None] * values
        tl.store(out_ptr + idx[:, None] * (n_levels * F) + level * F + feat[None, :], acc, mask=mask2)


@triton.jit
def backward_kernel(
    x_ptr,
    table_ptr,
    grad_out_ptr,
    grad_table_ptr,
    grad_x_ptr,
    scales_ptr,
    res_ptr,
    offsets_ptr,
    n,
    n_levels,
    n_dense,
    hash_mask,
    p0,
    p1,
    p2,
    F: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NEED_TABLE: tl.constexpr,
    NEED_X: tl.constexpr,
):
    pid = tl.program_id(0)
    idx = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    valid = idx < n
    feat = tl.arange(0, F)
    r0 = tl.load(x_ptr + idx * 3 + 0, mask=valid, other=0.0)
    r1 = tl.load(x_ptr + idx * 3 + 1, mask=valid, other=0.0)
    r2 = tl.load(x_ptr + idx * 3 + 2, mask=valid, other=0.0)
    x0 = tl.minimum(tl.maximum(r0, 0.0), 1.0)
    x1 = tl.minimum(tl.maximum(r1, 0.0), 1.0)
    x2 = tl.minimum(tl.maximum(r2, 0.0), 1.0)
    mask2 = valid[:, None] & (feat[None, :] < F)
    gx0 = tl.zeros([BLOCK_N], dtype=x0.dtype)
    gx1 = tl.zeros([BLOCK_N], dtype=x0.dtype)
    gx2 = tl.zeros([BLOCK_N], dtype=x0.dtype)
    for level in range(0, n_levels):
        scale = tl.load(scales_ptr + level)
        res = tl.load(res_ptr + level)
        off = tl.load(offsets_ptr + level)
        dense = level < n_dense
        f0, i0 = _cell(x0, scale)
        f1, i1 = _cell(x1, scale)
        f2, i2 = _cell(x2, scale)
        g = tl.load(
            grad_out_ptr + idx[:, None] * (n_levels * F) + level * F + feat[None, :],
            mask=mask2,
            other=0.0,
        )  # [B, F]
        for corner in tl.static_range(8):
            b0 = corner & 1
            b1 = (corner >> 1) & 1
            b2 = (corner >> 2) & 1
            w0 = f0 * b0 + (1.0 - f0) * (1 - b0)  # [B] this corner's weight along each axis
            w1 = f1 * b1 + (1.0 - f1) * (1 - b1)
            w2 = f2 * b2 + (1.0 - f2) * (1 - b2)
            rows = _rows(i0 + b0, i1 + b1, i2 + b2, dense, res, off, hash_mask, p0, p1, p2)  # [B]
            if NEED_TABLE:
                w = w0 * w1 * w2
                tl.atomic_add(grad_table_ptr + rows[:, None] * F + feat[None, :], w[:, None] * g, mask=mask2)
            if NEED_X:
                values = tl.load(table_ptr + rows[:, None] * F + feat[None, :], mask=mask2, other=0.0)
                s = tl.sum(g * values, axis=1)  # [B] d loss / d (this corner's weight)
                d0 = 2.0 * b0 - 1.0  # d w_axis / d frac_axis
                d1 = 2.0 * b1 - 1.0
                d2 = 2.0 * b2 - 1.0
                gx0 += s * (d0 * w1 * w2) * scale
                gx1 += s * (w0 * d1 * w2) * scale
                gx2 += s * (w0 * w1 * d2) * scale
    if NEED_X:
        # clamp to [0, 1]: the gradient passes where min <= x <= max, as torch.clamp's
        gx0 = tl.where((r0 >= 0.0) & (r0 <= 1.0), gx0, 0.0)
        gx1 = tl.where((r1 >= 0.0) & (r1 <= 1.0), gx1, 0.0)
        gx2 = tl.where((r2 >= 0.0) & (r2 <= 1.0), gx2, 0.0)
        tl.store(grad_x_ptr + idx * 3 + 0, gx0, mask=valid)
        tl.store(grad_x_ptr + idx * 3 + 1, gx1, mask=valid)
        tl.store(grad_x_ptr + idx * 3 + 2, gx2, mask=valid)
