"""What a glTF file needs that trimesh would get wrong without a word: checked before `sv3d.meshio` loads it.

trimesh (5.x) reads glTF 2.0 but, with its logging silenced as `meshio` does, a file that needs more loads
wrong instead of failing: Draco-compressed geometry comes back as zeros ("no extent"), GPU instancing
(`EXT_mesh_gpu_instancing`) as one copy, a base colour image it cannot decode leaves the material
untextured, normalized integer attributes (`KHR_mesh_quantization`, or UVs the core specification allows
as normalized bytes) are read as raw integers, and `KHR_texture_transform` / `texCoord: 1` on the base
colour texture are ignored. So the document is read here first and such a file raises `MeshLoadError`, one
line naming the file and the reason:
- an extension in `extensionsRequired` outside `READ_EXTENSIONS` (Draco only when DracoPy is installed), or
  a node with GPU instancing;
- a normalized integer POSITION or NORMAL; with `with_visuals`, a textured primitive whose TEXCOORD_0 is
  not float;
- with `with_visuals`, a base colour texture with `texCoord` other than 0 or a non-identity texture
  transform, or whose image Pillow cannot decode (images used only by other maps are not read: trimesh
  uses the base colour alone, and skips KTX2 images for a fallback).
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

from sv3d.errors import MeshLoadError, brief

__all__ = ["check_gltf"]

GLB_MAGIC = b"glTF"
FLOAT = 5126  # accessor componentType
# Required extensions that trimesh reads or that do not change the geometry and base colour we use
READ_EXTENSIONS = {
    "KHR_materials_unlit",
    "KHR_materials_emissive_strength",
    "KHR_materials_ior",
    "KHR_materials_specular",
    "KHR_materials_transmission",
    "KHR_materials_volume",
    "KHR_materials_clearcoat",
    "KHR_materials_sheen",
    "KHR_mesh_quantization",  # float or plain integer positions read right; normalized ones refused below
    "KHR_texture_transform",  # identity or on other maps: harmless; on the base colour: refused below
    "EXT_texture_webp",
}


def check_gltf(path: Path, with_visuals: bool) -> None:
    """Raise `MeshLoadError` when the .glb/.gltf at `path` needs what the loader would silently get wrong.
    `with_visuals`: also the base colour textures (a geometry-only load does not read them)."""
    document, binary = _read_document(path)
    try:
        _check_document(path, document, binary, with_visuals)
    except MeshLoadError:
        raise
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as error:  # malformed document
        raise MeshLoadError(f"{path}: malformed glTF document ({brief(error)})") from error


def _check_document(path: Path, document: dict, binary: bytes, with_visuals: bool) -> None:
    readable = set(READ_EXTENSIONS)
    if _draco_readable():
        readable.add("KHR_draco_mesh_compression")
    unread = sorted(set(document.get("extensionsRequired") or []) - readable)
    if unread:
        raise MeshLoadError(f"{path}: needs {', '.join(unread)}, which the loader does not read")
    instanced = [
        n for n in document.get("nodes") or [] if "EXT_mesh_gpu_instancing" in (n.get("extensions") or {})
    ]
    if instanced:  # trimesh would place one copy of each
        raise MeshLoadError(
            f"{path}: {len(instanced)} node(s) use EXT_mesh_gpu_instancing, which the loader does not read"
        )
    accessors = document.get("accessors") or []
    materials = document.get("materials") or []
    for mesh in document.get("meshes") or []:
        for primitive in mesh.get("primitives") or []:
            attributes = primitive.get("attributes") or {}
            for name in ("POSITION", "NORMAL"):
                if name in attributes and accessors[attributes[name]].get("normalized"):
                    raise MeshLoadError(f"{path}: normalized integer {name} (export float attributes)")
            textured = _base_color_texture(materials, primitive) is not None
            uv = attributes.get("TEXCOORD_0")
            if with_visuals and textured and uv is not None and accessors[uv].get("componentType") != FLOAT:
                raise MeshLoadError(f"{path}: integer TEXCOORD_0 (export float texture coordinates)")
    if not with_visuals:
        return
    sources: set[int] = set()  # the images that base colour textures show
    textures = document.get("textures") or []
    for material in materials:
        info = _material_texture(material)
        if info is None:
            continue
        if int(info.get("texCoord", 0)) != 0:
            raise MeshLoadError(
                f"{path}: a base colour texture uses texCoord {info['texCoord']} (only 0 is read)"
            )
        transform = (info.get("extensions") or {}).get("KHR_texture_transform")
        if transform is not None and not _identity(transform):
            raise MeshLoadError(
                f"{path}: a base colour texture has KHR_texture_transform (bake it into the UVs)"
            )
        texture = textures[int(info["index"])]
        webp = (texture.get("extensions") or {}).get("EXT_texture_webp") or {}
        source = webp.get("source", texture.get("source"))  # trimesh reads the WebP one when there is one
        if source is not None:
            sources.add(int(source))
    images = document.get("images") or []
    buffers: dict[str, bytes] = {}  # side files read once
    for index in sorted(sources):
        if images[index].get("mimeType") == "image/ktx2":
            continue  # trimesh skips it (its fallback source, if any, is another image)
        _decode(path, index, _image_bytes(path, document, binary, images[index], buffers))


def _draco_readable() -> bool:
    """trimesh decodes Draco-compressed primitives with DracoPy, when it is installed."""
    return importlib.util.find_spec("DracoPy") is not None


def _base_color_texture(materials: list, primitive: dict) -> dict | None:
    """The primitive's material's base colour texture info, or None."""
    if primitive.get("material") is None:
        return None
    return _material_texture(materials[int(primitive["material"])])


def _material_texture(material: dict) -> dict | None:
    """A material's base colour texture info, or None."""
    return (material.get("pbrMetallicRoughness") or {}).get("baseColorTexture")


def _identity(transform: dict) -> bool:
    return (
        list(transform.get("offset", [0, 0])) == [0, 0]
        and list(transform.get("scale", [1, 1])) == [1, 1]
        and float(transform.get("rotation", 0)) == 0
    )


def _read_document(path: Path) -> tuple[dict, bytes]:
    """(the JSON document, the GLB's binary chunk or b"")."""
    try:
        data = path.read_bytes()
        binary = b""
        if data[:4] == GLB_MAGIC:
            length, kind = struct.unpack_from("<I4s", data, 12)
            if kind != b"JSON":
                raise ValueError("the first chunk is not JSON")
            document = json.loads(data[20 : 20 + length])
            rest = 20 + length
            if len(data) >= rest + 8:
                size, kind = struct.unpack_from("<I4s", data, rest)
                binary = data[rest + 8 : rest + 8 + size] if kind == b"BIN\0" else b""
        else:
            document = json.loads(data)
        if not isinstance(document, dict):
            raise ValueError("the document is not a JSON object")
        return document, binary
    except (OSError, ValueError, struct.error) as error:  # JSONDecodeError is a ValueError
        raise MeshLoadError(f"{path}: cannot parse as glTF ({brief(error)})") from error


def _image_bytes(path: Path, document: dict, binary: bytes, image: dict, buffers: dict[str, bytes]) -> bytes:
    """An image's encoded bytes: a buffer view (of the GLB's binary chunk or a buffer's file or data URI),
    or its own data URI or side file."""
    if "bufferView" in image:
        view = document["bufferViews"][int(image["bufferView"])]
        buffer = document["buffers"][int(view.get("buffer", 0))]
        if "uri" in buffer:
            if buffer["uri"] not in buffers:
                buffers[buffer["uri"]] = _uri_bytes(path, buffer["uri"])
            source = buffers[buffer["uri"]]
        else:
            source = binary
        start = int(view.get("byteOffset", 0))
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
    """Whether Pillow reads the image: opened and verified (its chunks and checksums), not decoded, which
    trimesh and `meshio` do next; a truncated or unknown image raises here."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except Exception as error:  # Pillow raises several types for truncated or non-image data
        raise MeshLoadError(f"{path}: image {index} cannot be decoded ({brief(error)})") from error
