"""SV3D sampling benchmark: time per denoising step, decoding time and peak memory, per precision mode.

    python scripts/bench_sv3d.py [--size full|reduced] [--steps 3] [--resolution 576]

The SV3D architecture with random weights (speed does not depend on the values): `full` is the real
model's layout (UNet 1.5 B, ViT-H/14, SV3D's VAE; the default on CUDA), `reduced` a narrow version of the
same layout (the default on CPU, where the full model takes hours). Modes, in one run: float32, bfloat16
(UNet + CLIP; the VAE stays float32 as in the reference) and bfloat16 with CPU offload of idle components
(CUDA only). Prints seconds per step, the projected 50-step + decoding time, and peak memory.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from diffusers import AutoencoderKL
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from sv3d.cameras import static_orbit
from sv3d.model.pipeline import SV3DPipeline
from sv3d.model.unet import SV3DUNet

FULL = {
    "unet": {
        "block_out_channels": (320, 640, 1280, 1280),
        "num_attention_heads": (5, 10, 20, 20),
        "layers_per_block": 2,
        "cross_attention_dim": 1024,
        "projection_class_embeddings_input_dim": 1280,
    },
    "vae": {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2},
    "clip": {
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_attention_heads": 16,
        "patch_size": 14,
        "projection_dim": 1024,
    },
}
REDUCED = {
    "unet": {
        "block_out_channels": (64, 128, 256, 256),
        "num_attention_heads": (1, 2, 4, 4),
        "layers_per_block": 1,
        "cross_attention_dim": 256,
        "projection_class_embeddings_input_dim": 160,
    },
    "vae": {"block_out_channels": (32, 64, 128, 128), "layers_per_block": 1},
    "clip": {
        "hidden_size": 256,
        "intermediate_size": 1024,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "patch_size": 14,
        "projection_dim": 256,
    },
}


def build(sizes: dict) -> SV3DPipeline:
    torch.manual_seed(0)
    unet = SV3DUNet(**sizes["unet"]).eval()
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        use_post_quant_conv=False,
        scaling_factor=0.18215,
        **sizes["vae"],
    ).eval()
    clip = CLIPVisionModelWithProjection(
        CLIPVisionConfig(image_size=224, hidden_act="gelu", **sizes["clip"])
    ).eval()
    return SV3DPipeline(unet, vae, clip, "sv3d_p")


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # process high-water mark (Linux: KiB)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("full", "reduced"), default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5 on CUDA, 2 on CPU)")
    parser.add_argument("--resolution", type=int, default=None, help="frame size (default 576 CUDA, 256 CPU)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = args.size or ("full" if device.type == "cuda" else "reduced")
    steps = args.steps or (5 if device.type == "cuda" else 2)
    res = args.resolution or (576 if device.type == "cuda" else 256)
    pipe = build(FULL if size == "full" else REDUCED)
    n_unet = sum(p.numel() for p in pipe.unet.parameters())
    print(
        f"{size} architecture (UNet {n_unet / 1e9:.3f} B params), 21 frames at {res}^2, {steps} steps, "
        f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}"
    )
    polars, azimuths = static_orbit().model_conditioning()
    image = torch.rand(1, 3, res, res) * 2 - 1
    modes = [("float32", torch.float32, False)]
    if device.type == "cuda":
        modes += [("bfloat16", torch.bfloat16, False), ("bfloat16+offload", torch.bfloat16, True)]
    for name, dtype, offload in modes:
        pipe.offload_device = None
        pipe.to(device, dtype)
        if offload:
            pipe.enable_cpu_offload(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        pipe(image, polars, azimuths, num_steps=1)  # warm-up
        start = time.perf_counter()
        out = pipe(image, polars, azimuths, num_steps=steps)
        total = time.perf_counter() - start
        per_step = out.timings["sampling_s"] / steps
        projected = 50 * per_step + out.timings["decoding_s"] + out.timings["conditioning_s"]
        print(
            f"{name:18s} {per_step:8.3f} s/step  decode {out.timings['decoding_s']:6.2f} s  "
            f"run {total:6.1f} s  projected 50 steps + decode {projected:7.1f} s  "
            f"peak memory {peak_bytes(device) / 2**30:6.2f} GiB"
        )


if __name__ == "__main__":
    main()
