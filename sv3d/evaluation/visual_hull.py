"""The visual-hull baseline: the shape carved from an orbit's silhouettes alone.

The evaluation protocol (ARCHITECTURE.md) reports, next to every reconstruction, the visual hull carved
from the same 21 masks (Laurentini, "The visual hull concept for silhouette-based image understanding",
TPAMI 1994): the largest shape consistent with the silhouettes, so a reconstruction that does not beat it
has learnt nothing beyond the outline. Voxel centres in [-bound, bound]³ are projected into every view and
kept when they fall inside every mask (outside the image frame counts as outside the mask); marching
cubes on the padded occupancy (level 0.5) gives a closed, outward-oriented mesh in world coordinates,
with all its connected components (parts apart stay: predictions are scored with all of theirs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import trimesh
from skimage.measure import marching_cubes
from torch import Tensor

from refine.camera import Cameras, transform_points
from sv3d.cameras import read_orbit_directory
from sv3d.errors import InputError

__all__ = ["carve_visual_hull", "carve_occupancy", "visual_hull_from_orbit_dir"]


def _as_masks(masks: Tensor | np.ndarray, threshold: float) -> Tensor:
    """[V, H, W] or [V, H, W, 1], float or bool -> [V, H, W] bool (True = object)."""
    m = torch.as_tensor(np.asarray(masks)) if not isinstance(masks, Tensor) else masks
    if m.ndim == 4 and m.shape[-1] == 1:
        m = m[..., 0]
    if m.ndim != 3:
        raise InputError(f"visual hull: masks must be [V, H, W] or [V, H, W, 1], got {tuple(m.shape)}")
    return m > threshold if m.dtype != torch.bool else m


def carve_occupancy(
    masks: Tensor | np.ndarray,  # [V, H, W] or [V, H, W, 1], float in [0, 1] or bool
    cameras: Cameras,  # V cameras, OpenGL convention
    resolution: int = 128,  # voxels per axis
    bound: float = 0.55,  # half side of the carved cube; the world's objects fit in radius 0.5
    threshold: float = 0.5,  # a float mask counts as object above this
) -> Tensor:
    """[R, R, R] bool occupancy (index order x, y, z) of voxel centres inside every mask."""
    # 1. Check inputs
    m = _as_masks(masks, threshold)  # [V, H, W]
    n_views, height, width = m.shape
    if len(cameras) != n_views:
        raise InputError(f"visual hull: {n_views} masks but {len(cameras)} cameras")
    if resolution < 2 or bound <= 0:
        raise InputError(f"visual hull: need resolution >= 2 and bound > 0, got {resolution}, {bound}")
    device = m.device

    # 2. Voxel centres: x_i = -bound + (i + 1/2) h
    h = 2.0 * bound / resolution
    g = -bound + (torch.arange(resolution, dtype=torch.float64, device=device) + 0.5) * h  # [R]
    centres = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), dim=-1).reshape(-1, 3)  # [R³, 3]

    # 3. Carve view by view, projecting only the voxels still alive
    mvp = cameras.to(device).world_to_clip().to(torch.float64)  # [V, 4, 4]
    alive = torch.arange(centres.shape[0], device=device)  # [K] indices of surviving voxels
    for v in range(n_views):
        clip = transform_points(centres[alive], mvp[v : v + 1])[0]  # [K, 4]
        w = clip[:, 3]
        in_front = w > 1e-9
        w_safe = torch.where(in_front, w, torch.ones_like(w))
        col = torch.floor((clip[:, 0] / w_safe + 1.0) * 0.5 * width).long()  # pixel x
        row = torch.floor((1.0 - clip[:, 1] / w_safe) * 0.5 * height).long()  # row 0 = top
        in_frame = in_front & (col >= 0) & (col < width) & (row >= 0) & (row < height)
        inside = m[v, row.clamp(0, height - 1), col.clamp(0, width - 1)] & in_frame  # [K]
        alive = alive[inside]
    occupancy = torch.zeros(centres.shape[0], dtype=torch.bool, device=device)
    occupancy[alive] = True
    return occupancy.reshape(resolution, resolution, resolution)


def carve_visual_hull(
    masks: Tensor | np.ndarray,  # [V, H, W] or [V, H, W, 1], float in [0, 1] or bool
    cameras: Cameras,  # V cameras, OpenGL convention
    resolution: int = 128,  # voxels per axis
    bound: float = 0.55,  # half side of the carved cube; the world's objects fit in radius 0.5
    threshold: float = 0.5,  # a float mask counts as object above this
) -> trimesh.Trimesh:
    """The visual hull as a closed, outward-oriented mesh in world coordinates (all its components).

    Raises InputError when nothing survives the carving (empty masks, or cameras that miss the cube).
    """
    occupancy = carve_occupancy(masks, cameras, resolution, bound, threshold).cpu().numpy()  # [R, R, R]
    if not occupancy.any():
        raise InputError("visual hull: no voxel lies inside every mask (empty masks or wrong cameras?)")
    h = 2.0 * bound / resolution
    padded = np.pad(occupancy.astype(np.float32), 1)  # [R+2]³, zero border so the surface closes
    verts, faces, _, _ = marching_cubes(padded, level=0.5, spacing=(h, h, h))
    # Padded index j sits at x = -bound + (j - 1/2) h, and marching cubes returns j·h.
    verts = verts.astype(np.float64) - bound - 0.5 * h
    mesh = trimesh.Trimesh(vertices=verts, faces=faces.astype(np.int64), process=True)
    # every component: the baseline is the hull of the masks, parts apart included (as predictions are
    # scored with all of theirs)
    if mesh.volume < 0:  # make the winding outward whatever marching cubes' convention is
        mesh.invert()
    return mesh


def visual_hull_from_orbit_dir(
    path: str | Path,
    resolution: int = 128,
    bound: float = 0.55,
    threshold: float = 0.5,
) -> trimesh.Trimesh:
    """The visual hull of an orbit directory's frames (alpha > threshold) with its cameras."""
    frames = read_orbit_directory(path)
    masks = frames.images[..., 3]  # [V, H, W] alpha
    return carve_visual_hull(masks, frames.orbit.cameras(), resolution, bound, threshold)
