"""Plot several ``train_cifar`` runs side by side, and summarize them.

    python -m experiments.tract.plot runs/tract/cifar10_* --out compare.png

Left panel: test accuracy against epoch; right panel: training loss against epoch (log
scale). One line per run; runs that differ only in ``--seed`` share a colour and are averaged
in the printed summary (final and best test accuracy, mean ± std over seeds). Reads each run's
``metrics.json``, so it works on unfinished runs too.
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
from pathlib import Path

from experiments import cli
from experiments.cli import ConfigError

__all__ = ["load_run", "run_label", "compare_runs", "main"]

log = logging.getLogger("experiments.tract.plot")
PROG = "python -m experiments.tract.plot"


def load_run(run_dir) -> dict:
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found — is {run_dir} a train_cifar output folder?")
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"{path} is not readable JSON ({type(err).__name__}) — rerun that training command to rewrite it"
        ) from None
    if not isinstance(doc, dict) or "config" not in doc or "epochs" not in doc:
        raise ConfigError(f"{path} is not a train_cifar metrics file — pass train_cifar --out folders")
    doc["dir"] = str(run_dir)
    return doc


def _group_key(config: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in config.items() if k != "seed"))


def run_label(config: dict, with_seed: bool = True) -> str:
    method = f"TrAct l={config['l']:g}" if config.get("method") == "tract" else "normal"
    label = (
        f"{config.get('model')} {method}, {config.get('optim')} lr={config.get('lr'):g}, "
        f"{config.get('n_epochs')} ep"
    )
    return f"{label}, seed {config.get('seed')}" if with_seed else label


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def compare_runs(run_dirs, out_png, title: str | None = None) -> dict:
    """Draw the runs to ``out_png`` and return ``{"runs": [...], "groups": [...]}`` summaries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [load_run(d) for d in run_dirs]
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault(_group_key(run["config"]), []).append(run)
    colours = plt.get_cmap("tab10")

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(14, 5.2))
    for g, members in enumerate(groups.values()):
        for i, run in enumerate(members):
            epochs = [row["epoch"] for row in run["epochs"]]
            label = run_label(run["config"], with_seed=len(members) == 1)
            if len(members) > 1:
                label += f" ({len(members)} seeds)"
            # markers: a run of one epoch is one point
            kwargs = dict(
                color=colours(g % 10),
                lw=1.4,
                alpha=0.9,
                marker="o",
                markersize=4,
                label=label if i == 0 else None,
            )
            ax_acc.plot(epochs, [row["test_acc"] for row in run["epochs"]], **kwargs)
            ax_loss.plot(epochs, [row["train_loss"] for row in run["epochs"]], **kwargs)
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="test accuracy")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="training loss", yscale="log")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)

    run_rows = [
        {
            "dir": run["dir"],
            "label": run_label(run["config"]),
            "epochs": len(run["epochs"]),
            "final_test_acc": run["epochs"][-1]["test_acc"] if run["epochs"] else None,
            "best_test_acc": max((r["test_acc"] for r in run["epochs"]), default=None),
        }
        for run in runs
    ]
    group_rows = []
    for members in groups.values():
        finals = [m["epochs"][-1]["test_acc"] for m in members if m["epochs"]]
        bests = [max(r["test_acc"] for r in m["epochs"]) for m in members if m["epochs"]]
        group_rows.append(
            {
                "label": run_label(members[0]["config"], with_seed=False),
                "seeds": [m["config"].get("seed") for m in members],
                "final_test_acc": _mean_std(finals) if finals else None,
                "best_test_acc": _mean_std(bests) if bests else None,
            }
        )
    for row in group_rows:
        log.info(
            "%-60s seeds %-10s final test acc %s  best %s",
            row["label"],
            ",".join(map(str, row["seeds"])),
            row["final_test_acc"],
            row["best_test_acc"],
        )
    log.info("figure written to %s", out_png)
    return {"runs": run_rows, "groups": group_rows, "figure": str(out_png)}


def main(argv=None) -> dict:
    parser = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="train_cifar --out folders")
    parser.add_argument("--out", default="tract_compare.png", help="PNG to write")
    parser.add_argument("--title", default=None)
    cli.add_threads_arg(parser)
    args = parser.parse_args(argv)
    cli.apply_threads(args.threads)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.setLevel(logging.INFO)
    return compare_runs(args.runs, args.out, args.title)


if __name__ == "__main__":
    cli.run_main(main, PROG, sys.argv[1:])
