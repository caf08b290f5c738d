"""Kernel baselines and feature-kernel tests on CIFAR-10, by kernel ridge regression.

Modes (any combination; each prints its test accuracy):

* ``--gp``: the NNGP of a ReLU MLP with ``--depth`` hidden layers (``--varw``, ``--varb``),
  experiments.kernels.mlp_nngp;
* ``--ntk``: its NTK (experiments.kernels.mlp_ntk);
* ``--test-kernel --load-model-path CKPT``: the feature kernel of the last hidden layer of a
  net trained by experiments.cifar10.cifar10mlp or experiments.imagenet.transfer_imagenet
  (a ``checkpoint.pt`` written with ``--save-model``). For an infinite net it is
  ``s s' F00(ĝ·ĝ')`` of the preactivation ``g`` entering the output layer
  (experiments.kernels.feature_kernel); for a finite π-net or μP net the empirical kernel
  ``φ(h)·φ(h')``. ``--width n`` samples a finite π-net of width n from an infinite
  checkpoint and uses its empirical kernel. A 10-class checkpoint is also evaluated
  directly on the test set.

Regression: targets ``onehot − 0.1``; ridge ``λ = --kernel-reg × mean(diag K_train)``; the
N×N training kernel is built and Cholesky-factorised block by block in float32 (10 GB for
the full 50 000 training images; ``--krr-method cg`` needs almost no memory but recomputes
the kernel every iteration). ``--train-size N`` regresses on a fixed subset of N training
images instead (nested across N, identical in every program), ``--test-size`` likewise.

Results go to stdout (one line per kernel), progress and notes to stderr. With ``--save-dir
DIR`` the results are written to ``DIR/cifar10test_<modes>_d<depth>_<hash of the options>/
kernel_results.json``: the NNGP and the NTK lines of the paper, both given ``--save-dir
./output/``, land in different folders; a folder that holds results is reused only with
``--overwrite`` (otherwise its results are printed again).

The original command lines are accepted, e.g.::

    python -m experiments.cifar10.cifar10test --varb 0 --depth 2 --kernel-reg 1e-4 --gp \\
        --float --batch-size 2000 --test-batch-size 2000 --save-dir ./output/
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from experiments import cli, runs
from experiments.cli import ConfigError
from experiments.data.images import ImageSet, load_cifar10_set
from experiments.feature_kernels import feature_kernel_accuracy
from experiments.kernels import kernel_ridge_regression, make_mlp_kernel
from experiments.options import (
    OPERATIONAL_KEYS,
    add_krr_args,
    check_args,
    device_from_args,
    seed_everything,
    setup_logging,
)
from experiments.training import Trainer, checkpoint_model

__all__ = ["build_parser", "main"]

log = logging.getLogger("experiments")
PROGRAM = "cifar10test"
PROG = "python -m experiments.cifar10.cifar10test"
RESULTS_JSON = "kernel_results.json"


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(
        prog=PROG,
        description="CIFAR-10 test accuracy of kernel ridge regression with the NNGP (--gp) or "
        "NTK (--ntk) of a deep ReLU MLP, or with the feature kernel of a trained "
        "π-net / μP net (--test-kernel --load-model-path CKPT).",
    )
    modes = p.add_argument_group("what to test")
    modes.add_argument("--gp", action="store_true", help="NNGP kernel of a ReLU MLP")
    modes.add_argument("--ntk", action="store_true", help="NTK of a ReLU MLP")
    modes.add_argument(
        "--test-kernel", action="store_true", help="feature kernel of the net in --load-model-path"
    )
    modes.add_argument(
        "--load-model-path",
        default=None,
        metavar="CKPT",
        help="checkpoint.pt of cifar10mlp / transfer_imagenet (or its folder)",
    )
    modes.add_argument(
        "--width",
        type=int,
        default=None,
        help="with an infinite checkpoint: sample a finite π-net of this width and use its empirical kernel",
    )
    mlp = p.add_argument_group("MLP kernels")
    mlp.add_argument(
        "--depth",
        type=cli.nonnegative_int,
        default=2,
        help="hidden layers (ReLUs) of the MLP (a cifar10mlp net of --depth L has L+1 of them)",
    )
    mlp.add_argument(
        "--varw",
        type=cli.positive_float,
        default=2.0,
        help="weight variance σ_w² (times 1/fan-in); with --varb 0 it only scales "
        "the kernel, which the relative ridge ignores",
    )
    mlp.add_argument("--varb", type=cli.nonnegative_float, default=0.0, help="bias variance σ_b²")
    mlp.add_argument(
        "--ntk-variant",
        choices=("correct", "pilim"),
        default="correct",
        help="correct: the NTK of the ReLU MLP; pilim: the original library's "
        "formula, to reproduce its Table 1 number (see experiments.kernels)",
    )
    for name in ("--first-layer-lr-mult", "--last-layer-lr-mult", "--bias-lr-mult"):
        mlp.add_argument(
            name,
            type=float,
            default=1.0,
            help="accepted for the original command lines; the NTK here has every multiplier 1",
        )
    add_krr_args(p)
    data = p.add_argument_group("data and run")
    data.add_argument(
        "--data", default="./data", help="CIFAR-10 python version (folder or cifar-10-python.tar.gz)"
    )
    data.add_argument(
        "--train-size",
        type=int,
        default=None,
        metavar="N",
        help="regress on a fixed subset of N training images (default: all "
        "50 000, which needs a 10 GB kernel matrix)",
    )
    data.add_argument(
        "--test-size", type=int, default=None, metavar="N", help="test on a fixed subset of N test images"
    )
    data.add_argument(
        "--batch-size",
        type=cli.positive_int,
        default=None,
        help="kernel block size (default: --krr-block-size)",
    )
    data.add_argument(
        "--test-batch-size",
        type=cli.positive_int,
        default=500,
        help="batch size of the network passes that compute features",
    )
    data.add_argument(
        "--cuda", action="store_true", help="compute on the GPU (an error on a machine without one)"
    )
    data.add_argument(
        "--float",
        action="store_true",
        help="accepted for the original command lines (kernels are computed in "
        "float64 blocks and factorised in float32 unless --krr-float64)",
    )
    data.add_argument("--seed", type=int, default=1, help="seed (for --width sampling)")
    data.add_argument(
        "--save-dir",
        default=None,
        metavar="DIR",
        help=f"write {RESULTS_JSON} into this run's own subfolder "
        f"DIR/cifar10test_<modes>_d<depth>_<hash of the options>",
    )
    data.add_argument(
        "--overwrite", action="store_true", help="recompute even if the run folder already holds results"
    )
    data.add_argument("--human", action="store_true", help="accepted; output is always text")
    data.add_argument(
        "--no-progress", "--quiet", dest="no_progress", action="store_true", help="no progress bars"
    )
    cli.add_threads_arg(data)
    return p


def main(argv=None) -> dict:
    """Run the requested tests; returns ``{"config": …, "results": [{mode, test_acc, …}]}``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    if not (args.gp or args.ntk or args.test_kernel):
        parser.error("choose at least one of --gp, --ntk, --test-kernel")
    if args.test_kernel and not args.load_model_path:
        parser.error("--test-kernel needs --load-model-path CKPT")
    if args.ntk and any(
        m != 1.0 for m in (args.first_layer_lr_mult, args.last_layer_lr_mult, args.bias_lr_mult)
    ):
        parser.error(
            "--ntk supports only learning-rate multipliers of 1 (the plain NTK) — drop the multipliers"
        )
    if args.batch_size is not None:
        args.krr_block_size = args.batch_size
    setup_logging()
    with logging_redirect_tqdm():
        return _run(args)


def run_folder_name(args) -> str:
    """``cifar10test_<modes>_d<depth>_<hash>``; the hash covers every option that changes a
    result (the checkpoint's path included)."""
    modes = [m for m, on in (("nngp", args.gp), ("ntk", args.ntk), ("feature", args.test_kernel)) if on]
    config = dict(vars(args))
    ignore = set(OPERATIONAL_KEYS) | {"batch_size"}
    if args.test_kernel:
        config["load_model_path"] = str(Path(args.load_model_path).resolve())
        ignore.discard("load_model_path")
    return runs.run_name(f"{PROGRAM}_{'+'.join(modes)}_d{args.depth}", config, ignore)


def _print_results(results: list[dict]) -> None:
    for row in results:
        row = {"train_size": "?", "test_size": "?", "time_s": float("nan"), "kernel_reg": float("nan"), **row}
        if row["mode"] in ("nngp", "ntk"):
            variant = (
                f", {row['ntk_variant']} formula" if row.get("ntk_variant", "correct") != "correct" else ""
            )
            print(
                f"{row['mode'].upper()}{variant} (depth {row['depth']}, varw {row['varw']:g}, varb "
                f"{row['varb']:g}, kernel reg {row['kernel_reg']:g}): test accuracy "
                f"{100 * row['test_acc']:.2f}% ({row['train_size']} train / {row['test_size']} "
                f"test images, {row['time_s']:.1f} s)",
                flush=True,
            )
        else:
            if row.get("net_test_acc") is not None:
                print(
                    f"{row['kind']} net from {row['checkpoint']} (epoch {row['epoch']}): test "
                    f"loss {row['net_test_loss']:.4f}, test accuracy "
                    f"{100 * row['net_test_acc']:.2f}%",
                    flush=True,
                )
            print(
                f"feature kernel of the {row['kind']} net from {row['checkpoint']} (epoch "
                f"{row['epoch']}, kernel reg {row['kernel_reg']:g}): test accuracy "
                f"{100 * row['test_acc']:.2f}% ({row['train_size']} train / "
                f"{row['test_size']} test images, {row['time_s']:.1f} s)",
                flush=True,
            )


def _run(args) -> dict:
    device = device_from_args(args)
    cli.apply_threads(args.threads)
    out = None
    if args.save_dir:
        name = run_folder_name(args)
        out = Path(args.save_dir) / name
        if (out / RESULTS_JSON).is_file() and not args.overwrite:
            try:
                doc = json.loads((out / RESULTS_JSON).read_text())
            except (OSError, ValueError):
                doc = None
            if doc is not None and doc.get("results"):
                print(f"{out} already holds these results (--overwrite to recompute):")
                _print_results(doc["results"])
                doc["run_dir"] = str(out)
                return doc
        out = runs.run_dir(args.save_dir, name, overwrite=True, marker=RESULTS_JSON)
    seed_everything(args.seed)
    ckpt = runs.load_checkpoint(args.load_model_path, flag="--load-model-path") if args.test_kernel else None
    train = load_cifar10_set(args.data, True, args.train_size).to(device)
    test = load_cifar10_set(args.data, False, args.test_size).to(device)
    progress = not args.no_progress and cli.is_tty()  # kernel bars: quiet in log files
    results = []
    for mode in ("nngp", "ntk"):
        if not getattr(args, "gp" if mode == "nngp" else "ntk"):
            continue
        began = time.perf_counter()
        variant = {} if args.ntk_variant == "correct" else {"ntk_variant": args.ntk_variant}
        try:
            kernel = make_mlp_kernel(mode, depth=args.depth, varw=args.varw, varb=args.varb, **variant)
        except ValueError as err:
            raise ConfigError(f"{err} — change --depth or --ntk-variant") from None
        acc = kernel_ridge_regression(
            kernel,
            train.inputs(),
            train.labels,
            test.inputs(),
            test.labels,
            num_classes=10,
            kernel_reg=args.kernel_reg,
            method=args.krr_method,
            dtype=torch.float64 if args.krr_float64 else None,
            block_size=args.krr_block_size,
            progress=progress,
        )
        results.append(
            {
                "mode": mode,
                "test_acc": acc,
                "depth": args.depth,
                "varw": args.varw,
                **({"ntk_variant": args.ntk_variant} if mode == "ntk" else {}),
                "varb": args.varb,
                "kernel_reg": args.kernel_reg,
                "train_size": len(train),
                "test_size": len(test),
                "time_s": time.perf_counter() - began,
            }
        )
        _print_results(results[-1:])
    if ckpt is not None:
        results += _test_kernel(args, ckpt, train, test, device, progress)
        _print_results(results[-1:])
    doc = {"config": vars(args), "results": results, "run_dir": None if out is None else str(out)}
    if out is not None:
        runs.write_json(out / RESULTS_JSON, doc)
        log.info("results written to %s", out / RESULTS_JSON)
    return doc


def _test_kernel(args, ckpt, train: ImageSet, test: ImageSet, device, progress) -> list[dict]:
    if ckpt["shape"]["d_in"] != train.dim:
        raise ConfigError(
            f"--load-model-path {args.load_model_path} takes "
            f"{ckpt['shape']['d_in']} inputs, not CIFAR-10's {train.dim} — pass a "
            f"checkpoint of cifar10mlp or transfer_imagenet"
        )
    net, kind, saved = checkpoint_model(ckpt, device, width=args.width)
    row = {
        "mode": "feature_kernel",
        "kind": kind,
        "epoch": ckpt["epoch"],
        "checkpoint": str(args.load_model_path),
        "width": args.width or saved.width,
    }
    if ckpt["shape"]["d_out"] == test.num_classes:
        # the original program reported the net's own test accuracy next to its kernel's
        stats = Trainer(
            argparse.Namespace(test_batch_size=args.test_batch_size, loss=saved.loss),
            net,
            None,
            device,
            torch.Generator(),
        ).evaluate(test)
        row.update(net_test_loss=stats["test_loss"], net_test_acc=stats["test_acc"])
    began = time.perf_counter()
    acc = feature_kernel_accuracy(net, kind, train, test, args, progress)
    row.update(
        test_acc=acc,
        kernel_reg=args.kernel_reg,
        train_size=len(train),
        test_size=len(test),
        time_s=time.perf_counter() - began,
    )
    return [row]


def _cli(argv=None) -> None:
    cli.run_main(main, PROG, argv)


if __name__ == "__main__":
    _cli()
