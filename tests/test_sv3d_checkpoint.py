"""Reading and splitting SV3D checkpoints: variants, coverage of the full-size layout, and bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sv3d.model.checkpoint import CheckpointError, read_checkpoint, split_components


def meta_state(manifest: Path) -> dict[str, torch.Tensor]:
    """The full-size checkpoint layout as meta tensors: shapes without memory."""
    return {k: torch.empty(v[:-1], device="meta") for k, v in json.loads(manifest.read_text()).items()}


@pytest.mark.parametrize("variant", ["u", "p"])
def test_tiny_and_full_size_layouts_split_completely(sv3d_tiny: Path, variant: str):
    tiny = split_components(read_checkpoint(sv3d_tiny / f"tiny_sv3d_{variant}.safetensors"))
    full = split_components(meta_state(sv3d_tiny / f"manifest_sv3d_{variant}.json"))
    assert tiny.variant == full.variant == f"sv3d_{variant}"
    # Full size: 2212 tensors = 1428 UNet + 392 CLIP visual + 106 encoder + 2 quant_conv + 138 decoder
    # + 146 ignored (6 text-tower leftovers, the unused decoder and post_quant_conv).
    sizes = {k: len(v) for k, v in full.components.items()}
    assert sizes == {
        "unet": 1428,
        "clip_visual": 392,
        "vae_encoder": 106,
        "vae_quant_conv": 2,
        "vae_decoder": 138,
    }
    assert len(full.ignored) == 2212 - sum(sizes.values())
    assert all(
        "text" in k
        or "embedders.1.encoder.decoder" in k
        or "post_quant" in k
        or "token" in k
        or "positional" in k
        or "ln_final" in k
        or "logit" in k
        for k in full.ignored
    )


def test_unknown_key_is_an_error_naming_it(sv3d_tiny: Path):
    state = read_checkpoint(sv3d_tiny / "tiny_sv3d_u.safetensors")
    state["model.extra_head.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="model.extra_head.weight"):
        split_components(state)


def test_other_models_and_broken_files_are_refused(tmp_path: Path, sv3d_tiny: Path):
    sd = tmp_path / "sd15.safetensors"
    save_file(
        {
            "cond_stage_model.transformer.x": torch.zeros(2),
            "model.diffusion_model.out.0.weight": torch.zeros(2),
        },
        str(sd),
    )
    with pytest.raises(CheckpointError, match="Stable Diffusion"):
        split_components(read_checkpoint(sd), sd)
    svd = tmp_path / "svd.safetensors"
    save_file({"model.diffusion_model.out.0.weight": torch.zeros(2)}, str(svd))
    with pytest.raises(CheckpointError, match="not an SV3D checkpoint"):
        split_components(read_checkpoint(svd), svd)
    # real SDXL and SVD files have a vector conditioning too: named, not taken for sv3d_u
    sdxl = {
        "conditioner.embedders.0.transformer.x": torch.zeros(2),
        "model.diffusion_model.label_emb.0.0.weight": torch.zeros(4, 2816),
    }
    with pytest.raises(CheckpointError, match="SDXL"):
        split_components(sdxl)
    svd_full = {"model.diffusion_model.label_emb.0.0.weight": torch.zeros(4, 768)}
    with pytest.raises(CheckpointError, match="Stable Video Diffusion"):
        split_components(svd_full)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((sv3d_tiny / "tiny_sv3d_u.safetensors").read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "absent.safetensors")
    with pytest.raises(CheckpointError, match="unsupported"):
        read_checkpoint(sd.with_suffix(".bin").write_bytes(b"x") and sd.with_suffix(".bin"))


def test_ckpt_is_read_with_weights_only(tmp_path: Path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"a": torch.ones(2)}}, good)
    assert torch.equal(read_checkpoint(good)["a"], torch.ones(2))
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"a": torch.ones(2)}, "obj": Path("x")}, evil)  # an arbitrary pickled object
    with pytest.raises(CheckpointError, match="weights_only"):
        read_checkpoint(evil)
    legacy = tmp_path / "legacy.ckpt"  # torch's pre-1.6 format: memory-mapping refuses it, it is read whole
    torch.save({"state_dict": {"a": torch.ones(2)}}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(read_checkpoint(legacy)["a"], torch.ones(2))


def test_a_message_about_many_keys_stays_short(sv3d_tiny: Path, tmp_path: Path):
    """Every unconverted key was listed (thousands for another UNet): the first five and a count now."""
    from sv3d.errors import listing

    assert listing([f"k{i}" for i in range(1000)]) == "k0, k1, k2, k3, k4 and 995 more"
    assert listing(["a", "b"]) == "a, b"
