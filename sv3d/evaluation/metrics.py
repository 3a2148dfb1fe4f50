"""Mesh metrics of the evaluation protocol: Chamfer distance, F-score and volume IoU against a ground truth.

Implements ARCHITECTURE.md, "Evaluation protocol", which fixes what SV3D's paper left unpublished:

1. The ground truth is placed in the world frame (bounding box centred at the origin, bounding sphere of
   radius 0.5, `sv3d.meshio.place_in_world`). The prediction is used as it is (`oracle` mode: floaters
   count) or, in `generated` mode, cleaned of connected components under 1% of its area and then centred
   and scaled the same way (`normalize_prediction`). Both are then divided by the ground truth's largest
   bounding-box side, so every distance below is in units of that side.
2. Points are sampled on the surfaces visible from outside (`sample_visible_surface`: area-uniform
   candidates kept when one of 64 orthographic views from a Fibonacci sphere of directions sees them,
   a shadow-map test on the rasterizer's triangle ids), with a fixed count and seed, so that the
   internal faces of scanned meshes do not count.
3. Chamfer distance = mean of the two directional mean nearest-neighbour L2 distances; F-score at 0.01,
   0.02 and 0.05 (precision: prediction points within the threshold of the ground truth; recall: the
   converse; F = 2PR / (P + R)); a distance counts when strictly below the threshold.
4. Volume IoU on a 64³ grid of cell centres filling the box around the union of both bounding boxes (64
   cells along each side, so a thin union is as finely resolved across as along), inside = generalized
   winding number > 0.5 (`sv3d/evaluation/winding.py`).
5. An optional ICP refinement of the prediction's pose (`trimesh.registration.icp`, rigid, on the sampled
   points) is reported separately as the `*_icp` metrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import trimesh
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from refine.camera import Cameras, transform_points
from refine.rasterizer import rasterize
from sv3d.device import pick_device
from sv3d.errors import InputError
from sv3d.evaluation.winding import build_face_tree, winding_numbers_fast
from sv3d.meshio import place_in_world

__all__ = [
    "DEFAULT_THRESHOLDS",
    "MeshMetrics",
    "chamfer_distance",
    "evaluate_mesh",
    "face_components",
    "fibonacci_sphere",
    "fscore",
    "normalize_prediction",
    "occupancy",
    "place_ground_truth",
    "remove_small_components",
    "sample_visible_surface",
    "volume_iou",
]

DEFAULT_THRESHOLDS = (0.01, 0.02, 0.05)  # F-score thresholds, in units of the ground truth's largest side
MODES = ("oracle", "generated")
MIN_COMPONENT_AREA = 0.01  # generated mode drops connected components under this fraction of the total area


def _check_mesh(mesh: trimesh.Trimesh, name: str) -> None:
    if not isinstance(mesh, trimesh.Trimesh):
        raise InputError(f"{name}: expected a trimesh.Trimesh, got {type(mesh).__name__}")
    if len(mesh.faces) == 0 or len(mesh.vertices) == 0:
        raise InputError(f"{name}: the mesh has no faces")
    if not np.isfinite(mesh.vertices).all():
        raise InputError(f"{name}: the mesh has non-finite vertex coordinates")
    if float(mesh.area) <= 0.0:
        raise InputError(f"{name}: the mesh has zero surface area")


def _copy(
    mesh: trimesh.Trimesh, vertices: np.ndarray | None = None, faces: np.ndarray | None = None
) -> trimesh.Trimesh:
    """A geometry-only copy (no visuals, no processing, so vertex order and face order are kept)."""
    return trimesh.Trimesh(
        vertices=np.asarray(mesh.vertices if vertices is None else vertices, dtype=np.float64),
        faces=np.asarray(mesh.faces if faces is None else faces, dtype=np.int64),
        process=False,
    )


# ----------------------------------------------------------------------------------------------------------
# Normalisation


def place_ground_truth(gt: trimesh.Trimesh) -> trimesh.Trimesh:
    """The ground truth in the world frame: bounding box centred, bounding sphere of radius 0.5."""
    _check_mesh(gt, "ground truth")
    placed, _, _ = place_in_world(np.asarray(gt.vertices, dtype=np.float64))
    return _copy(gt, vertices=placed)


def face_components(mesh: trimesh.Trimesh) -> np.ndarray:
    """[F] connected-component label of each face; faces sharing an edge (between positions) connect, also
    across an edge that three or more faces share (trimesh's face adjacency joins only edges of exactly
    two, so a fin on a non-manifold edge was a component of its own)."""
    _, inverse = np.unique(np.asarray(mesh.vertices), axis=0, return_inverse=True)  # merge equal positions
    faces = inverse.reshape(-1)[np.asarray(mesh.faces)]  # [F, 3]
    n = len(faces)
    edges = np.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)  # [3F, 2] each face's edges
    _, edge_id = np.unique(edges, axis=0, return_inverse=True)  # [3F]
    # faces and edges as the nodes of one graph, each face joined to its three edges
    graph = coo_matrix(
        (np.ones(3 * n), (np.repeat(np.arange(n), 3), n + edge_id.reshape(-1))),
        shape=(n + int(edge_id.max(initial=-1)) + 1,) * 2,
    )
    _, labels = connected_components(graph, directed=False)
    return labels[:n]  # [F]: every edge node hangs on a face, so the labels count faces' components


def remove_small_components(
    mesh: trimesh.Trimesh, min_fraction: float = MIN_COMPONENT_AREA
) -> trimesh.Trimesh:
    """Drops the connected components whose area is under `min_fraction` of the mesh's total area; the
    largest always stays (a mesh of more than 1 / min_fraction even fragments would lose them all)."""
    labels = face_components(mesh)  # [F]
    area = np.bincount(labels, weights=mesh.area_faces)  # [C]
    keep = (area[labels] >= min_fraction * area.sum()) | (labels == int(np.argmax(area)))  # [F]
    kept = _copy(mesh, faces=np.asarray(mesh.faces)[keep])
    kept.remove_unreferenced_vertices()
    return kept


def normalize_prediction(pred: trimesh.Trimesh, mode: str = "oracle") -> trimesh.Trimesh:
    """The prediction as the protocol compares it (a copy; the input is not modified).

    oracle: unchanged (its world frame is the ground truth's; floaters count).
    generated: components under 1% of the area removed, then bounding box centred and bounding sphere
    scaled to 0.5 like the ground truth, since one image fixes neither the scale nor the depth.
    """
    if mode not in MODES:
        raise InputError(f"evaluation mode must be one of {MODES}, got {mode!r}")
    _check_mesh(pred, "prediction")
    if mode == "oracle":
        return _copy(pred)
    cleaned = remove_small_components(pred)
    placed, _, _ = place_in_world(np.asarray(cleaned.vertices, dtype=np.float64))
    return _copy(cleaned, vertices=placed)


# ----------------------------------------------------------------------------------------------------------
# Visible-surface sampling


def fibonacci_sphere(n: int) -> np.ndarray:
    """[n, 3] unit vectors spread almost uniformly over the sphere (golden-angle spiral)."""
    i = np.arange(n, dtype=np.float64) + 0.5
    z = 1.0 - 2.0 * i / n  # uniform in z ⇒ uniform in area
    phi = i * math.pi * (3.0 - math.sqrt(5.0))  # golden angle
    r = np.sqrt(1.0 - z**2)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=-1)


def _orthographic_cameras(directions: np.ndarray, center: np.ndarray, radius: float) -> Cameras:
    """Orthographic cameras looking at `center` from each of `directions` [V, 3], framing a sphere of
    `radius`: x/y in NDC = camera x/y / radius, depth in [radius, 3·radius] ↦ z_ndc in [-1, 1]."""
    d = torch.as_tensor(directions, dtype=torch.float64)  # [V, 3] from the centre towards each camera
    up = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand_as(d)
    up = torch.where((d[:, 2:].abs() > 0.99), torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), up)
    x = torch.nn.functional.normalize(torch.cross(up, d, dim=-1), dim=-1)  # [V, 3] camera right
    y = torch.cross(d, x, dim=-1)  # [V, 3] camera up; the camera looks along -d (OpenGL: -z)
    c2w = torch.zeros(len(d), 4, 4, dtype=torch.float64)
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2] = x, y, d
    c2w[:, :3, 3] = torch.as_tensor(center, dtype=torch.float64) + 2.0 * radius * d
    c2w[:, 3, 3] = 1.0
    near, far = radius, 3.0 * radius
    proj = torch.zeros(4, 4, dtype=torch.float64)
    proj[0, 0] = proj[1, 1] = 1.0 / radius
    proj[2, 2] = -2.0 / (far - near)
    proj[2, 3] = -(far + near) / (far - near)
    proj[3, 3] = 1.0
    return Cameras(c2w=c2w, projection=proj)


def _area_uniform_samples(
    mesh: trimesh.Trimesh, count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """`count` points uniform in area over all faces: ([count, 3] points, [count] face index)."""
    area = np.asarray(mesh.area_faces, dtype=np.float64)  # [F]
    cdf = np.cumsum(area)
    face = np.searchsorted(cdf, rng.random(count) * cdf[-1], side="right").clip(0, len(area) - 1)  # [C]
    r1, r2 = rng.random(count), rng.random(count)
    s = np.sqrt(r1)  # (1 - √r1, √r1 (1 - r2), √r1 r2) is uniform over a triangle
    bary = np.stack([1.0 - s, s * (1.0 - r2), s * r2], axis=-1)  # [C, 3]
    tri = np.asarray(mesh.vertices, dtype=np.float64)[np.asarray(mesh.faces)[face]]  # [C, 3, 3]
    return np.einsum("ck,ckj->cj", bary, tri), face


def _view_frame(mesh: trimesh.Trimesh) -> tuple[np.ndarray, float]:
    """(centre [3], radius) of the visibility views' frame: the bounding box's sphere of the largest
    components that hold 99% of the area (the smallest, 1% in all, left out), with a 1% margin. Framed on
    every vertex, a speck far away made the pixels (and the depth tolerance, half a pixel) as coarse as the
    speck's distance; a mesh of many small fragments keeps them all in the frame."""
    labels = face_components(mesh)  # [F]
    area = np.bincount(labels, weights=mesh.area_faces)  # [C]
    order = np.argsort(area)  # smallest first
    dropped = order[np.cumsum(area[order]) <= 0.01 * area.sum()]  # [D] the smallest, 1% of the area at most
    faces = np.asarray(mesh.faces)[~np.isin(labels, dropped)]  # [F', 3]
    vertices = np.asarray(mesh.vertices, dtype=np.float64)[np.unique(faces)]
    center = (vertices.min(0) + vertices.max(0)) / 2.0
    return center, 1.02 * float(np.linalg.norm(vertices - center, axis=-1).max())


@torch.no_grad()
def _visible(
    mesh: trimesh.Trimesh,
    points: np.ndarray,  # [C, 3] candidates on the surface
    face: np.ndarray,  # [C] the face each candidate lies on
    n_views: int,
    resolution: int,
    min_cos: float,
    frame: tuple[np.ndarray, float],  # (centre [3], radius) of the views' frame
    views_per_batch: int = 8,
    device: str = "auto",
) -> np.ndarray:
    """[C] bool: seen by at least one of `n_views` orthographic views (a shadow-map test).

    In a view, the rasterizer gives the triangle visible at the candidate's pixel. The candidate counts
    as seen when that is its own face, or when the visible triangle's plane, followed along the viewing
    ray to the candidate, lies within half a pixel of it (the same surface continuing across a triangle
    edge), and neither plane is seen at a grazing angle (|cos| < min_cos). Extrapolating the visible plane
    rather than reading a depth at the pixel centre keeps the tolerance independent of the slope, so a
    hidden wall right behind a tilted outer surface is not let through. A candidate outside a view's frame
    (on a small floater beyond it, `_view_frame`) counts as seen by it: nothing framed lies in front of it.
    """
    device = pick_device(device)
    vertices = np.array(mesh.vertices, dtype=np.float64)
    center, radius = frame
    directions = fibonacci_sphere(n_views)  # [V, 3] from the centre towards each camera
    cameras = _orthographic_cameras(directions, center, radius)
    tol = 0.5 * (2.0 * radius / resolution)  # half a pixel (orthographic: the same size everywhere)
    faces_np = np.array(mesh.faces, dtype=np.int64)
    faces = torch.as_tensor(faces_np, dtype=torch.int64, device=device)
    verts = torch.as_tensor(vertices, dtype=torch.float64, device=device)
    normals = torch.as_tensor(np.array(mesh.face_normals, dtype=np.float64), device=device)  # [F, 3]
    anchor = verts[faces[:, 0]]  # [F, 3] a point on each face's plane
    pts = torch.as_tensor(points, dtype=torch.float64, device=device)  # [C, 3]
    own = torch.as_tensor(face, dtype=torch.int64, device=device)  # [C]
    dirs = torch.as_tensor(directions, dtype=torch.float64, device=device)  # [V, 3]
    seen = torch.zeros(len(points), dtype=torch.bool, device=device)
    for v0 in range(0, n_views, views_per_batch):  # a few batches of views, bounded memory
        cams = cameras[v0 : v0 + views_per_batch].to(device)
        d = dirs[v0 : v0 + views_per_batch]  # [Vb, 3]
        mvp = cams.world_to_clip()  # [Vb, 4, 4]
        rast = rasterize(transform_points(verts, mvp).float(), faces, resolution)  # [Vb, H, W, 4]
        clip = transform_points(pts, mvp)  # [Vb, C, 4]; orthographic, so w = 1
        col = ((clip[..., 0] + 1.0) * 0.5 * resolution).floor().long()  # [Vb, C]
        row = ((1.0 - clip[..., 1]) * 0.5 * resolution).floor().long()
        inside = (col >= 0) & (col < resolution) & (row >= 0) & (row < resolution)
        vb = torch.arange(len(cams), device=device)[:, None].expand_as(col)
        hit = rast[vb, row.clamp(0, resolution - 1), col.clamp(0, resolution - 1), 3].long() - 1  # [Vb, C]
        covered = inside & (hit >= 0)
        hit = hit.clamp_min(0)
        cos_own = (normals[own] @ d.T).T.abs()  # [Vb, C]
        n_hit = normals[hit]  # [Vb, C, 3]
        cos_hit = (n_hit * d[:, None, :]).sum(-1)  # [Vb, C] signed
        # Along the ray p + λ·d: the visible plane n·(x − a) = 0 is met at λ = n·(a − p) / (n·d).
        lam = (n_hit * (anchor[hit] - pts[None])).sum(-1) / torch.where(cos_hit.abs() > 1e-12, cos_hit, 1.0)
        same_surface = (hit == own[None]) | ((lam.abs() <= tol) & (cos_hit.abs() >= min_cos))
        seen |= (((covered & same_surface) | ~inside) & (cos_own >= min_cos)).any(dim=0)
    return seen.cpu().numpy()


def sample_visible_surface(
    mesh: trimesh.Trimesh,
    n_points: int = 100_000,
    seed: int = 0,
    n_views: int = 64,  # Fibonacci directions; enough that concave regions are seen from some direction
    resolution: int = 512,  # depth-map side; a pixel ≈ 0.2% of the object's bounding diameter
    oversample: float = 2.0,  # candidates per requested point in each round
    min_cos: float = 0.2,  # views within ~78° of a face's normal can vouch for it
    max_rounds: int = 8,
    device: str = "auto",  # where the views are rasterized
) -> np.ndarray:
    """[n_points, 3] float64 points on the parts of `mesh` visible from outside, fixed by `seed`.

    Candidates are drawn area-uniformly on all faces; a candidate is kept when, in at least one of
    `n_views` orthographic depth maps from a Fibonacci sphere of directions, it lies within a small depth
    tolerance of the visible surface (a shadow-map test). Faces hidden from every direction (walls inside
    a closed shell, a doubled inner layer) yield no points. Rounds of candidates are drawn until enough
    are visible; then `n_points` of them are picked at random (with replacement only if fewer than
    `n_points` were found after `max_rounds`).
    """
    _check_mesh(mesh, "mesh")
    if n_points <= 0:
        raise InputError(f"n_points must be positive, got {n_points}")
    rng = np.random.default_rng(seed)
    frame = _view_frame(mesh)
    per_round = max(int(math.ceil(oversample * n_points)), 1)
    found: list[np.ndarray] = []
    n_found = 0
    for _ in range(max_rounds):
        cand, face = _area_uniform_samples(mesh, per_round, rng)
        keep = _visible(mesh, cand, face, n_views, resolution, min_cos, frame, device=device)
        found.append(cand[keep])
        n_found += int(keep.sum())
        if n_found >= n_points:
            break
    visible = np.concatenate(found, axis=0)  # [K, 3]
    if len(visible) == 0:
        raise InputError("mesh: no surface is visible from outside (is it empty or degenerate?)")
    pick = rng.choice(len(visible), size=n_points, replace=len(visible) < n_points)
    return visible[pick]


# ----------------------------------------------------------------------------------------------------------
# Point-set and volume metrics


def _as_points(points: np.ndarray, name: str) -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[-1] != 3 or len(pts) == 0:
        raise InputError(f"{name}: expected a non-empty [N, 3] point array, got shape {pts.shape}")
    return pts


def _nn_distances(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([P] distance of each prediction point to the ground truth, [G] of each ground-truth point)."""
    d_pred, _ = cKDTree(gt).query(pred, k=1, workers=-1)
    d_gt, _ = cKDTree(pred).query(gt, k=1, workers=-1)
    return d_pred, d_gt


def chamfer_distance(pred_pts: np.ndarray, gt_pts: np.ndarray) -> float:
    """Mean of the two directional mean nearest-neighbour L2 distances between [P, 3] and [G, 3]."""
    d_pred, d_gt = _nn_distances(_as_points(pred_pts, "pred_pts"), _as_points(gt_pts, "gt_pts"))
    return 0.5 * (float(d_pred.mean()) + float(d_gt.mean()))


def _prf(d_pred: np.ndarray, d_gt: np.ndarray, thresholds) -> dict[float, tuple[float, float, float]]:
    out = {}
    for t in thresholds:  # a handful of thresholds, each vectorised over all points
        p, r = float((d_pred < t).mean()), float((d_gt < t).mean())
        out[float(t)] = (p, r, 2.0 * p * r / (p + r) if p + r > 0 else 0.0)
    return out


def fscore(
    pred_pts: np.ndarray, gt_pts: np.ndarray, thresholds=DEFAULT_THRESHOLDS
) -> dict[float, dict[str, float]]:
    """{threshold: {"precision", "recall", "fscore"}}: precision = share of prediction points closer than
    the threshold to the ground truth, recall = the converse, F = their harmonic mean (0 if both are 0)."""
    d_pred, d_gt = _nn_distances(_as_points(pred_pts, "pred_pts"), _as_points(gt_pts, "gt_pts"))
    prf = _prf(d_pred, d_gt, thresholds)
    return {t: {"precision": p, "recall": r, "fscore": f} for t, (p, r, f) in prf.items()}


def _grid_box(pred: trimesh.Trimesh, gt: trimesh.Trimesh, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """(lo [3], hi [3]) of the IoU grid: the union of both bounding boxes, clipped to the ground truth's box
    grown by half its largest side each way (a far floater of no volume would otherwise stretch the grid;
    one at 10 sides away left the object a few cells wide; the prediction beyond the box is counted on a
    grid of its own, `_volume_outside`). An axis thinner than a cube cell (largest side / resolution) is
    widened to one about its middle, so that a flat mesh still has cells of some height."""
    gt_lo, gt_hi = gt.bounds
    margin = 0.5 * float((gt_hi - gt_lo).max())
    lo = np.maximum(np.minimum(pred.bounds[0], gt_lo), gt_lo - margin)  # [3]
    hi = np.minimum(np.maximum(pred.bounds[1], gt_hi), gt_hi + margin)  # [3]
    mid, half = (lo + hi) / 2.0, np.maximum(hi - lo, float((hi - lo).max()) / resolution) / 2.0  # [3] each
    return mid - half, mid + half


def occupancy(mesh: trimesh.Trimesh, points: np.ndarray, device: str = "auto") -> np.ndarray:
    """[Q] bool: |generalized winding number| of each point [Q, 3] w.r.t. `mesh` above 0.5 (so that a
    mesh wound inwards, w = -1 inside, is solid too)."""
    device = pick_device(device)
    tree = build_face_tree(
        torch.as_tensor(np.array(mesh.vertices), dtype=torch.float32, device=device),
        torch.as_tensor(np.array(mesh.faces), dtype=torch.int64, device=device),
    )
    w = winding_numbers_fast(torch.as_tensor(points, dtype=torch.float32, device=device), tree)  # [Q]
    return (w.abs() > 0.5).cpu().numpy()


def _cell_centres(lo: np.ndarray, hi: np.ndarray, resolution: int) -> np.ndarray:
    """[R³, 3] centres of a resolution³ grid of cells over the box [lo, hi]."""
    g = (np.arange(resolution) + 0.5) / resolution  # [R] in (0, 1)
    return np.stack(np.meshgrid(g, g, g, indexing="ij"), axis=-1).reshape(-1, 3) * (hi - lo) + lo


def encloses_volume(mesh: trimesh.Trimesh, resolution: int = 16, device: str = "auto") -> bool:
    """Whether any centre of a `resolution`³ grid over the mesh's box lies inside it: false for an open
    sheet, or a double-sided mesh whose two windings cancel (its volume IoU is 0 against anything)."""
    lo, hi = np.asarray(mesh.bounds[0], float), np.asarray(mesh.bounds[1], float)  # [3] each
    grid = _cell_centres(lo, hi, resolution)  # [R³, 3]
    return bool(occupancy(mesh, grid, device=device).any())


def volume_iou(
    pred_mesh: trimesh.Trimesh, gt_mesh: trimesh.Trimesh, resolution: int = 64, device: str = "auto"
) -> float:
    """Volume IoU on `resolution`³ cell centres filling the box around the union of both bounding boxes,
    `resolution` cells along each of its sides: the cells are boxes of equal volume, not cubes, so a thin
    union (a plate and a prediction of about its thickness) has as many cells across as along; in cubes of
    the largest side a plate 1/43 as thick as wide was 1.5 cells thick, and its IoU swung with sub-cell
    moves of its surface (README, Results). The union box is clipped to the ground truth's grown by half its
    largest side each way (`_grid_box`); the prediction's volume beyond it is added to the union
    (`_volume_outside`, on a coarser grid). Inside: |winding number| > 0.5. Returns 0.0 when neither mesh
    encloses any cell centre."""
    _check_mesh(pred_mesh, "prediction")
    _check_mesh(gt_mesh, "ground truth")
    lo, hi = _grid_box(pred_mesh, gt_mesh, resolution)  # [3] each
    grid = _cell_centres(lo, hi, resolution)  # [R³, 3]
    a, b = occupancy(pred_mesh, grid, device=device), occupancy(gt_mesh, grid, device=device)
    cell_volume = float(np.prod((hi - lo) / resolution))
    union = float((a | b).sum()) + _volume_outside(pred_mesh, lo, hi, cell_volume, device)
    return float((a & b).sum()) / union if union > 0 else 0.0


def _volume_outside(
    mesh: trimesh.Trimesh, box_lo: np.ndarray, box_hi: np.ndarray, cell_volume: float, device: str = "auto"
) -> float:
    """The prediction's volume outside the IoU grid's box [box_lo, box_hi] (which the ground truth lies
    in), in IoU cells of `cell_volume`: counted in cubes over the prediction's own box, no smaller than an
    IoU cell's volume, at most 64³ of them, so that a floater beyond the box still enlarges the union (it
    is never in the intersection)."""
    lo, hi = np.asarray(mesh.bounds[0], float), np.asarray(mesh.bounds[1], float)  # [3] each
    if np.all(lo >= box_lo) and np.all(hi <= box_hi):
        return 0.0
    coarse = max(cell_volume ** (1.0 / 3.0), float(np.prod(hi - lo)) ** (1.0 / 3.0) / 64.0)  # cube side
    counts = np.maximum(np.ceil((hi - lo) / coarse), 1).astype(int)  # [3]
    while np.prod(counts) > 64**3:  # a flat box (its volume near 0) needs larger cubes than its volume says
        coarse *= 1.25
        counts = np.maximum(np.ceil((hi - lo) / coarse), 1).astype(int)
    index = np.stack(np.meshgrid(*(np.arange(n) for n in counts), indexing="ij"), axis=-1).reshape(-1, 3)
    points = lo + (index + 0.5) * coarse  # [K, 3] cell centres over the prediction's box
    outside = np.any((points < box_lo) | (points > box_hi), axis=1)
    if not outside.any():
        return 0.0
    return float(occupancy(mesh, points[outside], device=device).sum()) * coarse**3 / cell_volume


# ----------------------------------------------------------------------------------------------------------
# One entry point


@dataclass
class MeshMetrics:
    """The protocol's figures for one prediction; distances in units of the ground truth's largest side."""

    mode: str  # "oracle" or "generated"
    n_points: int  # visible-surface points sampled on each mesh
    chamfer: float
    volume_iou: float
    fscore: dict[float, float]  # threshold -> F-score
    precision: dict[float, float]  # threshold -> precision
    recall: dict[float, float]  # threshold -> recall
    # After a rigid ICP of the prediction onto the ground truth; None when ICP was not asked for.
    chamfer_icp: float | None = None
    volume_iou_icp: float | None = None
    fscore_icp: dict[float, float] | None = None
    precision_icp: dict[float, float] | None = None
    recall_icp: dict[float, float] | None = None
    # [4, 4] rigid transform ICP applied to the prediction, in the normalised frame (GT-side units)
    icp_matrix: list[list[float]] | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        """Flat, JSON-ready: dict fields become `fscore@0.01`, `precision_icp@0.01`, ...; None is skipped."""
        out: dict = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, dict):
                out.update({f"{f.name}@{t:g}": float(v) for t, v in value.items()})
            else:
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> MeshMetrics:
        """Inverse of `to_dict`."""
        names = {f.name for f in fields(cls)}
        kwargs: dict = {}
        for key, value in data.items():
            if "@" in key:
                name, threshold = key.split("@", 1)
                if name not in names:
                    raise InputError(f"metrics: unknown key {key!r}")
                kwargs.setdefault(name, {})[float(threshold)] = float(value)
            elif key in names:
                kwargs[key] = value
            else:
                raise InputError(f"metrics: unknown key {key!r}")
        return cls(**kwargs)


def _point_metrics(pred_pts: np.ndarray, gt_pts: np.ndarray, thresholds) -> tuple[float, dict, dict, dict]:
    """(Chamfer, F-score, precision, recall by threshold) from one pair of nearest-neighbour queries."""
    d_pred, d_gt = _nn_distances(pred_pts, gt_pts)
    prf = _prf(d_pred, d_gt, thresholds)
    chamfer = 0.5 * (float(d_pred.mean()) + float(d_gt.mean()))
    f = {t: v[2] for t, v in prf.items()}
    precision = {t: v[0] for t, v in prf.items()}
    recall = {t: v[1] for t, v in prf.items()}
    return chamfer, f, precision, recall


def evaluate_mesh(
    pred: trimesh.Trimesh,
    gt: trimesh.Trimesh,
    mode: str = "oracle",
    n_points: int = 100_000,
    seed: int = 0,
    icp: bool = False,
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS,
    iou_resolution: int = 64,
    n_views: int = 64,
    view_resolution: int = 512,
    icp_points: int = 20_000,  # sampled points ICP aligns (a subset of the n_points, for speed)
    device: str = "auto",  # where the visibility views are rasterized and the winding numbers computed
) -> MeshMetrics:
    """All metrics of the protocol for one prediction against one ground-truth mesh (see module docstring).

    pred: in the world frame for `oracle` mode (compared as is); anywhere for `generated` mode.
    gt: in any frame; it is placed in the world frame here (an already placed mesh stays put).
    n_points, seed: visible-surface samples per mesh; the same seed for both, so identical meshes give
    identical samples. n_views, view_resolution: the visibility test's views (`sample_visible_surface`).
    iou_resolution: cells per side of the volume-IoU grid. icp: also align the prediction rigidly onto
    the ground truth (ICP on `icp_points` of its samples) and report the `*_icp` metrics.
    Timing (2 CPU cores, defaults): about 5 s of sampling and nearest neighbours, plus the volume IoU,
    which grows with the face count (10–20 s for ~80k faces in all).
    """
    # 1. Check inputs and normalise: GT in the world frame, the prediction by mode, both in GT-side units
    if mode not in MODES:
        raise InputError(f"evaluation mode must be one of {MODES}, got {mode!r}")
    gt_world = place_ground_truth(gt)
    pred_world = normalize_prediction(pred, mode)
    side = float(gt_world.extents.max())
    gt_n = _copy(gt_world, vertices=gt_world.vertices / side)
    pred_n = _copy(pred_world, vertices=pred_world.vertices / side)

    # 2. Visible-surface samples, fixed count and seed
    views = {"n_views": n_views, "resolution": view_resolution, "device": device}
    gt_pts = sample_visible_surface(gt_n, n_points, seed, **views)
    pred_pts = sample_visible_surface(pred_n, n_points, seed, **views)

    # 3. Metrics
    chamfer, f, p, r = _point_metrics(pred_pts, gt_pts, thresholds)
    iou = volume_iou(pred_n, gt_n, iou_resolution, device)
    metrics = MeshMetrics(
        mode=mode, n_points=n_points, chamfer=chamfer, volume_iou=iou, fscore=f, precision=p, recall=r
    )
    if not icp:
        return metrics

    # 4. Optional rigid ICP of the prediction onto the ground truth, reported separately
    rng = np.random.default_rng(seed)
    sub = pred_pts[rng.choice(len(pred_pts), size=min(icp_points, len(pred_pts)), replace=False)]
    matrix, _, _ = trimesh.registration.icp(sub, gt_pts, max_iterations=50, reflection=False, scale=False)
    pred_icp_pts = trimesh.transform_points(pred_pts, matrix)
    pred_icp = _copy(pred_n, vertices=trimesh.transform_points(pred_n.vertices, matrix))
    metrics.chamfer_icp, metrics.fscore_icp, metrics.precision_icp, metrics.recall_icp = _point_metrics(
        pred_icp_pts, gt_pts, thresholds
    )
    metrics.volume_iou_icp = volume_iou(pred_icp, gt_n, iou_resolution, device)
    metrics.icp_matrix = np.asarray(matrix, dtype=np.float64).tolist()
    return metrics
