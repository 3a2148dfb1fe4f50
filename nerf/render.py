"""Volume rendering of a radiance field along rays, through nerfacc's functions.

Emission-absorption model (Max 1995; NeRF, Mildenhall et al. 2020, Eq. 3): with intervals
[t_i, t_{i+1}) of length delta_i and densities sigma_i, alpha_i = 1 - exp(-sigma_i delta_i),
T_i = exp(-sum_{j<i} sigma_j delta_j), w_i = T_i alpha_i; colour = sum w_i c_i + (1 - sum w_i) background.
The weights come from `nerfacc.render_weight_from_density` and the sums from
`nerfacc.accumulate_along_rays`, never from a copy of them.

Two samplers:
- the default, pure PyTorch and portable: `n_samples` uniform (or stratified) samples between each ray's
  `near` and `far` (the bounding sphere, `rays.ray_sphere_bounds`), rendered with nerfacc's *batched*
  path ([R, S] tensors), which is plain PyTorch in nerfacc 0.5.3 (its packed path needs CUDA kernels);
- `nerfacc.OccGridEstimator` (instant-ngp's occupancy grid, empty-space skipping), on a CUDA device with
  nerfacc's CUDA extension built: pass `estimator=` (see `make_estimator`, `estimator_available`), and keep
  it up to date with `update_estimator` during training. It returns packed samples.
Both can compute the colour only where it is seen (`color_eps`): densities first, then the colour MLP with
gradients where a sample's weight exceeds color_eps, without gradients where the sample is faint but
visible (transmittance >= color_eps), and not at all where it is hidden; most samples of a fitted field
are in thin air, inside a solid or behind a surface, and the colour MLP is most of the field's cost.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import nerfacc
import torch
from torch import Tensor

__all__ = ["estimator_available", "make_estimator", "render_rays", "update_estimator"]

# field(x [N, 3], d [N, 3]) -> (rgb [N, 3] in [0, 1], sigma [N] >= 0), e.g. `field.RadianceField`
FieldFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def _check_rays(origins: Tensor, directions: Tensor, near: Tensor, far: Tensor) -> None:
    if origins.ndim != 2 or origins.shape[-1] != 3 or directions.shape != origins.shape:
        raise ValueError(
            "origins and directions must both be [R, 3], got "
            f"{tuple(origins.shape)} and {tuple(directions.shape)}"
        )
    n = origins.shape[0]
    for name, t in (("near", near), ("far", far)):
        if t.shape not in ((n,), (n, 1)):
            raise ValueError(f"{name} must be [R] or [R, 1] with R = {n}, got {tuple(t.shape)}")


def _background(background: float | Sequence[float] | Tensor, like: Tensor) -> Tensor:
    bg = torch.as_tensor(background, dtype=like.dtype, device=like.device).reshape(-1)
    if bg.numel() == 1:
        bg = bg.expand(3)
    if bg.numel() != 3:
        raise ValueError(f"background must be a number or 3 numbers, got {background}")
    return bg  # [3]


def render_rays(
    field: FieldFn,  # (x [N, 3], d [N, 3]) -> (rgb [N, 3], sigma [N])
    origins: Tensor,  # [R, 3] ray origins (world)
    directions: Tensor,  # [R, 3] unit ray directions
    near: Tensor,  # [R] (or [R, 1]) start distance along each ray
    far: Tensor,  # [R] (or [R, 1]) end distance; far <= near renders nothing (background)
    n_samples: int,  # samples per ray (uniform path); with an estimator, (2 * radius) / n_samples is the step
    background: float | Sequence[float] | Tensor = (1.0, 1.0, 1.0),  # RGB composited behind, in [0, 1]
    stratified: bool = False,  # jitter each sample inside its interval (training)
    generator: torch.Generator | None = None,  # random source for `stratified`
    estimator: nerfacc.OccGridEstimator | None = None,  # occupancy-grid sampling (CUDA only)
    occupancy: Callable[[Tensor], Tensor] | None = None,  # [N, 3] -> [N] bool; skip samples where False
    early_stop_eps: float = 0.0,  # uniform path: skip samples whose transmittance is below this (0: none)
    color_eps: float = 0.0,  # colour only at samples whose weight exceeds this (0: at every sample)
    proposal_samples: int = 0,  # uniform path: > 0 places the samples by a first pass of this many (below)
) -> dict[str, Tensor]:
    """Render R rays through `field`. Differentiable in the field's outputs (not in near/far).

    Returns a dict:
      rgb [R, 3] composited over `background`; opacity [R, 1] = sum of weights in [0, 1];
      depth [R, 1] = expected distance of the samples given the ray hits (sum w t / opacity, 0 if empty);
      and per-sample tensors for regularisers: weights, sigmas, t_mid (the evaluated distances),
      t_delta (interval lengths), of shape [R, S] on the uniform path; positions [R, S, 3].
      With `occupancy`, the field is evaluated only at samples it marks occupied (density 0 elsewhere).
      With `early_stop_eps` > 0 (nerfacc's early stop, which its estimator applies on CUDA), a first pass
      without gradients finds each sample's transmittance, and the field is evaluated (with gradients)
      only where it is at least `early_stop_eps`: samples hidden behind a surface, whose weights are below
      it, are skipped (density 0 there), which changes the renders by less than that; `hidden` (0-dim)
      is the share of the occupied samples skipped so.
      With `color_eps` > 0 and a field that offers `geometry` (x -> sigma, feature) and `color`
      (feature, d -> rgb), as `field.RadianceField` does, the weights come from the densities first and
      the colour MLP runs with gradients only where a weight exceeds `color_eps`, without gradients where
      the sample is faint but visible (transmittance >= color_eps), and not where it is hidden (colour 0):
      each ray's colour changes by less than color_eps (the hidden samples' weights sum to less than the
      transmittance where they start), and on a fitted field most samples (inside a solid, behind a
      surface, in thin air) need no colour gradient; `colored` (0-dim) is the share of the evaluated
      samples whose colour was computed with gradients.
      With `proposal_samples` P > 0 (uniform path), a first pass without gradients evaluates the density
      at P uniform samples and the `n_samples` intervals are then drawn from its weights (inverse
      transform; half of them from a uniform share over the occupied samples, so free space keeps
      samples): the intervals are short where the surface is (`_proposal_edges`).
      With `estimator` the per-sample tensors are packed ([N], positions [N, 3]) and `ray_indices` [N]
      says which ray each belongs to.
    """
    # 1. Check inputs
    _check_rays(origins, directions, near, far)
    if isinstance(n_samples, bool) or int(n_samples) != n_samples or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples}")
    near, far = near.reshape(-1), far.reshape(-1)  # [R]
    bg = _background(background, origins)
    if not 0.0 <= color_eps < 1.0:
        raise ValueError(f"color_eps must be in [0, 1), got {color_eps}")
    if (
        isinstance(proposal_samples, bool)
        or int(proposal_samples) != proposal_samples
        or proposal_samples < 0
    ):
        raise ValueError(f"proposal_samples must be an integer >= 0, got {proposal_samples}")
    split = (
        color_eps > 0
        and callable(getattr(field, "geometry", None))
        and callable(getattr(field, "color", None))
    )
    if estimator is not None:
        if proposal_samples > 0:
            raise ValueError("proposal_samples and estimator both place the samples: pass one of them")
        return _render_estimator(
            field,
            origins,
            directions,
            near,
            far,
            int(n_samples),
            bg,
            stratified,
            estimator,
            color_eps if split else 0.0,
            occupancy,
        )

    # 2. Intervals: S equal pieces of [near, far] per ray (or drawn from a first pass's weights); empty
    # (zero-length) where far <= near
    n_rays, s = origins.shape[0], int(n_samples)
    if proposal_samples > 0:
        t_edges = _proposal_edges(
            field, origins, directions, near, far, int(proposal_samples), s, stratified, generator, occupancy
        )  # [R, S + 1]
    else:
        span = (far - near).clamp(min=0.0)  # [R]
        edges = torch.linspace(0.0, 1.0, s + 1, dtype=origins.dtype, device=origins.device)  # [S + 1]
        t_edges = near[:, None] + span[:, None] * edges  # [R, S + 1]
    t_starts, t_ends = t_edges[:, :-1], t_edges[:, 1:]  # [R, S] each
    u = torch.full_like(t_starts, 0.5)
    if stratified:
        u = torch.rand(t_starts.shape, generator=generator, dtype=u.dtype, device="cpu").to(u.device)
    t_mid = t_starts + (t_ends - t_starts) * u  # [R, S] where the field is evaluated

    # 3. Field at the samples
    positions = origins[:, None, :] + t_mid[..., None] * directions[:, None, :]  # [R, S, 3]
    dirs = directions[:, None, :].expand_as(positions)  # [R, S, 3]
    flat_pos, flat_dir = positions.reshape(-1, 3), dirs.reshape(-1, 3)  # [R*S, 3]
    idx = None  # [K] the samples evaluated (None: all)
    if occupancy is not None or early_stop_eps > 0:
        idx, hidden = _live_samples(field, flat_pos, flat_dir, t_ends - t_starts, occupancy, early_stop_eps)
    pos_k = flat_pos if idx is None else flat_pos[idx]  # [K, 3]
    dir_k = flat_dir if idx is None else flat_dir[idx]

    def scatter(values: Tensor) -> Tensor:  # [K, ...] at the evaluated samples -> [R*S, ...], 0 elsewhere
        if idx is None:
            return values
        return values.new_zeros((flat_pos.shape[0], *values.shape[1:])).index_put((idx,), values)

    weights = None  # computed first only when the colour waits for them
    if split:
        sigma_k, feat_k = field.geometry(pos_k)  # [K], [K, F]
        sigmas = scatter(sigma_k).reshape(n_rays, s)  # [R, S]
        weights, trans = _weights(t_starts, t_ends, sigmas)  # [R, S] each
        w_k, t_k = weights.detach().reshape(-1), trans.detach().reshape(-1)  # [R*S]
        if idx is not None:
            w_k, t_k = w_k[idx], t_k[idx]  # [K]
        rgb_k, colored = _seen_colors(field, feat_k, dir_k, w_k, t_k, color_eps)
    else:
        rgb_k, sigma_k = field(pos_k, dir_k)  # [K, 3], [K]
        sigmas = scatter(sigma_k).reshape(n_rays, s)  # [R, S]
    rgbs = scatter(rgb_k).reshape(n_rays, s, 3)  # [R, S, 3]

    # 4. Weights and sums through nerfacc's batched path
    out = _composite(t_starts, t_ends, t_mid, sigmas, rgbs, bg, weights=weights)
    if split:
        out["colored"] = colored  # 0-dim: share of the evaluated samples coloured with gradients
    out["positions"] = positions
    if early_stop_eps > 0:
        out["hidden"] = hidden  # 0-dim: share of the occupied samples skipped as hidden
    return out


def _density_at(field: FieldFn, positions: Tensor, directions: Tensor) -> Tensor:
    """[N] densities at [N, 3] points: the field's density alone where it offers it."""
    density = getattr(field, "density", None)
    if density is not None:
        return density(positions)
    return field(positions, directions)[1]


@torch.no_grad()
def _proposal_edges(
    field: FieldFn,
    origins: Tensor,  # [R, 3]
    directions: Tensor,  # [R, 3]
    near: Tensor,  # [R]
    far: Tensor,  # [R]
    n_proposal: int,  # P uniform samples of the first pass
    n_samples: int,  # S intervals to draw
    stratified: bool,
    generator: torch.Generator | None,
    occupancy: Callable[[Tensor], Tensor] | None,
    uniform_share: float = 0.5,
) -> Tensor:
    """[R, S + 1] sorted interval edges from `near` to `far`, dense where a first pass puts the weight.

    NeRF's hierarchical sampling with the field itself as the coarse model: the density (no gradients) at
    the midpoints of P equal pieces gives volume-rendering weights w; the pdf over the pieces is
    (1 - uniform_share) w / sum(w) + uniform_share / (occupied pieces), and the S + 1 edges are its
    inverse CDF at equally spaced (stratified: jittered) quantiles, linear inside each piece. A ray
    without weight or without occupied pieces gets the uniform share alone. With uniform pieces of
    length L, the intervals around a surface are about L / (S (1 - uniform_share) / n_pieces_it_spans)
    long: the quadrature resolves the surface where uniform samples would blur it over L.
    """
    n_rays, p = origins.shape[0], n_proposal
    span = (far - near).clamp(min=0.0)  # [R]
    base = torch.linspace(0.0, 1.0, p + 1, dtype=origins.dtype, device=origins.device)  # [P + 1]
    coarse = near[:, None] + span[:, None] * base  # [R, P + 1]
    mid = (coarse[:, :-1] + coarse[:, 1:]) / 2.0  # [R, P]
    points = (origins[:, None, :] + mid[..., None] * directions[:, None, :]).reshape(-1, 3)  # [R*P, 3]
    keep = occupancy(points) if occupancy is not None else torch.ones_like(points[:, 0], dtype=torch.bool)
    idx = keep.nonzero(as_tuple=True)[0]  # [K]
    sigma_k = _density_at(field, points[idx], directions[idx // p])  # [K]: point i is on ray i // P
    sigma = points.new_zeros(points.shape[0]).index_put((idx,), sigma_k.to(points.dtype)).reshape(n_rays, p)
    weights = _weights(coarse[:, :-1], coarse[:, 1:], sigma)[0]  # [R, P]
    occupied = keep.reshape(n_rays, p).to(weights.dtype)  # [R, P]
    occupied = torch.where(occupied.sum(-1, keepdim=True) > 0, occupied, torch.ones_like(occupied))
    uniform = occupied / occupied.sum(-1, keepdim=True)  # [R, P]
    total = weights.sum(-1, keepdim=True)  # [R, 1]
    seen = weights / total.clamp(min=1e-12)
    pdf = uniform_share * uniform + (1.0 - uniform_share) * torch.where(total > 1e-4, seen, uniform)
    cdf = torch.cat([pdf.new_zeros(n_rays, 1), torch.cumsum(pdf, -1)], -1)  # [R, P + 1]
    cdf = cdf / cdf[:, -1:]  # exactly 1 at the end
    u = torch.linspace(0.0, 1.0, n_samples + 1, dtype=pdf.dtype, device=pdf.device).expand(n_rays, -1)
    if stratified and n_samples > 1:  # jitter the inner quantiles within +-half a step; the ends stay
        jitter = torch.rand((n_rays, n_samples - 1), generator=generator, dtype=pdf.dtype, device="cpu")
        inner = u[:, 1:-1] + (jitter.to(pdf.device) - 0.5) / n_samples
        u = torch.cat([u[:, :1], inner, u[:, -1:]], -1)
    piece = torch.searchsorted(cdf.contiguous(), u.contiguous(), right=True).clamp(1, p) - 1  # [R, S + 1]
    c0, c1 = cdf.gather(1, piece), cdf.gather(1, piece + 1)
    t0, t1 = coarse.gather(1, piece), coarse.gather(1, piece + 1)
    frac = ((u - c0) / (c1 - c0).clamp(min=1e-12)).clamp(0.0, 1.0)
    edges = t0 + frac * (t1 - t0)  # [R, S + 1], non-decreasing in u
    edges[:, 0], edges[:, -1] = near, torch.maximum(far, near)
    return edges


def _live_samples(
    field: FieldFn,
    positions: Tensor,  # [R*S, 3]
    directions: Tensor,  # [R*S, 3]
    t_delta: Tensor,  # [R, S] interval lengths
    occupancy: Callable[[Tensor], Tensor] | None,
    early_stop_eps: float,
) -> tuple[Tensor, Tensor]:
    """(indices [K] of the samples to evaluate: in occupied cells and not hidden (transmittance >= eps),
    share of the occupied samples that are hidden, 0-dim)."""
    keep = torch.ones(positions.shape[0], dtype=torch.bool, device=positions.device)  # [R*S]
    if occupancy is not None:
        keep = occupancy(positions)
    if early_stop_eps > 0:
        idx = keep.nonzero(as_tuple=True)[0]  # [K0]
        with torch.no_grad():
            sigma_k = _density_at(field, positions[idx], directions[idx])  # [K0]
            sigma = positions.new_zeros(positions.shape[0]).index_put((idx,), sigma_k.to(positions.dtype))
            optical = sigma.reshape(t_delta.shape) * t_delta  # [R, S] sigma * delta
            before = torch.cumsum(optical, -1)[:, :-1]  # [R, S - 1]: no inf - inf where a density overflows
            before = torch.cat([torch.zeros_like(before[:, :1]), before], -1)  # [R, S] depth before each
        visible = keep & (before.reshape(-1) <= -math.log(early_stop_eps))
        hidden = (keep.sum() - visible.sum()) / keep.sum().clamp(min=1)  # 0 where nothing is occupied
        return visible.nonzero(as_tuple=True)[0], hidden
    return keep.nonzero(as_tuple=True)[0], positions.new_zeros(())


def _weights(
    t_starts: Tensor,  # [R, S] batched or [N] packed
    t_ends: Tensor,
    sigmas: Tensor,
    ray_indices: Tensor | None = None,  # [N] for packed samples
    n_rays: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Volume-rendering weights w_i = T_i alpha_i and transmittances T_i (nerfacc), each like sigmas."""
    weights, trans, _ = nerfacc.render_weight_from_density(
        t_starts, t_ends, sigmas, ray_indices=ray_indices, n_rays=n_rays
    )
    return weights, trans


def _seen_colors(
    field: FieldFn,  # with `color(feature, d) -> rgb`
    feat: Tensor,  # [K, F] geometry features of the evaluated samples
    dirs: Tensor,  # [K, 3] their ray directions
    weights: Tensor,  # [K] their rendering weights (no gradient needed)
    trans: Tensor,  # [K] their transmittances (no gradient needed)
    color_eps: float,
) -> tuple[Tensor, Tensor]:
    """(rgb [K, 3], share of the K whose colour MLP ran with gradients, 0-dim).

    Where a weight exceeds `color_eps`: the field's colour, with gradients. Elsewhere, where the sample is
    still visible (T >= color_eps, e.g. free space in front of a surface): its colour without gradients:
    the colour's own gradient there is weighted by less than color_eps, but the density's gradient needs
    the true colour (growing density there would show it; with 0 in its place the density's gradient
    would see black). Hidden samples (T < color_eps): 0; they enter the render and the densities'
    gradient only scaled by their transmittance, below color_eps.
    """
    live = (weights > color_eps).nonzero(as_tuple=True)[0]  # [L]
    faint = ((weights <= color_eps) & (trans >= color_eps)).nonzero(as_tuple=True)[0]  # [M]
    rgb_l = field.color(feat[live], dirs[live])  # [L, 3]
    with torch.no_grad():
        rgb_f = field.color(feat[faint].detach(), dirs[faint])  # [M, 3]
    rgb = rgb_l.new_zeros(feat.shape[0], 3).index_put((live,), rgb_l).index_put((faint,), rgb_f)  # [K, 3]
    return rgb, feat.new_tensor(live.numel() / max(feat.shape[0], 1))


def _composite(
    t_starts: Tensor,  # [R, S] batched or [N] packed
    t_ends: Tensor,
    t_mid: Tensor,
    sigmas: Tensor,
    rgbs: Tensor,  # [..., 3]
    bg: Tensor,  # [3]
    ray_indices: Tensor | None = None,  # [N] for packed samples
    n_rays: int | None = None,
    weights: Tensor | None = None,  # like sigmas, from `_weights` when already computed
) -> dict[str, Tensor]:
    """Weights, colour over the background, opacity and depth through nerfacc (batched or packed)."""
    if weights is None:
        weights = _weights(t_starts, t_ends, sigmas, ray_indices, n_rays)[0]
    rgb = nerfacc.accumulate_along_rays(weights, rgbs, ray_indices, n_rays)  # [R, 3]
    opacity = nerfacc.accumulate_along_rays(weights, None, ray_indices, n_rays)  # [R, 1]
    depth = nerfacc.accumulate_along_rays(weights, t_mid[..., None], ray_indices, n_rays)  # [R, 1]
    depth = depth / opacity.clamp(min=torch.finfo(depth.dtype).eps)
    return {
        "rgb": rgb + bg * (1.0 - opacity),
        "opacity": opacity,
        "depth": depth,
        "weights": weights,
        "sigmas": sigmas,
        "t_mid": t_mid,
        "t_delta": t_ends - t_starts,
    }


def _render_estimator(
    field: FieldFn,
    origins: Tensor,  # [R, 3]
    directions: Tensor,  # [R, 3]
    near: Tensor,  # [R]
    far: Tensor,  # [R]
    n_samples: int,
    bg: Tensor,  # [3]
    stratified: bool,
    estimator: nerfacc.OccGridEstimator,
    color_eps: float = 0.0,  # > 0: the field has geometry/color; colour only where weights exceed it
    occupancy: Callable[[Tensor], Tensor] | None = None,  # [N, 3] -> [N] bool: samples elsewhere dropped
) -> dict[str, Tensor]:
    """Occupancy-grid sampling (nerfacc CUDA kernels), then the packed weights/sums of nerfacc. The
    estimator's cells are tested at one random point each, so a cell that straddles the hull's border
    stays occupied; `occupancy` drops its samples outside the hull (density 0 there, as on the other
    paths)."""
    if origins.device.type != "cuda":
        raise RuntimeError(f"the occupancy-grid estimator needs CUDA tensors, got device {origins.device}")
    n_rays = origins.shape[0]
    aabb = estimator.aabbs[0]  # [6] the grid's box: its diagonal sets the step
    step = float((aabb[3:] - aabb[:3]).norm()) / n_samples / 3**0.5  # box side / n_samples

    ray_indices, t_starts, t_ends = estimator.sampling(
        origins,
        directions,
        sigma_fn=_estimator_sigma_fn(field, origins, directions, occupancy),
        t_min=near,
        t_max=far,
        render_step_size=step,
        stratified=stratified,
    )  # [N] each, sorted by ray
    t_mid = (t_starts + t_ends) / 2.0  # [N]
    positions = origins[ray_indices] + t_mid[:, None] * directions[ray_indices]  # [N, 3]
    if occupancy is not None:
        keep = occupancy(positions)  # [N] bool; a subset keeps the order by ray
        ray_indices, t_starts, t_ends, t_mid, positions = (
            a[keep] for a in (ray_indices, t_starts, t_ends, t_mid, positions)
        )
    weights = None
    if color_eps > 0:
        sigmas, feat = field.geometry(positions)  # [N], [N, F]
        weights, trans = _weights(t_starts, t_ends, sigmas, ray_indices, n_rays)  # [N] each
        rgbs, colored = _seen_colors(
            field, feat, directions[ray_indices], weights.detach(), trans.detach(), color_eps
        )
    else:
        rgbs, sigmas = field(positions, directions[ray_indices])  # [N, 3], [N]
    out = _composite(t_starts, t_ends, t_mid, sigmas, rgbs, bg, ray_indices, n_rays, weights)
    out.update(positions=positions, ray_indices=ray_indices)
    if color_eps > 0:
        out["colored"] = colored
    return out


def _estimator_sigma_fn(
    field: FieldFn,
    origins: Tensor,  # [R, 3]
    directions: Tensor,  # [R, 3]
    occupancy: Callable[[Tensor], Tensor] | None,  # [N, 3] -> [N] bool
) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """The density nerfacc's estimator skips empty space and stops rays early with: 0 outside `occupancy`,
    as the samples kept there are dropped after (else density the hull removes could end a ray early, and
    the ray would render empty)."""

    def sigma_fn(t_starts: Tensor, t_ends: Tensor, ray_indices: Tensor) -> Tensor:
        t = (t_starts + t_ends)[:, None] / 2.0  # [N, 1]
        x = origins[ray_indices] + t * directions[ray_indices]  # [N, 3]
        density = _density_at(field, x, directions[ray_indices])  # [N]
        return density if occupancy is None else density * occupancy(x)

    return sigma_fn


def make_estimator(
    bound: float, resolution: int = 128, device: torch.device | str = "cuda"
) -> nerfacc.OccGridEstimator:
    """A one-level occupancy grid over the cube [-bound, bound]^3 (instant-ngp: 128^3), all cells occupied."""
    if not float(bound) > 0:
        raise ValueError(f"bound must be > 0, got {bound}")
    b = float(bound)
    aabb = torch.tensor([-b, -b, -b, b, b, b], dtype=torch.float32)
    estimator = nerfacc.OccGridEstimator(roi_aabb=aabb, resolution=int(resolution), levels=1)
    estimator.binaries.fill_(True)  # nerfacc starts with every cell empty; its first update marks them
    return estimator.to(device)


def update_estimator(
    estimator: nerfacc.OccGridEstimator,
    density_fn: Callable[[Tensor], Tensor],  # world points [N, 3] -> sigma [N], e.g. field.density
    step: int,  # training step (the grid is refreshed every `every` steps)
    n_samples: int,  # as given to `render_rays`, to turn density into per-step opacity
    occ_thre: float = 0.01,  # a cell is empty below this opacity over one step (instant-ngp)
    every: int = 16,  # refresh period in steps (instant-ngp: 16)
    chunk: int = 1 << 18,  # points a density call: the warm-up refresh asks for every cell at once (128³:
    # 2.1M points, some 16 GB of hash-grid temporaries on CUDA; 256³: 8x that)
) -> None:
    """Refresh the occupancy grid from the field's density (in place); call once per training step."""
    aabb = estimator.aabbs[0]
    step_size = float((aabb[3:] - aabb[:3]).norm()) / n_samples / 3**0.5

    def occ_eval_fn(x: Tensor) -> Tensor:  # [N, 3] -> [N] ~ opacity over one marching step
        return torch.cat([density_fn(part) for part in x.split(chunk)]) * step_size

    estimator.update_every_n_steps(step=step, occ_eval_fn=occ_eval_fn, occ_thre=occ_thre, n=every)


def estimator_available(device: torch.device | str) -> bool:
    """Whether the occupancy-grid estimator can run on `device`: CUDA and nerfacc's CUDA extension builds."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        from nerfacc.cuda._backend import _C  # JIT-builds the extension on first use (minutes)
    except Exception:  # noqa: BLE001 - any build/import failure means: use the portable path
        return False
    return _C is not None
