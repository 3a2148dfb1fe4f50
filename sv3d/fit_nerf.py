"""`sv3d fit-nerf`: an orbit directory -> Instant-NGP radiance field -> coarse mesh (stage 2).

Writes `mesh.ply` (vertex colours, world frame), `density.npz` (for the DMTet stage), `field.safetensors`
and `preview.mp4` (the field rendered on the orbit), plus `checkpoint.pt`, from which an interrupted run
resumes. Defaults follow the device: minutes on 2 CPU cores at reduced resolution, full quality on CUDA.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import trimesh

from nerf.encoding import HashGridConfig
from nerf.extract import (
    ExtractConfig,
    cut_floor,
    density_grid,
    extract_mesh,
    fill_cavities,
    save_density,
    surface,
)
from nerf.occupancy import OccupancyGrid
from nerf.rays import generate_rays, sample_bounds
from nerf.render import render_rays
from nerf.train import TrainConfig, fit_field
from refine.camera import Cameras, transform_points
from refine.floor import seen_floor_height
from refine.rasterizer import rasterize

from .cameras import OBJECT_RADIUS, orbit_files, read_orbit_directory
from .device import pick_device
from .errors import InputError
from .evaluation.visual_hull import carve_occupancy
from .video import write_video

__all__ = [
    "FitNerfConfig",
    "check_fit_config",
    "check_sampler",
    "choose_level",
    "default_fit_config",
    "fit_nerf",
    "orbit_fingerprint",
]

CHECKPOINT = "checkpoint.pt"
OUTPUTS = ("mesh.ply", "density.npz", "field.safetensors", "preview.mp4")


@dataclass
class FitNerfConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    preview_resolution: int = 96  # frames of preview.mp4
    hull_resolution: int = 64  # occupancy grid carved from the masks: samples outside it are skipped
    hull_dilate: int = 2  # cells added around the hull, a margin for matting errors
    # The density iso-level is chosen among these from the frames' silhouettes (`choose_level`): a soft
    # density has no single right level, the masks say which. Levels are tried from the lowest up until the
    # surface's area grows by more than `level_area_growth` over the smallest area so far (a soft shell
    # opening inner sheets); among those, the lowest (most solid) level whose silhouette IoU over all views
    # is within `level_tolerance` of their best. Empty: use extract.level as it is.
    level_candidates: tuple[float, ...] = (2.0, 3.0, 5.0, 7.0, 10.0, 15.0, 20.0, 30.0, 50.0, 80.0)
    level_tolerance: float = 0.002
    level_area_growth: float = 0.02
    level_mask_resolution: int = 256  # masks are compared at most at this size
    # Floor cut: empty the density below the height down to which every frame sees the surface
    # (`refine.floor.seen_floor_height`) before meshing. Masks from above leave a wedge of solid under an
    # object that no frame sees; objects rest on something, so the hidden bottom is taken as flat there. A
    # round bottom loses the cap below the views' horizon: 0.045 high on a sphere of radius 0.5 seen from
    # elevation 10.
    floor_cut: bool = True
    device: str = "auto"

    def __post_init__(self) -> None:
        # Checked when the config is made (Hydra overrides too), before any stage runs.
        if not (self.level_tolerance >= 0.0 and self.level_area_growth >= 0.0):
            raise ValueError(
                f"level_tolerance and level_area_growth must be >= 0, got {self.level_tolerance} and "
                f"{self.level_area_growth}"
            )


def default_fit_config(device: torch.device) -> FitNerfConfig:
    """Defaults that follow the device: reduced sizes on CPU (minutes), full quality on CUDA."""
    if device.type == "cuda":
        return FitNerfConfig(
            train=TrainConfig(steps=3000, batch_rays=8192, n_samples=192, max_resolution=576),
            extract=ExtractConfig(resolution=256),
            preview_resolution=288,
        )
    # Measured on 2 cores at 1200 steps (128-pixel frames): instant-ngp's 16 levels up to 4096 cells learn
    # the textured mug too slowly (held-out PSNR ~21 dB, speckled colour); 8 levels up to 256 fit it
    # (27 dB) but blur the blob's shading (27.7 dB against 35); 12 levels up to 1024 give both (mug 27.3,
    # blob 36.7). 4096 rays of 48 samples learn faster than 2048 of 96 at the same cost. 2**17 rows:
    # Adam's update of a 2**19-row table alone took ~0.15 s a step. ~3.3 minutes of training on the mug.
    # float32 MLPs: bfloat16 (nerf.field's mlp_dtype) was 1.35x faster a step, but whole fits were not
    # faster (nerf.field's module doc), so it is opt-in.
    cpu = FitNerfConfig(train=TrainConfig(steps=1200, batch_rays=4096, n_samples=48))
    cpu.train.field.encoder = HashGridConfig(log2_hashmap_size=17, n_levels=12, finest_resolution=1024)
    return cpu


def check_fit_config(config: FitNerfConfig) -> None:
    """A one-line InputError for sizes and counts the stage cannot use, before anything is made (run and
    eval check their NeRF config with it too)."""
    t = config.train
    if t.steps < 1:
        raise InputError(f"NeRF steps must be >= 1, got {t.steps}")
    for name, value, least in (
        ("training frame size (--resolution)", t.max_resolution, 8),
        ("marching-cubes grid (--grid)", config.extract.resolution, 8),
        ("preview resolution", config.preview_resolution, 8),
        ("hull resolution", config.hull_resolution, 2),
        ("rays a step", t.batch_rays, 1),
        ("samples a ray", t.n_samples, 1),
    ):
        if value < least:
            raise InputError(f"{name} must be >= {least}, got {value}")
    if config.hull_dilate < 0:
        raise InputError(f"hull_dilate must be >= 0 cells, got {config.hull_dilate}")
    e = config.extract
    if config.level_mask_resolution < 8 or e.chunk < 1 or not 0.0 <= e.min_component < 1.0:
        raise InputError(
            f"level_mask_resolution must be >= 8, extract.chunk >= 1 and extract.min_component in [0, 1), "
            f"got {config.level_mask_resolution}, {e.chunk} and {e.min_component}"
        )


def check_sampler(config: FitNerfConfig, device: torch.device) -> None:
    """A one-line InputError, before anything is made, when sampler "estimator" cannot run on `device`
    (it needs CUDA and nerfacc's CUDA extension; "auto" falls back to the uniform sampler instead)."""
    from nerf.render import estimator_available

    if config.train.sampler == "estimator" and not estimator_available(device):
        raise InputError(
            f"NeRF sampler 'estimator' needs CUDA and nerfacc's CUDA extension, not available on {device}; "
            "use sampler auto or uniform"
        )


def silhouette_iou(
    mesh: trimesh.Trimesh,
    masks: torch.Tensor,
    cameras: Cameras,  # masks [V, H, W] bool
) -> float:
    """IoU, over all views, of the mesh's rasterized silhouettes and the masks."""
    vertices = torch.as_tensor(np.asarray(mesh.vertices), dtype=torch.float32)
    faces = torch.as_tensor(np.asarray(mesh.faces), dtype=torch.int64)
    pos_clip = transform_points(vertices, cameras.world_to_clip())  # [V, N, 4]
    with torch.no_grad():
        covered = rasterize(pos_clip, faces, tuple(masks.shape[1:]))[..., 3] > 0  # [V, H, W]
    return float((covered & masks).sum()) / max(float((covered | masks).sum()), 1.0)


def choose_level(
    grid: np.ndarray,  # [R, R, R] densities over [-bound, bound]^3
    bound: float,
    masks: torch.Tensor,  # [V, H, W] bool, the frames' alpha > 0.5
    cameras: Cameras,
    candidates: tuple[float, ...],
    min_component: float = 0.01,
    tolerance: float = 0.002,  # IoU below the best still accepted for a lower (more solid) level
    area_growth: float = 0.02,  # a level whose surface is this much larger than a lower one's ends the search
) -> tuple[float, dict[float, float], dict[float, float]]:
    """The iso-level to mesh at, and every tried level's silhouette IoU and surface area.

    The surfaces of a solid's density are nested: a higher level's lies inside a lower one's and is
    smaller. A soft shell breaks that: above some level its inside falls under the level and an inner
    sheet opens, which the silhouettes cannot see (the blob of 2026-11-28: level 20 had the best IoU,
    0.9925, and Chamfer 0.026; level 10 had 0.9863 and 0.0065) but which adds area (`internal`'s fit of
    2026-12-06: +13% at level 20; that old blob fit was not kept to check). So the levels are
    tried from the lowest up, and the search ends at the first whose surface area exceeds
    (1 + area_growth) x the smallest area so far; of the levels before it, the lowest whose IoU against
    the masks is within `tolerance` of their best is taken. Measured on the oracle NeRF fits of 2026-12-06
    (CPU defaults, NeRF mesh Chamfer, the rule of before -> this one): checker 0.0059 -> 0.0044 (level 5
    -> 80: its density is soft, and the IoU still rises at 80), blob 0.0048 -> 0.0045, `internal` 0.0134
    -> 0.0125 (10 -> 15; its area grows 13% at 20, where its Chamfer is 0.0136 and at 30 0.0156), plate
    0.0120 -> 0.0116, bowl 0.0358 -> 0.0364 (10 -> 15; 20 grows 2.7%).
    """
    ious: dict[float, float] = {}
    areas: dict[float, float] = {}
    smallest = math.inf
    for level in sorted(candidates):
        if not grid.max() > level > grid.min():
            continue
        mesh, key = surface(grid, bound, level, min_component), float(level)
        areas[key] = float(mesh.area)
        if areas[key] > (1.0 + area_growth) * smallest:
            break  # an inner sheet has opened: its area is recorded, the level is not a candidate
        smallest = min(smallest, areas[key])
        ious[key] = silhouette_iou(mesh, masks, cameras)
    if not ious:
        raise InputError(
            f"the fitted density never crosses any of the levels {list(candidates)} (range "
            f"{grid.min():.3g} to {grid.max():.3g}): the field is empty or solid"
        )
    best = max(ious.values())
    return min(level for level, iou in ious.items() if iou >= best - tolerance), ious, areas


def orbit_fingerprint(orbit_dir: str | Path) -> str:
    """sha256 of the orbit's transforms.json and of its frames' files, in order: which orbit a stage's
    output was made from (two orbits on the same cameras differ in their frames)."""
    orbit_dir = Path(orbit_dir)
    digest = hashlib.sha256((orbit_dir / "transforms.json").read_bytes())
    for path in orbit_files(orbit_dir):  # the frames' (and masks') files as the readers resolve them
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _leftovers(out: Path) -> list[Path]:
    """The temporary files (`.<name>.XXXX<suffix>`, `.preview.XXXX.mp4`) that writing the stage's files
    leaves behind when the process is killed outright (kill -9, a power cut)."""
    if not out.is_dir():
        return []
    names = "|".join(re.escape(name) for name in (CHECKPOINT, *OUTPUTS, "fit_nerf.json"))
    # tempfile's 8 random characters; `_atomic` adds the file's suffix, write_video makes .preview.XXXX.mp4
    temporary = re.compile(rf"\.(?:(?:{names})\.[a-z0-9_]{{8}}(?:\.[a-z]+)?|preview\.[a-z0-9_]{{8}}\.mp4)")
    return [p for p in out.iterdir() if p.is_file() and temporary.fullmatch(p.name)]


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@torch.no_grad()
def render_views(
    model,
    c2w: torch.Tensor,  # [V, 4, 4] camera-to-world
    fov_deg: float,
    size: int,
    train: TrainConfig,  # the field's training config: renders sample as its training did (bound, sampling)
    occupancy=None,  # [N, 3] -> [N] bool, as in training
    chunk: int = 1 << 14,
) -> np.ndarray:
    """[V, size, size, 3] renders of the field over white."""
    focal = size / (2.0 * math.tan(math.radians(fov_deg) / 2.0))
    origins, directions = generate_rays(c2w.float(), focal, size, size)
    near, far = sample_bounds(origins, directions, train.field.bound, occupancy)  # as training sampled
    o, d = origins.reshape(-1, 3), directions.reshape(-1, 3)
    n, f = near.reshape(-1), far.reshape(-1)
    hit = f > n
    out = torch.ones(o.shape[0], 3)
    device = next(model.parameters()).device
    idx = hit.nonzero(as_tuple=True)[0]
    for i in range(0, len(idx), chunk):
        sel = idx[i : i + chunk]
        rgb = render_rays(
            model,
            o[sel].to(device),
            d[sel].to(device),
            n[sel].to(device),
            f[sel].to(device),
            train.n_samples,
            stratified=False,
            occupancy=occupancy,
            proposal_samples=train.proposal_samples,
        )["rgb"]
        out[sel] = rgb.float().cpu()
    return out.reshape(c2w.shape[0], size, size, 3).clamp(0, 1).numpy()


def _ball_hull(cameras, resolution: int, bound: float) -> torch.Tensor:
    """[R, R, R] bool (x, y, z), the voxel centres of `carve_occupancy`'s grid inside the visual hull of
    the world's ball (radius OBJECT_RADIUS) seen from these camera centres: the line from each centre
    through the voxel passes within the radius (plus one voxel of slack) of the origin."""
    h = 2.0 * bound / resolution
    g = -bound + (torch.arange(resolution, dtype=torch.float64) + 0.5) * h  # [R]
    points = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), dim=-1).reshape(-1, 3)  # [R^3, 3]
    centres = cameras.c2w[:, :3, 3].to(torch.float64).cpu()  # [V, 3]
    inside = torch.ones(points.shape[0], dtype=torch.bool)
    for c in centres:  # V lines of R^3 points: the distance from the origin to the line c -> p
        direction = torch.nn.functional.normalize(points - c, dim=-1)  # [R^3, 3]
        distance = torch.linalg.cross(c.expand_as(direction), direction).norm(dim=-1)  # [R^3]
        inside &= distance <= OBJECT_RADIUS + math.sqrt(3.0) * h
    return inside.reshape(resolution, resolution, resolution).to(cameras.c2w.device)


def fit_nerf(
    orbit_dir: str | Path,
    output_dir: str | Path,
    config: FitNerfConfig | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Fit the field on the orbit's frames and write the stage's files into `output_dir`."""
    from safetensors.torch import save_file

    # 1. Check inputs before creating anything
    frames = read_orbit_directory(orbit_dir)
    device = pick_device(config.device if config else "auto")
    config = config or default_fit_config(device)
    check_fit_config(config)
    check_sampler(config, device)
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    resumable = out.is_dir() and (out / CHECKPOINT).is_file()
    leftovers = _leftovers(out)  # temporary files of a killed run (kill -9, power cut): not a result
    if out.is_dir() and any(p not in leftovers for p in out.iterdir()) and not resumable and not force:
        raise InputError(f"{out}: output directory exists and is not empty (use --force to replace it)")
    if out.is_dir() and out.resolve() == Path(orbit_dir).resolve():  # --force would delete its preview
        raise InputError(f"{out}: is the orbit directory; write the NeRF into a folder of its own")
    if float(frames.images[..., 3].max()) <= 0.0:
        raise InputError(f"{orbit_dir}: every frame's alpha is empty: there is no object to reconstruct")
    masks = frames.masks()  # [V, H, W, 1]
    empty = (masks.flatten(1).amax(1) == 0).nonzero()[:, 0].tolist()  # frames without an object pixel
    if empty:
        raise InputError(
            f"{orbit_dir}: the object's mask (alpha > 0.5) is empty in frame(s) {', '.join(map(str, empty))}"
            " (0-based): every view must see the object"
        )
    bound = config.train.field.bound
    hull = carve_occupancy(masks, frames.orbit.cameras(), config.hull_resolution, bound)  # [R, R, R]
    if not bool(hull.any()):
        raise InputError(
            f"{orbit_dir}: the frames' masks share no region of space (their visual hull is empty): the "
            "cameras in transforms.json do not fit the frames, or the masks disagree"
        )
    # Every object inside the radius-0.5 world has its visual hull inside the world ball's, carved from
    # the same cameras; cells beyond that (a cell's slack) mean an object too large or cameras not centred
    # on it. Matted (generated) orbits are left to the run's consistency check: a failed generation is
    # flagged there, not refused here.
    beyond = hull & ~_ball_hull(frames.orbit.cameras(), config.hull_resolution, bound)  # [R, R, R]
    if frames.alpha_source != "matting" and int(beyond.sum()) > 0.01 * int(hull.sum()):
        raise InputError(
            f"{orbit_dir}: the masks' visual hull reaches beyond the radius-0.5 world's: the object is too "
            "large for it, or the cameras do not look at it from radius ~2 (a foreign orbit needs its "
            "cameras scaled and centred on the object)"
        )
    out.mkdir(parents=True, exist_ok=True)
    for leftover in leftovers:
        leftover.unlink(missing_ok=True)
    if force:
        for name in (CHECKPOINT, *OUTPUTS, "fit_nerf.json"):
            (out / name).unlink(missing_ok=True)

    # 2. Train (resuming from the checkpoint when there is one)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.train.steps, desc="fit-nerf", unit="step")

    def report(step: int, record: dict) -> None:
        if bar is not None:
            bar.n = step
            bar.set_postfix(psnr=f"{record['psnr']:.1f}", refresh=False)
            bar.update(0)

    c2w = frames.orbit.c2w()
    occupancy = OccupancyGrid(hull, bound, config.hull_dilate).to(device)
    try:
        result = fit_field(
            frames.images,
            c2w,
            frames.orbit.fov_deg,
            config.train,
            device,
            out / CHECKPOINT,
            progress=report,
            occupancy=occupancy,
            identity={"hull_resolution": config.hull_resolution, "hull_dilate": config.hull_dilate},
        )
    except ValueError as exc:  # its checkpoint's (which name the file) or no ray to train on
        raise InputError(str(exc)) from None
    finally:
        if bar is not None:
            bar.close()

    # 3. Extract and write every file atomically; fit_nerf.json, written last, marks the set finished
    (out / "fit_nerf.json").unlink(missing_ok=True)
    start = time.perf_counter()
    grid = density_grid(
        result.field, config.train.field.bound, config.extract.resolution, config.extract.chunk, occupancy
    )
    level = config.extract.level
    level_ious: dict[float, float] = {}
    level_areas: dict[float, float] = {}
    size = min(config.level_mask_resolution, frames.images.shape[1])
    if not config.level_candidates and not grid.max() > level > grid.min():  # a fixed level
        raise InputError(
            f"the fitted density never crosses extract.level {level} (range {grid.min():.3g} to "
            f"{grid.max():.3g}): the field is empty or solid at that level"
        )
    if config.level_candidates:
        alpha = frames.images[..., 3][:, None]  # [V, 1, H, W]
        masks = torch.nn.functional.interpolate(alpha, size=(size, size), mode="area")[:, 0] > 0.5
        level, level_ious, level_areas = choose_level(
            grid,
            bound,
            masks,
            frames.orbit.cameras(),
            config.level_candidates,
            config.extract.min_component,
            tolerance=config.level_tolerance,
            area_growth=config.level_area_growth,
        )
    floor = None
    if config.floor_cut:
        seen = surface(grid, bound, level, config.extract.min_component)
        vertices = torch.as_tensor(np.asarray(seen.vertices), dtype=torch.float32)  # [N, 3]
        faces = torch.as_tensor(np.asarray(seen.faces), dtype=torch.int64)  # [F, 3]
        floor = seen_floor_height(vertices, faces, frames.orbit.cameras(), size)
        if floor is not None:  # no view sees the surface: nothing is known to cut
            grid = cut_floor(grid, bound, level, floor)
    mesh = extract_mesh(result.field, grid, bound, config.extract, level=level)
    _atomic(out / "mesh.ply", lambda p: mesh.export(p, file_type="ply"))
    # The grid mesh.ply was made from: floor cut, cavities filled (the floating parts the mesh drops stay).
    filled = fill_cavities(grid, level)
    _atomic(out / "density.npz", lambda p: save_density(p, filled, config.train.field.bound, level))
    meta = {"config": json.dumps(asdict(config)), "train_seconds": f"{result.seconds:.1f}"}
    _atomic(
        out / "field.safetensors",
        lambda p: save_file(
            {k: v.contiguous().cpu() for k, v in result.field.state_dict().items()}, str(p), metadata=meta
        ),
    )
    previews = render_views(
        result.field,
        c2w,
        frames.orbit.fov_deg,
        config.preview_resolution,
        config.train,
        occupancy=occupancy,
    )
    write_video(out / "preview.mp4", previews)  # atomic itself
    summary = {
        "history": result.history,
        "train_seconds": result.seconds,  # every run's, when resumed
        "config": asdict(config),  # extraction settings included (a rerun of a finished fit re-meshes)
        "device": str(device),
        "orbit_sha256": orbit_fingerprint(orbit_dir),
        "extract_seconds": time.perf_counter() - start,
        "mesh_faces": len(mesh.faces),
        "level": level,
        "floor_height": floor,
        "level_silhouette_iou": {str(k): v for k, v in level_ious.items()},
        "level_surface_area": {str(k): v for k, v in level_areas.items()},
    }
    _atomic(out / "fit_nerf.json", lambda p: p.write_text(json.dumps(summary, indent=1)))
    return out
