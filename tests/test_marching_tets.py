"""Marching tetrahedra: the 14 sign cases by hand, accuracy on a sphere, topology, gradients, edge cases."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest
import torch
import trimesh

from refine.marching_tets import marching_tets
from refine.mesh import face_normals
from refine.tetgrid import tet_edges, tet_grid

REF = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)  # positive volume
TET = torch.tensor([[0, 1, 2, 3]])


def to_trimesh(verts: torch.Tensor, faces: torch.Tensor) -> trimesh.Trimesh:
    # process=False: watertightness is judged on our own vertex sharing, not after merging by position.
    return trimesh.Trimesh(verts.detach().double().cpu().numpy(), faces.cpu().numpy(), process=False)


def sphere_mesh(resolution: int, radius: float = 0.35):
    grid = tet_grid(resolution, bound=0.55, cache=False)
    sdf = (grid.vertices.double().norm(dim=1) - radius).float()  # a true signed distance
    return marching_tets(grid.vertices, grid.tets, sdf)


@pytest.mark.parametrize("inside", [c for c in itertools.product((0, 1), repeat=4) if 0 < sum(c) < 4])
def test_single_tet_cases(inside):
    sdf = torch.tensor([-1.0 if i else 1.0 for i in inside], dtype=torch.float64)
    verts, faces = marching_tets(REF, TET, sdf)
    n_in = sum(inside)
    # One crossing per edge between an inside and an outside vertex, at its midpoint (s = -1 and +1).
    assert verts.shape == (n_in * (4 - n_in), 3)
    assert faces.shape == (1 if n_in in (1, 3) else 2, 3)
    ins = [i for i in range(4) if inside[i]]
    outs = [i for i in range(4) if not inside[i]]
    mids = {tuple(((REF[a] + REF[b]) / 2).tolist()) for a in ins for b in outs}
    assert {tuple(v) for v in verts.tolist()} == mids
    # Normals point from the inside vertices towards the outside ones.
    towards_out = REF[outs].mean(0) - REF[ins].mean(0)
    assert bool((face_normals(verts, faces) @ towards_out > 0).all())
    # Flipping every sign swaps inside and outside: same vertices, opposite normals.
    v2, f2 = marching_tets(REF, TET, -sdf)
    assert bool((face_normals(v2, f2) @ towards_out < 0).all())


def test_crossing_point_is_linear_interpolation():
    # s = (-1, 3, 3, 3): zero at a quarter of the way from vertex 0 along each edge.
    sdf = torch.tensor([-1.0, 3.0, 3.0, 3.0])
    verts, faces = marching_tets(REF.float(), TET, sdf)
    expected = {(0.25, 0.0, 0.0), (0.0, 0.25, 0.0), (0.0, 0.0, 0.25)}
    assert {tuple(v) for v in verts.tolist()} == expected
    # Area of that triangle: sqrt(3)/2 * 0.25^2.
    assert float(face_normals(verts, faces, normalize=False).norm() / 2) == pytest.approx(
        math.sqrt(3) / 2 * 0.0625
    )


def test_sphere_watertight_and_outward():
    verts, faces = sphere_mesh(32)
    mesh = to_trimesh(verts, faces)
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.volume > 0 and mesh.euler_number == 2 and len(mesh.split(only_watertight=False)) == 1
    # Every face normal points away from the centre (towards increasing sdf).
    centres = verts[faces].mean(dim=1)
    assert bool(((face_normals(verts, faces) * centres).sum(dim=1) > 0).all())
    # One vertex per crossed edge: no two output vertices at the same place for a generic sdf.
    assert np.unique(np.round(verts.numpy(), 7), axis=0).shape[0] == verts.shape[0]


def sphere_errors(resolution: int, radius: float = 0.35) -> tuple[float, float]:
    mesh = to_trimesh(*sphere_mesh(resolution, radius))
    area, volume = 4 * math.pi * radius**2, 4 / 3 * math.pi * radius**3
    return abs(mesh.area - area) / area, abs(mesh.volume - volume) / volume


def test_sphere_accuracy_converges_second_order():
    e32, e64 = sphere_errors(32), sphere_errors(64)
    print(f"sphere r=0.35 relative errors (area, volume): 32 {e32}, 64 {e64}")
    # Measured: 32 -> (2.49e-3, 4.84e-3), 64 -> (6.20e-4, 1.20e-3): ratio 4.0 per doubling.
    for a, b in zip(e32, e64, strict=True):
        assert 3.0 < a / b < 5.0
    assert e64[0] < 1e-3 and e64[1] < 2e-3


@pytest.mark.slow
def test_sphere_accuracy_at_128():
    e64, e128 = sphere_errors(64), sphere_errors(128)
    print(f"sphere r=0.35 relative errors (area, volume): 64 {e64}, 128 {e128}")
    # Measured: 128 -> (1.55e-4, 3.01e-4).
    assert e128[0] < 2e-3 and e128[1] < 2e-3
    for a, b in zip(e64, e128, strict=True):
        assert 3.0 < a / b < 5.0


def test_torus_and_two_spheres_topology():
    grid = tet_grid(32, bound=0.55, cache=False)
    p = grid.vertices.double()
    # Torus around z: major radius 0.3, minor 0.1 -> genus 1, Euler characteristic 0.
    ring = torch.stack([p[:, :2].norm(dim=1) - 0.3, p[:, 2]], dim=1)
    torus = to_trimesh(*marching_tets(p, grid.tets, ring.norm(dim=1) - 0.1))
    assert torus.is_watertight and torus.is_winding_consistent and torus.volume > 0
    assert torus.euler_number == 0 and len(torus.split(only_watertight=False)) == 1
    # Measured 2.0% low: the tube radius is only 2.9 cells at this resolution.
    assert torus.volume == pytest.approx(2 * math.pi**2 * 0.3 * 0.1**2, rel=0.04)
    # Two disjoint spheres: two components, Euler characteristic 2 + 2.
    a = (p - torch.tensor([0.25, 0.0, 0.0], dtype=torch.float64)).norm(dim=1) - 0.2
    b = (p - torch.tensor([-0.3, 0.1, 0.0], dtype=torch.float64)).norm(dim=1) - 0.15
    pair = to_trimesh(*marching_tets(p, grid.tets, torch.minimum(a, b)))
    assert pair.is_watertight and pair.euler_number == 4
    assert len(pair.split(only_watertight=False)) == 2 and pair.volume > 0


def test_zero_sdf_counts_as_outside():
    # sdf = |x| + |y| + |z| - a: linear in every cell when 0 is on the lattice, so marching reproduces
    # its zero set exactly, an octahedron. With a on the lattice there are exact zeros; zero counts as
    # outside, so crossings land exactly on the zero vertices and the surface stays closed.
    grid = tet_grid(8, bound=1.0, cache=False)  # lattice step 0.25
    a = 0.5
    sdf = grid.vertices.abs().sum(dim=1) - a
    assert int((sdf == 0).sum()) == 6 + 12  # (+-2, 0, 0) and (+-1, +-1, 0) steps, permuted
    verts, faces = marching_tets(grid.vertices, grid.tets, sdf)
    mesh = to_trimesh(verts, faces)
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.volume == pytest.approx(4 / 3 * a**3, rel=1e-5)
    assert mesh.area == pytest.approx(4 * math.sqrt(3) * a**2, rel=1e-5)
    assert float(verts.abs().sum(dim=1).sub(a).abs().max()) < 1e-6


def test_bumpy_surface_is_watertight():
    # A smooth field that is not a distance: still closed, manifold and outward.
    grid = tet_grid(24, bound=0.55, cache=False)
    p = grid.vertices
    sdf = (
        p.norm(dim=1) - 0.3 - 0.06 * torch.sin(9 * p[:, 0]) * torch.sin(7 * p[:, 1]) * torch.sin(8 * p[:, 2])
    )
    mesh = to_trimesh(*marching_tets(p, grid.tets, sdf))
    assert mesh.is_watertight and mesh.is_winding_consistent and mesh.volume > 0


def test_edges_argument_gives_the_same_mesh():
    grid = tet_grid(12, cache=False)
    sdf = grid.vertices.norm(dim=1) - 0.3
    _, per_tet = tet_edges(grid.tets, return_tet_edges=True)
    v1, f1 = marching_tets(grid.vertices, grid.tets, sdf)
    v2, f2 = marching_tets(grid.vertices, grid.tets, sdf, edges=per_tet)
    assert torch.equal(v1, v2) and torch.equal(f1, f2)


def test_empty_results():
    grid = tet_grid(4, cache=False)
    for sdf in (torch.ones(125), -torch.ones(125), torch.zeros(125)):
        sdf.requires_grad_(True)
        verts, faces = marching_tets(grid.vertices, grid.tets, sdf)
        assert verts.shape == (0, 3) and faces.shape == (0, 3) and faces.dtype == torch.int64
        verts.sum().backward()  # an empty surface does not break the caller's backward
        assert torch.equal(sdf.grad, torch.zeros(125))


def test_gradcheck_sdf_and_vertices():
    torch.manual_seed(0)
    grid = tet_grid(2, bound=0.5, cache=False)
    vertices = (grid.vertices.double() + 0.05 * torch.rand(27, 3, dtype=torch.float64)).requires_grad_(True)
    sdf = vertices.detach().norm(dim=1) - 0.35
    sdf = torch.where(sdf.abs() < 0.02, sdf + 0.05, sdf).requires_grad_(True)  # signs stable under eps

    def fn(v, s):
        return marching_tets(v, grid.tets, s)[0]

    assert fn(vertices, sdf).shape[0] > 0
    assert torch.autograd.gradcheck(fn, (vertices, sdf), eps=1e-6, atol=1e-7)


def test_gradient_of_crossing_point_by_hand():
    # v = (v_a s_b - v_b s_a) / (s_b - s_a) with v_a = 0, v_b = e_x, s_a = -1, s_b = 3: v = (0.25, 0, 0).
    # v_x = -s_a / (s_b - s_a): d/ds_a = -s_b / (s_b - s_a)^2 = -3/16, d/ds_b = s_a / (s_b - s_a)^2 = -1/16
    # (and grad . s = 0: scaling the sdf does not move the surface).
    sdf = torch.tensor([-1.0, 3.0, 3.0, 3.0], dtype=torch.float64, requires_grad=True)
    verts, _ = marching_tets(REF, TET, sdf)
    x_vertex = int(torch.argmax(verts[:, 0]))
    verts[x_vertex, 0].backward()
    torch.testing.assert_close(sdf.grad, torch.tensor([-3 / 16, -1 / 16, 0.0, 0.0], dtype=torch.float64))


def test_dtype_and_validation():
    grid = tet_grid(3, cache=False)
    sdf = grid.vertices.double().norm(dim=1) - 0.3
    verts, _ = marching_tets(grid.vertices, grid.tets, sdf)
    assert verts.dtype == torch.float64
    with pytest.raises(ValueError, match="sdf must be"):
        marching_tets(grid.vertices, grid.tets, sdf[:-1])
    with pytest.raises(ValueError, match="tets must be"):
        marching_tets(grid.vertices, grid.tets.int(), sdf)
    with pytest.raises(ValueError, match="vertices must be"):
        marching_tets(grid.vertices[:, :2], grid.tets, sdf)
    with pytest.raises(ValueError, match="edges must be"):
        marching_tets(grid.vertices, grid.tets, sdf, edges=torch.zeros(3, 6, dtype=torch.int64))


@pytest.mark.slow
def test_full_size_grid_at_128():
    """The CUDA default's grid (12.6 M tets) on the CPU: forward and backward complete with finite
    gradients. Times are printed, not asserted (benchmarks are scripts: scripts/bench_refine.py)."""
    grid = tet_grid(128, bound=0.55, cache=False)
    vertices = grid.vertices.clone().requires_grad_(True)
    sdf = (grid.vertices.norm(dim=1) - 0.35).requires_grad_(True)
    marching_tets(vertices, grid.tets, sdf)  # warm-up
    start = time.perf_counter()
    verts, faces = marching_tets(vertices, grid.tets, sdf)
    forward = time.perf_counter() - start
    start = time.perf_counter()
    verts.square().sum().backward()
    backward = time.perf_counter() - start
    print(f"marching_tets at 128: forward {forward:.2f} s, backward {backward:.2f} s, {faces.shape[0]} faces")
    assert faces.shape[0] > 0 and torch.isfinite(sdf.grad).all() and torch.isfinite(vertices.grad).all()
    assert sdf.grad.abs().sum() > 0


@pytest.mark.gpu
def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    grid = tet_grid(48, cache=False)
    sdf = grid.vertices.norm(dim=1) - 0.3 - 0.05 * torch.sin(10 * grid.vertices[:, 0])
    v_cpu, f_cpu = marching_tets(grid.vertices, grid.tets, sdf)
    vertices = grid.vertices.cuda().requires_grad_(True)
    s = sdf.cuda().requires_grad_(True)
    v_gpu, f_gpu = marching_tets(vertices, grid.tets.cuda(), s)
    assert torch.equal(f_gpu.cpu(), f_cpu)
    torch.testing.assert_close(v_gpu.detach().cpu(), v_cpu, rtol=1e-5, atol=1e-6)
    v_gpu.square().sum().backward()
    assert vertices.grad is not None and s.grad.abs().sum() > 0
