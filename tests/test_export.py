"""Mesh clean-up, textured_mesh and export_mesh (refine/export.py), read back with sv3d.meshio."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import asdict

import numpy as np
import pytest
import torch
import trimesh

from refine import Cameras, Mesh, render_mesh
from refine.bake import BakeConfig
from refine.export import (
    CleanupConfig,
    clean_mesh,
    decimate,
    export_mesh,
    merge_vertices,
    remove_small_components,
    textured_mesh,
)
from sv3d.cameras import FOV_DEG, c2w_from_angles, projection_from_fov
from sv3d.meshio import load_mesh

MIN_PSNR_DB = 30.0


def icosphere(subdivisions: int, radius: float = 0.45, center=(0.0, 0.0, 0.0)):
    m = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    v = torch.tensor(m.vertices + np.asarray(center), dtype=torch.float32)
    return v, torch.tensor(m.faces, dtype=torch.int64)


def rgb_of_position(p: torch.Tensor) -> torch.Tensor:
    """The analytic colour field: rgb = (x, y, z) + 0.5, in [0, 1] inside the radius-0.5 world."""
    return (p + 0.5).clamp(0.0, 1.0)


def cameras() -> Cameras:
    c2w = c2w_from_angles(torch.tensor([20.0, -25.0, 60.0]), torch.tensor([30.0, 200.0, 110.0]))
    return Cameras(c2w, projection_from_fov(FOV_DEG))


def masked_psnr(a: Mesh, b: Mesh, resolution: int = 128) -> float:
    """PSNR (dB) of unlit renders of two meshes over the pixels both cover."""
    ra = render_mesh(a, cameras(), resolution, shading="unlit", antialias=False)
    rb = render_mesh(b, cameras(), resolution, shading="unlit", antialias=False)
    both = (ra.mask * rb.mask)[..., 0] > 0
    assert both.float().mean() > 0.1  # the object fills a good part of the frame
    mse = ((ra.image - rb.image)[both] ** 2).mean()
    return float(-10.0 * torch.log10(mse.clamp(min=1e-12)))


def glb_json(path) -> dict:
    data = path.read_bytes()
    (length,) = struct.unpack("<I", data[12:16])  # first chunk: the JSON
    return json.loads(data[20 : 20 + length])


@pytest.fixture(scope="module")
def sphere_textured():
    v, f = icosphere(3)
    config = BakeConfig(texture_size=256, gutter=8)
    return (v, f), textured_mesh(v, f, rgb_of_position, **asdict(config))  # [256, 256, 3] texture


# ---------------------------------------------------------------------------------------------- clean-up


def test_remove_small_components_keeps_only_the_big_parts():
    big_v, big_f = icosphere(2, 0.5)  # area 4 pi 0.25 = 3.14
    mid_v, mid_f = icosphere(1, 0.2, (2.0, 0.0, 0.0))  # 0.50: 14% of the total, kept
    tiny_v, tiny_f = icosphere(1, 0.04, (0.0, 3.0, 0.0))  # 0.02: 0.55% < 1%, dropped
    vertices = torch.cat([tiny_v, big_v, mid_v])
    faces = torch.cat([tiny_f, big_f + len(tiny_v), mid_f + len(tiny_v) + len(big_v)])
    out_v, out_f = remove_small_components(vertices, faces, min_fraction=0.01)
    assert out_f.shape[0] == big_f.shape[0] + mid_f.shape[0]
    assert out_v.shape[0] == big_v.shape[0] + mid_v.shape[0]
    assert torch.equal(out_v, torch.cat([big_v, mid_v]))  # order kept, tiny sphere's vertices gone
    assert int(out_f.max()) == out_v.shape[0] - 1
    # a higher threshold also drops the middle one; the largest part always stays
    out_v, out_f = remove_small_components(vertices, faces, min_fraction=0.5)
    assert out_f.shape[0] == big_f.shape[0]
    out_v, out_f = remove_small_components(vertices, faces, min_fraction=1.0)
    assert out_f.shape[0] == big_f.shape[0]
    with pytest.raises(ValueError, match="min_fraction"):
        remove_small_components(vertices, faces, min_fraction=1.5)


def test_clean_up_refuses_nan_vertices():
    # a NaN switched merging off (the diagonal was NaN) and made the NaN part the "largest" one to keep
    big_v, big_f = icosphere(2)
    speck_v, speck_f = icosphere(0, radius=0.01, center=(0.8, 0.0, 0.0))
    speck_v[0, 0] = float("nan")
    vertices, faces = torch.cat([big_v, speck_v]), torch.cat([big_f, speck_f + big_v.shape[0]])
    for call in (merge_vertices, remove_small_components, lambda v, f: clean_mesh(v, f, CleanupConfig())):
        with pytest.raises(ValueError, match="1 of 174 vertices have NaN/inf"):
            call(vertices, faces)


def test_merge_vertices_welds_a_triangle_soup():
    v, f = icosphere(2)
    soup_v = v[f.reshape(-1)] + 1e-9  # every face with its own three vertices (float round-off apart)
    soup_f = torch.arange(soup_v.shape[0]).reshape(-1, 3)
    # plus a degenerate face and a duplicate of face 0
    soup_f = torch.cat([soup_f, torch.tensor([[0, 0, 1]]), soup_f[:1].roll(1, dims=1)])
    out_v, out_f = merge_vertices(soup_v, soup_f)
    assert out_v.shape[0] == v.shape[0] and out_f.shape[0] == f.shape[0]
    # the same triangles as the original, as sets of positions
    assert torch.allclose(out_v[out_f].sort(dim=1).values.sum(1), v[f].sort(dim=1).values.sum(1), atol=1e-6)
    # the welded sphere is one component again
    assert remove_small_components(out_v, out_f, 0.5)[1].shape[0] == f.shape[0]


TETRA_FACES = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])  # outward for the corner tetrahedron


def test_decimation_leaves_no_fins_or_pinched_edges(monkeypatch):
    """fast_simplification's collapses do not check the topology: on the refined bowl (thin walls) they left
    coincident face pairs and edges of four faces (14 and 35 at 5000 faces; watertight before). The
    fins go, and sheets that touch get vertices of their own: every edge has two faces again."""
    from refine import export
    from refine.rasterizer import edge_topology

    points = np.array(  # [9, 3]
        [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [2, 0, 0], [1, 1, 0], [1, 0, 1], [-1, 0, 0], [0, -1, 0]],
        dtype=np.float64,
    )
    a = TETRA_FACES  # corners 0 1 2 3
    b = np.array([1, 4, 5, 6])[TETRA_FACES]  # touches a at vertex 1
    c = np.array([0, 7, 8, 3])[TETRA_FACES]  # shares a's edge 0-3: four faces there
    fin = np.array([[1, 2, 4], [1, 4, 2]])  # a coincident pair, as a collapse leaves it
    soup = np.concatenate([a, b, c, fin])
    assert (edge_topology(torch.from_numpy(soup)) == -2).any()
    monkeypatch.setattr(export.fast_simplification, "simplify", lambda *args, **kwargs: (points, soup))
    out_v, out_f = decimate(torch.rand(40, 3), torch.randint(0, 40, (80, 3)), 20)
    assert out_f.shape == (12, 3) and out_v.shape == (12, 3)  # three tetrahedra of their own
    assert (edge_topology(out_f) >= 0).all()  # every edge between two faces
    parts = trimesh.Trimesh(out_v.numpy(), out_f.numpy(), process=False).split(only_watertight=False)
    assert len(parts) == 3 and all(part.is_watertight and part.volume > 0 for part in parts)
    # a face repeated with its own winding is kept once (dropping both would open a hole)
    assert export._without_fins(np.array([[0, 1, 2], [1, 2, 0], [0, 2, 3]])).tolist() == [
        [0, 1, 2],
        [0, 2, 3],
    ]
    # a surface without such places keeps its vertices
    v, f = icosphere(2, 0.5)
    faces, source = export._split_pinches(f.numpy())
    assert source.shape[0] == v.shape[0] and np.array_equal(source[faces], f.numpy())


def test_decimate_reaches_the_target_and_stays_close():
    v, f = icosphere(5, 0.5)  # 20480 faces
    out_v, out_f = decimate(v, f, 2000)
    assert 1800 <= out_f.shape[0] <= 2000
    assert int(out_f.max()) == out_v.shape[0] - 1  # compact
    # two-sided Hausdorff-style distance: decimated vertices to the sphere, sphere samples to the result
    assert float((out_v.norm(dim=-1) - 0.5).abs().max()) < 0.01
    decimated = trimesh.Trimesh(out_v.numpy(), out_f.numpy(), process=False)
    _, dist, _ = trimesh.proximity.closest_point(decimated, v.numpy()[::4])
    assert dist.max() < 0.01  # 2% of the radius; a 2000-face sphere's sagitta is ~0.003
    # nothing to do below the target
    same_v, same_f = decimate(v, f, 30000)
    assert same_v is v and torch.equal(same_f, f)
    with pytest.raises(ValueError, match="target_faces"):
        decimate(v, f, 0)


def test_clean_mesh_chains_the_steps():
    big_v, big_f = icosphere(4, 0.5)
    tiny_v, tiny_f = icosphere(1, 0.03, (1.0, 0.0, 0.0))
    vertices = torch.cat([big_v, tiny_v])
    faces = torch.cat([big_f, tiny_f + len(big_v)])
    out_v, out_f = clean_mesh(vertices, faces, CleanupConfig(target_faces=1000))
    assert out_f.shape[0] <= 1000
    assert float(out_v.norm(dim=-1).max()) < 0.51  # the tiny sphere at x = 1 is gone


# --------------------------------------------------------------------------------------------- textures


def test_textured_mesh_rejects_bad_texture_size():
    v, f = icosphere(1)
    for size in (100, 32, 16384):
        with pytest.raises(ValueError, match="power of two"):
            textured_mesh(v, f, rgb_of_position, texture_size=size)


def test_textured_mesh_renders_like_the_colour_field(sphere_textured):
    (v, f), mesh = sphere_textured
    assert mesh.texture.shape == (256, 256, 3) and mesh.uvs.shape == (mesh.vertices.shape[0], 2)
    # seam vertices carry the welded mesh's normal: no shading seam
    ref_normals = torch.nn.functional.normalize(mesh.vertices, dim=-1)
    assert float((mesh.normals() * ref_normals).sum(-1).min()) > 0.99
    reference = Mesh(v, f, vertex_colors=rgb_of_position(v))  # linear in position: exact per triangle
    assert masked_psnr(mesh, reference) >= 40.0


# ------------------------------------------------------------------------------------------------ export


@pytest.mark.parametrize("fmt", ["glb", "obj"])
def test_export_round_trip_textured(sphere_textured, tmp_path, fmt):
    (v, f), mesh = sphere_textured
    written = export_mesh(mesh, tmp_path, formats=(fmt,))
    expected = {"glb": {"mesh.glb"}, "obj": {"mesh.obj", "mesh.mtl", "mesh.png"}}[fmt]
    assert set(written) == expected and {p.name for p in tmp_path.iterdir()} == expected
    loaded = load_mesh(tmp_path / f"mesh.{fmt}", place=False)
    assert loaded.texture is not None and loaded.texture.shape == (256, 256, 3)
    assert torch.equal(loaded.faces, mesh.faces)
    assert torch.allclose(loaded.vertices, mesh.vertices, atol=1e-6)  # z up survives glTF's y up
    assert torch.allclose(loaded.uvs, mesh.uvs, atol=1e-6)
    # the PNG holds the texture to 8 bits
    assert float((loaded.texture - mesh.texture).abs().max()) <= 0.5 / 255 + 1e-6
    reference = Mesh(v, f, vertex_colors=rgb_of_position(v))
    assert masked_psnr(loaded, reference) >= MIN_PSNR_DB


def test_glb_is_y_up_and_unlit(sphere_textured, tmp_path):
    (_, _), mesh = sphere_textured
    export_mesh(mesh, tmp_path, formats=("glb",))
    raw = trimesh.load(tmp_path / "mesh.glb", force="mesh", process=False)  # no axis conversion
    world = mesh.vertices.double().numpy()
    expected = np.stack([world[:, 0], world[:, 2], -world[:, 1]], -1)  # (x, y, z) -> (x, z, -y)
    assert np.allclose(np.asarray(raw.vertices), expected, atol=1e-6)
    tree = glb_json(tmp_path / "mesh.glb")
    assert "KHR_materials_unlit" in tree["extensionsUsed"]
    assert "extensionsRequired" not in tree  # viewers without the extension fall back to PBR
    (material,) = tree["materials"]
    assert "KHR_materials_unlit" in material["extensions"]
    pbr = material["pbrMetallicRoughness"]
    assert "baseColorTexture" in pbr and pbr["metallicFactor"] == 0.0 and pbr["roughnessFactor"] == 1.0


def glb_normals(path) -> np.ndarray:
    """[N, 3] the NORMAL attribute of the GLB's one primitive, read from its binary chunk."""
    data = path.read_bytes()
    (length,) = struct.unpack("<I", data[12:16])
    tree = json.loads(data[20 : 20 + length])
    binary = data[20 + length + 8 :]  # the BIN chunk after its 8-byte header
    (mesh,) = tree["meshes"]
    accessor = tree["accessors"][mesh["primitives"][0]["attributes"]["NORMAL"]]
    view = tree["bufferViews"][accessor["bufferView"]]
    start = view.get("byteOffset", 0) + accessor.get("byteOffset", 0)
    assert accessor["componentType"] == 5126 and accessor["type"] == "VEC3"  # float32
    return np.frombuffer(binary, np.float32, accessor["count"] * 3, start).reshape(-1, 3)


def test_normals_are_unit_where_faces_have_no_area(tmp_path):
    # a sphere plus a collinear sliver whose three vertices no other face uses (their normal would be 0),
    # and a vertex that no face uses: glTF requires unit normals, so they point away from the centre
    v, f = icosphere(1)
    n = v.shape[0]
    sliver = torch.tensor([[0.6, 0.0, 0.0], [0.7, 0.0, 0.0], [0.8, 0.0, 0.0], [0.0, 0.0, 0.0]])
    v2 = torch.cat([v, sliver])
    f2 = torch.cat([f, torch.tensor([[n, n + 1, n + 2]])])
    export_mesh(Mesh(v2, f2), tmp_path)
    normals = glb_normals(tmp_path / "mesh.glb")  # glTF frame
    assert normals.shape == (n + 4, 3)
    assert np.allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-5)
    assert np.allclose(normals[n : n + 3], [1.0, 0.0, 0.0], atol=1e-5)  # +x is +x in glTF too
    lines = (tmp_path / "mesh.obj").read_text().splitlines()
    obj_normals = np.array([[float(x) for x in line.split()[1:]] for line in lines if line.startswith("vn ")])
    assert obj_normals.shape == (n + 4, 3)  # the file's own (trimesh recomputes them on loading)
    assert np.allclose(np.linalg.norm(obj_normals, axis=1), 1.0, atol=1e-5)


def test_obj_material_names_the_png(sphere_textured, tmp_path):
    (_, _), mesh = sphere_textured
    export_mesh(mesh, tmp_path, name="thing", formats=("obj",))
    mtl = (tmp_path / "thing.mtl").read_text()
    assert "map_Kd thing.png" in mtl and "Ks 0.0" in mtl
    assert "mtllib thing.mtl" in (tmp_path / "thing.obj").read_text()


@pytest.mark.parametrize("fmt", ["glb", "obj"])
def test_export_round_trip_vertex_colours(tmp_path, fmt):
    v, f = icosphere(3)
    mesh = Mesh(v, f, vertex_colors=rgb_of_position(v))
    export_mesh(mesh, tmp_path, formats=(fmt,))
    assert {p.name for p in tmp_path.iterdir()} == {f"mesh.{fmt}"}
    loaded = load_mesh(tmp_path / f"mesh.{fmt}", place=False)
    assert loaded.texture is None and loaded.vertex_colors is not None
    assert torch.allclose(loaded.vertices, v, atol=1e-6)
    # OBJ: sRGB to 8 bits; glTF: linear to 8 bits (coarser in the darks)
    tolerance = {"obj": 0.5 / 255 + 1e-6, "glb": 0.03}[fmt]
    assert float((loaded.vertex_colors - mesh.vertex_colors).abs().max()) <= tolerance
    assert masked_psnr(loaded, mesh) >= MIN_PSNR_DB


def test_export_plain_colour(tmp_path):
    v, f = icosphere(1)
    export_mesh(Mesh(v, f, color=(0.2, 0.6, 0.4)), tmp_path)
    for fmt in ("glb", "obj"):
        loaded = load_mesh(tmp_path / f"mesh.{fmt}", place=False)
        assert np.allclose(loaded.color, (0.2, 0.6, 0.4), atol=0.01)


def test_export_rejects_bad_arguments_before_writing(tmp_path):
    v, f = icosphere(1)
    out = tmp_path / "out"
    for kwargs, match in (
        ({"formats": ("fbx",)}, "formats"),
        ({"formats": ()}, "formats"),
        ({"name": "a/b"}, "name"),
        ({"name": ".hidden"}, "name"),
    ):
        with pytest.raises(ValueError, match=match):
            export_mesh(Mesh(v, f), out, **kwargs)
    assert not out.exists()


# -------------------------------------------------------------------------------------------- atomicity


def test_failed_rename_leaves_nothing(sphere_textured, tmp_path, monkeypatch):
    (_, _), mesh = sphere_textured

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("refine.export.os.replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        export_mesh(mesh, tmp_path)
    assert list(tmp_path.iterdir()) == []  # no final file and no temporary one


def test_interrupted_write_keeps_the_previous_file(sphere_textured, tmp_path, monkeypatch):
    (v, f), mesh = sphere_textured
    export_mesh(Mesh(v, f, color=(0.1, 0.2, 0.3)), tmp_path, formats=("glb",))
    previous = (tmp_path / "mesh.glb").read_bytes()
    real_fdopen = os.fdopen

    class HalfWriter:
        """A file that writes half of the data, then the process 'dies'."""

        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise KeyboardInterrupt

    monkeypatch.setattr("refine.export.os.fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    with pytest.raises(KeyboardInterrupt):
        export_mesh(mesh, tmp_path, formats=("glb",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mesh.glb"]  # no partial or temporary file
    assert (tmp_path / "mesh.glb").read_bytes() == previous
