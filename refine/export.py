"""Mesh clean-up, texturing and export: the refine stage's surface -> `mesh.glb` and `mesh.obj/.mtl/.png`.

Clean-up follows common practice for extracted iso-surfaces (as in threestudio's and Magic3D's exporters):
merge duplicate vertices, drop connected components under a share of the total area (ARCHITECTURE.md,
"Evaluation protocol": components under 1% of the area are floaters), and optionally decimate with quadric
error metrics (Garland & Heckbert 1997, via `fast_simplification`). `textured_mesh` unwraps and bakes a
colour field (refine/bake.py). `export_mesh` writes the files of ARCHITECTURE.md ("Meshes"):

* `.glb`: +Y up as glTF requires, world (x, y, z) -> glTF (x, z, -y), a rotation (winding kept); the texture
  as `baseColorTexture` of a material that carries `KHR_materials_unlit` (lighting is baked in) with
  metallic 0 / roughness 1 as the fallback for viewers without that extension. Without a texture,
  vertex colours are written as COLOR_0, converted to linear as the specification says (a plain colour
  becomes a constant COLOR_0), on a primitive WITHOUT a material: trimesh, and so `sv3d.meshio`, reads
  COLOR_0 back only then (with a material it keeps them aside and the colours would be lost). Viewers then
  apply glTF's default material (metallic 1), so vertex colours look darker there than textures do.
* `.obj` + `.mtl` + `.png`: z up, as our readers take OBJ; `map_Kd <name>.png`, Kd 1, no specular. Without a
  texture, vertex colours go on the `v` lines (sRGB).

Both are written by trimesh. Every file goes to a temporary name in the target directory and is renamed
into place (`os.replace`), so an interruption leaves either the complete new file, the previous one, or
nothing. The OBJ's image and material are written before the `.obj` that names them.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import fast_simplification
import numpy as np
import torch
import trimesh
from PIL import Image
from scipy import sparse
from torch import Tensor

from .bake import ColorFn, bake_texture, check_texture_size, unwrap_uv
from .mesh import Mesh, vertex_normals
from .rasterizer import edge_topology

__all__ = [
    "CleanupConfig",
    "EXPORT_FORMATS",
    "WORLD_TO_GLTF",
    "clean_mesh",
    "decimate",
    "face_components",
    "export_mesh",
    "merge_vertices",
    "remove_small_components",
    "textured_mesh",
]

EXPORT_FORMATS = ("glb", "obj")
# world (x, y, z) -> glTF (x, z, -y): a rotation of -90 degrees about x (det = +1, so winding is kept)
WORLD_TO_GLTF = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
UNLIT_EXTENSION = "KHR_materials_unlit"


@dataclass
class CleanupConfig:
    merge_tolerance: float = 1e-6  # relative to the bounding-box diagonal: only float round-off merges
    min_component_fraction: float = 0.01  # drop floaters under 1% of the area, as the evaluation does
    target_faces: int | None = None  # decimate above this many faces; None keeps every face


# ---------------------------------------------------------------------------------------------- clean-up


def _check_mesh(vertices: Tensor, faces: Tensor) -> None:
    if vertices.ndim != 2 or vertices.shape[-1] != 3:
        raise ValueError(f"vertices must be [N, 3], got {tuple(vertices.shape)}")
    if faces.ndim != 2 or faces.shape[-1] != 3:
        raise ValueError(f"faces must be [F, 3], got {tuple(faces.shape)}")
    if faces.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"faces must be an integer tensor, got {faces.dtype}")
    if faces.numel() and (int(faces.min()) < 0 or int(faces.max()) >= vertices.shape[0]):
        raise ValueError(
            f"faces index vertices {int(faces.min())}..{int(faces.max())}, "
            f"expected 0..{vertices.shape[0] - 1}"
        )
    if not torch.isfinite(vertices).all():  # a NaN would switch merging off and pick the wrong largest part
        bad = int((~torch.isfinite(vertices)).any(-1).sum())
        raise ValueError(f"{bad} of {vertices.shape[0]} vertices have NaN/inf coordinates")


def _compact(vertices: Tensor, faces: Tensor) -> tuple[Tensor, Tensor]:
    """Drop vertices no face uses; faces renumbered. [N, 3], [F, 3] -> [N', 3], [F, 3]."""
    used = torch.zeros(vertices.shape[0], dtype=torch.bool, device=vertices.device)
    used[faces.reshape(-1)] = True
    remap = torch.cumsum(used.long(), 0) - 1  # [N] new index of each kept vertex
    return vertices[used], remap[faces]


def _first_index(group: Tensor) -> Tensor:
    """For group ids [N] in 0..G-1 (all used), the lowest index holding each id: [G]."""
    n_groups = int(group.max()) + 1 if group.numel() else 0
    index = torch.arange(group.shape[0], device=group.device)
    first = torch.full((n_groups,), group.shape[0], dtype=torch.long, device=group.device)
    return first.scatter_reduce(0, group, index, reduce="amin")


def merge_vertices(
    vertices: Tensor,  # [N, 3]
    faces: Tensor,  # [F, 3] int
    tolerance: float = 1e-6,  # relative to the bounding-box diagonal
) -> tuple[Tensor, Tensor]:
    """Merge vertices closer than `tolerance` (on a grid of that pitch) -> (vertices [M, 3], faces [F', 3]).

    Faces that collapse (two corners on one vertex) and exact duplicate faces are removed; unused vertices
    are dropped. A merged vertex keeps the position of its lowest-index member.
    """
    _check_mesh(vertices, faces)
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    if vertices.shape[0] == 0 or faces.shape[0] == 0:
        return vertices[:0], faces[:0].long()
    faces = faces.long()
    pos = vertices.detach().double()
    diagonal = float((pos.amax(0) - pos.amin(0)).norm())
    pitch = tolerance * diagonal
    key = torch.round((pos - pos.amin(0)) / pitch).long() if pitch > 0 else pos  # [N, 3] grid cell
    _, group = torch.unique(key, dim=0, return_inverse=True)  # [N] merged id
    merged = vertices[_first_index(group)]  # [M, 3]
    new_faces = group[faces]  # [F, 3]
    a, b, c = new_faces.unbind(dim=1)
    new_faces = new_faces[(a != b) & (b != c) & (c != a)]  # collapsed faces out
    # exact duplicates (same corners in the same cyclic order) go; the opposite winding is another face
    rows = torch.arange(new_faces.shape[0], device=vertices.device)
    rolled = torch.stack([new_faces.roll(-s, dims=1) for s in range(3)])  # [3, F', 3]
    canonical = rolled[new_faces.argmin(dim=1), rows]  # [F', 3], lowest index first
    _, face_group = torch.unique(canonical, dim=0, return_inverse=True)  # [F']
    keep = torch.zeros(new_faces.shape[0], dtype=torch.bool, device=vertices.device)
    keep[_first_index(face_group)] = True  # first of each duplicate set, in the input's face order
    return _compact(merged, new_faces[keep])


def face_components(faces: Tensor, n_vertices: int) -> tuple[Tensor, int]:
    """Connected components of faces sharing a vertex -> (label [F] int64, count), labels in 0..count-1."""
    f = faces.detach().long().cpu().numpy()  # [F, 3]
    rows = np.concatenate([f[:, 0], f[:, 1]])  # edges v0-v1, v1-v2 join each face's three corners
    cols = np.concatenate([f[:, 1], f[:, 2]])
    graph = sparse.coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n_vertices,) * 2)
    count, vertex_label = sparse.csgraph.connected_components(graph, directed=False)
    labels = torch.from_numpy(vertex_label[f[:, 0]].astype(np.int64)).to(faces.device)  # [F]
    return labels, int(count)


def remove_small_components(
    vertices: Tensor,  # [N, 3]
    faces: Tensor,  # [F, 3] int
    min_fraction: float = 0.01,  # of the total surface area
) -> tuple[Tensor, Tensor]:
    """Keep the connected components whose area is at least `min_fraction` of the total.

    Components are faces connected through shared vertices (merge duplicates first with `merge_vertices`
    when a surface is split at seams). The largest component is always kept. Unused vertices are dropped.
    Returns (vertices [M, 3], faces [F', 3] int64).
    """
    _check_mesh(vertices, faces)
    if not 0.0 <= min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be in [0, 1], got {min_fraction}")
    if faces.shape[0] == 0:
        return vertices[:0], faces.long()
    faces = faces.long()
    labels, count = face_components(faces, vertices.shape[0])  # [F]
    v = vertices.detach().double()
    area = 0.5 * torch.linalg.cross(v[faces[:, 1]] - v[faces[:, 0]], v[faces[:, 2]] - v[faces[:, 0]]).norm(
        dim=-1
    )  # [F]
    comp_area = torch.zeros(count, dtype=area.dtype, device=area.device).index_add_(0, labels, area)  # [C]
    keep_comp = comp_area >= min_fraction * comp_area.sum()
    keep_comp[comp_area.argmax()] = True
    return _compact(vertices, faces[keep_comp[labels]])


def decimate(
    vertices: Tensor,  # [N, 3]
    faces: Tensor,  # [F, 3] int
    target_faces: int,
    aggressiveness: float = 7.0,  # fast_simplification's default: fast, keeps shape for 2-10x reductions
) -> tuple[Tensor, Tensor]:
    """Quadric-error decimation to at most about `target_faces` faces; unchanged when already below.

    Returns (vertices [M, 3], faces [F', 3] int64) on the input's device (the work runs on the CPU).
    """
    _check_mesh(vertices, faces)
    if isinstance(target_faces, bool) or int(target_faces) != target_faces or target_faces < 4:
        raise ValueError(f"target_faces must be an int >= 4, got {target_faces!r}")
    if faces.shape[0] <= target_faces:
        return vertices, faces.long()
    points, triangles = fast_simplification.simplify(
        vertices.detach().cpu().double().numpy(),
        faces.detach().cpu().numpy().astype(np.int32),
        target_count=int(target_faces),
        agg=aggressiveness,
    )
    # Its edge collapses do not check the surface's topology: where a thin wall's sides meet they leave
    # coincident face pairs and edges of four faces (the refined bowl at 5000 faces: 14 and 35)
    triangles, source = _split_pinches(_without_fins(np.asarray(triangles, dtype=np.int64)))
    points = np.asarray(points)[source]  # [M, 3]
    out_v = torch.from_numpy(points).to(device=vertices.device, dtype=vertices.dtype)
    out_f = torch.from_numpy(triangles).to(vertices.device)
    return _compact(out_v, out_f)


def _without_fins(faces: np.ndarray) -> np.ndarray:
    """faces [F, 3] without the pairs of faces on the same three vertices wound oppositely (a zero-volume
    fold); a face repeated with its own winding is kept once: [F', 3]."""
    start = faces.argmin(axis=1)[:, None]  # each face turned to begin at its lowest vertex: (a, b, c) and
    turned = np.take_along_axis(faces, (start + np.arange(3)) % 3, axis=1)  # (b, c, a) alike, (a, c, b) not
    _, first = np.unique(turned, axis=0, return_index=True)
    faces = faces[np.sort(first)]  # repeats of one winding: once
    _, inverse, counts = np.unique(np.sort(faces, axis=1), axis=0, return_inverse=True, return_counts=True)
    return faces[counts[inverse.reshape(-1)] == 1]


def _split_pinches(faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where sheets of a surface touch at an edge (of more than two faces) or a vertex, each sheet gets
    vertices of its own: the faces around a vertex that connect through edges of exactly two faces share
    a copy of it. -> (faces [F, 3] into the new vertices, source [M]: the old vertex of each new one); a
    surface without such places keeps its vertices (renumbered)."""
    n_faces = faces.shape[0]
    across = edge_topology(
        torch.from_numpy(faces)
    ).numpy()  # [F, 3] the face across edge k, < 0: none or many
    f, k = np.nonzero(across >= 0)  # [E] each: edge k of face f, vertices faces[f, k] -> faces[f, k + 1]
    g, k1 = across[f, k], (k + 1) % 3
    slot_a = np.argmax(faces[g] == faces[f, k][:, None], axis=1)  # [E] where face g holds each end
    slot_b = np.argmax(faces[g] == faces[f, k1][:, None], axis=1)
    # corners (face, slot) as nodes 3 * face + slot; the two ends of each edge join the neighbour's corners
    rows = np.concatenate([3 * f + k, 3 * f + k1])
    cols = np.concatenate([3 * g + slot_a, 3 * g + slot_b])
    graph = sparse.coo_matrix((np.ones(rows.shape[0], dtype=bool), (rows, cols)), shape=(3 * n_faces,) * 2)
    count, label = sparse.csgraph.connected_components(graph, directed=False)  # [3F] new vertex per corner
    source = np.zeros(count, dtype=np.int64)
    source[label] = faces.reshape(-1)
    return label.reshape(n_faces, 3).astype(np.int64), source


def clean_mesh(vertices: Tensor, faces: Tensor, config: CleanupConfig | None = None) -> tuple[Tensor, Tensor]:
    """merge_vertices -> remove_small_components -> decimate (when config.target_faces is set)."""
    config = config or CleanupConfig()
    vertices, faces = merge_vertices(vertices, faces, config.merge_tolerance)
    if faces.shape[0] == 0:
        raise ValueError("the mesh has no non-degenerate face left after merging vertices")
    vertices, faces = remove_small_components(vertices, faces, config.min_component_fraction)
    if config.target_faces is not None:
        vertices, faces = decimate(vertices, faces, config.target_faces)
    return vertices, faces


# ------------------------------------------------------------------------------------------- texturing


def textured_mesh(
    vertices: Tensor,  # [N, 3] world frame
    faces: Tensor,  # [F, 3] int
    color_fn: ColorFn,  # points [P, 3] world -> rgb [P, 3] in [0, 1]
    texture_size: int = 1024,
    gutter: int = 8,
    supersample: int = 1,
    padding: int | None = None,  # texels between charts; None = bake.default_padding(texture_size)
    chunk_size: int = 1 << 18,  # points per color_fn call
) -> Mesh:
    """Unwrap (xatlas) and bake `color_fn` into a textured `Mesh` ready for `export_mesh`.

    The keyword arguments are the fields of `bake.BakeConfig`: `textured_mesh(v, f, fn, **asdict(config))`.

    Vertex normals are computed on the input (welded) mesh and copied to the split seam vertices, so that
    shading shows no seams. A colour field whose `shaded` is true (`refine.color_field.ColorField` with its
    learned shading) is baked lit: called with those normals as well.
    """
    check_texture_size(texture_size)  # before the (slow) unwrap
    normals = vertex_normals(vertices.detach().float(), faces.long())  # [N, 3]
    vertices2, faces2, uvs, vmap = unwrap_uv(vertices, faces, texture_size, padding)
    lit = normals[vmap] if getattr(color_fn, "shaded", False) else None  # [N2, 3]: bake albedo * shading
    tex = bake_texture(vertices2, faces2, uvs, color_fn, texture_size, gutter, supersample, chunk_size, lit)
    return Mesh(
        vertices=vertices2.detach().float(),
        faces=faces2.long(),
        vertex_normals=normals[vmap],
        uvs=uvs,
        texture=tex,
    )


# ---------------------------------------------------------------------------------------------- export


def _srgb_to_linear(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(np.asarray(x, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write through a temporary sibling and a rename: the path holds the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the outputs are for other users and tools too
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _png_bytes(texture: Tensor) -> bytes:
    image = Image.fromarray(_to_uint8(texture.detach().cpu().numpy()))  # [H, W, 3] row 0 = top
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _vertex_colors(mesh: Mesh) -> np.ndarray:
    """[N, 3] sRGB colours of an untextured mesh: its vertex colours, else its one colour everywhere."""
    if mesh.vertex_colors is not None:
        return mesh.vertex_colors.detach().cpu().double().numpy()
    return np.tile(np.asarray(mesh.color, dtype=np.float64), (mesh.vertices.shape[0], 1))


def _unit_normals(mesh: Mesh) -> np.ndarray:
    """[N, 3] the mesh's vertex normals, each of unit length as glTF requires: a vertex whose faces have
    no area (collinear slivers) or that no face uses has none, and gets the direction from the mesh's
    centre instead (+z where it sits at the centre)."""
    normals = mesh.normals().detach().cpu().double().numpy()  # [N, 3]
    length = np.linalg.norm(normals, axis=1)  # [N]
    bad = ~(length > 1e-6)  # 0 (or NaN) where the faces cancel or have no area
    if not bad.any():
        return normals / length[:, None]
    vertices = mesh.vertices.detach().cpu().double().numpy()  # [N, 3]
    outward = vertices[bad] - 0.5 * (vertices.min(0) + vertices.max(0))  # [B, 3]
    size = np.linalg.norm(outward, axis=1, keepdims=True)  # [B, 1]
    outward = np.where(size > 1e-12, outward / np.maximum(size, 1e-12), np.array([0.0, 0.0, 1.0]))
    normals = normals / np.maximum(length, 1e-12)[:, None]
    normals[bad] = outward
    return normals


def _glb_bytes(mesh: Mesh, name: str) -> bytes:
    vertices = mesh.vertices.detach().cpu().double().numpy() @ WORLD_TO_GLTF.T  # [N, 3] glTF frame
    normals = _unit_normals(mesh) @ WORLD_TO_GLTF.T  # [N, 3]
    faces = mesh.faces.detach().cpu().numpy()
    if mesh.texture is not None:
        material = trimesh.visual.material.PBRMaterial(
            name=name,
            baseColorTexture=Image.open(io.BytesIO(_png_bytes(mesh.texture))),
            baseColorFactor=[255, 255, 255, 255],
            metallicFactor=0.0,  # fallback for viewers without the unlit extension: a matte dielectric
            roughnessFactor=1.0,
        )
        visual = trimesh.visual.TextureVisuals(uv=mesh.uvs.detach().cpu().double().numpy(), material=material)
    else:
        rgb = _to_uint8(_srgb_to_linear(_vertex_colors(mesh)))  # glTF COLOR_0 is linear
        rgba = np.concatenate([rgb, np.full((len(rgb), 1), 255, np.uint8)], axis=1)  # [N, 4]
        visual = trimesh.visual.ColorVisuals(vertex_colors=rgba)
    geometry = trimesh.Trimesh(
        vertices=vertices, faces=faces, vertex_normals=normals, visual=visual, process=False
    )

    def make_unlit(tree: dict) -> None:
        """Mark the texture's material unlit (glTF JSON, edited before trimesh serialises it)."""
        for m in tree.get("materials", []):
            pbr = m.setdefault("pbrMetallicRoughness", {})
            pbr["metallicFactor"], pbr["roughnessFactor"] = 0.0, 1.0
            m.setdefault("extensions", {})[UNLIT_EXTENSION] = {}
        if tree.get("materials"):
            used = tree.setdefault("extensionsUsed", [])
            if UNLIT_EXTENSION not in used:
                used.append(UNLIT_EXTENSION)

    scene = trimesh.Scene()
    scene.add_geometry(geometry, geom_name=name, node_name=name)
    return trimesh.exchange.gltf.export_glb(scene, include_normals=True, tree_postprocessor=make_unlit)


def _obj_files(mesh: Mesh, name: str) -> dict[str, bytes]:
    """{file name: bytes}: `<name>.obj` (z up), and with a texture `<name>.mtl` and `<name>.png`."""
    vertices = mesh.vertices.detach().cpu().double().numpy()  # [N, 3] world frame, z up
    faces = mesh.faces.detach().cpu().numpy()
    normals = _unit_normals(mesh)  # [N, 3]
    if mesh.texture is not None:
        material = trimesh.visual.material.SimpleMaterial(
            image=Image.open(io.BytesIO(_png_bytes(mesh.texture))),
            diffuse=[255, 255, 255, 255],
            ambient=[255, 255, 255, 255],
            specular=[0, 0, 0, 255],  # lighting is baked into the texture: no highlight on top of it
            glossiness=1.0,
            name=name,  # trimesh names the image `<material name>.png`
        )
        visual = trimesh.visual.TextureVisuals(uv=mesh.uvs.detach().cpu().double().numpy(), material=material)
    else:
        rgb = _to_uint8(_vertex_colors(mesh))  # OBJ `v` colours are read as sRGB
        rgba = np.concatenate([rgb, np.full((len(rgb), 1), 255, np.uint8)], axis=1)  # [N, 4]
        visual = trimesh.visual.ColorVisuals(vertex_colors=rgba)
    geometry = trimesh.Trimesh(
        vertices=vertices, faces=faces, vertex_normals=normals, visual=visual, process=False
    )
    text, extra = trimesh.exchange.obj.export_obj(
        geometry,
        include_normals=True,
        include_color=mesh.texture is None,
        include_texture=mesh.texture is not None,
        return_texture=True,
        mtl_name=f"{name}.mtl",
        header=None,
    )
    files = {file_name: data for file_name, data in extra.items()}
    files[f"{name}.obj"] = text.encode("utf-8")
    return files


def export_mesh(
    mesh: Mesh,
    out_dir: str | Path,
    name: str = "mesh",
    formats: Sequence[str] = EXPORT_FORMATS,  # any of "glb", "obj"
) -> dict[str, Path]:
    """Write `mesh` as `<out_dir>/<name>.glb` and/or `<name>.obj` + `.mtl` + `.png` -> {file name: path}.

    Inputs are checked before anything is created; each file is written atomically (module docstring).
    """
    # 1. Check inputs
    formats = tuple(formats)
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown or not formats:
        raise ValueError(f"formats must be a non-empty subset of {EXPORT_FORMATS}, got {formats}")
    if not name or Path(name).name != name or name.startswith("."):
        raise ValueError(f"name must be a plain file stem (no directory, no leading dot), got {name!r}")
    if mesh.faces.shape[0] == 0:
        raise ValueError("cannot export a mesh with no faces")
    if mesh.texture is not None and (mesh.texture.ndim != 3 or mesh.texture.shape[-1] != 3):
        raise ValueError(f"texture must be [H, W, 3], got {tuple(mesh.texture.shape)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} exists and is not a directory")

    # 2. Encode everything in memory first, so an encoding error writes nothing
    files: dict[str, bytes] = {}
    if "obj" in formats:
        obj = _obj_files(mesh, name)
        # image and material before the .obj that names them
        files.update({k: v for k, v in obj.items() if not k.endswith(".obj")})
        files[f"{name}.obj"] = obj[f"{name}.obj"]
    if "glb" in formats:
        files[f"{name}.glb"] = _glb_bytes(mesh, name)

    # 3. Write
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for file_name, data in files.items():
        path = out_dir / file_name
        _atomic_write(path, data)
        written[file_name] = path
    return written
