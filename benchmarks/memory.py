"""Memory of infinite π-layers: bytes per row, step and evaluation peaks, low-precision storage.

1. Bytes per million rows of one hidden π-layer (r = r_out = 400) grown by
   training-sized appends (8 rows at a time) to M rows, in float32 and in
   bfloat16 storage (coefficients stay float32), against the bytes the rows
   need: ``M·(r + r_out)·itemsize + 4·M``. Reported: resident memory after
   growth, the peak while growing (a reallocation holds the old and the new
   buffer), the reserved capacity, and the peak growth during one training
   step (forward, backward, InfSGD.step) at that size.
2. Evaluation under a memory budget: 10k inputs against M = 200k rows with
   the default 256 MiB budget for batch × rows intermediates; the peak RSS
   growth is compared with the budget (the unchunked intermediates would take
   10k × 200k × 4 B = 8 GB each). Run once with the CPU cache blocks and once
   with budget chunking alone (what runs with several threads or on a GPU).
3. Accuracy of bfloat16/float16 row storage: an InfMLP(3072, 10, r=400, L=2)
   trained for 300 steps with the paper's settings on class-template data; the
   relative error of its outputs (and of the last hidden preactivation) with
   the rows stored in low precision, against float32 rows, on held-out and on
   training inputs (the latter have rows with q ≈ 1).

    python -m benchmarks.memory            # M = 250k per layer, eval at 200k rows (≈ 2.5 min)
    python -m benchmarks.memory --quick    # M = 100k, eval at 50k rows
"""

from __future__ import annotations

import argparse
import copy

import torch

import inf.functional as functional
from inf.layers import InfPiLinearReLU
from inf.optim import InfSGD

from ._util import (
    PeakRSS,
    add_common_args,
    apply_threads,
    fmt_bytes,
    machine_line,
    print_table,
    random_rows,
    rss_bytes,
    trained_inf_mlp,
)

MIB = 2**20


def bytes_per_row_table(M: int, r: int, batch: int):
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        before = rss_bytes()
        with PeakRSS() as grow:
            layer = InfPiLinearReLU(r, r, dtype=dtype)
            A = torch.randn(batch, r).to(dtype)
            B = torch.nn.functional.normalize(torch.randn(batch, r), dim=1).to(dtype)
            while layer.rows.num_rows < M:
                layer.rows.append(A, B, -0.01)
        resident = rss_bytes() - before
        n = layer.rows.num_rows
        item = torch.tensor([], dtype=dtype).element_size()
        need = n * (2 * r * item + 4)
        cap = layer.rows.capacity
        # one training step at this size (capacity has room: no reallocation inside)
        assert cap >= n + batch
        opt = InfSGD(layer.parameters(), lr=0.01)
        g = torch.randn(batch, r, requires_grad=True)
        with PeakRSS() as step:
            opt.zero_grad()
            layer(g).square().sum().backward()
            opt.step()
        per_m = 1e6 / n
        rows.append(
            [
                str(dtype).replace("torch.", ""),
                f"{n:,}",
                f"{need * per_m / MIB:.0f}",
                f"{resident * per_m / MIB:.0f}",
                f"{resident / need:.2f}",
                f"{grow.peak * per_m / MIB:.0f}",
                f"{grow.peak / need:.2f}",
                f"{cap * (2 * r * item + 4) * per_m / MIB:.0f}",
                f"{step.peak * per_m / MIB:.0f}",
                f"{step.peak / need:.3f}",
            ]
        )
        del layer, opt
    return rows


def eval_budget_table(M: int, r: int, batch: int):
    gen = torch.Generator().manual_seed(0)
    layer = InfPiLinearReLU(r, r)
    A, c, B = random_rows(M, r, r, gen)
    layer.load_state_dict({"bias": layer.bias.detach(), "rows.A": A, "rows.Amult": c, "rows.B": B})
    layer.requires_grad_(False)
    del A, B, c
    g = torch.randn(batch, r, generator=gen)
    chunk = layer._chunk_rows(batch, torch.float32)
    rows, outs = [], {}
    for label, blocks in (("CPU blocks + budget", True), ("budget chunks only", False)):
        # without blocks: the memory budget's chunks only (what a GPU uses)
        policy = {} if blocks else dict(cpu_block_rows=None, cpu_block_batch=None)
        with functional.block_policy(**policy), PeakRSS() as m, torch.no_grad():
            outs[label] = layer(g)
        rows.append(
            [
                label,
                f"{chunk}",
                fmt_bytes(m.peak),
                fmt_bytes(layer.chunk_bytes),
                fmt_bytes(batch * r * 4),
                fmt_bytes(batch * M * 4),
            ]
        )
    a, b = outs.values()
    rel = ((a - b).norm() / a.norm()).item()
    return rows, rel, M * (2 * r * 4 + 4)


def accuracy_table(steps: int):
    net, x_test, x_train = trained_inf_mlp(steps)
    rows = []
    with torch.no_grad():
        ref = {name: net(x, return_hidden=True) for name, x in (("held-out", x_test), ("training", x_train))}
        for dtype in (torch.bfloat16, torch.float16):
            low = copy.deepcopy(net)
            for layer in low.pi_layers:
                layer.rows.to(dtype)  # A, B in low precision; coefficients stay float32
            for name, x in (("held-out", x_test), ("training", x_train)):
                out, h = low(x, return_hidden=True)
                out0, h0 = ref[name]
                rows.append(
                    [
                        str(dtype).replace("torch.", ""),
                        name,
                        f"{((out - out0).norm() / out0.norm()).item():.2e}",
                        f"{((out - out0).abs().max() / out0.abs().max()).item():.2e}",
                        f"{((h - h0).norm() / h0.norm()).item():.2e}",
                    ]
                )
    return rows, net.rows_per_layer()[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--M", type=int, default=None, help="rows per layer for part 1 (default 250k)")
    parser.add_argument("--eval-M", type=int, default=None, help="rows for part 2 (default 200k)")
    parser.add_argument("--r", type=int, default=400)
    parser.add_argument("--steps", type=int, default=300, help="training steps for part 3")
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    M = args.M or (100_000 if args.quick else 250_000)
    eval_M = args.eval_M or (50_000 if args.quick else 200_000)
    print(machine_line())

    rows = bytes_per_row_table(M, args.r, batch=8)
    print()
    print_table(
        [
            "storage",
            "rows",
            "need MiB/1M",
            "resident MiB/1M",
            "resident÷need",
            "peak growing MiB/1M",
            "peak÷need",
            "capacity MiB/1M",
            "step peak MiB/1M",
            "step÷need",
        ],
        rows,
        title=f"1. one hidden π-layer, r = r_out = {args.r}, grown 8 rows at a time (per million rows)",
    )

    rows, rel, rows_bytes = eval_budget_table(eval_M, args.r, batch=10_000)
    print()
    print_table(
        ["path", "budget chunk rows", "peak RSS growth", "budget", "output", "one unchunked b×M tensor"],
        rows,
        title=f"2. evaluation of 10k inputs against {eval_M:,} rows (rows themselves "
        f"{fmt_bytes(rows_bytes)}, resident before)",
    )
    print(f"the two paths agree to {rel:.1e} (relative)")

    rows, n_rows = accuracy_table(args.steps)
    print()
    print_table(
        ["storage", "inputs", "rel. error (norm)", "max error / max |out|", "rel. error of h_L"],
        rows,
        title=f"3. low-precision rows vs float32 rows, trained InfMLP (r = 400, L = 2, "
        f"{n_rows} rows per layer), 512 inputs",
    )
    print(machine_line())


if __name__ == "__main__":
    main()
