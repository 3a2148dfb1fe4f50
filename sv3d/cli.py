"""The `sv3d` command: one subcommand per stage (ARCHITECTURE.md "Names").

Errors the user can act on (`Sv3dError`) end the program with one line on stderr and exit status 2;
Ctrl-C ends it with status 130. Every stage validates its inputs before it creates anything, and writes
its outputs atomically, so neither leaves half-written files behind.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .errors import Sv3dError

__all__ = ["main", "build_parser"]


def _add_render_orbit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "render-orbit",
        help="render a mesh on an SV3D orbit into an orbit directory",
        description="Render MESH (GSO folder, .obj, .glb, .ply, .off) on an SV3D orbit: "
        "RGBA frames + transforms.json (alpha_source: render).",
    )
    p.add_argument("mesh", help="mesh file or GSO object folder (<obj>/meshes/model.obj)")
    p.add_argument(
        "-o", "--output", required=True, help="orbit directory to write (must not exist or be empty)"
    )
    p.add_argument("--views", type=int, default=21, help="number of frames (default 21, SV3D's)")
    p.add_argument("--resolution", type=int, default=576, help="frame size in pixels (default 576)")
    p.add_argument(
        "--elevation", type=float, default=10.0, help="input-view elevation in degrees (default 10)"
    )
    p.add_argument("--azimuth", type=float, default=0.0, help="input-view azimuth in degrees (default 0)")
    p.add_argument(
        "--orbit", choices=("static", "sine"), default="static", help="orbit shape (default static)"
    )
    p.add_argument(
        "--shading",
        choices=("lambert", "unlit"),
        default="lambert",
        help="lambert: soft shading under world-fixed lights; unlit: albedo only",
    )
    p.add_argument(
        "--up",
        choices=("auto", "y", "z"),
        default="auto",
        help="up axis of the file (auto: glTF y-up, others z-up)",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:N]")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=_cmd_render_orbit)


def _cmd_render_orbit(args: argparse.Namespace) -> int:
    from .render_orbit import RenderOrbitConfig, render_orbit

    config = RenderOrbitConfig(
        views=args.views,
        resolution=args.resolution,
        elevation_deg=args.elevation,
        input_azimuth_deg=args.azimuth,
        orbit=args.orbit,
        shading=args.shading,
        up=args.up,
        device=args.device,
    )
    start = time.perf_counter()
    out = render_orbit(args.mesh, args.output, config, overwrite=args.force)
    print(
        f"wrote {config.views} frames of {config.resolution}x{config.resolution} to {out} "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return 0


def _add_orbit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "orbit",
        help="generate SV3D's 21-frame orbit of the object in a photo",
        description="Photo -> orbit directory: 21 RGBA frames (alpha by matting against white), "
        "transforms.json and preview.mp4, sampled exactly as SV3D's reference.",
    )
    p.add_argument("image", help="photo or RGBA image of one object")
    p.add_argument(
        "-o", "--output", required=True, help="orbit directory to write (must not exist or be empty)"
    )
    p.add_argument(
        "--checkpoint", help="sv3d_p/sv3d_u .safetensors or diffusers folder (else $SV3D_CHECKPOINT)"
    )
    p.add_argument(
        "--orbit",
        choices=("static", "sine"),
        default=None,
        help="sv3d_p only: static (default) or sine (elevation +-20 deg); an error with sv3d_u",
    )
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument("--seed", type=int, default=23, help="random seed (default 23, the reference's)")
    p.add_argument(
        "--input-elevation",
        type=float,
        default=10.0,
        help="elevation of the photo in degrees (default 10; results degrade far from it)",
    )
    p.add_argument(
        "--resolution", type=int, default=576, help="frame size (default 576, SV3D's; multiple of 8)"
    )
    p.add_argument(
        "--background",
        choices=("auto", "rembg", "plain"),
        default="auto",
        help="matting for photos without alpha: rembg if installed, else plain light backgrounds",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:N]")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU), float32, ...")
    p.add_argument("--offload", action="store_true", help="keep idle components on the CPU (less GPU memory)")
    p.add_argument("--allow-cpu", action="store_true", help="run the full model on a CPU anyway (hours)")
    p.add_argument("--sgm-config", help="sgm yaml of the checkpoint, for models with non-SV3D head widths")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=_cmd_orbit)


def _cmd_orbit(args: argparse.Namespace) -> int:
    from .orbit import OrbitConfig, generate_orbit

    config = OrbitConfig(
        checkpoint=args.checkpoint,
        orbit=args.orbit,
        steps=args.steps,
        seed=args.seed,
        input_elevation_deg=args.input_elevation,
        resolution=args.resolution,
        background=args.background,
        device=args.device,
        dtype=args.dtype,
        offload=args.offload,
        allow_cpu=args.allow_cpu,
        sgm_config=args.sgm_config,
    )
    start = time.perf_counter()
    out = generate_orbit(args.image, args.output, config, overwrite=args.force)
    print(f"wrote the orbit and preview.mp4 to {out} in {time.perf_counter() - start:.1f} s")
    return 0


def _add_fit_nerf(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fit-nerf",
        help="fit an Instant-NGP NeRF to an orbit directory; extract a coarse mesh",
        description="Orbit directory (from sv3d orbit or render-orbit) -> mesh.ply, density.npz, "
        "field.safetensors, preview.mp4. An interrupted run resumes from its checkpoint.",
    )
    p.add_argument("orbit_dir", help="orbit directory: transforms.json + RGBA frames")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--steps", type=int, help="optimisation steps (default: by device)")
    p.add_argument("--resolution", type=int, help="training frame size (default: by device)")
    p.add_argument("--grid", type=int, help="marching-cubes grid resolution (default: by device)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:N]")
    p.add_argument("--force", action="store_true", help="start over in a non-empty output directory")
    p.set_defaults(func=_cmd_fit_nerf)


def _cmd_fit_nerf(args: argparse.Namespace) -> int:
    from .device import pick_device
    from .fit_nerf import default_fit_config, fit_nerf

    config = default_fit_config(pick_device(args.device))
    config.device = args.device
    if args.steps is not None:
        config.train.steps = args.steps
    if args.resolution is not None:
        config.train.max_resolution = args.resolution
    if args.grid is not None:
        config.extract.resolution = args.grid
    start = time.perf_counter()
    out = fit_nerf(args.orbit_dir, args.output, config, force=args.force)
    print(
        f"wrote mesh.ply, density.npz, field.safetensors, preview.mp4 to {out} in "
        f"{time.perf_counter() - start:.1f} s"
    )
    return 0


def _add_refine(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "refine",
        help="refine a mesh with DMTet on an orbit directory; export a textured mesh",
        description="Orbit directory + initial mesh (a fit-nerf output directory or any mesh file in the "
        "world frame) -> mesh.glb, mesh.obj + .mtl + .png, preview.mp4.",
    )
    p.add_argument("orbit_dir", help="orbit directory: transforms.json + RGBA frames")
    p.add_argument("--init", required=True, help="fit-nerf output directory or mesh file")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--steps", type=int, help="optimisation steps (default: by device)")
    p.add_argument("--resolution", type=int, help="render size during refinement (default: by device)")
    p.add_argument("--tet-resolution", type=int, help="tet grid cells per side (default: by device)")
    p.add_argument("--texture-size", type=int, help="baked texture size, a power of two (default 1024)")
    p.add_argument("--target-faces", type=int, help="decimate the exported mesh to this many faces")
    p.add_argument(
        "--sds",
        choices=("auto", "on", "off"),
        default="auto",
        help="masked SDS from the SV3D model (auto: on with --checkpoint on CUDA)",
    )
    p.add_argument("--checkpoint", help="SV3D checkpoint for SDS (or $SV3D_CHECKPOINT with --sds on)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:N]")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=_cmd_refine)


def _cmd_refine(args: argparse.Namespace) -> int:
    from .device import pick_device
    from .refine_stage import default_refine_config, refine_stage

    config = default_refine_config(pick_device(args.device))
    config.device, config.sds, config.checkpoint = args.device, args.sds, args.checkpoint
    if args.steps is not None:
        config.refine.steps = args.steps
    if args.resolution is not None:
        config.refine.render_resolution = args.resolution
    if args.tet_resolution is not None:
        config.refine.tet.resolution = args.tet_resolution
    if args.texture_size is not None:
        config.bake.texture_size = args.texture_size
    if args.target_faces is not None:
        config.cleanup.target_faces = args.target_faces
    start = time.perf_counter()
    out = refine_stage(args.orbit_dir, args.init, args.output, config, force=args.force)
    print(f"wrote mesh.glb, mesh.obj/.mtl/.png, preview.mp4 to {out} in {time.perf_counter() - start:.1f} s")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="built-in demo: needs no weights and no GPU",
        description="Writes the built-in test objects, renders one on SV3D's orbit, and "
        "measures the visual-hull baseline against its ground truth.",
    )
    p.add_argument("-o", "--output", default="demo_output", help="demo directory (default demo_output)")
    p.add_argument("--object", default="mug", help="which built-in test object (default mug)")
    p.add_argument("--resolution", type=int, default=576, help="frame size (default 576)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:N]")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    run_demo(
        Path(args.output), DemoConfig(object_name=args.object, resolution=args.resolution, device=args.device)
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sv3d",
        description="One photo of an object in, a textured 3D mesh "
        "out: SV3D orbit -> NeRF -> DMTet -> textured mesh.",
    )
    parser.add_argument("--version", action="version", version=f"sv3d {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_render_orbit(sub)
    _add_orbit(sub)
    _add_fit_nerf(sub)
    _add_refine(sub)
    _add_demo(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Sv3dError as exc:
        print(f"sv3d: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sv3d: interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
