"""Helpers shared by the performance benchmarks.

Every benchmark reports ratios against a baseline measured in the same
process: the candidates are run in turns (A, B, A, B, …) after warm-up, so
that slow phases of a shared machine hit all of them alike, and the medians
are compared.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


# ----------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def machine_line(device: str = "cpu") -> str:
    """One line describing where the numbers come from."""
    parts = [
        f"torch {torch.__version__}",
        f"{os.cpu_count()} CPUs ({cpu_model()})",
        f"{torch.get_num_threads()} torch threads",
    ]
    if device.startswith("cuda") and torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name())
    load = load_average()
    if load is not None:
        parts.append(f"load average {load:.1f}")
    return ", ".join(parts)


def add_common_args(parser: argparse.ArgumentParser, default_threads: int | None = 1):
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions per candidate")
    parser.add_argument(
        "--threads",
        type=int,
        default=default_threads,
        help="torch.set_num_threads (0: torch's default). Default 1: on a machine whose "
        "cores are shared with other jobs a second thread mostly waits for the "
        "scheduler (docs/performance.md shows both)",
    )
    parser.add_argument("--seed", type=int, default=0)


def apply_threads(threads: int | None):
    if threads:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------- timing
def sync(device: torch.device | str | None = None):
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, device=None
) -> dict[str, list[float]]:
    """Run every candidate ``warmup`` times, then ``repeats`` rounds of each in turn;
    returns the wall-clock seconds of every timed call."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    sync(device)
    times = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs) -> float:
    return statistics.median(xs)


# ----------------------------------------------------------------- memory
def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int | None:
    """Current resident set size of this process (Linux), or None."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


class PeakRSS:
    """``with PeakRSS() as m: …``; afterwards ``m.peak`` is the peak RSS during the block minus
    the RSS at its start (bytes), or None where /proc is not available."""

    def __enter__(self):
        import gc

        gc.collect()
        self.ok = reset_peak_rss()
        self.start = rss_bytes()
        self.peak = None
        return self

    def __exit__(self, *exc):
        if self.ok and self.start is not None:
            self.peak = peak_rss_bytes() - self.start
        return False


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# ----------------------------------------------------------------- tables
def print_table(headers: list[str], rows: list[list[object]], title: str | None = None):
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if title:
        print(title)
    line = "  ".join(h.rjust(w) for h, w in zip(cells[0], widths))
    print(line)
    print("-" * len(line))
    for row in cells[1:]:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))


# ----------------------------------------------------------------- π-nets
@torch.no_grad()
def random_rows(
    M: int, r: int, r_out: int, generator: torch.Generator, dtype=torch.float32, coef_scale: float = 1e-2
):
    """``M`` rows shaped like trained ones: Gaussian ``A`` (scale r_out^-½), unit ``B`` rows,
    small coefficients of either sign (the ``-η`` of appended rows)."""
    A = torch.randn(M, r_out, generator=generator) * r_out**-0.5
    B = torch.nn.functional.normalize(torch.randn(M, r, generator=generator), dim=1)
    c = torch.randn(M, generator=generator) * coef_scale
    return A.to(dtype), c, B.to(dtype)


def load_random_rows(net, M: int, seed: int = 0, dtype=None):
    """Give every infinite layer of ``net`` ``M`` random rows through ``load_state_dict``
    (which resizes the row stores), as if it had been trained for a long time."""
    from ._naive import pi_layers, pi_rows

    gen = torch.Generator().manual_seed(seed)
    state = net.state_dict()
    names = {id(m): name for name, m in net.named_modules()}
    for layer in pi_layers(net):
        A0, _, _ = pi_rows(layer)
        st_dtype = dtype or A0.dtype
        A, c, B = random_rows(M, layer.r, layer.r_out, gen, dtype=st_dtype)
        prefix = names[id(layer.rows)] + "."
        coef_key = prefix + ("coefficients" if prefix + "coefficients" in state else "Amult")
        state[prefix + "A"], state[coef_key], state[prefix + "B"] = A, c, B
    net.load_state_dict(state)
    return net


def template_data(n: int, d_in: int, classes: int, generator: torch.Generator, templates=None):
    """``n`` inputs ``noise/2 + template[label]/2`` (one fixed random template per class),
    standardized per feature like image data; returns ``(x, y, templates)``."""
    if templates is None:
        templates = torch.randn(classes, d_in, generator=generator)
    y = torch.randint(0, classes, (n,), generator=generator)
    x = 0.5 * torch.randn(n, d_in, generator=generator) + 0.5 * templates[y]
    return x, y, templates


def trained_inf_mlp(
    steps: int, d_in: int = 3072, d_out: int = 10, r: int = 400, L: int = 2, batch: int = 8, seed: int = 0
):
    """An InfMLP trained for ``steps`` SGD steps with the paper's CIFAR-10 settings (lr 1.0,
    per-parameter clipping 0.4, bias α 0.5, last-layer α 0.5, lr multipliers 0.1 / 4.0,
    weight decay 1e-5) on class-template data, so that its rows are shaped by training.
    Returns ``(net, held-out x, training x)``."""
    from inf.networks import InfMLP
    from inf.optim import InfSGD
    from inf.utils import clip_grad_norm_, pi_param_groups

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = InfMLP(d_in, d_out, r, L=L, bias_alpha=0.5, first_layer_alpha=1.0, last_layer_alpha=0.5)
    groups = pi_param_groups(
        net,
        lr=1.0,
        weight_decay=1e-5,
        first_layer_lr_mult=0.1,
        last_layer_lr_mult=4.0,
        apply_lr_mult_to_wd=False,
    )
    opt = InfSGD(groups, lr=1.0, weight_decay=1e-5)
    x_train, y_train, templates = template_data(steps * batch, d_in, d_out, gen)
    for i in range(steps):
        xb, yb = x_train[i * batch : (i + 1) * batch], y_train[i * batch : (i + 1) * batch]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xb), yb).backward()
        clip_grad_norm_(net.parameters(), 0.4, per_param=True)
        opt.step()
    x_test, _, _ = template_data(512, d_in, d_out, gen, templates)
    return net, x_test, x_train[:512]
