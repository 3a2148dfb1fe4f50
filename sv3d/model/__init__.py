"""Stage 1: SV3D, the camera-conditioned video diffusion model, built from diffusers/transformers modules.

Loads the original single-file checkpoints (`sv3d_u.safetensors`, `sv3d_p.safetensors`, sgm key layout)
and diffusers-format folders, and samples exactly as the reference (Stability-AI/generative-models).
"""

__all__: list[str] = []
