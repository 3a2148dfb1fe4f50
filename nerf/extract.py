"""Coarse mesh from a radiance field: density grid -> marching cubes -> mesh with vertex colours.

The density grid is also what the DMTet stage starts from (`density.npz`: grid, bound, level).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import trimesh
from skimage import measure

__all__ = ["ExtractConfig", "density_grid", "extract_mesh", "save_density", "load_density"]


@dataclass
class ExtractConfig:
    resolution: int = 128  # grid cells per side over [-bound, bound]^3
    level: float = 10.0  # density iso-level: alpha = 1 - exp(-level * 0.01 m) ~ 0.1 over a 1 cm step
    min_component: float = 0.01  # drop connected components under this fraction of the total area
    chunk: int = 1 << 16  # points per field evaluation


@torch.no_grad()
def density_grid(
    field: torch.nn.Module, bound: float, resolution: int = 128, chunk: int = 1 << 16
) -> np.ndarray:
    """[R, R, R] float32 densities at the cell centres of [-bound, bound]^3 (index order x, y, z)."""
    device = next(field.parameters()).device
    centres = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution * 2.0 - 1.0
    axis = centres * bound  # [R]
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)  # [R^3, 3]
    sigma = torch.cat(
        [field.density(grid[i : i + chunk].to(device)).float().cpu() for i in range(0, len(grid), chunk)]
    )
    return sigma.reshape(resolution, resolution, resolution).numpy()


@torch.no_grad()
def extract_mesh(
    field: torch.nn.Module, grid: np.ndarray, bound: float, config: ExtractConfig | None = None
) -> trimesh.Trimesh:
    """Marching cubes of the density grid at `config.level`, small components removed, vertex colours."""
    config = config or ExtractConfig()
    resolution = grid.shape[0]
    if not (grid.max() > config.level > grid.min()):
        raise ValueError(
            f"density grid never crosses level {config.level} (range {grid.min():.3g} to "
            f"{grid.max():.3g}): the field is empty or solid"
        )
    padded = np.pad(grid, 1, mode="constant", constant_values=0.0)  # closes surfaces at the boundary
    verts, faces, _, _ = measure.marching_cubes(padded, level=config.level)
    step = 2.0 * bound / resolution
    verts = (verts - 1.0 + 0.5) * step - bound  # padded index -> world (cell centres)
    # marching_cubes orients faces towards increasing values (inside): flip to face outwards.
    mesh = trimesh.Trimesh(verts, faces[:, ::-1], process=True)
    components = mesh.split(only_watertight=False)
    if len(components) > 1:
        total = mesh.area
        kept = [c for c in components if c.area >= config.min_component * total]
        mesh = trimesh.util.concatenate(kept)
    device = next(field.parameters()).device
    points = torch.tensor(mesh.vertices, dtype=torch.float32, device=device)
    normals = torch.tensor(mesh.vertex_normals, dtype=torch.float32, device=device)
    colours = []
    for i in range(0, len(points), config.chunk):
        # Colour seen from outside along the normal (the field may be view dependent).
        rgb, _ = field(points[i : i + config.chunk], -normals[i : i + config.chunk])
        colours.append(rgb.float().cpu())
    rgb = torch.cat(colours).clamp(0, 1).numpy()
    mesh.visual.vertex_colors = np.concatenate([rgb * 255.0, np.full((len(rgb), 1), 255.0)], axis=1).astype(
        np.uint8
    )
    return mesh


def save_density(path, grid: np.ndarray, bound: float, level: float) -> None:
    """`density.npz`: grid [R, R, R] over [-bound, bound]^3 at cell centres, and the iso-level used."""
    np.savez_compressed(
        path, density=grid.astype(np.float32), bound=np.float32(bound), level=np.float32(level)
    )


def load_density(path) -> tuple[np.ndarray, float, float]:
    with np.load(path) as data:
        return data["density"], float(data["bound"]), float(data["level"])
