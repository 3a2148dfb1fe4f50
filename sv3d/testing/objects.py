"""The fixed, generated test objects that every stage is measured on, written in the GSO layout.

Each object stresses one thing a reconstruction can get wrong:

| name | shape | colour | stresses |
| --- | --- | --- | --- |
| `bowl` | hemispherical shell, 5 mm wall, rounded lip | texture | a concavity seen from above only |
| `mug` | hollow cylinder + torus-section handle, one genus-1 surface | texture | a hole, thin walls |
| `plate` | flat disc, thickness 2.3% of its diameter, rounded edge | plain `Kd` | thin structures |
| `checker` | sphere with a 32 x 16 cycle checker texture (1024²) | texture | high-frequency texture |
| `blob` | smooth bumpy (radially displaced) sphere | plain `Kd` | shape visible only by shading |
| `internal` | closed box holding a closed inner box and a closed inner wall | 3 `Kd` | internal faces |

Sizes are in metres, resting on z = 0, like GSO scans; `sv3d.meshio.load_mesh` places them in the world.
Every surface is closed once vertices at equal positions are merged (the .obj writes each position once;
UV seams and creases split only `vt`/`vn`), consistently wound with outward normals. No boolean engine is
used: surfaces of revolution are built on a (profile row x angle) grid, and the mug's handle is a tube whose
end rings are the boundaries of two holes cut out of that grid, so the mug is one genus-1 surface.

Layout written: `<root>/<name>/meshes/model.obj`, `meshes/model.mtl` (`map_Kd
../materials/textures/texture.png` where textured) and `materials/textures/texture.png`. Writing is
deterministic (byte-identical on every run) and leaves identical existing files untouched.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import trimesh
from PIL import Image

from sv3d.errors import InputError
from sv3d.meshio import smooth_vertex_normals

Color = tuple[float, float, float]

TEST_OBJECTS: tuple[str, ...] = ("bowl", "mug", "plate", "checker", "blob", "internal")
TEXTURE_RELPATH = "../materials/textures/texture.png"  # as map_Kd writes it, relative to meshes/
# outer shell (sand), inner box (red), inner wall (blue): multiples of 1/255, exact in 8-bit colours
INTERNAL_COLORS: tuple[Color, ...] = tuple(
    (r / 255, g / 255, b / 255) for r, g, b in ((200, 184, 153), (217, 31, 26), (31, 64, 217))
)


# --------------------------------------------------------------------------------------- construction


def _polyline(*segments: np.ndarray) -> np.ndarray:
    """Join profile segments [k, 2] that each end where the next begins: [P, 2] without repeats."""
    return np.concatenate([s[:-1] for s in segments[:-1]] + [segments[-1]], axis=0)


def _line(p0: tuple[float, float], p1: tuple[float, float], n: int) -> np.ndarray:
    """n + 1 points [n + 1, 2] from p0 to p1."""
    t = np.linspace(0.0, 1.0, n + 1)[:, None]  # [n + 1, 1]
    return (1 - t) * np.asarray(p0) + t * np.asarray(p1)


def _arc(center: tuple[float, float], radius: float, start_deg: float, end_deg: float, n: int) -> np.ndarray:
    """n + 1 points [n + 1, 2] on a circle in the (r, z) plane, angles from +r towards +z."""
    a = np.deg2rad(np.linspace(start_deg, end_deg, n + 1))  # [n + 1]
    return np.asarray(center) + radius * np.stack([np.cos(a), np.sin(a)], axis=-1)


def _profile_v(profile: np.ndarray, v_range: tuple[float, float]) -> np.ndarray:
    """[P] texture v of each profile row: arc length along the profile [P, 2], mapped to v_range."""
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(profile, axis=0), axis=-1))])  # [P]
    return v_range[0] + (v_range[1] - v_range[0]) * arc / arc[-1]


def _revolve(profile: np.ndarray, sections: int, v_range: tuple[float, float] = (0.0, 1.0)):
    """Surface of revolution about z on a (profile row x angle) grid.

    profile [P, 2]: (r, z) points; the solid lies to the right of the walking direction seen with r to the
    right and z up (walk from the bottom pole outwards, up the outside, down the inside), which makes
    the winding outward. Rows with r = 0 are poles: their degenerate triangles are dropped.
    Returns vertices [P, S + 1, 3], faces [F, 3] into the flattened grid, uvs [P, S + 1, 2] (u = angle / 2π,
    v = arc length along the profile mapped to v_range) and quad [F, 2] (row, column of each face's quad).
    Column S repeats column 0 exactly (same positions, u = 1), the UV seam.
    """
    n_rows, s = len(profile), sections
    profile = np.where(np.abs(profile[:, :1]) < 1e-12, [0.0, 1.0], [1.0, 1.0]) * profile  # poles exactly on z
    theta = 2 * np.pi * np.arange(s + 1) / s  # [S + 1]
    cos, sin = np.cos(theta), np.sin(theta)
    cos[-1], sin[-1] = cos[0], sin[0]  # the seam column coincides exactly with column 0
    r, z = profile[:, 0:1], profile[:, 1:2]  # [P, 1]
    vertices = np.stack([r * cos, r * sin, np.broadcast_to(z, (n_rows, s + 1))], axis=-1)  # [P, S + 1, 3]

    v = _profile_v(profile, v_range)  # [P]
    u = np.arange(s + 1) / s  # [S + 1]
    uvs = np.stack(np.broadcast_arrays(u[None, :], v[:, None]), axis=-1)  # [P, S + 1, 2]

    idx = np.arange(n_rows * (s + 1)).reshape(n_rows, s + 1)
    a, b, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, 1:], idx[1:, :-1]  # [P - 1, S] quad corners
    rows, cols = np.meshgrid(np.arange(n_rows - 1), np.arange(s), indexing="ij")  # [P - 1, S]
    faces = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)])
    quad = np.tile(np.stack([rows, cols], axis=-1).reshape(-1, 2), (2, 1))  # [F, 2]
    # drop the triangles that collapse at a pole (two corners on the axis)
    on_axis = (profile[:, 0] == 0)[np.arange(n_rows * (s + 1)) // (s + 1)]  # [P * (S + 1)]
    keep = on_axis[faces].sum(axis=-1) < 2
    return vertices, faces[keep], uvs, quad[keep]


def _bowl() -> tuple[np.ndarray, np.ndarray, np.ndarray, Image.Image]:
    radius, wall = 0.08, 0.005
    profile = _polyline(
        _arc((0.0, 0.0), radius, -90.0, 0.0, 24),  # outside, from the bottom pole up to the rim
        _arc((radius - wall / 2, 0.0), wall / 2, 0.0, 180.0, 8),  # rounded lip
        _arc((0.0, 0.0), radius - wall, 0.0, -90.0, 24),  # inside, down to the inner pole
    )
    profile[:, 1] += radius  # rest on z = 0
    vertices, faces, uvs, _ = _revolve(profile, sections=96)
    v_lip = _profile_v(profile, (0.0, 1.0))[24 + 4]  # the top of the lip (24 outer rows, then 8 lip rows)

    # texture: blue glaze outside with a band of 24 light stripes under the rim, cream inside
    size = 512
    u, v = _texel_grid(size)
    outside = v < v_lip - 0.01
    band = outside & (v > v_lip - 0.12)
    stripes = band & (np.floor(u * 48) % 2 == 0)
    image = np.where(outside[..., None], np.array([0.16, 0.32, 0.62]), np.array([0.93, 0.88, 0.76]))
    image = np.where(band[..., None], np.array([0.10, 0.18, 0.40]), image)
    image = np.where(stripes[..., None], np.array([0.95, 0.92, 0.80]), image)
    return vertices.reshape(-1, 3), faces, uvs.reshape(-1, 2), _to_image(image)


def _mug() -> tuple[np.ndarray, np.ndarray, np.ndarray, Image.Image]:
    radius, wall, floor, fillet = 0.04, 0.004, 0.006, 0.005
    dz, n_wall = 0.003, 30  # outer wall rows every 3 mm from z = fillet to the lip: height 0.095
    height = fillet + n_wall * dz
    sections = 80  # 3.14 mm between columns on the outer wall, about dz: square holes for the handle
    profile = _polyline(
        _line((0.0, 0.0), (radius - fillet, 0.0), 8),  # bottom, from the pole outwards
        _arc((radius - fillet, fillet), fillet, -90.0, 0.0, 4),
        _line((radius, fillet), (radius, height), n_wall),  # outer wall: rows first_wall .. first_wall + 30
        _arc((radius - wall / 2, height), wall / 2, 0.0, 180.0, 6),  # rounded lip
        _line((radius - wall, height), (radius - wall, floor + fillet), 20),  # inner wall, downwards
        _arc((radius - wall - fillet, floor + fillet), fillet, 0.0, -90.0, 4),
        _line((radius - wall - fillet, floor), (0.0, floor), 8),  # inner floor, to the inner pole
    )
    first_wall = 12  # profile row of z = fillet on the outer wall (8 bottom + 4 fillet points before it)
    vertices, faces, uvs, quad = _revolve(profile, sections, v_range=(0.1, 1.0))

    # 1. Cut two 4 x 4-quad holes in the outer wall at azimuth 180 degrees (column 40), centred on rows
    #    first_wall + 7 (z = 0.026) and first_wall + 23 (z = 0.074)
    half = 2  # quads either side of the hole centre
    center_col = sections // 2
    low_row, high_row = first_wall + 7, first_wall + 23
    in_hole = np.zeros(len(faces), dtype=bool)
    for row in (low_row, high_row):  # two holes
        in_hole |= (np.abs(quad[:, 0] + 0.5 - row) < half) & (np.abs(quad[:, 1] + 0.5 - center_col) < half)
    faces = faces[~in_hole]

    # 2. The handle: a tube along a half circle in the xz-plane from one hole to the other. Its cross
    #    sections sample a circle at the angles of the hole-boundary nodes, so its end rings are the holes.
    tube_radius = half * 2 * np.pi * radius / sections  # 6.3 mm: half the hole's width
    z_low, z_high = profile[low_row, 1], profile[high_row, 1]
    bend, z_mid = (z_high - z_low) / 2, (z_high + z_low) / 2
    grid = vertices  # [P, S + 1, 3]
    offsets = np.arange(-half, half + 1)
    ring_rows, ring_cols = np.meshgrid(offsets, offsets, indexing="ij")  # [5, 5] around the hole centre
    on_border = (np.abs(ring_rows) == half) | (np.abs(ring_cols) == half)
    ring_rows, ring_cols = ring_rows[on_border], ring_cols[on_border]  # [16] boundary nodes
    # cross-section frame at the low end (phi = 0): e1 = +y, e2 = +z; at the high end e2 = -z
    low_nodes = grid[low_row + ring_rows, center_col + ring_cols]  # [16, 3]
    psi = np.arctan2(low_nodes[:, 2] - z_low, low_nodes[:, 1])  # [16] angle of each node around the hole
    order = np.argsort(psi, kind="stable")
    psi = psi[order]
    low_ring = low_nodes[order]  # [16, 3] sorted by angle
    # the high hole seen in its own frame (e2 = -z): row offset -k has the angle row offset +k has below
    high_ring = grid[high_row - ring_rows[order], center_col + ring_cols[order]]  # [16, 3]

    n_segments = 24
    phi = np.linspace(0.0, np.pi, n_segments + 1)[1:-1, None]  # [L - 1, 1] inner rings
    path = np.stack([-radius - bend * np.sin(phi), 0 * phi, z_mid - bend * np.cos(phi)], axis=-1)  # [L-1,1,3]
    e1 = np.array([0.0, 1.0, 0.0])
    e2 = np.stack([np.sin(phi), 0 * phi, np.cos(phi)], axis=-1)  # [L - 1, 1, 3] towards the bend's centre
    cross = tube_radius * (np.cos(psi)[None, :, None] * e1 + np.sin(psi)[None, :, None] * e2)  # [L-1, 16, 3]
    rings = np.concatenate([low_ring[None], path + cross, high_ring[None]], axis=0)  # [L + 1, 16, 3]

    n_ring = rings.shape[1]
    ridx = len(vertices.reshape(-1, 3)) + np.arange(rings.shape[0] * n_ring).reshape(-1, n_ring)
    a, b = ridx[:-1], np.roll(ridx[:-1], -1, axis=1)  # ring l: node n and n + 1
    c, d = np.roll(ridx[1:], -1, axis=1), ridx[1:]  # ring l + 1: node n + 1 and n
    # psi turns from e1 to e2 and e1 x e2 points against the path: this order winds outwards
    tube_faces = np.concatenate(
        [np.stack([a, c, b], -1).reshape(-1, 3), np.stack([a, d, c], -1).reshape(-1, 3)]
    )

    handle_uv = np.tile([0.5, 0.04], (rings.shape[0] * n_ring, 1))  # the handle's solid band of the texture
    vertices = np.concatenate([vertices.reshape(-1, 3), rings.reshape(-1, 3)])
    faces = np.concatenate([faces, tube_faces])
    uvs = np.concatenate([uvs.reshape(-1, 2), handle_uv])

    # texture: a red handle band (v < 0.08), white outside with 12 red stripes in a band, light grey inside
    size = 512
    u, v = _texel_grid(size)
    v_rows = _profile_v(profile, (0.1, 1.0))  # [P] as in _revolve
    outside = v < v_rows[first_wall + n_wall + 3]  # up to the middle of the lip
    band = (v > v_rows[first_wall + 12]) & (v < v_rows[first_wall + 20])
    stripes = band & (np.floor(u * 24) % 2 == 0)
    image = np.where(outside[..., None], np.array([0.95, 0.95, 0.93]), np.array([0.80, 0.80, 0.78]))
    image = np.where(stripes[..., None], np.array([0.75, 0.12, 0.10]), image)
    image = np.where((v < 0.08)[..., None], np.array([0.65, 0.10, 0.08]), image)
    return vertices, faces, uvs, _to_image(image)


def _plate() -> tuple[np.ndarray, np.ndarray]:
    radius, half_thickness = 0.13, 0.003  # thickness 6 mm = 2.3% of the 26 cm diameter
    edge = radius - half_thickness
    profile = _polyline(
        _line((0.0, 0.0), (edge, 0.0), 12),  # underside, from the pole outwards
        _arc((edge, half_thickness), half_thickness, -90.0, 90.0, 8),  # rounded rim
        _line((edge, 2 * half_thickness), (0.0, 2 * half_thickness), 12),  # top, back to the pole
    )
    vertices, faces, _, _ = _revolve(profile, sections=128)
    return vertices.reshape(-1, 3), faces


def _checker() -> tuple[np.ndarray, np.ndarray, np.ndarray, Image.Image]:
    radius = 0.05
    profile = _arc((0.0, radius), radius, -90.0, 90.0, 48)  # pole to pole
    vertices, faces, uvs, _ = _revolve(profile, sections=96)
    # 32 cycles around (u) and 16 from pole to pole (v): squares of 5.6 degrees on the equator
    size = 1024
    u, v = _texel_grid(size)
    dark = (np.floor(u * 64) + np.floor(v * 32)) % 2 == 0
    image = np.where(dark[..., None], np.array([0.08, 0.08, 0.10]), np.array([0.95, 0.90, 0.20]))
    return vertices.reshape(-1, 3), faces, uvs.reshape(-1, 2), _to_image(image)


def _blob() -> tuple[np.ndarray, np.ndarray]:
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=1.0)  # 5120 faces, outward winding
    n = np.asarray(sphere.vertices)  # [N, 3] unit directions
    x, y, z = n[:, 0], n[:, 1], n[:, 2]
    # smooth low-order bumps; r stays in [0.64, 1.38], so the displaced surface is star-shaped and never
    # intersects itself, yet has dents: its convex hull is 13% larger than it
    r = (
        1.0
        + 0.22 * np.sin(3 * x + 0.4) * np.cos(3 * y - 0.3)
        + 0.14 * np.sin(5 * z + 1.1)
        + 0.10 * np.cos(6 * x * y)
    )
    vertices = 0.06 * n * r[:, None]
    vertices[:, 2] -= vertices[:, 2].min()  # rest on z = 0
    return vertices, np.asarray(sphere.faces, dtype=np.int64)


def _box(center: tuple[float, float, float], size: tuple[float, float, float], n: int):
    """Closed box with sharp edges: each side an n x n grid of its own vertices ([V, 3], [F, 3], [V, 3])."""
    center_a, half = np.asarray(center), np.asarray(size) / 2
    t = np.linspace(-1.0, 1.0, n + 1)
    s1, s2 = (g.reshape(-1) for g in np.meshgrid(t, t, indexing="ij"))  # [(n + 1)^2]
    idx = np.arange((n + 1) ** 2).reshape(n + 1, n + 1)
    a, b, c, d = idx[:-1, :-1], idx[1:, :-1], idx[1:, 1:], idx[:-1, 1:]
    quad_faces = np.concatenate(
        [np.stack([a, b, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)]
    )
    eye = np.eye(3)
    vertices, faces, normals = [], [], []
    for axis in range(3):  # six sides
        for sign in (1.0, -1.0):
            normal = sign * eye[axis]
            t1, t2 = eye[(axis + 1) % 3], eye[(axis + 2) % 3]
            t2 = t2 * sign  # t1 x t2 = normal, so quad (a, b, c) winds outwards
            points = normal + s1[:, None] * t1 + s2[:, None] * t2  # [(n + 1)^2, 3] on the unit cube
            faces.append(quad_faces + sum(len(v) for v in vertices))
            vertices.append(center_a + half * points)
            normals.append(np.tile(normal, (len(points), 1)))
    return np.concatenate(vertices), np.concatenate(faces), np.concatenate(normals)


def _internal() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    parts = [  # (box, colour): outer shell, an inner box and an inner wall, disjoint and closed
        (_box((0.0, 0.0, 0.05), (0.1, 0.1, 0.1), 4), INTERNAL_COLORS[0]),
        (_box((-0.02, 0.0, 0.04), (0.03, 0.03, 0.03), 2), INTERNAL_COLORS[1]),
        (_box((0.025, 0.0, 0.05), (0.004, 0.08, 0.08), 2), INTERNAL_COLORS[2]),
    ]
    offsets = np.cumsum([0] + [len(v) for (v, _, _), _ in parts])
    vertices = np.concatenate([v for (v, _, _), _ in parts])
    faces = np.concatenate([f + o for ((_, f, _), _), o in zip(parts, offsets[:-1], strict=True)])
    normals = np.concatenate([nrm for (_, _, nrm), _ in parts])
    colors = np.concatenate([np.tile(color, (len(v), 1)) for (v, _, _), color in parts])  # [V, 3]
    return vertices, faces, normals, colors


def _texel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(u, v) [size, size] at texel centres; row 0 = top = v near 1 (OBJ convention)."""
    centers = (np.arange(size) + 0.5) / size
    return np.meshgrid(centers, 1.0 - centers, indexing="xy")


def _to_image(rgb: np.ndarray) -> Image.Image:
    return Image.fromarray(np.round(np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8), mode="RGB")


def make_test_object(name: str) -> tuple[trimesh.Trimesh, Image.Image | None, Color]:
    """Build one test object: (mesh in metres with normals and UVs or vertex colours, texture or None, Kd).

    Textured meshes carry `TextureVisuals` (UVs in OBJ convention); `internal` carries vertex colours (one
    per part); the plain ones carry no visual: their colour is the returned Kd.
    """
    if name not in TEST_OBJECTS:
        raise InputError(f"unknown test object '{name}' (expected one of {', '.join(TEST_OBJECTS)})")
    texture: Image.Image | None = None
    uvs: np.ndarray | None = None
    colors: np.ndarray | None = None
    color: Color = (1.0, 1.0, 1.0)
    if name == "bowl":
        vertices, faces, uvs, texture = _bowl()
    elif name == "mug":
        vertices, faces, uvs, texture = _mug()
    elif name == "checker":
        vertices, faces, uvs, texture = _checker()
    elif name == "plate":
        (vertices, faces), color = _plate(), (0.86, 0.83, 0.76)
    elif name == "blob":
        (vertices, faces), color = _blob(), (0.55, 0.62, 0.78)
    else:
        vertices, faces, normals, colors = _internal()
        color = INTERNAL_COLORS[0]
    if name != "internal":
        normals = smooth_vertex_normals(vertices, faces)  # across seams and poles: smooth surfaces

    faces = faces.astype(np.int64)
    if texture is not None:
        material = trimesh.visual.material.SimpleMaterial(image=texture, diffuse=(255, 255, 255, 255))
        visual = trimesh.visual.TextureVisuals(uv=uvs, material=material)
    elif colors is not None:
        visual = trimesh.visual.ColorVisuals(vertex_colors=np.round(colors * 255).astype(np.uint8))
    else:
        visual = None
    mesh = trimesh.Trimesh(
        vertices=vertices, faces=faces, vertex_normals=normals, visual=visual, process=False
    )
    return mesh, texture, color


# -------------------------------------------------------------------------------------------- writing


def _format(array: np.ndarray, fmt: str) -> str:
    buffer = io.StringIO()
    np.savetxt(buffer, array, fmt=fmt)
    return buffer.getvalue()


def _files_for(name: str) -> dict[str, bytes]:
    """Relative path -> bytes of one object's GSO files."""
    mesh, texture, color = make_test_object(name)
    vertices = np.round(np.asarray(mesh.vertices), 6)  # [N, 3] as written
    faces = np.asarray(mesh.faces)  # [F, 3]
    normals = np.asarray(mesh.vertex_normals)  # [N, 3]
    # each position once (closed surfaces stay closed in the file); vt/vn stay per original vertex
    positions, position_index = np.unique(vertices, axis=0, return_inverse=True)
    position_index = position_index.reshape(-1)
    textured = texture is not None

    # materials: one per distinct face colour (vertex colours), else one
    if isinstance(mesh.visual, trimesh.visual.ColorVisuals) and mesh.visual.kind == "vertex":
        face_colors = np.asarray(mesh.visual.vertex_colors[faces[:, 0], :3], dtype=np.float64) / 255
        kd, first, material_of_face = np.unique(face_colors, axis=0, return_index=True, return_inverse=True)
        rank = np.argsort(np.argsort(first))  # number materials in order of first use: the outer shell first
        kd, material_of_face = kd[np.argsort(first)], rank[material_of_face.reshape(-1)]
    else:
        kd, material_of_face = np.asarray([color]), np.zeros(len(faces), dtype=np.int64)

    lines = [
        f"# sv3d test object '{name}' (sv3d.testing.objects; generated, do not edit)\n",
        "mtllib model.mtl\n",
    ]
    lines.append(_format(positions, "v %.6f %.6f %.6f"))
    if textured:
        lines.append(_format(np.asarray(mesh.visual.uv), "vt %.6f %.6f"))
    lines.append(_format(normals, "vn %.6f %.6f %.6f"))
    corner_v = position_index[faces] + 1  # [F, 3] OBJ indices start at 1
    corner_n = faces + 1  # vt and vn are written per original vertex
    if textured:
        columns, fmt = [corner_v, corner_n, corner_n], "f %d/%d/%d %d/%d/%d %d/%d/%d"
    else:
        columns, fmt = [corner_v, corner_n], "f %d//%d %d//%d %d//%d"
    corners = np.stack(columns, axis=-1).reshape(len(faces), -1)  # [F, 6 or 9] interleaved per corner
    for k in range(len(kd)):  # a few materials, each with its block of faces
        lines.append(f"usemtl material_{k}\n")
        lines.append(_format(corners[material_of_face == k], fmt))

    mtl = [f"# sv3d test object '{name}'\n"]
    for k, rgb in enumerate(kd):
        mtl.append(f"newmtl material_{k}\nKa 0.000000 0.000000 0.000000\n")
        mtl.append(
            f"Kd {rgb[0]:.6f} {rgb[1]:.6f} {rgb[2]:.6f}\nKs 0.000000 0.000000 0.000000\nd 1.0\nillum 1\n"
        )
        if textured:
            mtl.append(f"map_Kd {TEXTURE_RELPATH}\n")

    files = {"meshes/model.obj": "".join(lines).encode(), "meshes/model.mtl": "".join(mtl).encode()}
    if textured:
        png = io.BytesIO()
        texture.save(png, format="PNG")
        files["materials/textures/texture.png"] = png.getvalue()
    return files


def _write_if_changed(path: Path, data: bytes) -> None:
    """Write atomically (temp file + rename), and not at all when the file already holds these bytes."""
    if path.is_file() and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_test_object(root: str | Path, name: str) -> Path:
    """Write one test object in GSO layout under root; returns `<root>/<name>`."""
    if name not in TEST_OBJECTS:
        raise InputError(f"unknown test object '{name}' (expected one of {', '.join(TEST_OBJECTS)})")
    directory = Path(root) / name
    for relative, data in _files_for(name).items():
        _write_if_changed(directory / relative, data)
    return directory


def write_test_objects(root: str | Path, names: Iterable[str] | None = None) -> dict[str, Path]:
    """Write the test objects (all of `TEST_OBJECTS` by default); returns name -> object directory."""
    names = TEST_OBJECTS if names is None else tuple(names)
    return {name: write_test_object(root, name) for name in names}
