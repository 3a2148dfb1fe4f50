"""Input-image preprocessing: every image kind built here with PIL, the fallback matting, the framing rule."""

from __future__ import annotations

import math
import struct
import sys
import types
import warnings
import zlib
from pathlib import Path

import numpy as np
import png
import pytest
import torch
from PIL import Image, ImageOps

from sv3d.errors import InputError
from sv3d.preprocess import (
    SPHERE_FRAME_RATIO,
    frame_object,
    load_image,
    plain_background_alpha,
    plain_background_matte,
    preprocess_image,
    rembg_alpha,
    rembg_available,
    remove_background,
)

RNG = np.random.default_rng(0)


def _coverage(height: int, width: int, cy: float, cx: float, radius: float, ss: int = 4) -> np.ndarray:
    """Exact-ish area coverage [H, W] of a disk (supersampled ss x ss), i.e. an antialiased mask."""
    ys = (np.arange(height * ss) + 0.5) / ss
    xs = (np.arange(width * ss) + 0.5) / ss
    inside = (ys[:, None] - cy) ** 2 + (xs[None, :] - cx) ** 2 <= radius**2
    return inside.reshape(height, ss, width, ss).mean(axis=(1, 3)).astype(np.float32)


def _u8(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)


# ---------------------------------------------------------------- the frame ratio


def test_sphere_frame_ratio_derivation():
    # r = 0.5 seen from d = 2: silhouette half-angle asin(1/4); image radius tan(asin(1/4)) = 1/sqrt(15)
    # = 0.25820; half-width tan(16.9 deg) = 0.30383; ratio 0.84983 ("about 85%" in ARCHITECTURE.md).
    assert SPHERE_FRAME_RATIO == pytest.approx((1 / math.sqrt(15)) / math.tan(math.radians(16.9)), rel=1e-12)
    assert SPHERE_FRAME_RATIO == pytest.approx(0.84983, abs=1e-5)


def test_sphere_frame_ratio_matches_a_projected_sphere():
    # Independent check with the project's cameras: project points of the sphere's silhouette circle.
    from sv3d.cameras import CAMERA_RADIUS, FOV_DEG, OBJECT_RADIUS

    d, r = CAMERA_RADIUS, OBJECT_RADIUS
    # A tangent ray touches the sphere at depth d - r^2/d, lateral offset r sqrt(1 - r^2/d^2).
    depth, lateral = d - r * r / d, r * math.sqrt(1 - r * r / (d * d))
    half_width = math.tan(math.radians(FOV_DEG / 2))
    assert (lateral / depth) / half_width == pytest.approx(SPHERE_FRAME_RATIO, rel=1e-12)


# ---------------------------------------------------------------- load_image: kinds


def test_rgb_png(tmp_path):
    data = RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(data).save(tmp_path / "a.png")
    rgb, alpha = load_image(tmp_path / "a.png")
    assert rgb.dtype == np.float32 and rgb.shape == (20, 30, 3) and alpha is None
    assert np.array_equal(rgb, data.astype(np.float32) / 255)


def test_rgba_png_keeps_straight_colour(tmp_path):
    # Bright colour under partial alpha: impossible if premultiplied, so it is read as straight.
    data = np.zeros((16, 16, 4), np.uint8)
    data[..., :3] = (250, 200, 30)
    data[..., 3] = np.linspace(0, 255, 16).astype(np.uint8)[None, :]
    Image.fromarray(data, "RGBA").save(tmp_path / "a.png")
    rgb, alpha = load_image(tmp_path / "a.png")
    assert np.array_equal(alpha, data[..., 3].astype(np.float32) / 255)
    assert np.array_equal(rgb, data[..., :3].astype(np.float32) / 255)


def test_opaque_alpha_is_no_mask(tmp_path):
    data = np.full((8, 8, 4), 255, np.uint8)
    Image.fromarray(data, "RGBA").save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png")[1] is None


@pytest.mark.parametrize("mode", ["L", "LA", "1"])
def test_greyscale(tmp_path, mode):
    grey = RNG.integers(0, 256, (10, 12), dtype=np.uint8)
    if mode == "LA":
        a = np.where(np.arange(12)[None, :] < 6, 0, 255).astype(np.uint8).repeat(10, 0)
        img = Image.fromarray(np.stack([grey, a], -1), "LA")
    elif mode == "1":
        img = Image.fromarray(grey).convert("1")
        grey = np.asarray(img.convert("L"))
    else:
        img = Image.fromarray(grey)
    img.save(tmp_path / "g.png")
    rgb, alpha = load_image(tmp_path / "g.png")
    assert rgb.shape == (10, 12, 3)
    assert np.array_equal(rgb, np.repeat(grey[..., None].astype(np.float32) / 255, 3, -1))
    assert (alpha is not None) == (mode == "LA")
    if mode == "LA":
        assert np.array_equal(alpha, a.astype(np.float32) / 255)


def test_palette_with_and_without_transparency(tmp_path):
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9)
    index = np.array([[0, 1, 2, 1]] * 4, np.uint8)
    img = Image.fromarray(index, "P")
    img.putpalette(palette)
    img.save(tmp_path / "p.png")
    rgb, alpha = load_image(tmp_path / "p.png")
    assert alpha is None and rgb[0, 0].tolist() == [1, 0, 0] and rgb[0, 2].tolist() == [0, 0, 1]
    img.save(tmp_path / "pt.png", transparency=1)  # index 1 fully transparent (tRNS)
    rgb, alpha = load_image(tmp_path / "pt.png")
    assert alpha[0].tolist() == [1, 0, 1, 0]
    img.save(tmp_path / "pa.png", transparency=bytes([255, 128, 255]))  # per-entry palette alpha
    rgb, alpha = load_image(tmp_path / "pa.png")
    assert alpha[0, 1] == pytest.approx(128 / 255) and rgb[0, 1].tolist() == [0, 1, 0]
    img.save(tmp_path / "pt.gif", transparency=1)  # GIF: palette with a transparent index
    rgb, alpha = load_image(tmp_path / "pt.gif")
    assert alpha[0].tolist() == [1, 0, 1, 0] and rgb[0, 0].tolist() == [1, 0, 0]


def test_16bit_grey_png_and_tiff(tmp_path):
    grey = RNG.integers(0, 65536, (9, 7), dtype=np.uint16)
    for name in ("g.png", "g.tif"):
        Image.fromarray(grey).save(tmp_path / name)  # Pillow writes I;16
        rgb, alpha = load_image(tmp_path / name)
        assert alpha is None
        assert np.allclose(rgb[..., 1], grey / 65535.0, atol=1e-7), name  # full 16-bit precision


@pytest.mark.parametrize(
    "greyscale, alpha_plane, interlace", [(False, False, False), (False, True, False), (True, True, True)]
)
def test_16bit_colour_png_is_not_truncated(tmp_path, caplog, greyscale, alpha_plane, interlace):
    planes = (1 if greyscale else 3) + alpha_plane
    data = RNG.integers(0, 65536, (6, 5, planes), dtype=np.uint16)
    data[..., -1] = 65535 if not alpha_plane else data[..., -1] | 0x8000  # alpha >= 0.5, bright colour
    if alpha_plane:
        data[0, 0, -1] = 0
    writer = png.Writer(5, 6, greyscale=greyscale, alpha=alpha_plane, bitdepth=16, interlace=interlace)
    with open(tmp_path / "c.png", "wb") as f:
        writer.write(f, data.reshape(6, 5 * planes).tolist())
    rgb, alpha = load_image(tmp_path / "c.png")
    colour = data[..., : planes - alpha_plane].astype(np.float64) / 65535
    expected = np.repeat(colour, 3, -1) if greyscale else colour
    assert np.allclose(rgb, expected, atol=1e-7)  # Pillow alone keeps only the high byte
    if alpha_plane:
        assert np.allclose(alpha, data[..., -1] / 65535, atol=1e-7) and alpha[0, 0] == 0
    assert not caplog.records  # libpng's warning about interlaced files (logged by imagecodecs) is not shown


def test_16bit_png_colour_key_becomes_alpha(tmp_path):
    data = np.full((4, 4, 3), 1000, np.uint16)
    data[1:3, 1:3] = (40000, 20000, 0)
    with open(tmp_path / "key.png", "wb") as f:
        writer = png.Writer(4, 4, greyscale=False, bitdepth=16, transparent=(1000, 1000, 1000))
        writer.write(f, data.reshape(4, 12))
    rgb, alpha = load_image(tmp_path / "key.png")
    assert alpha is not None and alpha.sum() == 4 and alpha[1:3, 1:3].min() == 1.0
    assert np.allclose(rgb[1, 1], np.array([40000, 20000, 0]) / 65535, atol=1e-7)


@pytest.mark.parametrize("compression", ["lzw", "zstd", "packbits"])
def test_compressed_16bit_rgba_tiffs_keep_16_bits(tmp_path, compression):
    """LZW (Photoshop's default), zstd, PackBits: tifffile decodes them through imagecodecs; without it they
    went through Pillow's 8 bits (LZW, with a note) or raised a bare ModuleNotFoundError (zstd)."""
    tifffile = pytest.importorskip("tifffile")
    data = RNG.integers(0, 65536, (6, 5, 4), dtype=np.uint16)
    data[..., 3] = 65535
    data[0, 0, 3] = 0
    path = tmp_path / f"{compression}.tif"
    tifffile.imwrite(path, data, photometric="rgb", extrasamples=["unassalpha"], compression=compression)
    rgb, alpha = load_image(path)
    assert np.allclose(rgb, data[..., :3] / 65535, atol=1e-7) and alpha[0, 0] == 0 and alpha.sum() == 29


def test_a_broken_tiff_is_one_error_and_no_warnings(tmp_path, capfd):
    (tmp_path / "empty.tif").write_bytes(b"II*\x00\x08\x00\x00\x00")  # a header, no pages
    with warnings.catch_warnings(record=True) as caught, pytest.raises(InputError, match="cannot read image"):
        warnings.simplefilter("always")
        load_image(tmp_path / "empty.tif")
    assert not caught  # Pillow's "Corrupt EXIF data" is not shown
    assert capfd.readouterr().err == ""  # nor tifffile's logged "invalid offset to first page"


def test_an_invalid_sbit_chunk_is_ignored(tmp_path):
    """sBIT (0, 0, 0) read the photo at 1 bit (max(0, 1)); libpng ignores an invalid chunk, and so do we."""
    data = np.full((4, 4, 3), 40000, np.uint16)
    with open(tmp_path / "c.png", "wb") as f:
        png.Writer(4, 4, greyscale=False, bitdepth=16).write(f, data.reshape(4, 12))
    raw = (tmp_path / "c.png").read_bytes()
    chunk = b"sBIT" + bytes([0, 0, 0])
    (tmp_path / "c.png").write_bytes(
        raw[:33] + struct.pack(">I", 3) + chunk + struct.pack(">I", zlib.crc32(chunk)) + raw[33:]
    )
    rgb, _ = load_image(tmp_path / "c.png")
    assert np.allclose(rgb, 40000 / 65535, atol=1e-7)


def test_a_readable_files_warnings_are_still_shown(tmp_path, monkeypatch):
    import sv3d.preprocess as module

    real = module._pil_to_float

    def warning(img):
        warnings.warn("Corrupt EXIF data", UserWarning, stacklevel=2)
        return real(img)

    monkeypatch.setattr(module, "_pil_to_float", warning)
    Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp_path / "red.png")
    with pytest.warns(UserWarning, match="Corrupt EXIF"):
        rgb, _ = load_image(tmp_path / "red.png")
    assert np.allclose(rgb[0, 0], np.array([200, 10, 10]) / 255)
    with warnings.catch_warnings(record=True) as caught:  # the caller's filters still apply
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=UserWarning, module="sv3d.preprocess")  # by module
        load_image(tmp_path / "red.png")
    assert not caught


def test_heic_photos_are_read_upright_with_their_alpha(tmp_path):
    """iPhones save HEIC: read through pillow-heif, its rotation applied once, alpha kept."""
    pytest.importorskip("pillow_heif")
    from sv3d.preprocess import _register_heif

    assert _register_heif() and ".heic" in Image.registered_extensions()  # also lets Pillow write them
    photo = np.zeros((60, 80, 3), np.uint8)
    photo[:, :40], photo[:, 40:] = (200, 30, 30), (30, 30, 200)  # red left, blue right
    image = Image.fromarray(photo)
    exif = image.getexif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: red on top
    image.save(tmp_path / "turned.heic", quality=95, exif=exif.tobytes())
    rgb, alpha = load_image(tmp_path / "turned.heic")
    assert rgb.shape == (80, 60, 3) and alpha is None
    assert np.allclose(rgb[10, 30], np.array([200, 30, 30]) / 255, atol=0.06)
    assert np.allclose(rgb[70, 30], np.array([30, 30, 200]) / 255, atol=0.06)
    rgba = np.zeros((60, 80, 4), np.uint8)
    rgba[20:40, 20:60] = (200, 30, 30, 255)
    Image.fromarray(rgba).save(tmp_path / "cutout.heic", quality=95)
    rgb, alpha = load_image(tmp_path / "cutout.heic")
    assert alpha is not None and abs(alpha.sum() - 800) < 8 and alpha[30, 40] > 0.99 and alpha[5, 5] < 0.01


def test_a_heic_without_pillow_heif_says_so(tmp_path, monkeypatch):
    import sv3d.preprocess as module

    monkeypatch.setattr(module, "_register_heif", lambda: False)
    (tmp_path / "photo.heic").write_bytes(b"\0\0\0\x18ftypheic" + bytes(200))  # unreadable to Pillow alone
    with pytest.raises(InputError, match="a HEIC photo needs pillow-heif installed"):
        load_image(tmp_path / "photo.heic")


def test_16bit_rgb_tiff_and_associated_alpha(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    data = RNG.integers(0, 65536, (6, 5, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "c.tif", data, photometric="rgb")
    rgb, alpha = load_image(tmp_path / "c.tif")
    assert alpha is None and np.allclose(rgb, data / 65535, atol=1e-7)
    # Associated (premultiplied) alpha is declared by the file: colour is divided back.
    straight = np.full((6, 5, 3), 0.8)
    a = np.linspace(0.2, 1.0, 30).reshape(6, 5)
    stored = np.concatenate([straight * a[..., None], a[..., None]], -1)
    tifffile.imwrite(
        tmp_path / "p.tif", np.round(stored * 65535).astype(np.uint16), extrasamples=["assocalpha"]
    )
    rgb, alpha = load_image(tmp_path / "p.tif")
    assert np.allclose(alpha, a, atol=1e-4) and np.allclose(rgb, 0.8, atol=1e-3)
    tifffile.imwrite(tmp_path / "p8.tif", _u8(stored), extrasamples=["assocalpha"])  # 8-bit: Pillow reads it
    rgb, alpha = load_image(tmp_path / "p8.tif")
    assert np.allclose(rgb, 0.8, atol=0.02)


def test_planar_float_and_lzw_tiffs(tmp_path, capsys):
    tifffile = pytest.importorskip("tifffile")
    data = RNG.integers(0, 65536, (6, 5, 3), dtype=np.uint16)
    tifffile.imwrite(
        tmp_path / "planar.tif", np.moveaxis(data, -1, 0), photometric="rgb", planarconfig="separate"
    )
    rgb, _ = load_image(tmp_path / "planar.tif")  # [C, H, W] in the file
    assert rgb.shape == (6, 5, 3) and np.allclose(rgb, data / 65535, atol=1e-7)
    values = RNG.random((6, 5, 3)).astype(np.float32)  # float RGB: Pillow cannot open it
    tifffile.imwrite(tmp_path / "float.tif", values, photometric="rgb")
    rgb, _ = load_image(tmp_path / "float.tif")
    assert np.allclose(rgb, values, atol=1e-6)
    tifffile.imwrite(tmp_path / "oriented.tif", data, photometric="rgb", extratags=[(274, "H", 1, 3, True)])
    rgb, _ = load_image(tmp_path / "oriented.tif")  # Orientation 3: rotated 180 degrees
    assert np.allclose(rgb, data[::-1, ::-1] / 65535, atol=1e-7)
    # 16-bit grey with LZW, which tifffile decodes only with imagecodecs: read, never "corrupt"
    grey = RNG.integers(0, 65536, (6, 5), dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "lzw.tif", compression="tiff_lzw")  # mode I;16
    rgb, _ = load_image(tmp_path / "lzw.tif")
    assert np.allclose(rgb[..., 0], grey / 65535, atol=1e-7)


def _linear_srgb_profile() -> bytes:
    """An ICC v2 matrix/TRC profile with sRGB's primaries, gamma 1 and "Linear sRGB" as its description (as
    GIMP embeds in its 16-bit linear-light exports): built by hand, Pillow's ImageCms makes only sRGB."""

    def xyz(x, y, z):  # XYZType, s15Fixed16 numbers
        return b"XYZ \0\0\0\0" + struct.pack(">3i", *(round(v * 65536) for v in (x, y, z)))

    name = b"Linear sRGB\0"
    desc = b"desc\0\0\0\0" + struct.pack(">I", len(name)) + name + bytes(4 + 4 + 2 + 1 + 67)
    gamma_one = b"curv\0\0\0\0" + struct.pack(">IH", 1, 0x0100) + b"\0\0"
    tags = [
        (b"desc", desc),
        (b"wtpt", xyz(0.9642, 1.0, 0.8249)),
        (b"rXYZ", xyz(0.4361, 0.2225, 0.0139)),  # sRGB's primaries adapted to D50
        (b"gXYZ", xyz(0.3851, 0.7169, 0.0971)),
        (b"bXYZ", xyz(0.1431, 0.0606, 0.7141)),
        (b"rTRC", gamma_one),
        (b"gTRC", gamma_one),
        (b"bTRC", gamma_one),
    ]
    offset, table, body = 128 + 4 + 12 * len(tags), b"", b""
    for signature, data in tags:
        data += bytes(-len(data) % 4)
        table += signature + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = struct.pack(
        ">I4sI4s4s4s12s4s", size, b"\0" * 4, 0x02100000, b"mntr", b"RGB ", b"XYZ ", b"\0" * 12, b"acsp"
    )
    header += bytes(68 - len(header)) + xyz(0.9642, 1.0, 0.8249)[8:]
    header += bytes(128 - len(header))
    return header + struct.pack(">I", len(tags)) + table + body


def test_a_16bit_png_with_another_colour_profile_is_converted(tmp_path, monkeypatch):
    import png
    from PIL import ImageCms

    xyz = ImageCms.ImageCmsProfile(ImageCms.createProfile("XYZ")).tobytes()
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    linear = _linear_srgb_profile()
    data = RNG.integers(0, 65536, (4, 4, 3), dtype=np.uint16)
    data[0, 0] = round(0.214 * 65535)  # linear light of sRGB's mid-grey 0.5
    for name, icc in (("srgb", srgb), ("xyz", xyz), ("linear", linear)):
        writer = png.Writer(4, 4, greyscale=False, bitdepth=16)
        with open(tmp_path / f"{name}.png", "wb") as f:
            writer.write(f, data.reshape(4, 12))
        raw = (tmp_path / f"{name}.png").read_bytes()
        chunk = b"iCCP" + b"p\0\0" + zlib.compress(icc)
        iccp = struct.pack(">I", len(chunk) - 4) + chunk + struct.pack(">I", zlib.crc32(chunk))
        (tmp_path / f"{name}.png").write_bytes(raw[:33] + iccp + raw[33:])  # after the IHDR chunk
    import sv3d.preprocess as preprocess

    converted = []
    to_srgb = preprocess._to_srgb
    monkeypatch.setattr(
        preprocess, "_to_srgb", lambda img: converted.append(img.info.get("icc_profile")) or to_srgb(img)
    )
    rgb, _ = load_image(tmp_path / "srgb.png")
    assert np.allclose(rgb, data / 65535, atol=1e-7) and converted == []  # sRGB: all 16 bits, as they are
    rgb, _ = load_image(tmp_path / "xyz.png")
    assert converted == [xyz]  # another profile: Pillow's reading, which converts to sRGB (at 8 bits)
    assert np.allclose(rgb * 255, np.round(rgb * 255), atol=1e-4)
    # "Linear sRGB" by name, gamma 1 by behaviour: converted too (it was read as sRGB, 0.214 for 0.5)
    rgb, _ = load_image(tmp_path / "linear.png")
    assert converted == [xyz, linear] and np.allclose(rgb[0, 0], 0.5, atol=3 / 255)


def test_a_camera_raw_file_is_refused_not_read_as_its_preview(tmp_path):
    """NEF and DNG files are TIFFs whose first image is a reduced-resolution preview (NewSubfileType 1;
    DNGVersion): Pillow read the 160 x 120 thumbnail, which was upscaled and reconstructed without a word."""
    tifffile = pytest.importorskip("tifffile")
    preview = RNG.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "DSC_0001.NEF", preview, photometric="rgb", subfiletype=1)
    tifffile.imwrite(
        tmp_path / "photo.dng", preview, photometric="rgb", extratags=[(50706, "B", 4, (1, 4, 0, 0), True)]
    )
    for name in ("DSC_0001.NEF", "photo.dng"):
        with pytest.raises(InputError, match="camera raw file .*160x120 preview"):
            load_image(tmp_path / name)
    tifffile.imwrite(tmp_path / "plain.tif", preview, photometric="rgb")
    assert load_image(tmp_path / "plain.tif")[0].shape == (120, 160, 3)


def test_an_unreadable_file_says_permission_denied(tmp_path, monkeypatch):
    import sv3d.preprocess as preprocess

    path = tmp_path / "locked.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)

    def locked(*args, **kwargs):  # what open() raises on a file without read permission (tests run as root)
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(preprocess, "open", locked, raising=False)
    with pytest.raises(InputError, match="permission denied"):
        load_image(path)


@pytest.mark.parametrize("suffix", ["tif", "jpg"])
def test_cmyk(tmp_path, suffix):
    cmyk = np.zeros((8, 8, 4), np.uint8)
    cmyk[:, :4] = (0, 255, 255, 0)  # red
    cmyk[:, 4:] = (255, 0, 0, 0)  # cyan
    Image.fromarray(cmyk, "CMYK").save(tmp_path / f"c.{suffix}", quality=100)
    rgb, alpha = load_image(tmp_path / f"c.{suffix}")
    atol = 1e-6 if suffix == "tif" else 0.06  # JPEG is lossy
    assert alpha is None
    assert np.allclose(rgb[2, 1], [1, 0, 0], atol=atol) and np.allclose(rgb[2, 6], [0, 1, 1], atol=atol)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(tmp_path, orientation):
    data = RNG.integers(0, 256, (5, 8, 3), dtype=np.uint8)  # non-square: rotations swap H and W
    img = Image.fromarray(data)
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(tmp_path / "o.png", exif=exif)
    rgb, _ = load_image(tmp_path / "o.png")
    with Image.open(tmp_path / "o.png") as stored:
        expected = np.asarray(ImageOps.exif_transpose(stored), dtype=np.float32) / 255
    assert rgb.shape == expected.shape and np.array_equal(rgb, expected)
    if orientation == 6:  # "rotate 90 CW to display": the stored top-left pixel shows at the top right
        assert rgb.shape == (8, 5, 3) and np.array_equal(rgb[0, -1], data[0, 0] / np.float32(255))


def test_an_open_pil_image_reads_as_its_file(tmp_path):
    """A PIL image given in memory skipped its EXIF orientation (sideways phone photos) and an RGB PNG's
    colour key (tRNS) was dropped in both paths: both read now as load_image reads the file."""
    from sv3d.preprocess import _array_to_float

    data = RNG.integers(0, 256, (5, 8, 3), dtype=np.uint8)
    data[0, :2] = (0, 255, 0)  # the colour key
    img = Image.fromarray(data)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "o.png", exif=exif, transparency=(0, 255, 0))
    rgb, alpha = load_image(tmp_path / "o.png")
    assert rgb.shape == (8, 5, 3) and alpha is not None
    assert alpha[0, -1] == 0.0 and alpha[1, -1] == 0.0 and alpha.sum() == alpha.size - 2  # rotated 90 CW
    with Image.open(tmp_path / "o.png") as opened:
        rgb2, alpha2 = _array_to_float(opened, "photo")
    assert np.array_equal(rgb2, rgb) and np.array_equal(alpha2, alpha)


def test_premultiplied_png_is_detected_and_forcing_works(tmp_path):
    cov = _coverage(40, 40, 20, 20, 12)  # soft-edged disk
    colour = np.array([0.9, 0.7, 0.5], np.float32)
    premultiplied = np.concatenate([colour * cov[..., None], cov[..., None]], -1)
    Image.fromarray(_u8(premultiplied), "RGBA").save(tmp_path / "pm.png")
    rgb, alpha = load_image(tmp_path / "pm.png")
    edge = (alpha > 0.2) & (alpha < 0.8)
    assert edge.sum() >= 16
    assert np.allclose(rgb[edge], colour, atol=0.03)  # divided back to the object's colour
    raw, _ = load_image(tmp_path / "pm.png", premultiplied=False)
    assert np.all(raw[edge].max(-1) <= alpha[edge] + 1 / 255)  # as stored
    # The same object stored straight (bright colour on the soft edge) is left alone.
    straight = np.concatenate([np.broadcast_to(colour, (40, 40, 3)), cov[..., None]], -1)
    Image.fromarray(_u8(straight), "RGBA").save(tmp_path / "st.png")
    rgb, _ = load_image(tmp_path / "st.png")
    assert np.allclose(rgb, _u8(straight)[..., :3] / 255.0)


# ---------------------------------------------------------------- load_image: errors


def _assert_one_line_naming(exc: pytest.ExceptionInfo, path: Path) -> None:
    message = str(exc.value)
    assert str(path) in message and "\n" not in message


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(InputError) as exc:
        load_image(tmp_path / "nope.png")
    _assert_one_line_naming(exc, tmp_path / "nope.png")
    with pytest.raises(InputError, match="directory") as exc:
        load_image(tmp_path)
    _assert_one_line_naming(exc, tmp_path)


def test_not_an_image(tmp_path):
    (tmp_path / "t.png").write_text("hello")
    with pytest.raises(InputError) as exc:
        load_image(tmp_path / "t.png")
    _assert_one_line_naming(exc, tmp_path / "t.png")


@pytest.mark.parametrize("suffix", ["png", "jpg", "tif"])
def test_truncated_files(tmp_path, suffix):
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"a.{suffix}")
    data = (tmp_path / f"a.{suffix}").read_bytes()
    (tmp_path / f"t.{suffix}").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as exc:
        load_image(tmp_path / f"t.{suffix}")
    _assert_one_line_naming(exc, tmp_path / f"t.{suffix}")


def test_truncated_16bit_png(tmp_path):
    writer = png.Writer(32, 32, greyscale=False, bitdepth=16)
    with open(tmp_path / "a.png", "wb") as f:
        writer.write(f, RNG.integers(0, 65536, (32, 96)).tolist())
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as exc:
        load_image(tmp_path / "t.png")
    _assert_one_line_naming(exc, tmp_path / "t.png")


# ---------------------------------------------------------------- background removal


def _synthetic_scene(height=120, width=160, background=0.93, noise=0.01):
    """A blue disk and a brown box, with a near-white patch inside the disk, on a light grey background."""
    cov_disk = _coverage(height, width, 60, 60, 35)
    box = np.zeros((height, width), np.float32)
    box[40:100, 95:140] = 1.0
    truth = np.maximum(cov_disk, box)
    rgb = np.full((height, width, 3), background, np.float32) + RNG.normal(0, noise, (height, width, 3))
    rgb = rgb * (1 - cov_disk[..., None]) + np.array([0.15, 0.25, 0.75]) * cov_disk[..., None]
    rgb = rgb * (1 - box[..., None]) + np.array([0.5, 0.35, 0.2]) * box[..., None]
    rgb[55:65, 55:65] = background + 0.02  # enclosed by the object: must stay object
    return np.clip(rgb, 0, 1).astype(np.float32), truth


def test_plain_background_matting():
    rgb, truth = _synthetic_scene()
    alpha = plain_background_alpha(rgb)
    assert alpha.shape == truth.shape and alpha.dtype == np.float32
    hard, true_hard = alpha > 0.5, truth > 0.5
    iou = (hard & true_hard).sum() / (hard | true_hard).sum()
    assert iou > 0.98, iou  # measured 0.999
    assert np.all(alpha[55:65, 55:65] == 1.0)  # the white patch inside the disk is kept
    assert np.abs(alpha - truth).mean() < 0.01  # measured 0.0015
    edge = (truth > 0.1) & (truth < 0.9)
    assert np.abs(alpha[edge] - truth[edge]).mean() < 0.2  # soft edges follow the coverage (0.11)


def test_plain_matting_opens_holes_one_sees_the_backdrop_through():
    # a brown ring on a light grey backdrop (a mug's handle from the side): the backdrop inside it is a hole;
    # a white label and a tiny highlight inside a solid disc beside it stay object
    height, width, background = 120, 200, 0.93
    ring = _coverage(height, width, 60, 60, 40) * (1.0 - _coverage(height, width, 60, 60, 20))
    disc = _coverage(height, width, 60, 150, 35)
    truth = np.maximum(ring, disc)
    rgb = np.full((height, width, 3), background, np.float32) + RNG.normal(0, 0.01, (height, width, 3))
    rgb = rgb * (1 - truth[..., None]) + np.array([0.45, 0.3, 0.2]) * truth[..., None]
    rgb[50:70, 140:160] = 0.96  # a white label: background-coloured, but brighter than the backdrop
    rgb[40:42, 150:152] = background  # a highlight of the backdrop's own colour, 4 px
    alpha = plain_background_alpha(np.clip(rgb, 0, 1).astype(np.float32))
    hard, true_hard = alpha > 0.5, truth > 0.5
    assert (hard & true_hard).sum() / (hard | true_hard).sum() > 0.98
    assert alpha[50:70, 50:70].max() == 0.0  # inside the ring: backdrop
    assert alpha[50:70, 140:160].min() == 1.0 and alpha[40:42, 150:152].min() == 1.0


def test_plain_matting_keeps_thin_parts_of_a_large_photo():
    """The speck-removing opening (radius 0.3% of the image: 3 px at 1000 px) deleted every part narrower
    than 7 px: a stem 4 px wide under a flower head vanished. Parts attached to the object stay now; a
    speck apart from it still goes."""
    height = width = 1000
    truth = _coverage(height, width, 400, 500, 150)  # the flower head
    truth[540:900, 498:502] = 1.0  # its stem, 4 px wide
    rgb = np.full((height, width, 3), 0.95, np.float32) + RNG.normal(0, 0.005, (height, width, 3))
    rgb = rgb * (1 - truth[..., None]) + np.array([0.2, 0.5, 0.1]) * truth[..., None]
    rgb[100:103, 100:103] = 0.2  # a speck of dust, 3 px
    rgb[300:303, :] = 0.3  # a seam across the whole photo, through the flower head
    alpha = plain_background_alpha(np.clip(rgb, 0, 1).astype(np.float32))
    assert alpha[600:880, 499:501].min() == 1.0  # the stem
    assert alpha[100:103, 100:103].max() == 0.0
    assert alpha[300:303, :300].max() == 0.0 and alpha[300:303, 700:].max() == 0.0  # the seam, as before


def test_disk_opening_by_distance_transforms_equals_scipys():
    """The matting's opening (radius 0.3% of the photo's side: 18 px at 48 MP) through distance transforms,
    against scipy's binary opening with the disk itself: equal on random masks, at the border too."""
    from scipy import ndimage

    from sv3d.preprocess import _disk, _open_with_disk

    for seed, radius in [(0, 1), (1, 2), (2, 3), (3, 5), (4, 8)]:
        rng = np.random.default_rng(seed)
        mask = ndimage.binary_dilation(rng.random((90, 70)) < 0.02, structure=_disk(radius + 2))
        mask ^= rng.random(mask.shape) < 0.03  # holes and specks
        mask[:, :4] = True  # touching the image's border
        expected = ndimage.binary_opening(mask, structure=_disk(radius))
        assert expected.any() and not expected.all()
        assert np.array_equal(_open_with_disk(mask, radius), expected), radius
    assert not _open_with_disk(np.eye(20, dtype=bool), 1).any()  # nothing survives the erosion


def test_plain_matting_rejects_busy_and_empty_images():
    busy = RNG.random((64, 64, 3)).astype(np.float32)
    with pytest.raises(InputError, match="not plain"):
        plain_background_alpha(busy)
    blank = np.full((64, 64, 3), 0.95, np.float32)
    with pytest.raises(InputError, match="no object"):
        plain_background_alpha(blank, name="blank.png")


def test_rembg_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "rembg", None)  # makes `import rembg` fail
    assert not rembg_available()
    rgb, truth = _synthetic_scene()
    with pytest.raises(InputError, match="rembg"):
        remove_background(rgb, "rembg")
    assert np.array_equal(remove_background(rgb, "auto"), plain_background_alpha(rgb))  # falls back


def test_rembg_without_onnxruntime_falls_back_or_is_one_line(monkeypatch, tmp_path):
    """rembg >= 2.0.71 without onnxruntime (a plain `pip install rembg`) ends the process on import: "auto"
    uses the plain matting then, "rembg" is one line naming rembg[cpu]."""
    import importlib.machinery

    monkeypatch.setenv("U2NET_HOME", str(tmp_path))
    (tmp_path / "u2net.onnx").write_bytes(b"")
    (tmp_path / "rembg.py").write_text("raise SystemExit(1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "rembg", raising=False)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # not installed
    assert not rembg_available()
    rgb, _ = _synthetic_scene()
    assert np.array_equal(remove_background(rgb, "auto"), plain_background_alpha(rgb))
    with pytest.raises(InputError, match=r"rembg\[cpu\]"):
        remove_background(rgb, "rembg")
    onnxruntime = types.ModuleType("onnxruntime")
    onnxruntime.__spec__ = importlib.machinery.ModuleSpec("onnxruntime", None)
    monkeypatch.setitem(sys.modules, "onnxruntime", onnxruntime)
    assert rembg_available()  # with it, rembg is used


def _fake_rembg(monkeypatch, calls):
    module = types.ModuleType("rembg")

    def new_session(name, **kwargs):
        calls.append(("session", name, kwargs.get("model_path")))
        return object()

    def remove(image, session=None, alpha_matting=False):
        calls.append(("remove", image.size, image.mode, alpha_matting))
        out = image.copy()
        w, h = image.size
        out.putalpha(Image.fromarray(_u8(_coverage(h, w, h / 2, w / 2, min(h, w) / 3))))
        return out

    module.new_session, module.remove = new_session, remove
    monkeypatch.setitem(sys.modules, "rembg", module)


def test_rembg_path_with_a_stand_in_module(monkeypatch, tmp_path):
    calls: list = []
    _fake_rembg(monkeypatch, calls)
    monkeypatch.setenv("U2NET_HOME", str(tmp_path))
    rgb = np.full((1000, 1500, 3), 0.5, np.float32)
    with pytest.raises(InputError, match="u2net.onnx"):  # weights absent: a clear error, no download
        rembg_alpha(rgb, name="photo.jpg")
    (tmp_path / "u2net.onnx").write_bytes(b"")
    alpha = rembg_alpha(rgb)
    assert calls[0] == ("session", "u2net_custom", str(tmp_path / "u2net.onnx"))  # the file as it is
    assert calls[1] == ("remove", (768, 512), "RGBA", True)  # the reference's 768 px thumbnail and matting
    assert alpha.shape == (1000, 1500) and alpha[500, 750] == 1.0 and alpha[0, 0] == 0.0


# ---------------------------------------------------------------- framing and preprocess_image


def _rgba_disk(height, width, cy, cx, radius, colour=(0.8, 0.1, 0.1)):
    cov = _coverage(height, width, cy, cx, radius)
    rgba = np.zeros((height, width, 4), np.float32)
    rgba[..., :3] = colour
    rgba[..., 3] = cov
    return rgba


def test_centring_and_scale_rule():
    rgba = _rgba_disk(200, 300, 60, 150, 40)  # off-centre, touching nothing
    image, alpha = preprocess_image(rgba)
    assert image.shape == (1, 3, 576, 576) and alpha.shape == (576, 576)
    a = alpha.numpy().astype(np.float64)
    ys, xs = np.mgrid[:576, :576] + 0.5
    cy, cx = (a * ys).sum() / a.sum(), (a * xs).sum() / a.sum()
    assert abs(cy - 288) < 0.5 and abs(cx - 288) < 0.5
    radius = math.sqrt(a.sum() / math.pi)  # the disk's radius from its area
    assert radius == pytest.approx(SPHERE_FRAME_RATIO * 288, rel=0.01)  # measured 244.64 vs 244.75
    _, alpha = preprocess_image(rgba, frame_ratio=0.5)
    assert math.sqrt(alpha.numpy().sum() / math.pi) == pytest.approx(144, rel=0.01)


def test_square_object_uses_its_bounding_circle():
    rgba = np.zeros((100, 100, 4), np.float32)
    rgba[20:60, 30:70] = (0.2, 0.6, 0.2, 1.0)  # 40 x 40 square
    _, alpha = preprocess_image(rgba)
    side = math.sqrt(alpha.numpy().sum())
    # The farthest pixel centre (half-diagonal 19.5 sqrt 2 px) goes to 0.85 * 288 px from the centre:
    # side = 40 * 0.85 * 288 / (19.5 sqrt 2) = 355 px.
    assert side == pytest.approx(40 * SPHERE_FRAME_RATIO * 288 / (19.5 * math.sqrt(2)), rel=0.01)
    hard = alpha.numpy() > 0.5
    assert not hard[:, 0].any() and not hard[0].any()  # its corners stay inside the frame


def test_object_larger_than_the_image_is_padded():
    rgba = _rgba_disk(64, 64, 32, 10, 30)  # cut by the left border: the canvas extends past the image
    _, alpha = preprocess_image(rgba)
    ys, xs = np.nonzero(alpha.numpy() > 0.5)
    assert abs((ys.min() + ys.max() + 1) / 2 - 288) <= 1 and abs((xs.min() + xs.max() + 1) / 2 - 288) <= 1


def test_output_on_white_without_dark_fringe():
    rgba = _rgba_disk(100, 100, 50, 50, 30, colour=(0.9, 0.9, 0.9))  # transparent pixels are black (0)
    image, alpha = preprocess_image(rgba, size=64)
    rgb = (image[0].permute(1, 2, 0).numpy() + 1) / 2
    assert image.min() >= -1 and image.max() <= 1
    assert np.all(rgb[alpha.numpy() == 0] == 1.0)  # white background
    assert rgb.min() >= 0.9 - 1e-4  # composite of 0.9 and white: never darker (straight resizing would be)
    interior = (rgb[32, 32] * 2 - 1).tolist()
    assert interior == pytest.approx([0.8, 0.8, 0.8], abs=1e-4)


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_plain_background_file_end_to_end(tmp_path, suffix):
    rgb, truth = _synthetic_scene()
    Image.fromarray(_u8(rgb)).save(tmp_path / f"photo.{suffix}", quality=90)
    image, alpha = preprocess_image(tmp_path / f"photo.{suffix}", size=128, background="plain")
    expected, expected_alpha = frame_object(rgb, truth, size=128)  # framed with the true mask
    assert float(np.abs(alpha.numpy() - expected_alpha).mean()) < 0.02
    out = (image[0].permute(1, 2, 0).numpy() + 1) / 2
    assert float(np.abs(out - expected).mean()) < 0.02


def test_plain_matting_leaves_no_fringe_of_a_coloured_backdrop():
    # a red disc with an antialiased edge on a green backdrop: composited on white, its edge pixels must be
    # mixes of red and white only (G == B on that line: red has G = B = 0.2, white 1), not of green
    height = width = 96
    cover = _coverage(height, width, 48, 48, 30)  # [H, W]
    red, green = np.array([0.8, 0.2, 0.2]), np.array([0.1, 0.7, 0.2])
    rgb = (cover[..., None] * red + (1 - cover[..., None]) * green).astype(np.float32)
    image, _ = preprocess_image(rgb, size=96, background="plain")
    out = (image[0].permute(1, 2, 0).numpy() + 1) / 2  # [S, S, 3]
    edge = (np.abs(out - 1.0).max(-1) > 0.02) & (np.abs(out - red).max(-1) > 0.02)  # partly covered
    assert edge.sum() > 50
    greenness = out[..., 1] - out[..., 2]  # [S, S]
    assert float(greenness[edge].mean()) < 0.01  # measured 0.0019; the edge's raw colours: 0.053
    alpha, colour = plain_background_matte(rgb)
    assert np.allclose(alpha, plain_background_alpha(rgb)) and colour.shape == rgb.shape


def test_rgba_file_alpha_is_the_mask(tmp_path):
    rgba = _rgba_disk(80, 80, 30, 50, 20)
    Image.fromarray(_u8(rgba), "RGBA").save(tmp_path / "cut.png")
    _, from_file = preprocess_image(tmp_path / "cut.png", size=64, background="plain")
    _, from_array = preprocess_image(_u8(rgba), size=64)
    assert torch.equal(from_file, from_array)


def test_preprocess_errors(tmp_path):
    with pytest.raises(InputError, match="empty"):
        preprocess_image(np.zeros((64, 64, 4), np.float32))
    with pytest.raises(InputError, match="at least 32"):
        preprocess_image(_rgba_disk(20, 40, 10, 20, 5))
    with pytest.raises(InputError, match="frame ratio"):
        preprocess_image(_rgba_disk(64, 64, 32, 32, 20), frame_ratio=1.5)
    with pytest.raises(InputError, match="background"):
        preprocess_image(_rgba_disk(64, 64, 32, 32, 20), background="magic")  # type: ignore[arg-type]
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        preprocess_image(np.full((64, 64, 3), 2.0, np.float32))
    with pytest.raises(InputError, match="not found"):
        preprocess_image(tmp_path / "missing.jpg")


def test_uint16_and_tensor_inputs_agree():
    rgba = _rgba_disk(64, 64, 30, 34, 20)
    a = preprocess_image(np.round(rgba * 65535).astype(np.uint16), size=64)
    b = preprocess_image(torch.from_numpy(rgba), size=64)
    assert torch.allclose(a[0], b[0], atol=1e-4) and torch.allclose(a[1], b[1], atol=1e-4)


def test_a_speck_in_a_cutouts_alpha_neither_moves_nor_shrinks_the_object():
    # A disc of radius 40 at (100, 100) in a 200² cutout and a 2x2 opaque speck at (5, 5) (a cutout's or
    # rembg's stray island): the speck set the bounding box and the radius, the disc came out smaller and
    # off-centre. Framed as without the speck now, and the speck is cleared.
    rgb = np.full((200, 200, 3), 0.3, np.float32)
    clean = _coverage(200, 200, 100, 100, 40)
    specked = clean.copy()
    specked[5:7, 5:7] = 1.0
    want_rgb, want_alpha = frame_object(rgb, clean, size=64)
    got_rgb, got_alpha = frame_object(rgb, specked, size=64)
    assert np.abs(got_alpha - want_alpha).max() < 1e-6 and np.abs(got_rgb - want_rgb).max() < 1e-6
    # two parts of one object (a mug and its detached handle, 5% of the body) both stay
    two = clean.copy()
    two[100:110, 160:170] = 1.0  # 100 px against the disc's 5,000
    _, alpha = frame_object(rgb, two, size=64)
    assert alpha[:, 40:].max() > 0.5 and not np.allclose(alpha, want_alpha, atol=0.01)


def test_tiff_extra_samples_and_an_open_tiff_and_no_pixel_limit(tmp_path, monkeypatch):
    tifffile = pytest.importorskip("tifffile")
    data = RNG.integers(0, 65536, (6, 5, 5), dtype=np.uint16)
    # RGB + a saved selection ("unspecified", Photoshop): no alpha (it was read as the alpha)
    tifffile.imwrite(tmp_path / "sel.tif", data[..., :4], photometric="rgb", extrasamples=["unspecified"])
    rgb, alpha = load_image(tmp_path / "sel.tif")
    assert alpha is None and np.allclose(rgb, data[..., :3] / 65535, atol=1e-7)
    # RGB + transparency + a selection: the alpha is the 4th sample (refused: "5 channels")
    tifffile.imwrite(
        tmp_path / "two.tif", data, photometric="rgb", extrasamples=["unassalpha", "unspecified"]
    )
    rgb, alpha = load_image(tmp_path / "two.tif")
    assert np.allclose(alpha, data[..., 3] / 65535, atol=1e-7)
    # Pillow's decompression-bomb limit turned off (a common snippet): read, no TypeError
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    rgb, _ = load_image(tmp_path / "sel.tif")
    assert rgb.shape == (6, 5, 3)
    # an 8-bit TIFF with Orientation 6 opened by the caller: Pillow turns it as it loads, once
    from sv3d.preprocess import _array_to_float

    small = RNG.integers(0, 256, (5, 8, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "o.tif", small, photometric="rgb", extratags=[(274, "H", 1, 6, True)])
    rgb, _ = load_image(tmp_path / "o.tif")
    assert rgb.shape == (8, 5, 3)
    with Image.open(tmp_path / "o.tif") as opened:
        rgb2, _ = _array_to_float(opened, "scan")
    assert np.array_equal(rgb2, rgb)
