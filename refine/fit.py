"""The refinement loop: DMTet surface + colour field optimised on the orbit frames (SV3D paper, fine stage).

Each step extracts the surface with marching tetrahedra, renders a few of the frames' views through our
rasterizer (colour field at the surface points, analytic antialiasing so that silhouettes pass gradients
to the vertices), and minimises
    lambda_rgb * |render - frame|^2 (over white) + lambda_mask * |coverage - alpha|^2
  + lambda_normal * normal consistency + lambda_laplacian * Laplacian + lambda_sdf_sign * sign loss
  + lambda_albedo_smooth * albedo smoothness (with the colour field's learned shading, refine.shading)
and, in the last `sds_fraction` of the steps, the score-distillation loss returned by `guidance` (a callable
given by the caller; the SV3D model lives in `sv3d`, never here). Losses are returned by name so the
weights are plain config entries. With `floor_cut` the init is cut below the height every view sees it down
to (`refine.floor`) and each step's surface is projected above that plane.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from nerf.train import frames_over_white

from .camera import Cameras, transform_points
from .color_field import ColorField, ColorFieldConfig
from .dmtet import DMTetConfig, DMTetGeometry, sdf_sign_regulariser
from .floor import seen_floor_height
from .mesh import vertex_normals
from .rasterizer import antialias, edge_topology, interpolate, interpolate_covered, rasterize
from .regularisers import laplacian_loss, normal_consistency_loss
from .render import depth_image
from .shading import albedo_smoothness

__all__ = [
    "FrameErrorMaps",
    "Guidance",
    "RefineConfig",
    "RefineResult",
    "SurfaceVanishedError",
    "frame_error_maps",
    "frame_errors",
    "refine_surface",
    "render_surface",
    "sds_phase_steps",
]

# guidance(images [V, H, W, 3] in [0, 1], alpha [V, H, W, 1], normals [V, H, W, 3], step=[, points=]) ->
# {"loss_sds": ...}; points [V, H, W, 3]: the world surface point at each pixel (0 where empty), given to
# callables that take a `points` keyword
Guidance = Callable[..., dict[str, Tensor]]


@dataclass
class RefineConfig:
    steps: int = 300  # optimisation steps (the paper: 1000 at full resolution on an A100)
    # Frames are compared at this size (the paper: 576). 256 on CPU (measured, mug and plate from their NeRF
    # meshes, 300 steps): exported mesh's masked PSNR 32.0 / 32.2 dB against 27.4 / 30.7 at 128, Chamfer
    # 0.0210 / 0.0202 against 0.0217 / 0.0211, for ~15 s more.
    render_resolution: int = 256
    views_per_step: int = 4  # random frames rendered per step (all 21 is 5x the cost for little gain)
    lr_sdf: float = 2e-3  # SDF values are world distances: ~0.1 cell per step at resolution 64
    lr_deformation: float = 1e-2  # pre-tanh offsets
    lr_color: float = 1e-2  # hash grid + MLP, as instant-ngp
    lambda_rgb: float = 1.0
    lambda_mask: float = 1.0  # silhouettes are the most reliable signal of the frames
    lambda_normal: float = 0.01  # normal consistency: smooth surfaces without shrinking them
    # Uniform Laplacian of the vertices: it thins and rounds. Measured at 1.0 (both starts, from the NeRF
    # meshes of the README's evaluation, CPU): final Chamfer bowl 0.0068 -> 0.0058, plate 0.0103 -> 0.0095
    # (a thinner plate; its dome stays), mug 0.0175 -> 0.0173, blob and checker within 0.0002, but `internal`
    # 0.0099 -> 0.0105 (rounded box edges) with its open start 5.2% better in RGB instead of 5.7% worse; at
    # 0.3 that start came out 11.4% better and was kept (Chamfer 0.0277). Off until the open-cavity choice
    # is sturdier (README, Limitations).
    lambda_laplacian: float = 0.0
    lambda_sdf_sign: float = 0.001  # DMTet's sign loss: no floaters and internal sheets
    # Colour-field gradients reach the vertex positions (nvdiffrec's way), not only silhouettes. Measured on
    # the five test objects' static oracle orbits from their NeRF meshes (300 steps, CPU): masked PSNR +0.1
    # to +1.1 dB on all five, Chamfer lower on four (not the bowl: 0.0426 vs 0.0421); on sine orbits
    # (mug, plate) within 0.3 dB and 0.0005 either way.
    color_moves_geometry: bool = True
    # With the colour field's learned shading (color.shading, refine.shading): the albedo's truncated L1
    # difference to jittered surface points, so that the shading, and through it the normals, explain the
    # smooth brightness changes. Measured on the six test objects' static oracle orbits from their NeRF
    # meshes (300 steps, CPU, one run each): see the README's results.
    lambda_albedo_smooth: float = 0.05
    albedo_jitter: float = 0.01  # world units, ~0.6 tet cell at resolution 64
    albedo_cap: float = 0.05  # summed |RGB difference| above this costs no more: texture edges stay sharp
    albedo_samples: int = 8192  # surface points drawn per step
    # Fraction of the steps with the smoothness; after it the albedo takes what the nine coefficients cannot
    # (clamped lights): measured from the NeRF meshes, 0.8 against 1.0: exported mesh's PSNR blob 33.4 vs
    # 32.2 dB, mug 31.9 vs 30.4, plate 31.6 vs 31.4, `internal` 35.3 vs 35.3; Chamfer within 0.0002.
    albedo_smooth_until: float = 0.8
    # Floor cut (refine.floor): the init is cut flat below the height down to which every frame sees its
    # surface, and the surface is kept above that plane after every step (the belly a fit grows under an
    # object: the plate's refined underside reached 0.017 below the NeRF's floor). Measured once, on the init:
    # measured again on the fitted surface halfway, it rose on the spheres (checker: Chamfer 0.0051 against
    # 0.0044) and not on the plate (0.0103 both). Cut only once at the end, the plate's refined top met the
    # cut at its rim with no side left, and the exported mesh's PSNR fell from 31.8 to 22.1 dB. From a NeRF
    # output the stage hands over the NeRF stage's height (`refine_surface`'s floor_height), measured on its
    # level surface before the tet grid rounds the bottom off (on the spheres 0.007 lower, nearer their
    # horizon at -0.455): from the README evaluation's NeRF meshes (2026-12-06, CPU, one run each), final
    # Chamfer checker 0.0046 -> 0.0042, blob 0.0045 -> 0.0042, `internal` 0.0099 -> 0.0098, mug 0.0175 ->
    # 0.0174 (the plate's two heights are the same).
    floor_cut: bool = True
    sds_fraction: float = 0.2  # SDS in the last 20% of the steps (the paper: last 200 of 1000)
    # Weight of the guidance's loss (SDSGuidance: 0.5 x the squared latent gradient summed over each view's
    # latents, averaged over the views). The SV3D authors' DMTet config weighs RGB 1000 (a mean), masks 100,
    # SDS 0.1 (0.5 x the squared RGB difference between renders and decoded denoised frames, summed at 128²,
    # averaged over the 21 views): for one colour error d everywhere, SDS 2.5 d² against RGB 1000 d². Ours,
    # with latents scaled to unit variance (~1.5 d a latent value for d on the pixels, 4 x 72² latents a
    # view), gives 0.5 x 4 x 5184 x (1.5 d)² = 23,000 d² against RGB 1 d², so the authors' balance is about
    # 1e-4 (estimated from their configs, not measured with a real checkpoint; at 1.0 SDS outweighed the
    # frames about 10,000-fold).
    lambda_sds: float = 1e-4
    sds_resolution: int = 576  # renders handed to the guidance (the model's frame size)
    seed: int = 0
    tet: DMTetConfig = field(default_factory=DMTetConfig)
    color: ColorFieldConfig = field(default_factory=ColorFieldConfig)


def sds_phase_steps(config: RefineConfig) -> int:
    """How many of the steps get SDS guidance: the last `sds_fraction` of them."""
    return int(round(config.sds_fraction * config.steps))


class SurfaceVanishedError(RuntimeError):
    """Every SDF value turned positive during the refinement: no surface is left to render."""


@dataclass
class RefineResult:
    geometry: DMTetGeometry
    color: ColorField
    history: list[dict[str, float]]  # per logged step: loss terms
    seconds: float
    # The floor cut: height, share of the inside removed, or why skipped; None when off
    floor: dict | None = None


@dataclass
class SurfaceRender:
    image: Tensor  # [V, H, W, 3] over white, in [0, 1]
    alpha: Tensor  # [V, H, W, 1] antialiased coverage
    normals: Tensor | None  # [V, H, W, 3] unit world normals (outward), 0 off the surface; None if not asked
    points: Tensor  # [P, 3] the surface points where the colour was queried, detached
    point_image: Tensor | None = None  # [V, H, W, 3] the same per pixel (0 where empty); when asked for
    depth: Tensor | None = None  # [V, H, W, 1] along the viewing axis (0 where empty); when asked for


def render_surface(
    vertices: Tensor,  # [N, 3] world
    faces: Tensor,  # [F, 3]
    color: Callable[..., Tensor],  # points [P, 3] (, normals [P, 3] when color.shaded) -> rgb [P, 3]
    cameras: Cameras,
    resolution: int,
    detach_points: bool = True,  # False: photometric error moves the surface through the colour field
    with_normals: bool = True,  # False: no normals image (the reconstruction losses do not use it)
    topology: Tensor | None = None,  # [F, 3] edge_topology(faces), when the caller has it already
    with_point_image: bool = False,  # True: also the surface points as an image (the guidance's mask)
    with_depth: bool = False,  # True: also the depth image (comparing two surfaces' renders)
) -> SurfaceRender:
    """Render the surface with its colour field: unlit (the lighting is in the colours), or, for a field
    whose `shaded` is true, given the interpolated vertex normals at the surface points as well."""
    pos_clip = transform_points(vertices, cameras.world_to_clip())  # [V, N, 4]
    rast = rasterize(pos_clip, faces, resolution)  # [V, H, W, 4]
    mask = rast[..., 3:] > 0  # [V, H, W, 1]
    shaded = bool(getattr(color, "shaded", False))
    per_vertex = vertex_normals(vertices, faces) if (with_normals or shaded) else None  # [N, 3]
    normals = None
    if with_normals:
        normals = interpolate(per_vertex, rast, faces)
        normals = torch.nn.functional.normalize(normals, dim=-1) * mask
    # The colour field is queried at the covered pixels' surface points only: [P] flat indices, [P, 3].
    # Detached points: geometry learns from the silhouettes only (through the antialiasing); attached, the
    # colour field's positional gradient also moves the surface where its colours disagree with the frames.
    covered, queried = interpolate_covered(vertices, rast, faces)
    points = queried.detach() if detach_points else queried
    if shaded:  # the normals stay attached: the shading moves the surface through them
        _, at = interpolate_covered(per_vertex, rast, faces)  # [P, 3]
        rgb = color(points, torch.nn.functional.normalize(at, dim=-1))  # [P, 3]
    else:
        rgb = color(points)  # [P, 3]
    flat = queried.new_zeros(mask.numel(), 3).index_put((covered,), rgb)
    rgba = torch.cat([flat.view(*mask.shape[:-1], 3), mask.to(queried.dtype)], dim=-1)  # premultiplied
    rgba = antialias(rgba, rast, pos_clip, faces, edge_topology(faces) if topology is None else topology)
    alpha = rgba[..., 3:].clamp(0.0, 1.0)
    point_image = None
    if with_point_image:
        flat_points = queried.new_zeros(mask.numel(), 3).index_put((covered,), queried.detach())
        point_image = flat_points.view(*mask.shape[:-1], 3)
    depth = None
    if with_depth:
        depth = depth_image(vertices.detach(), faces, cameras, rast)
    return SurfaceRender(
        image=rgba[..., :3] + (1.0 - alpha),
        alpha=alpha,
        normals=normals,
        points=queried.detach(),
        point_image=point_image,
        depth=depth,
    )


def _takes_points(guidance: Guidance) -> bool:
    """Whether the guidance callable accepts `points=` (the surface points image): older callables of
    (images, alpha, normals, step) keep working, and no points image is made for them."""
    try:
        parameters = inspect.signature(guidance).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable without a signature: the old contract
        return False
    return any(p.name == "points" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _resize(images: Tensor, size: int) -> Tensor:
    """[V, H, W, C] -> [V, size, size, C] (area when shrinking, bilinear when growing)."""
    if images.shape[1] == size:
        return images
    mode = "area" if images.shape[1] > size else "bilinear"
    x = torch.nn.functional.interpolate(images.permute(0, 3, 1, 2), size=(size, size), mode=mode)
    return x.permute(0, 2, 3, 1)


def _targets(images: Tensor, resolution: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Straight RGBA frames [V, H, W, 4] -> over white [V, S, S, 3] and alpha [V, S, S, 1] at `resolution`."""
    # Over white first (nerf's helper, no resizing there), then resized: up or down to the render size
    over_white, alpha_full = frames_over_white(images, images.shape[1])  # [V, H, W, 3], [V, H, W, 1]
    frames = _resize(torch.cat([over_white, alpha_full], dim=-1), resolution).to(device)
    return frames[..., :3], frames[..., 3:]


@dataclass
class FrameErrorMaps:
    rgb: Tensor  # [V, S, S] squared RGB error over white per pixel (mean over the channels)
    mask: Tensor  # [V, S, S] squared coverage error per pixel
    depth: Tensor  # [V, S, S] the render's depth along the viewing axis, 0 where it covers nothing


@torch.no_grad()
def frame_error_maps(
    result: RefineResult,
    images: Tensor,  # [V, H, W, 4] straight RGBA frames in [0, 1]
    cameras: Cameras,  # V cameras of the frames
    resolution: int,  # frames compared at this size (the refinement's render_resolution)
    views_per_batch: int = 4,
) -> FrameErrorMaps:
    """Per-pixel errors of the refined surface's renders against all the frames, and its depth there."""
    vertices, faces = result.geometry.extract()
    device = vertices.device
    target_rgb, target_alpha = _targets(images, resolution, device)
    cameras = cameras.to(device)
    topology = edge_topology(faces)
    rgb, mask, depth = [], [], []
    for start in range(0, len(cameras), views_per_batch):
        views = torch.arange(start, min(start + views_per_batch, len(cameras)), device=device)
        out = render_surface(
            vertices,
            faces,
            result.color,
            cameras[views],
            resolution,
            with_normals=False,
            topology=topology,
            with_depth=True,
        )
        rgb.append((out.image - target_rgb[views]).pow(2).mean(-1))
        mask.append((out.alpha - target_alpha[views]).pow(2)[..., 0])
        depth.append(out.depth[..., 0])
    return FrameErrorMaps(rgb=torch.cat(rgb), mask=torch.cat(mask), depth=torch.cat(depth))


def frame_errors(maps: FrameErrorMaps) -> dict[str, float]:
    """{"rgb": mean squared RGB error (over white), "mask": mean squared coverage error} over every pixel of
    every view (their sum: the reconstruction loss with unit weights)."""
    return {"rgb": float(maps.rgb.mean()), "mask": float(maps.mask.mean())}


def refine_surface(
    images: Tensor,  # [V, H, W, 4] straight RGBA frames in [0, 1]
    cameras: Cameras,  # V cameras of the frames (SV3D order when guidance is used)
    init_sdf: Tensor,  # [N] SDF at the tet grid's vertices (< 0 inside), e.g. from the NeRF's mesh
    config: RefineConfig | None = None,
    guidance: Guidance | None = None,  # masked SDS from the diffusion model, or None
    device: torch.device | str = "cpu",
    progress: Callable[[int, dict[str, float]], None] | None = None,  # called after every step
    floor_height: float | None = None,  # the floor cut's height when known (the NeRF stage's); None: measured
) -> RefineResult:
    """Optimise the DMTet surface and its colour so that renders reproduce the frames.

    With `config.floor_cut`, the surface is cut flat at `floor_height` and kept above it; without a height,
    at the height down to which every frame sees the init's surface on the tet grid (`refine.floor`)."""
    config = config or RefineConfig()
    # 1. Check inputs
    if images.ndim != 4 or images.shape[-1] != 4 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must be square [V, H, W, 4] RGBA, got {tuple(images.shape)}")
    if len(cameras) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} frames but {len(cameras)} cameras")
    if config.steps < 1 or config.views_per_step < 1:
        raise ValueError(
            f"steps and views_per_step must be >= 1, got {config.steps} and {config.views_per_step}"
        )
    device = torch.device(device)
    with _repeatable(device):
        return _optimise(images, cameras, init_sdf, config, guidance, device, progress, floor_height)


@contextmanager
def _repeatable(device: torch.device) -> Iterator[None]:
    """On CPU, runs with the same seed repeat bit for bit: the backward of every indexed gather (`x[index]`)
    adds into its source from threads in any order unless torch's deterministic algorithms are on (those
    sort first). The setting is process-wide: on for the loop, off again after it. Measured on 2 cores: a
    2M-index gather's backward no slower, a default refinement step within the run-to-run noise. CUDA
    keeps torch's defaults (atomic adds)."""
    if device.type != "cpu" or torch.are_deterministic_algorithms_enabled():
        yield
        return
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


def _optimise(
    images: Tensor,  # [V, H, W, 4]
    cameras: Cameras,
    init_sdf: Tensor,  # [N]
    config: RefineConfig,
    guidance: Guidance | None,
    device: torch.device,
    progress: Callable[[int, dict[str, float]], None] | None,
    floor_height: float | None,
) -> RefineResult:
    """refine_surface's optimisation, its inputs checked."""
    torch.manual_seed(config.seed)

    # 2. Geometry from the init, colour field, targets at the working resolution
    geometry = DMTetGeometry(config.tet).to(device)
    geometry.init_from_sdf(init_sdf)  # ValueError when empty or reaching the grid's boundary
    # The colour field covers at least the tet grid (a wider grid, refine.tet.bound, would otherwise read
    # the clamped colours of the field's cube beyond its bound).
    color_config = replace(config.color, bound=max(config.color.bound, config.tet.bound))
    color = ColorField(color_config).to(device)
    target_rgb, target_alpha = _targets(images, config.render_resolution, device)  # [V, S, S, 3], [.., 1]
    cameras = cameras.to(device)
    optimizer = torch.optim.Adam(
        [
            {"params": [geometry.sdf], "lr": config.lr_sdf},
            {"params": [geometry.deformation], "lr": config.lr_deformation},
            {"params": color.parameters(), "lr": config.lr_color},
        ],
        betas=(0.9, 0.99),
        eps=1e-15,
    )
    sds_start = config.steps - sds_phase_steps(config) if guidance else config.steps
    guidance_takes_points = guidance is not None and _takes_points(guidance)
    n_views = images.shape[0]
    detach = not config.color_moves_geometry  # colour-field queries at detached surface points
    history: list[dict[str, float]] = []
    floor = None
    if config.floor_cut:
        floor = _cut_floor(geometry, cameras, config.render_resolution, floor_height)

    # 3. Optimisation loop
    started = time.perf_counter()
    for step in range(config.steps):
        vertices, faces = geometry.extract()  # [M, 3], [K, 3]
        if faces.shape[0] == 0:
            raise SurfaceVanishedError(f"step {step}: the surface vanished (every SDF value is positive)")
        pick = torch.randperm(n_views, device=device)[: config.views_per_step]
        topology = edge_topology(faces)  # [K, 3] the face across each edge: antialiasing, normal consistency
        out = render_surface(
            vertices,
            faces,
            color,
            cameras[pick],
            config.render_resolution,
            detach,
            with_normals=False,
            topology=topology,
        )
        losses = {
            "rgb": (out.image - target_rgb[pick]).pow(2).mean(),
            "mask": (out.alpha - target_alpha[pick]).pow(2).mean(),
        }
        smooth = config.lambda_albedo_smooth > 0 and step < config.albedo_smooth_until * config.steps
        if color.shaded and smooth:
            losses["albedo_smooth"] = albedo_smoothness(
                color.albedo, out.points, config.albedo_samples, config.albedo_jitter, config.albedo_cap
            )
        if config.lambda_normal > 0:
            losses["normal"] = normal_consistency_loss(vertices, faces, topology)
        if config.lambda_laplacian > 0:
            losses["laplacian"] = laplacian_loss(vertices, faces)
        if config.lambda_sdf_sign > 0:
            losses["sdf_sign"] = sdf_sign_regulariser(geometry.sdf, geometry.band_edges)
        loss = sum(getattr(config, f"lambda_{name}") * value for name, value in losses.items())
        if guidance is not None and step >= sds_start:
            full = render_surface(
                vertices,
                faces,
                color,
                cameras,
                config.sds_resolution,
                detach,
                topology=topology,
                with_point_image=guidance_takes_points,
            )
            extra = {"points": full.point_image} if guidance_takes_points else {}
            sds = guidance(full.image, full.alpha, full.normals, step=step - sds_start, **extra)
            losses["sds"] = sds["loss_sds"]
            loss = loss + config.lambda_sds * losses["sds"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        geometry.keep_off_boundary()  # a surface pushed into the grid's boundary stays closed
        if floor is not None and floor["height"] is not None:
            _keep_above(geometry, floor["height"])
        record = {"step": step + 1, "loss": loss.item(), **{k: v.item() for k, v in losses.items()}}
        record["psnr"] = -10.0 * math.log10(max(record["rgb"], 1e-12))
        record["faces"] = int(faces.shape[0])
        if (step + 1) % 25 == 0 or step + 1 == config.steps:
            history.append(record)
        if progress is not None:
            progress(step + 1, record)
    seconds = time.perf_counter() - started
    with torch.no_grad():  # the last step's update may have emptied it: no step after it would say so
        if geometry.extract()[1].shape[0] == 0:
            raise SurfaceVanishedError(
                f"step {config.steps}: the surface vanished (every SDF value is positive)"
            )
    return RefineResult(geometry=geometry, color=color.eval(), history=history, seconds=seconds, floor=floor)


def _cut_floor(geometry: DMTetGeometry, cameras: Cameras, resolution: int, height: float | None) -> dict:
    """Cut the surface below `height`, or when None below the height every view sees it down to; a record
    of the cut (height None: no view sees the surface, or the cut would leave nothing: nothing is cut, now
    or later)."""
    source = "given"
    if height is None:
        source = "measured on the init"
        with torch.no_grad():
            vertices, faces = geometry.extract()
        height = seen_floor_height(vertices, faces, cameras, resolution)
    if height is None:
        return {"height": None, "removed": 0.0, "skipped": "no view sees the surface"}
    try:
        return {"height": height, "removed": geometry.cut_below(height), "source": source}
    except ValueError as exc:
        return {"height": None, "removed": 0.0, "skipped": str(exc)}


def _keep_above(geometry: DMTetGeometry, height: float) -> None:
    """Project the surface above the floor after a step (what a step moved under it is cut)."""
    try:
        geometry.cut_below(height)
    except ValueError:  # the whole surface went under it in one step (cut_below changed nothing): left
        # as it was, the floor would be off for every later step while refine.json reports it applied
        raise SurfaceVanishedError(f"the surface sank below the floor cut at z = {height:.4g}") from None
