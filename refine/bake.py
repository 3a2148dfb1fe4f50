"""UV unwrapping and texture baking: a colour field on a mesh surface -> an image texture.

The refine stage ends with a surface and a colour field (`color_fn`: world points -> RGB, e.g. a hash-grid
colour MLP). A viewer wants an image texture, so, as in the texture-extraction step of Magic3D / Fantasia3D
/ threestudio's mesh exporter:

1. `unwrap_uv` cuts the surface into charts and packs them into the unit square with xatlas (Young,
   "xatlas", a port of thekla_atlas / Castaño's "Lightmap parameterization"); vertices on chart seams are
   split, `vmap` says which input vertex each output vertex comes from.
2. `bake_texture` rasterizes the mesh in UV space with our own rasterizer (`refine.rasterizer.rasterize`,
   texel centres as pixel centres), interpolates the world position of every covered texel, evaluates
   `color_fn` there in chunks, and then dilates each chart into a gutter of `gutter` texels by copying the
   nearest covered texel (an exact Euclidean distance transform), so that bilinear filtering and
   mip-mapping at chart borders never blend in the background. Texels further away get the mean colour.

Conventions (refine/mesh.py): UVs have their origin at the bottom-left (OBJ), the texture's row 0 is its top.
Clip position (2u - 1, 2v - 1, 0, 1) puts v = 1 on row 0 in our rasterizer, and `refine.rasterizer.texture`
reads texel (row j, column i) at ((i + 0.5) / S, 1 - (j + 0.5) / S): baking and sampling agree exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import xatlas
from scipy import ndimage
from torch import Tensor

from .rasterizer import interpolate, rasterize

__all__ = ["BakeConfig", "ColorFn", "bake_texture", "check_texture_size", "default_padding", "unwrap_uv"]

ColorFn = Callable[..., Tensor]  # points [P, 3] world (, unit normals [P, 3]) -> rgb [P, 3] in [0, 1]

MIN_TEXTURE_SIZE = 64  # below this a chart's padding eats most of the texture
MAX_TEXTURE_SIZE = 8192  # a float32 8192² RGB texture is 768 MiB; beyond is not worth it for one object
MAX_BAKE_RESOLUTION = 8192  # texture_size x supersample: the UV square is rasterized at this size


@dataclass
class BakeConfig:
    texture_size: int = 1024  # power of two: mip-mapping halves it cleanly; 1024² is the usual asset size
    # texels of dilation around charts, in open parts of the atlas; between two charts each gets half the
    # padding (about 2 texels at 1024²), so mip-mapped views from afar may blend neighbouring charts
    gutter: int = 8
    padding: int | None = None  # texels between packed charts; None = default_padding(texture_size)
    supersample: int = 1  # k: colour = mean over k x k samples per texel (anti-aliased chart edges, k² cost)
    chunk_size: int = 1 << 18  # points per color_fn call: bounds the MLP's peak memory (~0.26 M points)


LARGE_MESH_FACES = 20_000  # above this, unwrap_uv bounds the charts' boundary (speed)


def check_texture_size(texture_size: int) -> int:
    """The size as an int; ValueError unless it is a power of two in [64, 8192]."""
    if isinstance(texture_size, bool) or not isinstance(texture_size, int | np.integer):
        raise ValueError(f"texture_size must be an int, got {texture_size!r}")
    size = int(texture_size)
    if size < MIN_TEXTURE_SIZE or size > MAX_TEXTURE_SIZE or size & (size - 1):
        raise ValueError(
            f"texture_size must be a power of two in [{MIN_TEXTURE_SIZE}, {MAX_TEXTURE_SIZE}], got {size}"
        )
    return size


def default_padding(texture_size: int) -> int:
    """Texels between charts: 2 at 256², 4 at 1024², 16 at 4096² (a fixed share of the texture side)."""
    return max(2, texture_size // 256)


def _check_mesh(vertices: Tensor, faces: Tensor) -> None:
    if vertices.ndim != 2 or vertices.shape[-1] != 3 or vertices.shape[0] == 0:
        raise ValueError(f"vertices must be a non-empty [N, 3] tensor, got {tuple(vertices.shape)}")
    if faces.ndim != 2 or faces.shape[-1] != 3 or faces.shape[0] == 0:
        raise ValueError(f"faces must be a non-empty [F, 3] tensor, got {tuple(faces.shape)}")
    if faces.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"faces must be an integer tensor, got {faces.dtype}")
    lo, hi = int(faces.min()), int(faces.max())
    if lo < 0 or hi >= vertices.shape[0]:
        raise ValueError(f"faces index vertices {lo}..{hi}, expected 0..{vertices.shape[0] - 1}")
    if not bool(torch.isfinite(vertices).all()):
        raise ValueError("vertices contain a non-finite value")


# ------------------------------------------------------------------------------------------------ unwrap


def unwrap_uv(
    vertices: Tensor,  # [N, 3] float, world frame
    faces: Tensor,  # [F, 3] int
    texture_size: int = 1024,  # the texture the charts are packed for (sets texel density and padding)
    padding: int | None = None,  # texels between charts; None = default_padding(texture_size)
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Charts and packing with xatlas -> (vertices2 [M, 3], faces2 [F, 3], uvs [M, 2], vmap [M]).

    Face order is kept (faces2[i] is faces[i] with seam vertices split); vertices2 = vertices[vmap]. UVs are
    in [0, 1], OBJ convention. xatlas treats the resolution as a target and may pack into a slightly larger
    atlas (W, H), whose UVs are then scaled to [0, 1] per axis: the gap between charts is at least
    padding * texture_size / max(W, H) texels (about 0.8 * padding in practice). Faces too small for xatlas
    to chart sit at a point of a neighbouring chart (`_place_unparameterised`). Runs on the CPU; outputs
    are on the input's device.
    """
    _check_mesh(vertices, faces)
    size = check_texture_size(texture_size)
    pad = default_padding(size) if padding is None else int(padding)
    if pad < 0:
        raise ValueError(f"padding must be >= 0 texels, got {padding}")

    positions = vertices.detach().to("cpu", torch.float32).numpy()  # [N, 3]
    indices = faces.detach().cpu().numpy().astype(np.uint32)  # [F, 3]
    atlas = xatlas.Atlas()
    atlas.add_mesh(positions, indices)
    chart_options = xatlas.ChartOptions()
    chart_options.max_iterations = 1  # one chart-growing pass: 2-3x faster, barely more charts
    if len(indices) > LARGE_MESH_FACES:
        # Charts with a boundary at most the mesh's diagonal: on a 55k-face DMTet mug 1.8 s and 310 charts
        # instead of 14.5 s and 1735 (growing charts over marching-tets slivers is slow), for a packing
        # utilisation of 0.65 instead of 0.83 (measured). Small meshes keep xatlas's free growth.
        chart_options.max_boundary_length = float(np.linalg.norm(np.ptp(positions, axis=0)))
    pack_options = xatlas.PackOptions()
    pack_options.resolution = size
    pack_options.padding = pad
    pack_options.bilinear = True  # keep a texel of margin for bilinear taps around each chart
    pack_options.blockAlign = False  # tighter packing; block alignment only helps block compression
    pack_options.bruteForce = False  # brute-force placement is many times slower for ~1% utilisation
    atlas.generate(chart_options, pack_options)
    if atlas.atlas_count != 1:
        raise ValueError(f"xatlas packed the charts into {atlas.atlas_count} atlases, expected 1")
    vmap, new_faces, uvs = atlas.get_mesh(0)  # [M] uint32, [F, 3] uint32, [M, 2] float32 in [0, 1]
    vmap, new_faces, uvs = _place_unparameterised(vmap.astype(np.int64), new_faces.astype(np.int64), uvs)

    device = vertices.device
    vmap_t = torch.from_numpy(vmap).to(device)  # [M] int64
    faces2 = torch.from_numpy(new_faces).to(device)  # [F, 3] int64
    uvs_t = torch.from_numpy(np.clip(uvs, 0.0, 1.0).astype(np.float32)).to(device)  # [M, 2]
    return vertices[vmap_t], faces2.to(faces.dtype), uvs_t, vmap_t


def _place_unparameterised(
    vmap: np.ndarray,  # [M] input vertex of each output vertex
    faces: np.ndarray,  # [F, 3] output vertices
    uvs: np.ndarray,  # [M, 2]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Faces that xatlas leaves out of every chart (an area under its epsilon: marching-tets slivers, 1-3%
    of a refined surface's faces) come back with their three UVs at (0, 0), where they would show whatever
    colour lies there. Each such face gets three new vertices at one point: the UV that one of its corners
    has in a chart. It then shows the colour of the surface next to it, and, having no area in UV, the bake
    never draws it over other charts. Faces none of whose corners is charted keep (0, 0); vertices no face
    uses any more are dropped."""
    unplaced = (uvs[faces] == 0.0).all(axis=(1, 2))  # [F]
    if not unplaced.any():
        return vmap, faces, uvs
    charted = faces[~unplaced].reshape(-1)  # output vertices of charted faces
    uv_of_input = np.full((int(vmap.max()) + 1, 2), np.nan, dtype=uvs.dtype)  # [N, 2]
    uv_of_input[vmap[charted]] = uvs[charted]  # one charted copy's UV per input vertex
    corner_uv = uv_of_input[vmap[faces[unplaced]]]  # [Z, 3, 2]
    charted_corner = ~np.isnan(corner_uv[..., 0])  # [Z, 3]
    placeable = charted_corner.any(axis=1)  # [Z]
    first = charted_corner.argmax(axis=1)  # [Z] the first charted corner
    point = corner_uv[np.arange(len(first)), first][placeable]  # [Z', 2]
    which = np.nonzero(unplaced)[0][placeable]  # [Z'] faces to place
    faces = faces.copy()
    new = len(vmap) + np.arange(3 * len(which)).reshape(-1, 3)  # [Z', 3]
    vmap = np.concatenate([vmap, vmap[faces[which]].reshape(-1)])
    uvs = np.concatenate([uvs, np.repeat(point, 3, axis=0)])
    faces[which] = new
    used = np.zeros(len(vmap), dtype=bool)
    used[faces.reshape(-1)] = True
    index = np.cumsum(used) - 1  # [M'] new index of each kept vertex
    return vmap[used], index[faces], uvs[used]


# -------------------------------------------------------------------------------------------------- bake


@torch.no_grad()
def _evaluate(color_fn: ColorFn, points: Tensor, chunk_size: int, normals: Tensor | None = None) -> Tensor:
    """color_fn over points [P, 3] (and unit normals [P, 3] when given) in chunks -> [P, 3] float32 in
    [0, 1]."""
    out = []
    for start in range(0, points.shape[0], chunk_size):  # chunks, not points: a handful of calls
        chunk = points[start : start + chunk_size]
        if normals is None:
            rgb = color_fn(chunk)
        else:
            rgb = color_fn(chunk, normals[start : start + chunk_size])
        if not isinstance(rgb, Tensor) or rgb.shape != (chunk.shape[0], 3):
            shape = tuple(rgb.shape) if isinstance(rgb, Tensor) else type(rgb).__name__
            raise ValueError(f"color_fn must return a [{chunk.shape[0]}, 3] tensor, got {shape}")
        out.append(rgb.to(device=points.device, dtype=torch.float32))
    if not out:
        return points.new_zeros(0, 3)
    return torch.cat(out).nan_to_num(0.0).clamp(0.0, 1.0)


def _fill_gutter(texture: Tensor, covered: Tensor, gutter: int) -> Tensor:
    """Copy the nearest covered texel into uncovered ones within `gutter` texels; mean colour beyond.

    texture [S, S, 3], covered [S, S] bool (at least one True). Distances are exact Euclidean (texel units).
    """
    distance, nearest = ndimage.distance_transform_edt(
        ~covered.cpu().numpy(), return_distances=True, return_indices=True
    )  # [S, S], [2, S, S] (row, column) of the nearest covered texel
    rows = torch.from_numpy(nearest[0]).to(texture.device)  # [S, S]
    cols = torch.from_numpy(nearest[1]).to(texture.device)
    in_gutter = torch.from_numpy(distance <= gutter).to(texture.device)[..., None]  # [S, S, 1]
    mean = texture[covered].mean(dim=0)  # [3]
    return torch.where(in_gutter, texture[rows, cols], mean)


def bake_texture(
    vertices: Tensor,  # [N, 3] world positions (the unwrapped mesh's)
    faces: Tensor,  # [F, 3] int
    uvs: Tensor,  # [N, 2] in [0, 1], OBJ convention (origin bottom-left)
    color_fn: ColorFn,  # points [P, 3] world -> rgb [P, 3] in [0, 1]
    texture_size: int = 1024,
    gutter: int = 8,
    supersample: int = 1,
    chunk_size: int = 1 << 18,
    normals: Tensor | None = None,  # [N, 3] per-vertex normals: color_fn(points, unit normals) is baked
) -> Tensor:
    """Bake `color_fn` over the surface into a texture [S, S, 3] float32 in [0, 1], row 0 = top.

    Every texel whose centre (or, with supersample = k, one of its k x k sample points) lies in a triangle
    in UV space gets color_fn at the matching world point (the mean over its covered samples). A triangle
    too thin to contain a sample still gets its colour: color_fn at its centroid is written to the texel
    holding the centroid's UV when that texel is otherwise empty. Then the gutter fill (module docstring).
    Rasterization and color_fn run on the device of `vertices`; the distance transform on the CPU.
    """
    # 1. Check inputs
    _check_mesh(vertices, faces)
    size = check_texture_size(texture_size)
    if uvs.ndim != 2 or uvs.shape != (vertices.shape[0], 2):
        raise ValueError(f"uvs must be [{vertices.shape[0]}, 2] (one per vertex), got {tuple(uvs.shape)}")
    if isinstance(gutter, bool) or int(gutter) != gutter or gutter < 0:
        raise ValueError(f"gutter must be an int >= 0 texels, got {gutter!r}")
    if isinstance(supersample, bool) or int(supersample) != supersample or not 1 <= supersample <= 4:
        raise ValueError(f"supersample must be an int in [1, 4], got {supersample!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if size * int(supersample) > MAX_BAKE_RESOLUTION:  # 8192 x 4: ~100 GB of rasterizer buffers
        raise ValueError(
            f"texture_size x supersample must be <= {MAX_BAKE_RESOLUTION}, got {size} x {supersample}"
        )
    if normals is not None and normals.shape != vertices.shape:
        got = tuple(normals.shape)
        raise ValueError(f"normals must be [{vertices.shape[0]}, 3] (one per vertex), got {got}")
    device = vertices.device
    k = int(supersample)
    res = size * k
    faces = faces.long()
    vertices = vertices.detach().float()
    normals = None if normals is None else normals.detach().to(vertices)
    uvs = uvs.detach().to(device=device, dtype=torch.float32)

    # 2. Rasterize in UV space: clip (2u - 1, 2v - 1, 0, 1); v = 1 lands on row 0 = top
    pos_clip = torch.cat([uvs * 2.0 - 1.0, torch.zeros_like(uvs[:, :1]), torch.ones_like(uvs[:, :1])], -1)
    rast = rasterize(pos_clip[None], faces, res)  # [1, kS, kS, 4]
    attrs = vertices if normals is None else torch.cat([vertices, normals], dim=-1)
    attrs = interpolate(attrs, rast, faces)[0]  # [kS, kS, 3 or 6] world position (and normal) per sample
    sample_hit = rast[0, ..., 3] > 0  # [kS, kS]
    points, sample_normals = attrs[sample_hit, :3], None  # [Q, 3]
    if normals is not None:
        sample_normals = torch.nn.functional.normalize(attrs[sample_hit, 3:], dim=-1)  # [Q, 3]

    # 3. Colour at covered samples, averaged per texel: [kS, kS] -> [S, k, S, k] -> [S, S]
    colors = torch.zeros(res, res, 3, device=device)
    colors[sample_hit] = _evaluate(color_fn, points, chunk_size, sample_normals)
    hits = sample_hit.float().view(size, k, size, k).sum(dim=(1, 3))  # [S, S] covered samples per texel
    summed = colors.view(size, k, size, k, 3).sum(dim=(1, 3))  # [S, S, 3]
    covered = hits > 0  # [S, S]
    texture = summed / hits.clamp(min=1.0)[..., None]

    # 4. Faces that no sample hit (thin or tiny in UV): colour at the centroid, into its empty texel
    seen = torch.zeros(faces.shape[0] + 1, dtype=torch.bool, device=device)
    seen[rast[0, ..., 3].long().reshape(-1)] = True
    missed = (~seen[1:]).nonzero(as_tuple=True)[0]  # [Q]
    if missed.numel() > 0:
        uv_c = uvs[faces[missed]].mean(dim=1)  # [Q, 2]
        col = (uv_c[:, 0] * size).long().clamp(0, size - 1)
        row = ((1.0 - uv_c[:, 1]) * size).long().clamp(0, size - 1)
        empty = ~covered[row, col]
        if bool(empty.any()):
            row, col = row[empty], col[empty]
            centroid = vertices[faces[missed[empty]]].mean(dim=1)  # [Q', 3]
            centroid_normals = None
            if normals is not None:
                centroid_normals = torch.nn.functional.normalize(
                    normals[faces[missed[empty]]].mean(dim=1), dim=-1
                )
            # several per texel: one wins
            texture[row, col] = _evaluate(color_fn, centroid, chunk_size, centroid_normals)
            covered[row, col] = True
    if not bool(covered.any()):
        raise ValueError("no texel is covered: uvs must lie in [0, 1] and span non-degenerate triangles")

    # 5. Gutter: dilate charts by the nearest covered texel, mean colour elsewhere
    return _fill_gutter(texture, covered, int(gutter)).clamp(0.0, 1.0)
