"""Stage 1: SV3D, the camera-conditioned video diffusion model, built from diffusers/transformers modules.

Loads the original single-file checkpoints (`sv3d_u.safetensors`, `sv3d_p.safetensors`, sgm key layout)
and diffusers-format folders, and samples exactly as the reference (Stability-AI/generative-models).
"""

from .checkpoint import CheckpointError, read_checkpoint, split_components
from .conditioner import SV3DConditioning, build_conditioning
from .pipeline import SV3DOutput, SV3DPipeline, estimate_cpu_seconds
from .sampler import EulerEDMSampler, edm_sigmas, triangle_guidance_scales
from .unet import SV3DUNet, load_sv3d_unet
from .vae import decode_frames, encode_mean, load_sv3d_vae

__all__ = [
    "CheckpointError",
    "EulerEDMSampler",
    "SV3DConditioning",
    "SV3DOutput",
    "SV3DPipeline",
    "SV3DUNet",
    "build_conditioning",
    "decode_frames",
    "edm_sigmas",
    "encode_mean",
    "estimate_cpu_seconds",
    "load_sv3d_unet",
    "load_sv3d_vae",
    "read_checkpoint",
    "split_components",
    "triangle_guidance_scales",
]
