"""Stage 2: Instant-NGP-style NeRF (hash grid + small MLP, nerfacc sampling) and coarse mesh extraction.

A library over tensors: cameras arrive as matrices; nothing here imports `sv3d` or `refine`.
"""

from .encoding import HashGridConfig, HashGridEncoder, hash_encode, hash_encode_reference
from .extract import ExtractConfig, density_grid, extract_mesh, load_density, save_density
from .field import FieldConfig, RadianceField, trunc_exp
from .occupancy import OccupancyGrid
from .rays import generate_rays, ray_sphere_bounds, sample_bounds
from .render import render_rays
from .smoothness import color_smoothness
from .train import TrainConfig, TrainResult, fit_field, frames_over_white, psnr

__all__ = [
    "ExtractConfig",
    "FieldConfig",
    "HashGridConfig",
    "HashGridEncoder",
    "OccupancyGrid",
    "RadianceField",
    "TrainConfig",
    "TrainResult",
    "color_smoothness",
    "density_grid",
    "extract_mesh",
    "fit_field",
    "frames_over_white",
    "generate_rays",
    "hash_encode",
    "hash_encode_reference",
    "load_density",
    "psnr",
    "ray_sphere_bounds",
    "sample_bounds",
    "render_rays",
    "save_density",
    "trunc_exp",
]
