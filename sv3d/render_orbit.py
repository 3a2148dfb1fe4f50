"""`sv3d render-orbit`: ground-truth renders of a mesh on an SV3D orbit, written as an orbit directory.

These frames are what the oracle evaluation feeds the 3D stages in place of generated frames, and what the
NeRF and DMTet stages are measured on. Lighting is soft Lambertian under lights fixed in the world
(`refine.render`), so colours do not change with the view, like the baked-in lighting of SV3D's frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from refine.rasterizer import seam_topology, weld_seams
from refine.render import render_mesh

from .cameras import NUM_FRAMES, OrbitFrames, check_orbit_target, make_orbit, write_orbit_directory
from .device import pick_device
from .errors import InputError
from .meshio import load_mesh

__all__ = ["RenderOrbitConfig", "render_orbit", "render_orbit_frames"]


@dataclass
class RenderOrbitConfig:
    views: int = NUM_FRAMES  # SV3D generates 21 frames; the last one is the input view
    resolution: int = 576  # SV3D's frame size
    elevation_deg: float = 10.0  # SV3D's default input elevation
    input_azimuth_deg: float = 0.0  # azimuth of the input view (the last frame)
    orbit: str = "static"  # "static" or "sine" (elevation varies +-20 deg, sv3d_p only)
    shading: str = "lambert"  # "lambert" (lights fixed in the world) or "unlit" (albedo only)
    up: str = "auto"  # mesh up axis: auto (glTF y, others z), "y" or "z"
    views_per_batch: int = 4  # views rendered at once: bounds peak memory at 576^2
    device: str = "auto"

    def validate(self) -> None:
        if self.views < 1:
            raise InputError(f"--views must be >= 1, got {self.views}")
        if not 16 <= self.resolution <= 4096:
            raise InputError(f"--resolution must be in [16, 4096], got {self.resolution}")
        if self.shading not in ("lambert", "unlit"):
            raise InputError(f"--shading must be lambert or unlit, got {self.shading!r}")
        if self.views_per_batch < 1:
            raise InputError(f"views_per_batch must be >= 1, got {self.views_per_batch}")


def render_orbit_frames(mesh_path: str | Path, config: RenderOrbitConfig) -> OrbitFrames:
    """Load, place and render a mesh on the configured orbit -> frames [V, H, W, 4] straight RGBA."""
    # 1. Check inputs (all before any file is written)
    config.validate()
    orbit = make_orbit(config.orbit, config.elevation_deg, config.input_azimuth_deg, num_frames=config.views)
    device = pick_device(config.device)
    mesh = load_mesh(mesh_path, up=config.up).to(device)

    # 2. Render in batches of views
    cameras = orbit.cameras()
    topology = seam_topology(mesh.faces, weld_seams(mesh.vertices, mesh.faces))  # UV seams: no silhouettes
    frames = []
    with torch.no_grad():
        for start in range(0, len(orbit), config.views_per_batch):
            batch = cameras[start : start + config.views_per_batch]
            out = render_mesh(mesh, batch, config.resolution, shading=config.shading, topology=topology)
            frames.append(out.rgba.cpu())  # [v, H, W, 4]
    return OrbitFrames(orbit=orbit, images=torch.cat(frames), alpha_source="render")


def render_orbit(
    mesh_path: str | Path,
    output_dir: str | Path,
    config: RenderOrbitConfig | None = None,
    overwrite: bool = False,
) -> Path:
    """Render `mesh_path` on an SV3D orbit into the orbit directory `output_dir` (atomically)."""
    config = config or RenderOrbitConfig()
    out = Path(output_dir)
    check_orbit_target(out, overwrite)  # before rendering, not after
    frames = render_orbit_frames(mesh_path, config)
    return write_orbit_directory(out, frames.orbit, frames.images, "render", overwrite=overwrite)
