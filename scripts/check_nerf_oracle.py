"""Issue 4's oracle check of the NeRF stage: each test object's ground-truth orbit -> `fit-nerf` -> scores.

For each object: its 21 ground-truth frames on SV3D's orbit (`render-orbit`, 256 px, 576 on CUDA, as
`sv3d eval --mode oracle` renders them), `fit_nerf` at the device's defaults (or with the overrides given),
then
- wall time of the stage (training + extraction + preview);
- Chamfer distance of `mesh.ply` to the ground truth (ARCHITECTURE.md's protocol, `evaluate_mesh`) and of
  the visual hull carved from the same 21 masks (128^3), and their ratio (issue 4: <= 0.015 and <= 0.8);
- masked PSNR on held-out views (issue 4: >= 28 dB): 7 azimuths half-way between the training views
  ((k + 0.5) * 360/21 degrees, every third k) at the orbit's elevation 10 and at 30 and -10 (+-20 off the
  orbit), rendered by the field at the training frames' size (the CPU default: 128 px). The reference is
  the object rendered at 4x that size and area-averaged down, as the training frames are averaged from
  256 px: a reference rendered straight at 128 px aliases the checker's texture so much (22 dB against
  the filtered one) that no field could reach 28 dB on it. PSNR over the reference's object pixels
  (alpha > 0.5), renders over white.
Prints one line per object and a table; `--json FILE` also writes the figures.
Usage: `.venv/bin/python scripts/check_nerf_oracle.py [mug checker ...] [--volume-weight 0.01] [--steps N]`.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from nerf.field import RadianceField
from nerf.occupancy import OccupancyGrid
from refine.render import render_mesh
from sv3d.cameras import explicit_orbit, read_orbit_directory
from sv3d.evaluation.metrics import evaluate_mesh
from sv3d.evaluation.visual_hull import carve_occupancy, carve_visual_hull
from sv3d.fit_nerf import default_fit_config, fit_nerf, render_views
from sv3d.meshio import load_mesh, load_trimesh
from sv3d.render_orbit import RenderOrbitConfig, render_orbit
from sv3d.testing.objects import TEST_OBJECTS, write_test_object

HELD_OUT_ELEVATIONS = (10.0, 30.0, -10.0)  # the orbit's, and +-20 degrees off it
HELD_OUT_AZIMUTHS = tuple((k + 0.5) * 360.0 / 21 for k in range(0, 21, 3))  # between training views
SUPERSAMPLE = 4  # the reference is rendered at 4x the field's render size and area-averaged down
HULL_RESOLUTION = 128
# the ground-truth frames, as `sv3d eval --mode oracle` renders them with the cpu and gpu presets
ORBIT_RESOLUTION = {"cpu": 256, "cuda": 576}


def held_out_psnr(
    object_dir: Path, nerf_dir: Path, orbit_dir: Path, config, device: torch.device
) -> dict[str, float]:
    """Masked PSNR (dB) of the field's held-out renders against the filtered reference, per elevation."""
    from safetensors.torch import load_file

    size = config.train.max_resolution
    n = len(HELD_OUT_AZIMUTHS)
    orbit = explicit_orbit(
        [e for e in HELD_OUT_ELEVATIONS for _ in range(n)], list(HELD_OUT_AZIMUTHS) * len(HELD_OUT_ELEVATIONS)
    )
    mesh, cameras, refs = load_mesh(object_dir).to(device), orbit.cameras(), []
    for start in range(0, len(orbit), 3):  # 3 views at a time: 21 at 4 x 576 px were ~111 M pixels at once
        with torch.no_grad():
            big = render_mesh(mesh, cameras[start : start + 3], SUPERSAMPLE * size)
        # Colour over white and coverage are averaged down separately (both are linear in the pixel's area)
        full = torch.cat([big.image, big.alpha], dim=-1).permute(0, 3, 1, 2)  # [v, 4, 4s, 4s]
        refs.append(torch.nn.functional.interpolate(full, size=(size, size), mode="area").cpu())
    ref = torch.cat(refs).permute(0, 2, 3, 1)  # [V, s, s, 4]
    target, alpha = ref[..., :3], ref[..., 3:]  # [V, s, s, 3] over white, [V, s, s, 1]

    field = RadianceField(config.train.field)
    field.load_state_dict(load_file(str(nerf_dir / "field.safetensors")))
    field = field.to(device).eval()
    frames = read_orbit_directory(orbit_dir)
    bound = config.train.field.bound
    hull = carve_occupancy(frames.masks(), frames.orbit.cameras(), config.hull_resolution, bound)
    occupancy = OccupancyGrid(hull, bound, config.hull_dilate).to(device)  # as in training and previews
    pred = render_views(field, orbit.c2w(), orbit.fov_deg, size, config.train, occupancy=occupancy)
    pred = torch.from_numpy(pred)  # [V, s, s, 3] over white
    scores = {}
    for i, elevation in enumerate(HELD_OUT_ELEVATIONS):
        views = slice(i * n, (i + 1) * n)
        mask = alpha[views, ..., 0] > 0.5  # [n, s, s]
        err = (pred[views] - target[views]).pow(2).mean(-1)[mask].mean()
        scores[f"el{elevation:+.0f}"] = round(-10.0 * math.log10(float(err)), 2)
    return scores


def check_object(
    name: str, root: Path, device: torch.device, volume_weight: float | None, steps: int | None
) -> dict:
    object_dir = write_test_object(root / "objects", name)
    orbit_dir = render_orbit(
        object_dir, root / name / "orbit", RenderOrbitConfig(resolution=ORBIT_RESOLUTION[device.type])
    )
    config = default_fit_config(device)
    if volume_weight is not None:
        config.train.volume_weight = volume_weight
    if steps is not None:
        config.train.steps = steps
    started = time.perf_counter()
    nerf_dir = fit_nerf(orbit_dir, root / name / "nerf", config, progress=False)
    wall = time.perf_counter() - started

    gt = load_trimesh(object_dir)
    chamfer = evaluate_mesh(load_trimesh(nerf_dir / "mesh.ply", place=False), gt, mode="oracle").chamfer
    frames = read_orbit_directory(orbit_dir)
    hull = carve_visual_hull(frames.masks(), frames.orbit.cameras(), HULL_RESOLUTION)
    hull_chamfer = evaluate_mesh(hull, gt, mode="oracle").chamfer
    summary = json.loads((nerf_dir / "fit_nerf.json").read_text())
    return {
        "object": name,
        "wall_s": round(wall, 1),
        "train_s": round(summary["train_seconds"], 1),
        "chamfer": round(chamfer, 5),
        "hull_chamfer": round(hull_chamfer, 5),
        "ratio": round(chamfer / hull_chamfer, 3),
        "held_out_psnr": held_out_psnr(object_dir, nerf_dir, orbit_dir, config, device),
        "train_psnr": round(summary["history"][-1]["psnr"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("objects", nargs="*", default=list(TEST_OBJECTS), help="test objects (default: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--volume-weight", type=float, default=None, help="the occupied-volume prior")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the device's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    for name in args.objects:
        if name not in TEST_OBJECTS:
            parser.error(f"unknown test object '{name}' (expected one of {', '.join(TEST_OBJECTS)})")
    rows = []
    with tempfile.TemporaryDirectory(prefix="check_nerf_oracle_") as tmp:
        device = torch.device(args.device)
        for name in args.objects:
            rows.append(check_object(name, Path(tmp), device, args.volume_weight, args.steps))
            print(json.dumps(rows[-1]), flush=True)
            if args.json:  # after each object: a run cut short keeps what it measured
                args.json.write_text(json.dumps(rows, indent=1))
    elevations = [f"el{e:+.0f}" for e in HELD_OUT_ELEVATIONS]
    steps = args.steps or default_fit_config(torch.device(args.device)).train.steps
    print(
        f"\ndevice {args.device}, {steps} steps, volume_weight {args.volume_weight or 0}; goals: wall"
        " <= 300 s (2 CPU cores), PSNR >= 28, Chamfer <= 0.015 and <= 0.8 x hull"
    )
    print("| object | wall s | Chamfer | hull | ratio | held-out PSNR " + " / ".join(elevations) + " |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        psnr = " / ".join(f"{r['held_out_psnr'][e]:.1f}" for e in elevations)
        print(
            f"| {r['object']} | {r['wall_s']:.0f} | {r['chamfer']:.4f} | {r['hull_chamfer']:.4f} "
            f"| {r['ratio']:.2f} | {psnr} |"
        )


if __name__ == "__main__":
    main()
