"""DMTet geometry: a learnable signed distance and vertex deformation on a tet grid, meshed by marching tets.

Follows DMTet (Shen et al. 2021, "Deep Marching Tetrahedra", sec. 3.1) as used for the fine stage of
SV3D (Voleti et al. 2024, sec. 4) through threestudio's `tetrahedra_sdf_grid`: every grid vertex carries
an SDF value s_i and an offset Δv_i; the surface is `marching_tets(v_i + Δv_i, tets, s)`, differentiable
in both. The offset is bounded with tanh to a fraction of a cell (DMTet bounds it the same way so that
the grid does not tangle). Sign convention: sdf < 0 inside.

It starts from any mesh whose signed distances the caller evaluates at `grid_vertices` and passes to
`init_from_sdf` (`sv3d refine` does so with the NeRF stage's `mesh.ply`), or from a density grid such as
the NeRF stage's `density.npz` (see `nerf.extract`) through `sdf_from_density`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .marching_tets import crossed_tets, marching_tets
from .mesh import Mesh
from .tetgrid import kuhn_edges, tet_grid

__all__ = ["DMTetConfig", "DMTetGeometry", "sdf_from_density", "sdf_sign_regulariser", "validate_init"]


@dataclass
class DMTetConfig:
    # Cube cells per side: 64 gives 1.6 M tets and ~20 k surface vertices for an object of radius 0.35
    # (kaolin's "128" grid is about this size); CPU-friendly. Callers choose 128 on CUDA.
    resolution: int = 64
    # Half-width of the grid: objects are scaled to a bounding sphere of radius 0.5 (ARCHITECTURE.md),
    # so 0.55 keeps a margin of ~3 cells at resolution 64 between the object and the grid's boundary.
    bound: float = 0.55
    # Largest offset per axis, in cells, reached through tanh. Half a cell is DMTet's choice and stops
    # vertices from crossing each other; note that on the Kuhn grid only <= 0.25 rules out every
    # inverted tet when neighbours move in opposite directions (a few inverted tets flip their triangles).
    deformation_scale: float = 0.5
    # Where the tet grid is cached; None uses `refine.tetgrid.default_cache_dir()` ($SV3D_CACHE).
    cache_dir: str | None = None
    # Narrow band: marching tets and the sign loss visit only the tets within this many rings of tets
    # around the surface (`DMTetGeometry`'s doc), rebuilt whenever the surface reaches the band's last
    # ring. The surface is the same as the whole grid's; 0 visits every tet at every step.
    band_rings: int = 3

    def __post_init__(self) -> None:
        # Checked when the config is made (Hydra overrides too), before any stage runs.
        if not self.bound > 0:  # also NaN
            raise ValueError(f"bound must be > 0 (the grid's half-width), got {self.bound}")
        if not 0 < self.deformation_scale <= 1:
            raise ValueError(f"deformation_scale must be in (0, 1] cells, got {self.deformation_scale}")
        if self.band_rings < 0:
            raise ValueError(f"band_rings must be >= 0, got {self.band_rings}")


def validate_init(sdf: Tensor, boundary: Tensor) -> None:
    """Raise ValueError when an initial SDF [N] gives no surface or one that reaches the grid boundary.

    `boundary` [N] bool marks the grid vertices on the cube's surface (`TetGrid.boundary_mask()`).
    """
    if sdf.shape != boundary.shape:
        raise ValueError(f"sdf must be [N] = {tuple(boundary.shape)}, got {tuple(sdf.shape)}")
    if not bool(torch.isfinite(sdf).all()):
        raise ValueError("initial sdf has non-finite values (NaN or inf)")
    inside = sdf < 0
    n_inside = int(inside.sum())
    if n_inside == 0:
        raise ValueError("initial sdf is empty: no grid vertex is inside (sdf < 0); the object is missing")
    if n_inside == sdf.numel():
        raise ValueError("initial sdf is solid: every grid vertex is inside (sdf < 0)")
    n_touch = int((inside & boundary).sum())
    if n_touch:
        raise ValueError(
            f"initial sdf reaches the grid boundary at {n_touch} vertices: the object is outside or larger "
            "than the grid (rescale it or increase the bound)"
        )


def sdf_sign_regulariser(sdf: Tensor, edges: Tensor) -> Tensor:
    """Scalar: DMTet's / threestudio's sign loss over the grid edges the surface crosses.

    For each crossed edge (a, b), binary cross-entropy of s_a as a logit against the sign of s_b, and of
    s_b against the sign of s_a: it penalises sign changes, which removes floaters and internal surfaces
    that no view supervises. Zero (still differentiable) when nothing is crossed. sdf [N], edges [E, 2].
    """
    if edges.ndim != 2 or edges.shape[1] != 2:
        raise ValueError(f"edges must be [E, 2], got {tuple(edges.shape)}")
    s = sdf[edges]  # [E, 2]
    crossed = (s[:, 0] < 0) != (s[:, 1] < 0)  # [E]
    if not bool(crossed.any()):
        return sdf.sum() * 0.0
    sa, sb = s[crossed].unbind(dim=1)  # [Ec] each
    bce = F.binary_cross_entropy_with_logits
    return bce(sa, (sb >= 0).to(sa.dtype)) + bce(sb, (sa >= 0).to(sb.dtype))


def sdf_from_density(
    grid: np.ndarray,  # [R, R, R] densities at the cell centres of [-bound_grid, bound_grid]^3, index x, y, z
    bound_grid: float,
    level: float,  # density iso-level: density > level is inside
    points: Tensor,  # [N, 3] where to evaluate (e.g. the DMTet grid vertices)
    band: float = 0.05,  # clip |sdf| to this (world units): ~3 cells at resolution 64
    eps_ratio: float = 1e-3,  # density floor eps = eps_ratio * level, so log stays finite in empty space
) -> Tensor:
    """[N] signed values, negative inside, zero on the density's iso-surface, in approximate world units.

    NeRF densities span orders of magnitude and fall off roughly exponentially across a surface, so we
    take u = log(level) - log(density + eps), which is close to linear across the surface, and divide it
    by its median gradient magnitude over the grid cells next to the iso-surface: the result has unit
    slope there, like a true signed distance, so values are O(cell size). It is clipped to [-band, band]
    (values far from the surface only need the right sign). Trilinear interpolation between cell
    centres; points outside the density grid's cube are outside (+band). On `points.device`.
    """
    # 1. Check inputs
    grid = np.asarray(grid)
    if grid.ndim != 3 or len(set(grid.shape)) != 1:
        raise ValueError(f"density grid must be [R, R, R], got {grid.shape}")
    if not bound_grid > 0 or not level > 0:
        raise ValueError(f"bound_grid and level must be > 0, got {bound_grid} and {level}")
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must be [N, 3], got {tuple(points.shape)}")
    if not band > 0:
        raise ValueError(f"band must be > 0, got {band}")
    if not (grid.max() > level >= grid.min()):
        raise ValueError(
            f"density grid never crosses level {level} (range {grid.min():.3g} to {grid.max():.3g}): "
            "the field is empty or solid"
        )

    # 2. Log-density, zero on the iso-surface, scaled to unit slope at the surface
    res = grid.shape[0]
    cell = 2.0 * bound_grid / res
    u = math.log(level) - np.log(np.clip(grid.astype(np.float64), 0.0, None) + eps_ratio * level)  # [R]*3
    grad = np.stack(np.gradient(u, cell), axis=-1)  # [R, R, R, 3] per world unit
    near = np.zeros(u.shape, dtype=bool)  # cells with a sign change to a neighbour along some axis
    for axis in range(3):  # a loop over the 3 axes
        change = np.diff(np.signbit(u), axis=axis)
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(0, -1), slice(1, None)
        near[tuple(lo)] |= change
        near[tuple(hi)] |= change
    if not near.any():  # the minimum exactly at the level, the rest above: u < 0 everywhere (NaN slope)
        raise ValueError(f"density grid never crosses level {level}: the field is empty or solid")
    slope = float(np.median(np.linalg.norm(grad[near], axis=-1)))
    sdf_grid = torch.from_numpy((u / max(slope, 1e-12)).astype(np.float32))  # [R, R, R]

    # 3. Trilinear samples at the points (grid_sample: align_corners=False puts samples at cell centres)
    p = points.detach().to(torch.float32)
    normalised = p / bound_grid  # [N, 3] in [-1, 1] inside the grid
    # grid_sample reads (x, y, z) as (W, H, D) indices: our array is [x, y, z] = [D, H, W], so reverse.
    coords = normalised.flip(-1).reshape(1, 1, 1, -1, 3)  # [1, 1, 1, N, 3]
    volume = sdf_grid.to(p.device)[None, None]  # [1, 1, R, R, R]
    values = F.grid_sample(volume, coords, mode="bilinear", padding_mode="border", align_corners=False)
    values = values.reshape(-1)  # [N]
    outside = (normalised.abs() > 1.0).any(dim=-1)
    values = torch.where(outside, torch.full_like(values, band), values)
    return values.clamp(-band, band)


class DMTetGeometry(nn.Module):
    """Learnable `sdf` [N] and `deformation` [N, 3] on a Kuhn tet grid; `extract()` -> (verts, faces).

    The grid itself (vertices, tets) is held in non-persistent buffers: `.to(device)` moves it, and the
    state dict stores only the two parameters (rebuild with the same config before loading).

    Narrow band (`band_rings` > 0): only the tets the surface crosses produce triangles, and only the SDF
    values at their corners receive gradients (from marching tets and from the sign loss, which sees the
    crossed edges only), so the surface can only spread into the tets next to those. `extract()` looks
    for the crossed tets among those within `band_rings` rings of the last ones, rebuilds that band (one
    pass over the whole grid per ring) whenever a crossed tet touches its outermost ring, and hands only
    the crossed tets to marching tets: a surface moving by a ring or two between rebuilds stays inside.
    `band_edges` are the grid edges inside the band. On the CPU's tet grid (64) about a tenth of the tets
    lie in a 3-ring band. The band is rebuilt from scratch after `init_from_sdf` and after loading a state
    dict; call `reset_band()` after writing `sdf` any other way.
    """

    def __init__(self, config: DMTetConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or DMTetConfig()
        cache_dir = Path(config.cache_dir).expanduser() if config.cache_dir is not None else None
        grid = tet_grid(config.resolution, config.bound, cache_dir=cache_dir)
        self.resolution = grid.resolution
        self.cell_size = grid.cell_size
        self.register_buffer("grid_vertices", grid.vertices, persistent=False)  # [N, 3]
        self.register_buffer("tets", grid.tets, persistent=False)  # [T, 4]
        self.register_buffer("boundary", grid.boundary_mask(), persistent=False)  # [N] bool
        self._edges: Tensor | None = None  # [E, 2], built on first use
        n = grid.vertices.shape[0]
        self.sdf = nn.Parameter(torch.zeros(n))  # [N]; all zero = all outside = empty until initialised
        self.deformation = nn.Parameter(torch.zeros(n, 3))  # [N, 3] pre-tanh offsets
        # band: tets [Tb, 4], last-ring vertices [N], edges [Eb, 2], vertices whose every tet is in it [N]
        self._band: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
        self._surface: tuple[int, Tensor] | None = None  # (`sdf._version`, crossed tets [Tc, 4]) cached
        self.band_rebuilds = 0  # how often the band was built (for tests and benchmarks)
        self.register_load_state_dict_post_hook(lambda module, keys: module.reset_band())

    @property
    def edges(self) -> Tensor:
        """[E, 2] unique grid edges (for `sdf_sign_regulariser`), on the module's device."""
        if self._edges is None or self._edges.device != self.tets.device:
            self._edges = kuhn_edges(self.resolution).to(self.tets.device)
        return self._edges

    def deformed_vertices(self) -> Tensor:
        """[N, 3] grid vertices + offsets bounded by deformation_scale cells per axis."""
        max_offset = self.config.deformation_scale * self.cell_size
        return self.grid_vertices + max_offset * torch.tanh(self.deformation)

    def reset_band(self) -> None:
        """Forget the narrow band: the next `extract()` builds it from the current SDF."""
        self._band = None
        self._surface = None

    @torch.no_grad()
    def _build_band(self, inside: Tensor) -> None:
        active = crossed_tets(inside, self.tets)  # [T] tets the surface crosses
        ring = torch.zeros_like(inside)  # [N] vertices of the active tets
        for _ in range(self.config.band_rings):  # a loop over the rings, each a pass over the grid
            ring[self.tets[active].reshape(-1)] = True
            active = ring[self.tets].any(dim=1)  # the tets touching those vertices
        inner = ring.clone()  # [N] vertices whose every tet is in the band
        ring[self.tets[active].reshape(-1)] = True  # [N] every vertex of the band's tets
        edges = self.edges
        band_edges = edges[ring[edges[:, 0]] & ring[edges[:, 1]]]
        self._band = (self.tets[active], ring & ~inner, band_edges, inner)
        self.band_rebuilds += 1

    def _surface_tets(self) -> Tensor:
        """[Tc, 4] the tets the surface crosses, found in the narrow band (the whole grid without one).

        Rebuilds the band first when those tets reach its last ring; cached until the SDF is written.
        """
        if self.config.band_rings == 0:
            return self.tets  # marching tets selects the crossed ones itself
        cached = self._surface
        if cached is not None and cached[0] == self.sdf._version and cached[1].device == self.tets.device:
            return cached[1]
        with torch.no_grad():
            inside = self.sdf < 0  # [N]
            if self._band is None or self._band[0].device != self.tets.device:
                self._build_band(inside)
            crossed = self._band[0][crossed_tets(inside, self._band[0])]  # [Tc, 4]
            if bool(self._band[1][crossed].any()):  # the surface reached the last ring
                self._build_band(inside)
                crossed = self._band[0][crossed_tets(inside, self._band[0])]
        self._surface = (self.sdf._version, crossed)
        return crossed

    @property
    def band_edges(self) -> Tensor:
        """[Eb, 2] grid edges in the narrow band (all edges without one): every edge the surface crosses."""
        if self.config.band_rings == 0:
            return self.edges
        self._surface_tets()  # builds or refreshes the band
        return self._band[2]

    def extract(self) -> tuple[Tensor, Tensor]:
        """Surface sdf = 0 of the deformed grid: verts [M, 3] (differentiable), faces [K, 3] int64 CCW.

        The same as `marching_tets` over the whole grid, narrow band or not (class doc): the crossed tets
        keep the grid's order, and marching tets' output depends only on them.
        """
        crossed_only = self.config.band_rings > 0  # the band hands over the crossed tets only
        return marching_tets(
            self.deformed_vertices(), self._surface_tets(), self.sdf, all_crossed=crossed_only
        )

    def forward(self) -> tuple[Tensor, Tensor]:
        return self.extract()

    @torch.no_grad()
    def to_mesh(self) -> Mesh:
        """The current surface as a detached `Mesh` (no colours)."""
        verts, faces = self.extract()
        return Mesh(verts.detach(), faces)

    @torch.no_grad()
    def keep_off_boundary(self) -> int:
        """Keep the grid's outer vertices outside (sdf >= 0) after a step: marching tets makes no faces on
        the cube's surface, so a surface grown into it would open there. Returns how many were moved."""
        outer = self.sdf[self.boundary]  # [B]
        n_inside = int((outer < 0).sum())
        if n_inside:
            self.sdf[self.boundary] = outer.clamp(min=1e-6)
        return n_inside

    @torch.no_grad()
    def cut_below(self, height: float) -> float:
        """Remove everything below z = `height` (deformed positions): sdf = max(sdf, height - z), so the
        surface there becomes the plane z = `height`. Returns the share of inside vertices removed.

        Cheap as a projection after each step: the narrow band is rebuilt only when a removed vertex has a
        tet outside it (the first cut, through the deep inside), not for the few vertices near the cut's
        plane that a step moved under it. Raises ValueError (changing nothing) when nothing would be left.
        """
        below = height - self.deformed_vertices()[:, 2]  # [N] > 0 under the plane
        inside = self.sdf < 0
        removed = inside & (below > 0)
        n_removed = int(removed.sum())
        if n_removed and not bool((inside & ~removed).any()):
            raise ValueError(f"cutting below z = {height:.4g} leaves nothing inside")
        if bool((below > self.sdf).any()):
            self.sdf.copy_(torch.maximum(self.sdf, below))
        if n_removed and (self._band is None or not bool(self._band[3][removed].all())):
            self.reset_band()  # the plane crosses tets outside the band
        return n_removed / max(int(inside.sum()), 1)

    @torch.no_grad()
    def init_from_sdf(self, values: Tensor) -> None:
        """Set the SDF from values [N] at `grid_vertices` (< 0 inside) and reset the deformation.

        Raises ValueError (changing nothing) when the surface would be empty or reach the grid boundary.
        """
        values = torch.as_tensor(values)
        if values.shape != self.sdf.shape:
            raise ValueError(f"values must be [N] = {tuple(self.sdf.shape)}, got {tuple(values.shape)}")
        values = values.to(device=self.sdf.device, dtype=self.sdf.dtype)
        validate_init(values, self.boundary)
        self.sdf.copy_(values)
        self.deformation.zero_()
        self.reset_band()
