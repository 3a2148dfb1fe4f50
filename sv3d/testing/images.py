"""Small synthetic input images for tests: an RGBA photo stand-in that needs no files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["rgba_disc"]


def rgba_disc(path: Path, size: int = 80) -> Path:
    """Write a red disc (radius size/3) on a transparent square of `size` pixels to `path`; return it."""
    yy, xx = np.mgrid[0:size, 0:size]
    alpha = ((xx - size / 2) ** 2 + (yy - size / 2) ** 2 < (size / 3) ** 2).astype(np.uint8) * 255
    rgb = np.zeros((size, size, 3), np.uint8) + np.array([200, 60, 40], np.uint8)
    Image.fromarray(np.dstack([rgb, alpha])).save(path)
    return path
