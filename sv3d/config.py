"""Hydra configs -> typed dataclasses. Library code never sees a DictConfig; entry points call these.

The config tree lives in `configs/` of a checkout and is installed as the package `sv3d.configs`, so
`pkg://sv3d.configs` finds it both from a checkout (editable install) and from a wheel. Its groups mirror
the packages (STYLE.md, after lightning-hydra-template): `sv3d` (stage 1, the orbit), `nerf`
(`FitNerfConfig`), `refine` (`RefineStageConfig`), `eval` (`EvalConfig`), and the presets `auto`, `cpu`,
`gpu`, `paper`, `toy`.

The `nerf` and `refine` groups list every field of their dataclasses, with `null` meaning "the library's
default for the device" (`default_fit_config` / `default_refine_config`), so that the `auto` preset keeps
the device-following defaults and a preset or an override pins only what it names. `apply_overrides` does
that merge, and rejects unknown keys with the key's dotted name.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from .errors import InputError
from .render_orbit import RenderOrbitConfig

if TYPE_CHECKING:
    from .evaluate import EvalConfig
    from .fit_nerf import FitNerfConfig
    from .orbit import OrbitConfig
    from .refine_stage import RefineStageConfig
    from .run import RunConfig

__all__ = [
    "CONFIG_MODULE",
    "apply_overrides",
    "compose_config",
    "eval_config",
    "fit_nerf_config",
    "job_output_dir",
    "record_job_overrides",
    "orbit_config",
    "refine_stage_config",
    "render_orbit_config",
    "run_config",
    "to_container",
]

CONFIG_MODULE = "sv3d.configs"
CHECKOUT_CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # the same tree in a checkout

T = TypeVar("T")


def compose_config(overrides: Sequence[str] = (), config_name: str = "config") -> Any:
    """Compose the Hydra config with command-line style overrides (e.g. ["preset=cpu"])."""
    import importlib.util

    from hydra import compose, initialize_config_dir, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        installed = importlib.util.find_spec(CONFIG_MODULE) is not None
    except ModuleNotFoundError:
        installed = False
    if installed:
        context = initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3")
    elif (CHECKOUT_CONFIGS / f"{config_name}.yaml").is_file():  # a source tree on PYTHONPATH, not installed
        context = initialize_config_dir(config_dir=str(CHECKOUT_CONFIGS), version_base="1.3")
    else:
        raise InputError(
            f"the config package {CONFIG_MODULE} is not installed: run `make test` (or pip install .)"
        )
    with context:
        return compose(config_name=config_name, overrides=list(overrides))


def to_container(node: Any) -> Any:
    """A DictConfig/ListConfig (resolved) as plain dicts and lists; anything else unchanged."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _select(cfg: Any, key: str, default: Any = None) -> Any:
    """cfg's value at the dotted `key`, or `default` when the key is absent or null."""
    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, key, default=None)
    return default if value is None else to_container(value)


def _coerce(value: Any, current: Any, where: str) -> Any:
    """`value` in the type of the field's current value (YAML writes 1 for 1.0, lists for tuples)."""
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise InputError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(current, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{where}: expected an integer, got {value!r}")
        return value
    if isinstance(current, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if isinstance(current, str):
        if not isinstance(value, str):
            raise InputError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(current, tuple):
        if not isinstance(value, (list, tuple)):
            raise InputError(f"{where}: expected a list, got {value!r}")
        kind = type(current[0]) if current else None
        return tuple(_coerce(v, kind(), f"{where}[{i}]") if kind else v for i, v in enumerate(value))
    return value  # a field whose default is None and no type from `_declared`: taken as given


def _declared(base: Any, key: str) -> Any:
    """A stand-in of the declared type of the dataclass field `key` whose default is None (`int | None`:
    0), so that an override is checked like any other; None where it is not a number or a string."""
    try:
        hint = typing.get_type_hints(type(base)).get(key)
    except (NameError, TypeError):  # an annotation that cannot be evaluated here
        return None
    kinds = [k for k in typing.get_args(hint) if k is not type(None)] if typing.get_args(hint) else [hint]
    return kinds[0]() if len(kinds) == 1 and kinds[0] in (int, float, str) else None


def apply_overrides(base: T, values: Mapping | None, where: str) -> T:
    """A copy of the dataclass `base` with the non-null entries of `values` (nested mappings for nested
    dataclasses). Unknown keys and wrongly typed values raise InputError naming `where.key`."""
    values = to_container(values)
    if values is None:
        return base
    if not isinstance(values, Mapping):
        raise InputError(f"{where}: expected a mapping of {type(base).__name__} fields, got {values!r}")
    known = {f.name for f in dataclasses.fields(base)}
    changes: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise InputError(f"{where}.{key}: unknown key (expected one of {', '.join(sorted(known))})")
        if value is None:
            continue
        current = getattr(base, key)
        if current is None:
            current = _declared(base, key)
        if dataclasses.is_dataclass(current):
            changes[key] = apply_overrides(current, value, f"{where}.{key}")
        else:
            changes[key] = _coerce(value, current, f"{where}.{key}")
    if "per_level_scale" in changes and "finest_resolution" in known:
        # A hash grid's growth comes from finest_resolution when that is set (the CPU default sets it), which
        # would silently undo the override: the override stands for itself.
        if values.get("finest_resolution") is not None:
            raise InputError(
                f"{where}: give per_level_scale or finest_resolution, not both (over a preset that sets "
                f"finest_resolution, add {where}.finest_resolution=null)"
            )
        changes["finest_resolution"] = None
    try:
        return dataclasses.replace(base, **changes)
    except (ValueError, TypeError) as exc:  # a dataclass's own validation (e.g. HashGridConfig)
        raise InputError(f"{where}: {exc}") from None


def _device_for_defaults(name: str) -> torch.device:
    """The device whose defaults apply; an explicit cuda is not checked here (the stage checks it when it
    runs), so that the gpu and paper presets convert on a machine without CUDA."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"device: unknown device {name!r}: expected auto, cpu or cuda[:N]") from None
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"device: unsupported device {name!r}: expected auto, cpu or cuda[:N]")
    return device


def render_orbit_config(cfg: Any) -> RenderOrbitConfig:
    """The `sv3d render-orbit` settings of a composed config."""
    r = cfg.sv3d.render
    return RenderOrbitConfig(
        views=_coerce(r.views, 0, "sv3d.render.views"),
        resolution=_coerce(r.resolution, 0, "sv3d.render.resolution"),
        elevation_deg=_coerce(cfg.sv3d.elevation_deg, 0.0, "sv3d.elevation_deg"),
        input_azimuth_deg=_coerce(cfg.sv3d.input_azimuth_deg, 0.0, "sv3d.input_azimuth_deg"),
        orbit=str(cfg.sv3d.orbit),
        shading=str(r.shading),
        up=str(r.up),
        views_per_batch=_coerce(r.views_per_batch, 0, "sv3d.render.views_per_batch"),
        device=str(cfg.device),
    )


def fit_nerf_config(cfg: Any) -> FitNerfConfig:
    """The `nerf` group over `default_fit_config(device)`: null entries keep the device's default."""
    from .fit_nerf import default_fit_config

    config = apply_overrides(default_fit_config(_device_for_defaults(str(cfg.device))), cfg.nerf, "nerf")
    config.device = str(cfg.device)
    return config


def refine_stage_config(cfg: Any) -> RefineStageConfig:
    """The `refine` group over `default_refine_config(device)`; the SDS checkpoint defaults to
    `sv3d.checkpoint` (the model that makes the orbits)."""
    from .refine_stage import check_cavity_mode, default_refine_config

    mode = _select(cfg, "refine.open_cavities")
    if isinstance(mode, bool):  # the key was a boolean until 2026-12-06
        raise InputError(
            f"refine.open_cavities: expected auto, always or never (true was auto), got {str(mode).lower()}"
        )
    config = apply_overrides(
        default_refine_config(_device_for_defaults(str(cfg.device))), cfg.refine, "refine"
    )
    check_cavity_mode(config.open_cavities)
    config.device = str(cfg.device)
    if config.checkpoint is None:
        config.checkpoint = _select(cfg, "sv3d.checkpoint")
    return config


# The `sv3d` group's keys (configs/sv3d/default.yaml): the orbit stage's settings, the input view's azimuth
# (evaluation) and the ground-truth renders (`render`)
_SV3D_KEYS = {
    "checkpoint",
    "orbit",
    "elevation_deg",
    "input_azimuth_deg",
    "steps",
    "seed",
    "resolution",
    "sgm_config",
    "dtype",
    "background",
    "offload",
    "allow_cpu",
    "render",
}


def orbit_config(cfg: Any) -> OrbitConfig:
    """Stage 1's settings (`sv3d` group). `sv3d.orbit: static` is passed as None, which is static for
    sv3d_p and the only orbit of sv3d_u, so the default works with both checkpoints."""
    from .orbit import OrbitConfig

    group = to_container(_select(cfg, "sv3d", {})) or {}
    unknown = sorted(set(group) - _SV3D_KEYS)
    if unknown:  # a misspelt or unsupported key would be ignored: say so instead
        raise InputError(f"sv3d.{unknown[0]}: unknown key (expected one of {', '.join(sorted(_SV3D_KEYS))})")
    kind = _select(cfg, "sv3d.orbit", "static")
    values = {
        "checkpoint": _select(cfg, "sv3d.checkpoint"),
        "orbit": None if kind in ("static", "auto") else str(kind),
        "device": str(cfg.device),
    }
    for key, field_name in (
        ("steps", "steps"),
        ("seed", "seed"),
        ("elevation_deg", "input_elevation_deg"),
        ("resolution", "resolution"),
        ("sgm_config", "sgm_config"),
        ("dtype", "dtype"),
        ("background", "background"),
        ("offload", "offload"),
        ("allow_cpu", "allow_cpu"),
    ):
        if group.get(key) is not None:
            values[field_name] = group[key]
    typed = apply_overrides(OrbitConfig(), {k: v for k, v in values.items() if k != "orbit"}, "sv3d")
    return dataclasses.replace(typed, orbit=values["orbit"])


def run_config(cfg: Any) -> RunConfig:
    """The end-to-end pipeline's settings: the stage groups plus the top-level `run` entries."""
    from .run import RunConfig

    base = RunConfig(
        orbit=orbit_config(cfg),
        nerf=fit_nerf_config(cfg),
        refine=refine_stage_config(cfg),
        device=str(cfg.device),
    )
    return apply_overrides(base, _select(cfg, "run", {}), "run")


def eval_config(cfg: Any) -> EvalConfig:
    """The evaluation protocol's settings (`eval` group) with the ground-truth renders' (`sv3d.render`)."""
    from .evaluate import EvalConfig

    # what to evaluate, not how: arguments of evaluate_dataset
    not_protocol = ("dataset", "objects", "force", "rescore")
    values = {k: v for k, v in (to_container(cfg.eval) or {}).items() if k not in not_protocol}
    config = apply_overrides(EvalConfig(render=render_orbit_config(cfg)), values, "eval")
    config.validate()
    return config


def job_output_dir(cfg: Any, leaf: str | None = None) -> Path:
    """Where a Hydra entry point's job writes: `output=` when given, else Hydra's run directory (with
    `leaf` below it). In a multirun every job gets its own folder under `output=`, named by its job number
    as Hydra names a sweep's (`<output>/0`, `<output>/1`, ...): one shared folder made the jobs overwrite
    or refuse each other."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    if not cfg.output:
        runtime = Path(hydra_cfg.runtime.output_dir)
        return runtime / leaf if leaf else runtime
    output = Path(cfg.output)
    return output / str(hydra_cfg.job.num) if hydra_cfg.mode == RunMode.MULTIRUN else output


def record_job_overrides(cfg: Any, job_dir: Path) -> None:
    """A multirun job under `output=` writes its overrides to `<job>/.hydra/overrides.yaml` (atomically),
    as Hydra does in its sweep folders, so that `evaluate.py --aggregate OUTPUT` finds its columns. Called
    once the job's results are written: a job refused for another run's folder leaves its labels as they
    were."""
    import yaml
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from .fit_nerf import _atomic

    hydra_cfg = HydraConfig.get()
    if not cfg.output or hydra_cfg.mode != RunMode.MULTIRUN:
        return  # Hydra's own run and sweep folders hold .hydra/ already
    folder = Path(job_dir) / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(list(hydra_cfg.overrides.task))
    _atomic(folder / "overrides.yaml", lambda p: p.write_text(text))
