"""Tests for sv3d/cameras.py: camera conventions, SV3D orbits and orbit directories.

Hand-derived values are written in comments next to the assertions. The SV3D_p angles are checked
against the fixture `../shared/fixtures/sv3d_tiny/ref_sv3d_p.json`, recorded by running the original
reference code.
"""

from __future__ import annotations

import copy
import json
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import png
import pytest
import torch
from PIL import Image

import sv3d.cameras as cams
from refine.camera import Cameras, transform_points
from sv3d.cameras import (
    CAMERA_RADIUS,
    FAR,
    FOV_DEG,
    NEAR,
    NUM_FRAMES,
    OBJECT_RADIUS,
    SINE_AMPLITUDE_DEG,
    Orbit,
    OrbitFrames,
    angles_from_c2w,
    c2w_from_angles,
    explicit_orbit,
    focal_from_fov,
    intrinsics,
    make_orbit,
    projection_from_fov,
    read_orbit_directory,
    read_transforms,
    sine_orbit,
    static_orbit,
    write_orbit_directory,
    write_transforms,
)
from sv3d.errors import InputError, OrbitDirectoryError


def fixtures_dir() -> Path:
    """`../shared/fixtures` beside the checkout (tests/ -> checkout -> its parent), or $SV3D_FIXTURES."""
    return Path(
        os.environ.get("SV3D_FIXTURES") or Path(__file__).resolve().parents[2] / "shared" / "fixtures"
    )


def _to_ndc(points: torch.Tensor, orbit: Orbit) -> torch.Tensor:
    """World points [N, 3] -> NDC [V, N, 3] through the orbit's cameras."""
    clip = transform_points(points.to(torch.float64), orbit.cameras().world_to_clip().to(torch.float64))
    return clip[..., :3] / clip[..., 3:]  # [V, N, 3]


def _random_rgba(v: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(v, size, size, 4, generator=g)  # [V, H, W, 4]


# ------------------------------------------------------------------------------------------------
# Constants and angles <-> matrices
# ------------------------------------------------------------------------------------------------


def test_constants() -> None:
    assert (FOV_DEG, CAMERA_RADIUS, NUM_FRAMES, OBJECT_RADIUS) == (33.8, 2.0, 21, 0.5)
    assert (NEAR, FAR, SINE_AMPLITUDE_DEG) == (0.1, 10.0, 20.0)


def test_c2w_accepts_numbers_sequences_arrays_tensors() -> None:
    assert c2w_from_angles(10.0, 30.0).shape == (1, 4, 4)
    assert c2w_from_angles(10.0, 30.0).dtype == torch.float32
    assert c2w_from_angles([10, 20, 30], [0, 1, 2]).shape == (3, 4, 4)
    assert c2w_from_angles(np.array([10.0, 20.0]), 5.0).dtype == torch.float64  # float64 in, float64 out
    assert c2w_from_angles(torch.tensor([1.0]), torch.tensor([2.0])).dtype == torch.float32
    assert c2w_from_angles(torch.tensor([1.0], dtype=torch.float64), 2.0).dtype == torch.float64
    with pytest.raises(InputError):
        c2w_from_angles(10.0, 0.0, radius=0.0)
    with pytest.raises(InputError):
        c2w_from_angles(float("nan"), 0.0)


def test_c2w_hand_values() -> None:
    # e = 0, a = 90: camera at 2 * (0, 1, 0); x axis (-1, 0, 0); y axis +z; z axis (back) = +y.
    m = c2w_from_angles(0.0, 90.0).double()[0]
    expected = torch.tensor(
        [[-1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 2.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]],
        dtype=torch.float64,
    )
    torch.testing.assert_close(m, expected, atol=1e-7, rtol=0)
    # e = 30, a = 0: centre 2 * (cos 30, 0, sin 30) = (1.7320508, 0, 1)
    m = c2w_from_angles(30.0, 0.0, 2.0).double()[0]
    torch.testing.assert_close(m[:3, 3], torch.tensor([math.sqrt(3.0), 0.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cameras_look_at_origin_and_are_upright(dtype: torch.dtype) -> None:
    e = torch.linspace(-89.5, 89.5, 41, dtype=dtype)
    a = torch.linspace(-720.0, 720.0, 41, dtype=dtype)
    m = c2w_from_angles(e, a, torch.tensor(1.7, dtype=dtype))  # [41, 4, 4]
    rot, centre = m[:, :3, :3].double(), m[:, :3, 3].double()
    eye = torch.eye(3, dtype=torch.float64).expand(41, 3, 3)
    torch.testing.assert_close(rot.transpose(1, 2) @ rot, eye, atol=1e-6, rtol=0)  # orthonormal
    torch.testing.assert_close(torch.linalg.det(rot), torch.ones(41, dtype=torch.float64))  # right-handed
    forward = -rot[:, :, 2]  # the camera looks along its -z axis
    torch.testing.assert_close(forward, -centre / centre.norm(dim=-1, keepdim=True), atol=1e-6, rtol=0)
    assert bool((rot[:, 2, 1] > 0).all())  # the up (y) axis has a positive world-z component
    assert bool((rot[:, 2, 0].abs() < 1e-6).all())  # no roll: the x axis is horizontal


@pytest.mark.parametrize("elevation", [90.0, -90.0])
def test_poles_are_finite_and_look_at_origin(elevation: float) -> None:
    m = c2w_from_angles([elevation] * 3, [0.0, 45.0, 200.0]).double()  # [3, 4, 4]
    assert bool(torch.isfinite(m).all())
    rot, centre = m[:, :3, :3], m[:, :3, 3]
    torch.testing.assert_close(rot.transpose(1, 2) @ rot, torch.eye(3, dtype=torch.float64).expand(3, 3, 3))
    torch.testing.assert_close(-rot[:, :, 2], -centre / 2.0, atol=1e-7, rtol=0)
    # at the pole the x axis still follows the azimuth: (-sin a, cos a, 0)
    a = torch.deg2rad(torch.tensor([0.0, 45.0, 200.0], dtype=torch.float64))
    torch.testing.assert_close(rot[:, :, 0], torch.stack([-a.sin(), a.cos(), torch.zeros(3)], -1).double())


def test_angle_round_trip_including_poles() -> None:
    g = torch.Generator().manual_seed(1)
    e = torch.cat(
        [
            torch.rand(200, generator=g, dtype=torch.float64) * 178 - 89,
            torch.tensor([89.999, -89.999, 90, -90]),
        ]
    ).double()
    a = torch.rand(204, generator=g, dtype=torch.float64) * 360.0
    r = 0.5 + torch.rand(204, generator=g, dtype=torch.float64) * 3.0
    e2, a2, r2 = angles_from_c2w(c2w_from_angles(e, a, r))
    assert e2.dtype == torch.float64
    torch.testing.assert_close(e2, e, atol=1e-9, rtol=0)
    torch.testing.assert_close(r2, r, atol=1e-12, rtol=1e-12)
    d_az = torch.remainder(a2 - a + 180.0, 360.0) - 180.0
    assert float(d_az.abs().max()) < 1e-6
    assert bool(((a2 >= 0) & (a2 < 360)).all())
    # float32 matrices: looser, still well below a hundredth of a degree
    e3, a3, _ = angles_from_c2w(c2w_from_angles(e.float(), a.float(), r.float()))
    assert e3.dtype == torch.float32
    assert float((e3.double() - e).abs().max()) < 1e-3
    assert float((torch.remainder(a3.double() - a + 180.0, 360.0) - 180.0).abs().max()) < 1e-3


def test_azimuth_wraps_to_0_360() -> None:
    _, a, _ = angles_from_c2w(c2w_from_angles(np.array([0.0, 0.0, 0.0]), np.array([-30.0, 360.0, 725.0])))
    torch.testing.assert_close(a, torch.tensor([330.0, 0.0, 5.0], dtype=torch.float64), atol=1e-9, rtol=0)
    # a tiny negative angle must not round up to 360 (float remainder does): [0, 360) holds strictly
    wrapped = cams._wrap_360(torch.tensor([-1e-14, -360.0, 359.5], dtype=torch.float64))
    assert bool((wrapped >= 0).all() & (wrapped < 360).all())
    assert float(wrapped[1]) == 0.0 and float(wrapped[2]) == 359.5
    with pytest.raises(InputError):
        angles_from_c2w(torch.zeros(2, 3, 4))


# ------------------------------------------------------------------------------------------------
# Intrinsics and projection
# ------------------------------------------------------------------------------------------------


def test_focal_hand_value() -> None:
    # 576 px over 33.8 deg: 288 / tan(16.9 deg) = 288 / 0.303823 = 947.92
    assert focal_from_fov(33.8, 576) == pytest.approx(288.0 / math.tan(math.radians(16.9)))
    assert focal_from_fov(33.8, 576) == pytest.approx(947.92, abs=0.01)
    assert focal_from_fov(90.0, 100) == pytest.approx(50.0)  # tan(45) = 1
    with pytest.raises(InputError):
        focal_from_fov(180.0, 100)


def test_projection_depth_range() -> None:
    p = projection_from_fov(FOV_DEG).double()
    for distance, expected in ((NEAR, -1.0), (FAR, 1.0)):
        clip = p @ torch.tensor([0.0, 0.0, -distance, 1.0], dtype=torch.float64)
        assert float(clip[2] / clip[3]) == pytest.approx(expected, abs=1e-6)
    with pytest.raises(InputError):
        projection_from_fov(FOV_DEG, near=1.0, far=0.5)


def test_origin_projects_to_image_centre() -> None:
    orbit = explicit_orbit([0.0, 25.0, -40.0, 89.0], [0.0, 100.0, 250.0, 33.0])
    ndc = _to_ndc(torch.zeros(1, 3), orbit)  # [V, 1, 3]
    torch.testing.assert_close(ndc[..., :2], torch.zeros(4, 1, 2, dtype=torch.float64), atol=1e-6, rtol=0)
    k = intrinsics(FOV_DEG, 576, 576)
    assert (float(k[0, 2]), float(k[1, 2])) == (288.0, 288.0)  # pixel centres at i + 0.5: centre = W / 2


def test_intrinsics_agree_with_projection() -> None:
    width = height = 64
    g = torch.Generator().manual_seed(2)
    p_cam = torch.rand(500, 3, generator=g, dtype=torch.float64) * 2 - 1  # OpenGL camera frame
    p_cam[:, 2] = -(0.5 + 3 * torch.rand(500, generator=g, dtype=torch.float64))  # in front: z < 0
    # via the projection matrix and the NDC -> pixel rule (row 0 at the top)
    clip = (
        torch.cat([p_cam, torch.ones(500, 1, dtype=torch.float64)], -1)
        @ projection_from_fov(FOV_DEG, dtype=torch.float64).T
    )
    ndc = clip[:, :3] / clip[:, 3:]
    pix_gl = torch.stack([(ndc[:, 0] + 1) / 2 * width, (1 - ndc[:, 1]) / 2 * height], -1)
    # via K in the OpenCV frame (y down, z forward)
    p_cv = p_cam * torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64)
    uvw = p_cv @ intrinsics(FOV_DEG, width, height, dtype=torch.float64).T
    pix_cv = uvw[:, :2] / uvw[:, 2:]
    torch.testing.assert_close(pix_gl, pix_cv, atol=1e-9, rtol=0)


def test_bounding_sphere_fills_85_percent_of_half_width() -> None:
    # A sphere of radius 0.5 seen from distance 2 subtends asin(0.25) = 14.48 deg off-axis; its silhouette
    # lands at tan(14.48 deg) / tan(16.9 deg) = 0.2582 / 0.3038 = 0.850 of the half-width (ARCHITECTURE.md).
    expected = math.tan(math.asin(OBJECT_RADIUS / CAMERA_RADIUS)) / math.tan(math.radians(FOV_DEG / 2))
    assert expected == pytest.approx(0.850, abs=0.001)
    n = 20000  # Fibonacci sphere: nearly uniform points on the bounding sphere
    i = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1 - 2 * i / n
    phi = math.pi * (1 + 5**0.5) * i
    pts = OBJECT_RADIUS * torch.stack([(1 - z**2).sqrt() * phi.cos(), (1 - z**2).sqrt() * phi.sin(), z], -1)
    for orbit in (static_orbit(10.0), sine_orbit(10.0, 40.0), explicit_orbit([-60.0, 85.0], [10.0, 300.0])):
        ndc = _to_ndc(pts, orbit)  # [V, N, 3]
        radial = ndc[..., :2].norm(dim=-1)  # [V, N]
        assert float(radial.max()) <= expected + 1e-6  # never beyond the silhouette (float32 matrices)
        assert float(radial.max()) > expected - 0.005  # and the silhouette is reached
        assert float(ndc[..., :2].abs().max()) < 0.86  # inside the frame with a 15% margin
        assert bool(((ndc[..., 2] > -1) & (ndc[..., 2] < 1)).all())  # between near and far


# ------------------------------------------------------------------------------------------------
# Orbits
# ------------------------------------------------------------------------------------------------


def test_static_orbit_frame_order() -> None:
    orbit = static_orbit(elevation_deg=12.0, input_azimuth_deg=250.0)
    assert len(orbit) == NUM_FRAMES and orbit.kind == "static"
    torch.testing.assert_close(orbit.elevations_deg, torch.full((21,), 12.0, dtype=torch.float64))
    assert float(orbit.azimuths_deg[-1]) == pytest.approx(250.0, abs=1e-12)  # last frame = input view
    assert float(orbit.azimuths_deg[0]) == pytest.approx(250.0 + 360.0 / 21)  # 267.142857...
    assert float(orbit.azimuths_deg[7]) == pytest.approx((250.0 + 8 * 360.0 / 21) % 360)  # 7.142857 (wrapped)
    polar, azimuth = orbit.model_conditioning()
    torch.testing.assert_close(polar, torch.full((21,), math.radians(78.0), dtype=torch.float64))
    expected = torch.arange(1, 22, dtype=torch.float64) * (2 * math.pi / 21)
    expected[-1] = 0.0  # the input view is the reference: 0
    torch.testing.assert_close(azimuth, expected)
    # relative azimuths do not depend on the input azimuth
    torch.testing.assert_close(static_orbit(12.0, 0.0).model_conditioning()[1], azimuth)


def test_azimuth_direction_is_counter_clockwise() -> None:
    """Pins the convention argued in sv3d/cameras.py "Azimuth direction"."""
    orbit = static_orbit(10.0, 30.0)
    centres = orbit.c2w().double()[:, :3, 3]  # [V, 3]
    # frame k + 1 is counter-clockwise from frame k seen from +z: (c_k x c_k+1) . z > 0
    turn = torch.linalg.cross(centres[:-1], centres[1:])[:, 2]
    assert bool((turn > 0).all())
    _, azimuth = orbit.model_conditioning()
    assert bool((azimuth[1:-1] > azimuth[:-2]).all())  # what the model sees increases frame by frame
    # the camera moves to its own right (its x axis), so a point on the object's near side slides left
    right = orbit.c2w().double()[:-1, :3, 0]
    assert bool(((centres[1:] - centres[:-1]) * right).sum(-1).gt(0).all())
    front_point = 0.4 * centres[0:1] / centres[0].norm()  # on the object, facing frame 0's camera
    ndc = _to_ndc(front_point.float(), orbit)[:, 0, 0]  # [V] NDC x
    assert float(ndc[1]) < float(ndc[0])  # moves towards the image's left


def test_sine_orbit() -> None:
    orbit = sine_orbit(elevation_deg=10.0, input_azimuth_deg=0.0)
    assert orbit.kind == "sine"
    e = orbit.elevations_deg
    assert float(e[-1]) == 10.0  # last frame: sin(2 pi) = 0, exactly the input elevation
    assert float(e[0]) == pytest.approx(10.0 + 20.0 * math.sin(2 * math.pi / 21))  # 15.895
    k = torch.arange(21, dtype=torch.float64)
    torch.testing.assert_close(e, 10.0 + 20.0 * torch.sin(2 * math.pi * (k + 1) / 21), atol=1e-12, rtol=0)
    assert float(e.abs().max()) <= 30.0  # 10 + 20 sin(2 pi 5/21) = 29.94
    torch.testing.assert_close(orbit.azimuths_deg, static_orbit(10.0).azimuths_deg)
    polar, _ = orbit.model_conditioning()
    torch.testing.assert_close(polar, torch.deg2rad(90.0 - e))
    with pytest.raises(InputError, match="30"):
        sine_orbit(elevation_deg=15.0)  # reaches 34.9 deg
    assert float(sine_orbit(-10.0).elevations_deg.min()) >= -30.0


def test_make_orbit_and_validation() -> None:
    assert make_orbit("static").kind == "static"
    assert make_orbit("sine", 5.0, 90.0).kind == "sine"
    with pytest.raises(InputError, match="spiral"):
        make_orbit("spiral")
    with pytest.raises(InputError):
        explicit_orbit([0.0, 1.0], [0.0])  # lengths differ
    with pytest.raises(InputError):
        explicit_orbit([0.0, float("nan")], [0.0, 1.0])
    with pytest.raises(InputError):
        explicit_orbit([90.0], [0.0])  # |e| must be < 90
    with pytest.raises(InputError):
        explicit_orbit([10.0], [0.0], radius=-1.0)
    with pytest.raises(InputError):
        Orbit(torch.zeros(2), torch.zeros(2), kind="drunk")


def test_orbit_cameras() -> None:
    orbit = static_orbit()
    cameras = orbit.cameras()
    assert isinstance(cameras, Cameras) and len(cameras) == 21
    assert cameras.c2w.dtype == torch.float32
    torch.testing.assert_close(cameras.projection, projection_from_fov(FOV_DEG))
    torch.testing.assert_close(cameras.positions().norm(dim=-1), torch.full((21,), 2.0))


def test_reference_sv3d_p_angles() -> None:
    ref_path = fixtures_dir() / "sv3d_tiny" / "ref_sv3d_p.json"
    if not ref_path.is_file():
        pytest.skip(f"reference fixture not found: {ref_path} (../shared/fixtures beside the checkout)")
    ref = json.loads(ref_path.read_text())
    elevation = ref["elevations_deg"][-1]  # the input view's elevation (10 deg in the fixture)
    orbit = static_orbit(elevation_deg=elevation, input_azimuth_deg=ref["azimuths_deg"][-1])
    polar, azimuth = orbit.model_conditioning()
    f64 = torch.float64
    torch.testing.assert_close(
        orbit.elevations_deg, torch.tensor(ref["elevations_deg"], dtype=f64), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        orbit.azimuths_deg, torch.tensor(ref["azimuths_deg"], dtype=f64), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(polar, torch.tensor(ref["polars_rad"], dtype=f64), atol=1e-6, rtol=0)
    torch.testing.assert_close(azimuth, torch.tensor(ref["azimuths_rad"], dtype=f64), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------
# transforms.json and orbit directories
# ------------------------------------------------------------------------------------------------


def test_orbit_directory_round_trip(tmp_path: Path) -> None:
    orbit = sine_orbit(8.0, 123.0)
    images = _random_rgba(21, 8)
    out = write_orbit_directory(tmp_path / "orbit", orbit, images, "render")
    assert sorted(p.name for p in out.iterdir())[:2] == ["frame_000.png", "frame_001.png"]
    meta = json.loads((out / "transforms.json").read_text())
    assert meta["camera_angle_x"] == pytest.approx(math.radians(FOV_DEG))
    assert (meta["w"], meta["h"], meta["cx"], meta["cy"]) == (8, 8, 4.0, 4.0)
    assert meta["fl_x"] == pytest.approx(focal_from_fov(FOV_DEG, 8))
    assert (meta["alpha_source"], meta["orbit_kind"], meta["radius"]) == ("render", "sine", 2.0)
    assert meta["frames"][3]["file_path"] == "frame_003.png"
    assert meta["frames"][3]["elevation_deg"] == pytest.approx(float(orbit.elevations_deg[3]))
    with Image.open(out / "frame_000.png") as im:
        assert im.mode == "RGBA"

    frames = read_orbit_directory(out)
    assert isinstance(frames, OrbitFrames) and frames.alpha_source == "render"
    assert frames.images.shape == (21, 8, 8, 4) and frames.images.dtype == torch.float32
    assert float((frames.images - images).abs().max()) <= 0.5 / 255 + 1e-6  # 8-bit rounding
    torch.testing.assert_close(frames.orbit.elevations_deg, orbit.elevations_deg)
    torch.testing.assert_close(frames.orbit.azimuths_deg, orbit.azimuths_deg)
    assert frames.orbit.kind == "sine" and frames.orbit.c2w_matrices is None
    assert frames.orbit.fov_deg == pytest.approx(FOV_DEG)
    torch.testing.assert_close(frames.orbit.c2w(), orbit.c2w())


def test_orbit_directory_16_bit(tmp_path: Path) -> None:
    pytest.importorskip("imageio_ffmpeg")
    orbit = explicit_orbit([0.0, 20.0, 5.0], [10.0, 80.0, 0.0])
    images = _random_rgba(3, 6, seed=3)
    out = write_orbit_directory(tmp_path / "o16", orbit, images, "matting", bit_depth=16)
    frames = read_orbit_directory(out)
    assert float((frames.images - images).abs().max()) <= 0.5 / 65535 + 1e-6  # 16-bit precision kept
    assert frames.alpha_source == "matting"


def test_rgb_over_and_masks() -> None:
    images = torch.tensor([[[[1.0, 0.0, 0.0, 0.25], [0.2, 0.4, 0.6, 1.0]]]])  # [1, 1, 2, 4]
    frames = OrbitFrames(explicit_orbit([0.0], [0.0]), images, "render")
    # red at alpha 0.25 over white: 0.25 * (1, 0, 0) + 0.75 * (1, 1, 1) = (1, 0.75, 0.75)
    torch.testing.assert_close(frames.rgb_over(1.0)[0, 0, 0], torch.tensor([1.0, 0.75, 0.75]))
    torch.testing.assert_close(frames.rgb_over((0.0, 0.0, 1.0))[0, 0, 0], torch.tensor([0.25, 0.0, 0.75]))
    torch.testing.assert_close(frames.rgb_over()[0, 0, 1], torch.tensor([0.2, 0.4, 0.6]))
    torch.testing.assert_close(frames.masks()[0, 0, :, 0], torch.tensor([0.0, 1.0]))


def _valid_dir(tmp_path: Path, frames: int = 3, size: int = 4) -> Path:
    orbit = explicit_orbit([10.0] * frames, [float(40 * i) for i in range(frames)])
    return write_orbit_directory(tmp_path / "orbit", orbit, _random_rgba(frames, size), "render")


def _edit(path: Path, change) -> None:
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def _break_missing_dir(d: Path) -> None:
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


def _break_rgb_frame_size(d: Path) -> None:
    Image.new("RGB", (5, 5)).save(d / "frame_001.png")


MALFORMED = {
    "missing directory": (_break_missing_dir, "not found"),
    "missing transforms.json": (lambda d: (d / "transforms.json").unlink(), "transforms.json"),
    "invalid JSON": (lambda d: (d / "transforms.json").write_text("{frames: [}"), "not valid JSON"),
    "not an object": (lambda d: (d / "transforms.json").write_text("[1, 2]"), "JSON object"),
    "no frames": (lambda d: _edit(d / "transforms.json", lambda m: m.update(frames=[])), "frames"),
    "missing frame file": (lambda d: (d / "frame_002.png").unlink(), "frame_002.png"),
    "3x4 matrix": (
        lambda d: _edit(d / "transforms.json", lambda m: m["frames"][1]["transform_matrix"].pop()),
        "4x4",
    ),
    "non-numeric matrix": (
        lambda d: _edit(d / "transforms.json", lambda m: m["frames"][0].update(transform_matrix="eye")),
        "4x4",
    ),
    "frame size differs": (_break_rgb_frame_size, "frame_001.png"),
    "not square": (lambda d: _edit(d / "transforms.json", lambda m: m.update(w=6)), "square"),
    "unlisted frame": (lambda d: Image.new("RGBA", (4, 4)).save(d / "frame_003.png"), "frame_*.png"),
    "bad alpha_source": (
        lambda d: _edit(d / "transforms.json", lambda m: m.update(alpha_source="x")),
        "alpha",
    ),
    "angles disagree": (
        lambda d: _edit(d / "transforms.json", lambda m: m["frames"][1].update(azimuth_deg=-40.0)),
        "disagree",
    ),
    "corrupt image": (lambda d: (d / "frame_000.png").write_bytes(b"not a png"), "frame_000.png"),
    "damaged chunk": (lambda d: _damage_image_data(d / "frame_001.png"), "frame_001.png: cannot read"),
    "a frame listed twice": (  # frame_002.png unlisted: the NeRF would fit frame 0 under two poses
        lambda d: _edit(d / "transforms.json", lambda m: m["frames"][2].update(file_path="frame_000.png")),
        "frame_002.png",
    ),
}


def _damage_image_data(path: Path) -> None:
    """A 300-px frame (Pillow writes it in several IDAT chunks) with one byte of its second IDAT's type
    changed (a bad copy): Pillow raises SyntaxError ("broken PNG file"), not OSError."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (300, 300, 4), dtype=np.uint8)).save(path)
    raw = bytearray(path.read_bytes())
    raw[raw.index(b"IDAT", raw.index(b"IDAT") + 4)] = 0
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_directory_raises(tmp_path: Path, case: str) -> None:
    directory = _valid_dir(tmp_path)
    read_orbit_directory(directory)  # valid before breaking it
    breaker, fragment = MALFORMED[case]
    breaker(directory)
    with pytest.raises(OrbitDirectoryError) as info:
        read_orbit_directory(directory)
    message = str(info.value)
    assert "\n" not in message  # one line
    assert fragment in message
    assert str(directory) in message  # names the file or directory


def test_nerfstudio_style_transforms(tmp_path: Path) -> None:
    """Another tool's file: "./images/frame_00001.png", no angles, no w/h, fl_x instead of the angle."""
    directory = tmp_path / "ns"
    (directory / "images").mkdir(parents=True)
    e, a = [5.0, 20.0, -10.0], [0.0, 120.0, 240.0]
    matrices = c2w_from_angles(np.array(e), np.array(a), np.array(1.5))
    frames = []
    for i, m in enumerate(matrices):
        Image.new("RGB", (10, 10), (255, 0, 0)).save(directory / "images" / f"frame_{i + 1:05d}.png")
        frames.append({"file_path": f"./images/frame_{i + 1:05d}.png", "transform_matrix": m.tolist()})
    focal = focal_from_fov(40.0, 10)
    meta = {"camera_model": "OPENCV", "fl_x": focal, "fl_y": focal, "frames": frames}
    (directory / "transforms.json").write_text(json.dumps(meta))

    orbit, paths, width, height, alpha_source = read_transforms(directory)
    assert (width, height, alpha_source, orbit.kind) == (10, 10, "input", "explicit")
    assert paths[1] == directory / "images" / "frame_00002.png"
    torch.testing.assert_close(orbit.elevations_deg, torch.tensor(e, dtype=torch.float64))
    torch.testing.assert_close(orbit.azimuths_deg, torch.tensor(a, dtype=torch.float64))
    assert orbit.radius == pytest.approx(1.5) and orbit.fov_deg == pytest.approx(40.0)
    assert orbit.c2w_matrices is None  # they are exactly the look-at cameras of their angles
    with pytest.raises(OrbitDirectoryError, match="frame 0 .* has no mask"):  # RGB filling the frame
        read_orbit_directory(directory)
    for i in range(3):  # RGB on white (SV3D's own frames, e.g. from its mp4): matted against the white
        image = Image.new("RGB", (10, 10), (255, 255, 255))
        image.paste((255, 0, 0), (3, 3, 7, 7))
        image.save(directory / "images" / f"frame_{i + 1:05d}.png")
    frames_read = read_orbit_directory(directory)
    assert frames_read.alpha_source == "matting"
    alpha = frames_read.images[0, ..., 3]  # [10, 10]
    assert float(alpha[3:7, 3:7].min()) == 1.0 and float(alpha[:, :2].max()) == 0.0
    torch.testing.assert_close(frames_read.images[0, 4, 4, :3], torch.tensor([1.0, 0.0, 0.0]))
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))  # the input view with its own alpha: kept as it is
    rgba.paste((0, 0, 255, 128), (2, 2, 8, 8))
    rgba.save(directory / "images" / "frame_00003.png")
    frames_read = read_orbit_directory(directory)
    assert float(frames_read.images[2, 4, 4, 3]) == pytest.approx(128 / 255)
    assert float(frames_read.images[0, 4, 4, 3]) == 1.0 and float(frames_read.images[0, 0, 0, 3]) == 0.0
    # intrinsics that our pinhole cameras cannot follow are refused, not ignored
    for key, value in (("cx", 6.5), ("cy", 3.0), ("fl_y", focal * 1.1), ("k1", 0.01)):
        (directory / "transforms.json").write_text(json.dumps({**meta, key: value}))
        with pytest.raises(OrbitDirectoryError, match=f"{key} = "):
            read_transforms(directory)
    (directory / "transforms.json").write_text(json.dumps({**meta, "cx": 5.0, "cy": 5.0, "k1": 0.0}))
    read_transforms(directory)  # at the centre, no distortion: fine
    # a fisheye or panorama is not a pinhole, with or without coefficients (it was read as one)
    for model in ("OPENCV_FISHEYE", "EQUIRECTANGULAR"):
        (directory / "transforms.json").write_text(json.dumps({**meta, "camera_model": model}))
        with pytest.raises(OrbitDirectoryError, match=f"camera_model '{model}'"):
            read_transforms(directory)
    (directory / "transforms.json").write_text(json.dumps({**meta, "camera_model": "OPENCV", "k1": 0.0}))
    read_transforms(directory)
    angle = 2.0 * math.atan(5.0 / focal)  # instant-ngp writes camera_angle_x beside fl_x, cx, k1 ...
    (directory / "transforms.json").write_text(json.dumps({**meta, "camera_angle_x": angle, "cx": 6.5}))
    with pytest.raises(OrbitDirectoryError, match="cx = 6.5"):
        read_transforms(directory)
    (directory / "transforms.json").write_text(json.dumps({**meta, "camera_angle_x": 1.2 * angle}))
    with pytest.raises(OrbitDirectoryError, match="fl_x = "):  # the two disagree
        read_transforms(directory)


def test_nerfstudio_mask_path_is_the_frames_alpha(tmp_path: Path) -> None:
    """nerfstudio keeps masks in their own files (`mask_path`): they become the frames' alpha, so RGB
    frames on any background are usable, and a changed mask changes the orbit's fingerprint."""
    from sv3d.fit_nerf import orbit_fingerprint

    directory = tmp_path / "ns"
    (directory / "images").mkdir(parents=True)
    (directory / "masks").mkdir()
    matrices = c2w_from_angles(np.array([5.0, 20.0]), np.array([0.0, 180.0]), np.array(2.0))
    frames = []
    for i, m in enumerate(matrices):
        image = Image.new("RGB", (10, 10), (90, 90, 90))  # grey background: refused without a mask
        image.paste((255, 0, 0), (3, 3, 7, 7))
        image.save(directory / "images" / f"frame_{i}.png")
        mask = Image.new("L", (10, 10), 0)
        mask.paste(255, (3, 3, 7, 7))
        mask.save(directory / "masks" / f"frame_{i}.png")
        frames.append(
            {
                "file_path": f"images/frame_{i}.png",
                "mask_path": f"masks/frame_{i}",
                "transform_matrix": m.tolist(),
            }
        )
    meta = {"fl_x": focal_from_fov(33.8, 10), "frames": frames}
    (directory / "transforms.json").write_text(json.dumps(meta))
    frames_read = read_orbit_directory(directory)
    assert frames_read.alpha_source == "input"
    alpha = frames_read.images[1, ..., 3]  # [10, 10]
    assert float(alpha[3:7, 3:7].min()) == 1.0 and float(alpha.sum()) == 16.0
    before = orbit_fingerprint(directory)
    Image.new("L", (10, 10), 255).save(directory / "masks" / "frame_1.png")
    assert orbit_fingerprint(directory) != before
    Image.new("L", (12, 10), 255).save(directory / "masks" / "frame_1.png")
    with pytest.raises(OrbitDirectoryError, match="mask is 12x10 but transforms.json says 10x10"):
        read_orbit_directory(directory)
    (directory / "masks" / "frame_1.png").unlink()
    with pytest.raises(OrbitDirectoryError, match="frame 1: mask file 'masks/frame_1' not found"):
        read_orbit_directory(directory)
    (directory / "masks" / "frame_1.png").write_bytes(b"not an image")
    with pytest.raises(OrbitDirectoryError, match="cannot read mask"):
        read_orbit_directory(directory)


def test_cameras_that_cannot_see_the_object_are_refused(tmp_path: Path) -> None:
    directory = _valid_dir(tmp_path)
    meta = json.loads((directory / "transforms.json").read_text())
    m = np.array(meta["frames"][1]["transform_matrix"])
    cases = {
        "transposed": (m.T, "last row"),
        "OpenCV axes": (m @ np.diag([1.0, -1.0, -1.0, 1.0]), "OpenCV"),
        "scaled": (m @ np.diag([2.0, 2.0, 2.0, 1.0]), "not a rotation"),
    }
    for name, (matrix, fragment) in cases.items():
        broken = copy.deepcopy(meta)
        broken["frames"][1]["transform_matrix"] = matrix.tolist()
        broken["frames"][1].pop("elevation_deg", None)
        broken["frames"][1].pop("azimuth_deg", None)
        (directory / "transforms.json").write_text(json.dumps(broken))
        with pytest.raises(OrbitDirectoryError, match=fragment) as info:
            read_transforms(directory)
        assert "frame 1" in str(info.value), name


def test_16_bit_frames_with_an_sbit_chunk(tmp_path: Path) -> None:
    """pypng shifts values down to the sBIT depth: a 12-bit alpha of 4095 is opaque, not 1/16."""
    directory = _valid_dir(tmp_path)
    rows = np.full((4, 16), 4095 << 4, np.uint16)  # [H, W * 4] RGBA: 12 significant bits, stored high
    rows[0, 3] = 0  # one transparent pixel: the frame has a mask
    with open(directory / "frame_000.png", "wb") as f:
        png.Writer(4, 4, bitdepth=16, greyscale=False, alpha=True).write(f, rows)
    raw = (directory / "frame_000.png").read_bytes()
    chunk = b"sBIT" + bytes([12, 12, 12, 12])
    sbit = struct.pack(">I", 4) + chunk + struct.pack(">I", zlib.crc32(chunk))
    (directory / "frame_000.png").write_bytes(raw[:33] + sbit + raw[33:])
    frames_read = read_orbit_directory(directory)
    expected = torch.ones(4, 4, 4)
    expected[0, 0, 3] = 0.0
    torch.testing.assert_close(frames_read.images[0], expected)


def test_written_orbits_are_readable_by_others(tmp_path: Path) -> None:
    directory = _valid_dir(tmp_path)  # as every output (mkdtemp and mkstemp alone give 0700 and 0600)
    assert directory.stat().st_mode & 0o777 == 0o755
    assert (directory / "transforms.json").stat().st_mode & 0o777 == 0o644


def test_blender_style_paths_and_foreign_cameras(tmp_path: Path) -> None:
    """instant-ngp's Blender scenes: "./train/r_0" without extension; a rolled camera is kept as is."""
    directory = tmp_path / "blender"
    (directory / "train").mkdir(parents=True)
    m = c2w_from_angles(np.array([30.0, 30.0]), np.array([0.0, 90.0]))  # [2, 4, 4] float64
    roll = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    m[1, :3, :3] = m[1, :3, :3] @ roll  # rolled 90 deg about its viewing axis
    for i in range(2):
        Image.new("RGBA", (6, 6)).save(directory / "train" / f"r_{i}.png")
    frames = [{"file_path": f"./train/r_{i}", "transform_matrix": m[i].tolist()} for i in range(2)]
    meta = {"camera_angle_x": 0.69, "frames": frames}
    (directory / "transforms.json").write_text(json.dumps(meta))
    orbit, paths, width, height, _ = read_transforms(directory)
    assert paths[0].name == "r_0.png" and (width, height) == (6, 6)
    torch.testing.assert_close(orbit.azimuths_deg, torch.tensor([0.0, 90.0], dtype=torch.float64))
    assert orbit.c2w_matrices is not None
    torch.testing.assert_close(orbit.c2w(), m.float())  # the file's cameras, not re-derived ones
    # written back, the same matrices come out
    out = tmp_path / "copy"
    out.mkdir()
    write_transforms(out, orbit, 6, 6, "input", ["a.png", "b.png"])
    written = json.loads((out / "transforms.json").read_text())["frames"][1]["transform_matrix"]
    torch.testing.assert_close(torch.tensor(written, dtype=torch.float64), m[1])


def test_write_refuses_non_empty_target_unless_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "orbit"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    orbit = explicit_orbit([0.0, 10.0], [0.0, 180.0])
    with pytest.raises(InputError, match="not empty"):
        write_orbit_directory(target, orbit, _random_rgba(2, 4), "render")
    assert (target / "keep.txt").read_text() == "old"
    # Replacing deletes the whole folder: only an orbit's (`sv3d orbit out/photo.png -o out --force`
    # deleted the photo)
    with pytest.raises(InputError, match=r"holds files that are not an orbit's \(keep.txt\)"):
        write_orbit_directory(target, orbit, _random_rgba(2, 4), "render", overwrite=True)
    assert (target / "keep.txt").read_text() == "old"
    (target / "keep.txt").unlink()
    write_orbit_directory(target, orbit, _random_rgba(2, 4), "render")
    (target / "preview.mp4").write_bytes(b"sv3d orbit's own")  # and a killed write's temporary file
    (target / ".preview.k2j4.mp4").write_bytes(b"")
    write_orbit_directory(target, orbit, _random_rgba(2, 4), "render", overwrite=True)  # an orbit: replaced
    assert sorted(p.name for p in target.iterdir()) == ["frame_000.png", "frame_001.png", "transforms.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["orbit"]  # no temporary or backup left
    # errors found before any work create nothing
    with pytest.raises(InputError):
        write_orbit_directory(tmp_path / "new", orbit, _random_rgba(3, 4), "render")  # 3 images, 2 frames
    with pytest.raises(InputError):
        write_orbit_directory(tmp_path / "new", orbit, _random_rgba(2, 4) * 2.0, "render")  # > 1
    with pytest.raises(InputError):
        write_orbit_directory(tmp_path / "new", orbit, _random_rgba(2, 4), "guess")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["orbit"]


@pytest.mark.parametrize("existing", [False, True])
def test_atomic_write_leaves_nothing_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool
) -> None:
    target = tmp_path / "deep" / "orbit"
    if existing:
        target.mkdir(parents=True)
        (target / "frame_000.png").write_text("old")  # an orbit's name: overwrite replaces only those
    calls = []
    real_write = cams._write_frame

    def failing_write(path: Path, image: np.ndarray, bit_depth: int) -> None:
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        real_write(path, image, bit_depth)

    monkeypatch.setattr(cams, "_write_frame", failing_write)
    with pytest.raises(OSError, match="disk full"):
        write_orbit_directory(target, static_orbit(), _random_rgba(21, 4), "render", overwrite=True)
    assert len(calls) == 3
    if existing:  # the old directory is back, untouched, and nothing else is there
        assert [p.name for p in target.iterdir()] == ["frame_000.png"]
        assert (target / "frame_000.png").read_text() == "old"
        assert sorted(p.name for p in target.parent.iterdir()) == ["orbit"]
    else:  # not even the parent directories this call created
        assert list(tmp_path.iterdir()) == []


def test_frames_named_by_absolute_paths_are_listed_and_a_frame_twice_is_refused(tmp_path: Path) -> None:
    """The unlisted-frame check compares resolved paths (absolute file paths in transforms.json were all
    "unlisted"); one file under two frames is refused wherever the frames lie (here in images/)."""
    directory = _valid_dir(tmp_path)
    _edit(
        directory / "transforms.json",
        lambda m: [f.update(file_path=str((directory / f["file_path"]).resolve())) for f in m["frames"]],
    )
    link = tmp_path / "link"
    link.symlink_to(directory)
    assert len(read_orbit_directory(link).images) == 3  # through a link: every frame was "unlisted"
    (directory / "images").mkdir()
    for frame in directory.glob("frame_*.png"):
        frame.rename(directory / "images" / frame.name)

    def into_images(meta):
        for f in meta["frames"]:
            f["file_path"] = "images/" + Path(f["file_path"]).name
        meta["frames"][2]["file_path"] = "images/frame_000.png"

    _edit(directory / "transforms.json", into_images)
    with pytest.raises(OrbitDirectoryError, match="lists frame_000.png for two frames"):
        read_orbit_directory(directory)
