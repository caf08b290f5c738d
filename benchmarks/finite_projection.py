"""Gradient projection of a finite π-net in O(n·r) memory, against the dense n × n projector.

A finite π-net of width n projects the gradient ``G`` of each weight onto
``span(Ω)`` (docs/math.md §6). The library does it as ``Q (Qᵀ G)`` with an orthonormal
basis ``Q`` (n × r) of ``span(Ω)``, written into ``G`` in place: about
``4·n·r`` flops per column of ``G`` and an r × cols temporary. The dense way
forms ``P = Ω (ΩᵀΩ)⁻¹ Ωᵀ`` once (n × n) and applies ``P @ G``: ``2·n²`` flops per
column, plus the n × n matrix ``P`` and an n × cols result.

Measured in one process, in alternating turns, at n = 8192 and r = 400:

1. the projection alone, of one hidden-layer gradient (n × n): time and the
   growth of the peak resident memory while it runs;
2. a whole training step (forward, backward, projection, SGD) of a finite
   π-net FinPiMLPSample(InfMLP(3072, 10, r=400, L=2), n) at batch 8, once with
   InfSGD's projection and once with the gradients of the projected weights
   replaced by ``P @ G`` (InfSGD with ``project=False``).

    python -m benchmarks.finite_projection            # ≈ 2 min
    python -m benchmarks.finite_projection --quick    # projection alone, 2 repeats
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from inf.layers import set_gradient_projection
from inf.networks import FinPiMLPSample, InfMLP
from inf.optim import InfSGD
from inf.parameters import FinPiParameter, owner_of

from ._util import (
    PeakRSS,
    add_common_args,
    apply_threads,
    fmt_bytes,
    interleaved,
    machine_line,
    median,
    print_table,
)


def dense_projector(omega: torch.Tensor) -> torch.Tensor:
    """``P = Ω (ΩᵀΩ)⁻¹ Ωᵀ`` (n × n), in the dtype of ``omega``."""
    o = omega.double()
    return (o @ torch.linalg.solve(o.T @ o, o.T)).to(omega.dtype)


def measure_projection(n: int, r: int, repeats: int, seed: int):
    torch.manual_seed(seed)
    net = InfMLP(16, 4, r, L=1)
    fin = FinPiMLPSample(net, n, generator=torch.Generator().manual_seed(seed))
    layer = fin.hidden_layers[0]  # weight n × n
    P = dense_projector(layer.omega)
    G0 = torch.randn(n, n, generator=torch.Generator().manual_seed(seed + 1))
    G = G0.clone()

    def basis():
        G.copy_(G0)
        layer.project_(G)

    def dense():
        G.copy_(G0)
        G.copy_(P @ G)

    # agreement
    basis()
    a = G.clone()
    dense()
    rel = ((a - G).norm() / G.norm()).item()
    times = interleaved(
        {"Q(QᵀG), in place": basis, "P @ G (P precomputed)": dense}, repeats=repeats, warmup=1
    )
    mems = {}
    for name, fn in (("Q(QᵀG), in place", basis), ("P @ G (P precomputed)", dense)):
        with PeakRSS() as m:
            fn()
        mems[name] = m.peak
    with PeakRSS() as m:
        P2 = dense_projector(layer.omega)
    mems["forming P"] = m.peak
    del P2
    return times, mems, rel, n * n * G.element_size(), P.numel() * P.element_size()


def measure_step(n: int, r: int, batch: int, repeats: int, seed: int):
    torch.manual_seed(seed)
    infnet = InfMLP(3072, 10, r, L=2)
    fin = FinPiMLPSample(infnet, n, generator=torch.Generator().manual_seed(seed))
    projected = [p for p in fin.parameters() if isinstance(p, FinPiParameter)]
    projectors = {}
    for p in projected:
        layer = owner_of(p)
        if id(layer) not in projectors:
            projectors[id(layer)] = dense_projector(layer.omega)
    opt = InfSGD(fin.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(batch, 3072, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)

    def step_basis():  # the layers project in their gradient hook
        set_gradient_projection(fin, True)
        opt.zero_grad()
        F.cross_entropy(fin(x), y).backward()
        opt.step()

    def step_dense():
        set_gradient_projection(fin, False)
        opt.zero_grad()
        F.cross_entropy(fin(x), y).backward()
        with torch.no_grad():
            for p in projected:
                P = projectors[id(owner_of(p))]
                g2 = p.grad.reshape(p.grad.shape[0], -1)
                p.grad.copy_((P @ g2).reshape(p.grad.shape))
        opt.step()

    times = interleaved({"step, Q(QᵀG)": step_basis, "step, P @ G": step_dense}, repeats=repeats, warmup=1)
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--r", type=int, default=400)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 3)
    n, r = args.n, args.r
    print(f"finite π-net gradient projection, n = {n}, r = {r}, float32; median of {repeats}")
    print(machine_line())

    times, mems, rel, nn_bytes, P_bytes = measure_projection(n, r, repeats, args.seed)
    tb, td = median(times["Q(QᵀG), in place"]), median(times["P @ G (P precomputed)"])
    rows = [
        [
            "Q(QᵀG), in place",
            f"{tb:.3f}",
            fmt_bytes(mems["Q(QᵀG), in place"]),
            f"{4 * n * r * n / tb / 1e9:.0f}",
        ],
        [
            "P @ G (P precomputed)",
            f"{td:.3f}",
            fmt_bytes(mems["P @ G (P precomputed)"]),
            f"{2 * n**3 / td / 1e9:.0f}",
        ],
    ]
    print()
    print_table(["projection of one n × n gradient", "seconds", "peak RSS growth", "GFLOP/s"], rows)
    print(
        f"speed-up {td / tb:.1f}× (target ≥ 10×; the flop ratio n/(2r) is {n / (2 * r):.1f}); "
        f"relative difference of the results {rel:.1e}"
    )
    print(
        f"one n × n float32 matrix: {fmt_bytes(nn_bytes)}; Q(QᵀG) peak growth "
        f"{fmt_bytes(mems['Q(QᵀG), in place'])} ({mems['Q(QᵀG), in place'] / nn_bytes:.2f} of it; "
        f"the r × n temporary is {fmt_bytes(r * n * 4)}); the dense way also keeps P "
        f"({fmt_bytes(P_bytes)}) per layer, forming it grew the peak by {fmt_bytes(mems['forming P'])}"
    )

    if not args.quick:
        st = measure_step(n, r, args.batch, repeats, args.seed)
        sb, sd = median(st["step, Q(QᵀG)"]), median(st["step, P @ G"])
        print()
        print_table(
            [f"training step (batch {args.batch})", "seconds"],
            [["InfSGD, Q(QᵀG)", f"{sb:.3f}"], ["dense P @ G", f"{sd:.3f}"]],
        )
        print(f"step speed-up {sd / sb:.1f}×")
    print(machine_line())


if __name__ == "__main__":
    main()
