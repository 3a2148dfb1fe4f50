"""Training a radiance field on an orbit's frames (SV3D paper, coarse stage: Instant-NGP NeRF on 21 views).

Losses: RGB composited over white against the frames over white, a mask loss between the rendered opacity
and the frames' alpha (SV3D's frames come with alpha by matting or rendering), and the distortion
regulariser of Mip-NeRF 360 (compact weights along each ray, fewer floaters). Adam, learning rate 1e-2 as
instant-ngp (the colour MLP's 1e-3, below); checkpoints hold everything needed to resume.

Two measures for the start of a fit, measured on the oracle orbits at the CPU defaults (seed 0, float32,
`scripts/check_nerf_oracle.py`, one run each):
- The colour MLP learns at a tenth of the rate (`color_lr_scale`, 0.1). At lr 1e-2 its logits ran away.
  Early in a fit the renders are paler than the frames (little opacity over white), so the colour's
  gradient says "darker" at every sample, step after step. Adam turns that same-signed gradient into
  full steps on every weight of the three layers, even once the sigmoid saturates. On `internal` with
  seed 1 the mean colour logit went from -1 at step 5 to -56 at step 20 and +114 at step 120 (saturated
  dark, then bright); training PSNR was 11 dB at step 120, in float32 and bfloat16 alike. bfloat16 never
  recovered (6 dB at the end); float32 did, late. At 1e-3 the logits stayed within +-2 and the PSNR was
  29.9 dB at step 120 (0.3 of lr: 30.0 dB; a slower density MLP as well: 21.4 dB).
- The first `silhouette_fraction` (0.08) of the steps fit the masks only. With the colour learning fast
  from step 1, a plain face is free to sit anywhere behind its silhouette: `internal`'s uniformly
  coloured -y face settled 0.04-0.09 inside the box (Chamfer 0.0152 -> 0.0227, at 0.3 of lr 0.0242).
  The run-away colour had hidden this: while it was saturated, the masks shaped the density. Fitting
  the masks first makes the start hull-like on purpose: `internal` 0.0171 with 100 such steps.

Sampling: on CUDA, when nerfacc's CUDA extension builds, nerfacc's occupancy-grid estimator (instant-ngp's
empty-space skipping: samples only in cells the field's density marks occupied, refreshed every 16 steps;
`sampler="auto"`); elsewhere `n_samples` samples per ray between the bounds. An `occupancy` grid from the
caller (the masks' visual hull) limits both: the estimator's cells are marked from density that is 0
outside it, and its samples outside it are dropped (a cell straddling the hull's border stays marked).
On the uniform path, `early_stop_eps` (opt-in; nerfacc's is 1e-4) skips the samples hidden behind a surface
(nerfacc's early stop, as its estimator does): a pass without gradients finds their transmittance, and it
is used while it hides more than 30% of the samples (checked every 50 steps). Off by default because its
speed-up is not established on 2 CPU cores: whole CPU fits, one run each, went 497 -> 331 s (checker) and
188 -> 168 s (mug) at the same Chamfer and PSNR, but back-to-back step timings at the end of a checker fit
(`scripts/bench_nerf.py`, part 3) measured 0.91x and 0.92x, and the machine's own speed drifted by ~25% in
that session.

Proposal sampling (`proposal_samples`, opt-in; uniform path, which `sampler="auto"` then takes on CUDA too,
and which `sampler="estimator"` refuses): the `n_samples` intervals are drawn from a
first pass without gradients at `proposal_samples` uniform samples (`render._proposal_edges`: half from its
weights, half spread over the hull), so they are short where the surface is. With 48 uniform samples over
the hull's box (about 0.02 apart, two pixels at 128 px) a surface's colour is taken from points up to that
far behind it, which other views see elsewhere on the surface: edges across the orbit's motion (the
checker's meridians) blur, and the field cannot reproduce its own frames (checker: 24.1 dB on training
view 0; the same field rendered with 192 samples 27.0 dB; trained with 96 samples 28.5 dB, in 492 s).
Measured with 32 proposal + 32 samples against the defaults (48 uniform) on the oracle orbits, CPU
defaults otherwise, one run each (CPU fits are deterministic: all six default fits gave the same Chamfer
and PSNR as in the session before):
- training PSNR (last step) bowl 30.8 -> 38.3, mug 36.6 -> 41.6, plate 47.5 -> 49.4, checker
  23.9 -> 31.9, blob 44.7 -> 48.3, `internal` 42.9 -> 47.5 dB;
- held-out PSNR at elevation 10 (`scripts/check_nerf_oracle.py`'s views) bowl 26.6 -> 28.3, mug
  29.0 -> 32.0, plate 40.3 -> 38.1, checker 23.1 -> 24.4, blob 39.7 -> 39.7, `internal` 35.6 -> 37.3 dB;
  at 30 and -10 within -0.5 to +1.6 dB;
- Chamfer bowl 0.0367 -> 0.0391, mug 0.0225 -> 0.0222, plate 0.0198 -> 0.0202, checker 0.0057 ->
  0.0047, blob 0.0050 -> 0.0051, `internal` 0.0175 -> 0.0197 (the two that got worse differ where no
  view looks: a cup's inside, the box's hidden interior);
- wall time, the defaults measured again in the same session: bowl 155 -> 164, mug 164 -> 173, plate
  132 -> 156, checker 240 -> 221, blob 147 -> 182 (about 10 s of it shared with another job), `internal`
  233 -> 217 s; 1071 -> 1113 s in all (1.04x).
With three quarters of the samples uniform (`_proposal_edges`' uniform_share, not a config key; three
objects): bowl 0.0384 in 149 s, checker 0.0051 in 213 s (held-out 24.9 / 20.0 / 21.5 dB), `internal`
0.0187 in 213 s, between the two. Opt-in while the Chamfer of the ambiguous objects is worse: at every
iso-level from 5 to 30 (`internal` 0.0180 -> 0.0189 at 5, 0.0172 -> 0.0235 at 30), perhaps because the
inside gets fewer samples and its shell ends thinner (not verified). Why the plate and blob got slower
was not profiled. Through `sv3d eval` (576-pixel orbits, meshes after refinement) it changed little: mean
final Chamfer 0.0172 against 0.0173, the `.glb` renders within 0.3 dB (the refinement fits the colours
again).

Colour where it is seen (`color_eps`, 1e-5 by default; `render.render_rays`): the densities come first;
the colour MLP (two thirds of the MLPs' multiply-adds) then runs with gradients only where a sample's
weight exceeds color_eps, without gradients where the sample is faint but still visible, and not at all
behind a surface. The parameters' gradients differ by about 0.1% (relative norm, fitted checker sphere).
The saving grows as the field turns crisp, and the checker's fits are chaotic in how crisp they end:
- a fit on its orbit directory (8-bit frames): 22% of the samples in its hull keep a colour gradient, and
  a step took 0.19-0.21 s instead of 0.35-0.39 s (alternated in one process); the whole fit at the CPU
  defaults trained in 328 s instead of 517 s (same session), Chamfer 0.0048 -> 0.0047, held-out masked
  PSNR 21.7 / 18.9 / 20.6 -> 21.5 / 18.7 / 20.5 dB;
- a fit on the same frames in memory (differing by 8-bit rounding only) ended foggier (training PSNR 22.5
  instead of 23.9 dB) and took 444 s; from its end a step took 0.31-0.32 s instead of 0.35 s, and after
  300 steps of a fit there was no gain (`scripts/bench_nerf.py` part 3).
A first version gave faint samples colour 0: the densities' gradient then sees black where growing density
would show a colour (a test measures that bias), and in its one checker fit the training PSNR lagged by
1-3 dB (part of which may be the chaos above).

Occupied-volume prior (`volume_weight`, off by default): the mean of log(1 + sigma) at random points of the
hull is added to the loss, so space that no view needs is emptied. From one orbit at elevation 10 the
inside of a cup is seen only near its rim, and without the prior the field closes it with a lid that shows
the far wall's colours; with it the cup opens and its walls become thin shells (the extraction fills what
is enclosed). Measured on the oracle orbits at the CPU defaults with weight 0.01 (NeRF mesh Chamfer, without
-> with): bowl 0.043 -> 0.0087, mug 0.023 -> 0.0100, plate 0.021 -> 0.0067, blob 0.0053 -> 0.0066, but
`internal` 0.017 -> 0.036 (density slices: its plain top and bottom faces are emptied and the box's inner
walls take their colour, the cup's ambiguity reversed; 0.035 also on the sine orbit, which sees both) and
the checker sphere 0.0047 -> 0.0152 (a porous, noisy shell). Hence opt-in, for objects known to be open
vessels; 0.001 barely changes the bowl (0.040). Those figures are from 2026-11-29; at the defaults of
2026-12-05 (`sv3d eval` with the prior, NeRF mesh, without -> with): bowl 0.0358 -> 0.0068, mug
0.0226 -> 0.0127, plate 0.0223 -> 0.0070, blob 0.0047 -> 0.0081, checker 0.0058 -> 0.0115, `internal`
0.0176 -> 0.0316 (the README has the final meshes).

Colour smoothness (`color_smooth_weight`, opt-in; `nerf.smoothness`): the truncated L1 colour difference
between surface samples (rendering weight above 0.05) and copies jittered by 0.01, as the refinement's
albedo smoothness, after the masks-only start. From elevation 10 a plain top is seen edge-on: each pixel
of the frames covers a long strip of it, and the field paints it in streaks along the views' rays, which
views from higher up show (`internal` from elevation 30: 21.9 dB). Measured with weight 0.05 on the oracle
orbits at the CPU defaults (2026-12-06, one fit each, NeRF mesh Chamfer and held-out masked PSNR at
elevations 10 / 30 / -10 of `scripts/check_nerf_oracle.py`, without -> with): `internal` 0.0134 -> 0.0121,
35.9 / 21.9 / 24.1 -> 34.5 / 24.6 / 24.2 dB; plate 0.0120 -> 0.0108, 39.2 / 27.2 / 12.6 -> 34.8 / 27.6 /
11.7 dB; checker 0.0059 -> 0.0056, 23.4 / 19.7 / 21.5 -> 23.2 / 19.6 / 21.2 dB; but the blob, whose shape
shows only by its shading, got worse: 0.0048 -> 0.0055, 40.2 / 37.3 / 38.5 -> 35.2 / 33.6 / 34.7 dB (an
unshaded field has to paint the shading, and the smoothness evens it). Fits took 147 s against 121 s
(plate) and 156 s against 120 s (blob); the others shared the machine with another job (not timed).
Opt-in: it costs a fifth to a third more time per fit, evens smooth shading (up to 5 dB lower on the
orbit), and no object reaches 28 dB from elevation 30 with it.

Hard edges (`hard_edges`, opt-in; `hard_edge_targets`): the frames are area-averaged, so a silhouette pixel
holds a fraction of the object, but a training ray goes through the pixel's centre. That was the first suspect
for a dent of faces seen edge-on: the orbit's cameras at azimuth +-171.4 lie 0.005 outside the planes of
`internal`'s two y faces, and the fit dents those faces 0.015 and 0.014 inwards at their centres (its x faces
0.004 and 0.003), which the refinement keeps (0.012 and 0.011). Fitted without those two frames, the same
faces bulge instead (+0.014, +0.007; x faces unchanged): the rays of those views graze the faces along their
whole width (the end of this paragraph: the soft density, not the pixel centres, is what dents them). With
hard edges a pixel is solid (the object's own colour) where the object covers at least half of it, as it then
covers the centre under a straight edge, and background elsewhere: the y faces' dents became 0.007 and 0.012
(CPU defaults, oracle orbit, one fit). Through `sv3d eval` (2026-12-07, CPU defaults, one run; final / NeRF
mesh Chamfer, without in brackets): blob 0.0044 / 0.0053 (0.0042 / 0.0045), bowl 0.0065 / 0.0350 (0.0069 /
0.0363), checker 0.0046 / 0.0057 (0.0041 / 0.0044), `internal` 0.0095 / 0.0134 (0.0102 / 0.0131), mug 0.0179 /
0.0199 (0.0173 / 0.0180), plate 0.0104 / 0.0116 (0.0108 / 0.0115); mean 0.0089 both, NeRF meshes 0.0152
(0.0146). Opt-in: rounding each silhouette to the pixel centres loses the sub-pixel position that the coverage
gives (a 128-px pixel is 0.0095 wide at the orbit's centre), which curved objects pay for, and the renders'
edges alias: held-out masked PSNR (`scripts/check_nerf_oracle.py`'s views, scored on the same fits) at
elevation 10 blob 40.2 -> 31.7 dB, `internal` 35.9 -> 30.1, plate 39.2 -> 30.5, bowl 26.6 -> 24.5; from
elevation 30 `internal` 21.9 -> 23.1, plate 27.2 -> 28.4, bowl 16.7 -> 17.8, blob 37.3 -> 31.7. Tried for the
same dent (`internal`, NeRF mesh, one fit each, y faces' dents): rays through random points of their pixels
(so that their mean sees the coverage) 0.0156 (0.023, 0.012); distortion weight 0.05 0.0136 (0.003, 0.001, but
the x faces bulge 0.007 and 0.008; refined 0.0123); 96 samples a ray 0.0124 (0.010, 0.014); 256-px frames
0.0134 (0.018, 0.013: not an artefact of the CPU's 128-px frames); silhouette pixels rendered as the mean of 4
x 4 sub-pixel rays, so that they are compared area-average to area-average (2026-12-07) 0.0147 (0.014, 0.015)
in 357 s, the blob unchanged (0.0045): so the centre ray is not the cause. The soft density is (measured):
along the normal through each face's centre the plain fit's density falls from several hundred to about 1
within 0.015 (samples 0.005 apart), reaching it at 0.27 and 0.28 on the y faces (true faces at 0.289) and at
0.29 on the +x face. A ray grazing a face crosses it over its whole width (0.58), where a density of 10
already makes it opaque (1 - exp(-5.8)); to leave those views' background rays clear, the face's soft edge has
to sit inside the plane by about its own width. Fitted without the two edge-on frames, the y faces' density
reaches 0 only at 0.31 (a bulge).
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .field import FieldConfig, RadianceField
from .rays import generate_rays, sample_bounds
from .render import estimator_available, make_estimator, render_rays, update_estimator
from .smoothness import color_smoothness

__all__ = ["TrainConfig", "TrainResult", "fit_field", "frames_over_white", "hard_edge_targets", "psnr"]


@dataclass
class TrainConfig:
    steps: int = 1500  # optimisation steps (the SV3D paper uses ~600 on an A100 with larger batches)
    batch_rays: int = 2048  # rays per step
    n_samples: int = 96  # samples per ray between the ray's entry and exit of the bounding sphere
    lr: float = 1e-2  # Adam, as instant-ngp
    lr_final_factor: float = 0.05  # exponential decay to this fraction of lr at the last step
    color_lr_scale: float = 0.1  # the colour MLP's learning rate relative to lr (module doc)
    silhouette_fraction: float = 0.08  # this first part of the steps fits the masks only (module doc)
    mask_weight: float = 1.0  # opacity vs alpha (mean squared error): as strong as colour, sharp silhouettes
    distortion_weight: float = (
        1e-2  # Mip-NeRF 360 distortion loss: compact weights, no floaters inside the hull
    )
    max_resolution: int = 128  # frames are resized to at most this size for training
    seed: int = 0
    checkpoint_every: int = 250  # steps between checkpoints (0: only at the end)
    sampler: str = "auto"  # "estimator" (nerfacc's occupancy grid, CUDA), "uniform"; auto: grid if it runs
    estimator_resolution: int = 128  # occupancy-grid cells per side (instant-ngp: 128)
    early_stop_eps: float = 0.0  # uniform sampler: skip samples hidden below this transmittance (module doc)
    proposal_samples: int = 0  # > 0: samples drawn from a first pass (module doc; not with the estimator)
    color_eps: float = 1e-5  # colour gradients only where a sample's weight exceeds this (module doc; 0: all)
    volume_weight: float = 0.0  # occupied-volume prior (module doc): 0.01 opens cups, hollows closed objects
    volume_points: int = 8192  # random points a step where the prior is measured (those inside the hull)
    # Colour smoothness (module doc; opt-in): truncated L1 colour difference between surface samples and
    # jittered copies, after the masks-only start. 0: off; 0.05 measured.
    color_smooth_weight: float = 0.0
    color_smooth_points: int = 4096  # surface samples drawn a step
    color_smooth_jitter: float = 0.01  # world units, about a pixel of the 128-px frames
    color_smooth_cap: float = 0.05  # summed |RGB difference| above this costs no more (texture edges)
    hard_edges: bool = False  # edge pixels' targets as the ray through their centre sees them (module doc)
    field: FieldConfig = field(default_factory=FieldConfig)

    def __post_init__(self) -> None:
        # Checked when the config is made (Hydra overrides too), before any stage runs.
        _check_train_config(self)


# Early stop's first pass (density without gradients at every occupied sample) only pays where enough is
# hidden: it is tried every 50 steps and kept for the next 49 while it hides more than 30% of the samples
# (a heuristic threshold; early in a fit little is opaque yet).
_EARLY_STOP_CHECK_EVERY = 50
_EARLY_STOP_MIN_HIDDEN = 0.3
# Samples whose rendering weight exceeds this count as surface points for the colour smoothness.
_SURFACE_WEIGHT = 0.05


def _check_train_config(config: TrainConfig) -> None:
    if not (math.isfinite(config.lr) and config.lr > 0.0):
        raise ValueError(f"lr must be a finite number > 0, got {config.lr}")
    if not 0.0 < config.lr_final_factor <= 1.0:  # 0 stopped learning after one step; < 0: a complex rate
        raise ValueError(f"lr_final_factor must be in (0, 1], got {config.lr_final_factor}")
    for name in ("steps", "batch_rays", "n_samples"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    if not (math.isfinite(config.volume_weight) and config.volume_weight >= 0.0):
        raise ValueError(f"volume_weight must be a finite number >= 0, got {config.volume_weight}")
    if config.volume_points < 1:
        raise ValueError(f"volume_points must be >= 1, got {config.volume_points}")
    if not (math.isfinite(config.color_smooth_weight) and config.color_smooth_weight >= 0.0):
        raise ValueError(
            f"color_smooth_weight must be a finite number >= 0, got {config.color_smooth_weight}"
        )
    if config.color_smooth_points < 1:
        raise ValueError(f"color_smooth_points must be >= 1, got {config.color_smooth_points}")
    if not (config.color_smooth_jitter > 0.0 and config.color_smooth_cap > 0.0):
        raise ValueError(
            f"color_smooth_jitter and color_smooth_cap must be > 0, got {config.color_smooth_jitter} and "
            f"{config.color_smooth_cap}"
        )
    if config.sampler not in ("auto", "estimator", "uniform"):
        raise ValueError(f"sampler must be auto, estimator or uniform, got {config.sampler!r}")
    if config.estimator_resolution < 1:
        raise ValueError(f"estimator_resolution must be >= 1, got {config.estimator_resolution}")
    if config.proposal_samples < 0:
        raise ValueError(f"proposal_samples must be >= 0, got {config.proposal_samples}")
    if config.sampler == "estimator" and config.proposal_samples > 0:
        raise ValueError("proposal_samples needs sampler uniform or auto: the estimator places its samples")
    if not 0.0 <= config.early_stop_eps < 1.0:
        raise ValueError(f"early_stop_eps must be in [0, 1), got {config.early_stop_eps}")
    if not 0.0 <= config.silhouette_fraction < 1.0:
        raise ValueError(f"silhouette_fraction must be in [0, 1), got {config.silhouette_fraction}")
    if not (math.isfinite(config.color_lr_scale) and config.color_lr_scale > 0.0):
        raise ValueError(f"color_lr_scale must be a finite number > 0, got {config.color_lr_scale}")
    if not 0.0 <= config.color_eps < 1.0:
        raise ValueError(f"color_eps must be in [0, 1), got {config.color_eps}")


@dataclass
class TrainResult:
    field: RadianceField
    history: list[dict[str, float]]  # per logged step: loss terms and PSNR
    seconds: float  # training time, over every run of a resumed fit (the checkpoint keeps the earlier)


def psnr(a: Tensor, b: Tensor, mask: Tensor | None = None) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1], over `mask` (bool [...]) when given."""
    err = (a - b).pow(2)
    if mask is not None:
        err = err[mask]
    return float(-10.0 * torch.log10(err.mean().clamp(min=1e-12)))


def frames_over_white(images: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Straight RGBA frames [V, H, W, 4] -> (colour over white [V, s, s, 3], coverage [V, s, s, 1]), area-
    averaged down to s = min(size, H). Composited first, then averaged: averaging straight RGBA would
    weigh an edge pixel's colour by its alpha twice (darker or brighter silhouettes than the renders')."""
    alpha = images[..., 3:].float()  # [V, H, W, 1]
    full = torch.cat([images[..., :3].float() * alpha + (1.0 - alpha), alpha], dim=-1)  # [V, H, W, 4]
    if full.shape[1] > size:
        x = torch.nn.functional.interpolate(full.permute(0, 3, 1, 2), size=(size, size), mode="area")
        full = x.permute(0, 2, 3, 1)  # [V, s, s, 4]
    return full[..., :3], full[..., 3:]


def hard_edge_targets(target: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
    """Area-averaged frames (colour over white [..., 3], coverage [..., 1]) -> what a ray through each
    pixel's centre sees: solid (alpha 1, the object's own colour, unmixed from the white) where the object
    covers at least half of the pixel, as it covers the centre under a straight edge; background (alpha 0,
    white) elsewhere."""
    solid = alpha >= 0.5  # [..., 1]
    own = (target - (1.0 - alpha)) / alpha.clamp(min=0.5)  # over white: target = alpha * own + (1 - alpha)
    return torch.where(solid, own.clamp(0.0, 1.0), torch.ones_like(target)), solid.to(alpha.dtype)


def _distortion(
    weights: Tensor,  # [R, S] batched, or [N] packed with `ray_indices`
    t_mid: Tensor,  # like weights: sorted interval midpoints along each ray
    t_delta: Tensor,  # like weights: interval lengths
    ray_indices: Tensor | None = None,  # [N] packed: each sample's ray, non-decreasing
    n_rays: int | None = None,  # packed: the number of rays the mean is over
) -> Tensor:
    """Mip-NeRF 360 distortion loss, the mean over rays -> scalar.

    sum_ij w_i w_j |m_i - m_j| = 2 sum_i w_i (m_i W_<i - (wm)_<i), exclusive prefix sums: O(S), not O(S^2).
    Packed samples (nerfacc's estimator) use one running sum in float64 less its value at each ray's start.
    """
    self_term = weights.pow(2) * t_delta / 3.0
    if ray_indices is None:
        w_before = torch.cumsum(weights, -1) - weights  # [R, S] exclusive prefix sums
        wm_before = torch.cumsum(weights * t_mid, -1) - weights * t_mid
        return (2.0 * weights * (t_mid * w_before - wm_before) + self_term).sum(-1).mean()
    first = torch.searchsorted(ray_indices, ray_indices)  # [N] index of the first sample of each one's ray

    def exclusive(x: Tensor) -> Tensor:  # [N] sums over the earlier samples of the same ray
        running = torch.cumsum(x.double(), 0) - x.double()
        return (running - running[first]).to(x.dtype)

    per_sample = 2.0 * weights * (t_mid * exclusive(weights) - exclusive(weights * t_mid)) + self_term
    return per_sample.sum() / max(int(n_rays or 0), 1)


def _occupied_volume(
    model: RadianceField,
    n_points: int,
    bound: float,
    occupancy: Callable[[Tensor], Tensor] | None,
    device: torch.device,
) -> Tensor:
    """Mean log(1 + sigma) at `n_points` uniform points of the cube, those inside `occupancy` -> scalar."""
    points = (torch.rand(n_points, 3, device=device) * 2.0 - 1.0) * bound  # [P, 3]
    if occupancy is not None:
        points = points[occupancy(points)]  # [K, 3]: no field is trained outside the hull
    if points.shape[0] == 0:
        return torch.zeros((), device=device)
    return torch.log1p(model.density(points)).mean()


def _surface_color_smoothness(
    model: RadianceField,
    out: dict[str, Tensor],  # render_rays' output for the step's rays (per-sample weights and positions)
    directions: Tensor,  # [R, 3] the step's ray directions
    config: TrainConfig,
) -> Tensor:
    """`color_smoothness` at the step's surface samples (rendering weight above _SURFACE_WEIGHT), with each
    sample's ray direction for both points (read only by fields with view directions)."""
    weights = out["weights"].detach().reshape(-1)  # [R * S] batched or [N] packed
    surface = (weights > _SURFACE_WEIGHT).nonzero(as_tuple=True)[0]  # [K] flat sample indices
    if surface.numel() == 0:
        return weights.new_zeros(())
    draw = torch.randint(surface.numel(), (config.color_smooth_points,), device=surface.device)
    pick = surface[draw]  # [P] flat indices of the chosen samples
    points = out["positions"].reshape(-1, 3)[pick].detach()  # [P, 3]
    # each sample's ray: packed samples (the estimator) name it, batched [R, S] ones are in row order
    rays = out["ray_indices"][pick] if "ray_indices" in out else pick // out["weights"].shape[-1]  # [P]
    dirs = directions[rays]  # [P, 3]
    return color_smoothness(
        lambda x: model(x, torch.cat([dirs, dirs]))[0],
        points,
        config.color_smooth_jitter,
        config.color_smooth_cap,
    )


def _data_fingerprint(images: Tensor, c2w: Tensor, fov_deg: float) -> str:
    """sha256 of the frames, cameras and field of view a fit is trained on: a checkpoint resumes only on
    the data it was made from."""
    digest = hashlib.sha256(repr((tuple(images.shape), str(images.dtype), float(fov_deg))).encode())
    digest.update(images.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())  # any dtype
    digest.update(c2w.detach().cpu().double().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _atomic_save(obj: dict, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fit_field(
    images: Tensor,  # [V, H, W, 4] straight RGBA in [0, 1]
    c2w: Tensor,  # [V, 4, 4] camera-to-world, OpenGL convention
    fov_deg: float,  # field of view of the square frames
    config: TrainConfig | None = None,
    device: torch.device | str = "cpu",
    checkpoint_path: str | Path | None = None,  # written every `checkpoint_every` steps; resumed if present
    progress: Callable[[int, dict[str, float]], None] | None = None,  # called after every step
    occupancy: Callable[[Tensor], Tensor] | None = None,  # [N, 3] -> [N] bool: samples worth evaluating
    model: RadianceField | None = None,  # the field to train (built from config.field when None)
    identity: dict | None = None,  # what else the fit depends on (the caller's settings), kept with the
    # checkpoint: one made under another identity is not resumed
) -> TrainResult:
    """Optimise a radiance field so that its renders reproduce the frames (over white) and their alpha."""
    config = config or TrainConfig()
    # 1. Check inputs
    if images.ndim != 4 or images.shape[-1] != 4 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must be square [V, H, W, 4] RGBA, got {tuple(images.shape)}")
    if c2w.shape != (images.shape[0], 4, 4):
        raise ValueError(f"c2w must be [{images.shape[0]}, 4, 4], got {tuple(c2w.shape)}")
    if float(images[..., 3].max()) <= 0.0:
        raise ValueError("every frame's alpha is empty: there is no object to reconstruct")
    _check_train_config(config)  # fields may have been set after the config was made
    device = torch.device(device)
    if config.sampler == "estimator" and not estimator_available(device):
        raise ValueError(f"sampler 'estimator' needs CUDA and nerfacc's CUDA extension; device is {device}")
    # auto: the estimator where it runs, unless proposal sampling is asked for (both place the samples)
    use_estimator = config.sampler == "estimator" or (
        config.sampler == "auto" and config.proposal_samples == 0 and estimator_available(device)
    )
    sampler_used = "estimator" if use_estimator else "uniform"
    torch.manual_seed(config.seed)

    # 2. Rays of every pixel of the (resized) frames, with their targets
    target, alpha = frames_over_white(images, config.max_resolution)  # [V, S, S, 3], [V, S, S, 1]
    if config.hard_edges:
        target, alpha = hard_edge_targets(target, alpha)
    size = target.shape[1]
    focal = size / (2.0 * math.tan(math.radians(fov_deg) / 2.0))
    origins, directions = generate_rays(c2w.float(), focal, size, size)  # [V, S, S, 3] each
    # Sample only where the rays cross the box of the occupied cells: the same samples, denser.
    near, far = sample_bounds(origins, directions, config.field.bound, occupancy)
    hits = (far > near).reshape(-1)
    if occupancy is not None and hasattr(occupancy, "to"):
        occupancy = occupancy.to(device)  # it is queried with the training samples, on `device`
    rays_o = origins.reshape(-1, 3)[hits].to(device)
    rays_d = directions.reshape(-1, 3)[hits].to(device)
    ray_near, ray_far = near.reshape(-1)[hits].to(device), far.reshape(-1)[hits].to(device)
    rgb_t, alpha_t = target.reshape(-1, 3)[hits].to(device), alpha.reshape(-1, 1)[hits].to(device)
    if rays_o.shape[0] == 0:
        raise ValueError("no pixel's ray crosses the scene's bound and the occupied cells: nothing to fit")

    # 3. Field, optimiser, and what a checkpoint restores
    model = (model if model is not None else RadianceField(config.field)).to(device)
    estimator = None
    if use_estimator:
        estimator = make_estimator(config.field.bound, config.estimator_resolution, device)
        if occupancy is None:
            density_fn = model.density
        else:

            def density_fn(x: Tensor) -> Tensor:  # [N, 3] -> [N]: none outside the caller's grid
                return model.density(x) * occupancy(x).to(x.dtype)

    color_params = list(model.color_mlp.parameters())
    color_ids = {id(p) for p in color_params}
    other_params = [p for p in model.parameters() if id(p) not in color_ids]
    optimizer = torch.optim.Adam(
        [{"params": other_params}, {"params": color_params, "lr": config.lr * config.color_lr_scale}],
        lr=config.lr,
        betas=(0.9, 0.99),
        eps=1e-15,
    )
    gamma = config.lr_final_factor ** (1.0 / max(config.steps, 1))
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma)
    history: list[dict[str, float]] = []
    start_step, earlier_seconds = 0, 0.0
    stop_pays = True  # whether early stop saves more than its first pass costs (measured every 50 steps)
    checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
    data_sha256 = _data_fingerprint(images, c2w, fov_deg) if checkpoint_path else None
    if checkpoint_path and checkpoint_path.is_file():
        try:
            state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises many types for a truncated or foreign file
            raise ValueError(
                f"{checkpoint_path}: unreadable checkpoint ({type(exc).__name__}); remove it or use --force"
            ) from None
        if (
            not isinstance(state, dict)
            or state.get("config") != asdict(config)
            or state.get("identity") != (identity or {})
        ):
            raise ValueError(
                f"{checkpoint_path}: checkpoint of another configuration; remove it or use --force"
            )
        if "sampler_used" not in state:
            raise ValueError(f"{checkpoint_path}: checkpoint of an older version; remove it or use --force")
        if state["sampler_used"] != sampler_used:  # "auto" resolves by device: a CPU fit on CUDA
            raise ValueError(
                f"{checkpoint_path}: checkpoint trained with the {state['sampler_used']} sampler, this"
                f" run samples with the {sampler_used} one (another device?); remove it or use --force"
            )
        if state.get("data_sha256") != data_sha256:
            raise ValueError(
                f"{checkpoint_path}: checkpoint of other frames or cameras; remove it or use --force"
            )
        model.load_state_dict(state["field"])
        if estimator is not None and state.get("estimator") is not None:
            estimator.load_state_dict(state["estimator"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step, history = int(state["step"]), list(state["history"])
        earlier_seconds = float(state.get("seconds", 0.0))  # the training before the interruption
        stop_pays = bool(state["stop_pays"])  # written by every checkpoint of this configuration
        torch.set_rng_state(state["rng"].cpu())  # map_location moved it to `device`; it must be a CPU tensor
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)  # ray picks and jitter draw on CUDA

    def save(step: int) -> None:
        if checkpoint_path is not None:
            _atomic_save(
                {
                    "field": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "step": step,
                    "history": history,
                    "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    "estimator": estimator.state_dict() if estimator is not None else None,
                    "config": asdict(config),
                    "identity": identity or {},
                    "sampler_used": sampler_used,
                    "seconds": earlier_seconds + time.perf_counter() - started,
                    "data_sha256": data_sha256,
                    "stop_pays": stop_pays,
                },
                checkpoint_path,
            )

    # 4. Optimisation loop
    started = time.perf_counter()
    n_rays = rays_o.shape[0]
    silhouette_steps = round(config.silhouette_fraction * config.steps)
    for step in range(start_step, config.steps):
        check_stop = step % _EARLY_STOP_CHECK_EVERY == 0
        if check_stop:
            stop_pays = True  # measure again: try it this step
        pick = torch.randint(0, n_rays, (config.batch_rays,), device=device)
        if estimator is not None:
            update_estimator(estimator, density_fn, step, config.n_samples)
        out = render_rays(
            model,
            rays_o[pick],
            rays_d[pick],
            ray_near[pick],
            ray_far[pick],
            config.n_samples,
            stratified=True,
            estimator=estimator,
            occupancy=occupancy,
            early_stop_eps=config.early_stop_eps if stop_pays else 0.0,
            color_eps=config.color_eps,
            proposal_samples=config.proposal_samples,
        )
        if check_stop and "hidden" in out:
            stop_pays = float(out["hidden"]) > _EARLY_STOP_MIN_HIDDEN
        loss_rgb = (out["rgb"] - rgb_t[pick]).pow(2).mean()
        loss_mask = (out["opacity"] - alpha_t[pick]).pow(2).mean()
        loss = config.mask_weight * loss_mask
        if step >= silhouette_steps:  # the silhouettes first: no colour gradient before
            loss = loss + loss_rgb
        if config.distortion_weight > 0:
            distortion = _distortion(
                out["weights"], out["t_mid"], out["t_delta"], out.get("ray_indices"), config.batch_rays
            )
            loss = loss + config.distortion_weight * distortion
        smooth = None
        if config.color_smooth_weight > 0 and step >= silhouette_steps:
            smooth = _surface_color_smoothness(model, out, rays_d[pick], config)
            loss = loss + config.color_smooth_weight * smooth
        volume = None
        if config.volume_weight > 0:
            volume = _occupied_volume(model, config.volume_points, model.config.bound, occupancy, device)
            loss = loss + config.volume_weight * volume
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        rgb_mse = loss_rgb.item()
        record = {
            "step": step + 1,
            "loss": loss.item(),
            "rgb_mse": rgb_mse,
            "mask_mse": loss_mask.item(),
            "psnr": -10.0 * math.log10(max(rgb_mse, 1e-12)),
        }
        if smooth is not None:
            record["color_smooth"] = smooth.item()  # before its weight
        if volume is not None:
            record["volume"] = volume.item()  # the prior's mean log(1 + sigma), before its weight
        if (step + 1) % 50 == 0 or step + 1 == config.steps:
            history.append(record)
        if progress is not None:
            progress(step + 1, record)
        if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
            save(step + 1)
    save(config.steps)
    seconds = earlier_seconds + time.perf_counter() - started  # over every run of this fit
    return TrainResult(field=model.eval(), history=history, seconds=seconds)
