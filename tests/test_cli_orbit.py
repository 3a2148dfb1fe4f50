"""`sv3d orbit` with the tiny random SV3D checkpoints: outputs, variants, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from sv3d.cameras import read_orbit_directory
from sv3d.cli import main
from sv3d.testing.images import rgba_disc


def tiny_args(fixtures: Path, variant: str) -> list[str]:
    return [
        "--checkpoint",
        str(fixtures / f"tiny_sv3d_{variant}.safetensors"),
        "--sgm-config",
        str(fixtures / f"tiny_sv3d_{variant}.yaml"),
        "--resolution",
        "64",
        "--steps",
        "2",
    ]


@pytest.mark.parametrize("variant,orbit", [("p", "sine"), ("u", None)])
def test_orbit_writes_frames_cameras_and_preview(
    sv3d_tiny: Path, tmp_path: Path, variant: str, orbit: str | None
):
    out = tmp_path / "orbit"
    image = rgba_disc(tmp_path / "disc.png")
    args = ["orbit", str(image), "-o", str(out), *tiny_args(sv3d_tiny, variant)]
    assert main(args + (["--orbit", orbit] if orbit else [])) == 0
    frames = read_orbit_directory(out)
    assert frames.images.shape == (21, 64, 64, 4) and frames.alpha_source == "matting"
    assert (out / "preview.mp4").is_file()
    transforms = json.loads((out / "transforms.json").read_text())
    assert transforms["orbit_kind"] == (orbit or "static")
    # The last frame is the input view and keeps the input's alpha: the disc, re-framed so that its bounding
    # circle spans 85% of the half-width, covers pi * 0.85^2 / 4 = 0.567 of the frame.
    coverage = float(frames.images[-1, ..., 3].mean())
    assert abs(coverage - np.pi * 0.85**2 / 4) < 0.03
    assert abs(float(frames.orbit.elevations_deg[-1]) - 10.0) < 1e-9


BAD = {
    "corrupt image": lambda d, fx: (
        [str(_bytes(d / "bad.png", b"\x89PNG\r\n\x1a\n" + b"x" * 50))],
        tiny_args(fx, "p"),
    ),
    "empty alpha": lambda d, fx: ([str(_empty_alpha(d / "empty.png"))], tiny_args(fx, "p")),
    "tiny image": lambda d, fx: ([str(_tiny(d / "tiny.png"))], tiny_args(fx, "p")),
    "directory as image": lambda d, fx: ([str(d)], tiny_args(fx, "p")),
    "other model": lambda d, fx: (
        [str(rgba_disc(d / "a.png"))],
        ["--checkpoint", str(_sd(d / "sd.safetensors"))],
    ),
    "truncated checkpoint": lambda d, fx: (
        [str(rgba_disc(d / "a.png"))],
        ["--checkpoint", str(_truncated(d / "t.safetensors", fx))],
    ),
    "missing checkpoint": lambda d, fx: (
        [str(rgba_disc(d / "a.png"))],
        ["--checkpoint", str(d / "none.ckpt")],
    ),
    "orbit with sv3d_u": lambda d, fx: (
        [str(rgba_disc(d / "a.png"))],
        [*tiny_args(fx, "u"), "--orbit", "sine"],
    ),
}


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _empty_alpha(path: Path) -> Path:
    Image.fromarray(np.zeros((64, 64, 4), np.uint8)).save(path)
    return path


def _tiny(path: Path) -> Path:
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(path)
    return path


def _sd(path: Path) -> Path:
    import torch

    save_file({"cond_stage_model.transformer.x": torch.zeros(2)}, str(path))
    return path


def _truncated(path: Path, fixtures: Path) -> Path:
    path.write_bytes((fixtures / "tiny_sv3d_p.safetensors").read_bytes()[:200_000])
    return path


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_line_error_nothing_created(sv3d_tiny: Path, tmp_path: Path, case: str):
    src = tmp_path / "src"
    src.mkdir()
    positional, options = BAD[case](src, sv3d_tiny)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "sv3d", "orbit", *positional, "-o", str(out), *options],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("sv3d:")]
    assert len(lines) == 1 and lines[0].startswith("sv3d: error: "), proc.stderr
    assert not out.exists()


def test_full_size_model_on_cpu_is_refused_with_an_estimate(
    sv3d_tiny: Path, tmp_path: Path, monkeypatch, capsys
):
    import sv3d.orbit

    monkeypatch.setattr(sv3d.orbit, "CPU_PARAM_LIMIT", 0)  # treat the tiny UNet as a full-size one
    out = tmp_path / "out"
    code = main(
        [
            "orbit",
            str(rgba_disc(tmp_path / "a.png")),
            "-o",
            str(out),
            *tiny_args(sv3d_tiny, "p"),
            "--device",
            "cpu",
        ]
    )
    assert code == 2 and "--allow-cpu" in capsys.readouterr().err and not out.exists()


def test_interrupted_run_leaves_nothing(sv3d_tiny: Path, tmp_path: Path, monkeypatch, capsys):
    from sv3d.model.pipeline import SV3DPipeline

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(SV3DPipeline, "__call__", interrupted)
    out = tmp_path / "out"
    assert (
        main(["orbit", str(rgba_disc(tmp_path / "a.png")), "-o", str(out), *tiny_args(sv3d_tiny, "p")]) == 130
    )
    assert "interrupted" in capsys.readouterr().err
    assert not out.exists()


def test_an_output_that_is_a_file_is_refused_even_with_force(tmp_path: Path):
    from sv3d.errors import InputError
    from sv3d.orbit import generate_orbit

    out = _bytes(tmp_path / "out", b"a file the user keeps")
    with pytest.raises(InputError, match="exists and is not a directory"):  # before any sampling
        generate_orbit(tmp_path / "photo.png", out, overwrite=True)
    assert out.read_bytes() == b"a file the user keeps"


def test_what_writing_or_sampling_would_refuse_is_refused_before_the_model_loads(
    sv3d_tiny: Path, tmp_path: Path, monkeypatch, capsys
):
    """A --force into a folder holding the photo, a sine orbit beyond its bounds and a full-size UNet on a
    CPU were refused after the model loaded (gigabytes), the first one even after sampling (minutes)."""
    import sv3d.orbit
    from sv3d.model.pipeline import SV3DPipeline

    def never(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(SV3DPipeline, "load", never)
    folder = tmp_path / "shoot"
    folder.mkdir()
    photo = rgba_disc(folder / "photo.png")
    args = ["orbit", str(photo), "-o", str(folder), *tiny_args(sv3d_tiny, "p"), "--device", "cpu"]
    assert main([*args, "--force"]) == 2
    assert "not an orbit's (photo.png)" in capsys.readouterr().err and photo.is_file()
    out = tmp_path / "out"
    args[args.index(str(folder))] = str(out)
    assert main([*args, "--orbit", "sine", "--input-elevation", "35"]) == 2
    assert "sine" in capsys.readouterr().err and not out.exists()
    monkeypatch.setattr(sv3d.orbit, "CPU_PARAM_LIMIT", 0)
    assert main(args) == 2
    assert "--allow-cpu" in capsys.readouterr().err and not out.exists()
