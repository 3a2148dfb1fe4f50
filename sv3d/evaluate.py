"""`sv3d eval`: the whole pipeline over a GSO-layout dataset, scored with the evaluation protocol.

Follows ARCHITECTURE.md, "Evaluation protocol" (SV3D paper, Sec. 5.3 reports Chamfer distance and 3D IoU on
50 GSO objects, in a `generated` and an oracle-like setting; the protocol itself is ours, stated there).
For each object `<dataset>/<object>/meshes/model.obj`, in `<output>/<object>/`:

- `oracle` mode: its ground-truth orbit is rendered (`gt_orbit/`, `sv3d.render_orbit`) and fed to the 3D
  stages (`sv3d.run.run_from_orbit`); `generated` mode: the input view (the orbit's last frame: elevation
  10°, azimuth 0° by default) is rendered as `input.png` and the full pipeline runs from it
  (`sv3d.run.run_image_to_mesh`), so generation and reconstruction errors are told apart;
- the final mesh, the NeRF stage's coarse mesh and the visual hull carved from the same 21 masks (the
  generated orbit's in generated mode) are each scored against the ground truth (`evaluate_mesh`);
- `metrics.json` (atomic) holds the three sets of metrics, the timings, the 3D-consistency flag (a flagged
  object is meshed and scored anyway, with its flag) and the config's fingerprint.

Then `summary.json`, `summary.md`, `summary.csv` (one row per object, mean and median rows, the hull beside
every figure) and `summary.png` (bar charts, drawn with PIL). Runs follow "Runs and interruption": inputs
are checked before anything is created; an object whose `metrics.json` matches the config is not
recomputed, so a killed batch rerun finishes the rest and writes the same summary as an uninterrupted run;
an object that fails is recorded with its error (`<object>/error.txt`) and the batch goes on. An object
records the fingerprint it was started with and its ground truth's sha256 (`started.json`), so that a rerun
with another config or another dataset's object of the same name refuses its half-done objects up front, as
it does its finished ones, instead of failing each in turn or keeping figures of another object.
`aggregate_sweep` gathers the summaries of a Hydra multirun into one table with the overrides as columns.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import trimesh

from .errors import InputError
from .evaluation.metrics import DEFAULT_THRESHOLDS, MODES
from .fit_nerf import _atomic
from .render_orbit import RenderOrbitConfig

if TYPE_CHECKING:
    from .refine_stage import RefineStageConfig
    from .run import RunConfig

__all__ = [
    "EvalConfig",
    "EvalSummary",
    "aggregate_sweep",
    "evaluate_dataset",
    "evaluate_object",
    "list_objects",
    "read_object_list",
    "summarize",
    "write_summary",
]

METRICS_FILE = "metrics.json"
ERROR_FILE = "error.txt"
CHECKPOINTS_FILE = "checkpoints.json"  # the weights' sha256 by role, reused while size and mtime match
RENDER_FILE = "render.json"  # the render config of gt_orbit/ or input.png, to know when to redo them
STARTED_FILE = "started.json"  # the config fingerprint an object was started with (finished or not)
SUMMARY_FORMAT = 1  # bump when summary.json's layout changes
# Bump when the scoring changes, so that records scored the old way are not mixed with new ones: 2 since
# 2026-12-07 (generated predictions turned back by the input azimuth, volume IoU of inward-wound meshes and
# on a grid clipped around the ground truth, the largest component always kept); 3 since 2026-12-07 (volume
# IoU counts the prediction beyond that grid, visibility views framed on the body without far specks,
# components joined across non-manifold edges, the visual hull with all its components); 4 since
# 2026-12-07 (the volume-IoU grid has 64 cells along each side of its box, not cubes of its largest side,
# so a thin union of prediction and ground truth is resolved across its thickness).
# Scoring only: `sv3d eval --rescore` keeps the meshes of records with an older version, so a change to the
# renders or the pipeline's inputs must change the config's fingerprint instead.
PROTOCOL_VERSION = 4
SOURCES = ("final", "nerf", "hull")  # the refined mesh, the NeRF stage's mesh, the visual-hull baseline
OLDER_PROTOCOL = "an older scoring protocol"  # why a record is refused that --rescore would score again


@dataclass
class EvalConfig:
    mode: str = "oracle"  # "oracle": ground-truth renders feed the 3D stages; "generated": the full pipeline
    n_points: int = 100_000  # visible-surface samples per mesh: Chamfer noise well under 1e-3 side units
    seed: int = 0  # the same samples for every run, so figures are comparable across runs
    fscore_thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS  # in units of the GT's largest side
    iou_resolution: int = 64  # volume-IoU grid cells along each side of its box (the protocol's 64³)
    hull_resolution: int = 128  # visual-hull voxels per side: finer than the 21 masks can carve anyway
    icp: bool = False  # also report metrics after a rigid ICP (generated mode), as `*_icp`
    n_views: int = 64  # directions of the visible-surface test (`sample_visible_surface`)
    view_resolution: int = 512  # its depth-map size: a pixel ~ 0.2% of the object's diameter
    # Ground-truth orbit (oracle) and input view (generated): SV3D's 21 frames at 576², elevation 10°
    render: RenderOrbitConfig = field(default_factory=RenderOrbitConfig)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.n_points < 1:
            raise InputError(f"eval.n_points must be >= 1, got {self.n_points}")
        if not self.fscore_thresholds or any(not t > 0 for t in self.fscore_thresholds):
            raise InputError(f"eval.fscore_thresholds must be positive, got {list(self.fscore_thresholds)}")
        for name in ("iou_resolution", "hull_resolution", "n_views"):
            if getattr(self, name) < 2:
                raise InputError(f"eval.{name} must be >= 2, got {getattr(self, name)}")
        if self.view_resolution < 16:
            raise InputError(f"eval.view_resolution must be >= 16, got {self.view_resolution}")
        self.render.validate()


@dataclass
class EvalSummary:
    output_dir: Path
    summary: dict  # the content of summary.json
    records: list[dict]  # one per object: its metrics.json content, or {"object", "status": "error", ...}


# ------------------------------------------------------------------------------------------------
# Dataset and object list
# ------------------------------------------------------------------------------------------------


def list_objects(dataset: str | Path) -> list[str]:
    """Sorted names of the objects of a GSO-layout folder (`<dataset>/<object>/meshes/model.obj`)."""
    root = Path(dataset)
    if not root.exists():
        raise InputError(f"{root}: dataset not found")
    if not root.is_dir():
        raise InputError(f"{root}: the dataset must be a folder of <object>/meshes/model.obj")
    names = sorted(p.name for p in root.iterdir() if (p / "meshes" / "model.obj").is_file())
    if not names:
        raise InputError(f"{root}: no objects in the dataset (expected <object>/meshes/model.obj)")
    return names


def read_object_list(path: str | Path) -> list[str]:
    """Object names from a file, one a line; blank lines and `#` comments are skipped."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: object list not found")
    names = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    names = [n for n in names if n]
    if not names:
        raise InputError(f"{path}: the object list is empty")
    return names


def _select_objects(dataset: Path, objects: str | Path | Sequence[str] | None) -> list[str]:
    available = list_objects(dataset)
    if objects is None:
        return available
    names = read_object_list(objects) if isinstance(objects, (str, Path)) else [str(o) for o in objects]
    if not names:
        raise InputError("the object list is empty")
    missing = [n for n in names if n not in available]
    if missing:
        raise InputError(
            f"{dataset}: unknown object {missing[0]!r} in the list ({len(missing)} unknown in all)"
        )
    return list(dict.fromkeys(names))  # the list's order, each object once


# ------------------------------------------------------------------------------------------------
# Config identity
# ------------------------------------------------------------------------------------------------


def _resolved_run_config(run_config: RunConfig | None, mode: str) -> RunConfig:
    """The pipeline config as it will run: device defaults filled, flagged orbits meshed anyway (the
    evaluation records their metrics with the flag), the checkpoint resolved in generated mode."""
    from .device import pick_device
    from .fit_nerf import default_fit_config
    from .orbit import resolve_checkpoint
    from .refine_stage import default_refine_config
    from .run import RunConfig

    config = copy.deepcopy(run_config or RunConfig())
    device = pick_device(config.device)
    config.nerf = config.nerf or default_fit_config(device)
    config.refine = config.refine or default_refine_config(device)
    config.allow_inconsistent = True
    if mode == "generated":
        config.orbit.checkpoint = str(resolve_checkpoint(config.orbit.checkpoint).resolve())
    return config


def _check_run_config(run_config: RunConfig, mode: str) -> None:
    """The pipeline's own checks of its config (and of its checkpoints: the orbit's, generated, and the SDS
    guidance's where it runs), once for the batch: a bad setting fails before any object is rendered, not
    in every object in turn (a missing SDS checkpoint failed each object after its NeRF fit)."""
    from .device import pick_device
    from .orbit import check_checkpoint, resolve_checkpoint
    from .refine_stage import sds_wanted
    from .run import _check_config

    _check_config(run_config, "image" if mode == "generated" else "orbit")
    if mode == "generated":
        check_checkpoint(Path(run_config.orbit.checkpoint), run_config.orbit)
    refine = _resolved_refine(run_config)
    if sds_wanted(refine, pick_device(refine.device), rendered=mode == "oracle"):  # as the refine stage
        check_checkpoint(resolve_checkpoint(refine.checkpoint))


def _resolved_refine(run_config: RunConfig) -> RefineStageConfig:
    """The refine stage's config as the run resolves it (device defaults; the orbit's checkpoint for SDS)."""
    from .device import pick_device
    from .run import _resolve_configs

    resolved = copy.deepcopy(run_config)
    _resolve_configs(resolved, pick_device(resolved.device))
    return resolved.refine


# Settings that change memory use or where the work runs, not the figures: outside the fingerprint (scheme
# 2), so that a batch stopped by an out-of-memory error resumes after --offload or fewer views per batch.
# Devices enter resolved ("auto" on a CUDA machine is "cuda"). Scheme 1 (until 2026-12-08) hashed them
# as given; its fingerprints are still accepted (`accepted_fingerprints`).
_MEMORY_ONLY_RUN = (
    ("orbit", "offload"),
    ("orbit", "allow_cpu"),
    ("orbit", "progress"),
    ("device",),
    ("allow_inconsistent",),  # always on in an evaluation
)
FINGERPRINT_SCHEME = 2


def _render_identity(render: RenderOrbitConfig) -> dict:
    """The ground-truth render settings that change the frames: the device resolved, views_per_batch
    left out (it changes them by float round-off only: at most 6.1e-5 at 576², measured; a test bounds it;
    frames rendered before are kept when it changes)."""
    import torch

    from .device import pick_device

    data = asdict(render)
    data.pop("views_per_batch")
    # "auto" resolved here; a named device read as given (a record made on a CUDA machine, read on one
    # without: "cuda", another device than this machine's, not an error)
    data["device"] = (pick_device("auto") if render.device == "auto" else torch.device(render.device)).type
    return data


def _as_json(data: Any) -> Any:
    return json.loads(json.dumps(data, default=str))


def _identity(config: EvalConfig, run_config: RunConfig, scheme: int) -> dict:
    """What the fingerprint hashes, less the protocol and the weights."""
    if scheme == 1:
        run = _as_json(asdict(run_config))
        run.pop("allow_inconsistent", None)
        run.get("orbit", {}).pop("progress", None)
        data = {"eval": asdict(config), "run": run}
    else:
        from .device import pick_device
        from .run import _resolve_configs, without_entries

        # As the run resolves it: devices, and the SDS model's dtype and sgm yaml taken from the orbit's
        # settings (which oracle mode leaves out below); not the orbit's checkpoint path, which the
        # weights' hashes stand for where SDS runs
        resolved = copy.deepcopy(run_config)
        _resolve_configs(resolved, pick_device(resolved.device))
        resolved.refine.checkpoint = run_config.refine.checkpoint if run_config.refine else None
        run = without_entries(_as_json(asdict(resolved)), _MEMORY_ONLY_RUN)
        data = {"eval": {**asdict(config), "render": _render_identity(config.render)}, "run": run}
        data["scheme"] = scheme
    if config.mode == "oracle":
        data["run"].pop("orbit", None)
    return data


def _digest(identity: dict, checkpoints: dict[str, dict] | None, protocol: int) -> str:
    data = {**identity, "protocol": protocol}
    if checkpoints:
        data["weights"] = {role: c["sha256"] for role, c in checkpoints.items()}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def config_fingerprint(
    config: EvalConfig,
    run_config: RunConfig,
    checkpoints: dict[str, dict] | None = None,
    protocol: int = PROTOCOL_VERSION,
    scheme: int = FINGERPRINT_SCHEME,
) -> str:
    """sha256 of what determines an object's figures: the protocol, the renders, the pipeline config (in
    oracle mode without the orbit stage's settings, which it does not use) and the weights' contents
    (`checkpoints`, from `checkpoint_hashes`: a file replaced at the same path is another model).
    `protocol`: an older scoring protocol's version, to know a record that only the scoring differs from;
    `scheme` 1: the fingerprint as computed until 2026-12-08 (memory-only settings included)."""
    return _digest(_identity(config, run_config, scheme), checkpoints, protocol)


# The views per batch of the ground-truth renders in configs/ (sv3d default, cpu preset, the others):
# scheme-1 fingerprints are tried with each
_CONFIGURED_VIEWS_PER_BATCH = (4, 7, 21)


def _with_memory_settings(node: Any, settings: dict[str, Any], devices: str) -> Any:
    """A scheme-1 identity with the memory-only `settings` ({"offload": False, ...}) replaced wherever they
    occur, and its devices `devices`: "given"; "auto" (every one that picks what "auto" picks written
    "auto"); "resolved" (every "auto" written as the device it picks, e.g. "cpu")."""
    from .device import pick_device

    if isinstance(node, list):
        return [_with_memory_settings(item, settings, devices) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _with_memory_settings(value, settings, devices) for key, value in node.items()}
    node.update({key: value for key, value in settings.items() if key in node})
    device = node.get("device")
    if isinstance(device, str) and devices == "auto" and pick_device(device) == pick_device("auto"):
        node["device"] = "auto"
    elif device == "auto" and devices == "resolved":
        node["device"] = pick_device("auto").type
    return node


def accepted_fingerprints(
    config: EvalConfig, run_config: RunConfig, checkpoints: dict[str, dict] | None, protocol: int
) -> set[str]:
    """The fingerprints a record of this config under `protocol` may carry: the current scheme's, and scheme
    1's with the memory-only settings as given or as configs/ sets them, devices as given, "auto" or
    resolved (a folder started before 2026-12-08 whose batch ran out of memory resumes after --offload,
    fewer views per batch, or the device auto picks named or unnamed)."""
    old = _identity(config, run_config, scheme=1)
    variants = [
        _with_memory_settings(old, {**switches, **views}, devices)
        for switches in ({}, {"offload": False, "allow_cpu": False})
        for views in ({}, *({"views_per_batch": n} for n in _CONFIGURED_VIEWS_PER_BATCH))
        for devices in ("given", "auto", "resolved")
    ]
    return {config_fingerprint(config, run_config, checkpoints, protocol)} | {
        _digest(identity, checkpoints, protocol) for identity in variants
    }


def checkpoint_hashes(run_config: RunConfig, mode: str, cached: dict | None = None) -> dict[str, dict]:
    """{role: checkpoint_identity} of the SV3D weights the figures depend on: the orbit's (generated mode)
    and the SDS guidance's (unless SDS is off). `cached` (a previous result) spares rehashing a file whose
    size and mtime are unchanged."""
    from .device import pick_device
    from .refine_stage import sds_wanted
    from .run import checkpoint_identity

    cached = cached if isinstance(cached, dict) else {}
    paths: dict[str, Path] = {}
    if mode == "generated" and run_config.orbit.checkpoint:
        paths["orbit"] = Path(run_config.orbit.checkpoint).expanduser().resolve()
    # SDS as the run resolves it: the refinement's checkpoint (the orbit's when it names none), or
    # $SV3D_CHECKPOINT with --sds on (resolve_checkpoint)
    refine = _resolved_refine(run_config)
    sds = refine.checkpoint or (os.environ.get("SV3D_CHECKPOINT") if refine.sds == "on" else None)
    wanted = sds_wanted(refine, pick_device(refine.device), rendered=mode == "oracle")  # oracle: GT renders
    if wanted and sds and Path(sds).expanduser().exists():
        resolved = Path(sds).expanduser().resolve()
        if resolved not in paths.values():  # the orbit's model guides too: hashed once
            paths["sds"] = resolved
    return {role: checkpoint_identity(path, cached.get(role)) for role, path in paths.items()}


def ground_truth_identity(object_dir: Path, previous: dict | None = None) -> dict:
    """{"sha256", "files"} of an object's ground truth as the renders use it: every file under its meshes/
    and materials/ folders (mesh, material, textures) by relative path and content. `files` holds each
    file's [path, size, mtime_ns]; when they equal `previous`'s, its sha256 is reused (no rereading of a
    large dataset's textures on every rerun)."""
    paths = sorted(
        p for folder in ("meshes", "materials") for p in (object_dir / folder).rglob("*") if p.is_file()
    )
    files = [[str(p.relative_to(object_dir)), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]
    if previous and previous.get("files") == files and previous.get("sha256"):
        return previous
    digest = hashlib.sha256()
    for path, (name, _, _) in zip(paths, files, strict=True):
        digest.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return {"sha256": digest.hexdigest(), "files": files}


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: Any) -> None:
    _atomic(path, lambda p: p.write_text(json.dumps(data, indent=1, sort_keys=False, default=str) + "\n"))


# ------------------------------------------------------------------------------------------------
# One object
# ------------------------------------------------------------------------------------------------


def _render_input_view(mesh_path: Path, image_path: Path, config: RenderOrbitConfig) -> None:
    """The orbit's last frame (the input view: static orbit's k = V, at the input azimuth) as RGBA PNG."""
    from PIL import Image

    from .render_orbit import render_orbit_frames

    frames = render_orbit_frames(mesh_path, replace(config, views=1, orbit="static"))
    rgba = (frames.images[0].clamp(0, 1).numpy() * 255.0 + 0.5).astype(np.uint8)  # [H, W, 4]
    _atomic(image_path, lambda p: Image.fromarray(rgba, "RGBA").save(p, format="PNG"))


def _prepare_input(mesh_path: Path, object_dir: Path, config: EvalConfig, force: bool) -> Path:
    """gt_orbit/ (oracle) or input.png (generated), re-rendered only when missing or made otherwise."""
    from .render_orbit import render_orbit

    wanted = {"mode": config.mode, "render": _render_identity(config.render)}
    recorded = _read_json(object_dir / RENDER_FILE) or {}
    try:  # recorded with views_per_batch and the device as given until 2026-12-08
        recorded["render"] = _render_identity(RenderOrbitConfig(**recorded["render"]))
    except (KeyError, TypeError, ValueError, RuntimeError):  # none, or not ours: rendered again
        pass
    done = recorded == wanted
    if config.mode == "oracle":
        target = object_dir / "gt_orbit"
        if force or not done or not (target / "transforms.json").is_file():
            render_orbit(mesh_path, target, config.render, overwrite=True)
    else:
        target = object_dir / "input.png"
        if force or not done or not target.is_file():
            _render_input_view(mesh_path, target, config.render)
    _write_json(object_dir / RENDER_FILE, wanted)
    return target


def _score(pred_path: Path, gt, config: EvalConfig) -> dict:
    """The protocol's metrics of one predicted mesh file (in the world frame; glb turned z-up)."""
    from .meshio import load_trimesh

    pred = load_trimesh(pred_path, place=False)
    return _protocol(pred, gt, config)


def _error_line(exc: BaseException) -> str:
    """ "Type: first line of the message" of a failure recorded beside the figures; an out-of-memory
    error's hint names sv3d eval's spelling of --offload (the rerun resumes with it)."""
    line = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}".rstrip(": ")
    return line.replace("try --offload", "try --set sv3d.offload=true")


def _baseline(name: str, score: Callable[[], dict]) -> dict:
    """A comparison mesh's metrics, or {"error": ...} when it cannot be scored (an empty NeRF mesh, masks
    that carve nothing): the object's final figures stand, this source is left out of its means."""
    try:
        return score()
    except InputError as exc:  # a mesh that cannot be scored; anything else (memory, a bug) fails the
        # object, which a rerun retries
        return {"error": f"{name}: {_error_line(exc)}"}


def _in_ground_truth_frame(pred, config: EvalConfig):
    """A prediction turned into the ground truth's frame. A generated orbit puts its input view at azimuth
    0; the input view was rendered at `render.input_azimuth_deg` (a): the generated world is the ground
    truth turned by -a about z (camera centres at (cos a, sin a, .), sv3d.cameras), so turn it back by +a.
    The protocol's generated mode then centres and scales it; oracle cameras are the ground truth's own."""
    azimuth = config.render.input_azimuth_deg
    if config.mode != "generated" or azimuth % 360.0 == 0.0:
        return pred
    turn = trimesh.transformations.rotation_matrix(math.radians(azimuth), [0.0, 0.0, 1.0])  # [4, 4]
    return pred.copy().apply_transform(turn)


def _protocol(pred, gt, config: EvalConfig) -> dict:
    from .evaluation.metrics import evaluate_mesh

    metrics = evaluate_mesh(
        _in_ground_truth_frame(pred, config),
        gt,
        mode=config.mode,
        n_points=config.n_points,
        seed=config.seed,
        icp=config.icp,
        thresholds=tuple(config.fscore_thresholds),
        iou_resolution=config.iou_resolution,
        n_views=config.n_views,
        view_resolution=config.view_resolution,
        device=config.render.device,  # the batch's device (--device cpu keeps the scoring off the GPU)
    )
    return metrics.to_dict()


def evaluate_object(
    mesh_path: str | Path,
    object_dir: str | Path,
    config: EvalConfig,
    run_config: RunConfig,
    force: bool = False,
    progress: bool = True,
    fingerprint: str | None = None,
    rescoring: dict | None = None,
) -> dict:
    """Run the pipeline on one ground-truth mesh and score it; writes and returns `metrics.json`'s content.

    `run_config` should come from `_resolved_run_config` (flagged orbits allowed); `force` redoes the
    renders and the pipeline's finished stages. `rescoring`: the record of this object finished under an
    older scoring protocol; its pipeline time is kept (the pipeline only resumes here) and its fingerprint
    recorded as `rescored_from`.
    """
    from .evaluation.metrics import encloses_volume
    from .evaluation.visual_hull import visual_hull_from_orbit_dir
    from .meshio import load_trimesh
    from .run import run_from_orbit, run_image_to_mesh

    # 1. Inputs: the ground truth (placed in the world frame) and the pipeline's input
    mesh_path, out = Path(mesh_path), Path(object_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS_FILE).unlink(missing_ok=True)
    fingerprint = fingerprint or config_fingerprint(config, run_config)
    started = (_read_json(out / STARTED_FILE) or {}).get("ground_truth_files")  # unchanged files: no rehash
    truth = ground_truth_identity(mesh_path.parent.parent, started)  # <object>/meshes/model.obj -> <object>
    _write_json(out / STARTED_FILE, {"fingerprint": fingerprint, "ground_truth_files": truth})
    timings: dict[str, Any] = {}
    start = time.perf_counter()
    gt = load_trimesh(mesh_path, up=config.render.up)
    # before the pipeline's minutes: every volume IoU would read 0
    if not encloses_volume(gt, device=config.render.device):
        raise InputError(f"{mesh_path}: the ground truth encloses no volume (an open or double-sided mesh?)")
    source = _prepare_input(mesh_path, out, config, force)
    timings["render_seconds"] = round(time.perf_counter() - start, 3)

    # 2. The pipeline. A folder without run.json holds only our inputs: run.py may "force" into it then
    # (it removes only its own files), and resumes its finished stages otherwise.
    start = time.perf_counter()
    pipeline_force = force or not (out / "run.json").is_file()
    if config.mode == "oracle":
        result = run_from_orbit(source, out, run_config, force=pipeline_force, progress=progress)
        masks_orbit = source
    else:
        result = run_image_to_mesh(source, out, run_config, force=pipeline_force, progress=progress)
        masks_orbit = out / "orbit"
    timings["pipeline_seconds"] = round(time.perf_counter() - start, 3)
    timings["stages"] = {k: v.get("seconds") for k, v in result.summary.get("stages", {}).items()}
    if rescoring:  # the pipeline ran before: its time then, not this resume's
        for key in ("pipeline_seconds", "stages"):
            timings[key] = (rescoring.get("timings") or {}).get(key, timings[key])

    # 3. Metrics: the final mesh, the NeRF stage's mesh, the visual hull of the same masks
    start = time.perf_counter()
    final = _score(result.mesh_path, gt, config)
    timings["final_metrics_seconds"] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    nerf = _baseline("NeRF mesh", lambda: _score(out / "nerf" / "mesh.ply", gt, config))
    timings["nerf_metrics_seconds"] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    hull = _baseline(
        "visual hull",
        lambda: _protocol(visual_hull_from_orbit_dir(masks_orbit, config.hull_resolution), gt, config),
    )
    timings["hull_seconds"] = round(time.perf_counter() - start, 3)

    consistency = result.summary.get("consistency") or {}
    record = {
        "object": out.name,
        "status": "ok",
        "mode": config.mode,
        "flagged": bool(result.flagged),
        "consistency_psnr_db": consistency.get("masked_psnr_db"),
        "final": final,
        "nerf": nerf,
        "hull": hull,
        "timings": timings,
        "fingerprint": fingerprint,
        "ground_truth": str(mesh_path.resolve()),
        "ground_truth_files": truth,
    }
    if rescoring:
        record["rescored_from"] = rescoring.get("fingerprint")
    _write_json(out / METRICS_FILE, record)
    (out / ERROR_FILE).unlink(missing_ok=True)
    return record


# ------------------------------------------------------------------------------------------------
# The dataset
# ------------------------------------------------------------------------------------------------


def evaluate_dataset(
    dataset: str | Path,
    output_dir: str | Path,
    config: EvalConfig | None = None,
    run_config: RunConfig | None = None,
    objects: str | Path | Sequence[str] | None = None,
    force: bool = False,
    progress: bool = True,
    rescore: bool = False,
) -> EvalSummary:
    """Evaluate every object of `dataset` (or those of `objects`: names, or a file of names) into
    `output_dir`, then write the summaries. Finished objects are kept; `force` redoes every object,
    pipeline included. Objects finished with this config under an older scoring protocol are refused
    unless `rescore`, which scores them again under the current one: the pipeline resumes its finished
    stages, so their meshes are kept (objects not finished, failed or new run as in any rerun)."""
    from .orbit import OrbitConfig

    # 1. Check inputs: nothing is created before all of them pass
    config = copy.deepcopy(config or EvalConfig())
    config.validate()
    dataset, out = Path(dataset), Path(output_dir)
    names = _select_objects(dataset, objects)
    if force and rescore:
        raise InputError("--force redoes the pipeline, --rescore keeps it: give one of them")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    taken = (run_config.orbit if run_config else OrbitConfig()).input_elevation_deg
    if config.mode == "generated" and taken != config.render.elevation_deg:
        raise InputError(  # the generated world would be tilted against the ground truth's
            f"generated mode: the input view is rendered at elevation {config.render.elevation_deg} but the "
            f"orbit stage takes it as {taken} (sv3d.elevation_deg sets both)"
        )
    run = _resolved_run_config(run_config, config.mode)
    _check_run_config(run, config.mode)
    checkpoints = checkpoint_hashes(run, config.mode, _read_json(out / CHECKPOINTS_FILE))
    fingerprint = config_fingerprint(config, run, checkpoints)
    current = accepted_fingerprints(config, run, checkpoints, PROTOCOL_VERSION)
    # This config under an older scoring protocol (version 1 had no version in its hash, so from 2 on; a
    # field added to the configs since also stops a match, which then reads as another config): --rescore
    # scores such a finished object again, keeping its pipeline outputs.
    older = set().union(
        *(accepted_fingerprints(config, run, checkpoints, v) for v in range(2, PROTOCOL_VERSION))
    )
    done: dict[str, dict] = {}  # finished with this config and protocol: kept
    rescored: dict[str, dict] = {}  # finished under an older protocol, to be scored again (--rescore)
    stale: dict[str, str] = {}  # finished, or started and not finished, with another config or ground truth
    for name in names if not force else ():  # --force redoes every object: nothing to compare
        previous = _read_json(out / name / METRICS_FILE) or _read_json(out / name / STARTED_FILE)
        if previous is None:
            continue
        recorded = previous.get("ground_truth_files") or {}
        if ground_truth_identity(dataset / name, recorded)["sha256"] != recorded.get("sha256"):
            stale[name] = f"another ground truth than {dataset / name}'s"
        elif previous.get("fingerprint") in older:
            if not rescore:
                stale[name] = OLDER_PROTOCOL
            elif previous.get("status") == "ok":
                rescored[name] = previous
        elif previous.get("fingerprint") not in current:
            stale[name] = "another config, scoring protocol or checkpoint"
        elif previous.get("status") == "ok":
            done[name] = previous
    if stale:  # named by the first object that --rescore would not mend, if any
        first = next((n for n, why in stale.items() if why != OLDER_PROTOCOL), next(iter(stale)))
        remedy = "use another -o, or --force to redo every object"
        if all(why == OLDER_PROTOCOL for why in stale.values()):
            remedy = "--rescore scores them again and keeps their meshes (--force redoes every object)"
        raise InputError(
            f"{out / first}: was evaluated with {stale[first]} ({len(stale)} object(s) in all, finished or "
            f"not); {remedy}"
        )

    # 2. Each object in turn; a failure is recorded and the batch goes on
    out.mkdir(parents=True, exist_ok=True)
    if checkpoints:
        _write_json(out / CHECKPOINTS_FILE, checkpoints)  # the hashes, for the next rerun
    records: list[dict] = []
    for i, name in enumerate(names):
        if name in done and not force:
            if progress:
                print(f"sv3d eval: [{i + 1}/{len(names)}] {name}: done before, kept", file=sys.stderr)
            records.append(done[name])
            continue
        if progress:
            again = ": scored again under the current protocol" if name in rescored else ""
            print(f"sv3d eval: [{i + 1}/{len(names)}] {name}{again}", file=sys.stderr)
        try:
            record = evaluate_object(
                dataset / name / "meshes" / "model.obj",
                out / name,
                config,
                run,
                force,
                progress,
                fingerprint,
                rescored.get(name),
            )
        except Exception as exc:  # noqa: BLE001 - any failure of one object is recorded, the batch goes on
            message = _error_line(exc)
            (out / name).mkdir(parents=True, exist_ok=True)
            _atomic(out / name / ERROR_FILE, lambda p: p.write_text(traceback.format_exc()))
            if progress:
                print(f"sv3d eval: {name} failed: {message}", file=sys.stderr)
            record = {"object": name, "status": "error", "error": message}
        records.append(record)

    # 3. The summaries
    summary = summarize(records, config, fingerprint)
    write_summary(out, summary)
    return EvalSummary(out, summary, records)


# ------------------------------------------------------------------------------------------------
# Summaries
# ------------------------------------------------------------------------------------------------


def summary_metrics(config: EvalConfig) -> list[str]:
    """The headline metrics of the tables: Chamfer, volume IoU and F-score at each threshold (+ ICP)."""
    names = ["chamfer", "volume_iou", *(f"fscore@{t:g}" for t in config.fscore_thresholds)]
    if config.icp:
        names += ["chamfer_icp", "volume_iou_icp", *(f"fscore_icp@{t:g}" for t in config.fscore_thresholds)]
    return names


def _stat(values: list[float], how: str) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    return float(np.mean(values) if how == "mean" else np.median(values))


def summarize(records: list[dict], config: EvalConfig, fingerprint: str = "") -> dict:
    """summary.json's content: per-object headline metrics (final, NeRF, hull), mean and median over the
    objects that finished (flagged ones included: their flag is reported beside them). No timings, so that
    the summary of a resumed batch equals an uninterrupted one's."""
    metrics = summary_metrics(config)
    rows = []
    for r in records:
        row = {"object": r["object"], "status": r["status"], "flagged": bool(r.get("flagged", False))}
        if r["status"] == "ok":
            row["consistency_psnr_db"] = r.get("consistency_psnr_db")
            for source in SOURCES:
                row[source] = {m: r[source].get(m) for m in metrics}
            errors = [r[source]["error"] for source in SOURCES if r[source].get("error")]
            if errors:  # a baseline that could not be scored (its figures are blank)
                row["error"] = "; ".join(errors)
        else:
            row["error"] = r.get("error", "")
        rows.append(row)
    ok = [r for r in rows if r["status"] == "ok"]
    aggregate = {
        how: {source: {m: _stat([r[source][m] for r in ok], how) for m in metrics} for source in SOURCES}
        for how in ("mean", "median")
    }
    return {
        "format": SUMMARY_FORMAT,
        "mode": config.mode,
        "metrics": metrics,
        "n_objects": len(rows),
        "n_ok": len(ok),
        "n_failed": len(rows) - len(ok),
        "n_flagged": sum(r["flagged"] for r in ok),
        "objects": rows,
        "aggregate": aggregate,
        "config": {"eval": asdict(config), "fingerprint": fingerprint},
    }


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(summary: dict) -> tuple[list[str], list[list[Any]]]:
    """Header and rows (objects, then mean and median): each metric as final, NeRF, hull columns."""
    metrics = summary["metrics"]
    header = ["object", "status", "flagged"]
    for m in metrics:
        header += [m, f"{m}_nerf", f"{m}_hull"]
    header.append("error")
    rows = []
    for r in summary["objects"]:
        row: list[Any] = [r["object"], r["status"], int(r["flagged"])]
        for m in metrics:
            row += [r[s][m] if r["status"] == "ok" else None for s in SOURCES]
        rows.append([*row, r.get("error", "")])
    for how in ("mean", "median"):
        row = [how, f"{summary['n_ok']}/{summary['n_objects']} ok", summary["n_flagged"]]
        for m in metrics:
            row += [summary["aggregate"][how][s][m] for s in SOURCES]
        rows.append([*row, ""])
    return header, rows


def _csv_text(header: list[str], rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(
        [[repr(v) if isinstance(v, float) else ("" if v is None else v) for v in r] for r in rows]
    )
    return buffer.getvalue()


def _markdown(summary: dict) -> str:
    header, rows = _table(summary)
    lines = [
        f"# sv3d eval ({summary['mode']} mode)",
        "",
        f"{summary['n_ok']} of {summary['n_objects']} objects evaluated, {summary['n_failed']} failed, "
        f"{summary['n_flagged']} flagged as not 3D-consistent (scored anyway). Distances in units of the "
        "ground truth's largest bounding-box side; `_nerf`: the NeRF stage's mesh; `_hull`: the visual-hull "
        "baseline from the same 21 masks (ARCHITECTURE.md, Evaluation protocol).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in rows:
        cells = [_fmt(v).replace("|", "/") for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


_COLORS = {"final": (52, 101, 164), "nerf": (136, 138, 133), "hull": (245, 121, 0)}


def _chart(summary: dict) -> Any:
    """summary.png: one bar panel per headline metric, bars per object (and the mean), final/NeRF/hull."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    metrics = [m for m in summary["metrics"] if "_icp" not in m]  # Chamfer, IoU and the F-scores
    labels = [r["object"] for r in summary["objects"]] + ["mean"]
    values = {
        m: [[r[s][m] if r["status"] == "ok" else None for s in SOURCES] for r in summary["objects"]]
        + [[summary["aggregate"]["mean"][s][m] for s in SOURCES]]
        for m in metrics
    }
    group, bar, panel_h, margin = 3 * 14 + 16, 14, 180, 40
    width = max(margin * 2 + group * len(labels), 360)
    image = Image.new("RGB", (width, 30 + len(metrics) * (panel_h + 50)), "white")
    draw = ImageDraw.Draw(image)
    x = margin
    for s in SOURCES:  # legend
        draw.rectangle([x, 8, x + 10, 18], fill=_COLORS[s])
        draw.text((x + 14, 7), s, fill="black", font=font)
        x += 70
    for k, m in enumerate(metrics):
        top = 30 + k * (panel_h + 50)
        finite = [v for row in values[m] for v in row if v is not None and math.isfinite(v)]
        vmax = max(max(finite, default=0.0), 1e-12)
        base = top + 20 + panel_h
        draw.text((margin, top + 4), f"{m} (max {vmax:.3g})", fill="black", font=font)
        draw.line([margin - 4, base, width - margin + 4, base], fill="black")
        for i, (label, row) in enumerate(zip(labels, values[m], strict=True)):
            x0 = margin + i * group
            for j, v in enumerate(row):
                if v is None or not math.isfinite(v):
                    continue
                h = int(round(panel_h * v / vmax))
                draw.rectangle(
                    [x0 + j * bar, base - h, x0 + (j + 1) * bar - 2, base], fill=_COLORS[SOURCES[j]]
                )
            draw.text((x0, base + 4), label[: group // 6], fill="black", font=font)
    return image


def write_summary(output_dir: str | Path, summary: dict) -> dict[str, Path]:
    """Write summary.json, summary.md, summary.csv and summary.png into `output_dir` (each atomically, all
    four made before the first is written: a failure in one leaves the previous set as it was)."""
    out = Path(output_dir)
    header, rows = _table(summary)
    paths = {ext: out / f"summary.{ext}" for ext in ("json", "md", "csv", "png")}
    png = io.BytesIO()
    _chart(summary).save(png, format="PNG")
    contents = {
        "json": (json.dumps(summary, indent=1, sort_keys=False, default=str) + "\n").encode(),
        "md": _markdown(summary).encode(),
        "csv": _csv_text(header, rows).encode(),
        "png": png.getvalue(),
    }
    for ext, data in contents.items():
        _atomic(paths[ext], lambda p, data=data: p.write_bytes(data))
    return paths


# ------------------------------------------------------------------------------------------------
# Sweeps
# ------------------------------------------------------------------------------------------------


def _overrides(job_dir: Path) -> dict[str, str]:
    """The Hydra overrides of a multirun job (`<job>/.hydra/overrides.yaml`) as {key: value}."""
    import yaml

    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    items = yaml.safe_load(path.read_text()) or []
    pairs = (str(item).split("=", 1) for item in items)
    return {k.lstrip("+~"): v for k, v in (p if len(p) == 2 else (p[0], "") for p in pairs)}


def aggregate_sweep(sweep_dir: str | Path, output: str | Path | None = None) -> dict[str, Path]:
    """One table of a Hydra multirun's evaluations: a row per job (its `summary.json`), the overrides
    that differ as columns, then the mean of each headline metric, final and hull. Writes
    `sweep_summary.csv` and `sweep_summary.md` into `output` (default: the sweep directory)."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise InputError(f"{root}: sweep directory not found")
    found = sorted(p for p in root.rglob("summary.json") if p.parent != root)
    jobs = [(p.parent, _read_json(p)) for p in found]
    jobs = [(d, s) for d, s in jobs if s and s.get("format") == SUMMARY_FORMAT]
    if not jobs:
        raise InputError(f"{root}: no evaluation summaries (summary.json) in the sweep directory")
    overrides = {d: _overrides(d) for d, _ in jobs}
    keys = sorted({k for o in overrides.values() for k in o})
    metrics = list(dict.fromkeys(m for _, s in jobs for m in s["metrics"]))
    header = ["job", *keys, "n_ok", "n_failed", "n_flagged"]
    header += [f"{m}{suffix}" for m in metrics for suffix in ("", "_hull")]
    rows = []
    for job_dir, s in jobs:
        mean = s["aggregate"]["mean"]
        row = [job_dir.relative_to(root).as_posix(), *(overrides[job_dir].get(k, "") for k in keys)]
        row += [s["n_ok"], s["n_failed"], s["n_flagged"]]
        row += [mean[src].get(m) for m in metrics for src in ("final", "hull")]
        rows.append(row)
    out = Path(output) if output else root
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "sweep_summary.csv", "md": out / "sweep_summary.md"}
    _atomic(paths["csv"], lambda p: p.write_text(_csv_text(header, rows)))
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    text = (
        f"# sweep {root.name}: {len(rows)} runs (means over each run's finished objects: compare runs with "
        "n_failed 0)\n\n" + "\n".join(md) + "\n"
    )
    _atomic(paths["md"], lambda p: p.write_text(text))
    return paths
