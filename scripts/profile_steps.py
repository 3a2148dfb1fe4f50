"""Where a training step's time goes: torch.profiler over NeRF and DMTet steps at the device's defaults.

1. NeRF: the built-in `mug` on SV3D's orbit (576^2 frames on CUDA, 256^2 on CPU), `fit_field` at the
   device's default `sv3d fit-nerf` configuration; `--nerf-warmup` steps unprofiled (the occupancy grid and
   the field settle), then `--nerf-steps` profiled.
2. DMTet: as `scripts/bench_refine.py` (the `blob` from its own mesh shrunk by 2%), the device's default
   refinement with all 21 views a step (issue 5's speed target); 3 steps unprofiled, then `--refine-steps`.
For each: the median wall seconds a step (unprofiled steps, synchronised on CUDA) and the top operators by
self time on the device (CUDA) or the CPU, written to `--out`/nerf_profile.txt and refine_profile.txt and
printed. Usage: `.venv/bin/python scripts/profile_steps.py [--device cuda] [--out DIR] [--skip-nerf]
[--skip-refine]`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from bench_refine import blob_scene  # scripts/ is on sys.path when a script runs
from torch.profiler import ProfilerActivity, profile, schedule

from nerf.occupancy import OccupancyGrid
from nerf.train import fit_field
from refine.fit import refine_surface
from sv3d.cameras import read_orbit_directory
from sv3d.evaluation.visual_hull import carve_occupancy
from sv3d.fit_nerf import default_fit_config
from sv3d.refine_stage import default_refine_config
from sv3d.render_orbit import RenderOrbitConfig, render_orbit
from sv3d.testing.objects import write_test_object


class StepProfiler:
    """A progress callback: times the unprofiled steps, then steps a torch profiler over the rest."""

    def __init__(self, device: torch.device, unprofiled: int, profiled: int) -> None:
        self.device = device
        self.unprofiled = unprofiled
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.profiler = profile(
            activities=activities, schedule=schedule(wait=unprofiled, warmup=1, active=profiled)
        )
        self.times: list[float] = []
        self.last = time.perf_counter()

    def __call__(self, step: int, record: dict) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        if 1 < step <= self.unprofiled:  # the first step is a warm-up
            self.times.append(now - self.last)
        self.last = now
        self.profiler.step()

    def report(self, title: str, path: Path) -> None:
        median = sorted(self.times)[len(self.times) // 2] if self.times else float("nan")
        sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        averages = self.profiler.key_averages()
        try:
            table = averages.table(sort_by=sort, row_limit=45, max_name_column_width=60)
        except (AttributeError, KeyError, ValueError):  # newer torch names the device column generically
            table = averages.table(sort_by="self_device_time_total", row_limit=45, max_name_column_width=60)
        text = f"{title}\nmedian step (unprofiled, {len(self.times)} steps): {median:.4f} s\n{table}\n"
        path.write_text(text)
        print(text, flush=True)


def profile_nerf(device: torch.device, root: Path, warmup: int, steps: int, out: Path) -> None:
    resolution = 576 if device.type == "cuda" else 256
    mug = write_test_object(root, "mug")
    orbit_dir = render_orbit(mug, root / "orbit", RenderOrbitConfig(resolution=resolution))
    frames = read_orbit_directory(orbit_dir)
    config = default_fit_config(device)
    bound = config.train.field.bound
    hull = carve_occupancy(frames.masks(), frames.orbit.cameras(), config.hull_resolution, bound)
    occupancy = OccupancyGrid(hull, bound, config.hull_dilate).to(device)
    train = replace(config.train, steps=warmup + 1 + steps + 1, checkpoint_every=0)
    timer = StepProfiler(device, warmup, steps)
    with timer.profiler:
        fit_field(
            frames.images, frames.orbit.c2w(), frames.orbit.fov_deg, train, device, None, timer, occupancy
        )
    timer.report(
        f"NeRF steps, mug, {device}, {train.batch_rays} rays x {train.n_samples} samples, "
        f"{frames.images.shape[1]}^2 frames, profiled after step {warmup}",
        out / "nerf_profile.txt",
    )


def profile_refine(device: torch.device, root: Path, steps: int, out: Path) -> None:
    config = default_refine_config(device).refine
    frames, init = blob_scene(config, root)
    unprofiled = 3
    config = replace(config, steps=unprofiled + 1 + steps + 1, views_per_step=len(frames.orbit))
    timer = StepProfiler(device, unprofiled, steps)
    with timer.profiler:
        refine_surface(frames.images, frames.orbit.cameras(), init, config, None, device, timer)
    timer.report(
        f"DMTet steps, blob, {device}, tet {config.tet.resolution}, {config.views_per_step} views at "
        f"{config.render_resolution}^2",
        out / "refine_profile.txt",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for the two tables")
    parser.add_argument("--nerf-warmup", type=int, default=300, help="NeRF steps before profiling")
    parser.add_argument("--nerf-steps", type=int, default=10, help="profiled NeRF steps")
    parser.add_argument("--refine-steps", type=int, default=4, help="profiled DMTet steps")
    parser.add_argument("--skip-nerf", action="store_true")
    parser.add_argument("--skip-refine", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="profile_steps_") as tmp:
        if not args.skip_refine:
            profile_refine(device, Path(tmp) / "refine", args.refine_steps, args.out)
        if not args.skip_nerf:
            profile_nerf(device, Path(tmp) / "nerf", args.nerf_warmup, args.nerf_steps, args.out)


if __name__ == "__main__":
    main()
