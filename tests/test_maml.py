"""MAML with π-nets (experiments/meta/maml.py, train.py, test.py) on synthetic Omniglot files.

What is checked:
* the infinite inner step (rows appended to the readout) agrees with the same step
  written with torch ops, and the base model keeps no rows;
* one meta-step of an infinite π-net agrees with finite π-nets sampled from it, with a
  gap that shrinks with the width (first and second order);
* the second-order meta-gradient of the infinite net (input layer, biases, the rows of
  the hidden layer and of the readout) agrees with finite differences in float64;
* the command lines run end to end and test.py evaluates what train.py saved.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from experiments.data.omniglot import omniglot_splits
from experiments.meta import test as meta_test
from experiments.meta import train as meta_train
from experiments.meta.maml import (
    MetaLearner,
    body_features,
    build_model,
    finite_inner_loop,
    inf_readout_adapt,
    inf_readout_rows_adapted,
    make_meta_optimizer,
    mean_and_ci95,
)
from experiments.meta.sampler import TaskSampler
from experiments.meta.synthetic import write_synthetic_omniglot
from experiments.runs import load_checkpoint
from inf.layers import project_gradient_
from inf.math import F00
from inf.optim import InfSGD

D_IN, WAYS = 784, 5

# the paper's seed command line (Omniglot 5-way 1-shot, infinite π-net), without --use-cuda
SEED_LINE = (
    "--dataset omniglot --num-ways 5 --num-shots 1 --step-size 0.5 --batch-size 8 --num-workers 2 "
    "--num-epochs 2 --output-folder {out} --meta-lr .1  --grad-clip 0.1 --meta-momentum 0 "
    "--num-shots-test 1 --normalize None --hidden-size -1 --bias-alpha 4 --infnet_r 200 "
    "--first-layer-alpha 2  --verbose --first-layer-lr-mult 0.2 --dtype float16 --num-batches 1000 "
    "--num-test-batches 500 --adapt-readout-only --Gproj-inner --Gproj-outer --last-layer-lr-mult 0 "
    "--scheduler cosine --readout-zero-init --depth 1"
)


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def omni_root(tmp_path_factory):
    # 2 sets x 2 alphabets x 4 characters = 16 characters (split 10/2/4), 3 drawings each
    return write_synthetic_omniglot(tmp_path_factory.mktemp("omniglot"), 2, 4, 3, size=28)


@pytest.fixture(scope="module")
def batch(omni_root):
    """Two 5-way 1-shot tasks with 2 queries per class, float64 vectors of 784."""
    split = omniglot_splits(omni_root, split_sizes="proportional")["train"]
    return TaskSampler(
        split, WAYS, 1, 2, batch_size=2, flatten=True, dtype=torch.float64, seed=0
    ).sample_batch(0)


def trained_infnet(batch, last_bias_alpha=1.0, seed=0):
    """A float64 infinite π-net (r = 8) after one plain SGD step, so that its readout and
    hidden layer are not at initialization."""
    net = build_model(
        "inf",
        D_IN,
        WAYS,
        r=8,
        depth=1,
        first_layer_alpha=2.0,
        bias_alpha=4.0,
        last_bias_alpha=last_bias_alpha,
        dtype=torch.float64,
        seed=seed,
    )
    x = batch.query_inputs.reshape(-1, D_IN)
    y = torch.arange(x.shape[0]) % WAYS
    opt = InfSGD(net.parameters(), lr=0.5)
    F.cross_entropy(net(x), y).backward()
    opt.step()
    opt.zero_grad()
    return net


# --------------------------------------------------------------------------- inner step


def test_rows_path_equals_torch_ops_and_base_keeps_no_rows(batch):
    net = trained_infnet(batch)
    xs, ys, xq, yq = (t[0] for t in batch)
    rows_before = net.rows_per_layer()
    with torch.no_grad():
        hs, hq = body_features(net, xs), body_features(net, xq)
    for steps in (1, 3):
        with torch.no_grad():
            with inf_readout_rows_adapted(net, hs, ys, 0.7, steps) as adapted:
                assert adapted.rows_added == steps * xs.shape[0]
                assert net.layers[-1].rows.num_rows == rows_before[-1] + steps * xs.shape[0]
                rows_logits = adapted.logits(hq)
            ops_logits, before, inner = inf_readout_adapt(net, hs, ys, hq, 0.7, steps)
        assert net.rows_per_layer() == rows_before
        torch.testing.assert_close(rows_logits, ops_logits, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(inner, adapted.inner_losses, rtol=1e-12)
        assert len(inner) == steps  # support loss before each step
        if steps > 1:
            assert inner[-1] < inner[0]

    # first-order training through both paths leaves the same gradient (rows and input layer)
    grads = []
    for rows_path in (True, False):
        m = copy.deepcopy(net)
        learner = MetaLearner(m, None, step_size=0.7, num_steps=2, first_order=True, rows_path=rows_path)
        learner.task(xs, ys, xq, yq, train=True)
        assert m.rows_per_layer() == rows_before
        pending = [layer.rows.pending() for layer in (*m.hidden_layers, m.output_layer)]
        grads.append((m.input_layer.A.grad.clone(), pending))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-10, atol=1e-12)
    for p1, p2 in zip(grads[0][1], grads[1][1]):  # PendingRows(A, B, scale)
        torch.testing.assert_close(p1.A, p2.A, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(p1.B, p2.B, rtol=1e-10, atol=1e-12)
        assert p1.scale == p2.scale


def test_inner_step_is_the_finite_readout_sgd_step(batch):
    """The kernel form of the inner step (rows A = δ·s, B = ĝ, coefficient -η) is the
    finite readout's SGD step with the feature inner product replaced by its limit:
    with the exact finite kernel φ(h_s)·φ(h_q) it reproduces the finite net exactly."""
    net = trained_infnet(batch).sample(512, generator=torch.Generator().manual_seed(3))
    xs, ys, xq, _ = (t[0] for t in batch)
    readout, aL, beta = net.layers[-1], net.last_layer_alpha, net.layers[-1].bias_alpha
    with torch.no_grad():
        hs, hq = body_features(net, xs), body_features(net, xq)

    def fwd(params, h):
        return aL * torch.func.functional_call(readout, params, (h,))

    params, _, _ = finite_inner_loop(
        fwd, dict(readout.named_parameters()), hs, ys, 0.9, 1, differentiable=False
    )
    with torch.no_grad():
        finite = fwd(params, hq)
        out_s, out_q = aL * readout(hs), aL * readout(hq)
        delta = aL * (torch.softmax(out_s, -1) - F.one_hot(ys, WAYS)) / len(ys)
        K = torch.relu(hq) @ torch.relu(hs).T + beta**2
        kernel_form = out_q + aL * (-0.9) * K @ delta
    torch.testing.assert_close(finite, kernel_form, rtol=1e-10, atol=1e-10)


def test_gproj_inner_keeps_pi_weight_updates_in_span_of_omega(batch):
    net = trained_infnet(batch).sample(64, generator=torch.Generator().manual_seed(0))
    xs, ys = batch.support_inputs[0], batch.support_targets[0]
    base = dict(net.named_parameters())

    def fwd(params, x):
        return torch.func.functional_call(net, params, (x,))

    for project in (True, False):
        params, _, _ = finite_inner_loop(fwd, base, xs, ys, 0.5, 1, differentiable=False, gproj_inner=project)
        hidden = net.layers[1]
        delta = (params["layers.1.weight"] - base["layers.1.weight"]).detach()
        Q = hidden.omega_basis
        off_span = (delta - Q @ (Q.T @ delta)).norm() / delta.norm()
        assert (off_span < 1e-10) if project else (off_span > 0.1)
        # the readout is never projected
        dW = (params["layers.2.weight"] - base["layers.2.weight"]).detach()
        assert dW.norm() > 0


# --------------------------------------------------------------------------- infinite vs finite

WIDTHS = (256, 1024, 4096)
SEEDS = (0, 1)


def _one_meta_step(net, batch, first_order, probe):
    opt = make_meta_optimizer(net, 0.1, first_layer_lr_mult=0.2, last_layer_lr_mult=1.0, gproj_outer=True)
    learner = MetaLearner(
        net,
        opt,
        step_size=2.0,
        num_steps=1,
        first_order=first_order,
        gproj_inner=True,
        gproj_outer=True,
        grad_clip=0.2,
    )
    with torch.no_grad():
        before = net(probe)
    res = learner.meta_step(batch, keep_logits=True)
    with torch.no_grad():
        after = net(probe)
    logits = torch.stack([t.logits for t in res["tasks"]])
    return {"logits": logits, "loss": res["outer_loss"], "after": after, "change": after - before}


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_meta_step_of_infinite_net_matches_finite_pi_nets(batch):
    """One meta-step (inner step on the readout, outer InfSGD step with clipping) of an
    infinite π-net and of finite π-nets sampled from it, on the same tasks.

    A finite π-net deviates from its infinite limit by O(n^-1/2) (docs/math.md §6), so from
    width 256 to 4096 every gap should drop by about 4; errors are averaged over two
    samples of Ω and we ask for a factor 2, plus an absolute bound at 4096. Compared:
    the query logits after adaptation, the outer loss, the outputs after the outer step,
    the change of the outputs made by the step, and, for second order, the part of that
    change that second order adds to first order.
    """
    net = trained_infnet(batch)
    probe = torch.cat([batch.support_inputs, batch.query_inputs], 1).reshape(-1, D_IN)
    ref = {fo: _one_meta_step(copy.deepcopy(net), batch, fo, probe) for fo in (True, False)}
    so_extra_ref = ref[False]["change"] - ref[True]["change"]
    assert so_extra_ref.norm() > 0.2 * ref[False]["change"].norm()  # second order matters here
    gaps = {}
    for n in WIDTHS:
        rows = []
        for seed in SEEDS:
            fin = net.sample(n, generator=torch.Generator().manual_seed(1000 * n + seed))
            res = {fo: _one_meta_step(copy.deepcopy(fin), batch, fo, probe) for fo in (True, False)}
            row = []
            for fo in (True, False):
                a, b = res[fo], ref[fo]
                row += [
                    _rel(a["logits"], b["logits"]),
                    abs(a["loss"] - b["loss"]),
                    _rel(a["after"], b["after"]),
                    _rel(a["change"], b["change"]),
                ]
            row.append(_rel(res[False]["change"] - res[True]["change"], so_extra_ref))
            rows.append(row)
        gaps[n] = np.mean(rows, axis=0)
    names = [f"{o} {q}" for o in ("FO", "SO") for q in ("logits", "loss", "after", "change")] + ["SO-FO"]
    print("\nwidth  " + "  ".join(f"{s:>11}" for s in names))
    for n in WIDTHS:
        print(f"{n:5d}  " + "  ".join(f"{v:11.2e}" for v in gaps[n]))
    small, large = gaps[WIDTHS[0]], gaps[WIDTHS[-1]]
    assert np.all(large < 0.5 * small), (small, large)
    # absolute bounds at width 4096 (relative gaps, and the loss gap in nats)
    bounds = np.array([0.15, 1.5e-3, 0.12, 0.25] * 2 + [0.3])
    assert np.all(large < bounds), (large, bounds)


# --------------------------------------------------------------------------- finite differences


def _outer_loss(learner, batch):
    return learner.outer_loss(batch)


@pytest.mark.parametrize("num_steps", [1, 2])
def test_second_order_meta_gradient_matches_finite_differences(batch, num_steps):
    """Directional derivatives of the outer loss (mean over the tasks, float64): along a
    random direction of the input layer A, of each bias, and along a new row (a, b) added
    with coefficient ε to the hidden layer and to the readout. The analytic value of the
    latter is Σ_pending (A_p·a) F00(B_p·b): the gradient rows that backward recorded."""
    net = trained_infnet(batch)
    learner = MetaLearner(net, None, step_size=0.7, num_steps=num_steps, first_order=False)
    g = torch.Generator().manual_seed(5)
    B = batch.support_inputs.shape[0]
    for b in range(B):
        learner.task(
            batch.support_inputs[b],
            batch.support_targets[b],
            batch.query_inputs[b],
            batch.query_targets[b],
            train=True,
            loss_scale=1.0 / B,
        )
    eps = 1e-5
    errors = {}

    def central(perturb):
        perturb(eps)
        up = _outer_loss(learner, batch)
        perturb(-2 * eps)
        down = _outer_loss(learner, batch)
        perturb(eps)
        return (up - down) / (2 * eps)

    for name, p in (
        ("input A", net.layers[0].A),
        ("input bias", net.layers[0].bias),
        ("hidden bias", net.layers[1].bias),
        ("readout bias", net.layers[2].bias),
    ):
        d = torch.randn(p.shape, generator=g, dtype=p.dtype)

        def move(step, p=p, d=d):
            with torch.no_grad():
                p.add_(step * d)

        analytic = float((p.grad * d).sum())
        errors[name] = (analytic, central(move))
    for name, layer in (("hidden rows", net.layers[1]), ("readout rows", net.layers[2])):
        store = layer.rows
        A_p, B_p, scale = store.pending()
        a = torch.randn(1, layer.r_out, generator=g, dtype=torch.float64)
        bvec = F.normalize(torch.randn(1, layer.r, generator=g, dtype=torch.float64), dim=1)
        analytic = float(scale * ((A_p @ a.T)[:, 0] * F00(B_p @ bvec.T)[:, 0]).sum())
        M = store.num_rows
        losses = []
        for c in (eps, -eps):
            store.append(a, bvec, c)
            losses.append(_outer_loss(learner, batch))
            store.truncate(M)
        errors[name] = (analytic, (losses[0] - losses[1]) / (2 * eps))
    print()
    for name, (ana, fd) in errors.items():
        print(
            f"{name:13s} analytic {ana:+.10e}  finite difference {fd:+.10e}  rel {abs(ana - fd) / abs(fd):.1e}"
        )
        assert abs(ana - fd) <= 1e-5 * abs(fd) + 1e-10, name


def test_first_order_is_not_the_true_gradient(batch):
    """Sanity check of the test above: first order drops terms the finite difference sees."""
    net = trained_infnet(batch)
    learner = MetaLearner(net, None, step_size=0.7, num_steps=1, first_order=True)
    xs, ys, xq, yq = (t[0] for t in batch)
    learner.task(xs, ys, xq, yq, train=True)
    d = torch.randn(net.layers[0].A.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    analytic = float((net.layers[0].A.grad * d).sum())
    single = (xs[None], ys[None], xq[None], yq[None])
    with torch.no_grad():
        net.layers[0].A.add_(1e-5 * d)
        up = learner.outer_loss(single)
        net.layers[0].A.sub_(2e-5 * d)
        down = learner.outer_loss(single)
    fd = (up - down) / 2e-5
    assert abs(analytic - fd) > 1e-3 * abs(fd)


@pytest.mark.parametrize("kind", ["fin", "mu"])
def test_finite_second_order_meta_gradient_matches_finite_differences(batch, kind):
    net = (
        trained_infnet(batch).sample(48, generator=torch.Generator().manual_seed(0))
        if kind == "fin"
        else build_model(
            "mu",
            D_IN,
            WAYS,
            width=48,
            depth=1,
            bias_alpha=1.0,
            last_bias_alpha=1.0,
            readout_zero_init=False,
            dtype=torch.float64,
            seed=0,
        )
    )
    learner = MetaLearner(net, None, step_size=0.5, num_steps=2, first_order=False)
    xs, ys, xq, yq = (t[0] for t in batch)
    learner.task(xs, ys, xq, yq, train=True)
    W = net.input_layer.weight
    d = torch.randn(W.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    # a finite π-net's accumulated gradient is projected onto span(Ω): compare along a direction
    # in that span (P g · P d = g · P d); a μP weight is not projected and d stays as drawn
    project_gradient_(W, d)
    single = (xs[None], ys[None], xq[None], yq[None])
    with torch.no_grad():
        W.add_(1e-6 * d)
        up = learner.outer_loss(single)
        W.sub_(2e-6 * d)
        down = learner.outer_loss(single)
        W.add_(1e-6 * d)
    fd = (up - down) / 2e-6
    analytic = float((W.grad * d).sum())
    assert abs(analytic - fd) <= 1e-6 * abs(fd) + 1e-10


# --------------------------------------------------------------------------- outer loop options


@pytest.mark.parametrize("kind", ["inf", "fin", "mu"])
def test_clipping_momentum_and_schedule_for_every_kind(batch, kind):
    if kind == "inf":
        net = trained_infnet(batch)
    elif kind == "fin":
        net = trained_infnet(batch).sample(64, generator=torch.Generator().manual_seed(0))
    else:
        net = build_model("mu", D_IN, WAYS, width=64, depth=1, dtype=torch.float64, seed=0)
    first = net.layers[0].A if kind == "inf" else net.layers[0].weight
    opt = make_meta_optimizer(net, 1.0, momentum=0.9, first_layer_lr_mult=1.0, last_layer_lr_mult=0.0)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[1], gamma=0.5)
    learner = MetaLearner(net, opt, sched, step_size=0.5, first_order=False, grad_clip=1e-3)
    readout_rows = net.rows_per_layer()[-1] if kind == "inf" else None
    start = first.detach().clone()
    res = learner.meta_step(batch)
    assert res["grad_norm"] > 1e-3  # so clipping acted
    # the whole update has norm <= lr * max_norm, and so has its input-layer part
    assert (first.detach() - start).norm() <= 1e-3 * (1 + 1e-6)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * opt.param_groups[0]["lr_mult"])
    learner.meta_step(batch)
    if kind == "inf":
        assert net.rows_per_layer()[-1] == readout_rows  # a frozen readout records no rows


# --------------------------------------------------------------------------- command lines


def _seed_argv(root, out, *extra):
    line = SEED_LINE.format(out=out).replace("--num-batches 1000", "--num-batches 2")
    line = line.replace("--num-test-batches 500", "--num-test-batches 2").replace(
        "--infnet_r 200", "--infnet_r 8"
    )
    line = line.replace("--dtype float16", "--dtype float32")
    return [str(root)] + line.split() + ["--no-progress", "--threads", "2"] + list(extra)


def test_seed_command_line_parses_verbatim():
    args = meta_train.parse_args(["dataset"] + SEED_LINE.format(out="results").split() + ["--use-cuda"])
    assert meta_train.model_kind_from_args(args) == "infinite"
    assert (args.hidden_size, args.infnet_r, args.depth, args.num_shots_test) == (-1, 200, 1, 1)
    assert args.Gproj_inner and args.Gproj_outer and args.adapt_readout_only and not args.first_order
    assert args.dtype == "float16" and args.last_layer_lr_mult == 0 and args.scheduler == "cosine"


def test_seed_command_line_end_to_end(omni_root, tmp_path, capsys):
    doc = meta_train.main(_seed_argv(omni_root, tmp_path))
    run = tmp_path / next(p.name for p in tmp_path.iterdir())
    assert len(doc["epochs"]) == 2 and doc["finished"]
    for name in ("config.json", "metrics.json", "metrics.csv", "model.pt", "model_last.pt"):
        assert (run / name).is_file(), name
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model_kind"] == "infinite" and cfg["num_shots_test"] == 1 and cfg["adapt_readout_only"]
    rows = doc["epochs"][-1]["rows"]
    assert rows[-1] == 8  # the readout is frozen (last-layer lr mult 0): no rows kept from the inner loops
    assert rows[0] == 8 + 2 * 2 * 8 * 10  # second order: every support and query example adds a row per step
    csv_lines = (run / "metrics.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 3
    res = meta_test.main([str(run), "--no-progress", "--checkpoint", "last"])
    assert res["num_tasks"] == 2 * 8 and 0 <= res["accuracy"] <= 1 and res["accuracy_ci95"] > 0
    assert json.loads((run / "test_results.json").read_text())["accuracy"] == res["accuracy"]
    # the saved model reproduces the last validation accuracy through --load-model-path
    again = meta_train.main(
        _seed_argv(
            omni_root, tmp_path / "v", "--load-model-path", str(run / "model_last.pt"), "--validate-only"
        )
    )
    assert again["summary"]["val_accuracy"] == pytest.approx(doc["epochs"][-1]["val_accuracy"])
    out = capsys.readouterr().out
    assert "epoch 2:" in out and "test accuracy" in out
    # a finished run is not trained again
    meta_train.main(_seed_argv(omni_root, tmp_path))
    assert "already holds a finished run" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra",
    [
        ["--dtype", "float16"],
        ["--hidden-size", "32", "--first-order"],
        [
            "--hidden-size",
            "32",
            "--mu-net",
            "--num-steps",
            "2",
            "--scheduler",
            "multistep",
            "--lr-drop-milestones",
            "0.5",
            "--meta-momentum",
            "0.9",
        ],
        ["--hidden-size", "32", "--dtype", "float64", "--normalize", "LN", "--last-bias-alpha", "1"],
    ],
)
def test_other_models_and_precisions_run(omni_root, tmp_path, extra, capsys):
    argv = _seed_argv(omni_root, tmp_path, *extra)
    argv[argv.index("--num-epochs") + 1] = "1"
    doc = meta_train.main(argv)
    run = tmp_path / next(p.name for p in tmp_path.iterdir())
    res = meta_test.main([str(run), "--no-progress", "--num-test-batches", "1"])
    assert np.isfinite(doc["epochs"][0]["train_mean_outer_loss"]) and 0 <= res["accuracy"] <= 1
    if "float16" in extra:
        assert "float16" in capsys.readouterr().err
        state = load_checkpoint(run / "model.pt")["model"]
        assert state["layers.1.rows.A"].dtype == torch.float16
        coefficients = state.get("layers.1.rows.coefficients", state.get("layers.1.rows.Amult"))
        assert coefficients.dtype == torch.float32


def test_missing_data_and_bad_options_give_clear_errors(tmp_path, omni_root, capsys):
    with pytest.raises(SystemExit) as e:
        meta_train.main(_seed_argv(tmp_path / "nowhere", tmp_path))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "images_background" in err and "downloaded" in err
    for extra, words in (
        (["--mu-net"], "positive --hidden-size"),
        (["--normalize", "BN"], "BN"),
        (["--hidden-size", "0"], "hidden-size 0"),
    ):
        with pytest.raises(SystemExit):
            meta_train.main(_seed_argv(omni_root, tmp_path, *extra))
        assert words in capsys.readouterr().err
    argv = _seed_argv(omni_root, tmp_path)
    argv.remove("--adapt-readout-only")
    with pytest.raises(SystemExit):
        meta_train.main(argv)
    assert "--adapt-readout-only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        meta_test.main([str(tmp_path / "no_run")])
    assert "config.json" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            meta_train.main(_seed_argv(omni_root, tmp_path, "--use-cuda"))
        assert "CUDA" in capsys.readouterr().err


def test_mean_and_ci95():
    mean, ci = mean_and_ci95([0.0, 1.0] * 50)
    assert mean == 0.5 and ci == pytest.approx(1.96 * np.std([0.0, 1.0] * 50, ddof=1) / 10)
