"""Train a ResNet-18 or ViT on CIFAR-10/100, with or without TrAct on the input layer.

Accepts the TrAct paper's Figure-1 reproduction lines unchanged, for example::

    python -m experiments.tract.train_cifar --method normal --n_epochs 100 --lr 0.08 \\
        --optim sgd_w_momentum_cosine --seed 0
    python -m experiments.tract.train_cifar --method tract --l 0.1 --n_epochs 100 --lr 0.08 \\
        --optim sgd_w_momentum_cosine --seed 0

Protocol (as in the official script): cross-entropy, batches of 128 drawn without replacement
with the last incomplete batch dropped, the learning rate annealed with a cosine per step down
to 0 at the last step (``*_cosine``), standard CIFAR augmentation (random 32×32 crop of the
4-pixel zero-padded image, random horizontal flip) unless ``--no_data_aug``, per-channel
normalization. ``--method tract`` wraps the stem convolution ``conv1`` (ResNet) or the patch
embedding ``patch_embed`` (ViT) with ``inf.tract.TrAct(layer, l=L)``.

Outputs in ``--out`` (default ``runs/tract/<dataset>_<model>_<method>_<optim>_lr<lr>_e<epochs>
_s<seed>``): ``metrics.csv`` and ``metrics.json`` (the configuration and, per epoch, train
loss/accuracy, test loss/accuracy, learning rate and times) and ``checkpoint.pt`` (model,
optimizer, scheduler, RNG states, epoch and the metrics so far), all rewritten atomically after
every epoch. Running the same command again resumes from the checkpoint; on CPU the resumed run
is bit-for-bit the uninterrupted one (on GPU, up to cuDNN's nondeterministic kernels).

``--compare RUN_DIR [RUN_DIR ...]`` instead plots test accuracy against epochs for finished or
running runs side by side (see ``experiments.tract.plot``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.contrib.logging import logging_redirect_tqdm

from experiments import cli, runs
from experiments.cli import ConfigError
from experiments.data.cifar import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    load_cifar10,
    load_cifar100,
    normalize,
    random_crop_flip,
)
from experiments.tract.models import FIRST_LAYER, apply_tract, build_model
from experiments.training import rng_state, set_rng_state

__all__ = ["build_parser", "main", "ConfigError", "load_data", "default_run_dir"]

log = logging.getLogger("experiments.tract.train_cifar")

PROG = "python -m experiments.tract.train_cifar"
PROGRAM = "tract.train_cifar"
CHECKPOINT = "checkpoint.pt"
METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
METRIC_COLUMNS = (
    "epoch",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "lr",
    "train_time_s",
    "eval_time_s",
)
# options that define what is trained; a checkpoint only resumes a run that agrees on all
RUN_DEFINING = (
    "dataset",
    "model",
    "width_mult",
    "method",
    "l",
    "n_epochs",
    "lr",
    "optim",
    "weight_decay",
    "batch_size",
    "seed",
    "no_data_aug",
    "train_subset",
    "test_subset",
)
SGD_MOMENTUM = 0.9
CURVE_PANELS = (("loss", ("train_loss", "test_loss")), ("accuracy", ("train_acc", "test_acc")))


# --------------------------------------------------------------------------- command line


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(
        prog=PROG,
        description="Train ResNet-18 / ViT on CIFAR-10/100 normally or with TrAct on the "
        "first layer (the TrAct paper's Figure-1 experiment).",
    )
    p.add_argument(
        "-m",
        "--method",
        choices=("normal", "tract"),
        default=None,
        help="normal training, or TrAct on the input layer (required unless --compare)",
    )
    p.add_argument(
        "--l",
        type=float,
        default=0.1,
        help="TrAct's regularization strength lambda (used with --method tract)",
    )
    p.add_argument("--n_epochs", type=cli.positive_int, default=100, help="epochs to train")
    p.add_argument("--lr", type=cli.positive_float, default=0.1, help="peak learning rate")
    p.add_argument(
        "--optim",
        choices=("adam", "adam_cosine", "sgd_w_momentum_cosine"),
        default="sgd_w_momentum_cosine",
        help="adam: Adam at a constant lr; adam_cosine: Adam with the lr annealed "
        "by a per-step cosine to 0; sgd_w_momentum_cosine: SGD with momentum "
        f"{SGD_MOMENTUM} (no Nesterov) and the same cosine schedule",
    )
    p.add_argument(
        "--weight_decay",
        type=cli.nonnegative_float,
        default=0.0,
        help="L2 weight decay added to the gradient, for every optimizer; the "
        "official TrAct script uses none (0), 5e-4 is the usual CIFAR value",
    )
    p.add_argument("--batch_size", type=cli.positive_int, default=128, help="training batch size")
    p.add_argument(
        "--dataset",
        choices=("cifar10", "cifar100", "digits"),
        default="cifar10",
        help="digits: scikit-learn's bundled 8x8 digits enlarged to 32x32 (for quick runs without CIFAR)",
    )
    p.add_argument(
        "--data",
        default="./data",
        help="folder holding cifar-10-batches-py/ or cifar-100-python/ (or their "
        ".tar.gz), the folder itself, or the archive",
    )
    p.add_argument(
        "--model",
        choices=sorted(FIRST_LAYER),
        default="resnet18",
        help="CIFAR ResNet-18, or the 12-layer width-128 ViT with 4x4 patches",
    )
    p.add_argument(
        "--width_mult",
        type=cli.positive_float,
        default=1.0,
        help="multiply every layer width (ResNet channels, ViT token width) by this",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the initialization, shuffling and augmentation")
    p.add_argument("--no_data_aug", action="store_true", help="no random crop / horizontal flip")
    p.add_argument(
        "--train_subset",
        type=int,
        default=None,
        metavar="N",
        help="train on a fixed random subset of N training images",
    )
    p.add_argument(
        "--test_subset",
        type=int,
        default=None,
        metavar="N",
        help="evaluate on a fixed random subset of N test images",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:K")
    p.add_argument("--no_cudnn", action="store_true", help="disable cuDNN")
    cli.add_threads_arg(p)
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="output folder (default: runs/tract/<name from the options>)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh even if --out holds a checkpoint (without it the same "
        "command resumes the run, or prints the final metrics of a finished one)",
    )
    p.add_argument(
        "--stop_after_epochs",
        type=cli.positive_int,
        default=None,
        metavar="K",
        help="leave after K epochs of this invocation (checkpoint kept; run the "
        "same command again to continue), e.g. for time-limited jobs",
    )
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--compare",
        nargs="+",
        default=None,
        metavar="RUN_DIR",
        help="do not train: plot test accuracy against epochs for these runs",
    )
    p.add_argument(
        "--plot", default="tract_compare.png", metavar="PNG", help="where --compare writes its figure"
    )
    return p


def default_run_dir(args: argparse.Namespace) -> Path:
    method = f"tract_l{args.l:g}" if args.method == "tract" else args.method
    name = f"{args.dataset}_{args.model}_{method}_{args.optim}_lr{args.lr:g}_e{args.n_epochs}"
    if args.width_mult != 1.0:
        name += f"_w{args.width_mult:g}"
    if args.train_subset is not None:
        name += f"_n{args.train_subset}"
    return Path("runs") / "tract" / f"{name}_s{args.seed}"


def _resolve_device(name: str) -> torch.device:
    return cli.resolve_device_flag(name, "--device")


# --------------------------------------------------------------------------- data


def _subset(images, labels, n, which: str):
    if n is None:
        return images, labels
    if not 0 < n <= len(labels):
        raise ConfigError(f"--{which}_subset {n} — give a number between 1 and {len(labels)}")
    # a fixed subset, the same for every seed and method, so runs stay comparable
    keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1234))[:n]
    return images[keep], labels[keep]


def load_data(args):
    """``(train_x, train_y, test_x, test_y, num_classes, mean, std)`` on the CPU, uint8 images."""
    if args.dataset == "digits":
        from experiments.data.digits import load_digits_split

        train_x, train_y, test_x, test_y = load_digits_split()
        pixels = train_x.float().div(255.0)
        mean = tuple(pixels.mean(dim=(0, 2, 3)).tolist())
        std = tuple(pixels.std(dim=(0, 2, 3)).tolist())
        num_classes = 10
    else:
        loader, num_classes, mean, std = {
            "cifar10": (load_cifar10, 10, CIFAR10_MEAN, CIFAR10_STD),
            "cifar100": (load_cifar100, 100, CIFAR100_MEAN, CIFAR100_STD),
        }[args.dataset]
        train_x, train_y = loader(args.data, train=True)
        test_x, test_y = loader(args.data, train=False)
    train_x, train_y = _subset(train_x, train_y, args.train_subset, "train")
    test_x, test_y = _subset(test_x, test_y, args.test_subset, "test")
    return train_x, train_y, test_x, test_y, num_classes, mean, std


# --------------------------------------------------------------------------- training


def _make_optimizer(args, model, steps_per_epoch: int):
    params = model.parameters()
    if args.optim.startswith("adam"):
        optimizer = torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=args.lr, momentum=SGD_MOMENTUM, weight_decay=args.weight_decay)
    scheduler = None
    if args.optim.endswith("_cosine"):
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=args.n_epochs * steps_per_epoch
        )
    return optimizer, scheduler


def _train_epoch(model, optimizer, scheduler, data, generator, args, device, progress):
    train_x, train_y, mean, std = data
    model.train()
    batch = args.batch_size
    steps = len(train_y) // batch
    order = torch.randperm(len(train_y), generator=generator).to(device)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    bar = cli.progress_bar(range(steps), desc="  train", enabled=progress, nested=True)
    for step in bar:
        idx = order[step * batch : (step + 1) * batch]
        x, y = train_x[idx], train_y[idx]
        if not args.no_data_aug:
            x = random_crop_flip(x, generator)
        logits = model(normalize(x, mean, std))
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss.detach() * batch
        correct += (logits.argmax(1) == y).sum()
    n = steps * batch
    return loss_sum.item() / n, correct.item() / n


@torch.no_grad()
def _evaluate(model, images, labels, mean, std, batch: int):
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(labels), batch):
        x = normalize(images[start : start + batch], mean, std)
        y = labels[start : start + batch]
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    return loss_sum / len(labels), correct / len(labels)


# --------------------------------------------------------------------------- files


def _write_metrics(out: Path, config: dict, history: list[dict]) -> None:
    summary = {}
    if history:
        best = max(history, key=lambda row: row["test_acc"])
        summary = {
            "epochs_done": len(history),
            "final_test_acc": history[-1]["test_acc"],
            "best_test_acc": best["test_acc"],
            "best_epoch": best["epoch"],
            "train_time_s": sum(row["train_time_s"] for row in history),
        }
    doc = {"config": config, "summary": summary, "epochs": history}
    runs.write_json(out / METRICS_JSON, doc)
    runs.write_csv(out / METRICS_CSV, history, METRIC_COLUMNS)
    if history:
        runs.plot_curves(history, out / "curves.png", f"{out.name}", panels=CURVE_PANELS)


def _run_config(args) -> dict:
    config = {key: getattr(args, key) for key in RUN_DEFINING}
    if args.method != "tract":
        config["l"] = None
    return config


def _check_resumable(saved: dict, config: dict, out: Path) -> None:
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r}, now {config[k]!r}"
        for k in RUN_DEFINING
        if saved.get(k) != config[k]
    ]
    if diffs:
        raise ConfigError(
            f"{out / CHECKPOINT} belongs to a different run ({'; '.join(diffs)}) — use another "
            f"--out, or --overwrite to discard it"
        )


# --------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    """Run the program; returns the contents of ``metrics.json`` (or the comparison summary)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.setLevel(logging.INFO)
    if args.compare:
        from experiments.tract.plot import compare_runs

        cli.apply_threads(args.threads)
        return compare_runs(args.compare, args.plot)
    if args.method is None:
        parser.error("--method is required (normal or tract) unless --compare is given")
    if args.method == "tract" and not (math.isfinite(args.l) and args.l > 0):
        parser.error(f"--l {args.l} — give TrAct's lambda as a positive number")
    with logging_redirect_tqdm():  # log lines through tqdm.write, between the bars
        return _train(args)


def _train(args) -> dict:
    device = _resolve_device(args.device)
    if args.no_cudnn:
        torch.backends.cudnn.enabled = False
    cli.apply_threads(args.threads)
    out = Path(args.out) if args.out else default_run_dir(args)
    progress = not args.no_progress

    train_x, train_y, test_x, test_y, num_classes, mean, std = load_data(args)
    steps_per_epoch = len(train_y) // args.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"{len(train_y)} training images are fewer than one batch of "
            f"{args.batch_size} — lower --batch_size or raise --train_subset"
        )
    train_x, train_y = train_x.to(device), train_y.to(device)
    test_x, test_y = test_x.to(device), test_y.to(device)

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    model = build_model(args.model, num_classes, args.width_mult)
    if args.method == "tract":
        apply_tract(model, args.model, args.l)
    model.to(device)
    optimizer, scheduler = _make_optimizer(args, model, steps_per_epoch)
    # shuffling and augmentation draw from their own generator, whose state is checkpointed
    generator = torch.Generator().manual_seed(args.seed + 2**40)

    config = _run_config(args)
    out.mkdir(parents=True, exist_ok=True)
    runs.clean_stale_temporaries(out)  # what a crash during a write left behind
    history: list[dict] = []
    start_epoch = 0
    ckpt_path = out / CHECKPOINT
    if ckpt_path.exists() and not args.overwrite:
        ckpt = runs.load_checkpoint(ckpt_path, flag="--out")
        if not isinstance(ckpt.get("config"), dict):
            raise ConfigError(
                f"--out {ckpt_path} is not a checkpoint of this program — use "
                f"another --out, or --overwrite to discard it"
            )
        _check_resumable(ckpt["config"], config, out)
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(ckpt["scheduler"])
            set_rng_state(ckpt["rng"], generator, device)
            history, start_epoch = list(ckpt["metrics"]), int(ckpt["epoch"])
        except (RuntimeError, KeyError, ValueError, TypeError) as err:
            raise ConfigError(
                f"--out {ckpt_path} cannot be resumed ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}) — pass "
                f"--overwrite to start afresh"
            ) from None
        log.info("resuming %s after epoch %d of %d", out, start_epoch, args.n_epochs)
    log.info(
        "%s: %s %s on %s (%d train / %d test images, %d steps per epoch), %s, %d params",
        out,
        args.model,
        args.method,
        args.dataset,
        len(train_y),
        len(test_y),
        steps_per_epoch,
        device,
        sum(p.numel() for p in model.parameters()),
    )

    data = (train_x, train_y, mean, std)
    last_epoch = args.n_epochs
    if args.stop_after_epochs is not None:
        last_epoch = min(last_epoch, start_epoch + args.stop_after_epochs)
    epochs = cli.progress_bar(
        range(start_epoch, last_epoch),
        desc=out.name,
        initial=start_epoch,
        total=args.n_epochs,
        enabled=progress,
    )
    for epoch in epochs:
        began = time.perf_counter()
        train_loss, train_acc = _train_epoch(
            model, optimizer, scheduler, data, generator, args, device, progress
        )
        trained = time.perf_counter()
        test_loss, test_acc = _evaluate(model, test_x, test_y, mean, std, args.batch_size)
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                "train_acc": train_acc,
                "test_loss": test_loss,
                "test_acc": test_acc,
                "lr": optimizer.param_groups[0]["lr"],
                "train_time_s": trained - began,
                "eval_time_s": time.perf_counter() - trained,
            }
        )
        state = {
            "program": PROGRAM,
            "config": config,
            "epoch": epoch + 1,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_state(generator, device),
            "metrics": history,
        }
        runs.save_checkpoint(ckpt_path, state)
        _write_metrics(out, config, history)
        epochs.set_postfix(train_acc=f"{train_acc:.3f}", test_acc=f"{test_acc:.3f}")
        log.info(
            "epoch %d/%d  train loss %.4f acc %.4f  test loss %.4f acc %.4f  (%.1fs)",
            epoch + 1,
            args.n_epochs,
            train_loss,
            train_acc,
            test_loss,
            test_acc,
            trained - began,
        )
    epochs.close()
    finished_before = start_epoch >= args.n_epochs
    _write_metrics(out, config, history)
    doc = json.loads((out / METRICS_JSON).read_text())
    print(_result_line(doc, out, finished_before), flush=True)
    return doc


def _result_line(doc: dict, out: Path, finished_before: bool) -> str:
    s = doc.get("summary") or {}
    if not s:
        return f"{out}: no epochs trained yet"
    text = (
        f"{out}: {s['epochs_done']} epochs, final test accuracy "
        f"{100 * s['final_test_acc']:.2f}% (best {100 * s['best_test_acc']:.2f}% at epoch "
        f"{s['best_epoch']})"
    )
    if finished_before:
        text += " — the run was already finished (--overwrite trains it again)"
    return text


def _cli(argv=None) -> None:
    cli.run_main(main, PROG, argv)


if __name__ == "__main__":
    _cli()
