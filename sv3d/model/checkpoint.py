"""Reading SV3D's original single-file checkpoints (sgm key layout) and splitting them into components.

Stability AI released SV3D as `sv3d_u.safetensors` and `sv3d_p.safetensors` holding the whole
`DiffusionEngine.state_dict()` of Stability-AI/generative-models (see ../shared/fixtures/sv3d_tiny/README.md,
"Full-size manifests"). Every key is either consumed by one of our components or on `IGNORED_PREFIXES`
with the reason; anything else is an error that names the keys, so nothing is silently dropped.

Memory: safetensors files are memory-mapped and read tensor by tensor; components are built on the meta
device and take the loaded tensors without copying (`load_state_dict(assign=True)`), which keeps peak
RAM near the file size. `.ckpt` files are read only with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..errors import InputError, listing

__all__ = [
    "COMPONENT_PREFIXES",
    "IGNORED_PREFIXES",
    "CheckpointError",
    "SV3DState",
    "detect_variant",
    "read_checkpoint",
    "split_components",
]


class CheckpointError(InputError):
    """A checkpoint file that is missing, unreadable, truncated, or not an SV3D checkpoint."""


# Component name -> key prefix in the sgm layout.
COMPONENT_PREFIXES: dict[str, str] = {
    "unet": "model.diffusion_model.",
    "clip_visual": "conditioner.embedders.0.open_clip.model.visual.",
    "vae_encoder": "conditioner.embedders.1.encoder.encoder.",
    "vae_quant_conv": "conditioner.embedders.1.encoder.quant_conv.",
    "vae_decoder": "first_stage_model.decoder.",
}

# Keys in the file that SV3D does not use, and why.
IGNORED_PREFIXES: dict[str, str] = {
    "conditioner.embedders.0.open_clip.model.token_embedding": "OpenCLIP text tower leftover",
    "conditioner.embedders.0.open_clip.model.positional_embedding": "OpenCLIP text tower leftover",
    "conditioner.embedders.0.open_clip.model.ln_final.": "OpenCLIP text tower leftover",
    "conditioner.embedders.0.open_clip.model.text_projection": "OpenCLIP text tower leftover",
    "conditioner.embedders.0.open_clip.model.logit_scale": "OpenCLIP text tower leftover",
    "conditioner.embedders.0.open_clip.model.transformer.": "OpenCLIP text transformer",
    "conditioner.embedders.1.encoder.decoder.": "cond-frame autoencoder's decoder: never used by SV3D",
    "conditioner.embedders.1.encoder.post_quant_conv.": "cond-frame autoencoder's post_quant_conv: unused",
}

# Markers of other models in the same family, for a helpful error.
SVD_VECTOR_WIDTH = 768  # Stable Video Diffusion's label_emb input: fps id, motion bucket, cond_aug (3 x 256)
_OTHER_MODELS = {
    "cond_stage_model.": "a Stable Diffusion 1.x/2.x checkpoint",
    "conditioner.embedders.0.transformer.": "an SDXL-style text-conditioned checkpoint",
    "model.diffusion_model.time_stack": "an unexpected video model layout",
}


@dataclass
class SV3DState:
    """A checkpoint split into components (prefixes stripped), plus what was found about it."""

    path: Path
    variant: str  # "sv3d_u" (no cameras) or "sv3d_p" (cameras)
    components: dict[str, dict[str, Tensor]]  # name -> state dict without its prefix
    ignored: list[str] = field(default_factory=list)  # keys on the ignore list


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """A flat sgm-layout state dict from `.safetensors` (memory-mapped) or `.ckpt` (weights_only)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.is_dir():
        raise CheckpointError(
            f"{path}: is a directory; a diffusers-format folder is loaded with load_pipeline"
        )
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(
                f"{path}: unreadable safetensors file (truncated or corrupt?): {exc}"
            ) from None
    if path.suffix in (".ckpt", ".pt", ".pth"):
        try:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:  # only zip-format files map; a legacy .ckpt is read whole
                if "mmap" not in str(exc):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises many types for bad pickles
            raise CheckpointError(
                f"{path}: unreadable torch checkpoint (only tensors are loaded, weights_only=True): "
                f"{(str(exc).splitlines() or [type(exc).__name__])[0]}"
            ) from None
        state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise CheckpointError(f"{path}: holds no tensor state dict")
        return state
    raise CheckpointError(
        f"{path}: unsupported checkpoint type {path.suffix!r} (expected .safetensors or .ckpt)"
    )


def detect_variant(state: dict[str, Tensor], path: str | Path = "checkpoint") -> str:
    """sv3d_u or sv3d_p, from the width of the vector-conditioning input (label_emb.0.0).

    sv3d_u's vector is the cond_aug embedding alone (width w); sv3d_p's is cond_aug + polar + azimuth with
    widths (w, 2w, 2w), 5w in all (1280 = 5 x 256 for the real model, 160 = 5 x 32 for the tiny one). So
    an input width divisible by 5 means sv3d_p. (The real sv3d_u has 256, the tiny one 32.)
    """
    key = COMPONENT_PREFIXES["unet"] + "label_emb.0.0.weight"
    for marker, what in _OTHER_MODELS.items():  # first: SDXL-style files have a label_emb too
        if any(k.startswith(marker) for k in state):
            raise CheckpointError(f"{path}: not an SV3D checkpoint (looks like {what})")
    if key not in state:
        if any(k.startswith(COMPONENT_PREFIXES["unet"]) for k in state):
            raise CheckpointError(
                f"{path}: not an SV3D checkpoint (UNet has no vector conditioning {key!r}; "
                "an SVD or image model?)"
            )
        raise CheckpointError(f"{path}: not an SV3D checkpoint (no {COMPONENT_PREFIXES['unet']}* keys)")
    adm = state[key].shape[1]
    if adm == SVD_VECTOR_WIDTH:
        raise CheckpointError(
            f"{path}: not an SV3D checkpoint (its vector conditioning is {adm} wide: Stable Video "
            "Diffusion's fps, motion bucket and cond_aug; SV3D's is 256 (sv3d_u) or 1280 (sv3d_p))"
        )
    return "sv3d_p" if adm % 5 == 0 else "sv3d_u"


def split_components(state: dict[str, Tensor], path: str | Path = "checkpoint") -> SV3DState:
    """Split a flat state dict by component; every key is consumed or ignored, else CheckpointError."""
    variant = detect_variant(state, path)
    components: dict[str, dict[str, Tensor]] = {name: {} for name in COMPONENT_PREFIXES}
    ignored, unknown = [], []
    for key, value in state.items():
        for name, prefix in COMPONENT_PREFIXES.items():
            if key.startswith(prefix):
                components[name][key[len(prefix) :]] = value
                break
        else:
            if any(key.startswith(p) for p in IGNORED_PREFIXES):
                ignored.append(key)
            else:
                unknown.append(key)
    if unknown:
        raise CheckpointError(f"{path}: {len(unknown)} keys belong to no SV3D component: {listing(unknown)}")
    missing = [name for name, part in components.items() if not part]
    if missing:
        raise CheckpointError(f"{path}: not a complete SV3D checkpoint: no weights for {listing(missing)}")
    return SV3DState(path=Path(path), variant=variant, components=components, ignored=ignored)
