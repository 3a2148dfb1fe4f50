"""SV3D's conditioning: CLIP context, cond-frame latent and the per-frame vector, plus the uncond branch.

Follows the reference's `GeneralConditioner` for sv3d_u / sv3d_p (Stability-AI/generative-models,
`scripts/sampling/configs/sv3d_{u,p}.yaml`, `sgm/modules/encoders/modules.py`) and the batching of
`scripts/sampling/simple_video_sample.py` (Voleti et al. 2024, "SV3D", sec. 3.2-3.3):

* crossattn `[B*T, 1, D]`: CLIP image embedding of the CLEAN image, one token, repeated over frames;
* concat `[B*T, z, h, w]`: VAE posterior mean of `image + cond_aug * noise`, UNSCALED, repeated over frames;
* vector `[B*T, adm]`: per frame, sinusoidal embeddings (cosine half first) of cond_aug and, for sv3d_p,
  of the polar angle and the azimuth relative to the input view: widths (256,) or (256, 512, 512) in the
  real model, always derived from the UNet's `adm_in_channels`;
* unconditional branch: crossattn and concat zeroed, vector KEPT (the cameras and cond_aug stay).

Frames live in the batch dimension with index `b*T + t` (frame fastest).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL
from diffusers.models.embeddings import get_timestep_embedding
from torch import Tensor
from transformers import CLIPVisionModelWithProjection

from ..errors import InputError
from .clip import clip_image_embeds
from .vae import encode_mean

__all__ = [
    "SV3DConditioning",
    "build_conditioning",
    "concat_for_cfg",
    "timestep_embedding",
    "vector_conditioning",
    "vector_widths",
]


def timestep_embedding(x: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding `[N, dim]` (float32) of scalars `x [N]`: `[cos(x f_k), sin(x f_k)]`, cosine first.

    `f_k = exp(-ln(10000) k / (dim / 2))`, k = 0..dim/2-1. Float64 inputs (the reference passes the camera
    angles as float64) are cast to float32 before multiplying, as the reference does. This is diffusers'
    `get_timestep_embedding(x, dim, flip_sin_to_cos=True, downscale_freq_shift=0)`, which computes the same
    float32 operations in the same order as sgm's `timestep_embedding` (bit-identical; tested).
    """
    if x.ndim != 1:
        raise InputError(f"timestep_embedding: expected a 1-D tensor [N], got shape {tuple(x.shape)}")
    if dim < 2:
        raise InputError(f"timestep_embedding: width must be >= 2, got {dim}")
    return get_timestep_embedding(x.float(), dim, flip_sin_to_cos=True, downscale_freq_shift=0)


def vector_widths(adm_in_channels: int, with_cameras: bool) -> tuple[int, ...]:
    """Embedding widths of (cond_aug[, polar, azimuth]) summing to the UNet's `adm_in_channels`.

    sv3d_u: `(adm,)` (256 in the real model); sv3d_p: `(adm/5, 2 adm/5, 2 adm/5)` = (256, 512, 512) for
    adm 1280 and (32, 64, 64) for the tiny fixtures' 160, the proportions of the reference configs.
    """
    if adm_in_channels <= 0:
        raise InputError(f"vector conditioning: adm_in_channels must be positive, got {adm_in_channels}")
    if not with_cameras:
        return (adm_in_channels,)
    if adm_in_channels % 5:
        raise InputError(
            f"vector conditioning: adm_in_channels {adm_in_channels} is not 5 x w, so it cannot hold "
            "cond_aug (w) + polar (2w) + azimuth (2w): is this an sv3d_u UNet given camera angles?"
        )
    w = adm_in_channels // 5
    return (w, 2 * w, 2 * w)


def vector_conditioning(
    cond_aug: Tensor,  # [N] noise-augmentation level per frame (1e-5 in SV3D)
    polars_rad: Tensor | None,  # [N] polar angle = 90 deg - elevation, radians (sv3d_p), else None
    azimuths_rad: Tensor | None,  # [N] azimuth relative to the input (last) frame, radians (sv3d_p)
    widths: tuple[int, ...],  # from `vector_widths`
) -> Tensor:
    """The UNet's vector input `y [N, sum(widths)]` (float32): concatenated per-frame embeddings."""
    values = (
        [cond_aug] if polars_rad is None and azimuths_rad is None else [cond_aug, polars_rad, azimuths_rad]
    )
    if any(v is None for v in values):
        raise InputError("vector conditioning: give both polars_rad and azimuths_rad (sv3d_p) or neither")
    if len(values) != len(widths):
        raise InputError(
            f"vector conditioning: {len(values)} inputs (cond_aug, then polar and azimuth if given) "
            f"but {len(widths)} widths {widths}"
        )
    if cond_aug.ndim != 1:
        raise InputError(f"vector conditioning: cond_aug must be [N], got {tuple(cond_aug.shape)}")
    n = cond_aug.shape[0]
    for name, v in zip(("cond_aug", "polars_rad", "azimuths_rad"), values, strict=False):
        if v.ndim != 1 or v.shape[0] != n:
            raise InputError(
                f"vector conditioning: {name} must be [N] like cond_aug [{n}], got {tuple(v.shape)}"
            )
    # [N] -> [N, w_i] each -> [N, adm]
    return torch.cat([timestep_embedding(v, w) for v, w in zip(values, widths, strict=True)], dim=-1)


@dataclass
class SV3DConditioning:
    """What the SV3D UNet receives besides the noisy latent, one row per frame (index b*T + t)."""

    crossattn: Tensor  # [B*T, 1, D] CLIP image embedding, the cross-attention context
    concat: Tensor  # [B*T, z, h, w] unscaled VAE mean of the noised input, concatenated to the latent
    vector: Tensor  # [B*T, adm] cond_aug (+ polar + azimuth) embeddings, added to the time embedding

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> SV3DConditioning:
        return SV3DConditioning(
            self.crossattn.to(device=device, dtype=dtype),
            self.concat.to(device=device, dtype=dtype),
            self.vector.to(device=device, dtype=dtype),
        )

    def rows(self, index: slice) -> SV3DConditioning:
        """A slice of the rows (frames) of every part."""
        return SV3DConditioning(self.crossattn[index], self.concat[index], self.vector[index])


def concat_for_cfg(uncond: SV3DConditioning, cond: SV3DConditioning) -> SV3DConditioning:
    """Classifier-free-guidance batch `[uncond ; cond]`: 2*B*T rows, unconditional first, as the reference."""
    return SV3DConditioning(
        torch.cat([uncond.crossattn, cond.crossattn]),  # 2 x [B*T, 1, D] -> [2*B*T, 1, D]
        torch.cat([uncond.concat, cond.concat]),  # -> [2*B*T, z, h, w]
        torch.cat([uncond.vector, cond.vector]),  # -> [2*B*T, adm]
    )


def _per_frame(name: str, angles: Tensor | None, batch: int, num_frames: int) -> Tensor | None:
    """Camera angles `[T]` (shared by every video) or `[B*T]` -> `[B*T]`."""
    if angles is None:
        return None
    if angles.ndim == 1 and angles.shape[0] == num_frames:
        return angles.repeat(batch)  # [T] -> [B*T]
    if angles.ndim == 1 and angles.shape[0] == batch * num_frames:
        return angles
    raise InputError(
        f"{name}: expected [{num_frames}] (one per frame) or [{batch * num_frames}], "
        f"got {tuple(angles.shape)}"
    )


@torch.no_grad()
def build_conditioning(
    image: Tensor,  # [B, 3, H, W] in [-1, 1], the input view (B = 1 in SV3D)
    cond_frames_noise: Tensor,  # [B, 3, H, W] unit normal noise for the cond-frame augmentation
    clip: CLIPVisionModelWithProjection,
    vae: AutoencoderKL,
    *,
    adm_in_channels: int,  # the UNet's vector width (`projection_class_embeddings_input_dim`)
    cond_aug: float = 1e-5,  # SV3D's value
    num_frames: int = 21,
    polars_rad: Tensor | None = None,  # [T] or [B*T], sv3d_p only
    azimuths_rad: Tensor | None = None,  # [T] or [B*T], sv3d_p only, relative to the last frame
) -> tuple[SV3DConditioning, SV3DConditioning]:
    """`(cond, uncond)`, each with `B*T` rows, as the reference's conditioner and sampling script.

    cond: CLIP of the clean image; VAE mean (unscaled) of `image + cond_aug * noise`; both repeated over
    the T frames; per-frame vector of cond_aug (and the cameras). uncond: crossattn and concat zero, the
    vector identical. The vector is returned in the CLIP output's dtype.
    """
    # 1. Check inputs
    if image.ndim != 4 or image.shape[1] != 3:
        raise InputError(f"conditioning image: expected [B, 3, H, W] in [-1, 1], got {tuple(image.shape)}")
    lo, hi = float(image.min()), float(image.max())
    if lo < -1.0 - 1e-3 or hi > 1.0 + 1e-3:
        raise InputError(f"conditioning image: values must lie in [-1, 1], got [{lo:.3g}, {hi:.3g}]")
    if cond_frames_noise.shape != image.shape:
        raise InputError(
            f"cond_frames_noise: shape {tuple(cond_frames_noise.shape)} differs from the image's "
            f"{tuple(image.shape)}"
        )
    if num_frames < 1:
        raise InputError(f"num_frames must be >= 1, got {num_frames}")
    if (polars_rad is None) != (azimuths_rad is None):
        raise InputError(
            "camera conditioning: give both polars_rad and azimuths_rad (sv3d_p) or neither (sv3d_u)"
        )
    batch = image.shape[0]
    polars = _per_frame("polars_rad", polars_rad, batch, num_frames)
    azimuths = _per_frame("azimuths_rad", azimuths_rad, batch, num_frames)

    # 2. Image embeddings: CLIP sees the clean image, the VAE the noise-augmented one (unscaled mean)
    crossattn = clip_image_embeds(clip, image)[:, None, :]  # [B, D] -> [B, 1, D]
    # The augmentation is summed in at least float32: 1e-5 * noise would vanish next to the image in bf16.
    wide = torch.promote_types(image.dtype, torch.float32)
    concat = encode_mean(vae, image.to(wide) + cond_aug * cond_frames_noise.to(wide))  # [B, z, h, w]

    # 3. Repeat over frames: [B, ...] -> [B*T, ...], index b*T + t
    crossattn = crossattn.repeat_interleave(num_frames, dim=0)
    concat = concat.repeat_interleave(num_frames, dim=0)

    # 4. Per-frame vector
    augs = torch.full((batch * num_frames,), cond_aug, dtype=torch.float32, device=crossattn.device)
    widths = vector_widths(adm_in_channels, with_cameras=polars is not None)
    if polars is not None and azimuths is not None:
        # float64 -> float32 here equals the reference's cast inside the embedding (and suits every device).
        polars = polars.to(device=crossattn.device, dtype=torch.float32)
        azimuths = azimuths.to(device=crossattn.device, dtype=torch.float32)
    vector = vector_conditioning(augs, polars, azimuths, widths).to(crossattn.dtype)  # [B*T, adm]

    # 5. Unconditional branch: zero context and latent, same vector
    cond = SV3DConditioning(crossattn, concat, vector)
    uncond = SV3DConditioning(torch.zeros_like(crossattn), torch.zeros_like(concat), vector.clone())
    return cond, uncond
