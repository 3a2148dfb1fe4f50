"""sv3d: one photo of an object in, a textured 3D mesh out (SV3D orbit -> NeRF -> DMTet -> export)."""

__version__ = "0.1.0"

__all__ = ["__version__"]
