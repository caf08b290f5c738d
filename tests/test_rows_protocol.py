"""The gradient-row protocol (inf/rows.py), all-or-nothing steps and checked state dicts.

Each test here failed on pilimit 0.1 (issue 11's redesign, issue 14 items 2–8, 11).
"""

from __future__ import annotations

import copy
import io
import math
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from inf.clip import clip_grad_norm_
from inf.compat import PiSGD
from inf.math import F00, F02, F11
from inf.networks import FinPiMLPSample, InfMLP, MuMLP
from inf.optim import InfSGD
from inf.parameters import orthonormal_basis, project_onto_span_
from inf.rows import rows_of

F64 = torch.float64
DATA = Path(__file__).parent / "data"


def _net(seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"r": 6, "L": 1, "dtype": F64, **kw}
    return InfMLP(5, 3, **kw)


def _trained(net, steps=2):
    """A net whose readout is no longer zero, so every layer gets a nonzero gradient."""
    opt = InfSGD(net.parameters(), lr=0.5)
    for step in range(steps):
        x, y = _batch(seed=100 + step, dtype=next(net.parameters()).dtype)
        opt.zero_grad()
        _loss(net, x, y).backward()
        opt.step()
    opt.zero_grad()
    return net


def _batch(seed=1, n=4, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def _loss(net, x, y):
    return F.cross_entropy(net(x), y)


def _snapshot(net, opt):
    state = {k: v.clone() for k, v in net.state_dict().items() if isinstance(v, torch.Tensor)}
    ostate = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    return state, ostate


def _same(a, b):
    sa, oa = a
    sb, ob = b
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert oa.keys() == ob.keys()
    for k in oa:
        for name in oa[k]:
            assert torch.equal(oa[k][name], ob[k][name])


# ------------------------------------------------------------------ recording rows
def test_autograd_grad_records_no_rows():
    net = _net()
    x, y = _batch()
    x.requires_grad_(True)
    (gx,) = torch.autograd.grad(_loss(net, x, y), x)  # saliency / FGSM
    assert gx.shape == x.shape
    assert all(not layer.rows.has_gradient for layer in net.pi_layers)
    with pytest.raises(RuntimeError, match="found no gradient"):
        InfSGD(net.parameters(), lr=0.1).step()
    _loss(net, x, y).backward()
    assert [layer.rows.num_pending for layer in net.pi_layers] == [4, 4]


@pytest.mark.parametrize(
    "clear", ["zero_grad_none", "zero_grad_zeros", "net_zero_grad", "grad_none", "grad_zero_"]
)
def test_every_way_of_clearing_gradients_clears_rows(clear):
    net = _net()
    opt = InfSGD(net.parameters(), lr=0.1)
    x, y = _batch()
    _loss(net, x, y).backward()
    assert all(layer.rows.has_gradient for layer in net.pi_layers)
    if clear == "zero_grad_none":
        opt.zero_grad()
    elif clear == "zero_grad_zeros":
        opt.zero_grad(set_to_none=False)
    elif clear == "net_zero_grad":
        net.zero_grad(set_to_none=False)
    else:
        for p in net.parameters():
            if p.grad is not None:
                if clear == "grad_none":
                    p.grad = None
                else:
                    p.grad.zero_()
    assert all(not layer.rows.has_gradient for layer in net.pi_layers)
    M = net.rows_per_layer()
    x2, y2 = _batch(seed=2, n=3)
    _loss(net, x2, y2).backward()  # only this backward's rows count
    assert [layer.rows.num_pending for layer in net.pi_layers] == [3, 3]
    opt.step()
    assert net.rows_per_layer() == [m + 3 for m in M]


def test_gradient_accumulation_and_retain_graph_record_every_backward():
    net = _net()
    x, y = _batch()
    loss = _loss(net, x, y)
    loss.backward(retain_graph=True)
    loss.backward()
    assert [layer.rows.num_pending for layer in net.pi_layers] == [8, 8]


def test_temporary_rows_are_dropped_and_pending_kept():
    net = _net()
    x, y = _batch()
    _loss(net, x, y).backward()
    store = net.output_layer.rows
    M, pending = store.num_rows, store.pending()
    with store.temporary_rows():
        store.append(torch.randn(2, 3, dtype=F64), F.normalize(torch.randn(2, 6, dtype=F64), dim=1), -0.1)
        assert store.num_rows == M + 2
        _loss(net, x, y).backward()  # a backward inside the block
    assert store.num_rows == M
    assert store.has_gradient and store.coefficients.grad.shape == store.coefficients.shape
    assert torch.equal(store.pending().A[:4], pending.A)


@pytest.mark.parametrize("how", ["deepcopy", "to", "pickle", "load_state_dict"])
def test_optimizer_reaches_the_store_after(how):
    net = _net()
    x, y = _batch()
    opt = InfSGD(net.parameters(), lr=0.1)
    _loss(net, x, y).backward()
    opt.step()
    if how == "deepcopy":
        net = copy.deepcopy(net)
    elif how == "to":
        net = net.to(torch.float32).to(F64)
    elif how == "pickle":
        net = pickle.loads(pickle.dumps(net))
    else:
        other = _net(seed=5)
        other.load_state_dict(net.state_dict())
        net = other
    for layer in net.pi_layers:
        assert rows_of(layer.coefficients) is layer.rows
    opt = InfSGD(net.parameters(), lr=0.1)
    M = net.rows_per_layer()
    opt.zero_grad()
    _loss(net, x, y).backward()
    opt.step()
    assert net.rows_per_layer() == [m + 4 for m in M]


# ------------------------------------------------------------------ all-or-nothing steps
def test_refused_step_changes_nothing():
    net = _net()
    opt = InfSGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    x, y = _batch()
    _loss(net, x, y).backward()
    opt.step()  # momentum buffers exist
    opt.zero_grad()
    before = _snapshot(net, opt)
    x_bad = x.clone()
    out = net(x_bad)
    (out.sum() * torch.tensor(float("nan"), dtype=F64)).backward()
    with pytest.raises(FloatingPointError, match="nothing was changed"):
        opt.step()
    _same(before, _snapshot(net, opt))


def test_float16_rows_overflow_in_one_layer_refuses_the_whole_step():
    torch.manual_seed(0)
    net = _trained(InfMLP(5, 3, r=6, L=1))
    net.hidden_layers[0].rows.half()  # hidden rows in float16: δ·s overflows there only
    opt = InfSGD(net.parameters(), lr=0.1)
    x, y = _batch(dtype=torch.float32)
    out = net(x)
    (out.sum() * 1e14).backward()
    hidden, readout = net.pi_layers
    assert bool(torch.isfinite(readout.rows.pending().A).all())
    assert not bool(torch.isfinite(hidden.rows.pending().A).all())
    M = net.rows_per_layer()
    with pytest.raises(FloatingPointError, match="layers.1"):
        opt.step()
    assert net.rows_per_layer() == M


def test_finite_net_nan_loss_refused():
    fin = FinPiMLPSample(_net(), n=32)
    opt = InfSGD(fin.parameters(), lr=0.1)
    before = [p.detach().clone() for p in fin.parameters()]
    x, y = _batch()
    (_loss(fin, x, y) * float("nan")).backward()
    with pytest.raises(FloatingPointError):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, fin.parameters()))


@pytest.mark.parametrize(
    "kw",
    [
        dict(lr=float("nan")),
        dict(lr=-0.1),
        dict(weight_decay=float("nan")),
        dict(momentum=float("inf")),
        dict(dampening=float("nan")),
    ],
)
def test_non_finite_hyperparameters_refused(kw):
    with pytest.raises(ValueError, match="finite"):
        InfSGD(_net().parameters(), **{"lr": 0.1, **kw})


def test_non_finite_lr_from_a_scheduler_refused_at_step():
    net = _net()
    opt = InfSGD(net.parameters(), lr=0.1)
    opt.param_groups[0]["lr"] = float("nan")
    x, y = _batch()
    _loss(net, x, y).backward()
    with pytest.raises(ValueError, match="lr"):
        opt.step()


# ------------------------------------------------------------------ finite nets
def test_finite_gradients_projected_once_by_backward():
    fin = FinPiMLPSample(_trained(_net()), n=40)
    x, y = _batch()
    _loss(fin, x, y).backward()
    for layer in [fin.input_layer, *fin.hidden_layers]:
        Q = layer.omega_basis
        G = layer.weight.grad.clone()
        assert G.norm() > 0
        assert torch.allclose(project_onto_span_(G.clone(), Q), G, atol=1e-12)
        assert torch.allclose(Q @ (Q.T @ layer.bias.grad), layer.bias.grad, atol=1e-12)


def test_finite_net_trains_identically_with_torch_sgd():
    base = _trained(_net())
    fin_a = FinPiMLPSample(base, n=48, generator=torch.Generator().manual_seed(3))
    fin_b = copy.deepcopy(fin_a)
    opt_a = InfSGD(fin_a.parameters(), lr=0.2, momentum=0.5)
    opt_b = torch.optim.SGD(fin_b.parameters(), lr=0.2, momentum=0.5)
    for step in range(3):
        x, y = _batch(seed=10 + step)
        for net, opt in ((fin_a, opt_a), (fin_b, opt_b)):
            opt.zero_grad()
            _loss(net, x, y).backward()
            opt.step()
    for pa, pb in zip(fin_a.parameters(), fin_b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-13)


def test_projection_switched_off():
    fin = FinPiMLPSample(_trained(_net()), n=40)
    InfSGD(fin.parameters(), lr=0.1, project=False)
    x, y = _batch()
    _loss(fin, x, y).backward()
    layer = fin.input_layer
    G = layer.weight.grad
    assert G.norm() > 0
    assert not torch.allclose(project_onto_span_(G.clone(), layer.omega_basis), G, atol=1e-6)


def test_clipping_reads_projected_finite_gradients_and_rows():
    net = _net()
    x, y = _batch()
    _loss(net, x, y).backward()
    total = clip_grad_norm_(net.parameters(), 1e-3)
    assert float(total) > 1e-3
    for layer in net.pi_layers:
        assert layer.rows.pending().scale < 1


# ------------------------------------------------------------------ checked state dicts
def test_architecture_mismatch_named_on_load():
    net = _net(bias_alpha=0.5)
    for kw, field in (
        (dict(bias_alpha=1.0), "bias_alpha"),
        (dict(layernorm=True), "layernorm"),
        (dict(first_layer_alpha=2.0), "first_layer_alpha"),
    ):
        other = _net(**{"bias_alpha": 0.5, **kw})
        with pytest.raises(RuntimeError, match=field):
            other.load_state_dict(net.state_dict())


def test_nan_rows_refused_on_load():
    net = _net()
    state = net.state_dict()
    state["layers.1.rows.A"][0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="NaN"):
        _net().load_state_dict(state)


def test_v0_1_checkpoint_loads_and_reproduces_outputs():
    ckpt = torch.load(DATA / "checkpoint_v0_1.pt", weights_only=True)
    assert "layers.1.rows.Amult" in ckpt["model"]  # the old key
    torch.manual_seed(123)
    net = InfMLP(**ckpt["config"], dtype=F64)
    net.load_state_dict(ckpt["model"])
    assert torch.equal(net(ckpt["x"]), ckpt["out"])
    opt = InfSGD(net.parameters(), lr=0.3, momentum=0.9)
    opt.load_state_dict(ckpt["optimizer"])
    x, y = _batch(n=4, seed=3)
    x = torch.randn(4, 6, dtype=F64)
    F.cross_entropy(net(x), y).backward()
    opt.step()


def test_optimizer_state_of_another_net_refused_at_load():
    a, b = _net(), InfMLP(5, 3, r=7, L=1, dtype=F64)
    opt_a = InfSGD(a.parameters(), lr=0.1, momentum=0.9)
    x, y = _batch()
    _loss(a, x, y).backward()
    opt_a.step()
    with pytest.raises(ValueError, match="another network"):
        InfSGD(b.parameters(), lr=0.1, momentum=0.9).load_state_dict(opt_a.state_dict())
    mu = MuMLP(5, 3, width=6, L=1, dtype=F64)
    with pytest.raises(ValueError, match="another network"):
        InfSGD(mu.parameters(), lr=0.1).load_state_dict(opt_a.state_dict())


def test_state_dicts_load_with_weights_only():
    net = _net()
    opt = InfSGD(net.parameters(), lr=0.1, momentum=0.9)
    x, y = _batch()
    _loss(net, x, y).backward()
    opt.step()
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    net2 = _net(seed=9)
    net2.load_state_dict(state["model"])
    InfSGD(net2.parameters(), lr=0.1, momentum=0.9).load_state_dict(state["opt"])
    assert torch.equal(net2(x), net(x))


def test_legacy_names():
    net = _net()
    assert net.output_layer.Amult is net.output_layer.coefficients
    assert PiSGD is InfSGD


# ------------------------------------------------------------------ kernels, threads
def test_f00_double_backward():
    q = torch.tensor([-0.9, -0.3, 0.1, 0.6, 0.95], dtype=F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(F00, (q,))
    assert torch.autograd.gradgradcheck(F11, (q,))
    assert torch.autograd.gradcheck(F02, (q,))
    # F00'' = F11' = 1 / (2π sqrt(1 - q²))
    (g,) = torch.autograd.grad(F00(q).sum(), q, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), q)
    assert torch.allclose(h, 1 / (2 * math.pi * torch.sqrt(1 - q.detach() ** 2)), rtol=1e-12)
    edge = torch.tensor([-1.0, 1.0], dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(F00(edge).sum(), edge, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), edge)
    assert bool(torch.isfinite(g).all()) and bool(torch.isfinite(h).all())


def test_results_do_not_depend_on_thread_count():
    def run(threads):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            torch.manual_seed(0)
            net = InfMLP(16, 4, r=8, L=1)
            opt = InfSGD(net.parameters(), lr=0.5, momentum=0.9)
            gen = torch.Generator().manual_seed(1)
            for _ in range(30):  # 30 × 40 rows: more than one 1024-row block
                x, y = torch.randn(40, 16, generator=gen), torch.randint(0, 4, (40,), generator=gen)
                opt.zero_grad()
                F.cross_entropy(net(x), y).backward()
                opt.step()
            return net(torch.randn(700, 16, generator=gen)).detach()
        finally:
            torch.set_num_threads(before)

    assert torch.equal(run(1), run(2))


def test_orthonormal_basis_spans_omega():
    omega = torch.randn(20, 4, dtype=F64)
    Q = orthonormal_basis(omega)
    assert torch.allclose(Q.T @ Q, torch.eye(4, dtype=F64), atol=1e-12)
    assert torch.allclose(Q @ (Q.T @ omega), omega, atol=1e-12)
