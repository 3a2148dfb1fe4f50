"""Camera and orbit conventions: the single source of truth for how SV3D's angles become matrices.

Everything that places a camera (ground-truth renders, the SV3D sampler's conditioning, the NeRF and
refine stages, evaluation) builds it here. ARCHITECTURE.md "Conventions" states the rules; this file
implements them:

* World: right-handed, z up. Cameras: 4x4 camera-to-world matrices in the OpenGL/Blender convention
  (x right, y up, looking along -z), square images, horizontal field of view 33.8 deg, on a sphere of
  radius 2 around the origin, looking at the origin, world up = +z.
* Angles: elevation e (deg) above the xy-plane, azimuth a (deg) from +x, counter-clockwise seen from +z.
  Camera centre = radius * (cos e cos a, cos e sin a, sin e).
* SV3D frame order: 21 frames, the LAST frame is the input view. The model is conditioned on
  polar = 90 deg - elevation and on the azimuth relative to the last frame, wrapped to [0, 2 pi).
* Orbit directory: `transforms.json` (instant-ngp / nerfstudio format, plus our per-frame angles and
  `alpha_source`) and RGBA PNG frames `frame_000.png` ...

Reference for the conditioning: Stability-AI/generative-models, commit 0ad7de9,
`scripts/sampling/simple_video_sample.py` lines 82-94 (the `version == "sv3d_p"` branch):

    polars_rad = [np.deg2rad(90 - e) for e in elevations_deg]                          # line 87
    azimuths_deg = np.linspace(0, 360, num_frames + 1)[1:] % 360   # default orbit       line 89
    azimuths_rad = [np.deg2rad((a - azimuths_deg[-1]) % 360) for a in azimuths_deg]   # line 93

(line 94, `azimuths_rad[:-1].sort()`, sorts a copy of a slice and has no effect). Line 256 replaces the
last decoded frame by the input image, which is why the input view is the last frame. `static_orbit` and
`Orbit.model_conditioning` compute exactly these numbers; `tests/test_cameras.py` checks them against
the angles recorded in `../shared/fixtures/sv3d_tiny/ref_sv3d_p.json`, which were produced by running
that script's code. The reference has no "sine" orbit: it takes any list of 21 elevations (README.md
line 88). Our sine orbit `e_k = e_in + A sin(2 pi (k + 1) / 21)`, k = 0..20, is the project's choice;
its indexing follows the reference's rule that the last frame is the input view: k = 20 gives
sin(2 pi) = 0, so the last frame sits exactly at e_in (with `sin(2 pi k / 21)` instead, the FIRST frame
would sit at e_in and the last at e_in - 5.9 deg). The same (k + 1) indexing appears in the SV3D
authors' own orbit helpers: `gen_elev_loop` in claforte/threestudio (branch `chunhan/sv3d`, commit
d8a79f4, `threestudio/data/uncond.py` lines 104-108: `azim = linspace(0, 2 pi, length + 1)[1:]`,
`elev = sin(azim + phase)`), and `gen_dynamic_loop` in generative-models
`scripts/demo/sv3d_helpers.py` lines 59-74, which rolls the generated loop by -1 to "Make cond frame
the last one".

Azimuth direction
-----------------
What is certain: the model receives azimuths that increase frame by frame (17.1, 34.3, ..., 342.9, 0
deg for the default orbit, generative-models `simple_video_sample.py` lines 89 and 93; README.md line 88
asks for azimuths "in sorted order from 0 to 360"). The reference never turns these angles into a
camera, so which way the camera moves is not stated by the sampling code itself. The evidence that it
moves counter-clockwise seen from +z (our convention) is:

1. The SV3D authors' 3D-optimisation code uses exactly our convention with SV3D. claforte/threestudio,
   branch `chunhan/sv3d`, commit d8a79f4 (Chun-Han Yao, an SV3D author, "sv3d updates", 2024-03-19):
   `threestudio/data/svd_uncond.py` lines 126-176 (`SVDCameraIterableDataset.__init__`) builds the
   21 views for SV3D score distillation with `azimuth_deg = linspace(0, 360, 22)[1:]`, camera centre
   d (cos e cos a, cos e sin a, sin e) with z up (comment "azimuth from +x to +y"), up = +z, looking
   at the origin, c2w columns [right, up, -lookat] (OpenGL), d = 2.0, fovy 33.9 deg.
   `threestudio/models/guidance/svd_guidance.py` lines 150-193 feeds renders from these cameras, in
   this frame order, to the SV3D denoiser with the same elevation/azimuth values, and line 117 takes
   the conditioning image from frame 20 (`000020.png`), the last one. `configs/kplanes_sober_sds.yaml`
   combines this with a photometric loss on 21-frame static ("sober") GSO orbits read from their
   transforms.json. With the opposite direction the distillation would fight those frames.
   Inferred, not certain: the denoiser wrapper (`JucifierDenoiser`) is internal and not public, so its
   angle-to-conditioning conversion cannot be read, and this is a research branch, not a release.
2. generative-models `scripts/demo/sv3d_helpers.py` lines 77-104 (`plot_3D`, shown by the official
   streamlit demo `scripts/demo/video_sampling.py` lines 221-232 as the "3D camera trajectory") draws
   the conditioning angles as points (cos e cos a, cos e sin a, sin e) (lines 86-88) in matplotlib's
   right-handed z-up axes: increasing azimuth is drawn counter-clockwise seen from +z. This is what
   the authors visualise; that it matches the training renders is an inference.
3. The official SV3D animation, generative-models `assets/sv3d.gif` (22 frames, 12 objects): with
   increasing frame index the camera moves to its own right, e.g. the horse, head to the left in the
   first frame, is seen from behind after about a quarter turn; the girl figure's face turns towards
   the image's left. For a camera on a horizontal circle looking at the centre with up = +z, moving to
   its right is exactly counter-clockwise seen from +z: d/da of (cos a, sin a, 0) is (-sin a, cos a, 0),
   our camera's x axis. Assumed: the animation plays the frames in increasing order.
4. Consistent but weaker (the model is fine-tuned there): humansplat/humansplat,
   `src/data/gobjaverse_dataset.py` `_get_pose` derives SV3D's azimuths with kiui's
   `undo_orbit_camera` (y up, azimuth from +z towards +x: counter-clockwise seen from the up axis).

Implication: frame k + 1's camera is at a larger azimuth than frame k's, i.e. it has moved
counter-clockwise seen from +z, to the camera's right, so the object's visible surface slides from the
right of the image to the left (the object seems to turn clockwise seen from above).
`tests/test_cameras.py::test_azimuth_direction_is_counter_clockwise` pins this, and
`scripts/check_azimuth.py` (ARCHITECTURE.md) is the check with the real weights.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import png
import torch
from PIL import Image
from torch import Tensor

from refine.camera import Cameras
from sv3d.errors import InputError, OrbitDirectoryError

__all__ = [
    "ALPHA_SOURCES",
    "CAMERA_RADIUS",
    "FAR",
    "FOV_DEG",
    "NEAR",
    "NUM_FRAMES",
    "OBJECT_RADIUS",
    "ORBIT_KINDS",
    "SINE_AMPLITUDE_DEG",
    "SINE_MAX_ELEVATION_DEG",
    "TRANSFORMS_FILE",
    "Orbit",
    "OrbitFrames",
    "angles_from_c2w",
    "c2w_from_angles",
    "check_orbit_target",
    "explicit_orbit",
    "focal_from_fov",
    "frame_file_names",
    "intrinsics",
    "make_orbit",
    "orbit_files",
    "projection_from_fov",
    "read_orbit_directory",
    "read_transforms",
    "sine_orbit",
    "static_orbit",
    "write_orbit_directory",
    "write_transforms",
]

FOV_DEG = 33.8  # SV3D's training renders (paper); horizontal = vertical, the images are square
CAMERA_RADIUS = 2.0  # camera distance from the origin in SV3D's training renders (authors' answer)
NUM_FRAMES = 21  # frames per SV3D orbit; the last one is the input view
OBJECT_RADIUS = 0.5  # bounding-sphere radius of a placed mesh: fills ~85% of the half-width at r = 2
NEAR = 0.1  # clip planes of `projection_from_fov`: the object lies within [1.5, 2.5] of the camera
FAR = 10.0
SINE_AMPLITUDE_DEG = 20.0  # default amplitude of the sine orbit's elevation
SINE_MAX_ELEVATION_DEG = 30.0  # every elevation of a sine orbit stays within +-30 deg (ARCHITECTURE.md)

ORBIT_KINDS = ("static", "sine", "explicit")
ALPHA_SOURCES = ("render", "input", "matting")  # where the frames' alpha comes from
TRANSFORMS_FILE = "transforms.json"
_MAX_POLE_ELEVATION_DEG = 90.0  # orbits must stay strictly below the poles (azimuth is undefined there)
_ANGLE_TOLERANCE_DEG = 1e-2  # stored angles vs. matrix-derived angles in a transforms.json
_MATRIX_TOLERANCE = 1e-4  # file matrices this close to the look-at cameras are taken as look-at cameras
_PIXEL_RANGE_TOLERANCE = 1e-4  # images may overshoot [0, 1] by rounding only


# ------------------------------------------------------------------------------------------------
# Angles <-> matrices
# ------------------------------------------------------------------------------------------------


def _float_tensor(x: float | Sequence[float] | np.ndarray | Tensor, name: str) -> Tensor:
    """Number(s) -> floating tensor: float64 tensors and arrays stay float64, all else becomes float32."""
    try:
        if isinstance(x, Tensor):
            t = x
        elif isinstance(x, np.ndarray | np.generic):
            t = torch.from_numpy(np.array(x))
        else:  # Python numbers and sequences of them
            t = torch.as_tensor(x, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as err:
        raise InputError(f"{name}: not a number or a sequence of numbers ({err})") from None
    if t.dtype != torch.float64:
        t = t.to(torch.float32)
    return t


def c2w_from_angles(
    elevation_deg: float | Sequence[float] | np.ndarray | Tensor,  # [V] or scalar
    azimuth_deg: float | Sequence[float] | np.ndarray | Tensor,  # [V] or scalar
    radius: float | Sequence[float] | np.ndarray | Tensor = CAMERA_RADIUS,  # [V] or scalar
) -> Tensor:
    """Look-at cameras on a sphere: [V, 4, 4] camera-to-world matrices, OpenGL convention.

    Camera centre radius * (cos e cos a, cos e sin a, sin e); the camera looks at the origin (its -z
    axis points there), its x axis is (-sin a, cos a, 0) (horizontal, the direction of increasing
    azimuth) and its y axis (-sin e cos a, -sin e sin a, cos e) (world up +z projected, so no roll).
    Written in closed form, nothing is normalised, so the poles (e = +-90) give finite, orthonormal
    matrices whose x axis still follows the azimuth.

    Inputs broadcast against each other; scalars give V = 1. The result is float64 if any input is
    float64, else float32, on the device of the tensor inputs. Computed in float64 either way.
    """
    e, a, r = (
        _float_tensor(elevation_deg, "elevation_deg"),
        _float_tensor(azimuth_deg, "azimuth_deg"),
        _float_tensor(radius, "radius"),
    )
    out_dtype = torch.float64 if torch.float64 in (e.dtype, a.dtype, r.dtype) else torch.float32
    device = next((t.device for t in (e, a, r) if t.device.type != "cpu"), torch.device("cpu"))
    e, a, r = (t.to(device=device, dtype=torch.float64) for t in (e, a, r))
    e, a, r = torch.broadcast_tensors(e, a, r)
    e, a, r = e.reshape(-1), a.reshape(-1), r.reshape(-1)  # [V]
    if not bool(torch.isfinite(e).all() & torch.isfinite(a).all() & torch.isfinite(r).all()):
        raise InputError("c2w_from_angles: elevation, azimuth and radius must be finite")
    if bool((r <= 0).any()):
        raise InputError(f"c2w_from_angles: radius must be > 0, got {r.min().item()}")

    e_rad, a_rad = torch.deg2rad(e), torch.deg2rad(a)
    ce, se, ca, sa = torch.cos(e_rad), torch.sin(e_rad), torch.cos(a_rad), torch.sin(a_rad)  # [V]
    zero = torch.zeros_like(e)
    right = torch.stack([-sa, ca, zero], dim=-1)  # [V, 3] camera x
    up = torch.stack([-se * ca, -se * sa, ce], dim=-1)  # [V, 3] camera y = back x right
    back = torch.stack([ce * ca, ce * sa, se], dim=-1)  # [V, 3] camera z (the camera looks along -z)

    c2w = torch.zeros(e.shape[0], 4, 4, dtype=torch.float64, device=device)  # [V, 4, 4]
    c2w[:, :3, 0] = right
    c2w[:, :3, 1] = up
    c2w[:, :3, 2] = back
    c2w[:, :3, 3] = back * r[:, None]
    c2w[:, 3, 3] = 1.0
    return c2w.to(out_dtype)


def _wrap_360(deg: Tensor) -> Tensor:
    """Wrap degrees to [0, 360); `remainder` alone can round a tiny negative value up to 360."""
    wrapped = torch.remainder(deg, 360.0)
    return torch.where(wrapped >= 360.0, wrapped - 360.0, wrapped)


def angles_from_c2w(c2w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of `c2w_from_angles`: c2w [V, 4, 4] -> (elevation_deg [V], azimuth_deg [V] in [0, 360),
    radius [V]), in c2w's floating dtype.

    Angles are those of the camera centre, so any camera (rolled, not aimed at the origin) gets the
    angles of where it stands. Directly above or below the origin the centre has no azimuth; there it
    is read from the camera's x axis, which `c2w_from_angles` sets to (-sin a, cos a, 0).
    """
    if not isinstance(c2w, Tensor):
        c2w = torch.as_tensor(np.asarray(c2w))
    if c2w.ndim == 2:
        c2w = c2w[None]
    if c2w.ndim != 3 or tuple(c2w.shape[-2:]) != (4, 4):
        raise InputError(f"angles_from_c2w: expected [V, 4, 4] matrices, got shape {tuple(c2w.shape)}")
    dtype = c2w.dtype if c2w.dtype.is_floating_point else torch.float32
    m = c2w.to(torch.float64)  # [V, 4, 4]
    x, y, z = m[:, 0, 3], m[:, 1, 3], m[:, 2, 3]  # [V] camera centre
    horizontal = torch.hypot(x, y)  # [V]
    radius = torch.sqrt(horizontal**2 + z**2)  # [V]
    elevation = torch.rad2deg(torch.atan2(z, horizontal))  # [V]
    at_pole = horizontal <= 1e-9 * radius.clamp_min(1e-300)  # [V]
    azimuth_centre = torch.atan2(y, x)  # [V]
    azimuth_axis = torch.atan2(-m[:, 0, 0], m[:, 1, 0])  # [V] from the x axis (-sin a, cos a, .)
    azimuth = _wrap_360(torch.rad2deg(torch.where(at_pole, azimuth_axis, azimuth_centre)))  # [V]
    return elevation.to(dtype), azimuth.to(dtype), radius.to(dtype)


# ------------------------------------------------------------------------------------------------
# Intrinsics and projection
# ------------------------------------------------------------------------------------------------


def _check_fov(fov_deg: float) -> float:
    fov = float(fov_deg)
    if not (math.isfinite(fov) and 0.0 < fov < 180.0):
        raise InputError(f"field of view must be in (0, 180) degrees, got {fov_deg}")
    return fov


def focal_from_fov(fov_deg: float, size_px: float) -> float:
    """Focal length in pixels for a field of view `fov_deg` spanning `size_px` pixels."""
    fov = _check_fov(fov_deg)
    if not (math.isfinite(float(size_px)) and size_px > 0):
        raise InputError(f"image size must be > 0 pixels, got {size_px}")
    return 0.5 * float(size_px) / math.tan(math.radians(fov) / 2.0)


def intrinsics(fov_deg: float, width: int, height: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """[3, 3] pinhole matrix K in pixels, for the OpenCV camera frame (x right, y down, z forward).

    `fov_deg` is horizontal (along the width, `camera_angle_x`); pixels are square (fy = fx). Pixel
    centres convention: pixel (i, j) spans [i, i + 1) x [j, j + 1), its centre is (i + 0.5, j + 0.5), so
    the principal point (W/2, H/2) is the image centre. An OpenGL camera point p maps to the OpenCV frame
    as diag(1, -1, -1) p; then (u, v, 1) ~ K p_cv, with row v = 0 at the top of the image.
    """
    f = focal_from_fov(fov_deg, width)
    focal_from_fov(fov_deg, height)  # validates height
    return torch.tensor(
        [[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]], dtype=dtype
    )  # [3, 3]


def projection_from_fov(
    fov_deg: float, near: float = NEAR, far: float = FAR, dtype: torch.dtype = torch.float32
) -> Tensor:
    """[4, 4] OpenGL perspective projection for square images (camera -> clip).

    Clip z/w is -1 at distance `near` and +1 at `far` in front of the camera. NDC x, y in [-1, 1] map to
    pixels as u = (x + 1) / 2 * W, v = (1 - y) / 2 * H (row 0 at the top), which agrees with `intrinsics`.
    """
    fov = _check_fov(fov_deg)
    if not (math.isfinite(near) and math.isfinite(far) and 0.0 < near < far):
        raise InputError(f"need 0 < near < far, got near={near}, far={far}")
    cot = 1.0 / math.tan(math.radians(fov) / 2.0)
    return torch.tensor(
        [
            [cot, 0.0, 0.0, 0.0],
            [0.0, cot, 0.0, 0.0],
            [0.0, 0.0, -(far + near) / (far - near), -2.0 * far * near / (far - near)],
            [0.0, 0.0, -1.0, 0.0],
        ],
        dtype=dtype,
    )  # [4, 4]


# ------------------------------------------------------------------------------------------------
# Orbits
# ------------------------------------------------------------------------------------------------


def _angles_1d(values: Any, name: str) -> Tensor:
    """Numbers -> [V] float64 CPU tensor (angles are metadata; float64 keeps the reference's values)."""
    try:
        t = values.detach() if isinstance(values, Tensor) else torch.as_tensor(np.asarray(values, float))
    except (TypeError, ValueError) as err:
        raise InputError(f"{name}: not a sequence of numbers ({err})") from None
    t = t.to(device="cpu", dtype=torch.float64)
    if t.ndim == 0:
        t = t.reshape(1)
    if t.ndim != 1:
        raise InputError(f"{name}: expected a 1-D sequence of angles, got shape {tuple(t.shape)}")
    return t


@dataclass(eq=False)
class Orbit:
    """The cameras of one SV3D orbit, as angles; frame V - 1 is the input view.

    Angles are float64 on the CPU (they are metadata; `c2w()` gives float32 matrices for rendering).
    `c2w_matrices` is set only when an orbit is read from a file whose cameras are not the look-at
    cameras of its angles (a foreign tool's rolled or off-centre cameras); `c2w()` then returns them.
    """

    elevations_deg: Tensor  # [V] float64, degrees above the xy-plane, |e| < 90
    azimuths_deg: Tensor  # [V] float64, degrees from +x, counter-clockwise seen from +z
    radius: float = CAMERA_RADIUS  # camera distance from the origin
    fov_deg: float = FOV_DEG  # horizontal field of view (square images: also vertical)
    kind: str = "explicit"  # "static" | "sine" | "explicit": how the angles were made
    c2w_matrices: Tensor | None = None  # [V, 4, 4] float64, only for cameras read from a file

    def __post_init__(self) -> None:
        self.elevations_deg = _angles_1d(self.elevations_deg, "elevations_deg")
        self.azimuths_deg = _angles_1d(self.azimuths_deg, "azimuths_deg")
        n_e, n_a = self.elevations_deg.shape[0], self.azimuths_deg.shape[0]
        if n_e != n_a:
            raise InputError(f"orbit: {n_e} elevations but {n_a} azimuths")
        if n_e == 0:
            raise InputError("orbit: needs at least one frame")
        for name, t in (("elevations_deg", self.elevations_deg), ("azimuths_deg", self.azimuths_deg)):
            if not bool(torch.isfinite(t).all()):
                raise InputError(f"orbit: {name} contains a non-finite value: {t.tolist()}")
        worst = self.elevations_deg.abs().max().item()
        if worst >= _MAX_POLE_ELEVATION_DEG:
            raise InputError(f"orbit: elevations must satisfy |e| < 90 deg, got {worst}")
        self.radius = float(self.radius)
        if not (math.isfinite(self.radius) and self.radius > 0):
            raise InputError(f"orbit: radius must be a finite number > 0, got {self.radius}")
        self.fov_deg = _check_fov(self.fov_deg)
        if self.kind not in ORBIT_KINDS:
            raise InputError(f"orbit: kind must be one of {ORBIT_KINDS}, got {self.kind!r}")
        if self.c2w_matrices is not None:
            m = torch.as_tensor(self.c2w_matrices).to(device="cpu", dtype=torch.float64)
            if tuple(m.shape) != (n_e, 4, 4) or not bool(torch.isfinite(m).all()):
                raise InputError(f"orbit: c2w_matrices must be finite [{n_e}, 4, 4], got {tuple(m.shape)}")
            self.c2w_matrices = m

    def __len__(self) -> int:
        return self.elevations_deg.shape[0]

    def c2w_float64(self) -> Tensor:
        """[V, 4, 4] float64 camera-to-world matrices (what transforms.json stores)."""
        if self.c2w_matrices is not None:
            return self.c2w_matrices
        return c2w_from_angles(self.elevations_deg, self.azimuths_deg, torch.tensor(self.radius).double())

    def c2w(self) -> Tensor:
        """[V, 4, 4] float32 camera-to-world matrices, OpenGL convention, on the CPU."""
        return self.c2w_float64().to(torch.float32)

    def cameras(self) -> Cameras:
        """The rasterizer's cameras: c2w [V, 4, 4] and the square-image projection for `fov_deg`."""
        return Cameras(self.c2w(), projection_from_fov(self.fov_deg))

    def model_conditioning(self) -> tuple[Tensor, Tensor]:
        """(polar_rad [V], azimuth_rad [V]) float64, exactly what SV3D_p's conditioner receives.

        polar = deg2rad(90 - e); azimuth = deg2rad((a - a[-1]) mod 360), relative to the last (input)
        frame and in [0, 2 pi): generative-models `simple_video_sample.py` lines 87 and 93.
        """
        polar = torch.deg2rad(90.0 - self.elevations_deg)  # [V]
        relative = _wrap_360(self.azimuths_deg - self.azimuths_deg[-1])  # [V] degrees in [0, 360)
        return polar, torch.deg2rad(relative)


def _orbit_azimuths(input_azimuth_deg: float, num_frames: int) -> Tensor:
    """[V] float64: a_in + k * 360 / V for k = 1..V, wrapped to [0, 360); the last one is a_in."""
    k = torch.arange(1, num_frames + 1, dtype=torch.float64)  # [V]
    # k * 360 / V (multiply first) makes the last value exactly a_in + 360, as np.linspace's endpoint
    return _wrap_360(float(input_azimuth_deg) + k * 360.0 / num_frames)


def _check_num_frames(num_frames: int) -> int:
    if isinstance(num_frames, bool) or int(num_frames) != num_frames or num_frames < 1:
        raise InputError(f"num_frames must be a positive integer, got {num_frames}")
    return int(num_frames)


def static_orbit(
    elevation_deg: float = 10.0, input_azimuth_deg: float = 0.0, num_frames: int = NUM_FRAMES
) -> Orbit:
    """SV3D's default orbit: constant elevation, azimuths a_in + k * 360/V for k = 1..V (mod 360).

    The last frame (k = V) is the input view. With the defaults this is the reference's
    `np.linspace(0, 360, 22)[1:] % 360` at elevation 10 (`simple_video_sample.py` lines 82-89).
    """
    n = _check_num_frames(num_frames)
    elevations = torch.full((n,), float(elevation_deg), dtype=torch.float64)  # [V]
    return Orbit(elevations, _orbit_azimuths(input_azimuth_deg, n), kind="static")


def sine_orbit(
    elevation_deg: float = 10.0,
    input_azimuth_deg: float = 0.0,
    amplitude_deg: float = SINE_AMPLITUDE_DEG,
    num_frames: int = NUM_FRAMES,
) -> Orbit:
    """Static orbit's azimuths with elevation_k = e_in + A sin(2 pi (k + 1) / V), frame k = 0..V-1.

    The (k + 1) indexing puts the LAST frame (k = V - 1, sin(2 pi) = 0) exactly at the input elevation
    e_in, as the input view must be; frame 0 is at e_in + A sin(2 pi / V). Raises InputError if any
    elevation leaves +-30 deg (with A = 20 that allows |e_in| <= 10.06 deg for 21 frames).
    """
    n = _check_num_frames(num_frames)
    e_in, amplitude = float(elevation_deg), float(amplitude_deg)
    if not (math.isfinite(e_in) and math.isfinite(amplitude)):
        raise InputError(
            f"sine orbit: elevation {elevation_deg} and amplitude {amplitude_deg} must be finite"
        )
    k = torch.arange(n, dtype=torch.float64)  # [V]
    phase = 2.0 * math.pi * torch.remainder(k + 1.0, n) / n  # [V]; (k + 1) mod V makes the last one 0
    elevations = e_in + amplitude * torch.sin(phase)  # [V]
    worst = elevations.abs().max().item()
    if worst > SINE_MAX_ELEVATION_DEG + 1e-9:
        raise InputError(
            f"sine orbit: input elevation {e_in} deg with amplitude {amplitude} deg reaches {worst:.2f} deg, "
            f"outside +-{SINE_MAX_ELEVATION_DEG:g} deg"
        )
    return Orbit(elevations, _orbit_azimuths(input_azimuth_deg, n), kind="sine")


def explicit_orbit(
    elevations_deg: Sequence[float] | np.ndarray | Tensor,  # [V]
    azimuths_deg: Sequence[float] | np.ndarray | Tensor,  # [V]
    *,
    radius: float = CAMERA_RADIUS,
    fov_deg: float = FOV_DEG,
) -> Orbit:
    """An orbit from given angles (the last frame is the input view), validated like any Orbit."""
    return Orbit(elevations_deg, azimuths_deg, radius=radius, fov_deg=fov_deg, kind="explicit")


def make_orbit(
    kind: str, elevation_deg: float = 10.0, input_azimuth_deg: float = 0.0, num_frames: int = NUM_FRAMES
) -> Orbit:
    """`static_orbit` or `sine_orbit` by name (the `sv3d.orbit` config key)."""
    if kind == "static":
        return static_orbit(elevation_deg, input_azimuth_deg, num_frames=num_frames)
    if kind == "sine":
        return sine_orbit(elevation_deg, input_azimuth_deg, num_frames=num_frames)
    raise InputError(f"unknown orbit kind {kind!r}: expected 'static' or 'sine'")


# ------------------------------------------------------------------------------------------------
# transforms.json
# ------------------------------------------------------------------------------------------------


def _check_camera(matrix: np.ndarray, where: str) -> None:
    """A camera-to-world matrix [4, 4] (OpenGL axes) must be rigid and look towards the world's centre,
    where the object is: a transposed matrix, OpenCV axes or a camera facing away fail here, in one line,
    instead of as an empty visual hull or a silent refinement against nothing."""
    rotation, centre = matrix[:3, :3], matrix[:3, 3]  # [3, 3], [3]
    if np.abs(matrix[3] - [0.0, 0.0, 0.0, 1.0]).max() > 1e-6:
        raise OrbitDirectoryError(f"{where}: transform_matrix's last row must be 0 0 0 1 (transposed?)")
    if np.abs(rotation.T @ rotation - np.eye(3)).max() > 1e-3 or np.linalg.det(rotation) < 0:
        raise OrbitDirectoryError(
            f"{where}: transform_matrix's rotation is not a rotation (scaled or mirrored?)"
        )
    distance = float(np.linalg.norm(centre))
    if distance < 1e-9:
        raise OrbitDirectoryError(f"{where}: the camera sits at the world's centre, where the object is")
    facing = float(-rotation[:, 2] @ (-centre / distance))  # cos of the angle: view axis vs the centre
    if facing < math.cos(math.radians(60.0)):
        flipped = float(rotation[:, 2] @ (-centre / distance))  # OpenCV's camera looks along +z
        hint = " (OpenCV axes? multiply by diag(1, -1, -1, 1))" if flipped > 0.5 else ""
        raise OrbitDirectoryError(
            f"{where}: the camera does not look towards the world's centre "
            f"({math.degrees(math.acos(max(-1.0, min(1.0, facing)))):.0f} degrees off){hint}"
        )


# nerfstudio / COLMAP model names that are pinholes when their distortion coefficients are 0 (checked)
_PINHOLE_MODELS = frozenset({"PINHOLE", "SIMPLE_PINHOLE", "OPENCV", "SIMPLE_RADIAL", "RADIAL"})


def _check_pinhole(meta: dict, frames: list, fl_x: float, width: int, height: int, path: Path) -> None:
    """Our cameras are ideal pinholes with square pixels and the principal point at the image centre, the
    same for every frame: nerfstudio-style intrinsics that say otherwise are refused, not ignored (a
    fisheye or equirectangular `camera_model`, whatever its coefficients)."""
    for source, where in ((meta, str(path)), *((f, f"{path} frame {i}") for i, f in enumerate(frames))):
        if not isinstance(source, dict):
            continue
        model = source.get("camera_model")
        if model is not None and str(model).upper() not in _PINHOLE_MODELS:
            raise OrbitDirectoryError(
                f"{where}: camera_model {model!r}: cameras here are pinholes "
                f"({', '.join(sorted(_PINHOLE_MODELS))} without distortion)"
            )
        checks = {
            "fl_x": (source.get("fl_x"), fl_x, 1e-3 * fl_x),
            "fl_y": (source.get("fl_y"), fl_x, 1e-3 * fl_x),
            "cx": (source.get("cx"), width / 2.0, 0.5),
            "cy": (source.get("cy"), height / 2.0, 0.5),
            **{k: (source.get(k), 0.0, 1e-6) for k in ("k1", "k2", "k3", "k4", "p1", "p2")},
        }
        for key, (value, expected, tolerance) in checks.items():
            if value is not None and abs(_number(value, f"{where} {key}") - expected) > tolerance:
                raise OrbitDirectoryError(
                    f"{where}: {key} = {value}, but cameras here are pinholes with square pixels, the "
                    f"principal point at the centre and one focal length for all ({key} = {expected:g})"
                )


# What an orbit folder of ours holds: transforms.json, the frames, `sv3d orbit`'s preview.mp4, and the
# hidden temporary files of their atomic writes (left by a killed process)
_ORBIT_FILE = re.compile(r"transforms\.json|frame_\d+\.png|preview\.mp4|\.(transforms\.json|preview)\..*")


def frame_file_names(num_frames: int) -> list[str]:
    """["frame_000.png", ...]: three digits, more only if the orbit needs them."""
    digits = max(3, len(str(max(num_frames - 1, 0))))
    return [f"frame_{i:0{digits}d}.png" for i in range(num_frames)]


def _atomic_write_text(path: Path, text: str) -> None:
    """Write a file through a temporary sibling and a rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # as every output (mkstemp's 0600 would keep it from other users)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_alpha_source(alpha_source: str) -> str:
    if alpha_source not in ALPHA_SOURCES:
        raise InputError(f"alpha_source must be one of {ALPHA_SOURCES}, got {alpha_source!r}")
    return alpha_source


def _check_size(width: int, height: int) -> tuple[int, int]:
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or int(v) != v or v < 1:
            raise InputError(f"{name} must be a positive integer, got {v}")
    return int(width), int(height)


def write_transforms(
    directory: str | Path,
    orbit: Orbit,
    width: int,
    height: int,
    alpha_source: str,
    frame_files: Sequence[str] | None = None,
) -> Path:
    """Write `directory/transforms.json` (instant-ngp / nerfstudio format plus our angles); returns it.

    Top level: camera_model "OPENCV" (pinhole, no distortion), camera_angle_x (horizontal fov, radians),
    w, h, fl_x, fl_y, cx, cy (pixels, principal point at the centre), alpha_source, orbit_kind, radius.
    frames[i]: file_path, transform_matrix (4x4 camera-to-world, OpenGL, as lists), elevation_deg,
    azimuth_deg. The file is written atomically.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"{directory}: not a directory")
    width, height = _check_size(width, height)
    _check_alpha_source(alpha_source)
    names = list(frame_files) if frame_files is not None else frame_file_names(len(orbit))
    if len(names) != len(orbit):
        raise InputError(f"write_transforms: {len(names)} frame files for an orbit of {len(orbit)} frames")

    focal = focal_from_fov(orbit.fov_deg, width)
    matrices = orbit.c2w_float64().tolist()  # V x [4 x [4]]
    frames = [
        {
            "file_path": name,
            "transform_matrix": matrix,
            "elevation_deg": float(e),
            "azimuth_deg": float(a),
        }
        for name, matrix, e, a in zip(
            names, matrices, orbit.elevations_deg.tolist(), orbit.azimuths_deg.tolist(), strict=True
        )
    ]
    meta = {
        "camera_model": "OPENCV",
        "camera_angle_x": math.radians(orbit.fov_deg),
        "w": width,
        "h": height,
        "fl_x": focal,
        "fl_y": focal,
        "cx": width / 2.0,
        "cy": height / 2.0,
        "alpha_source": alpha_source,
        "orbit_kind": orbit.kind,
        "radius": orbit.radius,
        "frames": frames,
    }
    path = directory / TRANSFORMS_FILE
    _atomic_write_text(path, json.dumps(meta, indent=2) + "\n")
    return path


def _number(value: Any, where: str) -> float:
    """A JSON number (not a bool) as a finite float, else OrbitDirectoryError naming `where`."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise OrbitDirectoryError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def _resolve_frame(directory: Path, file_path: Any, where: str, key: str = "file_path") -> Path:
    """A frame's file (or its mask's, `key`): relative to the directory, "./" allowed, a missing
    extension tried as .png etc."""
    if not isinstance(file_path, str) or not file_path:
        raise OrbitDirectoryError(f"{where}: {key} must be a non-empty string, got {file_path!r}")
    path = directory / file_path  # an absolute file_path stays absolute
    if path.is_file():
        return path
    for ext in (".png", ".PNG", ".jpg", ".jpeg", ".JPG"):  # instant-ngp's Blender scenes omit ".png"
        candidate = path.with_name(path.name + ext)
        if candidate.is_file():
            return candidate
    what = "frame" if key == "file_path" else "mask"
    raise OrbitDirectoryError(f"{where}: {what} file {file_path!r} not found in {directory}")


def _png_header(path: Path) -> tuple[int, int, int, int] | None:
    """(width, height, bit depth, colour type) from a PNG's IHDR, or None if the file is no PNG."""
    with open(path, "rb") as f:
        head = f.read(29)
    if len(head) < 29 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    width, height, depth, colour = struct.unpack(">IIBB", head[16:26])
    return width, height, depth, colour


def _image_size(path: Path, where: str) -> tuple[int, int]:
    """(width, height) of an image file, reading only its header."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError) as err:
        raise OrbitDirectoryError(f"{path}: cannot read image ({where}): {err}") from None


def read_transforms(directory: str | Path) -> tuple[Orbit, list[Path], int, int, str]:
    """Read `directory/transforms.json` -> (orbit, frame paths, width, height, alpha_source)."""
    orbit, frame_paths, _, width, height, alpha_source = _read_transforms(directory)
    return orbit, frame_paths, width, height, alpha_source


def orbit_files(directory: str | Path) -> list[Path]:
    """Every file an orbit directory's frames are read from, in order: frames, then their masks."""
    _, frame_paths, mask_paths, *_ = _read_transforms(directory)
    return frame_paths + [p for p in mask_paths if p is not None]


def _read_transforms(directory: str | Path) -> tuple[Orbit, list[Path], list[Path | None], int, int, str]:
    """Read `directory/transforms.json` -> (orbit, frame paths, mask paths, width, height, alpha_source).

    Tolerant of other tools' files: file paths without extension or under "./images/", angles missing
    (derived from the matrices), w/h missing (read from the first image), fov given as fl_x instead of
    camera_angle_x, alpha_source missing ("input": the alpha is whatever the frames carry), orbit_kind
    missing ("explicit"). Matrices that are not the look-at cameras of their angles are kept in
    `orbit.c2w_matrices`. A frame's `mask_path` (nerfstudio's per-frame mask file, None where absent) is
    the object's mask. Strict on errors, each an OrbitDirectoryError naming the file and problem.
    """
    directory = Path(directory)
    path = directory / TRANSFORMS_FILE
    if not directory.is_dir():
        raise OrbitDirectoryError(f"{directory}: orbit directory not found")
    if not path.is_file():
        raise OrbitDirectoryError(f"{path}: missing (an orbit directory needs a {TRANSFORMS_FILE})")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        reason = str(err).splitlines()[0]
        raise OrbitDirectoryError(f"{path}: not valid JSON ({reason})") from None
    if not isinstance(meta, dict):
        raise OrbitDirectoryError(f"{path}: top level must be a JSON object")
    frames = meta.get("frames")
    if not isinstance(frames, list) or not frames:
        raise OrbitDirectoryError(f"{path}: 'frames' must be a non-empty list")

    # 1. Frames: files, matrices, optional angles
    frame_paths: list[Path] = []
    mask_paths: list[Path | None] = []
    matrices: list[np.ndarray] = []
    stored: list[tuple[float, float] | None] = []
    for i, frame in enumerate(frames):
        where = f"{path} frame {i}"
        if not isinstance(frame, dict):
            raise OrbitDirectoryError(f"{where}: must be a JSON object")
        frame_paths.append(_resolve_frame(directory, frame.get("file_path"), where))
        mask = frame.get("mask_path")
        mask_paths.append(None if mask is None else _resolve_frame(directory, mask, where, "mask_path"))
        try:
            matrix = np.asarray(frame.get("transform_matrix"), dtype=np.float64)
        except (TypeError, ValueError):
            raise OrbitDirectoryError(f"{where}: transform_matrix is not a 4x4 matrix of numbers") from None
        if matrix.shape != (4, 4):
            raise OrbitDirectoryError(f"{where}: transform_matrix must be 4x4, got shape {matrix.shape}")
        if not np.isfinite(matrix).all():
            raise OrbitDirectoryError(f"{where}: transform_matrix has non-finite entries")
        _check_camera(matrix, where)
        matrices.append(matrix)
        has_angles = "elevation_deg" in frame and "azimuth_deg" in frame
        stored.append(
            (
                _number(frame["elevation_deg"], f"{where} elevation_deg"),
                _number(frame["azimuth_deg"], f"{where} azimuth_deg"),
            )
            if has_angles
            else None
        )
    c2w = torch.from_numpy(np.stack(matrices))  # [V, 4, 4] float64
    elevations, azimuths, radii = angles_from_c2w(c2w)  # [V] each, float64

    # 2. Stored angles must describe the same cameras (catches azimuth-convention mix-ups)
    for i, angles in enumerate(stored):
        if angles is None:
            continue
        e_file, a_file = angles
        d_az = abs((a_file - azimuths[i].item() + 180.0) % 360.0 - 180.0)
        near_pole = math.cos(math.radians(elevations[i].item())) < 1e-6
        if abs(e_file - elevations[i].item()) > _ANGLE_TOLERANCE_DEG or (
            d_az > _ANGLE_TOLERANCE_DEG and not near_pole
        ):
            raise OrbitDirectoryError(
                f"{path} frame {i}: elevation_deg/azimuth_deg ({e_file:.3f}, {a_file:.3f}) disagree with its "
                f"transform_matrix ({elevations[i].item():.3f}, {azimuths[i].item():.3f})"
            )
        elevations[i], azimuths[i] = e_file, a_file

    # 3. Image size and field of view
    first = frames[0]
    w_raw, h_raw = meta.get("w", first.get("w")), meta.get("h", first.get("h"))
    if w_raw is None or h_raw is None:
        width, height = _image_size(frame_paths[0], "w/h not in transforms.json")
    else:
        width, height = int(_number(w_raw, f"{path} w")), int(_number(h_raw, f"{path} h"))
        if width < 1 or height < 1:
            raise OrbitDirectoryError(f"{path}: w and h must be >= 1, got {width}x{height}")
    if "camera_angle_x" in meta:
        fov_deg = math.degrees(_number(meta["camera_angle_x"], f"{path} camera_angle_x"))
        if not 0.0 < fov_deg < 180.0:
            raise OrbitDirectoryError(f"{path}: camera_angle_x must be in (0, pi) radians, got {fov_deg} deg")
        fl_x = 0.5 * width / math.tan(math.radians(fov_deg) / 2.0)
    elif "fl_x" in meta or "fl_x" in first:
        fl_x = _number(meta.get("fl_x", first.get("fl_x")), f"{path} fl_x")
        if fl_x <= 0:
            raise OrbitDirectoryError(f"{path}: fl_x must be > 0, got {fl_x}")
        fov_deg = math.degrees(2.0 * math.atan(0.5 * width / fl_x))
    else:
        raise OrbitDirectoryError(f"{path}: no field of view (needs camera_angle_x or fl_x)")
    _check_pinhole(meta, frames, fl_x, width, height, path)  # fl_x, fl_y, cx, cy, distortion as ours

    # 4. Orbit metadata
    alpha_source = meta.get("alpha_source", "input")
    if alpha_source not in ALPHA_SOURCES:
        raise OrbitDirectoryError(
            f"{path}: alpha_source must be one of {ALPHA_SOURCES}, got {alpha_source!r}"
        )
    kind = meta.get("orbit_kind", "explicit")
    if kind not in ORBIT_KINDS:
        raise OrbitDirectoryError(f"{path}: orbit_kind must be one of {ORBIT_KINDS}, got {kind!r}")
    radius = _number(meta["radius"], f"{path} radius") if "radius" in meta else float(radii.median())
    try:
        orbit = Orbit(elevations, azimuths, radius=radius, fov_deg=fov_deg, kind=kind)
        lookat = c2w_from_angles(elevations, azimuths, torch.tensor(radius, dtype=torch.float64))  # [V, 4, 4]
        if float((lookat - c2w).abs().max()) > _MATRIX_TOLERANCE * max(radius, 1.0):
            orbit.c2w_matrices = c2w  # foreign cameras: keep them exactly
    except InputError as err:
        raise OrbitDirectoryError(f"{path}: {err}") from None
    return orbit, frame_paths, mask_paths, width, height, alpha_source


# ------------------------------------------------------------------------------------------------
# Orbit directories (frames + transforms.json)
# ------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class OrbitFrames:
    """An orbit with its frames: what `sv3d orbit` and `render-orbit` produce and later stages read."""

    orbit: Orbit
    images: Tensor  # [V, H, W, 4] float32 in [0, 1], straight (not premultiplied) alpha, row 0 = top
    alpha_source: str  # "render" | "input" | "matting"

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[-1] != 4:
            raise InputError(f"images must be [V, H, W, 4], got {tuple(self.images.shape)}")
        if self.images.shape[0] != len(self.orbit):
            raise InputError(f"{self.images.shape[0]} images for an orbit of {len(self.orbit)} frames")
        _check_alpha_source(self.alpha_source)

    def rgb_over(self, background: float | Sequence[float] | Tensor = 1.0) -> Tensor:
        """[V, H, W, 3] colours composited over a background (a grey level or an RGB triple)."""
        rgb, alpha = self.images[..., :3], self.images[..., 3:]  # [V, H, W, 3], [V, H, W, 1]
        bg = torch.as_tensor(background, dtype=rgb.dtype, device=rgb.device).reshape(-1)  # [1] or [3]
        return rgb * alpha + bg * (1.0 - alpha)

    def masks(self, threshold: float = 0.5) -> Tensor:
        """[V, H, W, 1] float32 hard object masks: 1 where alpha > threshold."""
        return (self.images[..., 3:] > threshold).to(torch.float32)


def _write_frame(path: Path, image: np.ndarray, bit_depth: int) -> None:
    """Write one [H, W, 4] float image in [0, 1] as an RGBA PNG of 8 or 16 bits per channel."""
    image = np.clip(image.astype(np.float64), 0.0, 1.0)  # quantised in float64, one frame at a time
    if bit_depth == 8:
        Image.fromarray(np.round(image * 255.0).astype(np.uint8)).save(path)  # [H, W, 4] -> RGBA
        return
    # Pillow cannot write 16-bit colour: pypng can.
    height, width, _ = image.shape
    rows = np.round(image * 65535.0).astype(np.uint16).reshape(height, width * 4)  # [H, W*4]
    with open(path, "wb") as f:
        png.Writer(width, height, bitdepth=16, greyscale=False, alpha=True).write(f, rows)


def _read_png16(path: Path) -> np.ndarray:
    """A 16-bit RGB(A) PNG as [H, W, 4] float32 (Pillow would cut it to 8 bits), through the photo reader's
    16-bit decoding."""
    from .preprocess import _read_png16 as read_deep_png

    try:
        pixels, _ = read_deep_png(path)  # [H, W, C] in [0, 1]
    except InputError as err:
        raise OrbitDirectoryError(f"{path}: cannot decode 16-bit PNG ({err})") from None
    if pixels.shape[-1] == 3:
        pixels = np.concatenate([pixels, np.ones_like(pixels[..., :1])], axis=-1)
    return pixels.astype(np.float32)


# What Pillow raises for a damaged file: OSError, and SyntaxError ("broken PNG file"), ValueError (tiles),
# EOFError, DecompressionBombError (an Exception, not an OSError)
_UNREADABLE = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def _read_frame(path: Path) -> np.ndarray:
    """One frame as [H, W, 4] float32 in [0, 1]; RGB (and grey, palette) frames get alpha = 1."""
    header = _png_header(path)
    if header is not None and header[2] == 16:
        colour = header[3]
        if colour not in (2, 6):
            raise OrbitDirectoryError(f"{path}: 16-bit PNG must be RGB or RGBA (colour type {colour})")
        return _read_png16(path)
    try:
        with Image.open(path) as im:
            if im.mode not in ("RGB", "RGBA", "L", "LA", "P"):
                raise OrbitDirectoryError(f"{path}: unsupported image mode {im.mode} (need RGB or RGBA)")
            rgba = np.asarray(im.convert("RGBA"))  # [H, W, 4] uint8
    except _UNREADABLE as err:
        raise OrbitDirectoryError(f"{path}: cannot read image: {err}") from None
    return rgba.astype(np.float32) / 255.0


def _read_mask(path: Path, height: int, width: int) -> np.ndarray:
    """A frame's separate mask file (nerfstudio's `mask_path`) as [H, W] float32 in [0, 1]: 0 is
    background. Grey (1, 8 or 16 bits) or colour images (their luminance); a mask's alpha is ignored."""
    try:
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                mask = np.asarray(im, dtype=np.float32) / 65535.0  # [H, W]
            else:
                mask = np.asarray(im.convert("L"), dtype=np.float32) / 255.0  # [H, W]
    except _UNREADABLE as err:
        raise OrbitDirectoryError(f"{path}: cannot read mask: {err}") from None
    if mask.shape != (height, width):
        size = f"{mask.shape[1]}x{mask.shape[0]}"
        raise OrbitDirectoryError(f"{path}: mask is {size} but {TRANSFORMS_FILE} says {width}x{height}")
    return np.clip(mask, 0.0, 1.0)


def read_orbit_directory(directory: str | Path) -> OrbitFrames:
    """Read an orbit directory (transforms.json + frames) and check that it is consistent.

    Checks, each failing with a one-line OrbitDirectoryError: every listed frame exists and decodes as
    RGB or RGBA (8- or 16-bit PNG, or any image Pillow reads), all frames have the same size, which is
    square and equals transforms.json's w x h, and the directory holds no frame_*.png that
    transforms.json does not list. A frame's `mask_path` file multiplies its alpha.
    """
    directory = Path(directory)
    orbit, frame_paths, mask_paths, width, height, alpha_source = _read_transforms(directory)
    # compared resolved: transforms.json may name the frames by absolute paths, or through a link
    masks = {p.resolve() for p in mask_paths if p is not None}
    on_disk = sorted(p for p in directory.glob("frame_*.png") if p.resolve() not in masks)
    listed = {p.resolve() for p in frame_paths}
    stray = [p.name for p in on_disk if p.resolve() not in listed][:3]
    if stray or (on_disk and len(on_disk) != len(frame_paths)):
        raise OrbitDirectoryError(
            f"{directory}: holds {len(on_disk)} frame_*.png files but {TRANSFORMS_FILE} lists "
            f"{len(frame_paths)} frames (e.g. unlisted: {stray})"
        )
    seen: set[Path] = set()
    for path in frame_paths:  # one image under two poses: the NeRF would fit a contradiction
        if path.resolve() in seen:
            raise OrbitDirectoryError(f"{directory / TRANSFORMS_FILE}: lists {path.name} for two frames")
        seen.add(path.resolve())
    if width != height:
        where = directory / TRANSFORMS_FILE
        raise OrbitDirectoryError(f"{where}: frames must be square, got {width}x{height}")
    images = []
    for path, mask_path in zip(frame_paths, mask_paths, strict=True):
        image = _read_frame(path)  # [H, W, 4]
        if image.shape[:2] != (height, width):
            size = f"{image.shape[1]}x{image.shape[0]}"
            raise OrbitDirectoryError(f"{path}: frame is {size} but {TRANSFORMS_FILE} says {width}x{height}")
        if mask_path is not None:
            image[..., 3] *= _read_mask(mask_path, height, width)  # [H, W]
        images.append(image)
    stacked = np.stack(images)  # [V, H, W, 4]
    stacked, alpha_source = _masks_for_opaque_frames(stacked, alpha_source, directory)
    return OrbitFrames(orbit, torch.from_numpy(stacked), alpha_source)


def _masks_for_opaque_frames(
    images: np.ndarray, alpha_source: str, directory: Path
) -> tuple[np.ndarray, str]:
    """Frames without an alpha channel (RGB, or alpha 1 everywhere: the original SV3D's mp4 frames, JPEG
    exports, renders without a transparent film) carry no mask, and an all-ones mask would make the
    NeRF fill its whole volume. On SV3D's white background they are matted against it, as `sv3d orbit`
    does (`alpha_source: matting`; the other frames keep their alpha); otherwise one line naming the
    frame. Orbits matted already are left as they are (an opaque matte there is a failed generation,
    which `sv3d run`'s consistency check flags)."""
    from .matting import matte_white_background
    from .preprocess import _border_band

    opaque = images[..., 3].reshape(len(images), -1).min(axis=1) >= 1.0 - 0.5 / 65535  # [V]
    if not opaque.any() or alpha_source == "matting":
        return images, alpha_source
    darkness = [
        float((1.0 - _border_band(images[i, ..., :3])).max(axis=-1).mean()) for i in np.flatnonzero(opaque)
    ]
    not_white = [int(i) for i, d in zip(np.flatnonzero(opaque), darkness, strict=True) if d >= 0.02]
    if not_white:
        raise OrbitDirectoryError(
            f"{directory}: frame {not_white[0]} (0-based) has no mask (alpha 1 everywhere) and its "
            "background is not white: give RGBA frames"
        )
    note = f"sv3d: note: {directory}: {int(opaque.sum())} frame(s) without alpha, matted on their white"
    print(note, file=sys.stderr)
    out = images.copy()
    out[opaque] = matte_white_background(images[opaque, ..., :3])  # [K, H, W, 4]
    return out, "matting"


def _as_rgba(images: Tensor | np.ndarray, num_frames: int) -> np.ndarray:
    """Validate frames to write: [V, H, W, 3|4], square, finite, in [0, 1] -> [V, H, W, 3|4] float32 (the
    frames as given when they are float32: no copy of the whole orbit; `_write_frame` clips and rounds
    each frame; 21 frames at 4096² are 5.6 GB in float32, and were 28 GB in float64 copies)."""
    arr = images.detach().cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] not in (3, 4):
        raise InputError(f"images must be [V, H, W, 4] (or 3 channels), got shape {arr.shape}")
    if arr.shape[0] != num_frames:
        raise InputError(f"{arr.shape[0]} images for an orbit of {num_frames} frames")
    if arr.shape[1] != arr.shape[2] or arr.shape[1] == 0:
        raise InputError(f"frames must be square and non-empty, got {arr.shape[2]}x{arr.shape[1]}")
    arr = arr.astype(np.float32, copy=False)
    lo, hi = float(arr.min()), float(arr.max())  # NaN when any value is (min and max propagate it)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise InputError("images contain non-finite values")
    if lo < -_PIXEL_RANGE_TOLERANCE or hi > 1.0 + _PIXEL_RANGE_TOLERANCE:
        raise InputError(f"images must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    return arr  # rounding overshoot (checked above) is clipped per frame when written


def check_orbit_target(directory: str | Path, overwrite: bool = False) -> None:
    """An InputError unless an orbit may be written to `directory`: a new or empty folder, or with
    `overwrite` an orbit's (replacing removes the whole folder, so never one holding other files: a photo
    beside it is the user's). The stages call it before their work too, not only when writing."""
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise InputError(f"{target}: exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise InputError(f"{target}: directory exists and is not empty (use --force to replace it)")
    if target.is_dir() and overwrite:
        foreign = sorted(p.name for p in target.iterdir() if not _ORBIT_FILE.fullmatch(p.name))
        if foreign:
            raise InputError(
                f"{target}: holds files that are not an orbit's ({', '.join(foreign[:3])}); replacing it "
                "would delete them: use an empty or new directory"
            )


def write_orbit_directory(
    directory: str | Path,
    orbit: Orbit,
    images: Tensor | np.ndarray,  # [V, H, W, 4] in [0, 1], straight alpha
    alpha_source: str,
    *,
    overwrite: bool = False,
    bit_depth: int = 8,
) -> Path:
    """Write frames `frame_000.png`... (RGBA, 8 or 16 bits) and transforms.json, atomically.

    Everything is written into a temporary sibling directory that is renamed onto `directory` at the
    end, so readers see the old directory or the complete new one; on any failure nothing is left
    behind (and an overwritten directory is restored). A target that exists and is non-empty raises
    InputError unless `overwrite=True`. Returns the directory.
    """
    # 1. Check inputs before touching the disk
    target = Path(directory)
    _check_alpha_source(alpha_source)
    if bit_depth not in (8, 16):
        raise InputError(f"bit_depth must be 8 or 16, got {bit_depth}")
    rgba = _as_rgba(images, len(orbit))  # [V, H, W, 4]
    check_orbit_target(target, overwrite)

    # 2. Create missing parents, remembering them so that a failure removes them again
    created: list[Path] = []
    parent = target.absolute().parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    for p in reversed(created):
        p.mkdir()
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.absolute().parent))
    backup: Path | None = None
    try:
        # 3. Write everything into the staging directory
        names = frame_file_names(len(orbit))
        for name, image in zip(names, rgba, strict=True):
            if image.shape[-1] == 3:  # opaque frames
                image = np.concatenate([image, np.ones_like(image[..., :1])], axis=-1)
            _write_frame(staging / name, image, bit_depth)
        write_transforms(staging, orbit, rgba.shape[2], rgba.shape[1], alpha_source, names)
        os.chmod(staging, 0o755)  # as every output folder (mkdtemp's 0700 would keep it from others)
        # 4. Swap it in: move an existing target aside, rename, then drop the old one
        if target.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=staging.parent))
            backup.rmdir()
            os.replace(target, backup)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if backup is not None and backup.exists() and not target.exists():
            os.replace(backup, target)
        for p in created:  # deepest first; only those this call made, and only if still empty
            try:
                p.rmdir()
            except OSError:
                break
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    return target
