"""The basis-function decomposition of Ma, Guo & Fattahi (2022): the paper's basis, exact
gradients of the coefficients, LARS/LAMB, the MNIST idx files and the training harness."""

from __future__ import annotations

import gzip
import json
import shlex
import sys

import numpy as np
import pytest
import torch
from torch import nn

from inf.analysis.decomposition import (
    TrajectoryRecorder,
    after_kernel,
    basis_gradients,
    eigenbasis,
    function_basis,
    network_basis,
    plot_beta_curves,
    plot_beta_vs_gradnorm,
    plot_independence,
)

F64 = torch.float64

# the authors' README example (their seed command line), after "python3 train.py"
README_LINE = (
    "--no-call_wandb --model='alexnet' --init_scale=1 --data='Cifar10' --loss_fn='mse_loss' "
    "--optimizer='lars' --batch_size=512 --num_epoch=300 --lr_setting 2 0 1e-2 --decay_rate=0.33 "
    "--decay_stepsize=50 --seed=0 --num_run=0 --no-gradient"
)


class TinyNet(nn.Module):
    """A two-layer MLP with ``features`` and a bias-free (or biased) readout."""

    def __init__(self, d=5, h=7, c=3, bias=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(d, h), nn.Tanh()).double()
        self.fc = nn.Linear(h, c, bias=bias).double()

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.fc(self.features(x))


# ------------------------------------------------------------------ the paper's basis
@pytest.mark.parametrize("bias", [False, True])
def test_beta_equals_s_at_the_final_network(bias):
    net = TinyNet(bias=bias)
    X = torch.randn(40, 5, dtype=F64)
    f = net(X).detach()
    basis = network_basis(net, X)
    # β_i of the final network are the singular values s_i (to rounding)
    assert torch.allclose(basis.coefficients(f), basis.s, rtol=0, atol=1e-12)
    # the basis functions are orthonormal C × N arrays (scaled by 1/√N)
    W = basis.weights()
    gram = torch.einsum("icn,jcn->ij", W, W) * basis.N
    assert torch.allclose(gram, torch.eye(len(basis), dtype=F64), atol=1e-12)
    assert float(basis.coefficients(f).pow(2).sum()) <= float(f.pow(2).sum()) / 40 + 1e-12
    # the authors' recipe, written out independently: svd(Φ) then svd(W V S / √N), β by a trace
    Phi = net.features(X).detach()
    U, S, Vh = torch.linalg.svd(Phi, full_matrices=False)
    u, s, vh = torch.linalg.svd(net.fc.weight.detach() @ Vh.T @ torch.diag(S) / 40**0.5)
    if not bias:  # f = Φ Wᵀ: the two constructions are the same basis
        assert torch.allclose(s, basis.s, atol=1e-12)
        for i in range(3):
            direct = torch.trace(torch.outer(u[:, i], vh[i]) @ U.T @ f) / 40**0.5
            assert abs(float(direct) - float(basis.s[i])) < 1e-12
        paper = function_basis(Phi, net.fc.weight.detach())
        assert torch.allclose(paper.grid(f), basis.grid(f), atol=1e-12)
    else:  # with a readout bias the paper's W V S misses the bias; the output form keeps it
        assert float((s - basis.s).abs().max()) > 1e-6


def test_basis_from_a_kernel_matches_the_features():
    net = TinyNet()
    X = torch.randn(30, 5, dtype=F64)
    f = net(X).detach()
    Phi = net.features(X).detach()
    a = function_basis(Phi, outputs=f)
    b = function_basis(outputs=f, kernel=Phi @ Phi.T)
    assert torch.allclose(a.s, b.s, atol=1e-9)
    assert torch.allclose(a.grid(f), b.grid(f), atol=1e-9)
    with pytest.raises(ValueError, match="exactly one"):
        function_basis(Phi, kernel=Phi @ Phi.T, outputs=f)
    with pytest.raises(ValueError, match="outputs"):
        function_basis(Phi, outputs=f[:10])


def test_basis_gradients_are_the_exact_parameter_gradients():
    net = TinyNet(bias=True)
    X = torch.randn(25, 5, dtype=F64)
    basis = network_basis(net, X)
    res = basis_gradients(net, X, basis, top=3, batch_size=7)  # chunks of 7: accumulation across chunks
    names, params = zip(*net.named_parameters())

    def betas(*ps):  # independent: the full Jacobian of β = Σ W_i ⊙ f(X)ᵀ by torch.autograd.functional
        out = torch.func.functional_call(net, dict(zip(names, ps)), (X,))
        return torch.einsum("icn,nc->i", basis.weights(3), out)

    jac = torch.autograd.functional.jacobian(betas, params)
    J = torch.cat([j.reshape(3, -1) for j in jac], dim=1)
    assert torch.allclose(res["gram"], J @ J.T, rtol=1e-10, atol=1e-12)
    assert torch.allclose(res["beta"], basis.s[:3], atol=1e-12)
    cos = (J @ J.T) / (J.norm(dim=1)[:, None] * J.norm(dim=1)[None, :])
    assert abs(res["max_cos"] - float((cos - torch.diag(cos.diagonal())).abs().max())) < 1e-10
    # through a projected NTK: an estimate whose error shrinks with K (fresh sketch per call)
    approx = basis_gradients(net, X, basis, top=3, proj_dim=1024, seed=1)
    rel = float((approx["gram"] - res["gram"]).norm() / res["gram"].norm())
    assert 0 < rel < 0.2  # JL: relative error ~ (2/K)^½ ≈ 0.04 here


def test_small_initialization_shows_with_the_papers_basis():
    """The paper's finding on a tiny run: |β_i(θ_0)| ≪ the final β_i = s_i, and clearer than
    on the kernel eigenbasis of the same run."""
    from experiments.analysis.figures import digits, train_run

    data = digits(16)
    data = (data[0][:400], data[1][:400], data[2][:150], data[3][:150])
    model, rec, _ = train_run(
        2,
        data,
        steps=100,
        lr=2.0,
        batch_size=32,
        seed=0,
        width_mult=0.0625,
        record_steps=[0, 100],
        snapshot_steps=[],
    )
    rec.set_function_basis(network_basis(model, data[2]))
    b0, s = rec.betas()[0, :, 0], rec.basis.s
    assert len(s) == 10 and float(s[0]) > 0.2
    # measured: ‖β(θ_0)‖ / ‖s‖ = 0.07 (0.03 at most per coefficient against final values 0.04 … 0.33)
    ratio_paper = float(b0.norm() / s.norm())
    assert ratio_paper < 0.15
    # the kernel eigenbasis (after kernel) of the same run: coefficients are vectors over the classes,
    # and the initial outputs are far from small there (measured ratio 0.3)
    _, phi = eigenbasis(after_kernel(model, data[2]), top=10)
    ratio_kernel = float((phi.T @ rec.outputs[0]).norm() / (phi.T @ rec.outputs[-1]).norm())
    assert ratio_kernel > 2 * ratio_paper


def test_recorder_with_the_papers_basis(tmp_path):
    from PIL import Image

    net = TinyNet(c=4)
    X = torch.randn(30, 5, dtype=F64)
    y = torch.arange(30) % 4
    rec = TrajectoryRecorder(None, X, y, num_classes=4)
    opt = torch.optim.SGD(net.parameters(), lr=0.2)
    for step in range(8):
        rec.record(net, step, snapshot=step % 2 == 0)
        opt.zero_grad()
        ((net(X) - nn.functional.one_hot(y, 4).double()) ** 2).mean().backward()
        opt.step()
    rec.record(net, 8, snapshot=True)
    with pytest.raises(RuntimeError, match="compute_gradients|basis"):
        rec.grams()
    rec.set_function_basis(network_basis(net, X))
    B = rec.betas()
    assert B.shape == (9, 4, 1) and torch.allclose(B[-1, :, 0], rec.basis.s, atol=1e-12)
    rec.compute_gradients(net, top=4)
    assert rec.grad_steps == [0, 2, 4, 6, 8]
    direct = basis_gradients(net, X, rec.basis, top=4)
    assert torch.allclose(rec.grams()[-1], direct["gram"], atol=1e-12)
    ind = rec.independence(4)
    assert ind.shape == (5,) and bool(((ind >= 0) & (ind <= 1 + 1e-9)).all())
    for fn, name in (
        (plot_beta_curves, "c.png"),
        (plot_beta_vs_gradnorm, "s.png"),
        (plot_independence, "i.png"),
    ):
        path = fn(rec, tmp_path / name)
        with Image.open(path) as im:
            assert im.size[0] >= 1200
        assert path.stat().st_size < 300_000
    saved = np.load(rec.save(tmp_path / "rec.npz"))
    assert saved["betas"].shape == (9, 4) and saved["grams"].shape == (5, 4, 4)


# ------------------------------------------------------------------ LARS and LAMB
def test_lars_two_steps_by_hand():
    from experiments.analysis.optimizers import LARS

    w = torch.tensor([3.0, 4.0], dtype=F64, requires_grad=True)
    opt = LARS([w], lr=0.5, momentum=0.9, weight_decay=0.1, trust_coefficient=0.001, eps=0.0)
    g = [0.6, 0.8]
    # step 1: ‖w‖ = 5, ‖g‖ = 1, λ = 0.001·5/(1 + 0.5) = 1/300; d = λ(g + 0.1 w) = (0.003, 0.004)
    w.grad = torch.tensor(g, dtype=F64)
    opt.step()
    w1 = [3 - 0.5 * 0.003, 4 - 0.5 * 0.004]
    assert np.allclose(w.detach().numpy(), w1, rtol=0, atol=1e-15)
    # step 2: same gradient; buffer = 0.9·(0.003, 0.004) + d2
    w.grad = torch.tensor(g, dtype=F64)
    opt.step()
    n1 = (w1[0] ** 2 + w1[1] ** 2) ** 0.5
    lam = 0.001 * n1 / (1.0 + 0.1 * n1)
    d2 = [lam * (g[0] + 0.1 * w1[0]), lam * (g[1] + 0.1 * w1[1])]
    buf = [0.9 * 0.003 + d2[0], 0.9 * 0.004 + d2[1]]
    assert np.allclose(w.detach().numpy(), [w1[0] - 0.5 * buf[0], w1[1] - 0.5 * buf[1]], rtol=0, atol=1e-15)
    # a zero weight: local rate 1 (plain momentum SGD step)
    z = torch.zeros(2, dtype=F64, requires_grad=True)
    opt = LARS([z], lr=0.1, momentum=0.9, weight_decay=0.1)
    z.grad = torch.tensor(g, dtype=F64)
    opt.step()
    assert np.allclose(z.detach().numpy(), [-0.06, -0.08], atol=1e-15)


def test_lamb_two_steps_by_hand():
    from experiments.analysis.optimizers import LAMB

    w = torch.tensor([3.0, 4.0], dtype=F64, requires_grad=True)
    opt = LAMB([w], lr=0.1, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
    g1, g2 = [0.6, 0.8], [-0.3, 0.4]
    w.grad = torch.tensor(g1, dtype=F64)
    opt.step()
    # step 1: m̂ = g, v̂ = g², r = g/(|g| + ε) + 0.01 w, trust = ‖w‖/‖r‖
    r = [g1[k] / (abs(g1[k]) + 1e-6) + 0.01 * [3.0, 4.0][k] for k in range(2)]
    trust = 5.0 / (r[0] ** 2 + r[1] ** 2) ** 0.5
    w1 = [[3.0, 4.0][k] - 0.1 * trust * r[k] for k in range(2)]
    assert np.allclose(w.detach().numpy(), w1, rtol=0, atol=1e-14)
    w.grad = torch.tensor(g2, dtype=F64)
    opt.step()
    m = [0.9 * 0.1 * g1[k] + 0.1 * g2[k] for k in range(2)]
    v = [0.999 * 0.001 * g1[k] ** 2 + 0.001 * g2[k] ** 2 for k in range(2)]
    r = [(m[k] / (1 - 0.9**2)) / ((v[k] / (1 - 0.999**2)) ** 0.5 + 1e-6) + 0.01 * w1[k] for k in range(2)]
    trust = (w1[0] ** 2 + w1[1] ** 2) ** 0.5 / (r[0] ** 2 + r[1] ** 2) ** 0.5
    assert np.allclose(w.detach().numpy(), [w1[k] - 0.1 * trust * r[k] for k in range(2)], rtol=0, atol=1e-14)


# ------------------------------------------------------------------ MNIST idx files
def test_mnist_idx_round_trip(tmp_path):
    from experiments.data.mnist import (
        MnistNotFoundError,
        load_mnist,
        read_idx,
        write_idx,
        write_synthetic_mnist,
    )

    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        write_idx(tmp_path / name, a)
        assert np.array_equal(read_idx(tmp_path / name), a)
    raw = gzip.decompress((tmp_path / "a-idx3-ubyte.gz").read_bytes())
    assert raw[:4] == bytes([0, 0, 8, 3]) and raw[4:8] == (2).to_bytes(4, "big")  # the standard header
    (tmp_path / "bad-idx3-ubyte").write_bytes(raw[:-1])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "bad-idx3-ubyte")
    # torchvision's layout (root/MNIST/raw), plain files
    write_synthetic_mnist(tmp_path / "m" / "MNIST" / "raw", n_train=30, n_test=10, compress=False)
    x, y = load_mnist(tmp_path / "m", train=True)
    assert (
        x.shape == (30, 1, 28, 28) and x.dtype == torch.uint8 and sorted(set(y.tolist())) == list(range(10))
    )
    assert load_mnist(tmp_path / "m", train=False)[0].shape == (10, 1, 28, 28)
    with pytest.raises(MnistNotFoundError, match="t10k-images"):
        load_mnist(tmp_path, train=False)


# ------------------------------------------------------------------ the harness
def test_readme_command_line_runs_verbatim_on_synthetic_cifar10(tmp_path):
    from experiments.analysis import train
    from experiments.data.synthetic import write_synthetic_cifar10

    root = write_synthetic_cifar10(tmp_path / "data", n_train=20, n_test=10)
    argv = shlex.split(README_LINE) + [
        "--data_root",
        str(root),
        "--train_subset",
        "8",
        "--num_epoch",
        "1",
        "--path",
        str(tmp_path / "run"),
        "--no-progress",
    ]
    summary = train.main(argv)
    run = tmp_path / "run"
    for name in ("trajectory.npz", "metrics.json", "beta.png", "curves.png"):
        assert (run / name).exists()
    saved = np.load(run / "trajectory.npz")
    assert saved["beta"].shape == (2, 10) and len(saved["test_acc"]) == 2 and len(saved["train_loss"]) == 1
    assert np.allclose(saved["beta"][-1], saved["s"], rtol=1e-4, atol=1e-6)  # β_i = s_i at the end
    assert summary["args"]["optimizer"] == "lars" and summary["lr"] == [2.0]
    assert json.loads((run / "metrics.json").read_text())["n_train"] == 8
    with pytest.raises(train.UserError, match="already exists"):  # never overwrite a run
        train.main(argv)


@pytest.mark.parametrize(
    "optimizer,loss,lr", [("sgd", "ce_loss", 0.05), ("lamb", "mse_loss", 0.05), ("adamw", "mse_loss", 0.002)]
)
def test_harness_on_mnist_idx_files(tmp_path, optimizer, loss, lr):
    from experiments.analysis import train
    from experiments.data.mnist import write_synthetic_mnist

    root = write_synthetic_mnist(tmp_path / "mnist", n_train=24, n_test=12)
    s = train.main(
        [
            "--model",
            "cnn2",
            "--width_mult",
            "0.1",
            "--data",
            "Mnist",
            "--data_root",
            str(root),
            "--optimizer",
            optimizer,
            "--loss_fn",
            loss,
            "--batch_size",
            "8",
            "--num_epoch",
            "3",
            "--lr_setting",
            str(lr),
            "2",
            str(lr / 5),
            "--decay_stepsize",
            "1",
            "--decay_rate",
            "0.5",
            "--path",
            str(tmp_path / "run"),
            "--no-progress",
        ]
    )
    # warm-up from lr/5 to lr over 2 epochs (epochs 0, 1), then lr · 0.5^⌊(epoch − 2)/1⌋
    assert np.allclose(s["lr"], [lr / 5, lr, lr])
    assert np.allclose(s["beta"][-1], s["s"], rtol=1e-4, atol=1e-6)


def test_harness_cifar100_weighted_loss_and_errors(tmp_path, monkeypatch, capsys):
    from experiments.analysis import train
    from experiments.data.synthetic import write_synthetic_cifar100

    args = train.parse_args(["--data", "Cifar100", "--k_M", "2", "3"])
    out = torch.tensor([[0.5, -1.0] + [0.0] * 98])
    lab = torch.tensor([1])
    expected = ((1 * 0.5**2) + 3 * (-1.0 - 3) ** 2) / 100  # weight 1 off-label, k + 1 = 3 on it
    assert abs(float(train.loss_value(args, out, lab, 100)) - expected) < 1e-6
    root = write_synthetic_cifar100(tmp_path / "c100", n_train=20, n_test=10)
    s = train.main(
        [
            "--model",
            "cnn2",
            "--width_mult",
            "0.02",
            "--data",
            "Cifar100",
            "--data_root",
            str(root),
            "--num_epoch",
            "1",
            "--batch_size",
            "10",
            "--path",
            str(tmp_path / "r"),
            "--no-progress",
        ]
    )
    assert 1 <= len(s["s"]) <= 10  # m = min(C, rank of the features on 10 held-out images)
    # a user error is one line on stderr, exit status 2, no traceback
    monkeypatch.setattr(sys, "argv", ["train", "--data", "Mnist", "--data_root", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit) as e:
        train.main()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and "does not exist" in err
    with pytest.raises(SystemExit):
        train.parse_args(["--model", "resnet9"])


@pytest.mark.slow
def test_readme_command_line_full_300_epochs(tmp_path):
    """The README line with only --data_root and --train_subset added (300 epochs of the
    CIFAR-sized AlexNet on 8 synthetic images): several minutes on a CPU."""
    from experiments.analysis import train
    from experiments.data.synthetic import write_synthetic_cifar10

    root = write_synthetic_cifar10(tmp_path / "data", n_train=20, n_test=10)
    summary = train.main(
        shlex.split(README_LINE)
        + ["--data_root", str(root), "--train_subset", "8", "--path", str(tmp_path / "run"), "--no-progress"]
    )
    assert len(summary["beta"]) == 301 and summary["lr"][50] == pytest.approx(2 * 0.33)


@pytest.mark.parametrize("kind,layernorm", [("mu", False), ("mu", True), ("fin", False)])
def test_penultimate_features_of_pi_and_mu_nets_are_what_the_readout_reads(kind, layernorm):
    """f(X) is an affine function of penultimate_features(net, X): a least-squares fit of the
    outputs on [Φ, 1] leaves no residual, and the basis then has β_i = s_i."""
    from inf.analysis.decomposition import penultimate_features
    from inf.networks import InfMLP, MuMLP

    g = torch.Generator().manual_seed(0)
    if kind == "mu":
        net = MuMLP(6, 3, 16, L=1, readout_zero_init=False, layernorm=layernorm, dtype=F64, generator=g)
    else:
        net = InfMLP(6, 3, 4, L=1, dtype=F64).sample(32, generator=g)
        with torch.no_grad():  # a nonzero readout (a fresh sample reads out zero)
            for p in net.output_layer.parameters():
                p.normal_(generator=g)
    X = torch.randn(40, 6, dtype=F64)
    Phi = penultimate_features(net, X)
    f = net(X).detach()
    A = torch.cat([Phi, torch.ones(40, 1, dtype=F64)], 1)
    coef = torch.linalg.pinv(A) @ f  # least squares (zero columns from dead units are fine)
    assert float((A @ coef - f).norm() / f.norm()) < 1e-10
    basis = network_basis(net, X)
    assert torch.allclose(basis.coefficients(f), basis.s, atol=1e-12)
