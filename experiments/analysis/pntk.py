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
dimensions — a sparse CountSketch by default, ``--proj-type rademacher|normal`` for TRAK's
dense projections — stored as memory-mapped files in ``OUT/features_{train,test}``;
rerunning the same command resumes an interrupted computation); for an infinite π-net the
exact tangent kernel (``inf.analysis.inf_ntk``). ``--kind`` picks the trace-NTK (default) or
the pseudo-NTK (``--pseudo-scale sum`` drops its 1/C); ``--cosine`` normalises the kernels
(k(x, x')/√(k(x, x) k(x', x')), as the projection-NTK paper does before every use).
``--surrogate`` fits a kernel logistic regression, kernel ridge, the paper's kSVM (``svm``)
or kGLM (``glm``).

Outputs in ``--out`` (default ``runs/analysis/pntk_<data>_<model>``): ``kernel_test_train.npy``,
``topk.png`` (the ``--topk`` training images most similar, by kernel cosine, to each of
``--n-show`` test images), ``report.json`` (accuracies of the network and of a kernel
surrogate fitted on the train × train kernel, their prediction agreement and the Spearman
rank correlation of their class probabilities, Kendall's τ, and the overlap of their
misclassified test examples).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from experiments.cli import ArgumentParser, nonnegative_int, positive_float, positive_int, run_main
from inf.analysis import (
    KernelSurrogate,
    cosine_normalize,
    inf_ntk,
    inf_ntk_diagonal,
    kernel_diagonal,
    ntk_from_features,
    pntk_features,
    save_topk_grid,
    surrogate_agreement,
    topk_similar,
)

from .common import (
    accuracy,
    add_data_args,
    add_model_args,
    add_train_args,
    load_data,
    model_inputs,
    predict,
    trained_or_loaded,
)

log = logging.getLogger("pntk")


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m experiments.analysis.pntk", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=None, help="trained model to analyse (else: train one)")
    add_model_args(p, default_model="mu")
    add_data_args(p, n_train=None, n_test=None)
    add_train_args(p, steps=300, lr=0.5, batch_size=64, loss="xent")
    k = p.add_argument_group("kernel")
    k.add_argument(
        "--proj-dim",
        dest="proj_dim",
        type=nonnegative_int,
        default=512,
        help="K, projection dimension (0: exact, small models only)",
    )
    k.add_argument(
        "--proj-type",
        dest="proj_type",
        choices=("sparse", "rademacher", "normal"),
        default="sparse",
        help="sparse: CountSketch, O(P) per example; rademacher/normal: TRAK's dense projections",
    )
    k.add_argument(
        "--proj-nnz",
        dest="proj_nnz",
        type=positive_int,
        default=1,
        help="non-zeros per column of the sparse projection",
    )
    k.add_argument("--proj-seed", dest="proj_seed", type=int, default=0)
    k.add_argument("--kind", choices=("trace", "pseudo"), default="trace")
    k.add_argument(
        "--pseudo-scale",
        dest="pseudo_scale",
        choices=("mean", "sum"),
        default="mean",
        help="pseudo-NTK with its 1/C (mean) or without (sum, the fork's pNTK)",
    )
    k.add_argument("--cosine", action="store_true", help="cosine-normalise the kernels before every use")
    k.add_argument(
        "--chunk-size", dest="chunk_size", type=positive_int, default=None, help="examples per chunk"
    )
    k.add_argument("--topk", type=positive_int, default=6)
    k.add_argument(
        "--n-show", dest="n_show", type=positive_int, default=8, help="test images in the top-k grid"
    )
    k.add_argument(
        "--surrogate",
        choices=("logistic", "ridge", "svm", "glm"),
        default="logistic",
        help="kernel logistic regression, kernel ridge, kSVM or kGLM",
    )
    k.add_argument(
        "--reg",
        type=positive_float,
        default=None,
        help="surrogate regularisation (default per method: 1e-3; svm 1 = 1/C; glm 1e-4 = alpha)",
    )
    p.add_argument("--out", default=None)
    p.add_argument("--overwrite", action="store_true", help="recompute stored features from scratch")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p.parse_args(argv)


def kernels(net, cfg, data, args, out: Path) -> dict:
    """Train × train and test × train kernels and the diagonals, for the chosen kind."""
    xtr, xte = model_inputs(cfg, data.x_train), model_inputs(cfg, data.x_test)
    if cfg["model"] == "inf":
        t = time.time()
        K_tr = inf_ntk(net, xtr, kind=args.kind).double()
        K_te = inf_ntk(net, xte, xtr, kind=args.kind).double()
        d_te = inf_ntk_diagonal(net, xte, kind=args.kind).double()
        log.info("exact infinite-width tangent kernel in %.1fs", time.time() - t)
        if args.kind == "pseudo" and args.pseudo_scale == "sum":
            C = data.num_classes
            K_tr, K_te, d_te = K_tr * C, K_te * C, d_te * C
        ker = {
            "train": K_tr,
            "test": K_te,
            "diag_train": K_tr.diagonal().clone(),
            "diag_test": d_te,
            "method": "inf_ntk (exact)",
        }
        if args.cosine:
            ker["test"] = cosine_normalize(K_te, d_te, ker["diag_train"])
            ker["train"] = cosine_normalize(K_tr, ker["diag_train"])
        return ker
    kw = dict(
        proj_type=args.proj_type,
        seed=args.proj_seed,
        outputs="sum" if args.kind == "pseudo" else "all",
        chunk_size=args.chunk_size,
        overwrite=args.overwrite,
        progress=args.progress,
        proj_nnz=args.proj_nnz,
    )
    K = args.proj_dim or None
    t = time.time()
    F_tr = pntk_features(net, xtr, K, path=out / "features_train", **kw)
    F_te = pntk_features(net, xte, K, path=out / "features_test", **kw)
    log.info("features %s and %s in %.1fs", F_tr.shape, F_te.shape, time.time() - t)
    opts = dict(kind=args.kind, pseudo_scale=args.pseudo_scale, normalize=args.cosine)
    K_tr = ntk_from_features(F_tr, **opts)
    K_te = ntk_from_features(F_te, F_tr, **opts)
    d_te = kernel_diagonal(F_te, args.kind, pseudo_scale=args.pseudo_scale)
    return {
        "train": K_tr,
        "test": K_te,
        "diag_train": K_tr.diagonal().clone(),
        "diag_test": torch.ones_like(d_te) if args.cosine else d_te,
        "method": f"pNTK (K={F_tr.shape[2]}, {args.proj_type})" if K else "empirical NTK (exact)",
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dtype = getattr(torch, args.dtype)
    data = load_data(args.data, args.data_root, args.n_train, args.n_test, seed=args.seed, dtype=dtype)
    out = Path(args.out or f"runs/analysis/pntk_{args.data}_{args.model}")
    out.mkdir(parents=True, exist_ok=True)
    net, cfg = trained_or_loaded(args, data, out)
    net.eval()
    ker = kernels(net, cfg, data, args, out)
    np.save(out / "kernel_test_train.npy", ker["test"].numpy())

    n_show = min(args.n_show, len(data.y_test))
    k = min(args.topk, len(data.y_train))
    vals, idx = topk_similar(
        None, kernel=(ker["test"][:n_show], ker["diag_test"][:n_show], ker["diag_train"]), k=k
    )
    save_topk_grid(
        out / "topk.png",
        data.images_test[:n_show],
        data.images_train,
        idx,
        vals,
        data.y_test[:n_show],
        data.y_train,
        data.classes,
        title=f"{cfg['model']}: most similar training images by {args.kind}-NTK cosine",
    )
    same = float((data.y_train[idx] == data.y_test[:n_show, None]).double().mean())

    sur = KernelSurrogate(args.surrogate, args.reg).fit(ker["train"], data.y_train, data.num_classes)
    proba = sur.predict_proba(ker["test"])
    pred = sur.predict(ker["test"])
    logits = predict(net, cfg, data.x_test).double()
    report = {
        "model": cfg,
        "data": args.data,
        "n_train": len(data.y_train),
        "n_test": len(data.y_test),
        "kernel": ker["method"],
        "kind": args.kind,
        "cosine": args.cosine,
        "pseudo_scale": args.pseudo_scale,
        "surrogate": args.surrogate,
        "reg": sur.reg,
        "net_train_accuracy": accuracy(predict(net, cfg, data.x_train), data.y_train),
        "topk_same_label": same,
        **surrogate_agreement(logits, proba, data.y_test, surrogate_pred=pred),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    log.info(
        "network test accuracy %.3f, %s surrogate %.3f, agreement %.3f, Spearman %.3f (per example %.3f), "
        "Kendall %.3f, misclassified overlap %.2f",
        report["net_accuracy"],
        args.surrogate,
        report["surrogate_accuracy"],
        report["prediction_agreement"],
        report["spearman_all"],
        report["spearman_per_example"],
        report["kendall_all"],
        report["misclassified_overlap"],
    )
    log.info("top-%d neighbours share the test label %.0f%% of the time; wrote %s", k, 100 * same, out)
    return report


if __name__ == "__main__":
    run_main(main, "python -m experiments.analysis.pntk")
