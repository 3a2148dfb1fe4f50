"""SV3D conditioning against the original reference: VAE, CLIP image tower, vector embeddings, conditioner.

Every numeric check compares with tensors the ORIGINAL Stability-AI code produced on the tiny random-weight
checkpoints (../shared/fixtures/sv3d_tiny, README "Reference tensors"). A faithful float32 port lands within
about 3e-6 of them (the README's float64 probe); we require 1e-5 max abs and print the measured error
(`pytest -s`). The full-size manifests are checked on the meta device: every CLIP/VAE key is consumed or on
the documented ignore list, and every converted shape equals the diffusers/transformers module's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from diffusers import AutoencoderKL
from safetensors.torch import load_file
from transformers import CLIPVisionModelWithProjection

from sv3d.errors import InputError
from sv3d.model.clip import (
    CLIP_MEAN,
    CLIP_STD,
    OPENCLIP_TEXT_LEFTOVERS,
    clip_config_from_state,
    clip_image_embeds,
    clip_preprocess,
    convert_clip_state,
    load_clip_vision,
)
from sv3d.model.conditioner import (
    build_conditioning,
    concat_for_cfg,
    timestep_embedding,
    vector_conditioning,
    vector_widths,
)
from sv3d.model.vae import (
    convert_vae_state,
    decode_frames,
    encode_mean,
    encode_moments,
    load_sv3d_vae,
    vae_config_from_state,
)

TOL = 1e-5  # single forwards: README "a faithful port should land at <= 1e-5"

CLIP_PREFIX = "conditioner.embedders.0.open_clip.model."
ENCODER_PREFIX = "conditioner.embedders.1.encoder.encoder."
QUANT_PREFIX = "conditioner.embedders.1.encoder.quant_conv."
COND_DECODER_PREFIX = "conditioner.embedders.1.encoder.decoder."  # unused by SV3D (trap 1)
DECODER_PREFIX = "first_stage_model.decoder."


def sub(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def max_err(name: str, got: torch.Tensor, ref: torch.Tensor) -> float:
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    err = (got.double() - ref.double()).abs().max().item()
    print(f"{name}: max abs err {err:.3g} (max |ref| {ref.abs().max().item():.3g})")
    return err


class Tiny:
    """One tiny variant: its checkpoint, reference tensors and loaded components."""

    def __init__(self, folder: Path, variant: str):
        self.variant = variant
        self.state = load_file(folder / f"tiny_sv3d_{variant}.safetensors")
        self.ref = load_file(folder / f"ref_sv3d_{variant}.safetensors")
        self.yaml = yaml.safe_load((folder / f"tiny_sv3d_{variant}.yaml").read_text())
        self.head_width = self.yaml["open_clip_arch"]["config"]["vision_cfg"]["head_width"]
        self.visual = sub(self.state, CLIP_PREFIX + "visual.")
        self.encoder = sub(self.state, ENCODER_PREFIX)
        self.quant = sub(self.state, QUANT_PREFIX)
        self.decoder = sub(self.state, DECODER_PREFIX)
        self.clip = load_clip_vision(self.visual, self.head_width)
        self.vae = load_sv3d_vae(self.encoder, self.quant, self.decoder)
        self.adm = self.state["model.diffusion_model.label_emb.0.0.weight"].shape[1]


@pytest.fixture(scope="module", params=["u", "p"])
def tiny(request, sv3d_tiny: Path) -> Tiny:
    return Tiny(sv3d_tiny, request.param)


def meta_state(manifest: Path) -> dict[str, torch.Tensor]:
    """The full-size checkpoint layout as meta tensors: shapes without memory."""
    return {k: torch.empty(v[:-1], device="meta") for k, v in json.loads(manifest.read_text()).items()}


# ---------------------------------------------------------------------------------------------- VAE


def test_vae_config_from_tiny_shapes(tiny: Tiny):
    config = vae_config_from_state(tiny.encoder, tiny.decoder)
    ddconfig = tiny.yaml["model"]["params"]["first_stage_config"]["params"]["decoder_config"]["params"]
    assert config["block_out_channels"] == [ddconfig["ch"] * m for m in ddconfig["ch_mult"]]  # 32,32,64,64
    assert config["layers_per_block"] == ddconfig["num_res_blocks"]
    assert config["latent_channels"] == ddconfig["z_channels"] == 4
    assert config["use_quant_conv"] and not config["use_post_quant_conv"]
    assert tiny.vae.config.scaling_factor == 0.18215


@torch.no_grad()
def test_vae_encoder_moments_and_mean_match_reference(tiny: Tiny):
    images = tiny.ref["vae/enc_input"]  # [2, 3, 64, 64]
    assert (
        max_err(
            f"{tiny.variant} vae/enc_moments", encode_moments(tiny.vae, images), tiny.ref["vae/enc_moments"]
        )
        <= TOL
    )
    mean = encode_mean(tiny.vae, images)
    assert max_err(f"{tiny.variant} vae/enc_mean", mean, tiny.ref["vae/enc_mean"]) <= TOL
    # Trap 2: the conditioning latent is the UNSCALED mean; a scaled one would be far off.
    assert (mean * 0.18215 - tiny.ref["vae/enc_mean"]).abs().max() > 0.1


@torch.no_grad()
def test_vae_decoder_matches_reference_and_chunking_is_neutral(tiny: Tiny):
    latents = tiny.ref["vae/dec_input"]  # [21, 4, 8, 8], scaled space
    frames = decode_frames(tiny.vae, latents)
    assert max_err(f"{tiny.variant} vae/dec_output", frames, tiny.ref["vae/dec_output"]) <= TOL
    # Frame-by-frame 2-D decoder (trap 1): the chunk size changes nothing beyond float rounding (CPU conv
    # kernels round differently with the batch size: a few 1e-6).
    assert max_err(f"{tiny.variant} decode chunk 4 vs 14", decode_frames(tiny.vae, latents, 4), frames) <= TOL


@torch.no_grad()
def test_vae_in_float64_reproduces_the_reference_float64_probe(tiny: Tiny, sv3d_tiny: Path):
    """Run in float64, the port's distance to the float32 reference equals the reference's own float64
    re-run distance (tolerance_probe.json) to 1e-9: the port computes the same function, and the 1e-6
    residuals in float32 are rounding."""
    probe = json.loads((sv3d_tiny / "tolerance_probe.json").read_text())[f"sv3d_{tiny.variant}"]
    vae64 = load_sv3d_vae(tiny.encoder, tiny.quant, tiny.decoder, dtype=torch.float64)
    decoded = decode_frames(vae64, tiny.ref["vae/dec_input"].double())
    err = (decoded - tiny.ref["vae/dec_output"].double()).abs().max().item()
    assert abs(err - probe["vae/dec_output"]["max_abs"]) <= 1e-9
    latent = encode_mean(vae64, tiny.ref["input/cond_frames"].double())
    err = (latent - tiny.ref["emb/cond_frames_latent"].double()).abs().max().item()
    assert abs(err - probe["emb/cond_frames_latent"]["max_abs"]) <= 1e-9


@torch.no_grad()
def test_conditioners_own_decoder_is_not_used(tiny: Tiny):
    """Trap 1: decoding through the cond-frame autoencoder's decoder gives something else."""
    wrong = load_sv3d_vae(tiny.encoder, tiny.quant, sub(tiny.state, COND_DECODER_PREFIX))
    err = max_err(
        f"{tiny.variant} decode via conditioner decoder",
        decode_frames(wrong, tiny.ref["vae/dec_input"]),
        tiny.ref["vae/dec_output"],
    )
    assert err > 0.1
    # And the post_quant_conv that the legacy autoencoder would apply is not part of the model.
    assert tiny.vae.post_quant_conv is None


def test_vae_conversion_names_every_unconsumed_key(tiny: Tiny):
    extra_encoder = {**tiny.encoder, "down.0.attn.0.q.weight": torch.zeros(32, 32, 1, 1)}
    with pytest.raises(InputError, match=r"encoder\.down\.0\.attn\.0\.q\.weight"):
        convert_vae_state(extra_encoder, tiny.quant, tiny.decoder)
    extra_quant = {**tiny.quant, "post_quant_conv.weight": torch.zeros(4, 4, 1, 1)}
    extra_decoder = {**tiny.decoder, "stray": torch.zeros(1)}
    with pytest.raises(InputError, match=r"2 keys not consumed: .*decoder\.stray.*post_quant_conv\.weight"):
        convert_vae_state(tiny.encoder, extra_quant, extra_decoder)
    missing = {k: v for k, v in tiny.decoder.items() if k != "conv_out.bias"}
    with pytest.raises(InputError, match="missing.*conv_out.bias"):
        load_sv3d_vae(tiny.encoder, tiny.quant, missing)
    with pytest.raises(InputError, match=r"latents must be \[N, 4, h, w\]"):
        decode_frames(tiny.vae, torch.zeros(2, 3, 8, 8))


# ---------------------------------------------------------------------------------------------- CLIP


def test_clip_config_from_tiny_shapes(tiny: Tiny):
    arch = tiny.yaml["open_clip_arch"]["config"]
    vision = arch["vision_cfg"]
    config = clip_config_from_state(tiny.visual, head_width=tiny.head_width)
    assert config.hidden_size == vision["width"]
    assert config.num_hidden_layers == vision["layers"]
    assert config.num_attention_heads == vision["width"] // vision["head_width"]
    assert config.patch_size == vision["patch_size"]
    assert config.image_size == vision["image_size"]
    assert config.projection_dim == arch["embed_dim"]
    assert config.intermediate_size == 4 * vision["width"]
    assert config.hidden_act == "gelu" and config.layer_norm_eps == 1e-5
    with pytest.raises(InputError, match="head width 48 does not divide the transformer width 64"):
        clip_config_from_state(tiny.visual, head_width=48)


def test_clip_conversion_splits_qkv_and_transposes_proj(tiny: Tiny):
    converted = convert_clip_state(tiny.visual)
    fused = tiny.visual["transformer.resblocks.1.attn.in_proj_weight"]  # [3W, W]
    w = fused.shape[1]
    layer = "vision_model.encoder.layers.1.self_attn"
    assert torch.equal(converted[f"{layer}.q_proj.weight"], fused[:w])
    assert torch.equal(converted[f"{layer}.k_proj.weight"], fused[w : 2 * w])
    assert torch.equal(converted[f"{layer}.v_proj.weight"], fused[2 * w :])
    assert torch.equal(converted["visual_projection.weight"], tiny.visual["proj"].t())
    with pytest.raises(InputError, match=r"1 keys not consumed: transformer\.resblocks\.0\.ls_1\.gamma"):
        convert_clip_state({**tiny.visual, "transformer.resblocks.0.ls_1.gamma": torch.ones(w)})


def test_clip_preprocess_upscale_path_matches_reference(tiny: Tiny):
    """The 64-px image is upscaled to 224: bicubic, align_corners=True, no blur."""
    got = clip_preprocess(tiny.ref["input/image"])
    assert max_err(f"{tiny.variant} emb/clip_preprocessed", got, tiny.ref["emb/clip_preprocessed"]) <= TOL


def test_clip_preprocess_blur_path_matches_reference(tiny: Tiny, sv3d_tiny: Path):
    """576 -> 224 downscale: kornia 0.6.9's Gaussian antialiasing (sigma 0.786, 3 taps, reflect)."""
    import numpy as np
    from PIL import Image

    png = torch.from_numpy(np.array(Image.open(sv3d_tiny / "clip576_image.png").convert("RGB")))
    png = png.permute(2, 0, 1)[None]  # [576, 576, 3] -> [1, 3, 576, 576]
    assert torch.equal(png, tiny.ref["clip576/image_uint8"])
    image = png.float() / 255 * 2 - 1  # in [-1, 1]
    got = clip_preprocess(image)
    assert max_err(f"{tiny.variant} clip576/preprocessed", got, tiny.ref["clip576/preprocessed"]) <= TOL
    # Neither plain bicubic nor torch's own antialiasing reproduces it: the blur has to be kornia's.
    mean = torch.tensor(CLIP_MEAN)[:, None, None]
    std = torch.tensor(CLIP_STD)[:, None, None]
    plain = F.interpolate(image, size=(224, 224), mode="bicubic", align_corners=True)
    torch_aa = F.interpolate(image, size=(224, 224), mode="bicubic", antialias=True)
    for other in (plain, torch_aa):
        assert (((other + 1) / 2 - mean) / std - tiny.ref["clip576/preprocessed"]).abs().max() > 0.1
    with torch.no_grad():
        embeds = clip_image_embeds(tiny.clip, image)
    assert max_err(f"{tiny.variant} clip576/image_embeds", embeds, tiny.ref["clip576/image_embeds"]) <= TOL


@torch.no_grad()
def test_clip_image_embeds_match_reference(tiny: Tiny):
    got = clip_image_embeds(tiny.clip, tiny.ref["input/image"])  # [1, D]
    assert max_err(f"{tiny.variant} emb/clip_image_embeds", got, tiny.ref["emb/clip_image_embeds"]) <= TOL


# ---------------------------------------------------------------------------------------------- vector


def test_timestep_embedding_by_hand():
    # x = 0: cos 0 = 1 on the first half, sin 0 = 0 on the second (cosine half FIRST, trap 3).
    assert torch.equal(timestep_embedding(torch.zeros(1), 6), torch.tensor([[1.0, 1, 1, 0, 0, 0]]))
    # dim 4: f = exp(-ln(1e4) k / 2) for k = 0, 1 = (1, 0.01); x = 2 -> [cos 2, cos 0.02, sin 2, sin 0.02].
    expected = torch.tensor([[math.cos(2), math.cos(0.02), math.sin(2), math.sin(0.02)]])
    assert torch.allclose(timestep_embedding(torch.tensor([2.0]), 4), expected, atol=1e-6)
    # float64 inputs are cast to float32 first, as the reference does.
    angles = torch.tensor([0.1, 1.3962634015954636, 5.983986006837701], dtype=torch.float64)
    assert torch.equal(timestep_embedding(angles, 64), timestep_embedding(angles.float(), 64))
    assert timestep_embedding(angles, 64).dtype == torch.float32


def test_vector_widths_follow_the_unet():
    assert vector_widths(1280, with_cameras=True) == (256, 512, 512)  # real sv3d_p
    assert vector_widths(160, with_cameras=True) == (32, 64, 64)  # tiny sv3d_p
    assert vector_widths(256, with_cameras=False) == (256,)  # real sv3d_u
    assert vector_widths(32, with_cameras=False) == (32,)  # tiny sv3d_u
    with pytest.raises(InputError, match="adm_in_channels 256 is not 5 x w"):
        vector_widths(256, with_cameras=True)


def test_vector_embeddings_match_reference(tiny: Tiny):
    ref = tiny.ref
    widths = vector_widths(tiny.adm, with_cameras=tiny.variant == "p")
    assert sum(widths) == tiny.adm
    cond_aug = ref["input/batch_cond_aug"]  # [21], float32
    assert (
        max_err(f"{tiny.variant} emb/cond_aug", timestep_embedding(cond_aug, widths[0]), ref["emb/cond_aug"])
        <= TOL
    )
    if tiny.variant == "p":
        polars, azimuths = ref["input/batch_polars_rad"], ref["input/batch_azimuths_rad"]  # [21], float64
        for name, x, w in (("polars_rad", polars, widths[1]), ("azimuths_rad", azimuths, widths[2])):
            assert max_err(f"p emb/{name}", timestep_embedding(x, w), ref[f"emb/{name}"]) <= TOL
        vector = vector_conditioning(cond_aug, polars, azimuths, widths)
    else:
        vector = vector_conditioning(cond_aug, None, None, widths)
    assert max_err(f"{tiny.variant} cond/c/vector", vector, ref["cond/c/vector"]) <= TOL
    with pytest.raises(InputError, match="both polars_rad and azimuths_rad"):
        vector_conditioning(cond_aug, cond_aug, None, widths)


# ---------------------------------------------------------------------------------------------- conditioner


def conditioning(tiny: Tiny, **overrides):
    ref = tiny.ref
    cameras = {}
    if tiny.variant == "p":
        cameras = {
            "polars_rad": ref["input/batch_polars_rad"],
            "azimuths_rad": ref["input/batch_azimuths_rad"],
        }
    kwargs = {"adm_in_channels": tiny.adm, "cond_aug": 1e-5, "num_frames": 21, **cameras, **overrides}
    return build_conditioning(
        ref["input/image"], ref["input/cond_frames_noise"], tiny.clip, tiny.vae, **kwargs
    )


def test_build_conditioning_matches_reference(tiny: Tiny):
    ref, v = tiny.ref, tiny.variant
    cond, uncond = conditioning(tiny)
    # Per video, before repeating to frames (`cond/c/*`): row 0 of each video.
    assert max_err(f"{v} cond/c/crossattn", cond.crossattn[:1], ref["cond/c/crossattn"]) <= TOL
    assert max_err(f"{v} cond/c/concat", cond.concat[:1], ref["cond/c/concat"]) <= TOL
    assert max_err(f"{v} emb/cond_frames_latent", cond.concat[:1], ref["emb/cond_frames_latent"]) <= TOL
    assert max_err(f"{v} cond/c/vector", cond.vector, ref["cond/c/vector"]) <= TOL
    # What the sampler receives (`cond/c_frames/*`, `cond/uc_frames/*`): [21, ...] rows.
    for name in ("crossattn", "concat", "vector"):
        assert max_err(f"{v} cond/c_frames/{name}", getattr(cond, name), ref[f"cond/c_frames/{name}"]) <= TOL
        assert (
            max_err(f"{v} cond/uc_frames/{name}", getattr(uncond, name), ref[f"cond/uc_frames/{name}"]) <= TOL
        )
    # Trap 5: uncond zeroes exactly the context and the latent, and keeps the vector.
    assert torch.count_nonzero(ref["cond/uc/crossattn"]) == torch.count_nonzero(ref["cond/uc/concat"]) == 0
    assert torch.count_nonzero(uncond.crossattn) == torch.count_nonzero(uncond.concat) == 0
    assert torch.equal(uncond.vector, cond.vector)
    assert max_err(f"{v} cond/uc/vector", uncond.vector, ref["cond/uc/vector"]) <= TOL
    # CFG batch [uncond ; cond] as the reference's denoise_cfg/cond_in.
    batch = concat_for_cfg(uncond, cond)
    for name in ("crossattn", "concat", "vector"):
        got, want = getattr(batch, name), ref[f"denoise_cfg/cond_in/{name}"]
        assert max_err(f"{v} denoise_cfg/cond_in/{name}", got, want) <= TOL


def test_clip_sees_the_clean_image_and_vae_the_noised_one(tiny: Tiny):
    """Noise only enters the VAE path: scaling it up changes concat, never crossattn."""
    ref = tiny.ref
    assert torch.equal(ref["input/image"] + 1e-5 * ref["input/cond_frames_noise"], ref["input/cond_frames"])
    clean, _ = conditioning(tiny)
    noisy, _ = conditioning(tiny, cond_aug=0.5)
    assert torch.equal(noisy.crossattn, clean.crossattn)
    assert (noisy.concat - clean.concat).abs().max() > 1e-2
    assert (noisy.vector - clean.vector).abs().max() > 1e-2  # cond_aug is also embedded in the vector


def test_build_conditioning_rejects_bad_inputs(tiny: Tiny):
    ref = tiny.ref
    image, noise = ref["input/image"], ref["input/cond_frames_noise"]
    with pytest.raises(InputError, match=r"conditioning image: expected \[B, 3, H, W\]"):
        build_conditioning(image[:, :1], noise[:, :1], tiny.clip, tiny.vae, adm_in_channels=tiny.adm)
    with pytest.raises(InputError, match=r"values must lie in \[-1, 1\]"):
        build_conditioning((image + 1) * 127.5, noise, tiny.clip, tiny.vae, adm_in_channels=tiny.adm)
    with pytest.raises(InputError, match="cond_frames_noise: shape"):
        build_conditioning(image, noise[..., :32], tiny.clip, tiny.vae, adm_in_channels=tiny.adm)
    angles = torch.zeros(21, dtype=torch.float64)
    with pytest.raises(InputError, match="both polars_rad and azimuths_rad"):
        build_conditioning(image, noise, tiny.clip, tiny.vae, adm_in_channels=160, polars_rad=angles)
    with pytest.raises(InputError, match=r"azimuths_rad: expected \[21\] .* got \(20,\)"):
        build_conditioning(
            image,
            noise,
            tiny.clip,
            tiny.vae,
            adm_in_channels=160,
            polars_rad=angles,
            azimuths_rad=angles[:20],
        )


# ---------------------------------------------------------------------------------------------- full size


@pytest.mark.parametrize("variant", ["u", "p"])
def test_full_size_clip_layout_is_covered(sv3d_tiny: Path, variant: str):
    state = meta_state(sv3d_tiny / f"manifest_sv3d_{variant}.json")
    open_clip = sub(state, CLIP_PREFIX)
    visual = sub(open_clip, "visual.")
    leftovers = sorted(k for k in open_clip if not k.startswith("visual."))
    assert leftovers == sorted(OPENCLIP_TEXT_LEFTOVERS)  # the documented ignore list, nothing else
    config = clip_config_from_state(visual)  # default head width 80: ViT-H/14
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (1280, 32, 16)
    assert (config.patch_size, config.image_size, config.projection_dim) == (14, 224, 1024)
    assert config.intermediate_size == 5120
    converted = convert_clip_state(visual)
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    assert (
        sum(v.numel() for v in converted.values()) == sum(v.numel() for v in visual.values()) == 632_076_800
    )


@pytest.mark.parametrize("variant", ["u", "p"])
def test_full_size_vae_layout_is_covered(sv3d_tiny: Path, variant: str):
    state = meta_state(sv3d_tiny / f"manifest_sv3d_{variant}.json")
    autoencoder = sub(state, "conditioner.embedders.1.encoder.")
    heads = {k.split(".")[0] for k in autoencoder}
    assert heads == {"encoder", "quant_conv", "decoder", "post_quant_conv"}  # the last two: unused
    encoder, quant, decoder = sub(state, ENCODER_PREFIX), sub(state, QUANT_PREFIX), sub(state, DECODER_PREFIX)
    config = vae_config_from_state(encoder, decoder)
    assert config["block_out_channels"] == [128, 256, 512, 512] and config["layers_per_block"] == 2
    converted = convert_vae_state(encoder, quant, decoder)
    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    expected = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    assert len(converted) == len(encoder) + len(quant) + len(decoder) == 106 + 2 + 138
