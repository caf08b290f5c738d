"""Training-step time of an infinite π-MLP against the memory-bandwidth floor and a naive reference.

The network is InfMLP(d_in=3072, d_out=10, r=400, L=2): an input layer, two
hidden π-layers and the π output layer, each π-layer holding M rows (random
rows loaded through ``load_state_dict``, as if trained for M/8 steps). A step
is ``zero_grad``, forward, cross-entropy, backward and ``InfSGD.step`` (which
appends 8 rows per π-layer) at batch 8.

It is compared, in the same process and in alternating turns, with

* the bandwidth floor: the time to stream the bytes a step reads from its rows,
  with a plain reduction (``sum()``): every π-layer reads ``B`` and ``A`` in
  forward and ``A`` and ``B`` again in backward, so four reductions per layer;
* the naive reference (``benchmarks/_naive.py``): the same network written the
  straightforward way, as the original π-limit code did — whole batch × M kernel
  matrices each step, one ``torch.mm`` per product, rows appended by ``torch.cat``;
* the products floor: the step's matrix products as one ``torch.mm`` each on
  preallocated tensors (per π-layer ``ĝBᵀ``, ``(F·c)A``, ``δAᵀ``, ``(γ·F11)B``,
  and the input layer's ``x A₀`` and ``xᵀ δ₀``): what the step costs if nothing
  but its products ran, at the speed this machine's BLAS runs them.

Targets (issue 16): step ≤ 1.5 × the bandwidth floor at M ≥ 40k, and ≤ 0.4 × the
naive reference at M = 20k.

    python -m benchmarks.step_time                   # M = 5k, 20k, 40k, 100k
    python -m benchmarks.step_time --quick           # M = 20k, 40k, fewer repeats
    python -m benchmarks.step_time --dtype bfloat16  # bfloat16 row storage
    python -m benchmarks.step_time --compare-save    # also: recompute F11/F02 in backward
    python -m benchmarks.step_time --block-sweep     # also: other CPU block sizes, no blocking
    python -m benchmarks.step_time --threads 0       # torch's default thread count
"""

from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F

import inf.functional as functional
from inf.networks import InfMLP
from inf.optim import InfSGD

from ._naive import NaiveInfMLP, pi_layers, pi_rows
from ._util import (
    add_common_args,
    apply_threads,
    interleaved,
    load_random_rows,
    machine_line,
    median,
    print_table,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@contextlib.contextmanager
def settings(save=None, block=None):
    """Temporarily change the layer's block policy (save F11/F02; CPU rows per block)."""
    changes = {}
    if save is not None:
        changes["save_kernels"] = save
    if block is not None:
        changes["cpu_block_rows"] = block
    with functional.block_policy(**changes):
        yield


def current_block_rows() -> int:
    return int(functional.current_block_policy().cpu_block_rows or 0)


def read_bytes(net) -> int:
    """Bytes one training step reads from the rows: A and B of every π-layer, twice each."""
    total = 0
    for layer in pi_layers(net):
        A, _, B = pi_rows(layer)
        total += 2 * (A.numel() * A.element_size() + B.numel() * B.element_size())
    return total


class Floors:
    """Preallocated tensors holding the products and the row reads of one step."""

    def __init__(self, net: InfMLP, batch: int):
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(batch, net.d_in, generator=gen)
        self.A0 = net.input_layer.A.detach().clone()
        self.h0 = torch.empty(batch, net.r)
        self.gA0 = torch.empty_like(self.A0)
        self.layers = []
        for layer in pi_layers(net):
            A, _, B = pi_rows(layer)
            A, B = A.detach().clone(), B.detach().clone()
            M, r, r_out = B.shape[0], B.shape[1], A.shape[1]
            cdt = torch.float32
            self.layers.append(
                dict(
                    A=A,
                    B=B,
                    A32=A.to(cdt),
                    B32=B.to(cdt),
                    ghat=torch.randn(batch, r, generator=gen),
                    delta=torch.randn(batch, r_out, generator=gen),
                    F=torch.rand(batch, M, generator=gen),
                    G=torch.rand(batch, M, generator=gen),
                    Q=torch.empty(batch, M),
                    Gam=torch.empty(batch, M),
                    out=torch.empty(batch, r_out),
                    v=torch.empty(batch, r),
                )
            )

    def mm(self):
        torch.mm(self.x, self.A0, out=self.h0)
        for t in self.layers:
            torch.mm(t["ghat"], t["B32"].T, out=t["Q"])
            torch.mm(t["F"], t["A32"], out=t["out"])
            torch.mm(t["delta"], t["A32"].T, out=t["Gam"])
            torch.mm(t["G"], t["B32"], out=t["v"])
        torch.mm(self.x.T, self.h0, out=self.gA0)

    def bandwidth(self):
        """Stream every row as often as a step reads it: B, A (forward), A, B (backward)."""
        for t in self.layers:
            t["B"].sum()
            t["A"].sum()
            t["A"].sum()
            t["B"].sum()


def make_net(M: int, seed: int, d_in=3072, d_out=10, r=400, L=2, dtype=torch.float32):
    torch.manual_seed(seed)
    net = InfMLP(d_in, d_out, r, L=L)
    if dtype != torch.float32:
        for layer in pi_layers(net):
            layer.rows.to(dtype)
    load_random_rows(net, M, seed=seed, dtype=dtype)
    return net


def run_one(M: int, args) -> dict:
    dtype = DTYPES[args.dtype]
    net = make_net(M, args.seed, r=args.r, L=args.L, dtype=dtype)
    naive = NaiveInfMLP(make_net(M, args.seed, r=args.r, L=args.L)) if args.naive else None
    opt = InfSGD(net.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.batch, 3072, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    res = {}
    if naive is not None:  # the two implementations compute the same function
        with torch.no_grad():
            a, b = net(x), naive(x)
        res["naive max rel diff"] = float((a.float() - b).abs().max() / b.abs().max().clamp_min(1e-30))

    def step():
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()

    def naive_step():
        naive.zero_grad()
        F.cross_entropy(naive(x), y).backward()
        naive.step(0.01)

    floors = Floors(net, args.batch)
    cands = {"step": step, "bandwidth floor": floors.bandwidth, "products floor": floors.mm}
    if naive is not None:
        cands["naive"] = naive_step
    if args.compare_save:

        def step_recompute():
            with settings(save=False):
                step()

        cands["step, recompute F11/F02"] = step_recompute
    if args.block_sweep:
        for b in args.block_sizes:

            def step_b(b=b):
                with settings(block=b):
                    step()

            cands[f"step, CPU block {b or 'none'}"] = step_b
    # the first step copies the loaded rows into capacity buffers (one reallocation): warm-up
    times = interleaved(cands, repeats=args.repeats, warmup=2)
    res.update({k: median(v) for k, v in times.items()})
    res["bytes"] = read_bytes(net)
    res["rows"] = net.rows_per_layer()[0]
    return res


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--M", type=int, nargs="*", default=None, help="row counts (default 5k 20k 40k 100k)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--r", type=int, default=400)
    parser.add_argument("--L", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="row storage")
    parser.add_argument("--no-naive", dest="naive", action="store_false", help="skip the naive reference")
    parser.add_argument(
        "--compare-save", action="store_true", help="also time steps that recompute F11/F02 in backward"
    )
    parser.add_argument("--block-sweep", action="store_true", help="also time other CPU block sizes")
    parser.add_argument(
        "--block-sizes",
        type=int,
        nargs="*",
        default=[256, 1024, 4096, 16384, 0],
        help="CPU block rows for --block-sweep (0: no blocks)",
    )
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    Ms = args.M or ([20000, 40000] if args.quick else [5000, 20000, 40000, 100000])
    args.repeats = args.repeats or (5 if args.quick else 9)
    print(
        f"step time of InfMLP(3072, 10, r={args.r}, L={args.L}), batch {args.batch}, {args.dtype} rows; "
        f"median of {args.repeats} interleaved repeats; CPU block rows {current_block_rows()}"
    )
    print(machine_line())
    results = []
    for M in Ms:
        res = run_one(M, args)
        results.append((M, res))
        extra = {k: v for k, v in res.items() if k.startswith("step,")}
        naive = f", step/naive {res['step'] / res['naive']:.2f}" if "naive" in res else ""
        print(
            f"  M={M}: step {res['step'] * 1e3:.1f} ms, bandwidth floor {res['bandwidth floor'] * 1e3:.1f} ms, "
            f"step/floor {res['step'] / res['bandwidth floor']:.2f}{naive}"
            + "".join(f"; {k[6:]} {v / res['step']:.2f}× step" for k, v in extra.items()),
            flush=True,
        )
    headers = [
        "M",
        "step ms",
        "floor ms",
        "products ms",
        "naive ms",
        "step/floor",
        "step/naive",
        "step/products",
        "products/floor",
        "step GB/s",
        "floor GB/s",
    ]
    rows = []
    for M, res in results:
        nv = res.get("naive")
        rows.append(
            [
                M,
                f"{res['step'] * 1e3:.1f}",
                f"{res['bandwidth floor'] * 1e3:.1f}",
                f"{res['products floor'] * 1e3:.1f}",
                "-" if nv is None else f"{nv * 1e3:.1f}",
                f"{res['step'] / res['bandwidth floor']:.2f}",
                "-" if nv is None else f"{res['step'] / nv:.2f}",
                f"{res['step'] / res['products floor']:.2f}",
                f"{res['products floor'] / res['bandwidth floor']:.2f}",
                f"{res['bytes'] / res['step'] / 1e9:.1f}",
                f"{res['bytes'] / res['bandwidth floor'] / 1e9:.1f}",
            ]
        )
    print()
    print_table(headers, rows)
    print(
        "floor: the step's row reads (A and B of every π-layer, twice each) streamed by sum(); products: the "
        "step's matrix products alone (torch.mm); GB/s: bytes of row reads per second"
    )
    if any("naive max rel diff" in res for _, res in results):
        worst = max(res.get("naive max rel diff", 0.0) for _, res in results)
        print(f"naive reference vs library, outputs on the same rows: max relative difference {worst:.1e}")
    extra_keys = [k for k in results[0][1] if k.startswith("step,")]
    if extra_keys:
        print()
        print_table(
            ["M"] + [f"{k[6:]} / step" for k in extra_keys],
            [[M] + [f"{res[k] / res['step']:.2f}" for k in extra_keys] for M, res in results],
        )
    big = [res["step"] / res["bandwidth floor"] for M, res in results if M >= 40000]
    if big:
        print(
            f"\ntarget step ≤ 1.5 × bandwidth floor at M ≥ 40k: worst {max(big):.2f} → "
            f"{'met' if max(big) <= 1.5 else 'NOT met'}"
        )
    at20 = [res["step"] / res["naive"] for M, res in results if M == 20000 and "naive" in res]
    if at20:
        print(
            f"target step ≤ 0.4 × naive at M = 20k: {at20[0]:.2f} → {'met' if at20[0] <= 0.4 else 'NOT met'}"
        )
    print(machine_line())
    return results


if __name__ == "__main__":
    main()
