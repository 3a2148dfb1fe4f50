"""The Kuhn tet grid: sizes, positive volumes, conformity, edges, cache."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from refine.tetgrid import default_cache_dir, kuhn_edges, tet_edges, tet_grid, tet_volumes


def faces_with_counts(tets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique triangular faces [F, 3] (sorted ids) and how many tets hold each."""
    local = torch.tensor([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]])
    faces = torch.sort(tets[:, local].reshape(-1, 3), dim=1).values
    return torch.unique(faces, dim=0, return_counts=True)


@pytest.mark.parametrize("resolution", [1, 3, 6])
def test_sizes_and_vertices(resolution):
    grid = tet_grid(resolution, bound=0.55, cache=False)
    n = resolution + 1
    assert grid.vertices.shape == (n**3, 3) and grid.vertices.dtype == torch.float32
    assert grid.tets.shape == (6 * resolution**3, 4) and grid.tets.dtype == torch.int64
    assert grid.vertices.min() == -0.55 and grid.vertices.max() == 0.55
    # Index (i * n + j) * n + k holds the lattice point (i, j, k).
    i, j, k = 1, 0, resolution
    np.testing.assert_allclose(
        grid.vertices[(i * n + j) * n + k].numpy(), -0.55 + grid.cell_size * np.array([i, j, k]), atol=1e-6
    )
    assert grid.cell_size == pytest.approx(1.1 / resolution)
    assert int(grid.tets.min()) == 0 and int(grid.tets.max()) == n**3 - 1


@pytest.mark.parametrize("resolution,bound", [(2, 1.0), (7, 0.55)])
def test_volumes_positive_and_fill_the_cube(resolution, bound):
    grid = tet_grid(resolution, bound=bound, cache=False)
    vol = tet_volumes(grid.vertices.double(), grid.tets)
    # Every Kuhn tet is one sixth of its cell.
    torch.testing.assert_close(
        vol, torch.full_like(vol, (2 * bound / resolution) ** 3 / 6), rtol=1e-5, atol=0
    )
    assert float(vol.sum()) == pytest.approx((2 * bound) ** 3, rel=1e-6)


@pytest.mark.parametrize("resolution", [1, 4])
def test_conforming(resolution):
    bound = 0.55
    grid = tet_grid(resolution, bound=bound, cache=False)
    faces, counts = faces_with_counts(grid.tets)
    assert int(counts.max()) == 2  # no face in three tets
    boundary = faces[counts == 1]
    # Each of the 6 R^2 boundary squares is cut in two by the Kuhn split.
    assert boundary.shape[0] == 12 * resolution**2
    # ... and every once-used face lies in one plane of the cube's surface.
    v = grid.vertices[boundary]  # [B, 3, 3]
    on_plane = ((v.abs() == bound).all(dim=1)) & (v[:, :1] == v).all(dim=1)  # same coordinate, at +-bound
    assert bool(on_plane.any(dim=1).all())
    # Interior faces are shared by exactly two tets: 4 T = B + 2 I.
    n_interior = int((counts == 2).sum())
    assert 4 * grid.tets.shape[0] == boundary.shape[0] + 2 * n_interior


@pytest.mark.parametrize("resolution", [1, 2, 5])
def test_edges(resolution):
    grid = tet_grid(resolution, cache=False)
    edges, per_tet = tet_edges(grid.tets, return_tet_edges=True)
    r = resolution
    assert edges.shape == (3 * r * (r + 1) ** 2 + 3 * r**2 * (r + 1) + r**3, 2)
    assert bool((edges[:, 0] < edges[:, 1]).all())
    assert torch.equal(kuhn_edges(resolution), edges)
    assert torch.equal(grid.edges(), edges)
    # The per-tet ids point at each tet's own edges, in the local order (01, 02, 03, 12, 13, 23).
    local = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])
    assert torch.equal(edges[per_tet], torch.sort(grid.tets[:, local], dim=-1).values)
    # Kuhn edges have lattice offsets in {0, 1}^3: length h, h sqrt(2) or h sqrt(3).
    lengths = (grid.vertices[edges[:, 1]] - grid.vertices[edges[:, 0]]).norm(dim=1) / grid.cell_size
    assert set(np.round(lengths.numpy() ** 2).astype(int).tolist()) == {1, 2, 3}


def test_boundary_mask():
    grid = tet_grid(3, cache=False)
    mask = grid.boundary_mask()
    assert int(mask.sum()) == 4**3 - 2**3
    assert torch.equal(mask, (grid.vertices.abs() > 0.55 - 1e-6).any(dim=1))


def test_cache_round_trip(tmp_path, monkeypatch):
    first = tet_grid(5, bound=0.5, cache_dir=tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["kuhn_r5_b0.5.npz"]  # written by rename: no temp file left behind
    again = tet_grid(5, bound=0.5, cache_dir=tmp_path)
    assert torch.equal(first.vertices, again.vertices) and torch.equal(first.tets, again.tets)
    assert again.tets.dtype == torch.int64 and (again.resolution, again.bound) == (5, 0.5)
    # Keyed by bound too.
    other = tet_grid(5, bound=0.25, cache_dir=tmp_path)
    assert float(other.vertices.max()) == 0.25 and len(list(tmp_path.iterdir())) == 2
    # ... exactly: two bounds equal to 6 digits shared one file (named by the rounded bound)
    close = tet_grid(5, bound=0.5000001, cache_dir=tmp_path)
    assert float(close.vertices.max()) == np.float32(0.5000001) and len(list(tmp_path.iterdir())) == 3
    (tmp_path / "kuhn_r5_b0.5000001.npz").replace(tmp_path / "kuhn_r5_b0.5000002.npz")  # a file of before
    assert float(tet_grid(5, bound=0.5000002, cache_dir=tmp_path).vertices.max()) == np.float32(0.5000002)
    # The default location follows $SV3D_CACHE.
    monkeypatch.setenv("SV3D_CACHE", str(tmp_path / "root"))
    assert default_cache_dir() == tmp_path / "root" / "tets"
    tet_grid(2)
    assert (tmp_path / "root" / "tets" / "kuhn_r2_b0.55.npz").is_file()
    tet_grid(3, cache=False)
    assert not (tmp_path / "root" / "tets" / "kuhn_r3_b0.55.npz").exists()


def test_a_damaged_cache_file_is_regenerated_and_a_read_only_cache_is_skipped(tmp_path):
    fresh = tet_grid(4, bound=0.5, cache=False)
    path = tmp_path / "kuhn_r4_b0.5.npz"
    for damage in (b"", b"PK\x03\x04 cut short"):  # a write cut short by a crash
        path.write_bytes(damage)
        grid = tet_grid(4, bound=0.5, cache_dir=tmp_path)
        assert torch.equal(grid.tets, fresh.tets) and path.stat().st_size > 1000  # replaced
    np.savez(path, vertices=fresh.vertices.numpy(), tets=fresh.tets.numpy()[:10])  # another grid's shape
    assert torch.equal(tet_grid(4, bound=0.5, cache_dir=tmp_path).tets, fresh.tets)
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder should be")
    with pytest.warns(UserWarning, match="tet grid not cached"):
        assert torch.equal(tet_grid(4, bound=0.5, cache_dir=blocked / "tets").tets, fresh.tets)
    home = tmp_path / "home"
    home.mkdir()
    import os

    os.environ["HOME"], old_home = str(home), os.environ.get("HOME")
    try:
        tet_grid(2, cache_dir="~/tets")  # "~" is the home folder, not a folder named "~"
    finally:
        os.environ["HOME"] = old_home or ""
    assert (home / "tets" / "kuhn_r2_b0.55.npz").is_file()


@pytest.mark.parametrize("resolution,bound", [(0, 0.5), (257, 0.5), (4.0, 0.5), (4, 0.0)])
def test_rejects_bad_arguments(resolution, bound):
    with pytest.raises(ValueError, match="resolution|bound"):
        tet_grid(resolution, bound=bound, cache=False)


@pytest.mark.slow
def test_resolution_128_generation():
    """The CUDA default's grid is generated in full (the time is printed, not asserted: a benchmark)."""
    start = time.perf_counter()
    grid = tet_grid(128, cache=False)
    seconds = time.perf_counter() - start
    print(f"tet_grid(128): {seconds:.2f} s, {grid.tets.shape[0]} tets")
    assert grid.tets.shape == (6 * 128**3, 4) and grid.vertices.shape == (129**3, 3)
