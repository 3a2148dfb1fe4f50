"""The floor cut's height (refine.floor) and the DMTet cut below it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import trimesh

from refine.camera import transform_points
from refine.dmtet import DMTetConfig, DMTetGeometry
from refine.fit import RefineConfig, refine_surface
from refine.floor import seen_floor_height
from refine.mesh import Mesh
from refine.rasterizer import interpolate_covered, rasterize
from refine.render import render_mesh
from sv3d.cameras import static_orbit


def floor_of(mesh: trimesh.Trimesh, cameras, resolution: int) -> float | None:
    vertices = torch.as_tensor(np.asarray(mesh.vertices), dtype=torch.float32)
    return seen_floor_height(vertices, torch.as_tensor(np.asarray(mesh.faces)), cameras, resolution)


def test_floor_height_is_a_flat_bottoms_edge_and_a_spheres_horizon():
    cameras = static_orbit(10.0, 0.0).cameras()  # SV3D's 21 views at elevation 10, radius 2
    box = trimesh.creation.box(extents=(0.6, 0.5, 0.3))  # bottom face at z = -0.15, never seen from above
    pixel = 2 * 2.0 * np.tan(np.radians(33.8 / 2)) / 256  # a pixel's size at the orbit's centre
    # Its edge is seen, at pixel centres: each view's lowest hit lies within a pixel above the edge.
    assert -0.15 - 1e-4 <= floor_of(box, cameras, 256) <= -0.15 + pixel
    # Sphere of radius 0.5 seen from distance 2: each view's horizon is the circle of tangent points, whose
    # lowest point is at z = (r^2 / d) sin(e) - r sqrt(1 - r^2 / d^2) cos(e); the pole below is hidden.
    r, d, e = 0.5, 2.0, np.radians(10.0)
    horizon = r * r / d * np.sin(e) - r * np.sqrt(1 - r * r / (d * d)) * np.cos(e)  # -0.4551
    seen = floor_of(trimesh.creation.icosphere(subdivisions=6, radius=r), cameras, 256)
    assert horizon - 1e-3 <= seen <= horizon + 2 * pixel  # pixel centres fall just inside the horizon
    behind = trimesh.creation.box(extents=(0.2, 0.2, 0.2))
    behind.apply_translation((3.0, 0.0, 0.0))  # behind the one camera, at azimuth 0: seen by none
    assert floor_of(behind, static_orbit(10.0, 0.0, num_frames=1).cameras(), 64) is None


def test_a_droop_that_only_some_views_see_stays_below_the_floor():
    # A box standing at z = -0.15 with a pyramid hanging 0.05 under one bottom corner, as a fit's corner
    # droops: the views facing that corner see the pyramid, those on the other side see only the box's edge.
    cameras = static_orbit(10.0, 0.0).cameras()
    box = trimesh.creation.box(extents=(0.6, 0.5, 0.3))
    corner = np.array([0.3, 0.25, -0.15])
    tip = corner + np.array([-0.03, -0.03, -0.05])
    base = [corner, corner + [-0.1, 0, 0], corner + [0, -0.1, 0]]
    droop = trimesh.Trimesh(np.array([*base, tip]), [[0, 2, 1], [0, 1, 3], [1, 2, 3], [2, 0, 3]])
    mesh = trimesh.util.concatenate([box, droop])
    vertices = torch.as_tensor(mesh.vertices, dtype=torch.float32)
    faces = torch.as_tensor(mesh.faces)
    with torch.no_grad():  # the lowest point that any view sees is on the pyramid
        _, seen = interpolate_covered(
            vertices, rasterize(transform_points(vertices, cameras.world_to_clip()), faces, 256), faces
        )
    assert float(seen[:, 2].min()) < -0.17
    pixel = 2 * 2.0 * np.tan(np.radians(33.8 / 2)) / 256
    assert -0.15 - 1e-4 <= floor_of(mesh, cameras, 256) <= -0.15 + pixel  # every view sees down to here


def test_cut_below_leaves_the_plane_and_keeps_the_rest(tmp_path):
    geo = DMTetGeometry(DMTetConfig(resolution=32, cache_dir=str(tmp_path)))
    radius = geo.grid_vertices.norm(dim=1)
    geo.init_from_sdf(radius - 0.4)  # sphere of radius 0.4
    before_v = geo.to_mesh().vertices
    removed = geo.cut_below(-0.25)
    verts, faces = geo.to_mesh().vertices, geo.to_mesh().faces
    assert float(verts[:, 2].min()) == pytest.approx(-0.25, abs=1e-5)  # flat at the cut, nothing under it
    cap = (verts[:, 2] - (-0.25)).abs() < 1e-5
    assert cap.sum() > 20 and (verts[cap, :2].norm(dim=1) < np.sqrt(0.4**2 - 0.25**2) + 0.02).all()
    # Above the cut (a cell's margin) the surface is the same as before.
    keep_before = before_v[before_v[:, 2] > -0.25 + 2 * geo.cell_size]
    keep_after = verts[verts[:, 2] > -0.25 + 2 * geo.cell_size]
    assert keep_before.shape == keep_after.shape and torch.allclose(
        keep_before.sort(0)[0], keep_after.sort(0)[0]
    )
    inside = radius < 0.4
    expected = float((inside & (geo.grid_vertices[:, 2] < -0.25)).sum()) / float(inside.sum())
    assert removed == pytest.approx(expected)
    mesh = trimesh.Trimesh(verts.numpy(), faces.numpy())
    assert mesh.is_watertight and mesh.volume > 0
    # A cut above everything is refused and changes nothing.
    sdf = geo.sdf.detach().clone()
    with pytest.raises(ValueError, match="nothing inside"):
        geo.cut_below(0.5)
    assert torch.equal(geo.sdf.detach(), sdf)


def test_projecting_after_a_step_keeps_the_band_and_the_whole_grids_surface(tmp_path):
    config = DMTetConfig(resolution=32, cache_dir=str(tmp_path))
    geo, whole = (
        DMTetGeometry(config),
        DMTetGeometry(DMTetConfig(resolution=32, cache_dir=str(tmp_path), band_rings=0)),
    )
    radius = geo.grid_vertices.norm(dim=1)
    geo.init_from_sdf(radius - 0.4)
    geo.cut_below(-0.25)
    geo.extract()
    rebuilds = geo.band_rebuilds
    # A step pushes the vertices just under the plane back inside (a droop): projecting them out again
    # touches only tets the band holds, so the band stays; the surface is the whole grid's.
    z = geo.grid_vertices[:, 2]
    droop = (z < -0.25) & (z > -0.25 - geo.cell_size) & (radius < 0.3)
    with torch.no_grad():
        geo.sdf[droop] = -1e-3
    assert geo.cut_below(-0.25) > 0
    verts, faces = geo.to_mesh().vertices, geo.to_mesh().faces
    assert geo.band_rebuilds == rebuilds
    whole.load_state_dict(geo.state_dict())
    ref = whole.to_mesh()
    assert torch.equal(verts, ref.vertices) and torch.equal(faces, ref.faces)
    assert float(verts[:, 2].min()) == pytest.approx(-0.25, abs=1e-5)


def _surface(sdf, tet_config):
    geo = DMTetGeometry(tet_config)
    geo.init_from_sdf(sdf)
    mesh = geo.to_mesh()
    return mesh.vertices, mesh.faces


def test_refinement_keeps_the_surface_above_the_inits_floor():
    # A box on the orbit's floor, refined from an init with a belly under it: the floor is measured on the
    # init (its bottom edge, which every view sees), the belly is cut and does not grow back.
    cameras = static_orbit(10.0, 0.0).cameras()
    box = trimesh.creation.box(extents=(0.8, 0.8, 0.3))  # bottom at z = -0.15
    mesh = Mesh(torch.as_tensor(box.vertices, dtype=torch.float32), torch.as_tensor(box.faces))
    frames = render_mesh(mesh, cameras, 48)
    images = torch.cat([frames.image, frames.alpha], dim=-1)  # [V, 48, 48, 4]
    config = RefineConfig(steps=6, render_resolution=48, views_per_step=2, tet=DMTetConfig(resolution=32))
    grid = DMTetGeometry(config.tet).grid_vertices
    # init: the box's SDF (L-inf, enough here), with a belly 0.04 deep under its middle, which no view sees
    sdf = (grid.abs() - torch.tensor([0.4, 0.4, 0.15])).amax(dim=1)
    belly = (grid[:, :2].norm(dim=1) < 0.15) & (grid[:, 2] > -0.19) & (grid[:, 2] < 0.0)
    sdf[belly] = -0.01
    vertices, faces = _surface(sdf, config.tet)
    assert float(vertices[:, 2].min()) < -0.17 < seen_floor_height(vertices, faces, cameras, 48)  # hidden
    result = refine_surface(images, cameras, sdf, config)
    floor = result.floor
    assert floor["removed"] > 0 and floor["height"] == pytest.approx(-0.15, abs=0.03)
    verts = result.geometry.to_mesh().vertices
    assert float(verts[:, 2].min()) >= floor["height"] - 1e-5
    assert floor["source"] == "measured on the init"
    assert refine_surface(images, cameras, sdf, dataclasses.replace(config, floor_cut=False)).floor is None
    # a known floor (the NeRF stage's) is cut at as given, not measured again
    given = refine_surface(images, cameras, sdf, config, floor_height=-0.1)
    assert given.floor["height"] == -0.1 and given.floor["source"] == "given"
    assert given.floor["removed"] > floor["removed"]
    assert float(given.geometry.to_mesh().vertices[:, 2].min()) >= -0.1 - 1e-5
