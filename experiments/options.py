"""The option groups of the π-MLP training programs (CIFAR-10, ImageNet transfer).

:func:`add_model_args`, :func:`add_optim_args`, :func:`add_run_args`, :func:`add_krr_args`
declare the options; :func:`check_args` applies the rules between them; :func:`model_spec`
turns the network options into an :class:`experiments.models.ModelSpec`.

Model kinds (the vocabulary of :mod:`experiments.models`): ``--width 0`` is the ``infinite``
π-MLP, ``--width n`` a ``finite`` π-net sampled from a fresh infinite one, ``--width n
--gaussian-init`` the ``mup`` MLP.
"""

from __future__ import annotations

import argparse
import logging
import random

import numpy as np
import torch

from experiments import cli
from experiments.losses import LOSS_HELP, LOSSES
from experiments.models import ModelSpec

__all__ = [
    "IntListAction",
    "add_model_args",
    "add_optim_args",
    "add_run_args",
    "add_krr_args",
    "check_args",
    "setup_logging",
    "device_from_args",
    "seed_everything",
    "model_kind",
    "model_spec",
    "ARCH_KEYS",
    "OPERATIONAL_KEYS",
]

log = logging.getLogger("experiments")

# options that fix the network's architecture: a checkpoint is only loaded into a net built
# with the same values
ARCH_KEYS = (
    "width",
    "r",
    "depth",
    "first_layer_alpha",
    "last_layer_alpha",
    "bias_alpha",
    "last_bias_alpha",
    "layernorm",
    "gaussian_init",
    "tract_lambda",
)
# options that say how to run or where to write, not what is computed: left out of the hash
# that names a run's folder
OPERATIONAL_KEYS = (
    "save_dir",
    "save_model",
    "keep_epoch_models",
    "model_path",
    "load_model_path",
    "evaluate_only",
    "stop_after_epochs",
    "human",
    "no_progress",
    "threads",
    "overwrite",
    "test_batch_size",
    "krr_block_size",
    "batch_size_given",
    "data",
    "cifar_data",
    "imagenet_data",
)


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
    g.add_argument(
        "--width",
        type=cli.nonnegative_int,
        default=0,
        help="0: the infinite-width π-MLP; n > 0: a finite net of width n (a π-net "
        "sampled from a fresh infinite one, or a μP MLP with --gaussian-init)",
    )
    g.add_argument("--r", type=cli.positive_int, default=r, help="rank r of the π-net (ignored by μP nets)")
    g.add_argument(
        "--depth",
        type=cli.nonnegative_int,
        default=depth,
        help="number L of hidden π-layers; the net is input layer, L hidden layers, "
        "output layer (L+1 ReLU layers)",
    )
    g.add_argument(
        "--first-layer-alpha", type=float, default=1.0, help="multiplier α_1 of the input layer's output"
    )
    g.add_argument(
        "--last-layer-alpha",
        type=float,
        default=1.0,
        help="multiplier α_L of the output layer (bias included)",
    )
    g.add_argument("--bias-alpha", type=float, default=1.0, help="multiplier β of every bias (0: no biases)")
    g.add_argument(
        "--last-bias-alpha",
        type=float,
        default=None,
        help="β of the output layer's bias (default: --bias-alpha)",
    )
    g.add_argument(
        "--layernorm", action="store_true", help="normalise each hidden preactivation before the ReLU"
    )
    g.add_argument(
        "--gaussian-init",
        action="store_true",
        help="with --width n: the μP baseline (μ-Net), inf.networks.MuMLP, Gaussian "
        "init and no gradient projection (implies --no-Gproj)",
    )
    g.add_argument(
        "--no-Gproj",
        dest="no_Gproj",
        action="store_true",
        help="finite nets: do not project gradients onto span(Ω)",
    )
    g.add_argument(
        "--tract-lambda",
        type=cli.nonnegative_float,
        default=0.0,
        help="train the input layer with TrAct with this λ (0: off)",
    )
    return g


def add_optim_args(
    parser: argparse.ArgumentParser,
    *,
    lr: float = 2.0,
    wd: float = 1e-4,
    gclip: float = 0.2,
    batch_size: int = 64,
    epochs: int = 24,
    first_layer_lr_mult: float = 0.1,
):
    """Optimizer, schedule and clipping options (defaults are the original programs')."""
    g = parser.add_argument_group("optimization")
    g.add_argument("--lr", type=cli.positive_float, default=lr, help="learning rate")
    g.add_argument("--momentum", type=cli.nonnegative_float, default=0.0, help="SGD momentum")
    g.add_argument("--wd", type=cli.nonnegative_float, default=wd, help="weight decay")
    g.add_argument(
        "--first-layer-lr-mult",
        type=cli.nonnegative_float,
        default=first_layer_lr_mult,
        help="lr multiplier of the input layer's weights",
    )
    g.add_argument(
        "--last-layer-lr-mult",
        type=cli.nonnegative_float,
        default=1.0,
        help="lr multiplier of the output layer's weights",
    )
    g.add_argument(
        "--bias-lr-mult",
        type=cli.nonnegative_float,
        default=0.5,
        help="lr multiplier of the biases (times the layer's own multiplier)",
    )
    g.add_argument(
        "--no-apply-lr-mult-to-wd",
        dest="apply_lr_mult_to_wd",
        action="store_false",
        help="keep the per-step decay lr·wd the same in every group (each group's "
        "wd is divided by its lr multiplier); without this flag a group's "
        "decay scales with its lr multiplier",
    )
    g.add_argument(
        "--gclip",
        type=cli.nonnegative_float,
        default=gclip,
        help="gradient-norm clipping threshold (0: off); π-aware (inf.utils.clip_grad_norm_)",
    )
    g.add_argument(
        "--gclip-per-param",
        action="store_true",
        help="clip every parameter (an infinite layer's weight, a bias, a finite "
        "weight) separately instead of the global norm",
    )
    g.add_argument(
        "--gclip-drop-milestones",
        action=IntListAction,
        default=None,
        metavar="EPOCH",
        help="epochs after which --gclip is multiplied by --gclip-drop-ratio "
        "(default: the --lr-drop-milestones of a multistep schedule, as the "
        "original programs did; 'none' for never)",
    )
    g.add_argument(
        "--gclip-drop-ratio",
        type=cli.nonnegative_float,
        default=None,
        help="factor of each clipping drop (default: --lr-drop-ratio)",
    )
    g.add_argument(
        "--scheduler",
        type=str.lower,
        default="none",
        choices=("none", "multistep", "cosine"),
        help="learning-rate schedule, stepped once per epoch: multistep multiplies "
        "the lr by --lr-drop-ratio after each of --lr-drop-milestones epochs; "
        "cosine anneals it to 0 over --epochs",
    )
    g.add_argument(
        "--lr-drop-ratio", type=cli.nonnegative_float, default=0.5, help="multistep factor (gamma)"
    )
    g.add_argument(
        "--lr-drop-milestones",
        action=IntListAction,
        default=[],
        metavar="EPOCH",
        help="multistep milestones, in epochs (e.g. 40 or 30,40)",
    )
    g.add_argument("--epochs", type=int, default=epochs, help="epochs to train")
    g.add_argument("--batch-size", type=int, default=batch_size, help="training batch size")
    g.add_argument(
        "--test-batch-size", type=int, default=500, help="batch size of evaluation and feature passes"
    )
    g.add_argument(
        "--accum-steps",
        type=int,
        default=1,
        help="accumulate the gradients of this many batches per optimizer step "
        "(effective batch = batch size × accum steps)",
    )
    g.add_argument(
        "--data-augment",
        action="store_true",
        help="random crop (4-pixel zero padding) and horizontal flip of training images",
    )
    g.add_argument("--loss", choices=LOSSES, default="xent", help=LOSS_HELP)
    g.add_argument(
        "--row-budget",
        type=cli.nonnegative_int,
        default=0,
        metavar="N",
        help="rows per infinite layer: after a step, a layer with more rows is compressed "
        "to --row-budget-keep of N rows with a reported error (inf.compress.RowBudget, "
        "docs/compression.md); 0 = off",
    )
    g.add_argument(
        "--row-budget-keep",
        type=cli.positive_float,
        default=0.25,
        metavar="FRACTION",
        help="fraction of --row-budget kept by a compression (between 0 and 1)",
    )
    return g


def add_run_args(parser: argparse.ArgumentParser, *, seed: int = 1):
    """Device, precision, output, checkpoint and progress options."""
    g = parser.add_argument_group("run")
    g.add_argument("--seed", type=int, default=seed, help="random seed")
    g.add_argument("--cuda", action="store_true", help="run on the GPU (an error on a machine without one)")
    g.add_argument(
        "--float",
        action="store_true",
        help="float32 throughout; without it an infinite net on CUDA stores its rows "
        "(A, B) in float16 with float32 coefficients (on CPU: float32 anyway)",
    )
    g.add_argument(
        "--save-dir",
        default=None,
        metavar="DIR",
        help="write this run's files into its own subfolder DIR/<program>_<kind>_..."
        "_<hash of the options>: metrics.csv, metrics.json and curves.png after "
        "every epoch (and checkpoint.pt with --save-model)",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="reuse a run folder that already holds a run with the same options "
        "(its files are replaced); without it such a run is refused, or, if "
        "finished, its final metrics are printed",
    )
    g.add_argument(
        "--save-model",
        action="store_true",
        help="write RUN/checkpoint.pt (atomically) after every epoch: model, "
        "optimizer, scheduler, RNG states, epoch, options and metrics",
    )
    g.add_argument(
        "--keep-epoch-models",
        action="store_true",
        help="with --save-model, also keep RUN/checkpoint_epoch<k>.pt of every epoch",
    )
    g.add_argument(
        "--model-path",
        default=None,
        metavar="CHECKPOINT",
        help="resume from this checkpoint (continues exactly where it stopped, in "
        "the same run folder), or evaluate it with --evaluate-only",
    )
    g.add_argument(
        "--evaluate-only",
        "--test",
        dest="evaluate_only",
        action="store_true",
        help="evaluate --model-path and exit (its architecture options are used)",
    )
    g.add_argument(
        "--stop-after-epochs",
        type=cli.positive_int,
        default=None,
        metavar="K",
        help="leave after K epochs of this invocation (resume later with --model-path RUN/checkpoint.pt)",
    )
    g.add_argument(
        "--human",
        action="store_true",
        help="plain-text progress lines (about ten per epoch: loss, accuracy, rows, "
        "memory, time per step, ETA) instead of progress bars; for log files",
    )
    g.add_argument(
        "--no-progress",
        "--quiet",
        dest="no_progress",
        action="store_true",
        help="no progress bars or progress lines, only per-epoch summaries",
    )
    cli.add_threads_arg(g)
    return g


def add_krr_args(parser: argparse.ArgumentParser, *, kernel_reg: float = 1e-4):
    """Kernel-ridge-regression options (experiments.kernels.kernel_ridge_regression)."""
    g = parser.add_argument_group("kernel regression")
    g.add_argument(
        "--kernel-reg",
        type=cli.nonnegative_float,
        default=kernel_reg,
        help="ridge λ relative to the mean diagonal of the training kernel",
    )
    g.add_argument(
        "--krr-method",
        choices=("cholesky", "cg"),
        default="cholesky",
        help="cholesky: one N×N float32 matrix (10 GB at N = 50 000); cg: "
        "matrix-free conjugate gradient (slow, little memory)",
    )
    g.add_argument(
        "--krr-float64", action="store_true", help="factorise the kernel in float64 (twice the memory)"
    )
    g.add_argument("--krr-block-size", type=cli.positive_int, default=2048, help="rows per kernel block")
    g.add_argument(
        "--normalize-features",
        action="store_true",
        help="feature kernel of the unit-normalised feature (F00(ĝ·ĝ') for infinite "
        "nets, cosine of φ(h) for finite ones), as the original programs did",
    )
    return g


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Cross-option rules; calls ``parser.error`` (one line, exit status 2)."""

    def need(cond, msg):
        if not cond:
            parser.error(msg)

    for name in ("epochs", "batch_size", "test_batch_size", "accum_steps"):
        if getattr(args, name, None) is not None:
            need(getattr(args, name) >= 1, f"--{name.replace('_', '-')} must be at least 1")
    if hasattr(args, "gaussian_init"):  # the model options of add_model_args
        need(
            not (args.gaussian_init and args.width == 0),
            "--gaussian-init builds a finite μP net: give it a --width n > 0",
        )
    elif getattr(args, "width", None) is not None:  # cifar10test: sample a finite net
        need(args.width >= 1, "--width must be at least 1")
    for name in ("train_size", "test_size", "imagenet_train_size", "imagenet_test_size"):
        value = getattr(args, name, None)
        need(value is None or value >= 1, f"--{name.replace('_', '-')} must be at least 1")
    for name in ("lr_drop_milestones", "gclip_drop_milestones"):
        values = getattr(args, name, None) or []
        need(all(v >= 1 for v in values), f"--{name.replace('_', '-')} must be epochs >= 1")
    if getattr(args, "evaluate_only", False):
        need(bool(args.model_path), "--evaluate-only needs --model-path CHECKPOINT")
    if getattr(args, "save_model", False):
        need(bool(args.save_dir), "--save-model needs --save-dir DIR")


def setup_logging(quiet: bool = False) -> None:
    """INFO lines as plain text on stderr (once per process)."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.setLevel(logging.WARNING if quiet else logging.INFO)


def device_from_args(args) -> torch.device:
    """The device of ``--cuda`` (an error that says "drop --cuda" without a GPU)."""
    return cli.resolve_device_flag("cuda" if args.cuda else "cpu", "--cuda")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def model_kind(args) -> str:
    """``"infinite"`` (``--width 0``), ``"finite"`` (π-net) or ``"mup"`` (``--gaussian-init``)."""
    if args.width == 0:
        return "infinite"
    return "mup" if args.gaussian_init else "finite"


def model_spec(args, d_in: int, d_out: int) -> ModelSpec:
    """The :class:`ModelSpec` of the network options (float32; seeded with ``--seed``)."""
    return ModelSpec(
        kind=model_kind(args),
        d_in=d_in,
        d_out=d_out,
        r=args.r,
        width=args.width or None,
        depth=args.depth,
        first_layer_alpha=args.first_layer_alpha,
        last_layer_alpha=args.last_layer_alpha,
        bias_alpha=args.bias_alpha,
        last_bias_alpha=args.last_bias_alpha,
        layernorm=args.layernorm,
        tract_lambda=args.tract_lambda or None,
        seed=args.seed,
    )
