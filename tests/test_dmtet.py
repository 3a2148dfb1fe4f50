"""DMTet geometry: initialisation from a density grid, gradients, bounded deformation, a short fit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import trimesh
from scipy.spatial import cKDTree

from refine.dmtet import (
    DMTetConfig,
    DMTetGeometry,
    sdf_from_density,
    sdf_sign_regulariser,
    validate_init,
)
from refine.mesh import Mesh

LEVEL = 10.0


def sphere_density(radius: float, res: int = 96, bound: float = 0.6, width: float = 0.01) -> np.ndarray:
    """[R, R, R] NeRF-like density at cell centres: 100 inside, falling off as a sigmoid of width `width`.

    100 * sigmoid((radius - d) / width) = LEVEL at d = radius + width * log(9): the iso-radius.
    """
    centres = ((np.arange(res) + 0.5) / res * 2 - 1) * bound
    x, y, z = np.meshgrid(centres, centres, centres, indexing="ij")
    d = np.sqrt(x**2 + y**2 + z**2)
    return (100.0 / (1.0 + np.exp((d - radius) / width))).astype(np.float32)


def iso_radius(radius: float, width: float = 0.01) -> float:
    return radius + width * math.log(9.0)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Grids built with the default cache go to a temporary folder, not the user's cache."""
    monkeypatch.setenv("SV3D_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def geometry32(tmp_path_factory) -> DMTetGeometry:
    return DMTetGeometry(DMTetConfig(resolution=32, cache_dir=str(tmp_path_factory.mktemp("tets"))))


def test_init_from_density_recovers_the_sphere(geometry32):
    geo = geometry32
    sdf = sdf_from_density(sphere_density(0.3), 0.6, LEVEL, geo.grid_vertices)
    # Unit slope at the surface: close to the true signed distance to the iso-sphere (deeper inside,
    # log-density saturates at log(100 / LEVEL) / slope = 0.026), and the right sign everywhere.
    true = geo.grid_vertices.norm(dim=1) - iso_radius(0.3)
    # Measured max |error| / cell: 0.06 within half a cell of the surface, 0.08 within a cell outside.
    near = true.abs() < 0.5 * geo.cell_size
    assert float((sdf - true)[near].abs().max()) < 0.1 * geo.cell_size
    outside = (true > 0) & (true < geo.cell_size)
    assert float((sdf - true)[outside].abs().max()) < 0.15 * geo.cell_size
    clear = true.abs() > 0.01 * geo.cell_size
    assert torch.equal((sdf < 0)[clear], (true < 0)[clear])
    assert float(sdf.max()) == pytest.approx(0.05) and float(sdf.min()) >= -0.05  # the default band
    geo.init_from_sdf(sdf)
    verts, faces = geo.extract()
    r = iso_radius(0.3)
    # Chamfer against the analytic sphere: surface -> sphere is ||v| - r|; sphere -> surface by a
    # dense sample of the sphere and the nearest mesh vertex.
    to_sphere = (verts.detach().norm(dim=1) - r).abs().mean()
    rng = np.random.default_rng(0)
    dirs = rng.normal(size=(20000, 3))
    samples = r * dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
    to_mesh = cKDTree(verts.detach().numpy()).query(samples)[0].mean()
    chamfer = 0.5 * (float(to_sphere) + float(to_mesh))
    assert chamfer < 0.5 * geo.cell_size
    assert isinstance(geo.to_mesh(), Mesh) and not geo.to_mesh().vertices.requires_grad


def test_sdf_from_density_index_order_and_outside():
    # Density high only in the block x > 0.2 (index order x, y, z): inside there, outside elsewhere.
    res, bound = 32, 0.5
    centres = ((np.arange(res) + 0.5) / res * 2 - 1) * bound
    grid = np.zeros((res, res, res), dtype=np.float32)
    grid[centres > 0.2, :, :] = 100.0
    points = torch.tensor([[0.35, 0.0, 0.0], [0.0, 0.35, 0.0], [0.0, 0.0, 0.35], [0.8, 0.0, 0.0]])
    sdf = sdf_from_density(grid, bound, LEVEL, points, band=0.05)
    assert sdf[0] < 0 and sdf[1] > 0 and sdf[2] > 0
    assert float(sdf[3]) == pytest.approx(0.05)  # outside the density grid: outside, at the band


def test_sdf_from_density_rejects_empty_grid():
    with pytest.raises(ValueError, match="never crosses"):
        sdf_from_density(np.zeros((8, 8, 8), np.float32), 0.5, LEVEL, torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"\[R, R, R\]"):
        sdf_from_density(np.zeros((8, 8, 4), np.float32), 0.5, LEVEL, torch.zeros(4, 3))
    solid = np.full((8, 8, 8), 2 * LEVEL, np.float32)
    solid[0, 0, 0] = LEVEL  # touches the level, never below it: solid (was a NaN SDF, "non-finite" later)
    with pytest.raises(ValueError, match="never crosses"):
        sdf_from_density(solid, 0.5, LEVEL, torch.zeros(4, 3))


def test_validate_init(geometry32):
    geo = geometry32
    radius = geo.grid_vertices.norm(dim=1)
    with pytest.raises(ValueError, match="empty"):
        validate_init(radius + 1.0, geo.boundary)
    with pytest.raises(ValueError, match="solid"):
        validate_init(radius - 10.0, geo.boundary)
    with pytest.raises(ValueError, match="grid boundary"):
        validate_init(radius - 0.6, geo.boundary)  # a sphere of radius 0.6 in a grid of half-width 0.55
    before = geo.sdf.detach().clone()
    with pytest.raises(ValueError, match="grid boundary"):
        geo.init_from_sdf(radius - 0.6)
    assert torch.equal(geo.sdf.detach(), before)  # a refused init changes nothing
    with pytest.raises(ValueError, match="values must be"):
        geo.init_from_sdf(radius[:-1])
    validate_init(radius - 0.3, geo.boundary)


def test_a_surface_pushed_into_the_grids_boundary_stays_closed():
    """Marching tets makes no faces on the cube's surface: outer vertices driven inside (sdf < 0) by a
    step would open the mesh there; keep_off_boundary moves them back outside."""
    geo = DMTetGeometry(DMTetConfig(resolution=8))
    geo.init_from_sdf(geo.grid_vertices.norm(dim=1) - 0.45)
    with torch.no_grad():  # what a step can do: the sphere grows through the +x face
        geo.sdf[geo.grid_vertices[:, 0] > 0.5] = -0.05
    verts, faces = geo()
    assert not trimesh.Trimesh(verts.detach().numpy(), faces.numpy()).is_watertight
    assert geo.keep_off_boundary() > 0 and geo.keep_off_boundary() == 0
    verts, faces = geo()
    assert trimesh.Trimesh(verts.detach().numpy(), faces.numpy()).is_watertight


def test_gradients_reach_sdf_and_deformation():
    geo = DMTetGeometry(DMTetConfig(resolution=8))
    geo.init_from_sdf(geo.grid_vertices.norm(dim=1) - 0.3)
    verts, faces = geo()
    assert faces.shape[0] > 0
    verts.norm(dim=1).sum().backward()
    # Only endpoints of crossed edges get gradients: exactly the vertices with a neighbour of the
    # other sign.
    edges = geo.edges
    s = geo.sdf.detach()
    crossed = (s[edges[:, 0]] < 0) != (s[edges[:, 1]] < 0)
    on_crossed = torch.zeros_like(s, dtype=torch.bool)
    on_crossed[edges[crossed].reshape(-1)] = True
    assert torch.equal(geo.sdf.grad != 0, on_crossed)
    assert torch.equal(geo.deformation.grad.abs().sum(dim=1) != 0, on_crossed)
    # Raising the sdf anywhere shrinks the object: the crossing sits at t = |s_a| / (|s_a| + s_b) from its
    # inside end a, and t falls as s_a or s_b grows, so d(sum |v|)/ds < 0 on every crossed-edge vertex.
    assert float(geo.sdf.grad[on_crossed].max()) < 0


def test_deformation_stays_within_bound():
    config = DMTetConfig(resolution=4, deformation_scale=0.5)
    geo = DMTetGeometry(config)
    with torch.no_grad():
        geo.deformation.copy_(torch.randn_like(geo.deformation) * 100.0)
    offset = (geo.deformed_vertices() - geo.grid_vertices).detach()
    limit = 0.5 * geo.cell_size
    assert float(offset.abs().max()) <= limit + 1e-6
    assert float(offset.abs().max()) > 0.99 * limit  # tanh saturates at the bound
    with pytest.raises(ValueError, match="deformation_scale"):
        DMTetGeometry(DMTetConfig(resolution=4, deformation_scale=2.0))


def test_a_grid_bound_that_is_not_positive_is_refused_with_the_config():
    """`refine.tet.bound=0` got through and crashed in tet_grid, after the orbit and NeRF stages had run."""
    from sv3d.config import apply_overrides
    from sv3d.errors import InputError

    with pytest.raises(ValueError, match="bound must be > 0"):
        DMTetConfig(bound=0.0)
    with pytest.raises(InputError, match="refine.tet: bound must be > 0"):
        apply_overrides(DMTetConfig(), {"bound": -1.0}, "refine.tet")


def test_state_dict_holds_only_the_parameters():
    geo = DMTetGeometry(DMTetConfig(resolution=4))
    assert set(geo.state_dict()) == {"sdf", "deformation"}
    assert {n for n, _ in geo.named_buffers()} == {"grid_vertices", "tets", "boundary"}


def test_sign_regulariser_by_hand():
    # One crossed edge (s = -1, +1): BCE(logit -1, target 1) + BCE(logit 1, target 0) = 2 log(1 + e).
    sdf = torch.tensor([-1.0, 1.0, 2.0], requires_grad=True)
    edges = torch.tensor([[0, 1], [1, 2]])  # the second edge is not crossed and does not count
    loss = sdf_sign_regulariser(sdf, edges)
    assert loss.item() == pytest.approx(2 * math.log(1 + math.e))
    loss.backward()
    # Targets are constants (signs): d softplus(-x)/dx = sigmoid(x) - 1 at x = -1, d softplus(x)/dx =
    # sigmoid(x) at x = 1, i.e. (sigmoid(-1) - 1, 1 - sigmoid(-1)).
    sig = 1 / (1 + math.exp(1.0))
    torch.testing.assert_close(sdf.grad, torch.tensor([sig - 1, 1 - sig, 0.0]))
    flat = torch.ones(3, requires_grad=True)
    none = sdf_sign_regulariser(flat, edges)
    assert none.item() == 0.0
    none.backward()


def test_short_optimisation_moves_the_surface():
    # 100 Adam steps of mean((|v| - r)^2) grow a sphere of radius 0.3 to radius 0.38 (1.2 cells).
    torch.manual_seed(0)
    geo = DMTetGeometry(DMTetConfig(resolution=16))
    geo.init_from_sdf(geo.grid_vertices.norm(dim=1) - 0.3)
    target = 0.38
    optimiser = torch.optim.Adam(geo.parameters(), lr=1e-2)
    for _ in range(100):
        verts, _ = geo()
        loss = (verts.norm(dim=1) - target).square().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    verts, faces = geo.extract()
    radii = verts.detach().norm(dim=1)
    # Measured: mean radius off by 2e-5, largest deviation 0.08 cell; still one closed sphere.
    assert abs(float(radii.mean()) - target) < 0.02 * geo.cell_size
    assert float((radii - target).abs().max()) < 0.25 * geo.cell_size
    mesh = trimesh.Trimesh(verts.detach().double().numpy(), faces.numpy(), process=False)
    assert mesh.is_watertight and mesh.is_winding_consistent and mesh.volume > 0 and mesh.euler_number == 2


def _grow_sphere(
    band_rings: int, steps: int = 60, device: str = "cpu"
) -> tuple[DMTetGeometry, list[tuple[torch.Tensor, ...]]]:
    """Adam grows a sphere of radius 0.3 towards 0.38 (1.2 cells) on a 16-grid; the meshes of every step."""
    torch.manual_seed(0)
    geo = DMTetGeometry(DMTetConfig(resolution=16, band_rings=band_rings)).to(device)
    geo.init_from_sdf(geo.grid_vertices.norm(dim=1) - 0.3)
    optimiser = torch.optim.Adam(geo.parameters(), lr=1e-2)
    meshes = []
    for _ in range(steps):
        verts, faces = geo()
        sign = sdf_sign_regulariser(geo.sdf, geo.band_edges)
        loss = (verts.norm(dim=1) - 0.38).square().mean() + 1e-3 * sign
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        meshes.append((verts.detach(), faces))
    return geo, meshes


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_narrow_band_gives_the_whole_grids_surface_at_every_step(device: str):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    full, full_meshes = _grow_sphere(band_rings=0, device=device)
    # One ring: the band (a fraction of the grid) must be rebuilt as the surface moves outwards.
    band, band_meshes = _grow_sphere(band_rings=1, device=device)
    assert band.band_rebuilds > 1
    assert band._band[0].shape[0] < 0.5 * band.tets.shape[0]
    for (v_full, f_full), (v_band, f_band) in zip(full_meshes, band_meshes, strict=True):
        assert torch.equal(f_full, f_band) and torch.equal(v_full, v_band)
    assert torch.equal(full.sdf, band.sdf) and torch.equal(full.deformation, band.deformation)


def test_narrow_band_follows_new_sdf_values():
    geo = DMTetGeometry(DMTetConfig(resolution=16, band_rings=1))
    geo.init_from_sdf(geo.grid_vertices.norm(dim=1) - 0.3)
    small = geo.extract()[0].detach().norm(dim=1).mean()
    other = DMTetGeometry(DMTetConfig(resolution=16, band_rings=1))
    other.init_from_sdf(other.grid_vertices.norm(dim=1) - 0.4)
    geo.load_state_dict(other.state_dict())  # a resumed state: the old band must not be reused
    assert float(geo.extract()[0].detach().norm(dim=1).mean()) > float(small) + 0.08
    with torch.no_grad():
        geo.sdf.copy_(geo.grid_vertices.norm(dim=1) - 0.2)
    geo.reset_band()
    assert float(geo.extract()[0].detach().norm(dim=1).mean()) < float(small) - 0.08
    with pytest.raises(ValueError, match="band_rings"):
        DMTetConfig(resolution=4, band_rings=-1)  # refused when the config is made (Hydra overrides too)
