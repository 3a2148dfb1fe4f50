"""Triton kernels of the multiresolution hash encoding (forward, and backward to the table and the points).

The same arithmetic as `encoding.hash_encode_torch` (see `nerf/encoding.py` for the level geometry), fused:
one program encodes BLOCK points at every level, so the [N, L, 8] corner indices and weights that the
PyTorch path materialises never reach memory. The table's gradient is scattered with atomic adds (as
tiny-cuda-nn does); the points' gradient is summed in registers over levels and corners.

Runs on CUDA tensors; with TRITON_INTERPRET=1 set before triton is first imported, Triton's interpreter
runs the same kernels on CPU tensors (how the tests check them on machines without a GPU: tests/conftest.py
sets it there). The kernels live in `_hash_triton_kernels.py`, imported on first use.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

__all__ = ["AVAILABLE", "hash_backward_triton", "hash_forward_triton", "runs_on"]

AVAILABLE = importlib.util.find_spec("triton") is not None  # imported on first use only
BLOCK = 128  # points per program
PRIMES = (1, 2654435761, 805459861)  # as encoding.PRIMES; passed as int64 kernel arguments


def runs_on(device: torch.device) -> bool:
    """Whether the kernels can run on `device`: CUDA, or CPU under Triton's interpreter."""
    if not AVAILABLE:
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def _launch_grid(n: int) -> tuple[int]:
    return ((n + BLOCK - 1) // BLOCK,)


def hash_forward_triton(
    x: Tensor,  # [N, 3] contiguous, float32 or float64
    table: Tensor,  # [n_rows, F] contiguous, x's dtype and device
    scales: Tensor,  # [L] x's dtype
    resolutions: Tensor,  # [L] int64
    offsets: Tensor,  # [L] int64
    n_dense: int,
    hash_mask: int,
) -> Tensor:  # [N, L*F]
    from nerf._hash_triton_kernels import forward_kernel

    n, n_levels, n_feat = x.shape[0], scales.shape[0], table.shape[1]
    out = torch.empty(n, n_levels * n_feat, dtype=x.dtype, device=x.device)
    levels = (scales, resolutions, offsets, n, n_levels, n_dense, hash_mask, *PRIMES)  # the kernels' order
    if n:
        forward_kernel[_launch_grid(n)](x, table, out, *levels, F=n_feat, BLOCK_N=BLOCK)
    return out


def hash_backward_triton(
    x: Tensor,
    table: Tensor,
    grad_out: Tensor,  # [N, L*F] contiguous
    scales: Tensor,
    resolutions: Tensor,
    offsets: Tensor,
    n_dense: int,
    hash_mask: int,
    need_table: bool,
    need_x: bool,
) -> tuple[Tensor | None, Tensor | None]:  # grad_x [N, 3], grad_table [n_rows, F]
    from nerf._hash_triton_kernels import backward_kernel

    n, n_levels, n_feat = x.shape[0], scales.shape[0], table.shape[1]
    grad_table = torch.zeros_like(table) if need_table else None
    grad_x = torch.zeros_like(x) if need_x else None
    levels = (scales, resolutions, offsets, n, n_levels, n_dense, hash_mask, *PRIMES)
    if n and (need_table or need_x):
        # unused gradient outputs get a placeholder pointer; the kernel never writes them
        outputs = (table if grad_table is None else grad_table, x if grad_x is None else grad_x)
        consts = {"F": n_feat, "BLOCK_N": BLOCK, "NEED_TABLE": need_table, "NEED_X": need_x}
        backward_kernel[_launch_grid(n)](x, table, grad_out, *outputs, *levels, **consts)
    return grad_x, grad_table
