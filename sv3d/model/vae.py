"""SV3D's autoencoder as a diffusers `AutoencoderKL`: conversion from the sgm checkpoint, encode, decode.

SV3D is NOT Stable Video Diffusion's temporal VAE. Its first stage is the plain 2-D LDM KL autoencoder
(Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", sec. 3), used in two
places of the original checkpoint (Stability-AI/generative-models, `sgm/models/autoencoder.py`):

* `conditioner.embedders.1.encoder.{encoder,quant_conv}`: encodes the conditioning image; SV3D uses the
  posterior MEAN, unscaled (scale factor 1.0), as the 4 extra UNet input channels;
* `first_stage_model.decoder`: decodes sampled latents frame by frame, `decoder(z / 0.18215)`, with no
  post_quant_conv.

The file also holds the conditioner's own `decoder` and `post_quant_conv`; they are never used (in the
tiny reference fixtures they are independent random weights, so decoding through them does not match).
Both halves therefore go into ONE `AutoencoderKL(use_quant_conv=True, use_post_quant_conv=False)`.

Key rules (LDM -> diffusers): `down.{i}` -> `down_blocks.{i}`, `up.{i}` -> `up_blocks.{N-1-i}` (stored in
reverse), `block.{j}` -> `resnets.{j}`, `nin_shortcut` -> `conv_shortcut`, `{down,up}sample.conv` ->
`{down,up}samplers.0.conv`, `mid.block_{1,2}` -> `mid_block.resnets.{0,1}`, `mid.attn_1.{norm,q,k,v,
proj_out}` -> `mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}` (1x1 convs squeezed to
Linear), `norm_out` -> `conv_norm_out`. Sizes come from tensor shapes only.
"""

from __future__ import annotations

import re

import torch
from diffusers import AutoencoderKL
from torch import Tensor

from ..errors import InputError, listing

__all__ = [
    "SCALING_FACTOR",
    "convert_vae_state",
    "decode_frames",
    "encode_mean",
    "encode_moments",
    "load_sv3d_vae",
    "vae_config_from_state",
]

# `DiffusionEngine.scale_factor` in sv3d_{u,p}.yaml: sampled latents live in z * 0.18215.
SCALING_FACTOR = 0.18215

_RESNET_PARTS = ("norm1", "conv1", "norm2", "conv2")
_ATTN_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _levels(state: dict[str, Tensor], group: str) -> list[int]:
    """Sorted indices i of `{group}.{i}.*` keys (group: "down" or "up")."""
    return sorted({int(m.group(1)) for k in state if (m := re.match(rf"{group}\.(\d+)\.", k))})


def _blocks(state: dict[str, Tensor], group: str, level: int) -> list[int]:
    """Sorted indices j of `{group}.{level}.block.{j}.*` keys."""
    pattern = rf"{re.escape(group)}\.{level}\.block\.(\d+)\."
    return sorted({int(m.group(1)) for k in state if (m := re.match(pattern, k))})


def _shape(state: dict[str, Tensor], key: str, what: str) -> tuple[int, ...]:
    if key not in state:
        raise InputError(f"VAE {what} state: missing key {key!r}; not an LDM KL autoencoder?")
    return tuple(state[key].shape)


def vae_config_from_state(
    encoder_state: dict[str, Tensor],  # keys like `down.0.block.0.conv1.weight` (prefix stripped)
    decoder_state: dict[str, Tensor],  # keys like `up.0.block.0.conv1.weight`
    *,
    norm_num_groups: int = 32,  # LDM's `Normalize` hard-codes 32 groups; not recoverable from weights
    scaling_factor: float = SCALING_FACTOR,
) -> dict:
    """`AutoencoderKL` config kwargs for SV3D's VAE, every size read from the tensor shapes."""
    levels = _levels(encoder_state, "down")
    if not levels or levels != list(range(len(levels))):
        raise InputError(f"VAE encoder state: down levels {levels} are not 0..N-1")
    # [ch_i, ch_in, 3, 3]: each level's width is its first resnet's output channels.
    block_out = [_shape(encoder_state, f"down.{i}.block.0.conv1.weight", "encoder")[0] for i in levels]
    layers = len(_blocks(encoder_state, "down", 0))
    for i in levels:
        if len(_blocks(encoder_state, "down", i)) != layers:
            raise InputError(f"VAE encoder state: level {i} has a different number of resnets than level 0")
    in_channels = _shape(encoder_state, "conv_in.weight", "encoder")[1]
    moments = _shape(encoder_state, "conv_out.weight", "encoder")[0]  # 2 * z_channels (double_z)
    latent_channels = _shape(decoder_state, "conv_in.weight", "decoder")[1]
    if moments != 2 * latent_channels:
        raise InputError(
            f"VAE: encoder conv_out gives {moments} channels, expected 2 x decoder latent channels "
            f"{latent_channels} (mean and logvar)"
        )
    up_levels = _levels(decoder_state, "up")
    if up_levels != levels:
        raise InputError(f"VAE decoder state: up levels {up_levels} do not match encoder levels {levels}")
    for i in levels:
        width = _shape(decoder_state, f"up.{i}.block.0.conv1.weight", "decoder")[0]
        if width != block_out[i]:
            raise InputError(
                f"VAE: decoder level {i} has {width} channels, encoder has {block_out[i]}; "
                "diffusers' AutoencoderKL needs the same widths"
            )
        if len(_blocks(decoder_state, "up", i)) != layers + 1:
            raise InputError(f"VAE decoder state: level {i} should have {layers + 1} resnets")
    out_channels = _shape(decoder_state, "conv_out.weight", "decoder")[0]
    mid_attention = "mid.attn_1.q.weight" in encoder_state
    return {
        "in_channels": in_channels,
        "out_channels": out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": block_out,
        "layers_per_block": layers,
        "latent_channels": latent_channels,
        "norm_num_groups": norm_num_groups,
        "scaling_factor": scaling_factor,
        "use_quant_conv": True,
        "use_post_quant_conv": False,  # SV3D decodes with the bare decoder
        "mid_block_add_attention": mid_attention,
    }


def _rename(key: str, side: str, num_levels: int) -> str | None:
    """diffusers name of one LDM encoder/decoder key (without the `encoder.`/`decoder.` head), or None."""
    if m := re.fullmatch(r"(conv_in|conv_out)\.(weight|bias)", key):
        return key
    if m := re.fullmatch(r"norm_out\.(weight|bias)", key):
        return f"conv_norm_out.{m.group(1)}"
    group, blocks = ("down", "down_blocks") if side == "encoder" else ("up", "up_blocks")
    if m := re.fullmatch(rf"{group}\.(\d+)\.block\.(\d+)\.(\w+)\.(weight|bias)", key):
        level, j, part, kind = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if part == "nin_shortcut":
            part = "conv_shortcut"
        elif part not in _RESNET_PARTS:
            return None
        # Decoder levels are stored deepest-last in LDM and deepest-first in diffusers.
        target = level if side == "encoder" else num_levels - 1 - level
        return f"{blocks}.{target}.resnets.{j}.{part}.{kind}"
    sampler = "downsample" if side == "encoder" else "upsample"
    if m := re.fullmatch(rf"{group}\.(\d+)\.{sampler}\.conv\.(weight|bias)", key):
        level = int(m.group(1))
        target = level if side == "encoder" else num_levels - 1 - level
        return f"{blocks}.{target}.{sampler}rs.0.conv.{m.group(2)}"
    if m := re.fullmatch(r"mid\.block_([12])\.(\w+)\.(weight|bias)", key):
        if m.group(2) not in _RESNET_PARTS:
            return None
        return f"mid_block.resnets.{int(m.group(1)) - 1}.{m.group(2)}.{m.group(3)}"
    if m := re.fullmatch(r"mid\.attn_1\.(\w+)\.(weight|bias)", key):
        if m.group(1) not in _ATTN_PARTS:
            return None
        return f"mid_block.attentions.0.{_ATTN_PARTS[m.group(1)]}.{m.group(2)}"
    return None


def convert_vae_state(
    encoder_state: dict[str, Tensor],  # `conditioner.embedders.1.encoder.encoder.*`, prefix stripped
    quant_conv_state: dict[str, Tensor],  # `conditioner.embedders.1.encoder.quant_conv.*` -> weight, bias
    decoder_state: dict[str, Tensor],  # `first_stage_model.decoder.*` (NOT the conditioner's decoder)
) -> dict[str, Tensor]:
    """A diffusers `AutoencoderKL` state dict; InputError names every key that no rule consumed.

    Works on meta tensors too (only renames, squeezes and views), so a full-size layout can be checked
    without memory.
    """
    num_levels = len(_levels(encoder_state, "down"))
    out: dict[str, Tensor] = {}
    unused: list[str] = []
    for side, state in (("encoder", encoder_state), ("decoder", decoder_state)):
        for key, value in state.items():
            new = _rename(key, side, num_levels)
            if new is None:
                unused.append(f"{side}.{key}")
                continue
            if ".attentions.0.to_" in new and new.endswith("weight"):
                if value.ndim != 4 or value.shape[2:] != (1, 1):
                    raise InputError(
                        f"VAE {side}.{key}: expected a 1x1 conv weight, got {tuple(value.shape)}"
                    )
                value = value[:, :, 0, 0]  # [C_out, C_in, 1, 1] -> [C_out, C_in]: 1x1 conv == Linear
            out[f"{side}.{new}"] = value
    for key, value in quant_conv_state.items():
        if key in ("weight", "bias"):
            out[f"quant_conv.{key}"] = value
        else:
            unused.append(f"quant_conv.{key}")
    if unused:
        raise InputError(f"VAE conversion: {len(unused)} keys not consumed: {listing(unused)}")
    return out


def load_sv3d_vae(
    encoder_state: dict[str, Tensor],
    quant_conv_state: dict[str, Tensor],
    decoder_state: dict[str, Tensor],
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> AutoencoderKL:
    """SV3D's VAE, loaded strictly (every parameter present, nothing extra), in eval mode.

    Built on the meta device and filled with the given tensors (no random init, no copy beyond the
    dtype/device move), which matters for the full-size model.
    """
    config = vae_config_from_state(encoder_state, decoder_state)
    state = convert_vae_state(encoder_state, quant_conv_state, decoder_state)
    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    result = vae.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise InputError(
            f"VAE: converted state does not fit AutoencoderKL: missing {result.missing_keys}, "
            f"unexpected {result.unexpected_keys}"
        )
    if device is not None:
        vae = vae.to(device)
    if dtype is not None:
        vae = vae.to(dtype)
    return vae.eval().requires_grad_(False)


def encode_moments(vae: AutoencoderKL, images: Tensor) -> Tensor:
    """Encoder + quant_conv output `[N, 2*z, h, w]` = (mean, logvar), for images `[N, 3, H, W]` in [-1, 1]."""
    if images.ndim != 4 or images.shape[1] != vae.config.in_channels:
        raise InputError(
            f"VAE encode: images must be [N, {vae.config.in_channels}, H, W], got {tuple(images.shape)}"
        )
    images = images.to(device=vae.device, dtype=vae.dtype)
    moments = vae.encoder(images)  # [N, 3, H, W] -> [N, 2*z, H/8, W/8]
    if vae.quant_conv is not None:
        moments = vae.quant_conv(moments)
    return moments


def encode_mean(vae: AutoencoderKL, images: Tensor) -> Tensor:
    """The posterior mean `[N, z, h, w]`, UNSCALED (SV3D's concat conditioning: README trap 2)."""
    mean, _logvar = encode_moments(vae, images).chunk(2, dim=1)  # [N, 2z, h, w] -> 2 x [N, z, h, w]
    return mean


def decode_frames(vae: AutoencoderKL, latents: Tensor, chunk: int = 14) -> Tensor:
    """`decoder(latents / scaling_factor)` frame by frame, `chunk` frames per call: `[N, 3, H, W]`.

    `latents [N, z, h, w]` are in the scaled space the sampler works in. There is no post_quant_conv and
    no temporal mixing, so `chunk` changes memory use, not the result (the reference decodes 14 at a time).
    """
    if latents.ndim != 4 or latents.shape[1] != vae.config.latent_channels:
        raise InputError(
            f"VAE decode: latents must be [N, {vae.config.latent_channels}, h, w], got {tuple(latents.shape)}"
        )
    if chunk < 1:
        raise InputError(f"VAE decode: chunk must be >= 1, got {chunk}")
    # The reference multiplies by the reciprocal (`1.0 / scale_factor * z`); dividing differs by 1 ulp.
    z = latents.to(device=vae.device, dtype=vae.dtype) * (1.0 / vae.config.scaling_factor)
    frames = [vae.decoder(z[i : i + chunk]) for i in range(0, z.shape[0], chunk)]  # each [n, 3, H, W]
    return torch.cat(frames, dim=0)  # [N, 3, H, W]
