"""Refinement benchmark: seconds per DMTet step (render the frames, losses, backward, Adam) at the device's
defaults, and optionally the full run's wall time and one SDS step's cost.

The scene is the built-in `blob` on SV3D's orbit (oracle frames), initialised from its own mesh shrunk by
2% (a realistic NeRF-like start). Prints the median step time with `views_per_step` views and with all 21
views, so the cost per view is visible, and with `views_per_step` views over the whole tet grid instead of
the narrow band (`DMTetConfig.band_rings`): the band's speed-up. `--full` runs the whole default
refinement (1000 steps at tet resolution 128 and 576^2 on CUDA; the CPU defaults on CPU) with all 21 views
in every step (the issue's speed target) and prints its wall time. `--sds-checkpoint PATH` (+ `--sgm-config`
for the tiny test models) times one masked-SDS step of the SV3D model on the 21 renders at the model's
resolution; `--sds-random full|reduced` does the same with random weights in SV3D's layout (speed does not
depend on the values; `full` is the real model's size, bfloat16 on CUDA as `sv3d run` loads it).
Usage: `.venv/bin/python scripts/bench_refine.py [--device cuda] [--full] [--tet-resolution N]
[--sds-checkpoint PATH] [--sds-random full]`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from refine.fit import refine_surface
from refine.tetgrid import tet_grid
from sv3d.meshio import load_trimesh
from sv3d.refine_stage import RefineStageConfig, default_refine_config, mesh_sdf
from sv3d.render_orbit import RenderOrbitConfig, render_orbit_frames
from sv3d.testing.objects import write_test_object


def timed_steps(frames, init, config, device, guidance=None) -> float:
    """Median seconds per step over config.steps steps (the first is a warm-up)."""
    times: list[float] = []
    last = [time.perf_counter()]

    def progress(step: int, record: dict) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        if step > 1:
            times.append(now - last[0])
        last[0] = now

    refine_surface(frames.images, frames.orbit.cameras(), init, config, guidance, device, progress)
    return sorted(times)[len(times) // 2]


def blob_scene(config, root: Path):
    """The benchmark's scene for a RefineConfig: the `blob`'s orbit frames at the render size, and the SDF
    [N] on the config's tet grid of its own mesh shrunk by 2% (a close start, as a NeRF's would be)."""
    obj = write_test_object(root, "blob")
    frames = render_orbit_frames(obj, RenderOrbitConfig(resolution=config.render_resolution))
    mesh = load_trimesh(obj)
    mesh.apply_scale(0.98)
    return frames, mesh_sdf(mesh, tet_grid(config.tet.resolution, config.tet.bound).vertices)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=6, help="timed steps (after one warm-up)")
    parser.add_argument("--full", action="store_true", help="also time the whole default refinement")
    parser.add_argument("--tet-resolution", type=int, help="tet grid resolution (default: the device's)")
    parser.add_argument("--sds-checkpoint", help="SV3D checkpoint: also time one masked-SDS step")
    parser.add_argument("--sgm-config", help="sgm yaml of a checkpoint with non-SV3D widths (tiny models)")
    parser.add_argument(
        "--sds-random", choices=("full", "reduced"), help="time one SDS step with a random-weight SV3D model"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    stage: RefineStageConfig = default_refine_config(device)
    config = stage.refine
    if args.tet_resolution:
        config = replace(config, tet=replace(config.tet, resolution=args.tet_resolution))
    frames, init = blob_scene(config, Path(tempfile.mkdtemp(prefix="bench_refine_")))
    print(
        f"device={device} threads={torch.get_num_threads()} tet={config.tet.resolution} "
        f"render={config.render_resolution}^2 views_per_step={config.views_per_step}"
    )
    short = replace(config, steps=args.steps + 1)
    per_step = timed_steps(frames, init, short, device)
    print(f"step, {config.views_per_step} views: {per_step:8.3f} s")
    all_views = timed_steps(frames, init, replace(short, views_per_step=len(frames.orbit)), device)
    print(f"step, all {len(frames.orbit)} views: {all_views:8.3f} s  ({all_views / per_step:.1f}x)")
    if config.tet.band_rings:  # the baseline: marching tets and the sign loss over every tet
        whole = timed_steps(frames, init, replace(short, tet=replace(config.tet, band_rings=0)), device)
        print(
            f"step, {config.views_per_step} views, whole tet grid (band_rings 0): {whole:8.3f} s  "
            f"(the {config.tet.band_rings}-ring band: {whole / per_step:.2f}x faster)"
        )
    if args.full:
        start = time.perf_counter()
        full = replace(config, views_per_step=len(frames.orbit))
        refine_surface(frames.images, frames.orbit.cameras(), init, full, None, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        print(
            f"full refinement ({config.steps} steps, all {len(frames.orbit)} views a step, no SDS): "
            f"{time.perf_counter() - start:.1f} s"
        )
    if args.sds_checkpoint or args.sds_random:
        from sv3d.guidance import SDSConfig, make_sv3d_guidance
        from sv3d.model.pipeline import SV3DPipeline

        if args.sds_checkpoint:
            kwargs = {"sgm_config": args.sgm_config} if args.sgm_config else {}
            pipeline = SV3DPipeline.load(args.sds_checkpoint, **kwargs).to(device)
        else:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from bench_sv3d import FULL, REDUCED, build

            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            pipeline = build(FULL if args.sds_random == "full" else REDUCED).to(device, dtype)
            print(f"random-weight SV3D ({args.sds_random} layout, {dtype})")
        sds = SDSConfig(resolution=config.sds_resolution)
        image = torch.ones(1, 3, sds.resolution, sds.resolution, device=device)
        guidance = make_sv3d_guidance(pipeline, image, frames.orbit, sds)
        with_sds = replace(short, sds_fraction=1.0)
        seconds = timed_steps(frames, init, with_sds, device, guidance)
        print(
            f"step with SDS (all views at {config.sds_resolution}^2): {seconds:8.3f} s "
            f"(+{seconds - per_step:.3f} s over a plain step)"
        )


if __name__ == "__main__":
    main()
