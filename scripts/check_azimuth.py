"""Check SV3D's azimuth direction with the real weights: which way do the generated frames turn?

ARCHITECTURE.md ("Angles") fixes azimuth as counter-clockwise seen from +z, and `sv3d/cameras.py` cites
the evidence that SV3D's training renders turn the same way. This script tests it on data: it generates an
orbit from IMAGE, then fits a short NeRF twice on the same frames, once with the cameras of our convention
and once mirrored (every azimuth a -> 2 a_in - a, a_in the input view's, so the input view stays put), and
reports the masked PSNR with which each field reproduces the frames (`sv3d.run.consistency_score`). Frames
that turn the other way than their cameras cannot be explained by one field, so the right direction scores
clearly higher (with the real model, expect several dB).

    python scripts/check_azimuth.py photo.png --checkpoint /path/to/sv3d_p.safetensors [-o DIR]
    python scripts/check_azimuth.py --orbit-dir DIR_FROM_SV3D_ORBIT   # reuse a generated orbit
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import sv3d.run as run_module
from sv3d.cameras import explicit_orbit, read_orbit_directory, write_orbit_directory
from sv3d.device import pick_device
from sv3d.errors import InputError, Sv3dError
from sv3d.fit_nerf import fit_nerf
from sv3d.orbit import OrbitConfig, generate_orbit

DECISIVE_DB = 1.0  # PSNR gap below which the check is reported as inconclusive


def mirror_orbit_directory(orbit_dir: Path, output: Path) -> Path:
    """A copy of the orbit directory with every azimuth a replaced by 2 a_in - a (a_in: the last frame's)."""
    frames = read_orbit_directory(orbit_dir)
    azimuths = frames.orbit.azimuths_deg  # [V] degrees
    mirrored = explicit_orbit(
        frames.orbit.elevations_deg,
        (2.0 * azimuths[-1] - azimuths) % 360.0,
        radius=frames.orbit.radius,
        fov_deg=frames.orbit.fov_deg,
    )
    return write_orbit_directory(output, mirrored, frames.images, frames.alpha_source, overwrite=True)


def check_azimuth(
    orbit_dir: Path, output: Path, nerf_steps: int = 300, device_name: str = "auto", progress: bool = True
) -> dict:
    """Fit a short NeRF on the orbit as it is and mirrored; return both masked PSNRs and the verdict."""
    device = pick_device(device_name)
    fit = run_module.default_fit_config(device)  # looked up at call time: tests shrink it
    fit.train.steps, fit.device = nerf_steps, str(device)
    dirs = {"ours (counter-clockwise)": orbit_dir, "mirrored (clockwise)": output / "orbit_mirrored"}
    mirror_orbit_directory(orbit_dir, dirs["mirrored (clockwise)"])
    scores = {}
    for i, (name, orbit) in enumerate(dirs.items()):
        nerf_dir = output / f"nerf_{i}"
        fit_nerf(orbit, nerf_dir, fit, force=not (nerf_dir / "checkpoint.pt").is_file(), progress=progress)
        scores[name] = run_module.consistency_score(orbit, nerf_dir, fit, 64, device)["masked_psnr_db"]
    ours, mirrored = scores.values()
    if abs(ours - mirrored) < DECISIVE_DB:
        verdict = f"inconclusive: the two directions differ by less than {DECISIVE_DB:g} dB"
    elif ours > mirrored:
        verdict = "ARCHITECTURE.md's direction (counter-clockwise seen from +z) reproduces the frames better"
    else:
        verdict = "the MIRRORED direction reproduces the frames better: sv3d/cameras.py's convention is wrong"
    report = {
        "orbit_dir": str(orbit_dir),
        "nerf_steps": nerf_steps,
        "masked_psnr_db": scores,
        "verdict": verdict,
    }
    (output / "check_azimuth.json").write_text(json.dumps(report, indent=1))
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="check_azimuth.py", description=__doc__.split("\n\n")[0])
    p.add_argument("image", nargs="?", help="photo of one object (not needed with --orbit-dir)")
    p.add_argument("--checkpoint", help="sv3d_p/sv3d_u checkpoint (else $SV3D_CHECKPOINT)")
    p.add_argument("--sgm-config", help="sgm yaml of the checkpoint, for models with non-SV3D head widths")
    p.add_argument("--orbit-dir", help="use this generated orbit directory instead of sampling one")
    p.add_argument("-o", "--output", default="check_azimuth_output", help="working directory")
    p.add_argument("--steps", type=int, default=50, help="SV3D sampling steps (default 50)")
    p.add_argument("--resolution", type=int, default=576, help="orbit frame size (default 576)")
    p.add_argument("--nerf-steps", type=int, default=300, help="NeRF steps per direction (default 300)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:N]")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    output = Path(args.output)
    try:
        if (args.image is None) == (args.orbit_dir is None):
            raise InputError("give either IMAGE (with --checkpoint) or --orbit-dir, not both")
        if args.nerf_steps < 1:
            raise InputError(f"--nerf-steps must be >= 1, got {args.nerf_steps}")
        if args.orbit_dir:
            orbit_dir = Path(args.orbit_dir)
            read_orbit_directory(orbit_dir)  # validated before anything is written
        else:
            orbit_dir = output / "orbit"
            if not (orbit_dir / "transforms.json").is_file():
                config = OrbitConfig(
                    checkpoint=args.checkpoint,
                    sgm_config=args.sgm_config,
                    steps=args.steps,
                    resolution=args.resolution,
                    device=args.device,
                )
                generate_orbit(args.image, orbit_dir, config, overwrite=True)
        report = check_azimuth(orbit_dir, output, args.nerf_steps, args.device)
    except Sv3dError as exc:
        print(f"check_azimuth.py: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("check_azimuth.py: interrupted", file=sys.stderr)
        return 130
    for name, value in report["masked_psnr_db"].items():
        print(f"{name:<26} {value:6.2f} dB masked PSNR")
    print(report["verdict"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
