"""Benchmark of the hash-grid encoder: samples/s for forward + backward + Adam step on a 2^18 batch.

Compares ours (`HashGridEncoder`, backend "auto": numba kernels on CPU, vectorised torch elsewhere) with the
straightforward per-level implementation (`hash_encode_reference`) on the same table, points and optimiser,
and prints the ratio. Points are uniform in [0, 1]^3 (the cache's worst case; ray samples are more
coherent). Usage: `.venv/bin/python scripts/bench_nerf_encoding.py [--batch 262144] [--iters 5]`.
"""

from __future__ import annotations

import argparse
import time

import torch

from nerf.encoding import HashGridConfig, HashGridEncoder, hash_encode_reference, hash_encode_torch


def samples_per_second(encode, encoder: HashGridEncoder, x: torch.Tensor, iters: int, fused: bool) -> float:
    """Median samples/s of `iters` steps (one warm-up step first: numba compilation, allocator)."""
    opt = torch.optim.Adam(encoder.parameters(), lr=1e-2, fused=fused)
    target = torch.rand(x.shape[0], encoder.output_dim, generator=torch.Generator().manual_seed(1))
    times = []
    for step in range(iters + 1):
        sync(x.device)
        t0 = time.perf_counter()
        loss = (encode(x) - target.to(x.device)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(x.device)
        if step > 0:
            times.append(time.perf_counter() - t0)
    times.sort()
    return x.shape[0] / times[len(times) // 2]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2**18, help="points per step")
    parser.add_argument("--iters", type=int, default=5, help="timed steps per implementation (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-fused-adam", action="store_true", help="torch's default (foreach) Adam instead")
    parser.add_argument("--with-torch", action="store_true", help="also time the vectorised torch path")
    args = parser.parse_args()

    device = torch.device(args.device)
    config = HashGridConfig()
    encoder = HashGridEncoder(config).to(device)
    x = torch.rand(args.batch, 3, generator=torch.Generator().manual_seed(0)).to(device)
    fused = not args.no_fused_adam
    print(
        f"device={device} threads={torch.get_num_threads()} batch={args.batch} "
        f"table={list(encoder.table.shape)} levels={config.n_levels} adam={'fused' if fused else 'foreach'}"
    )

    ours = samples_per_second(encoder, encoder, x, args.iters, fused)
    print(f"ours (backend=auto):            {ours:12,.0f} samples/s")
    if args.with_torch:
        vec = samples_per_second(
            lambda p: hash_encode_torch(p, encoder.table, config), encoder, x, args.iters, fused
        )
        print(f"vectorised torch:               {vec:12,.0f} samples/s")
    ref = samples_per_second(
        lambda p: hash_encode_reference(p, encoder.table, config), encoder, x, max(2, args.iters // 2), fused
    )
    print(f"per-level reference (torch):    {ref:12,.0f} samples/s")
    print(f"ratio ours / reference:         {ours / ref:12.1f}x")


if __name__ == "__main__":
    main()
