"""Alpha for generated frames: matting against SV3D's known white background.

SV3D renders objects on pure white. A frame pixel I = a F + (1 - a) * 1, so 1 - I = a (1 - F): darkness is
coverage times the object's own darkness. The object is what a ramp of the darkness max_c(1 - I_c) between
`low` (JPEG-like noise on white) and `high` puts above 1/2 (darkness 0.07; a body lighter than 0.93 in
every channel is not found as object) and what it encloses; beyond 2 px of its outline every pixel is
fully covered; on the outline, coverage is the pixel's darkness over the object's own darkness next to it
(the darkest interior pixel within 4 px; noise under `low` is background), so a dark object's half-covered
pixel reads 1/2, not opaque in a light blend of its colour and the white. It fills
enclosed white regions (white parts of the object surrounded by it, e.g. a white label) unless they are
holes one sees the background through (a mug's handle: at least `hole_min` of the object's area and pure
background white, darkness < `low`, on 90% of their pixels), keep components that are not specks, and un-
premultiply the colour.
This is an estimate (pure-white parts touching the silhouette are lost); frames carry
`alpha_source: matting` so that later stages know it.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["matte_white_background"]


def matte_white_background(
    frames: np.ndarray,  # [T, H, W, 3] float in [0, 1], objects on white
    low: float = 0.02,  # darkness below this is background noise
    high: float = 0.12,  # the ramp that finds the object: darkness above this is covered
    min_component: float = 1e-3,  # drop components under this fraction of the image
    hole_min: float = 0.005,  # enclosed pure-white regions at least this fraction of the object: holes
) -> np.ndarray:
    """-> [T, H, W, 4] straight RGBA in [0, 1]."""
    darkness = (1.0 - frames).max(axis=-1)  # [T, H, W]
    alpha = np.clip((darkness - low) / (high - low), 0.0, 1.0)
    out = np.empty(frames.shape[:-1] + (4,), dtype=np.float32)
    min_pixels = min_component * frames.shape[1] * frames.shape[2]
    for t in range(frames.shape[0]):  # per frame (21): the image ops below are vectorised
        hard = alpha[t] > 0.5
        labels, n = ndimage.label(hard)
        if n:
            sizes = ndimage.sum(hard, labels, index=np.arange(1, n + 1))
            hard = np.isin(labels, 1 + np.flatnonzero(sizes >= min_pixels))
        filled = ndimage.binary_fill_holes(hard)
        enclosed, k = ndimage.label(filled & ~hard)  # [H, W] ids of the enclosed white regions, k of them
        if k:  # holes: large and pure background white; the rest (labels, print) is object
            ids = np.arange(1, k + 1)
            sizes = ndimage.sum_labels(np.ones(enclosed.shape), enclosed, index=ids)  # [k]
            white = ndimage.sum_labels(darkness[t] < low, enclosed, index=ids)  # [k]
            holes = ids[(sizes >= hole_min * filled.sum()) & (white >= 0.9 * sizes)]  # [K] their ids
            filled &= ~np.isin(enclosed, holes)
        # Inside the object (beyond 2 px of its outline) every pixel is fully covered: the darkness ramp
        # judges coverage only at the outline (a light-grey body, darkness 0.08, read alpha 0.6 there and
        # a darker colour); enclosed white (labels) is object as well
        interior = ndimage.binary_erosion(filled, iterations=2)
        # At the outline, coverage = darkness / the object's own darkness next to it (darkness = a (1 - F)):
        # the ramp alone read a dark object's half-covered pixel as opaque (a light rim in its colour) and
        # a light one's as too faint. Its own darkness: the max over the interior pixels within 4 px, or
        # over the object's for thin parts without interior.
        reach = ndimage.maximum_filter(np.where(interior, darkness[t], 0.0), size=9)
        reach = np.where(
            reach > high, reach, ndimage.maximum_filter(np.where(filled, darkness[t], 0.0), size=9)
        )
        soft = np.where(darkness[t] > low, np.clip(darkness[t] / np.maximum(reach, 2 * low), 0.0, 1.0), 0.0)
        a = np.where(interior | (filled & ~hard), 1.0, soft)
        a = np.where(ndimage.binary_dilation(filled, iterations=2), a, 0.0)  # specks far from it: none
        rgb = frames[t]
        straight = np.where(
            a[..., None] > 1e-3, (rgb - (1.0 - a[..., None])) / np.maximum(a[..., None], 1e-3), 0
        )
        out[t, ..., :3] = np.clip(straight, 0.0, 1.0)
        out[t, ..., 3] = a
    return out
