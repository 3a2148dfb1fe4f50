"""Instant-NGP-style radiance field: a hash-grid encoder, a tiny density MLP and a tiny colour MLP.

Follows Müller et al., "Instant Neural Graphics Primitives" (2022), Sec. 5.4 (NeRF): the encoded position
goes through a one-hidden-layer MLP whose first output is the log-density (activated by a truncated
exponential) and whose other 15 outputs are a geometry feature for the colour MLP. SV3D (Voleti et al.
2024, Sec. 4) fits such an Instant-NGP field to its generated orbit before the DMTet stage.

Scene bound: the team's objects lie inside the radius-0.5 sphere (ARCHITECTURE.md). The hash grid covers
the cube [-bound, bound]^3 with `bound = 0.55` (10% margin, so the surface never touches the grid's edge,
where hash-grid interpolation has no neighbours outside); the renderer samples inside the sphere of radius
`bound`, which the cube contains. Points outside the cube have zero density.

View dependence is off by default: SV3D's frames have lighting baked in and view-consistent shading by
design, the 21 views lie on one orbit, and the refine stage bakes an unlit texture; a view-dependent
colour would let the field explain the diffusion model's inter-frame inconsistencies with colour that
changes with direction instead of settling on one surface colour. `use_view_dirs=True` adds the unit
direction to the colour MLP's input for users who fit real captures.

MLP precision (`mlp_dtype`): "bfloat16" runs the two MLPs' matrix products under autocast, as
instant-ngp's fully fused MLPs run in half precision. Weights, Adam's state and the hash grid stay
float32; the MLPs' outputs (log-density, features, colour logits) are rounded to bfloat16 and then cast
to float32, so a density is off by up to ~|log-density| * 2^-8 relative (3% at 8), and the gradients
reaching the hash grid pass through bfloat16. Opt-in. On 2 cores with AVX512-BF16 a training step on a
fitted checker sphere took 0.18-0.19 s instead of 0.25-0.26 s (alternated in one process, 2026-11-29) and
renders differ by at most 0.01 (mean 0.0009); but whole oracle fits at the CPU defaults (2026-12-05, one
run each, colour learning rate 0.1 of lr) were not faster: 176 / 177 / 156 / 254 / 178 / 236 s against
float32's 179 / 173 / 132 / 268 / 155 / 208 s (bowl, mug, plate, checker, blob, internal), at the same
Chamfer within 0.0006. One bfloat16 fit had collapsed (`internal`, seed 1: colours stuck, 6 dB) before
the colour MLP got its own learning rate (nerf.train's module doc: the run-away happened in float32 too);
with it the same fit reached 43 dB on its training views. On CPUs without AVX512-BF16 or AMX the products
are emulated, slower than float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from nerf.encoding import HashGridConfig, HashGridEncoder
from nerf.mlp import ReLUMLP

__all__ = ["MLP_DTYPES", "FieldConfig", "RadianceField", "TruncExp", "trunc_exp"]

MLP_DTYPES = ("float32", "bfloat16")


class TruncExp(torch.autograd.Function):
    """exp(x) whose backward uses exp(min(x, clamp)) (instant-ngp's density activation).

    The forward is the true exponential; only the gradient is bounded, so one huge log-density early in
    training cannot blow the hash-table entries up (instant-ngp clamps the argument at 15).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, clamp: float = 15.0) -> Tensor:
        ctx.save_for_backward(x)
        ctx.clamp = clamp
        return torch.exp(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(max=ctx.clamp)), None


def trunc_exp(x: Tensor, clamp: float = 15.0) -> Tensor:
    """Truncated exponential: `exp(x)` forward, gradient `exp(min(x, clamp))`; shape and dtype of `x`."""
    return TruncExp.apply(x, clamp)


@dataclass
class FieldConfig:
    encoder: HashGridConfig = field(default_factory=HashGridConfig)  # position encoding (instant-ngp)
    hidden_dim: int = 64  # width of both MLPs: instant-ngp's fully fused MLPs are 64 wide
    geo_feat_dim: int = 15  # geometry feature passed to the colour MLP (16 density outputs - 1), instant-ngp
    color_layers: int = 2  # hidden layers of the colour MLP (instant-ngp: 2)
    density_bias: float = -1.0  # added to the raw log-density: starts thin (sigma ~ exp(-1)), fewer floaters
    bound: float = 0.55  # half-width of the encoded cube = radius of the sampled sphere; objects fit in 0.5
    use_view_dirs: bool = False  # view-dependent colour; off because SV3D frames have baked lighting (above)
    mlp_dtype: str = "float32"  # "bfloat16": the MLPs' matrix products in bfloat16 (autocast; module doc)

    def __post_init__(self) -> None:
        _check_mlp_dtype(self.mlp_dtype)  # when the config is made (Hydra overrides too), before any stage


def _check_mlp_dtype(value: str) -> None:
    if value not in MLP_DTYPES:
        raise ValueError(f"FieldConfig.mlp_dtype must be one of {MLP_DTYPES}, got {value!r}")


class RadianceField(nn.Module):
    """(position, direction) -> (colour, density). Positions are world coordinates, z up."""

    def __init__(self, config: FieldConfig | None = None, encoder: nn.Module | None = None) -> None:
        """`encoder` overrides the hash grid built from `config.encoder` (any module mapping [N, 3] in
        [0, 1] to [N, encoder.output_dim]); the refine stage and tests use that."""
        super().__init__()
        config = config or FieldConfig()
        for name in ("hidden_dim", "geo_feat_dim", "color_layers"):
            value = getattr(config, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"FieldConfig.{name} must be a positive integer, got {value}")
        if not float(config.bound) > 0:
            raise ValueError(f"FieldConfig.bound must be > 0, got {config.bound}")
        _check_mlp_dtype(config.mlp_dtype)  # also when it was set after the config was made
        self.config = config
        if encoder is None:
            encoder = HashGridEncoder(config.encoder)
        self.encoder = encoder
        h = config.hidden_dim
        # instant-ngp: one hidden layer; output 0 is log-density, 1..15 the geometry feature
        self.density_mlp = ReLUMLP([int(encoder.output_dim), h, 1 + config.geo_feat_dim])
        in_dim = config.geo_feat_dim + (3 if config.use_view_dirs else 0)
        self.color_mlp = ReLUMLP([in_dim] + [h] * config.color_layers + [3])

    def _mlp_precision(self, device: torch.device):
        """Autocast for the MLPs: bfloat16 matrix products when `mlp_dtype` says so (weights stay float32)."""
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.config.mlp_dtype == "bfloat16")

    def _check_points(self, x: Tensor, name: str = "x") -> None:
        if x.ndim != 2 or x.shape[-1] != 3:
            raise ValueError(f"{name} must be [N, 3], got shape {tuple(x.shape)}")

    def geometry(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """World points [N, 3] -> (sigma [N] >= 0, geometry feature [N, geo_feat_dim]).

        With `color`, the two halves of `forward`: a renderer can evaluate the colour MLP only at the
        samples that its weights say are seen (`render.render_rays`' `color_eps`)."""
        self._check_points(x)
        b = float(self.config.bound)
        inside = (x.abs() <= b).all(dim=-1)  # [N]
        unit = ((x + b) / (2.0 * b)).clamp(0.0, 1.0)  # [N, 3] world cube -> [0, 1]^3
        encoded = self.encoder(unit)  # [N, encoder.output_dim] float32
        with self._mlp_precision(x.device):
            h = self.density_mlp(encoded)  # [N, 1 + F]
        h = h.float()  # float32 from here on (its values rounded to bfloat16 under mlp_dtype "bfloat16")
        sigma = trunc_exp(h[:, 0] + self.config.density_bias)  # [N]
        sigma = torch.where(inside, sigma, torch.zeros_like(sigma))  # no density outside the grid
        return sigma, h[:, 1:]

    def density(self, x: Tensor) -> Tensor:
        """Density sigma [N] >= 0 (per unit world length) at world points x [N, 3]."""
        return self.geometry(x)[0]

    def forward(self, x: Tensor, d: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """World points x [N, 3], unit directions d [N, 3] -> (rgb [N, 3] in [0, 1], sigma [N] >= 0).

        `d` is only read when `config.use_view_dirs`; it may be None otherwise.
        """
        sigma, feat = self.geometry(x)  # [N], [N, F]
        return self.color(feat, d), sigma

    def color(self, feat: Tensor, d: Tensor | None = None) -> Tensor:
        """Geometry features [N, geo_feat_dim] (from `geometry`), unit directions d [N, 3] or None ->
        rgb [N, 3] in [0, 1]. `d` is only read when `config.use_view_dirs`."""
        if self.config.use_view_dirs:
            if d is None or d.shape != (feat.shape[0], 3):
                got = None if d is None else tuple(d.shape)
                raise ValueError(f"d must be [N, 3] with N = {feat.shape[0]} with use_view_dirs, got {got}")
            feat = torch.cat([feat, d], dim=-1)  # [N, F + 3]
        with self._mlp_precision(feat.device):
            logits = self.color_mlp(feat)  # [N, 3]
        return torch.sigmoid(logits.float())  # [N, 3] in [0, 1]
