"""Photo preprocessing on large photos: seconds and peak memory of `preprocess_image`, and the plain
matting's speck-removing opening against scipy's disk opening, both measured in this run.

    python scripts/bench_preprocess.py [--megapixels 12 48] [--no-baseline]

Each photo is a synthetic JPEG (4:3, a plain light backdrop with sensor noise, a dark round object with a
thin stem filling a third of the height) read from disk and preprocessed for SV3D (576²) with the
built-in plain-background matting, as `sv3d run photo.jpg` does without rembg. The opening's radius is
0.3% of the photo's smaller side (18 px at 48 MP), as in the matting.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from sv3d.preprocess import _disk, _open_with_disk, preprocess_image


def write_photo(path: Path, megapixels: float) -> tuple[int, int]:
    """A synthetic photo of about `megapixels` million pixels (4:3) as a JPEG -> (height, width)."""
    height = int(math.sqrt(megapixels * 1e6 * 3 / 4))
    width = height * 4 // 3
    rng = np.random.default_rng(0)
    photo = np.full((height, width, 3), 235, np.uint8)
    for row in range(0, height, 512):  # in bands: no full-size float temporaries
        rows = slice(row, min(row + 512, height))
        y = np.arange(rows.start, rows.stop)[:, None]
        x = np.arange(width)[None, :]
        body = (y - height / 2) ** 2 + (x - width / 2) ** 2 < (height / 6) ** 2
        stem = (np.abs(x - width / 2) < max(2, width // 1000)) & (y > height / 2) & (y < height * 0.85)
        photo[rows][body | stem] = (120, 60, 30)
        photo[rows] = np.clip(photo[rows] + rng.integers(-3, 4, photo[rows].shape), 0, 255)
    Image.fromarray(photo).save(path, quality=92)
    return height, width


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megapixels", type=float, nargs="+", default=[12.0, 48.0])
    parser.add_argument("--no-baseline", action="store_true", help="skip scipy's opening (slow at 48 MP)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for megapixels in args.megapixels:
            path = Path(tmp) / "photo.jpg"
            height, width = write_photo(path, megapixels)
            start = time.perf_counter()
            preprocess_image(path, size=576, background="plain")
            seconds = time.perf_counter() - start
            tracemalloc.start()  # a second run for the memory: tracing slows numpy's allocations
            preprocess_image(path, size=576, background="plain")
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            print(
                f"{width}x{height} ({width * height / 1e6:.1f} MP): preprocess_image {seconds:.2f} s, "
                f"peak traced memory {peak / 2**30:.2f} GiB"
            )
            mask = np.asarray(Image.open(path).convert("L")) < 180  # [H, W] the object, roughly
            radius = max(1, round(0.003 * min(height, width)))
            start = time.perf_counter()
            ours = _open_with_disk(mask, radius)
            ours_s = time.perf_counter() - start
            if args.no_baseline:
                print(f"  opening (radius {radius} px): {ours_s:.2f} s")
                continue
            start = time.perf_counter()
            theirs = ndimage.binary_opening(mask, structure=_disk(radius))
            theirs_s = time.perf_counter() - start
            print(
                f"  opening (radius {radius} px): distance transforms {ours_s:.2f} s, scipy's binary_opening "
                f"{theirs_s:.2f} s ({theirs_s / ours_s:.1f}x), equal: {np.array_equal(ours, theirs)}"
            )


if __name__ == "__main__":
    main()
