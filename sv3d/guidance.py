"""Masked score-distillation (SDS) guidance from the SV3D model, handed to `refine` as a plain callable.

What it does, per call, for the V renders of the orbit's cameras (SV3D frame order, the last is the input
view): encode them with the SV3D VAE, noise them at one EDM noise level sigma, denoise them with the
camera-conditioned video UNet (classifier-free guided, no gradient), and return a loss whose gradient
with respect to the latents is `w(sigma) * mask * (latents - denoised)`. `refine` never imports `sv3d`:
it receives `SDSGuidance.__call__` as a function of (images, alpha, normals) returning a dict of losses.

References
----------
* Score distillation: Poole et al. 2022, "DreamFusion", eq. 3 (grad = w(t) (eps_hat - eps) dz/dtheta);
  in latent space as Metzer et al. 2023 ("Latent-NeRF"). The `target = (latents - grad).detach()`
  reparameterisation is threestudio's (`models/guidance/stable_diffusion_guidance.py`).
* Masked SDS: Voleti et al. 2024, "SV3D", sec. 5 (3D generation): in the last part of the mesh (DMTet)
  stage, SDS from SV3D is applied to rendered orbit views only where the surface is poorly seen from the
  input view, with a soft visibility mask built from the rendered surface normal and the input view
  direction. The paper's exact thresholds could not be checked offline; ours are stated in
  `visibility_mask` and are config entries (`mask_low`, `mask_high`).
* Weighting: the SV3D authors' own SDS code (claforte/threestudio, branch `chunhan/sv3d`,
  `threestudio/models/guidance/svd_guidance.py`, `__call__`) uses the plain difference between the
  denoised prediction and the input, with no w(sigma): our default `weighting="x0"`. DreamFusion's
  w(t) = 1 - alpha_bar_t is available as `weighting="sds"` (derivation at `_sigma_weight`).
* Denoiser, sigmas and CFG: the reference sampler, reproduced in `sv3d/model/sampler.py` (v-prediction
  with EDM scalings, sigma in [0.002, 700], per-frame triangle CFG scales 1 -> 2.5 -> 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor

from .cameras import FOV_DEG, NUM_FRAMES, Orbit, focal_from_fov, static_orbit
from .errors import InputError
from .model.conditioner import concat_for_cfg
from .model.pipeline import SV3DPipeline
from .model.sampler import apply_guidance, triangle_guidance_scales
from .model.vae import encode_mean

__all__ = [
    "SDSConfig",
    "SDSGuidance",
    "SDSModel",
    "SV3DSDSModel",
    "input_view_direction",
    "make_sv3d_guidance",
    "seen_from_input",
    "smoothstep",
    "visibility_mask",
]

EDM_SIGMA_MIN = 0.002  # SV3D's EDMDiscretization range (sgm config): what the denoiser was trained on
EDM_SIGMA_MAX = 700.0
WEIGHTINGS = ("x0", "sds")


# ------------------------------------------------------------------------------------------------
# The model interface
# ------------------------------------------------------------------------------------------------


@runtime_checkable
class SDSModel(Protocol):
    """What SDS needs from a diffusion model; conditioning (input image, cameras) is fixed at construction.

    `encode` must be differentiable with respect to its input; `denoise` is called under `no_grad`.
    """

    num_frames: int | None  # views per call, in the cameras' order (21 for SV3D); None: any number
    resolution: int | None  # square image size `encode` expects (576 for SV3D); None: any size
    sigma_min: float  # the denoiser's trained EDM noise range; SDS draws sigma inside it
    sigma_max: float

    def encode(self, images: Tensor) -> Tensor:
        """images [V, 3, H, W] in [-1, 1] -> latents [V, C, h, w] (differentiable)."""
        ...

    def denoise(self, latents: Tensor, sigma: Tensor) -> Tensor:
        """D(x, sigma): noisy latents [V, C, h, w] (x = z + sigma * n), sigma [V] -> denoised [V, C, h, w]."""
        ...


class SV3DSDSModel:
    """`SDSModel` over our `SV3DPipeline`: VAE-mean encoder, CFG-guided video denoiser, cameras fixed.

    The conditioning (CLIP embedding of the input image, its noise-augmented VAE latent, per-frame camera
    embeddings) is computed ONCE here, as the sampler does at the start of a run.
    """

    def __init__(
        self,
        pipeline: SV3DPipeline,
        image: Tensor,  # [1, 3, S, S] in [-1, 1]: the input view on white, S a multiple of 8 (576 real)
        polars_rad: Tensor | None = None,  # [T] sv3d_p only: Orbit.model_conditioning()[0]
        azimuths_rad: Tensor | None = None,  # [T] sv3d_p only, relative to the last (input) frame
        *,
        guidance_scale: float | None = None,  # None: the model's triangle scales (1 at both ends, 2.5 mid)
        num_frames: int = 21,  # SV3D's orbit length; the UNet's temporal layers mix exactly these frames
        cond_aug: float = 1e-5,  # the reference's cond-frame noise augmentation for SV3D
        seed: int = 23,  # draws the cond-augmentation noise (the reference script's default seed)
        cfg_batching: bool = True,  # uncond and cond rows in one UNet call (faster) or two (less memory)
        encode_chunk: int = 3,  # frames per activation-checkpointed encoder call (0: no checkpointing)
    ) -> None:
        # 1. Check inputs
        if encode_chunk < 0:
            raise ValueError(f"encode_chunk must be >= 0, got {encode_chunk}")
        if image.ndim != 4 or image.shape[:2] != (1, 3) or image.shape[-1] != image.shape[-2]:
            raise ValueError(f"image must be [1, 3, S, S] in [-1, 1], got {tuple(image.shape)}")
        if image.shape[-1] % 8:
            raise ValueError(f"image size must be a multiple of 8 (the VAE's factor), got {image.shape[-1]}")
        has_cameras = polars_rad is not None or azimuths_rad is not None
        if pipeline.variant == "sv3d_p" and (polars_rad is None or azimuths_rad is None):
            raise ValueError("sv3d_p needs the orbit's cameras: give polars_rad and azimuths_rad")
        if pipeline.variant == "sv3d_u" and has_cameras:
            raise ValueError(
                "sv3d_u takes no cameras (its orbit is fixed): pass polars_rad=azimuths_rad=None"
            )
        if pipeline.offload_device is not None:
            raise ValueError("SV3DSDSModel needs every component on one device: CPU offload is not supported")
        if guidance_scale is not None and not guidance_scale >= 1.0:
            raise ValueError(f"guidance_scale must be >= 1 (or None for the triangle), got {guidance_scale}")
        self.pipeline = pipeline
        self.num_frames = int(num_frames)
        self.resolution = int(image.shape[-1])
        self.sigma_min, self.sigma_max = EDM_SIGMA_MIN, EDM_SIGMA_MAX
        self.cfg_batching = cfg_batching
        self.encode_chunk = int(encode_chunk)
        self.device = next(pipeline.unet.parameters()).device

        # 2. Conditioning, once: [uncond ; cond] rows, unconditional first, as the sampler batches them
        noise = torch.randn(image.shape, generator=torch.Generator("cpu").manual_seed(seed))  # [1, 3, S, S]
        cond, uncond = pipeline.conditioning(
            image.to(self.device, torch.float32),
            noise.to(self.device),
            cond_aug,
            self.num_frames,
            polars_rad,
            azimuths_rad,
        )
        self._batched = concat_for_cfg(uncond, cond).to(self.device, pipeline.dtype)  # [2T, ...]
        if guidance_scale is None:
            scales = triangle_guidance_scales(self.num_frames)  # [T]
        else:
            scales = torch.full((self.num_frames,), float(guidance_scale))  # [T]
        self.scales = scales.to(self.device)
        self._cond_only = bool((scales == 1.0).all())  # scale 1 everywhere: D = D_cond, skip the uncond rows

    def encode(self, images: Tensor) -> Tensor:
        """images [V, 3, S, S] in [-1, 1] -> scaled latents [V, 4, S/8, S/8]: posterior mean * 0.18215.

        The deterministic mean (no posterior sample) keeps the SDS gradient free of VAE noise; the
        scaling puts the latents where the sampler's latents live.
        """
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (self.resolution,) * 2:
            expected = f"[V, 3, {self.resolution}, {self.resolution}]"
            raise ValueError(f"images must be {expected} in [-1, 1], got {tuple(images.shape)}")
        vae = self.pipeline.vae
        chunk = self.encode_chunk
        if chunk == 0 or chunk >= images.shape[0] or not (torch.is_grad_enabled() and images.requires_grad):
            return encode_mean(vae, images) * vae.config.scaling_factor  # [V, 4, h, w]
        # Activation checkpointing per chunk of frames: the backward pass keeps one chunk's encoder
        # activations (float32, full resolution: GBs a frame at 576^2) instead of all V frames', for one
        # more encoder forward. Same values and gradients (tested).
        parts = [
            torch.utils.checkpoint.checkpoint(encode_mean, vae, piece, use_reentrant=False)
            for piece in images.split(chunk)
        ]  # [chunk, 4, h, w] each
        return torch.cat(parts) * vae.config.scaling_factor  # [V, 4, h, w]

    @torch.no_grad()
    def denoise(self, latents: Tensor, sigma: Tensor) -> Tensor:
        """Guided D(x, sigma) [T, 4, h, w] float32 for noisy latents x [T, 4, h, w] and sigma [T]."""
        if latents.shape[0] != self.num_frames or sigma.shape != (self.num_frames,):
            raise ValueError(
                f"denoise: expected {self.num_frames} frames, got latents {tuple(latents.shape)} "
                f"and sigma {tuple(sigma.shape)}"
            )
        x = latents.to(self.device, torch.float32)  # [T, 4, h, w]
        sigma = sigma.to(self.device, torch.float32)  # [T]
        t = self.num_frames
        if self._cond_only:
            return self.pipeline.denoise(x, sigma, self._batched.rows(slice(t, 2 * t)), t)
        if self.cfg_batching:
            both = self.pipeline.denoise(torch.cat([x, x]), torch.cat([sigma, sigma]), self._batched, t)
            d_uncond, d_cond = both.chunk(2)  # [2T, ...] -> 2 x [T, ...]
        else:
            d_uncond = self.pipeline.denoise(x, sigma, self._batched.rows(slice(0, t)), t)
            d_cond = self.pipeline.denoise(x, sigma, self._batched.rows(slice(t, 2 * t)), t)
        return apply_guidance(d_uncond, d_cond, self.scales, t)  # [T, 4, h, w]


# ------------------------------------------------------------------------------------------------
# Config, mask, guidance
# ------------------------------------------------------------------------------------------------


@dataclass
class SDSConfig:
    """Masked SDS settings. Sigmas are EDM noise levels of the (0.18215-scaled) latents."""

    weight: float = 1.0  # lambda_sds: scales the gradient and the loss; balance it against refine's losses
    resolution: int = 576  # renders are resized to this before encoding: SV3D's size (the tiny fixture: 64)
    # sigma ~ log-uniform in [sigma_min, upper], upper annealed geometrically from sigma_max to
    # sigma_max_final over anneal_steps calls. [0.1, 10] is about threestudio's t in [0.02, 0.98] of Stable
    # Diffusion's schedule (sigma = sqrt((1 - abar) / abar) = 0.13 .. 14), and ending at 2 mirrors its
    # annealing of max_step_percent towards 0.5 (sigma 1.6): late refinement wants detail, not new shape.
    sigma_min: float = 0.1
    sigma_max: float = 10.0
    sigma_max_final: float = 2.0
    anneal_steps: int = 1000  # calls over which the upper bound moves; sv3d refine: its SDS phase's length
    # "x0": w = 1 (as the SV3D authors' code, whose loss compares the decoded denoised frames with the renders
    # in RGB; ours compares latents); "sds": DreamFusion's w = 1 - abar
    weighting: str = "x0"
    guidance_scale: float | None = None  # CFG; None: SV3D's per-frame triangle (1 -> 2.5 -> 1)
    mask: bool = True  # SV3D's masked SDS: only where the input view saw the surface poorly
    # Visible-from-input weight: smoothstep(mask_low, mask_high, n . d_in); mask = 1 - that. With (0, 0.5),
    # surfaces turned away from the input camera get 1, those within 60 deg of facing it get 0.
    mask_low: float = 0.0
    mask_high: float = 0.5
    background_weight: float = 0.0  # mask value off the object (alpha 0): the frames' silhouettes rule there
    # Occlusion: a surface point counts as seen from the input view only where it is no farther from the
    # input camera than the input view's own render there (+ this, in world units; the object's radius is
    # 0.5): the far inside wall of a cup faces the input camera but its near wall hides it. Needs the
    # renders' surface points (`points=`) and the input camera (make_sv3d_guidance gives both); None: off.
    occlusion_tolerance: float | None = 0.02
    seed: int = 0  # sigma and noise draws (a CPU generator: the same numbers on every device)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.weight) and self.weight >= 0.0):
            raise ValueError(f"SDSConfig.weight must be a finite number >= 0, got {self.weight}")
        if (
            isinstance(self.resolution, bool)
            or int(self.resolution) != self.resolution
            or self.resolution < 8
        ):
            raise ValueError(f"SDSConfig.resolution must be an integer >= 8, got {self.resolution}")
        if self.resolution % 8:
            raise ValueError(f"SDSConfig.resolution must be a multiple of 8, got {self.resolution}")
        if not 0.0 < self.sigma_min <= self.sigma_max_final <= self.sigma_max:
            raise ValueError(
                "SDSConfig sigmas: expected 0 < sigma_min <= sigma_max_final <= sigma_max, got "
                f"{self.sigma_min}, {self.sigma_max_final}, {self.sigma_max}"
            )
        if self.anneal_steps < 1:
            raise ValueError(f"SDSConfig.anneal_steps must be >= 1, got {self.anneal_steps}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"SDSConfig.weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.guidance_scale is not None and not self.guidance_scale >= 1.0:
            raise ValueError(f"SDSConfig.guidance_scale must be >= 1 or None, got {self.guidance_scale}")
        if not 0.0 <= self.mask_low < self.mask_high <= 1.0:
            raise ValueError(
                f"SDSConfig mask edges: expected 0 <= mask_low < mask_high <= 1, got "
                f"{self.mask_low}, {self.mask_high}"
            )
        if not 0.0 <= self.background_weight <= 1.0:
            raise ValueError(f"SDSConfig.background_weight must be in [0, 1], got {self.background_weight}")
        tol = self.occlusion_tolerance
        if tol is not None and not (math.isfinite(tol) and tol > 0.0):
            raise ValueError(f"SDSConfig.occlusion_tolerance must be a finite number > 0 or None, got {tol}")


def smoothstep(edge0: float, edge1: float, x: Tensor) -> Tensor:
    """GLSL smoothstep: 0 below edge0, 1 above edge1, 3t^2 - 2t^3 between; t = (x - e0) / (e1 - e0)."""
    t = ((x - edge0) / (edge1 - edge0)).clamp(0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def visibility_mask(
    normals: Tensor,  # [V, H, W, 3] world unit normals (0 where empty), as refine.render gives them
    alpha: Tensor,  # [V, H, W, 1] coverage in [0, 1]
    input_view_dir: Tensor,  # [3] unit vector from the object towards the input camera
    low: float = 0.0,
    high: float = 0.5,
    background: float = 0.0,
    unoccluded: Tensor | None = None,  # [V, H, W, 1] bool: in the input camera's line of sight (None: all)
) -> Tensor:
    """Soft "poorly seen from the input view" weight [V, H, W, 1] in [0, 1] (no gradient).

    mask = alpha * (1 - smoothstep(low, high, n . d_in) * unoccluded) + (1 - alpha) * background.
    n . d_in <= low (facing away from the input camera, or edge-on): 1; >= high: 0; smooth between; and 1
    where something else hides the surface from the input camera (`unoccluded`, from `seen_from_input`).
    A direction instead of per-pixel view rays: the input camera is 2 object radii away, so rays to it
    differ from d_in by at most ~15 degrees, and the mask is soft anyway.
    """
    d = input_view_dir.to(device=normals.device, dtype=normals.dtype)
    n = normals.detach()
    facing = (n * d).sum(dim=-1, keepdim=True)  # [V, H, W, 1] = n . d_in
    seen_well = smoothstep(low, high, facing)  # [V, H, W, 1]
    if unoccluded is not None:
        seen_well = seen_well * unoccluded.to(seen_well.dtype)
    seen_poorly = 1.0 - seen_well
    # Antialiased silhouette pixels beside the covered ones have alpha > 0 but no normal (facing 0 would
    # read as edge-on: weight 1 whatever the surface there): they take the mean weight of the covered
    # pixels among their 3 x 3 neighbours.
    covered = (n.abs().sum(dim=-1, keepdim=True) > 0).to(n.dtype)  # [V, H, W, 1]
    beside = _mean_3x3(seen_poorly * covered) / _mean_3x3(covered).clamp(min=1e-6)  # 0 with none beside
    seen_poorly = torch.where(covered > 0, seen_poorly, beside)
    a = alpha.detach().clamp(0.0, 1.0)
    return a * seen_poorly + (1.0 - a) * background


def seen_from_input(
    points: Tensor,  # [V, H, W, 3] world surface points of the renders (anything where not covered)
    covered: Tensor,  # [V, H, W, 1] bool: a surface is drawn there
    input_index: int,  # which render is the input view's
    input_c2w: Tensor,  # [4, 4] the input camera, OpenGL convention (looks along -z, y up)
    fov_deg: float,  # the renders' field of view (square images)
    tolerance: float,  # world units a point may lie behind the input view's surface and still count as seen
) -> Tensor:
    """[V, H, W, 1] bool: the surface point is covered and in the input camera's line of sight.

    Each covered pixel's point is projected into the input view and compared with the depth of the input
    view's own render at that pixel, plus `tolerance` and 1.5 of the input view's pixels at that depth
    (the nearest pixel's centre is up to 0.7 pixel from the point: a slanted surface's depth changes by
    that much across it). Within a pixel of an occluder's outline either answer can come out; on the
    surfaces turned towards the input camera it agrees with ray casting at 98-99% of the pixels
    (tests/test_guidance.py). A point outside the input view's frame or behind its camera is not seen.
    """
    n_views, height, width, _ = points.shape
    mask = covered[..., 0]  # [V, H, W]
    c2w = input_c2w.to(device=points.device, dtype=torch.float32)
    cam = (points.detach()[mask].float() - c2w[:3, 3]) @ c2w[:3, :3]  # [P, 3] camera coordinates
    depth = -cam[:, 2]  # [P] along the viewing axis
    focal = focal_from_fov(fov_deg, width)  # pixels (square pixels: the same for the height)
    col = (0.5 * width + focal * cam[:, 0] / depth.clamp(min=1e-6)).floor()
    row = (0.5 * height - focal * cam[:, 1] / depth.clamp(min=1e-6)).floor()
    inside = (depth > 1e-6) & (col >= 0) & (col < width) & (row >= 0) & (row < height)
    all_depth = torch.full(mask.shape, float("inf"), device=points.device)  # [V, H, W], inf where empty
    all_depth[mask] = depth
    own = all_depth[input_index]  # [H, W] the input view's own render
    ref = own[row.clamp(0, height - 1).long(), col.clamp(0, width - 1).long()]  # [P]
    slack = tolerance + 1.5 * depth / focal  # world units
    seen = torch.zeros_like(mask)
    seen[mask] = inside & (depth <= ref + slack)
    return seen[..., None]


def _mean_3x3(images: Tensor) -> Tensor:
    """[V, H, W, C] -> the mean over each pixel's 3 x 3 neighbourhood (zeros beyond the border)."""
    return F.avg_pool2d(images.permute(0, 3, 1, 2), 3, stride=1, padding=1).permute(0, 2, 3, 1)


def input_view_direction(orbit: Orbit) -> Tensor:
    """[3] float32 unit vector from the origin towards the orbit's input camera (its LAST frame)."""
    position = orbit.c2w()[-1, :3, 3]  # [3]
    return position / position.norm()


def _sigma_weight(sigma: float, weighting: str) -> float:
    """w(sigma) multiplying (latents - D).

    "x0": 1. "sds": DreamFusion's w(t) (eps_hat - eps) with w(t) = 1 - abar_t, rewritten for the EDM
    denoiser. With sigma = sqrt((1 - abar) / abar), z_t / sqrt(abar) = x + sigma eps, and
    eps_hat = (z_t / sqrt(abar) - D) / sigma, so eps_hat - eps = (x - D) / sigma and
    1 - abar = sigma^2 / (1 + sigma^2): w (eps_hat - eps) = sigma / (1 + sigma^2) (x - D).
    """
    return 1.0 if weighting == "x0" else sigma / (1.0 + sigma * sigma)


class SDSGuidance:
    """Masked SDS as a callable for `refine`: (images, alpha, normals, step=, points=) -> {"loss_sds": ...}.

    Holds the model, the config, the input view direction, a seeded CPU generator and a call counter
    (which drives the sigma annealing unless `step` is given).
    """

    def __init__(
        self,
        model: SDSModel,
        config: SDSConfig,
        input_view_dir: Tensor,  # [3] from the object towards the input camera (input_view_direction)
        input_view_index: int | None = None,  # the renders' input view (SV3D's orbits: the last), None: none
        input_c2w: Tensor | None = None,  # [4, 4] the input camera, for the occlusion test (with the index)
        fov_deg: float = FOV_DEG,  # the renders' field of view
    ) -> None:
        if not isinstance(model, SDSModel):
            raise ValueError(
                f"model must implement SDSModel (encode, denoise, ...), got {type(model).__name__}"
            )
        if model.resolution is not None and model.resolution != config.resolution:
            raise ValueError(
                f"SDSConfig.resolution {config.resolution} differs from the model's {model.resolution}"
            )
        if config.sigma_min < model.sigma_min or config.sigma_max > model.sigma_max:
            raise ValueError(
                f"SDSConfig sigma range [{config.sigma_min}, {config.sigma_max}] leaves the model's "
                f"[{model.sigma_min}, {model.sigma_max}]"
            )
        d = torch.as_tensor(input_view_dir, dtype=torch.float32).detach().cpu()
        if d.shape != (3,) or not bool(torch.isfinite(d).all()) or float(d.norm()) < 1e-6:
            raise ValueError(f"input_view_dir must be a finite non-zero [3] vector, got {d.tolist()}")
        self.model = model
        self.config = config
        self.input_view_dir = d / d.norm()  # [3]
        self.input_view_index = input_view_index
        if input_c2w is not None:
            input_c2w = torch.as_tensor(input_c2w, dtype=torch.float32).detach().cpu()
            if input_c2w.shape != (4, 4) or not bool(torch.isfinite(input_c2w).all()):
                raise ValueError(f"input_c2w must be a finite [4, 4] matrix, got {tuple(input_c2w.shape)}")
            if input_view_index is None:
                raise ValueError(
                    "input_c2w needs input_view_index: the occlusion test reads the input view's render"
                )
        if not 0.0 < float(fov_deg) < 180.0:
            raise ValueError(f"fov_deg must be in (0, 180), got {fov_deg}")
        self.input_c2w = input_c2w
        self.fov_deg = float(fov_deg)
        self.reset()

    def reset(self) -> None:
        """Start the sigma and noise draws and the call counter again (each refinement start gets the same
        draws, so that starts compared with each other differ by their surfaces only)."""
        self.generator = torch.Generator("cpu").manual_seed(self.config.seed)
        self.num_calls = 0

    def sigma_bounds(self, step: int) -> tuple[float, float]:
        """(lower, upper) of the sigma draw at `step`: the upper bound moves geometrically, then stays."""
        c = self.config
        progress = min(max(step, 0) / c.anneal_steps, 1.0)
        upper = math.exp((1.0 - progress) * math.log(c.sigma_max) + progress * math.log(c.sigma_max_final))
        return c.sigma_min, upper

    def __call__(
        self,
        images: Tensor,  # [V, H, W, 3] in [0, 1], composited on white, from the orbit's cameras in order
        alpha: Tensor,  # [V, H, W, 1] coverage
        normals: Tensor,  # [V, H, W, 3] world unit normals, 0 where empty
        step: int | None = None,  # annealing step; None: the number of earlier calls
        points: Tensor | None = None,  # [V, H, W, 3] world surface points: the mask's occlusion test
    ) -> dict[str, Tensor]:
        c = self.config
        # 1. Check inputs
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [V, H, W, 3] in [0, 1], got {tuple(images.shape)}")
        v, h, w = images.shape[:3]
        if alpha.shape != (v, h, w, 1):
            raise ValueError(f"alpha must be [{v}, {h}, {w}, 1] like images, got {tuple(alpha.shape)}")
        if normals.shape != (v, h, w, 3):
            raise ValueError(f"normals must be [{v}, {h}, {w}, 3] like images, got {tuple(normals.shape)}")
        if points is not None and points.shape != (v, h, w, 3):
            raise ValueError(f"points must be [{v}, {h}, {w}, 3] like images, got {tuple(points.shape)}")
        if self.model.num_frames is not None and v != self.model.num_frames:
            raise ValueError(
                f"got {v} views but the model's orbit has {self.model.num_frames} frames "
                "(render every orbit camera, in the orbit's order, the input view last)"
            )
        if step is None:
            step = self.num_calls
        self.num_calls += 1

        # 2. Soft visibility mask at the render resolution (no gradient)
        if c.mask:
            unoccluded = None
            occlusion_test = c.occlusion_tolerance is not None and self.input_c2w is not None
            if occlusion_test and points is not None and self.input_view_index is not None:
                covered = normals.detach().abs().sum(dim=-1, keepdim=True) > 0  # [V, H, W, 1]
                tol = c.occlusion_tolerance
                unoccluded = seen_from_input(
                    points, covered, self.input_view_index, self.input_c2w, self.fov_deg, tol
                )
            mask = visibility_mask(
                normals, alpha, self.input_view_dir, c.mask_low, c.mask_high, c.background_weight, unoccluded
            )  # [V, H, W, 1]
            if self.input_view_index is not None:  # the input view saw everything its render shows
                i = self.input_view_index
                mask[i] = (1.0 - alpha[i].detach().clamp(0.0, 1.0)) * c.background_weight
        else:
            mask = torch.ones_like(alpha.detach())

        # 3. Renders to the model's input: [V, H, W, 3] in [0, 1] -> [V, 3, S, S] in [-1, 1]
        x = images.permute(0, 3, 1, 2)  # [V, 3, H, W]
        if c.mask and x.requires_grad:
            # The latent mask alone leaks: the encoder's self-attention carries a masked-in latent's
            # gradient back to every pixel, including those the input view saw well and the background.
            # So the render gradient is confined to the mask's support too (its support only: the soft
            # weights are the latent mask's, and multiplied again they would square).
            support = (mask.permute(0, 3, 1, 2) > 0).to(x)  # [V, 1, H, W]
            x.register_hook(lambda g: g * support)
        size = c.resolution
        if (h, w) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=h > size)
        x = x * 2.0 - 1.0

        # 4. Encode (differentiable)
        latents = self.model.encode(x)  # [V, C, s, s]
        if latents.ndim != 4 or latents.shape[0] != v:
            raise ValueError(f"model.encode returned {tuple(latents.shape)} for {v} views")
        if not bool(torch.isfinite(latents).all()):  # non-finite renders: no SDS this step (its gradient
            # would carry the NaN back through the encoder to every parameter)
            zero = latents.new_zeros(())
            loss = latents.new_zeros((), requires_grad=True)  # backward() works and reaches nothing
            return {"loss_sds": loss, "mask_mean": zero, "sigma": torch.tensor(0.0), "grad_norm": zero}
        mask_lat = F.interpolate(mask.permute(0, 3, 1, 2), latents.shape[-2:], mode="area")  # [V, 1, s, s]
        mask_lat = mask_lat.to(latents)

        # 5. One noise level for the whole orbit (the video model is trained with one sigma per video),
        #    log-uniform in the annealed range; noise and sigma from the CPU generator.
        lo, hi = self.sigma_bounds(step)
        u = float(torch.rand((), generator=self.generator))
        sigma = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
        noise = torch.randn(latents.shape, generator=self.generator).to(latents)  # [V, C, s, s]
        sigmas = latents.new_full((v,), sigma)  # [V]
        with torch.no_grad():
            noisy = latents.detach() + sigma * noise  # EDM: x = z + sigma n
            denoised = self.model.denoise(noisy, sigmas).to(latents)  # [V, C, s, s]

        # 6. Masked SDS gradient on the latents
        grad = c.weight * _sigma_weight(sigma, c.weighting) * mask_lat * (latents.detach() - denoised)
        # a NaN or inf from one bad pixel must not poison every parameter (nan_to_num would make inf huge)
        grad = torch.where(torch.isfinite(grad), grad, torch.zeros_like(grad))

        # 7. Reparameterisation (threestudio): with target = (latents - grad).detach(),
        #    loss = 0.5 * sum((latents - target)^2) / V has d loss / d latents = (latents - target) / V
        #    = grad / V: the SDS gradient, averaged over views, pushed through the encoder by autograd.
        target = (latents - grad).detach()
        loss = 0.5 * F.mse_loss(latents, target, reduction="sum") / v
        return {
            "loss_sds": loss,
            "mask_mean": mask_lat.mean().detach(),
            "sigma": torch.tensor(sigma),
            "grad_norm": grad.norm().detach(),
        }


def make_sv3d_guidance(
    pipeline: SV3DPipeline,
    image: Tensor,  # [1, 3, S, S] in [-1, 1], the input view, S == config.resolution
    orbit: Orbit,  # the cameras the renders come from, SV3D frame order (the last is the input view)
    config: SDSConfig | None = None,
    *,
    cfg_batching: bool = True,
) -> SDSGuidance:
    """The refine stage's SDS callable for this pipeline, input image and orbit.

    sv3d_p is conditioned on the orbit's angles (`Orbit.model_conditioning`); sv3d_u takes none and only
    fits its own static orbit at the input's elevation, which the caller must then render.
    """
    config = config or SDSConfig()
    _check_orbit_for(pipeline.variant, orbit)
    if image.ndim == 4 and image.shape[-1] != config.resolution:
        raise ValueError(
            f"image size {image.shape[-1]} differs from SDSConfig.resolution {config.resolution}"
        )
    polars, azimuths = orbit.model_conditioning() if pipeline.variant == "sv3d_p" else (None, None)
    model = SV3DSDSModel(
        pipeline,
        image,
        polars,
        azimuths,
        guidance_scale=config.guidance_scale,
        num_frames=len(orbit),
        seed=config.seed,
        cfg_batching=cfg_batching,
    )
    return SDSGuidance(
        model,
        config,
        input_view_direction(orbit),
        input_view_index=len(orbit) - 1,
        input_c2w=orbit.c2w()[-1],
        fov_deg=orbit.fov_deg,
    )


def _check_orbit_for(variant: str, orbit: Orbit) -> None:
    """SV3D denoises 21-frame orbits whose last frame is the input view; sv3d_u only its own static one
    (constant elevation, 360/21 degrees apart): other renders would be pulled towards another orbit."""
    if len(orbit) != NUM_FRAMES:
        raise InputError(f"SDS: SV3D denoises {NUM_FRAMES}-frame orbits, this one has {len(orbit)} frames")
    if variant != "sv3d_u":
        return
    own = static_orbit(float(orbit.elevations_deg[-1]), float(orbit.azimuths_deg[-1]))
    off_azimuth = ((orbit.azimuths_deg - own.azimuths_deg + 180.0) % 360.0 - 180.0).abs().max()
    off_elevation = (orbit.elevations_deg - own.elevations_deg).abs().max()
    if float(off_azimuth) > 0.5 or float(off_elevation) > 0.5:
        raise InputError(
            "SDS: sv3d_u takes no cameras and only knows its static orbit (constant elevation, frames "
            f"{360.0 / NUM_FRAMES:.2f} degrees apart); this orbit ({orbit.kind}) differs by "
            f"{float(off_azimuth):.1f} / {float(off_elevation):.1f} degrees: use sv3d_p, or --sds off"
        )
