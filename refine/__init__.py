"""Stage 3: DMTet refinement, and the differentiable rasterizer it renders through.

The rasterizer follows nvdiffrast's four composable ops (rasterize, interpolate, texture, antialias),
implemented in plain PyTorch so that it runs on CPU and CUDA with nothing to compile.
"""

from .camera import Cameras, transform_points
from .mesh import Mesh, face_normals, vertex_normals
from .rasterizer import antialias, edge_topology, interpolate, rasterize, seam_topology, texture, weld_seams
from .render import RenderOutput, lambert, render_mesh

__all__ = [
    "Cameras",
    "Mesh",
    "RenderOutput",
    "antialias",
    "edge_topology",
    "face_normals",
    "interpolate",
    "lambert",
    "rasterize",
    "render_mesh",
    "seam_topology",
    "texture",
    "transform_points",
    "vertex_normals",
    "weld_seams",
]
