"""Stage configs at toy sizes for tests: seconds on a CPU, for the plumbing, not the quality."""

from __future__ import annotations

import numpy as np

from nerf.encoding import HashGridConfig
from nerf.extract import ExtractConfig
from nerf.train import TrainConfig
from refine.bake import BakeConfig
from refine.dmtet import DMTetConfig
from refine.fit import RefineConfig

from ..fit_nerf import FitNerfConfig
from ..refine_stage import RefineStageConfig

__all__ = ["toy_fit_config", "toy_refine_config"]


def toy_fit_config(steps: int, checkpoint_every: int = 0, n_levels: int = 16) -> FitNerfConfig:
    """A 32-pixel NeRF fit. A toy field's density is soft and nearly flat, so `n_levels` candidate iso-levels
    from 0.05 to 50 are tried (only those it crosses are meshed and compared)."""
    train = TrainConfig(
        steps=steps, batch_rays=512, n_samples=32, max_resolution=32, checkpoint_every=checkpoint_every
    )
    train.field.encoder = HashGridConfig(log2_hashmap_size=14)
    return FitNerfConfig(
        train=train,
        extract=ExtractConfig(resolution=32),
        level_candidates=tuple(np.geomspace(0.05, 50.0, n_levels).tolist()),
        preview_resolution=32,
        hull_resolution=32,
    )


def toy_refine_config(tet_bound: float | None = None) -> RefineStageConfig:
    """10 DMTet steps at 32 pixels on a 20-cell grid (of half-width `tet_bound`, default DMTetConfig's)."""
    tet = DMTetConfig(resolution=20) if tet_bound is None else DMTetConfig(resolution=20, bound=tet_bound)
    return RefineStageConfig(
        refine=RefineConfig(steps=10, render_resolution=32, tet=tet),
        bake=BakeConfig(texture_size=64),
        preview_resolution=32,
    )
