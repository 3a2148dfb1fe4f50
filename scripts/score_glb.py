"""Masked PSNR of each exported `mesh.glb` against its ground-truth orbit, for an `sv3d eval` folder.

Issue 5's texture check, as the README's Results table reports it: for every object of EVAL_DIR (an
`sv3d eval` output: `<object>/mesh.glb` and `<object>/gt_orbit/`), the mesh is rendered unlit over white
from the orbit's 21 cameras at the frames' own size (antialiased), and renders and frames (composited over
white) are area-averaged alike to SIZE² (`nerf.train.frames_over_white`, as the NeRF's targets); the PSNR is
taken over the pixels whose averaged alpha exceeds 1/2 (the object's). (Until 2026-12-08 the mesh was
rendered at SIZE² directly: a pixel then sampled its texture at one point, aliasing fine textures against
the averaged frames; the README's earlier `.glb` PSNR figures were measured so.)

    python scripts/score_glb.py /tmp/eval [--size 256] [--json scores.json]

An object whose mesh or orbit cannot be read is reported (and in the JSON as "error: ...") and the others are
scored; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from nerf.train import frames_over_white, psnr
from refine import render_mesh
from sv3d.cameras import read_orbit_directory
from sv3d.errors import Sv3dError, one_line
from sv3d.fit_nerf import _atomic
from sv3d.meshio import load_mesh


def glb_psnr(object_dir: Path, size: int = 256) -> float:
    """Masked PSNR (dB) of `object_dir/mesh.glb`'s unlit renders against `object_dir/gt_orbit`'s frames."""
    frames = read_orbit_directory(object_dir / "gt_orbit")
    size = min(size, frames.images.shape[1])  # the frames are averaged down, never up
    mesh = load_mesh(object_dir / "mesh.glb", place=False)  # glTF +Y up back to the world's z up
    full = frames.images.shape[1]
    with torch.no_grad():
        pred = render_mesh(mesh, frames.orbit.cameras(), full, shading="unlit").image  # [V, S, S, 3]
    if size < full:  # averaged as the frames are
        pred = torch.nn.functional.interpolate(pred.permute(0, 3, 1, 2), size=(size, size), mode="area")
        pred = pred.permute(0, 2, 3, 1)  # [V, s, s, 3]
    target, alpha = frames_over_white(frames.images, size)  # [V, s, s, 3] over white, [V, s, s, 1]
    return psnr(pred, target, (alpha > 0.5).expand_as(target))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("eval_dir", type=Path, help="an sv3d eval output folder")
    parser.add_argument("--size", type=int, default=256, help="render and comparison size (default 256)")
    parser.add_argument("--json", type=Path, help="also write {object: dB} here")
    args = parser.parse_args(argv)
    if args.size < 16:
        parser.error(f"--size must be >= 16, got {args.size}")
    objects = sorted(p.parent for p in args.eval_dir.glob("*/mesh.glb") if (p.parent / "gt_orbit").is_dir())
    if not objects:
        print(
            f"score_glb.py: error: {args.eval_dir}: no <object>/mesh.glb with its gt_orbit/", file=sys.stderr
        )
        return 2
    scores: dict[str, float | str] = {}
    for obj in objects:  # one unreadable mesh is reported and the others are still scored
        try:
            scores[obj.name] = glb_psnr(obj, args.size)
            print(f"{obj.name}: {scores[obj.name]:.1f} dB", flush=True)
        except (Sv3dError, OSError) as exc:
            scores[obj.name] = f"error: {one_line(exc)}"
            print(f"score_glb.py: {obj.name}: error: {one_line(exc)}", file=sys.stderr)
    if args.json:
        _atomic(args.json, lambda p: p.write_text(json.dumps(scores, indent=1)))
    return 1 if any(isinstance(v, str) for v in scores.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
