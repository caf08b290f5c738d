"""Tangent kernel of a trained model: kernel matrices, nearest training examples, kernel surrogate.

    python -m experiments.analysis.pntk                         # μP MLP on digits, trained first
    python -m experiments.analysis.pntk --model inf --r 32      # infinite π-net: exact kernel
    python -m experiments.analysis.pntk --checkpoint run/model.pt --proj-dim 2048
    python -m experiments.analysis.pntk --model cnn --data cifar10 --data-root ~/data/cifar-10-batches-py

Without ``--checkpoint`` the model described by the flags is trained for ``--steps`` SGD
steps and saved as ``OUT/model.pt`` (a checkpoint this program and ``trajectory`` read
back). A checkpoint is a dict with ``model`` (state dict) and ``config``/``args`` (the
model flags), or a bare state dict for the model the flags describe.

Kernels: for a finite model (``fin``, ``mu``, ``cnn``) the projected NTK
(``inf.analysis.pntk_features``: per-example gradients projected to ``--proj-dim``
dimensions with TRAK's projectors, stored as memory-mapped files in
``OUT/features_{train,test}`` — rerunning the same command resumes an interrupted
computation); for an infinite π-net the exact tangent kernel (``inf.analysis.inf_ntk``).
``--kind`` picks the trace-NTK (default) or the pseudo-NTK.

Outputs in ``--out`` (default ``runs/analysis/pntk_<data>_<model>``): ``kernel_test_train.npy``,
``topk.png`` (the ``--topk`` training images most similar, by kernel cosine, to each of
``--n-show`` test images), ``report.json`` (accuracies of the network and of a kernel
surrogate fitted on the train × train kernel, their prediction agreement and the Spearman
rank correlation of their class probabilities).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from inf.analysis import (KernelSurrogate, inf_ntk, inf_ntk_diagonal, kernel_diagonal, ntk_from_features,
                          pntk_features, save_topk_grid, surrogate_agreement, topk_similar)

from .common import (accuracy, add_data_args, add_model_args, add_train_args, build_model, load_checkpoint,
                     load_data, model_config, model_inputs, predict, save_checkpoint, train)

log = logging.getLogger("pntk")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.analysis.pntk", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="trained model to analyse (else: train one)")
    add_model_args(p, default_model="mu")
    add_data_args(p, n_train=None, n_test=None)
    add_train_args(p, steps=300, lr=0.5, batch_size=64, loss="xent")
    k = p.add_argument_group("kernel")
    k.add_argument("--proj-dim", dest="proj_dim", type=int, default=512,
                   help="K, projection dimension (0: exact, small models only)")
    k.add_argument("--proj-type", dest="proj_type", choices=("rademacher", "normal"), default="rademacher")
    k.add_argument("--proj-seed", dest="proj_seed", type=int, default=0)
    k.add_argument("--kind", choices=("trace", "pseudo"), default="trace")
    k.add_argument("--chunk-size", dest="chunk_size", type=int, default=None, help="examples per chunk")
    k.add_argument("--topk", type=int, default=6)
    k.add_argument("--n-show", dest="n_show", type=int, default=8, help="test images in the top-k grid")
    k.add_argument("--surrogate", choices=("logistic", "ridge"), default="logistic")
    k.add_argument("--reg", type=float, default=1e-3, help="surrogate regularisation")
    p.add_argument("--out", default=None)
    p.add_argument("--overwrite", action="store_true", help="recompute stored features from scratch")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    if args.proj_dim < 0:
        p.error("--proj-dim must be >= 0 (0: exact kernel)")
    if args.topk <= 0 or args.n_show <= 0:
        p.error("--topk and --n-show must be positive")
    return args


def kernels(net, cfg, data, args, out: Path) -> dict:
    """Train × train and test × train kernels and the diagonals, for the chosen kind."""
    xtr, xte = model_inputs(cfg, data.x_train), model_inputs(cfg, data.x_test)
    if cfg["model"] == "inf":
        t = time.time()
        K_tr = inf_ntk(net, xtr, kind=args.kind)
        K_te = inf_ntk(net, xte, xtr, kind=args.kind)
        d_te = inf_ntk_diagonal(net, xte, kind=args.kind)
        log.info("exact infinite-width tangent kernel in %.1fs", time.time() - t)
        return {"train": K_tr.double(), "test": K_te.double(), "diag_train": K_tr.diagonal().double(),
                "diag_test": d_te.double(), "method": "inf_ntk (exact)"}
    kw = dict(proj_type=args.proj_type, seed=args.proj_seed, outputs="sum" if args.kind == "pseudo" else "all",
              chunk_size=args.chunk_size, overwrite=args.overwrite, progress=args.progress)
    K = args.proj_dim or None
    t = time.time()
    F_tr = pntk_features(net, xtr, K, path=out / "features_train", **kw)
    F_te = pntk_features(net, xte, K, path=out / "features_test", **kw)
    log.info("features %s and %s in %.1fs", F_tr.shape, F_te.shape, time.time() - t)
    K_tr = ntk_from_features(F_tr, kind=args.kind)
    K_te = ntk_from_features(F_te, F_tr, kind=args.kind)
    return {"train": K_tr, "test": K_te, "diag_train": K_tr.diagonal(),
            "diag_test": kernel_diagonal(F_te, args.kind),
            "method": f"pNTK (K={F_tr.shape[2]}, {args.proj_type})" if K else "empirical NTK (exact)"}


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dtype = getattr(torch, args.dtype)
    data = load_data(args.data, args.data_root, args.n_train, args.n_test, seed=args.seed, dtype=dtype)
    out = Path(args.out or f"runs/analysis/pntk_{args.data}_{args.model}")
    out.mkdir(parents=True, exist_ok=True)
    cfg = model_config(args, data)
    if args.checkpoint:
        net, cfg = load_checkpoint(args.checkpoint, cfg)
        log.info("loaded %s (%s)", args.checkpoint, cfg["model"])
    else:
        net = build_model(cfg)
        losses = train(net, cfg, data.x_train, data.y_train, args.steps, args.lr, args.batch_size, args.loss,
                       seed=args.seed, progress=args.progress)
        save_checkpoint(out / "model.pt", net, cfg, {"losses": losses})
        log.info("trained %s for %d steps (final loss %.4f); saved %s", cfg["model"], args.steps,
                 losses[-1] if losses else float("nan"), out / "model.pt")
    net.eval()
    ker = kernels(net, cfg, data, args, out)
    np.save(out / "kernel_test_train.npy", ker["test"].numpy())

    n_show = min(args.n_show, len(data.y_test))
    k = min(args.topk, len(data.y_train))
    vals, idx = topk_similar(None, kernel=(ker["test"][:n_show], ker["diag_test"][:n_show], ker["diag_train"]), k=k)
    save_topk_grid(out / "topk.png", data.images_test[:n_show], data.images_train, idx, vals,
                   data.y_test[:n_show], data.y_train, data.classes,
                   title=f"{cfg['model']}: most similar training images by {args.kind}-NTK cosine")
    same = float((data.y_train[idx] == data.y_test[:n_show, None]).double().mean())

    sur = KernelSurrogate(args.surrogate, args.reg).fit(ker["train"], data.y_train, data.num_classes)
    proba = sur.predict_proba(ker["test"])
    logits = predict(net, cfg, data.x_test).double()
    report = {
        "model": cfg, "data": args.data, "n_train": len(data.y_train), "n_test": len(data.y_test),
        "kernel": ker["method"], "kind": args.kind, "surrogate": args.surrogate, "reg": args.reg,
        "net_train_accuracy": accuracy(predict(net, cfg, data.x_train), data.y_train),
        "topk_same_label": same,
        **surrogate_agreement(logits, proba, data.y_test),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    log.info("network test accuracy %.3f, %s surrogate %.3f, agreement %.3f, Spearman %.3f (per example %.3f)",
             report["net_accuracy"], args.surrogate, report["surrogate_accuracy"], report["prediction_agreement"],
             report["spearman_all"], report["spearman_per_example"])
    log.info("top-%d neighbours share the test label %.0f%% of the time; wrote %s", k, 100 * same, out)
    return report


if __name__ == "__main__":
    main()
