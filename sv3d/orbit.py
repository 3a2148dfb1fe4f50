"""`sv3d orbit`: one photo -> SV3D's 21-frame orbit, written as an orbit directory with a preview video.

Stage 1 of ARCHITECTURE.md's data flow: preprocess the photo (mask, centre, 576², white), sample SV3D
(`sv3d.model.pipeline`, exactly as the reference), matte the generated frames against their white
background (`alpha_source: matting`; the last frame, the input view, keeps the input's alpha), and write
`frame_000.png`... + `transforms.json` + `preview.mp4`. Everything is checked before anything is written.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .cameras import Orbit, check_orbit_target, make_orbit, write_orbit_directory
from .device import pick_device
from .errors import InputError
from .matting import matte_white_background

__all__ = ["OrbitConfig", "check_checkpoint", "check_cpu_budget", "generate_orbit", "resolve_checkpoint"]

CPU_PARAM_LIMIT = 100_000_000  # above this UNet size a CPU run takes hours: refuse unless allowed
TRAINED_ELEVATION_DEG = 10.0  # SV3D's input views were rendered around this elevation


@dataclass
class OrbitConfig:
    checkpoint: str | None = None  # sv3d_p / sv3d_u .safetensors or a diffusers folder; else $SV3D_CHECKPOINT
    orbit: str | None = None  # "static" or "sine" (sv3d_p only); None: static for sv3d_p, none for sv3d_u
    steps: int = 50  # the reference's default
    seed: int = 23  # the reference's default
    input_elevation_deg: float = 10.0  # elevation at which the photo was taken
    cond_aug: float = 1e-5
    resolution: int = 576  # SV3D's frame size
    background: str = "auto"  # matting for photos without alpha: auto | rembg | plain
    device: str = "auto"
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU; or float32 | bfloat16 | float16
    offload: bool = False  # keep idle components on the CPU (less GPU memory)
    allow_cpu: bool = False  # run the full-size model on a CPU anyway (hours)
    sgm_config: str | None = None  # sgm yaml for models with non-SV3D head widths (e.g. the tiny test ones)
    progress: bool = True


def resolve_checkpoint(checkpoint: str | None) -> Path:
    """The checkpoint path from the argument or $SV3D_CHECKPOINT, checked to exist."""
    value = checkpoint or os.environ.get("SV3D_CHECKPOINT")
    if not value:
        raise InputError(
            "no SV3D checkpoint: pass --checkpoint PATH or set SV3D_CHECKPOINT "
            "(sv3d_p.safetensors / sv3d_u.safetensors from Stability AI, under its licence)"
        )
    path = Path(value).expanduser()
    if not path.exists():
        raise InputError(f"{path}: checkpoint not found")
    return path


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":  # bfloat16 where the GPU has it (compute capability 8.0, Ampere, and later), else
        # float16 (V100, T4: torch.cuda.is_bf16_supported() says yes there too, emulated)
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise InputError(f"--dtype must be auto, float32, bfloat16 or float16, got {name!r}")
    return table[name]


def _orbit_for(variant: str, config: OrbitConfig) -> Orbit:
    if variant == "sv3d_u" and config.orbit is not None:
        raise InputError(
            f"--orbit {config.orbit}: sv3d_u takes no cameras (its orbit is always static at the "
            "input elevation); leave --orbit out, or use the sv3d_p checkpoint"
        )
    return make_orbit(config.orbit or "static", config.input_elevation_deg)


def check_cpu_budget(unet_params: int | None, orbit: OrbitConfig) -> None:
    """Refuse, before anything is created, what generate_orbit would refuse: hours of sampling on a CPU."""
    if unet_params is None or unet_params <= CPU_PARAM_LIMIT or orbit.allow_cpu:
        return
    from .cameras import NUM_FRAMES
    from .model.pipeline import estimate_cpu_seconds

    hours = (
        estimate_cpu_seconds(unet_params, orbit.resolution, orbit.resolution, NUM_FRAMES, orbit.steps) / 3600
    )
    raise InputError(
        f"no CUDA GPU: sampling this {unet_params / 1e9:.1f} B-parameter UNet on the CPU would take about "
        f"{hours:.1f} h; pass --allow-cpu (Hydra: sv3d.allow_cpu=true) to run it anyway"
    )


def check_checkpoint(path: Path, orbit: OrbitConfig | None = None) -> int | None:
    """Cheap check of a checkpoint from its header (no weights read, except from a legacy .ckpt, which
    cannot be memory-mapped): a garbage, foreign or incomplete file fails before anything is created, and
    so does an orbit its variant cannot take (`orbit`: sv3d_u has no cameras, so no --orbit) or an sgm yaml
    whose camera vector has another layout.

    Returns the UNet's parameter count (for a diffusers folder, from its UNet config; None where that
    cannot be read).
    """
    from .model.checkpoint import COMPONENT_PREFIXES, read_checkpoint, split_components
    from .model.pipeline import check_sgm_config

    prefix = COMPONENT_PREFIXES["unet"]
    sgm_config = Path(orbit.sgm_config) if orbit is not None and orbit.sgm_config else None
    if path.is_dir():
        from .model.pipeline import folder_unet_params, read_folder_variant

        variant = read_folder_variant(path)
        if orbit is not None:
            _orbit_for(variant, orbit)
        if sgm_config is not None:
            check_sgm_config(sgm_config)
        return folder_unet_params(path)  # so that a CPU run is refused before gigabytes are read
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118 - no __iter__
        except (SafetensorError, OSError, ValueError) as exc:
            raise InputError(f"{path}: unreadable safetensors checkpoint (corrupt?): {exc}") from None
    elif path.suffix in (".ckpt", ".pt", ".pth"):
        shapes = {k: tuple(v.shape) for k, v in read_checkpoint(path).items()}  # memory-mapped where it can
    else:
        raise InputError(
            f"{path}: unsupported checkpoint type {path.suffix!r} (expected .safetensors or .ckpt)"
        )
    # the loader's own split on shape-only tensors: foreign models, unknown keys, missing components
    state = split_components({k: torch.empty(shape, device="meta") for k, shape in shapes.items()}, path)
    if orbit is not None:
        _orbit_for(state.variant, orbit)
        if sgm_config is not None:  # other sampling settings or camera-vector layout: refused now
            check_sgm_config(sgm_config, state.variant, shapes[prefix + "label_emb.0.0.weight"][1])
    return int(sum(math.prod(shape) for k, shape in shapes.items() if k.startswith(prefix)))


def generate_orbit(
    image_path: str | Path,
    output_dir: str | Path,
    config: OrbitConfig | None = None,
    overwrite: bool = False,
    conditioning: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Path:
    """Photo -> orbit directory (generated frames, cameras, preview.mp4). Returns the directory.
    `conditioning`: this photo's `preprocess_image(image_path, config.resolution, background=...)` result
    when the caller has it already (`sv3d run` checks the photo first): not computed again."""
    from .model.pipeline import SV3DPipeline
    from .preprocess import preprocess_image
    from .video import write_video

    config = config or OrbitConfig()
    out = Path(output_dir)
    # 1. Check inputs: nothing is created before all of them pass
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InputError(f"{out}: output directory exists and is not empty (use --force to replace it)")
    if config.resolution < 64 or config.resolution % 8:
        raise InputError(f"--resolution must be a multiple of 8 and >= 64, got {config.resolution}")
    if config.steps < 1:
        raise InputError(f"--steps must be >= 1, got {config.steps}")
    if abs(config.input_elevation_deg - TRAINED_ELEVATION_DEG) > 20.0:
        print(
            f"sv3d: warning: input elevation {config.input_elevation_deg:g} deg is far from the ~10 deg SV3D "
            "was trained on; expect worse orbits",
            file=sys.stderr,
        )
    checkpoint = resolve_checkpoint(config.checkpoint)
    unet_params = check_checkpoint(checkpoint, config)  # its header: the variant takes the orbit asked for
    if conditioning is not None and conditioning[1].shape == (config.resolution, config.resolution):
        image, alpha = conditioning
    else:
        image, alpha = preprocess_image(image_path, size=config.resolution, background=config.background)
    device = pick_device(config.device)
    dtype = _dtype(config.dtype, device)
    if device.type == "cpu":
        check_cpu_budget(unet_params, config)  # before loading gigabytes of weights
    check_orbit_target(out, overwrite)  # what writing would refuse, after minutes of sampling

    # 2. Load the model (on the CPU when offloading) and refuse hours-long CPU runs unless asked
    pipe = SV3DPipeline.load(
        checkpoint, device="cpu" if config.offload else device, dtype=dtype, sgm_config=config.sgm_config
    )
    orbit = _orbit_for(pipe.variant, config)
    if device.type == "cpu" and unet_params is None:  # a folder whose UNet config did not say: known now
        check_cpu_budget(sum(p.numel() for p in pipe.unet.parameters()), config)
    if config.offload:
        pipe.enable_cpu_offload(device)

    # 3. Sample
    cameras = {}
    if pipe.variant == "sv3d_p":
        polars, azimuths = orbit.model_conditioning()
        cameras = {"polars_rad": polars, "azimuths_rad": azimuths}
    result = pipe(
        image,
        num_frames=len(orbit),
        num_steps=config.steps,
        seed=config.seed,
        cond_aug=config.cond_aug,
        progress=config.progress,
        **cameras,
    )

    # 4. Alpha by matting against white; the input view keeps the input's own alpha
    frames = result.frames.permute(0, 2, 3, 1).numpy()  # [T, 3, H, W] -> [T, H, W, 3]
    rgba = matte_white_background(frames)  # [T, H, W, 4]
    a_in = alpha.numpy().astype(np.float32)
    rgb_in = np.clip((frames[-1] - (1.0 - a_in[..., None])) / np.maximum(a_in[..., None], 1e-3), 0.0, 1.0)
    rgba[-1] = np.concatenate([np.where(a_in[..., None] > 1e-3, rgb_in, 0.0), a_in[..., None]], axis=-1)

    # 5. Write the orbit directory (atomically), then the preview into it
    written = write_orbit_directory(out, orbit, rgba, "matting", overwrite=overwrite)
    write_video(written / "preview.mp4", frames)
    return written
