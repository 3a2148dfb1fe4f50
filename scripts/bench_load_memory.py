"""Peak RAM of loading a full-size SV3D checkpoint, as a ratio to the file size.

    python scripts/bench_load_memory.py --manifest ../shared/fixtures/sv3d_tiny/manifest_sv3d_p.json \
        --file /tmp/sv3d_p_random.safetensors

Writes (once) a checkpoint with the real model's key layout and shapes (from a fixture manifest) filled with
random values, then loads it in a fresh process with `SV3DPipeline.from_single_file` and reports that
process's peak resident memory divided by the file size (the goal is <= 1.2). Needs ~2x the file in free
disk and RAM while writing (9.4 GB for SV3D).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

LOAD = """
import resource, sys, time
from sv3d.model.pipeline import SV3DPipeline
start = time.perf_counter()
pipe = SV3DPipeline.from_single_file(sys.argv[1])
seconds = time.perf_counter() - start
after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
# Touch every weight once (as a first forward pass would): memory-mapped pages become resident.
total = sum(float(p.sum()) for m in (pipe.unet, pipe.vae, pipe.image_encoder) for p in m.parameters())
print(seconds, after_load, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, pipe.variant)
"""


def write_random_checkpoint(manifest: Path, path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    layout = json.loads(manifest.read_text())
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v[:-1], generator=generator) * 0.02 for k, v in layout.items()}
    save_file(state, str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True, type=Path)
    parser.add_argument("--file", required=True, type=Path, help="where the random checkpoint is (or goes)")
    args = parser.parse_args()
    if not args.file.exists():
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; sys.path.insert(0, 'scripts'); "
                "from bench_load_memory import write_random_checkpoint as w; from pathlib import Path; "
                f"w(Path({str(args.manifest)!r}), Path({str(args.file)!r}))",
            ],
            check=True,
        )
    size = args.file.stat().st_size
    out = subprocess.run(
        [sys.executable, "-c", LOAD, str(args.file)], check=True, capture_output=True, text=True
    )
    seconds, after_load, peak, variant = out.stdout.split()
    print(
        f"{variant}: file {size / 2**30:.2f} GiB, load {float(seconds):.1f} s; peak RSS after loading "
        f"{int(after_load) / 2**30:.2f} GiB ({int(after_load) / size:.2f}x the file, weights memory-mapped), "
        f"after touching every weight {int(peak) / 2**30:.2f} GiB = {int(peak) / size:.2f}x the file"
    )


if __name__ == "__main__":
    main()
