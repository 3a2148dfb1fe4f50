"""`sv3d demo`: the built-in demonstration, which needs no weights and no GPU.

Until the NeRF and DMTet stages land, the demo runs the most complete path: a built-in test object is
written in GSO layout, rendered on SV3D's orbit (the oracle frames the 3D stages consume), and the
visual-hull baseline carved from those frames' masks is scored against the ground truth with the
evaluation protocol of ARCHITECTURE.md.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import InputError
from .render_orbit import RenderOrbitConfig, render_orbit_frames

__all__ = ["DemoConfig", "run_demo", "contact_sheet"]


@dataclass
class DemoConfig:
    object_name: str = "mug"  # one of sv3d.testing.objects.TEST_OBJECTS
    resolution: int = 576  # SV3D's frame size
    hull_resolution: int = 128  # voxels per side of the visual hull
    device: str = "auto"


def contact_sheet(images: np.ndarray, columns: int = 7, background: float = 1.0) -> Image.Image:
    """[V, H, W, 4] straight RGBA in [0, 1] -> one RGB image of the frames in a grid, over white."""
    n, h, w, _ = images.shape
    rows = -(-n // columns)
    rgb = images[..., :3] * images[..., 3:] + background * (1.0 - images[..., 3:])  # [V, H, W, 3]
    sheet = np.full((rows * h, columns * w, 3), background, dtype=np.float32)
    for i in range(n):  # one paste per frame (21 at most), not per pixel
        r, c = divmod(i, columns)
        sheet[r * h : (r + 1) * h, c * w : (c + 1) * w] = rgb[i]
    return Image.fromarray((sheet * 255.0 + 0.5).astype(np.uint8))


def run_demo(output: Path, config: DemoConfig | None = None) -> dict:
    """Run the demo into `output`; returns (and writes to metrics.json) the measured figures."""
    from .cameras import write_orbit_directory
    from .evaluation.metrics import evaluate_mesh
    from .evaluation.visual_hull import carve_visual_hull
    from .meshio import load_trimesh
    from .testing.objects import TEST_OBJECTS, write_test_object

    config = config or DemoConfig()
    # 1. Check inputs
    if config.object_name not in TEST_OBJECTS:
        raise InputError(
            f"unknown demo object {config.object_name!r}: expected one of {', '.join(TEST_OBJECTS)}"
        )
    if output.exists() and not output.is_dir():
        raise InputError(f"{output}: exists and is not a directory")
    timings: dict[str, float] = {}

    # 2. The ground-truth object, in GSO layout
    t0 = time.perf_counter()
    object_dir = write_test_object(output / "objects", config.object_name)
    timings["write_object_s"] = time.perf_counter() - t0

    # 3. Render SV3D's orbit (21 views, elevation 10 deg, the last frame is the input view)
    t0 = time.perf_counter()
    frames = render_orbit_frames(
        object_dir, RenderOrbitConfig(resolution=config.resolution, device=config.device)
    )
    orbit_dir = write_orbit_directory(output / "orbit", frames.orbit, frames.images, "render", overwrite=True)
    images = frames.images.numpy()
    sheet_path = output / "orbit_contact_sheet.png"
    contact_sheet(images).save(sheet_path)
    timings["render_orbit_s"] = time.perf_counter() - t0

    # 4. The visual-hull baseline from the 21 masks, scored against the ground truth
    t0 = time.perf_counter()
    hull = carve_visual_hull(frames.masks(), frames.orbit.cameras(), resolution=config.hull_resolution)
    hull_path = output / "visual_hull.ply"
    hull.export(hull_path)
    gt = load_trimesh(object_dir)
    metrics = evaluate_mesh(hull, gt, mode="oracle")
    timings["visual_hull_and_metrics_s"] = time.perf_counter() - t0

    report = {
        "object": config.object_name,
        "config": asdict(config),
        "orbit_dir": str(orbit_dir),
        "visual_hull_metrics": metrics.to_dict(),
        "timings": timings,
    }
    (output / "metrics.json").write_text(json.dumps(report, indent=2))

    # 5. Tell the user what happened and what comes next
    m = metrics.to_dict()
    print(f"object      {object_dir}")
    print(f"orbit       {orbit_dir}  (21 frames, {config.resolution}px, {timings['render_orbit_s']:.1f} s)")
    print(f"preview     {sheet_path}")
    print(
        f"visual hull {hull_path}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float))
    )
    print(
        "The diffusion stage needs the SV3D checkpoint (sv3d_p.safetensors or sv3d_u.safetensors, from "
        "Stability AI under its licence); sv3d fit-nerf is in progress and DMTet is not implemented yet."
    )
    return report
