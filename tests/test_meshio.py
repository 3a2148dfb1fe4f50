"""Mesh loading: formats, up axis, placement, colour sources, atlas packing and bad input."""

from __future__ import annotations

import io
import json
import logging
import math
import re
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image
from scipy.spatial import cKDTree

import sv3d.gltf_check
from refine.mesh import Mesh
from sv3d.errors import InputError, MeshLoadError
from sv3d.meshio import (
    Y_UP_TO_Z_UP,
    apply_placement,
    load_mesh,
    load_trimesh,
    place_in_world,
    resolve_mesh_path,
)
from sv3d.testing.objects import make_test_object, write_test_object

# a tetrahedron, counter-clockwise seen from outside, asymmetric so that any axis mix-up shows
TETRA_V = np.array([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
TETRA_F = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
WORLD_TO_GLTF = np.linalg.inv(Y_UP_TO_Z_UP)  # the export rule: world (x, y, z) -> glTF (x, z, -y)


def write_obj(path: Path, vertices: np.ndarray, faces: np.ndarray, extra: str = "", header: str = "") -> Path:
    lines = [header] + [f"v {x} {y} {z}" for x, y, z in vertices] + [extra]
    lines += ["f " + " ".join(str(i + 1) for i in face) for face in faces]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_glb(
    path: Path,
    positions: np.ndarray,  # [n, 3] glTF frame
    faces: np.ndarray,  # [f, 3]
    uvs: np.ndarray | None = None,  # [n, 2] glTF convention: origin top-left
    png: bytes | None = None,
    base_color: list[float] | None = None,  # linear RGBA, as the glTF specification defines it
    colors: np.ndarray | None = None,  # [n, 3] COLOR_0, linear
    texture_info: dict | None = None,  # more keys of the base colour texture's info (texCoord, extensions)
    document_extra: dict | None = None,  # more top-level keys (extensionsRequired)
    material_extra: dict | None = None,  # more keys of the material (normalTexture)
    normalized_uvs: bool = False,  # UVs as normalized unsigned bytes, as the core specification allows
) -> Path:
    """A minimal glTF 2.0 binary written by hand, so the checks do not rest on trimesh's exporter."""
    chunks = [positions.astype("<f4").tobytes(), faces.astype("<u4").tobytes()]
    accessors = [
        {
            "bufferView": 0,
            "componentType": 5126,
            "count": len(positions),
            "type": "VEC3",
            "min": positions.min(0).tolist(),
            "max": positions.max(0).tolist(),
        },
        {"bufferView": 1, "componentType": 5125, "count": faces.size, "type": "SCALAR"},
    ]
    attributes = {"POSITION": 0}
    if uvs is not None:
        if normalized_uvs:
            chunks.append(np.round(uvs * 255).astype(np.uint8).tobytes())
            uv_type = {"componentType": 5121, "normalized": True}
        else:
            chunks.append(uvs.astype("<f4").tobytes())
            uv_type = {"componentType": 5126}
        accessors.append({"bufferView": 2, "count": len(uvs), "type": "VEC2", **uv_type})
        attributes["TEXCOORD_0"] = 2
    if colors is not None:
        chunks.append(colors.astype("<f4").tobytes())
        accessors.append(
            {"bufferView": len(chunks) - 1, "componentType": 5126, "count": len(colors), "type": "VEC3"}
        )
        attributes["COLOR_0"] = len(chunks) - 1
    pbr: dict = {} if base_color is None else {"baseColorFactor": base_color}
    document: dict = {
        "asset": {"version": "2.0"},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0}],
    }
    if png is not None:
        chunks.append(png)
        document.update(
            images=[{"bufferView": len(chunks) - 1, "mimeType": "image/png"}],
            textures=[{"source": 0}],
        )
        pbr["baseColorTexture"] = {"index": 0, **(texture_info or {})}
    views, offset = [], 0
    blob = b""
    for chunk in chunks:
        views.append({"buffer": 0, "byteOffset": offset, "byteLength": len(chunk)})
        chunk += b"\0" * (-len(chunk) % 4)
        blob, offset = blob + chunk, offset + len(chunk)
    document.update(
        meshes=[{"primitives": [{"attributes": attributes, "indices": 1, "material": 0}]}],
        materials=[{"pbrMetallicRoughness": pbr, **(material_extra or {})}],
        accessors=accessors,
        bufferViews=views,
        buffers=[{"byteLength": len(blob)}],
        **(document_extra or {}),
    )
    text = json.dumps(document).encode()
    text += b" " * (-len(text) % 4)
    body = struct.pack("<I4s", len(text), b"JSON") + text + struct.pack("<I4s", len(blob), b"BIN\0") + blob
    path.write_bytes(struct.pack("<4sII", b"glTF", 2, 12 + len(body)) + body)
    return path


def sample_texture(mesh: Mesh, uv: np.ndarray) -> np.ndarray:
    """Nearest-texel colour [n, 3] at OBJ-convention UVs [n, 2], wrapping outside [0, 1]."""
    texture = mesh.texture.numpy()
    h, w, _ = texture.shape
    x = np.floor(np.mod(uv[:, 0], 1.0) * w).astype(int).clip(0, w - 1)
    y = np.floor((1.0 - np.mod(uv[:, 1], 1.0)) * h).astype(int).clip(0, h - 1)
    return texture[y, x]


def face_centroid_colors(mesh: Mesh) -> tuple[np.ndarray, np.ndarray]:
    """(centroids [F, 3], texture colour at each face's centroid UV [F, 3])."""
    faces = mesh.faces.numpy()
    centroids = mesh.vertices.numpy()[faces].mean(axis=1)
    return centroids, sample_texture(mesh, mesh.uvs.numpy()[faces].mean(axis=1))


# ------------------------------------------------------------------------------------------ placement


def test_place_in_world_by_hand() -> None:
    # bounding box [0, 2] x [0, 4] x [0, 0]: centre (1, 2, 0); every vertex is sqrt(5) from it
    vertices = np.array([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    placed, center, scale = place_in_world(vertices)
    assert np.allclose(center, [1.0, 2.0, 0.0])
    assert scale == pytest.approx(0.5 / math.sqrt(5))
    assert np.allclose(np.linalg.norm(placed, axis=-1), 0.5)
    placed_t, center_t, scale_t = place_in_world(torch.from_numpy(vertices))
    assert torch.allclose(placed_t, torch.from_numpy(placed)) and torch.allclose(
        center_t, torch.from_numpy(center)
    )
    assert scale_t == pytest.approx(scale)
    other = np.array([[1.0, 2.0, 0.0], [1.0, 2.0, 1.0]])
    assert np.allclose(apply_placement(other, center, scale), [[0, 0, 0], [0, 0, scale]])
    with pytest.raises(InputError):
        place_in_world(np.zeros((3, 3)))


def test_load_mesh_places_and_keeps_units_on_request(tmp_path: Path) -> None:
    path = write_obj(tmp_path / "tetra.obj", TETRA_V, TETRA_F)
    raw = load_mesh(path, place=False)
    assert np.allclose(raw.vertices.numpy(), TETRA_V)  # .obj is taken as z-up: unchanged
    placed = load_mesh(path)
    expected, _, _ = place_in_world(TETRA_V)
    assert np.allclose(placed.vertices.numpy(), expected, atol=1e-6)
    assert placed.vertices.dtype == torch.float32 and placed.faces.dtype == torch.int64
    assert np.array_equal(placed.faces.numpy(), TETRA_F)
    # computed normals point outwards: away from the centroid
    normals = placed.vertex_normals.numpy()
    outward = placed.vertices.numpy() - placed.vertices.numpy().mean(axis=0)
    assert ((normals * outward).sum(axis=-1) > 0).all()


# ---------------------------------------------------------------------------------------------- up axis


def test_gltf_is_turned_from_y_up_to_z_up(tmp_path: Path) -> None:
    gltf_vertices = TETRA_V @ WORLD_TO_GLTF.T
    trimesh.Trimesh(gltf_vertices, TETRA_F, process=False).export(tmp_path / "tetra.glb")
    world = load_mesh(tmp_path / "tetra.glb", place=False).vertices.numpy()
    # glTF (X, Y, Z) -> world (X, -Z, Y): the original world coordinates come back
    assert np.allclose(world, TETRA_V, atol=1e-6)
    assert np.allclose(load_mesh(tmp_path / "tetra.glb", up="z", place=False).vertices.numpy(), gltf_vertices)
    # and an .obj said to be y-up is turned the same way
    obj = write_obj(tmp_path / "tetra_y.obj", gltf_vertices, TETRA_F)
    assert np.allclose(load_mesh(obj, up="y", place=False).vertices.numpy(), TETRA_V, atol=1e-6)
    with pytest.raises(InputError, match="up"):
        load_mesh(obj, up="x")  # type: ignore[arg-type]


def test_glb_round_trip_of_a_textured_object(tmp_path: Path) -> None:
    directory = write_test_object(tmp_path, "mug")
    made, texture, _ = make_test_object("mug")
    gltf = made.copy()
    transform = np.eye(4)
    transform[:3, :3] = WORLD_TO_GLTF
    gltf.apply_transform(transform)  # to +Y-up, as our exporter writes glTF
    gltf.export(tmp_path / "mug.glb")

    from_obj, from_glb = load_mesh(directory), load_mesh(tmp_path / "mug.glb")
    # same geometry in the world frame (the .obj stores micrometres)
    assert from_glb.faces.shape == from_obj.faces.shape
    distance, _ = cKDTree(from_obj.vertices.numpy()).query(from_glb.vertices.numpy())
    assert distance.max() < 1e-4
    # texture present and identical; UVs agree (trimesh flips glTF's top-left UVs to OBJ's bottom-left)
    assert from_glb.texture is not None
    assert np.array_equal(from_glb.texture.numpy(), from_obj.texture.numpy())
    centroids_obj, colors_obj = face_centroid_colors(from_obj)
    centroids_glb, colors_glb = face_centroid_colors(from_glb)
    _, match = cKDTree(centroids_obj).query(centroids_glb)
    assert np.abs(colors_obj[match] - colors_glb).max() < 1e-6
    # normals agree
    _, vmatch = cKDTree(from_obj.vertices.numpy()).query(from_glb.vertices.numpy())
    dots = (from_obj.vertex_normals.numpy()[vmatch] * from_glb.vertex_normals.numpy()).sum(-1)
    assert np.median(dots) > 0.999


def test_scene_graph_transforms_are_applied(tmp_path: Path) -> None:
    scene = trimesh.Scene()
    part = trimesh.Trimesh(TETRA_V, TETRA_F, process=False)
    moved = np.eye(4)
    moved[:3, 3] = [10.0, 0.0, 0.0]
    mirrored = np.diag([-1.0, 1.0, 1.0, 1.0])  # a mirror must not turn the faces inside out
    mirrored[:3, 3] = [0.0, 10.0, 0.0]
    scene.add_geometry(part, node_name="a", geom_name="tetra")
    scene.add_geometry(part, node_name="b", geom_name="tetra", transform=moved)
    scene.add_geometry(part, node_name="c", geom_name="tetra", transform=mirrored)
    scene.export(tmp_path / "scene.glb")
    mesh = load_mesh(tmp_path / "scene.glb", up="z", place=False)
    vertices = mesh.vertices.numpy()
    assert len(vertices) == 12 and mesh.faces.shape == (12, 3)
    for expected in (TETRA_V, TETRA_V + [10.0, 0.0, 0.0], TETRA_V * [-1.0, 1.0, 1.0] + [0.0, 10.0, 0.0]):
        distance, _ = cKDTree(vertices).query(expected)
        assert distance.max() < 1e-6
    geometry = load_trimesh(tmp_path / "scene.glb", up="z", place=False)
    for component in geometry.split(only_watertight=False):
        assert component.volume > 0  # all three outward, the mirrored one included


@pytest.mark.parametrize("suffix", [".ply", ".off", ".gltf"])
def test_other_formats(tmp_path: Path, suffix: str) -> None:
    tetra = trimesh.Trimesh(
        TETRA_V @ WORLD_TO_GLTF.T if suffix == ".gltf" else TETRA_V, TETRA_F, process=False
    )
    if suffix == ".gltf":  # a .gltf document with its buffer in a side file
        for name, data in tetra.export(file_type="gltf").items():
            (tmp_path / name).write_bytes(data)
        path = tmp_path / "model.gltf"
    else:
        path = tmp_path / f"tetra{suffix}"
        tetra.export(path)
    mesh = load_mesh(path, place=False)
    distance, _ = cKDTree(mesh.vertices.numpy()).query(TETRA_V)
    assert distance.max() < 1e-6 and mesh.faces.shape == (4, 3)
    assert trimesh.Trimesh(mesh.vertices.numpy(), mesh.faces.numpy()).volume > 0


# ------------------------------------------------------------------------------------------------ colour


def test_gltf_uv_origin_and_linear_colours_follow_the_specification(tmp_path: Path) -> None:
    # a 2 x 2 texture, top row red, bottom row blue; glTF UV (0, 0) is the image's top-left corner
    image = np.array([[[255, 0, 0], [255, 0, 0]], [[0, 0, 255], [0, 0, 255]]], dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    positions = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    uvs = np.array([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75]])  # the first two in the top row
    path = write_glb(tmp_path / "uv.glb", positions, np.array([[0, 1, 2]]), uvs=uvs, png=png.getvalue())
    mesh = load_mesh(path, place=False)
    assert np.allclose(
        mesh.uvs.numpy(), [[0.25, 0.75], [0.75, 0.75], [0.25, 0.25]]
    )  # OBJ: origin bottom-left
    assert np.allclose(sample_texture(mesh, mesh.uvs.numpy()), [[1, 0, 0], [1, 0, 0], [0, 0, 1]])
    # baseColorFactor is linear: 0.214 linear is 0.5 in sRGB, the space of our textures and images
    path = write_glb(
        tmp_path / "grey.glb", positions, np.array([[0, 1, 2]]), base_color=[0.214, 0.214, 0.214, 1]
    )
    assert load_mesh(path).color == pytest.approx((0.5, 0.5, 0.5), abs=0.01)


def test_vertex_colours_beside_a_material_are_read(tmp_path: Path) -> None:
    # glTF COLOR_0 with a material (Blender's vertex paint) and OBJ `v x y z r g b` with `usemtl`: trimesh
    # keeps the colours as a vertex attribute then, and they were dropped (the material's white instead)
    positions = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    linear = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.214, 0.214, 0.214]])  # 0.214 linear: 0.5 sRGB
    path = write_glb(tmp_path / "painted.glb", positions, np.array([[0, 1, 2]]), colors=linear)
    mesh = load_mesh(path, place=False)
    assert mesh.vertex_colors is not None
    got = mesh.vertex_colors.numpy()[cKDTree(mesh.vertices.numpy()).query(positions @ Y_UP_TO_Z_UP.T)[1]]
    assert np.allclose(got, [[1, 0, 0], [0, 0, 1], [0.5, 0.5, 0.5]], atol=0.01)
    (tmp_path / "m.mtl").write_text("newmtl a\nKd 1 1 1\n")
    lines = ["mtllib m.mtl", "v 0 0 0 1 0 0", "v 1 0 0 0 1 0", "v 0 1 0 0 0 1", "usemtl a", "f 1 2 3"]
    (tmp_path / "painted.obj").write_text("\n".join(lines) + "\n")
    mesh = load_mesh(tmp_path / "painted.obj", place=False)
    got = mesh.vertex_colors.numpy()[cKDTree(mesh.vertices.numpy()).query(positions)[1]]
    assert np.allclose(got, np.eye(3), atol=0.01)


def test_a_node_scaled_to_zero_is_hidden_not_an_error(tmp_path: Path) -> None:
    # glTF hides a node by scaling it to zero; with the file's normals its inverse transform raised
    # LinAlgError, and its point at (100, 0, 0) stretched the bounding box that places the mesh
    scene = trimesh.Scene()
    part = trimesh.Trimesh(TETRA_V, TETRA_F, process=False)
    part.vertex_normals  # noqa: B018 - computed now, so the file carries normals
    hidden = np.diag([0.0, 0.0, 0.0, 1.0])
    hidden[:3, 3] = [100.0, 0.0, 0.0]
    scene.add_geometry(part, node_name="shown", geom_name="tetra")
    scene.add_geometry(part, node_name="hidden", geom_name="tetra", transform=hidden)
    scene.export(tmp_path / "hidden.glb")
    mesh = load_mesh(tmp_path / "hidden.glb", up="z", place=False)
    assert mesh.faces.shape == (4, 3) and np.abs(mesh.vertices.numpy()).max() <= np.abs(TETRA_V).max() + 1e-6
    # every node hidden: said so
    scene.graph.update("shown", matrix=np.diag([0.0, 0.0, 0.0, 1.0]))
    scene.export(tmp_path / "all_hidden.glb")
    with pytest.raises(MeshLoadError, match="all 2 mesh node"):
        load_mesh(tmp_path / "all_hidden.glb")
    # flattened into the plane y = 0: the file's normals no longer apply; the computed ones face +-y
    tilted = trimesh.Trimesh([[0.0, 0, 0], [1, 1, 0], [0, 1, 1]], [[0, 1, 2]], process=False)
    tilted.vertex_normals  # noqa: B018 - the file carries normals (1, -1, 1) / sqrt(3)
    flat = trimesh.Scene()
    flat.add_geometry(tilted, node_name="flat", geom_name="tri", transform=np.diag([1.0, 0.0, 1.0, 1.0]))
    flat.export(tmp_path / "flat.glb")
    normals = load_mesh(tmp_path / "flat.glb", up="z", place=False).normals().numpy()
    assert np.allclose(np.abs(normals[:, 1]), 1.0, atol=1e-5)


def test_ply_with_vertex_colors(tmp_path: Path) -> None:
    sphere = trimesh.creation.icosphere(subdivisions=2)
    colors = np.round((sphere.vertices * 0.5 + 0.5) * 255).astype(np.uint8)  # [N, 3] from position
    sphere.visual = trimesh.visual.ColorVisuals(sphere, vertex_colors=colors)
    sphere.export(tmp_path / "sphere.ply")
    mesh = load_mesh(tmp_path / "sphere.ply", place=False)
    assert mesh.texture is None and mesh.vertex_colors is not None
    _, match = cKDTree(sphere.vertices).query(mesh.vertices.numpy())
    assert np.allclose(mesh.vertex_colors.numpy(), colors[match] / 255.0, atol=1e-6)


def test_ply_with_face_colors(tmp_path: Path) -> None:
    tetra = trimesh.Trimesh(TETRA_V, TETRA_F, process=False)
    face_colors = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]], dtype=np.uint8)
    tetra.visual = trimesh.visual.ColorVisuals(tetra, face_colors=face_colors)
    tetra.export(tmp_path / "faces.ply")
    mesh = load_mesh(tmp_path / "faces.ply", place=False)
    # each face gets its own corners, all in its colour
    assert mesh.vertices.shape == (12, 3)
    assert np.allclose(mesh.vertex_colors.numpy()[mesh.faces.numpy()], face_colors[:, None, :] / 255.0)


def test_obj_with_only_a_kd_colour(tmp_path: Path) -> None:
    (tmp_path / "tetra.mtl").write_text("newmtl paint\nKd 0.2 0.4 0.6\n")
    path = write_obj(
        tmp_path / "tetra.obj", TETRA_V, TETRA_F, extra="usemtl paint", header="mtllib tetra.mtl"
    )
    mesh = load_mesh(path)
    assert mesh.texture is None and mesh.vertex_colors is None
    assert mesh.color == pytest.approx((0.2, 0.4, 0.6), abs=1e-6)


def test_obj_without_material_gets_the_default_colour(tmp_path: Path) -> None:
    mesh = load_mesh(write_obj(tmp_path / "tetra.obj", TETRA_V, TETRA_F))
    assert mesh.texture is None and mesh.vertex_colors is None
    assert mesh.color == Mesh(mesh.vertices, mesh.faces).color


def test_gso_texture_next_to_materials_is_found(tmp_path: Path) -> None:
    # real GSO .mtl files say `map_Kd texture.png` while the image lies in ../materials/textures/
    directory = write_test_object(tmp_path, "checker")
    mtl = directory / "meshes" / "model.mtl"
    mtl.write_text(mtl.read_text().replace("../materials/textures/texture.png", "texture.png"))
    mesh = load_mesh(directory)
    expected = np.asarray(Image.open(directory / "materials" / "textures" / "texture.png"))
    assert np.array_equal(np.round(mesh.texture.numpy() * 255).astype(np.uint8), expected)


def test_a_texture_outside_the_mesh_folder_is_read(tmp_path: Path) -> None:
    """A .gltf whose image is `../textures/t.png`: trimesh 5 refuses files outside the mesh's folder unless
    told, and the mesh came out untextured without a word (check_gltf had found the image). An OBJ's
    material library there is read as well."""
    (tmp_path / "model").mkdir()
    (tmp_path / "textures").mkdir()
    box = trimesh.creation.box()
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    box.visual = trimesh.visual.TextureVisuals(uv=rng.random((len(box.vertices), 2)), image=image)
    for name, data in box.export(file_type="gltf").items():
        (tmp_path / "model" / name).write_bytes(data)
    document = json.loads((tmp_path / "model" / "model.gltf").read_text())
    image.save(tmp_path / "textures" / "t.png")
    document["images"] = [{"uri": "../textures/t.png"}]
    (tmp_path / "model" / "model.gltf").write_text(json.dumps(document))
    mesh = load_mesh(tmp_path / "model" / "model.gltf")
    assert mesh.texture is not None and mesh.texture.shape == (8, 8, 3)  # (as linear colour)

    # the WebP source of EXT_texture_webp is the one trimesh reads: a broken one is refused, not dropped
    (tmp_path / "textures" / "t.webp").write_bytes(b"RIFF broken")
    document["images"].append({"uri": "../textures/t.webp"})
    document["textures"][0]["extensions"] = {"EXT_texture_webp": {"source": 1}}
    document["extensionsUsed"] = [*document.get("extensionsUsed", []), "EXT_texture_webp"]
    (tmp_path / "model" / "model.gltf").write_text(json.dumps(document))
    with pytest.raises(MeshLoadError, match="t.webp|image 1"):
        load_mesh(tmp_path / "model" / "model.gltf")

    directory = write_test_object(tmp_path, "checker")
    (directory / "mtl").mkdir()
    (directory / "meshes" / "model.mtl").rename(directory / "mtl" / "model.mtl")
    obj = directory / "meshes" / "model.obj"
    obj.write_text(obj.read_text().replace("mtllib model.mtl", "mtllib ../mtl/model.mtl"))
    expected = np.asarray(Image.open(directory / "materials" / "textures" / "texture.png"))
    texture = load_mesh(directory).texture
    assert np.array_equal(np.round(texture.numpy() * 255).astype(np.uint8), expected)


def test_multi_material_obj_packs_an_atlas_and_bakes_wrapped_uvs(tmp_path: Path) -> None:
    # part A: a quad textured with a 4 x 2 colour grid, its UVs running to u = 2 (one wrap)
    # part B: a quad in plain Kd red; both must end up in one texture
    grid = (
        np.array(
            [
                [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]],
                [[0, 255, 255], [255, 0, 255], [9, 9, 9], [99, 9, 9]],
            ],
            dtype=np.uint8,
        )
        .repeat(8, axis=0)
        .repeat(8, axis=1)
    )  # [16, 32, 3]
    Image.fromarray(grid).save(tmp_path / "grid.png")
    (tmp_path / "parts.mtl").write_text(
        "newmtl textured\nKd 1 1 1\nmap_Kd grid.png\nnewmtl plain\nKd 0.8 0.1 0.1\n"
    )
    (tmp_path / "parts.obj").write_text(
        "mtllib parts.mtl\n"
        "v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nv 0 0 1\nv 1 0 1\nv 1 1 1\nv 0 1 1\n"
        "vt 0 0\nvt 2 0\nvt 2 1\nvt 0 1\n"
        "usemtl textured\nf 1/1 2/2 3/3\nf 1/1 3/3 4/4\n"
        "usemtl plain\nf 5 6 7\nf 5 7 8\n"
    )
    mesh = load_mesh(tmp_path / "parts.obj", place=False)
    assert mesh.texture is not None and mesh.vertex_colors is None
    z = mesh.vertices.numpy()[:, 2]
    uv = mesh.uvs.numpy()
    assert ((uv >= 0) & (uv <= 1)).all()
    # the plain part samples its Kd
    assert np.allclose(sample_texture(mesh, uv[z == 1]), [0.8, 0.1, 0.1], atol=1 / 255)
    # the textured part: points inside it sample what the wrapped original texture shows there
    textured = mesh.faces.numpy()[(z[mesh.faces.numpy()] == 0).all(axis=1)]
    weights = np.random.default_rng(0).dirichlet(np.ones(3), size=200)  # [200, 3] barycentric
    tri = textured[np.arange(200) % len(textured)]
    positions = np.einsum("nk,nkd->nd", weights, mesh.vertices.numpy()[tri])  # [200, 3]
    atlas_uv = np.einsum("nk,nkd->nd", weights, uv[tri])
    original_uv = positions[:, :2] * [2.0, 1.0]  # the file's mapping: u = 2 x, v = y
    away_from_edges = (np.abs(np.mod(original_uv * [4, 2], 1.0) - 0.5) < 0.4).all(axis=1)
    original = np.asarray(grid, dtype=np.float64) / 255
    h, w, _ = original.shape
    ox = np.floor(np.mod(original_uv[:, 0], 1.0) * w).astype(int)
    oy = np.floor((1.0 - original_uv[:, 1]) * h).astype(int).clip(0, h - 1)
    got = sample_texture(mesh, atlas_uv)
    assert np.allclose(got[away_from_edges], original[oy, ox][away_from_edges], atol=1e-6)


# ----------------------------------------------------------------------------------------------- normals


def test_an_image_shared_by_instances_is_the_texture_once(tmp_path: Path) -> None:
    # One textured mesh on three nodes (trimesh gives each instance the same image): the image is the
    # texture as it is. Each instance took a slot of its own before, three 64² copies in a 2x-wide atlas.
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[:32, :, 0] = 255  # top half red, bottom half blue
    image[32:, :, 2] = 255
    uv = np.array(
        [[0.25, 0.75], [0.75, 0.75], [0.5, 0.25], [0.5, 0.6]]
    )  # OBJ convention; last two: blue, red
    part = trimesh.Trimesh(TETRA_V, TETRA_F, process=False)
    part.visual = trimesh.visual.TextureVisuals(uv=uv, image=Image.fromarray(image))
    scene = trimesh.Scene()
    for k in range(3):
        moved = np.eye(4)
        moved[:3, 3] = [10.0 * k, 0.0, 0.0]
        scene.add_geometry(part, node_name=f"n{k}", geom_name="tetra", transform=moved)
    scene.export(tmp_path / "instances.glb")
    part.export(tmp_path / "one.glb")
    mesh = load_mesh(tmp_path / "instances.glb", up="z", place=False)
    one = load_mesh(tmp_path / "one.glb", up="z", place=False)
    assert mesh.faces.shape == (12, 3) and mesh.texture.shape[:2] == (64, 64)
    assert torch.equal(mesh.texture, one.texture)
    own = sample_texture(one, one.uvs.numpy())  # [4, 3] red, red, blue, red (times the material's factor)
    assert own[0, 0] > 0.5 > own[0, 2] and own[2, 2] > 0.5 > own[2, 0]
    for k in range(3):  # each instance's vertices keep their colours
        at = cKDTree(mesh.vertices.numpy()).query(TETRA_V + [10.0 * k, 0.0, 0.0])[1]  # [4]
        assert np.allclose(sample_texture(mesh, mesh.uvs.numpy()[at]), own)
    # UVs that wrap (0..3) stay as they are, on the image itself (as for one part), not tiled 3x
    part.visual = trimesh.visual.TextureVisuals(uv=uv * 3.0, image=Image.fromarray(image))
    scene.geometry["tetra"] = part
    scene.export(tmp_path / "wrapped.glb")
    wrapped = load_mesh(tmp_path / "wrapped.glb", up="z", place=False)
    assert wrapped.texture.shape[:2] == (64, 64) and wrapped.uvs.numpy().max() > 2.0


def test_file_normals_are_kept_and_made_flip_consistent(tmp_path: Path) -> None:
    face_normals = trimesh.Trimesh(TETRA_V, TETRA_F, process=False).face_normals
    vn = -face_normals[[0, 1, 2, 3]] * 0.5  # one per corner index below, pointing inwards, not unit
    lines = [f"v {x} {y} {z}" for x, y, z in TETRA_V] + [f"vn {x} {y} {z}" for x, y, z in vn]
    # every corner of face k uses normal k: flat shading, but inside out
    lines += ["f " + " ".join(f"{i + 1}//{k + 1}" for i in face) for k, face in enumerate(TETRA_F)]
    (tmp_path / "flat.obj").write_text("\n".join(lines) + "\n")
    mesh = load_mesh(tmp_path / "flat.obj", place=False)
    vertices, faces, normals = mesh.vertices.numpy(), mesh.faces.numpy(), mesh.vertex_normals.numpy()
    assert len(vertices) == 12  # split per face by the distinct normals
    expected = trimesh.Trimesh(vertices, faces, process=False).face_normals  # [4, 3]
    # the file's direction, negated to agree with the winding, at unit length
    assert np.allclose(normals[faces], expected[:, None, :], atol=1e-6)


def test_computed_normals_ignore_uv_seams(tmp_path: Path) -> None:
    # the checker sphere without its `vn` lines: normals are computed, and must be radial everywhere,
    # including on the UV seam and at the poles, where vertices are split only for their UVs
    directory = write_test_object(tmp_path, "checker")
    obj = directory / "meshes" / "model.obj"
    lines = [line for line in obj.read_text().splitlines() if not line.startswith("vn ")]
    obj.write_text("\n".join(re.sub(r"(\d+)/(\d+)/\d+", r"\1/\2", line) for line in lines) + "\n")
    mesh = load_mesh(directory)
    vertices, normals = mesh.vertices.numpy(), mesh.vertex_normals.numpy()
    radial = vertices / np.linalg.norm(vertices, axis=-1, keepdims=True)
    assert (normals * radial).sum(axis=-1).min() > 0.995
    _, position_id = np.unique(vertices, axis=0, return_inverse=True)
    assert len(np.unique(position_id)) < len(vertices)  # there are split vertices
    position_id = position_id.reshape(-1)
    count = np.bincount(position_id)
    mean = np.stack([np.bincount(position_id, normals[:, k]) / count for k in range(3)], axis=-1)
    assert np.abs(normals - mean[position_id]).max() < 1e-6  # one normal per position


def test_load_trimesh_merges_seams_and_matches_load_mesh(tmp_path: Path) -> None:
    directory = write_test_object(tmp_path, "checker")
    geometry = load_trimesh(directory)
    mesh = load_mesh(directory)
    assert geometry.is_watertight  # the UV seam is merged again
    assert len(geometry.vertices) < len(mesh.vertices)
    assert np.allclose(geometry.bounds, np.stack([mesh.vertices.amin(0), mesh.vertices.amax(0)]), atol=1e-6)


def test_resolve_mesh_path(tmp_path: Path) -> None:
    directory = write_test_object(tmp_path, "plate")
    assert resolve_mesh_path(directory) == directory / "meshes" / "model.obj"
    assert resolve_mesh_path(directory / "meshes" / "model.obj") == directory / "meshes" / "model.obj"
    single = tmp_path / "single"
    single.mkdir()
    write_obj(single / "thing.obj", TETRA_V, TETRA_F)
    assert resolve_mesh_path(single) == single / "thing.obj"


# ------------------------------------------------------------------------------------------- bad input


def _bad_inputs(root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path given to load_mesh, text the message must contain besides the path)."""
    cases: dict[str, tuple[Path, str]] = {}
    cases["missing"] = (root / "nope.obj", "no such file")
    (root / "empty_dir").mkdir()
    cases["no_mesh_in_dir"] = (root / "empty_dir", "no mesh")
    (root / "mesh.stl").write_bytes(b"solid x\nendsolid x\n")
    cases["unsupported"] = (root / "mesh.stl", "unsupported")
    (root / "random.glb").write_bytes(np.random.default_rng(0).bytes(4096))
    cases["random_glb"] = (root / "random.glb", "cannot parse")
    (root / "garbage.obj").write_text("this is not\nan obj file at all\n")
    cases["garbage_obj"] = (root / "garbage.obj", "no mesh geometry")
    trimesh.PointCloud(np.random.default_rng(0).random((20, 3))).export(root / "points.ply")
    cases["point_cloud"] = (root / "points.ply", "no faces")
    write_obj(root / "nan.obj", np.array([[0.0, 0, 0], [np.nan, 0, 0], [0, 1, 0]]), np.array([[0, 1, 2]]))
    cases["nan"] = (root / "nan.obj", "NaN/inf")
    write_obj(root / "inf.obj", np.array([[0.0, 0, 0], [np.inf, 0, 0], [0, 1, 0]]), np.array([[0, 1, 2]]))
    cases["inf"] = (root / "inf.obj", "NaN/inf")
    write_obj(root / "range.obj", TETRA_V, np.array([[0, 1, 7]]))
    cases["out_of_range_obj"] = (root / "range.obj", "out of range")
    ply = trimesh.Trimesh(TETRA_V, TETRA_F, process=False)
    ply.faces[0, 0] = 0  # export valid, then corrupt the index in the binary-free ascii file
    text = trimesh.exchange.ply.export_ply(ply, encoding="ascii").decode()
    (root / "range.ply").write_text(text.replace("\n3 0 2 1\n", "\n3 0 2 9\n"))
    cases["out_of_range_ply"] = (root / "range.ply", "out of range")
    (root / "flat.obj").write_text("v 1 1 1\nv 1 1 1\nv 1 1 1\nf 1 2 3\n")
    cases["no_extent"] = (root / "flat.obj", "no extent")
    # textures: missing image, undecodable image, missing material library
    for name, mtl, png in (
        ("no_png", "map_Kd missing.png", None),
        ("bad_png", "map_Kd bad.png", b"not a png"),
    ):
        folder = root / name
        folder.mkdir()
        (folder / "m.mtl").write_text(f"newmtl a\nKd 1 1 1\n{mtl}\n")
        if png is not None:
            (folder / "bad.png").write_bytes(png)
        obj = write_obj(folder / "m.obj", TETRA_V, TETRA_F, extra="vt 0 0\nusemtl a", header="mtllib m.mtl")
        cases[name] = (obj, "texture")
    write_obj(root / "no_mtl.obj", TETRA_V, TETRA_F, header="mtllib elsewhere.mtl")
    cases["no_mtl"] = (root / "no_mtl.obj", "material library")
    # glTF that trimesh would load wrong without a word: Draco geometry (zeros), an image it cannot decode
    # (untextured), a second UV set
    triangle, one = np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]]), np.array([[0, 1, 2]])
    uvs = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    draco = {
        "extensionsUsed": ["KHR_draco_mesh_compression"],
        "extensionsRequired": ["KHR_draco_mesh_compression"],
    }
    cases["draco_glb"] = (write_glb(root / "draco.glb", triangle, one, document_extra=draco), "KHR_draco")
    png = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(png, format="PNG")
    truncated = png.getvalue()[: len(png.getvalue()) // 2]
    cases["bad_png_glb"] = (
        write_glb(root / "bad.glb", triangle, one, uvs, truncated),
        "image 0 cannot be decoded",
    )
    second = write_glb(root / "uv1.glb", triangle, one, uvs, png.getvalue(), texture_info={"texCoord": 1})
    cases["texcoord_glb"] = (second, "texCoord 1")
    return cases


BAD_CASES = (
    "missing no_mesh_in_dir unsupported random_glb garbage_obj point_cloud nan inf out_of_range_obj "
    "out_of_range_ply no_extent no_png bad_png no_mtl draco_glb bad_png_glb texcoord_glb"
).split()


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_raises_one_line_naming_the_file(
    tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture, monkeypatch
) -> None:
    monkeypatch.setattr(sv3d.gltf_check, "_draco_readable", lambda: False)  # as without DracoPy
    path, reason = _bad_inputs(tmp_path)[case]
    caplog.set_level(logging.DEBUG, logger="trimesh")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(MeshLoadError) as info:
            load_mesh(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    assert reason in message
    # trimesh's own noise about the file is silenced
    assert not [r for r in caplog.records if r.name.startswith("trimesh")]
    assert not caught
    if case not in (
        "no_png",
        "bad_png",
        "no_mtl",
        "bad_png_glb",
        "texcoord_glb",
    ):  # geometry only: no textures
        with pytest.raises(MeshLoadError):
            load_trimesh(path)


def test_gltf_that_trimesh_would_read_wrong_is_refused_and_the_rest_loads(tmp_path: Path) -> None:
    triangle, one = np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]]), np.array([[0, 1, 2]])
    uvs = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    png = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8)).save(png, format="PNG")
    shift = {"KHR_texture_transform": {"offset": [0.5, 0.0]}}
    identity = {"KHR_texture_transform": {"offset": [0, 0], "scale": [1, 1]}}
    instanced = {"nodes": [{"mesh": 0, "extensions": {"EXT_mesh_gpu_instancing": {"attributes": {}}}}]}
    refused = {
        "shifted texture": ({"texture_info": {"extensions": shift}}, "KHR_texture_transform"),
        "byte UVs": ({"normalized_uvs": True}, "integer TEXCOORD_0"),
        "meshopt": ({"document_extra": {"extensionsRequired": ["EXT_meshopt_compression"]}}, "meshopt"),
        "instancing": ({"document_extra": instanced}, "EXT_mesh_gpu_instancing"),
    }
    for name, (extra, reason) in refused.items():
        path = write_glb(tmp_path / f"{name}.glb", triangle, one, uvs, png.getvalue(), **extra)
        with pytest.raises(MeshLoadError, match=reason):
            load_mesh(path)
    # geometry only: the textures' problems do not matter
    load_trimesh(tmp_path / "byte UVs.glb")
    load_trimesh(tmp_path / "shifted texture.glb")
    # an identity transform, and a broken image that only a normal map uses (trimesh reads base colour only)
    path = write_glb(
        tmp_path / "identity.glb", triangle, one, uvs, png.getvalue(), texture_info={"extensions": identity}
    )
    assert load_mesh(path).texture is not None
    path = write_glb(tmp_path / "normal.glb", triangle, one, uvs, png.getvalue())
    _add_normal_map(path, b"not an image")
    assert load_mesh(path).texture is not None


def _add_normal_map(path: Path, data: bytes) -> None:
    """Append an image of `data` to a `write_glb` file, used by the material as its normal map only."""
    raw = path.read_bytes()
    length = struct.unpack_from("<I", raw, 12)[0]
    document = json.loads(raw[20 : 20 + length])
    blob = raw[20 + length + 8 :]
    document["bufferViews"].append({"buffer": 0, "byteOffset": len(blob), "byteLength": len(data)})
    blob += data + b"\0" * (-len(data) % 4)
    document["buffers"][0]["byteLength"] = len(blob)
    document["images"].append({"bufferView": len(document["bufferViews"]) - 1, "mimeType": "image/png"})
    document["textures"].append({"source": len(document["images"]) - 1})
    document["materials"][0]["normalTexture"] = {"index": len(document["textures"]) - 1}
    text = json.dumps(document).encode()
    text += b" " * (-len(text) % 4)
    body = struct.pack("<I4s", len(text), b"JSON") + text + struct.pack("<I4s", len(blob), b"BIN\0") + blob
    path.write_bytes(struct.pack("<4sII", b"glTF", 2, 12 + len(body)) + body)


def test_more_faces_than_the_rasterizer_takes_is_one_line(tmp_path: Path, monkeypatch) -> None:
    """Triangle ids travel as float32 through the rasterizer: a mesh beyond 2^24 - 1 faces is refused
    when read (shown here with the limit lowered to 3 for a 4-face tetrahedron)."""
    import sv3d.meshio as meshio

    path = write_obj(tmp_path / "t.obj", TETRA_V, TETRA_F)
    load_mesh(path)
    monkeypatch.setattr(meshio, "MAX_FACES", 3)
    for load in (load_mesh, load_trimesh):
        with pytest.raises(MeshLoadError, match="4 faces, more than the 3 we render: decimate it"):
            load(path)
