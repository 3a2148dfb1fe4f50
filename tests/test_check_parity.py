"""`scripts/check_parity.py` on the reference fixtures: every check passes, for sv3d_u and sv3d_p."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sv3d.model.parity import FRAMES_ATOL, SINGLE_FORWARD_ATOL, run_parity

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("variant", ["sv3d_u", "sv3d_p"])
def test_every_parity_check_passes(sv3d_tiny: Path, variant: str):
    checks = {c.name: c for c in run_parity(sv3d_tiny, variant)}
    assert all(c.passed for c in checks.values()), [c.line() for c in checks.values() if not c.passed]
    assert checks["denoise/denoised"].max_abs <= SINGLE_FORWARD_ATOL
    assert checks["sample/frames"].max_abs <= FRAMES_ATOL
    # Trap 5: the unconditional branch zeroes only the CLIP context and the concat latent.
    assert (
        checks["cond/uc_frames/crossattn"].max_abs == 0.0 and checks["cond/uc_frames/concat"].max_abs == 0.0
    )


@pytest.mark.slow
def test_script_exit_codes(sv3d_tiny: Path, tmp_path: Path):
    ok = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/check_parity.py"),
            "--fixture",
            str(sv3d_tiny),
            "--variant",
            "sv3d_p",
        ],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "all checks passed" in ok.stdout and "max abs" in ok.stdout
    bad = subprocess.run(
        [sys.executable, str(ROOT / "scripts/check_parity.py"), "--fixture", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "missing" in bad.stderr
