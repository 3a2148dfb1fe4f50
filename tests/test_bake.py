"""UV unwrapping (xatlas) and texture baking (refine/bake.py): hand-checkable layouts and an icosphere."""

from __future__ import annotations

import time

import pytest
import torch
import trimesh

from refine.bake import BakeConfig, bake_texture, check_texture_size, default_padding, unwrap_uv
from refine.export import face_components


def icosphere(subdivisions: int = 3, radius: float = 0.45) -> tuple[torch.Tensor, torch.Tensor]:
    m = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    return torch.tensor(m.vertices, dtype=torch.float32), torch.tensor(m.faces, dtype=torch.int64)


def wavy_color(p: torch.Tensor) -> torch.Tensor:
    """A smooth non-linear colour field: [P, 3] -> [P, 3] in [0, 1]."""
    return 0.5 + 0.5 * torch.stack(
        [torch.sin(7 * p[:, 0]), torch.cos(5 * p[:, 1]), torch.sin(3 * p[:, 2])], -1
    )


@pytest.fixture(scope="module")
def unwrapped():
    v, f = icosphere(3)  # 642 vertices, 1280 faces
    return (v, f), unwrap_uv(v, f, texture_size=256, padding=4)


# --------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("size", [0, 32, 100, 1000, 16384, -64, True, 64.0, "1024"])
def test_invalid_texture_size_raises(size):
    with pytest.raises(ValueError, match="texture_size"):
        check_texture_size(size)


def test_valid_texture_sizes_and_padding():
    assert [check_texture_size(s) for s in (64, 1024, 8192)] == [64, 1024, 8192]
    assert [default_padding(s) for s in (64, 256, 1024, 4096)] == [2, 2, 4, 16]
    assert BakeConfig().texture_size == 1024 and BakeConfig().gutter == 8


def test_bake_rejects_bad_inputs():
    v = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]])
    f = torch.tensor([[0, 1, 2]])
    uv = v[:, :2] * 0.5 + 0.25
    with pytest.raises(ValueError, match="texture_size"):
        bake_texture(v, f, uv, lambda p: p, texture_size=96)
    with pytest.raises(ValueError, match="uvs"):
        bake_texture(v, f, uv[:2], lambda p: p, texture_size=64)
    with pytest.raises(ValueError, match="color_fn"):
        bake_texture(v, f, uv, lambda p: p[:, :2], texture_size=64)
    with pytest.raises(ValueError, match="gutter"):
        bake_texture(v, f, uv, lambda p: p, texture_size=64, gutter=-1)
    with pytest.raises(ValueError, match="faces index"):
        bake_texture(v, f + 1, uv, lambda p: p, texture_size=64)


# ------------------------------------------------------------------------------------------------ unwrap


def test_unwrap_keeps_faces_and_splits_seams(unwrapped):
    (v, f), (v2, f2, uv, vmap) = unwrapped
    assert f2.shape == f.shape and uv.shape == (v2.shape[0], 2) and vmap.shape == (v2.shape[0],)
    assert torch.equal(vmap[f2], f)  # face i is still face i, through the vertex map
    assert torch.equal(v2, v[vmap])
    assert float(uv.min()) >= 0.0 and float(uv.max()) <= 1.0
    # a closed sphere cannot be flattened in one piece: seams split vertices, each copy with its own uv
    assert v2.shape[0] > v.shape[0]
    assert torch.equal(torch.unique(vmap), torch.arange(v.shape[0]))
    counts = torch.bincount(vmap)
    split = (counts > 1).nonzero()[:, 0]
    for original in split[:20].tolist():  # a few seam vertices: their copies sit at different uvs
        copies = uv[vmap == original]
        assert float(torch.cdist(copies, copies).max()) > 1e-4


def test_unwrap_charts_do_not_overlap_and_keep_their_padding(unwrapped):
    (_, _), (_, f2, uv, _) = unwrapped
    tri = uv[f2].double()  # [F, 3, 2]
    # Every sample point lies strictly inside at most one UV triangle (edge functions, both windings).
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(10000, 2, generator=g, dtype=torch.float64)  # [P, 2]
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]  # [F, 2]

    def edge(p0, p1, q):  # [F, 2], [F, 2], [P, 2] -> [P, F]
        return (p1[:, 0] - p0[:, 0]) * (q[:, None, 1] - p0[:, 1]) - (p1[:, 1] - p0[:, 1]) * (
            q[:, None, 0] - p0[:, 0]
        )

    e0, e1, e2 = edge(a, b, pts), edge(b, c, pts), edge(c, a, pts)
    eps = 1e-12
    inside = ((e0 > eps) & (e1 > eps) & (e2 > eps)) | ((e0 < -eps) & (e1 < -eps) & (e2 < -eps))
    hits = inside.sum(dim=1)
    assert int(hits.max()) == 1
    # the covered share of the samples is the total UV area (no area hidden by overlap): xatlas packs
    # about 60-80% of the square
    area = 0.5 * ((b - a)[:, 0] * (c - a)[:, 1] - (b - a)[:, 1] * (c - a)[:, 0]).abs().sum()
    assert abs(float((hits > 0).double().mean()) - float(area)) < 0.01
    assert 0.4 < float(area) <= 1.0

    # Charts (faces connected in the split mesh) keep > 2.5 texels between them at 256² with padding 4.
    chart, n_charts = face_components(f2, uv.shape[0])
    assert n_charts > 1
    size = 256
    pos = torch.cat([uv * 2 - 1, torch.zeros_like(uv[:, :1]), torch.ones_like(uv[:, :1])], -1)[None]
    from refine.rasterizer import rasterize

    ids = rasterize(pos, f2, size)[0, ..., 3].long()  # [S, S] face id + 1
    label = torch.where(ids > 0, chart[(ids - 1).clamp(min=0)] + 1, 0)  # [S, S] chart + 1, 0 = empty
    pad = 3
    padded = torch.nn.functional.pad(label, (pad, pad, pad, pad))
    for dy in range(-pad, pad + 1):  # offsets within a 2.5-texel disc: a couple of dozen shifts
        for dx in range(-pad, pad + 1):
            if (dx, dy) == (0, 0) or dx * dx + dy * dy > 2.5**2:
                continue
            other = padded[pad + dy : pad + dy + size, pad + dx : pad + dx + size]
            clash = (label > 0) & (other > 0) & (label != other)
            assert not bool(clash.any()), f"two charts closer than 2.5 texels (offset {dx}, {dy})"


@pytest.mark.slow
def test_unwrap_20k_faces_time():
    v, f = icosphere(5)  # 20480 faces
    start = time.perf_counter()
    v2, f2, uv, _ = unwrap_uv(v, f, texture_size=1024)
    elapsed = time.perf_counter() - start
    print(f"unwrap of {f.shape[0]} faces: {elapsed:.2f} s, {v2.shape[0]} vertices")
    assert f2.shape == f.shape and float(uv.max()) <= 1.0
    assert elapsed < 30.0


# -------------------------------------------------------------------------------------------------- bake


def test_texels_hold_color_fn_at_their_world_point(unwrapped):
    """Texel (row, col) has centre uv ((col + .5) / S, 1 - (row + .5) / S); inside a face, the world point
    there is the face's barycentric combination, and the texel must hold color_fn of exactly that point."""
    (_, _), (v2, f2, uv, _) = unwrapped
    size = 256
    tex = bake_texture(v2, f2, uv, wavy_color, texture_size=size, gutter=4)
    assert tex.shape == (size, size, 3) and tex.dtype == torch.float32
    tri_uv = uv[f2].double()  # [F, 3, 2]
    centroid = tri_uv.mean(dim=1)  # [F, 2]
    col = (centroid[:, 0] * size).floor().long()
    row = ((1 - centroid[:, 1]) * size).floor().long()
    centre = torch.stack([(col + 0.5) / size, 1 - (row + 0.5) / size], -1)  # [F, 2] texel centre uv
    # barycentrics of the texel centre in each face
    a, b, c = tri_uv[:, 0], tri_uv[:, 1], tri_uv[:, 2]
    m = torch.stack([b - a, c - a], -1)  # [F, 2, 2]
    ok = torch.linalg.det(m).abs() > 1e-14
    l12 = torch.linalg.solve(m[ok], (centre - a)[ok])  # [F', 2]
    bary = torch.cat([1 - l12.sum(-1, keepdim=True), l12], -1)  # [F', 3]
    inside = (bary > 1e-6).all(-1)
    faces_in = ok.nonzero()[:, 0][inside]
    assert faces_in.numel() > 0.5 * f2.shape[0]  # most faces span several texels at 256²
    world = (bary[inside, :, None] * v2[f2[faces_in]].double()).sum(1).float()  # [Q, 3]
    expected = wavy_color(world)
    got = tex[row[faces_in], col[faces_in]]
    assert float((got - expected).abs().max()) < 1e-4


def quad_in_uv(lo: float = 0.25, hi: float = 0.75):
    """A square (two triangles) at uv [lo, hi]^2 whose world points are (u, v, 0)."""
    uv = torch.tensor([[lo, lo], [hi, lo], [hi, hi], [lo, hi]])
    v = torch.cat([uv, torch.zeros(4, 1)], -1)
    f = torch.tensor([[0, 1, 2], [0, 2, 3]])
    return v, f, uv


def xy_color(p: torch.Tensor) -> torch.Tensor:
    return torch.stack([p[:, 0], p[:, 1], torch.full_like(p[:, 0], 0.25)], -1)


def test_gutter_copies_the_nearest_texel_then_mean():
    # S = 64: the square [0.25, 0.75]² covers the texel centres of columns (and rows) 16..47.
    v, f, uv = quad_in_uv()
    tex = bake_texture(v, f, uv, xy_color, texture_size=64, gutter=4)
    # inside: texel (row, col) has u = (col + .5) / 64, v = 1 - (row + .5) / 64
    assert torch.allclose(tex[30, 20], torch.tensor([20.5 / 64, 1 - 30.5 / 64, 0.25]))
    # left gutter, columns 12..15 (distance 4..1) copy column 16 of the same row; column 11 (5) is the mean
    for c in (12, 15):
        assert torch.equal(tex[30, c], tex[30, 16])
    mean = torch.tensor([0.5, 0.5, 0.25])  # the covered texels are symmetric about the square's centre
    assert torch.allclose(tex[30, 11], mean, atol=1e-6)
    # top-right corner: texel (12, 51) is sqrt(4² + 4²) = 5.7 > 4 texels from the chart; (14, 49) is 2.8
    assert torch.allclose(tex[12, 51], mean, atol=1e-6)
    assert torch.equal(tex[14, 49], tex[16, 47])
    # no gutter: every uncovered texel is the mean
    tex0 = bake_texture(v, f, uv, xy_color, texture_size=64, gutter=0)
    assert torch.allclose(tex0[30, 15], mean, atol=1e-6)
    assert torch.equal(tex0[16:48, 16:48], tex[16:48, 16:48])


def test_supersampling_averages_subsamples():
    # colour linear in the position: the mean over 2 x 2 subsamples equals the value at the texel centre
    v, f, uv = quad_in_uv()
    tex1 = bake_texture(v, f, uv, xy_color, texture_size=64, gutter=2)
    tex2 = bake_texture(v, f, uv, xy_color, texture_size=64, gutter=2, supersample=2)
    assert torch.allclose(tex1[17:47, 17:47], tex2[17:47, 17:47], atol=1e-6)
    with pytest.raises(ValueError, match="supersample"):
        bake_texture(v, f, uv, xy_color, texture_size=64, supersample=0)


def test_faces_thinner_than_a_texel_still_get_their_colour():
    # A big red triangle on the left and a blue sliver a tenth of a texel wide at u = 0.8 (S = 64):
    # no texel centre falls inside the sliver, yet its texel and that texel's gutter must be blue.
    size = 64
    col = 51  # sliver inside texel column 51, left of its centre: u in [51.1, 51.2] / 64
    u0, u1 = (col + 0.1) / size, (col + 0.2) / size
    uv = torch.tensor([[0.05, 0.05], [0.4, 0.05], [0.05, 0.9], [u0, 0.3], [u1, 0.3], [u0, 0.7]])
    v = torch.cat([uv, torch.zeros(6, 1)], -1)
    f = torch.tensor([[0, 1, 2], [3, 4, 5]])

    def color(p):  # red left of u = 0.5, blue right of it
        blue = (p[:, :1] > 0.5).float()
        return torch.cat([1 - blue, torch.zeros_like(blue), blue], -1)

    from refine.rasterizer import rasterize

    pos = torch.cat([uv * 2 - 1, torch.zeros(6, 1), torch.ones(6, 1)], -1)[None]
    ids = rasterize(pos, f, size)[0, ..., 3]
    assert not bool((ids == 2).any())  # the sliver really covers no texel centre
    tex = bake_texture(v, f, uv, color, texture_size=size, gutter=3)
    centroid_uv = uv[3:].mean(0)
    row = int((1 - centroid_uv[1]) * size)
    blue = torch.tensor([0.0, 0.0, 1.0])
    assert torch.equal(tex[row, col], blue)
    assert torch.equal(tex[row, col + 3], blue) and torch.equal(tex[row - 2, col - 2], blue)  # its gutter
    assert torch.equal(tex[row, 10], torch.tensor([1.0, 0.0, 0.0]))


def split_edge_near_its_end(v: torch.Tensor, f: torch.Tensor, eps: float) -> tuple[torch.Tensor, ...]:
    """Split face 0's first edge (a, b) at `eps` from a: its two faces become a sliver and a near copy."""
    a, b = int(f[0, 0]), int(f[0, 1])
    p = v.shape[0]
    v = torch.cat([v, (v[a] + eps * (v[b] - v[a]) / (v[b] - v[a]).norm())[None]])
    faces = []
    for tri in f.tolist():
        for i in range(3):
            x, y, z = tri[i], tri[(i + 1) % 3], tri[(i + 2) % 3]
            if {x, y} == {a, b}:
                faces += [[x, p, z], [p, y, z]]
                break
        else:
            faces.append(tri)
    return v, torch.tensor(faces)


def test_faces_too_small_to_chart_sit_at_a_point_of_a_neighbouring_chart():
    """xatlas leaves faces under its area epsilon (marching-tets slivers) out of its charts, at UV (0, 0);
    unwrap_uv puts each at the charted UV of one of its corners, so it shows the colour next to it."""
    import numpy as np
    import xatlas

    from refine.rasterizer import texture

    v, f = split_edge_near_its_end(*icosphere(3), eps=1e-7)  # two slivers of ~5e-9 area
    raw = xatlas.Atlas()
    raw.add_mesh(v.numpy(), f.numpy().astype(np.uint32))
    raw.generate()
    _, raw_faces, raw_uv = raw.get_mesh(0)
    slivers = torch.from_numpy(np.nonzero((raw_uv[raw_faces] == 0).all(axis=(1, 2)))[0])
    assert len(slivers) > 0, "xatlas charted the slivers: the test needs a smaller eps"

    v2, f2, uv, vmap = unwrap_uv(v, f, texture_size=256, padding=4)
    assert torch.equal(vmap[f2], f) and torch.equal(v2, v[vmap])  # the contract holds
    assert not bool((uv[f2] == 0).all(-1).all(-1).any())  # no face left at (0, 0)
    assert torch.equal(torch.unique(f2), torch.arange(v2.shape[0]))  # every vertex used
    for face in slivers.tolist():
        corners = uv[f2[face]]  # [3, 2]
        assert torch.equal(corners, corners[:1].expand(3, 2))  # a point: nothing for the bake to draw
        twins = (vmap[:, None] == f[face][None]).any(-1)  # copies of its corners' input vertices
        twins[f2[face]] = False
        assert float((uv[twins] - corners[0]).norm(dim=-1).min()) < 1e-6  # a corner's charted UV
    tex = bake_texture(v2, f2, uv, wavy_color, texture_size=256, gutter=4)
    shown = texture(tex, uv[f2[slivers, 0]][None, None])[0, 0]  # [Z, 3]
    expected = wavy_color(v[f[slivers]].mean(dim=1))
    assert float((shown - expected).abs().max()) < 0.05


def test_uv_orientation_row_zero_is_top():
    # OBJ convention: v = 1 is the top row of the texture.
    v, f, uv = quad_in_uv(0.0, 1.0)
    tex = bake_texture(v, f, uv, xy_color, texture_size=64, gutter=0)
    assert float(tex[0, 0, 1]) > 0.98 and float(tex[-1, 0, 1]) < 0.02  # green = world y = v
    assert float(tex[0, 0, 0]) < 0.02 and float(tex[0, -1, 0]) > 0.98  # red = world x = u


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bake_on_cuda_matches_cpu(unwrapped):
    (_, _), (v2, f2, uv, _) = unwrapped
    cpu = bake_texture(v2, f2, uv, wavy_color, texture_size=256, gutter=4)
    gpu = bake_texture(v2.cuda(), f2.cuda(), uv.cuda(), wavy_color, texture_size=256, gutter=4)
    assert gpu.device.type == "cuda"
    # the two z-buffer paths may disagree on texels exactly on an edge; everything else is equal
    differs = ((gpu.cpu() - cpu).abs().amax(-1) > 1e-4).float().mean()
    assert float(differs) < 0.005


def test_large_meshes_unwrap_with_bounded_charts_without_overlap():
    """Above LARGE_MESH_FACES the charts' boundary is bounded (speed): the atlas still has no overlap
    (covered texels = total UV area) and a usable share of the square."""
    from refine import bake
    from refine.rasterizer import rasterize

    v, f = icosphere(5)  # 20,480 faces
    assert f.shape[0] > bake.LARGE_MESH_FACES
    _, f2, uv, _ = unwrap_uv(v, f, texture_size=512)
    tri = uv[f2].double()  # [F, 3, 2]
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    area = float(0.5 * ((b - a)[:, 0] * (c - a)[:, 1] - (b - a)[:, 1] * (c - a)[:, 0]).abs().sum())
    pos = torch.cat([uv * 2 - 1, torch.zeros_like(uv[:, :1]), torch.ones_like(uv[:, :1])], -1)[None]
    covered = float((rasterize(pos, f2, 1024)[0, ..., 3] > 0).double().mean())
    assert abs(covered - area) < 0.01 and area > 0.4, (covered, area)


def test_a_shaded_colour_is_baked_with_the_given_normals(unwrapped):
    """With per-vertex normals, color_fn(points, normals) is baked at the normals interpolated and
    normalised: on a sphere given inward normals, a colour of the normal bakes as minus the radial one."""
    (_, _), (v2, f2, uv, _) = unwrapped
    inward = -torch.nn.functional.normalize(v2, dim=-1)  # [N, 3]
    by_normal = bake_texture(
        v2, f2, uv, lambda p, n: 0.5 + 0.5 * n, texture_size=128, gutter=0, normals=inward
    )
    by_point = bake_texture(
        v2, f2, uv, lambda p: 0.5 - 0.5 * torch.nn.functional.normalize(p, dim=-1), texture_size=128, gutter=0
    )
    assert (by_normal - by_point).abs().max().item() < 1e-4  # same direction: position and normal are linear
    with pytest.raises(ValueError, match="normals"):
        bake_texture(v2, f2, uv, lambda p, n: n, texture_size=64, normals=inward[:-1])
