"""Row compression (inf/compress.py; docs/math.md "Row compression", docs/compression.md)."""

from __future__ import annotations

import copy
import io
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from inf.compress import METHODS, RowBudget, compress_layer, compress_rows, kernel, pivoted_cholesky
from inf.layers import InfPiLinearReLU
from inf.networks import FinPiMLPSample, InfMLP
from inf.optim import InfSGD
from inf.utils import clip_grad_norm_

F64 = torch.float64


def _rows(M=200, r=6, p=3, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    B = F.normalize(torch.randn(M, r, generator=g, dtype=F64), dim=1).to(dtype)
    A = torch.randn(M, p, generator=g, dtype=F64).to(dtype)
    c = torch.randn(M, generator=g, dtype=F64)
    return A, c, B


def _rkhs_distance(A, c, B, A2, c2, B2):
    """‖Σ c_i A_i k(·,B_i) − Σ c2_j A2_j k(·,B2_j)‖_H from the full Gram matrix (small cases)."""
    Z = torch.cat([c.double()[:, None] * A.double(), -(c2.double()[:, None] * A2.double())])
    X = torch.cat([B.double(), B2.double()])
    return math.sqrt(max(float((Z.T @ kernel(X, X) @ Z).trace()), 0.0))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("block", [1, 16])
def test_eps_closed_form_equals_direct_rkhs_distance(method, block):
    # float64: both sides are sums of O(1) terms, so they agree to rounding (≈1e-14); 1e-10 leaves room
    A, c, B = _rows()
    An, cn, Bn, _, rep = compress_rows(
        A, c, B, landmarks=30, method=method, block=block, generator=torch.Generator().manual_seed(1)
    )
    direct = _rkhs_distance(A, c, B, An, cn, Bn)
    assert rep.landmarks == 30 and rep.rows_after == 30 and rep.rows_before == 200
    assert 0.05 < rep.rel_eps < 1.0  # a genuinely lossy case
    assert abs(rep.eps - direct) <= 1e-10 * max(1.0, rep.norm)
    assert abs(rep.norm - _rkhs_distance(A, c, B, A[:0], c[:0], B[:0])) <= 1e-10 * rep.norm


def test_weights_are_the_least_squares_projection():
    # W = K_UU⁻¹ K_UB w by a dense solve must equal the pivoted-Cholesky weights
    A, c, B = _rows(M=120)
    An, cn, Bn, _, rep = compress_rows(A, c, B, landmarks=25, method="greedy", block=1)
    U = Bn
    W_ref = torch.linalg.solve(kernel(U, U), kernel(U, B) @ (c[:, None] * A))
    assert torch.allclose(cn[:, None] * An, W_ref, rtol=1e-8, atol=1e-10)
    # the projection minimises the RKHS error: perturbing the weights only increases it
    for s in (1e-3, -1e-3):
        assert _rkhs_distance(A, c, B, W_ref + s, torch.ones(25, dtype=F64), U) > rep.eps


def test_compressing_to_all_rows_is_exact():
    torch.manual_seed(0)
    layer = InfPiLinearReLU(5, 3, bias_alpha=0.0, dtype=F64)
    A, c, B = _rows(M=60, r=5, p=3)
    layer.rows.truncate(0)
    layer.rows.append(A, B, c)
    g = torch.randn(40, 5, dtype=F64)
    with torch.no_grad():
        before = layer(g)
    rep = compress_layer(layer, rows=60, method="greedy")
    with torch.no_grad():
        after = layer(g)
    assert rep.rows_after == 60 and rep.rel_eps < 1e-6
    assert torch.allclose(after, before, rtol=0, atol=1e-10 * before.abs().max())


@pytest.mark.parametrize("method", METHODS)
def test_output_bound_eps_over_sqrt2(method):
    # |Δ layer(g)| ≤ |g|·ε/√2 for every input (Cauchy–Schwarz in the RKHS); checked on random
    # inputs and on the rows' own directions, where the error is largest
    torch.manual_seed(1)
    layer = InfPiLinearReLU(6, 4, bias_alpha=0.0, dtype=F64)
    A, c, B = _rows(M=300, r=6, p=4, seed=2)
    layer.rows.truncate(0)
    layer.rows.append(A, B, c)
    g = torch.cat([torch.randn(500, 6, dtype=F64) * 3.0, B[:100] * 2.0])
    with torch.no_grad():
        before = layer(g)
    rep = compress_layer(layer, rows=20, method=method, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = layer(g) - before
    bound = g.norm(dim=1) * rep.eps / math.sqrt(2)
    assert (diff.norm(dim=1) <= bound * (1 + 1e-9)).all()
    assert diff.norm(dim=1).max() > 0.05 * bound.max()  # the bound is not vacuous here


def test_tolerance_mode():
    A, c, B = _rows(M=300, r=3, p=2)
    for tol in (0.1, 0.01):
        An, cn, Bn, _, rep = compress_rows(A, c, B, tol=tol, method="greedy", block=4)
        assert rep.rel_eps <= tol
        assert rep.rows_after < 300
        assert abs(_rkhs_distance(A, c, B, An, cn, Bn) - rep.eps) <= 1e-10 * rep.norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_storage(dtype):
    A, c, B = _rows(M=200, r=6, p=3)
    A, B, c = A.to(dtype), B.to(dtype), c.float()
    An, cn, Bn, _, rep = compress_rows(A, c, B, landmarks=40, method="greedy")
    assert An.dtype == dtype and Bn.dtype == dtype and cn.dtype == torch.float32
    # the stored result is the float64 projection rounded to the storage precision: its true error
    # is ε plus the rounding of W (relative 2^-8 for bfloat16, 2^-11 for float16, 2^-24 for float32)
    unit = {torch.float32: 2**-24, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    true = _rkhs_distance(A, c, B, An, cn, Bn)
    assert abs(true - rep.eps) <= 4 * unit * rep.norm * math.sqrt(40)
    # float32 computation (it may pick other landmarks: the diagonal ties break differently)
    # reports its own error to float32 accuracy: ε² = ‖h‖² − ‖Fᵀw‖² loses ~1e-7·‖h‖² to cancellation
    A2, c2, B2, _, rep32 = compress_rows(A, c, B, landmarks=40, method="greedy", dtype=torch.float32)
    assert abs(_rkhs_distance(A, c, B, A2, c2, B2) - rep32.eps) <= 2e-3 * rep32.norm


def test_pivoted_cholesky_factor_and_rank_deficiency():
    # K_BB ≈ F Fᵀ with exact agreement on the pivots; duplicated rows are never picked twice
    _, _, B = _rows(M=50, r=4)
    B = torch.cat([B, B])  # every direction twice: K_BB has rank ≤ 50
    w = torch.randn(100, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    for method in METHODS:
        lm = pivoted_cholesky(
            B,
            100,
            method=method,
            block=8,
            generator=torch.Generator().manual_seed(0),
            weights=w,
            applied=kernel(B, B) @ w,
        )
        assert lm.index.numel() <= 50
        assert len(set((lm.index % 50).tolist())) == lm.index.numel()
        K = kernel(B, B)
        FF = lm.factor @ lm.factor.T
        assert torch.allclose(FF[lm.index][:, lm.index], K[lm.index][:, lm.index], atol=1e-12)
        assert (K - FF).diagonal().max() < 1e-8


def _reference_step(D, Wh, Wv, g, y, at, lr, mu, wd):
    """One step of SGD with momentum and weight decay on f(g) = |g| h(ĝ), done in function space:
    h = Σ_j k(·, D_j) Wh_j and the velocity V = Σ_j k(·, D_j) Wv_j over a fixed dictionary D that
    contains this batch's directions at rows ``at``; loss ½ Σ |f(g_b) − y_b|²."""
    s = g.norm(dim=1)
    out = s[:, None] * (kernel(D[at], D) @ Wh)
    grad = torch.zeros_like(Wh)
    grad[at] = (out - y) * s[:, None]  # ∇_h loss = Σ_b δ_b s_b k(·, ĝ_b)
    Wv = mu * Wv + grad + wd * Wh
    return Wh - lr * Wv, Wv


def test_momentum_with_compression_equals_momentum_on_projected_weight():
    torch.manual_seed(3)
    r, p, lr, mu, wd = 4, 2, 0.3, 0.9, 0.01
    layer = InfPiLinearReLU(r, p, bias_alpha=0.0, dtype=F64)
    opt = InfSGD(layer.parameters(), lr=lr, momentum=mu, weight_decay=wd)
    gen = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(5, r, generator=gen, dtype=F64), torch.randn(5, p, generator=gen, dtype=F64))
        for _ in range(14)
    ]

    def step(g, y):
        opt.zero_grad()
        (0.5 * (layer(g) - y).pow(2).sum()).backward()
        opt.step()

    for g, y in batches[:8]:
        step(g, y)
    store = layer.rows
    A, c, B = store.A.detach().clone(), store.coefficients.detach().clone(), store.B.detach().clone()
    buf = opt.state[store.coefficients]["momentum_buffer"].clone()
    rep = compress_layer(layer, rows=16, optimizer=opt, method="greedy", block=1)
    assert rep.landmarks == 8 and rep.velocity_eps is not None and rep.rel_eps > 1e-3
    # reference: project h and V onto the same landmarks by a dense solve, then run the
    # function-space recursion V ← μV + ∇ + λh, h ← h − lr V over the dictionary U ∪ batches
    U = store.B[:8].detach().clone()
    solve = lambda coef: torch.linalg.solve(kernel(U, U), kernel(U, B) @ (coef[:, None] * A))  # noqa: E731
    D = torch.cat([U] + [F.normalize(g, dim=1) for g, _ in batches[8:]])
    Wh, Wv = torch.zeros(len(D), p, dtype=F64), torch.zeros(len(D), p, dtype=F64)
    Wh[:8], Wv[:8] = solve(c), solve(buf)
    for i, (g, y) in enumerate(batches[8:]):
        step(g, y)
        Wh, Wv = _reference_step(D, Wh, Wv, g, y, torch.arange(8 + 5 * i, 13 + 5 * i), lr, mu, wd)
    x = torch.randn(30, r, dtype=F64)
    with torch.no_grad():
        got = layer(x)
    want = x.norm(dim=1)[:, None] * (kernel(F.normalize(x, dim=1), D) @ Wh)
    # float64 throughout; rows are appended in a different order, so agreement is to rounding
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-9 * want.abs().max())


def _train(net, opt, budget, batches, clip=True):
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        if clip:
            clip_grad_norm_(net.parameters(), 1.0, per_param=True)
        opt.step()
        if budget is not None:
            budget()


def _net_opt_budget(seed=0, max_rows=40, momentum=0.9):
    torch.manual_seed(seed)
    net = InfMLP(5, 3, 6, L=1, bias_alpha=0.5, dtype=F64)
    opt = InfSGD(net.parameters(), lr=0.5, momentum=momentum, weight_decay=1e-3)
    return net, opt, RowBudget(net, max_rows=max_rows, keep_fraction=0.5, optimizer=opt, seed=7)


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(4, 5, generator=g, dtype=F64), torch.randint(0, 3, (4,), generator=g)) for _ in range(n)
    ]


def test_row_budget_keeps_rows_bounded_and_records():
    net, opt, budget = _net_opt_budget()
    _train(net, opt, budget, _batches(20))
    m = budget.metrics()
    assert all(v <= 40 for v in m["rows"].values())
    assert all(v >= 2 for v in m["compressions"].values())
    assert all(v > 0 for v in m["eps_sum"].values())
    x = torch.randn(7, 5, dtype=F64)
    assert torch.isfinite(net.features(x)).all() and torch.isfinite(net(x)).all()
    # the momentum buffer follows the rows
    for _, layer in budget.layers:
        assert opt.state[layer.rows.coefficients]["momentum_buffer"].shape[0] == layer.rows.num_rows


def test_resume_with_budget_equals_uninterrupted_run():
    batches = _batches(16)
    net, opt, budget = _net_opt_budget()
    _train(net, opt, budget, batches)
    net2, opt2, budget2 = _net_opt_budget()
    _train(net2, opt2, budget2, batches[:7])
    f = io.BytesIO()
    torch.save({"net": net2.state_dict(), "opt": opt2.state_dict(), "budget": budget2.state_dict()}, f)
    f.seek(0)
    state = torch.load(f, weights_only=True)
    net3, opt3, budget3 = _net_opt_budget(seed=5)  # different init: everything must come from the file
    net3.load_state_dict(state["net"])
    opt3.load_state_dict(state["opt"])
    budget3.load_state_dict(state["budget"])
    _train(net3, opt3, budget3, batches[7:])
    assert budget3.metrics()["compressions"] == budget.metrics()["compressions"]
    x = torch.randn(20, 5, dtype=F64)
    with torch.no_grad():
        assert torch.equal(net3(x), net(x))


def test_finite_net_sampled_from_compressed_net_has_projected_weight():
    # The finite output weight W = n^-½ (c⊙A)ᵀ φ(Ω Bᵀ)ᵀ has |W|_F² → ‖a‖² = ‖h‖²_H, so sampling
    # the compressed and the uncompressed net with the same Ω gives |ΔW|_F ≈ ε (relative error
    # O(n^-½) over the n = 4096 rows of Ω; 10% allowed).
    net, opt, _ = _net_opt_budget(momentum=0.0)
    _train(net, opt, None, _batches(30))
    comp = copy.deepcopy(net)
    rep = compress_layer(comp.output_layer, rows=20, method="greedy")
    assert rep.rel_eps > 0.01
    fin = FinPiMLPSample(net, 4096, generator=torch.Generator().manual_seed(0))
    fin_c = FinPiMLPSample(comp, 4096, generator=torch.Generator().manual_seed(0))
    dW = (fin.output_layer.weight - fin_c.output_layer.weight).norm().item()
    assert abs(dW / rep.eps - 1) < 0.1
    assert abs(fin.output_layer.weight.norm().item() / rep.norm - 1) < 0.1


def test_tangent_kernel_and_tract_on_compressed_nets():
    # compressing to all rows keeps the exact tangent kernel (the function and its rows' span are
    # unchanged); a lossy compression gives a nearby kernel
    from inf.analysis.inf_ntk import inf_ntk

    net, opt, _ = _net_opt_budget(momentum=0.0)
    _train(net, opt, None, _batches(6))
    x = torch.randn(5, 5, dtype=F64)
    full = inf_ntk(net, x, kind="trace")
    exact, lossy = copy.deepcopy(net), copy.deepcopy(net)
    for (_, a), (_, b) in zip(exact.named_modules(), lossy.named_modules()):
        if isinstance(a, InfPiLinearReLU):
            compress_layer(a, rows=a.rows.num_rows, method="greedy")
            compress_layer(b, rows=12, method="greedy")
    assert torch.allclose(inf_ntk(exact, x, kind="trace"), full, rtol=1e-8)
    approx = inf_ntk(lossy, x, kind="trace")
    assert torch.isfinite(approx).all() and (approx - full).norm() < 0.5 * full.norm()
    # TrAct on the input layer: the budget compresses only the row layers
    torch.manual_seed(0)
    tnet = InfMLP(5, 3, 6, L=1, tract_lambda=0.1, dtype=F64)
    topt = InfSGD(tnet.parameters(), lr=0.5, momentum=0.9)
    budget = RowBudget(tnet, max_rows=30, optimizer=topt)
    _train(tnet, topt, budget, _batches(12))
    assert max(budget.rows().values()) <= 30 and sum(budget.compressions.values()) >= 2
    assert torch.isfinite(tnet(x)).all()


def test_errors_are_one_line():
    net, opt, _ = _net_opt_budget()
    with pytest.raises(ValueError, match="keep_fraction"):
        RowBudget(net, max_rows=10, keep_fraction=1.5)
    with pytest.raises(ValueError, match="landmark method"):
        RowBudget(net, max_rows=10, method="svd")
    with pytest.raises(TypeError, match="not an infinite"):
        compress_layer(net.input_layer, rows=5)


def test_kernel_is_only_semidefinite():
    # φ(t) − φ(−t) = t makes the features of ±u_1..±u_{r+1} linearly dependent (docs/math.md):
    # the Gram matrix is singular although the points are distinct
    u = F.normalize(torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(0)), dim=1)
    X = torch.cat([u, -u])
    ev = torch.linalg.eigvalsh(kernel(X, X))
    assert ev[0].abs() < 1e-12 and ev[1] > 1e-3
    # the landmark factorization stops instead of dividing by a zero pivot
    lm = pivoted_cholesky(X, 8, method="greedy", block=1)
    assert lm.index.numel() == 7


@pytest.mark.slow
def test_quickstart_with_row_budget(tmp_path):
    from experiments import quickstart

    result = quickstart.main(
        [
            "--epochs",
            "1",
            "--width",
            "256",
            "--r",
            "16",
            "--row-budget",
            "400",
            "--no-progress",
            "--out",
            str(tmp_path / "qs.png"),
        ]
    )
    m = result["row_budget"]
    assert max(m["rows"].values()) <= 400 and min(m["compressions"].values()) >= 2
    assert result["infinite"] > 0.3


def test_cifar10mlp_row_budget_resume_equals_uninterrupted(tmp_path):
    """--row-budget in the shared training loop: rows stay bounded, compressions are recorded in
    the metrics, and a run resumed from its checkpoint (budget state included) ends exactly where
    the uninterrupted one does."""
    from experiments.cifar10 import cifar10mlp
    from experiments.data.synthetic import write_synthetic_cifar10
    from experiments.runs import load_checkpoint

    data = write_synthetic_cifar10(tmp_path / "cifar", n_train=32, n_test=16)
    common = [
        "--data",
        str(data),
        "--float",
        "--r",
        "6",
        "--depth",
        "1",
        "--train-size",
        "32",
        "--test-size",
        "16",
        "--no-progress",
        "--epochs",
        "3",
        "--batch-size",
        "8",
        "--lr",
        "0.5",
        "--momentum",
        "0.9",
        "--wd",
        "1e-3",
        "--gclip",
        "0.5",
        "--save-model",
        "--row-budget",
        "40",
        "--row-budget-keep",
        "0.5",
    ]
    whole = cifar10mlp.main(common + ["--save-dir", str(tmp_path / "whole")])
    assert whole["epochs"][-1]["compressions"] >= 4
    assert all(int(n.replace(",", "")) <= 40 for n in whole["epochs"][-1]["rows"].split("/"))
    first = cifar10mlp.main(common + ["--save-dir", str(tmp_path / "split"), "--stop-after-epochs", "1"])
    resumed = cifar10mlp.main(
        common
        + [
            "--save-dir",
            str(tmp_path / "split"),
            "--model-path",
            str(Path(first["run_dir"]) / "checkpoint.pt"),
        ]
    )
    keys = ("test_loss", "test_acc", "train_loss", "rows", "compressions", "compression_rel_eps")
    assert [{k: r[k] for k in keys} for r in resumed["epochs"]] == [
        {k: r[k] for k in keys} for r in whole["epochs"]
    ]
    a, b = load_checkpoint(whole["run_dir"])["model"], load_checkpoint(resumed["run_dir"])["model"]
    assert all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))


@pytest.mark.parametrize("method", METHODS)
def test_clustered_rows_in_float32_keep_the_bound(method):
    # rows in 10 tight clusters (as a trained net's output layer sees): nearly dependent landmarks
    # would give huge cancelling weights that a float32 forward cannot evaluate; the pivot
    # threshold for float32 storage refuses them, and the float32 layer obeys |Δ| ≤ |g|·ε/√2
    # (with a tiny threshold, 1e-12, this case reported ε ≈ 0 while the outputs moved)
    g = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(10, 8, generator=g, dtype=F64), dim=1)
    B = F.normalize(centers.repeat(30, 1) + 1e-4 * torch.randn(300, 8, generator=g, dtype=F64), dim=1)
    A, c = torch.randn(300, 3, generator=g, dtype=F64), torch.randn(300, generator=g, dtype=F64)
    layer = InfPiLinearReLU(8, 3, bias_alpha=0.0)
    layer.rows.set_rows(A.float(), c.float(), B.float())
    x = torch.randn(200, 8, generator=g)
    with torch.no_grad():
        before = layer(x)
    rep = compress_layer(layer, rows=150, method=method, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (layer(x) - before).norm(dim=1)
    assert rep.landmarks <= 20 and 0 < rep.rel_eps < 1e-2
    assert (diff <= x.norm(dim=1) * rep.eps / math.sqrt(2)).all()


def test_sharded_layer_refused():
    """A layer whose rows are split over processes (inf.distributed) is not compressed piecewise."""
    torch.manual_seed(0)
    net = InfMLP(5, 3, r=4, L=1, dtype=torch.float64)
    layer = net.output_layer
    layer.rows.sharded = True  # what inf.distributed.DistributedRowStore sets when rows are split
    with pytest.raises(ValueError, match="sharded"):
        compress_layer(layer, rows=2)
