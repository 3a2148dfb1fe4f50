"""`render_mesh`: a whole mesh render in a few lines of the four rasterizer ops.

Shading is soft Lambertian under lights fixed in the WORLD (not the camera), so that a surface point has the
same colour from every view: an untextured object still shows its shape, and a texture's colours do not
change with the view. `shading="unlit"` returns the albedo alone (what the reconstruction stages fit when
lighting is baked into the texture).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .camera import Cameras, transform_points
from .mesh import Mesh
from .rasterizer import antialias as antialias_op
from .rasterizer import interpolate, rasterize, seam_topology, texture, weld_seams

__all__ = ["RenderOutput", "render_mesh", "DEFAULT_LIGHTS", "depth_image", "lambert"]

# (direction towards the light in the world, intensity); plus the ambient term below. A key light from
# above-front-left, a weaker fill from the opposite side and a little from below, so that no side goes black.
DEFAULT_LIGHTS: tuple[tuple[tuple[float, float, float], float], ...] = (
    ((0.45, -0.55, 0.70), 0.55),
    ((-0.60, 0.50, 0.35), 0.25),
    ((0.00, 0.30, -1.00), 0.10),
)
DEFAULT_AMBIENT = 0.35


@dataclass
class RenderOutput:
    image: Tensor  # [V, H, W, 3] colour composited over the background, in [0, 1]
    alpha: Tensor  # [V, H, W, 1] coverage, antialiased at silhouettes when asked
    mask: Tensor  # [V, H, W, 1] hard coverage, 0 or 1
    depth: Tensor  # [V, H, W, 1] distance along the camera's viewing axis; 0 where empty
    normals: Tensor  # [V, H, W, 3] world-space unit normals facing the camera; 0 where empty
    albedo: Tensor  # [V, H, W, 3] unshaded colour; 0 where empty
    rast: Tensor  # [V, H, W, 4] raw rasterizer output (u, v, z/w, triangle id + 1)
    background: Tensor  # [3] the colour composited behind the object

    @property
    def rgba(self) -> Tensor:
        """[V, H, W, 4] straight (non-premultiplied) RGBA, as written to PNG frames."""
        a = self.alpha
        premult = self.image - (1.0 - a) * self.background
        rgb = torch.where(a > 1e-6, premult / a.clamp(min=1e-6), torch.zeros_like(premult))
        return torch.cat([rgb.clamp(0.0, 1.0), a], dim=-1)


def depth_image(
    vertices: Tensor,  # [N, 3] world positions of the rasterized mesh
    faces: Tensor,  # [F, 3] the triangles given to rasterize
    cameras: Cameras,  # V cameras
    rast: Tensor,  # [V, H, W, 4] from rasterize
) -> Tensor:
    """[V, H, W, 1] distance along each camera's viewing axis (camera-space -z, interpolated
    perspective-correctly through the barycentrics), 0 where empty."""
    view_z = -transform_points(vertices, cameras.world_to_camera())[..., 2:3]  # [V, N, 1]
    return interpolate(view_z, rast, faces)


def lambert(normals: Tensor, lights=DEFAULT_LIGHTS, ambient: float = DEFAULT_AMBIENT) -> Tensor:
    """Soft Lambertian shading factor for world normals [..., 3] -> [..., 1], in [ambient, 1]."""
    shade = torch.full_like(normals[..., :1], ambient)
    for direction, intensity in lights:
        d = torch.nn.functional.normalize(normals.new_tensor(direction), dim=0)
        shade = shade + intensity * (normals @ d).clamp(min=0.0)[..., None]
    return shade.clamp(max=1.0)


def render_mesh(
    mesh: Mesh,
    cameras: Cameras,
    resolution: int | tuple[int, int],  # H, W
    shading: str = "lambert",  # "lambert" or "unlit"
    antialias: bool = True,
    background: tuple[float, float, float] | float = 1.0,  # white, as SV3D's frames
    lights=DEFAULT_LIGHTS,
    ambient: float = DEFAULT_AMBIENT,
    topology: Tensor | None = None,  # [F, 3] seam_topology(faces, weld_seams(...)), reused across calls
) -> RenderOutput:
    """Render `mesh` from every camera. Differentiable w.r.t. vertices, colours and texture."""
    if shading not in ("lambert", "unlit"):
        raise ValueError(f"shading must be 'lambert' or 'unlit', got {shading!r}")
    device = mesh.vertices.device
    cameras = cameras.to(device)
    faces = mesh.faces.long()
    pos_clip = transform_points(mesh.vertices, cameras.world_to_clip())  # [V, N, 4]
    rast = rasterize(pos_clip, faces, resolution)  # [V, H, W, 4]
    mask = (rast[..., 3:] > 0).to(mesh.vertices.dtype)  # [V, H, W, 1]

    # Albedo: texture > vertex colours > uniform colour.
    if mesh.texture is not None:
        uv = interpolate(mesh.uvs, rast, faces)  # [V, H, W, 2]
        albedo = texture(mesh.texture, uv) * mask
    elif mesh.vertex_colors is not None:
        albedo = interpolate(mesh.vertex_colors, rast, faces)
    else:
        albedo = mask * mask.new_tensor(mesh.color)

    # World normals turned towards the camera (two-sided: thin sheets and open shells shade on both sides).
    normals = torch.nn.functional.normalize(interpolate(mesh.normals(), rast, faces), dim=-1)
    points = interpolate(mesh.vertices, rast, faces)  # [V, H, W, 3]
    to_camera = cameras.positions()[:, None, None, :] - points
    flip = ((normals * to_camera).sum(-1, keepdim=True) < 0).to(normals.dtype)
    normals = normals * (1.0 - 2.0 * flip) * mask

    color = albedo * lambert(normals, lights, ambient) if shading == "lambert" else albedo
    rgba = torch.cat([color * mask, mask], dim=-1)  # premultiplied
    if antialias:  # silhouettes of the surface, not of its UV charts (`weld_seams`)
        seamless = weld_seams(mesh.vertices, faces)  # [F, 3]
        topology = seam_topology(faces, seamless) if topology is None else topology
        rgba = antialias_op(rgba, rast, pos_clip, seamless, topology)
    alpha = rgba[..., 3:].clamp(0.0, 1.0)
    bg = torch.as_tensor(background, dtype=rgba.dtype, device=device).expand(3)
    image = rgba[..., :3] + (1.0 - alpha) * bg

    depth = depth_image(mesh.vertices, faces, cameras, rast)
    return RenderOutput(
        image=image,
        alpha=alpha,
        mask=mask,
        depth=depth,
        normals=normals,
        albedo=albedo,
        rast=rast,
        background=bg,
    )
