"""Training steps per second on a GPU at M = 1M rows per π-layer with float16 row storage.

InfMLP(3072, 10, r=400, L=2) on the GPU, every π-layer holding M random rows
(generated on the device) stored in float16 with float32 coefficients; a
step is zero_grad, forward, cross-entropy, backward and InfSGD.step at batch 8.
The floor, measured in the same process in alternating turns, is the step's
products on preallocated float16 tensors (per π-layer ``ĝBᵀ``, ``(F·c)A``,
``δAᵀ``, ``(γ·F11)B``, plus the input layer's products). The layer computes
in float32 and converts each block of float16 rows to float32 first
(``inf.functional.CONVERT_BLOCK_ROWS`` rows at a time), so the ratio shows
what that conversion costs on top of reading the rows.

Without a GPU it prints "no GPU" and exits with status 0.

    python -m benchmarks.gpu_steps                 # M = 1M rows, float16
    python -m benchmarks.gpu_steps --M 200000 --dtype bfloat16
    python -m benchmarks.gpu_steps --device cpu --M 20000 --steps 3   # the same code on the CPU
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from inf.networks import InfMLP
from inf.optim import InfSGD

from ._util import interleaved, machine_line, median, print_table

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@torch.no_grad()
def fill_rows_on_device(net: InfMLP, M: int, dtype, seed: int):
    """Give every π-layer ``M`` random rows made on its device, stored in ``dtype``."""
    gen = torch.Generator(device=net.layers[0].A.device).manual_seed(seed)
    for layer in net.layers[1:]:
        store = layer.rows
        store.resize_(M)
        store.to(dtype)  # A and B in dtype; coefficients stay float32
        dev = store.A.device
        for name, width, scale in (("A", layer.r_out, layer.r_out ** -0.5), ("B", layer.r, 1.0)):
            p = store._parameters[name]
            for lo in range(0, M, 65536):  # float32 scratch of one slab at a time
                slab = torch.randn(min(65536, M - lo), width, generator=gen, device=dev)
                if name == "B":
                    slab = F.normalize(slab, dim=1)
                p.data[lo:lo + slab.shape[0]] = (slab * scale).to(dtype)
        store.Amult.data.normal_(0.0, 1e-2, generator=gen)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--M", type=int, default=1_000_000)
    parser.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="timed repetitions")
    parser.add_argument("--quick", action="store_true", help="5 timed repetitions")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no GPU: torch.cuda.is_available() is False; nothing to measure")
        return 0
    dtype = DTYPES[args.dtype]
    repeats = 5 if args.quick else args.steps
    torch.manual_seed(args.seed)
    net = InfMLP(3072, 10, 400, L=2, device=device)
    fill_rows_on_device(net, args.M, dtype, args.seed)
    opt = InfSGD(net.parameters(), lr=0.01)
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    x = torch.randn(args.batch, 3072, device=device, generator=gen)
    y = torch.randint(0, 10, (args.batch,), device=device, generator=gen)

    def step():
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()

    # the floor: the same products on preallocated tensors in the storage dtype
    mm_dtype = dtype if device.type == "cuda" else torch.float32
    prods = []
    for layer in net.layers[1:]:
        A, B = layer.A.detach().to(mm_dtype), layer.B.detach().to(mm_dtype)
        b, M = args.batch, A.shape[0]
        prods.append((A, B, torch.randn(b, layer.r, device=device, dtype=mm_dtype),
                      torch.randn(b, layer.r_out, device=device, dtype=mm_dtype),
                      torch.rand(b, M, device=device, dtype=mm_dtype)))
    A0 = net.layers[0].A.detach()

    def floor():
        h0 = x @ A0
        for A, B, gh, d, Fm in prods:
            gh @ B.T
            Fm @ A
            d @ A.T
            Fm @ B
        x.T @ h0

    print(f"{args.batch}-example steps of InfMLP(3072, 10, r=400, L=2) with {args.M:,} rows per π-layer, "
          f"{args.dtype} rows, on {device}")
    print(machine_line(str(device)))
    t0 = time.perf_counter()
    times = interleaved({"step": step, "floor": floor}, repeats=repeats, warmup=2, device=device)
    ts, tf = median(times["step"]), median(times["floor"])
    mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    print_table(["", "ms", "per second"], [["training step", f"{ts * 1e3:.1f}", f"{1 / ts:.2f}"],
                                          ["floor (products only)", f"{tf * 1e3:.1f}", f"{1 / tf:.2f}"]])
    print(f"step / floor: {ts / tf:.2f}; {repeats} interleaved repeats in {time.perf_counter() - t0:.0f} s"
          + ("" if mem is None else f"; peak GPU memory {mem / 2 ** 30:.2f} GiB"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
