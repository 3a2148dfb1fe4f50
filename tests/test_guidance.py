"""Masked SDS guidance (sv3d/guidance.py): hand-derived gradients, the visibility mask, an analytic stand-in
model that SDS alone must fit, and the tiny random SV3D model from the reference fixtures."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import trimesh

from refine import Mesh, edge_topology, interpolate, rasterize, render_mesh
from refine.camera import transform_points
from sv3d.cameras import static_orbit
from sv3d.guidance import (
    SDSConfig,
    SDSGuidance,
    SDSModel,
    SV3DSDSModel,
    input_view_direction,
    make_sv3d_guidance,
    seen_from_input,
    smoothstep,
    visibility_mask,
)

# ------------------------------------------------------------------------------------------------
# Stand-in models
# ------------------------------------------------------------------------------------------------


class IdentityModel:
    """encode = identity (latents are the [-1, 1] images), denoise = a fixed target: every term checkable."""

    sigma_min, sigma_max = 0.002, 700.0

    def __init__(self, target: torch.Tensor, resolution: int) -> None:
        self.target = target  # [V, 3, S, S]
        self.num_frames = target.shape[0]
        self.resolution = resolution
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def denoise(self, latents: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.seen.append((latents.clone(), sigma.clone()))
        return self.target


class GaussianTargetModel:
    """Analytic conditional denoiser: per camera, the data is N(target latent of that camera, s^2 I).

    encode: 4x average pooling of the [-1, 1] image to a 3-channel 'latent'. The exact denoiser of that
    distribution is D(x, sigma) = t + s^2 / (s^2 + sigma^2) (x - t), so E[z - D] = sigma^2/(s^2 + sigma^2)
    (z - t): SDS pulls each view's latent towards ITS camera's target.
    """

    sigma_min, sigma_max = 0.002, 700.0

    def __init__(self, target_images: torch.Tensor, spread: float = 0.05) -> None:
        self.num_frames = target_images.shape[0]
        self.resolution = target_images.shape[-1]
        self.spread = spread
        self.target = self.encode(target_images)  # [V, 3, S/4, S/4]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(images, 4)

    def denoise(self, latents: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        keep = self.spread**2 / (self.spread**2 + sigma[:, None, None, None] ** 2)  # [V, 1, 1, 1]
        return self.target + keep * (latents - self.target)


def icosphere(subdivisions: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    m = trimesh.creation.icosphere(subdivisions=subdivisions)  # unit radius, CCW from outside
    return torch.tensor(m.vertices, dtype=torch.float32), torch.tensor(m.faces, dtype=torch.int64)


def to_model_images(images: torch.Tensor) -> torch.Tensor:
    """[V, H, W, 3] in [0, 1] -> [V, 3, H, W] in [-1, 1]."""
    return images.permute(0, 3, 1, 2) * 2 - 1


# ------------------------------------------------------------------------------------------------
# The mask
# ------------------------------------------------------------------------------------------------


def test_smoothstep_hand_values():
    x = torch.tensor([-1.0, 0.0, 0.125, 0.25, 0.5, 2.0])
    # t = x / 0.5 clamped: 0, 0, 0.25, 0.5, 1, 1; 3t^2 - 2t^3: 0, 0, 0.15625, 0.5, 1, 1
    expected = torch.tensor([0.0, 0.0, 0.15625, 0.5, 1.0, 1.0])
    assert torch.allclose(smoothstep(0.0, 0.5, x), expected)


def test_mask_is_zero_facing_the_input_camera_and_one_facing_away():
    d = torch.nn.functional.normalize(torch.tensor([1.0, 2.0, 0.5]), dim=0)
    perpendicular = torch.nn.functional.normalize(torch.linalg.cross(d, torch.tensor([0.0, 0.0, 1.0])), dim=0)
    quarter = 0.25 * d + math.sqrt(1 - 0.25**2) * perpendicular  # n . d = 0.25
    normals = torch.stack([d, -d, perpendicular, quarter, d, torch.zeros(3)])[None, None]  # [1, 1, 6, 3]
    alpha = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.5, 0.0])[None, None, :, None]  # [1, 1, 6, 1]
    mask = visibility_mask(normals, alpha, d, low=0.0, high=0.5, background=0.2)[0, 0, :, 0]
    # facing: 1 - 1 = 0; away and edge-on: 1 - 0 = 1; n.d = 0.25: 1 - 0.5; half coverage of a facing pixel:
    # 0.5 * 0 + 0.5 * 0.2; empty pixel: the background weight 0.2.
    expected = torch.tensor([0.0, 1.0, 1.0, 0.5, 0.1, 0.2])
    assert torch.allclose(mask, expected, atol=1e-6), mask


def test_silhouette_pixels_beside_the_surface_take_their_neighbours_weight():
    """An antialiased pixel just outside the rasterized surface has alpha > 0 but no normal: it read as
    edge-on (weight 1 x alpha), so the outline the input camera sees head-on got full SDS."""
    d = torch.tensor([0.0, 0.0, 1.0])
    normals = torch.zeros(1, 3, 4, 3)
    normals[0, :, :2] = d  # columns 0-1 covered, facing the input camera (weight 0)
    normals[0, 1, 0] = -d  # one covered pixel facing away (weight 1)
    alpha = torch.zeros(1, 3, 4, 1)
    alpha[0, :, :2] = 1.0
    alpha[0, :, 2] = 0.4  # the antialiased band beside them, not covered; column 3 empty
    mask = visibility_mask(normals, alpha, d)[0, ..., 0]  # [3, 4]
    # band pixel (row r, column 2): the mean weight of the covered pixels among its neighbours (column 1
    # only, all facing: 0) times its alpha; covered pixels keep their own weight
    assert torch.equal(mask[:, 2], torch.zeros(3)) and torch.equal(mask[:, 3], torch.zeros(3))
    assert mask[1, 0] == 1.0 and mask[0, 0] == 0.0
    normals[0, :, 1] = -d  # the covered column beside the band faces away: the band gets 1 x alpha
    mask = visibility_mask(normals, alpha, d)[0, ..., 0]
    assert torch.allclose(mask[:, 2], torch.full((3,), 0.4))


def test_the_input_view_gets_no_sds_and_reset_repeats_the_draws():
    """The input view saw everything its render shows (its outline too, which the normals call edge-on);
    each refinement start (reset) draws the same sigmas and noise."""
    v, size = 3, 16
    model = IdentityModel(torch.zeros(v, 3, size, size), size)
    d = torch.tensor([0.0, 1.0, 0.0])
    config = SDSConfig(resolution=size, mask=True)
    guidance = SDSGuidance(model, config, d, input_view_index=v - 1)
    images = torch.full((v, size, size, 3), 0.75, requires_grad=True)
    normals = (-d).expand(v, size, size, 3).clone()  # facing away from the input camera: weight 1
    out = guidance(images, torch.ones(v, size, size, 1), normals)
    out["loss_sds"].backward()
    assert float(images.grad[-1].abs().max()) == 0.0  # the input view: nothing
    assert float(images.grad[:-1].abs().min()) > 0.0  # the others: everywhere
    first = [float(guidance(images, torch.ones(v, size, size, 1), normals)["sigma"]) for _ in range(3)]
    guidance.reset()
    assert guidance.num_calls == 0
    assert float(guidance(images, torch.ones(v, size, size, 1), normals)["sigma"]) == float(out["sigma"])
    assert first[0] != float(out["sigma"])


def test_mask_on_a_rendered_sphere_from_the_input_view_and_behind_it():
    orbit = static_orbit(0.0, 30.0, num_frames=2)  # frame 0 at a_in + 180 (exactly behind), frame 1 the input
    vertices, faces = icosphere(3)
    out = render_mesh(Mesh(vertices * 0.5, faces), orbit.cameras(), 48)
    mask = visibility_mask(out.normals, out.alpha, input_view_direction(orbit))  # [2, H, W, 1]
    inside = out.mask[..., 0] > 0
    front = mask[1, ..., 0][inside[1]]
    # Seen from the input camera, a radius-0.5 sphere 2 away shows normals with n . d_in >= 0.25 (tangent
    # rays: sin = 0.5 / 2), so the mask is at most 1 - smoothstep(0.25) = 0.5 and small on average.
    assert front.max() <= 0.5 + 0.05 and front.mean() < 0.15, (front.max(), front.mean())
    # From behind every visible normal has n . d_in <= -0.25: weight 1, times the (antialiased) coverage;
    # but at two half-covered silhouette pixels (alpha 0.51, supersampled coverage 0.50) the coarse sphere's
    # interpolated normals turn towards the input camera, which lowers their weight.
    off = (mask[0] - out.alpha[0]).abs()[..., 0] > 0.02  # [H, W]
    assert int(off.sum()) <= 2 and bool((mask[0][off] < out.alpha[0][off]).all())


def _two_spheres_along_the_input_view(orbit, res: int):
    """A small sphere between the input camera and a larger one: (points, covered, normals, alpha) of the
    orbit's renders ([V, H, W, .]) and the trimesh scene."""
    d_in = input_view_direction(orbit)
    # Off the input camera's optical axis (its x and y axes), the input view's depth image is symmetric
    # neither way: a flipped row or column would read other pixels.
    off = 0.08 * orbit.c2w()[-1, :3, 0] + 0.06 * orbit.c2w()[-1, :3, 1]
    spheres = []
    for centre, radius in ((0.25 * d_in + off, 0.15), (-0.2 * d_in - 0.6 * off, 0.28)):
        m = trimesh.creation.icosphere(subdivisions=4)
        spheres.append(trimesh.Trimesh(m.vertices * radius + centre.numpy(), m.faces))
    scene = trimesh.util.concatenate(spheres)
    verts = torch.tensor(scene.vertices, dtype=torch.float32)
    faces = torch.tensor(scene.faces)
    out = render_mesh(Mesh(verts, faces), orbit.cameras(), res)
    pos = transform_points(verts, orbit.cameras().world_to_clip())
    points = interpolate(verts, rasterize(pos, faces, res), faces)  # [V, H, W, 3]
    return points, out.mask > 0, out.normals, out.alpha, scene


def test_occlusion_from_the_input_view_matches_ray_casting():
    """A surface that faces the input camera but lies behind another is not seen from it: the larger,
    farther sphere's middle is hidden by the small one. `seen_from_input` (projection into the input view's
    own render) agrees with casting a ray from the input camera to each rendered surface point (embree),
    and the SDS mask is 1 (times alpha) there although the normals face the input camera."""
    pytest.importorskip("embreex")
    from trimesh.ray.ray_pyembree import RayMeshIntersector

    orbit = static_orbit(10.0, 30.0, num_frames=4)  # the last frame is the input view; the others see sides
    res = 128
    points, covered, normals, alpha, scene = _two_spheres_along_the_input_view(orbit, res)
    c2w = orbit.c2w()[-1]
    seen = seen_from_input(points, covered, len(orbit) - 1, c2w, orbit.fov_deg, tolerance=0.02)
    assert bool(seen[-1][covered[-1]].all())  # the input view sees all it renders

    camera = c2w[:3, 3].double().numpy()
    targets = points[covered[..., 0]].double().numpy()  # [P, 3]
    towards = targets - camera
    distance = (towards**2).sum(-1) ** 0.5
    locations, ray, _ = RayMeshIntersector(scene).intersects_location(
        camera[None].repeat(len(targets), 0), towards / distance[:, None], multiple_hits=False
    )
    first = torch.full((len(targets),), float("inf"), dtype=torch.float64)  # distance to the first hit
    first[torch.tensor(ray)] = torch.tensor(((locations - camera) ** 2).sum(-1) ** 0.5)
    visible = first >= torch.tensor(distance) - 0.02  # nothing before the point
    # Where the mask depends on it (surfaces turned towards the input camera: n . d_in >= 0.25); at grazing
    # angles the surface's depth changes by more than the tolerance across one of the input view's pixels.
    d = input_view_direction(orbit)
    turned = ((normals * d).sum(-1) >= 0.25)[covered[..., 0]]
    agree = float((seen[covered] == visible)[turned].double().mean())
    hidden = ~visible & turned
    assert hidden.sum() > 300 and agree > 0.98, (int(hidden.sum()), agree)

    facing = (normals * d).sum(-1, keepdim=True) >= 0.5  # [V, H, W, 1]: well turned to the input camera
    mask = visibility_mask(normals, alpha, d, unoccluded=seen)
    hidden_facing = facing & ~seen & covered
    assert hidden_facing.sum() > 50
    assert torch.allclose(mask[hidden_facing], alpha[hidden_facing])  # the SDS mask's full weight
    plain = visibility_mask(normals, alpha, d)
    assert float(plain[hidden_facing].max()) == 0.0  # without the test: "seen well", no SDS


def test_guidance_uses_the_surface_points_for_its_mask():
    """Given the renders' surface points and the input camera, the guidance's mask is the normals' mask
    with the occlusion test (computed here from the parts); without points, or with
    `occlusion_tolerance=None`, it is the normals' mask alone."""
    orbit = static_orbit(10.0, 30.0, num_frames=4)
    res = 32
    points, _, normals, alpha, _ = _two_spheres_along_the_input_view(orbit, res)
    images = torch.full((len(orbit), res, res, 3), 0.5)
    d = input_view_direction(orbit)
    covered = normals.abs().sum(-1, keepdim=True) > 0
    seen = seen_from_input(points, covered, len(orbit) - 1, orbit.c2w()[-1], orbit.fov_deg, 0.02)
    expected = {}
    for name, unoccluded in (("occlusion", seen), ("normals only", None)):
        mask = visibility_mask(normals, alpha, d, unoccluded=unoccluded)
        mask[-1] = 0.0  # the input view: no SDS on what it shows (background weight 0)
        expected[name] = float(mask.mean())
    assert expected["occlusion"] > expected["normals only"] + 0.01  # the hidden part of the far sphere
    cases = (("occlusion", 0.02, points), ("normals only", 0.02, None), ("normals only", None, points))
    for name, tolerance, given in cases:
        model = IdentityModel(torch.zeros(len(orbit), 3, res, res), res)  # latents = images: the mask as is
        config = SDSConfig(resolution=res, occlusion_tolerance=tolerance)
        guidance = SDSGuidance(model, config, d, len(orbit) - 1, orbit.c2w()[-1], orbit.fov_deg)
        mean = float(guidance(images, alpha, normals, points=given)["mask_mean"])
        assert mean == pytest.approx(expected[name], abs=1e-6), name
    with pytest.raises(ValueError, match="points must be"):
        guidance(images, alpha, normals, points=points[:, :8])
    with pytest.raises(ValueError, match="occlusion_tolerance"):
        SDSConfig(occlusion_tolerance=-1.0)
    with pytest.raises(ValueError, match="needs input_view_index"):
        SDSGuidance(model, config, d, None, orbit.c2w()[-1])
    with pytest.raises(ValueError, match="fov_deg"):
        SDSGuidance(model, config, d, len(orbit) - 1, orbit.c2w()[-1], fov_deg=0.0)


# ------------------------------------------------------------------------------------------------
# The SDS maths with an identity model
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weighting", ["x0", "sds"])
def test_gradient_on_the_renders_is_the_masked_sds_gradient(weighting: str):
    torch.manual_seed(0)
    v, size = 3, 16
    target = torch.rand(v, 3, size, size) * 2 - 1
    model = IdentityModel(target, size)
    config = SDSConfig(
        resolution=size, weight=2.0, weighting=weighting, mask=False, sigma_min=0.5, sigma_max=3.0
    )
    guidance = SDSGuidance(model, config, torch.tensor([1.0, 0.0, 0.0]))
    images = torch.rand(v, size, size, 3, requires_grad=True)
    out = guidance(images, torch.ones(v, size, size, 1), torch.zeros(v, size, size, 3))
    out["loss_sds"].backward()

    sigma = float(out["sigma"])
    w = 1.0 if weighting == "x0" else sigma / (1 + sigma**2)  # DreamFusion's 1 - abar, EDM form
    grad_latent = 2.0 * w * (to_model_images(images.detach()) - target) / v  # d loss / d latents
    # latents = 2 * images - 1 (identity encoder): d loss / d images = 2 * d loss / d latents
    expected = (2.0 * grad_latent).permute(0, 2, 3, 1)
    assert torch.allclose(images.grad, expected, atol=1e-6)
    # loss = 0.5 * |grad|^2 / V, the value of the reparameterised MSE
    full_grad = 2.0 * w * (to_model_images(images.detach()) - target)
    assert math.isclose(float(out["loss_sds"].detach()), 0.5 * float((full_grad**2).sum()) / v, rel_tol=1e-5)
    # the model saw z + sigma * n at one sigma for all views, with unit-variance noise
    noisy, sigmas = model.seen[0]
    assert torch.equal(sigmas, torch.full((v,), sigma))
    noise = (noisy - to_model_images(images.detach())) / sigma
    assert 0.8 < float(noise.std()) < 1.2


def test_the_mask_scales_the_gradient_and_the_renders_are_resized():
    v, render, size = 2, 32, 16
    target = torch.zeros(v, 3, size, size)
    model = IdentityModel(target, size)
    d = torch.tensor([0.0, 1.0, 0.0])
    config = SDSConfig(resolution=size, mask=True, sigma_min=1.0, sigma_max=1.0, sigma_max_final=1.0)
    guidance = SDSGuidance(model, config, d)
    images = torch.full((v, render, render, 3), 0.75, requires_grad=True)  # latent value 0.5 everywhere
    normals = torch.zeros(v, render, render, 3)
    normals[0] = d  # view 0 faces the input camera: weight 0
    normals[1, :, : render // 2] = -d  # view 1: left half faces away (weight 1), right half faces it (0)
    normals[1, :, render // 2 :] = d
    out = guidance(images, torch.ones(v, render, render, 1), normals)
    out["loss_sds"].backward()
    # mask at latent size: view 0 all 0; view 1 left half 1, right half 0 -> mean 0.25
    assert math.isclose(float(out["mask_mean"]), 0.25, abs_tol=1e-6)
    assert float(images.grad[0].abs().max()) == 0.0
    left, right = images.grad[1, :, : render // 2], images.grad[1, :, render // 2 :]
    # The render gradient is masked per pixel too: nothing reaches the masked right half (the antialiased
    # resize spreads a latent pixel's gradient over 4 render pixels, weights 1/8, 3/8, 3/8, 1/8, so the
    # latent mask alone let the border column's 1/8 through; the encoder's attention would let more).
    assert float(right.abs().max()) == 0.0 and float(left[:, :-2].abs().min()) > 0.0
    # Each latent pixel's weights over the render pixels sum to 1, so the render gradient sums to the latent
    # one: d loss / d latent = 0.5 / V = 0.25 per channel on 8 x 16 left latent pixels, x 3 channels, x 2 for
    # [0, 1] -> [-1, 1]: 192, less the border column's 1/8 on the right half: 16 x 3 x 0.5 / 8 = 3.
    assert math.isclose(float(images.grad[1].sum()), 189.0, rel_tol=1e-5)


def test_sigma_is_log_uniform_in_an_annealed_range():
    model = IdentityModel(torch.zeros(1, 3, 8, 8), 8)
    config = SDSConfig(resolution=8, sigma_min=0.1, sigma_max=10.0, sigma_max_final=2.0, anneal_steps=100)
    guidance = SDSGuidance(model, config, torch.tensor([0.0, 0.0, 1.0]))
    assert guidance.sigma_bounds(0) == (0.1, pytest.approx(10.0))
    assert guidance.sigma_bounds(50)[1] == pytest.approx(math.sqrt(10.0 * 2.0))  # geometric midpoint
    assert guidance.sigma_bounds(100)[1] == pytest.approx(2.0)
    assert guidance.sigma_bounds(10_000)[1] == pytest.approx(2.0)
    args = (torch.rand(1, 8, 8, 3), torch.ones(1, 8, 8, 1), torch.zeros(1, 8, 8, 3))
    early = [float(guidance(*args, step=0)["sigma"]) for _ in range(200)]
    late = [float(guidance(*args, step=100)["sigma"]) for _ in range(200)]
    assert 0.1 <= min(early) and max(early) <= 10.0 and max(early) > 5.0
    assert 0.1 <= min(late) and max(late) <= 2.0
    # log-uniform: the mean of ln(sigma) is the midpoint of the log range
    assert abs(sum(math.log(s) for s in early) / 200 - 0.0) < 0.35
    # the call counter drives the annealing when no step is given, and the draws are seeded
    assert guidance.num_calls == 400
    again = SDSGuidance(model, config, torch.tensor([0.0, 0.0, 1.0]))
    assert float(again(*args)["sigma"]) == early[0]


def test_inputs_are_checked():
    model = IdentityModel(torch.zeros(2, 3, 8, 8), 8)
    guidance = SDSGuidance(model, SDSConfig(resolution=8), torch.tensor([1.0, 0.0, 0.0]))
    ok = (torch.rand(2, 8, 8, 3), torch.ones(2, 8, 8, 1), torch.zeros(2, 8, 8, 3))
    with pytest.raises(ValueError, match="3 views but the model's orbit has 2 frames"):
        guidance(torch.rand(3, 8, 8, 3), torch.ones(3, 8, 8, 1), torch.zeros(3, 8, 8, 3))
    with pytest.raises(ValueError, match="alpha must be"):
        guidance(ok[0], torch.ones(2, 8, 8), ok[2])
    with pytest.raises(ValueError, match="normals must be"):
        guidance(ok[0], ok[1], torch.zeros(2, 4, 4, 3))
    with pytest.raises(ValueError, match="resolution 16 differs"):
        SDSGuidance(model, SDSConfig(resolution=16), torch.tensor([1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="input_view_dir"):
        SDSGuidance(model, SDSConfig(resolution=8), torch.zeros(3))
    with pytest.raises(ValueError, match="must implement SDSModel"):
        SDSGuidance(object(), SDSConfig(resolution=8), torch.tensor([1.0, 0.0, 0.0]))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sigma_min <= sigma_max_final <= sigma_max"):
        SDSConfig(sigma_min=1.0, sigma_max=0.5, sigma_max_final=0.5)
    with pytest.raises(ValueError, match="weighting"):
        SDSConfig(weighting="snr")
    with pytest.raises(ValueError, match="multiple of 8"):
        SDSConfig(resolution=60)
    assert isinstance(model, SDSModel)


# ------------------------------------------------------------------------------------------------
# SDS alone fits a mesh to an analytic per-camera model
# ------------------------------------------------------------------------------------------------

RES = 40  # 4x pooling -> 10x10 'latents' per view: enough to pin smooth colours, fast on 2 cores
VIEWS = 6
TARGET_SCALE = 0.45
STEPS = 80


@pytest.fixture(scope="module")
def colour_target():
    """A sphere of radius 0.45 whose colours vary around it, so every camera has a different target."""
    vertices, faces = icosphere(2)
    colors = (0.5 + 0.45 * vertices).clamp(0, 1)  # [N, 3]
    cameras = static_orbit(10.0, 0.0, num_frames=VIEWS).cameras()
    target = render_mesh(
        Mesh(vertices * TARGET_SCALE, faces, vertex_colors=colors), cameras, RES, shading="unlit"
    )
    model = GaussianTargetModel(to_model_images(target.image))
    visible = vertices[:, 2].abs() < 0.8  # the camera ring at elevation 10 sees all but the poles
    return cameras, model, colors, visible


def _fit(cameras, model: GaussianTargetModel, steps: int) -> tuple[torch.Tensor, float]:
    """Learn vertex colours (from grey) and a global scale (from 0.3) with loss_sds only."""
    vertices, faces = icosphere(2)
    topology = edge_topology(faces)
    colors = torch.full((vertices.shape[0], 3), 0.5, requires_grad=True)
    log_scale = torch.tensor(math.log(0.3), requires_grad=True)
    config = SDSConfig(resolution=RES, mask=False, sigma_min=0.02, sigma_max=0.5, sigma_max_final=0.5)
    guidance = SDSGuidance(model, config, torch.tensor([1.0, 0.0, 0.0]))
    optimizer = torch.optim.Adam([{"params": [colors], "lr": 0.05}, {"params": [log_scale], "lr": 0.02}])
    for _ in range(steps):
        mesh = Mesh(vertices * log_scale.exp(), faces, vertex_colors=colors)
        out = render_mesh(mesh, cameras, RES, shading="unlit", topology=topology)
        loss = guidance(out.image, out.alpha, out.normals)["loss_sds"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            colors.clamp_(0.0, 1.0)
    return colors.detach(), float(log_scale.detach().exp())


def test_sds_alone_fits_colours_and_size(colour_target):
    cameras, model, target_colors, visible = colour_target
    colors, scale = _fit(cameras, model, STEPS)
    error = (colors - target_colors)[visible].abs().mean()
    initial = (0.5 - target_colors)[visible].abs().mean()  # 0.23 from grey
    assert abs(scale - TARGET_SCALE) < 0.015, scale  # measured 0.4506
    assert error < 0.05 and error < initial / 4, (error, initial)  # measured 0.020


def test_sds_pulls_each_view_towards_its_own_cameras_target(colour_target):
    """The renders' cameras rotated half a turn against the model's: each view is pulled towards the
    opposite camera's target, and the colours end up further from the truth than the grey start (the
    silhouette, the same from every side, still fits)."""
    cameras, model, target_colors, visible = colour_target
    swapped = cameras[torch.roll(torch.arange(VIEWS), VIEWS // 2)]
    colors, _ = _fit(swapped, model, STEPS // 2)
    error = (colors - target_colors)[visible].abs().mean()
    initial = (0.5 - target_colors)[visible].abs().mean()
    assert error > initial, (error, initial)  # measured 0.37 vs 0.23


# ------------------------------------------------------------------------------------------------
# The tiny random SV3D model (reference fixtures)
# ------------------------------------------------------------------------------------------------

TINY_SIZE = 64  # the fixture's input image size; the tiny model also runs at 32 and 128


@pytest.fixture(scope="module")
def tiny_p(sv3d_tiny: Path):
    from safetensors.torch import load_file

    from sv3d.model.pipeline import SV3DPipeline

    pipe = SV3DPipeline.from_single_file(
        sv3d_tiny / "tiny_sv3d_p.safetensors", sgm_config=sv3d_tiny / "tiny_sv3d_p.yaml"
    )
    image = load_file(str(sv3d_tiny / "ref_sv3d_p.safetensors"))["input/image"]  # [1, 3, 64, 64] in [-1, 1]
    return pipe, image


def test_tiny_sv3d_gradients_reach_the_renders(tiny_p):
    pipe, image = tiny_p
    orbit = static_orbit()
    guidance = make_sv3d_guidance(pipe, image, orbit, SDSConfig(resolution=TINY_SIZE))
    assert guidance.model.num_frames == 21 and guidance.model.resolution == TINY_SIZE
    torch.manual_seed(0)
    images = torch.rand(21, TINY_SIZE, TINY_SIZE, 3, requires_grad=True)
    normals = F.normalize(torch.randn(21, TINY_SIZE, TINY_SIZE, 3), dim=-1)
    timings = []
    for _ in range(2):
        start = time.perf_counter()
        out = guidance(images, torch.ones(21, TINY_SIZE, TINY_SIZE, 1), normals)
        out["loss_sds"].backward()
        timings.append(time.perf_counter() - start)
    print(f"tiny SV3D SDS step (21 x {TINY_SIZE}^2, encode + CFG denoise + backward): {timings[-1]:.2f} s")
    loss = out["loss_sds"].detach()
    assert torch.isfinite(loss) and float(loss) > 0
    assert torch.isfinite(images.grad).all() and float(images.grad.abs().max()) > 0
    assert 0.2 < float(out["mask_mean"]) < 0.8  # random normals: about half face away from the input view
    assert 0.1 <= float(out["sigma"]) <= 10.0


def test_tiny_sv3d_conditioning_is_computed_once_and_cfg_matches(tiny_p, monkeypatch):
    pipe, image = tiny_p
    polars, azimuths = static_orbit().model_conditioning()
    calls = []
    original = type(pipe).conditioning
    monkeypatch.setattr(
        type(pipe), "conditioning", lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    )
    batched = SV3DSDSModel(pipe, image, polars, azimuths)
    sequential = SV3DSDSModel(pipe, image, polars, azimuths, cfg_batching=False)
    cond_only = SV3DSDSModel(pipe, image, polars, azimuths, guidance_scale=1.0)
    assert len(calls) == 3  # one per model, none per denoise call
    torch.manual_seed(1)
    x = torch.randn(21, 4, TINY_SIZE // 8, TINY_SIZE // 8)
    sigma = torch.full((21,), 2.0)
    d_batched, d_seq = batched.denoise(x, sigma), sequential.denoise(x, sigma)
    assert len(calls) == 3
    assert (d_batched - d_seq).abs().max() <= 1e-5
    # scale 1 at both ends of the triangle: frames 0 and 20 equal the conditional prediction alone
    d_cond = cond_only.denoise(x, sigma)
    assert (d_batched[[0, 20]] - d_cond[[0, 20]]).abs().max() <= 1e-5
    assert (d_batched[10] - d_cond[10]).abs().max() > 1e-4  # scale 2.5 mid-orbit differs
    with pytest.raises(ValueError, match="sv3d_p needs the orbit's cameras"):
        SV3DSDSModel(pipe, image)


def test_tiny_sv3d_one_step_on_a_rendered_mesh_reaches_vertices_and_colours(tiny_p):
    pipe, image = tiny_p
    orbit = static_orbit(10.0, 0.0)
    guidance = make_sv3d_guidance(pipe, image, orbit, SDSConfig(resolution=TINY_SIZE))
    vertices, faces = icosphere(2)
    offsets = torch.zeros_like(vertices, requires_grad=True)
    colors = torch.full_like(vertices, 0.6).requires_grad_(True)
    mesh = Mesh(vertices * 0.45 + offsets, faces, vertex_colors=colors)
    out = render_mesh(mesh, orbit.cameras(), TINY_SIZE)  # lambert, on white
    result = guidance(out.image, out.alpha, out.normals)
    result["loss_sds"].backward()
    for name, grad in (("offsets", offsets.grad), ("colours", colors.grad)):
        assert grad is not None and torch.isfinite(grad).all(), name
        assert float(grad.abs().max()) > 0, name
    # masked: the input view's side of the sphere gets little colour gradient, the far side much more
    # (not none: the mask acts on latents and the VAE encoder's receptive field mixes neighbouring pixels)
    d = input_view_direction(orbit)
    facing = vertices @ d  # [N] cosine of each vertex with the input direction
    near, far = colors.grad[facing > 0.9].abs().max(), colors.grad[facing < -0.5].abs().max()
    assert float(near) < 0.25 * float(far), (near, far)  # measured 0.026 vs 0.30


def test_chunked_encoding_gives_the_same_latents_and_gradients(tiny_p):
    """Activation checkpointing in chunks of frames (the default, for memory at 576^2) changes nothing."""
    from sv3d.guidance import SV3DSDSModel

    pipe, image = tiny_p
    polars, azimuths = static_orbit().model_conditioning()
    torch.manual_seed(0)
    x = torch.rand(21, 3, TINY_SIZE, TINY_SIZE) * 2.0 - 1.0  # [V, 3, S, S] in [-1, 1]
    weights = torch.randn(21, 4, TINY_SIZE // 8, TINY_SIZE // 8)
    results = []
    for chunk in (0, 3, 4):  # whole, 7 x 3, 5 x 4 + 1
        model = SV3DSDSModel(pipe, image, polars, azimuths, encode_chunk=chunk)
        images = x.clone().requires_grad_(True)
        latents = model.encode(images)  # [21, 4, 8, 8]
        (latents * weights).sum().backward()
        results.append((latents.detach(), images.grad))
    for latents, grad in results[1:]:
        assert torch.allclose(latents, results[0][0], atol=1e-5)
        assert torch.allclose(grad, results[0][1], atol=1e-5)
    with pytest.raises(ValueError, match="encode_chunk"):
        SV3DSDSModel(pipe, image, polars, azimuths, encode_chunk=-1)


def test_non_finite_values_give_no_sds_gradient(tiny_p):
    pipe, image = tiny_p
    guidance = make_sv3d_guidance(pipe, image, static_orbit(), SDSConfig(resolution=TINY_SIZE))
    normals = F.normalize(torch.randn(21, TINY_SIZE, TINY_SIZE, 3), dim=-1)
    alpha = torch.ones(21, TINY_SIZE, TINY_SIZE, 1)
    images = torch.rand(21, TINY_SIZE, TINY_SIZE, 3)
    images[3, 5, 5] = float("nan")  # one bad pixel of one render
    images.requires_grad_(True)
    out = guidance(images, alpha, normals)
    out["loss_sds"].backward()
    assert float(out["loss_sds"].detach()) == 0.0 and (images.grad is None or bool((images.grad == 0).all()))


def test_the_orbit_must_be_one_the_model_knows(sv3d_tiny: Path, tiny_p):
    from sv3d.cameras import make_orbit
    from sv3d.errors import InputError
    from sv3d.model.pipeline import SV3DPipeline

    pipe_p, image = tiny_p
    config = SDSConfig(resolution=TINY_SIZE)
    with pytest.raises(InputError, match="21-frame"):
        make_sv3d_guidance(pipe_p, image, static_orbit(num_frames=7), config)
    make_sv3d_guidance(pipe_p, image, make_orbit("sine"), config)  # sv3d_p takes any 21 cameras
    pipe_u = SV3DPipeline.from_single_file(
        sv3d_tiny / "tiny_sv3d_u.safetensors", sgm_config=sv3d_tiny / "tiny_sv3d_u.yaml"
    )
    make_sv3d_guidance(pipe_u, image, static_orbit(elevation_deg=20.0, input_azimuth_deg=40.0), config)
    with pytest.raises(InputError, match="sv3d_u takes no cameras"):
        make_sv3d_guidance(pipe_u, image, make_orbit("sine"), config)


def test_bfloat16_sds_gradients_match_float32(sv3d_tiny: Path, tiny_p):
    """SDS runs the UNet and CLIP in bfloat16 on CUDA (STYLE rule 9): its gradient on the renders, here
    on the CPU with the tiny model, points where float32's does."""
    from sv3d.model.pipeline import SV3DPipeline

    pipe32, image = tiny_p
    pipe16 = SV3DPipeline.from_single_file(
        sv3d_tiny / "tiny_sv3d_p.safetensors", sgm_config=sv3d_tiny / "tiny_sv3d_p.yaml", dtype=torch.bfloat16
    )
    torch.manual_seed(0)
    renders = torch.rand(21, TINY_SIZE, TINY_SIZE, 3)
    normals = F.normalize(torch.randn(21, TINY_SIZE, TINY_SIZE, 3), dim=-1)
    alpha = torch.ones(21, TINY_SIZE, TINY_SIZE, 1)
    grads = []
    for pipe in (pipe32, pipe16):
        guidance = make_sv3d_guidance(pipe, image, static_orbit(), SDSConfig(resolution=TINY_SIZE))
        images = renders.clone().requires_grad_(True)
        guidance(images, alpha, normals, step=0)["loss_sds"].backward()
        grads.append(images.grad.flatten())
    cosine = F.cosine_similarity(grads[0], grads[1], dim=0)
    ratio = grads[1].norm() / grads[0].norm()
    print(f"bfloat16 vs float32 SDS gradient: cosine {float(cosine):.4f}, norm ratio {float(ratio):.4f}")
    assert cosine > 0.98 and 0.9 < ratio < 1.1
