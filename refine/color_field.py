"""The refined surface's colour: a hash grid (the NeRF stage's encoder) and a small MLP over world points.

The frames' lighting is baked in (SV3D renders, or lambert with lights fixed in the world). With `shading`
on (the default) the colour is the field's albedo times a learned shading of the world normal
(`refine.shading`), so the normals are fitted to the frames' brightness; off, the colour depends on the
position only. The lit colour, albedo times shading, is what gets baked into the exported texture.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from nerf.encoding import HashGridConfig, HashGridEncoder

from .shading import SHShading

__all__ = ["ColorField", "ColorFieldConfig"]


@dataclass
class ColorFieldConfig:
    # A smaller table than the NeRF's: colour lives on a 2D surface, 2**16 rows per level are plenty.
    encoder: HashGridConfig = field(default_factory=lambda: HashGridConfig(log2_hashmap_size=16))
    hidden_dim: int = 32  # one hidden layer: the hash grid carries the detail
    bound: float = 0.55  # half-width of the encoded cube, the NeRF's and the tet grid's
    shading: bool = True  # colour = albedo * learned shading of the normal (refine.shading); False: unlit


class ColorField(nn.Module):
    """World points [N, 3] (and unit normals [N, 3] when shaded) -> rgb [N, 3]: albedo in [0, 1] times
    shading >= 0."""

    def __init__(self, config: ColorFieldConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ColorFieldConfig()
        self.encoder = HashGridEncoder(config.encoder)
        self.mlp = nn.Sequential(
            nn.Linear(int(self.encoder.output_dim), config.hidden_dim),
            nn.ReLU(),
            nn.Linear(config.hidden_dim, 3),
        )
        self.shading = SHShading() if config.shading else None

    @property
    def shaded(self) -> bool:
        """Whether `forward` needs the normals."""
        return self.shading is not None

    def albedo(self, points: Tensor) -> Tensor:
        """World points [N, 3] -> unshaded colour [N, 3] in [0, 1]."""
        if points.ndim != 2 or points.shape[-1] != 3:
            raise ValueError(f"points must be [N, 3], got {tuple(points.shape)}")
        b = float(self.config.bound)
        unit = ((points + b) / (2.0 * b)).clamp(0.0, 1.0)  # [N, 3] world cube -> [0, 1]^3
        return torch.sigmoid(self.mlp(self.encoder(unit)))  # [N, 3]

    def forward(self, points: Tensor, normals: Tensor | None = None) -> Tensor:
        """The colour at points [N, 3]; a shaded field needs the unit world normals [N, 3] there."""
        albedo = self.albedo(points)
        if self.shading is None:
            return albedo
        if normals is None or normals.shape != points.shape:
            got = None if normals is None else tuple(normals.shape)
            raise ValueError(f"a shaded colour field needs normals of shape {tuple(points.shape)}, got {got}")
        return albedo * self.shading(normals)
