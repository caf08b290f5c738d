"""Projected NTKs at scale: the sparse JL projector, TRAKer tasks, refusal to mix projections,
the fork's conventions (cosine kernels, pNTK without 1/C, kSVM/kGLM, Kendall-τ, error overlap),
and safe checkpoint loading in the analysis programs."""

from __future__ import annotations

import logging
import math
import pathlib

import numpy as np
import pytest
import torch
from torch import nn

from inf.analysis import (
    KernelSurrogate,
    SparseJLProjector,
    cosine_normalize,
    empirical_ntk,
    exact_ntk,
    kernel_diagonal,
    load_features,
    misclassification_overlap,
    ntk_from_features,
    ntk_over_checkpoints,
    pntk_features,
    surrogate_agreement,
)

F64 = torch.float64


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _mlp(d_in=5, hidden=7, d_out=3, seed=0, dtype=F64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out)).to(dtype)


# ------------------------------------------------------------------ the projector
@pytest.mark.parametrize("nnz", [1, 3])
def test_sparse_projector_is_unbiased_with_the_predicted_variance(nnz):
    """E⟨Sx, Sy⟩ = ⟨x, y⟩ over 400 seeds (within 4 standard errors), and the spread matches
    Var = (‖x‖²‖y‖² + ⟨x,y⟩² − 2Σx²y²)/K within 20% (400 samples: the sd of a sample
    variance is about 7%)."""
    P, K, n = 3000, 32, 400
    g = torch.Generator().manual_seed(0)
    x = torch.randn(P, generator=g, dtype=F64)
    y = 0.6 * x + 0.8 * torch.randn(P, generator=g, dtype=F64)
    xy = torch.stack([x, y])
    est = np.array(
        [
            float((lambda S: S[0] @ S[1])(SparseJLProjector(P, K, seed=s, nnz=nnz, dtype=F64).sketch(xy)))
            for s in range(n)
        ]
    )
    true = float(x @ y)
    assert abs(est.mean() - true) < 4 * est.std() / math.sqrt(n), (est.mean(), true)
    var = (float(x @ x) * float(y @ y) + true**2 - 2 * float((x * x * y * y).sum())) / K
    assert 0.8 < est.var() / var < 1.2, (est.var(), var)
    # TRAK's convention for project(): √K times the sketch
    pr = SparseJLProjector(P, K, seed=1, nnz=nnz, dtype=F64)
    assert torch.allclose(pr.project(xy), math.sqrt(K) * pr.sketch(xy))


def test_sparse_projector_error_scales_like_a_gaussian_sketch():
    """Relative Frobenius error of a Gram matrix: slope ≈ −½ in K, and within 1.5× of an
    independent dense Gaussian sketch (torch.randn) at every K (root mean square over 12
    seeds; with 40 seeds the two agree within 13%, theory says the sparse one is never worse)."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(3, 2000, generator=g, dtype=F64)
    X = torch.randn(24, 3, generator=g, dtype=F64) @ base + 0.5 * torch.randn(
        24, 2000, generator=g, dtype=F64
    )
    G = X @ X.T
    Ks = [32, 128, 512]
    es, eg = [], []
    for K in Ks:
        s_err, g_err = [], []
        for s in range(12):
            S = SparseJLProjector(2000, K, seed=s, dtype=F64).sketch(X)
            s_err.append(_rel(S @ S.T, G) ** 2)
            R = torch.randn(2000, K, generator=torch.Generator().manual_seed(100 + s), dtype=F64) / math.sqrt(
                K
            )
            g_err.append(_rel((X @ R) @ (X @ R).T, G) ** 2)
        es.append(math.sqrt(np.mean(s_err)))
        eg.append(math.sqrt(np.mean(g_err)))
    slope = np.polyfit(np.log(Ks), np.log(es), 1)[0]
    assert -0.75 < slope < -0.35, (es, slope)
    assert max(a / b for a, b in zip(es, eg)) < 1.5, (es, eg)


def test_sparse_projection_does_not_depend_on_the_parameter_blocks():
    pr = SparseJLProjector(200_000, 64, seed=5)
    x = torch.randn(3, 200_000)
    whole = pr.sketch(x)
    parts = pr.sketch({"a": x[:, :70_000], "b": x[:, 70_000:150_000].reshape(3, 10, -1), "c": x[:, 150_000:]})
    assert torch.allclose(whole, parts, atol=1e-4)
    net, X = _mlp(), torch.randn(9, 5, dtype=F64)
    F1 = pntk_features(net, X, 48, block_numel=10)
    F2 = pntk_features(net, X, 48, block_numel=10_000)
    assert F1.meta["blocks"] != F2.meta["blocks"]
    assert np.allclose(F1.array, F2.array, atol=1e-12)
    ntk_from_features(F1, F2)  # same projection: combinable
    with pytest.raises(ValueError, match="grad_dim"):
        pr.sketch(torch.randn(2, 10))


# ------------------------------------------------------------------ refusing to mix projections
def test_features_of_different_projections_are_refused(tmp_path):
    net, X = _mlp(), torch.randn(12, 5, dtype=F64)
    exact = ntk_from_features(pntk_features(net, X, None))
    A = pntk_features(net, X, 256, seed=0, path=tmp_path / "a")
    B = pntk_features(net, X, 256, seed=1, path=tmp_path / "b")
    # what mixing would give: an unrelated matrix (≈ 100% error) where each alone is a few %
    mixed = torch.from_numpy(A.array.reshape(12, -1) @ B.array.reshape(12, -1).T)
    assert _rel(mixed, exact) > 0.5 > 5 * _rel(ntk_from_features(A), exact)
    with pytest.raises(ValueError, match="different random projections.*seed 0 vs 1"):
        ntk_from_features(A, B)
    # stored features load without the model and data, and are checked the same way
    LA, LB = load_features(tmp_path / "a"), load_features(tmp_path / "b")
    assert torch.equal(ntk_from_features(LA), ntk_from_features(A))
    with pytest.raises(ValueError, match="seed 0 vs 1"):
        ntk_from_features(LA, LB)
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        load_features(tmp_path / "nothing")
    # TRAK's dense projector seeds each column block: another proj_memory is another matrix
    D1 = pntk_features(net, X, 64, proj_type="rademacher", proj_memory=64 * 42 * 8)
    D2 = pntk_features(net, X, 64, proj_type="rademacher", proj_memory=16 * 42 * 8)
    assert not np.allclose(D1.array, D2.array)
    with pytest.raises(ValueError, match="different random projections"):
        ntk_from_features(D1, D2)
    with pytest.raises(ValueError, match="different random projections"):
        ntk_from_features(pntk_features(net, X, 64, proj_type="normal"), pntk_features(net, X, 64))


# ------------------------------------------------------------------ TRAKer tasks
def _traker(net, task, rows, tmp_path, **kw):
    from trak import TRAKer

    return TRAKer(
        model=net,
        task=task,
        train_set_size=rows,
        save_dir=str(tmp_path),
        device="cpu",
        use_half_precision=False,
        logging_level=logging.WARNING,
        **kw,
    )


def test_traker_tasks_give_our_kernels(tmp_path):
    """TRAKer + featurize with our tasks and projector gives the same features as
    pntk_features (same sparse matrix), read back without the model or the data."""
    from inf.analysis.traker_tasks import (
        PNTKModelOutput,
        TrNTKModelOutput,
        featurize_loader,
        load_traker_features,
    )

    net = _mlp(dtype=torch.float32)
    X, y = torch.randn(10, 5), torch.randint(0, 3, (10,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=4)
    P, K = sum(p.numel() for p in net.parameters()), 64
    for task, kind, rows in ((PNTKModelOutput(), "pseudo", 10), (TrNTKModelOutput(), "trace", 30)):
        tr = _traker(net, task, rows, tmp_path / kind, projector=SparseJLProjector(P, K, seed=3))
        featurize_loader(tr, loader)
        F = load_traker_features(tmp_path / kind, 0)
        ours = pntk_features(net, X, K, seed=3, outputs="sum" if kind == "pseudo" else "all")
        assert _rel(ntk_from_features(F, kind=kind), ntk_from_features(ours, kind=kind)) < 1e-5
        ntk_from_features(F, ours, kind=kind)  # the same projection: combinable
    assert _rel(ntk_from_features(F, kind="full"), ntk_from_features(ours, kind="full")) < 1e-5
    # a plain (x, y) batch for the trNTK task is refused, not read as class indices
    tr.load_checkpoint(net.state_dict(), model_id=7)
    with pytest.raises(TypeError, match="expanded"):
        tr.featurize((X[:2], y[:2]), num_samples=2)


def test_traker_string_task_checkpoints_and_stock_projector(tmp_path):
    """task='trNTK' with TRAK's own CPU projector, two checkpoints: each kernel estimates the
    exact one; features of two checkpoint ids (TRAK reseeds per id) are refused together."""
    from inf.analysis.traker_tasks import featurize_loader, load_traker_features

    net = _mlp(dtype=torch.float32)
    net2 = _mlp(seed=1, dtype=torch.float32)
    X = torch.randn(8, 5)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X), batch_size=3)
    ex = [empirical_ntk(m, X, kind="trace") for m in (net, net2)]
    states = [{k: v.clone() for k, v in m.state_dict().items()} for m in (net, net2)]
    tr = _traker(net, "trNTK", 24, tmp_path, proj_dim=1024)
    featurize_loader(tr, loader, checkpoints=states)  # TRAKer loads each into `net`
    feats = load_traker_features(tmp_path)
    assert sorted(feats) == [0, 1]
    for i in (0, 1):
        assert _rel(ntk_from_features(feats[i]), ex[i]) < 0.15
    avg = ntk_over_checkpoints([feats[0], feats[1]])
    assert _rel(avg, (ex[0] + ex[1]) / 2) < 0.15
    assert _rel(ex[0], ex[1]) > 0.2  # the two checkpoints have different kernels
    with pytest.raises(ValueError, match="model_id 0 vs 1"):
        ntk_from_features(feats[0], feats[1])


# ------------------------------------------------------------------ kernels and surrogates
def test_exact_ntk_by_slices_and_kernel_conventions(monkeypatch):
    net = _mlp()
    X, Y = torch.randn(7, 5, dtype=F64), torch.randn(4, 5, dtype=F64)
    for kind in ("trace", "pseudo", "full"):
        assert (
            _rel(
                exact_ntk(net, X, Y, kind=kind, memory_bytes=2000, chunk_size=3),
                empirical_ntk(net, X, Y, kind=kind),
            )
            < 1e-12
        )
    F = pntk_features(net, X, None, outputs="sum")
    mean, total = ntk_from_features(F, kind="pseudo"), ntk_from_features(F, kind="pseudo", pseudo_scale="sum")
    assert torch.allclose(total, 3 * mean)  # without the 1/C of the pseudo-NTK
    cos = ntk_from_features(F, kind="pseudo", normalize=True)
    assert torch.allclose(cos, ntk_from_features(F, kind="pseudo", pseudo_scale="sum", normalize=True))
    assert torch.allclose(cos.diagonal(), torch.ones(7, dtype=F64))
    assert torch.allclose(cos, cosine_normalize(mean, kernel_diagonal(F, "pseudo")))
    import importlib

    mod = importlib.import_module("inf.analysis.pntk")
    assert ntk_from_features(F, kind="pseudo").dtype == F64
    monkeypatch.setattr(mod, "LARGE_KERNEL", 40)  # 7 × 7 = 49 entries: "large"
    assert ntk_from_features(F, kind="pseudo").dtype == torch.float32


def test_ksvm_kglm_kendall_and_misclassification_overlap():
    torch.manual_seed(0)
    centers = 3 * torch.randn(3, 5, dtype=F64)
    y = torch.arange(60) % 3
    X = centers[y] + torch.randn(60, 5, dtype=F64)
    yte = torch.arange(30) % 3
    Xte = centers[yte] + 1.5 * torch.randn(30, 5, dtype=F64)
    K_tr, K_te = X @ X.T + 1, Xte @ X.T + 1
    logits = Xte @ centers.T
    for method in ("svm", "glm"):
        sur = KernelSurrogate(method).fit(K_tr, y, 3)
        p = sur.predict_proba(K_te)
        assert torch.allclose(p.sum(1), torch.ones(30, dtype=F64))
        rep = surrogate_agreement(logits, p, yte, surrogate_pred=sur.predict(K_te))
        assert rep["surrogate_accuracy"] > 0.6 and -1 <= rep["kendall_all"] <= 1
        assert rep["kendall_all"] <= rep["spearman_all"] + 0.2
    # overlap by hand: errors {0, 1, 2} and {1, 2, 3} of 10 → 2 common of 4 in the union
    labels = torch.zeros(10, dtype=torch.long)
    a, b = labels.clone(), labels.clone()
    a[[0, 1, 2]] = 1
    b[[1, 2, 3]] = 1
    ov = misclassification_overlap(a, b, labels)
    assert ov["overlap"] == 0.5 and ov["common_errors"] == 2
    from scipy.stats import hypergeom

    assert math.isclose(ov["p_value"], sum(hypergeom.pmf(k, 10, 3, 3) for k in (2, 3)))
    assert misclassification_overlap(a, a, labels)["overlap"] == 1.0


# ------------------------------------------------------------------ programs: safe loading, one-line errors
class _Payload:
    """Unpickling this creates a marker file: the stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _run(main, argv, capsys):
    from experiments.cli import run_main

    with pytest.raises(SystemExit) as exc:
        run_main(main, "prog", argv)
    err = capsys.readouterr().err.strip()
    return exc.value.code, err


def test_malicious_checkpoint_is_refused_without_running(tmp_path, capsys):
    from experiments.analysis import pntk as pntk_prog
    from experiments.analysis import pntk_residuals

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "config": _Payload(marker)}, evil)
    common = [
        "--checkpoint",
        str(evil),
        "--n-train",
        "20",
        "--n-test",
        "10",
        "--no-progress",
        "--out",
        str(tmp_path / "out"),
    ]
    for main in (pntk_prog.main, pntk_residuals.main):
        code, err = _run(main, common, capsys)
        assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
        assert "Python objects" in err and "--checkpoint" in err
        assert not marker.exists()
    # the file really is an attack: the unsafe load runs it
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_missing_checkpoint_data_root_and_threads(tmp_path, capsys):
    from experiments.analysis import pntk as pntk_prog

    code, err = _run(
        pntk_prog.main, ["--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path)], capsys
    )
    assert code == 2 and len(err.splitlines()) == 1 and "--checkpoint" in err and "does not exist" in err
    code, err = _run(pntk_prog.main, ["--data", "cifar10", "--out", str(tmp_path)], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "--data-root" in err
    code, err = _run(
        pntk_prog.main,
        ["--data", "cifar10", "--data-root", str(tmp_path / "x"), "--out", str(tmp_path)],
        capsys,
    )
    assert code == 2 and "does not exist" in err
    before = torch.get_num_threads()
    try:
        args = pntk_prog.parse_args(["--threads", "2"])
        assert args.threads == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    code, err = _run(pntk_prog.main, ["--threads", "0"], capsys)
    assert code == 2 and "--threads" in err and len(err.splitlines()) == 1


def test_residuals_program_draws_the_figure(tmp_path):
    from PIL import Image

    from experiments.analysis import pntk_residuals

    res = pntk_residuals.main(
        [
            "--model",
            "mu",
            "--width",
            "16",
            "--n-train",
            "20",
            "--steps",
            "2",
            "--ks",
            "8",
            "512",
            "--seeds",
            "2",
            "--no-progress",
            "--out",
            str(tmp_path),
        ]
    )
    for rows in res["projections"].values():
        small, large = np.mean(rows["residual"][0]), np.mean(rows["residual"][1])
        assert large < small / 3, (small, large)  # √64 = 8 times smaller in expectation
    png = tmp_path / "residuals.png"
    assert Image.open(png).size[0] >= 1200 and png.stat().st_size < 300_000
