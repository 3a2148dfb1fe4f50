"""`sv3d demo` at a toy size: every promised file, the three rows of metrics, the hint, and a resumed rerun.

The full-size demo (CPU defaults, the budget of 5 minutes) is what `make demo` runs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

import sv3d.run as run_module
from sv3d.cli import main
from sv3d.demo import DemoConfig, format_table, run_demo
from sv3d.fit_nerf import FitNerfConfig
from sv3d.refine_stage import RefineStageConfig
from sv3d.testing.toy_configs import toy_fit_config, toy_refine_config


def toy_nerf(device) -> FitNerfConfig:
    return toy_fit_config(steps=30)


def toy_refine(device) -> RefineStageConfig:
    return toy_refine_config()


@pytest.mark.slow
def test_demo_writes_mesh_turntable_and_three_rows_of_metrics(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setattr(run_module, "default_fit_config", toy_nerf)
    monkeypatch.setattr(run_module, "default_refine_config", toy_refine)
    out = tmp_path / "demo"
    config = DemoConfig(
        object_name="blob",
        resolution=48,
        hull_resolution=48,
        turntable_resolution=32,
        eval_points=3000,
        eval_views=16,
        eval_view_resolution=128,
        eval_iou_resolution=16,
        nerf_steps=None,  # None: the (toy) device defaults
        nerf_grid=None,
        refine_steps=None,
        tet_resolution=None,
        texture_size=None,
    )
    report = run_demo(out, config)
    printed = capsys.readouterr().out
    assert "sv3d run photo.png -o out --checkpoint /path/to/sv3d_p.safetensors" in printed
    assert format_table(report["metrics"]) in printed
    assert set(report["metrics"]) == {"final (NeRF + DMTet)", "NeRF mesh", "visual hull"}
    for row in report["metrics"].values():
        assert all(math.isfinite(row[k]) for k in ("chamfer", "volume_iou", "fscore@0.01", "fscore@0.05"))
    hull = report["metrics"]["visual hull"]
    assert 0 < hull["chamfer"] < 0.1 and hull["fscore@0.05"] > 0.5  # the carved blob is close to the blob
    assert json.loads((out / "metrics.json").read_text())["metrics"] == report["metrics"]
    for name in (
        "mesh.glb",
        "turntable.mp4",
        "run.json",
        "nerf/mesh.ply",
        "refine/mesh.glb",
        "orbit/transforms.json",
        "orbit_contact_sheet.png",
        "visual_hull.ply",
        "objects/blob/meshes/model.obj",
    ):
        assert (out / name).is_file(), name

    # A rerun with the same settings resumes: no stage runs again, the metrics are recomputed the same
    monkeypatch.setattr(run_module, "fit_nerf", lambda *a, **k: pytest.fail("the NeRF stage ran again"))
    monkeypatch.setattr(run_module, "refine_stage", lambda *a, **k: pytest.fail("refine ran again"))
    again = run_demo(out, config)
    assert again["metrics"] == report["metrics"]
    # ... also moved whole, with the staging folder of a killed orbit write beside it (it was refused as
    # "not a demo's output folder": run.json named the old path)
    moved = tmp_path / "moved"
    shutil.move(out, moved)
    (moved / ".orbit.tmp-abc123").mkdir()
    assert run_demo(moved, config)["metrics"] == report["metrics"]


def test_demo_rejects_an_unknown_object(tmp_path: Path, capsys):
    assert main(["demo", "-o", str(tmp_path / "d"), "--object", "teapot"]) == 2
    assert "unknown demo object" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_demo_never_replaces_a_folder_that_is_not_its_own(tmp_path: Path, capsys):
    """`sv3d demo -o .` in a checkout removed its nerf/ and refine/ packages (the first run starts over with
    force); a folder that is not a demo's is refused, --force or not, and so is a bad setting, before
    anything is written."""
    folder = tmp_path / "project"
    (folder / "nerf").mkdir(parents=True)
    (folder / "nerf" / "train.py").write_text("mine")
    for extra in ([], ["--force"]):
        assert main(["demo", "-o", str(folder), *extra]) == 2
        assert "not a demo's output folder" in capsys.readouterr().err
    assert (folder / "nerf" / "train.py").read_text() == "mine"
    assert sorted(p.name for p in folder.iterdir()) == ["nerf"]
    users = tmp_path / "work"  # a user's own orbit (sv3d render-orbit ... -o work/orbit) is not the demo's
    (users / "orbit").mkdir(parents=True)
    (users / "orbit" / "transforms.json").write_text("{}")
    assert main(["demo", "-o", str(users)]) == 2
    assert "not a demo's output folder" in capsys.readouterr().err
    assert (users / "orbit" / "transforms.json").read_text() == "{}"
    assert main(["demo", "-o", str(tmp_path / "d"), "--nerf-steps", "0"]) == 2
    assert "--nerf-steps must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
