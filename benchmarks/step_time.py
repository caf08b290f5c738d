"""Training-step time of an infinite π-MLP against the matrix products it cannot avoid.

The network is InfMLP(d_in=3072, d_out=10, r=400, L=2): an input layer, two
hidden π-layers and the π output layer, each π-layer holding M rows (random
rows loaded through ``load_state_dict``, as if trained for M/8 steps). A step
is ``zero_grad``, forward, cross-entropy, backward and ``InfSGD.step`` (which
appends 8 rows per π-layer) at batch 8.

It is compared, in the same process and in alternating turns, with

* the mm floor: the products of the step as one ``torch.mm`` each on
  preallocated tensors: per π-layer ``ĝBᵀ``, ``(F·c)A``, ``δAᵀ``, ``(γ·F11)B``,
  and the input layer's ``x A₀`` and ``xᵀ δ₀``;
* the blocked floor: the same products issued block by block over the rows
  (``inf.functional.CPU_BLOCK_ROWS`` rows per block), the fastest way found to
  issue them with ``torch.mm`` on a CPU (see docs/performance.md);
* the read floor: one ``sum()`` over every ``A`` and ``B`` for forward and one
  for backward, i.e. the time to stream the rows from memory twice.

    python -m benchmarks.step_time                   # M = 5k, 20k, 40k, 100k (≈ 3 min)
    python -m benchmarks.step_time --quick           # M = 5k, 20k, 40k, fewer repeats
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

from ._util import (add_common_args, apply_threads, interleaved, load_random_rows, machine_line, median,
                    print_table)


@contextlib.contextmanager
def _settings(save=None, block=None):
    old = functional.SAVE_KERNELS, functional.CPU_BLOCK_ROWS
    try:
        if save is not None:
            functional.SAVE_KERNELS = save
        if block is not None:
            functional.CPU_BLOCK_ROWS = block
        yield
    finally:
        functional.SAVE_KERNELS, functional.CPU_BLOCK_ROWS = old


class Floors:
    """Preallocated tensors holding the products of one step."""

    def __init__(self, net: InfMLP, batch: int):
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(batch, net.d_in, generator=gen)
        self.A0 = net.layers[0].A.detach().clone()
        self.h0 = torch.empty(batch, net.r)
        self.gA0 = torch.empty_like(self.A0)
        self.layers = []
        for layer in net.layers[1:]:
            A, B = layer.A.detach().clone(), layer.B.detach().clone()
            M, r, r_out = B.shape[0], B.shape[1], A.shape[1]
            self.layers.append(dict(
                A=A, B=B, ghat=torch.randn(batch, r, generator=gen), delta=torch.randn(batch, r_out, generator=gen),
                F=torch.rand(batch, M, generator=gen), G=torch.rand(batch, M, generator=gen),
                Q=torch.empty(batch, M), Gam=torch.empty(batch, M), out=torch.empty(batch, r_out),
                v=torch.empty(batch, r)))

    def mm(self):
        torch.mm(self.x, self.A0, out=self.h0)
        for t in self.layers:
            torch.mm(t["ghat"], t["B"].T, out=t["Q"])
            torch.mm(t["F"], t["A"], out=t["out"])
            torch.mm(t["delta"], t["A"].T, out=t["Gam"])
            torch.mm(t["G"], t["B"], out=t["v"])
        torch.mm(self.x.T, self.h0, out=self.gA0)

    def blocked(self, block: int):
        torch.mm(self.x, self.A0, out=self.h0)
        for t in self.layers:
            A, B, M = t["A"], t["B"], t["B"].shape[0]
            t["out"].zero_()
            t["v"].zero_()
            for lo in range(0, M, block):
                hi = min(M, lo + block)
                q = t["ghat"] @ B[lo:hi].T
                t["out"].addmm_(t["F"][:, lo:hi], A[lo:hi])
                gam = t["delta"] @ A[lo:hi].T
                t["v"].addmm_(t["G"][:, lo:hi], B[lo:hi])
                del q, gam
        torch.mm(self.x.T, self.h0, out=self.gA0)

    def read(self):
        for _ in range(2):
            for t in self.layers:
                t["A"].sum()
                t["B"].sum()


def make_net(M: int, batch: int, seed: int, d_in=3072, d_out=10, r=400, L=2):
    torch.manual_seed(seed)
    net = InfMLP(d_in, d_out, r, L=L)
    load_random_rows(net, M, seed=seed)
    return net


def run_one(M: int, args) -> dict:
    net = make_net(M, args.batch, args.seed, r=args.r, L=args.L)
    opt = InfSGD(net.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.batch, 3072, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)

    def step():
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()

    floors = Floors(net, args.batch)
    block = functional.CPU_BLOCK_ROWS or 1024
    cands = {"step": step, "mm floor": floors.mm, "blocked floor": lambda: floors.blocked(block),
             "read floor": floors.read}
    if args.compare_save:
        def step_recompute():
            with _settings(save=False):
                step()
        cands["step, recompute F11/F02"] = step_recompute
    if args.block_sweep:
        for b in (256, 512, 2048, 4096, 0):
            def step_b(b=b):
                with _settings(block=b):
                    step()
            cands[f"step, CPU block {b or 'none'}"] = step_b
    # the first step copies the loaded rows into capacity buffers (one reallocation): warm-up
    times = interleaved(cands, repeats=args.repeats, warmup=2)
    res = {k: median(v) for k, v in times.items()}
    res["rows"] = net.rows_per_layer()[0]
    return res


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--M", type=int, nargs="*", default=None, help="row counts (default 5k 20k 40k 100k)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--r", type=int, default=400)
    parser.add_argument("--L", type=int, default=2)
    parser.add_argument("--compare-save", action="store_true",
                        help="also time steps that recompute F11/F02 in backward")
    parser.add_argument("--block-sweep", action="store_true", help="also time other CPU block sizes")
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    Ms = args.M or ([5000, 20000, 40000] if args.quick else [5000, 20000, 40000, 100000])
    args.repeats = args.repeats or (5 if args.quick else 9)
    print(f"step time of InfMLP(3072, 10, r={args.r}, L={args.L}), batch {args.batch}, float32; "
          f"median of {args.repeats} interleaved repeats")
    print(machine_line())
    results = []
    for M in Ms:
        res = run_one(M, args)
        results.append((M, res))
        extra = {k: v for k, v in res.items() if k.startswith("step,")}
        print(f"  M={M}: step {res['step'] * 1e3:.1f} ms, mm floor {res['mm floor'] * 1e3:.1f} ms, "
              f"step/floor {res['step'] / res['mm floor']:.2f}"
              + "".join(f"; {k[6:]} {v / res['step']:.2f}× step" for k, v in extra.items()), flush=True)
    headers = ["M", "step ms", "mm floor ms", "blocked floor ms", "read floor ms", "step/mm floor",
               "step/blocked floor", "step/read floor"]
    rows = []
    for M, res in results:
        rows.append([M, f"{res['step'] * 1e3:.1f}", f"{res['mm floor'] * 1e3:.1f}",
                     f"{res['blocked floor'] * 1e3:.1f}", f"{res['read floor'] * 1e3:.1f}",
                     f"{res['step'] / res['mm floor']:.2f}", f"{res['step'] / res['blocked floor']:.2f}",
                     f"{res['step'] / res['read floor']:.2f}"])
    print()
    print_table(headers, rows)
    extra_keys = [k for k in results[0][1] if k.startswith("step,")]
    if extra_keys:
        print()
        print_table(["M"] + [f"{k[6:]} / step" for k in extra_keys],
                    [[M] + [f"{res[k] / res['step']:.2f}" for k in extra_keys] for M, res in results])
    big = [(M, res['step'] / res['mm floor']) for M, res in results if M >= 20000]
    if big:
        worst = max(r for _, r in big)
        print(f"\ntarget step ≤ 1.3 × mm floor at M ≥ 20k: worst {worst:.2f} → "
              f"{'met' if worst <= 1.3 else 'NOT met'}")
    print(machine_line())
    return results


if __name__ == "__main__":
    main()
