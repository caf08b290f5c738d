"""Core library: kernel functions, the autograd Function, rows, InfSGD, clipping, save/load, errors."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from scipy import integrate

from inf import math as pimath
from inf.functional import inf_pi_linear_relu
from inf.layers import FinPiLinearReLU, InfPiLinearReLU, orthonormal_basis
from inf.networks import FinPiMLPSample, InfMLP, MuMLP
from inf.optim import InfSGD
from inf.tensors import RowStore
from inf.utils import (
    clip_grad_norm_,
    pi_grad_norms,
    pi_init,
    pi_param_groups,
    resolve_device,
    store_pi_grad_norm_,
)

F64 = torch.float64


# --------------------------------------------------------------------------- §2 kernels
def _quadrature(q, f, g_given):
    """E[f(z1) g(z2)] for unit Gaussians with correlation q by 1-D quadrature over z1, where
    ``g_given(m, s)`` = E[g(m + s w)] for w ~ N(0, 1) (z2 | z1 ~ N(q z1, 1 - q²))."""
    s = math.sqrt(max(1 - q * q, 0.0))
    density = lambda z: math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)  # noqa: E731
    val, _ = integrate.quad(lambda z: density(z) * f(z) * g_given(q * z, s), 0, 12, limit=200)
    return val


def _Phi(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _relu_given(m, s):
    if s == 0:
        return max(m, 0.0)
    return m * _Phi(m / s) + s * math.exp(-0.5 * (m / s) ** 2) / math.sqrt(2 * math.pi)


def _step_given(m, s):
    if s == 0:
        return 1.0 if m > 0 else 0.0
    return _Phi(m / s)


relu = lambda z: max(z, 0.0)  # noqa: E731
step = lambda z: 1.0 if z > 0 else 0.0  # noqa: E731


@pytest.mark.parametrize("q", [-1.0, -0.7, 0.0, 0.3, 0.95, 1.0])
def test_F00_F11_against_quadrature(q):
    # the integrands are smooth on [0, 12] (f vanishes below 0): quad is accurate to ~1e-12
    t = torch.tensor(q, dtype=F64)
    assert abs(pimath.F00(t).item() - _quadrature(q, relu, _relu_given)) < 1e-8
    assert abs(pimath.F11(t).item() - _quadrature(q, step, _step_given)) < 1e-8


@pytest.mark.parametrize("q", [-0.9, -0.3, 0.0, 0.5, 0.99])
def test_F02_against_stein(q):
    # F02 = E[φ(z1) δ(z2)] = p(z2=0) E[φ(z1) | z2 = 0]: a 1-D integral over z1 | z2=0 ~ N(0, 1-q²)
    s2 = 1 - q * q
    cond, _ = integrate.quad(
        lambda z: relu(z) * math.exp(-0.5 * z * z / s2) / math.sqrt(2 * math.pi * s2), -20, 20
    )
    expected = cond / math.sqrt(2 * math.pi)
    assert abs(pimath.F02(torch.tensor(q, dtype=F64)).item() - expected) < 1e-8


def test_kernel_identities_and_monte_carlo():
    q = torch.linspace(-1, 1, 101, dtype=F64)
    f00, f11, f02 = pimath.F00_F11_F02(q)
    assert torch.allclose(f00, f02 + q * f11, atol=1e-15)
    # dF00/dq = F11 by finite differences in the interior
    h = 1e-6
    qi = q[1:-1]
    fd = (pimath.F00(qi + h) - pimath.F00(qi - h)) / (2 * h)
    assert torch.allclose(fd, pimath.F11(qi), atol=1e-6)
    # Monte Carlo for |u| |v| F00(û·v̂) with 2e6 samples: standard error ≈ 1e-3
    gen = torch.Generator().manual_seed(0)
    u, v = torch.randn(5, dtype=F64, generator=gen), torch.randn(5, dtype=F64, generator=gen)
    w = torch.randn(2_000_000, 5, dtype=F64, generator=gen)
    mc = (torch.relu(w @ u) * torch.relu(w @ v)).mean()
    exact = pimath.relu_kernel(u[None], v[None])[0, 0]
    assert abs(mc - exact) < 5e-3 * exact.abs().clamp_min(1.0)


def test_kernel_safe_at_plus_minus_one():
    q = torch.tensor([-1.0, 1.0, 1.0 + 1e-7, -1.0 - 1e-7], dtype=F64, requires_grad=True)
    (pimath.F00(q).sum() + pimath.F11(q).sum() + pimath.F02(q).sum()).backward()
    assert torch.isfinite(q.grad).all()
    assert pimath.F00(torch.tensor(1.0)).item() == pytest.approx(0.5)


def test_vrelu_matrix_matches_monte_carlo():
    gen = torch.Generator().manual_seed(1)
    L = torch.randn(4, 4, dtype=F64, generator=gen)
    cov = L @ L.T + 0.1 * torch.eye(4, dtype=F64)
    z = torch.randn(1_000_000, 4, dtype=F64, generator=gen) @ torch.linalg.cholesky(cov).T
    mc = torch.relu(z).T @ torch.relu(z) / len(z)
    mc_step = (z > 0).double().T @ (z > 0).double() / len(z)
    # 1e6 samples: standard errors ~ 3e-3 relative; 2e-2 is a 6-sigma band
    assert torch.allclose(pimath.VReLUmatrix(cov), mc, rtol=2e-2, atol=2e-2)
    assert torch.allclose(pimath.VStepmatrix(cov), mc_step, atol=5e-3)


# --------------------------------------------------------------------------- §3–4 Function
def _rows(M, r, r_out, gen, dtype=F64):
    A = torch.randn(M, r_out, dtype=dtype, generator=gen)
    c = torch.randn(M, dtype=dtype, generator=gen)
    B = torch.nn.functional.normalize(torch.randn(M, r, dtype=dtype, generator=gen), dim=1)
    return A, c, B


@pytest.mark.parametrize("layernorm", [False, True])
@pytest.mark.parametrize("chunk_rows", [None, 5])
def test_function_gradcheck(layernorm, chunk_rows):
    gen = torch.Generator().manual_seed(0)
    A, c, B = _rows(13, 6, 4, gen)
    g = torch.randn(7, 6, dtype=F64, generator=gen, requires_grad=True)
    B[0] = g[0].detach() / g[0].detach().norm()  # q = 1 exactly for one pair
    assert torch.autograd.gradcheck(
        lambda x: inf_pi_linear_relu(x, A, c, B, None, layernorm, chunk_rows), (g,)
    )


def test_function_matches_monte_carlo_layer():
    # g_out = E_ω[φ(ω·g) φ(ω·B_m)] summed with c_m A_m, estimated with 4e5 Gaussian ω
    gen = torch.Generator().manual_seed(3)
    A, c, B = _rows(9, 5, 3, gen)
    g = torch.randn(4, 5, dtype=F64, generator=gen)
    w = torch.randn(400_000, 5, dtype=F64, generator=gen)
    mc = (torch.relu(g @ w.T) @ torch.relu(w @ B.T) / len(w)) @ (c[:, None] * A)
    exact = inf_pi_linear_relu(g, A, c, B)
    assert torch.allclose(exact, mc, rtol=3e-2, atol=3e-2 * mc.abs().max().item())


def test_chunked_equals_unchunked_forward_backward():
    gen = torch.Generator().manual_seed(1)
    A, c, B = _rows(1000, 16, 8, gen, torch.float32)
    g = torch.randn(33, 16, generator=gen, requires_grad=True)
    outs, grads = [], []
    for chunk in (None, 7, 128):
        out = inf_pi_linear_relu(g, A, c, B, None, False, chunk)
        (grad,) = torch.autograd.grad(out.square().sum(), g)
        outs.append(out)
        grads.append(grad)
    for o, gr in zip(outs[1:], grads[1:]):
        # float32 sums over 1000 rows in a different order: ~1e-7 relative per sum
        assert ((o - outs[0]).norm() / outs[0].norm()) < 1e-5
        assert ((gr - grads[0]).norm() / grads[0].norm()) < 1e-5


def test_low_precision_storage_error():
    gen = torch.Generator().manual_seed(2)
    A, c, B = _rows(4000, 32, 10, gen, torch.float32)
    g = torch.randn(64, 32, generator=gen)
    ref = inf_pi_linear_relu(g, A, c, B)
    for dtype, tol in ((torch.bfloat16, 1.5e-2), (torch.float16, 2e-3)):
        # rounding A and B to 8 (bf16) / 11 (fp16) bits: relative error ~ 2^-8 resp. 2^-11 per entry,
        # averaged over 4000 rows; the stated bounds are documented in docs/performance.md
        out = inf_pi_linear_relu(g, A.to(dtype), c, B.to(dtype))
        assert out.dtype == torch.float32
        rel = ((out - ref).norm() / ref.norm()).item()
        assert rel < tol, (dtype, rel)


# --------------------------------------------------------------------------- rows
def test_row_growth_is_amortized():
    store = RowStore(8, 4, rows=8)
    for _ in range(2000):
        store.append(torch.randn(3, 4), torch.randn(3, 8), -0.1)
    assert store.num_rows == 8 + 6000
    # capacity doubling: log2(6008 / 16) + 1 ≈ 10 reallocations, not 2000
    assert store.reallocations <= 12
    assert store.capacity >= store.num_rows
    before = store.A.detach().clone()
    store.truncate(100)
    assert store.num_rows == 100 and torch.equal(store.A, before[:100])


def test_rows_out_of_sync_is_an_error():
    layer = InfPiLinearReLU(4, 3)
    layer.rows.B.data = layer.rows.B.data[:2]
    with pytest.raises(ValueError, match="same number of rows"):
        layer(torch.randn(2, 4))


# --------------------------------------------------------------------------- InfSGD
def _toy(dtype=F64, **kw):
    torch.manual_seed(0)
    net = InfMLP(3, 2, 6, L=1, dtype=dtype, **kw)
    X = torch.randn(16, 3, dtype=dtype)
    y = torch.randn(16, 2, dtype=dtype)
    return net, X, y


def _loss(net, X, y):
    return ((net(X) - y) ** 2).mean()


def test_step_appends_rows_per_example_and_call():
    net, X, y = _toy()
    opt = InfSGD(net.parameters(), lr=0.1)
    before = net.rows_per_layer()
    opt.zero_grad()
    _loss(net, X[:5], y[:5]).backward()
    _loss(net, X[5:8], y[5:8]).backward()  # gradient accumulation: a second call
    opt.step()
    assert net.rows_per_layer() == [m + 8 for m in before]
    out = net.layers[-1]
    assert torch.all(out.Amult[-8:] == -0.1)
    assert torch.allclose(out.B[-8:].norm(dim=1), torch.ones(8, dtype=F64))


def test_infinite_step_equals_function_space_update():
    """After one step, f(x') changes by -lr Σ_b (δ_b s_b) s' F00(ĝ_b·ĝ') at the output layer
    (the hidden layers are frozen here to isolate the output layer's rows)."""
    net, X, y = _toy(last_layer_alpha=1.0)
    for p in list(net.layers[0].parameters()) + list(net.layers[1].parameters()):
        p.requires_grad_(False)
    net.layers[1].Amult.requires_grad_(False)
    opt = InfSGD([p for p in net.parameters() if p.requires_grad], lr=0.3)
    Xq = torch.randn(5, 3, dtype=F64)
    with torch.no_grad():
        before_q = net(Xq)
        _, h = net(X, return_hidden=True)
        _, hq = net(Xq, return_hidden=True)
    out = net(X)
    loss = ((out - y) ** 2).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
    delta = 2 * (out.detach() - y)
    K = pimath.relu_kernel(hq, h)
    expected = before_q - 0.3 * K @ delta - 0.3 * delta.sum(0) * net.last_bias_alpha**2
    assert torch.allclose(net(Xq), expected, atol=1e-10)


def test_momentum_weight_decay_nesterov_match_torch_sgd_on_coefficients():
    # InfSGD applies torch's SGD rule to the coefficient vector: compare against
    # torch.optim.SGD run on a hand-built copy of that vector
    net, X, y = _toy()
    kw = dict(lr=0.05, momentum=0.9, weight_decay=0.1, nesterov=True)
    opt = InfSGD(net.parameters(), **kw)
    layer = net.layers[1]
    coef_ref = torch.nn.Parameter(layer.Amult.detach().clone())
    ref_opt = torch.optim.SGD([coef_ref], **kw)
    for t in range(4):
        opt.zero_grad()
        _loss(net, X[4 * t : 4 * t + 4], y[4 * t : 4 * t + 4]).backward()
        opt.step()
        # grow the reference by the same rows: gradient 1 on the 4 new rows
        M = layer.rows.num_rows
        with torch.no_grad():
            grown = torch.cat([coef_ref.detach(), torch.zeros(M - coef_ref.shape[0], dtype=F64)])
        state = ref_opt.state[coef_ref]
        buf = state.get("momentum_buffer")
        coef_ref = torch.nn.Parameter(grown)
        ref_opt = torch.optim.SGD([coef_ref], **kw)
        if buf is not None:
            ref_opt.state[coef_ref]["momentum_buffer"] = torch.cat(
                [buf, torch.zeros(M - buf.shape[0], dtype=F64)]
            )
        coef_ref.grad = torch.zeros(M, dtype=F64)
        coef_ref.grad[-4:] = 1.0
        ref_opt.step()
        assert torch.allclose(layer.Amult, coef_ref, atol=1e-12)


def test_schedulers_and_param_groups():
    net, X, y = _toy()
    groups = pi_param_groups(
        net,
        lr=0.1,
        weight_decay=1e-3,
        first_layer_lr_mult=0.1,
        last_layer_lr_mult=4.0,
        bias_lr_mult=0.5,
        apply_lr_mult_to_wd=False,
    )
    roles = {g["role"]: g for g in groups}
    assert roles["first"]["lr"] == pytest.approx(0.01) and roles["last"]["lr"] == pytest.approx(0.4)
    assert roles["first"]["weight_decay"] == pytest.approx(1e-2)  # wd / mult keeps lr·wd fixed
    opt = InfSGD(groups, lr=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[1], gamma=0.15)
    for _ in range(2):
        opt.zero_grad()
        _loss(net, X, y).backward()
        opt.step()
        sched.step()
    assert roles["last"]["lr"] == pytest.approx(0.4 * 0.15)
    assert net.layers[-1].Amult[-1].item() == pytest.approx(-0.4 * 0.15 * 1 + 0, rel=1e-12)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    cos.step()


def test_per_group_lr_sets_new_coefficients():
    net, X, y = _toy()
    groups = pi_param_groups(net, lr=0.2, last_layer_lr_mult=3.0)
    opt = InfSGD(groups, lr=0.2)
    opt.zero_grad()
    _loss(net, X[:2], y[:2]).backward()
    opt.step()
    assert torch.allclose(net.layers[-1].Amult[-2:], torch.full((2,), -0.6, dtype=F64))
    assert torch.allclose(net.layers[1].Amult[-2:], torch.full((2,), -0.2, dtype=F64))


def test_zero_grad_discards_pending_rows():
    net, X, y = _toy()
    opt = InfSGD(net.parameters(), lr=0.1)
    M = net.rows_per_layer()
    _loss(net, X, y).backward()
    net.zero_grad()  # nn.Module's zero_grad sets grads to None: the pending rows go too
    _loss(net, X[:2], y[:2]).backward()
    opt.step()
    assert net.rows_per_layer() == [m + 2 for m in M]
    seq = torch.nn.Sequential(*net.layers)  # a container that does not know π-layers
    _loss(seq, X[:3], y[:3]).backward()
    seq.zero_grad()
    _loss(seq, X[:1], y[:1]).backward()
    opt.step()
    assert net.rows_per_layer() == [m + 3 for m in M]


def test_step_without_backward_raises():
    net, _, _ = _toy()
    opt = InfSGD(net.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="backward"):
        opt.step()


def test_nonfinite_gradient_refused_and_named():
    net, X, y = _toy()
    opt = InfSGD(net.parameters(), lr=0.1)
    out = net(X)
    (out * torch.tensor(float("inf"), dtype=F64)).sum().backward()
    with pytest.raises(FloatingPointError, match=r"layers\.[12] \(its gradient rows\).*NaN"):
        opt.step()


def test_frozen_body_still_records_output_rows():
    net, X, y = _toy()
    for p in net.layers[0].parameters():
        p.requires_grad_(False)
    net.layers[1].Amult.requires_grad_(False)
    opt = InfSGD(net.parameters(), lr=0.1)
    M = net.rows_per_layer()
    _loss(net, X, y).backward()
    opt.step()
    assert net.rows_per_layer() == [M[0], M[1] + 16]


# --------------------------------------------------------------------------- clipping
def test_pi_gradient_norm_matches_finite_norm():
    """The rows' norm sqrt(Σ (A_i·A_j) F00(B_i·B_j)) is the limit of the projected finite gradient's
    Frobenius norm. At n = 4096 single samples scatter by ~5% (measured: -9%..+4% over seeds at
    4096, ±2.5% at 16384), so we take the median over three Ω draws and allow 8%."""
    ratios = []
    for seed in range(3):
        net, X, y = _toy()
        fin = FinPiMLPSample(net, 4096, generator=torch.Generator().manual_seed(seed))
        for model in (net, fin):  # one step first: the readout starts at 0, so hidden gradients do too
            opt = InfSGD(model.parameters(), lr=0.5)
            _loss(model, X, y).backward()
            opt.step()
            opt.zero_grad()
        _loss(net, X, y).backward()
        _loss(fin, X, y).backward()
        inf_norms = dict((id(p), n) for p, n in pi_grad_norms(net.parameters()))
        fin_norms = dict((id(p), n) for p, n in pi_grad_norms(fin.parameters()))
        for inf_p, fin_p in (
            (net.layers[1].Amult, fin.layers[1].weight),
            (net.layers[2].Amult, fin.layers[2].weight),
        ):
            ratios.append(float(inf_norms[id(inf_p)] / fin_norms[id(fin_p)]) - 1)
    assert np.median(np.abs(ratios)) < 0.08, ratios
    stored = store_pi_grad_norm_(net)
    assert stored["layers.1"] == pytest.approx(float(inf_norms[id(net.layers[1].Amult)]))


@pytest.mark.parametrize("per_param", [False, True])
def test_clipping_scales_rows_and_grads(per_param):
    net, X, y = _toy()
    opt = InfSGD(net.parameters(), lr=1.0)
    _loss(net, X, y).backward()
    total = clip_grad_norm_(net.parameters(), 1e-3, per_param=per_param)
    norms = pi_grad_norms(net.parameters())
    after = torch.sqrt(sum(n**2 for _, n in norms))
    assert total > 1e-3
    if per_param:
        assert all(n <= 1e-3 * (1 + 1e-6) for _, n in norms)
    else:
        assert after == pytest.approx(1e-3, rel=1e-4)
    opt.step()
    scale = net.layers[-1].Amult[-1].item()
    assert -1.0 < scale < 0  # the new rows' coefficient is -lr times the clip factor


# --------------------------------------------------------------------------- save / load / resume
def _train(net, opt, X, y, steps, start=0):
    losses = []
    for t in range(start, start + steps):
        idx = torch.arange(t * 4, t * 4 + 4) % len(X)
        loss = _loss(net, X[idx], y[idx])
        opt.zero_grad()
        loss.backward()
        clip_grad_norm_(net.parameters(), 1.0, per_param=True)
        opt.step()
        losses.append(loss.item())
    return losses


def test_state_dict_roundtrip_and_exact_resume(tmp_path):
    net, X, y = _toy(layernorm=True)
    kw = dict(lr=0.1, momentum=0.9, weight_decay=0.01)
    opt = InfSGD(net.parameters(), **kw)
    uninterrupted = copy.deepcopy(net)
    opt_u = InfSGD(uninterrupted.parameters(), **kw)
    full = _train(uninterrupted, opt_u, X, y, 8)
    first = _train(net, opt, X, y, 4)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, path)
    fresh = InfMLP(3, 2, 6, L=1, dtype=F64, layernorm=True)
    fresh_opt = InfSGD(fresh.parameters(), **kw)
    ckpt = torch.load(path)
    fresh.load_state_dict(ckpt["model"])
    fresh_opt.load_state_dict(ckpt["opt"])
    assert fresh.rows_per_layer() == net.rows_per_layer()
    second = _train(fresh, fresh_opt, X, y, 4, start=4)
    assert np.allclose(first + second, full, rtol=1e-12, atol=1e-14)


def test_saved_rows_are_compact():
    net, X, y = _toy()
    opt = InfSGD(net.parameters(), lr=0.1)
    _train(net, opt, X, y, 3)
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    A = net.state_dict()["layers.1.rows.A"]
    assert A.untyped_storage().nbytes() == A.numel() * A.element_size()


def test_checkpoint_from_another_architecture_is_refused():
    net, _, _ = _toy()
    other = InfMLP(3, 2, 7, L=1, dtype=F64)
    with pytest.raises(RuntimeError, match="another architecture|size mismatch"):
        other.load_state_dict(net.state_dict())


def test_deepcopy_to_double_and_half():
    net, X, y = _toy(dtype=torch.float32)
    twin = copy.deepcopy(net)
    opt = InfSGD(twin.parameters(), lr=0.1)
    _loss(twin, X.float(), y.float()).backward()
    opt.step()
    assert twin.rows_per_layer() != net.rows_per_layer()
    d = copy.deepcopy(net).double()
    assert d.layers[1].A.dtype == F64 and d.layers[1].Amult.dtype == F64
    h = copy.deepcopy(net).half()
    assert h.layers[1].A.dtype == torch.float16 and h.layers[1].Amult.dtype == torch.float32
    bf = copy.deepcopy(net).bfloat16()
    assert bf.layers[1].B.dtype == torch.bfloat16 and bf.layers[1].Amult.dtype == torch.float32
    out = h.layers[1](torch.randn(3, 6, dtype=torch.float16))
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


# --------------------------------------------------------------------------- finite layers
def test_projection_is_orthogonal_projector_without_nxn():
    gen = torch.Generator().manual_seed(0)
    omega = torch.randn(50, 7, dtype=F64, generator=gen)
    Q = orthonormal_basis(omega)
    G = torch.randn(50, 9, dtype=F64, generator=gen)
    dense = omega @ torch.linalg.solve(omega.T @ omega, omega.T @ G)
    assert torch.allclose(Q @ (Q.T @ G), dense, atol=1e-10)
    # n < r: span(Ω) is everything
    Q_small = orthonormal_basis(torch.randn(5, 7, dtype=F64, generator=gen))
    assert torch.allclose(Q_small @ Q_small.T, torch.eye(5, dtype=F64), atol=1e-10)


def test_finite_step_projects_gradient():
    net, X, y = _toy()
    fin = FinPiMLPSample(net, 64)
    opt = InfSGD(fin.parameters(), lr=0.5)
    _loss(fin, X, y).backward()  # the readout starts at 0: hidden gradients are 0 on step one
    opt.step()
    opt.zero_grad()
    W0 = fin.layers[1].weight.detach().clone()
    _loss(fin, X, y).backward()
    opt.step()
    dW = fin.layers[1].weight.detach() - W0
    Q = fin.layers[1].omega_basis
    assert torch.allclose(Q @ (Q.T @ dW), dW, atol=1e-10)
    assert dW.abs().max() > 0


def test_sampled_net_matches_at_init_and_mu_mlp_runs():
    torch.manual_seed(0)
    net = InfMLP(4, 3, 8, L=2, dtype=F64)
    X = torch.randn(10, 4, dtype=F64)
    # hidden preactivations: h ≈ n^-1/2 Ω g, error ~ n^-1/2 (0.03 at 4096; 0.1 bound)
    fin = FinPiMLPSample(net, 4096)
    with torch.no_grad():
        g1 = net.layers[1](net.layers[0](X))
        h1 = fin.layers[1](fin.layers[0](X))
        target = 4096**-0.5 * g1 @ fin.layers[1].omega.T
    assert ((h1 - target).norm() / target.norm()) < 0.1
    mu = MuMLP(4, 3, 64, L=2)
    assert mu(X.float()).abs().max() == 0  # readout starts at zero
    pi_init(net.layers[1])
    assert net.layers[1].rows.num_rows == 8


# --------------------------------------------------------------------------- errors
def test_bad_inputs_have_clear_errors():
    net, X, _ = _toy()
    with pytest.raises(ValueError, match=r"\(batch, 3\)"):
        net(torch.randn(4, 5, dtype=F64))
    bad = X.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        net(bad)
    with pytest.raises(ValueError):
        InfMLP(0, 2, 4)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            resolve_device("cuda")
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            InfMLP(3, 2, 4, device="cuda")
    with pytest.raises(ValueError, match="prev_omega"):
        FinPiLinearReLU(16, 16, 4, prev_omega=torch.randn(3, 4))
    with pytest.raises(ValueError, match="Nesterov"):
        InfSGD(net.parameters(), lr=0.1, nesterov=True)
