"""GPU check: CUDA correctness of the π-limit library, then the speed of the CIFAR-10 infinite net.

One prepared script for one GPU (at most about 8 minutes on a current data-centre GPU)::

    python -m benchmarks.gpu_check                      # all checks and measurements on cuda:0
    python -m benchmarks.gpu_check --out my.json        # where the JSON goes (default gpu_check.json)
    python -m benchmarks.gpu_check --skip-speed         # correctness only
    python -m benchmarks.gpu_check --device cpu --small # the same code on the CPU, small sizes

Without CUDA (and ``--device cuda``) it prints one line and exits with status 0. On the
CPU the layers run with ``BlockPolicy(low_precision_products=True)``: the arithmetic of
the GPU path (half-precision rows multiplied as stored, float32 accumulation), with the
cuBLAS product emulated on float32 copies.

Part 1, correctness (each against a float64 CPU run of the same network and batches):

* row storage in float16, bfloat16 and float32 on the device: outputs and the
  input layer's gradient of the second step (the readout starts at zero, so the
  first is trivial), the rows (A, B, coefficients) and
  held-out outputs after 20 SGD steps with momentum, weight decay and per-layer
  clipping; tolerances in ``TOL`` (float32: rounding of float32 arithmetic;
  float16/bfloat16: the stated storage bounds of docs/performance.md, which the
  rows' rounding and the low-precision products set);
* TrAct on the input layer (3 steps);
* a finite π-net sampled from the infinite one (3 InfSGD steps; the update of a
  projected weight must lie in span(Ω));
* the MAML inner step on the readout (``experiments/meta/maml.py``), both
  implementations;
* row compression (``inf/compress.py``): its stated error bound on the device;
* a net whose rows are sharded (``inf/distributed.py``) over two processes on the
  same device (gloo), against one process (``--skip-sharded`` leaves it out).

Part 2, speed of InfMLP(3072, 10, r=400, L=2) at batch 8 with float16 rows and
M = 0.25M, 1M and 4M rows per π-layer: training steps per second, the bytes of
row reads per step (A and B of every π-layer, twice each) per second against the
device's memory bandwidth measured in the same run (a large copy), the step
against its products alone in float16, the evaluation throughput of one hidden
π-layer against torch.mm on the same products, and the peak memory. From the
step times a line ``t(M) = t0 + c·M`` is fitted and the paper's CIFAR-10 run
(50 epochs of 50 000 images at batch 8: 312 500 steps, 2.5M rows per layer at
the end) is extrapolated.

Exit status 1 if a correctness check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

from inf.functional import block_policy, current_block_policy
from inf.networks import FinPiMLPSample, InfMLP
from inf.optim import InfSGD
from inf.utils import clip_grad_norm_

from ._naive import pi_layers, pi_rows
from ._util import interleaved, machine_line, median, print_table

#: relative tolerances (max |Δ| / max |reference| for outputs and gradients,
#: ‖Δ‖ / ‖reference‖ for rows) per storage dtype
TOL = {
    "float32": dict(out=1e-4, grad=1e-4, rows=1e-3, out_after=1e-3),
    "float16": dict(out=2e-3, grad=5e-3, rows=1e-2, out_after=1e-2),
    "bfloat16": dict(out=1.5e-2, grad=4e-2, rows=6e-2, out_after=6e-2),
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
PAPER_STEPS = 50 * 50_000 // 8  # CIFAR-10, 50 epochs, batch 8


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b| (b is the reference), computed in float64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def rel_fro(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def to_device(net, device, storage=torch.float32):
    """A float32 copy of ``net`` on ``device`` whose rows are stored in ``storage``."""
    dev = copy.deepcopy(net).to(device=device, dtype=torch.float32)
    if storage != torch.float32:
        for layer in pi_layers(dev):
            layer.rows.to(storage)
    return dev


class Report:
    def __init__(self):
        self.checks = []

    def add(self, name: str, values: dict, limits: dict):
        """Record a check: every ``values[k]`` must be ≤ ``limits[k]``."""
        ok = all(values[k] <= limits[k] for k in limits if values.get(k) is not None)
        ok = ok and all(math.isfinite(v) for v in values.values() if isinstance(v, float))
        self.checks.append(dict(name=name, passed=bool(ok), values=values, limits=limits))
        worst = ", ".join(
            f"{k} {v:.1e} (≤ {limits[k]:.0e})" if k in limits else f"{k} {v}" for k, v in values.items()
        )
        print(f"  [{'ok' if ok else 'FAIL'}] {name}: {worst}", flush=True)

    def error(self, name: str, exc: BaseException):
        self.checks.append(dict(name=name, passed=False, error=f"{type(exc).__name__}: {exc}"))
        print(f"  [FAIL] {name}: {type(exc).__name__}: {exc}", flush=True)
        traceback.print_exc(limit=3)

    def skip(self, name: str, why: str):
        self.checks.append(dict(name=name, passed=None, skipped=why))
        print(f"  [skip] {name}: {why}", flush=True)

    @property
    def failed(self) -> list[str]:
        return [c["name"] for c in self.checks if c["passed"] is False]


# ---------------------------------------------------------------------------------------- part 1
def _net_cfg(small: bool) -> dict:
    return dict(d_in=48 if small else 256, d_out=10, r=32 if small else 64, L=2)


def _data(cfg, steps: int, batch: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, batch, cfg["d_in"], generator=gen, dtype=torch.float64)
    y = torch.randint(0, cfg["d_out"], (steps, batch), generator=gen)
    x_test = torch.randn(64, cfg["d_in"], generator=gen, dtype=torch.float64)
    return x, y, x_test


def _train(net, xs, ys, device, dtype, steps, lr=0.1, momentum=0.9, wd=1e-4, clip=1.0, first=None):
    opt = InfSGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
    for t in range(steps):
        opt.zero_grad()
        out = net(xs[t].to(device=device, dtype=dtype))
        F.cross_entropy(out.float() if dtype != torch.float64 else out, ys[t].to(device)).backward()
        if t == 1 and first is not None:  # step 0 is trivial: the readout starts at zero
            first["out"] = out.detach()
            first["grad"] = net.input_layer.A.grad.detach().clone()
        if clip:
            clip_grad_norm_(net.parameters(), clip, per_param=True)
        opt.step()
    return opt


def check_storage(rep: Report, device, storage: str, small: bool, steps: int = 20, seed: int = 0):
    cfg = _net_cfg(small)
    torch.manual_seed(seed)
    ref = InfMLP(
        cfg["d_in"],
        cfg["d_out"],
        cfg["r"],
        L=cfg["L"],
        bias_alpha=0.5,
        last_layer_alpha=0.5,
        dtype=torch.float64,
    )
    dev = to_device(ref, device, DTYPES[storage])
    xs, ys, x_test = _data(cfg, steps, 8, seed)
    f_ref, f_dev = {}, {}
    _train(ref, xs, ys, "cpu", torch.float64, steps, first=f_ref)
    _train(dev, xs, ys, device, torch.float32, steps, first=f_dev)
    with torch.no_grad():
        o_ref = ref(x_test)
        o_dev = dev(x_test.to(device=device, dtype=torch.float32))
    rows = 0.0
    for lr_, ld in zip(pi_layers(ref), pi_layers(dev)):
        for a, b in zip(pi_rows(ld), pi_rows(lr_)):
            if a.shape != b.shape:
                raise AssertionError(f"row counts differ: {tuple(a.shape)} vs {tuple(b.shape)}")
            rows = max(rows, rel_fro(a, b))
    values = dict(
        out=rel(f_dev["out"], f_ref["out"]),
        grad=rel(f_dev["grad"], f_ref["grad"]),
        rows=rows,
        out_after=rel(o_dev, o_ref),
    )
    rep.add(
        f"{storage} rows on {device}: step 2 and after {steps} steps vs float64 CPU", values, TOL[storage]
    )


def check_tract(rep: Report, device, small: bool, seed: int = 1):
    cfg = _net_cfg(small)
    torch.manual_seed(seed)
    ref = InfMLP(cfg["d_in"], cfg["d_out"], cfg["r"], L=1, tract_lambda=0.1, dtype=torch.float64)
    dev = to_device(ref, device)
    xs, ys, x_test = _data(cfg, 3, 8, seed)
    _train(ref, xs, ys, "cpu", torch.float64, 3, momentum=0.0, wd=0.0, clip=0.0)
    _train(dev, xs, ys, device, torch.float32, 3, momentum=0.0, wd=0.0, clip=0.0)
    with torch.no_grad():
        values = dict(
            out_after=rel(dev(x_test.to(device, torch.float32)), ref(x_test)),
            input_weight=rel(
                dev.input_layer.A if hasattr(dev.input_layer, "A") else next(dev.input_layer.parameters()),
                ref.input_layer.A if hasattr(ref.input_layer, "A") else next(ref.input_layer.parameters()),
            ),
        )
    rep.add(
        f"TrAct input layer on {device}, 3 steps vs float64 CPU",
        values,
        dict(out_after=1e-4, input_weight=1e-4),
    )


def check_finite(rep: Report, device, small: bool, seed: int = 2):
    from inf.layers import orthonormal_basis

    cfg = _net_cfg(small)
    torch.manual_seed(seed)
    inf_net = InfMLP(cfg["d_in"], cfg["d_out"], cfg["r"], L=cfg["L"], dtype=torch.float64)
    ref = FinPiMLPSample(inf_net, n=128 if small else 512, generator=torch.Generator().manual_seed(seed))
    dev = copy.deepcopy(ref).to(device=device, dtype=torch.float32)
    layer = ref.hidden_layers[0]
    w0 = layer.weight.detach().clone()
    xs, ys, x_test = _data(cfg, 3, 8, seed)
    _train(ref, xs, ys, "cpu", torch.float64, 3, momentum=0.0, wd=0.0, clip=0.0)
    _train(dev, xs, ys, device, torch.float32, 3, momentum=0.0, wd=0.0, clip=0.0)
    # float32 weights round at ~6e-8 |W|, which is ~1e-5 of this |ΔW|: hence the 1e-3 limit
    dW = dev.hidden_layers[0].weight.detach().double().cpu() - w0
    Q = orthonormal_basis(layer.omega.double())
    outside = float((dW - Q @ (Q.T @ dW)).norm() / dW.norm().clamp_min(1e-300))
    with torch.no_grad():
        values = dict(
            out_after=rel(dev(x_test.to(device, torch.float32)), ref(x_test)), update_outside_span=outside
        )
    rep.add(
        f"finite π-net (projected SGD) on {device}, 3 steps vs float64 CPU",
        values,
        dict(out_after=1e-4, update_outside_span=1e-3),
    )


def check_maml(rep: Report, device, small: bool, seed: int = 3):
    from experiments.meta.maml import body_features, inf_readout_adapt, inf_readout_rows_adapted

    cfg = _net_cfg(small)
    torch.manual_seed(seed)
    ref = InfMLP(cfg["d_in"], 5, cfg["r"], L=1, dtype=torch.float64)
    dev = to_device(ref, device)
    gen = torch.Generator().manual_seed(seed)
    xs, xq = (
        torch.randn(5, cfg["d_in"], generator=gen, dtype=torch.float64),
        torch.randn(15, cfg["d_in"], generator=gen, dtype=torch.float64),
    )
    ys = torch.arange(5)
    outs = {}
    for name, net, dt, dv in (("ref", ref, torch.float64, "cpu"), ("dev", dev, torch.float32, device)):
        with torch.no_grad():
            hs, hq = body_features(net, xs.to(dv, dt)), body_features(net, xq.to(dv, dt))
        outs[name], _, _ = inf_readout_adapt(
            net, hs, ys.to(dv), hq, step_size=0.5, num_steps=2, first_order=True
        )
        with inf_readout_rows_adapted(net, hs, ys.to(dv), step_size=0.5, num_steps=2) as adapted:
            outs[name + " rows"] = adapted.logits(hq).detach()
    values = dict(
        adapt=rel(outs["dev"], outs["ref"]),
        rows_adapted=rel(outs["dev rows"], outs["ref"]),
        rows_vs_adapt=rel(outs["dev rows"], outs["dev"]),
    )
    rep.add(
        f"MAML inner step (readout, 2 steps) on {device} vs float64 CPU",
        values,
        dict(adapt=1e-4, rows_adapted=1e-4, rows_vs_adapt=1e-4),
    )


def check_compress(rep: Report, device, small: bool, seed: int = 4):
    """Compression's stated bound ``|Δ layer(g)| ≤ |g|·ε/√2`` holds on the device, and its
    relative error ε matches the float64 CPU run's (pivots may differ between precisions, so
    the compressed rows themselves are not compared)."""
    try:
        from inf.compress import compress_layer
    except ImportError as exc:
        rep.skip("row compression", f"inf.compress not available ({exc})")
        return
    cfg = _net_cfg(small)
    torch.manual_seed(seed)
    ref = InfMLP(cfg["d_in"], cfg["d_out"], cfg["r"], L=1, dtype=torch.float64)
    xs, ys, x_test = _data(cfg, 12, 8, seed)
    _train(ref, xs, ys, "cpu", torch.float64, 12, momentum=0.0, wd=0.0, clip=1.0)
    dev = to_device(ref, device)
    keep = 40
    layer = dev.hidden_layers[0]
    with torch.no_grad():
        g = dev.first_layer_alpha * dev.input_layer(x_test.to(device, torch.float32))
        before = layer(g)
    r_ref = compress_layer(ref.hidden_layers[0], rows=keep, method="greedy")
    r_dev = compress_layer(layer, rows=keep, method="greedy")
    with torch.no_grad():
        after = layer(g)
    bound = g.norm(dim=1).double().cpu() * r_dev.eps / math.sqrt(2.0)
    moved = (after - before).double().cpu().norm(dim=1)
    values = dict(
        bound_used=float((moved / bound.clamp_min(1e-300)).max()),
        rel_eps_device=r_dev.rel_eps,
        rel_eps_cpu64=r_ref.rel_eps,
    )
    rep.add(
        f"row compression to {keep} rows (greedy) on {device}: stated bound, error vs float64 CPU",
        values,
        dict(bound_used=1.01, rel_eps_device=2 * r_ref.rel_eps + 1e-3),
    )


def _sharded_worker(
    rank: int, world: int, init_file: str, device: str, small: bool, seed: int, out_path: str
):
    """One of ``world`` processes training the check's net with rows sharded by ``inf.distributed``
    (gloo: its all-reduce takes CUDA tensors, and the processes may share one GPU)."""
    import torch.distributed as dist

    from inf.distributed import shard_

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        net, xs, ys, x_test = _sharded_case(small, seed)
        net = shard_(to_device(net, device))
        _train(net, xs, ys, device, torch.float32, 3, momentum=0.9, wd=1e-4, clip=1.0)
        with torch.no_grad():
            out = net(x_test.to(device, torch.float32)).cpu()
        if rank == 0:
            torch.save({"out": out, "rows": torch.tensor(net.rows_per_layer())}, out_path)
    finally:
        dist.destroy_process_group()


def _sharded_case(small: bool, seed: int):
    cfg = _net_cfg(small)
    torch.manual_seed(seed)
    net = InfMLP(cfg["d_in"], cfg["d_out"], cfg["r"], L=cfg["L"], dtype=torch.float64)
    xs, ys, x_test = _data(cfg, 3, 8, seed)
    return net, xs, ys, x_test


def check_distributed(rep: Report, device, small: bool, seed: int = 5, world: int = 2):
    """Two processes (on the same device) train the net with rows sharded by
    ``inf.distributed.shard_``; their outputs must equal one process's, and each must hold
    about half of the rows."""
    import tempfile

    try:
        import torch.distributed as dist
        import torch.multiprocessing as mp

        import inf.distributed  # noqa: F401
    except ImportError as exc:
        rep.skip("sharded net", f"inf.distributed not available ({exc})")
        return
    if not dist.is_available() or not dist.is_gloo_available():
        rep.skip("sharded net", "torch.distributed with gloo is not available in this build")
        return
    net, xs, ys, x_test = _sharded_case(small, seed)
    plain = to_device(net, device)
    _train(plain, xs, ys, device, torch.float32, 3, momentum=0.9, wd=1e-4, clip=1.0)
    with torch.no_grad():
        ref = plain(x_test.to(device, torch.float32)).cpu()
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "out.pt")
        mp.spawn(
            _sharded_worker,
            args=(world, os.path.join(tmp, "init"), str(device), small, seed, out_path),
            nprocs=world,
            join=True,
        )
        res = torch.load(out_path, weights_only=True)
    share = float(res["rows"].sum()) / sum(plain.rows_per_layer())
    values = dict(out_after=rel(res["out"], ref), rows_share_of_rank0=share)
    rep.add(
        f"sharded net ({world} processes, gloo) on {device}, 3 steps vs one process",
        values,
        dict(out_after=1e-5, rows_share_of_rank0=1.0 / world + 0.05),
    )


# ---------------------------------------------------------------------------------------- part 2
def device_bandwidth(device, gib: float) -> dict:
    """GB/s of a large copy (bytes read + written) and of a large sum (bytes read)."""
    n = int(gib * 2**30 / 4)
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    times = interleaved(
        {"copy": lambda: dst.copy_(src), "sum": lambda: src.sum()}, repeats=7, warmup=2, device=device
    )
    out = dict(
        copy_GBps=2 * n * 4 / median(times["copy"]) / 1e9,
        read_GBps=n * 4 / median(times["sum"]) / 1e9,
        bytes=n * 4,
    )
    return out


@torch.no_grad()
def fill_rows(net, M: int, storage, seed: int, slab: int = 1 << 16):
    """Give every π-layer ``M`` random rows made on its device in ``storage`` (float32 coefficients)."""
    for layer in pi_layers(net):
        store = layer.rows
        store.resize_(M)
        A, c, B = pi_rows(layer)
        dev = A.device
        gen = torch.Generator(device=dev).manual_seed(seed)
        for lo in range(0, M, slab):
            hi = min(M, lo + slab)
            A[lo:hi] = (torch.randn(hi - lo, A.shape[1], generator=gen, device=dev) * A.shape[1] ** -0.5).to(
                storage
            )
            B[lo:hi] = F.normalize(torch.randn(hi - lo, B.shape[1], generator=gen, device=dev), dim=1).to(
                storage
            )
        c.normal_(0.0, 1e-2, generator=gen)


def row_read_bytes(net) -> int:
    total = 0
    for layer in pi_layers(net):
        A, _, B = pi_rows(layer)
        total += 2 * (A.numel() * A.element_size() + B.numel() * B.element_size())
    return total


def measure_size(M: int, args, device, storage) -> dict:
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    # a 1 GiB budget for the batch × rows intermediates: at batch 8 F11/F02 are then kept for
    # backward up to 8M rows (with the default 256 MiB, beyond 2M rows backward recomputes them,
    # one more read of B)
    net = InfMLP(3072, 10, 400, L=2, device=device, chunk_bytes=2**30)
    for layer in pi_layers(net):
        layer.rows.to(storage)
    fill_rows(net, M, storage, args.seed)
    opt = InfSGD(net.parameters(), lr=0.01)
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    x = torch.randn(8, 3072, device=device, generator=gen)
    y = torch.randint(0, 10, (8,), device=device, generator=gen)

    def step():
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()

    step()  # first step: the rows move into capacity buffers (the products below then share them)
    # the step's products alone, in the storage dtype, on preallocated operands
    mm_dt = storage if device.type == "cuda" else torch.float32
    prods = []
    for layer in pi_layers(net):
        A, _, B = pi_rows(layer)
        A, B = A.detach(), B.detach()
        if mm_dt != A.dtype:
            A, B = A.to(mm_dt), B.to(mm_dt)
        prods.append(
            (
                A,
                B,
                torch.randn(8, B.shape[1], device=device, dtype=mm_dt),
                torch.randn(8, A.shape[1], device=device, dtype=mm_dt),
                torch.rand(8, A.shape[0], device=device, dtype=mm_dt),
            )
        )
    A0 = net.input_layer.A.detach()

    def products():
        h0 = x @ A0
        for A, B, gh, d, Fm in prods:
            gh @ B.T
            Fm @ A
            d @ A.T
            Fm @ B
        x.T @ h0

    realloc_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = interleaved({"step": step, "products": products}, repeats=args.repeats, warmup=1, device=device)
    ts, tp = median(times["step"]), median(times["products"])
    res = dict(
        M=M,
        rows=net.rows_per_layer()[0],
        step_s=ts,
        steps_per_s=1 / ts,
        products_s=tp,
        read_bytes=row_read_bytes(net),
    )
    res["row_read_GBps"] = res["read_bytes"] / ts / 1e9
    if device.type == "cuda":  # peak of the timed steps, and of the first step's reallocation
        res["peak_memory_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        res["realloc_peak_memory_GiB"] = realloc_peak / 2**30
    res["eval"] = eval_throughput(net, args, device) if M == args.eval_M else None
    return res


@torch.no_grad()
def eval_throughput(net, args, device) -> dict:
    """One hidden π-layer evaluating ``eval_batch`` inputs vs torch.mm on the same products."""
    layer = net.hidden_layers[0]
    A, _, B = pi_rows(layer)
    M, r, r_out = A.shape[0], B.shape[1], A.shape[1]
    b = args.eval_batch
    g = torch.randn(b, r, device=device)
    flops = 2.0 * b * M * (r + r_out)
    chunk = max(1, layer.chunk_bytes // (b * 4 * 4)) if getattr(layer, "chunk_bytes", None) else M
    mm_dt = A.dtype if device.type == "cuda" else torch.float32
    g_mm = g.to(mm_dt)

    def mm():
        for lo in range(0, M, chunk):
            hi = min(M, lo + chunk)
            Bc, Ac = B[lo:hi], A[lo:hi]
            if Bc.dtype != mm_dt:
                Bc, Ac = Bc.to(mm_dt), Ac.to(mm_dt)
            q = g_mm @ Bc.T
            q @ Ac

    times = interleaved(
        {"layer": lambda: layer(g), "mm": mm}, repeats=max(3, args.repeats // 2), warmup=1, device=device
    )
    tl, tm = median(times["layer"]), median(times["mm"])
    # with low-precision products the layer multiplies two half-precision parts of its inputs
    # (split_mm), i.e. twice the flops of the plain products timed here
    return dict(
        M=M,
        batch=b,
        layer_GFLOPs=flops / tl / 1e9,
        mm_GFLOPs=flops / tm / 1e9,
        ratio=tm / tl,
        policy=str(current_block_policy()),
    )


def extrapolate(sizes: list[dict]) -> dict | None:
    """Least-squares ``t(M) = t0 + c·M`` and the paper's CIFAR-10 run (rows grow 8 per step)."""
    pts = [(s["rows"], s["step_s"]) for s in sizes if "step_s" in s]
    if len(pts) < 2:
        return None
    n = len(pts)
    mx, my = sum(p[0] for p in pts) / n, sum(p[1] for p in pts) / n
    c = sum((p[0] - mx) * (p[1] - my) for p in pts) / max(1e-30, sum((p[0] - mx) ** 2 for p in pts))
    t0 = my - c * mx
    S = PAPER_STEPS
    total = S * t0 + c * 8 * S * (S - 1) / 2  # Σ_k t0 + c·8k
    return dict(
        t0_s=t0,
        c_s_per_row=c,
        paper_steps=S,
        paper_rows_end=8 * S,
        paper_run_s=total,
        paper_run_h=total / 3600,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="small sizes (a CPU test of the code path)")
    parser.add_argument(
        "--sizes",
        type=float,
        nargs="*",
        default=None,
        help="rows per π-layer, in millions (default 0.25 1 4; --small: 0.002 0.008)",
    )
    parser.add_argument("--storage", default="float16", choices=sorted(DTYPES), help="row storage for part 2")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--skip-correctness", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-sharded", action="store_true", help="skip the two-process sharded-net check")
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing to check. "
            "Run it on a machine with a GPU, or test the code path with --device cpu --small."
        )
        return 0
    if device.type == "cpu":
        torch.set_num_threads(1)
    # on the CPU, run the arithmetic of the GPU path (low-precision products, emulated)
    policy = block_policy(low_precision_products=True) if device.type == "cpu" else contextlib.nullcontext()
    with policy:
        return _main(args, device)


def _main(args, device) -> int:
    t_start = time.perf_counter()
    sizes_m = args.sizes or ([0.002, 0.008] if args.small else [0.25, 1.0, 4.0])
    Ms = [int(round(s * 1e6)) for s in sizes_m]
    args.repeats = args.repeats or (3 if args.small else 10)
    args.eval_M = min(Ms, key=lambda m: abs(m - 1_000_000))
    args.eval_batch = 256 if args.small else 4096
    result = dict(
        machine=machine_line(str(device)),
        device=str(device),
        torch=torch.__version__,
        policy=str(current_block_policy()),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        tolerances=TOL,
    )
    print(f"gpu_check on {device}: {result['machine']}")
    rep = Report()
    if not args.skip_correctness:
        print("part 1: correctness against float64 CPU runs")
        checks = [
            (f"storage {s}", lambda s=s: check_storage(rep, device, s, args.small))
            for s in ("float32", "float16", "bfloat16")
        ]
        checks += [
            ("TrAct", lambda: check_tract(rep, device, args.small)),
            ("finite π-net", lambda: check_finite(rep, device, args.small)),
            ("MAML", lambda: check_maml(rep, device, args.small)),
            ("compression", lambda: check_compress(rep, device, args.small)),
            ("distributed", lambda: check_distributed(rep, device, args.small)),
        ]
        if args.skip_sharded:
            checks = checks[:-1]
        for name, fn in checks:
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 — every failure is reported, the others still run
                rep.error(name, exc)
        result["checks"] = rep.checks
    if not args.skip_speed:
        storage = DTYPES[args.storage]
        print(f"part 2: InfMLP(3072, 10, r=400, L=2), batch 8, {args.storage} rows")
        bw = device_bandwidth(device, 0.125 if args.small else 2.0)
        result["bandwidth"] = bw
        print(
            f"  device memory: copy {bw['copy_GBps']:.0f} GB/s (read + write), sum {bw['read_GBps']:.0f} GB/s"
        )
        sizes = []
        for M in Ms:
            try:
                res = measure_size(M, args, device, storage)
            except torch.OutOfMemoryError as exc:
                res = dict(M=M, error=f"out of memory: {str(exc).splitlines()[0]}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            sizes.append(res)
            if "step_s" in res:
                print(
                    f"  M={M:,}: {res['steps_per_s']:.2f} steps/s, {res['row_read_GBps']:.3g} GB/s of row reads "
                    f"({res['row_read_GBps'] / bw['copy_GBps']:.2f} of the copy bandwidth)",
                    flush=True,
                )
            else:
                print(f"  M={M:,}: {res['error']}", flush=True)
        result["sizes"] = sizes
        fit = extrapolate(sizes)
        result["paper_run"] = fit
        rows = []
        for s in sizes:
            if "step_s" not in s:
                rows.append([f"{s['M']:,}", s["error"], "", "", "", "", ""])
                continue
            rows.append(
                [
                    f"{s['M']:,}",
                    f"{s['step_s'] * 1e3:.2f}",
                    f"{s['steps_per_s']:.1f}",
                    f"{s['row_read_GBps']:.3g}",
                    f"{s['row_read_GBps'] / bw['copy_GBps']:.2f}",
                    f"{s['step_s'] / s['products_s']:.2f}",
                    f"{s['peak_memory_GiB']:.1f} / {s['realloc_peak_memory_GiB']:.1f}"
                    if "peak_memory_GiB" in s
                    else "-",
                ]
            )
        print()
        print_table(
            [
                "rows per layer",
                "step ms",
                "steps/s",
                "row reads GB/s",
                "÷ copy GB/s",
                "step/products",
                "peak GiB (steps / growth)",
            ],
            rows,
        )
        ev = next((s["eval"] for s in sizes if s.get("eval")), None)
        if ev:
            print(
                f"evaluation, one hidden π-layer, {ev['batch']} inputs × {ev['M']:,} rows: "
                f"{ev['layer_GFLOPs']:.0f} GFLOP/s vs torch.mm {ev['mm_GFLOPs']:.0f} GFLOP/s "
                f"(ratio {ev['ratio']:.2f}; with float16/bfloat16 rows on CUDA the layer's products "
                f"carry twice these flops: its inputs are split into two half-precision parts)"
            )
        if fit and fit["c_s_per_row"] <= 0:
            print("fit t(M) = t0 + c·M: no growth with M measured (sizes too small or timings too noisy)")
        elif fit:
            print(
                f"fit t(M) = {fit['t0_s'] * 1e3:.2f} ms + M × {fit['c_s_per_row'] * 1e9:.2f} ns; the paper's "
                f"CIFAR-10 run ({fit['paper_steps']:,} steps, {fit['paper_rows_end']:,} rows per layer at the end): "
                f"{fit['paper_run_h']:.1f} h"
            )
    result["seconds"] = time.perf_counter() - t_start
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(tmp, args.out)
    failed = rep.failed
    print(
        f"\n{len(rep.checks)} checks, {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}; "
        f"{result['seconds']:.0f} s; wrote {args.out}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
