"""Step time of a plain input layer vs the same layer wrapped in TrAct.

A step is one forward and one backward (with a fixed output gradient) of the
layer alone, on CIFAR-like shapes:

* Conv2d 3→64, 3×3, padding 1, batch 128 of 32×32 images (b = 128·1024 patch
  rows ≫ d = 27: direct branch);
* Linear 3072→512 at batch 128 (b < d: Woodbury branch) and at batch 4096
  (b > d: direct branch).

Plain and TrAct steps alternate inside one process after a few warm-up steps;
the table reports medians and the ratio TrAct / plain.

    python -m benchmarks.tract_overhead            # ≈ 30 s on 2 CPU cores
    python -m benchmarks.tract_overhead --quick    # fewer repeats
    python -m benchmarks.tract_overhead --threads 1   # steadier on a loaded machine
    python -m benchmarks.tract_overhead --device cuda
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
from torch import nn

from benchmarks._util import interleaved, median
from inf.tract import TrAct


def _cases():
    return [
        ("Conv2d 3→64 3×3, batch 128, 32×32", lambda: nn.Conv2d(3, 64, 3, padding=1), (128, 3, 32, 32)),
        ("Linear 3072→512, batch 128", lambda: nn.Linear(3072, 512), (128, 3072)),
        ("Linear 3072→512, batch 4096", lambda: nn.Linear(3072, 512), (4096, 3072)),
    ]


def _branch(layer: nn.Module, shape) -> tuple[str, int, int]:
    if isinstance(layer, nn.Conv2d):
        n, _, h, w = shape
        k = layer.kernel_size
        b = n * h * w  # stride 1, "same"-sized output
        d = layer.in_channels * k[0] * k[1]
    else:
        b, d = shape
    return ("Woodbury" if b < d else "direct"), b, d


def _step(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor):
    """One forward + backward of ``layer``, as a callable for :func:`benchmarks._util.interleaved`."""

    def step():
        layer.zero_grad(set_to_none=True)
        layer(x).backward(grad_out)

    return step


def run(warmup: int, repeats: int, seed: int = 0, device: str = "cpu"):
    torch.manual_seed(seed)
    device = torch.device(device)
    rows = []
    for name, make, shape in _cases():
        plain = make().to(device)
        wrapped = TrAct(copy.deepcopy(plain), lambda_=0.1)
        x = torch.randn(*shape, device=device)
        with torch.no_grad():
            grad_out = torch.randn_like(plain(x))
        # alternating calls, so drifts in machine load hit both alike
        times = interleaved(
            {"plain": _step(plain, x, grad_out), "tract": _step(wrapped, x, grad_out)},
            repeats,
            warmup,
            device,
        )
        branch, b, d = _branch(plain, shape)
        mp, mt = median(times["plain"]), median(times["tract"])
        rows.append((name, branch, b, d, mp, mt, mt / mp))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 warm-up step and 3 timed steps per layer")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: torch's choice); on a loaded shared "
        "machine 1 thread gives steadier numbers",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 7)

    print(
        f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, float32, "
        f"{warmup} warm-up + {repeats} timed steps per layer (median), λ = 0.1"
    )
    rows = run(warmup, repeats, device=args.device)
    header = f"{'layer':<36} {'branch':<9} {'b':>7} {'d':>5} {'plain ms':>9} {'TrAct ms':>9} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for name, branch, b, d, mp, mt, ratio in rows:
        print(f"{name:<36} {branch:<9} {b:>7} {d:>5} {mp * 1e3:>9.1f} {mt * 1e3:>9.1f} {ratio:>6.2f}")
    if hasattr(os, "getloadavg"):
        print(
            f"load average after the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
            "(a load above the CPU count means shared cores and noisier timings)"
        )
    return rows


if __name__ == "__main__":
    main()
