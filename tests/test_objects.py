"""The generated test objects: each loads into the radius-0.5 world and has the property it exists for."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from sv3d.errors import InputError
from sv3d.meshio import load_mesh, load_trimesh
from sv3d.testing.objects import TEST_OBJECTS, make_test_object, write_test_object, write_test_objects

TEXTURED = {"bowl", "mug", "checker"}


@pytest.fixture(scope="module")
def objects(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_test_objects(tmp_path_factory.mktemp("objects"))


def test_names() -> None:
    assert TEST_OBJECTS == ("bowl", "mug", "plate", "checker", "blob", "internal")


def test_gso_layout(objects: dict[str, Path]) -> None:
    for name, directory in objects.items():
        assert directory.name == name
        assert (directory / "meshes" / "model.obj").is_file()
        mtl = (directory / "meshes" / "model.mtl").read_text()
        texture = directory / "materials" / "textures" / "texture.png"
        assert texture.is_file() == (name in TEXTURED)
        assert ("map_Kd ../materials/textures/texture.png" in mtl) == (name in TEXTURED)


@pytest.mark.parametrize("name", TEST_OBJECTS)
def test_loads_into_world(objects: dict[str, Path], name: str) -> None:
    mesh = load_mesh(objects[name])
    vertices = mesh.vertices.double()
    # placement: bounding box centred at the origin, bounding sphere of radius 0.5
    assert vertices.norm(dim=-1).max().item() == pytest.approx(0.5, abs=1e-6)
    center = (vertices.amin(dim=0) + vertices.amax(dim=0)) / 2
    assert center.abs().max().item() < 1e-6
    assert 0 < mesh.faces.shape[0] <= 20_000
    assert mesh.vertex_normals is not None
    assert np.allclose(mesh.vertex_normals.norm(dim=-1).numpy(), 1.0, atol=1e-5)
    _, texture, color = make_test_object(name)
    if name in TEXTURED:
        # the file's texture arrives unchanged (single part: no atlas)
        assert mesh.texture is not None and mesh.uvs is not None
        assert np.array_equal(np.round(mesh.texture.numpy() * 255).astype(np.uint8), np.asarray(texture))
    elif name == "internal":
        assert mesh.vertex_colors is not None
        assert len(np.unique(mesh.vertex_colors.numpy().round(5), axis=0)) == 3
    else:
        assert mesh.texture is None and mesh.vertex_colors is None
        assert mesh.color == pytest.approx(color, abs=1e-6)


@pytest.mark.parametrize("name", TEST_OBJECTS)
def test_closed_outward_and_consistent(objects: dict[str, Path], name: str) -> None:
    mesh = load_trimesh(objects[name])
    assert mesh.is_watertight and mesh.is_winding_consistent
    for component in mesh.split(only_watertight=False):
        assert component.volume > 0  # outward winding
    # the returned mesh matches the file (the writer rounds to micrometres)
    made, _, _ = make_test_object(name)
    made_merged = trimesh.Trimesh(made.vertices, made.faces, process=True)
    assert len(mesh.faces) == len(made.faces)
    assert abs(mesh.euler_number - made_merged.euler_number) == 0


def test_mug_has_genus_one(objects: dict[str, Path]) -> None:
    mug = load_trimesh(objects["mug"])
    assert len(mug.split(only_watertight=False)) == 1 and mug.is_watertight
    # closed orientable surface: Euler characteristic V - E + F = 2 - 2 g
    genus = (2 - mug.euler_number) // 2
    assert genus == 1
    # and the handle really stands out of the cup: bounding box wider in x than in y
    extents = mug.bounding_box.extents
    assert extents[0] > 1.3 * extents[1]


def test_bowl_is_concave(objects: dict[str, Path]) -> None:
    bowl = load_trimesh(objects["bowl"])
    assert bowl.convex_hull.volume > 4 * bowl.volume  # a 5 mm shell of an 8 cm hemisphere
    # looking straight down the axis, the first surface is the inside floor, near the bottom
    low, high = bowl.bounds[0, 2], bowl.bounds[1, 2]
    hits, _, _ = bowl.ray.intersects_location([[0.0, 0.0, 2.0]], [[0.0, 0.0, -1.0]])
    first = hits[:, 2].max()
    assert first < low + 0.1 * (high - low)


def test_plate_is_thin(objects: dict[str, Path]) -> None:
    extents = load_trimesh(objects["plate"]).bounding_box.extents
    assert extents[0] == pytest.approx(extents[1], rel=1e-3)
    assert 0.02 <= extents[2] / extents[0] <= 0.03  # 6 mm on 26 cm


def test_checker_texture_is_high_frequency(objects: dict[str, Path]) -> None:
    texture = np.asarray(Image.open(objects["checker"] / "materials" / "textures" / "texture.png"))
    assert texture.shape[0] >= 512 and texture.shape[1] >= 512
    gray = texture.astype(np.float64).mean(axis=-1)
    # 32 cycles (64 squares, 63 edges) along every row, 16 cycles (31 edges) down every column
    assert (np.abs(np.diff(gray, axis=1)) > 50).sum(axis=1).min() >= 63
    assert (np.abs(np.diff(gray, axis=0)) > 50).sum(axis=0).min() >= 31
    # and most of the (non-constant) energy lies at 16 cycles per width or more
    spectrum = np.abs(np.fft.fft2(gray - gray.mean())) ** 2
    freq = np.abs(np.fft.fftfreq(gray.shape[0]) * gray.shape[0])
    high = (freq[:, None] >= 16) | (freq[None, :] >= 16)
    assert spectrum[high].sum() > 0.9 * spectrum.sum()


def test_blob_is_smooth_plain_and_non_convex(objects: dict[str, Path]) -> None:
    blob = load_trimesh(objects["blob"])
    assert blob.convex_hull.volume > 1.1 * blob.volume
    # smooth, no creases: neighbouring faces bend by < 25 degrees (a box edge would be 90)
    assert np.degrees(blob.face_adjacency_angles.max()) < 25
    mesh = load_mesh(objects["blob"])
    assert mesh.texture is None and mesh.vertex_colors is None


def test_internal_faces_are_enclosed_and_hidden(objects: dict[str, Path]) -> None:
    mesh = load_trimesh(objects["internal"])
    parts = sorted(mesh.split(only_watertight=False), key=lambda m: -m.volume)
    assert len(parts) == 3
    outer, inner = parts[0], parts[1:]
    for part in inner:
        assert outer.contains(part.vertices).all()  # fully enclosed
    # rays from a sphere around the object towards points near the centre hit the outer shell first
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(500, 3))
    directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
    origins = 2.0 * directions
    targets = rng.uniform(-0.2, 0.2, size=(500, 3))
    index = mesh.ray.intersects_first(origins, targets - origins)
    assert (index >= 0).all()
    outer_faces = {tuple(f) for f in np.sort(outer.vertices[outer.faces].round(6).reshape(-1, 9), axis=1)}
    hit = np.sort(mesh.vertices[mesh.faces[index]].round(6).reshape(-1, 9), axis=1)
    assert all(tuple(f) in outer_faces for f in hit)
    # and the inner parts carry their own colours, so a leak would show in renders
    colors = load_mesh(objects["internal"]).vertex_colors.numpy()
    assert len(np.unique(colors.round(5), axis=0)) == 3


def test_writing_is_deterministic_and_skips_identical_files(tmp_path: Path) -> None:
    first = write_test_objects(tmp_path / "a", names=["mug", "internal"])
    second = write_test_objects(tmp_path / "b", names=["mug", "internal"])
    for name in first:
        files_a = sorted(p.relative_to(first[name]) for p in first[name].rglob("*") if p.is_file())
        files_b = sorted(p.relative_to(second[name]) for p in second[name].rglob("*") if p.is_file())
        assert files_a == files_b
        for rel in files_a:
            assert (first[name] / rel).read_bytes() == (second[name] / rel).read_bytes()
    obj = first["mug"] / "meshes" / "model.obj"
    stamp = obj.stat().st_mtime_ns
    assert write_test_object(tmp_path / "a", "mug") == first["mug"]
    assert obj.stat().st_mtime_ns == stamp  # identical: left untouched
    obj.write_text("stale")
    write_test_object(tmp_path / "a", "mug")
    assert obj.read_bytes() == (second["mug"] / "meshes" / "model.obj").read_bytes()


def test_unknown_object_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="teapot"):
        make_test_object("teapot")
    with pytest.raises(InputError, match="teapot"):
        write_test_object(tmp_path, "teapot")
