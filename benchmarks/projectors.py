"""The sparse JL projector (CountSketch) against TRAK's CPU ``BasicProjector``: speed and kernel error.

1. Speed, at P = 1M gradient coordinates and K = 4096 (``--P``, ``--K``), on a batch of
   ``--batch`` random gradients, in one process and in alternating turns: the time per
   example of ``SparseJLProjector.project`` (hashes cached after the first call; the first
   call, which draws them, is reported separately) and of ``trak.projectors.BasicProjector``
   with its defaults on the CPU (Gaussian entries, column blocks of 100 that it regenerates
   for every call — which is how ``TRAKer(device="cpu")`` runs it). ``--basic-blocks N``
   times only N of its ⌈K/100⌉ column blocks and scales the time up (the blocks cost the
   same); the output says when it did.

2. Accuracy, at equal K: the relative Frobenius error of the projected trace-NTK against the
   exact one, ``‖K̂ − K‖_F / ‖K‖_F``, for the sparse projection and a dense Gaussian one
   (TRAK's ``BasicProjector`` holding its whole matrix), both applied to the same exact
   per-example Jacobians of a small MLP on scikit-learn's digits, averaged over seeds.
   The ratio sparse / Gaussian is the number to compare with 1.5.

    python -m benchmarks.projectors                 # full sizes (BasicProjector: minutes per call)
    python -m benchmarks.projectors --quick         # 4 of BasicProjector's 41 blocks, 2 seeds
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from inf.analysis.projectors import SparseJLProjector

from ._util import add_common_args, apply_threads, interleaved, machine_line, median, print_table


def speed(P: int, K: int, batch: int, repeats: int, basic_blocks: int | None, seed: int) -> dict:
    from trak.projectors import BasicProjector

    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(batch, P, generator=g)
    sparse = SparseJLProjector(P, K, seed=seed)
    import time

    t0 = time.perf_counter()
    sparse.project(grads, model_id=0)
    first = time.perf_counter() - t0

    block = 100  # BasicProjector's default, the one TRAKer uses on the CPU
    n_blocks = math.ceil(K / block)
    timed_blocks = n_blocks if basic_blocks is None else max(1, min(n_blocks, basic_blocks))
    basic = BasicProjector(
        P, timed_blocks * block, seed, "normal", torch.device("cpu"), block_size=block, dtype=torch.float32
    )
    times = interleaved(
        {
            "sparse": lambda: sparse.project(grads, model_id=0),
            "basic": lambda: basic.project(grads, model_id=0),
        },
        repeats=repeats,
        warmup=0,
    )
    t_sparse = median(times["sparse"]) / batch
    t_basic = median(times["basic"]) * (n_blocks / timed_blocks) / batch
    return {
        "first_call_per_example": first / batch,
        "sparse": t_sparse,
        "basic": t_basic,
        "ratio": t_basic / t_sparse,
        "n_blocks": n_blocks,
        "timed_blocks": timed_blocks,
    }


def digits_jacobians(width: int, n: int, seed: int) -> torch.Tensor:
    """Exact per-example Jacobians (n·10 × P) of a trained-for-nothing MLP 64 → width → width → 10."""
    from sklearn.datasets import load_digits

    from inf.analysis import pntk_features

    X = torch.tensor(load_digits().data[:n], dtype=torch.float64) / 16.0
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, 10),
    ).double()
    J = pntk_features(net, X, None).array  # (n, 10, P), exact
    return torch.from_numpy(np.asarray(J)).reshape(-1, J.shape[2])


def trace_kernel(F: torch.Tensor, n: int) -> torch.Tensor:
    F = F.reshape(n, -1)
    return F @ F.T


def accuracy(Ks: list[int], seeds: int, width: int, n: int) -> list[list]:
    from trak.projectors import BasicProjector

    J = digits_jacobians(width, n, 0)
    P = J.shape[1]
    exact = trace_kernel(J, n)
    rows = []
    for K in Ks:
        err = {"sparse": [], "gaussian": []}
        for s in range(seeds):
            S = SparseJLProjector(P, K, seed=s, dtype=torch.float64).sketch(J)
            err["sparse"].append(float((trace_kernel(S, n) - exact).norm() / exact.norm()))
            G = BasicProjector(P, K, s, "normal", torch.device("cpu"), block_size=K, dtype=torch.float64)
            R = G.project(J, model_id=0) / math.sqrt(K)
            err["gaussian"].append(float((trace_kernel(R, n) - exact).norm() / exact.norm()))
        es, eg = float(np.mean(err["sparse"])), float(np.mean(err["gaussian"]))
        rows.append([K, f"{es:.4f}", f"{eg:.4f}", f"{es / eg:.2f}"])
    return rows, P


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.projectors", description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--P", type=int, default=1 << 20, help="gradient coordinates for the speed test")
    p.add_argument("--K", type=int, default=4096, help="projection dimension for the speed test")
    p.add_argument("--batch", type=int, default=16, help="gradients per projector call")
    p.add_argument(
        "--basic-blocks",
        dest="basic_blocks",
        type=int,
        default=None,
        help="time only this many of BasicProjector's column blocks and scale up",
    )
    p.add_argument("--seeds", type=int, default=None, help="projection seeds per K in the accuracy test")
    p.add_argument("--width", type=int, default=64, help="hidden width of the digits MLP")
    p.add_argument("--n", type=int, default=100, help="digits in the kernel")
    args = p.parse_args(argv)
    apply_threads(args.threads)
    if args.quick and args.basic_blocks is None:
        args.basic_blocks = 4
    repeats = args.repeats or (1 if args.quick else 2)
    seeds = args.seeds or (2 if args.quick else 4)
    print(machine_line())

    r = speed(args.P, args.K, args.batch, repeats, args.basic_blocks, args.seed)
    nb, tb = r["n_blocks"], r["timed_blocks"]
    note = "" if tb == nb else f" (BasicProjector: {tb} of its {nb} blocks timed, scaled by {nb}/{tb})"
    print_table(
        ["projector", "ms / example"],
        [
            ["SparseJLProjector (nnz=1)", f"{1e3 * r['sparse']:.2f}"],
            ["  its first call (draws the hashes)", f"{1e3 * r['first_call_per_example']:.2f}"],
            ["trak BasicProjector (CPU default)", f"{1e3 * r['basic']:.1f}"],
        ],
        title=f"Speed: P = {args.P}, K = {args.K}, batch {args.batch}, median of {repeats}{note}",
    )
    print(f"ratio BasicProjector / SparseJLProjector: {r['ratio']:.0f}x (target >= 50x)")
    print()
    rows, P = accuracy([256, 1024, 4096], seeds, args.width, args.n)
    print_table(
        ["K", "sparse error", "Gaussian error", "sparse / Gaussian"],
        rows,
        title=f"Relative Frobenius error of the projected trace-NTK, digits MLP 64-{args.width}-"
        f"{args.width}-10 (P = {P}), {args.n} examples, mean of {seeds} seeds",
    )
    print("target: sparse / Gaussian <= 1.5")
    return r, rows


if __name__ == "__main__":
    main()
