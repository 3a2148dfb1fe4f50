"""SV3D's sampler: EDM (Karras) discretization, v-prediction denoiser scalings, triangle CFG, Euler EDM steps.

Reproduces, bit for bit in float32 on CPU, the sampling loop of the reference implementation
(Stability-AI/generative-models, commit 0ad7de9, `sgm/modules/diffusionmodules/`):

* `discretizer.py` `EDMDiscretization` (Karras et al. 2022, "Elucidating the Design Space of
  Diffusion-Based Generative Models", eq. 5): n sigmas from sigma_max down to sigma_min, then a final 0;
  computed in float32 torch, which is what gives the fixture's `[700.00012, 70.540863, 2.2691193,
  0.0020000036, 0]` for 4 steps.
* `denoiser_scaling.py` `VScalingWithEDMcNoise`: v-prediction preconditioning (Salimans & Ho 2022,
  sigma_data = 1) with EDM's noise conditioning c_noise = 0.25 ln(sigma), the UNet's "timestep";
  `denoiser.py` `Denoiser`: D = F(c_in x, c_noise) c_out + x c_skip.
* `guiders.py` `TrianglePredictionGuider` (period 1, "max" fusing): per-frame CFG scales rising linearly
  from min_scale at the first frame to max_scale at the middle frame and back, mixing denoised
  predictions per frame: D = D_u + scale_t (D_c - D_u).
* `sampling.py` `EulerEDMSampler` with s_churn = 0 (deterministic): x_0 = randn sqrt(1 + sigma_0^2),
  then x <- x + (sigma_{i+1} - sigma_i) (x - D(x, sigma_i)) / sigma_i; the last step (to sigma 0)
  returns D up to rounding.

The module imports no model; like a diffusers scheduler it exposes `sigmas`, `timesteps` and `step()`,
and `sample()` drives any `denoise_fn(x, sigma) -> D` callable (the pipeline's CFG-batched UNet call).

Why not diffusers' `EulerDiscreteScheduler`
--------------------------------------------
Configured as SVD's scheduler (Karras sigmas with sigma_min 0.002 / sigma_max 700, `v_prediction`,
continuous timesteps, `timestep_spacing="leading"`, final sigma 0) it implements the same maths, but it
does not reproduce the reference to the 1e-6 relative bar (measured with diffusers 0.42,
`tests/test_sv3d_sampler.py::test_diffusers_karras_schedule_is_not_exact`):

1. It computes the Karras schedule in float64 numpy and rounds once: `[700.0, 70.540840, 2.2691164,
   0.0020000001, 0]`. The reference evaluates the same formula in float32, whose rounding of
   `max_inv_rho + ramp (min_inv_rho - max_inv_rho)` is amplified by the 7th power: up to 1.75e-6
   relative (at sigma_min), and its initial noise scale is 700.00073 instead of 700.00085.
2. In `v_prediction` mode `step()` takes the UNet output and rebuilds D with `x / (sigma^2 + 1)` instead
   of `x * (1 / (sigma^2 + 1))`: about 1e-7 absolute off the reference's D (SV3D also guides D, not
   the UNet output; equal in exact arithmetic only).

Fed our float32 schedule (`set_timesteps(sigmas=...)`) with `prediction_type="sample"` and given D,
its step is bit-identical to ours (tested), but then it only contributes a stateful step counter and
meaningless discrete timesteps. So this small module stays the implementation; diffusers' scheduler
remains an equivalent (to ~2e-6 relative) choice for a diffusers-format pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from sv3d.errors import InputError

__all__ = [
    "EulerEDMSampler",
    "apply_guidance",
    "denoiser_scalings",
    "edm_sigmas",
    "scale_model_input",
    "to_denoised",
    "triangle_guidance_scales",
]

DenoiseFn = Callable[[Tensor, Tensor], Tensor]  # (x [N, C, h, w], sigma [N]) -> D [N, C, h, w]
StepCallback = Callable[[int, Tensor, Tensor, Tensor], None]  # (i, sigma [N], x_i, D_i)


def edm_sigmas(
    num_steps: int,
    sigma_min: float = 0.002,  # SV3D's config (sgm EDMDiscretization); the training range of EDM
    sigma_max: float = 700.0,  # SV3D/SVD raise EDM's 80 to 700 for high-resolution video latents
    rho: float = 7.0,  # EDM's spacing exponent: denser steps at low noise
) -> Tensor:
    """Karras/EDM noise levels for `num_steps` Euler steps, plus a final 0.

    sigma_k = (sigma_max^(1/rho) + k/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, k = 0..n-1,
    evaluated in float32 torch on CPU exactly as the reference, then 0 appended.

    Returns:
        sigmas: [num_steps + 1] float32 on CPU, decreasing, sigmas[-1] == 0.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise InputError(f"number of sampling steps {num_steps!r}: expected an integer >= 1")
    if not 0.0 < sigma_min < sigma_max:
        raise InputError(f"sigma range ({sigma_min}, {sigma_max}): expected 0 < sigma_min < sigma_max")
    if not rho > 0.0:
        raise InputError(f"rho {rho}: expected > 0")
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float32)  # [n], in [0, 1]
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho  # [n]
    return torch.cat([sigmas, sigmas.new_zeros([1])])  # [n + 1]


def denoiser_scalings(sigma: Tensor | float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """v-prediction preconditioning with EDM noise conditioning (sigma_data = 1).

    c_skip = 1 / (sigma^2 + 1), c_out = -sigma / sqrt(sigma^2 + 1), c_in = 1 / sqrt(sigma^2 + 1),
    c_noise = 0.25 ln(sigma) (the UNet's timestep). Same shape and dtype as `sigma` (a float becomes a
    0-dim float32 tensor); sigma must be > 0.
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float32) if not isinstance(sigma, Tensor) else sigma
    c_skip = 1.0 / (sigma**2 + 1.0)
    c_out = -sigma / (sigma**2 + 1.0) ** 0.5
    c_in = 1.0 / (sigma**2 + 1.0) ** 0.5
    c_noise = 0.25 * sigma.log()
    return c_skip, c_out, c_in, c_noise


def _per_row(values: Tensor, like: Tensor) -> Tensor:
    """[N] or [] -> [N, 1, ..., 1] (or [1, ..., 1]) on `like`'s device, for per-sample broadcasting."""
    values = values.to(device=like.device)
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def scale_model_input(x: Tensor, sigma: Tensor) -> Tensor:
    """The UNet's noisy-latent input c_in * x; x [N, C, h, w], sigma [N] (or 0-dim)."""
    _, _, c_in, _ = denoiser_scalings(sigma)
    return x * _per_row(c_in, x)


def to_denoised(model_output: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
    """D = F c_out + x c_skip (reference order); model_output F and x [N, C, h, w], sigma [N] (or 0-dim)."""
    c_skip, c_out, _, _ = denoiser_scalings(sigma)
    return model_output * _per_row(c_out, model_output) + x * _per_row(c_skip, x)


def triangle_guidance_scales(
    num_frames: int = 21,  # SV3D's orbit length
    min_scale: float = 1.0,  # first and last frames: the last is the input view, the first its neighbour
    max_scale: float = 2.5,  # the middle frame, the back of the object, gets the most guidance
    period: float = 1.0,  # one triangle over the orbit (the reference's only SV3D setting)
) -> Tensor:
    """Per-frame CFG scales of `TrianglePredictionGuider`, float32 [num_frames], bit-equal to the reference.

    v_t = t / (T - 1) / period; scale_t = min + (max - min) * 2 |v_t - floor(v_t + 1/2)|.
    For T = 21: 1.0, 1.15, ..., 2.5 (frame 10), ..., 1.15, 1.0.
    """
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise InputError(f"number of frames {num_frames!r}: expected an integer >= 1")
    if not period > 0.0:
        raise InputError(f"guidance period {period}: expected > 0")
    values = torch.linspace(0, 1, num_frames)  # [T], float32
    triangle = 2 * (values / period - torch.floor(values / period + 0.5)).abs()  # [T], in [0, 1]
    return triangle * (max_scale - min_scale) + min_scale  # [T]


def apply_guidance(
    denoised_uncond: Tensor,  # [B*T, C, h, w], row b*T + t
    denoised_cond: Tensor,  # [B*T, C, h, w]
    scales: Tensor,  # [T]
    num_frames: int,
) -> Tensor:
    """Per-frame classifier-free guidance on denoised predictions: D_u + scale_t (D_c - D_u) [B*T, C, h, w].

    Mixing D rather than the UNet outputs is the reference's order (equal in exact arithmetic).
    """
    if denoised_uncond.shape != denoised_cond.shape:
        shapes = f"{tuple(denoised_uncond.shape)} and {tuple(denoised_cond.shape)}"
        raise ValueError(f"apply_guidance: uncond and cond shapes differ: {shapes}")
    if scales.shape != (num_frames,) or denoised_cond.shape[0] % num_frames:
        raise ValueError(
            f"apply_guidance: scales {tuple(scales.shape)} and batch {denoised_cond.shape[0]} "
            f"do not fit {num_frames} frames"
        )
    rows = denoised_cond.shape
    u = denoised_uncond.reshape(-1, num_frames, *rows[1:])  # [B*T, ...] -> [B, T, ...]
    c = denoised_cond.reshape(-1, num_frames, *rows[1:])  # [B*T, ...] -> [B, T, ...]
    scale = scales.to(device=c.device).reshape(1, num_frames, *([1] * (len(rows) - 1)))  # [1, T, 1, ...]
    return (u + scale * (c - u)).reshape(rows)  # [B, T, ...] -> [B*T, ...]


class EulerEDMSampler:
    """Deterministic Euler sampler on the EDM schedule (the reference's `EulerEDMSampler`, s_churn = 0).

    Usage, as a diffusers scheduler:

        sampler = EulerEDMSampler(num_steps=50)
        x = sampler.init_noise(randn)                      # [N, C, h, w]
        for i in range(sampler.num_steps):
            sigma = sampler.sigmas[i]                       # UNet timestep: sampler.timesteps[i]
            x = sampler.step(x, denoise(x, sigma), i)

    or `sampler.sample(denoise_fn, randn)`. The state x is kept at least float32 (as in the reference,
    where D comes out float32 even under autocast).
    """

    def __init__(
        self,
        num_steps: int = 50,  # the real SV3D script's default
        sigma_min: float = 0.002,
        sigma_max: float = 700.0,
        rho: float = 7.0,
    ) -> None:
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.rho = rho
        self.set_timesteps(num_steps)

    def set_timesteps(self, num_steps: int) -> None:
        """Sets `sigmas` [num_steps + 1] (float32, CPU) and `timesteps` = c_noise [num_steps]."""
        self.sigmas = edm_sigmas(num_steps, self.sigma_min, self.sigma_max, self.rho)  # [n + 1]
        self.timesteps = denoiser_scalings(self.sigmas[:-1])[3]  # [n], 0.25 ln(sigma)
        self.num_steps = num_steps

    def init_noise(self, randn: Tensor) -> Tensor:
        """Scales unit-normal noise to the first state: randn * sqrt(1 + sigma_0^2) (not randn * sigma_0)."""
        dtype = torch.promote_types(randn.dtype, torch.float32)
        sigma0 = self.sigmas[0].to(device=randn.device, dtype=dtype)
        return randn.to(dtype) * torch.sqrt(1.0 + sigma0**2.0)

    def step(self, x: Tensor, denoised: Tensor, i: int) -> Tensor:
        """One Euler step from sigma_i to sigma_{i+1}: x + (sigma_{i+1} - sigma_i) (x - D) / sigma_i.

        x, denoised: [N, C, h, w] -> [N, C, h, w] (at least float32).
        """
        if not 0 <= i < self.num_steps:
            raise IndexError(f"step index {i} outside 0..{self.num_steps - 1}")
        dtype = torch.promote_types(x.dtype, torch.float32)
        x = x.to(dtype)
        sigma = self.sigmas[i].to(device=x.device, dtype=dtype)
        next_sigma = self.sigmas[i + 1].to(device=x.device, dtype=dtype)
        d = (x - denoised.to(dtype)) / sigma  # the ODE derivative dx/dsigma
        return x + (next_sigma - sigma) * d

    def sample(
        self,
        denoise_fn: DenoiseFn,
        randn: Tensor,  # [N, C, h, w] unit-normal start noise
        num_steps: int | None = None,  # None: keep the current schedule
        callback: StepCallback | None = None,  # called with (i, sigma [N], x_i, D_i) before step i
        progress: bool | Callable[[Iterable[int]], Iterable[int]] | None = None,  # True: tqdm bar
    ) -> Tensor:
        """Runs the whole loop; returns the final sample [N, C, h, w] (scaled latent space for SV3D).

        `denoise_fn(x, sigma)` gets the state and the noise level of every row (sigma [N] float32 on x's
        device, as the reference's `s_in * sigma`) and returns the guided denoised D, shaped as x.
        """
        if num_steps is not None:
            self.set_timesteps(num_steps)
        steps: Iterable[int] = range(self.num_steps)
        if progress is True:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="sampling", unit="step")
        elif callable(progress):
            steps = progress(steps)
        x = self.init_noise(randn)
        for i in steps:
            sigma = x.new_ones([x.shape[0]]) * self.sigmas[i].to(x.device)  # [N]
            denoised = denoise_fn(x, sigma)
            if denoised.shape != x.shape:
                raise ValueError(f"denoise_fn returned {tuple(denoised.shape)} for x {tuple(x.shape)}")
            if callback is not None:
                callback(i, sigma, x, denoised)
            x = self.step(x, denoised, i)
        return x
