"""Hydra entry point for `sv3d render-orbit`: `python scripts/render_orbit.py mesh=PATH [overrides]`.

Example sweep over elevations, one orbit directory per run:
    python scripts/render_orbit.py -m mesh=obj/mug sv3d.elevation_deg=0,10,20 preset=cpu
"""

from __future__ import annotations

import hydra

from sv3d.config import job_output_dir, render_orbit_config
from sv3d.entry_points import fail_job, run_script
from sv3d.errors import Sv3dError, one_line
from sv3d.render_orbit import render_orbit

WORDING = {"--force": "force=true"}  # the library's refusals name sv3d's flags


@hydra.main(version_base="1.3", config_path="pkg://sv3d.configs", config_name="config")
def main(cfg) -> None:
    if cfg.mesh is None:
        return fail_job("render_orbit.py", "give the mesh, e.g. mesh=path/to/model.obj")
    output = job_output_dir(cfg, "orbit")
    try:
        config = render_orbit_config(cfg)
        out = render_orbit(hydra.utils.to_absolute_path(cfg.mesh), output, config, overwrite=bool(cfg.force))
    except (Sv3dError, OSError) as exc:  # bad input, or a file it cannot read or write: one line, exit 2
        return fail_job("render_orbit.py", one_line(exc), wording=WORDING)
    print(f"wrote {out}")


if __name__ == "__main__":
    run_script(main, "render_orbit.py")
