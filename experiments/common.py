"""Shared machinery of the π-net experiment programs.

The programs under ``experiments/`` (``cifar10.cifar10mlp``, ``cifar10.cifar10test``,
``imagenet.transfer_imagenet``, …) are thin: they declare their options with the argument
groups here, load their data as :class:`ImageSet` objects, and hand the rest to
:func:`fit`. What lives here:

* **argument groups** — :func:`add_model_args`, :func:`add_optim_args`, :func:`add_run_args`,
  :func:`add_krr_args`, with :func:`check_args` for the cross-option rules;
* **data** — :class:`ImageSet` (uint8 images kept on the device, turned into flat float
  inputs batch by batch: optional crop+flip augmentation, per-channel standardization,
  flattening to ``3·32·32 = 3072`` values in channel-major order; no per-image rescaling),
  :func:`load_cifar10_set`, and the fixed, nested subsets behind ``--train-size``/``--test-size``;
* **models** — :func:`build_model` (infinite π-MLP, finite π-net sampled from a fresh
  infinite one, or μP MLP), :func:`apply_precision`, :func:`make_optimizer`,
  :func:`make_scheduler`;
* **training** — :class:`Trainer` (one epoch, evaluation) and :func:`fit` (the epoch loop with
  resuming, metrics, plots and checkpoints);
* **files** — :func:`atomic_write`, :func:`save_checkpoint` / :func:`load_checkpoint`,
  :class:`MetricsLog` (CSV + JSON + PNG after every epoch);
* **feature kernels** — :func:`feature_kernel_inputs` and :func:`feature_kernel_accuracy`
  (kernel ridge regression on the last hidden layer of a trained net).

Model kinds (``--width``/``--gaussian-init``):

==========  =============================================  ==========================================
kind        built as                                       last-hidden-layer feature kernel
==========  =============================================  ==========================================
infinite    ``InfMLP(d_in, d_out, r, L=depth, …)``         ``s s' F00(ĝ·ĝ')`` of the preactivation
                                                           ``g`` entering the output layer
finite      ``FinPiMLPSample(InfMLP(…), width)``           ``φ(h)·φ(h')`` (empirical)
mup         ``MuMLP(d_in, d_out, width, L=depth, …)``      ``φ(h)·φ(h')`` (empirical)
==========  =============================================  ==========================================

(with ``--layernorm`` the feature is normalised first: ``s = 1``, ``h ← h/|h|``).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import random
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from experiments.data.cifar import CIFAR10_MEAN, load_cifar10, normalize, random_crop_flip
from experiments.kernels import feature_kernel, kernel_ridge_regression
from inf.networks import FinPiMLPSample, InfMLP, MuMLP
from inf.optim import InfSGD
from inf.utils import clip_grad_norm_, pi_param_groups, resolve_device

__all__ = [
    "ConfigError", "CIFAR10_PIXEL_MEAN", "CIFAR10_PIXEL_STD", "IMAGENET_MEAN", "IMAGENET_STD",
    "IntListAction", "add_model_args", "add_optim_args", "add_run_args", "add_krr_args",
    "check_args", "setup_logging", "device_from_args", "seed_everything",
    "ImageSet", "fixed_subset", "load_cifar10_set",
    "model_kind", "build_model", "apply_precision", "make_optimizer",
    "make_scheduler", "gclip_at", "batch_loss", "Trainer", "fit",
    "atomic_write", "save_checkpoint", "load_checkpoint", "checkpoint_model", "MetricsLog",
    "plot_curves", "ARCH_KEYS", "adopt_architecture", "feature_kernel_inputs",
    "feature_kernel_accuracy",
    "memory_text", "rows_text",
]

log = logging.getLogger("experiments")

# Per-channel pixel statistics of the CIFAR-10 training set on the 0..1 scale (the std is the
# std over all pixels of a channel; experiments.data.cifar.CIFAR10_STD is the smaller mean of
# per-image stds that the TrAct script uses). These are what the original π-limit programs
# normalized with.
CIFAR10_PIXEL_MEAN = CIFAR10_MEAN
CIFAR10_PIXEL_STD = (0.2470, 0.2435, 0.2616)
# The usual ImageNet statistics, used for downsampled ImageNet as well.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CHECKPOINT_FORMAT = "pilimit-experiment-checkpoint/1"
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_CSV = "metrics.csv"
METRICS_JSON = "metrics.json"
CURVES_PNG = "curves.png"

# options that fix the network's architecture: a checkpoint is only loaded into a net built
# with the same values
ARCH_KEYS = ("width", "r", "depth", "first_layer_alpha", "last_layer_alpha", "bias_alpha",
             "last_bias_alpha", "layernorm", "gaussian_init", "tract_lambda")


class ConfigError(ValueError):
    """The options ask for something this machine, data or checkpoint cannot give."""


# =========================================================================== arguments

class IntListAction(argparse.Action):
    """A list of integers given as ``--opt 10 20``, ``--opt 10,20`` or ``--opt=10,20``.

    ``none`` (or an empty string) gives the empty list.
    """

    def __init__(self, option_strings, dest, nargs="+", **kwargs):
        super().__init__(option_strings, dest, nargs=nargs, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        items = []
        for value in values if isinstance(values, list) else [values]:
            for part in str(value).replace(",", " ").split():
                if part.lower() == "none":
                    continue
                try:
                    items.append(int(float(part)))
                except ValueError:
                    parser.error(f"{option_string}: {part!r} is not an epoch number")
        setattr(namespace, self.dest, items)


def add_model_args(parser: argparse.ArgumentParser, *, r: int = 200, depth: int = 1):
    """Architecture options shared by every π-MLP program."""
    g = parser.add_argument_group("network")
    g.add_argument("--width", type=int, default=0,
                   help="0: infinite-width π-MLP; n > 0: a finite net of width n (a π-net "
                        "sampled from a fresh infinite one, or a μP MLP with --gaussian-init)")
    g.add_argument("--r", type=int, default=r, help="rank r of the π-net (ignored by μP nets)")
    g.add_argument("--depth", type=int, default=depth,
                   help="number L of hidden π-layers; the net is input layer, L hidden layers, "
                        "output layer (L+1 ReLU layers)")
    g.add_argument("--first-layer-alpha", type=float, default=1.0,
                   help="multiplier α_1 of the input layer's output")
    g.add_argument("--last-layer-alpha", type=float, default=1.0,
                   help="multiplier α_L of the output layer (bias included)")
    g.add_argument("--bias-alpha", type=float, default=1.0,
                   help="multiplier β of every bias (0: no biases)")
    g.add_argument("--last-bias-alpha", type=float, default=None,
                   help="β of the output layer's bias (default: --bias-alpha)")
    g.add_argument("--layernorm", action="store_true",
                   help="normalise each hidden preactivation before the ReLU")
    g.add_argument("--gaussian-init", action="store_true",
                   help="with --width n: the μP baseline (μ-Net), inf.networks.MuMLP, Gaussian "
                        "init and no gradient projection (implies --no-Gproj)")
    g.add_argument("--no-Gproj", dest="no_Gproj", action="store_true",
                   help="finite nets: do not project gradients onto span(Ω)")
    g.add_argument("--tract-lambda", type=float, default=0.0,
                   help="train the input layer with TrAct with this λ (0: off)")
    return g


def add_optim_args(parser: argparse.ArgumentParser, *, lr: float = 2.0, wd: float = 1e-4,
                   gclip: float = 0.2, batch_size: int = 64, epochs: int = 24,
                   first_layer_lr_mult: float = 0.1):
    """Optimizer, schedule and clipping options (defaults are the original programs')."""
    g = parser.add_argument_group("optimization")
    g.add_argument("--lr", type=float, default=lr, help="learning rate")
    g.add_argument("--momentum", type=float, default=0.0, help="SGD momentum")
    g.add_argument("--wd", type=float, default=wd, help="weight decay")
    g.add_argument("--first-layer-lr-mult", type=float, default=first_layer_lr_mult,
                   help="lr multiplier of the input layer's weights")
    g.add_argument("--last-layer-lr-mult", type=float, default=1.0,
                   help="lr multiplier of the output layer's weights")
    g.add_argument("--bias-lr-mult", type=float, default=0.5,
                   help="lr multiplier of the biases (times the layer's own multiplier)")
    g.add_argument("--no-apply-lr-mult-to-wd", dest="apply_lr_mult_to_wd",
                   action="store_false",
                   help="keep the per-step decay lr·wd the same in every group (each group's "
                        "wd is divided by its lr multiplier)")
    g.add_argument("--gclip", type=float, default=gclip,
                   help="gradient-norm clipping threshold (0: off); π-aware "
                        "(inf.utils.clip_grad_norm_)")
    g.add_argument("--gclip-per-param", action="store_true",
                   help="clip every parameter (an infinite layer's weight, a bias, a finite "
                        "weight) separately instead of the global norm")
    g.add_argument("--gclip-drop-milestones", action=IntListAction, default=None,
                   metavar="EPOCH",
                   help="epochs after which --gclip is multiplied by --gclip-drop-ratio "
                        "(default: the --lr-drop-milestones of a multistep schedule, as the "
                        "original programs did; 'none' for never)")
    g.add_argument("--gclip-drop-ratio", type=float, default=None,
                   help="factor of each clipping drop (default: --lr-drop-ratio)")
    g.add_argument("--scheduler", type=str.lower, default="none",
                   choices=("none", "multistep", "cosine"),
                   help="learning-rate schedule, stepped once per epoch: multistep multiplies "
                        "the lr by --lr-drop-ratio after each of --lr-drop-milestones epochs; "
                        "cosine anneals it to 0 over --epochs")
    g.add_argument("--lr-drop-ratio", type=float, default=0.5,
                   help="multistep factor (gamma)")
    g.add_argument("--lr-drop-milestones", action=IntListAction, default=[], metavar="EPOCH",
                   help="multistep milestones, in epochs (e.g. 40 or 30,40)")
    g.add_argument("--epochs", type=int, default=epochs, help="epochs to train")
    g.add_argument("--batch-size", type=int, default=batch_size, help="training batch size")
    g.add_argument("--test-batch-size", type=int, default=500,
                   help="batch size of evaluation and feature passes")
    g.add_argument("--accum-steps", type=int, default=1,
                   help="accumulate the gradients of this many batches per optimizer step "
                        "(effective batch = batch size × accum steps)")
    g.add_argument("--data-augment", action="store_true",
                   help="random crop (4-pixel zero padding) and horizontal flip of training "
                        "images")
    g.add_argument("--loss", choices=("xent", "mse"), default="xent",
                   help="xent: cross-entropy; mse: mean over classes of (f - (onehot - 1/C))², "
                        "averaged over the batch")
    return g


def add_run_args(parser: argparse.ArgumentParser, *, seed: int = 1):
    """Device, precision, output, checkpoint and progress options."""
    g = parser.add_argument_group("run")
    g.add_argument("--seed", type=int, default=seed, help="random seed")
    g.add_argument("--cuda", action="store_true", help="run on the GPU (error if there is none)")
    g.add_argument("--float", action="store_true",
                   help="float32 throughout; without it an infinite net on CUDA stores its rows "
                        "(A, B) in float16 with float32 coefficients (on CPU: float32 anyway)")
    g.add_argument("--save-dir", default=None, metavar="DIR",
                   help="write metrics.csv, metrics.json and curves.png here after every epoch "
                        "(and checkpoint.pt with --save-model)")
    g.add_argument("--save-model", action="store_true",
                   help="write DIR/checkpoint.pt (atomically) after every epoch: model, "
                        "optimizer, scheduler, RNG states, epoch, options and metrics")
    g.add_argument("--keep-epoch-models", action="store_true",
                   help="with --save-model, also keep DIR/checkpoint_epoch<k>.pt of every epoch")
    g.add_argument("--model-path", default=None, metavar="CHECKPOINT",
                   help="resume from this checkpoint (continues exactly where it stopped), or "
                        "evaluate it with --evaluate-only")
    g.add_argument("--evaluate-only", "--test", dest="evaluate_only", action="store_true",
                   help="evaluate --model-path and exit (its architecture options are used)")
    g.add_argument("--stop-after-epochs", type=int, default=None, metavar="K",
                   help="leave after K epochs of this invocation (resume later with "
                        "--model-path DIR/checkpoint.pt)")
    g.add_argument("--human", action="store_true",
                   help="plain-text progress lines (about ten per epoch: loss, accuracy, rows, "
                        "memory, time per step, ETA) instead of progress bars; for log files")
    g.add_argument("--no-progress", "--quiet", dest="no_progress", action="store_true",
                   help="no progress bars or progress lines, only per-epoch summaries")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return g


def add_krr_args(parser: argparse.ArgumentParser, *, kernel_reg: float = 1e-4):
    """Kernel-ridge-regression options (experiments.kernels.kernel_ridge_regression)."""
    g = parser.add_argument_group("kernel regression")
    g.add_argument("--kernel-reg", type=float, default=kernel_reg,
                   help="ridge λ relative to the mean diagonal of the training kernel")
    g.add_argument("--krr-method", choices=("cholesky", "cg"), default="cholesky",
                   help="cholesky: one N×N float32 matrix (10 GB at N = 50 000); cg: "
                        "matrix-free conjugate gradient (slow, little memory)")
    g.add_argument("--krr-float64", action="store_true",
                   help="factorise the kernel in float64 (twice the memory)")
    g.add_argument("--krr-block-size", type=int, default=2048,
                   help="rows per kernel block")
    g.add_argument("--normalize-features", action="store_true",
                   help="feature kernel of the unit-normalised feature (F00(ĝ·ĝ') for infinite "
                        "nets, cosine of φ(h) for finite ones), as the original programs did")
    return g


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Cross-option rules; calls ``parser.error`` (exit status 2) with a precise message."""
    def need(cond, msg):
        if not cond:
            parser.error(msg)

    for name in ("epochs", "batch_size", "test_batch_size", "accum_steps"):
        if getattr(args, name, None) is not None:
            need(getattr(args, name) >= 1, f"--{name.replace('_', '-')} must be at least 1")
    if hasattr(args, "gaussian_init"):  # the model options of add_model_args
        need(args.width >= 0, "--width must be 0 (infinite) or a positive width")
        need(args.r >= 1, "--r must be at least 1")
        need(args.depth >= 0, "--depth must be non-negative")
        need(not (args.gaussian_init and args.width == 0),
             "--gaussian-init builds a finite μP net: give it a --width n > 0")
        need(args.tract_lambda >= 0, "--tract-lambda must be >= 0 (0 turns TrAct off)")
    elif getattr(args, "width", None) is not None:  # cifar10test: sample a finite net
        need(args.width >= 1, "--width must be at least 1")
    for name in ("train_size", "test_size", "imagenet_train_size", "imagenet_test_size"):
        value = getattr(args, name, None)
        need(value is None or value >= 1, f"--{name.replace('_', '-')} must be at least 1")
    if getattr(args, "stop_after_epochs", None) is not None:
        need(args.stop_after_epochs >= 1, "--stop-after-epochs must be at least 1")
    for name in ("lr_drop_milestones", "gclip_drop_milestones"):
        values = getattr(args, name, None) or []
        need(all(v >= 1 for v in values), f"--{name.replace('_', '-')} must be epochs >= 1")
    if getattr(args, "evaluate_only", False):
        need(bool(args.model_path), "--evaluate-only needs --model-path CHECKPOINT")
    if getattr(args, "save_model", False):
        need(bool(args.save_dir), "--save-model needs --save-dir DIR")
    if getattr(args, "kernel_reg", 0) < 0:
        parser.error("--kernel-reg must be >= 0")


def setup_logging(quiet: bool = False) -> None:
    """INFO lines as plain text on stderr (once per process)."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.setLevel(logging.WARNING if quiet else logging.INFO)


def device_from_args(args) -> torch.device:
    try:
        return resolve_device("cuda" if args.cuda else "cpu")
    except RuntimeError as err:
        raise ConfigError(f"--cuda: {err}") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# =========================================================================== data

def fixed_subset(n_total: int, n: int | None, what: str, salt: int = 0) -> torch.Tensor | None:
    """Sorted indices of ``n`` of ``n_total`` items, the same for every seed and program.

    The subsets are nested: the first ``n`` of one fixed permutation, so
    ``--train-size 1000`` holds the images of ``--train-size 500``. ``None``: everything.
    """
    if n is None or n >= n_total:
        if n is not None and n > n_total:
            log.warning("%s: asked for %d items, only %d exist; using all", what, n, n_total)
        return None
    perm = torch.randperm(n_total, generator=torch.Generator().manual_seed(1234 + salt))
    return perm[:n].sort().values


@dataclass
class ImageSet:
    """Labelled 32×32 images (uint8, N × 3 × 32 × 32) and how to turn them into inputs.

    ``inputs(idx)`` standardizes each channel with ``mean``/``std`` and flattens the image to
    3072 values (channel-major: all red, then green, then blue); no per-image rescaling.
    With ``augment`` and a ``generator``, a random 4-pixel-padded crop and a random horizontal
    flip are applied to the uint8 pixels first.
    """

    images: torch.Tensor
    labels: torch.Tensor
    mean: tuple
    std: tuple
    num_classes: int
    name: str = "data"

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def dim(self) -> int:
        return int(np.prod(self.images.shape[1:]))

    def to(self, device) -> "ImageSet":
        return ImageSet(self.images.to(device), self.labels.to(device), self.mean, self.std,
                        self.num_classes, self.name)

    def inputs(self, idx=None, generator: torch.Generator | None = None,
               augment: bool = False) -> torch.Tensor:
        x = self.images if idx is None else self.images[idx]
        if augment and generator is not None:
            x = random_crop_flip(x, generator)
        return normalize(x, self.mean, self.std).reshape(x.shape[0], -1)


def load_cifar10_set(root, train: bool, size: int | None = None) -> ImageSet:
    """CIFAR-10 train or test split (see experiments.data.cifar) with pixel statistics."""
    images, labels = load_cifar10(root, train=train)
    split = "train" if train else "test"
    idx = fixed_subset(len(labels), size, f"CIFAR-10 {split}", salt=0 if train else 1)
    if idx is not None:
        images, labels = images[idx], labels[idx]
    return ImageSet(images, labels, CIFAR10_PIXEL_MEAN, CIFAR10_PIXEL_STD, 10,
                    f"CIFAR-10 {split}")


# =========================================================================== models

def model_kind(args) -> str:
    """``"infinite"``, ``"finite"`` (π-net) or ``"mup"``."""
    if args.width == 0:
        return "infinite"
    return "mup" if args.gaussian_init else "finite"


def build_model(args, d_in: int, d_out: int, device: torch.device) -> nn.Module:
    """The net the options describe, in float32 on ``device``.

    Randomness: the global torch generator (seed it first) for the infinite net, a
    generator seeded with ``args.seed`` for the Ω of a finite π-net and for μP weights.
    """
    kind = model_kind(args)
    shape = dict(first_layer_alpha=args.first_layer_alpha, last_layer_alpha=args.last_layer_alpha,
                 bias_alpha=args.bias_alpha, last_bias_alpha=args.last_bias_alpha,
                 layernorm=args.layernorm)
    tract = args.tract_lambda if args.tract_lambda else None
    generator = torch.Generator().manual_seed(args.seed)
    if kind == "mup":
        net = MuMLP(d_in, d_out, args.width, L=args.depth, generator=generator, tract_lambda=tract, **shape)
        return net.to(device)
    if kind == "infinite":
        return InfMLP(d_in, d_out, args.r, L=args.depth, tract_lambda=tract, device=device,
                      **shape)
    # a finite π-net: sample it (in float64, on the CPU) from a fresh infinite net
    source = InfMLP(d_in, d_out, args.r, L=args.depth, tract_lambda=tract, dtype=torch.float64,
                    **shape)
    net = FinPiMLPSample(source, args.width, generator=generator, dtype=torch.float32)
    return net.to(device)


def apply_precision(net: nn.Module, args, device: torch.device,
                    half_rows: bool | None = None) -> str:
    """float16 rows for infinite nets on CUDA unless ``--float``; returns a description.

    Only the rows ``A``/``B`` of the infinite hidden and output layers go to float16
    (``.half()`` on their row stores); coefficients, biases, the input layer and all
    arithmetic stay float32. Finite and μP nets always train in float32. ``half_rows``
    overrides the choice (tests use it to run the float16 path on a CPU).
    """
    if half_rows is None:
        if args.float:
            return "float32"
        if device.type != "cuda":
            log.info("notice: float16 rows need CUDA; on %s this run uses float32 (as with "
                     "--float)", device)
            return "float32"
        half_rows = True
    if not half_rows:
        return "float32"
    if isinstance(net, InfMLP):
        for layer in net.layers[1:]:
            layer.rows.half()
        return "float16 rows (A, B), float32 coefficients and arithmetic"
    log.info("notice: float16 applies to infinite-width rows only; this finite net trains in "
             "float32")
    return "float32"


def make_optimizer(args, net: nn.Module) -> InfSGD:
    """InfSGD over :func:`inf.utils.pi_param_groups` (roles: first, hidden, last, biases)."""
    groups = pi_param_groups(net, args.lr, args.wd, first_layer_lr_mult=args.first_layer_lr_mult,
                             last_layer_lr_mult=args.last_layer_lr_mult,
                             bias_lr_mult=args.bias_lr_mult,
                             apply_lr_mult_to_wd=args.apply_lr_mult_to_wd)
    if args.no_Gproj or args.gaussian_init:
        for group in groups:
            group["project"] = False
    return InfSGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.wd)


def make_scheduler(args, optimizer):
    """A ``torch.optim.lr_scheduler`` stepped once per epoch, or None."""
    if args.scheduler == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.lr_drop_milestones,
                                                    gamma=args.lr_drop_ratio)
    if args.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    if args.lr_drop_milestones:
        log.warning("--lr-drop-milestones has no effect without --scheduler multistep")
    return None


def gclip_at(args, epoch: int) -> float:
    """The clipping threshold during (0-based) ``epoch``: one drop per milestone passed."""
    milestones = args.gclip_drop_milestones
    if milestones is None:
        milestones = args.lr_drop_milestones if args.scheduler == "multistep" else []
    ratio = args.lr_drop_ratio if args.gclip_drop_ratio is None else args.gclip_drop_ratio
    return args.gclip * ratio ** sum(1 for m in milestones if epoch >= m)


def batch_loss(name: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of the per-example loss (see ``--loss``)."""
    out = out.float()
    if name == "xent":
        return F.cross_entropy(out, y, reduction="sum")
    classes = out.shape[1]
    target = F.one_hot(y, classes).to(out.dtype) - 1.0 / classes
    return (out - target).pow(2).mean(dim=1).sum()


# =========================================================================== progress text

def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_text(device: torch.device) -> str:
    """``GPU 3.1 GB`` (allocated) on CUDA, ``RSS 1.2 GB`` (resident) on CPU."""
    if device.type == "cuda":
        return f"GPU {torch.cuda.memory_allocated(device) / 1e9:.2f} GB"
    return f"RSS {_rss_bytes() / 1e9:.2f} GB"


def rows_text(net: nn.Module) -> str | None:
    """Rows per infinite layer, ``1,208/1,208/1,208``, or None for finite nets."""
    if isinstance(net, InfMLP):
        return "/".join(f"{m:,}" for m in net.rows_per_layer())
    return None


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# =========================================================================== training

class Trainer:
    """One epoch of SGD and evaluation for a π-MLP (or μP MLP) on an :class:`ImageSet`.

    Per optimizer step: ``zero_grad``; for each of ``--accum-steps`` batches, forward,
    ``(sum of per-example losses) / (examples in the step)`` and backward; π-aware clipping at
    the epoch's threshold (:func:`gclip_at`); ``step``. Batches are drawn without replacement
    from a permutation made by ``generator`` (a CPU generator, also used for augmentation),
    the last one possibly smaller.
    """

    def __init__(self, args, net: nn.Module, optimizer, device: torch.device,
                 generator: torch.Generator):
        self.args, self.net, self.optimizer = args, net, optimizer
        self.device, self.generator = device, generator

    def _progress(self, total: int, desc: str):
        enabled = not (self.args.no_progress or self.args.human)
        return tqdm(total=total, desc=desc, leave=False, disable=not enabled, dynamic_ncols=True)

    def train_epoch(self, data: ImageSet, epoch: int) -> dict:
        args, net, opt = self.args, self.net, self.optimizer
        net.train()
        gclip = gclip_at(args, epoch)
        n = len(data)
        order = torch.randperm(n, generator=self.generator)
        batches = [order[i:i + args.batch_size] for i in range(0, n, args.batch_size)]
        steps = [batches[i:i + args.accum_steps] for i in range(0, len(batches), args.accum_steps)]
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        seen = 0
        bar = self._progress(len(steps), f"epoch {epoch + 1}/{args.epochs}")
        human_every = max(1, len(steps) // 10)
        began = time.perf_counter()
        for step, step_batches in enumerate(steps):
            total = sum(len(b) for b in step_batches)
            opt.zero_grad()
            for idx in step_batches:
                x = data.inputs(idx.to(data.images.device), self.generator, args.data_augment)
                y = data.labels[idx.to(data.labels.device)]
                out = net(x)
                loss = batch_loss(args.loss, out, y)
                (loss / total).backward()
                loss_sum += loss.detach().double()
                correct += (out.detach().argmax(1) == y).sum()
            if gclip > 0:
                clip_grad_norm_(net.parameters(), gclip, per_param=args.gclip_per_param)
            opt.step()
            seen += total
            done = step + 1
            if done % 10 == 0 or done == len(steps):
                bar.update(done - bar.n)
                if not bar.disable:
                    bar.set_postfix_str(self._status(loss_sum, correct, seen), refresh=False)
            if args.human and not args.no_progress and (done % human_every == 0
                                                         or done == len(steps)):
                elapsed = time.perf_counter() - began
                log.info("epoch %d/%d  %3.0f%% (%d/%d steps)  %s  %.1f ms/step  ETA %s",
                         epoch + 1, args.epochs, 100 * done / len(steps), done, len(steps),
                         self._status(loss_sum, correct, seen), 1e3 * elapsed / done,
                         _hms(elapsed / done * (len(steps) - done)))
        bar.close()
        elapsed = time.perf_counter() - began
        return {"train_loss": float(loss_sum) / seen, "train_acc": int(correct) / seen,
                "gclip": gclip, "steps": len(steps), "train_time_s": elapsed,
                "step_time_ms": 1e3 * elapsed / len(steps)}

    def _status(self, loss_sum, correct, seen) -> str:
        parts = [f"loss {float(loss_sum) / seen:.4f}", f"acc {int(correct) / seen:.2%}"]
        rows = rows_text(self.net)
        if rows is not None:
            parts.append(f"rows {rows}")
        parts.append(memory_text(self.device))
        return "  ".join(parts)

    @torch.no_grad()
    def evaluate(self, data: ImageSet) -> dict:
        net = self.net
        net.eval()
        loss_sum, correct = 0.0, 0
        bs = self.args.test_batch_size
        for start in range(0, len(data), bs):
            idx = torch.arange(start, min(start + bs, len(data)), device=data.images.device)
            out = net(data.inputs(idx))
            y = data.labels[idx]
            loss_sum += float(batch_loss(self.args.loss, out, y))
            correct += int((out.argmax(1) == y).sum())
        net.train()
        n = max(len(data), 1)
        return {"test_loss": loss_sum / n, "test_acc": correct / n}


# =========================================================================== files

def atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """``write(f)`` into a temporary sibling, fsync, then rename over ``path``: a reader (or an
    interrupted run) sees the old file or the new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def rng_state(generator: torch.Generator, device: torch.device) -> dict:
    """Every random state a resumable run needs: torch, Python, CUDA and the data generator."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "data": generator.get_state()}


def set_rng_state(state: dict, generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    generator.set_state(state["data"])


def save_checkpoint(path: Path, state: dict) -> None:
    """``torch.save(state)`` written atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda fh: torch.save(state, fh))


def load_checkpoint(path) -> dict:
    """A checkpoint written by :func:`fit`; clear errors for missing or foreign files."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist (a --save-dir of a run with "
                          f"--save-model holds {CHECKPOINT_NAME})")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file fails in many ways
        raise ConfigError(f"{path} is not a readable checkpoint ({type(err).__name__}: "
                          f"{err})") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} is not a checkpoint of these programs (expected format "
                          f"{CHECKPOINT_FORMAT!r})")
    return ckpt


def checkpoint_model(ckpt: dict, device: torch.device, width: int | None = None):
    """Rebuild the net a checkpoint holds: ``(net, kind, namespace of its options)``.

    ``width``: sample a finite π-net of this width from a checkpointed infinite net.
    """
    saved = argparse.Namespace(**ckpt["args"])
    net = build_model(saved, ckpt["shape"]["d_in"], ckpt["shape"]["d_out"], device)
    net.load_state_dict(ckpt["model"])
    kind = model_kind(saved)
    if width:
        if kind != "infinite":
            raise ConfigError(f"--width {width} samples a finite net from an infinite one, but "
                              f"the checkpoint holds a {kind} net")
        generator = torch.Generator().manual_seed(saved.seed)
        net = FinPiMLPSample(net.to("cpu").double(), width, generator=generator,
                             dtype=torch.float32).to(device)
        kind = "finite"
    return net, kind, saved


_COLUMN_ORDER = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "transfer_acc",
                 "lr", "gclip", "rows", "steps", "step_time_ms", "train_time_s", "eval_time_s",
                 "transfer_time_s", "memory")


class MetricsLog:
    """Per-epoch metrics, written as ``metrics.csv``, ``metrics.json`` and ``curves.png``.

    Every write replaces the files atomically. The JSON holds ``config`` (the options),
    ``summary`` and ``epochs`` (one dict per row, as in the CSV).
    """

    def __init__(self, save_dir: Path | None, config: dict, history: list[dict] | None = None,
                 title: str = ""):
        self.save_dir = None if save_dir is None else Path(save_dir)
        self.config = config
        self.history = list(history or [])
        self.title = title

    def append(self, row: dict) -> None:
        self.history.append(row)

    def document(self) -> dict:
        trained = [r for r in self.history if r.get("test_acc") is not None]
        summary = {}
        if trained:
            best = max(trained, key=lambda r: r["test_acc"])
            summary = {"epochs_done": trained[-1]["epoch"], "final_test_acc": trained[-1]["test_acc"],
                       "best_test_acc": best["test_acc"], "best_epoch": best["epoch"],
                       "train_time_s": sum(r.get("train_time_s") or 0.0 for r in trained)}
        transfer = [r for r in self.history if r.get("transfer_acc") is not None]
        if transfer:
            best = max(transfer, key=lambda r: r["transfer_acc"])
            summary.update(best_transfer_acc=best["transfer_acc"], best_transfer_epoch=best["epoch"])
        return {"config": self.config, "summary": summary, "epochs": self.history}

    def write(self) -> None:
        if self.save_dir is None:
            return
        self.save_dir.mkdir(parents=True, exist_ok=True)
        doc = self.document()
        atomic_write(self.save_dir / METRICS_JSON,
                     lambda fh: fh.write(json.dumps(doc, indent=1).encode()))
        columns = [c for c in _COLUMN_ORDER if any(c in row for row in self.history)]
        for row in self.history:
            columns += [k for k in row if k not in columns]
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n", restval="")
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()}
                         for row in self.history)
        atomic_write(self.save_dir / METRICS_CSV, lambda fh: fh.write(text.getvalue().encode()))
        if self.history:
            plot_curves(self.history, self.save_dir / CURVES_PNG, self.title)


def plot_curves(history: list[dict], path: Path, title: str = "") -> None:
    """Loss and accuracy (train, test, transfer if any) against epochs, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    for ax, keys, label in ((ax_loss, ("train_loss", "test_loss"), "loss"),
                            (ax_acc, ("train_acc", "test_acc", "transfer_acc"), "accuracy")):
        for key in keys:
            pts = [(r["epoch"], r[key]) for r in history if r.get(key) is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", markersize=3, label=key.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(Path(path), lambda fh: fig.savefig(fh, format="png"))


# =========================================================================== the epoch loop

def _config(args) -> dict:
    return dict(vars(args))


def _check_resumable(saved: dict, args, path) -> None:
    diffs = [f"--{k.replace('_', '-')}: checkpoint {saved.get(k)!r}, now {getattr(args, k)!r}"
             for k in ARCH_KEYS if saved.get(k) != getattr(args, k)]
    if diffs:
        raise ConfigError(f"{path} holds a different network ({'; '.join(diffs)}); resume with "
                          f"the options it was trained with")
    changed = [k for k in ("lr", "wd", "momentum", "batch_size", "scheduler", "seed", "loss",
                           "lr_drop_milestones", "lr_drop_ratio", "gclip")
               if k in saved and saved[k] != getattr(args, k, saved[k])]
    if changed:
        log.warning("resuming with changed options: %s", ", ".join(
            f"{k} {saved[k]!r} -> {getattr(args, k)!r}" for k in changed))


def adopt_architecture(args, ckpt: dict) -> None:
    """Set the architecture options of ``args`` to those of a checkpoint (for evaluation)."""
    saved = ckpt["args"]
    changed = [k for k in ARCH_KEYS if getattr(args, k, None) != saved.get(k)]
    for key in ARCH_KEYS:
        setattr(args, key, saved.get(key))
    if changed:
        log.info("using the checkpoint's network options: %s",
                 ", ".join(f"{k}={saved.get(k)!r}" for k in changed))


EpochHook = Callable[[int, nn.Module], dict]


def fit(args, net: nn.Module, train: ImageSet | None, test: ImageSet, device: torch.device, *,
        program: str, precision: str, ckpt: dict | None = None,
        epoch_hook: EpochHook | None = None, hook_epochs: Iterable[int] = ()) -> dict:
    """Train ``net`` on ``train`` for ``args.epochs`` epochs, evaluating on ``test`` after each.

    * ``ckpt`` (from :func:`load_checkpoint`): resume it (model, optimizer, scheduler, RNG
      states, epoch, metrics) — or, with ``args.evaluate_only``, only evaluate its model.
    * ``epoch_hook(epoch, net) -> dict`` runs after the epochs in ``hook_epochs`` (1-based;
      0 = before training) and its entries join that epoch's metrics row (e.g. transfer
      accuracy).
    * Every epoch: a metrics row (train/test loss and accuracy, lr, clipping threshold, rows
      per layer, time per step, memory), the files of :class:`MetricsLog`, and with
      ``--save-model`` an atomic checkpoint.

    Returns the metrics document (``config``, ``summary``, ``epochs``), plus ``evaluation``
    with ``--evaluate-only``.
    """
    hook_epochs = set(hook_epochs)
    if ckpt is not None:
        if not args.evaluate_only:
            _check_resumable(ckpt["args"], args, args.model_path)
        net.load_state_dict(ckpt["model"])
    save_dir = Path(args.save_dir) if args.save_dir else None
    shape = {"d_in": test.dim, "d_out": _d_out(net)}
    title = f"{program}: {model_kind(args)} net, {precision}"

    if args.evaluate_only:
        trainer = Trainer(args, net, None, device, torch.Generator())
        result = trainer.evaluate(test)
        epoch = ckpt["epoch"] if ckpt else 0
        if epoch_hook is not None:
            result.update(epoch_hook(epoch, net))
        log.info("%s after %d epochs: %s", args.model_path, epoch,
                 "  ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float)))
        doc = {"config": _config(args), "evaluation": {"epoch": epoch, **result}}
        if save_dir is not None:
            save_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(save_dir / "evaluation.json",
                         lambda fh: fh.write(json.dumps(doc, indent=1).encode()))
        return doc

    optimizer = make_optimizer(args, net)
    scheduler = make_scheduler(args, optimizer)
    generator = torch.Generator().manual_seed(args.seed + 2**32)
    history, start_epoch = [], 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None and ckpt.get("scheduler") is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"], generator, device)
        history, start_epoch = list(ckpt["metrics"]), int(ckpt["epoch"])
        log.info("resuming %s after epoch %d of %d", args.model_path, start_epoch, args.epochs)
    metrics = MetricsLog(save_dir, _config(args), history, title)
    trainer = Trainer(args, net, optimizer, device, generator)
    log.info("%s: %s net (%s) on %s, %d train / %d test examples, %s, %s",
             program, model_kind(args), _describe(net), train.name, len(train), len(test),
             device, precision)

    if start_epoch == 0 and 0 in hook_epochs and epoch_hook is not None:
        metrics.append({"epoch": 0, **epoch_hook(0, net)})
        metrics.write()

    last_epoch = args.epochs
    if args.stop_after_epochs is not None:
        last_epoch = min(last_epoch, start_epoch + args.stop_after_epochs)
    for epoch in range(start_epoch, last_epoch):
        lr = optimizer.param_groups[0]["lr"] / (optimizer.param_groups[0]["lr_mult"] or 1.0)
        stats = trainer.train_epoch(train, epoch)
        evaluated = time.perf_counter()
        stats.update(trainer.evaluate(test))
        eval_time = time.perf_counter() - evaluated
        if scheduler is not None:
            scheduler.step()
        row = {"epoch": epoch + 1, "train_loss": stats["train_loss"], "train_acc": stats["train_acc"],
               "test_loss": stats["test_loss"], "test_acc": stats["test_acc"], "lr": lr,
               "gclip": stats["gclip"], "rows": rows_text(net), "steps": stats["steps"],
               "step_time_ms": stats["step_time_ms"], "train_time_s": stats["train_time_s"],
               "eval_time_s": eval_time, "memory": memory_text(device)}
        if epoch_hook is not None and epoch + 1 in hook_epochs:
            row.update(epoch_hook(epoch + 1, net))
        metrics.append(row)
        metrics.write()
        log.info("epoch %d/%d  train loss %.4f acc %.2f%%  test loss %.4f acc %.2f%%%s  "
                 "(%.1f s, %.2f ms/step%s, %s)", epoch + 1, args.epochs, row["train_loss"],
                 100 * row["train_acc"], row["test_loss"], 100 * row["test_acc"],
                 f"  transfer acc {100 * row['transfer_acc']:.2f}%"
                 if row.get("transfer_acc") is not None else "",
                 row["train_time_s"], row["step_time_ms"],
                 f", rows {row['rows']}" if row["rows"] else "", row["memory"])
        if args.save_model:
            state = {"format": CHECKPOINT_FORMAT, "program": program, "kind": model_kind(args),
                     "shape": shape, "args": _config(args), "epoch": epoch + 1,
                     "precision": precision, "model": net.state_dict(),
                     "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict() if scheduler is not None else None,
                     "rng": rng_state(generator, device), "metrics": metrics.history}
            save_checkpoint(save_dir / CHECKPOINT_NAME, state)
            if args.keep_epoch_models:
                save_checkpoint(save_dir / f"checkpoint_epoch{epoch + 1}.pt", state)
    metrics.write()
    return metrics.document()


def _d_out(net: nn.Module) -> int:
    last = net.layers[-1]
    return int(getattr(last, "r_out", None) or getattr(last, "n_out"))


def _describe(net: nn.Module) -> str:
    if isinstance(net, InfMLP):
        return f"r={net.r}, L={net.L}"
    return f"width {net.n}, L={net.L}"


# =========================================================================== feature kernels

def _linear_kernel(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    return A.double() @ B.double().T


@torch.no_grad()
def feature_kernel_inputs(net: nn.Module, kind: str, data: ImageSet, batch_size: int,
                          normalize_features: bool = False):
    """``(features, kernel_fn)`` of the last hidden layer, for kernel ridge regression.

    * infinite net: ``features`` = ``g`` (N × r), the preactivation entering the output layer,
      and ``kernel_fn`` = :func:`experiments.kernels.feature_kernel` (``s s' F00(ĝ·ĝ')``; with
      ``--layernorm`` or ``normalize_features``: ``F00(ĝ·ĝ')``);
    * finite π-net or μP net: ``features`` = ``φ(h)`` (N × n; ``h`` normalised first under
      layernorm, ``φ(h)/|φ(h)|`` with ``normalize_features``) and ``kernel_fn`` the dot product.

    Features are float32 on the net's device; kernel blocks are float64.
    """
    net.eval()
    parts = []
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)), device=data.images.device)
        _, h = net(data.inputs(idx), return_hidden=True)
        h = h.float()
        if kind != "infinite":
            if getattr(net, "layernorm", False):
                h = h / h.norm(dim=1, keepdim=True).clamp_min(1e-30)
            h = torch.relu(h)
            if normalize_features:
                h = h / h.norm(dim=1, keepdim=True).clamp_min(1e-30)
        parts.append(h)
    net.train()
    features = torch.cat(parts) if parts else torch.empty(0)
    if kind == "infinite":
        unit = normalize_features or getattr(net, "layernorm", False)

        def kernel_fn(A, B):
            return feature_kernel(A, B, layernorm=unit)
        return features, kernel_fn
    return features, _linear_kernel


def feature_kernel_accuracy(net: nn.Module, kind: str, train: ImageSet, test: ImageSet, args,
                            progress: bool = True) -> float:
    """Test accuracy of kernel ridge regression with the net's feature kernel (``--kernel-reg``,
    ``--krr-method``, ``--krr-float64``, ``--krr-block-size``)."""
    X_train, kernel_fn = feature_kernel_inputs(net, kind, train, args.test_batch_size,
                                               args.normalize_features)
    X_test, _ = feature_kernel_inputs(net, kind, test, args.test_batch_size,
                                      args.normalize_features)
    dtype = torch.float64 if args.krr_float64 else None
    return kernel_ridge_regression(
        kernel_fn, X_train, train.labels, X_test, test.labels, num_classes=train.num_classes,
        kernel_reg=args.kernel_reg, method=args.krr_method, dtype=dtype,
        block_size=args.krr_block_size, progress=progress)
