"""How close the projected trace-NTK is to the exact one as K grows (the projection-NTK paper's main figure).

    python -m experiments.analysis.pntk_residuals --png docs/img/pntk_residuals.png   # μP MLP on digits
    python -m experiments.analysis.pntk_residuals --model cnn --n-train 200 --ks 64 256 1024 4096
    python -m experiments.analysis.pntk_residuals --checkpoint runs/analysis/pntk_digits_mu/model.pt

A model (trained here for ``--steps`` SGD steps, or read from ``--checkpoint``) on the first
``--n-train`` training digits; its exact trace-NTK Θ on them, computed parameter by parameter
(:func:`inf.analysis.exact_ntk`, so only one slice of the Jacobian is held at a time); then,
for each K in ``--ks`` and each projection in ``--proj-types`` (the sparse CountSketch and
TRAK's dense Gaussian one by default), ``--seeds`` projected kernels Θ̂_K, and their relative
residual ``‖Θ̂_K − Θ‖_F / ‖Θ‖_F`` — of the kernel itself and of its cosine-normalised form
(the form the paper's kernel methods use). The picture plots both against K on log–log
axes with the K^-½ slope of the Johnson–Lindenstrauss bound; ``residuals.json`` holds the
numbers, timings and the fitted slopes.

Outputs in ``--out`` (default ``runs/analysis/pntk_residuals``): ``residuals.png``,
``residuals.json``, ``model.pt``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from experiments.cli import ArgumentParser, positive_int, run_main
from inf.analysis import exact_ntk, ntk_from_features, pntk_features
from inf.fileio import atomic_write

from .common import (
    add_data_args,
    add_model_args,
    add_train_args,
    load_data,
    model_inputs,
    trained_or_loaded,
)

log = logging.getLogger("pntk_residuals")

LABELS = {
    "sparse": "sparse JL (CountSketch)",
    "normal": "dense Gaussian (TRAK)",
    "rademacher": "dense Rademacher (TRAK)",
}


def parse_args(argv=None):
    p = ArgumentParser(
        prog="python -m experiments.analysis.pntk_residuals", description=__doc__.split("\n")[0]
    )
    p.add_argument("--checkpoint", default=None, help="model to analyse (else: train one)")
    add_model_args(p, default_model="mu")
    add_data_args(p, n_train=200, n_test=None)
    add_train_args(p, steps=300, lr=0.5, batch_size=64, loss="xent")
    k = p.add_argument_group("projections")
    k.add_argument(
        "--ks",
        type=positive_int,
        nargs="+",
        default=[16, 32, 64, 128, 256, 512, 1024, 2048, 4096],
        help="projection dimensions K",
    )
    k.add_argument(
        "--proj-types",
        dest="proj_types",
        nargs="+",
        choices=("sparse", "normal", "rademacher"),
        default=["sparse", "normal"],
    )
    k.add_argument("--seeds", type=positive_int, default=3, help="projections per K and type")
    p.add_argument("--out", default="runs/analysis/pntk_residuals")
    p.add_argument("--png", default=None, help="where to write the picture (default OUT/residuals.png)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p.parse_args(argv)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _cosine(k: torch.Tensor) -> torch.Tensor:
    d = k.diagonal().clamp_min(1e-300).sqrt()
    return k / d[:, None] / d[None, :]


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 13})
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.6), dpi=100)
    Ks = np.array(result["ks"], dtype=float)
    markers = {"sparse": "o", "normal": "s", "rademacher": "^"}
    panels = ((axes[0], "residual", "trace-NTK"), (axes[1], "residual_cosine", "cosine-normalised trace-NTK"))
    for ax, key, title in panels:
        for t, rows in result["projections"].items():
            vals = np.array(rows[key])  # (len(K), seeds)
            mean, sd = vals.mean(1), vals.std(1)
            slope = rows[f"slope_{key}"]
            ax.errorbar(
                Ks,
                mean,
                yerr=sd,
                marker=markers.get(t, "o"),
                capsize=3,
                lw=1.8,
                label=f"{LABELS.get(t, t)} (slope {slope:.2f})",
            )
        first = np.mean([np.mean(r[key][0]) for r in result["projections"].values()])
        ax.plot(Ks, first * np.sqrt(Ks[0] / Ks), "k--", lw=1.2, label=r"$\propto K^{-1/2}$ (the JL rate)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("projection dimension K")
        ax.set_ylabel(r"relative residual $\|\hat\Theta_K - \Theta\|_F \,/\, \|\Theta\|_F$")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=11)
    fig.suptitle(
        f"Projected vs exact trace-NTK: {result['model_desc']}, {result['n']} digits, "
        f"P = {result['P']:,} parameters, mean ± sd of {result['seeds']} projections",
        fontsize=13,
    )
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png"))
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dtype = getattr(torch, args.dtype)
    data = load_data(args.data, args.data_root, args.n_train, 1, seed=args.seed, dtype=dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    net, cfg = trained_or_loaded(args, data, out)
    if cfg["model"] == "inf":
        from experiments.cli import ConfigError

        raise ConfigError(
            "--model inf has an exact tangent kernel (inf_ntk) and nothing to project — use "
            "--model mu, fin or cnn"
        )
    net.eval()
    X = model_inputs(cfg, data.x_train)
    P = sum(p.numel() for p in net.parameters() if p.requires_grad)
    t = time.time()
    exact = exact_ntk(net, X, kind="trace", progress=args.progress)
    t_exact = time.time() - t
    log.info("exact trace-NTK of %d examples (P = %d) in %.1fs", len(X), P, t_exact)
    exact_cos = _cosine(exact)
    result = {
        "model": cfg,
        "model_desc": f"{cfg['model']} model",
        "n": len(X),
        "P": P,
        "ks": args.ks,
        "seeds": args.seeds,
        "exact_seconds": t_exact,
        "projections": {},
    }
    if cfg["model"] in ("mu", "fin"):
        kind = "μP MLP" if cfg["model"] == "mu" else "finite π-MLP"
        result["model_desc"] = f"{kind}, width {cfg.get('width')}, {cfg.get('L')} hidden layer(s)"
    elif cfg["model"] == "cnn":
        result["model_desc"] = f"CNN ({cfg.get('channels')} channels)"
    for ptype in args.proj_types:
        rows = {"residual": [], "residual_cosine": [], "seconds": []}
        for K in args.ks:
            r, rc, ts = [], [], []
            for s in range(args.seeds):
                t = time.time()
                F = pntk_features(net, X, K, proj_type=ptype, seed=s, dtype=torch.float64)
                ts.append(time.time() - t)
                k = ntk_from_features(F, kind="trace", dtype=torch.float64)
                r.append(_rel(k, exact))
                rc.append(_rel(_cosine(k), exact_cos))
            rows["residual"].append(r)
            rows["residual_cosine"].append(rc)
            rows["seconds"].append(float(np.mean(ts)))
            log.info(
                "%-10s K=%5d residual %.4f (cosine %.4f), %.2fs per feature set",
                ptype,
                K,
                np.mean(r),
                np.mean(rc),
                np.mean(ts),
            )
        for key in ("residual", "residual_cosine"):
            rows[f"slope_{key}"] = float(
                np.polyfit(np.log(args.ks), np.log(np.mean(rows[key], axis=1)), 1)[0]
            )
        result["projections"][ptype] = rows
    (out / "residuals.json").write_text(json.dumps(result, indent=1))
    png = plot(result, Path(args.png) if args.png else out / "residuals.png")
    log.info("wrote %s and %s", png, out / "residuals.json")
    return result


if __name__ == "__main__":
    run_main(main, "python -m experiments.analysis.pntk_residuals")
