"""The rasterizer against an independent reference (embree ray casting), gradients, and behaviour."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import trimesh

from refine import Cameras, Mesh, antialias, edge_topology, interpolate, rasterize, render_mesh, texture
from refine.camera import transform_points
from refine.rasterizer import (
    _silhouette_crossings,
    _to_pixels,
    _zbuffer_cpu,
    interpolate_covered,
    seam_topology,
    weld_seams,
)
from sv3d.cameras import FOV_DEG, c2w_from_angles, projection_from_fov


def orbit_cameras(n_views: int, elevation: float = 10.0) -> Cameras:
    azimuths = torch.arange(n_views, dtype=torch.float64) * (360.0 / n_views) + 7.0
    elevations = torch.full_like(azimuths, elevation)
    return Cameras(c2w_from_angles(elevations, azimuths).float(), projection_from_fov(FOV_DEG))


def bumpy_sphere(subdivisions: int) -> trimesh.Trimesh:
    """A non-convex closed surface of radius about 0.5 (self-occluding bumps)."""
    m = trimesh.creation.icosphere(subdivisions=subdivisions)
    v = m.vertices
    r = 0.5 * (1.0 + 0.15 * np.sin(6 * v[:, 0]) * np.sin(5 * v[:, 1]) * np.sin(4 * v[:, 2]))
    return trimesh.Trimesh(v * r[:, None] / 1.15, m.faces, process=False)


def embree_cast(
    mesh: trimesh.Trimesh, cameras: Cameras, res: int | tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Triangle id (-1 = miss) and view-axis depth per pixel centre, by embree ray casting; `res` is the
    side or (H, W) (the projection is square: non-square images have non-square pixels)."""
    from trimesh.ray.ray_pyembree import RayMeshIntersector

    height, width = (res, res) if isinstance(res, int) else res
    caster = RayMeshIntersector(mesh)
    tan_half = math.tan(math.radians(FOV_DEG) / 2)
    cols = (np.arange(width) + 0.5) / width * 2 - 1
    rows = (np.arange(height) + 0.5) / height * 2 - 1
    xs, ys = np.meshgrid(cols, -rows)  # [H, W]; row 0 = top
    dirs_cam = np.stack([xs * tan_half, ys * tan_half, -np.ones_like(xs)], -1).reshape(-1, 3)
    ids, depths = [], []
    for c2w in cameras.c2w.double().numpy():
        dirs = dirs_cam @ c2w[:3, :3].T
        origins = np.broadcast_to(c2w[:3, 3], dirs.shape)
        tri, ray, loc = caster.intersects_id(origins, dirs, multiple_hits=False, return_locations=True)
        view_id = np.full(height * width, -1)
        view_id[ray] = tri
        depth = np.zeros(height * width)
        depth[ray] = (loc - c2w[:3, 3]) @ -c2w[:3, 2]  # distance along the viewing axis
        ids.append(view_id)
        depths.append(depth)
    return np.stack(ids), np.stack(depths)


@pytest.mark.slow
def test_matches_embree_on_100k_triangles():
    pytest.importorskip("embreex")
    mesh = bumpy_sphere(6)
    mesh = trimesh.Trimesh(
        mesh.vertices, np.concatenate([mesh.faces, mesh.faces[:20000, ::-1]]), process=False
    )
    assert mesh.faces.shape[0] > 100_000 - 1000
    cams = orbit_cameras(6, elevation=25.0)
    res = 192
    ref_id, ref_depth = embree_cast(mesh, cams, res)
    rendered = render_mesh(
        Mesh(torch.tensor(mesh.vertices, dtype=torch.float32), torch.tensor(mesh.faces)),
        cams,
        res,
        antialias=False,
    )
    ours_id = rendered.rast[..., 3].long().reshape(len(cams), -1).numpy() - 1
    ours_depth = rendered.depth[..., 0].reshape(len(cams), -1).double().numpy()
    covered = (ours_id >= 0) | (ref_id >= 0)
    # The reversed copies coincide with their originals: either id of such a pair is the same surface.
    dup = np.arange(mesh.faces.shape[0])
    dup[mesh.faces.shape[0] - 20000 :] = np.arange(20000)
    same = dup[np.maximum(ours_id, 0)] == dup[np.maximum(ref_id, 0)]
    same &= (ours_id >= 0) == (ref_id >= 0)
    agreement = same[covered].mean()
    assert agreement >= 0.995, agreement
    both = (ours_id >= 0) & (ref_id >= 0) & same
    rel = np.abs(ours_depth[both] - ref_depth[both]) / ref_depth[both]
    assert rel.max() < 1e-4, rel.max()


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_non_square_images_match_embree(backend: str):
    """Height and width enter the pixel mapping separately (fit-nerf renders masks at (H, W)): swapped or
    mixed up, only non-square images show it, and every other test here is square."""
    pytest.importorskip("embreex")
    if backend == "numba" and not _zbuffer_cpu.AVAILABLE:
        pytest.skip("numba is not installed")
    mesh = bumpy_sphere(3)
    cams = orbit_cameras(2, elevation=20.0)
    pos = transform_points(torch.tensor(mesh.vertices, dtype=torch.float32), cams.world_to_clip())
    rast = rasterize(pos, torch.tensor(mesh.faces), (72, 120), backend=backend)  # [2, 72, 120, 4]
    ref_id, _ = embree_cast(mesh, cams, (72, 120))
    ours_id = rast[..., 3].long().reshape(2, -1).numpy() - 1
    covered = (ours_id >= 0) | (ref_id >= 0)
    assert (ours_id == ref_id)[covered].mean() > 0.99


def test_a_triangle_larger_than_a_chunk():
    """A screen-filling quad: each triangle's box holds more pixels than a chunk of 997 candidates, the
    chunked loop's other branch; the same rasterization as in one chunk."""
    corners = [[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]
    pos = torch.tensor([[[x, y, 0.5, 1.0] for x, y in corners]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    whole = rasterize(pos, faces, (40, 56), backend="torch")
    assert bool((whole[..., 3] > 0).all())
    assert torch.equal(whole, rasterize(pos, faces, (40, 56), backend="torch", max_candidates=997))


def test_torch_and_numba_zbuffers_agree():
    if not _zbuffer_cpu.AVAILABLE:
        pytest.skip("numba is not installed: only the torch z-buffer exists")
    mesh = bumpy_sphere(4)
    cams = orbit_cameras(3)
    pos = transform_points(torch.tensor(mesh.vertices, dtype=torch.float32), cams.world_to_clip())
    faces = torch.tensor(mesh.faces)
    a = rasterize(pos, faces, (96, 80), backend="torch")
    b = rasterize(pos, faces, (96, 80), backend="numba")
    same = (a[..., 3] == b[..., 3]).float().mean()
    assert same > 0.999
    both = (a[..., 3] == b[..., 3]) & (a[..., 3] > 0)
    assert torch.allclose(a[both], b[both], atol=1e-5)
    # Tiny chunks exercise the chunked candidate loop: identical result.
    c = rasterize(pos, faces, (96, 80), backend="torch", max_candidates=997)
    assert torch.equal(a, c)


def test_single_triangle_by_hand():
    # A triangle covering the lower-left half of NDC space at w = 1: pixel centres strictly below the
    # diagonal x + y < 0 are covered. With 4x4 pixels, centres at +-0.25, +-0.75.
    pos = torch.tensor([[[-1.0, -1.0, 0.5, 1.0], [1.0, -1.0, 0.5, 1.0], [-1.0, 1.0, 0.5, 1.0]]])
    rast = rasterize(pos, torch.tensor([[0, 1, 2]]), 4)
    covered = rast[0, ..., 3] > 0
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(covered, expected)  # row 0 = top: the top-left corner pixel only
    # Bottom-left pixel centre (-0.75, -0.75): weights b1 = (x + 1) / 2 = 0.125 on vertex 1, b2 = 0.125 on
    # vertex 2, so u (vertex 0) = 0.75 and v (vertex 1) = 0.125; z/w = 0.5 everywhere.
    assert torch.allclose(rast[0, 3, 0], torch.tensor([0.75, 0.125, 0.5, 1.0]))


def test_depth_test_and_perspective_correct_interpolation():
    # Two overlapping screen-filling quads at different depths: the nearer one wins everywhere.
    cams = Cameras(torch.eye(4)[None], projection_from_fov(90.0))
    quad = lambda z: [[-5, -5, z], [5, -5, z], [5, 5, z], [-5, 5, z]]  # noqa: E731
    verts = torch.tensor(quad(-2.0) + quad(-1.0))
    faces = torch.tensor([[0, 1, 2], [0, 2, 3], [4, 5, 6], [4, 6, 7]])
    out = render_mesh(Mesh(verts, faces), cams, 16, antialias=False)
    assert torch.all(out.rast[..., 3] >= 3)  # triangles 2 and 3 (ids 3, 4) are the near quad
    assert torch.allclose(out.depth, torch.ones_like(out.depth), atol=1e-5)
    # A slanted quad: interpolated camera-space depth is exact (affine in 3D, perspective-correct).
    slanted = torch.tensor([[-1.0, -1.0, -1.0], [1.0, -1.0, -3.0], [1.0, 1.0, -3.0], [-1.0, 1.0, -1.0]])
    out = render_mesh(Mesh(slanted, faces[:2]), cams, 32, antialias=False)
    pts = interpolate(slanted, out.rast, faces[:2])
    # Camera frame = world frame: depth is -z of the interpolated point, and that point lies on the ray.
    hit = out.mask[..., 0] > 0
    assert torch.allclose(out.depth[..., 0][hit], -pts[..., 2][hit], atol=1e-5)
    ndc = (torch.arange(32) + 0.5) / 32 * 2 - 1
    ray_x = ndc[None, :].expand(32, 32)
    assert torch.allclose((pts[0, ..., 0] / -pts[0, ..., 2])[hit[0]], ray_x[hit[0]], atol=1e-4)


def test_triangles_behind_the_camera_are_dropped_and_empty_scene():
    pos = torch.tensor([[[-1.0, -1.0, 0.5, -1.0], [1.0, -1.0, 0.5, 1.0], [-1.0, 1.0, 0.5, 1.0]]])
    assert torch.all(rasterize(pos, torch.tensor([[0, 1, 2]]), 8) == 0)
    assert rasterize(pos, torch.zeros((0, 3), dtype=torch.long), 8).abs().sum() == 0


_SQUARE = [[-0.47, -0.43, 0.5, 1.0], [0.41, -0.52, 0.5, 1.0], [0.45, 0.44, 0.5, 1.0], [-0.5, 0.4, 0.5, 1.0]]


_NEAR_PLANE = [[-0.3, -0.6, -2.0, 1.0], [0.6, 0.1, -2.0, 1.0], [-0.2, 0.7, -2.0, 1.0]]  # z/w < -1


@pytest.mark.parametrize(
    ("extra", "extra_face"),
    [
        ([[1.0, 0.0, 0.5, -1.0]], [1, 4, 2]),  # behind the camera, projected across the square
        ([[-1.0, 0.0, 0.5, -1.0]], [1, 4, 2]),  # projected beyond 1-2: 1-2 would not read as a silhouette
        (_NEAR_PLANE, [4, 5, 6]),  # in front of the near plane, over the square: clipped
        ([[float("nan"), 0.0, 0.5, 1.0]] + _NEAR_PLANE[1:], [4, 5, 6]),  # a diverged vertex
    ],
)
def test_antialias_ignores_triangles_that_are_not_drawn(extra: list[list[float]], extra_face: list[int]):
    """A square (two triangles) with a third triangle that rasterize does not draw: its edges blend nothing
    (and where it shares the square's edge 1-2, that edge is the square's outline), as without it."""
    pos = torch.tensor([_SQUARE + extra])  # [1, 4 + E, 4]
    faces = torch.tensor([[0, 1, 2], [0, 2, 3], extra_face])
    colour = torch.rand(1, 16, 16, 3, generator=torch.Generator().manual_seed(0))
    rast = rasterize(pos, faces, 16)
    assert torch.equal(rast, rasterize(pos, faces[:2], 16))
    for backend in ("torch", "numba") if _zbuffer_cpu.AVAILABLE else ("torch",):
        with_dropped = antialias(colour, rast, pos, faces, backend=backend)
        assert torch.equal(with_dropped, antialias(colour, rast, pos[:, :4], faces[:2], backend=backend))
        assert not torch.equal(with_dropped, colour)


def test_an_edge_flagged_by_one_of_its_triangles_is_followed():
    """The silhouette test is symmetric but for rounding and degenerate triangles: an interior edge that
    only its higher-numbered triangle flags is still followed (each edge is walked once, from the
    lower-numbered triangle)."""
    pos = torch.tensor([_SQUARE], dtype=torch.float32)
    pos[0, 3, 2] = 0.9  # triangle 1's far vertex deeper: across the diagonal 0-2 the pixels see farther
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    rast = rasterize(pos, faces, 16)
    px, py, pz = _to_pixels(pos, 16, 16)
    ids, zw = rast[..., 3].long(), rast[..., 2]
    topology = edge_topology(faces)
    drawn = torch.ones(1, 2, dtype=torch.bool)
    only_diagonal = torch.zeros(1, 2, 3, dtype=torch.bool)
    only_diagonal[0, 1, 0] = True  # triangle 1's edge 0 -> 2, not triangle 0's edge 2 -> 0
    view, _, _, _, e0, e1 = _silhouette_crossings(ids, zw, px, py, pz, faces, topology, only_diagonal, drawn)
    assert view.numel() > 4
    assert set(zip(e0.tolist(), e1.tolist(), strict=True)) <= {(0, 2), (2, 0)}


def _small_scene(dtype=torch.float64):
    mesh = trimesh.creation.icosphere(subdivisions=1, radius=0.45)
    verts = torch.tensor(mesh.vertices, dtype=dtype)
    faces = torch.tensor(mesh.faces)
    cams = orbit_cameras(2)
    pos = transform_points(verts, cams.world_to_clip().to(dtype))
    return verts, faces, pos


def test_gradcheck_interpolate():
    verts, faces, pos = _small_scene()
    rast_pixels = 12
    attr = torch.rand(verts.shape[0], 2, dtype=torch.float64, requires_grad=True)
    pos = pos.detach().requires_grad_(True)

    def fn(attr, pos):
        rast = rasterize(pos, faces, rast_pixels)
        return interpolate(attr, rast, faces)

    assert torch.autograd.gradcheck(fn, (attr, pos), eps=1e-6, atol=1e-5, fast_mode=True)


def test_interpolate_covered_gives_interpolates_covered_pixels_and_their_gradients():
    verts, faces, pos = _small_scene()
    pos = pos.detach().requires_grad_(True)
    rast = rasterize(pos, faces, 16)  # [2, 16, 16, 4]
    per_view = torch.rand(2, verts.shape[0], 3, dtype=torch.float64)
    for attr in (verts.clone().requires_grad_(True), per_view.requires_grad_(True)):
        dense = interpolate(attr, rast, faces).reshape(-1, 3)  # [V*H*W, 3]
        covered, values = interpolate_covered(attr, rast, faces)
        assert torch.equal(covered, (rast[..., 3].reshape(-1) > 0).nonzero(as_tuple=True)[0])
        assert 0 < covered.numel() < dense.shape[0]
        assert torch.equal(values, dense[covered])
        assert torch.all(dense[rast[..., 3].reshape(-1) == 0] == 0)
        weights = torch.rand_like(values)
        g_dense = torch.autograd.grad((dense[covered] * weights).sum(), (attr, pos), retain_graph=True)
        g_covered = torch.autograd.grad((values * weights).sum(), (attr, pos), retain_graph=True)
        for a, b in zip(g_dense, g_covered, strict=True):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("boundary", ["wrap", "clamp"])
def test_gradcheck_texture(boundary: str):
    tex = torch.rand(5, 7, 3, dtype=torch.float64, requires_grad=True)
    uv = (torch.rand(2, 4, 4, 2, dtype=torch.float64) * 2.4 - 0.7).requires_grad_(True)  # wraps around
    assert torch.autograd.gradcheck(
        lambda t, c: texture(t, c, boundary=boundary), (tex, uv), eps=1e-6, atol=1e-5
    )


def test_texture_hits_texel_centres_and_wraps():
    tex = torch.arange(12, dtype=torch.float32).reshape(3, 4, 1)  # row 0 = top
    # Texel (row j, column i) centre: u = (i + 0.5) / 4, v = 1 - (j + 0.5) / 3.
    j, i = torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")
    uv = torch.stack([(i + 0.5) / 4, 1 - (j + 0.5) / 3], -1)[None].float()
    assert torch.allclose(texture(tex, uv)[0], tex, atol=1e-5)
    assert torch.allclose(texture(tex, uv + 1.0)[0], tex, atol=1e-4)  # wrap: period 1
    # Half-way between the last and first column, wrap blends them; clamp keeps the last.
    edge = torch.tensor([[[[1.0, 1 - 0.5 / 3]]]])
    assert torch.allclose(texture(tex, edge), torch.tensor((3.0 + 0.0) / 2))
    assert torch.allclose(texture(tex, edge, boundary="clamp"), torch.tensor(3.0))


def test_float32_gradients_match_float64():
    """The refinement runs in float32; the gradient checks run in float64: the same scene's gradient of
    antialias with respect to the positions (the silhouette crossings' arithmetic), float32 against
    float64, on one rasterization (so both blend the same pixels)."""
    verts, faces, pos64 = _small_scene(torch.float64)
    res = 24
    rast64 = rasterize(pos64, faces, res)
    gen = torch.Generator().manual_seed(4)
    attr64 = torch.rand(verts.shape[0], 3, generator=gen, dtype=torch.float64)
    weights = torch.rand(pos64.shape[0], res, res, 3, generator=gen, dtype=torch.float64)
    topo = edge_topology(faces)
    grads = {}
    for dtype in (torch.float64, torch.float32):
        pos = pos64.to(dtype).requires_grad_(True)
        rast = rast64.to(dtype)  # the same pixels for both: only the arithmetic's precision differs
        color = interpolate(attr64.to(dtype), rast, faces)
        blended = antialias(color, rast, pos, faces, topo)
        (grads[dtype],) = torch.autograd.grad((blended * weights.to(dtype)).sum(), pos)
    g32, g64 = grads[torch.float32].double(), grads[torch.float64]
    assert g64.abs().sum() > 0
    relative = float((g32 - g64).abs().max() / g64.abs().max())
    assert relative <= 1e-3, relative


def test_gradcheck_antialias():
    verts, faces, pos = _small_scene()
    res = 12
    rast = rasterize(pos, faces, res)
    topo = edge_topology(faces)
    color = torch.rand(pos.shape[0], res, res, 2, dtype=torch.float64)
    color = (color * (rast[..., 3:] > 0)).requires_grad_(True)
    pos = pos.detach().requires_grad_(True)
    # The rasterization is fixed (non-differentiable decisions); gradients flow through colours and the
    # silhouette crossings.
    fn = lambda c, p: antialias(c, rast, p, faces, topo)  # noqa: E731
    out = fn(color, pos)
    assert (out - color).abs().sum() > 0  # something was blended
    assert torch.autograd.gradcheck(fn, (color, pos), eps=1e-6, atol=1e-5, fast_mode=True)


def _fan(n_sides: int, angle: float, flip: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A regular polygon of radius 0.6 as a triangle fan, straight in clip space ([1, N, 4], [F, 3])."""
    t = torch.arange(n_sides, dtype=torch.float64) * 2 * math.pi / n_sides + angle
    xy = torch.cat([torch.zeros(1, 2, dtype=torch.float64), 0.6 * torch.stack([t.cos(), t.sin()], -1)])
    pos = torch.cat([xy, torch.full_like(xy, 0.5)[:, :1], torch.ones_like(xy)[:, :1]], -1).float()[None]
    faces = torch.tensor([[0, 1 + i, 1 + (i + 1) % n_sides] for i in range(n_sides)])
    if flip is not None:  # one triangle wound the other way round
        faces[flip] = faces[flip].flip(0)
    return pos, faces


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_antialiased_alpha_is_the_pixels_coverage(backend: str):
    """At the outline the antialiased alpha approximates each pixel's covered area (measured by 16 x 16
    supersampling), for edges of every slope and for a fan with one triangle wound the other way: a
    near-horizontal edge is blended by vertical pairs only (nvdiffrast's rule; blended by both, its
    pixels lost their coverage twice: error 0.13 on a square turned by 0.1 rad), and silhouettes follow the
    geometry, not the winding (the flipped triangle's inner edges blurred the fan's inside)."""
    if backend == "numba" and not _zbuffer_cpu.AVAILABLE:
        pytest.skip("numba is not installed: only the torch path exists")
    res, ss = 48, 16
    for n_sides, angle, flip in ((4, 0.1, None), (4, 0.7, 0), (7, 0.3, 2), (64, 0.0, 5)):
        pos, faces = _fan(n_sides, angle, flip)
        rast = rasterize(pos, faces, res)
        inside = (rast[..., 3:] > 0).float()  # [1, H, W, 1]
        alpha = antialias(inside, rast, pos, faces, backend=backend)
        fine = (rasterize(pos, faces, res * ss)[..., 3:] > 0).float()
        coverage = fine.reshape(1, res, ss, res, ss, 1).mean((2, 4))
        edge = (coverage > 0) & (coverage < 1)
        error, unblended = ((alpha - coverage).abs()[edge].mean(), (inside - coverage).abs()[edge].mean())
        assert error < 0.04 and error < 0.25 * unblended, (n_sides, angle, float(error), float(unblended))
        inner = coverage == 1
        assert torch.equal(alpha[inner], inside[inner])  # no blending across the fan's inner edges


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_antialiasing_where_one_surface_occludes_another(backend: str):
    """Every pair above had the background on one side, so the depth test between two surfaces was never
    exercised: a heptagon in front of a square (both drawn), the colour 1 on the front one and 0 on the
    back one; at the heptagon's outline the blended colour is the share of the pixel it covers (16 x 16
    supersampled), as at an outline against the background."""
    if backend == "numba" and not _zbuffer_cpu.AVAILABLE:
        pytest.skip("numba is not installed: only the torch path exists")
    res, ss = 48, 16
    back_pos, back_faces = _fan(4, 0.1)  # z 0.5, inradius 0.42
    front_pos, front_faces = _fan(7, 0.3)
    front_pos = front_pos.clone()
    front_pos[..., :2] = front_pos[..., :2] * 0.5 + torch.tensor([0.05, 0.02])  # radius 0.3, inside
    front_pos[..., 2] = 0.2  # nearer than the square
    pos = torch.cat([back_pos, front_pos], dim=1)  # [1, 5 + 8, 4]
    faces = torch.cat([back_faces, front_faces + back_pos.shape[1]])
    n_back = back_faces.shape[0]

    def front_share(rast: torch.Tensor) -> torch.Tensor:  # [1, H, W, 1]: 1 where the front fan is drawn
        return (rast[..., 3:] > n_back).float()

    rast = rasterize(pos, faces, res)
    drawn = front_share(rast)
    blended = antialias(drawn, rast, pos, faces, backend=backend)
    fine = front_share(rasterize(pos, faces, res * ss)).reshape(1, res, ss, res, ss, 1).mean((2, 4))
    edge = (fine > 0) & (fine < 1)
    error, unblended = (blended - fine).abs()[edge].mean(), (drawn - fine).abs()[edge].mean()
    assert error < 0.04 and error < 0.25 * unblended, (float(error), float(unblended))


def _sphere_views(
    subdivisions: int, radius: float, centre=(0.0, 0.0, 0.0)
) -> tuple[torch.Tensor, torch.Tensor]:
    m = trimesh.creation.icosphere(subdivisions=subdivisions)
    verts = torch.tensor(m.vertices, dtype=torch.float32) * radius + torch.tensor(centre)
    return verts, torch.tensor(m.faces)


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_outline_gradient_of_a_fine_mesh_is_the_areas(backend: str):
    """On a fine mesh the surface near the outline is seen edge-on, so the triangle at a pixel just inside
    the outline is several triangles away from the silhouette edge: a search along the mesh from it (the
    2-ring search before 2026-12-07) blended ~6% of the outline pixels, and the gradient of the antialiased
    coverage with respect to the mesh's size was 0.06 of the true one (measured). Found in screen space,
    the gradient of the summed alpha with respect to a scale of the sphere matches the finite difference
    of its 8 x 8 supersampled projected area."""
    if backend == "numba" and not _zbuffer_cpu.AVAILABLE:
        pytest.skip("numba is not installed: only the torch path exists")
    verts, faces = _sphere_views(4, 0.3)  # 5,120 faces, ~3 px at the outline at 96^2
    cams, res = orbit_cameras(2), 96
    scale = torch.tensor(1.0, requires_grad=True)
    pos = transform_points(verts * scale, cams.world_to_clip())
    rast = rasterize(pos, faces, res)
    alpha = antialias((rast[..., 3:] > 0).float(), rast, pos, faces, backend=backend)
    (grad,) = torch.autograd.grad(alpha.sum(), scale)

    def area(s: float) -> float:
        fine = rasterize(transform_points(verts * s, cams.world_to_clip()), faces, res * 8)
        return float((fine[..., 3] > 0).float().sum()) / 64

    finite = (area(1.02) - area(0.98)) / 0.04
    assert abs(float(grad) / finite - 1.0) < 0.05, (float(grad), finite)


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_hidden_silhouettes_blend_nothing(backend: str):
    """A sphere in front of another: the back sphere's outline behind the front one crosses pixel pairs
    that both see the front sphere (on two of its triangles); it is behind what either pixel sees, so
    nothing is blended there. Only pixels within a pixel of a visible outline change (random colours, so
    any blend shows), and where the front sphere occludes the back one the blended colour is the front
    sphere's share of the pixel (16 x 16 supersampled)."""
    if backend == "numba" and not _zbuffer_cpu.AVAILABLE:
        pytest.skip("numba is not installed: only the torch path exists")
    front, front_faces = _sphere_views(4, 0.2, (0.25, -0.08, 0.0))  # the camera is on +x
    back, back_faces = _sphere_views(4, 0.2, (-0.15, 0.12, 0.05))
    verts = torch.cat([back, front])
    faces = torch.cat([back_faces, front_faces + len(back)])
    n_back = len(back_faces)
    cams, res, ss = orbit_cameras(1, elevation=0.0), 64, 16
    pos = transform_points(verts, cams.world_to_clip())
    rast = rasterize(pos, faces, res)
    fine = rasterize(pos, faces, res * ss)[..., 3].reshape(1, res, ss, res, ss)
    front_share = (fine > n_back).float().mean((2, 4))  # [1, H, W]
    any_share = (fine > 0).float().mean((2, 4))
    colour = torch.rand(1, res, res, 3, generator=torch.Generator().manual_seed(0))
    blended = antialias(colour, rast, pos, faces, backend=backend)
    changed = (blended - colour).abs().amax(-1) > 0  # [1, H, W]
    # Pixels whose 3 x 3 neighbourhood lies wholly on the front sphere or wholly on the back sphere's
    # visible part: no visible outline within a pixel.
    pure = ((front_share == 1) | ((any_share == 1) & (front_share == 0))).float()[:, None]
    far_from_outline = -torch.nn.functional.max_pool2d(-pure, 3, stride=1, padding=1)[:, 0] == 1
    hidden = far_from_outline & (front_share == 1)
    alone = rasterize(pos[:, : len(back)], back_faces, res * ss)[..., 3].reshape(1, res, ss, res, ss)
    back_alone = (alone > 0).float().mean((2, 4))
    behind = hidden & (back_alone > 0) & (back_alone < 1)  # the back outline, under the front sphere
    assert behind.sum() > 10
    assert not changed[far_from_outline].any()
    assert changed.sum() > 50
    drawn = (rast[..., 3:] > n_back).float()
    share = antialias(drawn, rast, pos, faces, backend=backend)
    edge = (front_share > 0) & (front_share < 1) & (any_share == 1)  # front against back, not background
    error = (share[..., 0] - front_share).abs()[edge].mean()
    unblended = (drawn[..., 0] - front_share).abs()[edge].mean()
    assert error < 0.3 * unblended, (float(error), float(unblended))


def test_bad_triangles_are_refused():
    _, faces, pos = _small_scene(torch.float32)
    with pytest.raises(ValueError, match="tri indexes vertices 0..42 but pos_clip has 42"):
        rasterize(pos, torch.cat([faces, torch.tensor([[0, 1, 42]])]), 8)
    with pytest.raises(ValueError, match="tri indexes vertices -1"):
        rasterize(pos, torch.cat([faces, torch.tensor([[0, 1, -1]])]), 8)
    too_many = torch.zeros(1, 3, dtype=torch.int64).expand(2**24, 3)  # ids are float32 in rast[..., 3]
    with pytest.raises(ValueError, match="at most 2\\^24 - 1 triangles"):
        rasterize(pos, too_many, 8)


def test_edge_topology():
    box = trimesh.creation.box()
    topo = edge_topology(torch.tensor(box.faces))
    faces = box.faces
    for f in range(len(faces)):
        for k in range(3):
            o = int(topo[f, k])
            edge = {faces[f, k], faces[f, (k + 1) % 3]}
            assert o != f and edge <= set(faces[o])
    open_topo = edge_topology(torch.tensor(box.faces[:-1]))
    assert (open_topo == -1).sum() == 3  # the removed triangle's three edges are now boundary edges


def _silhouette_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a > 0.5, b > 0.5
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("use_antialias", [True, False])
def test_silhouette_loss_fits_a_nonconvex_target(use_antialias: bool):
    """Mask loss alone moves a sphere onto a dumbbell, only through antialias's position gradients."""
    torch.manual_seed(0)
    cams = Cameras(
        c2w_from_angles(
            [0.0, 0.0, 0.0, 90.0 - 1e-3, 30.0, -40.0], [0.0, 60.0, 120.0, 0.0, 90.0, 200.0]
        ).float(),
        projection_from_fov(FOV_DEG),
    )
    res = 64
    a = trimesh.creation.icosphere(subdivisions=3, radius=0.27)
    b = a.copy()
    a.apply_translation([0.0, -0.2, 0.0])
    b.apply_translation([0.0, 0.2, 0.0])
    target_mesh = trimesh.util.concatenate([a, b])
    target = render_mesh(
        Mesh(torch.tensor(target_mesh.vertices, dtype=torch.float32), torch.tensor(target_mesh.faces)),
        cams,
        res,
    ).alpha.detach()

    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.3)
    faces = torch.tensor(sphere.faces)
    base = torch.tensor(sphere.vertices, dtype=torch.float32)
    offset = torch.zeros_like(base, requires_grad=True)
    # Uniform Laplacian, to keep the surface well shaped while it moves.
    edges = torch.tensor(sphere.edges_unique)
    n = base.shape[0]
    degree = torch.zeros(n).index_add_(0, edges.reshape(-1), torch.ones(edges.numel()))
    topo = edge_topology(faces)

    def laplacian(v):
        nb = (
            torch.zeros_like(v)
            .index_add_(0, edges[:, 0], v[edges[:, 1]])
            .index_add_(0, edges[:, 1], v[edges[:, 0]])
        )
        return v - nb / degree[:, None]

    def current_alpha():
        return render_mesh(
            Mesh(base + offset, faces), cams, res, shading="unlit", antialias=use_antialias, topology=topo
        ).alpha

    start_iou = _silhouette_iou(current_alpha().detach(), target)
    assert start_iou <= 0.7
    opt = torch.optim.Adam([offset], lr=0.01)
    for _ in range(250):
        opt.zero_grad()
        alpha = current_alpha()
        loss = (alpha - target).abs().mean() + 2.0 * laplacian(base + offset).pow(2).sum(-1).mean()
        loss.backward()
        opt.step()
    final_iou = _silhouette_iou(current_alpha().detach(), target)
    if use_antialias:
        assert final_iou >= 0.95, (start_iou, final_iou)
    else:
        assert final_iou < 0.8, (start_iou, final_iou)


def test_render_mesh_colours_and_shading():
    cams = orbit_cameras(4, elevation=40.0)
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.4)
    verts, faces = torch.tensor(sphere.vertices, dtype=torch.float32), torch.tensor(sphere.faces)
    plain = render_mesh(Mesh(verts, faces, color=(0.2, 0.4, 0.6)), cams, 48, shading="unlit", antialias=False)
    inside = plain.mask[..., 0] > 0
    assert torch.allclose(plain.image[inside], torch.tensor([0.2, 0.4, 0.6]), atol=1e-6)
    assert torch.allclose(plain.image[~inside], torch.ones(3))  # white background
    lit = render_mesh(Mesh(verts, faces, color=(1.0, 1.0, 1.0)), cams, 48)
    shade = lit.image[inside][:, 0]
    assert shade.min() >= 0.3 and shade.max() <= 1.0 and shade.std() > 0.05  # shape visible
    # Lights are fixed in the world: the top of a sphere is equally bright from every azimuth.
    normals_up = (lit.normals[..., 2] > 0.95) & inside
    per_view = [lit.image[v][normals_up[v]][:, 0].mean() for v in range(4)]
    assert max(per_view) - min(per_view) < 0.02
    # Straight RGBA: colour where covered, alpha from coverage.
    rgba = lit.rgba
    assert rgba.shape[-1] == 4 and torch.allclose(rgba[..., 3:], lit.alpha)
    # Normals are unit length, face the camera and are the smooth (vertex-interpolated) ones: on a sphere
    # centred at the origin, the direction of the surface point (flat face normals are ~1.5 deg off)
    n = lit.normals[inside]
    assert torch.allclose(n.norm(dim=-1), torch.ones(n.shape[0]), atol=1e-4)
    rast = rasterize(transform_points(verts, cams.world_to_clip()), faces, 48)
    points = interpolate(verts, rast, faces)[inside]  # [P, 3] the visible surface points
    radial = torch.nn.functional.normalize(points, dim=-1)
    angle = torch.rad2deg(torch.acos((n * radial).sum(-1).clamp(-1.0, 1.0)))
    assert angle.mean() < 0.5, angle.mean()
    to_camera = cams.positions()[:, None, None, :].expand(-1, 48, 48, -1)[inside] - points
    assert ((n * to_camera).sum(-1) > 0).all()


def test_render_mesh_texture_and_vertex_colours():
    cams = Cameras(torch.eye(4)[None], projection_from_fov(90.0))
    quad = torch.tensor([[-1.0, -1.0, -1.0], [1.0, -1.0, -1.0], [1.0, 1.0, -1.0], [-1.0, 1.0, -1.0]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    uvs = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    tex = torch.rand(16, 16, 3)
    out = render_mesh(Mesh(quad, faces, uvs=uvs, texture=tex), cams, 16, shading="unlit", antialias=False)
    # The quad exactly fills the view, texel centres coincide with pixel centres, row 0 = top.
    assert torch.allclose(out.image[0], tex, atol=1e-5)
    colors = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]])
    out = render_mesh(Mesh(quad, faces, vertex_colors=colors), cams, 16, shading="unlit", antialias=False)
    # Pixel centres near a corner take (almost) that corner's colour; row 0 = top.
    assert torch.allclose(out.image[0, 0, 0], colors[3], atol=0.1)  # top-left: vertex 3
    assert torch.allclose(out.image[0, -1, -1], colors[1], atol=0.1)  # bottom-right: vertex 1


def test_uv_seams_are_not_silhouettes():
    """An unwrapped mesh has its vertices split along every chart border (xatlas, GSO's files): the seams
    were taken for boundaries, and the pixels across them blended (colour off by up to 0.95 where a seam
    ran near the outline, in render-orbit's ground-truth frames too). Split into a triangle soup, a
    sphere now renders as the welded sphere does."""
    cams = orbit_cameras(4, elevation=20.0)
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.4)
    verts, faces = torch.tensor(sphere.vertices, dtype=torch.float32), torch.tensor(sphere.faces)
    colors = (verts / 0.8 + 0.5).clamp(0, 1)  # [N, 3] a smooth colour field
    welded = render_mesh(Mesh(verts, faces, vertex_colors=colors), cams, 64, shading="unlit")
    soup_faces = torch.arange(faces.numel()).reshape(-1, 3)  # every triangle with vertices of its own
    soup = Mesh(verts[faces].reshape(-1, 3), soup_faces, vertex_colors=colors[faces].reshape(-1, 3))
    split = render_mesh(soup, cams, 64, shading="unlit")
    torch.testing.assert_close(split.rgba, welded.rgba, atol=1e-5, rtol=0)
    assert (edge_topology(weld_seams(soup.vertices, soup_faces)) >= 0).all()  # a closed surface again
    # A double-sided sheet (two coincident surfaces, each with vertices of its own, as game assets' cards):
    # welded, every inner edge would have four faces and be a silhouette; each sheet keeps its own edges
    both = Mesh(
        torch.cat([verts, verts]),
        torch.cat([faces, faces.flip(1) + len(verts)]),
        vertex_colors=torch.cat([colors, colors]),
    )
    assert (seam_topology(both.faces, weld_seams(both.vertices, both.faces)) >= 0).all()
    torch.testing.assert_close(
        render_mesh(both, cams, 64, shading="unlit").rgba, welded.rgba, atol=1e-5, rtol=0
    )


@pytest.mark.gpu
def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    mesh = bumpy_sphere(5)
    cams = orbit_cameras(4)
    m = Mesh(torch.tensor(mesh.vertices, dtype=torch.float32), torch.tensor(mesh.faces))
    cpu = render_mesh(m, cams, 128)
    gpu = render_mesh(m.to("cuda"), cams.to("cuda"), 128)
    assert (cpu.rast[..., 3] == gpu.rast[..., 3].cpu()).float().mean() > 0.999
    assert (cpu.image - gpu.image.cpu()).abs().mean() < 1e-3


def test_torch_and_numba_antialias_agree():
    if not _zbuffer_cpu.AVAILABLE:
        pytest.skip("numba is not installed: only the torch path exists")
    mesh = bumpy_sphere(3)
    open_mesh = trimesh.Trimesh(mesh.vertices, mesh.faces[: len(mesh.faces) // 2], process=False)  # boundary
    for m in (mesh, open_mesh):
        cams = orbit_cameras(3, elevation=30.0)
        verts = torch.tensor(m.vertices, dtype=torch.float32)
        faces = torch.tensor(m.faces)
        pos = transform_points(verts, cams.world_to_clip()).requires_grad_(True)
        rast = rasterize(pos, faces, 64)
        color = torch.rand(3, 64, 64, 3)
        outs, grads = [], []
        for backend in ("torch", "numba"):
            out = antialias(color, rast, pos, faces, backend=backend)
            (g,) = torch.autograd.grad(out.pow(2).sum(), pos)
            outs.append(out)
            grads.append(g)
        assert (outs[0] != color).any()
        assert torch.allclose(outs[0], outs[1], atol=1e-5)
        assert torch.allclose(grads[0], grads[1], atol=1e-4)


def test_no_grad_fast_path_matches_autograd_path():
    if not _zbuffer_cpu.AVAILABLE:
        pytest.skip("numba is not installed: only the torch path exists")
    mesh = bumpy_sphere(4)
    cams = orbit_cameras(3)
    pos = transform_points(torch.tensor(mesh.vertices, dtype=torch.float32), cams.world_to_clip())
    faces = torch.tensor(mesh.faces)
    with torch.no_grad():
        fast = rasterize(pos, faces, 72)
    slow = rasterize(pos.clone().requires_grad_(True), faces, 72).detach()
    reference = rasterize(pos, faces, 72, backend="torch")
    assert torch.equal(fast[..., 3], slow[..., 3])
    assert torch.allclose(fast, slow, atol=1e-5)
    assert (fast[..., 3] == reference[..., 3]).float().mean() > 0.999


def test_a_triangle_one_ulp_nearer_wins_on_both_backends():
    """Two overlapping triangles at z/w 0.92 and the next float32 above it: the nearer (higher id) wins.
    The PyTorch path keyed depth by (z + 1) / 2, which rounded the two together, and the lower id won."""
    near = 0.92
    far = float(np.nextafter(np.float32(near), np.float32(1.0)))
    big = [[-3.0, -3.0], [3.0, -3.0], [0.0, 3.0]]
    pos = torch.tensor([[[x, y, z, 1.0] for z in (far, near) for x, y in big]], dtype=torch.float32)
    faces = torch.tensor([[0, 1, 2], [3, 4, 5]])  # face 0 farther, face 1 nearer
    for backend in ("torch", "numba") if _zbuffer_cpu.AVAILABLE else ("torch",):
        ids = rasterize(pos, faces, 8, backend=backend)[..., 3]
        assert (ids == 2).all(), backend  # triangle id + 1
