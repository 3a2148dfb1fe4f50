"""`sv3d demo`: the built-in demonstration, which needs no weights and no GPU (`make demo`).

The oracle mode of ARCHITECTURE.md's evaluation protocol on a built-in test object: the object is written in
GSO layout, rendered on SV3D's orbit (the ground-truth frames that stand in for generated ones), and
reconstructed by `sv3d.run.run_from_orbit` (Instant-NGP NeRF -> DMTet -> textured `mesh.glb` +
`turntable.mp4`, with the device's default sizes). The final mesh, the NeRF's coarse mesh and the visual
hull carved from the same 21 masks (the protocol's baseline) are scored against the ground truth
(Chamfer, F-score, volume IoU; `sv3d.evaluation.evaluate_mesh`), printed as a table and written to
`metrics.json`. Only the diffusion stage is skipped: it needs the SV3D checkpoint.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import InputError, Sv3dError

__all__ = ["DemoConfig", "contact_sheet", "run_demo"]

CHECKPOINT_HINT = (
    "The diffusion stage (photo -> orbit) needs the SV3D checkpoint (sv3d_p.safetensors from Stability AI, "
    "under its licence); with it, run: sv3d run photo.png -o out --checkpoint /path/to/sv3d_p.safetensors"
)


@dataclass
class DemoConfig:
    object_name: str = "mug"  # one of sv3d.testing.objects.TEST_OBJECTS; the mug has a handle and a texture
    resolution: int = 256  # orbit frames: the CPU NeRF trains at 128 and DMTet at 256, 576 adds only time
    hull_resolution: int = 128  # voxels per side of the visual-hull baseline
    # Sizes below the CPU defaults of `sv3d run` keep the demo within ~5 minutes on 2 cores; None: the
    # device default of sv3d.fit_nerf.default_fit_config / sv3d.refine_stage.default_refine_config.
    # 800 NeRF steps (measured on the mug, 2 cores, fresh clone of 6673218): final Chamfer 0.0230 / volume
    # IoU 0.241, NeRF mesh 0.0254, visual hull 0.0254, consistency 28.0 dB, 174 s in all (191 s before the
    # faster init SDF and unwrap); with 300 NeRF steps (older) 0.0246 / 0.0289 / 0.0254, 23.1 dB, 120 s.
    # Nothing inside the mug is carved (see the README's limitations).
    nerf_steps: int | None = 800
    nerf_grid: int | None = 96  # marching-cubes grid of the NeRF mesh: ~4x fewer faces to score than 128
    refine_steps: int | None = 120
    tet_resolution: int | None = 48
    texture_size: int | None = 512
    turntable_resolution: int = 256  # turntable.mp4 frame size
    eval_points: int = 20_000  # visible-surface samples per mesh (Chamfer to ~1e-4 at this count)
    # Visibility test of the surface sampling: the protocol's 64 views at 512 px took ~8 of the demo's
    # CPU-minutes for three meshes; half the views at half the size still see every outer surface of the
    # test objects (none has deep concavities but the mug's inside, seen from above either way).
    eval_views: int = 32
    eval_view_resolution: int = 256
    eval_iou_resolution: int = 64  # the protocol's volume-IoU grid
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


def _run_config(config: DemoConfig):
    from .device import pick_device
    from .run import RunConfig, stage_configs

    nerf, refine = stage_configs(
        pick_device(config.device),
        nerf_steps=config.nerf_steps,
        nerf_grid=config.nerf_grid,
        refine_steps=config.refine_steps,
        tet_resolution=config.tet_resolution,
        texture_size=config.texture_size,
    )
    # Ground-truth renders are 3D-consistent by construction: a low consistency score here means that the
    # NeRF underfits, which the demo reports (run.json, metrics.json) rather than stopping on.
    return RunConfig(
        nerf=nerf,
        refine=refine,
        turntable_resolution=config.turntable_resolution,
        allow_inconsistent=True,
        device=config.device,
    )


def _is_demo_folder(output: Path) -> bool:
    """Whether `output` holds a demo's run: its run.json reconstructs from the folder's own orbit/ (or, a
    first demo interrupted before its run began, it holds only what the demo writes first)."""
    from .run import RUN_FILE

    # a first demo killed while its orbit was staged leaves write_orbit_directory's .orbit.tmp-* behind
    names = {p.name for p in output.iterdir() if not p.name.startswith(".orbit.")}
    objects = output / "objects"
    if "objects" in names and names <= {"objects", "orbit", "orbit_contact_sheet.png"}:
        from .testing.objects import TEST_OBJECTS

        return objects.is_dir() and {p.name for p in objects.iterdir()} <= set(TEST_OBJECTS)
    try:
        source = json.loads((output / RUN_FILE).read_text()).get("source") or {}
    except (OSError, ValueError, AttributeError):
        return False
    # made from its own orbit/ (by content: a demo folder moved whole is still one)
    if source.get("kind") != "orbit" or not (output / "orbit" / "transforms.json").is_file():
        return False
    from .fit_nerf import orbit_fingerprint

    try:
        return source.get("orbit_sha256") == orbit_fingerprint(output / "orbit")
    except (OSError, ValueError, Sv3dError):  # an orbit/ the readers refuse
        return False


def run_demo(output: str | Path, config: DemoConfig | None = None, force: bool = False) -> dict:
    """Run the demo into `output`; returns (and writes to metrics.json) the measured figures.

    A rerun with the same settings resumes (finished stages are skipped); other settings start over.
    """
    from .cameras import write_orbit_directory
    from .evaluation.metrics import evaluate_mesh
    from .evaluation.visual_hull import carve_visual_hull
    from .fit_nerf import _atomic
    from .meshio import load_trimesh
    from .render_orbit import RenderOrbitConfig, render_orbit_frames
    from .run import RUN_FILE, OtherRunError, check_run_config, run_from_orbit
    from .testing.objects import TEST_OBJECTS, write_test_object

    config = config or DemoConfig()
    output = Path(output)
    # 1. Check inputs (before anything is written)
    if config.object_name not in TEST_OBJECTS:
        raise InputError(
            f"unknown demo object {config.object_name!r}: expected one of {', '.join(TEST_OBJECTS)}"
        )
    if output.exists() and not output.is_dir():
        raise InputError(f"{output}: exists and is not a directory")
    if config.hull_resolution < 8:
        raise InputError(f"hull_resolution must be >= 8, got {config.hull_resolution}")
    render_config = RenderOrbitConfig(resolution=config.resolution, device=config.device)
    render_config.validate()
    run_config = _run_config(config)
    check_run_config(run_config)
    if output.is_dir() and any(output.iterdir()) and not _is_demo_folder(output):
        # The demo replaces its orbit and, on other settings, its run's folders (nerf/, refine/ ...):
        # never in a folder that is not its own, --force or not.
        raise InputError(f"{output}: not empty and not a demo's output folder: use an empty or new directory")
    timings: dict[str, float] = {}
    start_all = time.perf_counter()

    # 2. The ground-truth object in GSO layout, and its orbit (SV3D's 21 views at elevation 10 deg); the
    # previous demo's scores go first (they described its mesh, which this run may replace)
    for name in ("metrics.json", "visual_hull.ply"):
        (output / name).unlink(missing_ok=True)
    t0 = time.perf_counter()
    object_dir = write_test_object(output / "objects", config.object_name)
    frames = render_orbit_frames(object_dir, render_config)
    orbit_dir = output / "orbit"
    # The same renders give the same bytes, so a resumed run keeps the orbit's fingerprint
    write_orbit_directory(orbit_dir, frames.orbit, frames.images, "render", overwrite=True)
    sheet = contact_sheet(frames.images.numpy())
    _atomic(output / "orbit_contact_sheet.png", lambda p: sheet.save(p, format="PNG"))
    timings["object_and_orbit_s"] = time.perf_counter() - t0

    # 3. Reconstruct: NeRF -> DMTet -> textured mesh.glb + turntable.mp4 (run.json records the stages)
    t0 = time.perf_counter()
    first = not (output / RUN_FILE).is_file()  # the demo's own folder: a first run may clear stale stages
    try:
        result = run_from_orbit(orbit_dir, output, run_config, force=force or first)
    except OtherRunError:  # a demo of another object or size: the folder is the demo's, start over
        print(f"{output}: holds a demo run with other settings; starting over")
        result = run_from_orbit(orbit_dir, output, run_config, force=True)
    timings["reconstruction_s"] = time.perf_counter() - t0

    # 4. Score the final mesh, the NeRF mesh and the visual-hull baseline against the ground truth
    t0 = time.perf_counter()
    gt = load_trimesh(object_dir)
    hull = carve_visual_hull(frames.masks(), frames.orbit.cameras(), resolution=config.hull_resolution)
    _atomic(output / "visual_hull.ply", lambda p: hull.export(p, file_type="ply"))
    candidates = {
        "final (NeRF + DMTet)": load_trimesh(result.mesh_path, place=False),
        "NeRF mesh": load_trimesh(output / "nerf" / "mesh.ply", place=False),
        "visual hull": hull,
    }
    metrics = {
        name: evaluate_mesh(
            mesh,
            gt,
            mode="oracle",
            n_points=config.eval_points,
            n_views=config.eval_views,
            view_resolution=config.eval_view_resolution,
            iou_resolution=config.eval_iou_resolution,
            device=config.device,  # `sv3d demo --device cpu` scores on the CPU too
        ).to_dict()
        for name, mesh in candidates.items()
    }
    timings["metrics_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - start_all

    report = {
        "object": config.object_name,
        "mode": "oracle",
        "config": asdict(config),
        "orbit_dir": str(orbit_dir),
        "mesh": str(result.mesh_path),
        "metrics": metrics,
        "consistency": result.summary.get("consistency"),
        "stages": result.summary.get("stages"),
        "timings": timings,
    }
    _atomic(output / "metrics.json", lambda p: p.write_text(json.dumps(report, indent=2)))

    # 5. Tell the user what happened and what comes next
    print(f"object      {object_dir}")
    print(
        f"orbit       {orbit_dir}  (21 frames, {config.resolution}px; contact sheet orbit_contact_sheet.png)"
    )
    print(f"mesh        {result.mesh_path}  (turntable {output / 'turntable.mp4'})")
    print(format_table(metrics))
    score = (result.summary.get("consistency") or {}).get("masked_psnr_db", float("nan"))
    print(f"consistency {score:.1f} dB masked PSNR of the NeRF on its (ground-truth) frames")
    print(f"metrics     {output / 'metrics.json'}  ({timings['total_s']:.0f} s in all)")
    print(CHECKPOINT_HINT)
    return report


def format_table(metrics: dict[str, dict]) -> str:
    """The demo's metric table: one row per mesh (Chamfer lower is better; F-score and IoU higher)."""
    columns = ("chamfer", "fscore@0.01", "fscore@0.02", "fscore@0.05", "volume_iou")
    width = max(len(name) for name in metrics)
    lines = [f"{'mesh':<{width}}  " + "  ".join(f"{c:>11}" for c in columns)]
    for name, row in metrics.items():
        lines.append(f"{name:<{width}}  " + "  ".join(f"{row[c]:>11.4f}" for c in columns))
    return "\n".join(lines)
