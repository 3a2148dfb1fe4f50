"""The package as installed: public APIs import, configs compose (from the checkout and from a wheel)."""

from __future__ import annotations

import importlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sv3d.config import compose_config, render_orbit_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "module", ["sv3d", "nerf", "refine", "sv3d.evaluation", "sv3d.testing", "sv3d.model"]
)
def test_public_api_imports(module: str):
    mod = importlib.import_module(module)
    for name in mod.__all__:
        assert hasattr(mod, name), f"{module}.__all__ names {name!r}, which it does not define"


@pytest.mark.parametrize("preset", ["auto", "cpu", "gpu"])
def test_every_preset_composes(preset: str):
    cfg = compose_config([f"preset={preset}"])
    render = render_orbit_config(cfg)
    render.validate()
    assert cfg.eval.iou_resolution == 64 and list(cfg.eval.fscore_thresholds) == [0.01, 0.02, 0.05]
    if preset == "cpu":
        assert render.device == "cpu" and render.resolution < 576
    if preset == "gpu":
        assert render.device == "cuda" and render.resolution == 576


def test_overrides_and_checkpoint_from_environment(monkeypatch):
    monkeypatch.setenv("SV3D_CHECKPOINT", "/models/sv3d_p.safetensors")
    cfg = compose_config(["sv3d.orbit=sine", "sv3d.render.views=7"])
    assert cfg.sv3d.checkpoint == "/models/sv3d_p.safetensors"
    assert render_orbit_config(cfg).orbit == "sine" and render_orbit_config(cfg).views == 7


def test_python_dash_m_and_console_script():
    proc = subprocess.run([sys.executable, "-m", "sv3d", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("sv3d ")
    script = Path(sys.executable).with_name("sv3d")
    if script.exists():
        proc = subprocess.run([str(script), "render-orbit", "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and "--resolution" in proc.stdout


@pytest.mark.slow
def test_configs_ship_in_the_wheel_and_compose_from_it(tmp_path: Path):
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheel_dir),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(wheel_dir.glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "sv3d/configs/config.yaml" in names and "sv3d/configs/preset/cpu.yaml" in names
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    # A fresh interpreter that sees the installed wheel, not the checkout.
    code = (
        "import sys; sys.path = [p for p in sys.path if 'site-packages' in p or 'lib/python' in p]; "
        f"sys.path.insert(0, {str(target)!r}); import sv3d.config as c; "
        "assert c.__file__.startswith(" + repr(str(target)) + "), c.__file__; "
        "print(c.compose_config(['preset=cpu']).sv3d.render.resolution)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "256"


def test_device_names_are_checked_against_the_machine(monkeypatch):
    """A device that is not there is a one-line InputError up front, not a CUDA error at the first tensor."""
    import torch

    from sv3d.device import pick_device
    from sv3d.errors import InputError

    assert pick_device("cpu").type == "cpu"
    with pytest.raises(InputError, match="unknown device"):
        pick_device("tpu-ish")
    with pytest.raises(InputError, match="unsupported device 'mps'"):  # torch knows it; our kernels do not
        pick_device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="CUDA is not available"):
        pick_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(InputError, match="has 1 GPU"):
        pick_device("cuda:7")
