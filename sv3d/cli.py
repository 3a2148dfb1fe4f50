"""The `sv3d` command: one subcommand per stage (ARCHITECTURE.md "Names").

Errors the user can act on (`Sv3dError`) end the program with one line on stderr and exit status 2;
Ctrl-C ends it with status 130. Every stage validates its inputs before it creates anything, and writes
its outputs atomically, so neither leaves half-written files behind.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .errors import OUT_OF_MEMORY_HINT, Sv3dError, one_line, out_of_memory

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
        "--resolution", type=int, default=576, help="frame size (default 576, SV3D's; multiple of 8)"
    )
    _add_photo_options(p)
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
    p.add_argument(
        "--volume-weight",
        type=_finite_non_negative,
        help="occupied-volume prior (default 0, off): 0.01 opens cups and bowls seen from the side, but "
        "can also open closed objects with plain faces (README, Limitations)",
    )
    p.add_argument(
        "--no-floor-cut",
        action="store_true",
        help="keep the solid that the masks leave below the height down to which every frame sees the "
        "surface (by default it is cut away: a hidden bottom is taken as flat)",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:N]")
    p.add_argument("--force", action="store_true", help="start over in a non-empty output directory")
    p.set_defaults(func=_cmd_fit_nerf)


def _finite_non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value >= 0.0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


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
    if args.volume_weight is not None:
        config.train.volume_weight = args.volume_weight
    if args.no_floor_cut:
        config.floor_cut = False
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
    p.add_argument(
        "--up",
        choices=("auto", "y", "z"),
        default="auto",
        help="up axis of an --init mesh file (auto: glTF y-up, others z-up)",
    )
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--steps", type=int, help="optimisation steps (default: by device)")
    p.add_argument("--resolution", type=int, help="render size during refinement (default: by device)")
    p.add_argument("--tet-resolution", type=int, help="tet grid cells per side (default: by device)")
    p.add_argument("--texture-size", type=int, help="baked texture size, a power of two (default 1024)")
    p.add_argument("--target-faces", type=int, help="decimate the exported mesh to this many faces")
    p.add_argument(
        "--no-shading",
        action="store_true",
        help="fit an unlit colour field (by default colour = albedo x a learned shading of the surface "
        "normal, which lets the frames' shading shape plain surfaces)",
    )
    cavities = p.add_mutually_exclusive_group()
    cavities.add_argument(
        "--no-open-cavities",
        action="store_true",
        help="refine from the init only (by default also from the init with its cavities opened, kept "
        "when, where it looks into its cavity, its colours remove at least 10%% of the first start's "
        "error on the frames and it fits them no worse overall: a bowl keeps its inside; about twice the "
        "time)",
    )
    cavities.add_argument(
        "--open-cavities",
        action="store_true",
        help="refine only from the init with its cavities opened: for cups, mugs and other containers "
        "whose inside the orbit barely shows, which the frames alone leave lidded",
    )
    p.add_argument(
        "--no-floor-cut",
        action="store_true",
        help="let the surface grow below the height down to which every frame sees the init (by default "
        "the init is cut there and the surface kept above it: a hidden bottom is taken as flat)",
    )
    p.add_argument(
        "--sds",
        choices=("auto", "on", "off"),
        default="auto",
        help="masked SDS from the SV3D model (auto: on on CUDA when a checkpoint is given or set)",
    )
    p.add_argument("--checkpoint", help="SV3D checkpoint for SDS (else $SV3D_CHECKPOINT)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:N]")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=_cmd_refine)


def _cmd_refine(args: argparse.Namespace) -> int:
    from .device import pick_device
    from .refine_stage import default_refine_config, refine_stage

    config = default_refine_config(pick_device(args.device))
    # $SV3D_CHECKPOINT counts as given, as for `sv3d run` and the Hydra configs (auto: SDS on CUDA)
    checkpoint = args.checkpoint or os.environ.get("SV3D_CHECKPOINT") or None
    config.device, config.sds, config.checkpoint = args.device, args.sds, checkpoint
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
    if args.no_shading:
        config.refine.color.shading = False
    if args.no_open_cavities:
        config.open_cavities = "never"
    if args.open_cavities:
        config.open_cavities = "always"
    if args.no_floor_cut:
        config.refine.floor_cut = False
    start = time.perf_counter()
    out = refine_stage(args.orbit_dir, args.init, args.output, config, force=args.force, init_up=args.up)
    print(f"wrote mesh.glb, mesh.obj/.mtl/.png, preview.mp4 to {out} in {time.perf_counter() - start:.1f} s")
    return 0


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="photo -> textured mesh, end to end (orbit, NeRF, DMTet, export)",
        description="Photo -> orbit/, nerf/, refine/, mesh.glb, turntable.mp4 and run.json in DIR. "
        "Resumable: a rerun with the same settings skips finished stages; other settings need --force.",
    )
    p.add_argument("image", help="photo or RGBA image of one object")
    p.add_argument("-o", "--output", required=True, help="run directory")
    p.add_argument(
        "--checkpoint", help="sv3d_p/sv3d_u .safetensors or diffusers folder (else $SV3D_CHECKPOINT)"
    )
    p.add_argument("--sgm-config", help="sgm yaml of the checkpoint, for models with non-SV3D head widths")
    p.add_argument(
        "--orbit", choices=("static", "sine"), default=None, help="sv3d_p only: static (default) or sine"
    )
    p.add_argument("--steps", type=int, default=50, help="SV3D sampling steps (default 50)")
    p.add_argument("--seed", type=int, default=23, help="SV3D sampling seed (default 23, the reference's)")
    p.add_argument("--resolution", type=int, default=576, help="orbit frame size (default 576, SV3D's)")
    _add_photo_options(p)
    p.add_argument("--nerf-steps", type=int, help="NeRF optimisation steps (default: by device)")
    p.add_argument("--refine-steps", type=int, help="DMTet optimisation steps (default: by device)")
    p.add_argument("--tet-resolution", type=int, help="DMTet grid cells per side (default: by device)")
    p.add_argument("--texture-size", type=int, help="baked texture size, a power of two (default 1024)")
    p.add_argument(
        "--volume-weight",
        type=_finite_non_negative,
        help="NeRF occupied-volume prior (default 0, off): 0.01 opens cups and bowls (see sv3d fit-nerf)",
    )
    p.add_argument(
        "--no-floor-cut",
        action="store_true",
        help="keep what lies below the height down to which every frame sees the surface, in the NeRF "
        "and the refined mesh (see sv3d fit-nerf and sv3d refine)",
    )
    p.add_argument(
        "--no-shading",
        action="store_true",
        help="refine with an unlit colour field instead of albedo x learned shading (see sv3d refine)",
    )
    cavities = p.add_mutually_exclusive_group()
    cavities.add_argument(
        "--no-open-cavities",
        action="store_true",
        help="refine from the NeRF mesh only, not also with its cavities opened (see sv3d refine)",
    )
    cavities.add_argument(
        "--open-cavities",
        action="store_true",
        help="refine only from the NeRF mesh with its cavities opened: containers (see sv3d refine)",
    )
    p.add_argument(
        "--consistency-threshold",
        type=float,
        default=20.0,
        help="NeRF-vs-frames masked PSNR (dB) below which the orbit is flagged (default 20)",
    )
    p.add_argument(
        "--allow-inconsistent", action="store_true", help="mesh an orbit flagged as not 3D-consistent anyway"
    )
    p.add_argument("--turntable-frames", type=int, default=60, help="frames of turntable.mp4 (default 60)")
    p.add_argument("--turntable-resolution", type=int, default=256, help="turntable size (default 256)")
    p.add_argument("--dtype", default="auto", help="SV3D dtype: auto (bfloat16 on CUDA), float32, ...")
    p.add_argument("--allow-cpu", action="store_true", help="sample the full SV3D model on a CPU (hours)")
    p.add_argument(
        "--offload",
        action="store_true",
        help="SV3D sampling keeps idle components on the CPU (less GPU memory)",
    )
    p.add_argument(
        "--sds",
        choices=("auto", "on", "off"),
        default="auto",
        help="masked SDS from the SV3D model in the refinement (auto: on on CUDA; off saves its memory)",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:N]")
    p.add_argument(
        "--force",
        action="store_true",
        help="redo the stages that changed settings touch, and the later ones (same settings: start over)",
    )
    p.set_defaults(func=_cmd_run)


def run_config_from_args(args: argparse.Namespace):
    """The RunConfig of `sv3d run`'s options (stage defaults follow the device)."""
    from .device import pick_device
    from .orbit import OrbitConfig
    from .run import RunConfig, stage_configs

    nerf, refine = stage_configs(
        pick_device(args.device),
        nerf_steps=args.nerf_steps,
        refine_steps=args.refine_steps,
        tet_resolution=args.tet_resolution,
        texture_size=args.texture_size,
    )
    if args.volume_weight is not None:
        nerf.train.volume_weight = args.volume_weight
    if args.no_floor_cut:
        nerf.floor_cut = refine.refine.floor_cut = False
    if args.no_shading:
        refine.refine.color.shading = False
    if args.no_open_cavities:
        refine.open_cavities = "never"
    if args.open_cavities:
        refine.open_cavities = "always"
    refine.sds = args.sds
    orbit = OrbitConfig(
        checkpoint=args.checkpoint,
        orbit=args.orbit,
        steps=args.steps,
        seed=args.seed,
        resolution=args.resolution,
        input_elevation_deg=args.input_elevation,
        background=args.background,
        dtype=args.dtype,
        allow_cpu=args.allow_cpu,
        sgm_config=args.sgm_config,
        offload=args.offload,
        device=args.device,
    )
    return RunConfig(
        orbit=orbit,
        nerf=nerf,
        refine=refine,
        turntable_frames=args.turntable_frames,
        turntable_resolution=args.turntable_resolution,
        consistency_threshold_db=args.consistency_threshold,
        allow_inconsistent=args.allow_inconsistent,
        device=args.device,
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from .run import run_image_to_mesh

    start = time.perf_counter()
    result = run_image_to_mesh(args.image, args.output, run_config_from_args(args), force=args.force)
    score = result.summary.get("consistency") or {}
    print(
        f"wrote {result.mesh_path} and turntable.mp4 to {result.output_dir} in "
        f"{time.perf_counter() - start:.1f} s (consistency {score.get('masked_psnr_db', float('nan')):.1f} dB"
        f"{', FLAGGED' if result.flagged else ''})"
    )
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="built-in demo: needs no weights and no GPU",
        description="Renders a built-in test object on SV3D's orbit, reconstructs it (NeRF + DMTet) into "
        "a textured mesh.glb and turntable.mp4, and scores it, the NeRF mesh and the visual-hull baseline "
        "against the ground truth (metrics.json).",
    )
    p.add_argument("-o", "--output", default="demo_output", help="demo directory (default demo_output)")
    p.add_argument("--object", default="mug", help="which built-in test object (default mug)")
    p.add_argument("--resolution", type=int, default=256, help="orbit frame size (default 256)")
    p.add_argument("--nerf-steps", type=int, help="NeRF optimisation steps (default 800)")
    p.add_argument("--refine-steps", type=int, help="DMTet optimisation steps (default 120)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:N]")
    p.add_argument("--force", action="store_true", help="start over instead of resuming")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    config = DemoConfig(object_name=args.object, resolution=args.resolution, device=args.device)
    if args.nerf_steps is not None:
        config.nerf_steps = args.nerf_steps
    if args.refine_steps is not None:
        config.refine_steps = args.refine_steps
    run_demo(Path(args.output), config, force=args.force)
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate the pipeline on a GSO-layout dataset (Chamfer, F-score, IoU; visual-hull baseline)",
        description="For each DATASET/<object>/meshes/model.obj: render its input (oracle: the ground-truth "
        "orbit; generated: the input view), run the pipeline, score the final mesh, the NeRF mesh and the "
        "visual hull against the ground truth into DIR/<object>/metrics.json, then DIR/summary.{json,md,"
        "csv,png}. Finished objects are kept on a rerun; a failing object is recorded and the batch goes on "
        "(exit status 1 when any object failed; a rerun retries those).",
    )
    p.add_argument("dataset", help="GSO-layout folder: <object>/meshes/model.obj")
    p.add_argument("-o", "--output", required=True, help="evaluation directory")
    p.add_argument(
        "--mode", choices=("oracle", "generated"), default="oracle", help="oracle (default) or generated"
    )
    p.add_argument("--objects", help="file listing the objects to evaluate, one name a line (default: all)")
    p.add_argument("--checkpoint", help="SV3D checkpoint for generated mode (else $SV3D_CHECKPOINT)")
    p.add_argument("--sgm-config", help="sgm yaml of the checkpoint, for models with non-SV3D head widths")
    p.add_argument(
        "--preset",
        choices=("auto", "cpu", "gpu", "paper", "toy"),
        default="auto",
        help="sizes: auto (follow the device), cpu, gpu, paper, toy (plumbing only)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Hydra-style config override, repeatable (e.g. --set nerf.train.steps=300)",
    )
    p.add_argument("--device", help="auto (cuda if available), cpu or cuda[:N] (default: the preset's)")
    p.add_argument(
        "--force", action="store_true", help="redo finished objects (also those of another config)"
    )
    p.add_argument(
        "--rescore",
        action="store_true",
        help="score objects finished under an older scoring protocol again under the current one, keeping "
        "their meshes (a plain rerun refuses them); unfinished or new objects run the pipeline as usual",
    )
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from .config import compose_config, eval_config, run_config, to_container
    from .errors import InputError
    from .evaluate import evaluate_dataset

    try:
        cfg = compose_config([f"preset={args.preset}", f"eval.mode={args.mode}", *args.overrides])
    except Exception as exc:  # noqa: BLE001 - Hydra's override errors: a bad --set
        raise InputError(f"--set: {str(exc).splitlines()[0]}") from None
    if cfg.eval.dataset is not None:
        raise InputError("--set eval.dataset: the dataset is the command's first argument")
    for key, value in (
        ("device", args.device),
        ("sv3d.checkpoint", args.checkpoint),
        ("sv3d.sgm_config", args.sgm_config),
    ):
        if value:  # paths set after composing: no override-grammar quoting needed
            OmegaConf.update(cfg, key, value, force_add=True)
    start = time.perf_counter()
    result = evaluate_dataset(
        args.dataset,
        args.output,
        eval_config(cfg),
        run_config(cfg),
        objects=args.objects or to_container(cfg.eval.objects),  # --objects, or --set eval.objects=[...]
        force=args.force or bool(cfg.eval.force or cfg.force),  # the flags, or --set eval.force=true
        rescore=args.rescore or bool(cfg.eval.rescore),
    )
    s = result.summary
    print(
        f"evaluated {s['n_ok']} of {s['n_objects']} objects ({s['n_failed']} failed, "
        f"{s['n_flagged']} flagged) in {time.perf_counter() - start:.1f} s; "
        f"wrote {result.output_dir / 'summary.md'}"
    )
    failed = [r["object"] for r in s["objects"] if r.get("status") == "error"]
    if failed:  # the batch went on; its exit status still tells a script that it is incomplete
        print(
            f"sv3d eval: {len(failed)} object(s) failed: {', '.join(failed)} "
            f"(each: {result.output_dir / '<object>' / 'error.txt'})",
            file=sys.stderr,
        )
        return 1
    return 0


def _add_photo_options(p: argparse.ArgumentParser) -> None:
    """The photo's own settings, shared by `sv3d orbit` and `sv3d run`."""
    p.add_argument(
        "--input-elevation",
        type=float,
        default=10.0,
        help="elevation of the photo in degrees (default 10; results degrade far from it)",
    )
    p.add_argument(
        "--background",
        choices=("auto", "rembg", "plain"),
        default="auto",
        help="matting for photos without alpha: rembg if installed, else plain light backgrounds",
    )


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
    _add_run(sub)
    _add_demo(sub)
    _add_eval(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Sv3dError as exc:
        print(f"sv3d: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file or folder the command could not read or write (permissions, disk full)
        print(f"sv3d: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sv3d: interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130
    except (RuntimeError, MemoryError) as exc:
        if not out_of_memory(exc):
            raise
        detail = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
        print(f"sv3d: error: {OUT_OF_MEMORY_HINT} ({detail})", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
