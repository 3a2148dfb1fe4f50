"""The sampler against the reference fixtures (../shared/fixtures/sv3d_tiny, both variants) and by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sv3d.errors import InputError
from sv3d.model.sampler import (
    EulerEDMSampler,
    apply_guidance,
    denoiser_scalings,
    edm_sigmas,
    scale_model_input,
    to_denoised,
    triangle_guidance_scales,
)

VARIANTS = ["sv3d_u", "sv3d_p"]
FIXTURE_SIGMAS = [700.0001220703125, 70.54086303710938, 2.2691192626953125, 0.0020000035874545574, 0.0]


@pytest.fixture(scope="module", params=VARIANTS)
def ref(request, sv3d_tiny) -> dict[str, torch.Tensor]:
    return load_file(str(sv3d_tiny / f"ref_{request.param}.safetensors"))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()).abs() / b.double().abs().clamp_min(1e-30)).max())


# ---------------------------------------------------------------- schedule


def test_sigmas_match_fixture_exactly(ref):
    sigmas = edm_sigmas(4)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (5,)
    assert torch.equal(sigmas, ref["sample/sigmas"])  # float32 torch, as the reference: bit-equal
    assert sigmas.tolist() == FIXTURE_SIGMAS


def test_float64_schedule_differs_from_reference():
    # The Karras formula in float64 (as diffusers and numpy compute it) is the "true" schedule; the
    # reference rounds in float32 and the 7th power amplifies it: 1.75e-6 relative at sigma_min.
    ramp = np.linspace(0, 1, 4)
    lo, hi = 0.002 ** (1 / 7), 700.0 ** (1 / 7)
    exact = (hi + ramp * (lo - hi)) ** 7  # [700, 70.54084, 2.2691164, 0.002]
    rel = np.abs(np.asarray(FIXTURE_SIGMAS[:4]) - exact) / exact
    assert 1e-6 < rel.max() < 2e-6
    assert _rel(edm_sigmas(4)[:4], torch.from_numpy(exact)) == pytest.approx(rel.max(), rel=1e-3)


def test_sigmas_shape_and_ends():
    sigmas = edm_sigmas(50)
    assert sigmas.shape == (51,) and sigmas[-1] == 0
    assert torch.all(sigmas[1:] < sigmas[:-1])
    assert sigmas[0] == pytest.approx(700.0, rel=1e-6) and sigmas[-2] == pytest.approx(0.002, rel=1e-5)
    assert edm_sigmas(1).tolist() == [pytest.approx(700.0, rel=1e-6), 0.0]  # linspace(0, 1, 1) = [0]


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_step_count_raises(bad):
    with pytest.raises(InputError, match="steps"):
        edm_sigmas(bad)


def test_bad_sigma_range_raises():
    with pytest.raises(InputError, match="sigma"):
        edm_sigmas(4, sigma_min=1.0, sigma_max=0.5)


# ---------------------------------------------------------------- denoiser


def test_scalings_match_fixture(ref):
    c_skip, c_out, c_in, c_noise = denoiser_scalings(ref["denoise/sigma"])
    for name, ours in zip(
        ["c_skip", "c_out", "c_in", "c_noise"], [c_skip, c_out, c_in, c_noise], strict=True
    ):
        assert torch.equal(ours, ref[f"denoise/{name}"]), name


def test_scalings_by_hand():
    # sigma = 3: sigma^2 + 1 = 10 -> c_skip 0.1, c_out -3/sqrt(10), c_in 1/sqrt(10), c_noise ln(3)/4
    c_skip, c_out, c_in, c_noise = denoiser_scalings(3.0)
    assert float(c_skip) == pytest.approx(0.1, rel=1e-6)
    assert float(c_out) == pytest.approx(-3 / math.sqrt(10), rel=1e-6)
    assert float(c_in) == pytest.approx(1 / math.sqrt(10), rel=1e-6)
    assert float(c_noise) == pytest.approx(math.log(3) / 4, rel=1e-6)
    # v-prediction identity: with x = x0 + sigma eps and the target v = (eps - sigma x0) / sqrt(1 + sigma^2),
    # D = c_skip x + c_out v = x0 exactly.
    x0, eps, sigma = torch.randn(3, 4), torch.randn(3, 4), torch.tensor(3.0, dtype=torch.float64)
    x = x0.double() + sigma * eps.double()
    v = (eps.double() - sigma * x0.double()) / torch.sqrt(1 + sigma**2)
    assert torch.allclose(to_denoised(v, x, sigma), x0.double(), atol=1e-12)


def test_model_input_and_denoised_match_fixture(ref):
    x, sigma = ref["denoise/x"], ref["denoise/sigma"]
    unet_in = ref["denoise/unet_input"][:, :4]  # cat(c_in x, concat): the first 4 channels
    assert torch.equal(scale_model_input(x, sigma), unet_in)
    denoised = to_denoised(ref["denoise/unet_output"], x, sigma)
    assert torch.equal(denoised, ref["denoise/denoised"])


# ---------------------------------------------------------------- guidance


def test_guider_scales_exact(ref):
    scales = triangle_guidance_scales(21, 1.0, 2.5)
    assert scales.dtype == torch.float32
    assert torch.equal(scales, ref["denoise_cfg/guider_scale"])


def test_guider_scales_by_hand():
    scales = triangle_guidance_scales()
    # 1 + 1.5 * 2 t / 20 for t <= 10, symmetric: frames 0 and 20 unguided, frame 10 at max.
    expected = [1 + 1.5 * (1 - abs(t - 10) / 10) for t in range(21)]
    assert scales.tolist() == pytest.approx(expected, abs=2e-7)
    assert scales[0] == 1.0 and scales[-1] == 1.0 and scales[10] == 2.5


def test_apply_guidance_matches_fixture(ref):
    uncond, cond = ref["denoise_cfg/denoised_batched"].chunk(2)  # [uc ; c], 21 rows each
    guided = apply_guidance(uncond, cond, ref["denoise_cfg/guider_scale"], 21)
    err = float((guided - ref["denoise_cfg/guided"]).abs().max())
    assert err <= 1e-6, err  # measured: 0 (bit-equal)


def test_apply_guidance_is_per_frame_for_several_videos():
    # Two videos of 3 frames, scales [1, 2, 3]: row b*3 + t gets u + s_t (c - u).
    u = torch.zeros(6, 1, 2, 2)
    c = torch.ones(6, 1, 2, 2)
    out = apply_guidance(u, c, torch.tensor([1.0, 2.0, 3.0]), 3)
    assert out[:, 0, 0, 0].tolist() == [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]
    with pytest.raises(ValueError):
        apply_guidance(u, c, torch.ones(4), 4)


# ---------------------------------------------------------------- Euler EDM


def test_init_noise_scale(ref):
    sampler = EulerEDMSampler(num_steps=4)
    x0 = sampler.init_noise(ref["sample/randn"])
    assert torch.equal(x0, ref["sample/x_per_step"][0])
    assert float(torch.sqrt(1 + sampler.sigmas[0] ** 2)) == pytest.approx(700.0008544921875, rel=1e-7)


def test_replay_reference_trajectory(ref):
    # Feed the stored guided D of step i: the states must follow the reference's x_per_step.
    sampler = EulerEDMSampler(num_steps=4)
    xs, ds = ref["sample/x_per_step"], ref["sample/denoised_per_step"]
    x = sampler.init_noise(ref["sample/randn"])
    for i in range(4):
        err = float((x - xs[i]).abs().max() / xs[i].abs().max())
        assert err <= 1e-5, (i, err)  # measured: 0 (bit-equal) at every step
        x = sampler.step(x, ds[i], i)
    err = float((x - ref["sample/latents"]).abs().max())
    assert err <= 5e-5, err  # measured: 0


def test_sample_loop_calls_back_like_the_reference(ref):
    xs, ds = ref["sample/x_per_step"], ref["sample/denoised_per_step"]
    seen: list[int] = []

    def denoise_fn(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        i = len(seen)
        assert sigma.shape == (x.shape[0],) and torch.all(sigma == ref["sample/sigmas"][i])
        return ds[i]

    def callback(i, sigma, x, denoised):
        assert torch.equal(x, xs[i]) and torch.equal(denoised, ds[i])
        seen.append(i)

    wrapped: list[bool] = []

    def progress(it):
        wrapped.append(True)
        return it

    out = EulerEDMSampler().sample(denoise_fn, ref["sample/randn"], 4, callback=callback, progress=progress)
    assert seen == [0, 1, 2, 3] and wrapped == [True]
    assert torch.equal(out, ref["sample/latents"])


def test_timesteps_are_c_noise():
    sampler = EulerEDMSampler(num_steps=4)
    assert sampler.timesteps.shape == (4,)
    assert torch.equal(sampler.timesteps, 0.25 * torch.tensor(FIXTURE_SIGMAS[:4]).log())


def test_step_by_hand_and_last_step_returns_denoised():
    sampler = EulerEDMSampler(num_steps=2)
    x = torch.full((1, 1, 1, 1), 10.0)
    d = torch.full((1, 1, 1, 1), 4.0)
    s0, s1 = sampler.sigmas[0], sampler.sigmas[1]
    # x + (s1 - s0) (x - D) / s0 with x - D = 6
    assert float(sampler.step(x, d, 0)) == pytest.approx(10 + float(s1 - s0) * 6 / float(s0), rel=1e-6)
    assert float(sampler.step(x, d, 1)) == pytest.approx(4.0, abs=1e-6)  # sigma -> 0: x = D
    with pytest.raises(IndexError):
        sampler.step(x, d, 2)


def test_exact_denoiser_recovers_a_point_mass():
    # Data = a single point x0: the ideal denoiser is D = x0 and Euler on EDM reaches x0 in any step count.
    x0 = torch.randn(2, 4, 3, 3)
    out = EulerEDMSampler(num_steps=5).sample(lambda x, s: x0, torch.randn(2, 4, 3, 3))
    assert torch.allclose(out, x0, atol=1e-5)


def test_state_stays_float32_for_half_inputs():
    sampler = EulerEDMSampler(num_steps=2)
    x = sampler.init_noise(torch.randn(2, 4, 2, 2, dtype=torch.bfloat16))
    assert x.dtype == torch.float32
    x = sampler.step(x, torch.zeros(2, 4, 2, 2, dtype=torch.bfloat16), 0)
    assert x.dtype == torch.float32


# ---------------------------------------------------------------- diffusers' EulerDiscreteScheduler


def _diffusers_scheduler(**overrides):
    diffusers = pytest.importorskip("diffusers")
    config = dict(  # SVD's scheduler config, as the fixture README's "Scheduler" notes
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        use_karras_sigmas=True,
        sigma_min=0.002,
        sigma_max=700.0,
        prediction_type="v_prediction",
        timestep_type="continuous",
        timestep_spacing="leading",
        steps_offset=1,
        final_sigmas_type="zero",
    )
    config.update(overrides)
    return diffusers.EulerDiscreteScheduler(**config)


DIFFUSERS_NUMPY_WARNING = "ignore:__array__ implementation:DeprecationWarning"


@pytest.mark.filterwarnings(DIFFUSERS_NUMPY_WARNING)
def test_diffusers_karras_schedule_is_not_exact(ref):
    # The verdict in the module docstring: diffusers' own Karras schedule is float64-rounded.
    scheduler = _diffusers_scheduler()
    scheduler.set_timesteps(4)
    rel = _rel(scheduler.sigmas[:4], ref["sample/sigmas"][:4])
    assert 1e-6 < rel < 2e-6  # measured with diffusers 0.42: 1.75e-6 (at sigma_min)
    init_rel = abs(float(scheduler.init_noise_sigma) - 700.0008544921875) / 700.0008544921875
    assert init_rel < 1e-6  # 700.00073 vs 700.00085


@pytest.mark.filterwarnings(DIFFUSERS_NUMPY_WARNING)
def test_diffusers_with_our_sigmas_is_bit_identical(ref):
    # Given our float32 schedule and D itself ("sample"), diffusers' Euler step equals ours bit for bit.
    scheduler = _diffusers_scheduler(use_karras_sigmas=False, prediction_type="sample")
    scheduler.set_timesteps(sigmas=edm_sigmas(4).tolist())
    scheduler.set_begin_index(0)
    sampler = EulerEDMSampler(num_steps=4)
    assert torch.equal(scheduler.sigmas, sampler.sigmas)
    x = ref["sample/randn"] * scheduler.init_noise_sigma
    ours = sampler.init_noise(ref["sample/randn"])
    assert torch.equal(x, ours)
    for i, t in enumerate(scheduler.timesteps):
        d = ref["sample/denoised_per_step"][i]
        scheduler.scale_model_input(x, t)
        x = scheduler.step(d, t, x).prev_sample
        ours = sampler.step(ours, d, i)
        assert torch.equal(x, ours), i
