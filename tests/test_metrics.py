"""Evaluation metrics and winding numbers on shapes whose answers can be worked out by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import trimesh

from sv3d.errors import InputError
from sv3d.evaluation import metrics
from sv3d.evaluation.metrics import (
    MeshMetrics,
    chamfer_distance,
    evaluate_mesh,
    face_components,
    fibonacci_sphere,
    fscore,
    normalize_prediction,
    sample_visible_surface,
    volume_iou,
)
from sv3d.evaluation.winding import (
    build_face_tree,
    solid_angles,
    winding_numbers,
    winding_numbers_exact,
    winding_numbers_fast,
)
from sv3d.meshio import place_in_world
from sv3d.testing.objects import make_test_object

# Small settings so that each evaluation takes about a second on 2 CPU cores.
FAST = {"n_views": 24, "view_resolution": 256, "iou_resolution": 32}


def _tensors(mesh: trimesh.Trimesh, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(np.array(mesh.vertices), dtype=dtype), torch.tensor(np.array(mesh.faces))


def _bumpy_sphere(subdivisions: int = 4) -> trimesh.Trimesh:
    """A closed, star-shaped, non-convex surface (radius varies in [0.75, 1.25])."""
    sphere = trimesh.creation.icosphere(subdivisions=subdivisions)
    n = np.asarray(sphere.vertices)
    r = 1.0 + 0.25 * np.sin(5.0 * n[:, 0]) * np.cos(4.0 * n[:, 1])
    return trimesh.Trimesh(n * r[:, None], sphere.faces, process=False)


def _hemisphere(rings: int = 24, segments: int = 64) -> trimesh.Trimesh:
    """The open upper unit hemisphere (z >= 0), its rim exactly on z = 0, faces wound outwards."""
    theta = np.linspace(0.0, np.pi / 2, rings + 1)[1:]  # polar angle of each ring (the pole apart)
    phi = np.linspace(0.0, 2 * np.pi, segments, endpoint=False)
    t, p = np.meshgrid(theta, phi, indexing="ij")  # [rings, segments]
    ring = np.stack([np.sin(t) * np.cos(p), np.sin(t) * np.sin(p), np.cos(t)], -1).reshape(-1, 3)
    vertices = np.concatenate([[[0.0, 0.0, 1.0]], ring])  # vertex 0 is the pole
    j = np.arange(segments)
    idx = 1 + np.arange(rings * segments).reshape(rings, segments)  # [rings, segments]
    fan = np.stack([np.zeros(segments, dtype=int), idx[0, j], idx[0, (j + 1) % segments]], -1)
    a, b = idx[:-1, j], idx[:-1, (j + 1) % segments]  # ring i
    c, d = idx[1:, j], idx[1:, (j + 1) % segments]  # ring i + 1
    quads = np.concatenate([np.stack([a, c, d], -1).reshape(-1, 3), np.stack([a, d, b], -1).reshape(-1, 3)])
    return trimesh.Trimesh(vertices, np.concatenate([fan, quads]), process=False)


def _placed(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    vertices, _, _ = place_in_world(np.asarray(mesh.vertices, dtype=np.float64))
    return trimesh.Trimesh(vertices, mesh.faces, process=False)


# ------------------------------------------------------------------------------------------ winding numbers


def test_solid_angle_of_an_octant() -> None:
    # The triangle (e_x, e_y, e_z) cuts off one octant of the unit sphere: 4π / 8 = π/2 steradians, seen
    # from the origin. Its normal (1, 1, 1) points away from the origin, so the origin is "inside": +.
    a, b, c = torch.eye(3, dtype=torch.float64)
    assert solid_angles(a, b, c).item() == pytest.approx(math.pi / 2, abs=1e-12)
    assert solid_angles(a, c, b).item() == pytest.approx(-math.pi / 2, abs=1e-12)


def test_winding_numbers_of_a_closed_sphere() -> None:
    # A closed polyhedron has winding number exactly 1 inside and 0 outside; the icosphere's faces lie
    # within 1 - cos(edge/2) ≈ 0.3% of the radius, so |p| < 0.95 is inside and |p| > 1.05 outside.
    vertices, faces = _tensors(trimesh.creation.icosphere(subdivisions=3))
    rng = np.random.default_rng(0)
    dirs = fibonacci_sphere(200)
    inside = torch.tensor(dirs * rng.uniform(0.0, 0.95, (200, 1)))
    outside = torch.tensor(dirs * rng.uniform(1.05, 3.0, (200, 1)))
    points = torch.cat([inside, outside])
    exact = winding_numbers_exact(points, vertices, faces)
    fast = winding_numbers(points, vertices, faces, method="fast")
    assert torch.allclose(exact[:200], torch.ones(200, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(exact[200:], torch.zeros(200, dtype=torch.float64), atol=1e-9)
    assert (fast - exact).abs().max().item() < 5e-3
    # Turning the faces inside out flips the sign.
    flipped = winding_numbers_exact(points, vertices, faces[:, [0, 2, 1]])
    assert torch.allclose(flipped, -exact, atol=1e-12)


def test_winding_number_is_one_half_on_a_hemisphere_opening() -> None:
    # Closing the upper hemisphere with the disc z = 0 gives a closed surface (w = 1 just inside); the disc
    # subtends 2π (w = 1/2) from points just above it, so the open hemisphere alone gives 1 - 1/2 = 1/2
    # on its opening, and continuously so, since the hemisphere is away from there.
    hemi = _hemisphere()
    assert (np.einsum("fi,fi->f", hemi.face_normals, hemi.triangles_center) > 0).all()  # outward
    vertices, faces = _tensors(hemi)
    rng = np.random.default_rng(1)
    radius, angle = np.sqrt(rng.uniform(0, 0.6**2, 100)), rng.uniform(0, 2 * np.pi, 100)
    points = torch.tensor(np.stack([radius * np.cos(angle), radius * np.sin(angle), np.zeros(100)], -1))
    for method in ("exact", "fast"):
        w = winding_numbers(points, vertices, faces, method=method)
        assert (w - 0.5).abs().max().item() < 0.01, method


def _meshes_for_agreement() -> dict[str, trimesh.Trimesh]:
    box = trimesh.creation.box(extents=(1.0, 1.0, 1.0)).subdivide().subdivide()
    corners = [[0, -0.5, -0.5], [0, 0.5, -0.5], [0, 0.5, 0.5], [0, -0.5, 0.5]]
    wall = trimesh.Trimesh(corners, [[0, 1, 2], [0, 2, 3]])  # a wall inside the box, touching it
    mug, _, _ = make_test_object("mug")
    return {
        "bumpy sphere": _bumpy_sphere(4),
        "box with a wall": trimesh.util.concatenate([box, wall.subdivide()]),
        "hemisphere": _hemisphere(16, 48),
        "mug": _placed(mug),
    }


@pytest.mark.parametrize("name", list(_meshes_for_agreement()))
def test_fast_winding_numbers_agree_with_exact(name: str) -> None:
    mesh = _meshes_for_agreement()[name]
    vertices, faces = _tensors(mesh)
    rng = np.random.default_rng(2)
    lo, hi = mesh.bounds
    pad = 0.2 * (hi - lo).max()
    box_points = rng.uniform(lo - pad, hi + pad, (1500, 3))  # anywhere around the mesh
    surface, _ = trimesh.sample.sample_surface(mesh, 500, seed=3)
    near = surface + rng.normal(scale=0.01 * (hi - lo).max(), size=surface.shape)  # close to the surface
    points = torch.tensor(np.concatenate([box_points, near]))
    exact = winding_numbers_exact(points, vertices, faces)
    tree = build_face_tree(vertices.float(), faces)
    fast = winding_numbers_fast(points.float(), tree).double()
    assert (fast - exact).abs().max().item() < 0.02
    clear = (exact - 0.5).abs() > 0.05  # inside/outside decided away from w = 1/2
    assert torch.equal(fast[clear] > 0.5, exact[clear] > 0.5)


def test_winding_number_orders_converge() -> None:
    # Each extra term of the far-field expansion makes the approximation better on the same tree.
    vertices, faces = _tensors(_bumpy_sphere(3))
    points = torch.tensor(np.random.default_rng(4).uniform(-1.5, 1.5, (800, 3)))
    exact = winding_numbers_exact(points, vertices, faces)
    tree = build_face_tree(vertices, faces)
    errors = [(winding_numbers_fast(points, tree, order=k) - exact).abs().mean().item() for k in (0, 1, 2)]
    assert errors[2] < errors[1] < errors[0]
    huge_beta = winding_numbers_fast(points, tree, beta=1e6)  # everything near: every pair summed exactly
    assert torch.allclose(huge_beta, exact, atol=1e-9)


@pytest.mark.slow
def test_fast_winding_numbers_speed_on_a_large_mesh() -> None:
    # 64³ cell centres against 81,920 faces: seconds, not the minutes that the exact sum would take. The
    # exact sum's cost is timed on 512 of the points in the same run (a ratio, not a wall-clock limit, so a
    # loaded machine does not fail it); measured 160x quiet, 26x with two other jobs on the same 2 cores.
    import time

    vertices, faces = _tensors(_bumpy_sphere(6), torch.float32)
    g = (torch.arange(64) + 0.5) / 64 * 2.5 - 1.25
    grid = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)  # [262144, 3]
    start = time.perf_counter()
    winding_numbers(grid[::512], vertices, faces, method="exact")
    exact_estimate = (time.perf_counter() - start) * 512
    start = time.perf_counter()
    w = winding_numbers(grid, vertices, faces)
    fast = time.perf_counter() - start
    assert fast < exact_estimate / 10.0, (fast, exact_estimate)
    r = grid.norm(dim=-1)
    assert (w[r < 0.7] > 0.5).all() and (w[r > 1.3] < 0.5).all()


# --------------------------------------------------------------------------------------- point metrics


def test_chamfer_and_fscore_on_hand_made_point_sets() -> None:
    # gt = {0, 1} on the x axis; pred = {0.1, 1.3}: pred→gt distances 0.1, 0.3 (mean 0.2), gt→pred 0.1, 0.3
    # (mean 0.2): Chamfer 0.2. At t = 0.2: precision 1/2, recall 1/2, F 1/2; at t = 0.5 everything is 1.
    gt = np.array([[0.0, 0, 0], [1.0, 0, 0]])
    pred = np.array([[0.1, 0, 0], [1.3, 0, 0]])
    assert chamfer_distance(pred, gt) == pytest.approx(0.2)
    f = fscore(pred, gt, thresholds=(0.05, 0.2, 0.5))
    assert f[0.05] == {"precision": 0.0, "recall": 0.0, "fscore": 0.0}
    assert f[0.2] == pytest.approx({"precision": 0.5, "recall": 0.5, "fscore": 0.5})
    assert f[0.5] == pytest.approx({"precision": 1.0, "recall": 1.0, "fscore": 1.0})
    with pytest.raises(InputError, match="pred_pts"):
        chamfer_distance(np.zeros((0, 3)), gt)


def _cube_shift_chamfer(d: float) -> float:
    """Continuous Chamfer distance between the unit cube [0, 1]³ and its copy shifted by d <= 1/2 along x.

    Points of the shifted cube, by face (total area 6), and their distance to the unit cube's surface:
    - face x = 1 + d (area 1): outside by d → ∫ = d.
    - face x = d (area 1): inside, nearest face at min(d, y, 1 - y, z, 1 - z). With m = min(y, 1 - y) and
      likewise for z, each uniform on [0, 1/2], P(min(m_y, m_z) > t) = (1 - 2t)², so
      ∫ = ∫_0^d (1 - 2t)² dt = (1 - (1 - 2d)³) / 6.
    - faces y = 0, 1 and z = 0, 1 (4 × area 1): on the unit cube's faces for x <= 1, outside by x - 1
      beyond: ∫ = 4 · ∫_1^{1+d} (x - 1) dx = 2d².
    By symmetry the other direction gives the same mean, so the Chamfer distance is that mean.
    """
    return (d + (1.0 - (1.0 - 2.0 * d) ** 3) / 6.0 + 2.0 * d * d) / 6.0


def test_chamfer_of_shifted_cubes_matches_the_analytic_value() -> None:
    # d = 0.25: (0.25 + 0.875/6 + 0.125) / 6 = 0.086806. Sampled points can only overestimate it: the
    # nearest SAMPLE is never closer than the surface, and for a point at distance h it is at most h + R
    # away, R being the distance from the point's foot to the nearest sample, E[R] = 1/(2√ρ) for a
    # Poisson process of density ρ = n / 6 per unit area. So the mean lies in [exact, exact + 1/(2√ρ)],
    # up to Monte-Carlo noise (std of the distances / √n < 1e-4).
    d, n = 0.25, 200_000
    expected = _cube_shift_chamfer(d)
    assert expected == pytest.approx(0.086806, abs=1e-6)
    cube = trimesh.creation.box(bounds=[[0, 0, 0], [1, 1, 1]])
    gt, _ = trimesh.sample.sample_surface(cube, n, seed=0)
    pred, _ = trimesh.sample.sample_surface(cube, n, seed=1)
    pred = pred + np.array([d, 0.0, 0.0])
    sampling_bias = 1.0 / (2.0 * math.sqrt(n / 6.0))  # ≈ 0.0027
    measured = chamfer_distance(pred, gt)
    assert expected - 5e-4 < measured < expected + sampling_bias + 5e-4


def test_evaluate_mesh_on_shifted_cubes() -> None:
    # The whole pipeline: the ground truth cube of side 1 is placed (bounding sphere 0.5, side 1/√3) and
    # distances are divided by its side, so a world shift of 0.25 sides gives the d = 0.25 value above.
    # Volume IoU of two unit cubes overlapping by 0.75: 0.75 / 1.25 = 0.6.
    gt = _placed(trimesh.creation.box(extents=(1.0, 1.0, 1.0)))
    side = gt.extents.max()
    pred = gt.copy()
    pred.apply_translation([0.25 * side, 0.0, 0.0])
    n = 20_000
    m = evaluate_mesh(pred, gt, mode="oracle", n_points=n, **FAST)
    sampling_bias = 1.0 / (2.0 * math.sqrt(n / 6.0))  # ≈ 0.0087, the bound derived above
    assert _cube_shift_chamfer(0.25) - 0.001 < m.chamfer < _cube_shift_chamfer(0.25) + sampling_bias + 0.001
    assert m.volume_iou == pytest.approx(0.6, abs=0.04)


def test_concentric_spheres() -> None:
    # GT: sphere of radius 0.5 (already in the world frame: bounding-box side 1, so distances are in
    # world units). Prediction: radius 0.4. Every point is 0.1 from the other sphere, plus a tangential
    # offset to the nearest sample (≈ 0.01 here) that adds ~0.1·(1 - cos) < 1e-3: Chamfer ≈ 0.1.
    # F-score: no distance is below 0.05, all are below 0.15.
    gt = trimesh.creation.icosphere(subdivisions=5, radius=0.5)
    pred = trimesh.creation.icosphere(subdivisions=5, radius=0.4)
    m = evaluate_mesh(pred, gt, n_points=10_000, thresholds=(0.05, 0.15), **FAST)
    assert m.chamfer == pytest.approx(0.1, abs=2e-3)
    assert m.fscore == {0.05: 0.0, 0.15: 1.0}
    # Volume IoU: (0.4 / 0.5)³ = 0.512 of the GT, inside it.
    assert m.volume_iou == pytest.approx(0.512, abs=0.04)


def test_identical_meshes_score_perfectly() -> None:
    gt = _placed(_bumpy_sphere(4))  # oracle mode compares in the world frame, where the GT is placed
    m = evaluate_mesh(gt.copy(), gt, n_points=5_000, **FAST)
    assert m.chamfer < 1e-6  # the same mesh and seed give the same samples
    assert all(v == 1.0 for v in m.fscore.values())
    assert m.volume_iou == 1.0


def test_volume_iou_of_cubes_shifted_by_half_a_side() -> None:
    # Overlap 1/2, union 3/2 (in cube volumes): IoU 1/3. The 64³ grid spans the union box, 1.5 sides along
    # x, so cell faces do not line up with the cubes' faces: a discretisation error of about one cell.
    a = trimesh.creation.box(bounds=[[0, 0, 0], [1, 1, 1]])
    b = trimesh.creation.box(bounds=[[0.5, 0, 0], [1.5, 1, 1]])
    assert volume_iou(a, b, resolution=64) == pytest.approx(1.0 / 3.0, abs=0.02)
    far = trimesh.creation.box(bounds=[[3, 0, 0], [4, 1, 1]])
    assert volume_iou(a, far, resolution=32) == 0.0
    inward = b.copy()
    inward.invert()  # wound inwards: winding number -1 inside, still solid
    assert volume_iou(a, inward, resolution=64) == pytest.approx(1.0 / 3.0, abs=0.02)
    # a far floater of no volume does not coarsen the grid: b with a speck 10 sides away (unclipped, the
    # grid spanned 10.5 sides and the cubes were 6 cells wide)
    speck = trimesh.creation.box(bounds=[[11, 0, 0], [11.001, 0.001, 0.001]])
    with_speck = trimesh.util.concatenate([b, speck])
    assert volume_iou(a, with_speck, resolution=64) == pytest.approx(1.0 / 3.0, abs=0.02)
    # a predicted floater beyond the grid's box still counts in the union (it was left out: IoU 1)
    floater = trimesh.creation.box(bounds=[[10, 0, 0], [10.5, 1, 1]])  # half the cube's volume
    assert volume_iou(trimesh.util.concatenate([a, floater]), a, resolution=64) == pytest.approx(
        1.0 / 1.5, abs=0.02
    )


@pytest.mark.parametrize("shift", [0.1, 0.3, 0.5, 0.8])
def test_volume_iou_of_a_thin_plate_resolves_its_thickness(shift: float) -> None:
    # A plate 1 x 1 x 0.023 (the test object's proportions) and the same plate raised by `shift` of its
    # thickness: the exact IoU is (1 - s) / (1 + s); the grid has 64 cells across the union's thickness,
    # so it is within about one cell of that. In cubes of the largest side / 64 the plate was 1.5 cells
    # thick and this gave 1.0 or 0.0.
    t = 0.023
    gt = trimesh.creation.box(bounds=[[-0.5, -0.5, -t / 2], [0.5, 0.5, t / 2]])
    pred = gt.copy()
    pred.apply_translation([0.0, 0.0, shift * t])
    assert volume_iou(pred, gt, resolution=64) == pytest.approx((1 - shift) / (1 + shift), abs=0.02)


def test_volume_iou_of_a_flat_prediction_is_zero_not_an_error() -> None:
    # A prediction with no thickness (a square sheet) encloses nothing. The grid's box is widened to a cube
    # cell along z: unwidened, every cell centre of sheet vs sheet lay on the sheet, where the winding
    # number is ill-defined, and the IoU came out 1.
    gt = trimesh.creation.box(bounds=[[-0.5, -0.5, -0.01], [0.5, 0.5, 0.01]])
    sheet = trimesh.Trimesh(
        vertices=[[-0.5, -0.5, 0.0], [0.5, -0.5, 0.0], [0.5, 0.5, 0.0], [-0.5, 0.5, 0.0]],
        faces=[[0, 1, 2], [0, 2, 3]],
    )
    assert volume_iou(sheet, sheet.copy(), resolution=16) == 0.0
    assert volume_iou(sheet, gt, resolution=16) == 0.0


def test_volume_outside_a_flat_prediction_is_counted_on_at_most_64_cubed_points(monkeypatch) -> None:
    # A flat prediction reaching 10 sides beyond a thin ground truth: its box has no volume, so its cubes
    # would be an IoU cell's volume (740,000 over its 11 x 1 extent, 364,000 of them outside the grid's
    # box); they grow until at most 64³ cover it.
    gt = trimesh.creation.box(bounds=[[0, 0, 0], [1, 1, 0.01]])
    sheet = trimesh.Trimesh(vertices=[[0, 0, 0.005], [11, 0, 0.005], [11, 1, 0.005]], faces=[[0, 1, 2]])
    counted = []
    real = metrics.occupancy
    monkeypatch.setattr(
        metrics,
        "occupancy",
        lambda mesh, points, device="auto": counted.append(len(points)) or real(mesh, points),
    )
    assert volume_iou(sheet, gt, resolution=64) == 0.0
    assert 0 < max(counted) <= 64**3


def test_internal_faces_give_no_visible_samples() -> None:
    # `internal`: a closed box of side 0.1 holding a closed inner box and a closed inner wall, all apart.
    # Every visible sample must lie on the outer box: max-norm distance from its centre = half its side.
    mesh, _, _ = make_test_object("internal")
    mesh = _placed(mesh)
    outer = mesh.bounds
    center, half = outer.mean(axis=0), (outer[1] - outer[0]) / 2.0
    points = sample_visible_surface(mesh, n_points=20_000, seed=0, n_views=24, resolution=256)
    assert points.shape == (20_000, 3)
    rel = (points - center) / half  # [N, 3] in [-1, 1]³ for points of the outer box
    assert np.abs(np.abs(rel).max(axis=1) - 1.0).max() < 1e-6
    # ... and the outer box is covered evenly: each of the six sides gets about 1/6 of the points.
    axis = np.abs(rel).argmax(axis=1)  # [N]
    side = 2 * axis + (rel[np.arange(len(rel)), axis] > 0)
    counts = np.bincount(side, minlength=6) / len(points)
    assert np.allclose(counts, 1 / 6, atol=0.02)


def test_a_far_speck_does_not_coarsen_the_visibility_test() -> None:
    """The views were framed on every vertex: a speck 10 units away made a pixel 0.04 wide and the depth
    tolerance 0.02, so a hidden inner shell 0.01 under the surface passed as visible. The frame follows
    the body now; the speck's own points still count (seen from outside the frame)."""
    outer = trimesh.creation.icosphere(subdivisions=4, radius=0.5)
    inner = trimesh.creation.icosphere(subdivisions=4, radius=0.49)  # hidden inside the outer one
    speck = trimesh.creation.box(bounds=[[10, 0, 0], [10.01, 0.01, 0.01]])
    mesh = trimesh.util.concatenate([outer, inner, speck])
    points = sample_visible_surface(mesh, n_points=5_000, seed=0, n_views=24, resolution=512)
    radius = np.linalg.norm(points, axis=1)
    assert (radius < 0.495).sum() == 0  # nothing on the hidden shell
    assert (radius > 5).any()  # the speck is part of the prediction
    # a mesh of many small fragments (none 1% of the area) is framed whole: hidden walls stay hidden
    cubes = []
    for i in range(120):
        centre = 0.1 * np.array([i % 5, (i // 5) % 4, i // 20])
        for side in (0.05, 0.045):  # a cube and a hidden one inside it
            cube = trimesh.creation.box(extents=[side] * 3)
            cube.apply_translation(centre)
            cubes.append(cube)
    lattice = trimesh.util.concatenate(cubes)
    points = sample_visible_surface(lattice, 5_000, seed=0, n_views=24, resolution=512)
    offset = np.abs(points - 0.1 * np.round(points / 0.1)).max(axis=1)  # max-norm from the nearest centre
    assert offset.min() > 0.024  # on the outer cubes (0.025), none on the inner ones (0.0225)


def test_visibility_agrees_with_embree_ray_casting_on_the_mug() -> None:
    """The shadow-map test against an independent one: a candidate is seen from direction d when |n.d|
    reaches min_cos and a ray cast from it towards d (embree) leaves the mesh without a hit. The mug is
    concave and asymmetric (its inside, its handle): a wrong pixel mapping or tolerance would pass the
    symmetric shapes above but not this."""
    pytest.importorskip("embreex")
    from trimesh.ray.ray_pyembree import RayMeshIntersector

    from sv3d.evaluation.metrics import _area_uniform_samples, _view_frame, _visible

    mesh, _, _ = make_test_object("mug")
    mesh = _placed(mesh)
    points, face = _area_uniform_samples(mesh, 4000, np.random.default_rng(0))
    n_views, min_cos = 24, 0.2
    ours = _visible(mesh, points, face, n_views, 512, min_cos, _view_frame(mesh))
    caster, normals = RayMeshIntersector(mesh), np.asarray(mesh.face_normals)[face]  # [C, 3]
    seen = np.zeros(len(points), dtype=bool)
    for d in fibonacci_sphere(n_views):
        facing = np.abs(normals @ d) >= min_cos
        origins = points + 1e-5 * np.sign(normals @ d)[:, None] * normals  # off the surface, on d's side
        free = ~caster.intersects_any(origins, np.broadcast_to(d, points.shape))
        seen |= facing & free
    agreement = float((ours == seen).mean())
    assert agreement > 0.995, agreement  # measured 0.9995 (2 of 4000 differ), 4.5% of the points hidden
    assert 0.3 < seen.mean() < 0.98  # hidden: the handle's inner faces, the mug's inside seen only from above


def test_visible_samples_are_fixed_by_the_seed() -> None:
    mesh = _bumpy_sphere(3)
    a = sample_visible_surface(mesh, 2_000, seed=5, n_views=12, resolution=128)
    b = sample_visible_surface(mesh, 2_000, seed=5, n_views=12, resolution=128)
    c = sample_visible_surface(mesh, 2_000, seed=6, n_views=12, resolution=128)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # a closed star-shaped surface is entirely visible: samples lie on the faces
    _, distance, _ = trimesh.proximity.closest_point(mesh, a[:200])
    assert distance.max() < 1e-6


def test_generated_mode_removes_floaters_and_normalises() -> None:
    # The prediction is the GT blown up 3×, moved, plus a tiny floater (< 1% of the area) far away.
    # Generated mode drops the floater and recentres/rescales: the result is the GT again. Oracle mode
    # compares as is: far from it.
    gt = _placed(_bumpy_sphere(3))
    body = gt.copy()
    body.apply_scale(3.0)
    body.apply_translation([2.0, -1.0, 0.5])
    floater = trimesh.creation.icosphere(subdivisions=1, radius=0.05)
    floater.apply_translation([9.0, 9.0, 9.0])
    pred = trimesh.util.concatenate([body, floater])
    cleaned = normalize_prediction(pred, "generated")
    assert len(cleaned.faces) == len(body.faces)
    assert np.allclose(cleaned.vertices, gt.vertices, atol=1e-9)
    generated = evaluate_mesh(pred, gt, mode="generated", n_points=5_000, **FAST)
    oracle = evaluate_mesh(pred, gt, mode="oracle", n_points=5_000, **FAST)
    assert generated.chamfer < 1e-6 and generated.volume_iou == 1.0
    assert oracle.chamfer > 1.0 and oracle.volume_iou == 0.0
    assert normalize_prediction(pred, "oracle").vertices.shape == pred.vertices.shape


def test_generated_mode_keeps_the_largest_of_many_small_fragments() -> None:
    # 150 equal cubes: each under 1% of the area, yet the prediction is not empty after the clean-up
    cubes = [trimesh.creation.box(extents=[0.01] * 3) for _ in range(150)]
    for i, cube in enumerate(cubes):
        cube.apply_translation([0.02 * (i % 15), 0.02 * (i // 15), 0.0])
    cubes[7].apply_scale(1.001)  # one a little larger
    cleaned = normalize_prediction(trimesh.util.concatenate(cubes), "generated")
    assert len(cleaned.faces) == 12


def test_a_fin_on_a_non_manifold_edge_belongs_to_its_body() -> None:
    """A fin joined to a box only along one of its edges (three faces on that edge): trimesh's face
    adjacency joins edges of two faces only, so the fin was a component of its own and generated mode's
    clean-up dropped it (under 1% of the area)."""
    box = trimesh.creation.box(extents=[1.0, 1.0, 1.0])  # edge from (.5, .5, -.5) to (.5, .5, .5)
    v = np.array([[0.5, 0.5, -0.5], [0.5, 0.5, 0.5], [0.52, 0.52, 0.0]])
    faces = np.vstack([box.faces, [[8, 9, 10]]])
    with_fin = trimesh.Trimesh(np.vstack([box.vertices, v]), faces, process=False)
    labels = face_components(with_fin)
    assert len(np.unique(labels)) == 1
    assert len(normalize_prediction(with_fin, "generated").faces) == 13
    apart = with_fin.copy()
    apart.vertices[8:] += [1.0, 0.0, 0.0]  # the fin moved off the box: two components
    assert len(np.unique(face_components(apart))) == 2


def test_icp_recovers_a_small_misalignment() -> None:
    gt = _placed(_bumpy_sphere(4))
    pred = gt.copy()
    pred.apply_transform(trimesh.transformations.rotation_matrix(math.radians(6.0), [0, 0, 1]))
    pred.apply_translation([0.02, -0.01, 0.0])
    m = evaluate_mesh(pred, gt, mode="oracle", n_points=8_000, icp=True, **FAST)
    assert m.chamfer_icp < 0.5 * m.chamfer
    assert m.volume_iou_icp > m.volume_iou
    # the recovered pose undoes the applied one: the prediction's vertices land on the ground truth's own
    # (the same vertices, in GT-side units: oracle mode compares in the world frame, scaled by the side)
    side = float(gt.extents.max())
    moved = trimesh.transform_points(np.asarray(pred.vertices) / side, np.asarray(m.icp_matrix))
    assert np.abs(moved - np.asarray(gt.vertices) / side).max() < 2e-3


def test_metrics_round_trip_through_json() -> None:
    m = MeshMetrics(
        mode="oracle",
        n_points=10,
        chamfer=0.1,
        volume_iou=0.5,
        fscore={0.01: 0.2, 0.02: 0.3},
        precision={0.01: 0.25, 0.02: 0.35},
        recall={0.01: 0.15, 0.02: 0.28},
        chamfer_icp=0.05,
        fscore_icp={0.01: 0.4},
    )
    flat = json.loads(json.dumps(m.to_dict()))
    assert flat["fscore@0.01"] == 0.2 and flat["chamfer_icp"] == 0.05 and "volume_iou_icp" not in flat
    assert MeshMetrics.from_dict(flat) == m
    with pytest.raises(InputError, match="unknown key"):
        MeshMetrics.from_dict({**flat, "bogus": 1})


def test_bad_inputs_raise_input_errors() -> None:
    sphere = trimesh.creation.icosphere(subdivisions=1)
    empty = trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64))
    with pytest.raises(InputError, match="mode"):
        evaluate_mesh(sphere, sphere, mode="magic")
    with pytest.raises(InputError, match="prediction: the mesh has no faces"):
        evaluate_mesh(empty, sphere)
    with pytest.raises(InputError, match="ground truth"):
        volume_iou(sphere, empty)


def test_the_scoring_runs_on_the_device_it_is_given(monkeypatch) -> None:
    """`sv3d eval --device cpu` on a CUDA machine scored on the GPU: each device pick follows the argument."""
    import sv3d.evaluation.metrics as metrics

    asked = []
    real = metrics.pick_device
    monkeypatch.setattr(metrics, "pick_device", lambda device="auto": asked.append(device) or real("cpu"))
    box = trimesh.creation.box()
    evaluate_mesh(
        box, box.copy(), n_points=500, n_views=8, view_resolution=64, iou_resolution=8, device="cpu"
    )
    assert asked and set(asked) == {"cpu"}
