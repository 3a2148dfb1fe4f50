"""`sv3d demo` end to end at a small size: every promised file, finite metrics, and a rerun."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sv3d.cli import main


@pytest.mark.slow
def test_demo_writes_orbit_preview_hull_and_metrics(tmp_path: Path, capsys):
    out = tmp_path / "demo"
    for _ in range(2):  # a rerun replaces the demo's own outputs
        assert main(["demo", "-o", str(out), "--resolution", "96", "--object", "plate"]) == 0
    printed = capsys.readouterr().out
    assert "SV3D checkpoint" in printed
    report = json.loads((out / "metrics.json").read_text())
    metrics = report["visual_hull_metrics"]
    assert all(math.isfinite(metrics[k]) for k in ("chamfer", "volume_iou", "fscore@0.01", "fscore@0.05"))
    assert 0 < metrics["chamfer"] < 0.1 and metrics["fscore@0.05"] > 0.5
    for name in (
        "orbit/transforms.json",
        "orbit/frame_020.png",
        "orbit_contact_sheet.png",
        "visual_hull.ply",
        "objects/plate/meshes/model.obj",
    ):
        assert (out / name).is_file(), name


def test_demo_rejects_an_unknown_object(tmp_path: Path, capsys):
    assert main(["demo", "-o", str(tmp_path / "d"), "--object", "teapot"]) == 2
    assert "unknown demo object" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
