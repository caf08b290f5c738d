"""Tests of experiments/kernels.py: NNGP/NTK against finite wide networks, blocked KRR."""
from __future__ import annotations

import math

import pytest
import torch
from torch.func import jacrev, vmap

from experiments.kernels import (
    cholesky_inplace_,
    cholesky_solve_inplace,
    feature_kernel,
    kernel_ridge_regression,
    krr_memory_bytes,
    krr_targets,
    make_mlp_kernel,
    mlp_kernels,
    mlp_nngp,
    mlp_ntk,
)
from inf.math import F00, relu_kernel

DEPTH, VARW, VARB = 3, 2.0, 0.5
D_IN = 16


def _inputs() -> torch.Tensor:
    """Four inputs with different norms and correlations (one nearly anti-aligned pair)."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(4, D_IN, generator=g, dtype=torch.float64)
    X[1] *= 0.5
    X[2] = 0.7 * X[0] + 0.3 * X[2]
    X[3] = -X[0] + 0.2 * X[3]
    return X


def _hidden(params: dict, x: torch.Tensor, depth: int) -> torch.Tensor:
    """Last hidden preactivation of the MLP in NTK parametrization (module docstring)."""
    h = x
    for l in range(depth):
        W, b = params[f"W{l}"], params[f"b{l}"]
        a = h if l == 0 else torch.relu(h)
        h = math.sqrt(VARW / W.shape[0]) * (a @ W) + math.sqrt(VARB) * b
    return h


def _random_params(width: int, depth: int, gen: torch.Generator, dtype, readout: bool) -> dict:
    params, fan_in = {}, D_IN
    for l in range(depth):
        params[f"W{l}"] = torch.randn(fan_in, width, generator=gen, dtype=dtype)
        params[f"b{l}"] = torch.randn(width, generator=gen, dtype=dtype)
        fan_in = width
    if readout:
        params["Wout"] = torch.randn(width, generator=gen, dtype=dtype)
        params["bout"] = torch.randn((), generator=gen, dtype=dtype)
    return params


def _check_against_samples(samples: list[torch.Tensor], exact: torch.Tensor, n_se: float,
                           rel_bias: float) -> tuple[float, float]:
    """Every entry of the sample mean within ``n_se`` standard errors (+ a finite-width bias)."""
    E = torch.stack(samples)
    mean = E.mean(0)
    se = E.std(0) / math.sqrt(len(samples))
    err = (mean - exact).abs()
    assert torch.all(err <= n_se * se + rel_bias * exact.abs()), (err, se)
    rel_err = float((err / exact.abs()).max())
    rel_se = float((se / exact.abs()).max())
    print(f"max relative error {rel_err:.4f}, max relative standard error {rel_se:.4f}, "
          f"max |error|/SE {float((err / se).max()):.2f}")
    return rel_err, rel_se


def test_nngp_matches_monte_carlo_of_wide_relu_networks():
    """Width 4096, 12 independent networks.

    For one network with random hidden layers, the output covariance given the
    hidden layers is ``varw · φ(hᴸ)·φ(hᴸ')/n + varb`` (the readout is
    Gaussian), so each draw gives an unbiased-up-to-O(1/n) estimate of the
    NNGP.  Per draw the relative spread of the entries is ≈ 3–8 % (measured;
    O(depth/√n)), so 12 draws give a standard error of ≈ 1–2.5 %.  We require
    every entry within 5 standard errors (estimated from the draws) plus
    0.5 % for the O(1/n) finite-width bias (≈ 1/4096 times a depth-dependent
    constant).  A wrong convention (no readout, a missing bias term, Σ scaled
    by 1/2) moves entries by 10–50 %, far outside this band.
    """
    X = _inputs()
    exact = mlp_nngp(X, depth=DEPTH, varw=VARW, varb=VARB)
    gen = torch.Generator().manual_seed(0)
    width, draws = 4096, 12
    samples = []
    for _ in range(draws):
        # float32 for speed: rounding error ≈ 1e-6, far below the MC error
        params = _random_params(width, DEPTH, gen, torch.float32, readout=False)
        a = torch.relu(_hidden(params, X.float(), DEPTH)).double()
        samples.append(VARW * a @ a.T / width + VARB)
    rel_err, rel_se = _check_against_samples(samples, exact, n_se=5.0, rel_bias=0.005)
    assert rel_err < 0.06 and rel_se < 0.03


def test_ntk_matches_empirical_ntk_of_wide_network():
    """Empirical NTK ``Σ_θ ∂f(x)/∂θ ∂f(x')/∂θ`` by ``torch.func`` (``vmap(jacrev)``).

    Width 2048, 8 networks in NTK parametrization, all weights and biases
    (readout included).  The empirical NTK at initialisation fluctuates by
    O(depth/√n) (≈ 4–8 % per draw here) around a mean that differs from the
    limit by O(depth²/n); we require each entry of the 8-draw mean within 5
    standard errors plus 1 % of the limit.
    """
    X = _inputs()
    exact = mlp_ntk(X, depth=DEPTH, varw=VARW, varb=VARB)

    def f(params, x):
        a = torch.relu(_hidden(params, x, DEPTH))
        return math.sqrt(VARW / a.shape[-1]) * (a @ params["Wout"]) + math.sqrt(VARB) * params["bout"]

    gen = torch.Generator().manual_seed(0)
    width, draws = 2048, 8
    samples = []
    for _ in range(draws):
        params = _random_params(width, DEPTH, gen, torch.float32, readout=True)
        jac = vmap(jacrev(f), in_dims=(None, 0))(params, X.float())
        ntk = sum(j.reshape(len(X), -1).double() @ j.reshape(len(X), -1).double().T
                  for j in jac.values())
        samples.append(ntk)
    rel_err, rel_se = _check_against_samples(samples, exact, n_se=5.0, rel_bias=0.01)
    assert rel_err < 0.08 and rel_se < 0.04


def test_depth_zero_is_linear_kernel_and_diagonal_recursion():
    X = _inputs()
    lin = VARW * X @ X.T / D_IN + VARB
    nngp, ntk = mlp_kernels(X, depth=0, varw=VARW, varb=VARB)
    torch.testing.assert_close(nngp, lin)
    torch.testing.assert_close(ntk, lin)
    # one hidden layer by hand: Σ¹ = varw |x||x'|-scaled F00 + varb, Θ¹ = Σ¹ + varw F11 Θ⁰
    sd = torch.sqrt(torch.diagonal(lin))
    rho = (lin / (sd[:, None] * sd[None, :])).clamp(-1, 1)
    s1 = VARW * sd[:, None] * sd[None, :] * F00(rho) + VARB
    f11 = (math.pi - torch.arccos(rho)) / (2 * math.pi)
    nngp, ntk = mlp_kernels(X, depth=1, varw=VARW, varb=VARB)
    torch.testing.assert_close(nngp, s1)
    torch.testing.assert_close(ntk, s1 + VARW * f11 * lin)


def test_blockwise_equals_whole_and_kernel_fn():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(29, 7, generator=g, dtype=torch.float64)
    Y = torch.randn(17, 7, generator=g, dtype=torch.float64)
    Y[0] = 0.0  # a zero input: its variance is varb only
    whole = mlp_kernels(X, Y, depth=4, varw=1.7, varb=0.2, block_size=1000)
    blocked = mlp_kernels(X, Y, depth=4, varw=1.7, varb=0.2, block_size=5)
    for a, b in zip(whole, blocked):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    fn = make_mlp_kernel("ntk", depth=4, varw=1.7, varb=0.2)
    torch.testing.assert_close(fn(X[:6], Y[:9]), whole[1][:6, :9], rtol=1e-12, atol=1e-12)
    # symmetric and positive semi-definite on the training set
    K = mlp_nngp(X, depth=4, varw=1.7, varb=0.2, block_size=8)
    torch.testing.assert_close(K, K.T, rtol=0, atol=1e-12)
    assert torch.linalg.eigvalsh(K).min() > -1e-10
    # images are flattened per row
    imgs = torch.randn(5, 3, 2, 2, generator=g)
    torch.testing.assert_close(mlp_nngp(imgs, depth=2), mlp_nngp(imgs.reshape(5, -1), depth=2))
    with pytest.raises(ValueError):
        mlp_nngp(X, Y[:, :3], depth=1)
    with pytest.raises(ValueError):
        mlp_nngp(X, depth=-1)


def test_feature_kernel_is_relu_kernel():
    g = torch.Generator().manual_seed(3)
    gx = torch.randn(11, 6, generator=g, dtype=torch.float64) * 3
    gy = torch.randn(5, 6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(feature_kernel(gx, gy), relu_kernel(gx, gy))
    torch.testing.assert_close(feature_kernel(gx), relu_kernel(gx, gx))
    unit = lambda v: v / v.norm(dim=1, keepdim=True)  # noqa: E731
    ln = feature_kernel(gx, gy, layernorm=True)
    torch.testing.assert_close(ln, F00(unit(gx) @ unit(gy).T))
    torch.testing.assert_close(torch.diagonal(feature_kernel(gx, layernorm=True)),
                               torch.full((11,), 0.5, dtype=torch.float64))
    # Monte Carlo meaning: E_ω[φ(ω·g) φ(ω·g')]
    omega = torch.randn(6, 200_000, generator=g, dtype=torch.float64)
    mc = torch.relu(gx[:3] @ omega) @ torch.relu(gy[:2] @ omega).T / omega.shape[1]
    torch.testing.assert_close(mc, feature_kernel(gx[:3], gy[:2]), rtol=0.03, atol=0.03)


def test_blocked_cholesky_and_solve():
    g = torch.Generator().manual_seed(4)
    n = 157
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = A @ A.T + n * torch.eye(n, dtype=torch.float64)
    B = torch.randn(n, 3, generator=g, dtype=torch.float64)
    M = A.clone()
    iu = torch.triu_indices(n, n, 1)
    M[iu[0], iu[1]] = float("nan")  # the strict upper triangle is never read
    cholesky_inplace_(M, block_size=40)
    torch.testing.assert_close(torch.tril(M), torch.linalg.cholesky(A))
    torch.testing.assert_close(cholesky_solve_inplace(M, B, block_size=33), torch.linalg.solve(A, B))
    bad = -torch.eye(5, dtype=torch.float64)
    with pytest.raises(torch.linalg.LinAlgError, match="not numerically positive definite"):
        cholesky_inplace_(bad, block_size=2)


def _toy_classification(n: int, m: int, d: int, C: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(C, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (n + m,), generator=g)
    X = 0.4 * means[y] + torch.randn(n + m, d, generator=g, dtype=torch.float64)
    return X[:n], y[:n], X[n:], y[n:]


def test_krr_blockwise_matches_direct_solve():
    Xtr, ytr, Xte, yte = _toy_classification(150, 40, 10, 3, seed=5)
    reg = 1e-3
    K = mlp_ntk(Xtr, depth=2, varw=VARW, varb=0.1)
    Kte = mlp_ntk(Xte, Xtr, depth=2, varw=VARW, varb=0.1)
    Y = krr_targets(ytr, 3)
    torch.testing.assert_close(Y.sum(1), torch.zeros(150, dtype=torch.float64))
    lam = reg * torch.diagonal(K).mean()
    direct = Kte @ torch.linalg.solve(K + lam * torch.eye(150, dtype=torch.float64), Y)
    direct_acc = float((direct.argmax(1) == yte).double().mean())
    fn = make_mlp_kernel("ntk", depth=2, varw=VARW, varb=0.1)
    common = dict(kernel_reg=reg, block_size=32, progress=False, return_outputs=True)
    acc64, out64 = kernel_ridge_regression(fn, Xtr, ytr, Xte, yte, dtype=torch.float64, **common)
    # both sides lose ~cond(K + λI)·1e-16 ≈ 1e-7 relative (λ = 1e-3 · mean diag)
    torch.testing.assert_close(out64, direct, rtol=1e-6, atol=1e-8)
    assert acc64 == direct_acc
    acc32, out32 = kernel_ridge_regression(fn, Xtr, ytr, Xte, yte, **common)  # float32 matrix
    assert float((out32 - direct).norm() / direct.norm()) < 1e-3
    acccg, outcg = kernel_ridge_regression(fn, Xtr, ytr, Xte, yte, method="cg", cg_tol=1e-10,
                                           **common)
    torch.testing.assert_close(outcg, direct, rtol=1e-6, atol=1e-8)
    assert acccg == direct_acc
    # the subset fallback solves the same problem on the chosen rows
    acc_sub, out_sub = kernel_ridge_regression(fn, Xtr, ytr, Xte, yte, train_subset=60, seed=3,
                                               dtype=torch.float64, **common)
    idx = torch.randperm(150, generator=torch.Generator().manual_seed(3))[:60].sort().values
    Ks = K[idx][:, idx]
    lam_s = reg * torch.diagonal(Ks).mean()
    ref = Kte[:, idx] @ torch.linalg.solve(Ks + lam_s * torch.eye(60, dtype=torch.float64), Y[idx])
    torch.testing.assert_close(out_sub, ref, rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError):
        kernel_ridge_regression(fn, Xtr, ytr, Xte, yte, method="lu", progress=False)


def test_krr_nngp_classifies_synthetic_cifar(tmp_path):
    """End to end on tiny synthetic CIFAR-10 files (class templates + noise): well above chance."""
    from experiments.data.cifar import load_cifar10
    from experiments.data.synthetic import write_synthetic_cifar10

    root = write_synthetic_cifar10(tmp_path, n_train=200, n_test=100, seed=0)
    xtr, ytr = load_cifar10(root, train=True)
    xte, yte = load_cifar10(root, train=False)

    def prep(x):
        x = x.reshape(len(x), -1).double() / 255.0
        return x - x.mean(1, keepdim=True)

    acc = kernel_ridge_regression(make_mlp_kernel("nngp", depth=3), prep(xtr), ytr, prep(xte), yte,
                                  num_classes=10, kernel_reg=1e-3, block_size=64, progress=False)
    assert acc > 0.5  # chance is 0.1


def test_memory_estimate_for_50k():
    gb = krr_memory_bytes(50_000, "cholesky", dtype=torch.float32) / 1e9
    assert 10.0 < gb < 11.5  # the 10.0 GB matrix dominates: fits in 24 GB
    assert krr_memory_bytes(50_000, "cholesky", dtype=torch.float64) / 1e9 > 20.0
    assert krr_memory_bytes(50_000, "cg") / 1e9 < 1.0
