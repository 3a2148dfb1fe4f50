"""Hydra entry point for `sv3d render-orbit`: `python scripts/render_orbit.py mesh=PATH [overrides]`.

Example sweep over elevations, one orbit directory per run:
    python scripts/render_orbit.py -m mesh=obj/mug sv3d.elevation_deg=0,10,20 preset=cpu
"""

from __future__ import annotations

import sys

import hydra

from sv3d.config import job_output_dir, render_orbit_config
from sv3d.errors import Sv3dError, one_line
from sv3d.render_orbit import render_orbit


@hydra.main(version_base="1.3", config_path="pkg://sv3d.configs", config_name="config")
def main(cfg) -> None:
    if cfg.mesh is None:
        print("render_orbit.py: error: give the mesh, e.g. mesh=path/to/model.obj", file=sys.stderr)
        sys.exit(2)
    output = job_output_dir(cfg, "orbit")
    try:
        out = render_orbit(hydra.utils.to_absolute_path(cfg.mesh), output, render_orbit_config(cfg))
    except (Sv3dError, OSError) as exc:  # bad input, or a file it cannot read or write: one line, exit 2
        print(f"render_orbit.py: error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
