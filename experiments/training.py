"""The training loop shared by the CIFAR-10 and ImageNet-transfer programs.

* :func:`make_optimizer` (InfSGD over :func:`inf.utils.pi_param_groups`), :func:`make_scheduler`,
  :func:`gclip_at`, :func:`apply_precision`;
* :class:`Trainer` — one epoch of SGD with gradient accumulation and π-aware clipping, and
  evaluation;
* :func:`fit` — the epoch loop: a run folder of its own (:mod:`experiments.runs`), resuming,
  metrics, plots and checkpoints after every epoch, and a final result line on stdout;
* :func:`checkpoint_model` / :func:`adopt_architecture` — rebuild or evaluate a saved net.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import resource
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from experiments import distributed as edist
from experiments import runs
from experiments.cli import ConfigError, progress_bar
from experiments.data.images import ImageSet
from experiments.losses import loss_sum
from experiments.models import build_model, describe, kind_of, set_rows_dtype
from experiments.options import ARCH_KEYS, OPERATIONAL_KEYS, model_kind, model_spec
from inf.networks import FinPiMLPSample, InfMLP
from inf.optim import InfSGD
from inf.utils import clip_grad_norm_, pi_param_groups

__all__ = [
    "apply_precision",
    "make_optimizer",
    "make_scheduler",
    "gclip_at",
    "batch_loss",
    "Trainer",
    "fit",
    "rng_state",
    "set_rng_state",
    "checkpoint_model",
    "adopt_architecture",
    "memory_text",
    "rows_text",
    "run_folder_name",
    "METRIC_COLUMNS",
]

log = logging.getLogger("experiments")

METRIC_COLUMNS = (
    "epoch",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "transfer_acc",
    "lr",
    "gclip",
    "rows",
    "steps",
    "step_time_ms",
    "train_time_s",
    "eval_time_s",
    "transfer_time_s",
    "memory",
    "compressions",
    "compression_rel_eps",
)


# =========================================================================== optimization


def apply_precision(net: nn.Module, args, device: torch.device, half_rows: bool | None = None) -> str:
    """float16 rows for infinite nets on CUDA unless ``--float``; returns a description.

    Only the rows ``A``/``B`` of the infinite hidden and output layers go to float16;
    coefficients, biases, the input layer and all arithmetic stay float32. Finite and μP nets
    always train in float32. ``half_rows`` overrides the choice (tests use it to run the
    float16 path on a CPU).
    """
    if half_rows is None:
        if args.float:
            return "float32"
        if device.type != "cuda":
            log.info("notice: float16 rows need CUDA; on %s this run uses float32 (as with --float)", device)
            return "float32"
        half_rows = True
    if not half_rows:
        return "float32"
    if isinstance(net, InfMLP):
        set_rows_dtype(net, torch.float16)
        return "float16 rows (A, B), float32 coefficients and arithmetic"
    log.info("notice: float16 applies to infinite-width rows only; this finite net trains in float32")
    return "float32"


def make_optimizer(args, net: nn.Module) -> InfSGD:
    """InfSGD over :func:`inf.utils.pi_param_groups` (roles: first, hidden, last, biases)."""
    groups = pi_param_groups(
        net,
        args.lr,
        args.wd,
        first_layer_lr_mult=args.first_layer_lr_mult,
        last_layer_lr_mult=args.last_layer_lr_mult,
        bias_lr_mult=args.bias_lr_mult,
        apply_lr_mult_to_wd=args.apply_lr_mult_to_wd,
    )
    if args.no_Gproj or args.gaussian_init:
        for group in groups:
            group["project"] = False
    return InfSGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.wd)


def make_scheduler(args, optimizer):
    """A ``torch.optim.lr_scheduler`` stepped once per epoch, or None."""
    if args.scheduler == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=args.lr_drop_milestones, gamma=args.lr_drop_ratio
        )
    if args.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    if args.lr_drop_milestones:
        log.warning("--lr-drop-milestones has no effect without --scheduler multistep")
    return None


def gclip_at(args, epoch: int) -> float:
    """The clipping threshold during (0-based) ``epoch``: one drop per milestone passed."""
    milestones = args.gclip_drop_milestones
    if milestones is None:
        milestones = args.lr_drop_milestones if args.scheduler == "multistep" else []
    ratio = args.lr_drop_ratio if args.gclip_drop_ratio is None else args.gclip_drop_ratio
    return args.gclip * ratio ** sum(1 for m in milestones if epoch >= m)


def batch_loss(name: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of the per-example loss ``--loss`` (experiments.losses), in float32."""
    return loss_sum(name, out.float(), y)


# =========================================================================== progress text


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_text(device: torch.device) -> str:
    """``GPU 3.1 GB`` (allocated) on CUDA, ``RSS 1.2 GB`` (resident) on CPU."""
    if device.type == "cuda":
        return f"GPU {torch.cuda.memory_allocated(device) / 1e9:.2f} GB"
    return f"RSS {_rss_bytes() / 1e9:.2f} GB"


def rows_text(net: nn.Module) -> str | None:
    """Rows per infinite layer, ``1,208/1,208/1,208``, or None for finite nets."""
    if isinstance(net, InfMLP):
        return "/".join(f"{m:,}" for m in edist.global_rows(net))  # all processes' rows
    return None


def make_row_budget(args, net: nn.Module, optimizer):
    """The ``--row-budget`` compression hook (inf.compress.RowBudget), or None when off."""
    n = getattr(args, "row_budget", 0) or 0
    if not n or optimizer is None:
        return None
    from inf.compress import RowBudget, infinite_layers

    keep = getattr(args, "row_budget_keep", 0.25)
    if n < 2 or not 0.0 < keep < 1.0:
        raise ConfigError(
            f"--row-budget must be 0 (off) or at least 2, and --row-budget-keep between 0 "
            f"and 1; got {n} and {keep}"
        )
    if not infinite_layers(net):
        raise ConfigError("--row-budget applies to infinite nets only; drop it for this model")
    return RowBudget(net, max_rows=n, keep_fraction=keep, optimizer=optimizer, seed=args.seed)


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# =========================================================================== training


class Trainer:
    """One epoch of SGD and evaluation for a π-MLP (or μP MLP) on an :class:`ImageSet`.

    Per optimizer step: ``zero_grad``; for each of ``--accum-steps`` batches, forward,
    ``(sum of per-example losses) / (examples in the step)`` and backward; π-aware clipping at
    the epoch's threshold (:func:`gclip_at`); ``step``. Batches are drawn without replacement
    from a permutation made by ``generator`` (a CPU generator, also used for augmentation),
    the last one possibly smaller.
    """

    def __init__(self, args, net: nn.Module, optimizer, device: torch.device, generator: torch.Generator):
        self.args, self.net, self.optimizer = args, net, optimizer
        self.device, self.generator = device, generator
        self.budget = make_row_budget(args, net, optimizer)

    def _progress(self, total: int, desc: str):
        enabled = edist.is_main() and not (
            getattr(self.args, "no_progress", False) or getattr(self.args, "human", False)
        )
        return progress_bar(total=total, desc=desc, enabled=enabled, nested=True)

    def train_epoch(self, data: ImageSet, epoch: int) -> dict:
        args, net, opt = self.args, self.net, self.optimizer
        net.train()
        gclip = gclip_at(args, epoch)
        n = len(data)
        order = torch.randperm(n, generator=self.generator)
        batches = [order[i : i + args.batch_size] for i in range(0, n, args.batch_size)]
        steps = [batches[i : i + args.accum_steps] for i in range(0, len(batches), args.accum_steps)]
        loss_total = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        seen = 0
        bar = self._progress(len(steps), f"epoch {epoch + 1}/{args.epochs}")
        human_every = max(1, len(steps) // 10)
        began = time.perf_counter()
        for step, step_batches in enumerate(steps):
            total = sum(len(b) for b in step_batches)
            opt.zero_grad()
            for idx in step_batches:
                x = data.inputs(idx.to(data.images.device), self.generator, args.data_augment)
                y = data.labels[idx.to(data.labels.device)]
                out = net(x)
                loss = batch_loss(args.loss, out, y)
                (loss / total).backward()
                loss_total += loss.detach().double()
                correct += (out.detach().argmax(1) == y).sum()
            if gclip > 0:
                clip_grad_norm_(net.parameters(), gclip, per_param=args.gclip_per_param)
            opt.step()
            if self.budget is not None:
                self.budget()
            seen += total
            done = step + 1
            if done % 10 == 0 or done == len(steps):
                bar.update(done - bar.n)
                if not bar.disable:
                    bar.set_postfix_str(self._status(loss_total, correct, seen), refresh=False)
            if args.human and not args.no_progress and (done % human_every == 0 or done == len(steps)):
                elapsed = time.perf_counter() - began
                log.info(
                    "epoch %d/%d  %3.0f%% (%d/%d steps)  %s  %.1f ms/step  ETA %s",
                    epoch + 1,
                    args.epochs,
                    100 * done / len(steps),
                    done,
                    len(steps),
                    self._status(loss_total, correct, seen),
                    1e3 * elapsed / done,
                    _hms(elapsed / done * (len(steps) - done)),
                )
        bar.close()
        elapsed = time.perf_counter() - began
        return {
            "train_loss": float(loss_total) / seen,
            "train_acc": int(correct) / seen,
            "gclip": gclip,
            "steps": len(steps),
            "train_time_s": elapsed,
            "step_time_ms": 1e3 * elapsed / len(steps),
        }

    def _status(self, loss_total, correct, seen) -> str:
        parts = [f"loss {float(loss_total) / seen:.4f}", f"acc {int(correct) / seen:.2%}"]
        rows = rows_text(self.net)
        if rows is not None:
            parts.append(f"rows {rows}")
        parts.append(memory_text(self.device))
        return "  ".join(parts)

    @torch.no_grad()
    def evaluate(self, data: ImageSet) -> dict:
        net = self.net
        net.eval()
        loss_total, correct = 0.0, 0
        bs = self.args.test_batch_size
        for start in range(0, len(data), bs):
            idx = torch.arange(start, min(start + bs, len(data)), device=data.images.device)
            out = net(data.inputs(idx))
            y = data.labels[idx]
            loss_total += float(batch_loss(self.args.loss, out, y))
            correct += int((out.argmax(1) == y).sum())
        net.train()
        n = max(len(data), 1)
        return {"test_loss": loss_total / n, "test_acc": correct / n}


# =========================================================================== RNG state


def rng_state(generator: torch.Generator, device: torch.device) -> dict:
    """Every random state a resumable run needs: torch, Python, CUDA and the data generator."""
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "data": generator.get_state(),
    }


def set_rng_state(state: dict, generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    python = state["python"]
    if isinstance(python, list):  # a checkpoint stores Python's state tuple as lists
        python = (python[0], tuple(python[1]), python[2])
    random.setstate(python)
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    generator.set_state(state["data"])


# =========================================================================== checkpoints


def checkpoint_model(ckpt: dict, device: torch.device, width: int | None = None):
    """Rebuild the net a checkpoint holds: ``(net, kind, namespace of its options)``.

    ``width``: sample a finite π-net of this width from a checkpointed infinite net.
    """
    saved = argparse.Namespace(**ckpt["args"])
    spec = model_spec(saved, ckpt["shape"]["d_in"], ckpt["shape"]["d_out"])
    net = build_model(spec, device)
    try:
        net.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError, ValueError) as err:
        raise ConfigError(
            f"the checkpoint's weights do not fit the network its options describe "
            f"({str(err).splitlines()[0]}) — pass an unmodified checkpoint"
        ) from None
    kind = model_kind(saved)
    if width:
        if kind != "infinite":
            raise ConfigError(
                f"--width {width} samples a finite net from an infinite one, but "
                f"the checkpoint holds a {kind} net — drop --width"
            )
        generator = torch.Generator().manual_seed(saved.seed)
        net = FinPiMLPSample(net.to("cpu").double(), width, generator=generator, dtype=torch.float32).to(
            device
        )
        kind = "finite"
    return net, kind, saved


def adopt_architecture(args, ckpt: dict) -> None:
    """Set the architecture options of ``args`` to those of a checkpoint (for evaluation)."""
    saved = ckpt["args"]
    changed = [k for k in ARCH_KEYS if getattr(args, k, None) != saved.get(k)]
    for key in ARCH_KEYS:
        setattr(args, key, saved.get(key))
    if changed:
        log.info(
            "using the checkpoint's network options: %s", ", ".join(f"{k}={saved.get(k)!r}" for k in changed)
        )


def _check_resumable(saved: dict, args, path) -> None:
    diffs = [
        f"--{k.replace('_', '-')}: checkpoint {saved.get(k)!r}, now {getattr(args, k)!r}"
        for k in ARCH_KEYS
        if saved.get(k) != getattr(args, k)
    ]
    if diffs:
        raise ConfigError(
            f"{path} holds a different network ({'; '.join(diffs)}) — resume with "
            f"the options it was trained with"
        )
    changed = [
        k
        for k in (
            "lr",
            "wd",
            "momentum",
            "batch_size",
            "scheduler",
            "seed",
            "loss",
            "lr_drop_milestones",
            "lr_drop_ratio",
            "gclip",
        )
        if k in saved and saved[k] != getattr(args, k, saved[k])
    ]
    if changed:
        log.warning(
            "resuming with changed options: %s",
            ", ".join(f"{k} {saved[k]!r} -> {getattr(args, k)!r}" for k in changed),
        )


# =========================================================================== run folders


def run_folder_name(args, program: str) -> str:
    """``<program>_<kind>_<r or width>_L<depth>_s<seed>_<hash>``, the hash over every option
    except the operational ones (paths, progress, threads, …)."""
    kind = model_kind(args)
    size = f"r{args.r}" if kind == "infinite" else f"w{args.width}"
    config = dict(vars(args))
    if args.evaluate_only:
        config["model_path"] = str(Path(args.model_path).resolve())
        return runs.run_name(f"{program}_eval_{kind}_{size}", config, set(OPERATIONAL_KEYS) - {"model_path"})
    return runs.run_name(f"{program}_{kind}_{size}_L{args.depth}_s{args.seed}", config, OPERATIONAL_KEYS)


def _same_file(a, b) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def _result_line(doc: dict, program: str, run: Path | None) -> str:
    s = doc.get("summary") or {}
    if not s:
        return f"{program}: no epochs trained"
    text = (
        f"{program}: {s['epochs_done']} epochs, final test accuracy "
        f"{100 * s['final_test_acc']:.2f}% (best {100 * s['best_test_acc']:.2f}% at epoch "
        f"{s['best_epoch']})"
    )
    if s.get("best_transfer_acc") is not None:
        text += (
            f", best transfer accuracy {100 * s['best_transfer_acc']:.2f}% at epoch "
            f"{s['best_transfer_epoch']}"
        )
    return text + (f"; files in {run}" if run is not None else "")


def _open_run_folder(args, program: str) -> tuple[Path | None, dict | None]:
    """``(run folder, finished document or None)`` for ``--save-dir`` (see experiments.runs)."""
    if not args.save_dir:
        return None, None
    name = run_folder_name(args, program)
    folder = Path(args.save_dir) / name
    resume = (
        bool(args.model_path)
        and not args.evaluate_only
        and (_same_file(Path(args.model_path).parent, folder) or _same_file(args.model_path, folder))
    )
    marker = folder / runs.METRICS_JSON
    if marker.exists() and not args.overwrite and not resume and not args.evaluate_only:
        try:
            doc = json.loads(marker.read_text())
        except (OSError, ValueError):
            doc = {}
        done = (doc.get("summary") or {}).get("epochs_done", 0)
        if done >= args.epochs:
            return folder, doc
        if (folder / runs.CHECKPOINT_NAME).is_file():
            fix = (
                f"resume it with --model-path {folder / runs.CHECKPOINT_NAME}, or pass "
                f"--overwrite to start again"
            )
        else:
            fix = "pass --overwrite to start again (it has no checkpoint to resume)"
        raise runs.RunExists(
            f"{folder} holds an unfinished run with these options (epoch {done} of {args.epochs}) — {fix}"
        )
    folder = runs.run_dir(args.save_dir, name, overwrite=True)
    if args.overwrite and not resume:
        for path in folder.iterdir():
            if path.name in (runs.METRICS_JSON, runs.METRICS_CSV, runs.CURVES_PNG, "evaluation.json") or (
                path.name.startswith("checkpoint") and path.suffix == ".pt"
            ):
                path.unlink()
    return folder, None


# =========================================================================== the epoch loop

EpochHook = Callable[[int, nn.Module], dict]


def fit(
    args,
    net: nn.Module,
    train: ImageSet | None,
    test: ImageSet,
    device: torch.device,
    *,
    program: str,
    precision: str,
    ckpt: dict | None = None,
    epoch_hook: EpochHook | None = None,
    hook_epochs: Iterable[int] = (),
) -> dict:
    """Train ``net`` on ``train`` for ``args.epochs`` epochs, evaluating on ``test`` after each.

    * ``--save-dir DIR``: the run's files go to its own folder ``DIR/<name>``
      (:func:`run_folder_name`); a folder holding a finished run with the same options is not
      trained again (its final metrics are printed), an unfinished one needs ``--model-path``
      (resume) or ``--overwrite``.
    * ``ckpt`` (from :func:`experiments.runs.load_checkpoint`): resume it (model, optimizer,
      scheduler, RNG states, epoch, metrics) — or, with ``args.evaluate_only``, only evaluate
      its model.
    * ``epoch_hook(epoch, net) -> dict`` runs after the epochs in ``hook_epochs`` (1-based;
      0 = before training) and its entries join that epoch's metrics row (e.g. transfer
      accuracy).
    * Every epoch: a metrics row (train/test loss and accuracy, lr, clipping threshold, rows
      per layer, time per step, memory), the files of :class:`experiments.runs.MetricsLog`,
      and with ``--save-model`` an atomic checkpoint.

    Returns the metrics document (``config``, ``summary``, ``epochs``, ``run_dir``), plus
    ``evaluation`` with ``--evaluate-only``. The final result line goes to stdout.
    """
    hook_epochs = set(hook_epochs)
    net = edist.prepare(net, args)  # under torchrun: rows sharded over the processes
    save_dir, finished = edist.on_main(_open_run_folder, args, program)
    writes = edist.is_main()  # only process 0 writes files and results
    if finished is not None:
        finished["run_dir"] = str(save_dir)
        if writes:
            print(
                _result_line(finished, program, save_dir) + " (already finished; --overwrite to train again)",
                flush=True,
            )
        return finished
    if ckpt is not None:
        if not args.evaluate_only:
            _check_resumable(ckpt["args"], args, args.model_path)
        try:
            net.load_state_dict(ckpt["model"])
        except (RuntimeError, KeyError, ValueError) as err:
            raise ConfigError(
                f"{args.model_path}: the weights do not fit this network "
                f"({str(err).splitlines()[0]}) — pass a checkpoint of this "
                f"program written with these network options"
            ) from None
    shape = {"d_in": test.dim, "d_out": int(net.d_out)}
    kind = kind_of(net)
    title = f"{program}: {kind} net, {precision}"

    if args.evaluate_only:
        trainer = Trainer(args, net, None, device, torch.Generator())
        result = trainer.evaluate(test)
        epoch = ckpt["epoch"] if ckpt else 0
        if epoch_hook is not None:
            result.update(epoch_hook(epoch, net))
        doc = {
            "config": dict(vars(args)),
            "evaluation": {"epoch": epoch, **result},
            "run_dir": None if save_dir is None else str(save_dir),
        }
        if save_dir is not None and writes:
            runs.write_json(save_dir / "evaluation.json", doc)
        if writes:
            print(
                f"{program}: {args.model_path} after {epoch} epochs: "
                + "  ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float)),
                flush=True,
            )
        return doc

    optimizer = make_optimizer(args, net)
    scheduler = make_scheduler(args, optimizer)
    generator = torch.Generator().manual_seed(args.seed + 2**32)
    history, start_epoch = [], 0
    budget_state = None
    if ckpt is not None:
        try:
            edist.load_optimizer_state(net, optimizer, ckpt["optimizer"])
            if scheduler is not None and ckpt.get("scheduler") is not None:
                scheduler.load_state_dict(ckpt["scheduler"])
            set_rng_state(ckpt["rng"], generator, device)
            budget_state = ckpt.get("row_budget")
        except (RuntimeError, KeyError, ValueError, TypeError) as err:
            raise ConfigError(
                f"{args.model_path}: the optimizer or RNG state cannot be restored "
                f"({str(err).splitlines()[0]}) — pass an unmodified checkpoint "
                f"of this program"
            ) from None
        history, start_epoch = list(ckpt["metrics"]), int(ckpt["epoch"])
        log.info("resuming %s after epoch %d of %d", args.model_path, start_epoch, args.epochs)
    metrics = runs.MetricsLog(save_dir if writes else None, dict(vars(args)), history, title, METRIC_COLUMNS)
    metrics.extra["run_dir"] = None if save_dir is None else str(save_dir)
    metrics.extra["distributed"] = edist.rows_report(net)
    trainer = Trainer(args, net, optimizer, device, generator)
    if trainer.budget is not None and ckpt is not None and budget_state is not None:
        trainer.budget.load_state_dict(budget_state)
    log.info(
        "%s: %s net on %s, %d train / %d test examples, %s, %s%s",
        program,
        describe(net),
        train.name,
        len(train),
        len(test),
        device,
        precision,
        f"; run folder {save_dir}" if save_dir is not None else "",
    )

    if start_epoch == 0 and 0 in hook_epochs and epoch_hook is not None:
        metrics.append({"epoch": 0, **epoch_hook(0, net)})
        metrics.write()

    last_epoch = args.epochs
    if args.stop_after_epochs is not None:
        last_epoch = min(last_epoch, start_epoch + args.stop_after_epochs)
    for epoch in range(start_epoch, last_epoch):
        lr = optimizer.param_groups[0]["lr"] / (optimizer.param_groups[0]["lr_mult"] or 1.0)
        stats = trainer.train_epoch(train, epoch)
        evaluated = time.perf_counter()
        stats.update(trainer.evaluate(test))
        eval_time = time.perf_counter() - evaluated
        if scheduler is not None:
            scheduler.step()
        row = {
            "epoch": epoch + 1,
            "train_loss": stats["train_loss"],
            "train_acc": stats["train_acc"],
            "test_loss": stats["test_loss"],
            "test_acc": stats["test_acc"],
            "lr": lr,
            "gclip": stats["gclip"],
            "rows": rows_text(net),
            "steps": stats["steps"],
            "step_time_ms": stats["step_time_ms"],
            "train_time_s": stats["train_time_s"],
            "eval_time_s": eval_time,
            "memory": memory_text(device),
        }
        if trainer.budget is not None:
            m = trainer.budget.metrics()
            row["compressions"] = sum(m["compressions"].values())
            row["compression_rel_eps"] = "/".join(f"{v:.4f}" for v in m["rel_eps_sum"].values())
        if epoch_hook is not None and epoch + 1 in hook_epochs:
            row.update(epoch_hook(epoch + 1, net))
        metrics.append(row)
        metrics.extra["distributed"] = edist.rows_report(net)
        metrics.write()
        log.info(
            "epoch %d/%d  train loss %.4f acc %.2f%%  test loss %.4f acc %.2f%%%s  "
            "(%.1f s, %.2f ms/step%s, %s)",
            epoch + 1,
            args.epochs,
            row["train_loss"],
            100 * row["train_acc"],
            row["test_loss"],
            100 * row["test_acc"],
            f"  transfer acc {100 * row['transfer_acc']:.2f}%" if row.get("transfer_acc") is not None else "",
            row["train_time_s"],
            row["step_time_ms"],
            f", rows {row['rows']}" if row["rows"] else "",
            row["memory"],
        )
        if args.save_model:
            state = {
                "program": program,
                "kind": kind,
                "shape": shape,
                "args": dict(vars(args)),
                "epoch": epoch + 1,
                "precision": precision,
                "model": edist.model_state(net),
                "optimizer": edist.optimizer_state(net, optimizer),  # gathered when sharded
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "rng": rng_state(generator, device),
                "metrics": metrics.history,
            }
            if trainer.budget is not None:
                state["row_budget"] = trainer.budget.state_dict()
            if writes:
                runs.save_checkpoint(save_dir / runs.CHECKPOINT_NAME, state)
            if args.keep_epoch_models and writes:
                runs.save_checkpoint(save_dir / f"checkpoint_epoch{epoch + 1}.pt", state)
    metrics.write()
    doc = metrics.document()
    if writes:
        print(_result_line(doc, program, save_dir), flush=True)
    return doc
