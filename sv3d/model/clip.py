"""SV3D's image encoder: OpenCLIP's ViT (ViT-H/14 in the real model) as transformers'
`CLIPVisionModelWithProjection`, its conversion from the sgm checkpoint, and the exact preprocessing.

The reference (Stability-AI/generative-models, `sgm/modules/encoders/modules.py`,
`FrozenOpenCLIPImageEmbedder`) resizes the image to 224x224 with kornia 0.6.9's antialiased bicubic
resize, maps [-1, 1] to [0, 1], normalises with the CLIP mean/std and takes the projected pooled CLS
token of `open_clip.model.visual`. SV3D uses that `[N, D]` embedding as a one-token cross-attention
context (Voleti et al. 2024, "SV3D", sec. 3.2, following SVD).

Key rules (OpenCLIP `visual.*` -> transformers): `conv1` -> `embeddings.patch_embedding` (no bias),
`class_embedding`, `positional_embedding` -> `embeddings.{class_embedding,position_embedding.weight}`,
`ln_pre` -> `pre_layrnorm`, `transformer.resblocks.i.{ln_1, attn.in_proj_*, attn.out_proj, ln_2, mlp.c_fc,
mlp.c_proj}` -> `encoder.layers.i.{layer_norm1, self_attn.{q,k,v}_proj (split), self_attn.out_proj,
layer_norm2, mlp.fc1, mlp.fc2}`, `ln_post` -> `post_layernorm`, `proj [width, D]` ->
`visual_projection.weight` transposed. The OpenCLIP text-tower leftovers in the file
(`OPENCLIP_TEXT_LEFTOVERS`) are not used.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from ..errors import InputError, listing

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "OPENCLIP_TEXT_LEFTOVERS",
    "clip_config_from_state",
    "clip_image_embeds",
    "clip_preprocess",
    "convert_clip_state",
    "load_clip_vision",
]

# OpenAI CLIP normalisation, as registered by FrozenOpenCLIPImageEmbedder (non-persistent buffers).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Tensors under `conditioner.embedders.0.open_clip.model.` that SV3D never uses: the reference deletes the
# text transformer but keeps these (README "Full-size manifests").
OPENCLIP_TEXT_LEFTOVERS = (
    "token_embedding.weight",
    "positional_embedding",
    "ln_final.weight",
    "ln_final.bias",
    "text_projection",
    "logit_scale",
)

_VIT_H14_HEAD_WIDTH = 80  # ViT-H/14: width 1280, 16 heads of 80


def _get(state: dict[str, Tensor], key: str) -> Tensor:
    if key not in state:
        raise InputError(f"OpenCLIP visual state: missing key {key!r}; not an OpenCLIP ViT?")
    return state[key]


def _num_layers(state: dict[str, Tensor]) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))}
    if not found or found != set(range(len(found))):
        raise InputError(f"OpenCLIP visual state: transformer blocks {sorted(found)} are not 0..N-1")
    return len(found)


def clip_config_from_state(
    visual_state: dict[str, Tensor],  # `...open_clip.model.visual.*`, prefix stripped
    head_width: int = _VIT_H14_HEAD_WIDTH,  # not in the weights: OpenCLIP's `vision_cfg.head_width`
) -> CLIPVisionConfig:
    """transformers `CLIPVisionConfig` for an OpenCLIP ViT, every size but the head width from shapes."""
    width = _get(visual_state, "class_embedding").shape[0]
    conv = _get(visual_state, "conv1.weight")  # [width, 3, patch, patch]
    if conv.ndim != 4 or conv.shape[2] != conv.shape[3]:
        raise InputError(
            f"OpenCLIP visual conv1.weight: expected a square patch conv, got {tuple(conv.shape)}"
        )
    patch = conv.shape[-1]
    positions = _get(visual_state, "positional_embedding").shape[0]  # grid^2 + 1 (CLS)
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise InputError(f"OpenCLIP visual positional_embedding: {positions} positions is not grid^2 + 1")
    if head_width <= 0 or width % head_width:
        raise InputError(f"CLIP head width {head_width} does not divide the transformer width {width}")
    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=_get(visual_state, "transformer.resblocks.0.mlp.c_fc.weight").shape[0],
        projection_dim=_get(visual_state, "proj").shape[1],
        num_hidden_layers=_num_layers(visual_state),
        num_attention_heads=width // head_width,
        num_channels=conv.shape[1],
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="gelu",  # ViT-H/14 uses exact GELU (not quick_gelu)
        layer_norm_eps=1e-5,  # torch.nn.LayerNorm default, as OpenCLIP
        attention_dropout=0.0,
    )


_LAYER_RULES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_TOP_RULES = {
    "class_embedding": "vision_model.embeddings.class_embedding",
    "positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "ln_post.weight": "vision_model.post_layernorm.weight",
    "ln_post.bias": "vision_model.post_layernorm.bias",
}


def convert_clip_state(visual_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A transformers `CLIPVisionModelWithProjection` state dict; InputError names every unconsumed key.

    Works on meta tensors (only renames, splits and a transpose).
    """
    out: dict[str, Tensor] = {}
    unused: list[str] = []
    for key, value in visual_state.items():
        if key in _TOP_RULES:
            out[_TOP_RULES[key]] = value
            continue
        if key == "proj":
            out["visual_projection.weight"] = value.t().contiguous()  # x @ proj == Linear with W = proj^T
            continue
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", key)
        m_qkv = re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key)
        if m_qkv:
            head = f"vision_model.encoder.layers.{m_qkv.group(1)}.self_attn"
            if value.shape[0] % 3:
                raise InputError(f"OpenCLIP visual {key}: first dim {value.shape[0]} is not 3 x width")
            # nn.MultiheadAttention packs [q; k; v] along dim 0: [3W, W] -> 3 x [W, W] (bias [3W] -> 3 x [W]).
            for name, part in zip(("q", "k", "v"), value.chunk(3, dim=0), strict=True):
                out[f"{head}.{name}_proj.{m_qkv.group(2)}"] = part
        elif m and m.group(2) in _LAYER_RULES:
            out[f"vision_model.encoder.layers.{m.group(1)}.{_LAYER_RULES[m.group(2)]}.{m.group(3)}"] = value
        else:
            unused.append(key)
    if unused:
        raise InputError(f"CLIP conversion: {len(unused)} keys not consumed: {listing(unused)}")
    return out


def load_clip_vision(
    visual_state: dict[str, Tensor],
    head_width: int = _VIT_H14_HEAD_WIDTH,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> CLIPVisionModelWithProjection:
    """The image tower, loaded strictly (every parameter present, nothing extra), in eval mode.

    Built on the meta device and filled with the given tensors, so the 632 M-parameter ViT-H/14 is not
    randomly initialised first.
    """
    config = clip_config_from_state(visual_state, head_width)
    state = convert_clip_state(visual_state)
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(config)
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise InputError(
            f"CLIP: converted state does not fit CLIPVisionModelWithProjection: missing "
            f"{listing(result.missing_keys)}; unexpected {listing(result.unexpected_keys)}"
        )
    # The one non-persistent buffer is not in any state dict: rebuild it off the meta device.
    embeddings = model.vision_model.embeddings
    embeddings.position_ids = torch.arange(embeddings.num_positions).expand((1, -1))  # [1, grid^2 + 1]
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise InputError(f"CLIP: tensors left uninitialised after loading: {meta}")
    model = model.to(device=device, dtype=dtype) if (device is not None or dtype is not None) else model
    return model.eval().requires_grad_(False)


def _gaussian_kernel1d(size: int, sigma: float) -> Tensor:
    """Normalised Gaussian taps `[size]` (float32), centred on size // 2, as kornia 0.6.9 `gaussian`."""
    x = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _blur(x: Tensor, kernel: Tensor, axis: int) -> Tensor:
    """Depthwise 1-D convolution of `x [N, C, H, W]` along `axis` (3: width, 2: height), reflect border."""
    n, c = x.shape[:2]
    k = kernel.shape[0]
    pad = (k // 2, k // 2, 0, 0) if axis == 3 else (0, 0, k // 2, k // 2)
    shape = (c, 1, 1, k) if axis == 3 else (c, 1, k, 1)
    weight = kernel.to(x).reshape(1, 1, *shape[2:]).expand(shape)  # [C, 1, 1, k] or [C, 1, k, 1]
    return F.conv2d(F.pad(x, pad, mode="reflect"), weight, groups=c)


def clip_preprocess(images: Tensor, size: int = 224) -> Tensor:
    """`[N, 3, H, W]` in [-1, 1] -> CLIP input `[N, 3, size, size]` (float32, or float64 for float64 input).

    kornia 0.6.9 `resize(x, (size, size), "bicubic", align_corners=True, antialias=True)`: when either
    axis is downscaled, first a separable Gaussian blur (width pass, then height pass, reflect border)
    with sigma = max((scale - 1) / 2, 0.001) per axis and kernel size int(max(4 sigma, 3)) forced odd;
    no blur at all when both axes are upscaled. Then bicubic interpolation, (x + 1) / 2, and
    (x - mean) / std with the CLIP statistics.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise InputError(
            f"CLIP preprocess: images must be [N, 3, H, W] in [-1, 1], got {tuple(images.shape)}"
        )
    x = images if images.dtype == torch.float64 else images.float()  # float64 stays (precision checks)
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        factors = (h / size, w / size)
        if max(factors) > 1:  # antialiasing only when downscaling
            sigmas = [max((f - 1.0) / 2.0, 0.001) for f in factors]
            sizes = [int(max(4.0 * s, 3)) for s in sigmas]
            sizes = [k + 1 if k % 2 == 0 else k for k in sizes]
            x = _blur(x, _gaussian_kernel1d(sizes[1], sigmas[1]), axis=3)
            x = _blur(x, _gaussian_kernel1d(sizes[0], sigmas[0]), axis=2)
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=True)  # [N, 3, size, size]
    x = (x + 1.0) / 2.0  # [-1, 1] -> [0, 1]
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device)[:, None, None]  # [3, 1, 1]
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device)[:, None, None]
    return (x - mean) / std


def clip_image_embeds(model: CLIPVisionModelWithProjection, images: Tensor) -> Tensor:
    """Projected pooled CLS embedding `[N, D]` of images `[N, 3, H, W]` in [-1, 1], preprocessing included."""
    pixels = clip_preprocess(images, size=model.config.image_size)  # [N, 3, 224, 224], float32
    pixels = pixels.to(device=model.device, dtype=model.dtype)
    return model(pixel_values=pixels).image_embeds  # [N, D]
