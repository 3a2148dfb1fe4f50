"""Tetrahedral grids of a cube: the domain DMTet deforms and marches (Shen et al. 2021, sec. 3.1).

DMTet and threestudio load pre-built tetrahedralisations (Quartet's BCC-like grids, shipped by kaolin as
`{res}_tets.npz`). We build our own instead: the Kuhn (Freudenthal) subdivision of a regular grid of
cubes. Each cube cell is split into 6 tetrahedra that all share the cell's main diagonal (0,0,0)-(1,1,1);
tet k walks from corner (0,0,0) to (1,1,1) adding one unit axis at a time, in the order of the k-th
permutation of (x, y, z). Because every cell uses the same split, two cells that share a square face
split it along the same diagonal, so the grid is conforming (each interior triangle belongs to exactly
two tets) without any bookkeeping. All tets have volume cell^3 / 6 and are oriented with positive
volume: det(v1 - v0, v2 - v0, v3 - v0) > 0.

Sizes for `resolution` R cells per side: (R+1)^3 vertices, 6 R^3 tets, 3 R (R+1)^2 + 3 R^2 (R+1) + R^3
edges (each vertex has one edge along every offset in {0,1}^3 \\ {0} that stays in the grid), and
12 R^2 boundary triangles (each of the 6 R^2 boundary squares is cut in two). Note that our
"resolution" counts cube cells: resolution 64 (1.6 M tets) is about the size of kaolin's "128" grid.

Grids are cached on disk as `.npz` files keyed by resolution and bound, written atomically.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["TetGrid", "default_cache_dir", "kuhn_edges", "tet_edges", "tet_grid", "tet_volumes"]

MIN_RESOLUTION = 1  # a single cube is a valid (if useless) grid; tests use tiny ones
MAX_RESOLUTION = 256  # 100 M tets (1.6 GB as int32 on disk, 3.2 GB as int64 in memory)
CACHE_ENV = "SV3D_CACHE"  # overrides the cache root (default ~/.cache/sv3d-open)

# The 6 edges of a tet as pairs of local vertex indices; marching_tets uses the same order.
TET_EDGES = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))


@dataclass
class TetGrid:
    """A tetrahedralised cube [-bound, bound]^3 with `resolution` cube cells per side."""

    vertices: Tensor  # [N, 3] float32, N = (R+1)^3, index = (i * (R+1) + j) * (R+1) + k for (x, y, z)
    tets: Tensor  # [T, 4] int64, T = 6 R^3, positive volume
    resolution: int  # cube cells per side
    bound: float  # half-width of the cube

    @property
    def cell_size(self) -> float:
        return 2.0 * self.bound / self.resolution

    @property
    def device(self) -> torch.device:
        return self.vertices.device

    def to(self, device: torch.device | str) -> TetGrid:
        return replace(self, vertices=self.vertices.to(device), tets=self.tets.to(device))

    def edges(self) -> Tensor:
        """[E, 2] int64 unique edges (a < b) of this grid; same set as `tet_edges(self.tets)`."""
        return kuhn_edges(self.resolution).to(self.device)

    def boundary_mask(self) -> Tensor:
        """[N] bool: vertices on the surface of the cube."""
        r = self.resolution
        idx = torch.arange(r + 1, device=self.device)
        ijk = torch.stack(torch.meshgrid(idx, idx, idx, indexing="ij"), dim=-1).reshape(-1, 3)  # [N, 3]
        return ((ijk == 0) | (ijk == r)).any(dim=-1)


def default_cache_dir() -> Path:
    """`$SV3D_CACHE/tets` when the variable is set, else `~/.cache/sv3d-open/tets`."""
    root = os.environ.get(CACHE_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "sv3d-open"
    return base / "tets"


def _kuhn_local_tets() -> np.ndarray:
    """[6, 4, 3] corner offsets of the 6 Kuhn tets of the unit cube, each with positive volume."""
    eye = np.eye(3, dtype=np.int64)
    tets = []
    for perm in itertools.permutations(range(3)):
        corners = [np.zeros(3, dtype=np.int64)]
        for axis in perm:
            corners.append(corners[-1] + eye[axis])
        c = np.stack(corners)  # [4, 3]
        if np.linalg.det((c[1:] - c[0]).astype(np.float64)) < 0:  # odd permutation: swap two vertices
            c = c[[0, 1, 3, 2]]
        tets.append(c)
    return np.stack(tets)


def _generate(resolution: int, bound: float) -> tuple[np.ndarray, np.ndarray]:
    """Vertices [N, 3] float32 and tets [T, 4] int64 of the Kuhn grid (vectorised over cells)."""
    r, n = resolution, resolution + 1
    axis = np.linspace(-bound, bound, n, dtype=np.float64)
    vertices = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)  # [N, 3]
    vertices = vertices.astype(np.float32)  # linspace puts the outer layer exactly on +-bound
    local = _kuhn_local_tets()  # [6, 4, 3]
    strides = np.array([n * n, n, 1], dtype=np.int64)
    offsets = local @ strides  # [6, 4] offsets in flat vertex index
    cells = np.arange(r, dtype=np.int64)
    ci, cj, ck = np.meshgrid(cells, cells, cells, indexing="ij")
    base = (ci * n * n + cj * n + ck).reshape(-1)  # [C] flat index of each cell's (0,0,0) corner
    tets = (base[:, None, None] + offsets[None]).reshape(-1, 4)  # [C, 6, 4] -> [6C, 4]
    return vertices, tets


def _cache_path(cache_dir: Path, resolution: int, bound: float) -> Path:
    return cache_dir / f"kuhn_r{resolution}_b{float(bound)!r}.npz"  # the shortest exact repr: 0.55


def _save_atomic(path: Path, vertices: np.ndarray, tets: np.ndarray, resolution: int, bound: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            # int32 halves the file; every index fits (N <= 257^3 < 2^31).
            np.savez(f, vertices=vertices, tets=tets.astype(np.int32), resolution=resolution, bound=bound)
            f.flush()
            os.fsync(f.fileno())  # a crash after the rename must not leave a short file under the name
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache is shared like any downloaded file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def tet_grid(
    resolution: int, bound: float = 0.55, cache_dir: Path | str | None = None, cache: bool = True
) -> TetGrid:
    """The Kuhn tet grid of [-bound, bound]^3 with `resolution` cells per side, on the CPU.

    Loaded from `cache_dir` (default: `default_cache_dir()`) when present, else generated and saved
    there atomically; `cache=False` neither reads nor writes. Move it with `.to(device)`.
    """
    if not isinstance(resolution, int) or not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
        raise ValueError(
            f"resolution must be an int in [{MIN_RESOLUTION}, {MAX_RESOLUTION}], got {resolution}"
        )
    if not bound > 0:
        raise ValueError(f"bound must be > 0, got {bound}")
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = _cache_path(folder, resolution, bound)
    loaded = _load_cached(path, resolution, float(bound)) if cache and path.is_file() else None
    if loaded is not None:
        vertices, tets = loaded
    else:
        vertices, tets = _generate(resolution, float(bound))
        if cache:
            try:
                _save_atomic(path, vertices, tets, resolution, float(bound))
            except OSError as err:  # a read-only or full cache: the grid works uncached, regenerated per run
                warnings.warn(f"tet grid not cached in {folder}: {err.strerror or err}", stacklevel=2)
    return TetGrid(torch.from_numpy(vertices), torch.from_numpy(tets), resolution, float(bound))


def _load_cached(path: Path, resolution: int, bound: float) -> tuple[np.ndarray, np.ndarray] | None:
    """A cached grid's (vertices, tets), or None when the file is unreadable or not the grid it names
    (a write cut short by a crash, a disk error, another bound): the caller then regenerates and replaces
    it."""
    n, n_tets = (resolution + 1) ** 3, 6 * resolution**3
    try:
        with np.load(path) as data:
            vertices, tets = data["vertices"], data["tets"].astype(np.int64)
            stored = float(data["bound"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    if vertices.shape != (n, 3) or tets.shape != (n_tets, 4) or tets.min() < 0 or tets.max() >= n:
        return None
    if stored != bound:  # names of before 2026-12-08 rounded the bound to 6 digits
        return None
    return vertices, tets


def tet_volumes(vertices: Tensor, tets: Tensor) -> Tensor:
    """[T] signed volumes det(v1 - v0, v2 - v0, v3 - v0) / 6 (positive = our orientation)."""
    v = vertices[tets]  # [T, 4, 3]
    return torch.linalg.det(v[:, 1:] - v[:, :1]) / 6.0


def tet_edges(tets: Tensor, return_tet_edges: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """[E, 2] int64 unique edges (a < b, sorted by (a, b)) of any tet mesh.

    With `return_tet_edges`, also the [T, 6] index into those edges of each tet's edges, in the local
    order `TET_EDGES`; `marching_tets(..., edges=...)` takes it to skip its own deduplication.
    """
    if tets.ndim != 2 or tets.shape[1] != 4:
        raise ValueError(f"tets must be [T, 4], got {tuple(tets.shape)}")
    local = torch.tensor(TET_EDGES, device=tets.device)  # [6, 2]
    pairs = tets[:, local].reshape(-1, 2)  # [T * 6, 2]
    pairs = torch.sort(pairs, dim=1).values
    n = int(tets.max()) + 1 if tets.numel() else 1
    keys = pairs[:, 0] * n + pairs[:, 1]  # [T * 6] unique per undirected edge
    uniq, inverse = torch.unique(keys, return_inverse=True)
    edges = torch.stack([uniq // n, uniq % n], dim=1)  # [E, 2]
    if return_tet_edges:
        return edges, inverse.reshape(-1, 6)
    return edges


def kuhn_edges(resolution: int) -> Tensor:
    """[E, 2] int64 unique edges of the Kuhn grid, built directly (no sort over the tets).

    Every Kuhn edge joins vertex (i, j, k) to (i, j, k) + d for one d in {0,1}^3 \\ {0} (a sum of
    consecutive steps of a monotone path through the cell), and every such pair inside the grid is an
    edge. Sorted by (a, b) like `tet_edges`.
    """
    r, n = resolution, resolution + 1
    idx = torch.arange(n)
    ijk = torch.stack(torch.meshgrid(idx, idx, idx, indexing="ij"), dim=-1).reshape(-1, 1, 3)  # [N, 1, 3]
    # The 7 offsets in product order have increasing flat offsets, so row-major order is sorted by (a, b).
    d = torch.tensor(list(itertools.product((0, 1), repeat=3))[1:])  # [7, 3]
    step = (d[:, 0] * n + d[:, 1]) * n + d[:, 2]  # [7] flat index offsets
    ok = ((ijk + d) <= r).all(dim=-1)  # [N, 7]
    a = torch.arange(n**3)[:, None].expand(-1, 7)  # [N, 7]
    return torch.stack([a[ok], (a + step)[ok]], dim=1)  # [E, 2]
