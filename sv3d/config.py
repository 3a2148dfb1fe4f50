"""Hydra configs -> typed dataclasses. Library code never sees a DictConfig; entry points call these.

The config tree lives in `configs/` of a checkout and is installed as the package `sv3d.configs`, so
`pkg://sv3d.configs` finds it both from a checkout (editable install) and from a wheel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .render_orbit import RenderOrbitConfig

__all__ = ["CONFIG_MODULE", "compose_config", "render_orbit_config"]

CONFIG_MODULE = "sv3d.configs"


def compose_config(overrides: Sequence[str] = (), config_name: str = "config") -> Any:
    """Compose the Hydra config with command-line style overrides (e.g. ["preset=cpu"])."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def render_orbit_config(cfg: Any) -> RenderOrbitConfig:
    """The `sv3d render-orbit` settings of a composed config."""
    r = cfg.sv3d.render
    return RenderOrbitConfig(
        views=int(r.views),
        resolution=int(r.resolution),
        elevation_deg=float(cfg.sv3d.elevation_deg),
        input_azimuth_deg=float(cfg.sv3d.input_azimuth_deg),
        orbit=str(cfg.sv3d.orbit),
        shading=str(r.shading),
        up=str(r.up),
        views_per_batch=int(r.views_per_batch),
        device=str(cfg.device),
    )
