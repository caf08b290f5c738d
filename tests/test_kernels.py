"""Tests of experiments/kernels.py: NNGP/NTK against finite wide networks, blocked KRR."""

from __future__ import annotations

import math

import numpy as np
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


def _check_against_samples(
    samples: list[torch.Tensor], exact: torch.Tensor, n_se: float, rel_bias: float
) -> tuple[float, float]:
    """Every entry of the sample mean within ``n_se`` standard errors (+ a finite-width bias)."""
    E = torch.stack(samples)
    mean = E.mean(0)
    se = E.std(0) / math.sqrt(len(samples))
    err = (mean - exact).abs()
    assert torch.all(err <= n_se * se + rel_bias * exact.abs()), (err, se)
    rel_err = float((err / exact.abs()).max())
    rel_se = float((se / exact.abs()).max())
    print(
        f"max relative error {rel_err:.4f}, max relative standard error {rel_se:.4f}, "
        f"max |error|/SE {float((err / se).max()):.2f}"
    )
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
        ntk = sum(j.reshape(len(X), -1).double() @ j.reshape(len(X), -1).double().T for j in jac.values())
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
    torch.testing.assert_close(
        torch.diagonal(feature_kernel(gx, layernorm=True)), torch.full((11,), 0.5, dtype=torch.float64)
    )
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
    acccg, outcg = kernel_ridge_regression(fn, Xtr, ytr, Xte, yte, method="cg", cg_tol=1e-10, **common)
    torch.testing.assert_close(outcg, direct, rtol=1e-6, atol=1e-8)
    assert acccg == direct_acc
    # the subset fallback solves the same problem on the chosen rows
    acc_sub, out_sub = kernel_ridge_regression(
        fn, Xtr, ytr, Xte, yte, train_subset=60, seed=3, dtype=torch.float64, **common
    )
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

    acc = kernel_ridge_regression(
        make_mlp_kernel("nngp", depth=3),
        prep(xtr),
        ytr,
        prep(xte),
        yte,
        num_classes=10,
        kernel_reg=1e-3,
        block_size=64,
        progress=False,
    )
    assert acc > 0.5  # chance is 0.1


def test_memory_estimate_for_50k():
    gb = krr_memory_bytes(50_000, "cholesky", dtype=torch.float32) / 1e9
    assert 10.0 < gb < 11.5  # the 10.0 GB matrix dominates: fits in 24 GB
    assert krr_memory_bytes(50_000, "cholesky", dtype=torch.float64) / 1e9 > 20.0
    assert krr_memory_bytes(50_000, "cg") / 1e9 < 1.0


# --------------------------------------------------------------------------- float32, zero inputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("variant", ["correct", "pilim"])
def test_zero_input_with_zero_bias_variance_is_finite(dtype, variant):
    """x = 0 with varb = 0 has variance exactly 0 at every layer, so its correlation is 0/0.

    The old fixed floor of 1e-300 underflowed to 0 in float32 and gave NaN (issue 14, item 12);
    the floor is now the dtype's smallest normal number. The zero row's NNGP is then exactly 0
    (its variance is 0), and the float32 kernels agree with float64 to float32 rounding:
    relative 1e-5 for the NNGP; 1e-3 for the NTK, whose F11 factor on the diagonal is taken at
    a correlation that float32 rounds to 1 − O(6e-8), where arccos(1 − ε) ≈ √(2ε) ≈ 3e-4
    (measured: 3.3e-4 relative at one diagonal entry).
    """
    g = torch.Generator().manual_seed(7)
    X = torch.randn(5, 12, generator=g, dtype=torch.float64)
    X[0] = 0.0
    nngp, ntk = mlp_kernels(X, depth=3, varw=2.0, varb=0.0, dtype=dtype, ntk_variant=variant)
    assert torch.isfinite(nngp).all() and torch.isfinite(ntk).all()
    assert torch.all(nngp[0] == 0) and torch.all(nngp[:, 0] == 0)
    ref_nngp, ref_ntk = mlp_kernels(X, depth=3, varw=2.0, varb=0.0, dtype=torch.float64, ntk_variant=variant)
    torch.testing.assert_close(nngp.double(), ref_nngp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ntk.double(), ref_ntk, rtol=1e-3, atol=1e-6)
    fn = make_mlp_kernel("ntk", depth=3, varb=0.0, dtype=dtype, ntk_variant=variant)
    assert torch.isfinite(fn(X, X)).all()


# --------------------------------------------------------------------------- original NTK formula


def _ntk_reference(X, Y, depth, varw, varb, *, bias_one, deriv_at_post, keep_double, weight_without_varw):
    """NTK of a ReLU MLP by a forward pass over covariances and a backward pass over gradient
    covariances, in plain numpy float64, written independently of experiments.kernels.

    Every flag False gives the tangent kernel (module docstring of experiments.kernels); every
    flag True gives the formula of the original library (santacml/pilim, ``relu_ntk_fn``):
    bias terms of 1, the step-function kernel taken at the post-activation correlation,
    ``arccos(-c)/π`` without the ½, and weight terms without varw.
    """
    X, Y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
    d = X.shape[1]
    vx, vy = (X**2).sum(1) / d, (Y**2).sum(1) / d
    cov = X @ Y.T / d
    layer_inputs, step_kernels = [cov], []
    for _ in range(depth):
        vx, vy = varw * vx + varb, varw * vy + varb
        pre = varw * cov + varb
        rho = np.clip(pre / np.sqrt(np.outer(vx, vy)), -1.0, 1.0)
        # arc-cosine kernel of degree 1, normalised to 1 at rho = 1: E[φφ] / (½ sqrt(vx vy))
        post_corr = (np.sqrt(1 - rho**2) + (np.pi - np.arccos(rho)) * rho) / np.pi
        c = np.clip(post_corr, -1.0, 1.0) if deriv_at_post else rho
        step = np.arccos(-c) / np.pi  # = 2 E[φ'φ'] at correlation c
        step_kernels.append(step if keep_double else step / 2)
        vx, vy = vx / 2, vy / 2
        cov = post_corr * np.sqrt(np.outer(vx, vy))
        layer_inputs.append(cov)
    grad_cov = [np.ones_like(cov)]  # at the readout's output, then backwards
    for step in reversed(step_kernels):
        grad_cov.append(grad_cov[-1] * varw * step)
    grad_cov.reverse()
    wfac = 1.0 if weight_without_varw else varw
    bfac = 1.0 if bias_one else varb
    return sum((wfac * inp + bfac) * gc for inp, gc in zip(layer_inputs, grad_cov))


def _mixed_inputs(n=6, d=10, seed=11):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    X[1] = -0.9 * X[0] + 0.1 * X[1]  # nearly anti-aligned pair
    X[2] *= 3.0
    return X


PILIM = dict(bias_one=True, deriv_at_post=True, keep_double=True, weight_without_varw=True)
CORRECT = dict(bias_one=False, deriv_at_post=False, keep_double=False, weight_without_varw=False)


@pytest.mark.parametrize("depth,varw,varb", [(1, 1.0, 0.0), (2, 1.0, 0.0), (3, 2.0, 0.3)])
def test_pilim_ntk_variant_matches_reference_of_original_formula(depth, varw, varb):
    """The variant equals the numpy re-derivation of the original formula to 1e-12 (float64
    rounding over a few layers), and the default equals the same recursion with the four
    differences undone (which also checks the reference against the tangent kernel that
    test_ntk_matches_empirical_ntk_of_wide_network validates on finite networks)."""
    X = _mixed_inputs()
    Y = _mixed_inputs(4, seed=12)
    pilim = mlp_ntk(X, Y, depth=depth, varw=varw, varb=varb, ntk_variant="pilim")
    ref = torch.from_numpy(_ntk_reference(X, Y, depth, varw, varb, **PILIM))
    torch.testing.assert_close(pilim, ref, rtol=1e-12, atol=1e-12)
    correct = mlp_ntk(X, Y, depth=depth, varw=varw, varb=varb)
    torch.testing.assert_close(
        correct, torch.from_numpy(_ntk_reference(X, Y, depth, varw, varb, **CORRECT)), rtol=1e-12, atol=1e-12
    )
    # the two kernels really differ, also after normalising away the overall scale
    rel = lambda K: K / torch.diagonal(K[:4, :4]).mean()  # noqa: E731
    diff = float((rel(pilim[:4]) - rel(correct[:4])).abs().max())
    assert diff > 0.05, diff
    # the variant goes through the same blocking, the kernel_fn and mlp_kernels
    blocked = mlp_ntk(X, Y, depth=depth, varw=varw, varb=varb, ntk_variant="pilim", block_size=3)
    torch.testing.assert_close(blocked, pilim, rtol=1e-12, atol=1e-12)
    fn = make_mlp_kernel("ntk", depth=depth, varw=varw, varb=varb, ntk_variant="pilim")
    torch.testing.assert_close(fn(X, Y), pilim, rtol=1e-12, atol=1e-12)
    nngp, ntk = mlp_kernels(X, Y, depth=depth, varw=varw, varb=varb, ntk_variant="pilim")
    torch.testing.assert_close(ntk, pilim)
    torch.testing.assert_close(nngp, mlp_nngp(X, Y, depth=depth, varw=varw, varb=varb))


def test_each_difference_of_the_original_ntk_matters():
    """Undoing any one of the four differences changes the reference (so each flag is real),
    at varw = 2 and varb = 0.3 where all four are active."""
    X = _mixed_inputs()
    base = _ntk_reference(X, X, 2, 2.0, 0.3, **PILIM)
    for flag in PILIM:
        other = _ntk_reference(X, X, 2, 2.0, 0.3, **{**PILIM, flag: False})
        assert np.abs(other - base).max() > 1e-3 * np.abs(base).max(), flag


def test_ntk_variant_is_validated():
    X = _mixed_inputs()
    with pytest.raises(ValueError, match="ntk_variant"):
        mlp_ntk(X, depth=2, ntk_variant="paper")
    with pytest.raises(ValueError, match="depth >= 1"):
        mlp_ntk(X, depth=0, ntk_variant="pilim")
    with pytest.raises(ValueError, match="ntk_variant"):
        make_mlp_kernel("ntk", depth=2, ntk_variant="nope")


def test_cifar10test_ntk_variant_flag(tmp_path, monkeypatch):
    """``cifar10test --ntk --ntk-variant pilim`` regresses with the original formula."""
    import experiments.cifar10.cifar10test as cifar10test
    from experiments.data.synthetic import write_synthetic_cifar10

    root = write_synthetic_cifar10(tmp_path, n_train=60, n_test=20, seed=0)
    seen = []
    real = cifar10test.make_mlp_kernel

    def spy(*args, **kwargs):
        seen.append(kwargs.get("ntk_variant"))
        return real(*args, **kwargs)

    monkeypatch.setattr(cifar10test, "make_mlp_kernel", spy)
    doc = cifar10test.main(
        ["--ntk", "--ntk-variant", "pilim", "--varw", "1", "--data", str(root), "--no-progress"]
    )
    assert seen == ["pilim"]
    assert doc["results"][0]["ntk_variant"] == "pilim"
    # a one-line user error (argparse's exit or the programs' ConfigError), naming the problem
    from experiments.common import ConfigError

    with pytest.raises((SystemExit, ConfigError)) as err:
        cifar10test.main(["--ntk", "--ntk-variant", "pilim", "--depth", "0", "--data", str(root)])
    if err.type is ConfigError:
        assert "depth" in str(err.value) and "\n" not in str(err.value)
