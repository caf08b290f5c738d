"""Meta-train a π-net (infinite or finite) or a μP MLP with MAML on Omniglot.

The π-limit paper's few-shot experiment (5-way 1-shot Omniglot, the inner loop
adapts the readout only) runs with::

    python -m experiments.meta.train dataset --dataset omniglot --num-ways 5 --num-shots 1 \\
        --use-cuda --step-size 0.5 --batch-size 8 --num-workers 2 --num-epochs 2 \\
        --output-folder results --meta-lr .1 --grad-clip 0.1 --meta-momentum 0 \\
        --num-shots-test 1 --normalize None --hidden-size -1 --bias-alpha 4 --infnet_r 200 \\
        --first-layer-alpha 2 --verbose --first-layer-lr-mult 0.2 --dtype float16 \\
        --num-batches 1000 --num-test-batches 500 --adapt-readout-only --Gproj-inner \\
        --Gproj-outer --last-layer-lr-mult 0 --scheduler cosine --readout-zero-init --depth 1

``dataset`` is the Omniglot folder (see ``experiments/data/omniglot.py``; nothing is
downloaded). ``--hidden-size -1`` is the infinite π-net, a positive value a finite
π-net of that width sampled from an infinite one, and ``--mu-net`` (alias
``--mu-init``, ``--gaussian-init``) with a positive width the μP MLP. Images are
flattened to 784 inputs. See docs/maml.md for the math and all options.

Outputs, in ``--output-folder/<run name>`` (the name is the model kind and a hash of
the options unless ``--run-name`` is given): ``config.json``; ``metrics.json`` and
``metrics.csv`` (per epoch: train/val outer loss and accuracy, learning rate, gradient
norm, times); ``model.pt`` (state dict with the best validation accuracy) and
``model_last.pt`` (the last epoch's); every file is replaced atomically.
Evaluate a run on the test split with ``python -m experiments.meta.test RUN_DIR``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from experiments import cli, runs
from experiments.cli import ConfigError
from experiments.data.omniglot import (
    DEFAULT_SPLIT_SIZES,
    OmniglotError,
    OmniglotSplit,
    load_omniglot,
    proportional_split_sizes,
)
from experiments.meta.maml import MetaLearner, build_model, make_meta_optimizer
from experiments.meta.sampler import TaskSampler
from experiments.models import canonical_kind

__all__ = [
    "build_parser",
    "parse_args",
    "main",
    "ConfigError",
    "model_kind_from_args",
    "resolve_precision",
    "build_net",
    "make_learner",
    "load_splits",
    "task_sampler",
    "split_seed",
    "replace_atomically",
    "load_state",
]

PROG = "python -m experiments.meta.train"
PROGRAM = "meta.train"
CONFIG_JSON = "config.json"
METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
BEST_MODEL = "model.pt"
LAST_MODEL = "model_last.pt"
IMAGE_SIZE = 28
METRIC_COLUMNS = (
    "epoch",
    "train_mean_outer_loss",
    "train_median_outer_loss",
    "train_accuracy",
    "train_accuracy_before",
    "train_grad_norm",
    "val_mean_outer_loss",
    "val_median_outer_loss",
    "val_accuracy",
    "val_accuracy_ci95",
    "lr",
    "rows",
    "train_time_s",
    "val_time_s",
)
# options that only say how to run, not what is trained (left out of the run name's hash)
OPERATIONAL = (
    "folder",
    "output_folder",
    "verbose",
    "num_workers",
    "use_cuda",
    "overwrite_existing",
    "no_progress",
    "run_name",
    "threads",
    "cache_file",
)
CURVE_PANELS = (
    ("mean outer loss", ("train_mean_outer_loss", "val_mean_outer_loss")),
    ("query accuracy", ("train_accuracy", "val_accuracy")),
)


# --------------------------------------------------------------------------- command line


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(
        prog=PROG, description="MAML on Omniglot with infinite/finite π-nets or μP MLPs (no torchmeta)."
    )
    p.add_argument(
        "folder",
        help="Omniglot data folder (images_background/ and images_evaluation/, "
        "as folders or the official zips)",
    )
    p.add_argument("--dataset", default="omniglot", choices=("omniglot",), help="only Omniglot is supported")
    p.add_argument(
        "--output-folder", default=None, help="where run folders are written (nothing is saved if not given)"
    )
    p.add_argument(
        "--run-name",
        default=None,
        help="run folder name inside --output-folder (default: model kind + options hash)",
    )
    p.add_argument(
        "--load-model-path",
        default=None,
        help="model to start from: a model.pt of a run (or a plain state dict)",
    )
    p.add_argument("--num-ways", type=int, default=5, help="classes per task (N)")
    p.add_argument("--num-shots", type=int, default=5, help="support examples per class (K)")
    p.add_argument(
        "--num-shots-test", type=int, default=15, help="query examples per class; <= 0 means --num-shots"
    )
    p.add_argument(
        "--split-sizes",
        default="auto",
        help="characters in train,val,test: 'auto' (the standard 1028,172,423 when the "
        "data holds enough characters, else 'proportional'), 'proportional', or "
        "three counts 'a,b,c'",
    )
    p.add_argument(
        "--no-cache-file",
        dest="cache_file",
        action="store_false",
        help="do not keep the resized images in <folder>/omniglot_cache_28px_lanczos.npz",
    )
    # model
    p.add_argument(
        "--hidden-size",
        type=int,
        default=-1,
        help="width; negative: infinite π-net; positive: finite π-net (or μP MLP with --mu-net)",
    )
    p.add_argument(
        "--mu-net",
        "--mu-init",
        "--gaussian-init",
        dest="mu_net",
        action="store_true",
        help="use the μP MLP with Gaussian init (inf.networks.MuMLP) instead of a π-net; "
        "needs a positive --hidden-size",
    )
    p.add_argument("--depth", type=int, default=2, help="number of hidden layers (L)")
    p.add_argument(
        "--infnet-r",
        "--infnet_r",
        dest="infnet_r",
        type=cli.positive_int,
        default=100,
        help="rank r of the π-net (the infinite net, and the one finite π-nets are sampled from)",
    )
    p.add_argument(
        "--normalize",
        default="None",
        choices=("None", "LN", "BN"),
        help="None, or LN (layernorm variant of the π-layers); BN is not supported",
    )
    p.add_argument("--bias-alpha", type=float, default=1.0, help="bias multiplier β of input/hidden layers")
    p.add_argument(
        "--last-bias-alpha",
        type=float,
        default=0.0,
        help="bias multiplier of the readout; 0 (default): the readout has no bias",
    )
    p.add_argument("--first-layer-alpha", type=float, default=1.0, help="α_1, multiplies the first layer")
    p.add_argument("--last-layer-alpha", type=float, default=1.0, help="α_L, multiplies the readout")
    p.add_argument(
        "--readout-zero-init",
        action="store_true",
        help="μP MLP: zero readout at init (π-nets always start with a zero readout)",
    )
    p.add_argument(
        "--adapt-readout-only",
        action="store_true",
        help="the inner loop adapts the readout only (required for the infinite net)",
    )
    # optimization
    p.add_argument("--optimizer", default="sgd", choices=("sgd",), help="outer optimizer (InfSGD)")
    p.add_argument("--meta-lr", type=cli.positive_float, default=1e-3, help="outer learning rate")
    p.add_argument("--meta-momentum", type=cli.nonnegative_float, default=0.0, help="outer momentum")
    p.add_argument("--meta-weight-decay", type=cli.nonnegative_float, default=0.0, help="outer weight decay")
    p.add_argument(
        "--scheduler",
        default="None",
        choices=("None", "cosine", "multistep", "linear", "exp"),
        help="outer lr schedule, stepped once per meta-batch",
    )
    p.add_argument(
        "--lr-drop-ratio",
        type=float,
        default=0.5,
        help="multistep: factor at each milestone; exp: factor per epoch",
    )
    p.add_argument(
        "--lr-drop-milestones",
        default="",
        help="multistep: comma-separated epochs (fractions allowed) at which the lr drops",
    )
    p.add_argument(
        "--first-layer-lr-mult",
        type=cli.nonnegative_float,
        default=1.0,
        help="lr multiplier of the input layer",
    )
    p.add_argument(
        "--last-layer-lr-mult",
        type=cli.nonnegative_float,
        default=1.0,
        help="lr multiplier of the readout (0 freezes it in the outer loop)",
    )
    p.add_argument("--bias-lr-mult", type=cli.nonnegative_float, default=1.0, help="lr multiplier of biases")
    p.add_argument(
        "--grad-clip",
        type=float,
        default=-1.0,
        help="clip the outer gradient to this norm (π-aware); <= 0: no clipping",
    )
    p.add_argument("--gclip-per-param", action="store_true", help="clip every parameter tensor separately")
    p.add_argument("--batch-size", type=int, default=25, help="tasks per meta-batch")
    p.add_argument("--num-steps", type=int, default=1, help="inner (adaptation) steps")
    p.add_argument("--num-epochs", type=int, default=50, help="epochs of meta-training")
    p.add_argument("--num-batches", type=int, default=100, help="meta-batches per epoch")
    p.add_argument("--num-test-batches", type=int, default=100, help="meta-batches per validation")
    p.add_argument(
        "--step-size",
        type=cli.nonnegative_float,
        default=0.1,
        help="inner learning rate η (0: no adaptation)",
    )
    p.add_argument("--first-order", action="store_true", help="first-order MAML (default: second order)")
    p.add_argument(
        "--Gproj-inner",
        dest="Gproj_inner",
        action="store_true",
        help="finite π-nets: project inner gradients of π-weights onto span(Ω) (the readout "
        "is never projected, so this matters only without --adapt-readout-only)",
    )
    p.add_argument(
        "--Gproj-outer",
        dest="Gproj_outer",
        action="store_true",
        help="finite π-nets: project the outer gradients onto span(Ω) (InfSGD project=True)",
    )
    # misc
    p.add_argument(
        "--num-workers",
        type=int,
        default=1,
        help="accepted for compatibility; tasks are sampled from images held in memory "
        "in the main process, so it has no effect",
    )
    p.add_argument("--verbose", action="store_true", help="print the configuration and the model")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--use-cuda", action="store_true", help="run on the GPU (an error on a machine without one)"
    )
    cli.add_threads_arg(p)
    p.add_argument(
        "--overwrite-existing",
        "--overwrite",
        dest="overwrite_existing",
        action="store_true",
        help="run again even if the run folder holds a finished run",
    )
    p.add_argument(
        "--validate-only",
        action="store_true",
        help="no training: evaluate the (loaded) model once on --test-dataset-split",
    )
    p.add_argument(
        "--test-dataset-split",
        default="val",
        choices=("val", "test"),
        help="split evaluated after every epoch (and by --validate-only)",
    )
    p.add_argument("--seed", type=int, default=1, help="seeds the model and the task sampling")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float16", "float32", "float64"),
        help="precision; float16: see docs/maml.md (rows in half for the infinite net)",
    )
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.num_shots_test <= 0:
        args.num_shots_test = args.num_shots
    return args


def model_kind_from_args(args) -> str:
    """``"infinite"`` (negative --hidden-size), ``"finite"`` or ``"mup"`` (--mu-net)."""
    if args.mu_net:
        return "mup"
    return "infinite" if args.hidden_size < 0 else "finite"


def _check_args(args) -> None:
    kind = model_kind_from_args(args)
    if args.hidden_size == 0:
        raise ConfigError("--hidden-size 0 is not a width: use -1 (infinite) or a positive width")
    if kind == "mup" and args.hidden_size < 0:
        raise ConfigError("--mu-net needs a finite width: pass a positive --hidden-size")
    if args.normalize == "BN":
        raise ConfigError("--normalize BN is not supported for π-nets; use None or LN")
    if kind == "infinite" and not args.adapt_readout_only:
        raise ConfigError(
            "the infinite π-net (--hidden-size -1) adapts the readout only: add "
            "--adapt-readout-only (full adaptation works for finite nets)"
        )
    if args.seed < 0:
        raise ConfigError(f"--seed must be non-negative, got {args.seed}")
    for name in ("num_ways", "num_shots", "batch_size", "num_steps", "infnet_r"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("num_epochs", "num_batches", "num_test_batches"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")


# --------------------------------------------------------------------------- precision, model


def resolve_precision(kind: str, dtype_name: str, device: torch.device):
    """``(parameter dtype, rows dtype or None, notice or None)`` for ``--dtype``.

    float16 never trains a whole network in half on the CPU: the infinite net keeps
    its rows (A, B of the π-layers, the memory that grows) in float16 with float32
    coefficients, input layer, biases and computation, on any device; a finite net
    runs in float16 on a GPU and falls back to float32 on the CPU.
    """
    if dtype_name == "float64":
        return torch.float64, None, None
    if dtype_name == "float32":
        return torch.float32, None, None
    if canonical_kind(kind) == "infinite":
        return (
            torch.float32,
            torch.float16,
            (
                "--dtype float16: the infinite layers' rows (A, B) are stored in float16; "
                "coefficients, input layer, biases and all computation stay float32"
            ),
        )
    if device.type == "cuda":
        return torch.float16, None, None
    return (
        torch.float32,
        None,
        (
            "--dtype float16: half-precision training of a finite network is not supported on the "
            "CPU; using float32 instead"
        ),
    )


def build_net(cfg: dict, device: torch.device):
    """The network a configuration (``vars(args)``) describes, freshly initialized."""
    kind = model_kind_from_args(argparse.Namespace(**cfg))
    dtype, rows_dtype, _ = resolve_precision(kind, cfg["dtype"], device)
    return build_model(
        kind,
        IMAGE_SIZE * IMAGE_SIZE,
        cfg["num_ways"],
        width=cfg["hidden_size"] if kind != "infinite" else None,
        r=cfg["infnet_r"],
        depth=cfg["depth"],
        first_layer_alpha=cfg["first_layer_alpha"],
        last_layer_alpha=cfg["last_layer_alpha"],
        bias_alpha=cfg["bias_alpha"],
        last_bias_alpha=cfg["last_bias_alpha"],
        layernorm=cfg["normalize"] == "LN",
        readout_zero_init=cfg["readout_zero_init"],
        dtype=dtype,
        rows_dtype=rows_dtype,
        device=device,
        seed=cfg["seed"],
    )


def load_state(net, path, device, flag: str = "--load-model-path") -> None:
    """Load a model saved by this program (a ``model.pt`` checkpoint, or a plain state dict)
    into ``net``: tensors and plain data only (a crafted file cannot run code); one-line
    :class:`ConfigError` if it is missing, unreadable, unsafe or does not fit."""
    state = runs.safe_load(path, "model", flag, map_location=device)
    if isinstance(state, dict) and state.get("format") == runs.CHECKPOINT_FORMAT:
        state = state.get("model")
    if not isinstance(state, dict):
        raise ConfigError(f"{flag} {path} holds no model state — pass a model.pt of a run")
    try:
        net.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(
            f"{flag} {path} does not fit this model ({first}) — use the run's "
            f"--hidden-size, --infnet_r, --depth, --num-ways, --mu-net and bias "
            f"alphas"
        ) from None


def _schedule(optimizer, cfg: dict):
    total = max(1, cfg["num_epochs"] * cfg["num_batches"])
    name = cfg["scheduler"]
    if name in (None, "None"):
        return None
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if name == "multistep":
        ms = [int(float(e) * cfg["num_batches"]) for e in cfg["lr_drop_milestones"].split(",") if e.strip()]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=ms, gamma=cfg["lr_drop_ratio"])
    if name == "linear":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: max(0.0, 1.0 - t / total))
    if name == "exp":
        per_step = cfg["lr_drop_ratio"] ** (1.0 / max(1, cfg["num_batches"]))
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=per_step)
    raise ConfigError(f"unknown scheduler {name!r}")


def make_learner(net, cfg: dict, train: bool = True) -> MetaLearner:
    """MetaLearner (with the outer optimizer and schedule when ``train``) for a config."""
    opt = sched = None
    if train:
        opt = make_meta_optimizer(
            net,
            cfg["meta_lr"],
            momentum=cfg["meta_momentum"],
            first_layer_lr_mult=cfg["first_layer_lr_mult"],
            last_layer_lr_mult=cfg["last_layer_lr_mult"],
            bias_lr_mult=cfg["bias_lr_mult"],
            weight_decay=cfg["meta_weight_decay"],
            gproj_outer=cfg["Gproj_outer"],
        )
        sched = _schedule(opt, cfg)
    return MetaLearner(
        net,
        opt,
        sched,
        step_size=cfg["step_size"],
        num_steps=cfg["num_steps"],
        first_order=cfg["first_order"],
        adapt_readout_only=cfg["adapt_readout_only"],
        gproj_inner=cfg["Gproj_inner"],
        gproj_outer=cfg["Gproj_outer"],
        grad_clip=cfg["grad_clip"],
        gclip_per_param=cfg["gclip_per_param"],
    )


# --------------------------------------------------------------------------- data


def _split_sizes(spec, n_characters: int):
    if isinstance(spec, (list, tuple)):
        return tuple(int(v) for v in spec)
    if spec == "auto":
        return DEFAULT_SPLIT_SIZES if n_characters >= sum(DEFAULT_SPLIT_SIZES) else "proportional"
    if spec == "proportional":
        return spec
    try:
        sizes = tuple(int(v) for v in str(spec).split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3:
        raise ConfigError(
            f"--split-sizes must be 'auto', 'proportional' or three counts 'a,b,c', got {spec!r}"
        )
    return sizes


def load_splits(folder, split_sizes="auto", names=("train", "val", "test"), cache_file=True):
    """Load Omniglot from ``folder`` and return ``({split: OmniglotSplit}, sizes)``.

    Raises :class:`ConfigError` with the loader's explanation when the data is
    missing or unreadable.
    """
    try:
        data = load_omniglot(folder, image_size=IMAGE_SIZE, cache_file=cache_file)
        sizes = _split_sizes(split_sizes, len(data))
        if sizes == "proportional":
            sizes = proportional_split_sizes(len(data))
            if split_sizes == "auto":  # never leave the standard split silently
                print(
                    f"note: {folder} holds {len(data)} Omniglot characters, fewer than the "
                    f"{sum(DEFAULT_SPLIT_SIZES)} of the standard split {DEFAULT_SPLIT_SIZES}; "
                    f"--split-sizes auto uses the proportional split {tuple(sizes)} instead "
                    f"(not comparable with results on the standard split)",
                    file=sys.stderr,
                )
        return {name: OmniglotSplit(data, name, sizes) for name in names}, tuple(sizes)
    except OmniglotError as e:
        raise ConfigError(str(e)) from e


def split_seed(seed: int, split: str) -> int:
    """Seed of the task sampler of one split (train, val and test draw different tasks)."""
    return 3 * int(seed) + {"train": 0, "val": 1, "test": 2}[split]


def task_sampler(
    split: OmniglotSplit, cfg: dict, seed: int, batch_size=None, num_batches=None
) -> TaskSampler:
    try:
        return TaskSampler(
            split,
            num_ways=cfg["num_ways"],
            num_shots=cfg["num_shots"],
            num_shots_test=cfg["num_shots_test"],
            batch_size=batch_size or cfg["batch_size"],
            num_batches=num_batches,
            seed=seed,
            flatten=True,
        )
    except ValueError as e:
        raise ConfigError(
            f"cannot sample {cfg['num_ways']}-way {cfg['num_shots']}-shot tasks from "
            f"the {split.name!r} split: {e}"
        ) from e


# --------------------------------------------------------------------------- files

# one atomic writer for every program (stale temporaries of crashed runs are removed)
replace_atomically = runs.atomic_write


def _write_json(path: Path, doc) -> None:
    runs.write_json(path, doc)


def _write_metrics(out: Path, config: dict, history: list[dict], summary: dict, finished: bool) -> None:
    _write_json(
        out / METRICS_JSON, {"config": config, "summary": summary, "epochs": history, "finished": finished}
    )
    runs.write_csv(
        out / METRICS_CSV, [{k: row.get(k) for k in METRIC_COLUMNS} for row in history], METRIC_COLUMNS
    )
    if history:
        runs.plot_curves(
            history, out / "curves.png", f"MAML: {config.get('model_kind')} net", panels=CURVE_PANELS
        )


def _save_model(net, path: Path, epoch: int = 0, kind: str | None = None) -> None:
    runs.save_checkpoint(path, {"program": PROGRAM, "kind": kind, "epoch": epoch, "model": net.state_dict()})


def _run_name(cfg: dict, kind: str) -> str:
    """``<kind>_<hash of every option but the operational ones>``."""
    return runs.run_name(kind, cfg, OPERATIONAL)


def _base_lr(optimizer, default: float) -> float:
    """The current meta learning rate (a group's lr divided by its multiplier)."""
    for g in optimizer.param_groups:
        if g.get("lr_mult"):
            return g["lr"] / g["lr_mult"]
    return default


def _rows(net) -> list[int] | None:
    return net.rows_per_layer() if hasattr(net, "rows_per_layer") else None


# --------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    """Run the program; returns the metrics document. A user error is one line on stderr and
    exit status 2."""
    args = parse_args(argv)
    try:
        return _main(args)
    except (*cli.USER_ERRORS, OSError) as e:
        message = cli.user_error_message(e)
        if message is None:
            raise
        cli.fail(PROG, message)


def _main(args) -> dict:
    _check_args(args)
    device = cli.resolve_device_flag("cuda" if args.use_cuda else "cpu", "--use-cuda")
    cli.apply_threads(args.threads)
    kind = model_kind_from_args(args)
    cfg = vars(args).copy()
    _, _, notice = resolve_precision(kind, args.dtype, device)
    if notice:
        print(f"note: {notice}", file=sys.stderr)
    if args.num_workers not in (0, 1):
        print(
            f"note: --num-workers {args.num_workers} has no effect: tasks are drawn from images "
            "held in memory, in the main process",
            file=sys.stderr,
        )

    eval_split = args.test_dataset_split
    splits, sizes = load_splits(
        args.folder,
        args.split_sizes,
        names=(eval_split,) if args.validate_only else ("train", eval_split),
        cache_file=args.cache_file,
    )
    cfg.update(
        model_kind=kind,
        split_sizes_resolved=list(sizes),
        image_size=IMAGE_SIZE,
        folder=str(Path(args.folder).resolve()),
    )

    net = build_net(cfg, device)
    if args.load_model_path:
        load_state(net, args.load_model_path, device, "--load-model-path")
    learner = make_learner(net, cfg, train=not args.validate_only)
    eval_sampler = task_sampler(splits[eval_split], cfg, split_seed(args.seed, eval_split))
    train_sampler = (
        None if args.validate_only else task_sampler(splits["train"], cfg, split_seed(args.seed, "train"))
    )

    out = None
    if args.output_folder:
        out = Path(args.output_folder) / (args.run_name or _run_name(cfg, kind))
        if (out / METRICS_JSON).is_file() and not args.overwrite_existing:
            try:
                doc = json.loads((out / METRICS_JSON).read_text())
            except (OSError, ValueError):
                doc = {}
            if doc.get("finished"):
                summary = doc.get("summary") or {}
                shown = ", ".join(
                    f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()
                )
                print(
                    f"{out} already holds a finished run; skipping (pass --overwrite-existing to "
                    f"rerun){': ' + shown if shown else ''}"
                )
                return doc
            raise runs.RunExists(
                f"{out} holds an unfinished run with these options — pass "
                f"--overwrite-existing to start it again, or --run-name NAME"
            )
        out = runs.run_dir(out.parent, out.name, overwrite=True)  # created; stale temporaries removed
        cfg["run_dir"] = str(out.resolve())
        _write_json(out / CONFIG_JSON, cfg)
    if args.verbose:
        print(json.dumps(cfg, indent=1, default=str))
        print(net)
    print(
        f"{kind} net, {sizes} characters in train/val/test, device {device}"
        + (f", run folder {out}" if out else "")
    )

    progress = not args.no_progress
    history: list[dict] = []
    summary: dict = {}
    if args.validate_only:
        t0 = time.time()
        bar = cli.progress_bar(
            total=args.num_test_batches, desc=f"validate ({eval_split})", enabled=progress, leave=False
        )
        res = learner.evaluate((eval_sampler.sample_batch(i) for i in range(args.num_test_batches)), bar)
        bar.close()
        summary = {f"{eval_split}_{k}": v for k, v in res.items()}
        summary["time_s"] = time.time() - t0
        print(
            f"{eval_split} accuracy {100 * res['accuracy']:.2f}% ± {100 * res['accuracy_ci95']:.2f}% "
            f"(95% CI, {res['num_tasks']} tasks), outer loss {res['mean_outer_loss']:.4f}"
        )
        if out:
            _write_metrics(out, cfg, history, summary, True)
        return {"config": cfg, "summary": summary, "epochs": history, "finished": True}

    best = -math.inf
    for epoch in range(args.num_epochs):
        t0 = time.time()
        lr = _base_lr(learner.optimizer, args.meta_lr)
        losses, accs, before, gnorms = [], [], [], []
        bar = cli.progress_bar(
            range(args.num_batches),
            desc=f"epoch {epoch + 1}/{args.num_epochs}",
            enabled=progress,
            leave=False,
        )
        for i in bar:
            res = learner.meta_step(train_sampler.sample_batch(epoch * args.num_batches + i))
            losses += [t.outer_loss for t in res["tasks"]]
            accs += [t.acc_after for t in res["tasks"]]
            before += [t.acc_before for t in res["tasks"]]
            gnorms.append(res["grad_norm"])
            bar.set_postfix(loss=f"{np.mean(losses):.4f}", acc=f"{np.mean(accs):.4f}")
        bar.close()
        t1 = time.time()
        vbar = cli.progress_bar(
            total=args.num_test_batches, desc=f"validate ({eval_split})", enabled=progress, leave=False
        )
        val = learner.evaluate((eval_sampler.sample_batch(i) for i in range(args.num_test_batches)), vbar)
        vbar.close()
        t2 = time.time()
        row = {
            "epoch": epoch + 1,
            "train_mean_outer_loss": float(np.mean(losses)) if losses else float("nan"),
            "train_median_outer_loss": float(np.median(losses)) if losses else float("nan"),
            "train_accuracy": float(np.mean(accs)) if accs else float("nan"),
            "train_accuracy_before": float(np.mean(before)) if before else float("nan"),
            "train_grad_norm": float(np.mean(gnorms)) if gnorms else float("nan"),
            "val_mean_outer_loss": val["mean_outer_loss"],
            "val_median_outer_loss": val["median_outer_loss"],
            "val_accuracy": val["accuracy"],
            "val_accuracy_ci95": val["accuracy_ci95"],
            "lr": lr,
            "rows": _rows(net),
            "train_time_s": t1 - t0,
            "val_time_s": t2 - t1,
        }
        history.append(row)
        print(
            f"epoch {epoch + 1}: train loss {row['train_mean_outer_loss']:.4f} acc {row['train_accuracy']:.4f} | "
            f"{eval_split} loss {val['mean_outer_loss']:.4f} acc {val['accuracy']:.4f} "
            f"± {val['accuracy_ci95']:.4f} | {t1 - t0:.1f}s + {t2 - t1:.1f}s"
            + (f" | rows {row['rows']}" if row["rows"] else "")
        )
        improved = val["accuracy"] > best or not math.isfinite(best)
        if improved:
            best = val["accuracy"]
            summary = {
                "best_epoch": epoch + 1,
                f"best_{eval_split}_accuracy": best,
                f"best_{eval_split}_accuracy_ci95": val["accuracy_ci95"],
            }
        summary.update(
            epochs_done=epoch + 1,
            final_train_accuracy=row["train_accuracy"],
            **{f"final_{eval_split}_accuracy": val["accuracy"]},
        )
        if out:
            if improved:
                _save_model(net, out / BEST_MODEL, epoch + 1, kind)
            _save_model(net, out / LAST_MODEL, epoch + 1, kind)
            _write_metrics(out, cfg, history, summary, finished=epoch + 1 == args.num_epochs)
    if out and args.num_epochs == 0:
        _save_model(net, out / BEST_MODEL, 0, kind)
        _save_model(net, out / LAST_MODEL, 0, kind)
        _write_metrics(out, cfg, history, summary, True)
    return {"config": cfg, "summary": summary, "epochs": history, "finished": True}


if __name__ == "__main__":
    main(sys.argv[1:])
