"""Run folders: where a run's files go, and how they are written and read back.

* **Run folders never overwrite.** :func:`run_dir` names a run's own subfolder of ``--save-dir``
  from its configuration (a readable prefix and a hash of every option that changes the
  result), so two different runs given the same ``--save-dir`` land in different folders; a
  folder that already holds a run is reused only with ``--overwrite`` (or to resume it).
* **Atomic writes.** :func:`atomic_write` writes a temporary sibling ``.NAME.tmp<PID>``, fsyncs
  it and renames it over the file: a reader, or a crash, sees the old file or the new one. A
  crash can leave the temporary behind; the next write into the folder, and every resume,
  removes temporaries whose process no longer runs (:func:`clean_stale_temporaries`).
* **One checkpoint format.** :func:`save_checkpoint` adds ``format`` and ``version``;
  :func:`load_checkpoint` reads only tensors and plain data (``torch.load(weights_only=True)``:
  a crafted file cannot run code) and reports a bad file in one line.
* **Metrics.** :class:`MetricsLog` keeps one row per epoch and writes ``metrics.csv``,
  ``metrics.json`` (``config``, ``summary``, ``epochs``) and ``curves.png``; :func:`plot_curves`
  draws every curve with markers, so a one-epoch run shows its points.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch

from experiments.cli import ConfigError
from inf.fileio import atomic_write, clean_stale_temporaries

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "CHECKPOINT_NAME",
    "METRICS_CSV",
    "METRICS_JSON",
    "CURVES_PNG",
    "atomic_write",
    "write_json",
    "write_csv",
    "clean_stale_temporaries",
    "config_hash",
    "run_name",
    "run_dir",
    "RunExists",
    "save_checkpoint",
    "load_checkpoint",
    "safe_load",
    "MetricsLog",
    "plot_curves",
]

log = logging.getLogger("experiments")

CHECKPOINT_FORMAT = "pilimit-experiment-checkpoint"
CHECKPOINT_VERSION = 2
# version 1 wrote ``format = "pilimit-experiment-checkpoint/1"`` (same layout), the TrAct
# program ``format = 1``; both still load
_LEGACY_FORMATS = {"pilimit-experiment-checkpoint/1": 1, 1: 1}
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_CSV = "metrics.csv"
METRICS_JSON = "metrics.json"
CURVES_PNG = "curves.png"


# =========================================================================== atomic files


def write_json(path, doc) -> None:
    """``doc`` as indented JSON, atomically (non-JSON values written with ``str``)."""
    text = json.dumps(doc, indent=1, default=str)
    atomic_write(path, lambda fh: fh.write(text.encode()))


def write_csv(path, rows: list[dict], columns: Iterable[str] = ()) -> None:
    """``rows`` as CSV, atomically: ``columns`` first (those present), then any other keys.

    ``None`` is written as an empty cell, lists as JSON.
    """
    names = [c for c in columns if any(c in row for row in rows)]
    for row in rows:
        names += [k for k in row if k not in names]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=names, lineterminator="\n", restval="")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {k: "" if v is None else json.dumps(v) if isinstance(v, list) else v for k, v in row.items()}
        )
    atomic_write(path, lambda fh: fh.write(text.getvalue().encode()))


# =========================================================================== run folders


def config_hash(config: dict, ignore: Iterable[str] = (), length: int = 8) -> str:
    """A short hash of ``config`` without the ``ignore`` keys (stable across processes)."""
    ignore = set(ignore)
    key = {k: v for k, v in sorted(config.items()) if k not in ignore}
    text = json.dumps(key, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:length]


def run_name(prefix: str, config: dict, ignore: Iterable[str] = ()) -> str:
    """``<prefix>_<hash of the configuration>`` with the prefix made file-name safe."""
    safe = re.sub(r"[^A-Za-z0-9._=+-]+", "-", prefix).strip("-") or "run"
    return f"{safe}_{config_hash(config, ignore)}"


class RunExists(ConfigError):
    """The run folder already holds a run (and neither ``--overwrite`` nor a resume asked for it)."""


def run_dir(
    save_dir,
    name: str,
    *,
    overwrite: bool = False,
    resume: bool = False,
    marker: str = METRICS_JSON,
    flag: str = "--save-dir",
) -> Path:
    """The run folder ``save_dir/name``, created; stale temporaries in it are removed.

    If it already holds a run (``marker`` exists) it is used only with ``resume`` (continuing
    that run) or ``overwrite`` (its files are replaced as the new run writes them); otherwise
    :class:`RunExists` says what to do.
    """
    folder = Path(save_dir) / name
    if (folder / marker).exists() and not (overwrite or resume):
        raise RunExists(
            f"{folder} already holds a run with these options — pass --overwrite to "
            f"replace it, or choose another {flag}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(folder)
    return folder


# =========================================================================== checkpoints


def save_checkpoint(path, state: dict) -> None:
    """``torch.save`` of ``state`` plus ``format``/``version``, written atomically.

    Keep ``state`` to tensors, numbers, strings, lists, tuples and dicts: that is all
    :func:`load_checkpoint` reads back.
    """
    doc = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    atomic_write(path, lambda fh: torch.save(doc, fh))


def safe_load(path, what: str = "checkpoint", flag: str | None = None, map_location="cpu"):
    """``torch.load(path, weights_only=True)`` with one-line errors.

    A missing, damaged or foreign file raises :class:`ConfigError` naming ``flag`` (the option
    that gave the path). A file holding objects other than tensors and plain data (e.g. a
    crafted pickle) is refused without running anything, and the error never suggests
    ``weights_only=False``.
    """
    path = Path(path)
    where = f"{flag} {path}" if flag else str(path)
    if not path.is_file():
        raise ConfigError(f"{where}: {what} file does not exist — check the path")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of foreign files
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - a foreign file fails in many ways; report it once
        unsafe = "Weights only load failed" in str(err) or "Unsupported global" in str(err)
        if unsafe:
            reason = (
                "it holds Python objects other than tensors and plain data, which are not "
                "loaded because unpickling them could run code"
            )
        else:
            reason = f"it is damaged or not a torch file ({type(err).__name__})"
        raise ConfigError(
            f"{where} is not a readable {what}: {reason} — pass a file written by these programs"
        ) from None


def load_checkpoint(path, flag: str | None = None, program: str | None = None) -> dict:
    """A checkpoint written by :func:`save_checkpoint` (a folder means its ``checkpoint.pt``).

    Raises :class:`ConfigError` (one line) for a missing, damaged, unsafe or foreign file.
    ``program``: also refuse a checkpoint of another program.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    where = f"{flag} {path}" if flag else str(path)
    if not path.is_file():
        raise ConfigError(
            f"{where}: checkpoint does not exist — a --save-dir run folder of a run "
            f"with --save-model holds {CHECKPOINT_NAME}"
        )
    ckpt = safe_load(path, "checkpoint", flag)
    if not isinstance(ckpt, dict):
        raise ConfigError(
            f"{where} is not a checkpoint of these programs — pass a {CHECKPOINT_NAME} they wrote"
        )
    fmt = ckpt.get("format")
    if isinstance(fmt, (str, int)) and fmt in _LEGACY_FORMATS:
        ckpt = {**ckpt, "format": CHECKPOINT_FORMAT, "version": _LEGACY_FORMATS[fmt]}
    elif fmt != CHECKPOINT_FORMAT:
        raise ConfigError(
            f"{where} is not a checkpoint of these programs (no "
            f"{CHECKPOINT_FORMAT!r} format field) — pass a {CHECKPOINT_NAME} "
            f"they wrote"
        )
    if int(ckpt.get("version", 0)) > CHECKPOINT_VERSION:
        raise ConfigError(
            f"{where} has checkpoint version {ckpt['version']}, newer than this "
            f"code's {CHECKPOINT_VERSION} — update the code"
        )
    if program is not None and ckpt.get("program", program) != program:
        raise ConfigError(
            f"{where} was written by {ckpt.get('program')}, not {program} — pass a checkpoint of {program}"
        )
    return ckpt


# =========================================================================== metrics


class MetricsLog:
    """Per-epoch metrics, written as ``metrics.csv``, ``metrics.json`` and ``curves.png``.

    Every write replaces the files atomically. The JSON holds ``config`` (the options),
    ``summary`` (final and best test accuracy, …) and ``epochs`` (one dict per row, as in the
    CSV). ``columns`` orders the CSV; ``accuracy_key`` is the column the summary is about.
    """

    def __init__(
        self,
        save_dir,
        config: dict,
        history: list[dict] | None = None,
        title: str = "",
        columns: Iterable[str] = (),
        accuracy_key: str = "test_acc",
        plot: bool = True,
    ):
        self.save_dir = None if save_dir is None else Path(save_dir)
        self.config = config
        self.history = list(history or [])
        self.title = title
        self.columns = tuple(columns)
        self.accuracy_key = accuracy_key
        self.plot = plot
        self.extra: dict = {}

    def append(self, row: dict) -> None:
        self.history.append(row)

    def summary(self) -> dict:
        key = self.accuracy_key
        trained = [r for r in self.history if r.get(key) is not None]
        summary: dict = {}
        if trained:
            best = max(trained, key=lambda r: r[key])
            summary = {
                "epochs_done": trained[-1]["epoch"],
                f"final_{key}": trained[-1][key],
                f"best_{key}": best[key],
                "best_epoch": best["epoch"],
                "train_time_s": sum(r.get("train_time_s") or 0.0 for r in trained),
            }
        transfer = [r for r in self.history if r.get("transfer_acc") is not None]
        if transfer:
            best = max(transfer, key=lambda r: r["transfer_acc"])
            summary.update(best_transfer_acc=best["transfer_acc"], best_transfer_epoch=best["epoch"])
        return summary

    def document(self) -> dict:
        return {"config": self.config, "summary": self.summary(), "epochs": self.history, **self.extra}

    def write(self) -> None:
        if self.save_dir is None:
            return
        write_json(self.save_dir / METRICS_JSON, self.document())
        write_csv(self.save_dir / METRICS_CSV, self.history, self.columns)
        if self.plot and self.history:
            plot_curves(self.history, self.save_dir / CURVES_PNG, self.title)


def plot_curves(
    history: list[dict],
    path,
    title: str = "",
    panels=(("loss", ("train_loss", "test_loss")), ("accuracy", ("train_acc", "test_acc", "transfer_acc"))),
):
    """One panel per ``(y label, keys)`` of ``panels``, each key a curve against ``epoch``;
    returns the matplotlib Figure.

    Every curve has markers (a one-epoch run is one point), a legend entry, and the figure is
    1400 px wide.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (label, keys) in zip(axes, panels):
        for key in keys:
            pts = [
                (r["epoch"], r[key])
                for r in history
                if isinstance(r.get(key), (int, float)) and r.get("epoch") is not None
            ]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", markersize=5, label=key.replace("_", " "))
        ax.set_xlabel("epoch", fontsize=12)
        ax.set_ylabel(label, fontsize=12)
        ax.tick_params(labelsize=11)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=11)
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    atomic_write(Path(path), lambda fh: fig.savefig(fh, format="png"))
    return fig
