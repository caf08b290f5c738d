"""Train a model and decompose its training trajectory on a basis of functions.

    python -m experiments.analysis.trajectory                      # infinite π-net on digits
    python -m experiments.analysis.trajectory --model mu --width 256
    python -m experiments.analysis.trajectory --model cnn --basis after   # a kernel eigenbasis
    python -m experiments.analysis.trajectory --model fin --data cifar10 --data-root DIR --n-train 512

The model (``inf``, ``fin``, ``mu`` or ``cnn``; flags as in ``experiments.analysis.pntk``)
is trained with SGD (InfSGD) on ``--n-train`` class-balanced training examples. At about
``--records`` log-spaced steps the outputs on the training set are recorded, and at
``--kernel-records`` of them the gradients of the coefficients too. After training, the
basis is ``--basis``:

* ``paper`` (default): the basis of Ma, Guo & Fattahi (2022) — built from the final network's
  penultimate features on the held-out (test) set, on which the outputs are then recorded;
  β_i is a scalar and ``‖∇β_i‖``, ``cos(∇β_i, ∇β_j)`` come from exact parameter gradients
  (autograd; the exact tangent kernel for the infinite π-net), or with ``--grad-proj-dim K``
  from a projected NTK with a fresh sketch at each recorded step;
* a kernel eigenbasis on the training set: ``after`` (the conjugate kernel of the final
  network's last hidden layer, the "after kernel"), ``ntk-init`` or ``ntk-final`` (the
  first or last recorded tangent kernel: exact for the infinite π-net, the projected NTK
  with ``--proj-dim`` otherwise). ``kernel`` is ``after``.

See ``inf.analysis.decomposition`` and docs/analysis.md.

Outputs in ``--out`` (default ``runs/analysis/trajectory_<data>_<model>``):
``beta_curves.png`` (``|β_i(t)|`` and the unlearned fraction of the leading basis
functions), ``beta_vs_gradnorm.png`` (``|β_i|`` against ``‖∇β_i‖``),
``independence.png`` (``max_{i≠j} |cos(∇β_i, ∇β_j)|`` over training),
``trajectory.npz`` (everything recorded) and ``summary.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import time
from pathlib import Path

import torch

from inf.analysis import (
    TrajectoryRecorder,
    after_kernel,
    eigenbasis,
    plot_beta_curves,
    plot_beta_vs_gradnorm,
    plot_independence,
    tangent_kernel,
)
from inf.analysis.decomposition import network_basis

from .common import (
    accuracy,
    add_data_args,
    add_model_args,
    add_train_args,
    build_model,
    load_data,
    log_spaced_steps,
    model_config,
    model_inputs,
    predict,
    save_checkpoint,
    train,
)

log = logging.getLogger("trajectory")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m experiments.analysis.trajectory",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_args(p, default_model="inf")
    add_data_args(p, n_train=256, n_test=None)
    add_train_args(p, steps=600, lr=0.2, batch_size=32, loss="sse")
    a = p.add_argument_group("analysis")
    a.add_argument(
        "--basis",
        choices=("paper", "kernel", "after", "ntk-init", "ntk-final"),
        default="paper",
        help="paper: the basis-function paper's basis on the held-out set; otherwise a kernel eigenbasis",
    )
    a.add_argument(
        "--grad-proj-dim",
        dest="grad_proj_dim",
        type=int,
        default=0,
        help="paper basis: K of a projected NTK for the gradients (0: exact gradients)",
    )
    a.add_argument("--records", type=int, default=30, help="recorded steps (log-spaced)")
    a.add_argument(
        "--kernel-records",
        dest="kernel_records",
        type=int,
        default=6,
        help="how many of them also record the tangent kernel",
    )
    a.add_argument(
        "--proj-dim",
        dest="proj_dim",
        type=int,
        default=256,
        help="K of the projected NTK of finite models (0: exact)",
    )
    a.add_argument("--top", type=int, default=12, help="basis functions drawn in beta_curves.png")
    p.add_argument("--out", default=None)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    if args.steps < 1 or args.records < 2 or args.kernel_records < 1:
        p.error("--steps must be >= 1, --records >= 2 and --kernel-records >= 1")
    if args.proj_dim < 0:
        p.error("--proj-dim must be >= 0 (0: exact)")
    return args


def learned_at(rec: TrajectoryRecorder, top: int, fraction: float = 0.5) -> list[int | None]:
    """For each leading basis function, the first recorded step at which
    ``|β_i − β*_i| < fraction · |β*_i|`` (None if never); with the paper's basis the
    reference β*_i is the final coefficient s_i."""
    B = rec.betas()
    star = rec.basis.s[:, None] if rec.basis is not None else rec.beta_star()
    steps = []
    for i in range(min(top, B.shape[1])):
        frac = (B[:, i] - star[i]).norm(dim=1) / star[i].norm().clamp_min(1e-300)
        hit = torch.nonzero(frac < fraction)
        steps.append(int(rec.steps[int(hit[0])]) if len(hit) else None)
    return steps


def gradients_how(args, cfg, paper: bool) -> str:
    """How ‖∇β_i‖ and the cosines were computed (recorded in summary.json)."""
    if cfg["model"] == "inf":
        return "exact (tangent kernel of the infinite π-net, inf_ntk)"
    if paper:
        return (
            f"projected full NTK, K = {args.grad_proj_dim}, fresh sketch per step"
            if args.grad_proj_dim
            else "exact (autograd of each scalar β_i)"
        )
    return (
        f"projected trace NTK, K = {args.proj_dim}, fresh sketch per recorded step"
        if args.proj_dim
        else "exact trace NTK"
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dtype = getattr(torch, args.dtype)
    data = load_data(args.data, args.data_root, args.n_train, args.n_test, seed=args.seed, dtype=dtype)
    out = Path(args.out or f"runs/analysis/trajectory_{args.data}_{args.model}")
    out.mkdir(parents=True, exist_ok=True)
    cfg = model_config(args, data)
    net = build_model(cfg)
    xtr = model_inputs(cfg, data.x_train)

    record_at = log_spaced_steps(args.steps, args.records)
    every = max(1, math.ceil(len(record_at) / args.kernel_records))
    paper = args.basis == "paper"
    if args.basis == "kernel":
        args.basis = "after"
    sketches = itertools.count(args.seed)

    def kernel_fn(model, X):
        """The tangent kernel; a projected one gets a fresh random sketch at every call, so
        the errors of different steps are independent rather than one shared bias."""
        return tangent_kernel(model, X, proj_dim=args.proj_dim or None, seed=next(sketches))

    if paper:
        xho = model_inputs(cfg, data.x_test)
        rec = TrajectoryRecorder(None, xho, data.y_test, num_classes=data.num_classes)
        snap_at = set(record_at[::every]) | {record_at[-1]}
    else:
        rec = TrajectoryRecorder(
            None, xtr, data.y_train, num_classes=data.num_classes, kernel_fn=kernel_fn, kernel_every=every
        )
    wanted = set(record_at)

    def callback(step):
        if step in wanted:
            if paper:
                rec.record(net, step, snapshot=step in snap_at)
            else:
                rec.record(net, step)

    t = time.time()
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
        callback=callback,
        progress=args.progress,
    )
    if not paper and rec.kernel_steps[-1] != rec.steps[-1]:
        rec.kernel_steps.append(rec.steps[-1])  # the final kernel is always recorded
        rec.kernels.append(kernel_fn(net, xtr).double())
    log.info(
        "trained %s for %d steps in %.0fs (final loss %.4f)",
        cfg["model"],
        args.steps,
        time.time() - t,
        losses[-1],
    )
    save_checkpoint(out / "model.pt", net, cfg, {"losses": losses})

    if paper:
        rec.set_function_basis(network_basis(net, rec.X))
        t = time.time()
        rec.compute_gradients(
            net, top=20, proj_dim=args.grad_proj_dim or None, seed=args.seed, progress=args.progress
        )
        log.info(
            "gradients of β_i (%s) at %d steps in %.0f s",
            f"projected NTK, K = {args.grad_proj_dim}, fresh sketches" if args.grad_proj_dim else "exact",
            len(rec.gradient_steps),
            time.time() - t,
        )
        eigvals, phi = rec.basis.s, rec.phi
        label = f"paper's (final network, {len(rec.X)} held-out examples)"
    else:
        if args.basis == "after":
            K = after_kernel(net, xtr)
        else:
            K = rec.kernels[0 if args.basis == "ntk-init" else -1]
        eigvals, phi = eigenbasis(K)
        rec.set_basis(eigvals, phi)
        label = {"after": "after kernel", "ntk-init": "NTK at init", "ntk-final": "final NTK"}[args.basis]
    title = f"{cfg['model']} on {args.data} (n={len(data.y_train)}), basis: {label}"
    plot_beta_curves(rec, out / "beta_curves.png", top=args.top, title=title)
    plot_beta_vs_gradnorm(rec, out / "beta_vs_gradnorm.png", title=title)
    plot_independence(rec, out / "independence.png", title=title)
    rec.save(out / "trajectory.npz")

    indep = {str(top): rec.independence(top).tolist() for top in (5, 10, 20) if top <= phi.shape[1]}
    summary = {
        "model": cfg,
        "data": args.data,
        "n_train": len(data.y_train),
        "steps": args.steps,
        "lr": args.lr,
        "loss": args.loss,
        "basis": args.basis,
        "gradients": gradients_how(args, cfg, paper),
        "final_loss": losses[-1],
        "train_accuracy": accuracy(predict(net, cfg, data.x_train), data.y_train),
        "test_accuracy": accuracy(predict(net, cfg, data.x_test), data.y_test),
        "eigenvalues": eigvals[: args.top].tolist(),
        "learned_at_step": learned_at(rec, args.top),
        "kernel_steps": rec.grad_steps,
        "beta_at_init": rec.betas()[0, : args.top].norm(dim=1).tolist(),
        "beta_final": rec.betas()[-1, : args.top].norm(dim=1).tolist(),
        "independence": indep,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    log.info("train accuracy %.3f, test accuracy %.3f", summary["train_accuracy"], summary["test_accuracy"])
    log.info(
        "|β_i| at initialisation %s, final %s",
        [round(v, 4) for v in summary["beta_at_init"]],
        [round(v, 4) for v in summary["beta_final"]],
    )
    log.info("step at which β_i is half learned, i = 1..%d: %s", args.top, summary["learned_at_step"])
    log.info(
        "gradient independence (top 10) over training: %s [%s]",
        ", ".join(f"{v:.2f}" for v in indep.get("10", [])),
        summary["gradients"],
    )
    log.info("wrote %s", out)
    return summary


if __name__ == "__main__":
    main()
