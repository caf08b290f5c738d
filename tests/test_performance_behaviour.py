"""Behaviour behind the performance work (docs/performance.md); nothing here measures time.

* Every way of cutting the rows (memory-budget chunks, CPU cache blocks over
  rows and over the batch, saved or recomputed F11/F02) gives the same forward,
  backward and full InfMLP training step, to float precision.
* Row growth is amortized: reallocations are logarithmic in the number of rows
  and an ordinary append writes in place.
* Rows stored in bfloat16/float16 stay within the stated error for rows shaped
  by training.
* The memory budget bounds the intermediates actually allocated, and the
  finite π-projection allocates no n × n temporary.
"""

from __future__ import annotations

import contextlib
import copy
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import inf.functional as functional
from inf.functional import auto_chunk_rows, inf_pi_linear_relu
from inf.layers import InfPiLinearReLU
from inf.networks import FinPiMLPSample, InfMLP
from inf.optim import InfSGD
from inf.tensors import RowStore

F64 = torch.float64


@contextlib.contextmanager
def blocking(rows=None, batch=None, max_threads=None, save=None):
    """Temporarily change the BlockPolicy. ``max_threads=NEVER`` turns the CPU blocks off;
    ``ALWAYS`` keeps the given blocks (the policy no longer depends on the thread count)."""
    changes = {}
    if max_threads == NEVER:
        changes.update(cpu_block_rows=None, cpu_block_batch=None)
    else:
        if rows is not None:
            changes["cpu_block_rows"] = rows
        if batch is not None:
            changes["cpu_block_batch"] = batch
    if save is not None:
        changes["save_kernels"] = save
    with functional.block_policy(**changes):
        yield


# settings: (label, chunk_rows, switches); max_threads 10**6 forces the CPU blocks, 0 disables them
ALWAYS, NEVER = 10**6, 0
SETTINGS = [
    ("one block, saved kernels", None, dict(max_threads=NEVER)),
    ("budget chunks (recompute)", 37, dict(max_threads=NEVER)),
    ("budget chunks, forced save", 37, dict(max_threads=NEVER, save=True)),
    ("row blocks", None, dict(rows=64, batch=10**6, max_threads=ALWAYS)),
    ("row + batch blocks", None, dict(rows=50, batch=4, max_threads=ALWAYS)),
    ("row + batch blocks, recompute", None, dict(rows=50, batch=4, max_threads=ALWAYS, save=False)),
    ("budget chunks inside blocks", 29, dict(rows=64, batch=3, max_threads=ALWAYS)),
]


def _rows(M, r, r_out, gen, dtype):
    A = torch.randn(M, r_out, dtype=dtype, generator=gen)
    c = torch.randn(M, dtype=dtype, generator=gen)
    B = F.normalize(torch.randn(M, r, dtype=dtype, generator=gen), dim=1)
    return A, c, B


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (F64, 1e-12)])
@pytest.mark.parametrize("layernorm", [False, True])
def test_function_same_result_for_every_blocking(dtype, tol, layernorm):
    gen = torch.Generator().manual_seed(0)
    A, c, B = _rows(300, 12, 7, gen, dtype)
    g = torch.randn(11, 12, dtype=dtype, generator=gen, requires_grad=True)
    B[5] = g[0].detach() / g[0].detach().norm()  # q = 1 for one pair
    B[6] = -B[5]  # and q = -1
    w = torch.randn(11, 7, dtype=dtype, generator=gen)
    results = []
    for _, chunk, switches in SETTINGS:
        with blocking(**switches):
            out = inf_pi_linear_relu(g, A, c, B, None, layernorm, chunk)
            (grad,) = torch.autograd.grad((out * w).sum(), g)
        results.append((out.detach(), grad))
    out0, grad0 = results[0]
    for (label, _, _), (out, grad) in zip(SETTINGS[1:], results[1:]):
        assert (out - out0).norm() / out0.norm() < tol, label
        assert (grad - grad0).norm() / grad0.norm() < tol, label


def test_function_matches_math_module_reference():
    # the blocked kernels (arccos/sin, 1/2π folded out) against inf.math's F00/F11/F02 in float64
    from inf.math import F00_F11_F02

    gen = torch.Generator().manual_seed(1)
    A, c, B = _rows(200, 9, 5, gen, F64)
    g = torch.randn(6, 9, dtype=F64, generator=gen, requires_grad=True)
    s = g.detach().norm(dim=1, keepdim=True)
    ghat = g.detach() / s
    f00, f11, f02 = F00_F11_F02(ghat @ B.T)
    ref_out = (s * f00 * c) @ A
    delta = torch.randn(6, 5, dtype=F64, generator=gen)
    gamma = (delta @ A.T) * c
    ref_grad = (gamma * f11) @ B + ghat * (gamma * f02).sum(1, keepdim=True)
    for _, chunk, switches in SETTINGS:
        with blocking(**switches):
            out = inf_pi_linear_relu(g, A, c, B, None, False, chunk)
            (grad,) = torch.autograd.grad(out, g, delta)
        assert torch.allclose(out, ref_out, rtol=1e-12, atol=1e-12)
        assert torch.allclose(grad, ref_grad, rtol=1e-12, atol=1e-12)


def _net_with_rows(M, dtype, seed=0):
    torch.manual_seed(seed)
    net = InfMLP(20, 5, 16, L=2, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    state = net.state_dict()
    for i, layer in enumerate(net.layers[1:], start=1):
        A, c, B = _rows(M, layer.r, layer.r_out, gen, dtype)
        state[f"layers.{i}.rows.A"], state[f"layers.{i}.rows.Amult"], state[f"layers.{i}.rows.B"] = (
            A,
            0.05 * c,
            B,
        )
    net.load_state_dict(state)
    return net


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (F64, 1e-11)])
def test_training_step_same_for_every_blocking(dtype, tol):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(10, 20, dtype=dtype, generator=gen)
    y = torch.randint(0, 5, (10,), generator=gen)
    x_after = torch.randn(7, 20, dtype=dtype, generator=gen)
    base = _net_with_rows(700, dtype)
    results = []
    for _, chunk, switches in SETTINGS:
        net = copy.deepcopy(base)
        for layer in net.layers[1:]:
            layer.chunk_rows = chunk
        opt = InfSGD(net.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-3)
        with blocking(**switches):
            for _ in range(2):  # the second step also uses the rows appended by the first
                opt.zero_grad()
                loss = F.cross_entropy(net(x), y)
                loss.backward()
                grad_in = net.layers[0].A.grad.clone()
                opt.step()
            with torch.no_grad():
                out_after = net(x_after)
        rows = [
            (l.A.detach().clone(), l.Amult.detach().clone(), l.B.detach().clone()) for l in net.layers[1:]
        ]
        results.append((loss.detach(), grad_in, out_after, rows))
    loss0, grad0, out0, rows0 = results[0]
    for (label, _, _), (loss, grad, out, rows) in zip(SETTINGS[1:], results[1:]):
        assert abs(loss - loss0) <= tol * abs(loss0), label
        assert (grad - grad0).norm() <= tol * grad0.norm(), label
        assert (out - out0).norm() <= tol * out0.norm(), label
        for (A, c, B), (A0, c0, B0) in zip(rows, rows0):
            assert A.shape == A0.shape == (700 + 20, A0.shape[1])
            for t, t0 in ((A, A0), (c, c0), (B, B0)):
                assert (t - t0).norm() <= tol * t0.norm(), label


def test_low_precision_rows_converted_block_by_block():
    gen = torch.Generator().manual_seed(4)
    A, c, B = _rows(500, 12, 6, gen, torch.float32)
    g = torch.randn(9, 12, generator=gen, requires_grad=True)
    A16, B16 = A.to(torch.bfloat16), B.to(torch.bfloat16)
    ref = inf_pi_linear_relu(g, A16.float(), c, B16.float())  # the same rounded rows in float32
    (ref_grad,) = torch.autograd.grad(ref.sum(), g)
    with functional.block_policy(convert_block_rows=64), blocking(max_threads=NEVER):
        assert functional.block_rows(500, None, "cpu", converts=True) == 64
        out = inf_pi_linear_relu(g, A16, c, B16)
        (grad,) = torch.autograd.grad(out.sum(), g)
    assert out.dtype == torch.float32
    assert (out - ref).norm() <= 1e-5 * ref.norm()
    assert (grad - ref_grad).norm() <= 1e-5 * ref_grad.norm()


def test_cpu_block_policy():
    with blocking(rows=1024, batch=512, max_threads=ALWAYS):
        assert functional.block_rows(50_000, None, "cpu") == 1024
        assert functional.block_batch(8, "cpu") is None
        assert functional.block_rows(50_000, 300, "cpu") == 300  # the budget is smaller
        assert functional.block_rows(800, None, "cpu") is None  # fits one block
        assert functional.block_rows(50_000, None, "meta") is None  # not on other devices
        assert functional.block_batch(10_000, "cpu") == 512  # large batches block
        assert functional.block_rows(50_000, 700, "cpu") == 700
    with blocking(max_threads=NEVER):
        assert functional.block_rows(50_000, None, "cpu") is None
        assert functional.block_batch(10_000, "cpu") is None


def test_block_policy_does_not_depend_on_thread_count():
    """The summation order (and so every number) is the same at any torch thread count."""
    before = torch.get_num_threads()
    try:
        seen = set()
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            seen.add(
                (
                    functional.block_rows(50_000, None, "cpu"),
                    functional.block_batch(8, "cpu"),
                    functional.block_batch(10_000, "cpu"),
                )
            )
        assert len(seen) == 1
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- growth
def test_appends_are_amortized_and_in_place():
    store = RowStore(8, 4, rows=0)
    b, steps = 5, 3000
    gen = torch.Generator().manual_seed(0)
    data_A = torch.randn(steps * b, 4, generator=gen)
    data_B = torch.randn(steps * b, 8, generator=gen)
    ptr, moves = None, 0
    for i in range(steps):
        before = store.reallocations
        store.append(data_A[i * b : (i + 1) * b], data_B[i * b : (i + 1) * b], -0.1)
        p = store.A.data_ptr()
        if ptr is not None and p != ptr:
            moves += 1
            assert store.reallocations == before + 1  # rows move only when the buffer is reallocated
        ptr = p
    M = store.num_rows
    assert M == steps * b
    assert store.reallocations <= math.ceil(math.log2(M / 16)) + 1
    assert moves == store.reallocations - 1  # the first reservation is not a move
    assert store.capacity < 2 * M + 16
    assert torch.equal(store.A, data_A) and torch.equal(store.B, data_B)


def test_loaded_rows_reallocate_once_then_grow_in_place():
    net = _net_with_rows(1000, torch.float32)
    layer = net.layers[1]
    opt = InfSGD(net.parameters(), lr=0.01)
    x, y = torch.randn(4, 20), torch.tensor([0, 1, 2, 3])
    start = layer.rows.reallocations
    for _ in range(50):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    assert layer.rows.num_rows == 1000 + 200
    assert layer.rows.reallocations - start == 1  # capacity 2000 covers the next 1000 rows


# --------------------------------------------------------------------------- low precision
# stated in docs/performance.md: relative output error of low-precision row storage
LOW_PRECISION_BOUNDS = {torch.bfloat16: 1.5e-2, torch.float16: 2e-3}


def test_low_precision_rows_of_a_trained_net_within_stated_error():
    from benchmarks._util import trained_inf_mlp

    net, x_test, x_train = trained_inf_mlp(steps=40, d_in=48, r=48, batch=8)
    assert net.rows_per_layer()[0] == 48 + 40 * 8
    with torch.no_grad():
        refs = [net(x) for x in (x_test, x_train)]
        for dtype, bound in LOW_PRECISION_BOUNDS.items():
            low = copy.deepcopy(net)
            for layer in low.layers[1:]:
                layer.rows.to(dtype)
                assert layer.A.dtype == layer.B.dtype == dtype and layer.Amult.dtype == torch.float32
            for x, ref in zip((x_test, x_train), refs):
                out = low(x)
                assert out.dtype == torch.float32
                rel = ((out - ref).norm() / ref.norm()).item()
                assert rel < bound, (dtype, rel)
                assert rel > 1e-6  # the rows really were rounded


# --------------------------------------------------------------------------- memory
class LiveBytes(TorchDispatchMode):
    """Bytes of CPU storages that ops under this mode allocate, alive at the same time.

    A storage counts from the op that allocates it (not a view or an ``out=``
    target of an argument) until the tensor that op returned is garbage
    (views keep their base alive, so they keep it counted)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.largest = 0

    def _free(self, n):
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                n = storage.nbytes()
                if n and storage.data_ptr() not in inputs:
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    self.largest = max(self.largest, n)
                    weakref.finalize(t, self._free, n)
        return out


def test_auto_chunk_rows_respects_budget():
    for batch in (1, 8, 100, 10_000):
        for budget in (2**16, 2**20, 256 * 2**20):
            for itemsize in (4, 8):
                chunk = auto_chunk_rows(batch, 10**9, budget, itemsize)
                assert chunk is not None and chunk >= 1
                if chunk > 1:
                    assert 4 * batch * chunk * itemsize <= budget
                    assert 4 * batch * (chunk + 1) * itemsize > budget  # the largest that fits
    assert auto_chunk_rows(8, 100, 2**20) is None  # everything fits: no chunking
    assert auto_chunk_rows(8, 100, None) is None


@pytest.mark.parametrize("cpu_blocks", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_budget_bounds_allocated_intermediates(cpu_blocks, grad):
    batch, M, r, budget = 64, 4000, 32, 256 * 1024
    layer = InfPiLinearReLU(r, r, chunk_bytes=budget)
    gen = torch.Generator().manual_seed(0)
    A, c, B = _rows(M, r, r, gen, torch.float32)
    layer.load_state_dict({"bias": layer.bias.detach(), "rows.A": A, "rows.Amult": c, "rows.B": B})
    chunk = layer._chunk_rows(batch, torch.float32)
    assert chunk is not None and 4 * batch * chunk * 4 <= budget
    g = torch.randn(batch, r, generator=gen, requires_grad=grad)
    unchunked = batch * M * 4  # one batch × M tensor: 4× the budget here
    small = 8 * batch * r * 4 + 4 * M * 4  # outputs, ĝ, gradients, the coefficient marker
    switches = dict(rows=256, batch=16, max_threads=ALWAYS) if cpu_blocks else dict(max_threads=NEVER)
    with blocking(**switches):
        with LiveBytes() as mem:
            out = layer(g)
            if grad:
                out.square().sum().backward()
        reference = None
        with blocking(max_threads=NEVER, save=True):
            layer.chunk_bytes = None  # no budget at all: the batch × M tensors
            reference = layer(g.detach())
            layer.chunk_bytes = budget
    assert mem.largest <= budget // 4 + small
    assert mem.peak <= budget + small < unchunked
    if cpu_blocks:  # cache blocks are far below the budget
        assert mem.peak <= 4 * 16 * 256 * 4 + small
    assert (out - reference).norm() <= 1e-5 * reference.norm()


def test_finite_projection_in_place_without_n_by_n_temporary():
    n, r = 256, 8
    torch.manual_seed(0)
    fin = FinPiMLPSample(InfMLP(10, 3, r, L=1), n)
    layer = fin.layers[1]
    Q = layer.omega_basis
    G = torch.randn(n, n)
    G0 = G.clone()
    expected = Q @ (Q.T @ G)
    with LiveBytes() as mem:
        out = layer.project_(G)
    assert out is G
    assert torch.allclose(G, expected, atol=1e-5)
    assert mem.largest <= r * n * 4  # Qᵀ G only
    assert mem.peak < n * n * 4 // 4
    # the dense projector Ω (ΩᵀΩ)⁻¹ Ωᵀ agrees
    omega = layer.omega.double()
    P = omega @ torch.linalg.solve(omega.T @ omega, omega.T)
    assert torch.allclose(G.double(), P @ G0.double(), atol=1e-4)


# ------------------------------------------------------------ issue 16: GPU path, naive reference, momentum
@pytest.mark.parametrize("storage,tol", [(torch.float16, 2e-6), (torch.bfloat16, 2e-5)])
@pytest.mark.parametrize("layernorm", [False, True])
@pytest.mark.parametrize("chunk", [None, 37])
def test_low_precision_products_match_float64_on_stored_rows(storage, tol, layernorm, chunk):
    """The GPU path (half rows multiplied as stored, float32 accumulation; emulated on the CPU)
    reproduces float64 arithmetic on the same rounded rows: its only error is the rows'
    storage. The gradient δ is ~1e-7, which float16 cannot hold unscaled (2^-24 ≈ 6e-8)."""
    gen = torch.Generator().manual_seed(5)
    A, c, B = _rows(300, 12, 7, gen, F64)
    c *= 1e-2
    g = torch.randn(9, 12, dtype=F64, generator=gen)
    B[4] = g[0] / g[0].norm()  # q = 1 for one pair
    w = 1e-7 * torch.randn(9, 7, dtype=F64, generator=gen)
    As, Bs = A.to(storage), B.to(storage)
    g64 = g.clone().requires_grad_(True)
    ref = inf_pi_linear_relu(g64, As.double(), c, Bs.double(), None, layernorm, chunk)
    (ref_grad,) = torch.autograd.grad(ref, g64, w)
    with functional.block_policy(low_precision_products=True, cpu_block_rows=64):
        assert functional.low_precision_products(
            functional.current_block_policy(), "cpu", As, Bs, torch.float32
        )
        g32 = g.float().requires_grad_(True)
        out = inf_pi_linear_relu(g32, As, c.float(), Bs, None, layernorm, chunk)
        (grad,) = torch.autograd.grad(out, g32, w.float())
    assert out.dtype == torch.float32
    assert (out.double() - ref).abs().max() <= tol * ref.abs().max()
    assert (grad.double() - ref_grad).abs().max() <= tol * ref_grad.abs().max()


def test_low_precision_products_policy():
    A, B = torch.zeros(4, 3, dtype=torch.float16), torch.zeros(4, 3, dtype=torch.float16)
    pol = functional.BlockPolicy()
    assert functional.low_precision_products(pol, "cuda", A, B, torch.float32)  # default: CUDA only
    assert not functional.low_precision_products(pol, "cpu", A, B, torch.float32)
    assert not functional.low_precision_products(pol, "cuda", A.float(), B.float(), torch.float32)
    assert not functional.low_precision_products(pol, "cuda", A, B, F64)  # float64 inputs: exact path
    forced = functional.BlockPolicy(low_precision_products=True)
    assert functional.low_precision_products(forced, "cpu", A, B, torch.float32)


@pytest.mark.parametrize("storage,tol", [(torch.float16, 1e-6), (torch.bfloat16, 1e-5)])
def test_split_mm_keeps_float32_precision_of_the_other_operand(storage, tol):
    gen = torch.Generator().manual_seed(6)
    W = torch.randn(500, 40, generator=gen).to(storage)
    for scale in (1e-9, 1.0, 1e4):  # float16 alone underflows at 1e-9
        x = scale * torch.randn(8, 500, generator=gen)
        ref = x.double() @ W.double()
        got = functional.split_mm(x, W)
        assert got.dtype == torch.float32
        assert (got.double() - ref).abs().max() <= tol * ref.abs().max(), scale


def test_naive_reference_of_step_time_matches_library():
    """benchmarks/step_time.py's baseline computes the same training as InfMLP + InfSGD."""
    from benchmarks._naive import NaiveInfMLP, pi_layers, pi_rows

    torch.manual_seed(7)
    net = InfMLP(20, 5, 16, L=2, bias_alpha=0.5, last_layer_alpha=0.7, dtype=F64)
    naive = NaiveInfMLP(net)
    opt = InfSGD(net.parameters(), lr=0.3)
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        x, y = torch.randn(6, 20, dtype=F64, generator=gen), torch.randint(0, 5, (6,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        naive.zero_grad()
        F.cross_entropy(naive(x), y).backward()
        naive.step(0.3)
    x = torch.randn(9, 20, dtype=F64, generator=gen)
    with torch.no_grad():
        assert torch.allclose(naive(x), net(x), rtol=1e-10, atol=1e-12)
    for layer, t in zip(pi_layers(net), naive.layers):
        for mine, theirs in zip(pi_rows(layer), (t["A"], t["c"], t["B"])):
            assert torch.allclose(mine, theirs, rtol=1e-10, atol=1e-12)


def test_momentum_buffer_grows_in_place():
    """InfSGD's momentum buffer of a coefficient vector is a length-M view of a capacity
    buffer that doubles: O(log M) reallocations, and state_dict saves M entries only."""
    torch.manual_seed(8)
    net = InfMLP(10, 3, 8, L=1, dtype=F64)
    opt = InfSGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    gen = torch.Generator().manual_seed(8)
    coef = net.output_layer.rows.coefficients
    storages = set()
    for _ in range(60):
        x, y = torch.randn(4, 10, dtype=F64, generator=gen), torch.randint(0, 3, (4,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        buf = opt.state[coef]["momentum_buffer"]
        assert buf.shape == coef.shape
        storages.add(buf.untyped_storage().data_ptr())
    M = coef.shape[0]  # 8 + 60·4 = 248 rows
    assert len(storages) <= math.ceil(math.log2(M / 16)) + 2
    saved = opt.state_dict()["state"]
    for st in saved.values():
        assert "_momentum_capacity" not in st
        b = st.get("momentum_buffer")
        if b is not None:
            assert b.untyped_storage().nbytes() == b.numel() * b.element_size()
    assert "_momentum_capacity" in opt.state[coef]  # the live state keeps it


def test_all_finite_check_is_exact():
    """InfSGD's one-pass finiteness check agrees with isfinite().all(), overflowing sums included."""
    from inf.optim import _all_finite

    big = torch.full((4,), 3e38)  # finite entries whose float32 sum overflows
    assert _all_finite(big) and _all_finite(torch.zeros(0)) and _all_finite(torch.randn(100))
    for bad in (float("inf"), float("-inf"), float("nan")):
        t = torch.randn(1000)
        t[517] = bad
        assert not _all_finite(t)
    t = torch.tensor([float("inf"), float("-inf")])  # sums to NaN
    assert not _all_finite(t)


def test_all_finite_many_is_exact():
    from inf.optim import _all_finite_many

    ok = [torch.randn(5), torch.full((3,), 3e38), torch.randn(2, 2, dtype=F64), torch.randn(4).half()]
    assert _all_finite_many(ok)  # the float32 total overflows; the fallback clears it
    for bad in (float("inf"), float("nan")):
        t = torch.randn(7, dtype=F64)
        t[3] = bad
        assert not _all_finite_many(ok + [t])
