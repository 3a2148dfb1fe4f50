"""Shared test helpers: where the team's reference fixtures live (../shared/fixtures beside the checkout,
or $SV3D_FIXTURES, e.g. on a lent GPU machine where only the checkout travels)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels (nerf/_hash_triton_kernels.py) run under Triton's CPU interpreter; the
# setting must precede triton's first import, hence here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

FIXTURES = Path(
    os.environ.get("SV3D_FIXTURES") or Path(__file__).resolve().parents[2] / "shared" / "fixtures"
)
SV3D_TINY = FIXTURES / "sv3d_tiny"


@pytest.fixture(scope="session")
def sv3d_tiny() -> Path:
    """The SV3D reference fixture folder; tests that need it skip with the reason when it is absent."""
    if not (SV3D_TINY / "README.md").is_file():
        pytest.skip(f"reference fixtures not found at {SV3D_TINY} (../shared/fixtures beside the checkout)")
    return SV3D_TINY
