"""Train an infinite π-MLP, a finite π-net or a μP MLP on CIFAR-10 (the paper's Table 1).

Accepts the original command lines, e.g. the infinite π-net row::

    python -m experiments.cifar10.cifar10mlp --lr 1.0 --gclip-per-param --gclip 0.4 \\
        --lr-drop-ratio 0.15 --lr-drop-milestones 40 --scheduler multistep --wd 0.00001 \\
        --r 400 --batch-size 8 --epochs 50 --width 0 --cuda --seed 0 --depth 2 \\
        --bias-alpha 0.5 --first-layer-lr-mult 0.1 --last-layer-lr-mult 4.0 \\
        --first-layer-alpha 1.0 --last-layer-alpha 0.5 --no-apply-lr-mult-to-wd \\
        --save-dir ./output/ --data DIR

Networks: ``--width 0`` an infinite π-MLP (``inf.networks.InfMLP``); ``--width n`` a finite
π-net of width n sampled from a fresh infinite one (``FinPiMLPSample``), trained with
projected gradients; ``--width n --gaussian-init --no-Gproj`` the μP baseline (``MuMLP``).

Inputs: the CIFAR-10 "python version" read from ``--data`` (experiments.data.cifar; nothing
is downloaded). Each image is standardized per channel with the training-set pixel mean
(0.4914, 0.4822, 0.4465) and std (0.2470, 0.2435, 0.2616) and flattened to 3072 values
(channel-major); images are not rescaled to unit norm. ``--data-augment`` adds a random crop of
the 4-pixel zero-padded image and a random horizontal flip.

Precision: without ``--float`` an infinite net on CUDA stores its rows in float16 (the
original default); on CPU it runs in float32 and says so. See experiments.training.

Outputs (``--save-dir DIR``): the run's own folder ``DIR/cifar10mlp_<kind>_<r or width>_L<depth>
_s<seed>_<hash of the options>``, so runs with different options never overwrite each other;
in it metrics.csv / metrics.json / curves.png after every epoch and checkpoint.pt with
``--save-model`` (resume with ``--model-path RUN/checkpoint.pt``, evaluate with ``--model-path …
--evaluate-only``). Running a finished run's command again prints its final metrics;
``--overwrite`` trains it again. The final result line goes to stdout, progress to stderr.
"""

from __future__ import annotations

from tqdm.contrib.logging import logging_redirect_tqdm

from experiments import cli
from experiments.cli import ConfigError
from experiments.data.images import load_cifar10_set
from experiments.models import build_model
from experiments.options import (
    add_model_args,
    add_optim_args,
    add_run_args,
    check_args,
    device_from_args,
    model_spec,
    seed_everything,
    setup_logging,
)
from experiments.runs import load_checkpoint
from experiments.training import adopt_architecture, apply_precision, fit

__all__ = ["build_parser", "main"]

PROGRAM = "cifar10mlp"
PROG = "python -m experiments.cifar10.cifar10mlp"


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(
        prog=PROG,
        description="Train an infinite-width π-MLP (--width 0), a finite π-net (--width n) or "
        "a μP MLP (--width n --gaussian-init --no-Gproj) on CIFAR-10. Inputs: each "
        "channel standardized with the training-set pixel mean and std, then "
        "flattened to 3072 values; images are not rescaled to unit norm.",
    )
    p.add_argument(
        "--data",
        default="./data",
        help="CIFAR-10 python version: the cifar-10-batches-py/ folder, the folder "
        "holding it, or cifar-10-python.tar.gz",
    )
    p.add_argument(
        "--train-size",
        type=int,
        default=None,
        metavar="N",
        help="train on a fixed subset of N training images (nested across N)",
    )
    p.add_argument(
        "--test-size", type=int, default=None, metavar="N", help="evaluate on a fixed subset of N test images"
    )
    add_model_args(p, r=200, depth=1)
    add_optim_args(p)
    add_run_args(p)
    return p


def main(argv=None) -> dict:
    """Run the program; returns the metrics document (see experiments.training.fit)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    setup_logging()
    with logging_redirect_tqdm():
        return _run(args)


def _run(args) -> dict:
    device = device_from_args(args)
    cli.apply_threads(args.threads)
    ckpt = load_checkpoint(args.model_path, flag="--model-path", program=PROGRAM) if args.model_path else None
    if ckpt is not None and args.evaluate_only:
        adopt_architecture(args, ckpt)
    train = None if args.evaluate_only else load_cifar10_set(args.data, True, args.train_size)
    test = load_cifar10_set(args.data, False, args.test_size)
    if ckpt is not None and ckpt["shape"] != {"d_in": test.dim, "d_out": test.num_classes}:
        raise ConfigError(
            f"--model-path {args.model_path} holds a net with {ckpt['shape']} "
            f"inputs/outputs, not a CIFAR-10 classifier (3072 → 10) — pass a "
            f"cifar10mlp checkpoint"
        )
    seed_everything(args.seed)
    net = build_model(model_spec(args, test.dim, test.num_classes), device)
    precision = apply_precision(net, args, device)
    train = None if train is None else train.to(device)
    return fit(args, net, train, test.to(device), device, program=PROGRAM, precision=precision, ckpt=ckpt)


def _cli(argv=None) -> None:
    cli.run_main(main, PROG, argv)


if __name__ == "__main__":
    _cli()
