"""The training harness of Ma, Guo & Fattahi (2022), "Behind the scenes of gradient descent: a
trajectory analysis via basis function decomposition" — their ``train.py``, with the same
command line:

    python -m experiments.analysis.train --no-call_wandb --model='alexnet' --init_scale=1 \\
        --data='Cifar10' --loss_fn='mse_loss' --optimizer='lars' --batch_size=512 --num_epoch=300 \\
        --lr_setting 2 0 1e-2 --decay_rate=0.33 --decay_stepsize=50 --seed=0 --num_run=0 \\
        --no-gradient --data_root DIR

plus ``--data_root DIR`` (where the data are; nothing is downloaded), ``--train_subset N`` /
``--test_subset N`` (shorter runs) and ``--no-progress``.

Each epoch it trains on the training set and records the outputs on the test set (the held-out
set of the basis). After the last epoch it builds the paper's basis from the final network's
penultimate features on the test set (``inf.analysis.decomposition.function_basis``) and
writes, into the run folder (``--path``, or ``runs/analysis/train/<name>``; never an existing
non-empty folder):

* ``trajectory.npz`` — ``beta`` (epochs + 1 × m: β_i after each epoch, row 0 at
  initialisation), ``s`` (β_i of the final network), ``feature_singular_values``, ``lr``,
  ``train_loss`` (sum of the batch losses of each epoch, as the authors record it),
  ``train_acc``, ``test_acc`` (epochs + 1, row 0 at initialisation), and with ``--gradient``
  ``output_grad_norm``;
* ``metrics.json`` — the same numbers and the arguments;
* ``beta.png`` (β_1 … β_5 against the epoch), ``curves.png`` (loss and accuracies).

Files are written atomically. See docs/analysis.md for what differs from the authors' code.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from inf.fileio import atomic_write

log = logging.getLogger("analysis.train")

DATASETS = {"Mnist": (1, 10, 28), "Cifar10": (3, 10, 32), "Cifar100": (3, 100, 32)}
OPTIMIZERS = ("sgd", "lars", "lamb", "adamw", "adam")
LOSSES = ("mse_loss", "ce_loss")


class UserError(Exception):
    """A problem with the command line or the data: reported as one line, without traceback."""


def parse_args(argv=None) -> argparse.Namespace:
    from .models import MODELS

    p = argparse.ArgumentParser(
        prog="python -m experiments.analysis.train",
        description="Basis-function decomposition harness (Ma, Guo & Fattahi 2022)",
    )
    p.add_argument("--model", default="resnet18", help=f"one of {', '.join(MODELS)}")
    p.add_argument("--init_scale", default=1.0, type=float, help="initial parameters = init_scale × default")
    p.add_argument("--data", default="Cifar10", help="Mnist, Cifar10 or Cifar100")
    p.add_argument("--loss_fn", default="mse_loss", help="mse_loss or ce_loss")
    p.add_argument("--optimizer", default="sgd", help="sgd, lars, lamb, adamw (or adam)")
    p.add_argument("--batch_size", default=256, type=int)
    p.add_argument("--num_epoch", default=310, type=int)
    p.add_argument(
        "--lr_setting",
        default=[1e-1, 5, 1e-2],
        nargs="*",
        type=float,
        help="lr_max epoch_warm lr_warm: warm up linearly from lr_warm to lr_max in epoch_warm epochs",
    )
    p.add_argument(
        "--decay_rate", default=0.33, type=float, help="learning-rate factor every decay_stepsize epochs"
    )
    p.add_argument("--decay_stepsize", default=50, type=int)
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--num_run", default=0, type=int, help="run number (part of the run folder's name)")
    p.add_argument("--call_wandb", default=False, action="store_true", help="accepted and ignored (no wandb)")
    p.add_argument("--no-call_wandb", dest="call_wandb", action="store_false")
    p.add_argument(
        "--gradient",
        default=False,
        action="store_true",
        help="also record the Frobenius norm of the output Jacobian on the test set each epoch (slow)",
    )
    p.add_argument("--no-gradient", dest="gradient", action="store_false")
    p.add_argument(
        "--path", default="none", type=str, help="run folder (default: a new one under runs/analysis/train)"
    )
    p.add_argument(
        "--log", default="essential", help="'detail' also saves the final features and test outputs"
    )
    p.add_argument(
        "--k_M",
        default=[5, 5],
        nargs="*",
        type=float,
        help="CIFAR-100 squared loss: weight = k·one_hot + 1, loss = mean(weight·(out − M·one_hot)²)",
    )
    p.add_argument("--scheduler", default="default", help="default (warm-up then steps) or onecycle")
    p.add_argument(
        "--data_root", default=None, help="folder with the data (MNIST idx files, CIFAR python version)"
    )
    p.add_argument("--train_subset", default=None, type=int, help="use only N training examples")
    p.add_argument(
        "--test_subset", default=None, type=int, help="use only N test examples (the held-out set)"
    )
    p.add_argument("--width_mult", default=1.0, type=float, help="channel multiplier of the cnn2/3/4 models")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    problems = []
    if args.model not in MODELS:
        problems.append(f"--model {args.model!r} is not one of {', '.join(MODELS)}")
    if args.data not in DATASETS:
        problems.append(f"--data {args.data!r} is not one of {', '.join(DATASETS)}")
    if args.loss_fn not in LOSSES:
        problems.append(f"--loss_fn {args.loss_fn!r} is not one of {', '.join(LOSSES)}")
    if args.optimizer not in OPTIMIZERS:
        problems.append(f"--optimizer {args.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if len(args.lr_setting) != 3:
        problems.append(
            f"--lr_setting takes 3 numbers (lr_max epoch_warm lr_warm), got {len(args.lr_setting)}"
        )
    if len(args.k_M) != 2:
        problems.append(f"--k_M takes 2 numbers (k M), got {len(args.k_M)}")
    if args.batch_size < 1 or args.num_epoch < 1 or args.decay_stepsize < 1:
        problems.append("--batch_size, --num_epoch and --decay_stepsize must be >= 1")
    for name in ("train_subset", "test_subset"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            problems.append(f"--{name} must be >= 1")
    if args.scheduler not in ("default", "onecycle"):
        problems.append(f"--scheduler {args.scheduler!r} is not 'default' or 'onecycle'")
    if problems:
        p.error("; ".join(problems))
    return args


# ------------------------------------------------------------------------------------ data
def load_data(args) -> dict:
    """Tensors of the chosen data set: float images (normalised like the authors' transforms)
    and int64 labels, subsets applied."""
    if args.data_root is None:
        raise UserError(f"--data {args.data} needs --data_root DIR (nothing is downloaded)")
    root = Path(args.data_root)
    if not root.exists():
        raise UserError(f"--data_root {root} does not exist")
    from experiments.data.cifar import DatasetError

    try:
        if args.data == "Mnist":
            from experiments.data.mnist import load_mnist

            (xtr, ytr), (xte, yte) = load_mnist(root, True), load_mnist(root, False)
            mean = std = None  # the authors use ToTensor only
        else:
            from experiments.data import cifar

            loader = cifar.load_cifar10 if args.data == "Cifar10" else cifar.load_cifar100
            (xtr, ytr), (xte, yte) = loader(root, True), loader(root, False)
            mean, std = (
                (cifar.CIFAR10_MEAN, (0.2471, 0.2435, 0.2616))
                if args.data == "Cifar10"
                else ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))
            )  # the authors' constants
    except (DatasetError, FileNotFoundError, ValueError) as e:
        raise UserError(str(e).splitlines()[0]) from None
    g = torch.Generator().manual_seed(args.seed)
    if args.train_subset is not None and args.train_subset < len(ytr):
        keep = torch.randperm(len(ytr), generator=g)[: args.train_subset].sort().values
        xtr, ytr = xtr[keep], ytr[keep]
    if args.test_subset is not None and args.test_subset < len(yte):
        xte, yte = xte[: args.test_subset], yte[: args.test_subset]
    return {
        "x_train": xtr,
        "y_train": ytr.long(),
        "x_test": xte,
        "y_test": yte.long(),
        "mean": mean,
        "std": std,
        "augment": args.data == "Cifar100",
    }  # the authors augment CIFAR-100 only


def _prepare(images: torch.Tensor, data: dict) -> torch.Tensor:
    x = images.float() / 255.0
    if data["mean"] is not None:
        from experiments.data.cifar import normalize

        x = normalize(x, data["mean"], data["std"])
    return x


# ------------------------------------------------------------------------------------ training parts
def loss_value(args, outputs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The authors' losses: ``mse_loss`` is the mean over batch × classes of (out − one_hot)²;
    on CIFAR-100 it is ``mean((k·one_hot + 1)·(out − M·one_hot)²)``; ``ce_loss`` is the
    cross-entropy (with one-hot targets, i.e. the usual one)."""
    one_hot = F.one_hot(labels, num_classes).to(outputs.dtype)
    if args.loss_fn == "ce_loss":
        return F.cross_entropy(outputs, one_hot)
    if args.data == "Cifar100":
        k, M = args.k_M
        return ((k * one_hot + 1) * (outputs - M * one_hot) ** 2).mean()
    return F.mse_loss(outputs, one_hot)


def make_optimizer(args, model):
    """The authors' optimizer settings: SGD and LARS with momentum 0.9 and weight decay 1e-4,
    LAMB and AdamW with their defaults (AdamW for the ViT on CIFAR-10: weight decay 0.1 on
    the weights of linear and convolutional layers only)."""
    from .optimizers import LAMB, LARS

    lr = args.lr_setting[0]
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    if args.optimizer == "lars":
        return LARS(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    if args.optimizer == "lamb":
        return LAMB(model.parameters(), lr=lr)
    if args.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    if args.model == "vit" and args.data == "Cifar10":
        decay = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        ids = {id(p) for p in decay}
        rest = [p for p in model.parameters() if id(p) not in ids]
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=lr
        )
    return torch.optim.AdamW(model.parameters(), lr=lr)


def epoch_lr(args, epoch: int) -> float:
    """Learning rate of ``epoch`` (0-based), as the authors' README describes it: linear warm-up
    from lr_warm to lr_max over epoch_warm epochs, then lr_max · decay_rate^⌊(epoch −
    epoch_warm) / decay_stepsize⌋."""
    lr_max, warm, lr_warm = args.lr_setting[0], int(args.lr_setting[1]), args.lr_setting[2]
    if epoch < warm:
        return lr_warm + (lr_max - lr_warm) * epoch / max(warm - 1, 1)
    return lr_max * args.decay_rate ** ((epoch - warm) // args.decay_stepsize)


def output_jacobian_norm(model, x: torch.Tensor, batch_size: int) -> float:
    """``‖∂f(X)/∂θ‖_F`` over the test set: one backward pass per example and output (slow)."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = 0.0
    for a in range(0, len(x), batch_size):
        for xi in x[a : a + batch_size]:
            out = model(xi[None].to(params[0].device))[0]
            for c in range(out.shape[0]):
                g = torch.autograd.grad(out[c], params, retain_graph=c < out.shape[0] - 1, allow_unused=True)
                total += sum(float(gi.pow(2).sum()) for gi in g if gi is not None)
    return math.sqrt(total)


@torch.no_grad()
def evaluate(model, x: torch.Tensor, y: torch.Tensor, batch_size: int, features: bool = False):
    """Outputs (float64), accuracy and optionally the penultimate features on ``x``; eval mode."""
    model.eval()
    device = next(model.parameters()).device
    outs, feats = [], []
    for a in range(0, len(x), batch_size):
        xb = x[a : a + batch_size].to(device)
        if features:
            h = model.features(xb)
            feats.append(h.double().cpu())
            outs.append(model.fc(h).double().cpu())
        else:
            outs.append(model(xb).double().cpu())
    out = torch.cat(outs)
    acc = float((out.argmax(1) == y).double().mean())
    return out, acc, (torch.cat(feats) if features else None)


# ------------------------------------------------------------------------------------ run folder
def run_folder(args) -> Path:
    if args.path != "none":
        path = Path(args.path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise UserError(f"--path {path} already exists and is not an empty folder: choose a new one")
        path.mkdir(parents=True, exist_ok=True)
        return path
    lr_max, warm, lr_warm = args.lr_setting
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    name = (
        f"{args.model}-{args.data}-init{args.init_scale:g}-{args.loss_fn}-{args.optimizer}-bs{args.batch_size}"
        f"-ep{args.num_epoch}-lr{lr_max:g}-warm{warm:g}-{lr_warm:g}-decay{args.decay_rate:g}per"
        f"{args.decay_stepsize}-seed{args.seed}-run{args.num_run}-{stamp}"
    )
    base = Path("runs/analysis/train")
    base.mkdir(parents=True, exist_ok=True)
    for k in range(1000):
        path = base / (name if k == 0 else f"{name}-{k}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise UserError(f"could not create a new run folder under {base}")


def _atomic_write_text(path: Path, text: str) -> Path:
    atomic_write(path, lambda fh: fh.write(text.encode()))
    return path


def _plots(out: Path, record: dict, m: int, title: str):
    from inf.analysis.decomposition import _plt, _save

    plt = _plt()
    beta = np.asarray(record["beta"])
    epochs = np.arange(beta.shape[0])
    fig, ax = plt.subplots(figsize=(12, 6.5))
    for i in range(min(5, m)):
        ax.plot(epochs, beta[:, i], lw=2.2, label=rf"$\beta_{{{i + 1}}}$", color=plt.cm.tab10(i))
    ax.set_xlabel("epoch (0: initialisation)")
    ax.set_ylabel(r"$\beta_i(\theta_t)$")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, out / "beta.png", 100)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(14, 5.5))
    a1.plot(
        np.arange(1, len(record["train_loss"]) + 1),
        record["train_loss"],
        lw=2,
        label="train loss (sum over batches)",
    )
    a1.set_yscale("log")
    a1.set_xlabel("epoch")
    a1.set_ylabel("loss")
    a1.legend()
    a2.plot(np.arange(1, len(record["train_acc"]) + 1), record["train_acc"], lw=2, label="train accuracy")
    a2.plot(np.arange(len(record["test_acc"])), record["test_acc"], lw=2, label="test accuracy")
    a2.set_xlabel("epoch")
    a2.set_ylabel("accuracy")
    a2.set_ylim(0, 1.02)
    a2.legend()
    for a in (a1, a2):
        a.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, out / "curves.png", 100)


# ------------------------------------------------------------------------------------ main
def train(args) -> dict:
    from tqdm.auto import tqdm

    from inf.analysis.decomposition import atomic_savez, function_basis

    from .models import build_model, scale_init

    if args.call_wandb:
        log.warning("--call_wandb: wandb is not used by this harness; ignoring it")
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    data = load_data(args)
    channels, num_classes, size = DATASETS[args.data]
    if tuple(data["x_train"].shape[1:]) != (channels, size, size):
        raise UserError(
            f"{args.data} images should be {channels}×{size}×{size}, "
            f"the files hold {tuple(data['x_train'].shape[1:])}"
        )
    try:
        model = build_model(args.model, channels, num_classes, size, args.width_mult)
    except ValueError as e:
        raise UserError(str(e)) from None
    scale_init(model, args.init_scale)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as the authors' code
    model.to(device)
    opt = make_optimizer(args, model)
    out = run_folder(args)
    log.info("run folder %s", out)

    x_test = _prepare(data["x_test"], data)
    y_test = data["y_test"]
    y_train = data["y_train"]
    n_train = len(y_train)
    steps_per_epoch = math.ceil(n_train / args.batch_size)
    sched = None
    if args.scheduler == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=args.lr_setting[0], epochs=args.num_epoch, steps_per_epoch=steps_per_epoch
        )
    g = torch.Generator().manual_seed(args.seed)
    eval_bs = max(args.batch_size, 256)

    f0, acc0, _ = evaluate(model, x_test, y_test, eval_bs)
    outputs = [f0.float()]
    record = {"lr": [], "train_loss": [], "train_acc": [], "test_acc": [acc0], "output_grad_norm": []}
    if args.gradient:
        record["output_grad_norm"].append(output_jacobian_norm(model, x_test, eval_bs))
    t0 = time.time()
    bar = tqdm(range(args.num_epoch), desc=f"{args.model} on {args.data}", disable=not args.progress)
    for epoch in bar:
        if sched is None:
            lr = epoch_lr(args, epoch)
            for group in opt.param_groups:
                group["lr"] = lr
        record["lr"].append(opt.param_groups[0]["lr"])
        model.train()
        order = torch.randperm(n_train, generator=g)
        total_loss, correct = 0.0, 0
        for a in range(0, n_train, args.batch_size):
            idx = order[a : a + args.batch_size]
            xb = data["x_train"][idx]
            if data["augment"]:
                from experiments.data.cifar import random_crop_flip

                xb = random_crop_flip(xb, g)
            xb = _prepare(xb, data).to(device)
            yb = y_train[idx].to(device)
            opt.zero_grad()
            logits = model(xb)
            loss = loss_value(args, logits, yb, num_classes)
            if not torch.isfinite(loss):
                raise UserError(
                    f"the loss became {float(loss)} in epoch {epoch + 1}: lower the learning rate "
                    f"(--lr_setting) or --init_scale"
                )
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total_loss += float(loss.detach())
            correct += int((logits.argmax(1) == yb).sum())  # predictions in train mode, as the authors
        record["train_loss"].append(total_loss)
        record["train_acc"].append(correct / n_train)
        last = epoch == args.num_epoch - 1
        f, acc, feats = evaluate(model, x_test, y_test, eval_bs, features=last)
        outputs.append(f.float())
        record["test_acc"].append(acc)
        if args.gradient:
            model.eval()
            record["output_grad_norm"].append(output_jacobian_norm(model, x_test, eval_bs))
        if args.progress:
            bar.set_postfix(loss=f"{total_loss:.3g}", test_acc=f"{acc:.3f}")
    seconds = time.time() - t0

    try:
        basis = function_basis(feats, model.fc.weight.detach().cpu())
    except ValueError as e:
        raise UserError(
            f"no basis from the final network ({e}): dead units or a diverged run; "
            f"try another --seed, --init_scale or learning rate"
        ) from None
    F_out = torch.stack(outputs)  # epochs + 1 × N × C
    beta = basis.coefficients(F_out.double())
    record["beta"] = beta.tolist()
    record["s"] = basis.s.tolist()
    record["feature_singular_values"] = basis.S[:50].tolist()
    atomic_savez(
        out / "trajectory.npz",
        beta=beta.numpy(),
        s=basis.s.numpy(),
        feature_singular_values=basis.S.numpy(),
        lr=np.array(record["lr"]),
        train_loss=np.array(record["train_loss"]),
        train_acc=np.array(record["train_acc"]),
        test_acc=np.array(record["test_acc"]),
        output_grad_norm=np.array(record["output_grad_norm"]),
    )
    if args.log == "detail":
        atomic_savez(
            out / "detail.npz",
            features=feats.numpy(),
            test_outputs=F_out.numpy(),
            readout_weight=model.fc.weight.detach().cpu().numpy(),
        )
    summary = {
        "args": vars(args),
        "run_folder": str(out),
        "seconds": seconds,
        "n_train": n_train,
        "n_test": len(y_test),
        "final_beta_minus_s": float((beta[-1] - basis.s).abs().max()),
        **record,
    }
    _atomic_write_text(out / "metrics.json", json.dumps(summary, indent=1))
    _plots(
        out,
        record,
        len(basis),
        f"{args.model} on {args.data} ({args.optimizer}, {args.loss_fn}): "
        f"coefficients on the final network's basis",
    )
    log.info(
        "%d epochs in %.0f s; final test accuracy %.3f; β_1..5 at init %s, final %s",
        args.num_epoch,
        seconds,
        record["test_acc"][-1],
        np.round(beta[0, :5].numpy(), 4).tolist(),
        np.round(beta[-1, :5].numpy(), 4).tolist(),
    )
    log.info("wrote %s", out)
    return summary


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return train(args)
    except UserError as e:
        if __name__ == "__main__" or argv is None:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        raise


if __name__ == "__main__":
    main()
