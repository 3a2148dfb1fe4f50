"""sv3d: one photo of an object in, a textured 3D mesh out (SV3D orbit -> NeRF -> DMTet -> export).

This package is the product: the orbit and camera conventions (`sv3d.cameras`), mesh loading, test
objects, metrics, the stages' entry points and the `sv3d` command.
"""

__version__ = "0.1.0"

from .cameras import (  # noqa: E402
    Orbit,
    OrbitFrames,
    make_orbit,
    read_orbit_directory,
    sine_orbit,
    static_orbit,
    write_orbit_directory,
)
from .errors import InputError, MeshLoadError, OrbitDirectoryError, Sv3dError  # noqa: E402
from .meshio import load_mesh, load_trimesh  # noqa: E402
from .render_orbit import RenderOrbitConfig, render_orbit  # noqa: E402

__all__ = [
    "InputError",
    "MeshLoadError",
    "Orbit",
    "OrbitDirectoryError",
    "OrbitFrames",
    "RenderOrbitConfig",
    "Sv3dError",
    "__version__",
    "load_mesh",
    "load_trimesh",
    "make_orbit",
    "read_orbit_directory",
    "render_orbit",
    "sine_orbit",
    "static_orbit",
    "write_orbit_directory",
]
