"""Rasterizer benchmark: ours (forward, forward + backward) against embree ray casting of the same pixels.

    python scripts/bench_raster.py [--views 21] [--resolution 256] [--subdivisions 6] [--repeats 5]

An ~80k-triangle non-convex mesh (icosphere level 6, 81,920 faces, with bumps) is rendered from SV3D's
21-view orbit. After a warm-up, the median of `--repeats` runs is printed for: our z-buffer pass alone,
our forward pass (rasterize + interpolate normals + antialias), forward + backward through interpolate
and antialias to the vertex positions, and embree (trimesh + embreex) casting one ray per pixel centre.
The last line is `ratio embree/ours: X` for the forward pass: X > 1 means ours is faster. On CUDA it
also reports views per second at 576^2 for ~100k triangles. Timings are ratios within one run, since
the machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch
import trimesh

from refine import Cameras, edge_topology, interpolate, rasterize
from refine import antialias as antialias_op
from refine.camera import transform_points
from sv3d.cameras import FOV_DEG, static_orbit


def bumpy_sphere(subdivisions: int) -> trimesh.Trimesh:
    m = trimesh.creation.icosphere(subdivisions=subdivisions)
    v = m.vertices
    r = 0.5 * (1.0 + 0.15 * np.sin(6 * v[:, 0]) * np.sin(5 * v[:, 1]) * np.sin(4 * v[:, 2])) / 1.15
    return trimesh.Trimesh(v * r[:, None], m.faces, process=False)


def median_time(fn, repeats: int, sync=lambda: None) -> float:
    fn()  # warm-up (compiles numba on the first call of the process)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours(
    verts: torch.Tensor, faces: torch.Tensor, cams: Cameras, res: int, topo: torch.Tensor, backward: bool
):
    v = verts.detach().requires_grad_(backward)
    pos = transform_points(v, cams.world_to_clip())  # [V, N, 4]
    rast = rasterize(pos, faces, res)
    normals = interpolate(v, rast, faces)  # a placeholder attribute: positions as colours
    mask = (rast[..., 3:] > 0).to(normals.dtype)
    image = antialias_op(torch.cat([normals * mask, mask], -1), rast, pos, faces, topo)
    if backward:
        image.sum().backward()
    return image


def embree_rays(mesh: trimesh.Trimesh, cams: Cameras, res: int):
    tan_half = math.tan(math.radians(FOV_DEG) / 2)
    centres = (np.arange(res) + 0.5) / res * 2 - 1
    xs, ys = np.meshgrid(centres, -centres)
    dirs_cam = np.stack([xs * tan_half, ys * tan_half, -np.ones_like(xs)], -1).reshape(-1, 3)
    c2w = cams.c2w.double().numpy()
    dirs = np.concatenate([dirs_cam @ m[:3, :3].T for m in c2w])
    origins = np.repeat(c2w[:, :3, 3], res * res, axis=0)
    return origins, dirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--views", type=int, default=21)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--subdivisions", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    mesh = bumpy_sphere(args.subdivisions)
    verts = torch.tensor(mesh.vertices, dtype=torch.float32)
    faces = torch.tensor(mesh.faces)
    cams = static_orbit(num_frames=args.views).cameras()
    topo = edge_topology(faces)
    res = args.resolution
    print(
        f"mesh: {len(mesh.faces)} triangles; {args.views} views at {res}x{res}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )

    t_raster = median_time(
        lambda: rasterize(transform_points(verts, cams.world_to_clip()), faces, res), args.repeats
    )
    t_fwd = median_time(lambda: ours(verts, faces, cams, res, topo, False), args.repeats)
    t_bwd = median_time(lambda: ours(verts, faces, cams, res, topo, True), args.repeats)
    print(f"ours rasterize only:            {t_raster * 1e3:8.1f} ms")
    print(f"ours forward (+interp, +aa):    {t_fwd * 1e3:8.1f} ms")
    print(f"ours forward + backward:        {t_bwd * 1e3:8.1f} ms")

    t_embree = float("nan")
    try:
        from trimesh.ray.ray_pyembree import RayMeshIntersector

        caster = RayMeshIntersector(mesh)
        origins, dirs = embree_rays(mesh, cams, res)
        t_embree = median_time(lambda: caster.intersects_first(origins, dirs), args.repeats)
        print(f"embree ray casting ({len(dirs)} rays): {t_embree * 1e3:8.1f} ms")
    except ImportError:
        print("embree: embreex not installed (pip install embreex); no reference timing")

    if torch.cuda.is_available():
        big = bumpy_sphere(7)  # 327,680 faces; take ~100k of them for the CUDA figure
        keep = big.faces[::3][:100_000]
        v_cuda = torch.tensor(big.vertices, dtype=torch.float32, device="cuda")
        f_cuda = torch.tensor(keep, device="cuda")
        cams_cuda = cams.to("cuda")
        topo_cuda = edge_topology(f_cuda)
        sync = torch.cuda.synchronize
        t_cuda = median_time(
            lambda: ours(v_cuda, f_cuda, cams_cuda, 576, topo_cuda, False), args.repeats, sync
        )
        t_cuda_b = median_time(
            lambda: ours(v_cuda, f_cuda, cams_cuda, 576, topo_cuda, True), args.repeats, sync
        )
        print(
            f"cuda ({torch.cuda.get_device_name()}), {len(keep)} triangles, {args.views} views at 576^2: "
            f"forward {t_cuda * 1e3:.1f} ms = {args.views / t_cuda:.0f} views/s; "
            f"forward + backward {t_cuda_b * 1e3:.1f} ms = {args.views / t_cuda_b:.0f} views/s"
        )
    print(f"ratio embree/ours: {t_embree / t_fwd:.2f}")


if __name__ == "__main__":
    main()
