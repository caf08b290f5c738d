"""The paper's Table 1 in miniature: five ways to train a ReLU MLP, on real data, in one command.

    python -m experiments.table1 --dataset digits             # scikit-learn's digits, no download
    python -m experiments.table1 --dataset cifar10 --data DIR --train-size 5000 --test-size 2000

Five methods, as in Table 1 of Yang, Santacroce & Hu (ICLR 2022), each over ``--seeds`` seeds:

* **infinite π-net** — :class:`inf.networks.InfMLP` of rank ``--r`` trained by
  :class:`inf.optim.InfSGD` (every SGD step appends rows; docs/math.md, "Training is
  concatenation");
* **finite π-net** — :class:`inf.networks.FinPiMLPSample` of width ``--width`` sampled from a
  freshly initialised infinite net of the same seed and trained with InfSGD (gradients projected
  on span(Ω));
* **μP MLP** — :class:`inf.networks.MuMLP` of width ``--width``, Gaussian init, no projection;
* **NNGP** and **NTK** — kernel ridge regression with the kernels of the same MLP in the limit
  (:mod:`experiments.kernels`), depth ``--depth + 1`` ReLUs (a π-net with ``--depth`` hidden
  layers applies ``--depth + 1`` ReLUs), ``varw = 2``, ``varb = 0``. They do not depend on the
  seed: their standard deviation is 0 by construction.

The three networks share their hyperparameters (``--lr``, decayed linearly to 0 over the run,
``--batch-size``, ``--gclip`` per parameter, the α's and learning-rate multipliers), are trained
with cross-entropy on the same batches, and are also scored by their **feature kernel**: kernel ridge regression on the
last hidden layer's features ``net.features(x)`` (infinite net: ``s s' F00(ĝ·ĝ')``; finite
nets: ``φ(h)·φ(h')/n``), the kernel that training has learned.

Inputs: digits are 8×8 (64 pixels), CIFAR-10 images 3×32×32 (3072 values); both are
standardised per pixel (digits) or per channel (CIFAR-10) with training-set statistics and
divided by √d, so that every input has norm about 1. Output: a table of mean ± standard
deviation of the test accuracy and the mean wall time per seed, printed and saved with a PNG
and a JSON file in ``--save-dir/table1_<dataset>/`` (refused if it already holds results,
unless ``--overwrite``).

The digits defaults take about half a minute of CPU on one thread (measured: 31 s CPU, 43 s
wall on a shared 2-core machine; several minutes when the cores are busy). They are chosen for
that, not tuned per method; with them the kernels still lead on digits (NNGP 98.9 %, NTK
98.7 %, networks 96.4–97.3 %). CIFAR-10 with the paper's settings (r = 400, width 2048, 50
epochs, 50 000 images) is a GPU job: see docs/experiments_cifar_imagenet.md for the original
commands.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from experiments.kernels import NTK_VARIANTS, feature_kernel, kernel_ridge_regression, make_mlp_kernel
from experiments.models import ModelSpec, build_model
from inf.fileio import atomic_write
from inf.optim import InfSGD
from inf.utils import clip_grad_norm_, pi_param_groups

__all__ = ["METHODS", "build_parser", "load_dataset", "main", "run_table"]

METHODS = ("infinite π-net", "finite π-net", "μP MLP", "NNGP", "NTK")
NETWORKS = METHODS[:3]
#: The paper's Table 1 (CIFAR-10 test accuracy, %), for reference next to a CIFAR-10 run.
PAPER_CIFAR10 = {"infinite π-net": 61.50, "finite π-net": 60.64, "μP MLP": 61.31, "NNGP": 58.92, "NTK": 59.63}
RESULTS_JSON = "results.json"


class UserError(Exception):
    """A problem with the command line or the data: reported as one line, no traceback."""


# --------------------------------------------------------------------------- data


@dataclass
class Dataset:
    name: str
    X_train: torch.Tensor  # N × d float32, rows of norm ≈ 1
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int = 10


def _subset(n: int, size: int | None, salt: int) -> torch.Tensor | None:
    """A fixed subset of ``size`` of ``n`` indices (sorted), the same for every seed."""
    if size is None or size >= n:
        return None
    if size < 1:
        raise UserError(f"subset sizes must be at least 1, got {size}")
    gen = torch.Generator().manual_seed(1000 + salt)
    return torch.randperm(n, generator=gen)[:size].sort().values


def _standardise(train: torch.Tensor, test: torch.Tensor, mean: torch.Tensor, std: torch.Tensor):
    d = train.shape[1]
    scale = std.clamp_min(1e-3) * math.sqrt(d)
    return ((train - mean) / scale).float(), ((test - mean) / scale).float()


def load_dataset(
    name: str, data: str | None = None, train_size: int | None = None, test_size: int | None = None
) -> Dataset:
    """Vectors for the five methods: ``digits`` (no download) or ``cifar10`` from ``data``."""
    if name == "digits":
        from experiments.data.digits import load_digits_split

        xtr, ytr, xte, yte = load_digits_split(size=8)  # uint8 N × 3 × 8 × 8, grey copied
        xtr, xte = xtr[:, 0].reshape(len(xtr), -1).double(), xte[:, 0].reshape(len(xte), -1).double()
        mean, std = xtr.mean(0), xtr.std(0)
    elif name == "cifar10":
        from experiments.data.cifar import DatasetError, load_cifar10

        if data is None:
            raise UserError(
                "--dataset cifar10 needs --data DIR (the CIFAR-10 python version: "
                "cifar-10-python.tar.gz or the folder unpacked from it)"
            )
        try:
            xtr, ytr = load_cifar10(data, train=True)
            xte, yte = load_cifar10(data, train=False)
        except DatasetError as err:
            raise UserError(str(err)) from None
        xtr, xte = xtr.double() / 255.0, xte.double() / 255.0
        # per-channel statistics of the training images
        mean = xtr.mean((0, 2, 3), keepdim=True).expand(1, *xtr.shape[1:]).reshape(-1)
        std = xtr.std((0, 2, 3), keepdim=True).expand(1, *xtr.shape[1:]).reshape(-1)
        xtr, xte = xtr.reshape(len(xtr), -1), xte.reshape(len(xte), -1)
    else:
        raise UserError(f"--dataset must be 'digits' or 'cifar10', got {name!r}")
    for size, flag in ((train_size, "--train-size"), (test_size, "--test-size")):
        if size is not None and size < 1:
            raise UserError(f"{flag} must be at least 1, got {size}")
    idx = _subset(len(ytr), train_size, 0)
    if idx is not None:
        xtr, ytr = xtr[idx], ytr[idx]
    idx = _subset(len(yte), test_size, 1)
    if idx is not None:
        xte, yte = xte[idx], yte[idx]
    Xtr, Xte = _standardise(xtr, xte, mean, std)
    return Dataset(name, Xtr, ytr.long(), Xte, yte.long())


# --------------------------------------------------------------------------- methods


_KIND_OF_METHOD = {"infinite π-net": "infinite", "finite π-net": "finite", "μP MLP": "mup"}


def build_net(method: str, args, d_in: int, num_classes: int, seed: int) -> torch.nn.Module:
    """The network of ``method`` for ``seed``, from the programs' one builder
    (:func:`experiments.models.build_model`): the finite π-net is sampled from the infinite net
    that the same seed initialises."""
    spec = ModelSpec(
        kind=_KIND_OF_METHOD[method],
        d_in=d_in,
        d_out=num_classes,
        r=args.r,
        width=args.width,
        depth=args.depth,
        first_layer_alpha=args.first_layer_alpha,
        last_layer_alpha=args.last_layer_alpha,
        bias_alpha=args.bias_alpha,
        seed=seed,
    )
    return build_model(spec)


@torch.no_grad()
def _accuracy(net, X, y, batch_size: int = 1000) -> float:
    correct = 0
    for i in range(0, len(X), batch_size):
        correct += int((net(X[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    return correct / len(X)


@torch.no_grad()
def _features(net, X, batch_size: int = 1000) -> torch.Tensor:
    return torch.cat([net.features(X[i : i + batch_size]) for i in range(0, len(X), batch_size)])


def _finite_feature_kernel(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Empirical kernel ``φ(h)·φ(h')/n`` of a finite net's last hidden preactivations."""
    a, b = torch.relu(A.double()), torch.relu(B.double())
    return a @ b.T / a.shape[1]


def _krr_dtype(n_train: int) -> torch.dtype | None:
    """float64 kernel matrices up to 10 000 training points (0.8 GB); beyond, the regression's
    float32 default (CIFAR-10's 50 000 points: a 10 GB matrix instead of 20 GB)."""
    return torch.float64 if n_train <= 10_000 else None


def train_network(method: str, args, data: Dataset, seed: int, progress: bool) -> dict:
    """Train one network for ``args.epochs`` epochs; its test accuracy and feature-kernel
    accuracy."""
    net = build_net(method, args, data.X_train.shape[1], data.num_classes, seed)
    groups = pi_param_groups(
        net,
        lr=args.lr,
        first_layer_lr_mult=args.first_layer_lr_mult,
        last_layer_lr_mult=args.last_layer_lr_mult,
    )
    opt = InfSGD(groups, lr=args.lr)
    base_lrs = [g["lr"] for g in opt.param_groups]
    batches = torch.Generator().manual_seed(20_000 + seed)  # the same batches for every method
    n = len(data.y_train)
    steps = math.ceil(n / args.batch_size)
    total, done = args.epochs * steps, 0
    bar = tqdm(total=args.epochs * steps, desc=f"{method}, seed {seed}", leave=False, disable=not progress)
    loss = float("nan")
    for _ in range(args.epochs):
        order = torch.randperm(n, generator=batches)
        for i in range(steps):
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            out = net(data.X_train[idx])
            batch_loss = F.cross_entropy(out, data.y_train[idx])
            opt.zero_grad()
            batch_loss.backward()
            if args.gclip > 0:
                clip_grad_norm_(net.parameters(), args.gclip, per_param=True)
            for group, base in zip(opt.param_groups, base_lrs):  # linear decay to 0
                group["lr"] = base * (1.0 - done / total)
            opt.step()
            done += 1
            loss = batch_loss.item()
            bar.update()
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
    bar.close()
    acc = _accuracy(net, data.X_test, data.y_test)
    # the learned feature kernel of the last hidden layer
    ftr, fte = _features(net, data.X_train), _features(net, data.X_test)
    kernel = feature_kernel if method == "infinite π-net" else _finite_feature_kernel
    kacc = kernel_ridge_regression(
        kernel,
        ftr,
        data.y_train,
        fte,
        data.y_test,
        num_classes=data.num_classes,
        kernel_reg=args.kernel_reg,
        dtype=_krr_dtype(len(data.y_train)),
        progress=False,
    )
    return {"test_acc": acc, "feature_kernel_acc": kacc, "final_train_loss": loss}


def kernel_method(method: str, args, data: Dataset) -> dict:
    """NNGP or NTK regression. The kernels see the standardised inputs without the 1/√d (so
    |x|²/d ≈ 1, the original program's convention); with varb = 0 the tangent kernel and the
    NNGP do not depend on that scale or on varw, but the original NTK formula
    (``--ntk-variant pilim``) does, and is evaluated at the original's varw = 1."""
    kind = "nngp" if method == "NNGP" else "ntk"
    pilim = kind == "ntk" and args.ntk_variant == "pilim"
    kernel = make_mlp_kernel(
        kind, depth=args.depth + 1, varw=1.0 if pilim else 2.0, varb=0.0, ntk_variant=args.ntk_variant
    )
    root_d = math.sqrt(data.X_train.shape[1])
    acc = kernel_ridge_regression(
        kernel,
        data.X_train * root_d,
        data.y_train,
        data.X_test * root_d,
        data.y_test,
        num_classes=data.num_classes,
        kernel_reg=args.kernel_reg,
        dtype=_krr_dtype(len(data.y_train)),
        progress=False,
    )
    return {"test_acc": acc}


def run_table(args, data: Dataset, progress: bool = False, log=print) -> dict:
    """Every method over every seed: ``{method: {"runs": [...], "mean", "sd", "time_s"}}``."""
    results = {}
    for method in args.methods:
        runs = []
        for seed in args.seeds:
            began = time.perf_counter()
            if method in NETWORKS:
                row = train_network(method, args, data, seed, progress)
            else:
                row = kernel_method(method, args, data)
            row.update(seed=seed, time_s=time.perf_counter() - began)
            runs.append(row)
            extra = (
                f", feature kernel {100 * row['feature_kernel_acc']:.2f}%"
                if "feature_kernel_acc" in row
                else ""
            )
            log(
                f"{method:15s} seed {seed}: test accuracy {100 * row['test_acc']:.2f}%{extra} "
                f"({row['time_s']:.1f} s)"
            )
        accs = np.array([r["test_acc"] for r in runs])
        entry = {
            "runs": runs,
            "mean": float(accs.mean()),
            "sd": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0,
            "time_s": float(np.mean([r["time_s"] for r in runs])),
        }
        if method in NETWORKS:
            k = np.array([r["feature_kernel_acc"] for r in runs])
            entry.update(
                feature_kernel_mean=float(k.mean()),
                feature_kernel_sd=float(k.std(ddof=1)) if len(k) > 1 else 0.0,
            )
        results[method] = entry
    return results


# --------------------------------------------------------------------------- output


def format_table(results: dict, dataset: str, n_seeds: int) -> str:
    """The table as aligned text (also valid Markdown)."""
    paper = dataset == "cifar10"
    head = [
        "method",
        f"test accuracy % (mean ± sd, {n_seeds} seeds)",
        "feature kernel %",
        "time per seed (s)",
    ] + (["paper (CIFAR-10, full)"] if paper else [])
    rows = []
    for method, r in results.items():
        fk = (
            f"{100 * r['feature_kernel_mean']:.2f} ± {100 * r['feature_kernel_sd']:.2f}"
            if "feature_kernel_mean" in r
            else "—"
        )
        row = [method, f"{100 * r['mean']:.2f} ± {100 * r['sd']:.2f}", fk, f"{r['time_s']:.1f}"]
        if paper:
            row.append(f"{PAPER_CIFAR10[method]:.2f}")
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep] + [line(r) for r in rows])


def save_plot(results: dict, path: Path, title: str) -> None:
    """Bar chart of the test accuracies (mean ± sd, every seed as a dot), ≥ 1200 px wide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(results)
    fig, ax = plt.subplots(figsize=(12, 6.5), dpi=110)
    x = np.arange(len(methods))
    means = [100 * results[m]["mean"] for m in methods]
    sds = [100 * results[m]["sd"] for m in methods]
    colors = ["tab:blue", "tab:cyan", "tab:green", "tab:orange", "tab:red"]
    ax.bar(
        x, means, yerr=sds, capsize=8, color=colors[: len(methods)], alpha=0.8, label="mean ± sd over seeds"
    )
    first = True
    for i, m in enumerate(methods):
        accs = [100 * r["test_acc"] for r in results[m]["runs"]]
        ax.plot([i] * len(accs), accs, "k.", markersize=10, label="one seed" if first else None)
        first = False
    fk = [
        (i, 100 * results[m]["feature_kernel_mean"])
        for i, m in enumerate(methods)
        if "feature_kernel_mean" in results[m]
    ]
    if fk:
        ax.plot(
            [i for i, _ in fk],
            [v for _, v in fk],
            "D",
            color="purple",
            markersize=9,
            linestyle="none",
            label="feature kernel of the trained net (mean)",
        )
    every = [100 * r["test_acc"] for m in methods for r in results[m]["runs"]]
    lo = min(every + [v for _, v in fk]) - 5
    hi = max(every + [m + s for m, s in zip(means, sds)] + [v for _, v in fk])
    bottom = max(0.0, lo)
    ax.set_ylim(bottom, min(100.0, hi) + 0.1 * (hi - bottom) + 1)
    for i, mean in enumerate(means):  # the mean, written inside its bar
        ax.text(
            i,
            bottom + 0.04 * (ax.get_ylim()[1] - bottom),
            f"{mean:.2f}%",
            ha="center",
            color="white",
            fontsize=14,
            fontweight="bold",
        )
    ax.set_xticks(x, methods, fontsize=13)
    ax.set_ylabel("test accuracy (%)", fontsize=14)
    ax.set_xlabel("method", fontsize=14)
    ax.tick_params(axis="y", labelsize=12)
    ax.set_title(title, fontsize=15)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=12, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.table1",
        description="The paper's Table 1 in miniature: infinite π-net, finite π-net, μP MLP, "
        "NNGP and NTK on digits (no download) or CIFAR-10, over several seeds.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", choices=("digits", "cifar10"), default="digits")
    p.add_argument(
        "--data",
        default=None,
        metavar="DIR",
        help="CIFAR-10 python version (cifar-10-python.tar.gz or its folder); --dataset cifar10 only",
    )
    p.add_argument(
        "--train-size",
        type=int,
        default=None,
        metavar="N",
        help="use a fixed subset of N training examples (default: all)",
    )
    p.add_argument(
        "--test-size",
        type=int,
        default=None,
        metavar="N",
        help="use a fixed subset of N test examples (default: all)",
    )
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, …)")
    p.add_argument("--epochs", type=int, default=6, help="training epochs of the networks")
    p.add_argument("--r", type=int, default=32, help="rank of the π-nets")
    p.add_argument("--width", type=int, default=1024, help="width of the finite π-net and μP MLP")
    p.add_argument(
        "--depth",
        type=int,
        default=1,
        help="hidden layers of the networks (the kernels get --depth + 1 ReLUs)",
    )
    p.add_argument(
        "--lr", type=float, default=2.0, help="initial learning rate of the networks, decayed linearly to 0"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--gclip", type=float, default=1.0, help="per-parameter gradient clipping (0: off)")
    p.add_argument("--first-layer-alpha", type=float, default=2.0)
    p.add_argument("--last-layer-alpha", type=float, default=1.0)
    p.add_argument("--bias-alpha", type=float, default=0.5)
    p.add_argument("--first-layer-lr-mult", type=float, default=0.5)
    p.add_argument("--last-layer-lr-mult", type=float, default=1.0)
    p.add_argument(
        "--kernel-reg",
        type=float,
        default=1e-3,
        help="ridge of every kernel regression, relative to the kernel's mean diagonal",
    )
    p.add_argument(
        "--ntk-variant",
        choices=NTK_VARIANTS,
        default="correct",
        help="'pilim': the original library's NTK formula (docs/experiments_cifar_imagenet.md)",
    )
    p.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS)
    )
    p.add_argument(
        "--save-dir",
        default="./output",
        help="results go to SAVE_DIR/table1_<dataset>/ (table.md, results.json, table1.png)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace the results of an earlier run in the same folder"
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _check(args) -> None:
    for flag in ("seeds", "epochs", "r", "width", "batch_size", "threads"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.depth < 0:
        raise UserError(f"--depth must be at least 0, got {args.depth}")
    for flag in ("lr", "kernel_reg", "gclip"):
        value = getattr(args, flag)
        if not math.isfinite(value) or value < 0 or (flag == "lr" and value == 0):
            raise UserError(
                f"--{flag.replace('_', '-')} must be a "
                f"{'positive' if flag == 'lr' else 'non-negative'} number, got {value}"
            )
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    aliases = {m.lower(): m for m in METHODS}
    aliases.update({"infinite": METHODS[0], "finite": METHODS[1], "mup": METHODS[2]})
    unknown = [m for m in methods if m.lower() not in aliases]
    if unknown or not methods:
        raise UserError(
            f"--methods: unknown {', '.join(unknown) or 'empty list'}; choose from "
            f"{', '.join(METHODS)} (or infinite, finite, mup)"
        )
    args.methods = [aliases[m.lower()] for m in methods]
    if args.dataset == "digits" and args.data is not None:
        raise UserError("--data is for --dataset cifar10; digits ship with scikit-learn")


def main(argv=None) -> dict:
    """Run the table; returns ``{"config", "results", "table"}`` (also written to disk)."""
    args = build_parser().parse_args(argv)
    _check(args)
    torch.set_num_threads(args.threads)
    out = Path(args.save_dir).expanduser() / f"table1_{args.dataset}"
    if (out / RESULTS_JSON).exists() and not args.overwrite:
        raise UserError(
            f"{out} already holds the results of an earlier run; pass --overwrite to "
            f"replace them, or choose another --save-dir"
        )
    progress = not args.no_progress and sys.stderr.isatty()
    data = load_dataset(args.dataset, args.data, args.train_size, args.test_size)
    print(
        f"{args.dataset}: {len(data.y_train)} training and {len(data.y_test)} test examples "
        f"of dimension {data.X_train.shape[1]}; {args.seeds} seeds, {args.epochs} epochs, "
        f"r = {args.r}, width {args.width}, depth {args.depth}, {args.threads} thread(s)"
    )
    seeds = args.seeds
    args.seeds = list(range(seeds))
    results = run_table(args, data, progress)
    table = format_table(results, args.dataset, seeds)
    print()
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items()}
    doc = {
        "config": config,
        "results": results,
        "table": table,
        "train_size": len(data.y_train),
        "test_size": len(data.y_test),
    }
    _atomic_write_text(out / "table.md", table + "\n")
    title = (
        f"Table 1 in miniature: {args.dataset} ({len(data.y_train)} train / "
        f"{len(data.y_test)} test), {seeds} seeds, {args.epochs} epochs, r = {args.r}, "
        f"width {args.width}"
    )
    atomic_write(out / "table1.png", lambda fh: save_plot(results, fh, title))
    _atomic_write_text(out / RESULTS_JSON, json.dumps(doc, indent=1))
    print(f"\nwritten: {out / 'table.md'}, {out / RESULTS_JSON}, {out / 'table1.png'}")
    return doc


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode()))


def _cli() -> None:
    try:
        main()
    except UserError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    _cli()
