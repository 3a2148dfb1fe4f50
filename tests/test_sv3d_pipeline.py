"""The whole SV3D sampling run against the reference (tiny fixtures), and the diffusers-folder round trip."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sv3d.errors import InputError
from sv3d.model.checkpoint import CheckpointError
from sv3d.model.pipeline import SV3DPipeline


def load_tiny(fixtures: Path, variant: str) -> tuple[SV3DPipeline, dict]:
    pipe = SV3DPipeline.from_single_file(
        fixtures / f"tiny_sv3d_{variant}.safetensors", sgm_config=fixtures / f"tiny_sv3d_{variant}.yaml"
    )
    return pipe, load_file(str(fixtures / f"ref_sv3d_{variant}.safetensors"))


def run_reference(pipe: SV3DPipeline, ref: dict, **kwargs):
    steps: list[tuple[torch.Tensor, torch.Tensor]] = []
    cameras = {}
    if pipe.variant == "sv3d_p":
        cameras = {
            "polars_rad": ref["input/batch_polars_rad"],
            "azimuths_rad": ref["input/batch_azimuths_rad"],
        }
    out = pipe(
        ref["input/image"],
        num_steps=4,
        randn=ref["sample/randn"],
        cond_frames_noise=ref["input/cond_frames_noise"],
        callback=lambda i, s, x, d: steps.append((x, d)),
        **cameras,
        **kwargs,
    )
    return out, steps


@pytest.mark.parametrize("variant", ["u", "p"])
def test_full_sampling_matches_the_reference(sv3d_tiny: Path, variant: str):
    pipe, ref = load_tiny(sv3d_tiny, variant)
    assert pipe.variant == f"sv3d_{variant}"
    out, steps = run_reference(pipe, ref)
    x_ref, d_ref = ref["sample/x_per_step"], ref["sample/denoised_per_step"]
    for i, (x, d) in enumerate(steps):
        assert (x - x_ref[i]).abs().max() <= 1e-5 * x_ref[i].abs().max(), i
        assert (d - d_ref[i]).abs().max() <= 5e-4, i
    assert (out.latents - ref["sample/latents"]).abs().max() <= 5e-4
    assert (out.frames - ref["sample/frames"]).abs().max() <= 1e-4
    # Trap 6: the last frame is the input view, in [0, 1].
    assert torch.allclose(out.frames[-1], ((ref["input/image"][0] + 1) / 2).clamp(0, 1))


def test_sequential_cfg_equals_batched(sv3d_tiny: Path):
    pipe, ref = load_tiny(sv3d_tiny, "p")
    batched, _ = run_reference(pipe, ref)
    sequential, _ = run_reference(pipe, ref, cfg_batching=False)
    assert (batched.frames - sequential.frames).abs().max() <= 1e-5


def test_loaded_weights_need_no_gradients(sv3d_tiny: Path, tmp_path: Path):
    """The single-file UNet's weights required gradients (load_state_dict with assign=True makes new
    Parameters): a UNet call under grad tracked all of them. Every component is frozen, from both formats."""
    pipe, _ = load_tiny(sv3d_tiny, "p")
    pipe.save_pretrained(tmp_path / "folder")
    for loaded in (pipe, SV3DPipeline.from_pretrained(tmp_path / "folder")):
        for part in (loaded.unet, loaded.vae, loaded.image_encoder):
            assert not any(p.requires_grad for p in part.parameters())


def test_cameras_are_checked_against_the_variant(sv3d_tiny: Path):
    pipe_u, ref_u = load_tiny(sv3d_tiny, "u")
    with pytest.raises(InputError, match="sv3d_u takes no cameras"):
        pipe_u(ref_u["input/image"], polars_rad=torch.zeros(21), azimuths_rad=torch.zeros(21), num_steps=1)
    pipe_p, ref_p = load_tiny(sv3d_tiny, "p")
    with pytest.raises(InputError, match="needs the orbit"):
        pipe_p(ref_p["input/image"], num_steps=1)


def test_diffusers_folder_round_trip(sv3d_tiny: Path, tmp_path: Path):
    pipe, ref = load_tiny(sv3d_tiny, "p")
    folder = pipe.save_pretrained(tmp_path / "sv3d_p_diffusers")
    again = SV3DPipeline.load(folder)
    assert again.variant == "sv3d_p"
    a, _ = run_reference(pipe, ref)
    b, _ = run_reference(again, ref)
    # Same weights; float rounding differs slightly (the single-file CLIP uses views of the fused q/k/v).
    assert (a.frames - b.frames).abs().max() <= 1e-5
    modules = (again.unet, again.vae, again.image_encoder)
    assert not any(p.requires_grad for m in modules for p in m.parameters())  # SDS: no weight gradients


def test_a_diffusers_folder_is_sized_from_its_config_before_loading(
    sv3d_tiny: Path, tmp_path: Path, monkeypatch
):
    """Without a GPU, a folder's full-size UNet (9 GB) was read into memory before the CPU run was refused:
    its size now comes from unet/config.json, and the refusal comes first."""
    import sv3d.orbit
    from sv3d.orbit import OrbitConfig, check_checkpoint, generate_orbit
    from sv3d.testing.images import rgba_disc

    pipe, _ = load_tiny(sv3d_tiny, "p")
    folder = pipe.save_pretrained(tmp_path / "folder")
    assert check_checkpoint(folder) == sum(p.numel() for p in pipe.unet.parameters())
    monkeypatch.setattr(sv3d.orbit, "CPU_PARAM_LIMIT", 1000)  # the tiny UNet as if it were the real one
    monkeypatch.setattr(SV3DPipeline, "load", lambda *a, **k: pytest.fail("weights read before the refusal"))
    config = OrbitConfig(checkpoint=str(folder), device="cpu", resolution=64, steps=1)
    with pytest.raises(InputError, match="--allow-cpu"):
        generate_orbit(rgba_disc(tmp_path / "disc.png"), tmp_path / "orbit", config)
    assert not (tmp_path / "orbit").exists()


def test_a_broken_diffusers_folder_is_refused_in_one_line(sv3d_tiny: Path, tmp_path: Path):
    pipe, _ = load_tiny(sv3d_tiny, "p")
    folder = pipe.save_pretrained(tmp_path / "good")

    def broken(name: str) -> Path:
        copy = tmp_path / name
        shutil.copytree(folder, copy)
        return copy

    # a weight missing from the UNet's file: diffusers would leave it uninitialised with a warning
    missing = broken("missing")
    (weights,) = (missing / "unet").glob("*.safetensors")
    state = load_file(str(weights))
    dropped = sorted(state)[0]
    del state[dropped]
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match=f"missing keys: {re.escape(dropped)}"):
        SV3DPipeline.load(missing)
    # the variant file says sv3d_u over an sv3d_p UNet; unreadable; a component folder gone
    lying = broken("lying")
    (lying / "sv3d_pipeline.json").write_text('{"variant": "sv3d_u"}')
    with pytest.raises(CheckpointError, match="says sv3d_u"):
        SV3DPipeline.load(lying)
    garbled = broken("garbled")
    (garbled / "sv3d_pipeline.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        SV3DPipeline.load(garbled)
    partial = broken("partial")
    shutil.rmtree(partial / "vae")
    with pytest.raises(CheckpointError, match="no vae"):
        SV3DPipeline.load(partial)


def test_bfloat16_unet_and_clip_stay_close_to_float32(sv3d_tiny: Path):
    """Half precision for the UNet and CLIP (the VAE stays float32, as in the reference)."""
    pipe, ref = load_tiny(sv3d_tiny, "p")
    full, _ = run_reference(pipe, ref)
    half = SV3DPipeline.from_single_file(
        sv3d_tiny / "tiny_sv3d_p.safetensors", sgm_config=sv3d_tiny / "tiny_sv3d_p.yaml", dtype=torch.bfloat16
    )
    assert half.unet.dtype == torch.bfloat16 and half.vae.dtype == torch.float32
    low, _ = run_reference(half, ref)
    diff = (low.frames - full.frames).abs()
    # bf16 keeps 8 bits of mantissa: frames in [0, 1] move by a few 1e-3 on average on this random model.
    assert diff.mean() < 0.01 and diff.max() < 0.1, (diff.mean(), diff.max())  # measured 4.9e-3, 5.8e-2


def test_cpu_offload_gives_the_same_result(sv3d_tiny: Path, monkeypatch):
    pipe, ref = load_tiny(sv3d_tiny, "p")
    plain, _ = run_reference(pipe, ref, decode_chunk=2)  # as offloading decodes (14 at once: 1e-6 apart)
    pipe.enable_cpu_offload("cpu")  # the mechanics (move in, run, move out) on the device we have
    placed, at_conditioning = [], []  # what each _on call put on the device; what was there at conditioning
    on, conditioning = pipe._on, pipe.conditioning
    monkeypatch.setattr(pipe, "_on", lambda *modules: placed.append(modules) or on(*modules))
    monkeypatch.setattr(
        pipe, "conditioning", lambda *a, **k: at_conditioning.append(placed[-1]) or conditioning(*a, **k)
    )
    import sv3d.model.pipeline as pipeline_module

    chunks, decode = [], pipeline_module.decode_frames
    monkeypatch.setattr(
        pipeline_module, "decode_frames", lambda vae, z, chunk: chunks.append(chunk) or decode(vae, z, chunk)
    )
    offloaded, _ = run_reference(pipe, ref)
    (modules,) = at_conditioning  # CLIP and the VAE are on the device together when they run
    assert any(m is pipe.image_encoder for m in modules) and any(m is pipe.vae for m in modules)
    assert torch.equal(plain.frames, offloaded.frames)
    assert chunks == [2]  # offloading decodes 2 frames at a time (14: ~14 GB at 576², estimated)
    assert next(pipe.unet.parameters()).device.type == "cpu"


def test_offload_puts_clip_and_vae_on_the_device_together():
    """The conditioning runs CLIP and the VAE: both on the device, the UNet out (CLIP stayed on the CPU)."""
    moved: dict[str, str] = {}

    class Spy(torch.nn.Linear):
        def to(self, device=None, *args, **kwargs):  # records where it is sent, moves nothing
            moved[self.label] = str(device)
            return self

    pipe = object.__new__(SV3DPipeline)
    for label in ("unet", "vae", "image_encoder"):
        module = Spy(1, 1)
        module.label = label
        setattr(pipe, label, module)
    pipe.offload_device = torch.device("cuda")
    pipe._on(pipe.image_encoder, pipe.vae)
    assert moved == {"unet": "cpu", "vae": "cuda", "image_encoder": "cuda"}
    pipe._on(pipe.unet)
    assert moved == {"unet": "cuda", "vae": "cpu", "image_encoder": "cpu"}


@pytest.mark.gpu
def test_cuda_bfloat16_matches_float32(sv3d_tiny: Path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pipe, ref = load_tiny(sv3d_tiny, "p")
    cpu, _ = run_reference(pipe, ref)
    gpu = SV3DPipeline.from_single_file(
        sv3d_tiny / "tiny_sv3d_p.safetensors", sgm_config=sv3d_tiny / "tiny_sv3d_p.yaml", device="cuda"
    )
    fp32, _ = run_reference(gpu, ref)
    # cuDNN runs float32 convolutions in TF32 by default: measured max 0.0046 on an H200 (torch 2.11)
    assert (fp32.frames - cpu.frames).abs().max() <= 0.01
    gpu.to(dtype=torch.bfloat16)
    bf16, _ = run_reference(gpu, ref)
    diff = (bf16.frames - cpu.frames).abs()
    assert diff.mean() < 0.01 and diff.max() < 0.1


def test_clip_head_width_from_the_yaml(tmp_path: Path):
    """An OpenCLIP vision config without head_width has OpenCLIP's default, 64 (80, ViT-H/14's, was
    assumed: 16 heads where OpenCLIP builds 20, silently other embeddings); no config: ViT-H/14's 80."""
    from sv3d.model.pipeline import _head_widths_from_yaml

    spelled = tmp_path / "a.yaml"
    spelled.write_text("open_clip_arch:\n  config:\n    vision_cfg:\n      width: 1280\n      layers: 2\n")
    assert _head_widths_from_yaml(spelled, 64, 80)[1] == 64
    explicit = tmp_path / "b.yaml"
    explicit.write_text("open_clip_arch:\n  config:\n    vision_cfg:\n      width: 96\n      head_width: 32")
    assert _head_widths_from_yaml(explicit, 64, 80)[1] == 32
    plain = tmp_path / "c.yaml"
    plain.write_text("notes: []\n")
    assert _head_widths_from_yaml(plain, 64, 80)[1] == 80


def test_a_yaml_whose_camera_vector_differs_from_the_assumed_layout_is_refused(sv3d_tiny, tmp_path):
    """The variant and the camera vector's split come from the UNet's width; a model whose yaml declares
    other embedder widths (polar 48 and azimuth 48 beside cond_aug 64: also 160 wide) was conditioned on
    the wrong split without a word."""
    text = (sv3d_tiny / "tiny_sv3d_p.yaml").read_text()
    other = tmp_path / "other.yaml"
    other.write_text(text.replace("outdim: 64", "outdim: 48").replace("outdim: 32", "outdim: 64"))
    with pytest.raises(CheckpointError, match="not the layout"):
        SV3DPipeline.from_single_file(sv3d_tiny / "tiny_sv3d_p.safetensors", sgm_config=other)
    from sv3d.orbit import OrbitConfig, check_checkpoint  # and up front, from the header alone

    with pytest.raises(CheckpointError, match="not the layout"):
        check_checkpoint(sv3d_tiny / "tiny_sv3d_p.safetensors", OrbitConfig(sgm_config=str(other)))
    own = OrbitConfig(sgm_config=str(sv3d_tiny / "tiny_sv3d_p.yaml"))
    assert check_checkpoint(sv3d_tiny / "tiny_sv3d_p.safetensors", own) > 0  # the model's own yaml: fine


def test_a_yaml_asking_for_other_sampling_settings_is_refused(sv3d_tiny: Path, tmp_path: Path):
    """A guider scale, sigma range or latent scale other than SV3D's was ignored without a word."""
    text = (sv3d_tiny / "tiny_sv3d_p.yaml").read_text()
    for old, new, named in (
        ("max_scale: 2.5", "max_scale: 3.0", "max_scale = 3.0"),
        ("sigma_max: 700.0", "sigma_max: 80.0", "sigma_max = 80.0"),
        ("scale_factor: 0.18215", "scale_factor: 0.13025", "scale_factor = 0.13025"),
        ("TrianglePredictionGuider", "LinearPredictionGuider", "LinearPredictionGuider"),
        ("sigma_max: 700.0", "rho: 7.0", "sigma_max = 80.0 \\(sgm default\\)"),  # left out: sgm's 80
    ):
        assert old in text
        other = tmp_path / "other.yaml"
        other.write_text(text.replace(old, new))
        with pytest.raises(InputError, match=named):
            SV3DPipeline.from_single_file(sv3d_tiny / "tiny_sv3d_p.safetensors", sgm_config=other)
