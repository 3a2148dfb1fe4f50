"""Hydra entry point for `sv3d run`: `python scripts/image_to_mesh.py +image=photo.png [overrides]`.

Thin, as STYLE.md asks: `sv3d.config.run_config` turns the composed config (ARCHITECTURE.md "Names":
`sv3d.checkpoint`, `sv3d.steps`, `sv3d.orbit`, `nerf.*`, `refine.*`, `run.*`; presets `cpu`, `gpu`, `paper`,
`toy`) into `sv3d.run.RunConfig`, and `run_image_to_mesh` does the work. Example sweep over sampler steps,
one run directory each:
    python scripts/image_to_mesh.py -m +image=photo.png sv3d.steps=25,50 preset=gpu
"""

from __future__ import annotations

import hydra
from omegaconf import OmegaConf

from sv3d.config import job_output_dir, run_config
from sv3d.entry_points import fail_job, run_script
from sv3d.errors import Sv3dError, one_line
from sv3d.run import run_image_to_mesh

WORDING = {"--force": "force=true", "another -o": "another output="}  # the refusals name sv3d run's flags

__all__ = ["main", "run_config"]


@hydra.main(version_base="1.3", config_path="pkg://sv3d.configs", config_name="config")
def main(cfg) -> None:
    image = OmegaConf.select(cfg, "image")
    if image is None:
        return fail_job("image_to_mesh.py", "give the photo, e.g. +image=path/to/photo.png")
    output = job_output_dir(cfg, "run")
    try:
        config = run_config(cfg)
        result = run_image_to_mesh(hydra.utils.to_absolute_path(image), output, config, force=bool(cfg.force))
    except (Sv3dError, OSError) as exc:  # bad input, or a file it cannot read or write: one line, exit 2
        return fail_job("image_to_mesh.py", one_line(exc), wording=WORDING)
    print(f"wrote {result.mesh_path}" + (" (FLAGGED: orbit not 3D-consistent)" if result.flagged else ""))


if __name__ == "__main__":
    run_script(main, "image_to_mesh.py")
