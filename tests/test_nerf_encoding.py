"""Tests of the multiresolution hash encoding (`nerf/encoding.py`, `nerf/_hash_cpu.py`).

Tier 1: hand-checked level geometry and lookups; the three implementations (reference, vectorised torch,
numba) agree in values and in gradients w.r.t. the table and the points; float64 gradcheck of the custom
autograd Function and of the torch path.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from nerf import _hash_cpu
from nerf.encoding import (
    HashGridConfig,
    HashGridEncoder,
    hash_encode,
    hash_encode_reference,
    hash_encode_torch,
    hash_grid_levels,
)

needs_numba = pytest.mark.skipif(not _hash_cpu.AVAILABLE, reason="numba is not installed")

# small but with both dense and hashed levels: resolutions 5, 8, 14, 24 vertices per axis; 2**9 = 512 rows
# per hashed level, so levels 0 (125 rows) and 1 (512 rows) are dense, 2 and 3 hashed
TINY = HashGridConfig(
    n_levels=4, n_features_per_level=2, log2_hashmap_size=9, base_resolution=4, per_level_scale=1.8
)


def _gradcheck_config(n_features: int) -> HashGridConfig:
    # for the finite differences: level 0 dense (R = 3, 27 rows), level 1 hashed (R = 5, 125 > 64 rows)
    return HashGridConfig(
        n_levels=2,
        n_features_per_level=n_features,
        log2_hashmap_size=6,
        base_resolution=2,
        per_level_scale=1.8,
    )


def _numba(x, table, config):
    return hash_encode(x, table, config, backend="numba")


def test_default_config_levels_by_hand():
    levels = hash_grid_levels(HashGridConfig())
    # level 0: scale = 16 - 1 = 15, R = floor(15.5) + 2 = 17 vertices, 17^3 = 4913 rows, dense
    assert levels.scales[0] == 15.0 and levels.resolutions[0] == 17 and levels.sizes[0] == 4913
    # level 4: scale = 16 * 1.447^4 - 1 = 69.15, R = 71, 71^3 = 357911 <= 2^19 dense; level 5: R = 102, hashed
    assert levels.n_dense == 5 and levels.resolutions[4] == 71 and levels.resolutions[5] == 102
    assert levels.sizes[5:] == (2**19,) * 11
    assert levels.offsets[1] == 4913 and levels.n_rows == sum(levels.sizes)
    # finest level reaches about 16 * 1.447^15 = 4085 cells
    assert levels.resolutions[-1] == 4086


def test_finest_resolution_derives_per_level_scale():
    config = HashGridConfig(n_levels=16, base_resolution=16, finest_resolution=2048)
    assert config.per_level_scale == pytest.approx(math.exp(math.log(128) / 15))
    assert hash_grid_levels(config).scales[-1] == pytest.approx(2048 - 1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_levels": 0},
        {"n_features_per_level": 0},
        {"log2_hashmap_size": 31},
        {"base_resolution": 1},
        {"per_level_scale": 0.9},
        {"finest_resolution": 8},
        {"interpolation": "smoothstep"},
    ],
)
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        HashGridConfig(**kwargs)


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_vertex_and_midpoint_lookups_by_hand(backend):
    if backend == "numba" and not _hash_cpu.AVAILABLE:
        pytest.skip("numba is not installed")
    config = HashGridConfig(n_levels=1, n_features_per_level=1, log2_hashmap_size=10, base_resolution=4)
    # scale 3, R = floor(3.5) + 2 = 5, dense: row = x + 5 y + 25 z; grid position p = 3 x + 0.5
    table = torch.arange(125, dtype=torch.float32)[:, None]  # feature = row number
    vertex = torch.tensor([[(1 - 0.5) / 3, (2 - 0.5) / 3, (1 - 0.5) / 3]])  # p = (1, 2, 1) -> row 1 + 10 + 25
    # halfway between (1, 2, 1) and (2, 2, 1): (36 + 37) / 2; and at x = 0: p = (0.5, 0.5, 0.5), the mean of
    # rows {0, 1, 5, 6, 25, 26, 30, 31} = 15.5
    mid = torch.tensor([[(1.5 - 0.5) / 3, (2 - 0.5) / 3, (1 - 0.5) / 3], [0.0, 0.0, 0.0]])
    out = hash_encode(torch.cat([vertex, mid]), table, config, backend=backend)
    torch.testing.assert_close(out[:, 0], torch.tensor([36.0, 36.5, 15.5]), atol=1e-5, rtol=0)


def test_hashed_vertex_by_hand():
    config = HashGridConfig(n_levels=1, n_features_per_level=1, log2_hashmap_size=4, base_resolution=8)
    levels = hash_grid_levels(config)
    # scale 7, R = 9: 729 > 16 rows, hashed. Vertex (3, 5, 2): 3 ^ (5 * 2654435761) ^ (2 * 805459861) mod 16
    # = 3 ^ 13272178805 ^ 1610919722; low 4 bits: 3 ^ 5 ^ 10 = 0b0011 ^ 0b0101 ^ 0b1010 = 0b1100 = 12
    assert levels.n_dense == 0 and (3 ^ (5 * 2654435761) ^ (2 * 805459861)) % 16 == 12
    table = torch.arange(16, dtype=torch.float64)[:, None]
    x = torch.tensor([[(3 - 0.5) / 7, (5 - 0.5) / 7, (2 - 0.5) / 7]], dtype=torch.float64)
    for fn in (hash_encode_reference, hash_encode_torch, hash_encode):
        assert fn(x, table, config).item() == pytest.approx(12.0)


def _values_and_grads(fn, x, table, config, grad_out):
    x = x.clone().requires_grad_(True)
    table = table.clone().requires_grad_(True)
    out = fn(x, table, config)
    (out * grad_out).sum().backward()
    return out.detach(), table.grad, x.grad


@pytest.mark.parametrize("config", [TINY, HashGridConfig()], ids=["tiny", "default"])
@pytest.mark.parametrize("fast", ["torch", "numba"])
def test_fast_paths_match_reference(config, fast):
    if fast == "numba" and not _hash_cpu.AVAILABLE:
        pytest.skip("numba is not installed")
    gen = torch.Generator().manual_seed(0)
    n_rows = hash_grid_levels(config).n_rows
    table = torch.rand(n_rows, config.n_features_per_level, generator=gen) * 2 - 1
    n = 3 * 4096 + 17  # several of the compiled kernels' 4096-point chunks and a partial last one
    x = torch.rand(n, 3, generator=gen)
    x[:10] = torch.tensor([0.0, 1.0, 0.5])  # the box's faces, where the top vertices are used
    grad_out = torch.randn(n, config.output_dim, generator=gen)
    fn = hash_encode_torch if fast == "torch" else _numba
    ref = _values_and_grads(hash_encode_reference, x, table, config, grad_out)
    got = _values_and_grads(fn, x, table, config, grad_out)
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)  # values
    torch.testing.assert_close(got[1], ref[1], atol=1e-4, rtol=1e-5)  # d / d table (scatter-add)
    # d / d x scales with the finest resolution (~4000 for the default), so compare relative to its size
    scale = ref[2].abs().max()
    torch.testing.assert_close(got[2] / scale, ref[2] / scale, atol=1e-5, rtol=0)


@needs_numba
def test_points_outside_the_box_are_clamped_with_zero_gradient():
    gen = torch.Generator().manual_seed(1)
    table = torch.randn(hash_grid_levels(TINY).n_rows, 2, generator=gen, dtype=torch.float64)
    x = torch.tensor([[-0.2, 0.3, 1.5], [0.0, 0.3, 1.0]], dtype=torch.float64)
    for fn in (hash_encode_reference, hash_encode_torch, _numba):
        _, _, gx = _values_and_grads(fn, x, table, TINY, torch.ones(2, TINY.output_dim, dtype=torch.float64))
        out = fn(x, table, TINY)
        torch.testing.assert_close(out[0], out[1])  # same point after clamping
        assert gx[0, 0] == 0 and gx[0, 2] == 0 and gx[0, 1] != 0
    # NaN (a diverged fit): the compiled kernel, which does not check bounds, reads x = 0 instead of a row
    # floor(NaN) points at outside the table; so does the torch path (it raised IndexError; on CUDA a
    # device-side assert)
    nan = torch.tensor([[float("nan"), 0.3, 1.0], [0.0, 0.3, 1.0]], dtype=torch.float64)
    for fn in (_numba, hash_encode_torch):
        out = fn(nan, table, TINY)
        torch.testing.assert_close(out[0], out[1])


@needs_numba
@pytest.mark.parametrize("n_features", [2, 3])  # the kernels' F = 2 fast path and the general loop
def test_numba_function_gradcheck_float64(n_features):
    config = _gradcheck_config(n_features)
    levels = hash_grid_levels(config)
    assert levels.n_dense == 1 and levels.n_rows == 27 + 64
    gen = torch.Generator().manual_seed(2)
    table = torch.randn(levels.n_rows, n_features, generator=gen, dtype=torch.float64, requires_grad=True)
    x = (0.05 + 0.9 * torch.rand(12, 3, generator=gen, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: _numba(a, b, config), (x, table), eps=1e-6, atol=1e-5)


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numba_fused_backward_equals_the_two_kernels_bitwise(dtype):
    # Autograd takes the fused kernel when the points need a gradient too (the refinement's colour field),
    # the table kernel alone otherwise (NeRF training): both must give the same numbers.
    from nerf.encoding import _kernel_args

    config = HashGridConfig(log2_hashmap_size=12)  # dense and hashed levels
    levels = hash_grid_levels(config)
    rng = np.random.default_rng(3)
    table = rng.uniform(-1, 1, (levels.n_rows, 2)).astype(dtype)
    x = rng.uniform(-0.1, 1.1, (2000, 3)).astype(dtype)  # some outside the box: zero gradient there
    grad_out = rng.normal(size=(2000, config.output_dim)).astype(dtype)
    args = _kernel_args(levels, torch.float32 if dtype == np.float32 else torch.float64)
    grad_x, grad_table = _hash_cpu.hash_backward_both_cpu(x, table, grad_out, *args, levels.n_rows)
    assert np.array_equal(grad_x, _hash_cpu.hash_backward_input_cpu(x, table, grad_out, *args))
    assert np.array_equal(grad_table, _hash_cpu.hash_backward_table_cpu(x, grad_out, *args, levels.n_rows))
    assert np.any(grad_x == 0) and np.all(np.isfinite(grad_x)) and np.abs(grad_table).sum() > 0


def test_torch_path_gradcheck_and_gradgradcheck_float64():
    config = _gradcheck_config(2)
    gen = torch.Generator().manual_seed(3)
    table = torch.randn(
        hash_grid_levels(config).n_rows, 2, generator=gen, dtype=torch.float64, requires_grad=True
    )
    x = (0.05 + 0.9 * torch.rand(6, 3, generator=gen, dtype=torch.float64)).requires_grad_(True)

    def fn(a, b):
        return hash_encode_torch(a, b, config)

    assert torch.autograd.gradcheck(fn, (x, table), eps=1e-6, atol=1e-5)
    # twice differentiable (eikonal losses): gradient of d out / d x w.r.t. the table
    assert torch.autograd.gradgradcheck(fn, (x, table), eps=1e-6, atol=1e-5)


@needs_numba
def test_numba_path_refuses_double_backward():
    table = torch.randn(hash_grid_levels(TINY).n_rows, 2, requires_grad=True)
    x = torch.rand(5, 3, requires_grad=True)
    (gx,) = torch.autograd.grad(_numba(x, table, TINY).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()


def test_encoder_module():
    torch.manual_seed(0)
    enc = HashGridEncoder(TINY)
    levels = hash_grid_levels(TINY)
    assert enc.output_dim == 8 and list(enc.table.shape) == [levels.n_rows, 2]
    assert [p is enc.table for p in enc.parameters()] == [True]
    assert enc.table.abs().max() <= 1e-4 and enc.table.std() > 3e-5  # U(-1e-4, 1e-4)
    out = enc(torch.rand(7, 3))
    assert out.shape == (7, 8) and out.dtype == torch.float32
    out.sum().backward()
    assert enc.table.grad is not None and enc.table.grad.abs().sum() > 0
    assert "n_levels=4" in repr(enc)


def test_bad_inputs_raise():
    table = torch.zeros(hash_grid_levels(TINY).n_rows, 2)
    with pytest.raises(ValueError, match=r"x must have shape \[N, 3\]"):
        hash_encode(torch.rand(4, 2), table, TINY)
    with pytest.raises(ValueError, match="table must have shape"):
        hash_encode(torch.rand(4, 3), table[:-1], TINY)
    with pytest.raises(ValueError, match="float dtype"):
        hash_encode(torch.rand(4, 3, dtype=torch.float64), table, TINY)
    with pytest.raises(ValueError, match="backend"):
        hash_encode(torch.rand(4, 3), table, TINY, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        HashGridEncoder(TINY, backend="fast")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_uses_torch_path_and_matches_cpu():
    gen = torch.Generator().manual_seed(4)
    config = HashGridConfig()
    table = torch.rand(hash_grid_levels(config).n_rows, 2, generator=gen) * 2 - 1
    x = torch.rand(4096, 3, generator=gen)
    cpu = hash_encode(x, table, config)
    cuda = hash_encode(x.cuda(), table.cuda(), config)
    torch.testing.assert_close(cuda.cpu(), cpu, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- triton kernels (CPU: Triton's interpreter)


@pytest.fixture
def triton_interpreter():
    """The Triton kernels run by Triton's interpreter on CPU tensors (tests/conftest.py sets it up)."""
    pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]' on Linux x86-64)")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=1 is not set (a CUDA machine): the CUDA test covers the kernels")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_kernels_match_the_torch_path(triton_interpreter, dtype):
    """Default geometry (dense and hashed levels), points also outside [0, 1] and on its faces; values and
    both gradients equal the PyTorch path's."""
    gen = torch.Generator().manual_seed(5)
    config = HashGridConfig()
    table = (
        torch.rand(hash_grid_levels(config).n_rows, 2, generator=gen, dtype=dtype) * 2 - 1
    ).requires_grad_()
    x = torch.rand(150, 3, generator=gen, dtype=dtype) * 1.2 - 0.1
    x[:4] = torch.tensor([0.0, 1.0, 0.5], dtype=dtype)
    x.requires_grad_(True)
    fast = hash_encode(x, table, config, backend="triton")
    ref = hash_encode_torch(x, table, config)
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 1e-12}
    torch.testing.assert_close(fast, ref, **tol)
    weights = torch.randn(fast.shape, generator=gen, dtype=dtype)
    got = torch.autograd.grad((fast * weights).sum(), [x, table])
    want = torch.autograd.grad((ref * weights).sum(), [x, table])
    grad_tol = {"atol": 1e-3, "rtol": 1e-4} if dtype == torch.float32 else tol  # x's grad: ~1e3 scales
    torch.testing.assert_close(got[0], want[0], **grad_tol)
    torch.testing.assert_close(got[1], want[1], **tol)


def test_triton_kernels_need_a_power_of_two_features(triton_interpreter):
    """tl.arange over the features: 3 failed to compile with Triton's own message; refused in one line."""
    config = HashGridConfig(n_levels=2, n_features_per_level=3, log2_hashmap_size=5, base_resolution=2)
    table = torch.zeros(hash_grid_levels(config).n_rows, 3)
    with pytest.raises(ValueError, match="power of two, got 3"):
        hash_encode(torch.rand(4, 3), table, config, backend="triton")


def test_triton_kernels_gradcheck(triton_interpreter):
    """Float64 gradcheck (w.r.t. points and table) on a two-level grid, one dense and one hashed level:
    small, since every numerical derivative is an interpreted kernel launch."""
    config = HashGridConfig(n_levels=2, log2_hashmap_size=5, base_resolution=2, per_level_scale=2.0)
    levels = hash_grid_levels(config)
    assert levels.n_dense == 1 and levels.n_rows == 27 + 32
    gen = torch.Generator().manual_seed(6)
    table = (torch.rand(levels.n_rows, 2, generator=gen, dtype=torch.float64) - 0.5).requires_grad_()
    x = (torch.rand(3, 3, generator=gen, dtype=torch.float64) * 0.9 + 0.05).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: hash_encode(a, b, config, backend="triton"), (x, table))


def test_triton_backend_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    from nerf import _hash_triton

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    table = torch.zeros(hash_grid_levels(TINY).n_rows, 2)
    with pytest.raises(RuntimeError, match="triton"):
        hash_encode(torch.rand(4, 3), table, TINY, backend="triton")
    assert not _hash_triton.runs_on(torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_kernels_match_the_torch_path_on_cuda():
    pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(7)
    config = HashGridConfig()
    table = (torch.rand(hash_grid_levels(config).n_rows, 2, generator=gen) * 2 - 1).cuda().requires_grad_()
    x = torch.rand(1 << 16, 3, generator=gen).cuda().requires_grad_()
    fast, ref = hash_encode(x, table, config, backend="triton"), hash_encode_torch(x, table, config)
    torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-5)
    weights = torch.randn_like(fast)
    got = torch.autograd.grad((fast * weights).sum(), [x, table])
    want = torch.autograd.grad((ref * weights).sum(), [x, table])
    torch.testing.assert_close(got[0], want[0], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-4)  # atomics add in another order
