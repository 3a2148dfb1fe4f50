"""NeRF stage benchmark (CPU or CUDA): field throughput, and time to masked PSNR 28 on an oracle orbit.

1. Field samples per second (forward + backward + Adam step, 2^18 random points) of the radiance field
   with our hash-grid encoder and with a straightforward per-level implementation of the same encoding
   (`hash_encode_reference`), same table, MLPs and optimiser; prints the ratio. On CPU also with the MLPs
   run layer by layer through autograd instead of in row chunks (`nerf/mlp.py`), and that ratio. The
   set-ups take turns step by step. On CUDA also with the fused Triton kernels (`backend="triton"`), and
   their ratio to the default path.
2. Time to masked PSNR 28 dB: the built-in `blob` object rendered on SV3D's orbit, fitted with the device's
   default `sv3d fit-nerf` configuration; every 25 steps (not timed) the field renders all 21 frames at
   64 px and the PSNR over object pixels is measured. Prints the training seconds at which it first
   reaches 28 dB.
3. Seconds per training step on the checker sphere (the largest test object: every ray crosses ~48 samples
   of its hull), from field states trained for `--warmup` / 4 and `--warmup` steps (the CPU default: 1200,
   a fitted field) at the device's defaults. The baseline evaluates the whole field at every sample in the
   hull; against it, the colour MLP only where a sample's weight exceeds `color_eps` (the default, 1e-5),
   that with the MLPs' products in bfloat16 (`FieldConfig.mlp_dtype`, opt-in; on CPUs without AVX512-BF16
   or AMX the products are emulated and slower), and colour where seen plus early ray termination
   (`early_stop_eps` 1e-4, opt-in, which training uses only while it hides > 30% of the samples: early in
   a fit little is opaque yet). The set-ups are timed in turn, twice (A B C D A B C
   D), so that a drift of the machine's speed shows up as a difference between the rounds.
Usage: `.venv/bin/python scripts/bench_nerf.py [--device cpu] [--skip-fit] [--skip-steps]`. Figures depend
on the machine's load: run it on a quiet machine and compare the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import tempfile
import time
import types
from pathlib import Path

import torch
from torch import nn

from nerf import _hash_triton
from nerf.encoding import HashGridConfig, HashGridEncoder, hash_encode_reference
from nerf.field import FieldConfig, RadianceField
from nerf.occupancy import OccupancyGrid
from nerf.train import TrainConfig, fit_field, frames_over_white
from sv3d.evaluation.visual_hull import carve_occupancy
from sv3d.fit_nerf import default_fit_config, render_views
from sv3d.render_orbit import RenderOrbitConfig, render_orbit_frames
from sv3d.testing.objects import write_test_object


class PerLevelEncoder(nn.Module):
    """The same encoding, one level at a time in plain torch: the baseline."""

    def __init__(self, config: HashGridConfig, table: torch.Tensor) -> None:
        super().__init__()
        self.config = config
        self.table = nn.Parameter(table.detach().clone())
        self.output_dim = config.n_levels * config.n_features_per_level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return hash_encode_reference(x, self.table, self.config)


def field_samples_per_second(fields: dict[str, nn.Module], x: torch.Tensor, iters: int) -> dict[str, float]:
    """Samples/s of each field's forward + backward + Adam step on points x, median over `iters` steps.

    The fields take turns, one step each per round (A B C A B C ...), after an untimed round: a process's
    first steps run slower (fresh memory), and the machine's speed drifts."""
    opts = {name: torch.optim.Adam(f.parameters(), lr=1e-2, eps=1e-15) for name, f in fields.items()}
    times: dict[str, list[float]] = {name: [] for name in fields}
    for step in range(iters + 1):
        for name, field in fields.items():
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            rgb, sigma = field(x)
            (rgb.square().mean() + sigma.mean()).backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            if step:
                times[name].append(time.perf_counter() - t0)
    return {name: x.shape[0] / sorted(t)[len(t) // 2] for name, t in times.items()}


class Reached(Exception):
    pass


def time_to_psnr(device: torch.device, target_db: float, max_steps: int) -> tuple[float | None, int, float]:
    root = Path(tempfile.mkdtemp(prefix="bench_nerf_"))
    frames = render_orbit_frames(write_test_object(root, "blob"), RenderOrbitConfig(resolution=256))
    config = default_fit_config(device)
    config.train.steps = max_steps
    config.train.checkpoint_every = 0
    hull = carve_occupancy(frames.masks(), frames.orbit.cameras(), config.hull_resolution, 0.55)
    occupancy = OccupancyGrid(hull, 0.55, config.hull_dilate).to(device)
    target, alpha = frames_over_white(frames.images, 64)  # as training averages them down
    mask = alpha[..., 0] > 0.5
    state = {"train": 0.0, "last": time.perf_counter(), "psnr": 0.0, "step": 0}

    def progress(step: int, record: dict) -> None:
        state["train"] += time.perf_counter() - state["last"]
        if step % 25 == 0:
            rgb = torch.from_numpy(
                render_views(
                    model, frames.orbit.c2w(), frames.orbit.fov_deg, 64, config.train, occupancy=occupancy
                )
            )
            err = (rgb - target).pow(2).mean(-1)[mask].mean()
            state["psnr"], state["step"] = float(-10 * math.log10(err)), step
            if state["psnr"] >= target_db:
                raise Reached
        state["last"] = time.perf_counter()

    model = RadianceField(config.train.field)
    try:
        fit_field(
            frames.images,
            frames.orbit.c2w(),
            frames.orbit.fov_deg,
            config.train,
            device,
            progress=progress,
            occupancy=occupancy,
            model=model,
        )
    except Reached:
        return state["train"], state["step"], state["psnr"]
    return None, state["step"], state["psnr"]


def step_seconds(device: torch.device, warmup: int, steps: int) -> None:
    """Part 3: seconds per training step without and with early stop, from trained states (module doc)."""
    root = Path(tempfile.mkdtemp(prefix="bench_nerf_"))
    frames = render_orbit_frames(write_test_object(root, "checker"), RenderOrbitConfig(resolution=256))
    config = default_fit_config(device)
    hull = carve_occupancy(frames.masks(), frames.orbit.cameras(), config.hull_resolution, 0.55)
    occupancy = OccupancyGrid(hull, 0.55, config.hull_dilate).to(device)

    def fit(train: TrainConfig, model: RadianceField, progress=None) -> float:
        result = fit_field(
            frames.images,
            frames.orbit.c2w(),
            frames.orbit.fov_deg,
            train,
            device,
            occupancy=occupancy,
            model=model,
            progress=progress,
        )
        return result.seconds / train.steps

    base = dataclasses.replace(config.train, checkpoint_every=0, early_stop_eps=0.0, color_eps=0.0)
    eps = 1e-4  # nerfacc's early-stop threshold (opt-in here: the default is 0)
    color_eps = TrainConfig().color_eps  # the default
    seen = dataclasses.replace(base, color_eps=color_eps)
    variants = {  # name -> (training config, the MLPs' precision)
        "baseline (whole field at every sample in the hull, float32)": (base, "float32"),
        f"colour where seen (color_eps {color_eps:g})": (seen, "float32"),
        "colour where seen + bfloat16 MLPs": (seen, "bfloat16"),
        f"colour where seen + early stop (eps {eps:g})": (
            dataclasses.replace(seen, early_stop_eps=eps),
            "float32",
        ),
    }
    # One fit of `warmup` steps at the defaults, its field copied at 1/4 of them (little is opaque yet)
    snapshots: dict[int, RadianceField] = {}
    model = RadianceField(config.train.field)
    early = max(1, warmup // 4)

    def keep(step: int, record: dict) -> None:
        if step == early:
            snapshots[step] = copy.deepcopy(model)

    fit(dataclasses.replace(config.train, checkpoint_every=0, steps=max(1, warmup)), model, keep)
    snapshots[max(1, warmup)] = model
    for until, trained in sorted(snapshots.items()):
        for round_ in (1, 2):
            first = None
            for name, (train, mlp_dtype) in variants.items():
                model = copy.deepcopy(trained)
                model.config = dataclasses.replace(model.config, mlp_dtype=mlp_dtype)
                seconds = fit(
                    dataclasses.replace(train, steps=steps, lr=train.lr * train.lr_final_factor), model
                )
                first = first or seconds
                print(
                    f"train step after {until} steps (checker), round {round_}, {name}: {seconds:.3f} s"
                    f"  ({first / seconds:.2f}x)"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=2**18, help="points per throughput step")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument(
        "--max-steps", type=int, default=1500, help="give up on PSNR 28 after this many steps"
    )
    parser.add_argument("--skip-fit", action="store_true", help="skip the time to PSNR 28 (part 2)")
    parser.add_argument("--skip-steps", action="store_true", help="skip the step timings (part 3)")
    parser.add_argument(
        "--warmup", type=int, default=1200, help="part 3: steps trained before timing (also timed at 1/4)"
    )
    parser.add_argument("--steps", type=int, default=30, help="part 3: steps timed per set-up")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = default_fit_config(device).train.field
    x = (torch.rand(args.batch, 3) - 0.5).to(device)  # world points inside the object's sphere
    ours = RadianceField(config).to(device)
    per_level = RadianceField(
        FieldConfig(**{**config.__dict__}), encoder=PerLevelEncoder(config.encoder, ours.encoder.table)
    ).to(device)
    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch} encoder={config.encoder}")
    fields = {"ours": ours, "per-level": per_level}
    if device.type == "cpu":  # the MLPs' chunked CPU path (nerf/mlp.py) against their layers one by one
        plain = copy.deepcopy(ours)
        for mlp in (plain.density_mlp, plain.color_mlp):
            mlp.forward = types.MethodType(nn.Sequential.forward, mlp)  # autograd, layer by layer
        fields["plain MLPs"] = plain
    rates = field_samples_per_second(fields, x, args.iters)
    a, b = rates["ours"], rates["per-level"]
    print(f"field fwd+bwd+Adam, our encoder:       {a:12,.0f} samples/s")
    print(f"field fwd+bwd+Adam, per-level encoder: {b:12,.0f} samples/s")
    print(f"ratio ours / per-level:                {a / b:12.1f}x")
    if "plain MLPs" in rates:
        c = rates["plain MLPs"]
        print(f"field fwd+bwd+Adam, ours, MLPs layer by layer: {c:,.0f} samples/s")
        print(f"ratio chunked MLPs / layer by layer:   {a / c:12.2f}x")
    if _hash_triton.runs_on(device):  # the fused Triton kernels (CUDA; CPU only under the interpreter)
        fused = RadianceField(config, encoder=HashGridEncoder(config.encoder, backend="triton")).to(device)
        fused.load_state_dict(ours.state_dict())
        with torch.no_grad():
            diff = (fused(x[:4096])[0] - ours(x[:4096])[0]).abs().max().item()
        c = field_samples_per_second({"triton": fused}, x, args.iters)["triton"]
        print(f"field fwd+bwd+Adam, triton encoder:    {c:12,.0f} samples/s  (max colour diff {diff:.1e})")
        print(f"ratio triton / ours:                   {c / a:12.1f}x")
    if not args.skip_fit:
        seconds, step, db = time_to_psnr(device, 28.0, args.max_steps)
        if seconds is None:
            print(f"masked PSNR 28 not reached in {args.max_steps} steps (last {db:.1f} dB at step {step})")
        else:
            print(
                f"time to masked PSNR 28 (blob, oracle orbit): {seconds:.1f} s of training, step {step} "
                f"({db:.1f} dB)"
            )
    if not args.skip_steps:
        step_seconds(device, args.warmup, args.steps)


if __name__ == "__main__":
    main()
