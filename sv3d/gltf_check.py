"""What a glTF file needs that trimesh would drop without a word: checked before `sv3d.meshio` loads it.

trimesh (5.x) reads glTF 2.0 but, with its logging silenced as `meshio` does, a file that needs more loads
wrong instead of failing: Draco-compressed geometry comes back as zeros ("no extent"), an image it cannot
decode leaves the material untextured, and `KHR_mesh_quantization` / `KHR_texture_transform` /
`texCoord: 1` give texture coordinates it does not interpret. So the document is read here first: an
extension in `extensionsRequired` that the loader does not implement, a texture that uses them, or an
image that Pillow cannot decode raises `MeshLoadError` naming the file and the reason, in one line.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import struct
import urllib.parse
from pathlib import Path

from PIL import Image

from sv3d.errors import MeshLoadError

__all__ = ["check_gltf"]

GLB_MAGIC = b"glTF"
UNSUPPORTED_REQUIRED = {  # extension -> why the loader cannot honour it
    "KHR_draco_mesh_compression": "Draco-compressed geometry (install DracoPy, or export without Draco)",
    "EXT_meshopt_compression": "meshopt-compressed buffers (export without compression)",
    "KHR_mesh_quantization": "quantized attributes (export with float positions and UVs)",
    "KHR_texture_transform": "texture transforms (bake them into the UVs)",
    "KHR_texture_basisu": "KTX2/Basis textures (export PNG or JPEG textures)",
}


def check_gltf(path: Path, with_visuals: bool) -> None:
    """Raise `MeshLoadError` when the .glb/.gltf at `path` needs what the loader would silently get wrong.
    `with_visuals`: also the textures (a geometry-only load does not read them)."""
    document, binary = _read_document(path)
    required = set(document.get("extensionsRequired") or [])
    if "KHR_draco_mesh_compression" in required and importlib.util.find_spec("DracoPy") is not None:
        required.discard("KHR_draco_mesh_compression")  # trimesh decodes Draco with DracoPy
    if not with_visuals:
        required -= {"KHR_texture_transform", "KHR_texture_basisu"}
    unsupported = sorted(required & UNSUPPORTED_REQUIRED.keys())
    if unsupported:
        name = unsupported[0]
        raise MeshLoadError(f"{path}: needs {', '.join(unsupported)}: {UNSUPPORTED_REQUIRED[name]}")
    if not with_visuals:
        return
    for material in document.get("materials") or []:
        texture = (material.get("pbrMetallicRoughness") or {}).get("baseColorTexture")
        if texture is None:
            continue
        if int(texture.get("texCoord", 0)) != 0:
            raise MeshLoadError(
                f"{path}: a base colour texture uses texCoord {texture['texCoord']} (only 0 is read)"
            )
        if "KHR_texture_transform" in (texture.get("extensions") or {}):
            raise MeshLoadError(
                f"{path}: a base colour texture has KHR_texture_transform (bake it into the UVs)"
            )
    for index, image in enumerate(document.get("images") or []):
        try:
            data = _image_bytes(path, document, binary, image)
        except (IndexError, KeyError, TypeError, ValueError) as error:
            raise MeshLoadError(
                f"{path}: image {index} is not where the document says ({_one_line(error)})"
            ) from error
        _decode(path, index, data)


def _read_document(path: Path) -> tuple[dict, bytes]:
    """(the JSON document, the GLB's binary chunk or b"")."""
    try:
        data = path.read_bytes()
        if data[:4] == GLB_MAGIC:
            length, kind = struct.unpack_from("<I4s", data, 12)
            if kind != b"JSON":
                raise ValueError("the first chunk is not JSON")
            document = json.loads(data[20 : 20 + length])
            rest = 20 + length
            binary = b""
            if len(data) >= rest + 8:
                size, kind = struct.unpack_from("<I4s", data, rest)
                binary = data[rest + 8 : rest + 8 + size] if kind == b"BIN\0" else b""
            return document, binary
        return json.loads(data), b""
    except (OSError, ValueError, struct.error) as error:  # JSONDecodeError is a ValueError
        raise MeshLoadError(f"{path}: cannot parse as glTF ({_one_line(error)})") from error


def _image_bytes(path: Path, document: dict, binary: bytes, image: dict) -> bytes:
    """An image's encoded bytes: a buffer view of the GLB's binary chunk, a data URI or a side file."""
    if "bufferView" in image:
        view = (document.get("bufferViews") or [])[int(image["bufferView"])]
        buffer = (document.get("buffers") or [])[int(view.get("buffer", 0))]
        start = int(view.get("byteOffset", 0))
        source = binary if "uri" not in buffer else _uri_bytes(path, buffer["uri"])
        return source[start : start + int(view["byteLength"])]
    return _uri_bytes(path, image.get("uri", ""))


def _uri_bytes(path: Path, uri: str) -> bytes:
    if uri.startswith("data:"):
        return base64.b64decode(uri.split(",", 1)[-1])
    side = path.parent / urllib.parse.unquote(uri)  # URIs are percent-encoded ("my%20texture.png")
    if not side.is_file():
        raise MeshLoadError(f"{path}: file '{uri}' that it refers to not found (looked for {side})")
    return side.read_bytes()


def _decode(path: Path, index: int, data: bytes) -> None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception as error:  # Pillow raises several types for truncated or non-image data
        raise MeshLoadError(f"{path}: image {index} cannot be decoded ({_one_line(error)})") from error


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or "no details"
    return f"{type(error).__name__}: {text[:200]}"
