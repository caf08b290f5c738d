"""Row-sharded training step: one process against P = 2 processes (gloo, one thread each).

The network is the one of ``benchmarks/step_time.py``: InfMLP(d_in=3072, d_out=10,
r=400, L=2), M random rows per π-layer, batch 8; a step is ``zero_grad``,
forward, cross-entropy, backward and ``InfSGD.step`` (8 rows appended per layer,
momentum 0.9). The benchmark starts two processes itself (torch.multiprocessing,
gloo on 127.0.0.1). Process 0 holds the whole net (the one-process baseline) and
its shard of a sharded copy; process 1 holds the other shard. Rounds alternate:

* ``1 process``: process 0 runs ``--steps`` steps of the whole net while process 1
  waits in a barrier (asleep in a socket read);
* ``2 processes``: both run ``--steps`` steps of the sharded net.

* ``1 process, M/2 rows``: process 0 alone with half the rows and no communication, the
  time two processes would take if all-reduces and waiting for each other were free;
* ``2 independent processes, M/2 rows``: both processes step such a net at the same time,
  without communicating: what the machine's cores (and memory) give two processes at once.

Medians over ``--repeats`` rounds, wall-clock seconds per step on process 0. Also:
row storage per process (allocated bytes of A, B and the coefficients, capacity
included), the resident-memory increase when each net is built, the gloo
all-reduce time of the two tensors a layer sends (batch × r_out, batch × r),
and a cost model of P processes (docs/distributed.md §4) fitted to the measured
one-process step times::

    T_P(M) = c₀ + c₁ · M / P + n_ar · t_ar

    python -m benchmarks.distributed               # M = 40k and 200k rows per layer (≈ 3 min)
    python -m benchmarks.distributed --quick       # M = 40k, fewer repeats
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from ._util import machine_line, print_table, random_rows, rss_bytes

BATCH, D_IN, D_OUT, R, L = 8, 3072, 10, 400, 2


def _net(seed: int):
    from inf.networks import InfMLP

    torch.manual_seed(seed)
    return InfMLP(D_IN, D_OUT, R, L=L)


@torch.no_grad()
def _load_rows(net, M: int, shard: int, shards: int, seed: int):
    """Give every π-layer M random rows in total, this process's share of them
    (rows differ from one process's copy, which does not matter for timing)."""
    gen = torch.Generator().manual_seed(seed + 1000 * shard)
    for store in [m.rows for m in list(net.hidden_layers) + [net.output_layer]]:
        local = (M - shard + shards - 1) // shards
        A, c, B = random_rows(local, store.r, store.r_out, gen)
        if shards > 1:
            store.set_local_rows(A, c, B, M)
        else:
            store.set_rows(A, c, B)


def _row_bytes(net) -> int:
    total = 0
    for store in [m.rows for m in list(net.hidden_layers) + [net.output_layer]]:
        for t in (store.A, store.coefficients, store.B):
            total += t.untyped_storage().nbytes()
    return total


def _trainer(net, seed: int):
    from inf.optim import InfSGD

    opt = InfSGD(net.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, D_IN, generator=gen)
    y = torch.randint(0, D_OUT, (BATCH,), generator=gen)

    def steps(k: int):
        for _ in range(k):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()

    return steps


def _allreduce_seconds(shape, repeats: int = 200) -> float:
    t = torch.randn(*shape)
    for _ in range(10):
        dist.all_reduce(t)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dist.all_reduce(t)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _worker(rank: int, world: int, port: int, sizes: list[int], repeats: int, steps: int, queue):
    import inf.distributed as idist

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=600),
    )
    results = {
        "allreduce": {
            "batch x r_out (8 x 10)": _allreduce_seconds((BATCH, D_OUT)),
            "batch x r (8 x 400)": _allreduce_seconds((BATCH, R)),
        }
    }
    for M in sizes:
        rss0 = rss_bytes()
        sharded = idist.shard_(_net(0))
        _load_rows(sharded, M, rank, world, seed=M)
        rss1 = rss_bytes()
        run_sharded = _trainer(sharded, seed=1)
        entry = {"rows_bytes_sharded": _row_bytes(sharded), "rss_sharded": rss1 - rss0}
        if rank == 0:
            full = _net(0)
            _load_rows(full, M, 0, 1, seed=M)
            entry["rss_full"] = rss_bytes() - rss1
            entry["rows_bytes_full"] = _row_bytes(full)
            run_full = _trainer(full, seed=1)
        # half the rows with no communication: alone (the ideal) and on both processes at once
        # (what the machine gives two processes that never wait for each other)
        half = _net(0)
        _load_rows(half, M // 2, 0, 1, seed=M)
        run_half = _trainer(half, seed=1)
        times = {
            "1 process": [],
            "2 processes": [],
            "1 process, M/2 rows": [],
            "2 independent processes, M/2 rows": [],
        }
        for i in range(repeats + 1):  # round 0 is the warm-up (first appends reallocate)
            dist.barrier()
            t0 = time.perf_counter()
            if rank == 0:
                run_full(steps)
            t1 = time.perf_counter()
            dist.barrier()
            t2 = time.perf_counter()
            run_sharded(steps)
            dist.barrier()
            t3 = time.perf_counter()
            if rank == 0:
                run_half(steps)
            t4 = time.perf_counter()
            dist.barrier()
            t5 = time.perf_counter()
            run_half(steps)
            dist.barrier()
            t6 = time.perf_counter()
            if i:
                times["1 process"].append((t1 - t0) / steps)
                times["2 processes"].append((t3 - t2) / steps)
                times["1 process, M/2 rows"].append((t4 - t3) / steps)
                times["2 independent processes, M/2 rows"].append((t6 - t5) / steps)
        entry["times"] = times
        entry["rows_bytes_after_sharded"] = _row_bytes(sharded)
        if rank == 0:
            entry["rows_bytes_after_full"] = _row_bytes(full)
            del full, run_full
        del sharded, run_sharded, half, run_half
        results[M] = entry
    queue.put((rank, results))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(sizes: list[int], repeats: int, steps: int, timeout: float = 1800.0) -> list[dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = mp.start_processes(
        _worker,
        args=(2, _free_port(), sizes, repeats, steps, queue),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    while not procs.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in procs.processes:
                p.kill()
            raise TimeoutError("benchmark did not finish in time")
    out = [None, None]
    while not queue.empty():
        rank, res = queue.get()
        out[rank] = res
    return out


def model(c0: float, c1: float, t_ar: float, P: int, M: float, n_ar: int = 2 * (L + 1)) -> float:
    """Seconds per step of P processes at M rows per layer (docs/distributed.md §4)."""
    return c0 + c1 * M / P + (n_ar * t_ar if P > 1 else 0.0)


def cifar_speedup(
    c0: float, c1: float, t_ar: float, P: int, steps: int = 312_500, batch: int = 8, r: int = 400
) -> float:
    """Speed-up of the whole CIFAR-10 run (M_t = r + batch·t rows at step t): Σ T_1 / Σ T_P."""
    mean_M = r + batch * (steps - 1) / 2  # T is linear in M, so the sums are at the mean M
    return model(c0, c1, t_ar, 1, mean_M) / model(c0, c1, t_ar, P, mean_M)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="M = 40k only, fewer repeats")
    parser.add_argument(
        "--M", type=int, nargs="+", default=None, help="rows per π-layer (default 40000 200000)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per M (default 5, quick 3)")
    parser.add_argument("--steps", type=int, default=3, help="steps per round")
    g = parser.add_argument_group("GPU model (assumptions, not measured here: this machine has no GPU)")
    g.add_argument("--gpu-bandwidth", type=float, default=3.35e12, help="bytes/s (H100 SXM: 3.35e12)")
    g.add_argument(
        "--gpu-efficiency", type=float, default=0.6, help="fraction of the bandwidth a step reaches"
    )
    g.add_argument("--gpu-fixed-ms", type=float, default=3.0, help="per-step fixed cost (launches, Python)")
    g.add_argument("--nccl-latency-us", type=float, default=20.0, help="one small all-reduce within a node")
    args = parser.parse_args()
    sizes = args.M or ([40_000] if args.quick else [40_000, 200_000])
    repeats = args.repeats or (3 if args.quick else 5)
    torch.set_num_threads(1)
    print(machine_line())
    print(
        f"InfMLP({D_IN} → {D_OUT}, r {R}, L {L}), batch {BATCH}, float32, 1 thread per process; "
        f"{repeats} rounds of {args.steps} steps, medians"
    )
    res0, res1 = run(sizes, repeats, args.steps)
    MiB = 2**20
    rows = []
    med = {}
    for M in sizes:
        e0, e1 = res0[M], res1[M]
        t1 = statistics.median(e0["times"]["1 process"])
        t2 = statistics.median(e0["times"]["2 processes"])
        th = statistics.median(e0["times"]["1 process, M/2 rows"])
        ti = statistics.median(e0["times"]["2 independent processes, M/2 rows"])
        med[M] = t1
        rows.append(
            [
                f"{M:,}",
                f"{1e3 * t1:.1f}",
                f"{1e3 * t2:.1f}",
                f"{1e3 * th:.1f}",
                f"{1e3 * ti:.1f}",
                f"{t1 / t2:.2f}",
                f"{t1 / ti:.2f}",
                f"{t1 / th:.2f}",
                f"{ti / t2:.2f}",
                f"{e0['rows_bytes_full'] / MiB:.0f}",
                f"{e0['rows_bytes_sharded'] / MiB:.0f}",
                f"{e1['rows_bytes_sharded'] / MiB:.0f}",
                f"{e0['rows_bytes_sharded'] / e0['rows_bytes_full']:.2f}",
                f"{e0['rss_full'] / MiB:.0f}",
                f"{e1['rss_sharded'] / MiB:.0f}",
                f"{e1['rss_sharded'] / e0['rss_full']:.2f}",
            ]
        )
    print_table(
        [
            "M",
            "1 proc ms",
            "2 proc ms",
            "M/2 alone ms",
            "2 × M/2 apart ms",
            "speed-up",
            "machine",
            "ideal",
            "efficiency",
            "rows MiB 1 proc",
            "rows MiB rank 0",
            "rows MiB rank 1",
            "rows ratio",
            "RSS+ MiB 1 proc",
            "RSS+ MiB rank 1",
            "RSS ratio",
        ],
        rows,
    )
    print(
        "(M/2 alone: one process with half the rows, no communication: what 2 processes would take "
        "without all-reduces and waiting, if the second core were free; ideal = 1 proc / M/2 alone. "
        "2 × M/2 apart: both processes step a net of M/2 rows at the same time, never communicating: "
        "machine = 1 proc / that, the most two processes can gain on this machine; efficiency = "
        "2 × M/2 apart / 2 proc, the share of it the sharded step keeps. rows MiB: allocated "
        "row storage as loaded; RSS+: resident memory added by building the net)"
    )
    ar = res0["allreduce"]
    for name, sec in ar.items():
        print(f"gloo all-reduce of {name} floats: {1e6 * sec:.0f} µs (median of 200)")
    t_ar = max(ar.values())
    if len(sizes) >= 2:
        a, b = sizes[0], sizes[-1]
        c1 = (med[b] - med[a]) / (b - a)
        c0 = med[a] - c1 * a
        print(f"one-process fit T_1(M) = c0 + c1·M: c0 = {1e3 * c0:.1f} ms, c1 = {1e9 * c1:.0f} ns per row")
        if c0 < 0 or c1 <= 0:
            print(
                "the fit is not usable (a negative cost: the machine's load changed between the sizes); "
                "no CPU model"
            )
            gpu_model(args)
            return
        mrows = [
            [P]
            + [f"{model(c0, c1, t_ar, 1, M) / model(c0, c1, t_ar, P, M):.2f}" for M in sizes]
            + [f"{cifar_speedup(c0, c1, t_ar, P):.2f}"]
            for P in (2, 4, 8)
        ]
        print_table(
            ["P"] + [f"model speed-up at {M:,}" for M in sizes] + ["CIFAR-10 run (CPU model)"],
            mrows,
            title=f"CPU processes, {2 * (L + 1)} all-reduces of ≤ {1e6 * t_ar:.0f} µs per step",
        )
    gpu_model(args)


def gpu_model(args):
    """The same model for GPUs, from the bytes a step must read (the rows, twice: forward and
    backward) at an assumed bandwidth, plus assumed fixed costs and NCCL latency."""
    bytes_per_row = 2 * (L * (R + R) + (R + D_OUT)) + 4 * (L + 1)  # float16 A and B, float32 coefficients
    c1 = 2 * bytes_per_row / (args.gpu_bandwidth * args.gpu_efficiency)
    c0, t_ar = args.gpu_fixed_ms * 1e-3, args.nccl_latency_us * 1e-6
    mean_M = R + BATCH * (312_500 - 1) / 2
    print(
        f"GPU model: {bytes_per_row} bytes per row (all π-layers, float16 rows), read twice per step at "
        f"{args.gpu_efficiency:.0%} of {args.gpu_bandwidth / 1e12:.2f} TB/s → c1 = {1e9 * c1:.2f} ns per row; "
        f"c0 = {args.gpu_fixed_ms} ms; all-reduce {args.nccl_latency_us} µs"
    )
    rows = []
    for P in (1, 2, 4, 8):
        t = model(c0, c1, t_ar, P, mean_M)
        end = model(c0, c1, t_ar, P, R + BATCH * 312_500)
        rows.append(
            [
                P,
                f"{1e3 * t:.2f}",
                f"{1e3 * end:.2f}",
                f"{model(c0, c1, t_ar, 1, mean_M) / t:.2f}",
                f"{312_500 * t / 3600:.2f}",
                f"{(R + BATCH * 312_500) * bytes_per_row / P / 2**30:.1f}",
            ]
        )
    print_table(
        ["P", "ms/step at mean M", "ms/step at the end", "run speed-up", "run hours", "rows GiB per GPU"],
        rows,
        title="CIFAR-10 run (312 500 steps, batch 8, M from 400 to 2.5M rows per layer)",
    )


if __name__ == "__main__":
    main()
