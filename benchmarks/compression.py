"""Row compression (inf/compress.py): error vs kept rows, training under a row budget,
finite π-nets sampled from compressed nets. Results go to a JSON file; ``plot`` draws
the figures of docs/compression.md from it.

1. ``error``: InfMLP (depth 2, quickstart settings) trained exactly on digits and on
   CIFAR-format data at r = 32, 128, 400; every infinite layer is then compressed to
   50 % … 2 % of its rows with greedy and with randomly pivoted Cholesky landmarks.
   Reported per kept fraction: relative RKHS error ε/‖h‖_H (mean and max over layers),
   relative error of the test outputs, test accuracy change, compression time.
2. ``train``: digits, r = 64, depth 2, quickstart settings (lr 2, batch 16, per-parameter
   clipping at 1, first-layer lr × 0.5), exact and with a RowBudget; test accuracy, step
   time per step, rows, row-storage bytes, total time.
3. ``finite``: finite π-nets of width n = 256/1024/4096 sampled from a compressed net
   and from the uncompressed one; relative output gap to their infinite net.

    python -m benchmarks.compression error  [--data CIFAR_DIR] [--ranks 32 128 400]
    python -m benchmarks.compression train  [--epochs 30 --seeds 0 1 2 --max-rows 4000]
    python -m benchmarks.compression finite
    python -m benchmarks.compression plot   (writes docs/img/compression_*.png)

All runs use one torch thread unless --threads says otherwise.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks._util import add_common_args, apply_threads, machine_line, peak_rss_bytes, rss_bytes
from inf.compress import METHODS, RowBudget, compress_layer, infinite_layers, nested_compressions
from inf.networks import FinPiMLPSample, InfMLP
from inf.optim import InfSGD
from inf.utils import clip_grad_norm_, pi_param_groups

FRACTIONS = (0.5, 0.25, 0.1, 0.05, 0.02)
DEFAULT_JSON = "benchmarks/results/compression.json"


# ----------------------------------------------------------------------- data
def _standardize(Xtr, Xte):
    mean, std = Xtr.mean(0), Xtr.std(0).clamp_min(1e-3)
    d = Xtr.shape[1]
    return (Xtr - mean) / std / math.sqrt(d), (Xte - mean) / std / math.sqrt(d)


def digits_vectors():
    """Digits (experiments/data/digits.py, 8×8, one channel) as standardized 64-vectors of norm ≈ 1."""
    from experiments.data.digits import load_digits_split

    xtr, ytr, xte, yte = load_digits_split(size=8)
    Xtr, Xte = xtr[:, 0].reshape(len(xtr), -1).double(), xte[:, 0].reshape(len(xte), -1).double()
    Xtr, Xte = _standardize(Xtr, Xte)
    return Xtr.float(), ytr, Xte.float(), yte


def cifar_vectors(root: str | None, n_train: int, n_test: int, seed: int = 0):
    """CIFAR-10 from ``root`` (the python version), or synthetic CIFAR-format files, as
    standardized 3072-vectors; the first ``n_train``/``n_test`` images."""
    from experiments.data.cifar import load_cifar10

    tmp = None
    if root is None:
        from experiments.data.synthetic import write_synthetic_cifar10

        tmp = tempfile.TemporaryDirectory()
        root = write_synthetic_cifar10(tmp.name, n_train=n_train, n_test=n_test, seed=seed)
    xtr, ytr = load_cifar10(root, train=True)
    xte, yte = load_cifar10(root, train=False)
    xtr, ytr, xte, yte = xtr[:n_train], ytr[:n_train], xte[:n_test], yte[:n_test]
    Xtr, Xte = _standardize(xtr.reshape(len(xtr), -1).double(), xte.reshape(len(xte), -1).double())
    if tmp is not None:
        tmp.cleanup()
    return Xtr.float(), ytr.long(), Xte.float(), yte.long()


# ------------------------------------------------------------------- training
def make_net(d_in, r, seed, depth=2):
    torch.manual_seed(seed)
    net = InfMLP(d_in, 10, r, L=depth, first_layer_alpha=1.0, last_layer_alpha=1.0, bias_alpha=0.5)
    opt = InfSGD(pi_param_groups(net, lr=2.0, first_layer_lr_mult=0.5), lr=2.0)
    return net, opt


@torch.no_grad()
def accuracy(net, X, y, bs=512):
    return sum(
        (net(X[i : i + bs]).argmax(1) == y[i : i + bs]).sum().item() for i in range(0, len(X), bs)
    ) / len(X)


@torch.no_grad()
def outputs(net, X, bs=512):
    return torch.cat([net(X[i : i + bs]) for i in range(0, len(X), bs)])


def train(net, opt, Xtr, ytr, epochs, seed, budget=None, batch=16, progress="", test=None):
    """Quickstart's loop; returns per-step wall times (compression included), rows, compression
    reports and (with ``test = (X, y)``) the test accuracy after every epoch (not timed)."""
    gen = torch.Generator().manual_seed(seed)
    steps = math.ceil(len(Xtr) / batch)
    times, rows, comp, accs = [], [], [], []
    for epoch in range(epochs):
        order = torch.randperm(len(Xtr), generator=gen)
        for i in range(steps):
            idx = order[i * batch : (i + 1) * batch]
            t = time.perf_counter()
            loss = F.cross_entropy(net(Xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            clip_grad_norm_(net.parameters(), 1.0, per_param=True)
            opt.step()
            if budget is not None:
                reps = budget()
                if reps:
                    comp.append({"step": len(times), "reports": [r.as_dict() for r in reps]})
            times.append(time.perf_counter() - t)
            rows.append(net.rows_per_layer())
        if test is not None:
            accs.append(accuracy(net, *test))
        if progress:
            print(
                f"  {progress} epoch {epoch + 1}/{epochs}: rows {net.rows_per_layer()} "
                f"time {sum(times):.1f}s" + (f" test accuracy {accs[-1]:.4f}" if accs else ""),
                file=sys.stderr,
                flush=True,
            )
    return {"step_times": times, "rows": rows, "compressions": comp, "epoch_accuracy": accs}


# ---------------------------------------------------------------------- parts
def part_error(args):
    out = []
    datasets = [("digits", lambda: digits_vectors(), args.digits_epochs)]
    name = "CIFAR-10" if args.data else "synthetic CIFAR-format"
    datasets.append(
        (name, lambda: cifar_vectors(args.data, args.cifar_train, args.cifar_test), args.cifar_epochs)
    )
    for dname, load, epochs in datasets:
        Xtr, ytr, Xte, yte = load()
        for r in args.ranks:
            net, opt = make_net(Xtr.shape[1], r, seed=0)
            t = time.perf_counter()
            train(net, opt, Xtr, ytr, epochs, seed=0, progress=f"{dname} r={r}")
            t_train = time.perf_counter() - t
            ref = outputs(net, Xte)
            acc = accuracy(net, Xte, yte)
            entry = {
                "data": dname,
                "r": r,
                "epochs": epochs,
                "rows": net.rows_per_layer(),
                "train_seconds": t_train,
                "accuracy": acc,
                "results": [],
            }
            for method in METHODS:
                per_layer = {}
                for lname, layer in infinite_layers(net):
                    st = layer.rows
                    M = st.num_rows
                    sizes = [max(1, round(f * M)) for f in FRACTIONS]
                    per_layer[lname] = nested_compressions(
                        st.A,
                        st.coefficients.detach(),
                        st.B,
                        sizes,
                        method=method,
                        block=64,
                        generator=torch.Generator().manual_seed(0),
                        name=lname,
                    )
                for j, frac in enumerate(FRACTIONS):
                    comp = copy.deepcopy(net)
                    for lname, layer in infinite_layers(comp):
                        A_new, c_new, B_new, _ = per_layer[lname][j]
                        layer.rows.set_rows(A_new, c_new, B_new)
                    o = outputs(comp, Xte)
                    reps = [per_layer[n][j][3] for n in per_layer]
                    row = {
                        "method": method,
                        "fraction": frac,
                        "rel_eps": [rp.rel_eps for rp in reps],
                        "out_rel_err": ((o - ref).norm() / ref.norm()).item(),
                        "accuracy": accuracy(comp, Xte, yte),
                        "seconds": [rp.seconds for rp in reps],
                    }
                    entry["results"].append(row)
                    print(
                        f"{dname:>22} r={r:<4} {method:>10} keep {frac:5.0%}: ε/‖h‖ "
                        f"{', '.join(f'{e:.4f}' for e in row['rel_eps'])}  output err "
                        f"{row['out_rel_err']:.4f}  acc {row['accuracy']:.4f} (exact {acc:.4f})",
                        flush=True,
                    )
            out.append(entry)
    return out


def part_train(args):
    Xtr, ytr, Xte, yte = digits_vectors()
    runs = []
    for seed in args.seeds:
        for mode in args.modes:
            net, opt = make_net(Xtr.shape[1], args.r, seed=seed)
            budget = None
            if mode != "exact":
                budget = RowBudget(
                    net,
                    max_rows=args.max_rows,
                    keep_fraction=args.keep_fraction,
                    optimizer=opt,
                    method=mode.split("-", 1)[1],
                    seed=seed,
                    dtype=torch.float64 if args.budget_float64 else torch.float32,
                )
            rss0 = rss_bytes()
            h = train(
                net,
                opt,
                Xtr,
                ytr,
                args.epochs,
                seed=seed,
                budget=budget,
                progress=f"{mode} seed {seed}",
                test=(Xte, yte),
            )
            total = sum(h["step_times"])
            bytes_rows = sum(
                layer.rows.num_rows * (layer.r + layer.r_out + 1) * 4 for _, layer in infinite_layers(net)
            )
            run = {
                "seed": seed,
                "mode": mode,
                "accuracy": accuracy(net, Xte, yte),
                "total_seconds": total,
                "final_rows": net.rows_per_layer(),
                "row_bytes": bytes_rows,
                "rss_growth": None if rss0 is None else rss_bytes() - rss0,
                **h,
            }
            if budget is not None:
                run["budget"] = budget.metrics()
            runs.append(run)
            print(
                f"{mode:>7} seed {seed}: accuracy {run['accuracy']:.4f}, total {total:.1f}s, "
                f"rows {run['final_rows']}",
                flush=True,
            )
            if mode != "exact" and args.save_net:
                torch.save(net.state_dict(), args.save_net)
    return {
        "r": args.r,
        "epochs": args.epochs,
        "max_rows": args.max_rows,
        "keep_fraction": args.keep_fraction,
        "runs": runs,
        "peak_rss": peak_rss_bytes(),
        "budget_float64": args.budget_float64,
    }


def part_finite(args):
    Xtr, ytr, Xte, yte = digits_vectors()
    net, opt = make_net(Xtr.shape[1], args.r, seed=0)
    train(net, opt, Xtr, ytr, args.finite_epochs, seed=0, progress="finite: exact training")
    comp = copy.deepcopy(net)
    reps = []
    for _name, layer in infinite_layers(comp):
        reps.append(
            compress_layer(
                layer,
                max(1, round(args.finite_fraction * layer.rows.num_rows)),
                method="rpcholesky",
                generator=torch.Generator().manual_seed(0),
            ).as_dict()
        )
    res = {
        "r": args.r,
        "rows": net.rows_per_layer(),
        "compressed_rows": comp.rows_per_layer(),
        "fraction": args.finite_fraction,
        "reports": reps,
        "widths": {},
    }
    ref, ref_c = outputs(net, Xte), outputs(comp, Xte)
    res["compression_output_gap"] = ((ref_c - ref).norm() / ref.norm()).item()
    for n in args.widths:
        gaps, gaps_c = [], []
        for s in range(args.finite_seeds):
            fin = FinPiMLPSample(net, n, generator=torch.Generator().manual_seed(s))
            fin_c = FinPiMLPSample(comp, n, generator=torch.Generator().manual_seed(s))
            gaps.append(((outputs(fin, Xte) - ref).norm() / ref.norm()).item())
            gaps_c.append(((outputs(fin_c, Xte) - ref_c).norm() / ref_c.norm()).item())
        res["widths"][str(n)] = {"exact": gaps, "compressed": gaps_c}
        print(
            f"n={n:5d}: finite-vs-infinite gap, uncompressed {sum(gaps) / len(gaps):.4f}, "
            f"compressed {sum(gaps_c) / len(gaps_c):.4f}",
            flush=True,
        )
    return res


# ----------------------------------------------------------------------- plots
def _fig(width_px=1400, height_px=560, ncols=2):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dpi = 100
    fig, axes = plt.subplots(1, ncols, figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    return plt, fig, axes


def _save(plt, fig, path):
    fig.tight_layout()
    tmp = str(path) + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    from PIL import Image  # matplotlib's own dependency; a 256-colour palette keeps plots small

    Image.open(tmp).convert("RGB").quantize(256).save(tmp, optimize=True)
    os.replace(tmp, path)
    print(f"wrote {path} ({os.path.getsize(path) / 1024:.0f} KB)")


def summarize_train(tr) -> list[dict]:
    """Per mode: accuracy (final and mean of the last 5 epochs), time, rows, step-time growth."""
    import statistics as st

    by_mode = {}
    for run in tr["runs"]:
        by_mode.setdefault(run["mode"], []).append(run)
    exact = {r["seed"]: r for r in by_mode.get("exact", [])}
    out = []
    for mode, runs in by_mode.items():
        row = {
            "mode": mode,
            "seeds": sorted(r["seed"] for r in runs),
            "accuracy": st.mean(r["accuracy"] for r in runs),
            "accuracy_last5": (
                st.mean(st.mean(r["epoch_accuracy"][-5:]) for r in runs)
                if all(r.get("epoch_accuracy") for r in runs)
                else None
            ),
            "total_seconds": st.mean(r["total_seconds"] for r in runs),
            "final_rows": runs[0]["final_rows"],
            "row_bytes": st.mean(r["row_bytes"] for r in runs),
        }
        ratios = [exact[r["seed"]]["total_seconds"] / r["total_seconds"] for r in runs if r["seed"] in exact]
        if ratios and mode != "exact":
            row["speedup_vs_exact"] = ratios
        growth, comp_s = [], []
        for r in runs:
            steps = [c["step"] for c in r["compressions"]]
            t = r["step_times"]
            if len(steps) >= 3:
                first = st.mean(t[steps[0] : steps[1]])
                last = st.mean(t[steps[-2] : steps[-1]])
                growth.append(last / first)
            comp_s.append(sum(rep["seconds"] for c in r["compressions"] for rep in c["reports"]))
            if "budget" in r:
                row.setdefault("rel_eps_sum", []).append(r["budget"]["rel_eps_sum"])
                row.setdefault("compressions", []).append(r["budget"]["compressions"])
        if growth:
            row["cycle_time_last_over_first"] = growth
            row["compress_seconds"] = comp_s
        out.append(row)
    return out


def plot(results, outdir):
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    if "error" in results:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker

        datas = list(dict.fromkeys(e["data"] for e in results["error"]))
        fig, axes = plt.subplots(len(datas), 2, figsize=(14, 5 * len(datas)), dpi=100, squeeze=False)
        styles = {"greedy": ":", "rpcholesky": "--", "adaptive": "-"}
        colors = {}
        for entry in results["error"]:
            row = datas.index(entry["data"])
            color = colors.setdefault(entry["r"], f"C{len(colors)}")
            for method in METHODS:
                pts = [x for x in entry["results"] if x["method"] == method]
                if not pts:
                    continue
                fr = [100 * x["fraction"] for x in pts]
                label = f"r={entry['r']}, {method}"
                axes[row, 0].plot(
                    fr, [max(x["rel_eps"]) for x in pts], styles[method], color=color, marker="o", label=label
                )
                axes[row, 1].plot(
                    fr,
                    [max(x["out_rel_err"], 1e-6) for x in pts],
                    styles[method],
                    color=color,
                    marker="o",
                    label=label,
                )
            for col, yl in enumerate(
                ["relative RKHS error ε/‖h‖_H (worst layer)", "relative error of the test outputs"]
            ):
                ax = axes[row, col]
                ax.set(
                    xscale="log",
                    yscale="log",
                    xlabel="rows kept (% of the trained net's rows)",
                    ylabel=yl,
                    title=f"{entry['data']} ({entry['epochs']} epochs of exact training)",
                )
                ax.grid(True, which="both", alpha=0.3)
        for ax in axes.flat:
            ticks = [100 * f for f in FRACTIONS]
            ax.set_xticks(ticks, [f"{t:g} %" for t in ticks])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.legend(fontsize=8, ncol=3)
        fig.suptitle(
            "One compression of every infinite layer of a trained InfMLP (depth 2): error vs rows kept"
        )
        tmp_fig = (plt, fig)
        _save(*tmp_fig, outdir / "compression_error.png")
    if "train" in results:
        tr = results["train"]
        for row in summarize_train(tr):
            print(json.dumps(row))
        plt, fig, axes = _fig(1800, 560, 3)
        modes = list(dict.fromkeys(r["mode"] for r in tr["runs"]))
        dashes = ["-", "--", ":"]
        for run in tr["runs"]:
            color = f"C{modes.index(run['mode'])}"
            ls = dashes[run["seed"] % 3]
            label = f"{run['mode']} seed {run['seed']}"
            t = torch.tensor(run["step_times"]) * 1e3
            k = 50
            smooth = t.unfold(0, k, k).mean(1) if len(t) >= k else t
            x = [k * (i + 0.5) for i in range(len(smooth))]
            axes[0].plot(x, smooth, ls, color=color, label=label)
            axes[1].plot([sum(rw) for rw in run["rows"]], ls, color=color, label=label)
            if run.get("epoch_accuracy"):
                axes[2].plot(
                    range(1, len(run["epoch_accuracy"]) + 1),
                    run["epoch_accuracy"],
                    ls,
                    color=color,
                    marker=".",
                    label=label,
                )
        axes[0].set(
            xlabel="step", yscale="log", ylabel="step time, ms (mean over 50 steps, compressions included)"
        )
        axes[1].set(xlabel="step", yscale="log", ylabel="rows, all infinite layers")
        axes[2].set(xlabel="epoch", ylabel="test accuracy")
        for ax in axes:
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(
            f"Digits, r={tr['r']}, depth 2, {tr['epochs']} epochs: exact vs RowBudget(max_rows="
            f"{tr['max_rows']}, keep_fraction={tr['keep_fraction']})"
        )
        _save(plt, fig, outdir / "compression_training.png")
    if "finite" in results:
        fi = results["finite"]
        plt, fig, axes = _fig(1200, 520, 1)
        ns = sorted(int(n) for n in fi["widths"])
        for key, label in (
            ("exact", "sampled from the exact net, gap to it"),
            ("compressed", f"sampled from the net compressed to {fi['fraction']:.0%}, gap to it"),
        ):
            m = [sum(fi["widths"][str(n)][key]) / len(fi["widths"][str(n)][key]) for n in ns]
            axes.plot(ns, m, marker="o", label=label)
        g0 = sum(fi["widths"][str(ns[0])]["exact"]) / len(fi["widths"][str(ns[0])]["exact"])
        axes.plot(ns, [g0 * (ns[0] / n) ** 0.5 for n in ns], ":", color="gray", label="∝ n^-½")
        axes.set(
            xscale="log",
            yscale="log",
            xlabel="width n of the finite π-net",
            ylabel="relative output gap to the infinite net (test set)",
        )
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
        fig.suptitle(f"Finite π-nets sampled from an infinite net (digits, r={fi['r']})")
        _save(plt, fig, outdir / "compression_finite.png")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["error", "train", "finite", "plot"])
    p.add_argument(
        "--json",
        nargs="+",
        default=[DEFAULT_JSON],
        help="results file (read, updated, written); plot reads and merges several",
    )
    p.add_argument(
        "--data", default=None, help="CIFAR-10 python-version folder; synthetic CIFAR-format if absent"
    )
    p.add_argument("--ranks", type=int, nargs="+", default=[32, 128, 400])
    p.add_argument("--digits-epochs", type=int, default=3)
    p.add_argument("--cifar-epochs", type=int, default=2)
    p.add_argument("--cifar-train", type=int, default=2000)
    p.add_argument("--cifar-test", type=int, default=500)
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--modes",
        nargs="+",
        default=["exact", "budget-adaptive"],
        choices=["exact"] + [f"budget-{m}" for m in METHODS],
    )
    p.add_argument("--max-rows", type=int, default=4000)
    p.add_argument("--keep-fraction", type=float, default=0.25)
    p.add_argument("--save-net", default=None)
    p.add_argument("--budget-float64", action="store_true", help="compressions computed in float64")
    p.add_argument("--finite-epochs", type=int, default=3)
    p.add_argument("--finite-fraction", type=float, default=0.1)
    p.add_argument("--finite-seeds", type=int, default=4)
    p.add_argument("--widths", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--img", default="docs/img")
    add_common_args(p)
    args = p.parse_args(argv)
    apply_threads(args.threads)
    if args.part == "plot":
        results = {}
        for f in args.json:
            for key, val in json.loads(Path(f).read_text()).items():
                if key == "train" and "train" in results:
                    results["train"]["runs"] += val["runs"]
                else:
                    results[key] = val
        plot(results, args.img)
        return results
    path = Path(args.json[0])
    results = json.loads(path.read_text()) if path.exists() else {}
    print(machine_line())
    part = {"error": part_error, "train": part_train, "finite": part_finite}[args.part](args)
    if (
        args.part == "train"
        and "train" in results
        and results["train"].get("r") == part["r"]
        and all(results["train"].get(k) == part[k] for k in ("epochs", "max_rows", "keep_fraction"))
    ):
        # runs of other seeds/modes measured separately are kept
        done = {(r["seed"], r["mode"]) for r in part["runs"]}
        part["runs"] = [r for r in results["train"]["runs"] if (r["seed"], r["mode"]) not in done] + part[
            "runs"
        ]
    results[args.part] = part
    results["machine"] = machine_line()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results))
    os.replace(tmp, path)
    return results


if __name__ == "__main__":
    main()
