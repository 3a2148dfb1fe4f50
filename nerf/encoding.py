"""Multiresolution hash encoding (Instant-NGP: Müller et al. 2022, "Instant Neural Graphics Primitives with
a Multiresolution Hash Encoding", sec. 3 and eq. 3-4), the input encoding of the radiance field and of
`refine`'s geometry.

A point x in [0, 1]^3 is looked up at `n_levels` grid resolutions growing geometrically by
`per_level_scale`; at each level the `n_features_per_level` features of the 8 grid vertices around it are
interpolated trilinearly, and the levels' features are concatenated. All levels share one parameter table
`[n_rows, F]`, level l owning rows `offsets[l] : offsets[l] + sizes[l]`: a coarse level whose whole grid
fits in `2**log2_hashmap_size` rows is indexed densely (x + y*R + z*R^2), a finer one through the spatial
hash `(x * 1) XOR (y * 2654435761) XOR (z * 805459861) mod 2**log2_hashmap_size`.

Level geometry, as instant-ngp: scale_l = base_resolution * per_level_scale**l - 1 and the point's grid
position is x * scale_l + 0.5 (the half-cell offset keeps the levels' vertices from lining up); the grid has
R_l = floor(scale_l + 0.5) + 2 vertices per axis, exactly those that points in [0, 1] touch. Points are
clamped to [0, 1] (zero gradient outside).

Three implementations, tested against each other (`tests/test_nerf_encoding.py`):
* `hash_encode_reference`: per level, per corner, the formulas above written out; the reference.
* `hash_encode_torch`: all levels and corners at once in PyTorch; differentiable twice (normals, eikonal);
  the path on CUDA.
* the numba kernels of `nerf/_hash_cpu.py` in a custom autograd Function (`backend="numba"`): the fast CPU
  path, differentiable once w.r.t. the table and the points.
* the Triton kernels of `nerf/_hash_triton.py` (`backend="triton"`, CUDA; differentiable once): all levels
  fused per point, the table's gradient by atomic adds. Tested here under Triton's CPU interpreter; its
  speed on a GPU is not measured yet, so "auto" does not pick it.
`hash_encode(..., backend="auto")` takes numba on CPU and torch elsewhere.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from nerf import _hash_cpu, _hash_triton

__all__ = [
    "HashGridConfig",
    "HashGridEncoder",
    "HashGridLevels",
    "hash_encode",
    "hash_encode_reference",
    "hash_encode_torch",
    "hash_grid_levels",
]

PRIMES = (1, 2654435761, 805459861)  # instant-ngp's spatial-hash primes, one per axis
BACKENDS = ("auto", "torch", "numba", "triton")
INIT_SCALE = 1e-4  # instant-ngp initialises the table U(-1e-4, 1e-4)


@dataclass(frozen=True)
class HashGridConfig:
    """Hash-grid hyper-parameters, instant-ngp's names (`configs/nerf/base.json`) and defaults."""

    n_levels: int = 16  # resolution levels L; instant-ngp uses 16 (paper's range 2..32)
    n_features_per_level: int = 2  # features F per level; 2 is the paper's speed/quality optimum (1, 2, 4, 8)
    log2_hashmap_size: int = 19  # table rows per hashed level T = 2**this; paper's range 14..24
    base_resolution: int = 16  # coarsest grid resolution N_min; paper: 16
    per_level_scale: float = 1.447  # growth b between levels, >= 1; 1.26..2 in the paper (1.447: 16 -> ~4096)
    finest_resolution: int | None = None  # if set, N_max: per_level_scale is derived so level L-1 reaches it
    interpolation: str = (
        "linear"  # "linear" (trilinear) only; instant-ngp's "Nearest"/"Smoothstep" are not here
    )

    def __post_init__(self) -> None:
        if self.n_levels < 1:
            raise ValueError(f"n_levels must be >= 1, got {self.n_levels}")
        if self.n_features_per_level < 1:
            raise ValueError(f"n_features_per_level must be >= 1, got {self.n_features_per_level}")
        if not 1 <= self.log2_hashmap_size <= 30:
            raise ValueError(f"log2_hashmap_size must be in [1, 30], got {self.log2_hashmap_size}")
        if self.base_resolution < 2:
            raise ValueError(f"base_resolution must be >= 2, got {self.base_resolution}")
        if self.interpolation != "linear":
            raise ValueError(f"interpolation must be 'linear', got {self.interpolation!r}")
        if self.finest_resolution is not None:
            if self.finest_resolution < self.base_resolution:
                raise ValueError(
                    f"finest_resolution must be >= base_resolution ({self.base_resolution}), "
                    f"got {self.finest_resolution}"
                )
            # b = exp((ln N_max - ln N_min) / (L - 1)), paper eq. 3
            growth = (
                math.exp(math.log(self.finest_resolution / self.base_resolution) / (self.n_levels - 1))
                if self.n_levels > 1
                else 1.0
            )
            object.__setattr__(self, "per_level_scale", growth)
        if not self.per_level_scale >= 1.0:
            raise ValueError(f"per_level_scale must be >= 1, got {self.per_level_scale}")

    @property
    def output_dim(self) -> int:
        """Width of the encoding: n_levels * n_features_per_level."""
        return self.n_levels * self.n_features_per_level


@dataclass(frozen=True)
class HashGridLevels:
    """Per-level geometry of a hash grid, derived from its config (see the module docstring)."""

    scales: tuple[float, ...]  # [L] scale_l = base * b**l - 1; grid position = x * scale_l + 0.5
    resolutions: tuple[int, ...]  # [L] vertices per axis R_l = floor(scale_l + 0.5) + 2
    sizes: tuple[int, ...]  # [L] table rows of the level: R_l**3 (dense) or 2**log2_hashmap_size (hashed)
    offsets: tuple[int, ...]  # [L] first row of the level in the table
    n_dense: int  # levels 0 .. n_dense-1 are dense, the rest hashed (resolution grows with the level)
    n_rows: int  # total table rows, sum of sizes
    hash_mask: int  # 2**log2_hashmap_size - 1: the hash modulo as a bit mask


@functools.lru_cache(maxsize=64)
def hash_grid_levels(config: HashGridConfig) -> HashGridLevels:
    """The per-level scales, resolutions and table layout of `config`."""
    table_size = 2**config.log2_hashmap_size
    scales, resolutions, sizes, offsets = [], [], [], []
    n_dense, row = 0, 0
    for level in range(config.n_levels):
        scale = config.base_resolution * config.per_level_scale**level - 1.0
        res = int(math.floor(scale + 0.5)) + 2
        dense = res**3 <= table_size
        n_dense += int(dense)
        size = res**3 if dense else table_size
        scales.append(scale)
        resolutions.append(res)
        sizes.append(size)
        offsets.append(row)
        row += size
    return HashGridLevels(
        scales=tuple(scales),
        resolutions=tuple(resolutions),
        sizes=tuple(sizes),
        offsets=tuple(offsets),
        n_dense=n_dense,
        n_rows=row,
        hash_mask=table_size - 1,
    )


def _check_inputs(x: Tensor, table: Tensor, config: HashGridConfig) -> HashGridLevels:
    levels = hash_grid_levels(config)
    if x.ndim != 2 or x.shape[1] != 3:
        raise ValueError(f"x must have shape [N, 3], got {list(x.shape)}")
    expected = [levels.n_rows, config.n_features_per_level]
    if list(table.shape) != expected:
        raise ValueError(f"table must have shape {expected} for this config, got {list(table.shape)}")
    if x.dtype != table.dtype or not x.is_floating_point():
        raise ValueError(f"x and table must share one float dtype, got {x.dtype} and {table.dtype}")
    if x.device != table.device:
        raise ValueError(f"x and table must be on one device, got {x.device} and {table.device}")
    return levels


def _vertex_row(ix: Tensor, iy: Tensor, iz: Tensor, level: int, levels: HashGridLevels) -> Tensor:
    # row in the table of grid vertex (ix, iy, iz) [N] int64 of `level`
    if level < levels.n_dense:
        r = levels.resolutions[level]
        local = ix + iy * r + iz * (r * r)
    else:
        # int64 products keep the low 32 bits of instant-ngp's uint32 arithmetic; the mask is mod 2**k
        local = (ix * PRIMES[0]) ^ (iy * PRIMES[1]) ^ (iz * PRIMES[2])
        local = local & levels.hash_mask
    return levels.offsets[level] + local


def hash_encode_reference(
    x: Tensor,  # [N, 3] in [0, 1]
    table: Tensor,  # [n_rows, F] all levels' features
    config: HashGridConfig,
) -> Tensor:  # [N, L*F]
    """The encoding written out level by level and corner by corner; the reference for the fast paths."""
    levels = _check_inputs(x, table, config)
    x = x.clamp(0.0, 1.0)
    features = []
    for level in range(config.n_levels):
        scale = torch.tensor(levels.scales[level], dtype=x.dtype, device=x.device)
        pos = x * scale + 0.5  # [N, 3] grid position
        cell = torch.floor(pos)  # [N, 3] lower corner
        frac = pos - cell  # [N, 3] in [0, 1)
        cell = cell.long()
        acc = torch.zeros(x.shape[0], config.n_features_per_level, dtype=x.dtype, device=x.device)
        for corner in range(8):
            bits = [(corner >> axis) & 1 for axis in range(3)]  # which side of the cell, per axis
            weight = torch.ones_like(frac[:, 0])
            for axis in range(3):
                weight = weight * (frac[:, axis] if bits[axis] else 1.0 - frac[:, axis])
            rows = _vertex_row(
                cell[:, 0] + bits[0], cell[:, 1] + bits[1], cell[:, 2] + bits[2], level, levels
            )
            acc = acc + weight[:, None] * table[rows]  # [N, F]
        features.append(acc)
    return torch.cat(features, dim=1)  # [N, L*F]


def hash_encode_torch(
    x: Tensor,  # [N, 3] in [0, 1]
    table: Tensor,  # [n_rows, F]
    config: HashGridConfig,
) -> Tensor:  # [N, L*F]
    """All levels and the 8 corners at once in PyTorch: any device, differentiable twice."""
    levels = _check_inputs(x, table, config)
    n, n_levels, n_feat = x.shape[0], config.n_levels, config.n_features_per_level
    scales = torch.tensor(levels.scales, dtype=x.dtype, device=x.device)  # [L]
    # NaN (a diverged fit) reads x = 0 as the compiled kernels do: floor(NaN) indexed outside the table (an
    # IndexError on the CPU, a device-side assert that ends the CUDA context)
    pos = torch.nan_to_num(x, nan=0.0).clamp(0.0, 1.0)[:, None, :] * scales[None, :, None] + 0.5  # [N, L, 3]
    cell = torch.floor(pos)
    frac = pos - cell  # [N, L, 3]
    lo = cell.long()  # [N, L, 3]
    coords = torch.stack([lo, lo + 1], dim=-1)  # [N, L, 3, 2]: both vertices per axis
    # per-axis multipliers: dense (1, R, R^2) for the first n_dense levels, the primes for the hashed ones
    mult = torch.tensor(
        [
            [1, r, r * r] if level < levels.n_dense else list(PRIMES)
            for level, r in enumerate(levels.resolutions)
        ],
        dtype=torch.long,
        device=x.device,
    )  # [L, 3]
    terms = coords * mult[None, :, :, None]  # [N, L, 3, 2]
    tx, ty, tz = terms[:, :, 0], terms[:, :, 1], terms[:, :, 2]  # [N, L, 2] each
    nd = levels.n_dense
    dense = (
        tx[:, :nd, :, None, None] + ty[:, :nd, None, :, None] + tz[:, :nd, None, None, :]
    )  # [N, nd, 2, 2, 2]
    hashed = (
        tx[:, nd:, :, None, None] ^ ty[:, nd:, None, :, None] ^ tz[:, nd:, None, None, :]
    ) & levels.hash_mask
    offsets = torch.tensor(levels.offsets, dtype=torch.long, device=x.device)  # [L]
    rows = torch.cat([dense, hashed], dim=1) + offsets[None, :, None, None, None]  # [N, L, 2, 2, 2]
    # trilinear weights, corner (bx, by, bz) -> prod over axes of (1 - f, f)[b]
    w = torch.stack([1.0 - frac, frac], dim=-1)  # [N, L, 3, 2]
    weight = (
        w[:, :, 0, :, None, None] * w[:, :, 1, None, :, None] * w[:, :, 2, None, None, :]
    )  # [N, L, 2, 2, 2]
    corner_features = table[rows.reshape(-1)].view(n, n_levels, 8, n_feat)  # [N, L, 8, F]
    out = (corner_features * weight.reshape(n, n_levels, 8, 1)).sum(dim=2)  # [N, L, F]
    return out.reshape(n, n_levels * n_feat)  # [N, L*F]


class _HashEncodeCPU(torch.autograd.Function):
    """The numba kernels as an autograd Function: gradients w.r.t. the table and the points (once)."""

    @staticmethod
    def forward(ctx, x: Tensor, table: Tensor, levels: HashGridLevels) -> Tensor:
        args = _kernel_args(levels, x.dtype)
        x_np = x.detach().contiguous().numpy()
        table_np = table.detach().contiguous().numpy()
        out = _hash_cpu.hash_forward_cpu(x_np, table_np, *args)  # [N, L*F]
        ctx.save_for_backward(x, table)
        ctx.levels = levels
        return torch.from_numpy(out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, table = ctx.saved_tensors
        levels: HashGridLevels = ctx.levels
        args = _kernel_args(levels, x.dtype)
        x_np = x.detach().contiguous().numpy()
        g_np = grad_out.contiguous().numpy()
        grad_x = grad_table = None
        if ctx.needs_input_grad[0] and ctx.needs_input_grad[1]:  # one pass over the corners for both
            table_np = table.detach().contiguous().numpy()
            both = _hash_cpu.hash_backward_both_cpu(x_np, table_np, g_np, *args, levels.n_rows)
            return torch.from_numpy(both[0]), torch.from_numpy(both[1]), None
        if ctx.needs_input_grad[1]:
            grad_table = torch.from_numpy(_hash_cpu.hash_backward_table_cpu(x_np, g_np, *args, levels.n_rows))
        if ctx.needs_input_grad[0]:
            table_np = table.detach().contiguous().numpy()
            grad_x = torch.from_numpy(_hash_cpu.hash_backward_input_cpu(x_np, table_np, g_np, *args))
        return grad_x, grad_table, None


class _HashEncodeTriton(torch.autograd.Function):
    """The Triton kernels as an autograd Function: gradients w.r.t. the table and the points (once)."""

    @staticmethod
    def forward(ctx, x: Tensor, table: Tensor, levels: HashGridLevels) -> Tensor:
        x, table = x.detach().contiguous(), table.detach().contiguous()
        args = _triton_args(levels, x.dtype, x.device)
        ctx.save_for_backward(x, table)
        ctx.levels = levels
        return _hash_triton.hash_forward_triton(x, table, *args)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, table = ctx.saved_tensors
        args = _triton_args(ctx.levels, x.dtype, x.device)
        grad_x, grad_table = _hash_triton.hash_backward_triton(
            x, table, grad_out.contiguous(), *args, ctx.needs_input_grad[1], ctx.needs_input_grad[0]
        )
        return grad_x, grad_table, None


@functools.lru_cache(maxsize=16)
def _triton_args(levels: HashGridLevels, dtype: torch.dtype, device: torch.device) -> tuple:
    # (scales [L] in x's dtype, resolutions [L] int64, offsets [L] int64, n_dense, hash_mask) on `device`
    return (
        torch.tensor(levels.scales, dtype=dtype, device=device),
        torch.tensor(levels.resolutions, dtype=torch.int64, device=device),
        torch.tensor(levels.offsets, dtype=torch.int64, device=device),
        levels.n_dense,
        levels.hash_mask,
    )


@functools.lru_cache(maxsize=64)
def _kernel_args_cached(levels: HashGridLevels, dtype: np.dtype) -> tuple:
    scales = np.asarray(levels.scales, dtype=dtype)
    resolutions = np.asarray(levels.resolutions, dtype=np.int64)
    offsets = np.asarray(levels.offsets, dtype=np.int64)
    return scales, resolutions, offsets, levels.n_dense, levels.hash_mask


def _kernel_args(levels: HashGridLevels, dtype: torch.dtype) -> tuple:
    # (scales [L] in x's dtype, resolutions [L] int64, offsets [L] int64, n_dense, hash_mask)
    np_dtype = {torch.float32: np.float32, torch.float64: np.float64}.get(dtype)
    if np_dtype is None:
        raise ValueError(f"backend='numba' supports float32 and float64 points, got {dtype}")
    return _kernel_args_cached(levels, np.dtype(np_dtype))


def hash_encode(
    x: Tensor,  # [N, 3] in [0, 1] (clamped)
    table: Tensor,  # [n_rows, F] from `hash_grid_levels(config).n_rows`
    config: HashGridConfig,
    backend: str = "auto",  # "numba" (CPU), "triton" (CUDA), "torch" (any device, twice differentiable)
) -> Tensor:  # [N, n_levels * F], levels coarse to fine, x's dtype
    """Encode points with the multiresolution hash grid.

    Differentiable w.r.t. `table` and `x`. "auto" picks numba for CPU tensors (when installed) and torch
    otherwise. The numba and triton paths are differentiable once only: for double backward (an eikonal
    loss on gradients w.r.t. x, with create_graph=True) pass backend="torch".
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "triton":
        if not _hash_triton.runs_on(x.device):
            raise RuntimeError(
                f"backend='triton' needs the triton package and CUDA tensors (or TRITON_INTERPRET=1 on CPU), "
                f"got {x.device}"
            )
        f = config.n_features_per_level
        if f & (f - 1):  # the kernels' tl.arange over the features
            raise ValueError(f"backend='triton' needs n_features_per_level a power of two, got {f}")
        return _HashEncodeTriton.apply(x, table, _check_inputs(x, table, config))
    use_numba = backend == "numba" or (backend == "auto" and x.device.type == "cpu" and _hash_cpu.AVAILABLE)
    if use_numba and not _hash_cpu.AVAILABLE:
        raise RuntimeError("backend='numba' needs the numba package")
    if use_numba and (x.device.type != "cpu" or table.device.type != "cpu"):
        raise ValueError(f"backend='numba' runs on CPU tensors, got x on {x.device}, table on {table.device}")
    if not use_numba:
        return hash_encode_torch(x, table, config)
    levels = _check_inputs(x, table, config)
    return _HashEncodeCPU.apply(x, table, levels)


class HashGridEncoder(torch.nn.Module):
    """Learned multiresolution hash encoding: x [N, 3] in [0, 1] -> features [N, n_levels * F]."""

    def __init__(self, config: HashGridConfig | None = None, backend: str = "auto") -> None:
        super().__init__()
        self.config = config if config is not None else HashGridConfig()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.backend = backend
        self.levels = hash_grid_levels(self.config)
        # one table for all levels: [sum of level sizes, F], U(-1e-4, 1e-4) as instant-ngp
        table = torch.empty(self.levels.n_rows, self.config.n_features_per_level)
        self.table = torch.nn.Parameter(table.uniform_(-INIT_SCALE, INIT_SCALE))

    @property
    def output_dim(self) -> int:
        return self.config.output_dim

    def forward(self, x: Tensor) -> Tensor:  # [N, 3] in [0, 1] -> [N, L*F]
        return hash_encode(x, self.table, self.config, self.backend)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"n_levels={c.n_levels}, n_features_per_level={c.n_features_per_level}, "
            f"log2_hashmap_size={c.log2_hashmap_size}, base_resolution={c.base_resolution}, "
            f"per_level_scale={c.per_level_scale:.4f}, n_dense={self.levels.n_dense}, "
            f"rows={self.levels.n_rows}"
        )
