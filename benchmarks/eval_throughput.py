"""Evaluation throughput of an infinite π-layer on 10k inputs, as a fraction of torch.mm's.

One hidden π-layer (r = r_out = 400) holding M random rows evaluates a batch
of 10k inputs without gradient, under the layer's default memory budget
(``chunk_bytes`` = 256 MiB of batch × rows intermediates). Its useful work is
the two products ``ĝBᵀ`` and ``(F00·c)A``: ``2·b·M·(r + r_out)`` flops. The
baselines, measured in the same process in alternating turns, are torch.mm
doing exactly these products (and nothing else)

* in the budget's shapes: (10k × r)·(r × chunk) and (10k × chunk)·(chunk × r_out);
* in the CPU cache blocks the layer uses (``BlockPolicy.cpu_block_batch``
  inputs × ``cpu_block_rows`` rows, inf.functional.BlockPolicy);

and, for scale, one square 2048³ product. The layer's GFLOP/s divided by the
best of the first two is the ratio the target (≥ 60 %) refers to.

    python -m benchmarks.eval_throughput            # M = 50k (≈ 1 min)
    python -m benchmarks.eval_throughput --quick    # M = 20k
"""

from __future__ import annotations

import argparse

import torch

import inf.functional as functional
from inf.layers import InfPiLinearReLU

from ._util import add_common_args, apply_threads, interleaved, machine_line, median, print_table, random_rows


def make_layer(M: int, r: int, seed: int, dtype=torch.float32) -> InfPiLinearReLU:
    layer = InfPiLinearReLU(r, r, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    A, c, B = random_rows(M, r, r, gen, dtype=dtype)
    layer.load_state_dict({"bias": layer.bias.detach(), "rows.A": A, "rows.Amult": c, "rows.B": B})
    layer.requires_grad_(False)
    return layer


def mm_products(g, A, B, row_block: int, batch_block: int | None):
    """The layer's two products, block by block, with no elementwise work in between."""
    b, M = g.shape[0], A.shape[0]
    out = torch.zeros(b, A.shape[1])
    bb = batch_block or b
    for lo in range(0, M, row_block):
        Bc, Ac = B[lo : lo + row_block], A[lo : lo + row_block]
        for blo in range(0, b, bb):
            q = g[blo : blo + bb] @ Bc.T
            out[blo : blo + bb].addmm_(q, Ac)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--M", type=int, default=None, help="rows (default 50k; --quick 20k)")
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--r", type=int, default=400)
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    M = args.M or (20_000 if args.quick else 50_000)
    repeats = args.repeats or (2 if args.quick else 3)
    b, r = args.batch, args.r

    layer = make_layer(M, r, args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    g = torch.randn(b, r, generator=gen)
    chunk = layer._chunk_rows(b, torch.float32) or M
    A, B = layer.A.detach(), layer.B.detach()
    ghat = torch.nn.functional.normalize(g, dim=1)
    row_block = functional.block_rows(M, chunk, "cpu") or M
    batch_block = functional.block_batch(b, "cpu")

    def evaluate():
        with torch.no_grad():
            return layer(g)

    sq = torch.randn(2048, 2048, generator=gen)
    cands = {
        "π-layer forward": evaluate,
        "mm, budget shapes": lambda: mm_products(ghat, A, B, chunk, None),
        "mm, cache blocks": lambda: mm_products(ghat, A, B, row_block, batch_block),
        "mm 2048³": lambda: torch.mm(sq, sq),
    }
    print(
        f"evaluation of {b} inputs against M = {M} rows, r = r_out = {r}, float32; budget chunk "
        f"{chunk} rows, CPU blocks {batch_block or b} inputs × {row_block} rows; median of {repeats}"
    )
    print(machine_line())
    times = interleaved(cands, repeats=repeats, warmup=1)
    flops = {k: 2.0 * b * M * (r + r) for k in cands}
    flops["mm 2048³"] = 2.0 * 2048**3
    gflops = {k: flops[k] / median(v) / 1e9 for k, v in times.items()}
    ref = max(gflops["mm, budget shapes"], gflops["mm, cache blocks"])
    rows = [
        [k, f"{median(v):.3f}", f"{gflops[k]:.1f}", f"{gflops['π-layer forward'] / gflops[k]:.2f}"]
        for k, v in times.items()
    ]
    print()
    print_table(["candidate", "seconds", "GFLOP/s", "layer GFLOP/s ÷ this"], rows)
    print(
        f"\nlayer / best torch.mm on the same products: {gflops['π-layer forward'] / ref:.2f} "
        f"(target ≥ 0.60 → {'met' if gflops['π-layer forward'] / ref >= 0.6 else 'NOT met'})"
    )
    print("(peak memory of evaluation under the budget: python -m benchmarks.memory)")
    print(machine_line())


if __name__ == "__main__":
    main()
