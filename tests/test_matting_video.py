"""Matting generated frames against white, and preview videos."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sv3d.matting import matte_white_background
from sv3d.video import write_video


def test_matting_recovers_a_known_composite():
    # A disc of colour F = (0.2, 0.5, 0.8) with a soft edge, composited over white, with an off-white "label"
    # inside it (which matting must keep as object: the object surrounds it and it is not background white).
    h = w = 96
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    r = np.hypot(xx - 48, yy - 48)
    alpha = np.clip(30.0 - r, 0.0, 1.0)  # [H, W], a one-pixel soft edge
    colour = np.broadcast_to(np.array([0.2, 0.5, 0.8]), (h, w, 3)).copy()
    colour[(np.abs(xx - 48) < 5) & (np.abs(yy - 48) < 5)] = 0.95  # white label, shaded as objects are
    frame = alpha[..., None] * colour + (1.0 - alpha[..., None])
    rgba = matte_white_background(frame[None])[0]
    assert np.abs(rgba[..., 3] - alpha).mean() < 0.01
    inside = alpha > 0.99
    assert rgba[..., 3][inside].min() == 1.0  # the white label stays object
    assert np.allclose(rgba[..., :3][inside], colour[inside], atol=1e-5)
    assert rgba[..., 3][r > 32].max() == 0.0


def test_a_light_object_is_opaque_inside():
    """A light-grey body (0.90: darkness 0.10, under the ramp's 0.12) read alpha 0.8 all over and a darker
    colour (0.875): only its outline is soft now, and its colour is its own."""
    h = w = 96
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    r = np.hypot(xx - 48, yy - 48)
    alpha = np.clip(30.0 - r, 0.0, 1.0)  # [H, W]
    frame = alpha[..., None] * np.array([0.90, 0.90, 0.92]) + (1.0 - alpha[..., None])
    rgba = matte_white_background(frame[None])[0]
    inside = r < 27
    assert rgba[..., 3][inside].min() == 1.0
    assert np.allclose(rgba[..., :3][inside], [0.90, 0.90, 0.92], atol=1e-5)
    assert rgba[..., 3][r > 32].max() == 0.0


def test_matting_keeps_holes_one_sees_the_background_through():
    # a ring (a mug's handle seen from the side): its inside shows the pure-white background, so it is a
    # hole; a speck of pure white inside the ring's band (a highlight, 4 px) stays object
    h = w = 96
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    r = np.hypot(xx - 48, yy - 48)
    alpha = np.clip(30.0 - r, 0.0, 1.0) * np.clip(r - 14.0, 0.0, 1.0)  # [H, W] ring, radii 14 to 30
    frame = alpha[..., None] * np.array([0.6, 0.3, 0.2]) + (1.0 - alpha[..., None])
    frame[22:24, 47:49] = 1.0  # the highlight, inside the band
    rgba = matte_white_background(frame[None])[0]
    assert rgba[..., 3][r < 13].max() == 0.0  # the hole is background
    assert rgba[22:24, 47:49, 3].min() == 1.0  # the highlight is object
    assert np.abs(rgba[..., 3] - alpha).mean() < 0.02  # two soft edges (the disc's test has one: 0.01)


def test_write_video_atomic_and_readable(tmp_path: Path):
    import imageio.v3 as iio

    frames = np.random.default_rng(0).random((5, 32, 48, 4)).astype(np.float32)
    path = write_video(tmp_path / "preview.mp4", frames, fps=7)
    assert path.is_file() and [p.name for p in tmp_path.iterdir()] == ["preview.mp4"]
    back = iio.imread(path)
    assert back.shape[0] == 5 and back.shape[1:3] == (32, 48)


def test_outline_coverage_follows_the_objects_own_darkness():
    """darkness = a (1 - F): at the outline the ramp alone read a dark disc's 15%-covered pixels as opaque
    (a light rim of the blended colour: alpha off by up to 0.84, colour by 0.55 for grey 0.1) and a light
    disc's as too faint. Per pixel of a one-pixel soft edge, as generated frames antialias."""
    h = w = 96
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    r = np.hypot(xx - 48, yy - 48)
    alpha = np.clip(30.0 - r, 0.0, 1.0)  # [H, W]
    edge = (alpha > 0.05) & (alpha < 0.95)
    for grey in (0.1, 0.5, 0.85):
        colour = np.array([grey, grey, grey + 0.05])
        frame = alpha[..., None] * colour + (1.0 - alpha[..., None])
        rgba = matte_white_background(frame[None])[0]
        # the light disc's faintest edge pixels are under the noise floor (darkness 0.02): 0.09 off
        assert np.abs(rgba[..., 3][edge] - alpha[edge]).max() < 0.1
        solid = edge & (alpha > 0.3)
        assert np.abs(rgba[..., :3][solid] - colour).max() < 0.01
