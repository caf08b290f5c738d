"""Figures 2a, 2b, 2c and 3 of Ma, Guo & Fattahi (2022) on scikit-learn's digits (no download).

    python -m experiments.analysis.figures                       # all four, into runs/analysis/figures
    python -m experiments.analysis.figures --out docs/img        # regenerate the docs' pictures
    python -m experiments.analysis.figures --figures 2a 2b --out runs/figs
    python -m experiments.analysis.figures --projected-check 256  # also: pNTK error of fig 2b

The paper's CNN (blocks of conv 3×3 · ReLU · max-pool 2, then a bias-free linear layer;
``experiments.analysis.models.PaperCNN``, channels × ``--width-mult``) is trained on the 1347
training digits (enlarged to 16 × 16 by pixel repetition, one channel, pixel values in
[0, 1]) with the paper's recipe: squared loss (mean over batch × classes) against one-hot
targets, LARS (momentum 0.9, weight decay 1e-4), gradient values clipped at 0.1. The 450
test digits are the held-out set: the basis is built from the *final* network's penultimate
features there (``inf.analysis.decomposition.network_basis``), and the coefficients
β_i(θ_t) and their exact parameter gradients (``basis_gradients``: autograd of the scalar
β_i, one backward pass per i) are computed at parameter snapshots of the same run.

* Fig 2a (``analysis_fig2a_small_init.png``): |β_i(θ_0)| of the 20 basis functions with the
  largest final coefficient, and the residual of the others; the final β_i = s_i beside them.
* Fig 2b (``analysis_fig2b_independence.png``): max over the recorded iterations 0, 10, …, 100
  of |cos(∇β_i, ∇β_j)|, i, j ≤ 10.
* Fig 2c (``analysis_fig2c_beta_vs_grad.png``): log |β_i(θ_t)| against log ‖∇β_i(θ_t)‖ for
  i = 1 … 4 over the first ``--iters`` iterations, coloured by iteration.
* Fig 3 (``analysis_fig3_depth.png``): β_1 … β_5 against the iteration for CNNs of depth 2, 3, 4.

The numbers behind the pictures go to ``--json`` (default ``runs/analysis/figures.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from inf.analysis.decomposition import TrajectoryRecorder, _plt, _save, basis_gradients, network_basis

from .models import PaperCNN
from .optimizers import LARS

log = logging.getLogger("analysis.figures")


def digits(size: int = 16):
    """``(x_train, y_train, x_test, y_test)``: one-channel float images in [0, 1]."""
    from experiments.data.digits import load_digits_split

    xtr, ytr, xte, yte = load_digits_split(size=size)
    return xtr[:, :1].float() / 255, ytr, xte[:, :1].float() / 255, yte


def train_run(
    depth: int,
    data,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    width_mult: float,
    record_steps,
    snapshot_steps,
    progress: bool = False,
) -> tuple[PaperCNN, TrajectoryRecorder, float]:
    """Train the paper's CNN; record the held-out outputs at ``record_steps`` and parameter
    snapshots at ``snapshot_steps``. Returns the final model, the recorder and the seconds."""
    from tqdm.auto import tqdm

    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = PaperCNN(depth, 1, 10, xtr.shape[-1], width_mult)
    opt = LARS(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    rec = TrajectoryRecorder(None, xte, yte, num_classes=10)
    record_steps, snapshot_steps = set(record_steps) | set(snapshot_steps), set(snapshot_steps)
    g = torch.Generator().manual_seed(seed)
    t = time.time()
    for step in tqdm(range(steps + 1), desc=f"CNN depth {depth}", disable=not progress, leave=False):
        if step in record_steps:
            rec.record(model, step, snapshot=step in snapshot_steps)
        if step == steps:
            break
        model.train()
        idx = torch.randint(0, len(ytr), (batch_size,), generator=g)
        opt.zero_grad()
        loss = F.mse_loss(model(xtr[idx]), F.one_hot(ytr[idx], 10).float())
        loss.backward()
        torch.nn.utils.clip_grad_value_(model.parameters(), 0.1)
        opt.step()
    return model, rec, time.time() - t


def fig2a(rec: TrajectoryRecorder, path, top: int = 20) -> dict:
    plt = _plt()
    basis = rec.basis
    res = basis.residual(rec.outputs[0], top=top)
    vals = res["values"].abs().numpy()
    final = (
        basis.grid(rec.outputs[-1]).reshape(-1)[[i * len(basis) + j for i, j in res["index"]]].abs().numpy()
    )
    labels = [f"{i + 1}" if i == j else f"{i + 1},{j + 1}" for i, j in res["index"]]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [1.6, 1]})
    x = np.arange(len(vals) + 1)
    a1.bar(x[:-1], vals, color="tab:blue", label=r"$|\beta_i(\theta_0)|$ at initialisation")
    a1.bar(x[-1], res["grid_residual"], color="tab:red", label="residual (the other pairs)")
    a1.set_xticks(x, labels + ["res."], rotation=60)
    a1.set_xlabel("basis function (i; 'i,j': pair u_i ⊗ U v_j), ranked by the final coefficient")
    a1.set_ylabel(r"$|\beta_i(\theta_0)|$")
    a1.legend()
    a1.set_title("coefficients at initialisation")
    m = len(basis)
    a2.bar(
        np.arange(m) - 0.2,
        rec.betas()[0, :, 0].abs().numpy(),
        width=0.4,
        color="tab:blue",
        label=r"$|\beta_i(\theta_0)|$",
    )
    a2.bar(np.arange(m) + 0.2, basis.s.numpy(), width=0.4, color="tab:green", label=r"final $\beta_i = s_i$")
    a2.set_xticks(np.arange(m), [str(i + 1) for i in range(m)])
    a2.set_xlabel("basis function i")
    a2.set_ylabel(r"$|\beta_i|$")
    a2.legend()
    a2.set_title("initial against final")
    for a in (a1, a2):
        a.grid(alpha=0.3, axis="y")
    fig.suptitle("Fig. 2a: small initialisation — the coefficients start far below their final values")
    fig.tight_layout()
    _save(fig, path, 100)
    return {
        "beta0_abs": rec.betas()[0, :, 0].abs().tolist(),
        "s": basis.s.tolist(),
        "top_pairs": res["index"],
        "top_abs_beta0": vals.tolist(),
        "top_abs_final": final.tolist(),
        "grid_residual": res["grid_residual"],
        "total_residual": res["total_residual"],
    }


def fig2b(steps, results, path, top: int = 10) -> dict:
    plt = _plt()
    C = torch.stack([r["cos"][:top, :top].abs() for r in results])
    M = C.max(0).values.numpy()
    fig, ax = plt.subplots(figsize=(12, 10))
    im = ax.imshow(M, cmap="viridis", vmin=0, vmax=1)
    for i in range(M.shape[0]):
        for j in range(M.shape[1]):
            ax.text(
                j,
                i,
                f"{M[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=10,
                color="black" if M[i, j] > 0.6 else "white",
            )
    ax.set_xticks(range(M.shape[1]), [str(i + 1) for i in range(M.shape[1])])
    ax.set_yticks(range(M.shape[0]), [str(i + 1) for i in range(M.shape[0])])
    ax.set_xlabel(r"$j$  ($\nabla\beta_j$)")
    ax.set_ylabel(r"$i$  ($\nabla\beta_i$)")
    fig.colorbar(im, ax=ax, label=r"$\max_t |\cos(\nabla\beta_i(\theta_t), \nabla\beta_j(\theta_t))|$")
    ax.set_title(
        f"Fig. 2b: gradient independence, max over iterations {steps[0]}…{steps[-1]} (exact gradients)"
    )
    fig.tight_layout()
    _save(fig, path, 100)
    off = M - np.diag(np.diag(M))
    per_step = [float((c - torch.diag(c.diagonal())).max()) for c in C]
    return {
        "steps": list(steps),
        "max_offdiag": float(off.max()),
        "mean_offdiag": float(off.sum() / (top * (top - 1))),
        "max_offdiag_per_step": per_step,
    }


def fig2c(steps, results, path, top: int = 4) -> dict:
    plt = _plt()
    import matplotlib as mpl

    B = torch.stack([r["beta"][:top] for r in results]).abs().numpy()
    G = torch.stack([r["norms"][:top] for r in results]).numpy()
    t = np.asarray(steps, dtype=float)
    fig, ax = plt.subplots(figsize=(13, 8))
    cmaps = ["Reds", "Blues", "Greens", "Purples"]
    norm = mpl.colors.Normalize(vmin=t.min(), vmax=t.max())
    for i in range(top):
        cmap = mpl.colors.ListedColormap(getattr(mpl.cm, cmaps[i % 4])(np.linspace(0.3, 1, 256)))
        ok = B[:, i] > 0
        ax.scatter(np.log(B[ok, i]), np.log(G[ok, i]), c=t[ok], cmap=cmap, norm=norm, s=20)
        ax.plot([], [], "o", ms=9, color=getattr(mpl.cm, cmaps[i % 4])(0.8), label=rf"$i = {i + 1}$")
    grey = mpl.colors.ListedColormap(mpl.cm.Greys(np.linspace(0.3, 1, 256)))
    fig.colorbar(
        mpl.cm.ScalarMappable(norm=norm, cmap=grey),
        ax=ax,
        pad=0.01,
        label="iteration (shade of each colour: light = early, dark = late)",
    )
    ax.set_xlabel(r"$\log |\beta_i(\theta_t)|$")
    ax.set_ylabel(r"$\log \|\nabla_\theta \beta_i(\theta_t)\|$")
    ax.grid(alpha=0.3)
    ax.legend(title="basis function", loc="upper left")
    ax.set_title(
        f"Fig. 2c: coefficient against gradient norm, iterations {int(t.min())}…{int(t.max())} "
        "(light → dark: early → late)"
    )
    fig.tight_layout()
    _save(fig, path, 100)
    out = {}
    for i in range(top):
        lb, lg = np.log(B[:, i]), np.log(G[:, i])
        half = len(t) // 2
        slope = float(np.polyfit(lb[half:], lg[half:], 1)[0]) if len(t) >= 4 else float("nan")
        out[str(i + 1)] = {
            "abs_beta_first": float(B[0, i]),
            "abs_beta_last": float(B[-1, i]),
            "grad_norm_first": float(G[0, i]),
            "grad_norm_last": float(G[-1, i]),
            "corr_log": float(np.corrcoef(lb, lg)[0, 1]),
            "slope_second_half": slope,
        }
    return out


def fig3(runs: dict, path) -> dict:
    plt = _plt()
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 5.5), sharey=True)
    axes = np.atleast_1d(axes)
    out = {}
    for ax, (depth, rec) in zip(axes, runs.items()):
        B = rec.betas()[:, :5, 0].numpy()
        for i in range(B.shape[1]):
            ax.plot(rec.steps, B[:, i], lw=2.2, color=plt.cm.tab10(i), label=rf"$\beta_{{{i + 1}}}$")
        ax.set_title(f"CNN with {depth} conv blocks")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        half = []
        for i in range(B.shape[1]):
            hit = np.nonzero(np.abs(B[:, i]) >= 0.5 * abs(B[-1, i]))[0]
            half.append(int(rec.steps[hit[0]]) if len(hit) else None)
        out[str(depth)] = {"s": rec.basis.s[:5].tolist(), "beta0": B[0].tolist(), "half_reached_at": half}
    axes[0].set_ylabel(r"$\beta_i(\theta_t)$")
    fig.suptitle("Fig. 3: coefficients of the final network's basis during training (digits, held-out set)")
    fig.tight_layout()
    _save(fig, path, 100)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m experiments.analysis.figures", description=__doc__.split("\n")[0]
    )
    p.add_argument("--figures", nargs="+", default=["2a", "2b", "2c", "3"], choices=["2a", "2b", "2c", "3"])
    p.add_argument(
        "--out", default="runs/analysis/figures", help="folder for the PNGs (docs/img: the docs' pictures)"
    )
    p.add_argument("--json", default="runs/analysis/figures.json", help="where the numbers go")
    p.add_argument(
        "--steps", type=int, default=1000, help="training iterations (the basis is the final network's)"
    )
    p.add_argument("--iters", type=int, default=400, help="iterations shown in fig 2c")
    p.add_argument("--every", type=int, default=2, help="fig 2c: gradients every this many iterations")
    p.add_argument("--lr", type=float, default=2.0, help="LARS learning rate (trust coefficient 0.001)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=64)
    p.add_argument(
        "--width-mult",
        dest="width_mult",
        type=float,
        default=0.25,
        help="channels of the paper's CNNs × this (1: 256, 128, 64)",
    )
    p.add_argument("--size", type=int, default=16, help="digit image size (multiple of 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--projected-check",
        dest="projected_check",
        type=int,
        default=0,
        help="K > 0: also compute fig 2b's cosines through a projected NTK (fresh sketch per "
        "iteration) and report its error against the exact gradients",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    if args.steps < max(args.iters, 100) or args.every < 1:
        p.error("--steps must be >= --iters and >= 100, --every >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = digits(args.size)
    report = {"args": vars(args)}
    want = set(args.figures)
    record_steps = sorted(set(range(0, args.steps + 1, 10)) | {args.steps})
    runs = {}
    if want & {"2a", "2b", "2c"} or "3" in want:
        snaps = set()
        if "2b" in want:
            snaps |= set(range(0, 101, 10))
        if "2c" in want:
            snaps |= set(range(0, args.iters + 1, args.every))
        model, rec, secs = train_run(
            3,
            data,
            args.steps,
            args.lr,
            args.batch_size,
            args.seed,
            args.width_mult,
            record_steps,
            sorted(snaps),
            args.progress,
        )
        rec.set_function_basis(network_basis(model, data[2]))
        runs[3] = rec
        acc = float((rec.outputs[-1].argmax(1) == data[3]).double().mean())
        report["depth3"] = {
            "train_seconds": secs,
            "test_accuracy": acc,
            "s": rec.basis.s.tolist(),
            "beta_final_minus_s": float((rec.betas()[-1, :, 0] - rec.basis.s).abs().max()),
        }
        log.info("depth 3: %d iterations in %.0f s, test accuracy %.3f", args.steps, secs, acc)
        snap_steps = rec.snapshot_steps
        work = PaperCNN(3, 1, 10, args.size, args.width_mult)
        grads = {}
        if want & {"2b", "2c"}:
            t = time.time()
            for step, snap in zip(snap_steps, rec._snapshots):
                work.load_state_dict(snap)
                k = 10 if "2b" in want and step <= 100 and step % 10 == 0 else 4
                grads[step] = basis_gradients(work, data[2], rec.basis, top=k)
            report["gradient_seconds"] = time.time() - t
            log.info("exact ∇β_i at %d snapshots in %.0f s", len(snap_steps), time.time() - t)
        if "2a" in want:
            report["fig2a"] = fig2a(rec, out / "analysis_fig2a_small_init.png")
            r = report["fig2a"]
            log.info(
                "fig 2a: |β_i(θ_0)| %s, final s_i %s",
                np.round(r["beta0_abs"], 4).tolist(),
                np.round(r["s"], 3).tolist(),
            )
        if "2b" in want:
            steps_b = [s for s in range(0, 101, 10)]
            report["fig2b"] = fig2b(
                steps_b, [grads[s] for s in steps_b], out / "analysis_fig2b_independence.png"
            )
            log.info(
                "fig 2b: max_{i≠j} max_t |cos| = %.3f (mean over pairs %.3f)",
                report["fig2b"]["max_offdiag"],
                report["fig2b"]["mean_offdiag"],
            )
            if args.projected_check:
                report["projected_check"] = projected_check(
                    work, rec, steps_b, grads, args.projected_check, args.seed
                )
        if "2c" in want:
            steps_c = list(range(0, args.iters + 1, args.every))
            report["fig2c"] = fig2c(
                steps_c, [grads[s] for s in steps_c], out / "analysis_fig2c_beta_vs_grad.png"
            )
            log.info("fig 2c: %s", json.dumps(report["fig2c"]))
    if "3" in want:
        for depth in (2, 4):
            model, rec, secs = train_run(
                depth,
                data,
                args.steps,
                args.lr,
                args.batch_size,
                args.seed,
                args.width_mult,
                record_steps,
                [],
                args.progress,
            )
            rec.set_function_basis(network_basis(model, data[2]))
            runs[depth] = rec
            log.info("depth %d: %d iterations in %.0f s", depth, args.steps, secs)
        report["fig3"] = fig3({d: runs[d] for d in (2, 3, 4)}, out / "analysis_fig3_depth.png")
        log.info("fig 3: %s", json.dumps(report["fig3"]))
    from inf.analysis.decomposition import _atomic_text

    _atomic_text(Path(args.json), json.dumps(report, indent=1))
    log.info("wrote the figures to %s and the numbers to %s", out, args.json)
    return report


def projected_check(work, rec, steps, grads, K: int, seed: int) -> dict:
    """Fig 2b's quantities through a projected full NTK with a fresh sketch per iteration,
    against the exact gradients: relative error of the Gram matrix and of max |cos|."""
    errs, d_max = [], []
    for k, (step, snap) in enumerate(zip(rec.snapshot_steps, rec._snapshots)):
        if step not in steps:
            continue
        work.load_state_dict(snap)
        approx = basis_gradients(work, rec.X, rec.basis, top=10, proj_dim=K, seed=seed + 1000 + k)
        exact = grads[step]
        errs.append(float((approx["gram"] - exact["gram"]).norm() / exact["gram"].norm()))
        d_max.append((approx["max_cos"] - exact["max_cos"]) / exact["max_cos"])
    out = {
        "K": K,
        "gram_rel_error_mean": float(np.mean(errs)),
        "max_cos_rel_error_mean": float(np.mean(d_max)),
        "max_cos_rel_error_absmax": float(np.max(np.abs(d_max))),
    }
    log.info("projected check (K = %d, fresh sketches): %s", K, json.dumps(out))
    return out


if __name__ == "__main__":
    main()
