"""`sv3d run`: one photo (or an existing orbit directory) -> textured mesh, end to end and resumable.

The whole data flow of ARCHITECTURE.md in one call: `orbit/` (SV3D, `sv3d.orbit.generate_orbit`) ->
`nerf/` (Instant-NGP field + coarse mesh, `sv3d.fit_nerf.fit_nerf`) -> a 3D-consistency check of the orbit ->
`refine/` (DMTet + texture, `sv3d.refine_stage.refine_stage`) -> `mesh.glb` + `turntable.mp4`, with
`run.json` recording the config, package versions, the checkpoint's hash, per-stage timings and memory, and
the consistency score (SV3D paper, Sec. 4: the coarse NeRF is fitted on the 21 generated frames; frames that
no single field reproduces are not 3D-consistent, and meshing them would hide that).

Runs follow ARCHITECTURE.md "Runs and interruption": every input is checked before anything is created;
each stage writes into its own subfolder, atomically; `run.json` (itself written atomically) lists the
finished stages, so a rerun with the same config skips them (the NeRF stage also resumes from its own
checkpoint); a rerun with a different config refuses unless `force`.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import math
import resource
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cameras import make_orbit, read_orbit_directory
from .device import pick_device
from .errors import OUT_OF_MEMORY_HINT, InputError, Sv3dError, out_of_memory
from .fit_nerf import (
    FitNerfConfig,
    _atomic,
    check_fit_config,
    check_sampler,
    default_fit_config,
    fit_nerf,
    orbit_fingerprint,
    render_views,
)
from .hashing import file_sha256
from .orbit import OrbitConfig, check_checkpoint, check_cpu_budget, generate_orbit, resolve_checkpoint
from .refine_stage import RefineStageConfig, check_refine_stage_config, default_refine_config, refine_stage
from .video import write_video

__all__ = [
    "DiskFullError",
    "InconsistentOrbitError",
    "OtherRunError",
    "RunConfig",
    "RunResult",
    "checkpoint_identity",
    "consistency_score",
    "render_turntable",
    "check_run_config",
    "run_from_orbit",
    "run_image_to_mesh",
    "stage_configs",
]

RUN_FILE = "run.json"
RUN_FORMAT = 1  # bump when run.json's layout changes
STAGES = ("orbit", "nerf", "consistency", "refine", "export")
# What each stage writes: a stage that runs again starts from none of them.
STAGE_FILES = {
    "orbit": ("orbit",),
    "nerf": ("nerf",),
    "consistency": (),
    "refine": ("refine",),
    "export": ("mesh.glb", "turntable.mp4"),
}
OWNED = (*(name for names in STAGE_FILES.values() for name in names), RUN_FILE)  # what --force may remove
# The entries of a run's identity (its source and config) that each stage's result depends on, beside
# what the stages before it made: a changed entry redoes that stage and the ones after it (--force). Any
# other entry (the source, seed, device, one this list does not know) redoes the whole run.
_STAGE_KEYS = {"nerf": ("nerf",), "consistency": ("consistency_resolution",), "refine": ("refine",)}
_TRASH = ".replaced-"  # prefix of a stage's files moved aside by --force before they are deleted
# A finished stage is skipped on a rerun only while these files are still there.
STAGE_OUTPUTS = {
    "orbit": ("orbit/transforms.json",),
    "nerf": ("nerf/field.safetensors", "nerf/mesh.ply", "nerf/fit_nerf.json"),
    "consistency": (),
    "refine": ("refine/mesh.glb",),
    "export": ("mesh.glb", "turntable.mp4"),
}
# Config entries that change how a run is shown or allowed, not what it computes: not compared on rerun.
_NOT_IDENTITY = (("orbit", "progress"), ("orbit", "offload"), ("orbit", "allow_cpu"), ("allow_inconsistent",))
_SOURCE_PATHS = ("image", "orbit_dir")  # where the input was read: recorded, not compared (`_compared`)
# The run's device as given: the stages' devices, resolved from it, are compared ("auto" = "cuda" on CUDA)
_NOT_IDENTITY += (("device",),)
# Settings of the last steps only: a change redoes the export (turntable) or re-judges the consistency score,
# not the whole run
_EXPORT_ONLY = ("turntable_frames", "turntable_resolution", "turntable_elevation_deg", "turntable_fps")
_NOT_IDENTITY += tuple((key,) for key in (*_EXPORT_ONLY, "consistency_threshold_db"))
_DISK_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class InconsistentOrbitError(Sv3dError):
    """The NeRF cannot reproduce the orbit's frames: the orbit is not 3D-consistent (run stopped)."""


class OtherRunError(InputError):
    """The output folder holds a run with another config or input (rerun with force to replace it)."""


class RunOutOfMemoryError(Sv3dError):
    """A stage ran out of (GPU) memory; run.json says which, finished stages are kept."""


class DiskFullError(Sv3dError):
    """A write failed for lack of disk space (or quota); the finished stages are kept."""


@dataclass
class RunConfig:
    orbit: OrbitConfig = field(default_factory=OrbitConfig)  # sv3d orbit settings (checkpoint etc.)
    nerf: FitNerfConfig | None = None  # None: default_fit_config(device)
    refine: RefineStageConfig | None = None  # None: default_refine_config(device)
    turntable_frames: int = 60  # 6 degrees a frame: smooth at turntable_fps
    turntable_resolution: int = 256  # enough to judge the texture; 576 costs 5x the rendering
    turntable_elevation_deg: float = 10.0  # SV3D's input elevation: the view the frames were made around
    turntable_fps: int = 20  # 60 frames -> a 3 s spin
    consistency_threshold_db: float = 20.0  # NeRF-vs-frames masked PSNR below this flags the run
    consistency_resolution: int = 64  # frames compared at this size: the score needs no detail, only speed
    allow_inconsistent: bool = False  # mesh a flagged orbit anyway (not part of the compared config)
    seed: int = 0  # seeds torch's and numpy's global generators before every stage
    device: str = "auto"  # auto: cuda when available; the stage configs left at "auto" follow it


@dataclass
class RunResult:
    output_dir: Path
    mesh_path: Path  # output_dir / "mesh.glb"; absent when a flagged run stopped before meshing
    summary: dict  # the content of run.json
    flagged: bool  # orbit judged not 3D-consistent


# ------------------------------------------------------------------------------------------------
# Public entry points
# ------------------------------------------------------------------------------------------------


def run_image_to_mesh(
    image: str | Path,
    output_dir: str | Path,
    config: RunConfig | None = None,
    force: bool = False,
    progress: bool = True,
) -> RunResult:
    """Photo -> `output_dir/{orbit,nerf,refine}/`, `mesh.glb`, `turntable.mp4`, `run.json`."""
    image = Path(image)
    # 1. Check inputs (nothing is created before all of them pass)
    if not image.exists():
        raise InputError(f"{image}: image not found")
    if not image.is_file():
        raise InputError(f"{image}: is a directory, expected an image file (PNG, JPEG, ...)")
    config = copy.deepcopy(config or RunConfig())
    conditioning = _check_image(image, config.orbit)
    checkpoint = resolve_checkpoint(config.orbit.checkpoint)
    unet_params = check_checkpoint(checkpoint, config.orbit)
    if pick_device(config.orbit.device if config.orbit.device != "auto" else config.device).type == "cpu":
        check_cpu_budget(unet_params, config.orbit)
    config.orbit.checkpoint = str(checkpoint.resolve())  # $SV3D_CHECKPOINT recorded as the path it named
    source = {
        "kind": "image",
        "image": str(image.resolve()),
        "image_sha256": file_sha256(image),
        # what the orbit stage is given: "auto" matting with rembg installed since, another preprocessing
        "conditioning_sha256": _tensors_sha256(*conditioning),
    }
    return _run(source, Path(output_dir), config, checkpoint, force, progress, conditioning)


def run_from_orbit(
    orbit_dir: str | Path,
    output_dir: str | Path,
    config: RunConfig | None = None,
    force: bool = False,
    progress: bool = True,
) -> RunResult:
    """Existing orbit directory (oracle renders, a user's own orbit) -> the same outputs, no orbit stage."""
    orbit_dir = Path(orbit_dir)
    # 1. Check inputs: the orbit directory is read and validated in full
    read_orbit_directory(orbit_dir)
    config = copy.deepcopy(config or RunConfig())
    source = {
        "kind": "orbit",
        "orbit_dir": str(orbit_dir.resolve()),
        "orbit_sha256": orbit_fingerprint(orbit_dir),
    }
    return _run(source, Path(output_dir), config, None, force, progress)


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def _run(
    source: dict,
    out: Path,
    config: RunConfig,
    checkpoint: Path | None,
    force: bool,
    progress: bool,
    conditioning: tuple[torch.Tensor, torch.Tensor] | None = None,  # the photo's preprocessing (image runs)
) -> RunResult:
    # 1. Check inputs (continued): the config, then the output folder against what it holds
    device = pick_device(config.device)
    _resolve_configs(config, device)
    _check_config(config, source["kind"])
    check_sampler(config.nerf, pick_device(config.nerf.device))  # before the orbit stage's minutes
    identity = {"source": source, "config": _identity(config)}
    # The weights first: a file replaced at the same path makes every stage stale, whatever else changed
    made = _read_record(out).get("checkpoint")
    made = made if isinstance(made, dict) else {}
    ckpt_info = checkpoint_identity(checkpoint, made) if checkpoint else None
    made_with = made.get("sha256")
    other_weights = bool(ckpt_info and made_with and made_with != ckpt_info["sha256"])
    if other_weights and not force:
        raise OtherRunError(
            f"{out}: its finished stages were made with another file at {ckpt_info['path']} (sha256 "
            f"{made_with[:12]}, now {ckpt_info['sha256'][:12]}); use --force to redo them, or another output"
        )
    previous, redo_from = _check_output(out, identity, force, source["kind"])
    if other_weights:
        previous, redo_from = None, None  # every stage again

    # 2. Start (or resume) the record; --force removes this run's own files, never anything else: those of
    # the stages that the changed settings touch (and the later ones), or all of them
    if redo_from is not None:
        # Moved aside first (instant), then the record, then deleted: cut short anywhere, the record never
        # calls a stage finished whose files are half gone
        redone = STAGES[STAGES.index(redo_from) :]
        names = [f for stage in redone for f in STAGE_FILES[stage] if f in _owned(source["kind"])]
        for name in names:
            _remove(out / f"{_TRASH}{name}")
            if (out / name).exists():
                (out / name).rename(out / f"{_TRASH}{name}")
        for stage in redone:
            previous["stages"].pop(stage, None)
        previous["finished_stages"] = [s for s in STAGES if previous["stages"].get(s, {}).get("finished")]
        previous["identity"] = identity
        _write_summary(out, {**previous, "status": f"redoing from stage {redo_from}"})
    elif force:
        if (out / RUN_FILE).is_file():  # first: an interrupted --force leaves a record of a run being cleared
            # (trusting no stage, still the folder of a run that a later --force may clear)
            clearing = {"format": RUN_FORMAT, "identity": None, "stages": {}, "finished_stages": []}
            _write_summary(out, {**clearing, "status": "cleared by --force (interrupted)"})
        for name in _owned(source["kind"]):
            if name != RUN_FILE:
                _remove(out / name)
        previous = None
    for name in _owned(source["kind"]):  # what a --force moved aside, and one cut short left
        _remove(out / f"{_TRASH}{name}")
    summary = previous or {
        "format": RUN_FORMAT,
        "source": source,
        "config": asdict(config),
        "identity": identity,
        "versions": _versions(),
        "checkpoint": ckpt_info,
        "seed": config.seed,
        "device": str(device),
        "stages": {},
        "finished_stages": [],
        "consistency": None,
        "flagged": False,
        "status": "running",
    }
    summary["checkpoint"] = ckpt_info
    current = asdict(config)
    if any((summary.get("config") or {}).get(key) != current[key] for key in _EXPORT_ONLY):
        summary["stages"].pop("export", None)  # another turntable: made again from the refined mesh
    summary["config"] = current
    summary["source"], summary["identity"] = source, identity  # the paths read this time (`_compared`)
    orbit_dir = out / "orbit" if source["kind"] == "image" else Path(source["orbit_dir"])
    summary["orbit_dir"] = str(orbit_dir)

    stages = {
        "orbit": lambda: generate_orbit(
            source["image"],
            out / "orbit",
            _with_progress(config.orbit, progress),
            overwrite=True,
            conditioning=conditioning,
        ),
        # fit_nerf resumes from nerf/checkpoint.pt; without one, an unfinished folder is started over
        "nerf": lambda: fit_nerf(
            orbit_dir,
            out / "nerf",
            config.nerf,
            force=not (out / "nerf/checkpoint.pt").is_file(),
            progress=progress,
        ),
        "consistency": lambda: _consistency_stage(summary, orbit_dir, out / "nerf", config, device),
        "refine": lambda: refine_stage(
            orbit_dir, out / "nerf", out / "refine", config.refine, True, progress
        ),
        "export": lambda: _export_stage(out, config, device),
    }
    names = [s for s in STAGES if s != "orbit" or source["kind"] == "image"]

    # 3. Run the unfinished stages in order, recording each one as it ends
    stage = None
    try:
        out.mkdir(parents=True, exist_ok=True)
        summary["status"] = "running"
        _write_summary(out, summary)
        redone = False  # a stage that runs again makes every later one stale (they were made from it)
        for stage in names:
            if not redone and _finished(out, summary, stage):
                if stage == "consistency":
                    _check_flag(summary, config)
                continue
            redone = True
            for later in names[names.index(stage) :]:
                summary["stages"].pop(later, None)
            summary["finished_stages"] = [s for s in names if summary["stages"].get(s, {}).get("finished")]
            _write_summary(out, summary)
            if progress:
                print(f"sv3d run: stage {stage}", file=sys.stderr)
            with _measure(device) as record:
                _seed(config.seed)
                stages[stage]()
            summary["stages"][stage] = {"finished": True, **record}
            summary["finished_stages"] = [s for s in names if summary["stages"].get(s, {}).get("finished")]
            _write_summary(out, summary)
            if stage == "consistency":
                _check_flag(summary, config)
        summary["status"] = "finished"
        _write_summary(out, summary)
    except KeyboardInterrupt:
        summary["status"] = f"interrupted in stage {stage}"
        _write_summary_quietly(out, summary)
        raise
    except InconsistentOrbitError:
        summary["status"] = "stopped: the orbit is not 3D-consistent (rerun with --allow-inconsistent)"
        _write_summary_quietly(out, summary)
        raise
    except Sv3dError as exc:
        summary["status"] = f"failed in stage {stage}: {exc}"
        _write_summary_quietly(out, summary)
        raise
    except OSError as exc:
        if exc.errno in _DISK_ERRNOS:
            summary["status"] = f"failed in stage {stage}: no space left on device"
            _write_summary_quietly(out, summary)
            raise DiskFullError(
                f"{out}: no space left on device while running stage {stage}; free some space and rerun "
                "the same command (finished stages are kept)"
            ) from None
        summary["status"] = f"failed in stage {stage}: {exc}"
        _write_summary_quietly(out, summary)
        raise
    except Exception as exc:  # a bug or the machine: the record says where, not "running"
        if out_of_memory(exc):
            summary["status"] = f"failed in stage {stage}: out of memory"
            _write_summary_quietly(out, summary)
            raise RunOutOfMemoryError(f"stage {stage}: {OUT_OF_MEMORY_HINT}") from None
        first_line = (str(exc).splitlines() or [""])[0]
        summary["status"] = f"failed in stage {stage}: {type(exc).__name__}: {first_line}"
        _write_summary_quietly(out, summary)
        raise
    return RunResult(out, out / "mesh.glb", summary, bool(summary["flagged"]))


def _with_progress(config: OrbitConfig, progress: bool) -> OrbitConfig:
    config = copy.deepcopy(config)
    config.progress = config.progress and progress
    return config


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _finished(out: Path, summary: dict, stage: str) -> bool:
    done = summary["stages"].get(stage, {}).get("finished", False)
    return done and all((out / name).exists() for name in STAGE_OUTPUTS[stage])


def _check_flag(summary: dict, config: RunConfig) -> None:
    """Warn about a flagged orbit; stop the run unless the user allowed it."""
    score = summary["consistency"]
    # judged against this run's threshold (a rerun may change it without redoing the score)
    score["threshold_db"] = config.consistency_threshold_db
    summary["flagged"] = bool(score["masked_psnr_db"] < config.consistency_threshold_db)
    if not summary["flagged"]:
        return
    warning = (
        f"the NeRF reproduces the orbit's frames at {score['masked_psnr_db']:.1f} dB masked PSNR, below the "
        f"{config.consistency_threshold_db:g} dB threshold: the orbit is not 3D-consistent"
    )
    if config.allow_inconsistent:
        print(f"sv3d run: warning: {warning}; meshing it anyway (--allow-inconsistent)", file=sys.stderr)
        return
    raise InconsistentOrbitError(
        f"{warning}, so it was not meshed; rerun the same command with --allow-inconsistent to mesh it anyway"
    )


# ------------------------------------------------------------------------------------------------
# Stages of run.py's own
# ------------------------------------------------------------------------------------------------


def _consistency_stage(summary: dict, orbit_dir: Path, nerf_dir: Path, config: RunConfig, device) -> None:
    score = consistency_score(orbit_dir, nerf_dir, config.nerf, config.consistency_resolution, device)
    score["threshold_db"] = config.consistency_threshold_db
    summary["consistency"] = score
    summary["flagged"] = bool(score["masked_psnr_db"] < config.consistency_threshold_db)


@torch.no_grad()
def consistency_score(
    orbit_dir: str | Path,
    nerf_dir: str | Path,
    fit_config: FitNerfConfig,
    resolution: int = 64,
    device: torch.device | str = "cpu",
) -> dict:
    """How well the fitted field reproduces the frames it was fitted on: masked PSNR over object pixels.

    The field (`nerf_dir/field.safetensors`) is rendered on every view of the orbit at `resolution`, over
    white and inside the same visual-hull occupancy as in training, and compared with the frames over white
    where their alpha > 0.5. Returns {"masked_psnr_db": pooled over all views, "per_view_db": [V], ...}.
    """
    from safetensors.torch import load_file

    from nerf.field import RadianceField
    from nerf.occupancy import OccupancyGrid
    from nerf.train import frames_over_white

    from .evaluation.visual_hull import carve_occupancy

    frames = read_orbit_directory(orbit_dir)
    path = Path(nerf_dir) / "field.safetensors"
    model = RadianceField(fit_config.train.field)
    try:
        model.load_state_dict(load_file(str(path)))
    except (OSError, RuntimeError) as exc:
        raise InputError(f"{path}: cannot load the fitted field: {str(exc).splitlines()[0]}") from None
    model = model.to(device).eval()
    bound = fit_config.train.field.bound
    hull = carve_occupancy(frames.masks(), frames.orbit.cameras(), fit_config.hull_resolution, bound)
    occupancy = OccupancyGrid(hull, bound, fit_config.hull_dilate).to(device)
    size = min(resolution, frames.images.shape[1])
    renders = torch.from_numpy(
        render_views(
            model,
            frames.orbit.c2w(),
            frames.orbit.fov_deg,
            size,
            fit_config.train,
            occupancy=occupancy,
        )
    )  # [V, s, s, 3] over white
    target, alpha = frames_over_white(frames.images, size)  # [V, s, s, 3] over white, [V, s, s, 1]
    mask = alpha[..., 0] > 0.5  # [V, s, s] object pixels
    err = (renders - target).pow(2).mean(-1)  # [V, s, s]
    per_view = [_psnr(err[v][mask[v]]) for v in range(err.shape[0])]  # 21 views, not pixels
    return {
        "masked_psnr_db": _psnr(err[mask]),
        "per_view_db": per_view,
        "worst_view": int(np.argmin(per_view)),
        "resolution": size,
        "object_pixels": int(mask.sum()),
    }


def _psnr(squared_errors: torch.Tensor) -> float:
    if squared_errors.numel() == 0:
        return float("nan")
    return float(-10.0 * torch.log10(squared_errors.mean().clamp(min=1e-10)))


def _export_stage(out: Path, config: RunConfig, device: torch.device) -> None:
    _atomic(out / "mesh.glb", lambda p: shutil.copyfile(out / "refine/mesh.glb", p))
    render_turntable(
        out / "mesh.glb",
        out / "turntable.mp4",
        config.turntable_frames,
        config.turntable_resolution,
        config.turntable_elevation_deg,
        config.turntable_fps,
        device,
    )


@torch.no_grad()
def render_turntable(
    mesh_path: str | Path,
    video_path: str | Path,
    frames: int = 60,
    resolution: int = 256,
    elevation_deg: float = 10.0,
    fps: int = 20,
    device: torch.device | str = "cpu",
    views_per_batch: int = 8,  # bounds peak memory of the rasterizer's buffers
) -> Path:
    """The textured mesh spun 360 deg about z at `elevation_deg`, unlit (lighting is baked), as an mp4."""
    from refine.render import render_mesh

    from .meshio import load_mesh

    mesh = load_mesh(mesh_path, place=False).to(device)  # the file's world frame, as refined
    cameras = make_orbit("static", elevation_deg, 0.0, num_frames=frames).cameras()
    images = []
    for start in range(0, frames, views_per_batch):
        batch = cameras[start : start + views_per_batch]
        images.append(render_mesh(mesh, batch, resolution, shading="unlit").image.clamp(0, 1).cpu())
    return write_video(video_path, torch.cat(images).numpy(), fps=fps)  # [T, H, W, 3]


# ------------------------------------------------------------------------------------------------
# Checks, identity, records
# ------------------------------------------------------------------------------------------------


def _check_image(image: Path, orbit: OrbitConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The photo is preprocessed here, so that an unusable one fails before anything exists; the orbit
    stage takes the result (image [1, 3, S, S], alpha [S, S]) instead of preprocessing it again."""
    from .preprocess import preprocess_image

    return preprocess_image(image, size=max(orbit.resolution, 64), background=orbit.background)


def stage_configs(
    device: torch.device,
    nerf_steps: int | None = None,
    nerf_grid: int | None = None,
    refine_steps: int | None = None,
    tet_resolution: int | None = None,
    texture_size: int | None = None,
) -> tuple[FitNerfConfig, RefineStageConfig]:
    """The device's NeRF and DMTet stage defaults with the given sizes changed (None keeps a default);
    what `sv3d run`'s options and the demo's sizes set."""
    nerf, refine = default_fit_config(device), default_refine_config(device)
    if nerf_steps is not None:
        nerf.train.steps = nerf_steps
    if nerf_grid is not None:
        nerf.extract.resolution = nerf_grid
    if refine_steps is not None:
        refine.refine.steps = refine_steps
    if tet_resolution is not None:
        refine.refine.tet.resolution = tet_resolution
    if texture_size is not None:
        refine.bake.texture_size = texture_size
    return nerf, refine


def resolve_devices(config: RunConfig, device: torch.device) -> None:
    """The stage configs left at device "auto" follow the run's device."""
    for stage in (config.orbit, config.nerf, config.refine):
        if stage is not None and stage.device == "auto":
            stage.device = str(device)


def _resolve_configs(config: RunConfig, device: torch.device) -> None:
    """Fill the device defaults; stage configs left at device "auto" follow the run's device."""
    if config.nerf is None:
        config.nerf = default_fit_config(device)
    if config.refine is None:
        config.refine = default_refine_config(device)
    resolve_devices(config, device)
    orbit_ckpt = config.orbit.checkpoint
    same = config.refine.checkpoint is None or (
        orbit_ckpt is not None
        and Path(config.refine.checkpoint).expanduser().resolve() == Path(orbit_ckpt).expanduser().resolve()
    )
    if orbit_ckpt is not None and same:
        # SDS (on by default on CUDA) guides with the model that generated the orbit: with its sgm yaml and
        # dtype (the Hydra configs name the checkpoint for both stages already)
        config.refine.checkpoint = orbit_ckpt
        config.refine.sgm_config = config.refine.sgm_config or config.orbit.sgm_config
        if config.refine.dtype == "auto":
            config.refine.dtype = config.orbit.dtype  # one --dtype for both uses of the model


def check_run_config(config: RunConfig, kind: str = "orbit") -> None:
    """A one-line InputError for the settings a run of `kind` ("image" or "orbit") cannot use, checked on a
    copy with the device's defaults filled in, before anything is made (the demo checks its run with it)."""
    config = copy.deepcopy(config)
    _resolve_configs(config, pick_device(config.device))
    _check_config(config, kind)


def _check_config(config: RunConfig, kind: str) -> None:
    o = config.orbit
    if kind == "image":
        if o.resolution < 64 or o.resolution % 8:
            raise InputError(f"--resolution must be a multiple of 8 and >= 64, got {o.resolution}")
        if o.steps < 1:
            raise InputError(f"--steps must be >= 1, got {o.steps}")
        if o.orbit not in (None, "static", "sine"):
            raise InputError(f"--orbit must be static or sine, got {o.orbit!r}")
        from .orbit import _dtype

        _dtype(o.dtype, torch.device("cpu"))  # the name only: checked again on the real device
        # (the sgm yaml is checked with the checkpoint: orbit.check_checkpoint)
    if config.nerf.train.steps < 1:
        raise InputError(f"--nerf-steps must be >= 1, got {config.nerf.train.steps}")
    if config.refine.refine.steps < 1:
        raise InputError(f"--refine-steps must be >= 1, got {config.refine.refine.steps}")
    check_fit_config(config.nerf)
    check_refine_stage_config(config.refine)
    if config.turntable_frames < 1:
        raise InputError(f"turntable_frames must be >= 1, got {config.turntable_frames}")
    if not 16 <= config.turntable_resolution <= 4096:
        raise InputError(f"turntable_resolution must be in [16, 4096], got {config.turntable_resolution}")
    if not math.isfinite(config.consistency_threshold_db):
        raise InputError(f"consistency_threshold_db must be finite, got {config.consistency_threshold_db}")
    if config.consistency_resolution < 8:
        raise InputError(f"consistency_resolution must be >= 8, got {config.consistency_resolution}")


def _identity(config: RunConfig) -> dict:
    """The config as compared on a rerun: JSON-normalised, without display-only entries."""
    return _without_display_entries(json.loads(json.dumps(asdict(config), default=str)))


def _without_display_entries(data: dict) -> dict:
    """`data` (a config as JSON) without the _NOT_IDENTITY entries (also those an older run recorded)."""
    return without_entries(data, _NOT_IDENTITY)


def without_entries(data: dict, entries: tuple[tuple[str, ...], ...]) -> dict:
    """A copy of `data` (a config as JSON) without the entries at the key paths `entries`."""
    data = copy.deepcopy(data)
    for keys in entries:
        node = data
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(keys[-1], None)
    return data


def _tensors_sha256(*tensors: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(str(tuple(tensor.shape)).encode() + tensor.detach().cpu().float().numpy().tobytes())
    return digest.hexdigest()


def _compared(recorded: Any, identity: dict) -> tuple[Any, dict]:
    """A recorded run identity and this run's as compared: sources by content, not by path (a moved or
    renamed photo or orbit folder, an evaluation folder moved whole, is the same run; the path stays in
    run.json); a record without the conditioning's hash (before 2026-12-08) is compared without it."""
    if not isinstance(recorded, dict) or not isinstance(recorded.get("source"), dict):
        return recorded, identity
    old = {k: v for k, v in recorded["source"].items() if k not in _SOURCE_PATHS}
    new = {k: v for k, v in identity["source"].items() if k not in _SOURCE_PATHS}
    if "conditioning_sha256" not in old:
        new.pop("conditioning_sha256", None)
    return {**recorded, "source": old}, {**identity, "source": new}


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.')} {json.dumps(a)} -> {json.dumps(b)}"


def _owned(kind: str) -> list[str]:
    """What --force may remove in a run's folder: an orbit run's orbit is the user's input."""
    return [name for name in OWNED if kind == "image" or name != "orbit"]


def _first_stage_changed(recorded: dict, identity: dict) -> str:
    """The earliest stage whose inputs differ between a recorded run's identity and this one's."""
    old, new = recorded.get("config") or {}, identity["config"]
    changed = {key for key in set(old) | set(new) if old.get(key) != new.get(key)}
    old_source, new_source = (i["source"] for i in _compared(recorded, identity))
    if old_source != new_source or any(
        not any(key in keys for keys in _STAGE_KEYS.values()) for key in changed
    ):
        return STAGES[0]
    return next((stage for stage in STAGES if changed & set(_STAGE_KEYS.get(stage, ()))), STAGES[0])


def _check_output(
    out: Path, identity: dict, force: bool, kind: str = "image"
) -> tuple[dict | None, str | None]:
    """(the previous run.json when `out` holds this run or one whose later stages --force redoes, the stage
    to redo from in that case); an error when `out` holds something else."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return None, None
    record = out / RUN_FILE
    if not record.is_file():
        # --force removes a run's own folders (OWNED): never same-named ones of a folder no run made
        theirs = [name for name in _owned(kind) if (out / name).exists()]
        if force and not theirs:
            return None, None
        held = f" (it holds {', '.join(theirs)}, which --force would delete)" if theirs else ""
        raise InputError(
            f"{out}: output directory is not empty and holds no sv3d run{held}: use an empty or new directory"
        )
    try:
        previous = json.loads(record.read_text())
        recorded = previous.get("identity")
        if isinstance(recorded, dict) and isinstance(recorded.get("config"), dict):
            recorded = {**recorded, "config": _without_display_entries(recorded["config"])}
        old, new = _compared(recorded, identity)
        same = old == new and previous.get("format") == RUN_FORMAT
        comparable = (
            isinstance(recorded, dict)
            and previous.get("format") == RUN_FORMAT
            and isinstance(previous.get("stages"), dict)
        )
        redo_from = None if same else _first_stage_changed(recorded, identity) if comparable else STAGES[0]
    except (OSError, ValueError, AttributeError, TypeError):
        if force:
            return None, None
        raise InputError(f"{record}: unreadable run record (use --force to start over)") from None
    if same:
        return (None, None) if force else (previous, None)
    kept = [  # the stages before the change that are finished (their files there): what --force keeps
        s
        for s in STAGES[: STAGES.index(redo_from)]
        if (kind == "image" or s != "orbit") and _finished(out, previous, s)
    ]
    if force:
        return (previous, redo_from) if kept else (None, None)
    change = _first_difference(*_compared(recorded or {}, identity))
    todo = (
        f"--force to redo the {redo_from} stage and after (keeping {', '.join(kept)})"
        if kept
        else ("--force to start over")
    )
    raise OtherRunError(f"{out}: holds another run (different {change}); use another -o, or {todo}")


def _read_record(out: Path) -> dict:
    """The run.json in `out` as a dict, or {} (none, unreadable: `_check_output` says what is wrong)."""
    try:
        record = json.loads((out / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _write_summary(out: Path, summary: dict) -> None:
    _atomic(out / RUN_FILE, lambda p: p.write_text(json.dumps(summary, indent=1, default=str)))


def _write_summary_quietly(out: Path, summary: dict) -> None:
    """Record why the run stopped, if the disk allows; the previous run.json stays intact otherwise."""
    try:
        if out.is_dir():
            _write_summary(out, summary)
    except OSError:
        pass


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    found: dict[str, str | None] = {}
    for name in ("torch", "diffusers", "transformers", "nerfacc", "numpy"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    found["sv3d"] = __version__
    found["python"] = sys.version.split()[0]
    return found


# A diffusers folder's identity until 2026-12-08, still accepted while the folder matches it
_SIZES_ONLY = "directory: sha256 of its json configs and every file's path and size (weights unread)"
_HASHED: dict[
    tuple[str, int, int], str
] = {}  # (path, size, mtime_ns) -> sha256: each file read once a process


def _file_digest(path: Path) -> str:
    """sha256 of a file, remembered for the process while its size and mtime stay (an evaluation in generated
    mode runs one checkpoint for every object: hashed once, not once an object)."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHED:
        _HASHED[key] = file_sha256(path)
    return _HASHED[key]


def _sizes_only_digest(path: Path, files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(path).as_posix()}\0{file.stat().st_size}\0".encode())
        if file.suffix == ".json":
            digest.update(file.read_bytes())
    return digest.hexdigest()


def checkpoint_identity(path: Path, previous: dict | None = None) -> dict:
    """{"path", "sha256", "method", ...} of a checkpoint: the sha256 of its bytes (a single file) or of every
    file's relative path and bytes (a diffusers folder). `previous` (a record's) is reused while the
    files' sizes and mtimes match it; a folder recorded by sizes only (until 2026-12-08) keeps that record
    while its sizes and configs match."""
    path = Path(path).resolve()
    previous = previous if isinstance(previous, dict) else {}
    if path.is_dir():
        every = sorted(p for p in path.rglob("*") if p.is_file())  # as the sizes-only records hashed them
        # hidden files (huggingface-cli's .cache/ metadata, touched on every check) are not the model
        files = [p for p in every if not any(x.startswith(".") for x in p.relative_to(path).parts)]
        listing = [[f.relative_to(path).as_posix(), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
        same_files = previous.get("path") == str(path) and previous.get("files") == listing
        if previous.get("sha256") and same_files:
            return previous
        if previous.get("method") == _SIZES_ONLY and previous.get("sha256") == _sizes_only_digest(
            path, every
        ):
            return previous
        digest = hashlib.sha256()
        for file, (rel, _, _) in zip(files, listing, strict=True):
            digest.update(rel.encode() + b"\0" + bytes.fromhex(_file_digest(file)))
        return {
            "path": str(path),
            "files": listing,
            "sha256": digest.hexdigest(),
            "method": "directory: sha256 of every file's path and bytes",
        }
    stat = path.stat()
    key = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if all(previous.get(k) == v for k, v in key.items()) and previous.get("sha256"):
        return previous
    return {**key, "sha256": _file_digest(path), "method": "file: sha256 of its bytes"}


@contextmanager
def _measure(device: torch.device):
    """Wall time and memory of a stage: process peak RSS (ru_maxrss) and its growth; CUDA peak allocation."""
    scale = 1.0 if sys.platform == "darwin" else 1024.0  # ru_maxrss: bytes on macOS, KiB on Linux
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    record: dict[str, float] = {}
    start = time.perf_counter()
    yield record
    record["seconds"] = round(time.perf_counter() - start, 3)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    record["peak_rss_mb"] = round(peak / 2**20, 1)
    record["rss_peak_growth_mb"] = round((peak - before) / 2**20, 1)
    if device.type == "cuda":
        record["cuda_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - trimesh.sample (init SDF) draws from the global RNG
