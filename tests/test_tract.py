"""Tests of inf.tract (TrAct, docs/math.md §7).

Gradients are compared in the relative Frobenius norm ``|a - b| / |b|``.
"""

from __future__ import annotations

import copy
import io
import itertools
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inf import layers, tensors
from inf.parameters import project_onto_span_
from inf.tract import TrAct, tract_weight_grad

try:  # the official implementation, a test dependency (requirements-test.txt)
    import torch_tract
except ImportError:  # pragma: no cover - CI installs it, and there its absence must fail
    if os.environ.get("CI"):
        raise
    torch_tract = None
needs_official = pytest.mark.skipif(torch_tract is None, reason="pip install torch-tract")

# float32: both sides are a few O(b·d) sums plus a solve of a matrix with condition
# number ~10-100 on these shapes; the measured deviations are ≤ 8e-7 (float64: ≤ 2e-14),
# so the tolerances leave a factor >10 above rounding and are far below any formula
# error (a wrong normaliser such as b-1 instead of b is already ~1e-2).
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def reference_tract(X: torch.Tensor, G: torch.Tensor, lam: float) -> torch.Tensor:
    """Gᵀ X (XᵀX/b + λI)⁻¹ straight from the definition, in float64, with an LU solve."""
    X, G = X.double(), G.double()
    b, d = X.shape
    M = X.T @ X / b + lam * torch.eye(d, dtype=torch.float64)
    return torch.linalg.solve(M, (G.T @ X).T).T


def grads_of(module, x, target=None, seed=0):
    """Run a fixed loss through ``module``; return (output, weight grad, bias grad, input grad)."""
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    if target is None:
        g = torch.Generator().manual_seed(seed)
        target = torch.randn(y.shape, generator=g).to(y.dtype)
    loss_dtype = torch.float64 if y.dtype == torch.float64 else torch.float32
    ((y.to(loss_dtype) - target.to(loss_dtype)) ** 2).sum().backward()
    bias = getattr(module, "bias", None)
    return y.detach(), module.weight.grad, None if bias is None else bias.grad, x.grad


# --- agreement with the official implementation (torch-tract) -------------------------
#
# torch-tract computes exactly the formula of the spec, with b = number of rows of X
# (batch × leading dims for Linear, batch × output positions for Conv2d); no
# renormalisation is needed. Its b < d branch is written as
# (1/λ) Gᵀ (I − (1/λ) A (A/λ + I)⁻¹) X with A = XXᵀ/b, which subtracts two nearly
# equal terms and loses about |A|/λ in relative precision; in float32 at λ = 0.1 that
# alone is 6e-6 to 8e-6 on 8 × 32 inputs (ours: 2e-7, test_float32_woodbury_is_accurate),
# too close to 1e-5 to be a test. So the float32 comparisons of that branch use λ = 1.

LINEAR_CASES = [(8, 32), (64, 16)]  # (b, d): Woodbury branch, direct branch


@needs_official
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("b,d", LINEAR_CASES)
def test_linear_matches_official(dtype, bias, b, d):
    torch.manual_seed(1)
    lam = 1.0 if (dtype == torch.float32 and b < d) else 0.1
    lin = nn.Linear(d, 5, bias=bias).to(dtype)
    x = torch.randn(b, d, dtype=dtype)
    ours = grads_of(TrAct(copy.deepcopy(lin), lam), x)
    theirs = grads_of(torch_tract.TrAct(copy.deepcopy(lin), l=lam), x)
    assert rel(ours[1], theirs[1]) < TOL[dtype]
    if bias:
        assert rel(ours[2], theirs[2].reshape(-1)) < TOL[dtype]


@needs_official
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_tokens_match_official(dtype):
    """(B, T, d) input: both flatten the leading dims, so b = B·T."""
    torch.manual_seed(2)
    lin = nn.Linear(12, 7).to(dtype)
    x = torch.randn(3, 5, 12, dtype=dtype)  # b = 15 > d = 12: direct
    ours = grads_of(TrAct(copy.deepcopy(lin), 0.1), x)
    theirs = grads_of(torch_tract.TrAct(copy.deepcopy(lin), l=0.1), x)
    assert ours[0].shape == (3, 5, 7)
    assert rel(ours[1], theirs[1]) < TOL[dtype]


# (N, C, H, k, stride, padding): b = N·L vs d = C·k²
CONV2D_CASES = [
    (1, 8, 6, 3, 1, 0),  # b = 16 < d = 72: Woodbury
    (4, 3, 8, 3, 1, 1),  # b = 256 > d = 27: direct
    (2, 3, 9, 3, 2, 1),  # strided, b = 50 > 27
]


@needs_official
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("N,C,H,k,stride,padding", CONV2D_CASES)
def test_conv2d_matches_official(dtype, bias, N, C, H, k, stride, padding):
    torch.manual_seed(3)
    conv = nn.Conv2d(C, 6, k, stride=stride, padding=padding, bias=bias).to(dtype)
    L = ((H + 2 * padding - k) // stride + 1) ** 2
    woodbury = N * L < C * k * k
    lam = 1.0 if (dtype == torch.float32 and woodbury) else 0.1
    x = torch.randn(N, C, H, H, dtype=dtype)
    ours = grads_of(TrAct(copy.deepcopy(conv), lam), x)
    theirs = grads_of(torch_tract.TrAct(copy.deepcopy(conv), l=lam), x)
    assert rel(ours[1], theirs[1]) < TOL[dtype]
    if bias:
        assert rel(ours[2], theirs[2]) < TOL[dtype]


def test_float32_woodbury_is_accurate():
    """At λ = 0.1 our float32 Woodbury branch stays close to the float64 value.
    Tolerance 2e-6: measured 3e-7 (a few float32 roundings through a solve of
    condition ≈ 40); the official expression is at ~6e-6 here."""
    torch.manual_seed(4)
    lin = nn.Linear(32, 5)
    x = torch.randn(8, 32)
    g32 = grads_of(TrAct(copy.deepcopy(lin), 0.1), x)[1]
    g64 = grads_of(TrAct(copy.deepcopy(lin).double(), 0.1), x.double())[1]
    assert rel(g32, g64) < 2e-6


# --- convolutions against an unfold-as-linear reference -------------------------------


def reference_patches(x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """Patches (N·L, C·K) by explicit indexing, one output position at a time."""
    nd = x.dim() - 2
    k, s, dil = conv.kernel_size, conv.stride, conv.dilation
    if conv.padding == "same":
        pads = [
            ((dil[i] * (k[i] - 1)) // 2, dil[i] * (k[i] - 1) - (dil[i] * (k[i] - 1)) // 2) for i in range(nd)
        ]
    elif conv.padding == "valid":
        pads = [(0, 0)] * nd
    else:
        pads = [(p, p) for p in conv.padding]
    flat = [v for i in reversed(range(nd)) for v in pads[i]]
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x, flat, mode=mode)
    sizes = [(xp.shape[2 + i] - dil[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(nd)]
    rows = []
    for n in range(x.shape[0]):
        for pos in itertools.product(*[range(L) for L in sizes]):
            idx = tuple(
                slice(pos[i] * s[i], pos[i] * s[i] + dil[i] * (k[i] - 1) + 1, dil[i]) for i in range(nd)
            )
            rows.append(xp[(n, slice(None)) + idx].reshape(-1))
    return torch.stack(rows)


def reference_conv_tract(conv: nn.Module, x: torch.Tensor, lam: float):
    """Plain gradients of ``conv`` and the TrAct weight gradient built group by group
    from reference_patches; also checks the reference itself (Gᵀ X = plain gradient)."""
    conv = copy.deepcopy(conv)
    xx = x.detach().clone().requires_grad_(True)
    y = conv(xx)
    y.retain_grad()
    target = torch.randn(y.shape, generator=torch.Generator().manual_seed(0)).to(y.dtype)
    ((y - target) ** 2).sum().backward()
    n, groups = conv.out_channels, conv.groups
    X = reference_patches(x.detach(), conv)
    G = y.grad.movedim(1, -1).reshape(-1, n)
    dg, ng = X.shape[1] // groups, n // groups
    plain = torch.cat([G[:, j * ng : (j + 1) * ng].T @ X[:, j * dg : (j + 1) * dg] for j in range(groups)])
    # float64 sums in different orders: 1e-12 is rounding level
    assert rel(plain, conv.weight.grad.reshape(n, -1)) < 1e-12, "reference patches are wrong"
    tract = torch.cat(
        [
            reference_tract(X[:, j * dg : (j + 1) * dg], G[:, j * ng : (j + 1) * ng], lam)
            for j in range(groups)
        ]
    )
    return tract.reshape(conv.weight.shape), conv.bias.grad if conv.bias is not None else None, xx.grad


CONV_REF_CASES = [
    # (module, input shape)
    (lambda: nn.Conv1d(4, 6, 3), (3, 4, 11)),  # b=27 > d=12
    (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2), (2, 4, 13)),
    (lambda: nn.Conv1d(4, 6, 4, padding="same", bias=False), (1, 4, 9)),  # b=9 < d=16
    (lambda: nn.Conv1d(4, 6, 3, padding=1, padding_mode="circular", groups=2), (2, 4, 7)),
    (lambda: nn.Conv1d(4, 4, 3, padding=1, groups=4), (2, 4, 6)),  # depthwise
    (lambda: nn.Conv3d(2, 5, (2, 3, 2)), (2, 2, 4, 5, 4)),  # b=72 > d=24
    (lambda: nn.Conv3d(2, 5, 3, stride=(1, 2, 1), padding=1, dilation=(1, 1, 2)), (1, 2, 3, 4, 5)),
    (lambda: nn.Conv3d(3, 4, 2, padding="same", padding_mode="replicate"), (1, 3, 2, 2, 3)),  # b=12 < 24
    (lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, padding_mode="reflect"), (2, 4, 5, 6)),
    (lambda: nn.Conv2d(3, 4, (2, 3), padding="same"), (1, 3, 3, 4)),  # b=12 < d=18
]


@pytest.mark.filterwarnings("ignore:Using padding='same'")  # torch's note on even kernels
@pytest.mark.parametrize("case", range(len(CONV_REF_CASES)))
def test_conv_matches_unfold_reference(case):
    make, shape = CONV_REF_CASES[case]
    torch.manual_seed(10 + case)
    conv = make().double()
    x = torch.randn(*shape, dtype=torch.float64)
    ref_w, ref_b, ref_x = reference_conv_tract(conv, x, 0.1)
    y, gw, gb, gx = grads_of(TrAct(copy.deepcopy(conv), 0.1), x)
    assert rel(gw, ref_w) < 1e-10
    assert torch.equal(gx, ref_x)  # the input gradient is the plain layer's, bit for bit
    if ref_b is not None:
        assert torch.equal(gb, ref_b)


def test_unbatched_conv1d_input():
    torch.manual_seed(5)
    conv = nn.Conv1d(3, 4, 3).double()
    x = torch.randn(3, 10, dtype=torch.float64)
    ref_w = reference_conv_tract(conv, x[None], 0.1)[0]
    gw = grads_of(TrAct(copy.deepcopy(conv), 0.1), x)[1]
    assert rel(gw, ref_w) < 1e-10


# --- the two branches, the large-λ limit ------------------------------------------------


@pytest.mark.parametrize("b,d", [(5, 20), (20, 5), (12, 12)])
def test_woodbury_equals_direct(b, d):
    torch.manual_seed(6)
    X = torch.randn(b, d, dtype=torch.float64)
    G = torch.randn(b, 7, dtype=torch.float64)
    direct = tract_weight_grad(X, G, 0.1, "direct")
    wood = tract_weight_grad(X, G, 0.1, "woodbury")
    assert rel(wood, direct) < 1e-10
    assert rel(direct, reference_tract(X, G, 0.1)) < 1e-10


@pytest.mark.parametrize(
    "make,shape", [(lambda: nn.Linear(30, 4), (6, 30)), (lambda: nn.Conv2d(3, 4, 3, padding=1), (1, 3, 3, 3))]
)
def test_branches_agree_through_the_wrapper(make, shape):
    torch.manual_seed(7)
    layer = make().double()
    x = torch.randn(*shape, dtype=torch.float64)
    gd = grads_of(TrAct(copy.deepcopy(layer), 0.1, branch="direct"), x)[1]
    gw = grads_of(TrAct(copy.deepcopy(layer), 0.1, branch="woodbury"), x)[1]
    ga = grads_of(TrAct(copy.deepcopy(layer), 0.1), x)[1]
    assert rel(gw, gd) < 1e-10
    assert torch.equal(ga, gw)  # b < d in both cases, so auto picks Woodbury


@pytest.mark.parametrize("b", [6, 50])  # Woodbury and direct
def test_large_lambda_limit_is_sgd(b):
    """λ · ∇W → Gᵀ X with error O(1/λ): λ(XᵀX/b + λI)⁻¹ = I − XᵀX/(bλ) + O(λ⁻²)."""
    torch.manual_seed(8)
    lin = nn.Linear(20, 3).double()
    x = torch.randn(b, 20, dtype=torch.float64)
    plain = grads_of(copy.deepcopy(lin), x)[1]
    errs = []
    for lam in (1e2, 1e3, 1e4):
        g = grads_of(TrAct(copy.deepcopy(lin), lam), x)[1]
        errs.append(rel(lam * g, plain))
    # 1/λ: each tenfold λ divides the error by ~10 (the O(λ⁻²) term makes it slightly more)
    for e1, e2 in zip(errs, errs[1:]):
        assert 8.0 < e1 / e2 < 12.5
    assert errs[-1] < 1e-3


# --- what TrAct must not change -----------------------------------------------------------

UNCHANGED_CASES = [
    (lambda: nn.Linear(10, 4), (7, 10)),
    (lambda: nn.Linear(10, 4), (2, 3, 10)),
    (lambda: nn.Conv2d(3, 5, 3, padding="same", padding_mode="reflect"), (2, 3, 6, 6)),
    (lambda: nn.Conv2d(4, 6, 3, stride=2, groups=2), (2, 4, 7, 7)),
    (lambda: nn.Conv1d(2, 3, 5, padding=2, dilation=1), (4, 2, 9)),
]


@pytest.mark.parametrize("case", range(len(UNCHANGED_CASES)))
def test_forward_bias_and_input_grads_unchanged(case):
    make, shape = UNCHANGED_CASES[case]
    torch.manual_seed(20 + case)
    layer = make()
    x = torch.randn(*shape)
    y0, w0, b0, x0 = grads_of(copy.deepcopy(layer), x)
    y1, w1, b1, x1 = grads_of(TrAct(copy.deepcopy(layer), 0.1), x)
    assert torch.equal(y1, y0)
    assert torch.equal(b1, b0)
    assert torch.equal(x1, x0)
    assert not torch.allclose(w1, w0)  # the weight gradient is the one thing that changes


def test_inplace_op_after_layer_and_frozen_and_no_grad():
    torch.manual_seed(9)
    conv = nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 6, 6)
    grads = []
    for inplace in (False, True):  # ReLU(inplace=True) right after the layer must work
        net = nn.Sequential(TrAct(copy.deepcopy(conv)), nn.ReLU(inplace=inplace))
        net(x).square().sum().backward()
        grads.append(net[0].weight.grad)
    assert torch.equal(grads[0], grads[1])
    with torch.no_grad():
        assert torch.equal(net[0](x), conv(x))
    net[0].weight.requires_grad_(False)  # frozen: no TrAct node, input grads still flow
    xx = x.clone().requires_grad_(True)
    net(xx).sum().backward()
    assert xx.grad is not None and torch.equal(net[0].weight.grad, grads[1])


def test_create_graph_warns_and_keeps_input_gradient():
    """Input-gradient penalties: the input gradient (and its graph) is the plain layer's;
    the missing weight share of the second-order term is announced by a warning."""
    torch.manual_seed(11)
    conv = nn.Conv2d(2, 3, 3).double()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    out = []
    for m in (copy.deepcopy(conv), TrAct(copy.deepcopy(conv))):
        xx = x.clone().requires_grad_(True)
        if isinstance(m, TrAct):
            with pytest.warns(UserWarning, match="create_graph"):
                (gx,) = torch.autograd.grad(torch.tanh(m(xx)).sum(), xx, create_graph=True)
        else:
            (gx,) = torch.autograd.grad(torch.tanh(m(xx)).sum(), xx, create_graph=True)
        (gx**2).sum().backward()
        out.append((gx.detach(), m.bias.grad))
    assert torch.equal(out[0][0], out[1][0])
    assert torch.equal(out[0][1], out[1][1])


# --- mixed precision ------------------------------------------------------------------------

MP_CASES = [
    (lambda: nn.Linear(16, 8), (32, 16)),  # direct
    (lambda: nn.Linear(64, 8), (12, 64)),  # Woodbury
    (lambda: nn.Conv2d(3, 8, 3, padding=1), (4, 3, 8, 8)),
]


@pytest.mark.parametrize("case", range(len(MP_CASES)))
def test_autocast_bfloat16(case):
    make, shape = MP_CASES[case]
    torch.manual_seed(30 + case)
    layer, x = make(), torch.randn(*shape)
    ref = grads_of(TrAct(copy.deepcopy(layer)), x)
    m = TrAct(copy.deepcopy(layer))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = grads_of(m, x)
    assert got[0].dtype == torch.bfloat16
    assert m.weight.grad.dtype == torch.float32
    assert torch.isfinite(m.weight.grad).all()
    # bf16 keeps 8 mantissa bits (unit roundoff 2^-9 ≈ 2e-3): the output and its
    # gradient each carry that error, measured ≤ 6e-3 on these shapes; 2e-2 bounds
    # it without letting a formula error (O(1)) through
    assert rel(m.weight.grad, ref[1]) < 2e-2


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("case", range(len(MP_CASES)))
def test_low_precision_layer(case, dtype, tol):
    """A half/bfloat16 layer: the solve runs in float32, the gradient comes back in the
    layer's dtype. Tolerances: fp16 has unit roundoff 5e-4 (measured ≤ 5e-4), bf16
    4e-3 (measured ≤ 3.4e-3); each tolerance leaves a factor 5-10 of room."""
    make, shape = MP_CASES[case]
    torch.manual_seed(40 + case)
    layer, x = make(), torch.randn(*shape)
    ref = grads_of(TrAct(copy.deepcopy(layer)), x)
    m = TrAct(copy.deepcopy(layer).to(dtype))
    grads_of(m, x.to(dtype))
    assert m.weight.grad.dtype == dtype
    assert torch.isfinite(m.weight.grad).all()
    assert rel(m.weight.grad, ref[1]) < tol


# --- the wrapper as a module ------------------------------------------------------------------


class Stem(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.bn(self.conv1(x)).mean((2, 3)))


def test_state_dict_round_trip_and_same_parameters():
    torch.manual_seed(50)
    plain = Stem()
    wrapped = copy.deepcopy(plain)
    conv = wrapped.conv1
    wrapped.conv1 = TrAct(wrapped.conv1, lambda_=0.1)
    assert wrapped.conv1.weight is conv.weight and wrapped.conv1.bias is conv.bias
    assert wrapped.conv1.unwrap() is conv
    assert wrapped.conv1.unwrap().weight is wrapped.conv1.weight
    sd_plain, sd_wrapped = plain.state_dict(), wrapped.state_dict()
    assert list(sd_plain) == list(sd_wrapped)
    assert "conv1.weight" in sd_wrapped
    # plain → wrapped
    fresh = Stem()
    fresh.conv1 = TrAct(fresh.conv1)
    fresh.load_state_dict(sd_plain)
    assert torch.equal(fresh.conv1.weight, plain.conv1.weight)
    # wrapped → plain
    back = Stem()
    back.load_state_dict(fresh.state_dict())
    assert torch.equal(back.conv1.bias, plain.conv1.bias)
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(back(x), plain(x))
    assert torch.equal(fresh(x), plain(x))
    # an optimizer over the wrapped model steps the layer's own parameters
    assert {id(p) for p in wrapped.parameters()} >= {id(conv.weight), id(conv.bias)}


def test_to_double_deepcopy_pickle():
    torch.manual_seed(51)
    m = TrAct(nn.Linear(5, 3), 0.2)
    inner = m.unwrap()
    m.double()
    assert m.weight.dtype == torch.float64 and inner.weight is m.weight
    m.to(torch.float32)
    assert inner.weight.dtype == torch.float32
    c = copy.deepcopy(m)
    assert c.weight is c.unwrap().weight and c.weight is not m.weight
    assert torch.equal(c.weight, m.weight) and c.lambda_ == 0.2
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    p = torch.load(buf, weights_only=False)
    assert p.weight is p.unwrap().weight and torch.equal(p.weight, m.weight)
    x = torch.randn(4, 5)
    assert torch.equal(grads_of(p, x)[1], grads_of(copy.deepcopy(m), x)[1])


def test_attributes_repr_and_l_alias():
    conv = nn.Conv2d(3, 8, 4, stride=4)  # a ViT patch embedding
    m = TrAct(conv, l=0.05)
    assert m.lambda_ == 0.05 and m.l == 0.05
    assert m.in_channels == 3 and m.kernel_size == (4, 4)
    r = repr(m)
    assert "TrAct(" in r and "Conv2d(3, 8" in r and "lambda_=0.05" in r
    m.lambda_ = 0.3
    assert m.lambda_ == 0.3
    assert TrAct(nn.Linear(2, 2)).lambda_ == 0.1


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan"), float("inf"), -float("inf")])
def test_bad_lambda_raises(bad):
    with pytest.raises(ValueError, match="λ"):
        TrAct(nn.Linear(3, 2), bad)
    with pytest.raises(ValueError, match="λ"):
        TrAct(nn.Linear(3, 2), l=bad)
    m = TrAct(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="λ"):
        m.lambda_ = bad
    assert m.lambda_ == 0.1


def test_bad_arguments_raise():
    with pytest.raises(TypeError, match="not both"):
        TrAct(nn.Linear(3, 2), lambda_=0.1, l=0.2)
    with pytest.raises(TypeError, match="real number"):
        TrAct(nn.Linear(3, 2), "0.1x")
    with pytest.raises(ValueError, match="branch"):
        TrAct(nn.Linear(3, 2), branch="cholesky")


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize(
    "module",
    [
        nn.ConvTranspose2d(3, 4, 3),
        nn.Bilinear(2, 2, 2),
        nn.ReLU(),
        nn.Sequential(nn.Linear(2, 2)),
        nn.Embedding(4, 3),
        ScaledLinear(2, 2),
    ],
)
def test_unsupported_modules_raise(module):
    with pytest.raises(TypeError, match="Conv2d"):
        TrAct(module)


def test_already_wrapped_and_lazy_raise():
    with pytest.raises(TypeError, match="already wrapped"):
        TrAct(TrAct(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="lazy"):
        TrAct(nn.LazyLinear(3))


# --- π-net input layers --------------------------------------------------------------------------


def _pi_inf_layer(d=12, r=6, bias_alpha=0.5):
    torch.manual_seed(60)
    layer = layers.InfPiInputLinearReLU(d, r, bias_alpha=bias_alpha, dtype=torch.float64)
    with torch.no_grad():
        layer.bias.normal_()
    return layer


@pytest.mark.parametrize("b", [5, 30])  # Woodbury (b < d = 12) and direct
def test_pi_inf_input_layer(b):
    layer = _pi_inf_layer()
    x = torch.randn(b, 12, dtype=torch.float64)
    y0, _, b0, x0 = grads_of_A(copy.deepcopy(layer), x)
    m = TrAct(copy.deepcopy(layer), lambda_=0.1)
    y1, gA, b1, x1 = grads_of_A(m, x)
    assert torch.equal(y1, y0) and torch.equal(b1, b0) and torch.equal(x1, x0)
    # (XᵀX/b + λI)⁻¹ Xᵀ G, G = ∂L/∂g = 2 (g - target)
    target = torch.randn(y0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    G = 2 * (y0 - target)
    M = x.T @ x / b + 0.1 * torch.eye(12, dtype=torch.float64)
    expected = torch.linalg.solve(M, x.T @ G)
    assert gA.shape == layer.A.shape
    assert rel(gA, expected) < 1e-10


def grads_of_A(module, x):
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    target = torch.randn(y.shape, generator=torch.Generator().manual_seed(0), dtype=y.dtype)
    ((y - target) ** 2).sum().backward()
    return y.detach(), module.A.grad, module.bias.grad, x.grad


def test_pi_inf_attributes_and_sample():
    layer = _pi_inf_layer()
    m = TrAct(layer, lambda_=0.25)
    assert m.A is layer.A and m.bias is layer.bias
    assert (m.r, m.r_out, m.d_in, m.bias_alpha) == (6, 6, 12, 0.5)
    assert list(m.state_dict()) == list(layer.state_dict())
    fin = m.sample(12, 20)
    assert isinstance(fin, TrAct) and fin.lambda_ == 0.25
    assert isinstance(fin.unwrap(), layers.FinPiInputLinearReLU)
    assert fin.weight.shape == (20, 12)
    assert not hasattr(TrAct(nn.Linear(2, 2)), "sample")


@pytest.mark.parametrize("b", [5, 30])
def test_pi_fin_input_layer(b):
    layer = _pi_inf_layer().sample(12, 20)
    assert isinstance(layer.weight, torch.nn.Parameter)
    x = torch.randn(b, 12, dtype=torch.float64)
    y0, _, b0, x0 = grads_of(copy.deepcopy(layer), x)
    m = TrAct(copy.deepcopy(layer), 0.1)
    weight_cls = type(m.weight)
    y1, gw, b1, x1 = grads_of(m, x)
    assert type(m.weight) is weight_cls  # still the layer's FinPiParameter
    assert torch.equal(y1, y0) and torch.equal(b1, b0) and torch.equal(x1, x0)
    target = torch.randn(y0.shape, generator=torch.Generator().manual_seed(0)).double()  # as grads_of
    expected = reference_tract(x, 2 * (y0 - target), 0.1)
    # a finite π-layer projects its accumulated gradient onto span(Ω) on the output side; TrAct acts
    # on the input side, so the two commute (docs/math.md §7)
    expected = project_onto_span_(expected.clone(), layer.omega_basis)
    assert rel(gw, expected) < 1e-10


def test_pi_fin_state_and_conversion():
    fin = _pi_inf_layer().sample(12, 20)
    m = TrAct(fin, 0.1)
    assert list(m.state_dict()) == list(fin.state_dict())  # weight, bias, omega, omega_basis
    m.float()
    assert fin.weight.dtype == torch.float32 and fin.omega.dtype == torch.float32
    assert m.omega is fin.omega and m.weight is fin.weight
    assert tensors.owner_of(m.weight) is fin  # the optimizer still finds the layer to project
    m.bias_alpha = 2.0  # plain settings go to the layer
    assert fin.bias_alpha == 2.0
