"""Shared parts of the analysis programs: data, models, training and checkpoints.

Data: scikit-learn's handwritten digits (bundled, nothing downloaded; 8×8 grey images,
standardised per pixel with the training statistics) or CIFAR-10 from disk
(``experiments.data.cifar``; per-channel normalisation). MLPs see flattened images, the
CNN sees ``C × H × W``.

Models (``--model``): ``inf`` (infinite π-MLP), ``fin`` (a finite π-MLP of width
``--width`` sampled from a fresh infinite one), ``mu`` (μP MLP) and ``cnn`` (a small
convolutional net, :class:`SmallCNN`).

Checkpoints are dicts ``{"model": state_dict, "config": {...}}`` where the config holds
everything :func:`build_model` needs; a bare state dict is accepted too, with the model
described by the command-line flags. They are written atomically and read with
``torch.load(weights_only=True)``: a file that holds Python objects (which unpickling would
run) is refused with one line, never executed.

User errors (a missing ``--data-root`` or ``--checkpoint`` file, a checkpoint that is not a
plain state dict or does not fit the model) raise :class:`experiments.cli.ConfigError`, which
the programs' ``run_main`` entry prints as one line. ``--threads N`` (added with the data
options) sets torch's CPU threads as soon as the command line is parsed.
"""

from __future__ import annotations

import argparse
import logging
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from experiments.cli import ConfigError, apply_threads, positive_int
from experiments.models import ModelSpec, canonical_kind
from experiments.models import build_model as build_spec
from inf.fileio import atomic_write
from inf.optim import InfSGD

log = logging.getLogger("analysis")

MODELS = ("inf", "fin", "mu", "cnn")
MODEL_KEYS = (
    "model",
    "r",
    "width",
    "L",
    "first_layer_alpha",
    "last_layer_alpha",
    "bias_alpha",
    "layernorm",
    "channels",
    "hidden",
    "in_shape",
    "d_out",
    "dtype",
    "seed",
)


@dataclass
class Data:
    """Standardised inputs (``x_*``: float, MLP or CNN layout), labels, and raw images for plots."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    images_train: torch.Tensor
    images_test: torch.Tensor
    classes: list[str]
    in_shape: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _stratified_head(y: torch.Tensor, n: int | None, seed: int) -> torch.Tensor:
    """Indices of ``n`` examples with classes as balanced as the data allow (fixed by ``seed``)."""
    if n is None or n >= len(y):
        return torch.arange(len(y))
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    # round-robin over classes, each class in random order
    buckets = [perm[y[perm] == c] for c in torch.unique(y)]
    order = []
    for i in range(max(len(b) for b in buckets)):
        order += [int(b[i]) for b in buckets if i < len(b)]
    return torch.tensor(sorted(order[:n]))


def load_data(
    name: str = "digits",
    root: str | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
    flatten: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Data:
    """Digits (default) or CIFAR-10, optionally subsampled (class-balanced)."""
    if name == "digits":
        from experiments.data.digits import load_digits_split

        tr_img, y_tr, te_img, y_te = load_digits_split(size=8)
        tr_img, te_img = tr_img[:, :1], te_img[:, :1]
        classes = [str(i) for i in range(10)]
        xtr, xte = tr_img.double() / 255.0, te_img.double() / 255.0
        mean, std = xtr.mean(0, keepdim=True), xtr.std(0, keepdim=True)
        std = torch.where(std > 1e-6, std, torch.ones_like(std))
        xtr, xte = (xtr - mean) / std, (xte - mean) / std
    elif name == "cifar10":
        from experiments.data.cifar import CIFAR10_MEAN, CIFAR10_STD, load_cifar10, normalize

        if root is None:
            raise ConfigError(
                "--data cifar10 needs --data-root — give --data-root DIR, the CIFAR-10 folder "
                "(cifar-10-batches-py) or its .tar.gz archive"
            )
        if not Path(root).exists():
            raise ConfigError(f"--data-root {root} does not exist — give the CIFAR-10 folder or its archive")
        tr_img, y_tr = load_cifar10(root, train=True)
        te_img, y_te = load_cifar10(root, train=False)
        try:
            from experiments.data.cifar import cifar10_classes

            classes = list(cifar10_classes(root))
        except Exception:  # the class names are decoration only
            classes = [str(i) for i in range(10)]
        xtr = normalize(tr_img, CIFAR10_MEAN, CIFAR10_STD).double()
        xte = normalize(te_img, CIFAR10_MEAN, CIFAR10_STD).double()
    else:
        raise ValueError(f"unknown data set {name!r}: use 'digits' or 'cifar10'")
    itr = _stratified_head(y_tr, n_train, seed)
    ite = _stratified_head(y_te, n_test, seed + 1)
    xtr, y_tr, tr_img = xtr[itr], y_tr[itr], tr_img[itr]
    xte, y_te, te_img = xte[ite], y_te[ite], te_img[ite]
    in_shape = tuple(xtr.shape[1:])
    if flatten:
        xtr, xte = xtr.reshape(len(xtr), -1), xte.reshape(len(xte), -1)
    return Data(xtr.to(dtype), y_tr.long(), xte.to(dtype), y_te.long(), tr_img, te_img, classes, in_shape)


class SmallCNN(nn.Module):
    """conv3×3(C→c) · ReLU · maxpool2 · conv3×3(c→2c) · ReLU · avgpool to 2×2 · linear(8c→h) ·
    ReLU · linear(h→O). No batch statistics, so per-example gradients are well defined."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 16, hidden: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.fc1 = nn.Linear(8 * channels, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate (post-ReLU) features, batch × hidden."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.adaptive_avg_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))


def model_config(args: argparse.Namespace, data: Data) -> dict:
    """The part of the command line that describes the model (stored in checkpoints)."""
    cfg = {k: getattr(args, k) for k in MODEL_KEYS if hasattr(args, k)}
    cfg["in_shape"] = list(data.in_shape)
    cfg["d_out"] = data.num_classes
    return cfg


def build_model(cfg: dict) -> nn.Module:
    """A fresh model from a config (see :data:`MODEL_KEYS`)."""
    kind = cfg["model"]
    if kind not in MODELS:
        raise ValueError(f"unknown model {kind!r}: choose one of {MODELS}")
    dtype = getattr(torch, cfg.get("dtype", "float32"))
    in_shape = tuple(cfg["in_shape"])
    d_in, d_out = int(np.prod(in_shape)), int(cfg["d_out"])
    torch.manual_seed(int(cfg.get("seed", 0)))
    if kind in ("inf", "fin", "mu"):  # the MLPs through the programs' one builder
        spec = ModelSpec(
            kind=kind,
            d_in=d_in,
            d_out=d_out,
            r=int(cfg.get("r", 32)),
            width=int(cfg.get("width", 512)),
            depth=int(cfg.get("L", 1)),
            first_layer_alpha=cfg.get("first_layer_alpha", 1.0),
            last_layer_alpha=cfg.get("last_layer_alpha", 1.0),
            bias_alpha=cfg.get("bias_alpha", 1.0),
            layernorm=cfg.get("layernorm", False),
            seed=int(cfg.get("seed", 0)),
            dtype=dtype,
        )
        return build_spec(spec)
    return SmallCNN(in_shape[0], d_out, cfg.get("channels", 16), cfg.get("hidden", 64)).to(dtype)


def model_inputs(cfg: dict, x: torch.Tensor) -> torch.Tensor:
    """Flattened inputs for MLPs, images for the CNN."""
    if cfg["model"] == "cnn":
        return x.reshape(len(x), *cfg["in_shape"])
    return x.reshape(len(x), -1)


_SHORT_KIND = {"infinite": "inf", "finite": "fin", "mup": "mu"}


def _model_name(text: str) -> str:
    """The analysis programs' short model name for any spelling of experiments.models' kinds."""
    if text.strip().lower() == "cnn":
        return "cnn"
    try:
        return _SHORT_KIND[canonical_kind(text)]
    except ConfigError:
        return text  # argparse's choices check reports it


def add_model_args(p: argparse.ArgumentParser, default_model: str = "mu"):
    g = p.add_argument_group("model (ignored when a checkpoint carries its config)")
    g.add_argument(
        "--model",
        type=_model_name,
        choices=MODELS,
        default=default_model,
        help="inf (infinite π-MLP), fin (finite π-MLP), mu (μP MLP), cnn; the programs' kind names "
        "infinite, finite, mup are accepted too",
    )
    g.add_argument("--r", type=int, default=32, help="rank of the π-nets")
    g.add_argument("--width", type=int, default=256, help="width of fin/mu MLPs")
    g.add_argument("--L", type=int, default=1, help="hidden layers of the MLPs")
    g.add_argument("--first-layer-alpha", dest="first_layer_alpha", type=float, default=1.0)
    g.add_argument("--last-layer-alpha", dest="last_layer_alpha", type=float, default=1.0)
    g.add_argument("--bias-alpha", dest="bias_alpha", type=float, default=1.0)
    g.add_argument("--layernorm", action="store_true")
    g.add_argument("--channels", type=int, default=16, help="CNN channels")
    g.add_argument("--hidden", type=int, default=64, help="CNN hidden units")
    g.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    g.add_argument("--seed", type=int, default=0)


class _ThreadsAction(argparse.Action):
    """``--threads N``: applied (``torch.set_num_threads``) when the command line is parsed."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        apply_threads(values)


def add_data_args(p: argparse.ArgumentParser, n_train: int | None, n_test: int | None):
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        action=_ThreadsAction,
        metavar="N",
        help="torch CPU threads (default: torch's choice); set when the command line is parsed",
    )
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=("digits", "cifar10"), default="digits")
    g.add_argument("--data-root", dest="data_root", default=None, help="CIFAR-10 folder or archive")
    g.add_argument(
        "--n-train", dest="n_train", type=int, default=n_train, help="training subset (class-balanced)"
    )
    g.add_argument("--n-test", dest="n_test", type=int, default=n_test, help="test subset")


def add_train_args(p: argparse.ArgumentParser, steps: int, lr: float, batch_size: int, loss: str):
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=steps, help="SGD steps")
    g.add_argument("--lr", type=float, default=lr)
    g.add_argument("--batch-size", dest="batch_size", type=int, default=batch_size)
    g.add_argument(
        "--loss",
        choices=("xent", "sse"),
        default=loss,
        help="xent: cross-entropy; sse: half the squared error to one-hot targets, summed over classes "
        "and averaged over the batch (not the other programs' --loss mse, which averages over classes "
        "with centred targets: experiments/losses.py)",
    )


def loss_fn(kind: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (``xent``), or half the squared error to one-hot targets (``sse``: summed over
    classes, batch mean)."""
    if kind == "xent":
        return F.cross_entropy(out, y)
    if kind != "sse":
        raise ValueError(f"unknown loss {kind!r}; expected 'xent' or 'sse'")
    target = F.one_hot(y, out.shape[1]).to(out.dtype)
    return 0.5 * ((out - target) ** 2).sum(1).mean()


def train(
    net: nn.Module,
    cfg: dict,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    lr: float,
    batch_size: int,
    loss: str = "xent",
    seed: int = 0,
    callback=None,
    progress: bool = True,
) -> list[float]:
    """SGD (InfSGD: plain SGD for ordinary parameters, π-updates for π-nets) on random batches;
    ``callback(step)`` runs before the first step (step 0) and after each step (1..steps)."""
    from tqdm.auto import tqdm

    opt = InfSGD(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    xin = model_inputs(cfg, x)
    losses = []
    if callback is not None:
        callback(0)
    bar = tqdm(range(1, steps + 1), desc=f"train {cfg['model']}", disable=not progress, leave=False)
    for step in bar:
        idx = torch.randperm(len(y), generator=g)[:batch_size]
        opt.zero_grad()
        value = loss_fn(loss, net(xin[idx]), y[idx])
        value.backward()
        opt.step()
        losses.append(float(value.detach()))
        if progress and step % 20 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if callback is not None:
            callback(step)
    return losses


@torch.no_grad()
def predict(net: nn.Module, cfg: dict, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    xin = model_inputs(cfg, x)
    return torch.cat([net(xin[i : i + batch_size]) for i in range(0, len(xin), batch_size)])


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).double().mean())


def save_checkpoint(path, net: nn.Module, cfg: dict, extra: dict | None = None) -> Path:
    """``{"model": state_dict, "config": cfg, **extra}``, written atomically (temporary file, then rename)."""
    path = Path(path)
    state = {"model": net.state_dict(), "config": cfg, **(extra or {})}
    atomic_write(path, lambda fh: torch.save(state, fh))
    return path


def read_checkpoint(path, flag: str = "--checkpoint"):
    """``torch.load(path, weights_only=True)`` with one-line errors: a missing file, a file
    that is not a torch checkpoint, or one holding Python objects (refused, never run)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"{flag} {path} does not exist — give a checkpoint written by a previous run "
            "(OUT/model.pt) or a saved state dict"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ConfigError(
            f"{flag} {path} holds Python objects that loading would execute; refused — load only "
            "checkpoints you trust, re-saved as plain tensors: torch.save(model.state_dict(), FILE)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"{flag} {path} is not a readable torch checkpoint ({first[:120]}) — give the model.pt "
            "a previous run wrote"
        ) from None


def load_checkpoint(path, cli_cfg: dict) -> tuple[nn.Module, dict]:
    """A model from a checkpoint: ``{"model": …, "config"/"args": …}`` or a bare state dict
    (then the model is the one the command-line flags describe). Read with
    ``weights_only=True`` (:func:`read_checkpoint`)."""
    ckpt = read_checkpoint(path)
    if isinstance(ckpt, dict) and "model" in ckpt and isinstance(ckpt["model"], dict):
        saved = ckpt.get("config") or ckpt.get("args") or {}
        if not isinstance(saved, dict):
            raise ConfigError(
                f"--checkpoint {path}: its config is a {type(saved).__name__}, not a dict — re-save it "
                "with save_checkpoint or as a bare state dict"
            )
        cfg = {**cli_cfg, **{k: v for k, v in saved.items() if k in MODEL_KEYS}}
        state = ckpt["model"]
    elif isinstance(ckpt, dict):
        cfg, state = dict(cli_cfg), ckpt
    else:
        raise ConfigError(
            f"--checkpoint {path}: expected a state dict or a dict with 'model', got "
            f"{type(ckpt).__name__} — give a checkpoint written by save_checkpoint or a state dict"
        )
    net = build_model(cfg)
    try:
        net.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:
        source = (
            "the checkpoint's config" if "model" in ckpt else "the command-line flags (--model, --width, …)"
        )
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"--checkpoint {path} does not fit the model {cfg['model']} described by {source}: {first[:200]}"
        ) from None
    return net, cfg


def log_spaced_steps(steps: int, count: int) -> list[int]:
    """About ``count`` distinct steps in [0, steps], log-spaced (0 and ``steps`` included)."""
    if steps <= 0:
        return [0]
    pts = np.unique(np.round(np.logspace(0, math.log10(steps + 1), count) - 1).astype(int))
    return sorted(set(pts.tolist()) | {0, steps})


def trained_or_loaded(args, data, out: Path) -> tuple[nn.Module, dict]:
    """The model of ``--checkpoint``, or a fresh one trained on ``data`` with the training flags
    and saved as ``out/model.pt`` (the pNTK programs' shared start)."""
    cfg = model_config(args, data)
    if args.checkpoint:
        net, cfg = load_checkpoint(args.checkpoint, cfg)
        log.info("loaded %s (%s)", args.checkpoint, cfg["model"])
        return net, cfg
    net = build_model(cfg)
    losses = train(
        net,
        cfg,
        data.x_train,
        data.y_train,
        args.steps,
        args.lr,
        args.batch_size,
        args.loss,
        seed=args.seed,
        progress=args.progress,
    )
    save_checkpoint(out / "model.pt", net, cfg, {"losses": losses})
    log.info(
        "trained %s for %d steps (final loss %.4f); saved %s",
        cfg["model"],
        args.steps,
        losses[-1] if losses else float("nan"),
        out / "model.pt",
    )
    return net, cfg
