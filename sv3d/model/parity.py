"""Parity of our SV3D port with the original reference, on a fixture folder in the sv3d_tiny format.

Starts only from the fixture's `input/*` tensors and stored noise (plus the checkpoint and its sgm yaml)
and recomputes every stage the fixture README describes: conditioner outputs, one denoiser forward with
and without CFG batching, VAE encode and decode, and a full short sampling run. Camera angles come from
`input/elevations_deg` / `input/azimuths_deg` through `sv3d.cameras`, so orbits whose last absolute
azimuth is not 0 are covered too. `scripts/check_parity.py` is the command-line wrapper.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from ..cameras import explicit_orbit
from ..errors import InputError
from .clip import clip_image_embeds, clip_preprocess
from .conditioner import concat_for_cfg
from .pipeline import SV3DPipeline
from .sampler import (
    apply_guidance,
    triangle_guidance_scales,
)
from .vae import decode_frames, encode_moments

__all__ = ["ParityCheck", "run_parity", "SINGLE_FORWARD_ATOL", "FRAMES_ATOL"]

SINGLE_FORWARD_ATOL = 2e-5  # the norm-eps trap alone moves `denoised` by ~3e-5: this bar catches it
FRAMES_ATOL = 1e-4  # final frames in [0, 1]
LATENT_ATOL = 5e-4  # sampled latents and per-step denoised (README: atol 5e-4)


@dataclass
class ParityCheck:
    name: str
    max_abs: float
    max_rel: float  # max |a - b| / max |b|
    limit: float  # on max_abs, or on max_rel when `relative`
    relative: bool = False

    @property
    def passed(self) -> bool:
        return (self.max_rel if self.relative else self.max_abs) <= self.limit

    def line(self) -> str:
        measure = "rel" if self.relative else "abs"
        verdict = "ok  " if self.passed else "FAIL"
        return (
            f"{verdict} {self.name:34s} max abs {self.max_abs:9.3e}  max rel {self.max_rel:9.3e}  "
            f"(limit {measure} {self.limit:.0e})"
        )


def _compare(name: str, ours: Tensor, ref: Tensor, limit: float, relative: bool = False) -> ParityCheck:
    ours, ref = ours.detach().double().cpu(), ref.detach().double().cpu()
    if ours.shape != ref.shape:
        raise InputError(f"parity {name}: shape {tuple(ours.shape)} but the reference has {tuple(ref.shape)}")
    diff = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    return ParityCheck(name, diff, diff / scale if scale else diff, limit, relative)


def _fixture_files(fixture: Path, variant: str) -> tuple[Path, Path, Path, Path]:
    names = (
        f"tiny_{variant}.safetensors",
        f"tiny_{variant}.yaml",
        f"ref_{variant}.safetensors",
        f"ref_{variant}.json",
    )
    paths = tuple(fixture / n for n in names)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise InputError(f"fixture {fixture}: missing {', '.join(missing)}")
    return paths  # type: ignore[return-value]


@torch.no_grad()
def run_parity(fixture: str | Path, variant: str) -> list[ParityCheck]:
    """Every check of the fixture README for `variant` ("sv3d_u" or "sv3d_p")."""
    fixture = Path(fixture)
    ckpt, yaml_path, ref_path, json_path = _fixture_files(fixture, variant)
    ref = load_file(str(ref_path))
    settings = json.loads(json_path.read_text())
    pipe = SV3DPipeline.from_single_file(ckpt, sgm_config=yaml_path)
    if pipe.variant != variant:
        raise InputError(f"{ckpt}: detected {pipe.variant}, expected {variant}")
    num_frames = int(settings["num_frames"])
    cond_aug = float(settings["cond_aug"])
    image, noise = ref["input/image"], ref["input/cond_frames_noise"]
    checks: list[ParityCheck] = []
    tol = SINGLE_FORWARD_ATOL

    # 1. Cameras (sv3d_p): from the absolute angles through our conventions
    polars = azimuths = None
    if variant == "sv3d_p":
        orbit = explicit_orbit(ref["input/elevations_deg"], ref["input/azimuths_deg"])
        polars, azimuths = orbit.model_conditioning()
        checks.append(_compare("input/batch_polars_rad", polars, ref["input/batch_polars_rad"], 1e-12))
        checks.append(_compare("input/batch_azimuths_rad", azimuths, ref["input/batch_azimuths_rad"], 1e-12))

    # 2. Conditioner
    checks.append(
        _compare("emb/clip_preprocessed", clip_preprocess(image), ref["emb/clip_preprocessed"], tol)
    )
    checks.append(
        _compare(
            "emb/clip_image_embeds",
            clip_image_embeds(pipe.image_encoder, image),
            ref["emb/clip_image_embeds"],
            tol,
        )
    )
    if "clip576/image_uint8" in ref:
        img576 = ref["clip576/image_uint8"].float() / 255.0 * 2.0 - 1.0
        checks.append(
            _compare("clip576/preprocessed", clip_preprocess(img576), ref["clip576/preprocessed"], tol)
        )
        checks.append(
            _compare(
                "clip576/image_embeds",
                clip_image_embeds(pipe.image_encoder, img576),
                ref["clip576/image_embeds"],
                tol,
            )
        )
    cond, uncond = pipe.conditioning(image, noise, cond_aug, num_frames, polars, azimuths)
    for part in ("crossattn", "concat", "vector"):
        checks.append(
            _compare(f"cond/c_frames/{part}", getattr(cond, part), ref[f"cond/c_frames/{part}"], tol)
        )
        checks.append(
            _compare(f"cond/uc_frames/{part}", getattr(uncond, part), ref[f"cond/uc_frames/{part}"], tol)
        )

    # 3. One denoiser forward at the stored x, sigma: without and with CFG batching
    def denoise(x: Tensor, sigma: Tensor, c) -> Tensor:
        return pipe.denoise(x, sigma, c, num_frames)

    x, sigma = ref["denoise/x"], ref["denoise/sigma"]
    checks.append(_compare("denoise/denoised", denoise(x, sigma, cond), ref["denoise/denoised"], tol))
    batched = concat_for_cfg(uncond, cond)
    d_batched = denoise(torch.cat([x, x]), torch.cat([sigma, sigma]), batched)
    checks.append(
        _compare("denoise_cfg/denoised_batched", d_batched, ref["denoise_cfg/denoised_batched"], tol)
    )
    scales = triangle_guidance_scales(num_frames)
    checks.append(_compare("denoise_cfg/guider_scale", scales, ref["denoise_cfg/guider_scale"], 0.0))
    d_u, d_c = d_batched.chunk(2)
    checks.append(
        _compare(
            "denoise_cfg/guided", apply_guidance(d_u, d_c, scales, num_frames), ref["denoise_cfg/guided"], tol
        )
    )

    # 4. VAE encode (moments after quant_conv) and per-frame decode
    checks.append(
        _compare(
            "vae/enc_moments", encode_moments(pipe.vae, ref["vae/enc_input"]), ref["vae/enc_moments"], tol
        )
    )
    checks.append(
        _compare("vae/dec_output", decode_frames(pipe.vae, ref["vae/dec_input"]), ref["vae/dec_output"], tol)
    )

    # 5. A full short sampling run from the stored start noise
    per_step: list[tuple[Tensor, Tensor]] = []
    out = pipe(
        image,
        polars_rad=polars,
        azimuths_rad=azimuths,
        num_frames=num_frames,
        num_steps=int(settings["num_steps"]),
        cond_aug=cond_aug,
        randn=ref["sample/randn"],
        cond_frames_noise=noise,
        callback=lambda i, s, xi, di: per_step.append((xi, di)),
    )
    xs = torch.stack([p[0] for p in per_step])
    ds = torch.stack([p[1] for p in per_step])
    checks.append(_compare("sample/x_per_step", xs, ref["sample/x_per_step"], 1e-5, relative=True))
    checks.append(_compare("sample/denoised_per_step", ds, ref["sample/denoised_per_step"], LATENT_ATOL))
    checks.append(_compare("sample/latents", out.latents, ref["sample/latents"], LATENT_ATOL))
    checks.append(_compare("sample/frames", out.frames, ref["sample/frames"], FRAMES_ATOL))
    return checks
