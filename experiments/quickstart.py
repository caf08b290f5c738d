"""The main job: an infinite π-MLP and a finite π-net sampled from it, trained on digits.

Uses scikit-learn's bundled handwritten digits (1797 images of 8×8, no
download). The finite π-net is sampled from the infinite one at
initialization and both are trained with InfSGD on the same batches, so their
curves should nearly coincide; at the end a second finite net is sampled from
the *trained* infinite net, which should reproduce its predictions.

    python -m experiments.quickstart [--epochs 3] [--width 1024] [--out quickstart.png]
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from experiments import cli
from experiments import distributed as edist
from experiments.models import ModelSpec, build_model
from inf.networks import FinPiMLPSample
from inf.optim import InfSGD
from inf.utils import clip_grad_norm_, pi_param_groups

PROG = "python -m experiments.quickstart"


def load_digits_vectors(test_fraction: float = 0.25, split_seed: int = 0, dtype=torch.float32):
    """Digits as vectors: standardized pixels scaled so that each input has norm about 1."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float64)
    y = torch.tensor(digits.target, dtype=torch.long)
    tr, te = train_test_split(
        torch.arange(len(y)).numpy(), test_size=test_fraction, random_state=split_seed, stratify=y.numpy()
    )
    mean, std = X[tr].mean(0), X[tr].std(0).clamp_min(1e-3)
    X = (X - mean) / std / math.sqrt(X.shape[1])
    return X[tr].to(dtype), y[tr], X[te].to(dtype), y[te]


@torch.no_grad()
def accuracy(net, X, y, batch_size=512):
    correct = 0
    for i in range(0, len(X), batch_size):
        correct += (net(X[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum().item()
    return correct / len(X)


def parse_args(argv=None):
    p = cli.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--r", type=cli.positive_int, default=32, help="rank of the π-net")
    p.add_argument("--depth", type=cli.nonnegative_int, default=1, help="number of hidden π-layers")
    p.add_argument("--width", type=cli.positive_int, default=1024, help="width of the finite π-net")
    p.add_argument("--epochs", type=cli.positive_int, default=3)
    p.add_argument("--batch-size", type=cli.positive_int, default=16)
    p.add_argument("--lr", type=cli.positive_float, default=2.0)
    p.add_argument(
        "--gclip", type=cli.nonnegative_float, default=1.0, help="per-parameter gradient clipping (0: off)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="quickstart.png", help="where to save the loss/accuracy plot")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--row-budget",
        type=cli.nonnegative_int,
        default=0,
        metavar="N",
        help="rows per infinite layer: a layer with more rows is compressed "
        "(inf.compress.RowBudget, docs/compression.md); 0 = off",
    )
    cli.add_threads_arg(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cli.apply_threads(args.threads)
    Xtr, ytr, Xte, yte = load_digits_vectors()
    infnet = build_model(
        ModelSpec(
            "infinite",
            Xtr.shape[1],
            10,
            r=args.r,
            depth=args.depth,
            first_layer_alpha=1.0,
            last_layer_alpha=1.0,
            bias_alpha=0.5,
            seed=args.seed,
        )
    )
    infnet = edist.prepare(infnet, args)  # under torchrun: rows sharded over the processes
    # sampled from this very infinite net: both start as the same function
    finnet = FinPiMLPSample(infnet, args.width)
    nets = {"infinite": infnet, f"finite n={args.width}": finnet}
    opts = {
        k: InfSGD(pi_param_groups(m, lr=args.lr, first_layer_lr_mult=0.5), lr=args.lr)
        for k, m in nets.items()
    }
    history = {k: {"step": [], "loss": [], "epoch_acc": []} for k in nets}
    budget = None
    if args.row_budget:
        from inf.compress import RowBudget

        if args.row_budget < 2:
            raise cli.ConfigError("--row-budget must be 0 (off) or at least 2 rows")
        budget = RowBudget(infnet, max_rows=args.row_budget, optimizer=opts["infinite"], seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = math.ceil(len(Xtr) / args.batch_size)
    start = time.time()
    step = 0
    for epoch in range(args.epochs):
        order = torch.randperm(len(Xtr), generator=gen)
        bar = cli.progress_bar(
            range(steps_per_epoch),
            desc=f"epoch {epoch + 1}/{args.epochs}",
            enabled=not args.no_progress and edist.is_main(),
            leave=False,
        )
        for i in bar:
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            postfix = {}
            for name, net in nets.items():
                loss = F.cross_entropy(net(Xtr[idx]), ytr[idx])
                opts[name].zero_grad()
                loss.backward()
                if args.gclip > 0:
                    clip_grad_norm_(net.parameters(), args.gclip, per_param=True)
                opts[name].step()
                if budget is not None and net is infnet:
                    budget()
                history[name]["step"].append(step)
                history[name]["loss"].append(loss.item())
                postfix[name.split()[0]] = f"{loss.item():.3f}"
            postfix["rows"] = edist.global_rows(infnet)[0]
            bar.set_postfix(postfix)
            step += 1
        for name, net in nets.items():
            history[name]["epoch_acc"].append(accuracy(net, Xte, yte))
        if edist.is_main():
            tqdm.write(
                f"epoch {epoch + 1}: test accuracy "
                + ", ".join(f"{k} {v['epoch_acc'][-1]:.4f}" for k, v in history.items())
            )
    resampled = FinPiMLPSample(infnet, args.width)
    with torch.no_grad():
        out_inf, out_res = infnet(Xte), resampled(Xte)
        rel = ((out_res - out_inf).norm() / out_inf.norm()).item()
    acc_inf, acc_fin, acc_res = (
        accuracy(infnet, Xte, yte),
        accuracy(finnet, Xte, yte),
        accuracy(resampled, Xte, yte),
    )
    if not edist.is_main():  # under torchrun, process 0 reports and plots
        return {"infinite": acc_inf, "finite": acc_fin, "resampled": acc_res, "resampled_gap": rel}
    print(
        f"test accuracy  infinite π-MLP (r={args.r}, {edist.global_rows(infnet)[0]} rows/layer): {acc_inf:.4f}"
    )
    print(f"test accuracy  finite π-net n={args.width} trained alongside:          {acc_fin:.4f}")
    print(
        f"test accuracy  finite π-net n={args.width} sampled after training:      {acc_res:.4f} "
        f"(relative output gap to the infinite net {rel:.3f})"
    )
    if budget is not None:
        m = budget.metrics()
        print(
            f"row budget {args.row_budget}: compressions per layer {list(m['compressions'].values())}, "
            f"accumulated relative error ε/‖h‖ per layer "
            f"{[round(v, 4) for v in m['rel_eps_sum'].values()]}, {m['compress_seconds']:.1f} s compressing"
        )
    print(f"time {time.time() - start:.1f} s")
    save_plot(history, args.out, steps_per_epoch)
    print(f"plot saved to {args.out}")
    result = {"infinite": acc_inf, "finite": acc_fin, "resampled": acc_res, "resampled_gap": rel}
    if budget is not None:
        result["row_budget"] = budget.metrics()
    return result


def save_plot(history, path, steps_per_epoch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for name, h in history.items():
        loss = torch.tensor(h["loss"])
        k = max(1, steps_per_epoch // 4)
        smooth = loss.unfold(0, k, 1).mean(1) if len(loss) >= k else loss
        ax1.plot(
            range(k - 1, k - 1 + len(smooth)), smooth, label=name, marker="." if len(smooth) < 50 else None
        )
        ax2.plot(range(1, len(h["epoch_acc"]) + 1), h["epoch_acc"], marker="o", label=name)
    ax1.set(xlabel="step", ylabel="training loss (moving average)", yscale="log")
    ax2.set(xlabel="epoch", ylabel="test accuracy")
    ax1.legend()
    ax2.legend()
    fig.suptitle("π-MLP on digits: infinite width vs a finite π-net sampled from it")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    cli.run_main(main, PROG, sys.argv[1:])
