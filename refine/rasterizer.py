"""A differentiable triangle rasterizer in plain PyTorch, with nvdiffrast's four ops.

`rasterize`, `interpolate`, `texture` and `antialias` follow the design of nvdiffrast (Laine et al., "Modular
Primitives for High-Performance Differentiable Rendering", SIGGRAPH Asia 2020): rasterization itself is
not differentiable and only picks, per pixel, the visible triangle; everything after it is. Here that
is done without a compiled kernel, on CPU and CUDA alike:

* `rasterize` finds the visible triangle of every pixel by enumerating, for each (view, triangle), the
  pixel centres inside its screen bounding box, testing them with edge functions and keeping the nearest
  with one `scatter_reduce(amin)` over a 64-bit key (depth bits << 32 | triangle id). The work is
  proportional to the total bounding-box area, processed in bounded chunks. Then, for the covered pixels
  only, the perspective-correct barycentrics and z/w are recomputed from the winning triangle's clip-space
  vertices inside autograd, so gradients reach the vertex positions through every later op.
* `antialias` is nvdiffrast's analytic silhouette antialiasing: where neighbouring pixels see different
  surfaces and a visible silhouette edge crosses the segment between their centres, the two colours are
  blended by the crossing's position; the crossing moves with the edge's vertices, which gives gradients
  w.r.t. positions at silhouettes (a mask loss moves the outline). The edges are found in screen space
  (each silhouette edge followed over the rows and columns it spans, with a depth test), not among the
  front pixel's triangle and its neighbours: on a fine mesh the triangle seen just inside an outline lies
  many triangles away from it.

Differences from nvdiffrast, on purpose: image row 0 is the TOP of the image (y_ndc = +1), so renders are
upright without a flip; no mipmapping (`texture` is bilinear); triangles with a vertex behind the near
plane of the camera (w <= 0) are dropped rather than clipped; no depth peeling; the silhouette search
of `antialias` runs in screen space.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _zbuffer_cpu

__all__ = [
    "rasterize",
    "interpolate",
    "interpolate_covered",
    "texture",
    "antialias",
    "edge_topology",
    "weld_seams",
    "seam_topology",
]

_EMPTY_KEY = torch.iinfo(torch.int64).max
_W_EPS = 1e-8  # vertices with w below this are behind the camera
MAX_TRIANGLES = 2**24 - 1  # ids travel as float32 in rast[..., 3], exact up to 2^24


def _resolution(resolution: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(resolution, int):
        return resolution, resolution
    h, w = resolution
    return int(h), int(w)


def _check_inputs(pos_clip: Tensor, tri: Tensor) -> None:
    if pos_clip.ndim != 3 or pos_clip.shape[-1] != 4:
        raise ValueError(f"pos_clip must be [V, N, 4], got {tuple(pos_clip.shape)}")
    if tri.ndim != 2 or tri.shape[-1] != 3:
        raise ValueError(f"tri must be [F, 3], got {tuple(tri.shape)}")
    if tri.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"tri must be an integer tensor, got {tri.dtype}")
    if tri.shape[0] > MAX_TRIANGLES:
        raise ValueError(f"at most 2^24 - 1 triangles, got {tri.shape[0]}: decimate the mesh")
    if tri.numel() and (int(tri.min()) < 0 or int(tri.max()) >= pos_clip.shape[1]):
        raise ValueError(
            f"tri indexes vertices {int(tri.min())}..{int(tri.max())} but pos_clip has {pos_clip.shape[1]}"
        )


def _to_pixels(pos_clip: Tensor, height: int, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """Clip-space positions [..., 4] -> pixel x, pixel y (row 0 = top), z/w; pixel i's centre at i + 0.5."""
    w = pos_clip[..., 3]
    inv_w = 1.0 / torch.where(w.abs() < _W_EPS, torch.full_like(w, _W_EPS), w)
    px = (pos_clip[..., 0] * inv_w + 1.0) * (0.5 * width)
    py = (1.0 - pos_clip[..., 1] * inv_w) * (0.5 * height)
    return px, py, pos_clip[..., 2] * inv_w


_EDGE_EPS = 1e-6  # inclusive edges with a little slack (in barycentric units): shared edges leave no pinhole


@torch.no_grad()
def _visible_triangles(
    pos_clip: Tensor, tri: Tensor, height: int, width: int, max_candidates: int, backend: str = "auto"
) -> Tensor:
    """Z-buffer: [V, N, 4] clip positions -> [V * H * W] int64 index of the nearest triangle, -1 if none."""
    if backend not in ("auto", "torch", "numba"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'numba', got {backend!r}")
    use_numba = backend == "numba" or (
        backend == "auto" and pos_clip.device.type == "cpu" and _zbuffer_cpu.AVAILABLE
    )
    if use_numba and not _zbuffer_cpu.AVAILABLE:
        raise RuntimeError("backend='numba' needs the numba package")
    n_views = pos_clip.shape[0]
    device = pos_clip.device
    tri = tri.long()
    px, py, zw = _to_pixels(pos_clip.float(), height, width)  # each [V, N]
    w = pos_clip[..., 3]
    if use_numba:
        as_np = [t.float().cpu().contiguous().numpy() for t in (px, py, zw, w)]
        ids = _zbuffer_cpu.visible_triangles_cpu(
            *as_np, tri.cpu().contiguous().numpy(), height, width, _EDGE_EPS, _W_EPS
        )
        return torch.from_numpy(ids).to(device)

    # Per (view, triangle): vertex data. [V, F, 3]
    fx, fy, fz = px[:, tri], py[:, tri], zw[:, tri]
    in_front = (w[:, tri] > _W_EPS).all(-1)  # [V, F]

    # Pixel-centre bounding box: centres c = i + 0.5 with min <= c <= max.
    x0 = torch.ceil(fx.amin(-1) - 0.5).clamp(min=0)
    x1 = torch.floor(fx.amax(-1) - 0.5).clamp(max=width - 1)
    y0 = torch.ceil(fy.amin(-1) - 0.5).clamp(min=0)
    y1 = torch.floor(fy.amax(-1) - 0.5).clamp(max=height - 1)
    bw = (x1 - x0 + 1).clamp(min=0)
    bh = (y1 - y0 + 1).clamp(min=0)

    # Affine map (p - v0) -> (b1, b2) from the inverse of [v1 - v0, v2 - v0].
    e1x, e1y = fx[..., 1] - fx[..., 0], fy[..., 1] - fy[..., 0]
    e2x, e2y = fx[..., 2] - fx[..., 0], fy[..., 2] - fy[..., 0]
    det = e1x * e2y - e2x * e1y  # twice the signed screen area
    depth_ok = (fz.amin(-1) <= 1.0) & (fz.amax(-1) >= -1.0)
    counts = bw.to(torch.int64) * bh.to(torch.int64)  # exact beyond float32's 2^24
    keep = in_front & depth_ok & (det.abs() > 1e-12) & (counts > 0)  # [V, F]
    view_idx, face_idx = keep.nonzero(as_tuple=True)  # [K]
    if view_idx.numel() == 0:
        return torch.full((n_views * height * width,), -1, dtype=torch.int64, device=device)

    # Per kept (view, triangle), one row of coefficients, so each candidate needs a single gather:
    # (bbox corner centre - v0) in x and y, the inverse matrix rows (b1 = m00 dx + m01 dy, b2 = m10 dx +
    # m11 dy), and z/w at v0 with its two edge differences. [K, 9]
    inv_det = 1.0 / torch.where(keep, det, torch.ones_like(det))
    coef = torch.stack(
        [
            x0 + 0.5 - fx[..., 0],
            y0 + 0.5 - fy[..., 0],
            e2y * inv_det,
            -e2x * inv_det,
            -e1y * inv_det,
            e1x * inv_det,
            fz[..., 0],
            fz[..., 1] - fz[..., 0],
            fz[..., 2] - fz[..., 0],
        ],
        dim=-1,
    )[keep]
    corner = view_idx * (height * width) + y0[keep].long() * width + x0[keep].long()  # [K] pixel index
    box_w = bw[keep].long()
    counts = counts[keep]

    zbuf = torch.full((n_views * height * width,), _EMPTY_KEY, dtype=torch.int64, device=device)
    ends = torch.cumsum(counts, 0)
    total = int(ends[-1])
    # Chunk the (triangle, pixel) candidates so that peak memory stays bounded; a triangle larger than a
    # chunk gets a chunk of its own.
    start_k, done = 0, 0
    eps = _EDGE_EPS
    while done < total:
        stop_k = max(int(torch.searchsorted(ends, done + max_candidates, right=True)), start_k + 1)
        c = counts[start_k:stop_k]
        pair = torch.repeat_interleave(torch.arange(start_k, stop_k, device=device), c)  # [C]
        offset = torch.arange(pair.numel(), device=device) + (done - (ends[pair] - counts[pair]))
        bwp = box_w[pair]
        dy = torch.div(offset, bwp, rounding_mode="floor")
        dx = offset - dy * bwp
        k = coef[pair]  # [C, 9]
        ddx = dx.to(k.dtype) + k[:, 0]
        ddy = dy.to(k.dtype) + k[:, 1]
        b1 = k[:, 2] * ddx + k[:, 3] * ddy
        b2 = k[:, 4] * ddx + k[:, 5] * ddy
        z = k[:, 6] + b1 * k[:, 7] + b2 * k[:, 8]
        inside = (b1 >= -eps) & (b2 >= -eps) & (b1 + b2 <= 1.0 + eps) & (z >= -1.0) & (z <= 1.0)
        sel = inside.nonzero(as_tuple=True)[0]
        pair_in = pair[sel]
        pix = corner[pair_in] + dy[sel] * width + dx[sel]
        key = (_depth_order(z[sel]) << 32) | face_idx[pair_in]
        zbuf.scatter_reduce_(0, pix, key, reduce="amin", include_self=True)
        done = int(ends[stop_k - 1])
        start_k = stop_k

    covered = zbuf != _EMPTY_KEY
    return torch.where(covered, zbuf & 0xFFFFFFFF, torch.full_like(zbuf, -1))


def _depth_order(z: Tensor) -> Tensor:
    """[K] int64 keys that order z/w in [-1, 1] (float32) exactly as its values, equal values (0.0 and -0.0)
    equal: the float's bits, negatives flipped, shifted to [0, 2 * 0x3F800000]. (The keys of (z + 1) / 2
    rounded z's neighbours together: a 1-ulp nearer triangle lost to a lower id, as the CPU kernel, which
    compares z itself, does not let it.)"""
    bits = z.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)  # [K]
    ordered = torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)  # [K] in [-0x3F800000, 0x3F800000]
    return ordered + 0x3F800000


def _barycentrics(
    pos_clip: Tensor, tri: Tensor, view: Tensor, pixel: Tensor, face: Tensor, height: int, width: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Perspective-correct barycentrics and z/w at pixel centres, differentiable in pos_clip.

    view, pixel, face: [P] indices of the covered pixels and their triangles.
    Returns u, v (weights of the triangle's vertices 0 and 1) and z/w, each [P].
    """
    verts = pos_clip[view[:, None], tri[face].long()]  # [P, 3, 4]
    px, py, zw = _to_pixels(verts, height, width)  # [P, 3] each
    cx = (pixel % width).to(px.dtype) + 0.5
    cy = torch.div(pixel, width, rounding_mode="floor").to(px.dtype) + 0.5
    # Screen-space barycentrics from edge functions (signed areas).
    e1x, e1y = px[:, 1] - px[:, 0], py[:, 1] - py[:, 0]
    e2x, e2y = px[:, 2] - px[:, 0], py[:, 2] - py[:, 0]
    det = e1x * e2y - e2x * e1y
    det = torch.where(det.abs() < 1e-20, torch.full_like(det, 1e-20), det)
    dx, dy = cx - px[:, 0], cy - py[:, 0]
    s1 = (dx * e2y - e2x * dy) / det
    s2 = (e1x * dy - dx * e1y) / det
    s0 = 1.0 - s1 - s2
    z = s0 * zw[:, 0] + s1 * zw[:, 1] + s2 * zw[:, 2]  # z/w is affine in screen space
    # Perspective correction: weights proportional to s_i / w_i.
    inv_w = 1.0 / verts[..., 3]  # [P, 3]
    q0, q1, q2 = s0 * inv_w[:, 0], s1 * inv_w[:, 1], s2 * inv_w[:, 2]
    norm = q0 + q1 + q2
    return q0 / norm, q1 / norm, z


def rasterize(
    pos_clip: Tensor,  # [V, N, 4] clip-space vertex positions (float32 or float64)
    tri: Tensor,  # [F, 3] int32/int64 vertex indices
    resolution: int | tuple[int, int],  # H, W (an int means square)
    max_candidates: int = 1 << 23,  # (triangle, pixel) tests per chunk: bounds peak memory
    backend: str = "auto",  # z-buffer pass: "numba" (compiled, CPU), "torch" (any device), "auto"
) -> Tensor:
    """Rasterize triangles into [V, H, W, 4] = (u, v, z/w, triangle id + 1); 0 everywhere where empty.

    u and v are the perspective-correct barycentric weights of the triangle's vertices 0 and 1 (vertex 2 has
    1 - u - v), as in nvdiffrast. The triangle id channel is a float holding an integer (exact below 2^24
    triangles) and carries no gradient; u, v and z/w are differentiable w.r.t. `pos_clip` (the visibility
    decision itself is not). Row 0 of the image is its top (y_ndc = +1). Pixels are sampled at their
    centres; the nearest surface wins (smallest z/w), ties broken by the lower triangle id. On CPU the
    z-buffer pass runs as a compiled numba loop ("auto"), and so does the whole pass when no gradient is
    wanted; the PyTorch path is the reference and runs on CUDA.
    """
    _check_inputs(pos_clip, tri)
    height, width = _resolution(resolution)
    n_views = pos_clip.shape[0]
    needs_grad = torch.is_grad_enabled() and pos_clip.requires_grad
    if (
        not needs_grad
        and backend != "torch"
        and pos_clip.device.type == "cpu"
        and _zbuffer_cpu.AVAILABLE
        and pos_clip.dtype == torch.float32
    ):
        # No gradient wanted: the whole pass as compiled loops (same formulas as below).
        px, py, zw = _to_pixels(pos_clip.detach(), height, width)
        arrays = [t.contiguous().numpy() for t in (px, py, zw, pos_clip[..., 3].detach())]
        tri_np = tri.long().contiguous().numpy()
        ids = _zbuffer_cpu.visible_triangles_cpu(*arrays, tri_np, height, width, _EDGE_EPS, _W_EPS)
        return torch.from_numpy(_zbuffer_cpu.fill_rast_cpu(ids, *arrays, tri_np, height, width))
    winner = _visible_triangles(pos_clip.detach(), tri, height, width, max_candidates, backend)  # [V*H*W]
    covered = (winner >= 0).nonzero(as_tuple=True)[0]  # [P]
    face = winner[covered]
    view = torch.div(covered, height * width, rounding_mode="floor")
    pixel = covered - view * (height * width)
    u, v, z = _barycentrics(pos_clip, tri, view, pixel, face, height, width)
    values = torch.stack([u, v, z, (face + 1).to(u.dtype)], dim=-1)  # [P, 4]
    rast = pos_clip.new_zeros(n_views * height * width, 4).index_put((covered,), values)
    return rast.view(n_views, height, width, 4)


def interpolate(
    attr: Tensor,  # [N, C] or [V, N, C] per-vertex attributes
    rast: Tensor,  # [V, H, W, 4] from rasterize
    tri: Tensor,  # [F, 3] the triangles given to rasterize
) -> Tensor:
    """Interpolate vertex attributes at every pixel: [V, H, W, C], zero where no triangle is visible.

    Differentiable w.r.t. `attr` and, through the barycentrics in `rast`, the vertex positions.
    """
    n_views, height, width, _ = rast.shape
    covered, values = interpolate_covered(attr, rast, tri)  # [P], [P, C]
    out = values.new_zeros(n_views * height * width, attr.shape[-1]).index_put((covered,), values)
    return out.view(n_views, height, width, attr.shape[-1])


def interpolate_covered(
    attr: Tensor,  # [N, C] or [V, N, C] per-vertex attributes
    rast: Tensor,  # [V, H, W, 4] from rasterize
    tri: Tensor,  # [F, 3] the triangles given to rasterize
) -> tuple[Tensor, Tensor]:
    """`interpolate` at the covered pixels only: their flat indices into V*H*W [P] and the values [P, C].

    For callers that work on the covered pixels (a field queried at the surface points): no dense image to
    fill and gather from again. Same values and gradients as `interpolate` there.
    """
    if attr.ndim not in (2, 3):
        raise ValueError(f"attr must be [N, C] or [V, N, C], got {tuple(attr.shape)}")
    n_views, height, width, _ = rast.shape
    flat = rast.reshape(-1, 4)
    ids = flat[:, 3].detach().long()  # [V*H*W], 0 = empty
    covered = (ids > 0).nonzero(as_tuple=True)[0]  # [P]
    corner = tri.long()[ids[covered] - 1]  # [P, 3]
    u, v = flat[covered, 0:1], flat[covered, 1:2]  # [P, 1]
    if attr.ndim == 2:
        a0, a1, a2 = attr[corner[:, 0]], attr[corner[:, 1]], attr[corner[:, 2]]  # [P, C]
    else:
        view = torch.div(covered, height * width, rounding_mode="floor")
        a0, a1, a2 = attr[view, corner[:, 0]], attr[view, corner[:, 1]], attr[view, corner[:, 2]]
    return covered, u * a0 + v * a1 + (1.0 - u - v) * a2


def texture(
    tex: Tensor,  # [H, W, C] or [V, H, W, C] texture image, row 0 = top
    uv: Tensor,  # [V, h, w, 2] texture coordinates, origin bottom-left (OBJ convention)
    boundary: str = "wrap",  # "wrap" (repeat) or "clamp" outside [0, 1]
) -> Tensor:
    """Bilinear texture lookup -> [V, h, w, C]; differentiable w.r.t. the texture and the coordinates.

    Texel centres sit at ((i + 0.5) / W, 1 - (j + 0.5) / H). No mipmapping: minified textures alias.
    """
    if tex.ndim == 3:
        tex = tex[None]
    if tex.ndim != 4 or uv.ndim != 4 or uv.shape[-1] != 2:
        raise ValueError(
            f"tex must be [H, W, C] or [V, H, W, C] and uv [V, h, w, 2]; got {tuple(tex.shape)}, "
            f"{tuple(uv.shape)}"
        )
    n_views = uv.shape[0]
    image = tex.permute(0, 3, 1, 2)  # [1 or V, C, H, W]
    t_h, t_w = image.shape[-2:]
    if boundary == "wrap":
        # Pad by one texel from the opposite side, so bilinear taps at the border wrap around.
        image = torch.cat([image[..., -1:, :], image, image[..., :1, :]], dim=-2)
        image = torch.cat([image[..., -1:], image, image[..., :1]], dim=-1)
        u = uv[..., 0] - torch.floor(uv[..., 0].detach())
        v = uv[..., 1] - torch.floor(uv[..., 1].detach())
        # Texel coordinates in the padded image, then grid_sample's normalised ones (align_corners=False).
        gx = (2.0 * (u * t_w + 1.0)) / (t_w + 2) - 1.0
        gy = (2.0 * ((1.0 - v) * t_h + 1.0)) / (t_h + 2) - 1.0
        padding_mode = "border"
    elif boundary == "clamp":
        gx = 2.0 * uv[..., 0] - 1.0
        gy = 1.0 - 2.0 * uv[..., 1]
        padding_mode = "border"
    else:
        raise ValueError(f"boundary must be 'wrap' or 'clamp', got {boundary!r}")
    if image.shape[0] != n_views:
        image = image.expand(n_views, -1, -1, -1)
    grid = torch.stack([gx, gy], dim=-1).to(image.dtype)  # [V, h, w, 2]
    out = torch.nn.functional.grid_sample(
        image, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False
    )  # [V, C, h, w]
    return out.permute(0, 2, 3, 1)


def edge_topology(tri: Tensor) -> Tensor:
    """For each triangle edge (k: vertices k -> k+1), the triangle across it: [F, 3] int64.

    -1 marks a boundary edge and -2 an edge shared by more than two triangles (both count as silhouettes).
    Depends only on the connectivity, so it can be computed once per mesh and passed to `antialias`.
    """
    tri = tri.long()
    n_faces = tri.shape[0]
    device = tri.device
    a, b = tri.reshape(-1), tri.roll(-1, dims=1).reshape(-1)  # [3F] half-edges a -> b
    n_vert = int(tri.max()) + 1 if n_faces else 1
    key = torch.minimum(a, b) * n_vert + torch.maximum(a, b)  # undirected edge id
    sorted_key, order = torch.sort(key, stable=True)
    _, inverse, counts = torch.unique_consecutive(sorted_key, return_inverse=True, return_counts=True)
    count = counts[inverse]  # [3F] users of each sorted half-edge's edge
    pos = torch.arange(key.numel(), device=device)
    first = (torch.cumsum(counts, 0) - counts)[inverse]
    # With exactly two users the pair sits side by side in sorted order.
    mate = torch.where(pos == first, pos + 1, first).clamp(max=max(key.numel() - 1, 0))
    face_of = order // 3
    opp_sorted = torch.where(count == 2, face_of[mate], torch.where(count == 1, -1, -2))
    opposite = torch.empty_like(opp_sorted)
    opposite[order] = opp_sorted
    return opposite.view(n_faces, 3)


def weld_seams(vertices: Tensor, tri: Tensor) -> Tensor:
    """tri [F, 3] re-indexed so that vertices at one position (split at UV or normal seams: every chart
    border of an unwrapped, textured mesh) are one vertex, the first of them: [F, 3] int64. For the
    silhouettes (`edge_topology` of it, passed to `antialias` with it), which would take each seam for a
    boundary and blend the pixels across it."""
    if vertices.shape[0] == 0:
        return tri.long()
    _, position = torch.unique(vertices.detach(), dim=0, return_inverse=True)  # [N] one id per position
    index = torch.arange(vertices.shape[0], device=vertices.device)
    first = torch.full(
        (int(position.max()) + 1,), vertices.shape[0], dtype=torch.long, device=vertices.device
    )
    first = first.scatter_reduce(0, position, index, reduce="amin")  # [P] the first vertex at each position
    return first[position][tri.long()]


def seam_topology(tri: Tensor, seamless: Tensor) -> Tensor:
    """`edge_topology` for `antialias` over `seamless = weld_seams(vertices, tri)`: [F, 3]. Welded where that
    gives an edge two faces (a UV seam joined up), unwelded elsewhere: the two sheets of a double-sided
    card, welded, would give each inner edge four faces (silhouettes all over it)."""
    welded = edge_topology(seamless)
    return torch.where(welded >= 0, welded, edge_topology(tri))


def antialias(
    color: Tensor,  # [V, H, W, C] shaded image (premultiplied by coverage where it has an alpha channel)
    rast: Tensor,  # [V, H, W, 4] from rasterize
    pos_clip: Tensor,  # [V, N, 4] the positions given to rasterize
    tri: Tensor,  # [F, 3] the triangles given to rasterize
    topology: Tensor | None = None,  # [F, 3] from edge_topology(tri); computed when None
    backend: str = "auto",  # silhouette edges by "numba" (compiled, CPU), "torch" (any device), "auto"
) -> Tensor:
    """Analytic antialiasing of silhouette edges -> [V, H, W, C].

    Each silhouette edge (`silhouette_edges`) is followed across the pixel rows and columns it spans in
    screen space: where it crosses the segment between two horizontally (vertically) adjacent pixel centres
    that see different triangles (or a triangle and the background), and it lies in front of what the
    farther of the two pixels sees, it is a candidate for that pair; of a pair's candidates the front-most
    (smallest z/w where it crosses) bounds the nearer surface. The pair is blended by it when the edge is
    steeper across the pair than along it (nvdiffrast's rule: each outline pixel is blended by one
    direction's pairs). Searching in screen space rather than along the mesh finds the outline on fine
    meshes too, where near an outline the surface is seen edge-on and the triangle at the front pixel lies
    many triangles away from the silhouette edge.
    At distance d from the front pixel's centre, with d < 1/2 the front pixel takes (1/2 - d) of the other's
    colour, and with d > 1/2 the other pixel takes (d - 1/2) of the front's. Differentiable w.r.t. `color`
    and, through the crossing point, the edge's vertex positions; finding the crossings is not.
    """
    _check_inputs(pos_clip, tri)
    n_views, height, width, _ = color.shape
    tri = tri.long()
    if topology is None:
        topology = edge_topology(tri)
    if backend not in ("auto", "torch", "numba"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'numba', got {backend!r}")
    use_numba = backend == "numba" or (
        backend == "auto" and pos_clip.device.type == "cpu" and _zbuffer_cpu.AVAILABLE
    )
    if use_numba and not _zbuffer_cpu.AVAILABLE:
        raise RuntimeError("backend='numba' needs the numba package")
    with torch.no_grad():
        # The search in the positions' precision (float64 in the gradient checks): the crossings it finds are
        # the ones the differentiable part below computes again.
        search = pos_clip.detach().to(torch.float64 if pos_clip.dtype == torch.float64 else torch.float32)
        px, py, pz = _to_pixels(search, height, width)  # [V, N] each
        sil_edges = silhouette_edges(px, py, tri, topology.long(), use_numba)
        drawn = (search[..., 3][:, tri] > _W_EPS).all(-1)  # [V, F] as rasterize draws them
        ids, zw = rast[..., 3].detach().long(), rast[..., 2].detach().to(px.dtype)  # [V, H, W], 0 = empty
        view, pixel_a, horizontal, front_a, e0, e1 = _silhouette_crossings(
            ids, zw, px, py, pz, tri, topology.long(), sil_edges, drawn
        )
    if view.numel() == 0:
        return color

    # Differentiable part: where the chosen edge crosses the pixel pair's segment, from the positions.
    ex0, ey0, _ = _to_pixels(pos_clip[view, e0], height, width)  # [Q] each
    ex1, ey1, _ = _to_pixels(pos_clip[view, e1], height, width)
    local = pixel_a - view * (height * width)
    cx = (local % width).to(ex0.dtype) + 0.5  # pixel a's centre
    cy = torch.div(local, width, rounding_mode="floor").to(ex0.dtype) + 0.5
    # Horizontal pair: where the edge crosses row cy; vertical pair: column cx. The unused branch gets a
    # unit denominator so that its (discarded) value cannot put NaN into the gradient.
    den_h = torch.where(horizontal, ey1 - ey0, torch.ones_like(ey0))
    den_v = torch.where(horizontal, torch.ones_like(ex0), ex1 - ex0)
    t_h = ex0 + (cy - ey0) / den_h * (ex1 - ex0) - cx
    t_v = ey0 + (cx - ex0) / den_v * (ey1 - ey0) - cy
    t = torch.where(horizontal, t_h, t_v).clamp(0.0, 1.0)  # in (0, 1): pixels from a's centre towards b's
    d = torch.where(front_a, t, 1.0 - t)  # distance from the front pixel's centre to the edge
    pixel_b = pixel_a + torch.where(horizontal, 1, width)
    idx_front = torch.where(front_a, pixel_a, pixel_b)
    idx_back = torch.where(front_a, pixel_b, pixel_a)
    flat_color = color.reshape(-1, color.shape[-1])
    c_front, c_back = flat_color[idx_front], flat_color[idx_back]  # [Q, C]
    near_front = d < 0.5
    # d < 1/2: the front pixel is partly covered by what is behind; else the back pixel by the front.
    weight = torch.where(near_front, 0.5 - d, d - 0.5)[:, None]
    delta = weight * torch.where(near_front[:, None], c_back - c_front, c_front - c_back)
    out = flat_color.index_add(0, torch.where(near_front, idx_front, idx_back), delta)
    return out.view_as(color)


def silhouette_edges(
    px: Tensor,  # [V, N] pixel x of the vertices
    py: Tensor,  # [V, N] pixel y
    tri: Tensor,  # [F, 3] int64
    topology: Tensor,  # [F, 3] from edge_topology
    use_numba: bool = False,  # the compiled loop (CPU), same values
) -> Tensor:
    """Silhouette edges in each view -> [V, F, 3] bool (edge k of triangle f: tri[f, k] -> tri[f, k + 1]).

    As nvdiffrast decides it, from the geometry and not the winding: an edge is a silhouette when it has no
    single neighbour, or when the neighbour's far vertex lies on the same side of the edge as the
    triangle's own third vertex (the surface folds back there). A mesh whose faces are wound
    inconsistently (a scan, a user's file) then has the same silhouettes as a consistent one.
    """
    a, b, c = tri, tri.roll(-1, dims=1), tri.roll(-2, dims=1)  # [F, 3]: edge k is a -> b, c the third
    valid_opp = topology >= 0  # [F, 3]
    far = tri[topology.clamp(min=0)].sum(-1) - a - b  # [F, 3] the neighbour's vertex off the edge
    if use_numba:
        arrays = [t.cpu().numpy() for t in (px, py, tri, topology, torch.where(valid_opp, far, c))]
        return torch.from_numpy(_zbuffer_cpu.silhouette_edges_cpu(*arrays)).to(px.device)

    def side(p: Tensor) -> Tensor:  # [V, F, 3] twice the signed area of (a, b, p) in pixels
        ax, ay = px[:, a], py[:, a]
        return (px[:, b] - ax) * (py[:, p] - ay) - (py[:, b] - ay) * (px[:, p] - ax)

    own, other = side(c), side(torch.where(valid_opp, far, c))
    return ~valid_opp[None] | ((own >= 0) == (other >= 0))  # [V, F, 3]


def _silhouette_crossings(
    ids: Tensor,  # [V, H, W] triangle id + 1, 0 = empty
    zw: Tensor,  # [V, H, W] z/w
    px: Tensor,  # [V, N] pixel x of the vertices
    py: Tensor,  # [V, N] pixel y
    pz: Tensor,  # [V, N] z/w
    tri: Tensor,  # [F, 3] int64
    topology: Tensor,  # [F, 3] from edge_topology
    sil_edges: Tensor,  # [V, F, 3] from silhouette_edges
    drawn: Tensor,  # [V, F] triangles that rasterize draws (all vertices in front of the camera)
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The pixel pairs to blend and their edges: [Q] view, pixel a (flat), horizontal, front is a, v0, v1.

    Vectorised over (edge, row or column crossed): the work is the silhouette's length in pixels.
    """
    n_views, height, width = ids.shape
    device = ids.device
    # An interior edge is a silhouette when either of its triangles says so (the test is symmetric but for
    # rounding and degenerate triangles), and on the outline of what is drawn when its neighbour is not
    # (behind the camera). Each is followed once: from the lower-numbered triangle, or the drawn one.
    face = torch.arange(tri.shape[0], device=device)[:, None]  # [F, 1]
    has_opp = topology >= 0  # [F, 3]
    opp = topology.clamp(min=0)
    mate_k = (topology[opp] == face[..., None]).int().argmax(-1)  # [F, 3] the edge's index in its neighbour
    neighbour_drawn = drawn[:, opp] | ~has_opp  # [V, F, 3]
    flagged = sil_edges | (has_opp & sil_edges[:, opp, mate_k]) | ~neighbour_drawn
    once = ~has_opp | (face < topology) | ~neighbour_drawn
    v, f, k = (flagged & once & drawn[..., None]).nonzero(as_tuple=True)  # [E] each
    i0, i1 = tri[f, k], tri[f, (k + 1) % 3]
    x0, y0, z0, x1, y1, z1 = px[v, i0], py[v, i0], pz[v, i0], px[v, i1], py[v, i1], pz[v, i1]  # [E] each
    finite = torch.stack([x0, y0, z0, x1, y1, z1]).isfinite().all(0)  # a diverged vertex crosses nothing
    v, i0, i1, x0, y0, z0, x1, y1, z1 = (x[finite] for x in (v, i0, i1, x0, y0, z0, x1, y1, z1))
    flat_ids = ids.reshape(-1)
    depth = torch.where(flat_ids > 0, zw.reshape(-1), torch.full_like(zw.reshape(-1), float("inf")))
    results = []
    for horizontal in (True, False):  # pairs (x, x+1) on a row, then (y, y+1) in a column
        # The edge crosses the centre lines (rows y = j + 1/2, or columns x = j + 1/2) between its ends.
        c0, c1, a0, a1 = (y0, y1, x0, x1) if horizontal else (x0, x1, y0, y1)
        n_lines, n_along = (height, width) if horizontal else (width, height)
        first = torch.ceil(torch.minimum(c0, c1) - 0.5).clamp(min=0)
        last = torch.floor(torch.maximum(c0, c1) - 0.5).clamp(max=n_lines - 1)
        count = (last - first + 1).clamp(min=0).long()  # [E]
        edge = torch.repeat_interleave(torch.arange(v.numel(), device=device), count)  # [X] crossings
        offset = torch.arange(edge.numel(), device=device) - (torch.cumsum(count, 0) - count)[edge]
        line = first[edge].long() + offset
        num, den = line.to(c0.dtype) + 0.5 - c0[edge], c1[edge] - c0[edge]
        strict = num * (num - den) < 0  # the ends strictly on either side of the line
        s = num / torch.where(strict, den, torch.ones_like(den))  # [X] where along the edge, 0..1
        cross = a0[edge] + s * (a1[edge] - a0[edge])
        i = torch.floor(cross - 0.5)  # the pair's first pixel
        ok = strict & (i >= 0) & (i <= n_along - 2) & (cross - (i + 0.5) > 0)
        edge, line, i, s = edge[ok], line[ok], i[ok].long(), s[ok]
        vv = v[edge]
        if horizontal:
            pixel_a = (vv * height + line) * width + i
            pixel_b = pixel_a + 1
        else:
            pixel_a = (vv * height + i) * width + line
            pixel_b = pixel_a + width
        id_a, id_b, z_a, z_b = flat_ids[pixel_a], flat_ids[pixel_b], depth[pixel_a], depth[pixel_b]
        front_a = (id_b == 0) | ((id_a > 0) & (z_a < z_b))
        z_edge = z0[edge] + s * (z1[edge] - z0[edge])  # z/w is affine in screen space along the edge
        # A candidate lies in front of what the farther pixel sees: an edge hidden behind a surface that
        # covers both pixels is not one. Of a pair's candidates the front-most is the outline there.
        # Where the crossing is outside the depth range, rasterize clips the surface: no outline there.
        keep = (id_a != id_b) & (z_edge < torch.where(front_a, z_b, z_a)) & (z_edge.abs() <= 1.0)
        pixel_a, front_a, edge, z_edge = pixel_a[keep], front_a[keep], edge[keep], z_edge[keep]
        order = torch.sort(z_edge, stable=True).indices
        order = order[torch.sort(pixel_a[order], stable=True).indices]  # by pair, then front to back
        pixel_a, front_a, edge = pixel_a[order], front_a[order], edge[order]
        first_of_pair = torch.ones_like(pixel_a, dtype=torch.bool)
        first_of_pair[1:] = pixel_a[1:] != pixel_a[:-1]
        # Steep across the pair (nvdiffrast's rule), decided after the pick: a flat front-most edge leaves
        # the pair to the other direction rather than letting a steep edge behind it blend it.
        pick = first_of_pair.clone()
        pick[first_of_pair] = (c1 - c0).abs()[edge[first_of_pair]] >= (a1 - a0).abs()[edge[first_of_pair]]
        pixel_a, front_a, edge = pixel_a[pick], front_a[pick], edge[pick]
        results.append((v[edge], pixel_a, torch.full_like(front_a, horizontal), front_a, i0[edge], i1[edge]))
    return tuple(torch.cat(parts) for parts in zip(*results, strict=True))  # type: ignore[return-value]
