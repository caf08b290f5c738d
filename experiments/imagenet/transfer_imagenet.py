"""Pretrain a π-MLP (or μP MLP) on downsampled ImageNet 32×32, measure transfer to CIFAR-10.

Transfer is measured without fine-tuning, as in the paper: at each epoch of
``--transfer-milestones`` the feature kernel of the net's last hidden layer (``s s' F00(ĝ·ĝ')``
for an infinite net, ``φ(h)·φ(h')`` for a finite one; see experiments.feature_kernels) is used for
kernel ridge regression from the CIFAR-10 training images to the test images, and the test
accuracy is recorded as ``transfer_acc`` in the metrics.

Accepts the original command line, e.g. the infinite π-net, r = 200::

    python -m experiments.imagenet.transfer_imagenet --save-dir=./output/ --save-model --cuda \\
        --r 200 --lr=0.01 --batch-size=16 --gclip=0 --epochs=40 --human --wd=0.0001 \\
        --bias-alpha=0.5 --first-layer-lr-mult=1.0 --last-layer-lr-mult=1.0 --gclip-per-param \\
        --imagenet-data DIR --cifar-data DIR

Data: ImageNet32 from ``--imagenet-data`` (experiments.data.imagenet32: the npz or pickle
release), standardized with the ImageNet channel statistics; CIFAR-10 from ``--cifar-data``
with its own pixel statistics (as the original programs did); both flattened to 3072 values.
``--imagenet-classes K`` pretrains on K of the 1000 classes (a fixed choice; the original
program used 250 fixed classes), ``--imagenet-class-file`` on an explicit list. The output
layer has one unit per pretraining class.

``--human`` prints plain-text progress lines instead of progress bars (the original option
printed "human-friendly" lines); everything else is as in experiments.cifar10.cifar10mlp (the
run's files go to its own folder ``--save-dir/transfer_imagenet_<kind>_..._<hash of the
options>``).
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from pathlib import Path

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from experiments import cli
from experiments import distributed as edist
from experiments.cli import ConfigError
from experiments.data.imagenet32 import NUM_CLASSES, ImageNet32
from experiments.data.images import IMAGENET_MEAN, IMAGENET_STD, ImageSet, load_cifar10_set
from experiments.feature_kernels import feature_kernel_accuracy
from experiments.models import build_model
from experiments.options import (
    IntListAction,
    add_krr_args,
    add_model_args,
    add_optim_args,
    add_run_args,
    check_args,
    device_from_args,
    model_kind,
    model_spec,
    seed_everything,
    setup_logging,
)
from experiments.runs import load_checkpoint
from experiments.training import adopt_architecture, apply_precision, fit

__all__ = ["build_parser", "main", "select_classes"]

log = logging.getLogger("experiments")
PROGRAM = "transfer_imagenet"
PROG = "python -m experiments.imagenet.transfer_imagenet"


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(
        prog=PROG,
        description="Pretrain on ImageNet 32x32 and measure transfer to CIFAR-10 by "
        "feature-kernel ridge regression at chosen epochs.",
    )
    d = p.add_argument_group("data")
    d.add_argument(
        "--imagenet-data",
        default="./data/imagenet32",
        help="folder with train_data_batch_1..10[.npz] and val_data[.npz]",
    )
    d.add_argument(
        "--cifar-data", default="./data", help="CIFAR-10 python version (folder or cifar-10-python.tar.gz)"
    )
    d.add_argument(
        "--imagenet-classes",
        type=int,
        default=NUM_CLASSES,
        metavar="K",
        help="pretrain on K classes (a fixed choice, the same in every run)",
    )
    d.add_argument(
        "--imagenet-class-file",
        default=None,
        metavar="FILE",
        help="pretrain on the classes listed in FILE (0-based indices, i.e. the "
        "label in the files minus 1; separated by spaces, commas or newlines)",
    )
    d.add_argument(
        "--imagenet-train-size",
        type=int,
        default=None,
        metavar="N",
        help="pretrain on a fixed random subset of N images of those classes",
    )
    d.add_argument(
        "--imagenet-test-size",
        type=int,
        default=None,
        metavar="N",
        help="evaluate on a fixed subset of N validation images (default: all of the chosen classes)",
    )
    d.add_argument(
        "--train-size",
        type=int,
        default=None,
        metavar="N",
        help="CIFAR-10 training images for the transfer regression (fixed subset; "
        "default all 50 000, a 10 GB kernel matrix)",
    )
    d.add_argument(
        "--test-size",
        type=int,
        default=None,
        metavar="N",
        help="CIFAR-10 test images for the transfer regression",
    )
    t = p.add_argument_group("transfer")
    t.add_argument(
        "--transfer-milestones",
        action=IntListAction,
        default=None,
        metavar="EPOCH",
        help="epochs after which to measure transfer (0: before training; default: the last epoch)",
    )
    t.add_argument(
        "--transfer",
        action="store_true",
        help="accepted for the original command lines (transfer is measured at "
        "--transfer-milestones unless --no-transfer)",
    )
    t.add_argument("--no-transfer", action="store_true", help="pretrain only")
    add_krr_args(p)
    add_model_args(p, r=400, depth=2)
    add_optim_args(p)
    add_run_args(p)
    return p


def select_classes(args) -> list[int] | None:
    """The pretraining classes (0-based), or None for all 1000."""
    if args.imagenet_class_file:
        path = Path(args.imagenet_class_file)
        try:
            text = path.read_text()
        except OSError as err:
            raise ConfigError(
                f"--imagenet-class-file {path}: {err.strerror or err} — check the path"
            ) from None
        try:
            classes = [int(tok) for tok in re.split(r"[\s,\[\]]+", text) if tok]
        except ValueError as err:
            raise ConfigError(
                f"--imagenet-class-file {path} must list integers ({err}) — "
                f"write class indices separated by spaces or commas"
            ) from None
        if not classes or len(set(classes)) != len(classes) or not all(0 <= c < NUM_CLASSES for c in classes):
            raise ConfigError(
                f"--imagenet-class-file {path} must list distinct class indices "
                f"— use indices in 0..{NUM_CLASSES - 1}, each once"
            )
        return classes
    k = args.imagenet_classes
    if not 1 <= k <= NUM_CLASSES:
        raise ConfigError(f"--imagenet-classes {k} — give a number of classes in 1..{NUM_CLASSES}")
    if k == NUM_CLASSES:
        return None
    perm = torch.randperm(NUM_CLASSES, generator=torch.Generator().manual_seed(1000))
    return perm[:k].sort().values.tolist()


def _load_imagenet(args, classes, train: bool) -> ImageSet:
    size = args.imagenet_train_size if train else args.imagenet_test_size
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reader = ImageNet32(
            args.imagenet_data, train=train, classes=classes, subset=size, seed=0 if train else 1
        )
        images, labels = reader.load()
    for w in caught:
        log.warning("%s", w.message)
    num_classes = NUM_CLASSES if classes is None else len(classes)
    if len(labels) == 0:
        raise ConfigError(
            f"no ImageNet32 {'training' if train else 'validation'} images of the "
            f"chosen classes in {args.imagenet_data} — check --imagenet-data and "
            f"the class options"
        )
    return ImageSet(
        images, labels, IMAGENET_MEAN, IMAGENET_STD, num_classes, f"ImageNet32 {'train' if train else 'val'}"
    )


def main(argv=None) -> dict:
    """Run the program; returns the metrics document (see experiments.training.fit)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    setup_logging()
    with logging_redirect_tqdm():
        return _run(args, parser)


def _run(args, parser) -> dict:
    device = device_from_args(args)
    cli.apply_threads(args.threads)
    milestones = (
        []
        if args.no_transfer
        else ([args.epochs] if args.transfer_milestones is None else sorted(set(args.transfer_milestones)))
    )
    if any(not 0 <= m <= args.epochs for m in milestones):
        parser.error(f"--transfer-milestones must lie in 0..--epochs ({args.epochs})")
    ckpt = load_checkpoint(args.model_path, flag="--model-path", program=PROGRAM) if args.model_path else None
    if ckpt is not None and args.evaluate_only:
        adopt_architecture(args, ckpt)
    classes = select_classes(args)
    num_classes = NUM_CLASSES if classes is None else len(classes)
    train = None if args.evaluate_only else _load_imagenet(args, classes, True)
    test = _load_imagenet(args, classes, False)
    if ckpt is not None and ckpt["shape"] != {"d_in": test.dim, "d_out": num_classes}:
        raise ConfigError(
            f"--model-path {args.model_path} holds a net with {ckpt['shape']} "
            f"inputs/outputs; this run has {test.dim} inputs and {num_classes} "
            f"classes — use the class options it was trained with"
        )
    cifar_train = cifar_test = None
    if milestones or args.evaluate_only:
        cifar_train = load_cifar10_set(args.cifar_data, True, args.train_size).to(device)
        cifar_test = load_cifar10_set(args.cifar_data, False, args.test_size).to(device)
    seed_everything(args.seed)
    net = build_model(model_spec(args, test.dim, num_classes), device)
    precision = apply_precision(net, args, device)
    kind = model_kind(args)
    progress = not (args.no_progress or args.human) and cli.is_tty()  # quiet in log files
    progress = progress and edist.is_main()  # under torchrun, process 0 shows progress

    def transfer(epoch: int, model) -> dict:
        began = time.perf_counter()
        acc = feature_kernel_accuracy(model, kind, cifar_train, cifar_test, args, progress)
        spent = time.perf_counter() - began
        log.info(
            "transfer after epoch %d: CIFAR-10 feature-kernel test accuracy %.2f%% "
            "(%d train / %d test images, kernel reg %g, %.1f s)",
            epoch,
            100 * acc,
            len(cifar_train),
            len(cifar_test),
            args.kernel_reg,
            spent,
        )
        return {"transfer_acc": acc, "transfer_time_s": spent}

    hook = transfer if cifar_train is not None else None
    return fit(
        args,
        net,
        None if train is None else train.to(device),
        test.to(device),
        device,
        program=PROGRAM,
        precision=precision,
        ckpt=ckpt,
        epoch_hook=hook,
        hook_epochs=milestones,
    )


def _cli(argv=None) -> None:
    cli.run_main(main, PROG, argv)


if __name__ == "__main__":
    _cli()
