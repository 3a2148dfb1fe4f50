"""`sv3d render-orbit` as a user runs it: outputs, agreement with ray casting, and bad input."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh

from sv3d.cameras import read_orbit_directory
from sv3d.cli import main
from sv3d.meshio import load_trimesh
from sv3d.testing.objects import write_test_object


@pytest.fixture(scope="module")
def objects(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("objects")
    for name in ("mug", "plate", "checker"):
        write_test_object(root, name)
    return root


def ray_cast_masks(mesh: trimesh.Trimesh, c2w: np.ndarray, fov_deg: float, res: int) -> np.ndarray:
    """[V, res, res] hit masks from the cameras of a transforms.json, by embree (independent of ours)."""
    from trimesh.ray.ray_pyembree import RayMeshIntersector

    caster = RayMeshIntersector(mesh)
    tan_half = math.tan(math.radians(fov_deg) / 2)
    centres = (np.arange(res) + 0.5) / res * 2 - 1
    xs, ys = np.meshgrid(centres, -centres)  # row 0 = top
    dirs_cam = np.stack([xs * tan_half, ys * tan_half, -np.ones_like(xs)], -1).reshape(-1, 3)
    masks = []
    for m in c2w:
        dirs = dirs_cam @ m[:3, :3].T
        hit = caster.intersects_any(np.broadcast_to(m[:3, 3], dirs.shape), dirs)
        masks.append(hit.reshape(res, res))
    return np.stack(masks)


@pytest.mark.parametrize("name,orbit", [("mug", "static"), ("plate", "sine")])
def test_render_orbit_silhouettes_match_ray_casting(objects: Path, tmp_path: Path, name: str, orbit: str):
    pytest.importorskip("embreex")
    out = tmp_path / "orbit"
    assert (
        main(["render-orbit", str(objects / name), "-o", str(out), "--resolution", "128", "--orbit", orbit])
        == 0
    )
    frames = read_orbit_directory(out)
    assert frames.alpha_source == "render" and frames.images.shape == (21, 128, 128, 4)
    # Frame order: the last frame is the input view (azimuth 0 at elevation 10).
    assert abs(float(frames.orbit.elevations_deg[-1]) - 10.0) < 1e-9
    assert abs(float(frames.orbit.azimuths_deg[-1]) % 360.0) < 1e-9
    # Silhouettes from the cameras in transforms.json, ray cast against the same placed mesh.
    mesh = load_trimesh(objects / name)
    ref = ray_cast_masks(mesh, frames.orbit.c2w_float64().numpy(), frames.orbit.fov_deg, 128)
    ours = frames.images[..., 3].numpy() > 0.5
    iou = (ours & ref).sum() / (ours | ref).sum()
    assert iou >= 0.99, iou


def test_unlit_renders_albedo_and_lambert_shades_it(objects: Path, tmp_path: Path):
    for shading in ("unlit", "lambert"):
        assert (
            main(
                [
                    "render-orbit",
                    str(objects / "plate"),
                    "-o",
                    str(tmp_path / shading),
                    "--resolution",
                    "96",
                    "--shading",
                    shading,
                    "--views",
                    "4",
                ]
            )
            == 0
        )
    unlit, lit = (read_orbit_directory(tmp_path / s) for s in ("unlit", "lambert"))
    inside = (unlit.images[..., 3] > 0.999) & (lit.images[..., 3] > 0.999)
    # The plate has one plain material colour: unlit frames show exactly that colour everywhere...
    colours = unlit.images[..., :3][inside]
    assert (colours - colours[0]).abs().max() < 2 / 255
    # ...and Lambert shading only darkens it, by a factor in [ambient, 1], and varies over the surface.
    ratio = lit.images[..., :3][inside] / colours.clamp(min=1e-3)
    assert ratio.max() <= 1.0 + 2 / 255 / colours.min() and ratio.min() >= 0.3
    assert len(unlit.orbit) == 4


BAD_INPUTS = {
    "missing file": lambda d: d / "nope.obj",
    "corrupt file": lambda d: _write(d / "bad.glb", b"\x00\x01garbage" * 100),
    "no faces": lambda d: _write(d / "points.obj", b"v 0 0 0\nv 1 0 0\nv 0 1 0\n"),
    "nan vertices": lambda d: _write(d / "nan.obj", b"v 0 0 0\nv nan 0 0\nv 0 1 0\nf 1 2 3\n"),
    "missing texture": lambda d: _missing_texture(d),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _missing_texture(d: Path) -> Path:
    (d / "m.mtl").write_text("newmtl a\nKd 1 1 1\nmap_Kd textures/absent.png\n")
    return _write(
        d / "m.obj",
        b"mtllib m.mtl\nusemtl a\nv 0 0 0\nv 1 0 0\nv 0 1 0\nvt 0 0\nvt 1 0\nvt 0 1\nf 1/1 2/2 3/3\n",
    )


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_one_line_error_and_creates_nothing(tmp_path: Path, case: str):
    src = tmp_path / "src"
    src.mkdir()
    mesh_path = BAD_INPUTS[case](src)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "sv3d", "render-orbit", str(mesh_path), "-o", str(out), "--resolution", "32"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sv3d: error: "), proc.stderr
    assert mesh_path.name in lines[0]
    assert not out.exists()


def test_output_directory_that_holds_something_is_refused(objects: Path, tmp_path: Path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["render-orbit", str(objects / "plate"), "-o", str(out), "--resolution", "32"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
