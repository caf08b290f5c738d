"""The finite-vs-infinite suite (docs/math.md §6): finite π-nets track the infinite one.

On the sine toy data (x in [-π, π], features (x, 1), target sin x), finite
π-nets of several widths are sampled from one infinite π-MLP and all are
trained on the same batches. The gaps between each finite net and the
infinite net (loss curve and final outputs) must fall like n^-1/2.

Two sizes of the same check:

* the default pytest run (about 15 s of CPU): the six configurations of FAST_GRID at widths
  128, 256, 512 and 1024 over 4 seeds, with the tolerances derived for that size (see
  FAST_POOLED_BAND below), and the resampled-net check at those widths;
* ``pytest -m slow``: the same configurations at widths 256, 1024 and 4096 over 6 seeds
  (SLOPE_BAND), the full grid of the original suite (lr 0.1, batch 32, layernorm on/off,
  weight decay 0/0.1, bias alpha 0/1, clipping 0/0.1 global and per-parameter, last-layer
  alpha 1/10) times momentum 0/0.9 and depth 1/2 with width 16384 added (last-layer alpha 10
  over 8 steps and with clipping only: see the note at FAST_GRID), and the resampled-net
  check at width 4096.

Run as a module to print the gaps and exponents and draw the loss curves::

    python -m tests.test_suite_mlp --plot suite.png [--depth 2 --momentum 0.9 ...]

What the exponents mean. Each gap is fitted as C·n^e over the widths: e ≈ -0.5 is the
expected n^-1/2 convergence; e ≈ 0 means the gap did not shrink with width. For the two
*training* gaps (RMS over seeds) an exponent near 0 over a wide range of widths is a bug: the
finite nets do not converge to the infinite one. For the *resampled* gap (a finite net
sampled once from the trained infinite net, median over seeds) an exponent near 0 with a few
seeds is usually not a bug: one sampled net's gap is a single heavy-tailed draw (measured at
r = 10 over 12 seeds: 0.02 to 0.41 at n = 1024, and not monotone in n for a given seed), so
with 3–6 seeds the seed-to-seed spread can hide the n^-1/2 trend over a 4–16× range of
widths; and when the trained rows cancel each other (large c·A terms summing to a small
function) the constant C is large (docs/math.md, "Notes on the conventions"). Add seeds
(``--seeds 12``) or widen the range (``--widths 256,1024,4096,16384``) before concluding
anything; a gap that stays flat there points at the sampling code.
"""

from __future__ import annotations

import argparse
import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np
import pytest
import torch

from inf.networks import FinPiMLPSample, InfMLP
from inf.optim import InfSGD
from inf.utils import clip_grad_norm_

WIDTHS = (256, 1024, 4096)  # the slow runs and the module's default
FAST_WIDTHS = (128, 256, 512, 1024)  # the default pytest run
FAST_SEEDS = tuple(range(4))
# float32: the gaps measured here are >= 1e-3, far above float32 rounding, and it halves the time
DTYPE = torch.float32


@dataclass(frozen=True)
class Config:
    r: int = 10
    depth: int = 1
    lr: float = 0.1
    batch: int = 32
    steps: int = 20
    layernorm: bool = False
    weight_decay: float = 0.0
    bias_alpha: float = 1.0
    gclip: float = 0.0
    per_param: bool = False
    last_layer_alpha: float = 1.0
    momentum: float = 0.0
    tract_lambda: float | None = None


def sine_data(n: int = 256, dtype=None):
    dtype = dtype or DTYPE
    x = torch.linspace(-math.pi, math.pi, n, dtype=dtype)[:, None]
    X = torch.cat([x, torch.ones_like(x)], 1)
    return X, torch.sin(x)


def _train_step(net, opt, X, y, cfg: Config) -> float:
    loss = 0.5 * ((net(X) - y) ** 2).sum(1).mean()
    opt.zero_grad()
    loss.backward()
    if cfg.gclip > 0:
        clip_grad_norm_(net.parameters(), cfg.gclip, per_param=cfg.per_param)
    opt.step()
    return loss.item()


def run(cfg: Config, widths=WIDTHS, seed: int = 0):
    """Train an infinite π-MLP and finite π-nets sampled from it on the same batches.

    Returns a dict with per-width loss curves, final output gaps, and the gap of
    a finite net freshly sampled from the *trained* infinite net.
    """
    torch.manual_seed(seed)
    X, y = sine_data()
    infnet = InfMLP(
        2,
        1,
        cfg.r,
        L=cfg.depth,
        last_layer_alpha=cfg.last_layer_alpha,
        bias_alpha=cfg.bias_alpha,
        layernorm=cfg.layernorm,
        tract_lambda=cfg.tract_lambda,
        dtype=DTYPE,
    )
    gen = torch.Generator().manual_seed(seed + 1)
    nets = {0: infnet}
    nets.update({n: FinPiMLPSample(infnet, n, generator=gen) for n in widths})
    opts = {
        n: InfSGD(m.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        for n, m in nets.items()
    }
    losses = {n: [] for n in nets}
    batch_gen = torch.Generator().manual_seed(seed + 2)
    for _ in range(cfg.steps):
        idx = torch.randint(0, len(X), (cfg.batch,), generator=batch_gen)
        for n, net in nets.items():
            losses[n].append(_train_step(net, opts[n], X[idx], y[idx], cfg))
    with torch.no_grad():
        out_inf = infnet(X)
        scale = out_inf.norm()
        output_gap = {n: ((nets[n](X) - out_inf).norm() / scale).item() for n in widths}
        resampled_gap = {
            n: ((FinPiMLPSample(infnet, n, generator=gen)(X) - out_inf).norm() / scale).item() for n in widths
        }
    inf_losses = np.array(losses[0])
    loss_gap = {
        n: float(np.mean(np.abs(np.array(losses[n]) - inf_losses)) / np.mean(inf_losses)) for n in widths
    }
    return {
        "losses": losses,
        "loss_gap": loss_gap,
        "output_gap": output_gap,
        "resampled_gap": resampled_gap,
        "rows": infnet.rows_per_layer(),
    }


def fitted_exponent(widths, gaps) -> float:
    """Slope of log(gap) against log(width): -0.5 for n^-1/2 convergence."""
    return float(np.polyfit(np.log(widths), np.log(np.maximum(gaps, 1e-300)), 1)[0])


def convergence(cfg: Config, seeds=tuple(range(6)), widths=WIDTHS):
    """Gaps over seeds (RMS for the training gaps, median for the resampled one) and their exponents."""
    runs = [run(cfg, widths, seed) for seed in seeds]
    summary = {}
    for key in ("loss_gap", "output_gap"):
        # root mean square over seeds: E[gap²] ∝ 1/n at leading order, and the mean of squares is
        # a steadier estimate than a median of a few heavy-tailed samples
        rms = np.array([np.sqrt(np.mean([r[key][n] ** 2 for r in runs])) for n in widths])
        summary[key] = rms
        summary[key + "_exponent"] = fitted_exponent(widths, rms)
    summary["resampled_gap"] = np.array([np.median([r["resampled_gap"][n] for r in runs]) for n in widths])
    summary["resampled_gap_exponent"] = fitted_exponent(widths, summary["resampled_gap"])
    return summary, runs


# Tolerance on the exponents of the slow runs (widths 256, 1024, 4096; 6 seeds): the RMS gap
# still carries Monte Carlo noise of roughly ±30% per width, which moves a slope fitted over a
# 16x range of widths by about ±0.2. We therefore accept slopes in [-0.85, -0.25]: an
# implementation whose gap did not shrink (slope ≈ 0) or shrank for the wrong reason would
# fail, n^-1/2 passes with margin.
SLOPE_BAND = (-0.85, -0.25)

# Tolerances of the default (fast) run: widths 128 … 1024, seeds 0–3. Derived from 12 seeds
# of every FAST_GRID configuration at these widths (issue 14, item 13), taking all 495 ways
# to choose 4 of the 12 seeds:
# * one configuration's exponents are too noisy at this size to be held to a band around
#   -0.5 (the mean of its loss and output exponents ranged over [-1.28, +0.22]); the exponent
#   averaged over the six configurations ranged over [-0.96, -0.24] (median -0.52). We
#   require it in FAST_POOLED_BAND: a gap that does not shrink (exponent ≈ 0) fails.
# * per configuration, the mean of the two exponents must stay below FAST_MAX_EXPONENT (a gap
#   that grows with the width fails; observed maximum +0.22), and the RMS loss gap at
#   n = 1024 below FAST_MAX_LOSS_GAP (observed 0.002–0.079; a finite net that does not
#   track the infinite one has a loss gap of order 1).
FAST_POOLED_BAND = (-1.1, -0.15)
FAST_MAX_EXPONENT = 0.3
FAST_MAX_LOSS_GAP = 0.15

FAST_GRID = [
    Config(),
    Config(depth=2, momentum=0.9),
    Config(layernorm=True, weight_decay=0.1),
    Config(bias_alpha=0.0, gclip=0.1, per_param=False),
    Config(gclip=0.1, per_param=True, last_layer_alpha=10.0, steps=8),
    # TrAct on the input layer (docs/math.md §7): its input-side correction commutes with the projection
    Config(tract_lambda=0.1),
]
# Last-layer alpha 10 at lr 0.1: without clipping the infinite net itself diverges to NaN within 20
# steps; with clipping it trains but sits at the edge of stability, where trajectories separate
# exponentially: after 20 steps single seeds show output gaps such as 0.03 / 0.10 / 0.39 at
# n = 256 / 1024 / 4096, while after 3 and 8 steps the RMS gaps fall with exponents -0.52 and
# -0.53. Those configurations are therefore checked over 8 steps, and unclipped ones not at all.


def full_grid():
    for ln, wd, ba, (clip, pp), lla, mom, depth in itertools.product(
        (False, True),
        (0.0, 0.1),
        (0.0, 1.0),
        ((0.0, False), (0.1, False), (0.1, True)),
        (1.0, 10.0),
        (0.0, 0.9),
        (1, 2),
    ):
        if lla == 10.0 and clip == 0.0:
            continue  # diverges in infinite width too (see above)
        yield Config(
            layernorm=ln,
            weight_decay=wd,
            bias_alpha=ba,
            gclip=clip,
            per_param=pp,
            last_layer_alpha=lla,
            momentum=mom,
            depth=depth,
            steps=8 if lla == 10.0 else 20,
        )


def _check(summary, cfg):
    lo, hi = SLOPE_BAND
    for key in ("loss_gap", "output_gap"):
        slope = summary[key + "_exponent"]
        assert lo <= slope <= hi, (
            f"{cfg}: {key} exponent {slope:.2f} outside {SLOPE_BAND}; gaps {summary[key]}"
        )


def _cfg_id(c: Config) -> str:
    return "-".join(f"{k}={v}" for k, v in asdict(c).items() if v != getattr(Config(), k)) or "default"


def test_session_is_pinned_to_one_thread():
    """conftest.py pins the test session to one thread (issue 14, item 13), unless
    PILIMIT_TEST_THREADS says otherwise."""
    import os

    expected = int(os.environ.get("PILIMIT_TEST_THREADS", "1"))
    assert torch.get_num_threads() == expected
    assert os.environ["OMP_NUM_THREADS"] == str(expected)


@pytest.fixture(scope="module")
def fast_summaries():
    return [convergence(cfg, seeds=FAST_SEEDS, widths=FAST_WIDTHS)[0] for cfg in FAST_GRID]


@pytest.mark.parametrize("index", range(len(FAST_GRID)), ids=[_cfg_id(c) for c in FAST_GRID])
def test_finite_tracks_infinite(index, fast_summaries):
    """Default run, one configuration: widths 128 … 1024, 4 seeds (tolerances at FAST_POOLED_BAND)."""
    summary, cfg = fast_summaries[index], FAST_GRID[index]
    exponent = 0.5 * (summary["loss_gap_exponent"] + summary["output_gap_exponent"])
    assert exponent <= FAST_MAX_EXPONENT, (
        f"{cfg}: the gaps grow with the width (mean exponent {exponent:.2f}); "
        f"loss gaps {summary['loss_gap']}, output gaps {summary['output_gap']}"
    )
    assert summary["loss_gap"][-1] <= FAST_MAX_LOSS_GAP, (
        f"{cfg}: RMS loss gap {summary['loss_gap'][-1]:.3f} at n = {FAST_WIDTHS[-1]}"
    )


def test_finite_tracks_infinite_pooled_exponent(fast_summaries):
    """Default run: averaged over the six configurations, the gaps fall like a power of n in
    FAST_POOLED_BAND (measured with seeds 0–3: about -0.75)."""
    exponents = [0.5 * (s["loss_gap_exponent"] + s["output_gap_exponent"]) for s in fast_summaries]
    pooled = float(np.mean(exponents))
    lo, hi = FAST_POOLED_BAND
    assert lo <= pooled <= hi, (pooled, dict(zip(map(_cfg_id, FAST_GRID), np.round(exponents, 2))))


@pytest.mark.slow
@pytest.mark.parametrize("cfg", FAST_GRID, ids=_cfg_id)
def test_finite_tracks_infinite_wide(cfg):
    """The same configurations at widths 256, 1024, 4096 over 6 seeds, held to SLOPE_BAND."""
    summary, _ = convergence(cfg)
    _check(summary, cfg)


def test_finite_net_sampled_from_trained_net_fast():
    """Default run: a finite net sampled from a *trained* infinite net (r = 5) reproduces its
    outputs, median relative error over seeds 0–3 at most 0.3 at n = 1024 and smaller than at
    n = 128. Measured over 12 seeds (all 495 choices of 4): medians 0.03–0.25 at n = 1024,
    0.12–0.63 at n = 128 (with seeds 0–3: 0.17 / 0.14 / 0.14 / 0.07 at n = 128 … 1024). A
    sampler that got a scale or a projection wrong gives errors of order 1."""
    summary, _ = convergence(Config(r=5, steps=20), seeds=FAST_SEEDS, widths=FAST_WIDTHS)
    gaps = summary["resampled_gap"]
    assert gaps[-1] <= 0.3, gaps
    assert gaps[-1] < gaps[0], gaps


@pytest.mark.slow
def test_finite_net_sampled_from_trained_net():
    """A finite net sampled from a *trained* infinite net reproduces its outputs: relative error at
    most 0.06 at n = 4096 (median over 6 seeds), falling with n.

    Measured here: r = 5, depth 1: medians 0.13 / 0.06 / 0.03 at n = 256 / 1024 / 4096. The error
    grows with r and depth (r = 10: ≈ 0.05–0.10 at 4096; depth 2, r = 5: ≈ 0.09) because the
    input layer's unit columns make |g|² ≈ r|x|²/d_in, so larger r means larger effective steps
    and more rows whose sampling errors add up while their contributions cancel."""
    summary, _ = convergence(Config(r=5, steps=20), widths=WIDTHS)
    gaps = summary["resampled_gap"]
    assert gaps[-1] <= 0.06, gaps
    assert gaps[-1] < gaps[0], gaps


@pytest.mark.slow
@pytest.mark.parametrize("cfg", list(full_grid()), ids=str)
def test_finite_tracks_infinite_full_grid(cfg):
    summary, _ = convergence(cfg, widths=WIDTHS + (16384,))
    _check(summary, cfg)


def plot(cfg: Config, path: str, seed: int = 0, widths=WIDTHS):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = run(cfg, widths, seed)
    fig, ax = plt.subplots(figsize=(12, 6.5))
    for n in widths:
        ax.plot(result["losses"][n], marker="o", markersize=4, label=f"finite n={n}", alpha=0.8)
    ax.plot(result["losses"][0], "k--", marker="s", markersize=4, label="infinite", linewidth=2)
    ax.set_xlabel("step", fontsize=14)
    ax.set_ylabel("training loss", fontsize=14)
    ax.set_yscale("log")
    ax.set_title("finite π-nets vs the infinite π-MLP (sine toy)", fontsize=15)
    ax.tick_params(labelsize=12)
    ax.legend(fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description="finite-vs-infinite suite on the sine toy data")
    p.add_argument("--plot", metavar="FILE", help="draw the loss curves to FILE (PNG)")
    for field, default in asdict(Config()).items():
        flag = "--" + field.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true")
        else:
            p.add_argument(flag, type=type(default) if default is not None else float, default=default)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--widths", default=",".join(map(str, WIDTHS)), help="comma-separated widths of the finite nets"
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(max(1, args.threads))
    try:
        widths = tuple(int(w) for w in args.widths.split(","))
    except ValueError:
        p.error(f"--widths must be comma-separated integers, got {args.widths!r}")
    if len(widths) < 2 or min(widths) < 1 or args.seeds < 1:
        p.error("need at least two positive --widths and --seeds >= 1")
    cfg = Config(**{k: getattr(args, k) for k in asdict(Config())})
    summary, _ = convergence(cfg, seeds=tuple(range(args.seeds)), widths=widths)
    print(cfg)
    for key in ("loss_gap", "output_gap", "resampled_gap"):
        gaps = ", ".join(f"n={n}: {g:.4f}" for n, g in zip(widths, summary[key]))
        print(f"{key:14s} {gaps}   exponent {summary[key + '_exponent']:.2f}")
    print(
        "exponent: the gap fitted as C·n^e; -0.5 is the expected n^-1/2. Training gaps (RMS "
        "over seeds) near 0: the finite nets do not converge, a bug. Resampled gap (median of "
        "single sampled nets) near 0 with few seeds: usually the seed-to-seed spread of one "
        "draw hiding the trend; rerun with more --seeds or a wider --widths range before "
        "suspecting the sampler (see this module's docstring)."
    )
    if args.plot:
        plot(cfg, args.plot, widths=widths)
        print(f"loss curves written to {args.plot}")


if __name__ == "__main__":
    main()
