"""Mesh loading: a user's or a dataset's mesh file into the world frame as a `refine.mesh.Mesh`.

Follows the conventions of ARCHITECTURE.md ("World", "Meshes"): `.glb`/`.gltf` are +Y-up by the glTF
specification and are turned to our z-up world with glTF (X, Y, Z) -> world (X, -Z, Y), the inverse of the
export rule; `.obj`/`.ply`/`.off` are taken as z-up (the Google Scanned Objects convention); `up=` overrides.
After that the mesh is placed: its bounding box is centred at the origin and it is scaled so that its
bounding sphere about that centre (the largest vertex distance) has radius 0.5.

Accepted inputs: a mesh file, or a GSO object directory `<obj>/meshes/model.obj` (+ `model.mtl`,
`materials/textures/texture.png`). Real GSO `.mtl` files say `map_Kd texture.png` although the image lies in
`../materials/textures/`; that location is searched too.

Colour, in the order `refine.mesh.Mesh` uses it:
- image textures with per-vertex UVs (OBJ convention, origin bottom-left; trimesh already flips glTF's
  top-left UVs on reading, and a test pins that both paths agree). A single textured part, or parts that
  all use one image (instances, primitives of one material), keep that image and their UVs untouched (UVs
  outside [0, 1] wrap, as the rasterizer samples them). Otherwise parts of which at least one is textured
  are packed into one atlas: each image (once for all the parts that use it with the same UV tiles) gets a
  2-pixel edge-replicated gutter, plain parts a small constant patch, vertex-coloured parts a patch of their
  mean colour; UVs that wrap are baked by repeating the image over the integer tiles they cover (at most
  `MAX_UV_TILES` per axis) and clamped to [0, 1] beyond that.
- otherwise per-vertex colours (parts with a plain colour contribute it to all their vertices);
- otherwise the one material colour (`Kd`, `baseColorFactor`) as `Mesh.color`.
glTF colour factors and `COLOR_0` are linear by the specification and are converted to sRGB, the space of
textures and of our images; OBJ/PLY colours are taken as sRGB. An OBJ `Kd` next to a `map_Kd` is ignored
(GSO writes `Kd 1 1 1`, and common viewers show the texture alone); a glTF `baseColorFactor` multiplies its
texture, as the specification says.

Vertex normals: the file's, made flip-consistent with the face winding (a normal pointing against its faces
is negated); otherwise area-weighted normals over all faces that share a vertex position, so that UV seams
do not show in the shading.

Bad input raises `MeshLoadError` with one line naming the file and the problem; trimesh's own log messages
for such files are silenced.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import torch
import trimesh
from PIL import Image

from refine.mesh import DEFAULT_COLOR, Mesh
from refine.rasterizer import MAX_TRIANGLES
from sv3d.errors import InputError, MeshLoadError, brief
from sv3d.gltf_check import check_gltf

UpAxis = Literal["auto", "y", "z"]

SUPPORTED_SUFFIXES = (".obj", ".ply", ".off", ".glb", ".gltf")
Y_UP_SUFFIXES = (".glb", ".gltf")  # +Y-up by the glTF specification
# glTF (X, Y, Z) -> world (X, -Z, Y): a rotation of +90 degrees about x (det = +1, winding kept)
Y_UP_TO_Z_UP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
MAX_ATLAS_SIZE = 4096  # longest atlas side; larger packings are scaled down (a float atlas is 192 MiB)
MAX_UV_TILES = 4  # UV wrap baked by repetition up to this many tiles per axis, clamped beyond
UV_WRAP_TOLERANCE = 1e-3  # UVs this close outside [0, 1] are rounding, not wrap-around
ATLAS_GUTTER = 2  # pixels of edge replication around each packed image against bilinear bleeding
PATCH_SIZE = 4  # side of the constant-colour patch of a plain part in an atlas

ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, torch.Tensor)


@dataclass
class _Part:
    """One geometry of a file, in world axes (before placement), with its colour source."""

    vertices: np.ndarray  # [n, 3] float64
    faces: np.ndarray  # [f, 3] int64
    normals: np.ndarray | None = None  # [n, 3] from the file, None when the file has none
    uvs: np.ndarray | None = None  # [n, 2] OBJ convention, set together with image
    image: np.ndarray | None = None  # [h, w, 3] uint8, row 0 = top
    vertex_colors: np.ndarray | None = None  # [n, 3] in [0, 1], sRGB
    color: tuple[float, float, float] = DEFAULT_COLOR  # plain colour when neither of the above is set


@dataclass
class _ObjMaterial:
    color: tuple[float, float, float] | None  # Kd
    image: np.ndarray | None  # [h, w, 3] uint8 from map_Kd


# ---------------------------------------------------------------------------------------------- public API


def resolve_mesh_path(path: str | Path) -> Path:
    """The mesh file a path means: the file itself, or the mesh inside a (GSO) object directory."""
    path = Path(path)
    if not path.exists():
        raise MeshLoadError(f"{path}: no such file or directory")
    if path.is_dir():
        for preferred in (path / "meshes" / "model.obj", path / "model.obj"):
            if preferred.is_file():
                return preferred
        candidates = sorted(
            p
            for folder in (path, path / "meshes")
            if folder.is_dir()
            for p in folder.iterdir()
            if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES
        )
        if not candidates:
            raise MeshLoadError(
                f"{path}: directory holds no mesh (looked for meshes/model.obj and "
                f"{'/'.join(SUPPORTED_SUFFIXES)} files)"
            )
        if len(candidates) > 1:
            names = ", ".join(str(p.relative_to(path)) for p in candidates[:4])
            raise MeshLoadError(f"{path}: directory holds several meshes ({names}); pass one file")
        path = candidates[0]
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise MeshLoadError(
            f"{path}: unsupported mesh format '{path.suffix}' "
            f"(expected one of {', '.join(SUPPORTED_SUFFIXES)})"
        )
    return path


def place_in_world(vertices: ArrayOrTensor) -> tuple[ArrayOrTensor, ArrayOrTensor, float]:
    """Centre the bounding box at the origin and scale the bounding sphere to radius 0.5.

    vertices: [N, 3] numpy array or tensor. Returns (placed [N, 3], center [3], scale) of the input's type,
    with placed = (vertices - center) * scale; apply the same to other points with `apply_placement`.
    """
    if vertices.ndim != 2 or vertices.shape[-1] != 3 or vertices.shape[0] == 0:
        raise InputError(
            f"place_in_world: vertices must be a non-empty [N, 3] array, got {tuple(vertices.shape)}"
        )
    if isinstance(vertices, torch.Tensor):
        center_t = (vertices.amin(dim=0) + vertices.amax(dim=0)) / 2  # [3]
        radius = float((vertices - center_t).norm(dim=-1).max())
        if not np.isfinite(radius) or radius <= 0:
            raise InputError(f"place_in_world: cannot scale vertices whose bounding radius is {radius}")
        scale = 0.5 / radius
        return (vertices - center_t) * scale, center_t, scale
    center = (vertices.min(axis=0) + vertices.max(axis=0)) / 2  # [3]
    radius = float(np.linalg.norm(vertices - center, axis=-1).max())
    if not np.isfinite(radius) or radius <= 0:
        raise InputError(f"place_in_world: cannot scale vertices whose bounding radius is {radius}")
    scale = 0.5 / radius
    return (vertices - center) * scale, center, scale


def apply_placement(points: ArrayOrTensor, center: ArrayOrTensor, scale: float) -> ArrayOrTensor:
    """Move other points [N, 3] (e.g. a prediction) by a placement returned from `place_in_world`."""
    return (points - center) * scale


def load_mesh(path: str | Path, up: UpAxis = "auto", place: bool = True) -> Mesh:
    """Load a mesh file or GSO object directory as a `Mesh` in the world frame (CPU tensors).

    up: "auto" (glTF: y, everything else: z), "y" or "z": the file's up axis.
    place: centre and scale into the radius-0.5 world (`place_in_world`); False keeps the file's units.
    """
    mesh_path = resolve_mesh_path(path)
    parts = _read_parts(mesh_path, up, with_visuals=True)

    # 1. Geometry: one vertex array, faces offset per part
    vertices, faces = _concatenate(parts)  # [N, 3], [F, 3]
    _check_geometry(mesh_path, vertices, faces)
    if place:
        vertices, _, _ = place_in_world(vertices)

    # 2. Normals: the file's where given (already flip-consistent), else computed over shared positions
    if all(p.normals is not None for p in parts):
        normals = np.concatenate([p.normals for p in parts], axis=0)  # [N, 3]
    else:
        normals = smooth_vertex_normals(vertices, faces)  # [N, 3]
        offsets = np.cumsum([0] + [len(p.vertices) for p in parts])
        for part, start, end in zip(parts, offsets[:-1], offsets[1:], strict=True):
            if part.normals is not None:
                normals[start:end] = part.normals

    # 3. Colour
    uvs, texture, vertex_colors, color = _merge_colors(parts)

    def tensor(a: np.ndarray | None, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(dtype)

    return Mesh(
        vertices=tensor(vertices),  # [N, 3]
        faces=tensor(faces, torch.int64),  # [F, 3]
        vertex_normals=tensor(normals),  # [N, 3]
        vertex_colors=tensor(vertex_colors),  # [N, 3] or None
        uvs=tensor(uvs),  # [N, 2] or None
        texture=None if texture is None else torch.from_numpy(texture).float() / 255.0,  # [H, W, 3]
        color=color,
    )


def load_trimesh(path: str | Path, up: UpAxis = "auto", place: bool = True) -> trimesh.Trimesh:
    """Load geometry only (no colour, textures not read) as a `trimesh.Trimesh`, placed like `load_mesh`.

    Vertices at the same position are merged, so a closed surface split at UV seams is watertight again.
    """
    mesh_path = resolve_mesh_path(path)
    parts = _read_parts(mesh_path, up, with_visuals=False)
    vertices, faces = _concatenate(parts)  # [N, 3], [F, 3]
    _check_geometry(mesh_path, vertices, faces)
    if place:
        vertices, _, _ = place_in_world(vertices)
    return trimesh.Trimesh(vertices=vertices, faces=faces, process=True)


def smooth_vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """[N, 3] unit area-weighted normals, summed over all vertices that share a position.

    vertices [N, 3], faces [F, 3]. Vertices split only for UVs (seams) thus get one common normal.
    """
    _, canonical = np.unique(vertices, axis=0, return_inverse=True)  # [N] position id
    return area_weighted_normals(vertices, faces, canonical.reshape(-1))


def area_weighted_normals(
    vertices: np.ndarray,  # [N, 3]
    faces: np.ndarray,  # [F, 3] int
    group: np.ndarray | None = None,  # [N] int: vertices with one id share one normal; None = each its own
) -> np.ndarray:
    """[N, 3] unit normals: area-weighted face normals (right-hand rule) summed per vertex group.

    Vertices that no non-degenerate face touches get +z.
    """
    group = np.arange(len(vertices)) if group is None else group
    v0, v1, v2 = vertices[faces[:, 0]], vertices[faces[:, 1]], vertices[faces[:, 2]]
    face_n = np.cross(v1 - v0, v2 - v0)  # [F, 3], length 2 * area
    ids = group[faces.reshape(-1)]  # [3F]
    weights = np.repeat(face_n, 3, axis=0)  # [3F, 3]
    n_groups = int(group.max()) + 1
    summed = np.stack([np.bincount(ids, weights[:, k], minlength=n_groups) for k in range(3)], axis=-1)
    normals = summed[group]  # [N, 3]
    length = np.linalg.norm(normals, axis=-1, keepdims=True)  # [N, 1]
    return np.where(length > 1e-30, normals / np.maximum(length, 1e-30), np.array([0.0, 0.0, 1.0]))


# --------------------------------------------------------------------------------------------- reading


@contextmanager
def _quiet_trimesh() -> Iterator[None]:
    """Silence trimesh's logging and warnings while it reads a file: our errors say what went wrong."""
    logger = logging.getLogger("trimesh")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _resolve_up(path: Path, up: str) -> str:
    if up not in ("auto", "y", "z"):
        raise InputError(f"up must be 'auto', 'y' or 'z', got {up!r}")
    if up == "auto":
        return "y" if path.suffix.lower() in Y_UP_SUFFIXES else "z"
    return up


def _read_parts(path: Path, up: str, with_visuals: bool) -> list[_Part]:
    """Every triangle geometry of the file, scene transforms and up axis applied, validated."""
    up = _resolve_up(path, up)
    suffix = path.suffix.lower()
    obj_materials = _read_obj_materials(path) if with_visuals and suffix == ".obj" else {}
    if suffix in Y_UP_SUFFIXES:
        check_gltf(path, with_visuals)  # what trimesh would load wrong without a word
    with _quiet_trimesh():
        try:
            # textures and material libraries may lie beside the mesh's folder (`../textures/wood.png`):
            # trimesh 5 skips those without a word unless told (check_gltf and our .mtl reading find them)
            resolver = trimesh.resolvers.FilePathResolver(path, allow_anywhere=True)
            scene = trimesh.load_scene(
                path, process=False, skip_materials=not with_visuals, resolver=resolver
            )
        except MeshLoadError:
            raise
        except IndexError as error:
            raise MeshLoadError(f"{path}: face or UV indices out of range ({brief(error)})") from error
        except Exception as error:  # trimesh raises many types for corrupt files
            raise MeshLoadError(f"{path}: cannot parse as a {suffix} mesh ({brief(error)})") from error

        parts: list[_Part] = []
        n_points = 0
        # one array per image and colour factor, however many parts use it
        decoded: dict[tuple, np.ndarray] = {}
        hidden = 0
        for node in scene.graph.nodes_geometry:
            transform, name = scene.graph[node]
            geometry = scene.geometry[name]
            if not np.asarray(transform)[:3, :3].any():
                hidden += 1  # scaled to zero, glTF's way of hiding a node: no area, and no place in the box
                continue
            if isinstance(geometry, trimesh.Trimesh) and len(geometry.faces) > 0:
                parts.append(
                    _read_part(path, geometry, np.asarray(transform), obj_materials, with_visuals, decoded)
                )
            else:
                n_points += len(getattr(geometry, "vertices", ()))
    if not parts:
        if hidden:
            raise MeshLoadError(f"{path}: all {hidden} mesh node(s) are scaled to zero (hidden)")
        if n_points > 0:
            raise MeshLoadError(f"{path}: has no faces ({n_points} vertices only, a point cloud?)")
        raise MeshLoadError(f"{path}: contains no mesh geometry (empty or not a {suffix} file)")
    if up == "y":
        for part in parts:
            part.vertices = part.vertices @ Y_UP_TO_Z_UP.T  # [n, 3]
            if part.normals is not None:
                part.normals = part.normals @ Y_UP_TO_Z_UP.T  # [n, 3]
    return parts


def _read_part(
    path: Path,
    geometry: trimesh.Trimesh,
    transform: np.ndarray,  # [4, 4] scene graph transform of this instance
    obj_materials: dict[str, _ObjMaterial],
    with_visuals: bool,
    decoded: dict[tuple, np.ndarray],  # the file's decoded images, shared by the parts that use them
) -> _Part:
    vertices = np.asarray(geometry.vertices, dtype=np.float64)  # [n, 3]
    faces = np.asarray(geometry.faces, dtype=np.int64)  # [f, 3]
    if faces.min() < 0 or faces.max() >= len(vertices):
        raise MeshLoadError(
            f"{path}: face indices out of range ({faces.min()}..{faces.max()} for {len(vertices)} vertices)"
        )
    if not np.isfinite(vertices).all():
        bad = int((~np.isfinite(vertices)).any(axis=-1).sum())
        raise MeshLoadError(f"{path}: {bad} of {len(vertices)} vertices have NaN/inf coordinates")
    # trimesh keeps normals given by the file in its cache; computed ones only appear there when asked for
    normals = (
        np.asarray(geometry.vertex_normals, dtype=np.float64) if "vertex_normals" in geometry._cache else None
    )

    part = _Part(vertices=vertices, faces=faces, normals=normals)
    if with_visuals:
        _read_visual(path, geometry, part, obj_materials, decoded)

    # scene graph transform; normals by the inverse transpose; a mirror flips the winding back
    linear, shift = transform[:3, :3], transform[:3, 3]
    if not np.allclose(transform, np.eye(4)):
        part.vertices = part.vertices @ linear.T + shift  # [n, 3]
        det = np.linalg.det(linear)
        if abs(det) <= 1e-12 * max(np.abs(linear).max(), 1e-300) ** 3:
            part.normals = None  # flattened into a plane or a line: the file's normals no longer apply
        elif part.normals is not None:
            part.normals = part.normals @ np.linalg.inv(linear)  # [n, 3] == (inv(linear).T @ n.T).T
        if det < 0:
            part.faces = part.faces[:, ::-1].copy()
    _compact(part)
    if part.normals is not None:
        part.normals = _consistent_normals(part.normals, part.vertices, part.faces)
    if part.uvs is not None and not np.isfinite(part.uvs).all():
        raise MeshLoadError(f"{path}: texture coordinates contain NaN/inf")
    return part


def _read_visual(
    path: Path,
    geometry: trimesh.Trimesh,
    part: _Part,
    obj_materials: dict[str, _ObjMaterial],
    decoded: dict[tuple, np.ndarray],
) -> None:
    """Fill the part's colour source from trimesh's visual (and our own parse of an OBJ's materials).
    Parts that use one image get one array (`decoded`), so the atlas holds it once (`_pack_atlas`)."""
    visual = geometry.visual
    gltf = path.suffix.lower() in Y_UP_SUFFIXES
    if isinstance(visual, trimesh.visual.TextureVisuals):
        material = visual.material
        uv = None if visual.uv is None else np.asarray(visual.uv, dtype=np.float64)[:, :2]  # [n, 2]
        image: np.ndarray | None = None
        factor = linear_factor = np.ones(3)  # sRGB and linear base colour factor (glTF)
        color: tuple[float, float, float] | None = None
        if material is not None and getattr(material, "name", None) in obj_materials:
            # OBJ: our parse knows images trimesh could not resolve (GSO layout) and has checked them
            found = obj_materials[material.name]
            image, color = found.image, found.color
        elif isinstance(material, trimesh.visual.material.PBRMaterial):
            if material.baseColorFactor is not None:
                linear_factor = np.asarray(material.baseColorFactor[:3], dtype=np.float64) / 255.0
                factor = _linear_to_srgb(linear_factor)
            color = tuple(factor.tolist())
            if material.baseColorTexture is not None:
                image = _shared_image(material.baseColorTexture, factor, path, decoded)
        elif isinstance(material, trimesh.visual.material.SimpleMaterial):
            image = (
                None if material.image is None else _shared_image(material.image, np.ones(3), path, decoded)
            )
            color = tuple((np.asarray(material.diffuse[:3], dtype=np.float64) / 255.0).tolist())
        if image is not None and uv is not None and len(uv) == len(part.vertices):
            part.image, part.uvs = image, uv
            return
        # Vertex colours beside a material: trimesh keeps them as a vertex attribute then (glTF COLOR_0 with
        # a material, as Blender exports vertex paint; OBJ `v x y z r g b` with `usemtl`)
        attribute = visual.vertex_attributes.get("color")
        if attribute is None:
            attribute = geometry.vertex_attributes.get("color")
        colors = _unit_colors(attribute, len(part.vertices))  # [n, 3] or None
        if colors is not None:
            if gltf:  # base colour = factor x COLOR_0, both linear
                colors = _linear_to_srgb(colors * linear_factor)
            _set_vertex_colors(part, colors)
        elif color is not None:
            part.color = color
        return
    if isinstance(visual, trimesh.visual.ColorVisuals) and visual.kind in ("vertex", "face"):
        if visual.kind == "vertex":
            colors = np.asarray(visual.vertex_colors[:, :3], dtype=np.float64) / 255.0  # [n, 3]
        else:
            # one colour per face: give every face its own three vertices
            colors = np.repeat(np.asarray(visual.face_colors[:, :3], dtype=np.float64) / 255.0, 3, axis=0)
            corners = part.faces.reshape(-1)  # [3f]
            part.vertices = part.vertices[corners]
            part.normals = None if part.normals is None else part.normals[corners]
            part.faces = np.arange(len(corners), dtype=np.int64).reshape(-1, 3)
        if gltf:
            colors = _linear_to_srgb(colors)
        _set_vertex_colors(part, colors)


def _set_vertex_colors(part: _Part, colors: np.ndarray) -> None:
    """[n, 3] colours in [0, 1]: one colour for the part when they are all equal."""
    if np.ptp(colors, axis=0).max() == 0:
        part.color = tuple(colors[0].tolist())
    else:
        part.vertex_colors = colors


def _unit_colors(attribute: np.ndarray | None, n_vertices: int) -> np.ndarray | None:
    """A vertex colour attribute as [n, 3] float in [0, 1], by its type (uint8 /255, uint16 /65535, floats
    as they are); None when absent or not one RGB(A) row per vertex."""
    if attribute is None:
        return None
    values = np.asarray(attribute)
    if values.ndim != 2 or values.shape[0] != n_vertices or values.shape[1] not in (3, 4):
        return None
    scale = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(values.dtype, 1.0)
    return np.clip(values[:, :3].astype(np.float64) / scale, 0.0, 1.0)


def _read_obj_materials(path: Path) -> dict[str, _ObjMaterial]:
    """Parse the OBJ's `mtllib` files: Kd and map_Kd per material; a missing or broken image raises.

    trimesh silently drops textures it cannot find, which would turn a textured ground truth grey.
    """
    try:
        text = path.read_text(errors="replace")
    except OSError as error:
        raise MeshLoadError(f"{path}: cannot read ({brief(error)})") from error
    materials: dict[str, _ObjMaterial] = {}
    for match in re.finditer(r"^[ \t]*mtllib[ \t]+(.+?)[ \t]*$", text, flags=re.MULTILINE):
        mtl_path = path.parent / match.group(1)
        if not mtl_path.is_file():
            raise MeshLoadError(
                f"{path}: material library '{match.group(1)}' not found (looked for {mtl_path})"
            )
        materials.update(_parse_mtl(path, mtl_path))
    return materials


def _parse_mtl(obj_path: Path, mtl_path: Path) -> dict[str, _ObjMaterial]:
    materials: dict[str, _ObjMaterial] = {}
    name: str | None = None
    for line in mtl_path.read_text(errors="replace").splitlines():
        tokens = line.split()
        if len(tokens) < 2:
            continue
        key = tokens[0].lower()
        if key == "newmtl":
            name = " ".join(tokens[1:])
            materials[name] = _ObjMaterial(color=None, image=None)
        elif name is None:
            continue
        elif key == "kd":
            try:
                values = [float(t) for t in tokens[1:4]]
            except ValueError as error:
                raise MeshLoadError(f"{mtl_path}: bad Kd line '{line.strip()}'") from error
            rgb = values * 3 if len(values) == 1 else values
            materials[name].color = tuple(float(np.clip(c, 0.0, 1.0)) for c in rgb[:3])
        elif key == "map_kd":
            image_path = _find_texture(obj_path, mtl_path, line.strip()[len(tokens[0]) :].strip())
            materials[name].image = _decode_texture(obj_path, image_path)
    return materials


def _find_texture(obj_path: Path, mtl_path: Path, reference: str) -> Path:
    """Resolve a map_Kd reference: relative to the .mtl, else in a GSO object's materials/textures/."""
    # options such as `-s 1 1 1` come before the file name; a name with spaces is tried whole first
    names = dict.fromkeys([reference.replace("\\", "/"), reference.split()[-1].replace("\\", "/")])
    gso_textures = mtl_path.parent.parent / "materials" / "textures"
    folders = [mtl_path.parent, gso_textures]
    for name in names:
        for candidate in (mtl_path.parent / name, gso_textures / name, gso_textures / Path(name).name):
            if candidate.is_file():
                return candidate
    raise MeshLoadError(
        f"{obj_path}: texture '{reference}' named in {mtl_path.name} not found "
        f"(looked in {folders[0]} and {folders[1]})"
    )


def _decode_texture(obj_path: Path, image_path: Path) -> np.ndarray:
    try:
        with Image.open(image_path) as image:
            image.load()
            return _rgb_uint8(image, obj_path)
    except MeshLoadError:
        raise
    except Exception as error:  # PIL raises several types for truncated or non-image files
        raise MeshLoadError(f"{obj_path}: texture {image_path} cannot be decoded ({brief(error)})") from error


def _shared_image(
    image: Image.Image, factor: np.ndarray, path: Path, decoded: dict[tuple, np.ndarray]
) -> np.ndarray:
    """[h, w, 3] uint8 of a material's image times its colour factor [3] (sRGB), decoded once per image
    and factor: trimesh gives every part of a material (and every instance) the same image object."""
    key = (id(image), *np.round(factor, 6).tolist())
    if key not in decoded:
        rgb = _rgb_uint8(image, path)
        if not np.allclose(factor, 1.0):
            rgb = np.clip(rgb * factor + 0.5, 0, 255).astype(np.uint8)  # [h, w, 3]
        decoded[key] = rgb
    return decoded[key]


def _rgb_uint8(image: Image.Image, path: Path) -> np.ndarray:
    """[h, w, 3] uint8, row 0 = top; alpha is dropped (we have no transparency). Pillow decodes lazily, so a
    truncated or corrupt embedded image fails here: `MeshLoadError` naming the mesh file."""
    try:
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            data = np.asarray(image, dtype=np.float64)  # [h, w] 16-bit grey
            return np.repeat((data / 257.0).clip(0, 255).astype(np.uint8)[..., None], 3, axis=-1)
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError... for broken data
        raise MeshLoadError(f"{path}: a texture image cannot be decoded ({brief(error)})") from error


# ------------------------------------------------------------------------------------------- geometry


def _compact(part: _Part) -> None:
    """Drop vertices no face uses (they would move the bounding box)."""
    used = np.zeros(len(part.vertices), dtype=bool)
    used[part.faces.reshape(-1)] = True
    if used.all():
        return
    remap = np.cumsum(used) - 1  # [n] new index of each kept vertex
    part.faces = remap[part.faces]
    part.vertices = part.vertices[used]
    for attr in ("normals", "uvs", "vertex_colors"):
        value = getattr(part, attr)
        if value is not None:
            setattr(part, attr, value[used])


def _concatenate(parts: list[_Part]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.cumsum([0] + [len(p.vertices) for p in parts])[:-1]
    vertices = np.concatenate([p.vertices for p in parts], axis=0)  # [N, 3]
    faces = np.concatenate([p.faces + o for p, o in zip(parts, offsets, strict=True)], axis=0)  # [F, 3]
    return vertices, faces


MAX_FACES = MAX_TRIANGLES  # what the rasterizer takes (its triangle ids are float32)


def _check_geometry(path: Path, vertices: np.ndarray, faces: np.ndarray) -> None:
    if np.ptp(vertices, axis=0).max() <= 0:
        raise MeshLoadError(f"{path}: all vertices coincide; the mesh has no extent")
    if len(faces) > MAX_FACES:
        raise MeshLoadError(f"{path}: {len(faces)} faces, more than the {MAX_FACES} we render: decimate it")


def _consistent_normals(normals: np.ndarray, vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """File normals made unit and flipped where they oppose the faces' winding; unusable ones computed."""
    winding = area_weighted_normals(vertices, faces)  # [n, 3]
    length = np.linalg.norm(normals, axis=-1, keepdims=True)  # [n, 1]
    usable = np.isfinite(normals).all(axis=-1, keepdims=True) & (length > 1e-12)
    unit = np.where(usable, normals / np.where(usable, length, 1.0), winding)
    flip = (unit * winding).sum(axis=-1, keepdims=True) < 0  # [n, 1]
    return np.where(flip, -unit, unit)


# ---------------------------------------------------------------------------------------------- colour


def _linear_to_srgb(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(x, 1 / 2.4) - 0.055)


def _merge_colors(
    parts: list[_Part],
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None, tuple[float, float, float]]:
    """(uvs [N, 2], texture [H, W, 3] uint8, vertex_colors [N, 3], color) for the concatenated parts."""
    if any(p.image is not None for p in parts):  # one part, or one image for all: as it is (`_pack_atlas`)
        uvs, atlas = _pack_atlas(parts)
        return uvs, atlas, None, DEFAULT_COLOR
    if any(p.vertex_colors is not None for p in parts) or len({p.color for p in parts}) > 1:
        colors = np.concatenate(
            [
                p.vertex_colors if p.vertex_colors is not None else np.tile(p.color, (len(p.vertices), 1))
                for p in parts
            ]
        )  # [N, 3]
        return None, None, colors, DEFAULT_COLOR
    return None, None, None, tuple(float(c) for c in parts[0].color)


def _tile_for_wrap(uv: np.ndarray, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bake UV wrap-around into the image: (uv [n, 2] in [0, 1], image repeated over the tiles used)."""
    uv = np.where((uv > -UV_WRAP_TOLERANCE) & (uv < 1 + UV_WRAP_TOLERANCE), np.clip(uv, 0.0, 1.0), uv)
    low = np.floor(uv.min(axis=0))  # [2] whole tiles to shift by (a shift of whole tiles changes nothing)
    uv = uv - low
    tiles = np.maximum(np.ceil(uv.max(axis=0) - UV_WRAP_TOLERANCE), 1).astype(np.int64)  # [2] (u, v)
    if tiles.max() > MAX_UV_TILES:
        return np.clip(uv, 0.0, 1.0), image  # too many repeats to bake: clamp (lossy, documented)
    uv = np.clip(uv / tiles, 0.0, 1.0)
    return uv, np.tile(image, (int(tiles[1]), int(tiles[0]), 1))  # [h * tv, w * tu, 3]


def _shelf_layout(sizes: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], int, int]:
    """Shelf packing of padded (h, w) boxes, tallest first: ([(x, y)] top-left per box, width, height)."""
    width = max(max(w for _, w in sizes), int(np.ceil(np.sqrt(sum(h * w for h, w in sizes)))))
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i][0], i))
    positions: list[tuple[int, int]] = [(0, 0)] * len(sizes)
    x = y = shelf = 0
    for i in order:  # one box per part: a handful, not per pixel
        h, w = sizes[i]
        if x + w > width:
            x, y, shelf = 0, y + shelf, 0
        positions[i] = (x, y)
        x, shelf = x + w, max(shelf, h)
    return positions, width, y + shelf


def _pack_atlas(parts: list[_Part]) -> tuple[np.ndarray, np.ndarray]:
    """One atlas for all parts: (uvs [N, 2] OBJ convention, atlas [H, W, 3] uint8). Parts that share an
    image (the same array: `_shared_image`, or an OBJ material's) share its slot, so an image that many
    parts or instances use (with the same UV tiles) is neither repeated nor shrunk to fit its copies; one
    image for every part is the texture itself."""
    if all(p.image is not None for p in parts) and len({id(p.image) for p in parts}) == 1:
        # one image for every part: itself, with the parts' own UVs (wrapping as the single-part path)
        return np.concatenate([p.uvs for p in parts], axis=0), parts[0].image
    images: list[np.ndarray] = []  # one per slot
    slots: dict[tuple, int] = {}  # (image id, tiled shape) or ("plain", part) -> slot
    slot_of: list[int] = []  # [parts] each part's slot
    local_uvs: list[np.ndarray] = []
    for i, p in enumerate(parts):
        if p.image is not None and p.uvs is not None:
            uv, image = _tile_for_wrap(p.uvs, p.image)
            key: tuple = (id(p.image), image.shape)  # the same tiles of the same image: the same pixels
        else:
            mean = p.vertex_colors.mean(axis=0) if p.vertex_colors is not None else np.asarray(p.color)
            image = np.broadcast_to(np.round(mean * 255).astype(np.uint8), (PATCH_SIZE, PATCH_SIZE, 3))
            uv = np.full((len(p.vertices), 2), 0.5)
            key = ("plain", i)
        if key not in slots:
            slots[key] = len(images)
            images.append(image)
        slot_of.append(slots[key])
        local_uvs.append(uv)

    # shrink everything until the packing fits MAX_ATLAS_SIZE
    pad = ATLAS_GUTTER
    for _ in range(8):
        positions, width, height = _shelf_layout(
            [(im.shape[0] + 2 * pad, im.shape[1] + 2 * pad) for im in images]
        )
        if max(width, height) <= MAX_ATLAS_SIZE:
            break
        factor = 0.95 * MAX_ATLAS_SIZE / max(width, height)
        images = [
            np.asarray(
                Image.fromarray(np.ascontiguousarray(im)).resize(
                    (max(1, round(im.shape[1] * factor)), max(1, round(im.shape[0] * factor))), Image.BILINEAR
                )
            )
            for im in images
        ]

    atlas = np.zeros((height, width, 3), dtype=np.uint8)  # [H, W, 3]
    for image, (x, y) in zip(images, positions, strict=True):
        h, w = image.shape[:2]
        atlas[y : y + h + 2 * pad, x : x + w + 2 * pad] = np.pad(
            image, ((pad, pad), (pad, pad), (0, 0)), mode="edge"
        )
    uvs = []
    for slot, uv in zip(slot_of, local_uvs, strict=True):
        (x, y), (h, w) = positions[slot], images[slot].shape[:2]
        # local (u, v) -> atlas pixels (x + pad + u w, y + pad + (1 - v) h), v measured from the bottom
        u_atlas = (x + pad + uv[:, 0] * w) / width
        v_atlas = 1.0 - (y + pad + (1.0 - uv[:, 1]) * h) / height
        uvs.append(np.stack([u_atlas, v_atlas], axis=-1))  # [n, 2]
    return np.concatenate(uvs, axis=0), atlas
