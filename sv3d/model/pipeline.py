"""SV3D image -> 21-frame orbit: the components and one `__call__` whose body is the reference's steps.

Follows Stability-AI/generative-models `scripts/sampling/simple_video_sample.py` (version sv3d_u / sv3d_p)
with its sgm sampler, as described in ../shared/fixtures/sv3d_tiny/README.md: conditioning from the clean
image (CLIP) and the noise-augmented one (VAE mean, unscaled), v-prediction EDM denoiser, triangle CFG over
frames with the unconditional rows `[uncond ; cond]` first, deterministic Euler EDM steps, per-frame 2-D
decoding, the input view replacing the last frame, and `clamp((x + 1) / 2, 0, 1)`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import InputError
from .checkpoint import CheckpointError, read_checkpoint, split_components
from .clip import clip_preprocess, load_clip_vision  # noqa: F401  (clip_preprocess: public via here)
from .conditioner import SV3DConditioning, build_conditioning, concat_for_cfg
from .sampler import (
    EulerEDMSampler,
    apply_guidance,
    denoiser_scalings,
    scale_model_input,
    to_denoised,
    triangle_guidance_scales,
)
from .unet import SV3DUNet, load_sv3d_unet
from .vae import decode_frames, load_sv3d_vae

__all__ = [
    "SV3DOutput",
    "SV3DPipeline",
    "check_sgm_config",
    "check_vector_layout",
    "estimate_cpu_seconds",
    "read_folder_variant",
]

_CONFIG_FILE = "sv3d_pipeline.json"
REFERENCE_SEED = 23  # the reference script's default seed


@dataclass
class SV3DOutput:
    frames: Tensor  # [T, 3, H, W] in [0, 1]; the last frame is the input view
    latents: Tensor  # [T, 4, h, w] final latents, in 0.18215-scaled space
    timings: dict[str, float]


class SV3DPipeline:
    """SV3D as typed components: video UNet, VAE (encoder for conditioning, 2-D decoder), CLIP image tower."""

    def __init__(self, unet: SV3DUNet, vae, image_encoder, variant: str) -> None:
        if variant not in ("sv3d_u", "sv3d_p"):
            raise ValueError(f"variant must be sv3d_u or sv3d_p, got {variant!r}")
        self.unet = unet
        self.vae = vae
        self.image_encoder = image_encoder
        self.variant = variant
        self.offload_device: torch.device | None = None  # set by enable_cpu_offload

    # ---------------------------------------------------------------------------------------------
    # Loading and saving
    # ---------------------------------------------------------------------------------------------
    @classmethod
    def from_single_file(
        cls,
        path: str | Path,
        *,
        sgm_config: str | Path | None = None,  # the sgm yaml, for models with other head widths
        num_head_channels: int = 64,  # UNet head width: 64 in SV3D (not derivable from weights)
        clip_head_width: int = 80,  # OpenCLIP ViT-H/14 head width (not derivable from weights)
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> SV3DPipeline:
        """Load an original `sv3d_u` / `sv3d_p` checkpoint (sgm layout, .safetensors or .ckpt).

        The two head widths are not in the weights; SV3D's are the defaults. `sgm_config` (the model's
        yaml in generative-models' format, with an optional `open_clip_arch`) overrides both.
        """
        if sgm_config is not None:
            num_head_channels, clip_head_width = _head_widths_from_yaml(
                Path(sgm_config), num_head_channels, clip_head_width
            )
        state = read_checkpoint(path)
        parts = split_components(state, path)
        del state
        if sgm_config is not None:
            width = parts.components["unet"]["label_emb.0.0.weight"].shape[1]
            check_vector_layout(Path(sgm_config), parts.variant, width)
        c = parts.components
        unet = load_sv3d_unet(c["unet"], num_head_channels, device=device, dtype=dtype)
        # The reference runs the VAE in float32 even under autocast (disable_*_autocast): so do we.
        vae = load_sv3d_vae(  # float32 whatever the file holds (a half-precision conversion too)
            c["vae_encoder"], c["vae_quant_conv"], c["vae_decoder"], device=device, dtype=torch.float32
        )
        clip = load_clip_vision(c["clip_visual"], clip_head_width, dtype=dtype, device=device)
        return cls(unet, vae, clip, parts.variant)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> SV3DPipeline:
        """Load a diffusers-format folder written by `save_pretrained`: every weight must match (a missing,
        extra or misshapen one is a CheckpointError, not a warning and random values)."""
        from diffusers import AutoencoderKL
        from transformers import CLIPVisionModelWithProjection

        folder = Path(folder)
        variant = read_folder_variant(folder)
        loaded = SV3DUNet.from_pretrained(folder / "unet", torch_dtype=dtype, output_loading_info=True)
        unet = _strict(loaded, folder / "unet")
        vae = _strict(AutoencoderKL.from_pretrained(folder / "vae", output_loading_info=True), folder / "vae")
        clip = _strict(  # the VAE stays float32, as in the reference
            CLIPVisionModelWithProjection.from_pretrained(
                folder / "image_encoder", dtype=dtype, output_loading_info=True
            ),
            folder / "image_encoder",
        )
        width = unet.config.projection_class_embeddings_input_dim
        if (variant == "sv3d_p") != (width % 5 == 0):  # as detect_variant: sv3d_p's vector is 5 widths
            raise CheckpointError(
                f"{folder}: {_CONFIG_FILE} says {variant}, but the UNet's camera vector is {width} wide"
            )
        parts = [m.to(device).eval().requires_grad_(False) for m in (unet, vae, clip)]  # inference only
        return cls(*parts, variant)

    @classmethod
    def load(cls, path: str | Path, **kwargs) -> SV3DPipeline:
        """A single-file checkpoint or a diffusers-format folder, whichever `path` is."""
        path = Path(path)
        if path.is_dir():
            return cls.from_pretrained(path, **{k: v for k, v in kwargs.items() if k in ("device", "dtype")})
        return cls.from_single_file(path, **kwargs)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write a diffusers-format folder: unet/, vae/, image_encoder/ and sv3d_pipeline.json."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(folder / "unet")
        self.vae.save_pretrained(folder / "vae")
        self.image_encoder.save_pretrained(folder / "image_encoder")
        (folder / _CONFIG_FILE).write_text(json.dumps({"variant": self.variant}, indent=2))
        return folder

    # ---------------------------------------------------------------------------------------------
    # Devices
    # ---------------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SV3DPipeline:
        """Move every component; `dtype` applies to the UNet and CLIP (the VAE stays float32)."""
        for module in (self.unet, self.image_encoder):
            if dtype is not None and dtype != module.dtype:
                module.to(dtype=dtype)
            module.to(device=device)
        self.vae.to(device=device)
        return self

    def enable_cpu_offload(self, device: torch.device | str = "cuda") -> SV3DPipeline:
        """Keep components on the CPU and move each to `device` only while it runs (less GPU memory)."""
        self.offload_device = torch.device(device)
        return self.to("cpu")

    def _on(self, *modules: torch.nn.Module) -> None:
        """With offloading: these components on the device, the others back on the CPU."""
        if self.offload_device is not None:
            for other in (self.unet, self.vae, self.image_encoder):
                if all(other is not m for m in modules):
                    other.to("cpu")
            for module in modules:
                module.to(self.offload_device)

    def _device(self) -> torch.device:
        return self.offload_device or next(self.unet.parameters()).device

    # ---------------------------------------------------------------------------------------------
    # Sampling
    # ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def conditioning(
        self,
        image: Tensor,  # [1, 3, H, W] in [-1, 1]
        cond_frames_noise: Tensor,  # [1, 3, H, W] unit normal
        cond_aug: float,
        num_frames: int,
        polars_rad: Tensor | None = None,  # [T], sv3d_p only
        azimuths_rad: Tensor | None = None,  # [T], sv3d_p only
    ) -> tuple[SV3DConditioning, SV3DConditioning]:
        """(cond, uncond) for this model: the UNet's vector width decides the embedding widths."""
        return build_conditioning(
            image,
            cond_frames_noise,
            self.image_encoder,
            self.vae,
            adm_in_channels=self.unet.config.projection_class_embeddings_input_dim,
            cond_aug=cond_aug,
            num_frames=num_frames,
            polars_rad=polars_rad,
            azimuths_rad=azimuths_rad,
        )

    @torch.no_grad()
    def denoise(self, x: Tensor, sigma: Tensor, cond: SV3DConditioning, num_frames: int) -> Tensor:
        """D(x, sigma): one UNet call with v-prediction EDM scalings -> [N, 4, h, w] float32.

        x: [N, 4, h, w] noisy latents (scaled space); sigma: [N]; cond: N rows of conditioning.
        """
        dtype = self.unet.dtype
        c_noise = denoiser_scalings(sigma)[3]  # [N] = 0.25 ln(sigma)
        unet_in = torch.cat([scale_model_input(x, sigma), cond.concat.to(x)], dim=1)  # [N, 8, h, w]
        out = self.unet(
            unet_in.to(dtype),
            c_noise.float(),  # float32, as the reference: bfloat16 would round 0.25 ln(sigma) by up to 2^-8
            cond.crossattn.to(dtype),
            cond.vector.to(dtype),
            num_frames=num_frames,
        ).sample
        return to_denoised(out.float(), x, sigma)

    @torch.no_grad()
    def __call__(
        self,
        image: Tensor,  # [1, 3, H, W] in [-1, 1], the input view on white (H, W multiples of 8)
        polars_rad: Tensor | None = None,  # [T] float64, sv3d_p only (Orbit.model_conditioning())
        azimuths_rad: Tensor | None = None,  # [T] float64, relative to the last frame, sv3d_p only
        num_frames: int = 21,
        num_steps: int = 50,  # the reference's default
        seed: int = REFERENCE_SEED,
        cond_aug: float = 1e-5,  # the reference's SV3D value
        decode_chunk: int | None = None,  # frames decoded at once (no numeric effect: per-frame decoder);
        # None: 14, or 2 when offloading (the float32 VAE at 576² takes ~1 GB a frame: 14 at once were
        # about twice the sampling's peak, estimated, not measured on a GPU)
        cfg_batching: bool = True,  # uncond and cond in one UNet call (faster) or two (less memory)
        randn: Tensor | None = None,  # [T, 4, h, w] start noise, instead of drawing it from `seed`
        cond_frames_noise: Tensor | None = None,  # [1, 3, H, W] cond-augmentation noise, likewise
        progress: bool = False,
        callback: Callable[[int, Tensor, Tensor, Tensor], None] | None = None,
    ) -> SV3DOutput:
        timings: dict[str, float] = {}
        # 1. Check inputs
        if image.ndim != 4 or image.shape[:2] != (1, 3) or image.shape[-1] % 8 or image.shape[-2] % 8:
            raise InputError(f"image must be [1, 3, H, W] with H, W multiples of 8, got {tuple(image.shape)}")
        has_cameras = polars_rad is not None or azimuths_rad is not None
        if self.variant == "sv3d_u" and has_cameras:
            raise InputError(
                "sv3d_u takes no cameras: it generates its own static orbit (use sv3d_p for orbits)"
            )
        if self.variant == "sv3d_p" and not has_cameras:
            raise InputError("sv3d_p needs the orbit's cameras (polars_rad and azimuths_rad)")
        if num_steps < 1:
            raise InputError(f"num_steps must be >= 1, got {num_steps}")
        device, dtype = self._device(), self.dtype
        height, width = image.shape[-2:]
        latent_shape = (num_frames, self.unet.config.out_channels, height // 8, width // 8)
        generator = torch.Generator("cpu").manual_seed(seed)
        if cond_frames_noise is None:
            cond_frames_noise = torch.randn(image.shape, generator=generator)
        if randn is None:
            randn = torch.randn(latent_shape, generator=generator)
        if tuple(randn.shape) != latent_shape:
            raise InputError(f"randn must be {latent_shape}, got {tuple(randn.shape)}")

        # 2. Conditioning: CLIP of the clean image, VAE mean of the augmented one; uncond zeroes both
        start = time.perf_counter()
        self._on(self.image_encoder, self.vae)  # both on the device (the VAE alone moved the CLIP back)
        cond, uncond = self.conditioning(
            image.to(device, torch.float32),
            cond_frames_noise.to(device, torch.float32),
            cond_aug,
            num_frames,
            polars_rad,
            azimuths_rad,
        )
        batched = concat_for_cfg(uncond, cond).to(device, dtype)  # [2T, ...], unconditional first
        scales = triangle_guidance_scales(num_frames).to(device)  # [T]: 1 at both ends, 2.5 mid-orbit
        timings["conditioning_s"] = time.perf_counter() - start

        # 3. Denoiser: v-prediction with EDM scalings, CFG over [uncond ; cond]
        self._on(self.unet)

        def run_unet(x: Tensor, sigma: Tensor, rows: slice) -> Tensor:
            return self.denoise(x, sigma, batched.rows(rows), num_frames)

        def denoise(x: Tensor, sigma: Tensor) -> Tensor:
            if cfg_batching:
                d_u, d_c = run_unet(torch.cat([x, x]), torch.cat([sigma, sigma]), slice(None)).chunk(2)
            else:
                d_u = run_unet(x, sigma, slice(0, num_frames))
                d_c = run_unet(x, sigma, slice(num_frames, 2 * num_frames))
            return apply_guidance(d_u, d_c, scales, num_frames)

        # 4. Denoising loop: deterministic Euler EDM steps
        start = time.perf_counter()
        sampler = EulerEDMSampler(num_steps)
        latents = sampler.sample(
            denoise, randn.to(device, torch.float32), callback=callback, progress=progress
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings["sampling_s"] = time.perf_counter() - start

        # 5. Decode frame by frame, put the input view back as the last frame
        start = time.perf_counter()
        self._on(self.vae)
        if decode_chunk is None:
            decode_chunk = 2 if self.offload_device is not None else 14
        decoded = decode_frames(
            self.vae, latents.to(self.vae.dtype), chunk=decode_chunk
        ).float()  # [T, 3, H, W]
        decoded[-1] = image[0].to(decoded)
        frames = ((decoded + 1.0) / 2.0).clamp(0.0, 1.0)
        timings["decoding_s"] = time.perf_counter() - start
        if self.offload_device is not None:
            self.to("cpu")
        return SV3DOutput(frames=frames.cpu(), latents=latents.cpu(), timings=timings)


def read_folder_variant(folder: Path) -> str:
    """The variant (sv3d_u or sv3d_p) that a diffusers-format folder written by `save_pretrained` declares,
    checked with the folder's three components present."""
    config_file = folder / _CONFIG_FILE
    if not config_file.is_file():
        raise CheckpointError(f"{folder}: not an SV3D diffusers folder (no {_CONFIG_FILE})")
    try:
        variant = json.loads(config_file.read_text()).get("variant")
    except (OSError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{config_file}: unreadable: {str(exc).splitlines()[0]}") from None
    if variant not in ("sv3d_u", "sv3d_p"):
        raise CheckpointError(f"{config_file}: variant must be sv3d_u or sv3d_p, got {variant!r}")
    missing = [part for part in ("unet", "vae", "image_encoder") if not (folder / part).is_dir()]
    if missing:
        raise CheckpointError(f"{folder}: not a complete SV3D diffusers folder (no {', '.join(missing)})")
    return variant


def folder_unet_params(folder: Path) -> int | None:
    """The UNet's parameter count of a diffusers-format folder from its `unet/config.json` alone (the model
    is built on the meta device: no weight is read), or None where the config cannot make one (the load
    says why)."""
    try:
        config = SV3DUNet.load_config(folder / "unet")
        with torch.device("meta"):
            unet = SV3DUNet.from_config(config)
    except Exception:  # a broken folder is the loader's to report, in its words
        return None
    return sum(p.numel() for p in unet.parameters())


def _strict(loaded: tuple, where: Path) -> torch.nn.Module:
    """The model of `from_pretrained(..., output_loading_info=True)`, or CheckpointError when a weight was
    missing (left at random), unexpected or of another shape."""
    model, info = loaded
    problems = [
        f"{kind.replace('_', ' ')}: {', '.join(str(k) for k in list(keys)[:3])}"
        + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
        if (keys := list(info.get(kind) or []))
    ]
    if problems:
        raise CheckpointError(f"{where}: weights do not fit the model ({'; '.join(problems)})")
    return model


_OPEN_CLIP_HEAD_WIDTH = 64  # open_clip's VisionCfg.head_width default
_VECTOR_KEYS = ("cond_aug", "polars_rad", "azimuths_rad")  # the conditioner's vector embedders, in order


def check_sgm_config(path: Path, variant: str | None = None, width: int | None = None) -> None:
    """What loading with the sgm yaml `path` would refuse, checked before the weights load: an unreadable
    file, sampling settings other than SV3D's, and (given the checkpoint's variant and camera-vector
    width) another camera-vector layout."""
    _head_widths_from_yaml(path, 64, 80)  # from_single_file's defaults: only the checks matter here
    if variant is not None and width is not None:
        check_vector_layout(path, variant, width)


def check_vector_layout(path: Path, variant: str, width: int) -> None:
    """The camera vector's layout is read from the UNet's width (sv3d_p: cond_aug w, polar 2w, azimuth 2w
    for a width of 5w; sv3d_u: cond_aug alone): an sgm yaml whose vector embedders say otherwise names a
    model that this layout would condition wrongly without an error, so it is refused."""
    import yaml

    from .conditioner import vector_widths

    try:
        config = yaml.safe_load(path.read_text())
        models = config["model"]["params"]["conditioner_config"]["params"]["emb_models"]
        declared = {
            m["input_key"]: int(m["params"]["outdim"]) for m in models if m.get("input_key") in _VECTOR_KEYS
        }
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return  # no conditioner in the yaml (head widths only): nothing to compare
    if not declared:
        return
    expected = dict(zip(_VECTOR_KEYS, vector_widths(width, variant == "sv3d_p"), strict=False))
    if declared != expected:
        raise CheckpointError(
            f"{path}: its vector embedders ({declared}) are not the layout of this {variant} checkpoint's "
            f"{width}-wide camera vector ({expected}): an unsupported model"
        )


# What the pipeline implements (SV3D's sgm configs): (dotted key in the yaml, SV3D's value, sgm's default
# where the key's block is given without it; None: no default, not compared when absent). Others refused.
_SAMPLER = "model.params.sampler_config"
_GUIDER = f"{_SAMPLER}.params.guider_config"
_DISCRETIZATION = f"{_SAMPLER}.params.discretization_config"
_SV3D_SAMPLING: tuple[tuple[str, object, object], ...] = (
    ("model.params.scale_factor", 0.18215, 1.0),  # DiffusionEngine's default 1.0
    ("model.params.network_config.params.merge_strategy", "learned_with_images", "fixed"),  # VideoUNet's
    (
        "model.params.denoiser_config.params.scaling_config.target",
        "sgm.modules.diffusionmodules.denoiser_scaling.VScalingWithEDMcNoise",
        None,
    ),
    (f"{_SAMPLER}.target", "sgm.modules.diffusionmodules.sampling.EulerEDMSampler", None),
    (f"{_SAMPLER}.params.s_churn", 0.0, 0.0),
    (f"{_DISCRETIZATION}.target", "sgm.modules.diffusionmodules.discretizer.EDMDiscretization", None),
    (f"{_DISCRETIZATION}.params.sigma_min", 0.002, 0.002),
    (f"{_DISCRETIZATION}.params.sigma_max", 700.0, 80.0),  # EDMDiscretization's default is EDM's 80
    (f"{_DISCRETIZATION}.params.rho", 7.0, 7.0),
    (f"{_GUIDER}.target", "sgm.modules.diffusionmodules.guiders.TrianglePredictionGuider", None),
    (f"{_GUIDER}.params.min_scale", 1.0, 1.0),
    (f"{_GUIDER}.params.max_scale", 2.5, None),
    (f"{_GUIDER}.params.period", 1.0, 1.0),
)


def _check_sampling_settings(config: dict, path: Path) -> None:
    """Refuses a yaml whose sampler, guider, denoiser scaling, latent scale or merge strategy differ from
    SV3D's: they would be ignored (the pipeline samples as SV3D's configs say), giving another model's
    output silently. A key left out of a block that is given takes sgm's default, as sgm would."""
    for key, ours, default in _SV3D_SAMPLING:
        *parents, name = key.split(".")
        node: object = config
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue  # the block is not in the yaml (a head-width-only yaml): nothing stated
        value = node.get(name, default)
        if value is None:
            continue
        same = value == ours if isinstance(ours, str) else _close(value, float(ours))
        if not same:
            raise InputError(
                f"{path}: {'.'.join(p for p in key.split('.')[-3:] if p != 'params')} = {value!r}"
                f"{'' if name in node else ' (sgm default)'}, but "
                f"this pipeline samples as SV3D ({ours!r}): an unsupported configuration"
            )


def _close(value: object, expected: float) -> bool:
    try:
        return math.isclose(float(value), expected, rel_tol=1e-9)
    except (TypeError, ValueError):
        return False


def _head_widths_from_yaml(path: Path, unet_default: int, clip_default: int) -> tuple[int, int]:
    """(UNet num_head_channels, CLIP head width) from an sgm yaml; defaults where it says nothing. A yaml
    that asks for sampling settings other than SV3D's (which this pipeline implements) is refused."""
    import yaml

    from .unet import num_head_channels_from_sgm_config

    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"{path}: cannot read the sgm config: {str(exc).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise InputError(f"{path}: not an sgm config (a YAML mapping expected, got {type(config).__name__})")
    _check_sampling_settings(config, path)
    unet = num_head_channels_from_sgm_config(config) if "model" in config else unet_default
    vision = ((config.get("open_clip_arch") or {}).get("config") or {}).get("vision_cfg") or {}
    # an architecture spelled out without head_width has OpenCLIP's default, 64; none: the real ViT-H/14's
    return unet, int(vision.get("head_width", _OPEN_CLIP_HEAD_WIDTH if vision else clip_default))


def estimate_cpu_seconds(unet_params: int, height: int, width: int, num_frames: int, num_steps: int) -> float:
    """A rough CPU run-time estimate for sampling, from the UNet size and this machine's matmul speed.

    FLOPs per frame and UNet call ~ 0.11 x 2 x params x latent pixels (calibrated on Stable Diffusion's
    UNet: ~0.8 TFLOP for 860 M parameters at 64x64 latents); two calls (CFG) per frame and step.
    """
    flops = 0.11 * 2.0 * unet_params * (height // 8) * (width // 8) * num_frames * 2 * num_steps
    a = torch.randn(1024, 1024)
    a @ a  # warm-up: thread pool and BLAS initialisation
    start = time.perf_counter()
    for _ in range(4):
        a @ a
    rate = 4 * 2 * 1024**3 / max(time.perf_counter() - start, 1e-9)  # FLOP/s of dense float32 matmul
    return flops / rate if math.isfinite(rate) else float("inf")
