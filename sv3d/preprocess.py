"""Input-image preprocessing for SV3D: read a real photo, find the object, centre it on a white square.

The reference (Stability-AI/generative-models `scripts/sampling/simple_video_sample.py`, `sv3d` branch)
takes the alpha of an RGBA input as the mask, otherwise runs `rembg.remove(..., alpha_matting=True)` on
a <= 768 px thumbnail; it crops the alpha > 0 bounding box, pastes it centred on a transparent square,
resizes to 576 x 576 with Lanczos and composites on white. This module does the same, robustly:

* `load_image` reads any file Pillow reads (plus HEIC through pillow-heif, 16-bit PNG through
  imagecodecs' libpng, and 16-bit and float TIFF through tifffile, with imagecodecs for LZW, zstd and
  other compressions: Pillow would truncate them to 8 bits or cannot open them; deep files with an ICC
  profile other than sRGB go through Pillow's 8-bit conversion), applies the EXIF orientation, converts
  palette, greyscale, CMYK and embedded ICC profiles to sRGB, and returns float arrays in [0, 1].
* `remove_background` uses rembg when it and its weights are installed (optional extra, imported lazily,
  never downloading), or a built-in matting for plain backgrounds (`plain_background_alpha`); through
  `preprocess_image` the built-in one also gives the object's own colour on its soft edge
  (`plain_background_matte`: no fringe of a coloured backdrop).
* `frame_object` centres and scales the object by its *bounding circle* so that it fills the frame as a
  placed mesh does in our world (below), resampling premultiplied colour so that no dark fringe leaks
  from transparent pixels (the reference resizes straight RGBA, which does).
* `preprocess_image` chains them: `(image [1, 3, S, S] in [-1, 1] on white, alpha [S, S] in [0, 1])`.

Frame ratio (ARCHITECTURE.md "World" and "Cameras")
---------------------------------------------------
A mesh is placed with its bounding sphere (radius r = 0.5) at the origin and seen from distance d = 2
with a field of view of 33.8 deg. The sphere's silhouette is a cone of half-angle asin(r / d); on the
image plane (focal length 1) it is a disk of radius tan(asin(r / d)) = r / sqrt(d^2 - r^2) = 0.2582,
while the half-width of the image is tan(33.8 deg / 2) = 0.3038. So the bounding sphere's image spans
0.2582 / 0.3038 = 0.850 of the half-width: `SPHERE_FRAME_RATIO`. In a single image the nearest analogue
of the bounding sphere is the object's bounding circle about its bounding-box centre (the 3D bounding
box centre projects close to the 2D one, and a sphere containing the object contains its silhouette),
so by default the object's bbox centre goes to the image centre and its farthest pixel to 0.850 of the
half-width. `frame_ratio` = bounding-circle diameter / canvas side overrides it; it differs from the
reference's `image_frame_ratio` (bbox side / canvas side): a square object at our default has
bbox side / canvas = 0.850 / sqrt(2) = 0.60, a round one 0.850. The object always stays inside the frame
(the reference's bbox rule lets a square's corners reach 0.850 * sqrt(2) = 1.2 of the half-width).

Premultiplied alpha
-------------------
PNG stores straight alpha; some tools write premultiplied colour anyway, and TIFF declares it
(ExtraSamples = 1, "associated alpha"). `load_image(premultiplied=None)` un-premultiplies when the file
declares it (TIFF associated alpha: Pillow already divides 8-bit data, we divide 16-bit data read
through tifffile; Pillow's RGBa/La modes) or when the data are only consistent with
premultiplication: no pixel is brighter than its alpha, fully transparent pixels are black, at least 16
pixels are semi-transparent, and the opaque part is not dark (median brightness >= 0.25; a dark object
with straight alpha satisfies the first conditions too, and for it the choice hardly matters: the error
after compositing is alpha (1 - alpha) c <= c / 4). Pass True/False to force either reading.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from scipy import ndimage
from torch import Tensor

from sv3d.cameras import CAMERA_RADIUS, FOV_DEG, OBJECT_RADIUS
from sv3d.errors import InputError

__all__ = [
    "MIN_IMAGE_SIZE",
    "SPHERE_FRAME_RATIO",
    "frame_object",
    "load_image",
    "plain_background_alpha",
    "plain_background_matte",
    "preprocess_image",
    "rembg_alpha",
    "rembg_available",
    "remove_background",
]

# Bounding sphere's image diameter / image side for a placed object (module docstring): 0.8498.
SPHERE_FRAME_RATIO = math.tan(math.asin(OBJECT_RADIUS / CAMERA_RADIUS)) / math.tan(math.radians(FOV_DEG / 2))
MIN_IMAGE_SIZE = 32  # px, smaller side; below this there is nothing to centre (SV3D works at 576)
OBJECT_ALPHA_THRESHOLD = 0.5  # the object's extent is its half-coverage contour (antialiased edges, haze)
FAINT_ALPHA_THRESHOLD = 0.05  # used instead when nothing reaches 0.5 (a faint, semi-transparent object)
SPECK_FRACTION = 0.01  # components of the object's mask under this share of the largest one are specks
MIN_OBJECT_RADIUS = 2.0  # px in the input: smaller objects are noise, not something to reconstruct
REMBG_MODEL = "u2net"  # rembg's default session, the one the reference's `rembg.remove` uses
REMBG_MAX_SIDE = 768  # the reference runs rembg on a 768 px thumbnail
_EXIF_ORIENTATION = 0x0112

Background = Literal["auto", "rembg", "plain"]


# ---------------------------------------------------------------- reading


def _png_bit_depth(path: Path) -> int:
    """Bit depth from a PNG's IHDR (byte 24), or 0 when the header is not a PNG's."""
    with open(path, "rb") as f:
        head = f.read(26)
    return head[24] if len(head) == 26 and head[:8] == b"\x89PNG\r\n\x1a\n" else 0


def _read_png16(path: Path) -> tuple[np.ndarray, bool]:
    """16-bit PNG through libpng (imagecodecs; Pillow reads 16-bit colour PNGs as 8-bit): [H, W, C] float32,
    C = 1..4, a tRNS colour key expanded to alpha. (pypng's pure-Python unfiltering took 4.1 s for a
    1920 x 1080 RGBA render with Paeth filters; libpng 0.07 s.)"""
    import imagecodecs

    try:
        raw = path.read_bytes()
        with _quiet_logger("imagecodecs"):  # libpng's warning about interlaced files, which it reads well
            data = imagecodecs.png_decode(raw)  # [H, W] or [H, W, C] uint16
    except imagecodecs.PngError as exc:
        raise InputError(f"cannot read image {path}: corrupt 16-bit PNG ({_first_line(exc)})") from exc
    data = data[..., None] if data.ndim == 2 else data
    bits = _png_significant_bits(raw)  # fewer significant bits stored high: as pypng, read at that depth
    if bits < 16:
        return (data >> (16 - bits)).astype(np.float32) / float(2**bits - 1), False
    return data.astype(np.float32) / 65535.0, False


def _png_significant_bits(raw: bytes) -> int:
    """The most significant bits of any channel that a 16-bit PNG's sBIT chunk declares, else 16."""
    at = 8  # past the signature
    while at + 8 <= len(raw):
        length, kind = int.from_bytes(raw[at : at + 4], "big"), raw[at + 4 : at + 8]
        if kind == b"sBIT":
            declared = raw[at + 8 : at + 8 + length]
            valid = 1 <= length <= 4 and all(1 <= bits <= 16 for bits in declared)
            return max(declared) if valid else 16  # an invalid chunk is ignored, as libpng does
        if kind in (b"IDAT", b"IEND"):
            return 16
        at += 12 + length  # the chunk's length, type, data and CRC
    return 16


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """The logger `name` (a library's warnings about a broken file) silenced for the block."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _is_tiff(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # classic and BigTIFF


def _read_tiff_deep(path: Path) -> tuple[np.ndarray, bool, int] | None:
    """A TIFF with more than 8 bits per sample (16-bit, float) through tifffile, which Pillow truncates or
    cannot open -> ([H, W, C] float32, premultiplied declared, EXIF-style orientation). None where Pillow's
    8-bit reading is to be used: 8-bit data, colour spaces other than RGB and grey, an ICC profile other
    than sRGB (Pillow converts it), a file without pages, or data tifffile cannot decode (a note)."""
    try:
        import tifffile
    except ImportError:  # tifffile comes with scikit-image; without it Pillow's 8-bit reading is used
        return None
    try:
        with _quiet_logger("tifffile"), tifffile.TiffFile(path) as tif:  # Pillow says what is broken
            if not tif.pages:
                return None
            page = tif.pages[0]
            subfile = page.tags.get("NewSubfileType")
            if "DNGVersion" in page.tags or (subfile is not None and int(subfile.value) & 1):
                # NEF, DNG, ...: TIFF containers whose first image is a small preview (Pillow read that)
                raise InputError(
                    f"cannot read image {path}: a camera raw file (its first image is a "
                    f"{page.shape[1]}x{page.shape[0]} preview); export the photo as JPEG, PNG or TIFF"
                )
            if page.bitspersample <= 8 or str(page.photometric.name) not in ("RGB", "MINISBLACK"):
                return None
            icc = page.tags.get("InterColorProfile")
            if icc is not None and not _is_srgb(bytes(icc.value)):
                return None
            limit = Image.MAX_IMAGE_PIXELS  # None: the user turned Pillow's limit off
            if limit is not None and math.prod(page.shape) > 2 * limit * max(page.samplesperpixel, 1):
                raise InputError(  # as Pillow's decompression-bomb limit, before allocating
                    f"cannot read image {path}: {page.shape} samples exceed the limit of "
                    f"{2 * Image.MAX_IMAGE_PIXELS} pixels (a decompression bomb?)"
                )
            data = page.asarray()  # [H, W, C], [C, H, W] (planar) or [H, W]
            if page.axes.startswith("S"):  # planar configuration: samples first
                data = np.moveaxis(data, 0, -1)  # [C, H, W] -> [H, W, C]
            extras = tuple(int(e) for e in page.extrasamples)
            colours = 3 if str(page.photometric.name) == "RGB" else 1
            orientation_tag = page.tags.get("Orientation")
            orientation = int(orientation_tag.value) if orientation_tag is not None else 1
    except tifffile.TiffFileError:
        return None  # Pillow reads it or says what is wrong with it
    except InputError:
        raise
    except Exception as exc:  # a codec tifffile lacks, a broken tag, ...: Pillow reads it or says why
        print(f"sv3d: note: {path.name}: read through Pillow ({_first_line(exc)})", file=sys.stderr)
        return None
    data = data[..., None] if data.ndim == 2 else data
    # Extra samples: the first is alpha when declared so (1 associated, 2 unassociated), or, undeclared,
    # when it is the only one; others ("unspecified": Photoshop's saved selections) are dropped, as Pillow
    # drops them from 8-bit files
    alpha_kept = data.shape[-1] > colours and (
        extras[:1] in ((1,), (2,)) or (not extras and data.shape[-1] == colours + 1)
    )
    data = data[..., : colours + int(alpha_kept)]
    if np.issubdtype(data.dtype, np.integer):
        values = data.astype(np.float32) / float(np.iinfo(data.dtype).max)
    else:
        values = np.clip(np.nan_to_num(data.astype(np.float32)), 0.0, 1.0)
    return values, alpha_kept and bool(extras) and extras[0] == 1, orientation  # 1: associated alpha


def _is_srgb(icc: bytes) -> bool:
    """Whether an embedded ICC profile behaves as sRGB (or cannot be told: then nothing converts it anyway):
    grey, red, green and blue ramps through it to sRGB stay within 2 of 255 levels. By behaviour, not by
    name: GIMP's "Linear sRGB" (gamma 1) and Krita's sRGB-elle-V2-g10 carry "sRGB" in theirs."""
    try:
        from PIL import ImageCms

        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        space = profile.profile.xcolor_space.strip()
        ramp = np.arange(256, dtype=np.uint8)  # [256]
        if space == "GRAY":
            image = Image.fromarray(ramp[None, :], "L")  # [1, 256]
        elif space == "RGB":
            zero = np.zeros_like(ramp)
            rows = [(ramp, ramp, ramp), (ramp, zero, zero), (zero, ramp, zero), (zero, zero, ramp)]
            image = Image.fromarray(np.stack([np.stack(row, axis=-1) for row in rows]), "RGB")  # [4, 256, 3]
        else:
            return False  # CMYK, Lab...: not sRGB
        converted = ImageCms.profileToProfile(
            image, profile, ImageCms.createProfile("sRGB"), outputMode="RGB"
        )
    except Exception:  # noqa: BLE001 - no ImageCms, or littlecms's own error types
        return True
    difference = np.abs(np.asarray(converted, np.int16) - np.asarray(image.convert("RGB"), np.int16))
    return int(difference.max()) <= 2


def _to_srgb(img: Image.Image) -> Image.Image:
    """Applies an embedded ICC profile (CMYK, Display P3, Adobe RGB photos) to get sRGB; else unchanged."""
    icc = img.info.get("icc_profile")
    if not icc or img.mode not in ("RGB", "RGBA", "CMYK", "L"):
        return img
    out_mode = {"CMYK": "RGB", "L": "RGB"}.get(img.mode, img.mode)
    try:
        from PIL import ImageCms  # needs Pillow built with littlecms
    except ImportError:
        return img
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        converted = ImageCms.profileToProfile(
            img, source, ImageCms.createProfile("sRGB"), outputMode=out_mode
        )
    except (ImageCms.PyCMSError, OSError, ValueError):  # a broken profile: fall back to the naive reading
        return img
    return converted if converted is not None else img


def _pil_to_float(img: Image.Image) -> tuple[np.ndarray, bool]:
    """Pillow image -> ([H, W, C] float32 in [0, 1] with C = 1..4, premultiplication declared by the file)."""
    mode = img.mode
    if mode == "1":
        img, mode = img.convert("L"), "L"
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
        mode = img.mode
    elif mode in ("RGB", "L") and "transparency" in img.info:  # a PNG's colour key (tRNS): its alpha
        img = img.convert("RGBA" if mode == "RGB" else "LA")
        mode = img.mode
    if mode in ("RGB", "RGBA", "CMYK", "L"):
        img = _to_srgb(img)
        mode = img.mode
    if mode in ("RGBa", "La"):  # premultiplied modes: keep the raw values, divide in float (more precise)
        return np.asarray(img, dtype=np.float32).reshape(img.height, img.width, -1) / 255.0, True
    if mode.startswith("I;16"):
        return np.asarray(img, dtype=np.float32)[..., None] / 65535.0, False
    if mode == "I":  # 32-bit integer grey: taken as 16-bit data (what PNG/TIFF readers produce)
        return np.clip(np.asarray(img, dtype=np.float32) / 65535.0, 0.0, 1.0)[..., None], False
    if mode == "F":  # float grey (TIFF): taken as [0, 1]
        return np.clip(np.nan_to_num(np.asarray(img, dtype=np.float32)), 0.0, 1.0)[..., None], False
    if mode in ("L", "LA", "RGB", "RGBA"):
        return np.asarray(img, dtype=np.float32).reshape(img.height, img.width, -1) / 255.0, False
    if mode == "RGBX":
        return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0, False
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0, False  # CMYK, YCbCr, LAB, HSV


def _orient(data: np.ndarray, orientation: int) -> np.ndarray:
    """Applies EXIF orientation 1..8 to [H, W, ...] (as `PIL.ImageOps.exif_transpose`)."""
    if orientation == 2:
        return data[:, ::-1]  # mirror left-right
    if orientation == 3:
        return data[::-1, ::-1]  # rotate 180
    if orientation == 4:
        return data[::-1]  # mirror top-bottom
    if orientation == 5:
        return data.swapaxes(0, 1)  # transpose: [H, W] -> [W, H]
    if orientation == 6:
        return np.rot90(data, -1)  # rotate 90 clockwise: [H, W] -> [W, H]
    if orientation == 7:
        return data[::-1, ::-1].swapaxes(0, 1)  # transverse: [H, W] -> [W, H]
    if orientation == 8:
        return np.rot90(data, 1)  # rotate 90 counter-clockwise: [H, W] -> [W, H]
    return data


def _looks_premultiplied(rgb: np.ndarray, alpha: np.ndarray, tol: float) -> bool:
    """The module docstring's test: data only consistent with premultiplied colour."""
    if np.any(rgb.max(axis=-1) > alpha + tol):
        return False
    if np.any(rgb[alpha <= tol] > tol):
        return False
    semi = (alpha > 0.02) & (alpha < 0.98)
    opaque = alpha >= 0.98
    if semi.sum() < 16 or not opaque.any():
        return False
    return float(np.median(rgb[opaque].mean(axis=-1))) >= 0.25


def _split_channels(
    data: np.ndarray, name: str, premultiplied: bool | None, declared: bool, quantum: float
) -> tuple[np.ndarray, np.ndarray | None]:
    """[H, W, C] in [0, 1] -> (rgb [H, W, 3], alpha [H, W] or None); straight colour in the result."""
    channels = data.shape[-1]
    if channels not in (1, 2, 3, 4):
        raise InputError(
            f"{name}: {channels} channels, expected 1 (grey), 2 (grey+alpha), 3 (RGB) or 4 (RGBA)"
        )
    colour = data[..., : 1 if channels <= 2 else 3]
    rgb = np.repeat(colour, 3, axis=-1) if colour.shape[-1] == 1 else colour  # [H, W, 1] -> [H, W, 3]
    if channels in (1, 3):
        return np.ascontiguousarray(rgb, dtype=np.float32), None
    alpha = data[..., -1].astype(np.float32)
    if premultiplied is None:
        premultiplied = declared or _looks_premultiplied(rgb, alpha, tol=quantum)
    if premultiplied:
        safe = np.maximum(alpha, 1e-12)[..., None]
        rgb = np.where(alpha[..., None] > 0, np.clip(rgb / safe, 0.0, 1.0), 0.0)
    if np.all(alpha >= 1.0 - quantum / 2):  # an opaque alpha channel carries no mask (screenshots, exports)
        return np.ascontiguousarray(rgb, dtype=np.float32), None
    return np.ascontiguousarray(rgb, dtype=np.float32), np.ascontiguousarray(alpha)


def load_image(
    path: str | os.PathLike[str], premultiplied: bool | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Reads an image file as straight-alpha sRGB floats.

    Args:
        path: any format Pillow reads (PNG, JPEG, TIFF, WebP, AVIF, BMP, GIF: first frame, ...) and HEIC.
        premultiplied: None detects (module docstring), True/False forces the reading of the colour.

    Returns:
        rgb: [H, W, 3] float32 in [0, 1], after the EXIF orientation (H, W as displayed).
        alpha: [H, W] float32 in [0, 1], or None when the file has no alpha or an all-opaque one.

    Raises:
        InputError: missing file, directory, not an image, corrupt or truncated data.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"image file {path} not found")
    if path.is_dir():
        raise InputError(f"{path} is a directory, expected an image file")
    with warnings.catch_warnings(record=True) as caught:  # the caller's filters apply as they are raised
        data, declared, orientation, quantum = _decode(path)
    for w in caught:  # a file that reads shows its readers' warnings; a broken one only its error
        warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)
    data = _orient(data, orientation)
    return _split_channels(data, str(path), premultiplied, declared, quantum)


def _decode(path: Path) -> tuple[np.ndarray, bool, int, float]:
    """`load_image`'s reading: ([H, W, C] float32 in [0, 1] as stored, premultiplication declared by the
    file, EXIF-style orientation, quantum: one step of the stored values)."""
    heif = _register_heif()
    try:
        tiff = _is_tiff(path) and _read_tiff_deep(path)  # before Pillow, which cannot open float RGB
        if tiff:
            data, declared, orientation = tiff
            quantum = 1.0 / 65535.0
        else:
            with Image.open(path) as img:
                img.load()  # decodes everything now: truncated or corrupt data raise here
                orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1) or 1)
                deep = None
                icc = img.info.get("icc_profile")
                if img.format == "PNG" and _png_bit_depth(path) == 16 and (not icc or _is_srgb(icc)):
                    deep = _read_png16(path)  # with another profile: Pillow's 8 bits, converted to sRGB
                data, declared = deep if deep is not None else _pil_to_float(img)
                sixteen = deep is not None or img.mode.startswith("I") or img.mode == "F"  # 16-bit grey too
                quantum = 1.0 / 65535.0 if sixteen else 1.0 / 255.0
    except InputError:
        raise
    except PermissionError as exc:
        raise InputError(f"cannot read image {path}: permission denied") from exc
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        if not heif and _is_heif(path):
            raise InputError(f"cannot read image {path}: a HEIC photo needs pillow-heif installed") from exc
        raise InputError(f"cannot read image {path}: {_first_line(exc)}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or corrupt data
        raise InputError(f"cannot read image {path}: corrupt or truncated ({_first_line(exc)})") from exc
    return data, declared, orientation, quantum


def _register_heif() -> bool:
    """Pillow opens HEIC/HEIF files (iPhone photos) once pillow-heif registers its plug-in (libheif applies
    the file's rotation and sets the EXIF orientation to 1). -> whether pillow-heif is installed."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return False
    register_heif_opener()
    return True


def _is_heif(path: Path) -> bool:
    """An ISO base media file of a HEIF brand (`ftyp` box at byte 4)."""
    with open(path, "rb") as f:
        head = f.read(12)
    return head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"mif1")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _array_to_float(array: Any, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """An in-memory image ([H, W], [H, W, C] or [1, H, W, C]; uint8, uint16, bool or float in [0, 1])."""
    if isinstance(array, Image.Image):  # displayed upright, as load_image reads the same file
        try:
            array.load()  # first: loading a TIFF applies its orientation itself (and removes the tag)
        except Exception as exc:  # Pillow raises several types for truncated or corrupt data
            raise InputError(f"cannot read image {name}: {_first_line(exc)}") from exc
        orientation = int(array.getexif().get(_EXIF_ORIENTATION, 1) or 1)
        sixteen = array.mode.startswith("I") or array.mode == "F"
        data, declared = _pil_to_float(array)
        quantum = 1.0 / 65535.0 if sixteen else 1.0 / 255.0
        return _split_channels(_orient(data, orientation), name, None, declared, quantum)
    if isinstance(array, Tensor):
        array = array.detach().cpu().numpy()
    data = np.asarray(array)
    if data.ndim == 4 and data.shape[0] == 1:
        data = data[0]  # [1, H, W, C] -> [H, W, C]
    if data.ndim == 2:
        data = data[..., None]  # [H, W] -> [H, W, 1]
    if data.ndim != 3:
        raise InputError(f"{name}: array of shape {data.shape}, expected [H, W], [H, W, C] or [1, H, W, C]")
    if data.dtype == np.uint8:
        values, quantum = data.astype(np.float32) / 255.0, 1.0 / 255.0
    elif data.dtype == np.uint16:
        values, quantum = data.astype(np.float32) / 65535.0, 1.0 / 65535.0
    elif data.dtype == np.bool_:
        values, quantum = data.astype(np.float32), 1.0 / 255.0
    elif np.issubdtype(data.dtype, np.floating):
        values, quantum = data.astype(np.float32), 1.0 / 255.0
        if not np.all(np.isfinite(values)):
            raise InputError(f"{name}: the image has NaN or infinite values")
        if values.min() < -1e-3 or values.max() > 1.0 + 1e-3:
            raise InputError(
                f"{name}: float values in [{values.min():.3g}, {values.max():.3g}], expected [0, 1]"
            )
        values = np.clip(values, 0.0, 1.0)
    else:
        raise InputError(f"{name}: dtype {data.dtype}, expected uint8, uint16, bool or float in [0, 1]")
    return _split_channels(values, name, None, False, quantum)


# ---------------------------------------------------------------- background removal


def _rembg_weights(model: str = REMBG_MODEL) -> Path:
    """Where rembg keeps `<model>.onnx`: $U2NET_HOME, else $XDG_DATA_HOME/.u2net, else ~/.u2net."""
    home = os.getenv("U2NET_HOME") or os.path.join(os.getenv("XDG_DATA_HOME", "~"), ".u2net")
    return Path(home).expanduser() / f"{model}.onnx"


def rembg_available(model: str = REMBG_MODEL) -> bool:
    """True when rembg is importable and its weights are on disk (so nothing would be downloaded)."""
    import importlib.util

    def installed(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except (ImportError, ValueError, AttributeError):  # a module set to None in sys.modules
            return False

    # rembg without onnxruntime (plain `pip install rembg` since 2.0.71: it comes with rembg[cpu]) exits the
    # process on import: "auto" falls back to the plain matting then
    return installed("rembg") and installed("onnxruntime") and _rembg_weights(model).is_file()


def _rembg_session(rembg: Any, model: str, weights: Path) -> Any:
    """rembg's session for `model` from the weights on disk. rembg's own "u2net" session checks the file's
    md5 and downloads it again when it differs (another build, a partial copy): its "u2net_custom" session
    (the same network and preprocessing) takes the file as it is and never downloads."""
    if model == "u2net":
        try:
            return rembg.new_session("u2net_custom", model_path=str(weights))
        except (ValueError, KeyError, TypeError):  # an older rembg without that session
            pass
    return rembg.new_session(model)


def rembg_alpha(rgb: np.ndarray, model: str = REMBG_MODEL, name: str = "image") -> np.ndarray:
    """rembg's matte (u2net + alpha matting, as the reference) of rgb [H, W, 3] in [0, 1] -> alpha [H, W].

    Runs on a <= 768 px copy, as the reference, and resizes the alpha back (bilinear). Raises InputError
    when rembg or its weights are missing: it never downloads.
    """
    try:
        import rembg
    except (ImportError, SystemExit):  # SystemExit: rembg >= 2.0.71 without onnxruntime ends the process
        raise InputError(
            f"{name}: background removal needs rembg with onnxruntime (pip install 'rembg[cpu]'), or pass "
            "an RGBA image, or use --background plain for a plain light background"
        ) from None
    weights = _rembg_weights(model)
    if not weights.is_file():
        raise InputError(
            f"{name}: rembg weights {weights} not found (fetch them once with `rembg d {model}`, or set "
            "U2NET_HOME); nothing is downloaded at run time"
        )
    height, width = rgb.shape[:2]
    image = Image.fromarray(np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8), "RGB")
    image.thumbnail((REMBG_MAX_SIDE, REMBG_MAX_SIDE), Image.Resampling.LANCZOS)
    session = _rembg_session(rembg, model, weights)
    cutout = rembg.remove(image.convert("RGBA"), session=session, alpha_matting=True)
    matte = cutout.getchannel("A") if isinstance(cutout, Image.Image) else Image.fromarray(cutout[..., -1])
    if matte.size != (width, height):
        matte = matte.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(matte, dtype=np.float32) / 255.0


def plain_background_alpha(rgb: np.ndarray, name: str = "image") -> np.ndarray:
    """Built-in matting for an object on a plain (typically light) background: rgb [H, W, 3] -> alpha [H, W].
    (`plain_background_matte` also gives the object's own colours on its edge.)

    1. Background colour: the median of a border band (2% of the smaller side); the border must mostly
       match it, else InputError (use rembg or an RGBA image).
    2. Background = pixels within a colour distance of it (threshold from the border's spread, at least
       0.06) that are connected to the border (flood fill), and enclosed regions that look like the
       backdrop seen through a hole (a mug's handle, a ring): `_see_through` (at least HOLE_MIN_FRACTION of
       the object's area and as close to the background colour as the border itself). Smaller or less
       exact background-coloured regions (white print, highlights) stay object.
    3. Clean-up: a binary opening removes specks, components under 1% of the largest are dropped.
    4. Soft edge: on the one-pixel rings either side of the boundary, alpha = colour distance / the
       object's nearby distance (the coverage of an antialiased edge pixel).
    """
    return plain_background_matte(rgb, name)[0]


def plain_background_matte(rgb: np.ndarray, name: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """`plain_background_alpha`'s matte and the object's colour: (alpha [H, W], rgb [H, W, 3]) where, on the
    soft edge, each pixel I = s F + (1 - s) B (s the edge's colour-distance coverage, B the backdrop) is
    solved for F = (I - (1 - s) B) / s, so that compositing on white shows no fringe of the backdrop.
    Cost: a few full-image passes, the rest within the object's bounding box (a 48 MP photo: seconds)."""
    height, width = rgb.shape[:2]
    border = _border_band(rgb)  # [N, 3]
    background = np.median(border, axis=0)  # [3]
    border_distance = np.linalg.norm(border - background, axis=-1)  # [N]
    if np.mean(border_distance < 0.12) < 0.6:
        raise InputError(
            f"{name}: the background is not plain (its border colours vary, or the object fills the "
            "border); give an RGBA image, or install rembg and use --background rembg"
        )
    threshold = float(np.clip(2.5 * np.percentile(border_distance, 90), 0.06, 0.25))
    distance = _colour_distance(rgb, background)  # [H, W]
    labels, count = ndimage.label(distance < threshold)
    edge_labels = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    # [H, W] as close to the backdrop's colour as the border itself is
    backdrop_like = distance <= max(float(np.percentile(border_distance, 99)), 0.02)
    backdrop = _in(labels, edge_labels[edge_labels > 0])  # connected to the border
    backdrop |= _in(labels, _see_through(labels, count, edge_labels, backdrop_like, (~backdrop).sum()))
    if backdrop.all():
        raise InputError(f"{name}: no object found, every pixel matches the background colour")
    # The rest within the object's bounding box, one pixel wider for the outer soft edge: [h, w]
    rows, cols = np.flatnonzero(~backdrop.all(axis=1)), np.flatnonzero(~backdrop.all(axis=0))
    box = np.s_[max(rows[0] - 1, 0) : rows[-1] + 2, max(cols[0] - 1, 0) : cols[-1] + 2]
    obj, distance, at_border = ~backdrop[box], distance[box], _border_mask(box, height, width)
    radius = max(1, round(0.003 * min(height, width)))
    # specks and noise apart from the object go; thin parts attached to it (a stem, a glass's leg) stay,
    # unless they run to the image's border (a table edge or seam across the photo)
    opened = _open_with_disk(obj, radius)
    parts, _ = ndimage.label(obj)  # 4-connected, as binary_propagation's default
    attached = _in(parts, np.unique(parts[opened]))  # the parts of obj that keep an opened pixel
    thin, _ = ndimage.label(attached & ~opened)
    obj = opened | ((thin > 0) & ~_in(thin, np.unique(thin[at_border])))
    if not obj.any():
        raise InputError(f"{name}: no object found, every pixel matches the background colour")
    obj &= ~_specks(obj)
    alpha = obj.astype(np.float32)
    interior = ndimage.binary_erosion(obj)
    inner_ring = obj & ~interior
    outer_ring = ndimage.binary_dilation(obj) & ~obj
    # The object's colour distance next to the edge: max over a 5x5 window of interior pixels.
    reach = ndimage.maximum_filter(np.where(interior, distance, 0.0), size=5)
    reach = np.where(reach > threshold, reach, ndimage.maximum_filter(np.where(obj, distance, 0.0), size=5))
    ring = inner_ring | outer_ring
    soft = np.clip(distance / np.maximum(reach, threshold), 0.0, 1.0)
    alpha[ring] = soft[ring]
    alpha[inner_ring] = np.maximum(alpha[inner_ring], 0.5)  # an object pixel stays at least half covered
    own = ring & (soft > 0.1)  # [h, w]; below, the division would amplify noise (the pixel weighs little)
    solved = (rgb[box] - (1.0 - soft[..., None]) * background) / np.maximum(soft, 0.1)[..., None]  # [h, w, 3]
    full_alpha = np.zeros((height, width), np.float32)
    full_alpha[box] = alpha
    colour = rgb.astype(np.float32, copy=True)
    colour[box] = np.where(own[..., None], np.clip(solved, 0.0, 1.0), rgb[box])
    return full_alpha, colour


def _colour_distance(rgb: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """[H, W] float32 Euclidean distance of each pixel of rgb [H, W, 3] to colour [3] (one channel at a time:
    no [H, W, 3] temporaries)."""
    total = np.zeros(rgb.shape[:2], np.float32)
    for c in range(3):
        total += np.square(rgb[..., c] - np.float32(colour[c]))
    return np.sqrt(total, out=total)


def _in(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """labels [H, W] (non-negative ints) -> [H, W] bool: label in ids (np.isin through a lookup table)."""
    table = np.zeros(int(labels.max()) + 1, dtype=bool)
    ids = ids[(ids > 0) & (ids < table.size)]
    table[ids] = True
    return table[labels]


def _border_mask(box: tuple[slice, slice], height: int, width: int) -> np.ndarray:
    """[h, w] bool: the pixels of the crop `box` of an [height, width] image on the image's border."""
    rows, cols = range(height)[box[0]], range(width)[box[1]]
    mask = np.zeros((len(rows), len(cols)), dtype=bool)
    mask[:, 0] |= cols[0] == 0
    mask[:, -1] |= cols[-1] == width - 1
    mask[0] |= rows[0] == 0
    mask[-1] |= rows[-1] == height - 1
    return mask


def _open_with_disk(mask: np.ndarray, radius: int) -> np.ndarray:
    """`ndimage.binary_opening(mask, structure=_disk(radius))` (pixels outside the image count as
    background) through two Euclidean distance transforms: linear in the pixels whatever the radius, where
    scipy's opening costs pixels x disk area (35 s for a 48 MP photo's radius of 18 px)."""
    limit = radius * radius + 0.5  # squared pixel distances are integers
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]  # to the nearest background pixel
    core = depth * depth > limit  # eroded: the whole disk about the pixel is in the mask
    if not core.any():
        return core
    reach = ndimage.distance_transform_edt(~core)  # to the nearest core pixel
    return reach * reach < limit  # dilated


def _border_band(rgb: np.ndarray) -> np.ndarray:
    """[N, 3] the pixels of a band around the image's border, 2% of its smaller side wide."""
    height, width = rgb.shape[:2]
    band = max(1, round(0.02 * min(height, width)))
    return np.concatenate(
        [
            rgb[:band].reshape(-1, 3),
            rgb[-band:].reshape(-1, 3),
            rgb[:, :band].reshape(-1, 3),
            rgb[:, -band:].reshape(-1, 3),
        ]
    )


HOLE_MIN_FRACTION = 0.005  # an enclosed backdrop-coloured region this large (of the object's area) is a hole


def _see_through(
    labels: np.ndarray,  # [H, W] int: components of the background-coloured pixels, 0 elsewhere
    count: int,
    edge_labels: np.ndarray,  # the components that touch the border (the backdrop itself)
    backdrop_like: np.ndarray,  # [H, W] bool: pixels as close to the backdrop colour as the border is
    object_area: float,  # pixels of the object with its enclosed regions filled
) -> np.ndarray:
    """The enclosed components that are holes: large (>= HOLE_MIN_FRACTION of the object) and mostly (90%)
    of the backdrop's own colour. -> their labels [K]."""
    if count == 0:
        return np.zeros(0, dtype=labels.dtype)
    ids = np.arange(1, count + 1)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]  # [count]
    exact = np.bincount(labels[backdrop_like], minlength=count + 1)[1:]  # [count]
    hole = (sizes >= HOLE_MIN_FRACTION * object_area) & (exact >= 0.9 * sizes) & ~np.isin(ids, edge_labels)
    return ids[hole]


def _disk(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius**2


def remove_background(rgb: np.ndarray, method: Background = "auto", name: str = "image") -> np.ndarray:
    """Alpha [H, W] for rgb [H, W, 3] in [0, 1]: "rembg", "plain", or "auto" (rembg when installed with
    its weights, else the plain-background matting)."""
    if method == "rembg" or (method == "auto" and rembg_available()):
        return rembg_alpha(rgb, name=name)
    if method in ("plain", "auto"):
        return plain_background_alpha(rgb, name=name)
    raise InputError(f"background {method!r}: expected 'auto', 'rembg' or 'plain'")


# ---------------------------------------------------------------- framing


def _resize_channel(channel: np.ndarray, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """Lanczos resampling of the float region `box` (left, top, right, bottom) of [H, W] to [size, size]."""
    image = Image.fromarray(np.ascontiguousarray(channel, dtype=np.float32))  # float32 -> mode "F"
    return np.asarray(image.resize((size, size), Image.Resampling.LANCZOS, box=box), dtype=np.float32)


def _specks(mask: np.ndarray) -> np.ndarray:
    """[H, W] bool: the components of a non-empty mask [H, W] under `SPECK_FRACTION` of the largest one's
    pixels or under 4 pixels; the largest is never one."""
    labels, _ = ndimage.label(mask)
    sizes = np.bincount(labels.ravel())[1:]  # [count] pixels per component
    least = min(max(SPECK_FRACTION * sizes.max(), 4.0), sizes.max())
    return _in(labels, 1 + np.flatnonzero(sizes < least))


def frame_object(
    rgb: np.ndarray,  # [H, W, 3] straight colour in [0, 1]
    alpha: np.ndarray,  # [H, W] in [0, 1]
    size: int = 576,
    frame_ratio: float | None = None,
    name: str = "image",
) -> tuple[np.ndarray, np.ndarray]:
    """Centres the object on a square canvas and resizes it; returns (rgb on white [S, S, 3], alpha [S, S]).

    The bbox of alpha >= `OBJECT_ALPHA_THRESHOLD` (without specks: components under `SPECK_FRACTION` of the
    largest, which are cleared from the alpha too) is centred; the object's bounding circle about that
    centre (its farthest pixel centre) gets the diameter `frame_ratio * S`, by default
    `SPHERE_FRAME_RATIO` (module docstring). Resampling is Lanczos on premultiplied colour and alpha,
    so transparent pixels contribute nothing; the result is composited on white.
    """
    ratio = SPHERE_FRAME_RATIO if frame_ratio is None else float(frame_ratio)
    if not 0.0 < ratio <= 1.0:
        raise InputError(f"frame ratio {frame_ratio}: expected 0 < ratio <= 1 (object diameter / image side)")
    if isinstance(size, bool) or not isinstance(size, int) or size < MIN_IMAGE_SIZE:
        raise InputError(f"output size {size!r}: expected an integer >= {MIN_IMAGE_SIZE}")
    alpha = np.clip(alpha, 0.0, 1.0)
    solid = alpha >= OBJECT_ALPHA_THRESHOLD
    if not solid.any():
        solid = alpha > FAINT_ALPHA_THRESHOLD
    if not solid.any():
        raise InputError(f"{name}: the alpha is empty, no object to centre")
    # Specks (as the plain matting drops them: a cutout's or rembg's stray islands) would move the centre
    # and set the radius: they are left out, and cleared
    specks = _specks(solid)
    if specks.any():
        solid &= ~specks
        alpha = np.where(ndimage.binary_dilation(specks, iterations=2) & ~solid, 0.0, alpha)
    ys, xs = np.nonzero(solid)
    cy = (ys.min() + ys.max() + 1) / 2.0  # bbox centre, pixel-edge coordinates
    cx = (xs.min() + xs.max() + 1) / 2.0
    # Farthest pixel centre of the half-coverage region: the edge of an antialiased object to ~0.3 px.
    radius = float(np.sqrt(((ys + 0.5 - cy) ** 2 + (xs + 0.5 - cx) ** 2).max()))
    if radius < MIN_OBJECT_RADIUS:
        raise InputError(f"{name}: the object spans only {2 * radius:.1f} px, too small to centre")
    half = radius / ratio  # canvas half-side in input pixels
    left, top, right, bottom = cx - half, cy - half, cx + half, cy + half
    height, width = alpha.shape
    pad_l, pad_t = max(0, math.ceil(-left)), max(0, math.ceil(-top))
    pad_r, pad_b = max(0, math.ceil(right - width)), max(0, math.ceil(bottom - height))
    box = (left + pad_l, top + pad_t, right + pad_l, bottom + pad_t)
    pads = ((pad_t, pad_b), (pad_l, pad_r))
    out_alpha = _resize_channel(np.pad(alpha, pads), box, size)  # [S, S]
    out_alpha = np.clip(out_alpha, 0.0, 1.0)
    premultiplied = [
        np.clip(_resize_channel(np.pad(rgb[..., c] * alpha, pads), box, size), 0.0, out_alpha)
        for c in range(3)
    ]
    on_white = np.stack(premultiplied, axis=-1) + (1.0 - out_alpha)[..., None]  # [S, S, 3], in [0, 1]
    return np.clip(on_white, 0.0, 1.0).astype(np.float32), out_alpha.astype(np.float32)


def preprocess_image(
    path_or_array: str | os.PathLike[str] | np.ndarray | Tensor | Image.Image,
    size: int = 576,  # SV3D's training resolution
    frame_ratio: float | None = None,  # None: SPHERE_FRAME_RATIO, as a placed mesh (module docstring)
    background: Background = "auto",  # matting for inputs without alpha; an input alpha is always used
) -> tuple[Tensor, Tensor]:
    """Photo or array -> SV3D's conditioning image.

    Returns:
        image: [1, 3, size, size] float32 in [-1, 1], the object centred and composited on white.
        alpha: [size, size] float32 in [0, 1], the object's mask on the same canvas.

    Raises:
        InputError: unreadable file, image under 32 px, unknown `background`, no matting possible,
        empty alpha (no object).
    """
    if background not in ("auto", "rembg", "plain"):
        raise InputError(f"background {background!r}: expected 'auto', 'rembg' or 'plain'")
    if isinstance(path_or_array, (str, os.PathLike)):
        name = str(path_or_array)
        rgb, alpha = load_image(path_or_array)
    else:
        name = "input array"
        rgb, alpha = _array_to_float(path_or_array, name)
    height, width = rgb.shape[:2]
    if min(height, width) < MIN_IMAGE_SIZE:
        raise InputError(f"{name}: image of {width}x{height} px, at least {MIN_IMAGE_SIZE} px a side needed")
    if alpha is None and (background == "plain" or (background == "auto" and not rembg_available())):
        alpha, rgb = plain_background_matte(rgb, name=name)  # the edge's colour without the backdrop's
    elif alpha is None:
        alpha = remove_background(rgb, background, name=name)
    on_white, out_alpha = frame_object(rgb, alpha, size=size, frame_ratio=frame_ratio, name=name)
    image = torch.from_numpy(on_white).permute(2, 0, 1)[None] * 2.0 - 1.0  # [S, S, 3] -> [1, 3, S, S]
    return image.contiguous(), torch.from_numpy(out_alpha)
