"""Cost of appending one step's rows to an infinite layer, at 10k and at 1M rows.

Every SGD step appends ``b`` rows per π-layer (docs/math.md §5). A
:class:`inf.rows.RowStore` keeps its rows in capacity buffers that double
when full, so an append writes ``b`` rows, and only the rare reallocation
copies all ``M`` rows. The honest per-step figure is the amortized one: the
mean over one whole doubling period (capacity ``C`` → ``2C``: ``C / b`` steps
and exactly one reallocation). This benchmark measures, for stores that hold
10k and 1M rows:

* ``RowStore.append`` of 8 rows: median, amortized mean over a doubling
  period, and the maximum (the reallocation step);
* ``InfSGD.step`` on such a layer (append + coefficient update), which also
  touches the whole coefficient vector (4 bytes per row, see docs/performance.md).

    python -m benchmarks.append_cost            # r = 128, ≈ 3 GB peak at 1M rows, ≈ 1 min
    python -m benchmarks.append_cost --quick    # 1M row store only up to its first reallocation + 2000 steps
    python -m benchmarks.append_cost --r 400 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from inf.layers import InfPiLinearReLU
from inf.optim import InfSGD
from inf.rows import RowStore

from ._util import add_common_args, apply_threads, machine_line, median, print_table

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def filled_store(M: int, r: int, dtype, fill_rows: int = 8192) -> RowStore:
    """A store holding ``M`` rows, grown the way training grows it (amortized doubling)."""
    store = RowStore(r, r, rows=0, dtype=dtype)
    A = torch.randn(fill_rows, r).to(dtype)
    B = torch.nn.functional.normalize(torch.randn(fill_rows, r), dim=1).to(dtype)
    while store.num_rows < M:
        k = min(fill_rows, M - store.num_rows)
        store.append(A[:k], B[:k], -0.01)
    return store


def time_appends(store: RowStore, batch: int, quick_steps: int | None = None):
    """Append ``batch`` rows per step through one whole doubling period (from the step that
    reallocates to the step before the next reallocation); returns per-step seconds and the
    number of reallocations seen. With ``quick_steps``: only up to the first reallocation
    plus that many steps."""
    r = store.r
    A = torch.randn(batch, r).to(store.A.dtype)
    B = torch.nn.functional.normalize(torch.randn(batch, r), dim=1).to(store.B.dtype)
    times, realloc_steps = [], []
    started = False
    after = 0
    while True:
        before = store.reallocations
        t0 = time.perf_counter()
        store.append(A, B, -0.01)
        dt = time.perf_counter() - t0
        if store.reallocations != before:
            if started and quick_steps is None:
                break  # the next period begins: stop before it
            started = True
            realloc_steps.append(len(times))
        if started:
            times.append(dt)
            after += 1
            if quick_steps is not None and after > quick_steps:
                break
    return times, realloc_steps


def time_optimizer_steps(M: int, r: int, batch: int, steps: int, dtype, momentum: float):
    """``InfSGD.step`` on one layer of ``M`` rows with a recorded gradient of ``batch`` rows.
    The backward pass is replaced by what it leaves behind (recorded gradient rows), so
    only the optimizer is timed."""
    layer = InfPiLinearReLU(r, r, dtype=dtype)
    store = layer.rows
    store.truncate(0)
    fill = filled_store(M, r, dtype)
    store.append(fill.A.data, fill.B.data, -0.01)
    del fill
    opt = InfSGD(layer.parameters(), lr=0.01, momentum=momentum)
    A = torch.randn(batch, r).to(dtype)
    B = torch.nn.functional.normalize(torch.randn(batch, r), dim=1).to(dtype)
    times = []
    for i in range(steps + 2):
        store.record(A, B)  # what a .grad-populating backward leaves (inf.rows)
        t0 = time.perf_counter()
        opt.step()
        dt = time.perf_counter() - t0
        if i >= 2:
            times.append(dt)
        opt.zero_grad()
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument(
        "--r",
        type=int,
        default=128,
        help="row width (A and B); default 128 keeps the 1M-row store with its doubled buffer near 3 GB",
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 1_000_000])
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    dtype = DTYPES[args.dtype]
    print(f"append cost: {args.batch} rows per step, r = {args.r}, {args.dtype} storage")
    print(machine_line())

    rows, res = [], {}
    for M in args.sizes:
        store = filled_store(M, args.r, dtype)
        cap0 = store.capacity
        quick = 2000 if args.quick else None
        times, realloc_at = time_appends(store, args.batch, quick_steps=quick)
        plain = [t for i, t in enumerate(times) if i not in realloc_at]
        amortized = sum(times) / len(times) if quick is None else None
        res[M] = dict(
            median=median(plain), mean=amortized, max=max(times), realloc=[times[i] for i in realloc_at]
        )
        rows.append(
            [
                f"{M:,}",
                f"{cap0:,}",
                len(times),
                f"{median(plain) * 1e6:.1f}",
                "n/a (--quick)" if amortized is None else f"{amortized * 1e6:.1f}",
                f"{max(times) * 1e3:.2f} ms",
                len(realloc_at),
                store.reallocations,
                f"{store.num_rows:,}",
            ]
        )
        print(f"  M={M:,}: done ({len(times)} steps)", flush=True)
        del store
    print()
    print_table(
        [
            "rows at start",
            "capacity",
            "steps timed",
            "median µs",
            "amortized mean µs",
            "max (realloc)",
            "reallocs in window",
            "reallocs total",
            "rows at end",
        ],
        rows,
        title="RowStore.append (window = one doubling period: C → 2C rows, one reallocation)",
    )
    if len(args.sizes) >= 2:
        a, b = args.sizes[0], args.sizes[-1]
        print(
            f"\nratio {b:,} / {a:,} rows: median {res[b]['median'] / res[a]['median']:.2f}"
            + ("" if res[a]["mean"] is None else f", amortized mean {res[b]['mean'] / res[a]['mean']:.2f}")
            + "  (target: within 2×)"
        )

    # the optimizer step on top of the append
    steps = 50 if args.quick else 200
    opt_rows, opt_res = [], {}
    for M in args.sizes:
        for momentum in (0.0, 0.9):
            t = time_optimizer_steps(M, args.r, args.batch, steps, dtype, momentum)
            opt_res[(M, momentum)] = median(t)
            opt_rows.append([f"{M:,}", momentum, f"{median(t) * 1e6:.1f}", f"{statistics.mean(t) * 1e6:.1f}"])
    print()
    print_table(
        ["rows", "momentum", "median µs", "mean µs"],
        opt_rows,
        title=f"InfSGD.step on one layer ({steps} steps, capacity already reserved)",
    )
    if len(args.sizes) >= 2:
        a, b = args.sizes[0], args.sizes[-1]
        print(
            f"ratio {b:,} / {a:,} rows: plain {opt_res[(b, 0.0)] / opt_res[(a, 0.0)]:.1f}, "
            f"momentum {opt_res[(b, 0.9)] / opt_res[(a, 0.9)]:.1f}  (O(M) on 4-byte coefficients: "
            "the gradient vector of Amult, the momentum buffer)"
        )
    print(machine_line())


if __name__ == "__main__":
    main()
