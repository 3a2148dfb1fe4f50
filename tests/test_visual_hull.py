"""The visual-hull baseline: carving conventions checked by hand, and the shapes it can and cannot recover."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from refine.camera import Cameras
from refine.mesh import Mesh
from refine.render import render_mesh
from sv3d.cameras import (
    Orbit,
    c2w_from_angles,
    projection_from_fov,
    sine_orbit,
    static_orbit,
    write_orbit_directory,
)
from sv3d.errors import InputError
from sv3d.evaluation.metrics import evaluate_mesh, volume_iou
from sv3d.evaluation.visual_hull import carve_occupancy, carve_visual_hull, visual_hull_from_orbit_dir
from sv3d.meshio import place_in_world
from sv3d.testing.objects import make_test_object

MASK_RES = 128  # mask side in pixels: a pixel ≈ 0.5% of the frame, finer than the 96³ voxels below
VOXELS = 96


def _render_masks(mesh: trimesh.Trimesh, orbit: Orbit) -> tuple[torch.Tensor, Cameras]:
    cameras = orbit.cameras()
    m = Mesh(torch.tensor(np.array(mesh.vertices), dtype=torch.float32), torch.tensor(np.array(mesh.faces)))
    with torch.no_grad():
        out = render_mesh(m, cameras, MASK_RES, antialias=False)
    return out.mask, cameras  # [V, H, W, 1] in {0, 1}


def _placed_object(name: str) -> trimesh.Trimesh:
    mesh, _, _ = make_test_object(name)
    vertices, _, _ = place_in_world(np.asarray(mesh.vertices, dtype=np.float64))
    return trimesh.Trimesh(vertices, mesh.faces, process=False)


def test_pixel_convention_of_the_carving() -> None:
    # One camera on the +x axis looking at the origin: its right is world +y and its up world +z
    # (c2w_from_angles at elevation 0, azimuth 0). A mask keeping the image's left columns (x < W/2) and
    # top rows (row < H/2) keeps the voxels with world y < 0 and z > 0 only: row 0 is the top.
    cameras = Cameras(c2w_from_angles(0.0, 0.0), projection_from_fov(33.8))
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    mask[0, :32, :32] = True
    # Voxel centres at ±0.02, ±0.06, ... ±0.38: all in the frame (half-width 1.6·tan 16.9° = 0.49 at the
    # nearest depth 1.6), none on the split planes.
    occ = carve_occupancy(mask, cameras, resolution=20, bound=0.4)
    centres = ((torch.arange(20) + 0.5) / 20 - 0.5) * 0.8
    y = centres[None, :, None].expand(20, 20, 20)
    z = centres[None, None, :].expand(20, 20, 20)
    # With perspective the split planes y = 0 and z = 0 still pass through the camera centre (y = z = 0).
    assert torch.equal(occ, (y < 0) & (z > 0))
    # The same mask as [V, H, W, 1] floats gives the same result.
    assert torch.equal(occ, carve_occupancy(mask[..., None].float(), cameras, resolution=20, bound=0.4))


def test_outside_the_frame_is_carved() -> None:
    # A full mask still carves what the camera does not see: at distance 2 and fov 33.8°, the frame's
    # half-width at depth 1.975 (the voxels at x = 0.025) is 1.975·tan(16.9°) = 0.600, so of the centres
    # y = ±0.025, ±0.075, ... the last kept is ±0.575.
    cameras = Cameras(c2w_from_angles(0.0, 0.0), projection_from_fov(33.8))
    occ = carve_occupancy(torch.ones(1, 32, 32), cameras, resolution=40, bound=1.0)
    centres = (torch.arange(40) + 0.5) / 40 * 2 - 1
    kept_y = centres[occ[20, :, 20]]  # along y through x ≈ 0, z ≈ 0
    assert kept_y.abs().max().item() == pytest.approx(0.575, abs=1e-6)
    assert len(kept_y) == 24  # -0.575 ... 0.575


def test_sphere_hull_from_21_views() -> None:
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.45)
    masks, cameras = _render_masks(sphere, static_orbit())
    hull = carve_visual_hull(masks, cameras, resolution=64)
    assert hull.is_watertight and hull.volume > 0  # closed and outward-oriented
    # A visual hull contains the object: its volume is at least the sphere's (less what marching cubes
    # cuts off the voxels' corners).
    assert hull.volume > 0.95 * sphere.volume
    assert volume_iou(hull, sphere, resolution=32) > 0.9


def test_the_hull_of_two_parts_keeps_both() -> None:
    """Only the largest component was kept: an object of two parts lost one from its baseline."""
    big = trimesh.creation.icosphere(subdivisions=3, radius=0.2)
    big.apply_translation([0.2, 0.0, 0.0])
    small = trimesh.creation.icosphere(subdivisions=3, radius=0.12)
    small.apply_translation([-0.25, 0.0, 0.25])
    masks, cameras = _render_masks(trimesh.util.concatenate([big, small]), static_orbit())
    hull = carve_visual_hull(masks, cameras, resolution=64)
    assert len(hull.split(only_watertight=False)) == 2
    assert hull.volume > 0.95 * (big.volume + small.volume)


def test_bowl_hull_is_worse_than_plate_hull() -> None:
    # Silhouettes cannot see concavities: the bowl's hull fills its inside, so the inner surface is far
    # from it, while a flat plate is carved close to its shape. The sine orbit (elevations within ±20°
    # of 0) has views nearly edge-on to the plate; at a single elevation e the plate's hull keeps a lens
    # of height radius·tan e above and below it.
    orbit = sine_orbit(0.0)
    scores = {}
    for name in ("bowl", "plate"):
        mesh = _placed_object(name)
        masks, cameras = _render_masks(mesh, orbit)
        hull = carve_visual_hull(masks, cameras, resolution=VOXELS)
        scores[name] = evaluate_mesh(
            hull, mesh, n_points=8_000, n_views=24, view_resolution=256, iou_resolution=32
        )
    assert scores["bowl"].chamfer > 2.0 * scores["plate"].chamfer
    assert scores["plate"].fscore[0.02] > 0.9 > scores["bowl"].fscore[0.02]


def test_visual_hull_from_an_orbit_directory(tmp_path: Path) -> None:
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.4)
    orbit = static_orbit()
    masks, cameras = _render_masks(sphere, orbit)
    images = torch.cat([torch.ones_like(masks).expand(-1, -1, -1, 3) * 0.5, masks], dim=-1)  # grey RGBA
    directory = write_orbit_directory(tmp_path / "orbit", orbit, images, "render")
    from_dir = visual_hull_from_orbit_dir(directory, resolution=48)
    direct = carve_visual_hull(masks, cameras, resolution=48)
    assert np.allclose(from_dir.vertices, direct.vertices) and np.array_equal(from_dir.faces, direct.faces)


def test_carving_errors() -> None:
    cameras = static_orbit().cameras()
    with pytest.raises(InputError, match="21 cameras"):
        carve_visual_hull(torch.ones(3, 16, 16), cameras)
    with pytest.raises(InputError, match=r"\[V, H, W\]"):
        carve_visual_hull(torch.ones(21, 16), cameras)
    with pytest.raises(InputError, match="no voxel"):
        carve_visual_hull(torch.zeros(21, 16, 16), cameras, resolution=16)
