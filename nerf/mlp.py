"""The field's small ReLU MLPs, with a CPU forward and backward that run over rows in cache-sized chunks.

`ReLUMLP` is an `nn.Sequential` of Linear, ReLU, ..., Linear (same parameter names as before, so saved
fields load unchanged). On CPU in float32 with gradients on, plain layers write and reread [N, 64]
activations of 64 MB at the benchmark's 2^18 points once per layer, and again in the backward (ReLU's
backward alone took 12% of a field step, a copy of such a tensor 10%); `_ChunkedReLUMLP` runs all layers
on 16384 rows at a time, so a chunk's activations (4 MB) can stay in cache from one layer to the next,
and its backward goes chunk by chunk too, accumulating the weights' gradients with `addmm_`. It stores
what autograd would store (each layer's input) and gives autograd's gradients up to rounding (float32
sums in another order; `tests/test_nerf_mlp.py`, with a float64 `gradcheck`). Measured on 2 cores
(2026-12-06, AMD EPYC): the two MLPs' forward + backward at 2^18 rows 1.5x faster (median 295 against
454 ms); the whole field's forward + backward + Adam (`scripts/bench_nerf.py`, the set-ups taking turns)
690k against 580k samples/s, 1.2x. Whole oracle fits at the CPU defaults (`scripts/check_nerf_oracle.py`,
one run each, one after the other): the checker sphere trained in 246 s against 267 s, the blob in
146.6 s against 146.5 s, with the same Chamfer (checker 0.00433 both, blob 0.00482 / 0.00483) and
held-out PSNR within 0.01 dB.

Everything else (CUDA, where one kernel per layer already covers all rows; bfloat16 autocast; no
gradients; double backward, which the chunked function does not support) runs the layers as
`nn.Sequential` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["CHUNK_ROWS", "ReLUMLP"]

CHUNK_ROWS = 16384  # rows per chunk: [16384, 64] float32 is 4 MB (2048-65536 tried; 16384 was fastest)


class _ChunkedReLUMLP(torch.autograd.Function):
    """x [N, D0] -> y [N, D_L] through Linear(D0, D1), ReLU, ..., Linear(D_{L-1}, D_L), chunk by chunk."""

    @staticmethod
    def forward(ctx, x: Tensor, chunk: int, *params: Tensor) -> Tensor:
        weights, biases = params[0::2], params[1::2]  # weight i: [D_{i+1}, D_i], bias i: [D_{i+1}]
        n = x.shape[0]
        # inputs of layers 1..L-1 (post-ReLU), what the backward needs for the weights' gradients and masks
        hidden = [x.new_empty(n, w.shape[1]) for w in weights[1:]]  # [N, D_i] each
        out = x.new_empty(n, weights[-1].shape[0])  # [N, D_L]
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            h = x[start:stop]  # [c, D0]
            for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
                dst = hidden[i][start:stop] if i < len(hidden) else out[start:stop]  # contiguous rows
                torch.addmm(b, h, w.t(), out=dst)
                if i < len(hidden):
                    dst.clamp_min_(0.0)  # ReLU
                h = dst
        ctx.chunk = chunk
        ctx.save_for_backward(x, *hidden, *weights)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        saved = ctx.saved_tensors
        n_layers = (len(saved) + 1) // 2
        x, hidden, weights = saved[0], saved[1:n_layers], saved[n_layers:]
        inputs = (x, *hidden)  # input of layer i: [N, D_i]
        grad_w = [torch.zeros_like(w) for w in weights]
        grad_b = [w.new_zeros(w.shape[0]) for w in weights]
        need_x = ctx.needs_input_grad[0]
        grad_x = x.new_empty(x.shape) if need_x else None
        n = grad_out.shape[0]
        for start in range(0, n, ctx.chunk):
            stop = min(start + ctx.chunk, n)
            g = grad_out[start:stop]  # [c, D_L]: gradient at the output of the last layer
            for i in range(n_layers - 1, -1, -1):
                a = inputs[i][start:stop]  # [c, D_i]
                grad_w[i].addmm_(g.t(), a)  # [D_{i+1}, D_i]
                grad_b[i].add_(g.sum(0))
                if i > 0:
                    g = torch.mm(g, weights[i]).masked_fill_(a <= 0, 0.0)  # through layer i and ReLU i-1
                elif need_x:
                    torch.mm(g, weights[0], out=grad_x[start:stop])
        grads: list[Tensor | None] = [grad_x, None]
        for i in range(n_layers):
            grads += [grad_w[i], grad_b[i]]
        return tuple(grads)


class ReLUMLP(nn.Sequential):
    """Linear(dims[0], dims[1]), ReLU, ..., Linear(dims[-2], dims[-1]): [N, dims[0]] -> [N, dims[-1]]."""

    def __init__(self, dims: Sequence[int]) -> None:
        if len(dims) < 2 or any(int(d) != d or d < 1 for d in dims):
            raise ValueError(f"ReLUMLP needs at least two positive integer sizes, got {list(dims)}")
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            if i:
                layers.append(nn.ReLU(inplace=True))
            layers.append(nn.Linear(int(dims[i]), int(dims[i + 1])))
        super().__init__(*layers)

    def _chunked(self, x: Tensor) -> bool:
        """Whether the chunked CPU function runs this call (the plain layers otherwise)."""
        params = list(self.parameters())
        return (
            x.device.type == "cpu"
            and x.ndim == 2
            and x.shape[0] > CHUNK_ROWS
            and torch.is_grad_enabled()
            and (x.requires_grad or any(p.requires_grad for p in params))
            and not torch.is_autocast_enabled("cpu")
            and x.dtype == torch.float32
            and all(p.dtype == torch.float32 for p in params)
        )

    def forward(self, x: Tensor) -> Tensor:  # [N, dims[0]] -> [N, dims[-1]]
        if not self._chunked(x):
            return super().forward(x)
        params = [t for m in self if isinstance(m, nn.Linear) for t in (m.weight, m.bias)]
        return _ChunkedReLUMLP.apply(x.contiguous(), CHUNK_ROWS, *params)
