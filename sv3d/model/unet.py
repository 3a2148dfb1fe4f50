"""SV3D's video UNet: diffusers' spatio-temporal UNet with per-frame vector conditioning, and its loader.

SV3D (Voleti et al. 2024, "SV3D: Novel Multi-view Synthesis and 3D Generation from a Single Image using
Latent Video Diffusion", section 3) fine-tunes Stable Video Diffusion. Its network is the `VideoUNet` of
Stability-AI/generative-models (`sgm/modules/diffusionmodules/video_model.py`), which diffusers ships as
`UNetSpatioTemporalConditionModel`. Two behaviours differ from diffusers' SVD UNet, and `SV3DUNet` changes
exactly those, reusing every block unchanged:

* Conditioning vector: SV3D embeds one vector PER FRAME (`y [B*T, adm]`: cond_aug, and for sv3d_p the
  polar and azimuth sinusoids) through `label_emb` (Linear-SiLU-Linear = diffusers' `add_embedding`) and
  adds it to the timestep embedding of that frame. SVD instead embeds per-video `added_time_ids`
  (fps, motion bucket, noise aug) and repeats them over frames; SV3D has no such ids.
* GroupNorm eps: the reference uses 1e-5 in every UNet resnet (spatial and temporal); diffusers'
  `CrossAttnDownBlockSpatioTemporal` hard-codes 1e-6 (fixture README, trap 9). We set `resnet_eps` on
  every resnet norm after building the blocks.

Everything else already matches the reference: each temporal transformer block cross-attends to the CLIP
context of the first frame of its video (`TransformerSpatioTemporalModel`, trap 7), spatial/temporal
blends use `sigmoid(mix_factor)` because `image_only_indicator` is all zeros, sinusoids put cosine first.

Checkpoint conversion (sgm key layout -> diffusers) follows the fixture README's "sgm to diffusers
correspondence". Sizes are read from tensor shapes; only `num_head_channels` cannot be (attention weights
are [inner, inner] whatever the head split) and comes from the sgm yaml or the SV3D default, 64.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.resnet import SpatioTemporalResBlock
from diffusers.models.unets.unet_spatio_temporal_condition import (
    UNetSpatioTemporalConditionModel,
    UNetSpatioTemporalConditionOutput,
)
from torch import Tensor

from ..errors import InputError, listing

__all__ = [
    "SV3DUNet",
    "convert_unet_state",
    "load_sv3d_unet",
    "num_head_channels_from_sgm_config",
    "unet_config_from_state",
]

# SV3D's released configs (scripts/sampling/configs/sv3d_{u,p}.yaml): network_config.num_head_channels.
DEFAULT_NUM_HEAD_CHANNELS = 64


class SV3DUNet(UNetSpatioTemporalConditionModel):
    r"""diffusers' `UNetSpatioTemporalConditionModel` with SV3D's per-frame vector conditioning.

    Config (all read from a checkpoint by `unet_config_from_state`):
        in_channels: 8 = 4 noisy-latent channels + 4 cond-frame latent channels (concatenated).
        out_channels: 4 latent channels (a v-prediction).
        down_block_types / up_block_types: `CrossAttn*SpatioTemporal` for levels with attention.
        block_out_channels: model_channels * channel_mult (320, 640, 1280, 1280 for SV3D).
        projection_class_embeddings_input_dim: width of the per-frame vector `y` (sv3d_u 256, sv3d_p 1280).
        layers_per_block: sgm num_res_blocks.
        cross_attention_dim: CLIP image-embedding width (1024).
        transformer_layers_per_block: sgm transformer_depth.
        num_attention_heads: channels // num_head_channels per level (5, 10, 20, 20).
        num_frames: default frame count for `[B*T, ...]` inputs (SV3D is trained on 21).
        resnet_eps: GroupNorm eps of every resnet; the reference uses 1e-5 (diffusers' down blocks 1e-6).

    The parent's `add_time_proj` (sinusoids of SVD's added_time_ids) is removed: SV3D's vector already
    arrives embedded; `add_embedding` takes it directly.
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int | None = None,
        in_channels: int = 8,
        out_channels: int = 4,
        down_block_types: tuple[str, ...] = (
            "CrossAttnDownBlockSpatioTemporal",
            "CrossAttnDownBlockSpatioTemporal",
            "CrossAttnDownBlockSpatioTemporal",
            "DownBlockSpatioTemporal",
        ),
        up_block_types: tuple[str, ...] = (
            "UpBlockSpatioTemporal",
            "CrossAttnUpBlockSpatioTemporal",
            "CrossAttnUpBlockSpatioTemporal",
            "CrossAttnUpBlockSpatioTemporal",
        ),
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        projection_class_embeddings_input_dim: int = 1280,
        layers_per_block: int | tuple[int, ...] = 2,
        cross_attention_dim: int = 1024,
        transformer_layers_per_block: int | tuple[int, ...] = 1,
        num_attention_heads: int | tuple[int, ...] = (5, 10, 20, 20),
        num_frames: int = 21,
        resnet_eps: float = 1e-5,
    ):
        # The parent's __init__ is decorated with @register_to_config too; calling the undecorated body
        # keeps SVD-only keys (addition_time_embed_dim) out of our config.
        UNetSpatioTemporalConditionModel.__init__.__wrapped__(
            self,
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=out_channels,
            down_block_types=tuple(down_block_types),
            up_block_types=tuple(up_block_types),
            block_out_channels=tuple(block_out_channels),
            addition_time_embed_dim=1,  # only sizes add_time_proj (no parameters), deleted below
            projection_class_embeddings_input_dim=projection_class_embeddings_input_dim,
            layers_per_block=layers_per_block,
            cross_attention_dim=cross_attention_dim,
            transformer_layers_per_block=transformer_layers_per_block,
            num_attention_heads=num_attention_heads,
            num_frames=num_frames,
        )
        del self.add_time_proj  # no fps / motion-bucket ids in SV3D
        # Trap 9: every resnet GroupNorm (spatial and temporal) uses the reference eps.
        for module in self.modules():
            if isinstance(module, SpatioTemporalResBlock):
                for norm in (
                    module.spatial_res_block.norm1,
                    module.spatial_res_block.norm2,
                    module.temporal_res_block.norm1,
                    module.temporal_res_block.norm2,
                ):
                    norm.eps = resnet_eps

    def forward(
        self,
        sample: Tensor,  # [B*T, C_in, h, w] (frame index fastest) or [B, T, C_in, h, w]
        timestep: Tensor | float,  # [B*T], [1] or scalar: SV3D's c_noise = 0.25 ln(sigma)
        encoder_hidden_states: Tensor,  # [B*T, S, D]: CLIP image embedding per frame (S = 1)
        y: Tensor,  # [B*T, adm]: per-frame vector conditioning (cond_aug [+ polar, azimuth] sinusoids)
        num_frames: int | None = None,  # T; required for 4-D input unless it is config.num_frames
        return_dict: bool = True,
    ) -> UNetSpatioTemporalConditionOutput | tuple[Tensor]:
        r"""The network output (v-prediction), in the layout of `sample`.

        Frames live in the batch dimension as in the reference (`index = b*T + t`); a 5-D `sample`
        `[B, T, C, h, w]` is also accepted and the output is then `[B, T, C_out, h, w]`. The conditioning
        tensors are always per frame (`[B*T, ...]`), as SV3D's sampler builds them. Returns
        `UNetSpatioTemporalConditionOutput(sample=...)`, or a 1-tuple when `return_dict` is False.
        """
        # 1. Check inputs and flatten videos into frames
        video_layout = sample.ndim == 5
        if video_layout:
            batch_size, t = sample.shape[:2]
            if num_frames is not None and num_frames != t:
                raise ValueError(f"sample has {t} frames (dim 1) but num_frames={num_frames}")
            num_frames = t
            sample = sample.flatten(0, 1)  # [B, T, C, h, w] -> [B*T, C, h, w]
        elif sample.ndim == 4:
            num_frames = num_frames or self.config.num_frames
            if sample.shape[0] % num_frames != 0:
                raise ValueError(
                    f"sample batch {sample.shape[0]} is not a multiple of num_frames={num_frames}"
                )
            batch_size = sample.shape[0] // num_frames
        else:
            raise ValueError(f"sample must be [B*T, C, h, w] or [B, T, C, h, w], got {tuple(sample.shape)}")
        batch_frames = batch_size * num_frames
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != batch_frames:
            raise ValueError(
                f"encoder_hidden_states must be [{batch_frames}, S, D] (one context per frame), "
                f"got {tuple(encoder_hidden_states.shape)}"
            )
        adm = self.config.projection_class_embeddings_input_dim
        if y.shape != (batch_frames, adm):
            raise ValueError(
                f"y must be [{batch_frames}, {adm}] (one vector per frame), got {tuple(y.shape)}"
            )

        # 2. Time and vector embeddings, one row per frame
        timesteps = torch.as_tensor(timestep, device=sample.device)
        if timesteps.numel() == 1:
            timesteps = timesteps.reshape(1).expand(batch_frames)  # [] or [1] -> [B*T]
        if timesteps.shape != (batch_frames,):
            raise ValueError(f"timestep must be a scalar or [{batch_frames}], got {tuple(timesteps.shape)}")
        t_emb = self.time_proj(timesteps).to(dtype=sample.dtype)  # [B*T, C0], float32 sinusoids -> dtype
        emb = self.time_embedding(t_emb) + self.add_embedding(y.to(dtype=sample.dtype))  # [B*T, 4*C0]

        # Upsampling must hit the skip connections' sizes when h, w are not multiples of 2**num_upsamplers.
        forward_upsample_size = any(s % 2**self.num_upsamplers != 0 for s in sample.shape[-2:])
        upsample_size = None

        # 3. Pre-process
        sample = self.conv_in(sample)  # [B*T, C_in, h, w] -> [B*T, C0, h, w]
        # All zeros: every spatial/temporal blend is sigmoid(mix_factor) (video, not image, training rows).
        image_only_indicator = torch.zeros(batch_size, num_frames, dtype=sample.dtype, device=sample.device)

        # 4. Down
        down_block_res_samples: tuple[Tensor, ...] = (sample,)
        for down_block in self.down_blocks:
            kwargs: dict[str, Any] = {"image_only_indicator": image_only_indicator}
            if getattr(down_block, "has_cross_attention", False):
                kwargs["encoder_hidden_states"] = encoder_hidden_states
            sample, res_samples = down_block(hidden_states=sample, temb=emb, **kwargs)
            down_block_res_samples += res_samples

        # 5. Mid
        sample = self.mid_block(
            hidden_states=sample,
            temb=emb,
            encoder_hidden_states=encoder_hidden_states,
            image_only_indicator=image_only_indicator,
        )

        # 6. Up
        for i, up_block in enumerate(self.up_blocks):
            res_samples = down_block_res_samples[-len(up_block.resnets) :]
            down_block_res_samples = down_block_res_samples[: -len(up_block.resnets)]
            if i < len(self.up_blocks) - 1 and forward_upsample_size:
                upsample_size = down_block_res_samples[-1].shape[2:]
            kwargs = {"image_only_indicator": image_only_indicator, "upsample_size": upsample_size}
            if getattr(up_block, "has_cross_attention", False):
                kwargs["encoder_hidden_states"] = encoder_hidden_states
            sample = up_block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res_samples, **kwargs)

        # 7. Post-process
        sample = self.conv_out(self.conv_act(self.conv_norm_out(sample)))  # [B*T, C_out, h, w]
        if video_layout:
            sample = sample.reshape(batch_size, num_frames, *sample.shape[1:])  # -> [B, T, C_out, h, w]

        if not return_dict:
            return (sample,)
        return UNetSpatioTemporalConditionOutput(sample=sample)


# ----------------------------------------------------------------------------------------------------
# Config from a checkpoint


def num_head_channels_from_sgm_config(sgm_config: Mapping[str, Any]) -> int:
    """`model.params.network_config.params.num_head_channels` of an sgm yaml (as a plain dict)."""
    try:
        value = sgm_config["model"]["params"]["network_config"]["params"]["num_head_channels"]
    except (KeyError, TypeError):
        raise InputError(
            "sgm config: no model.params.network_config.params.num_head_channels (not an SV3D config?)"
        ) from None
    if not isinstance(value, int) or value <= 0:
        raise InputError(f"sgm config: num_head_channels must be a positive integer, got {value!r}")
    return value


def _shape(state: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise InputError(f"UNet checkpoint: missing key {key!r} (not an SV3D UNet?)")
    return tuple(state[key].shape)


def _indices(state: Mapping[str, Tensor], prefix: str) -> list[int]:
    """Sorted integer sub-indices present under `prefix` (e.g. `input_blocks.` -> [0, 1, 2, ...])."""
    found = {int(k[len(prefix) :].split(".", 1)[0]) for k in state if k.startswith(prefix)}
    if found and found != set(range(max(found) + 1)):
        raise InputError(f"UNet checkpoint: {prefix}* indices are not contiguous: {sorted(found)}")
    return sorted(found)


def _transformer_depth(state: Mapping[str, Tensor], prefix: str) -> int:
    depth = len(_indices(state, f"{prefix}.transformer_blocks."))
    if depth != len(_indices(state, f"{prefix}.time_stack.")):
        raise InputError(f"UNet checkpoint: {prefix} has unequal spatial and temporal transformer depths")
    return depth


def unet_config_from_state(
    state: Mapping[str, Tensor], num_head_channels: int = DEFAULT_NUM_HEAD_CHANNELS
) -> dict[str, Any]:
    """`SV3DUNet` config from an sgm UNet state dict (prefix `model.diffusion_model.` stripped).

    Every size comes from tensor shapes: channels, levels, resnets per level, which levels have attention,
    transformer depth, CLIP width, vector width. `num_head_channels` (sgm's per-head width) cannot be seen
    in the weights; pass it from the sgm yaml (`num_head_channels_from_sgm_config`) or keep SV3D's 64.
    Works on meta tensors.
    """
    # Stem, embeddings and head.
    model_channels, in_channels = _shape(state, "input_blocks.0.0.weight")[:2]
    out_channels = _shape(state, "out.2.weight")[0]
    time_embed_dim, t_in = _shape(state, "time_embed.0.weight")
    if t_in != model_channels or time_embed_dim != 4 * model_channels:
        raise InputError(
            f"UNet checkpoint: time_embed.0.weight is {[time_embed_dim, t_in]}, expected "
            f"[{4 * model_channels}, {model_channels}] (time embedding 4 x model_channels)"
        )
    adm_out, adm = _shape(state, "label_emb.0.0.weight")
    if adm_out != time_embed_dim:
        raise InputError(
            f"UNet checkpoint: label_emb.0.0.weight has {adm_out} outputs, expected {time_embed_dim}"
        )

    # Down path: input_blocks[1..] are resnet(+transformer) layers, each level closed by a downsampler
    # (`.0.op`) except the deepest.
    levels: list[dict[str, Any]] = [{"channels": [], "attn": [], "depth": []}]
    for i in _indices(state, "input_blocks.")[1:]:
        if f"input_blocks.{i}.0.op.weight" in state:
            levels.append({"channels": [], "attn": [], "depth": []})
            continue
        levels[-1]["channels"].append(_shape(state, f"input_blocks.{i}.0.out_layers.3.weight")[0])
        has_attn = f"input_blocks.{i}.1.proj_in.weight" in state
        levels[-1]["attn"].append(has_attn)
        levels[-1]["depth"].append(_transformer_depth(state, f"input_blocks.{i}.1") if has_attn else 0)
    block_out_channels, layers_per_block, attention, depths = [], [], [], []
    for n, level in enumerate(levels):
        if not level["channels"] or len(set(level["channels"])) != 1 or len(set(level["attn"])) != 1:
            raise InputError(f"UNet checkpoint: down level {n} is not a uniform run of resnets: {level}")
        if len(set(level["depth"])) != 1:
            raise InputError(f"UNet checkpoint: down level {n} mixes transformer depths {level['depth']}")
        block_out_channels.append(level["channels"][0])
        layers_per_block.append(len(level["channels"]))
        attention.append(level["attn"][0])
        depths.append(level["depth"][0])
    if block_out_channels[0] != model_channels:
        raise InputError(
            f"UNet checkpoint: first level has {block_out_channels[0]} channels, conv_in {model_channels}"
        )

    # Middle: resnet, transformer, resnet. diffusers sizes it with the deepest level's heads and depth.
    if _indices(state, "middle_block.") != [0, 1, 2]:
        raise InputError(
            "UNet checkpoint: middle_block must be resnet, transformer, resnet (indices 0, 1, 2)"
        )
    mid_depth = _transformer_depth(state, "middle_block.1")
    if attention[-1] and depths[-1] != mid_depth:
        raise InputError(
            f"UNet checkpoint: deepest level transformer depth {depths[-1]} != middle depth {mid_depth}"
        )
    depths = [
        d if a else (mid_depth if n == len(depths) - 1 else 1)
        for n, (d, a) in enumerate(zip(depths, attention, strict=True))
    ]

    # Heads: per level channels // num_head_channels (the deepest level's value sizes the middle block).
    heads = []
    for n, channels in enumerate(block_out_channels):
        needed = attention[n] or n == len(block_out_channels) - 1
        if needed and channels % num_head_channels != 0:
            raise InputError(
                f"UNet checkpoint: level {n} has {channels} channels, not a multiple of "
                f"num_head_channels={num_head_channels}"
            )
        heads.append(max(channels // num_head_channels, 1))

    # CLIP width from the first cross-attention key projection.
    attn_key = next((k for k in state if k.endswith("transformer_blocks.0.attn2.to_k.weight")), None)
    if attn_key is None:
        raise InputError("UNet checkpoint: no cross-attention weights (transformer_blocks.0.attn2.to_k)")
    cross_attention_dim = _shape(state, attn_key)[1]

    def uniform(values: list[int]) -> int | list[int]:
        return values[0] if len(set(values)) == 1 else values

    return {
        "in_channels": in_channels,
        "out_channels": out_channels,
        "down_block_types": [
            "CrossAttnDownBlockSpatioTemporal" if a else "DownBlockSpatioTemporal" for a in attention
        ],
        "up_block_types": [
            "CrossAttnUpBlockSpatioTemporal" if a else "UpBlockSpatioTemporal" for a in reversed(attention)
        ],
        "block_out_channels": block_out_channels,
        "projection_class_embeddings_input_dim": adm,
        "layers_per_block": uniform(layers_per_block),
        "cross_attention_dim": cross_attention_dim,
        "transformer_layers_per_block": uniform(depths),
        "num_attention_heads": heads,
    }


# ----------------------------------------------------------------------------------------------------
# Key conversion

# Sub-modules of sgm's ResBlock -> diffusers' ResnetBlock2D / TemporalResnetBlock.
_RESBLOCK = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


def _rename_resblock(rest: str) -> str | None:
    """A key inside sgm's VideoResBlock -> inside diffusers' SpatioTemporalResBlock."""
    if rest == "time_mixer.mix_factor":
        return rest
    target = "spatial_res_block"
    if rest.startswith("time_stack."):  # the Conv3d (3,1,1) ResBlock over frames
        target, rest = "temporal_res_block", rest[len("time_stack.") :]
    module, _, param = rest.rpartition(".")
    return f"{target}.{_RESBLOCK[module]}.{param}" if module in _RESBLOCK else None


def _rename_transformer(rest: str) -> str:
    """A key inside sgm's SpatialVideoTransformer -> inside diffusers' TransformerSpatioTemporalModel.

    norm, proj_in, proj_out, transformer_blocks.* and time_mixer keep their names; the temporal blocks
    `time_stack.j` become `temporal_transformer_blocks.j` (same sub-names); `time_pos_embed.0/.2` become
    `time_pos_embed.linear_1/_2`. Names that do not exist in diffusers are caught by the caller.
    """
    if rest.startswith("time_stack."):
        return "temporal_transformer_blocks." + rest[len("time_stack.") :]
    for sgm, ours in (
        ("time_pos_embed.0.", "time_pos_embed.linear_1."),
        ("time_pos_embed.2.", "time_pos_embed.linear_2."),
    ):
        if rest.startswith(sgm):
            return ours + rest[len(sgm) :]
    return rest


def _module_map(config: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """sgm module prefix -> (kind, diffusers module prefix) for the whole UNet, from its config."""
    n_levels = len(config["block_out_channels"])
    per_level = config["layers_per_block"]
    per_level = [per_level] * n_levels if isinstance(per_level, int) else list(per_level)
    down_attn = [t.startswith("CrossAttn") for t in config["down_block_types"]]
    up_attn = [t.startswith("CrossAttn") for t in config["up_block_types"]]

    table: dict[str, tuple[str, str]] = {
        "input_blocks.0.0": ("leaf", "conv_in"),
        "time_embed.0": ("leaf", "time_embedding.linear_1"),
        "time_embed.2": ("leaf", "time_embedding.linear_2"),
        "label_emb.0.0": ("leaf", "add_embedding.linear_1"),
        "label_emb.0.2": ("leaf", "add_embedding.linear_2"),
        "out.0": ("leaf", "conv_norm_out"),
        "out.2": ("leaf", "conv_out"),
        "middle_block.0": ("res", "mid_block.resnets.0"),
        "middle_block.1": ("attn", "mid_block.attentions.0"),
        "middle_block.2": ("res", "mid_block.resnets.1"),
    }
    # input_blocks[1 + sum of earlier levels' (R+1) + k]: level l, layer k; then the level's downsampler.
    i = 1
    for level in range(n_levels):
        for k in range(per_level[level]):
            table[f"input_blocks.{i}.0"] = ("res", f"down_blocks.{level}.resnets.{k}")
            if down_attn[level]:
                table[f"input_blocks.{i}.1"] = ("attn", f"down_blocks.{level}.attentions.{k}")
            i += 1
        if level < n_levels - 1:
            table[f"input_blocks.{i}.0"] = ("op", f"down_blocks.{level}.downsamplers.0")
            i += 1
    # output_blocks: up level u (deepest first) has R+1 layers; the upsampler follows the last layer's
    # resnet (+ transformer), so it sits at `.1` without attention and `.2` with (trap 8).
    i = 0
    for u in range(n_levels):
        n_layers = per_level[n_levels - 1 - u] + 1
        for k in range(n_layers):
            table[f"output_blocks.{i}.0"] = ("res", f"up_blocks.{u}.resnets.{k}")
            if up_attn[u]:
                table[f"output_blocks.{i}.1"] = ("attn", f"up_blocks.{u}.attentions.{k}")
            if k == n_layers - 1 and u < n_levels - 1:
                table[f"output_blocks.{i}.{2 if up_attn[u] else 1}"] = ("up", f"up_blocks.{u}.upsamplers.0")
            i += 1
    return table


def _rename(key: str, table: Mapping[str, tuple[str, str]]) -> str | None:
    """The diffusers key for one sgm key, or None when no rule applies."""
    parts = key.split(".")
    for cut in (3, 2):  # module prefixes are 3 parts (input_blocks.i.j) or 2 (middle_block.j, out.2)
        prefix, rest = ".".join(parts[:cut]), ".".join(parts[cut:])
        if prefix not in table or not rest:
            continue
        kind, target = table[prefix]
        if kind == "leaf":
            new_rest = rest if rest in ("weight", "bias") else None
        elif kind == "res":
            new_rest = _rename_resblock(rest)
        elif kind == "attn":
            new_rest = _rename_transformer(rest)
        elif kind == "op":  # sgm Downsample's strided conv is `op`; diffusers' Downsample2D calls it conv
            new_rest = "conv." + rest[len("op.") :] if rest.startswith("op.") else None
        else:  # "up": Upsample.conv keeps its name
            new_rest = rest if rest.startswith("conv.") else None
        return f"{target}.{new_rest}" if new_rest is not None else None
    return None


def _expected_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of `SV3DUNet(**config)`, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = SV3DUNet(**config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def convert_unet_state(sgm_state: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """sgm UNet state dict (prefix stripped) -> `SV3DUNet` state dict for `config`.

    Tensors are passed through unchanged (no copy; meta tensors stay meta). Raises InputError naming every
    sgm key that maps to nothing, every `SV3DUNet` key left without a tensor, and every shape mismatch.
    """
    table = _module_map(config)
    expected = _expected_shapes(config)
    converted: dict[str, Tensor] = {}
    unconsumed: list[str] = []
    mismatched: dict[str, str] = {}  # diffusers key -> description
    for key, value in sgm_state.items():
        new_key = _rename(key, table)
        if new_key is None or new_key not in expected or new_key in converted or new_key in mismatched:
            unconsumed.append(key)
        elif tuple(value.shape) != expected[new_key]:
            mismatched[new_key] = f"{key} {list(value.shape)} (expected {list(expected[new_key])})"
        else:
            converted[new_key] = value
    missing = [k for k in expected if k not in converted and k not in mismatched]
    problems = []
    if unconsumed:
        problems.append(f"{len(unconsumed)} unexpected keys: {listing(unconsumed)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {listing(list(mismatched.values()))}")
    if missing:
        problems.append(f"{len(missing)} missing SV3DUNet keys: {listing(missing)}")
    if problems:
        raise InputError("UNet checkpoint: " + "; ".join(problems))
    return converted


def load_sv3d_unet(
    sgm_state: Mapping[str, Tensor],
    num_head_channels: int = DEFAULT_NUM_HEAD_CHANNELS,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> SV3DUNet:
    """An `SV3DUNet` in eval mode from an sgm UNet state dict (prefix `model.diffusion_model.` stripped).

    The model is built on the meta device and takes the checkpoint tensors as its parameters (strict load,
    `assign=True`: no random init, no second copy); with `device`/`dtype` each tensor is moved or cast first.
    Meta tensors in, meta model out (shape checks without memory).
    """
    config = unet_config_from_state(sgm_state, num_head_channels)
    state = convert_unet_state(sgm_state, config)
    if device is not None or dtype is not None:
        # Tensor by tensor, so a memory-mapped fp32 checkpoint never exists twice in RAM.
        state = {
            k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in state.items()
        }
    with torch.device("meta"):
        model = SV3DUNet(**config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)  # inference weights, as the VAE and CLIP load
