"""The experiment programs under ``torchrun``: rows sharded, one process writes.

``torchrun --standalone --nproc_per_node P -m experiments.cifar10.cifar10mlp -- <options>``
runs the program in P processes (docs/distributed.md §5). :func:`init` (called by
:func:`experiments.cli.run_main`) joins the job; every process builds the same net from the
same seed and draws the same batches, :func:`prepare` shards the infinite net's rows over
the processes, and from then on the training loop runs unchanged in every process. Only
process 0 writes files, progress bars and log lines (:func:`is_main`, :func:`on_main`).
Checkpoints keep the single-process format: the rows are gathered to write them
(:func:`model_state`, :func:`optimizer_state`), and a checkpoint loads into any number of
processes.

Without torchrun every function here is a no-op, so the programs behave as before.
"""

from __future__ import annotations

import logging

import torch.distributed as dist
from torch import nn

import inf.distributed as idist
from experiments.cli import ConfigError, user_error_message
from inf.networks import InfMLP

__all__ = [
    "init",
    "world",
    "is_main",
    "prepare",
    "on_main",
    "model_state",
    "optimizer_state",
    "load_optimizer_state",
    "rows_report",
]


def init() -> int:
    """Join the torchrun job, if any; returns the number of processes. Processes other than
    0 log only warnings and errors."""
    rank, size = idist.init_from_env()
    if size > 1 and not is_main():
        # the programs set their logger to INFO later (setup_logging); this handler, installed
        # first, passes only warnings and errors, marked with the process's rank
        logging.basicConfig(format=f"[rank {rank}] %(message)s")
        for handler in logging.getLogger().handlers:
            handler.addFilter(lambda record: record.levelno >= logging.WARNING)
    return size


def world() -> int:
    return idist.world_size()


def is_main() -> bool:
    """Whether this process writes files, progress bars and results (always, without torchrun)."""
    return idist.is_main_process()


def prepare(net: nn.Module, args=None) -> nn.Module:
    """Shard an infinite net's rows over the processes of the job. Refused with a one-line
    error: finite and μP nets (their weights are not rows) and ``--row-budget`` (compression
    works on whole layers, docs/distributed.md §6): run those without torchrun."""
    if world() <= 1 or idist.is_sharded(net):
        return net
    if not isinstance(net, InfMLP):
        raise ConfigError(
            f"{type(net).__name__}: only infinite nets (--width 0) shard their rows over "
            "processes; run finite and μP nets without torchrun"
        )
    if getattr(args, "row_budget", 0):
        raise ConfigError(
            "--row-budget compresses whole layers and cannot run on rows sharded over "
            "processes; drop it or run without torchrun"
        )
    return idist.shard_(net)


def on_main(fn, *args, **kwargs):
    """Run ``fn`` on process 0 only and return its result on every process; an error it
    raises is raised on every process (so that none waits for the others)."""
    if world() <= 1:
        return fn(*args, **kwargs)
    box, error = [None, None], None
    if is_main():
        try:
            box[0] = fn(*args, **kwargs)
        except (ConfigError, OSError) as err:  # user errors: every process reports the one line
            error = err
            box[1] = user_error_message(err) or str(err)
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[1] is not None:
        raise ConfigError(box[1])
    return box[0]


def model_state(net: nn.Module) -> dict:
    """``net.state_dict()`` in the single-process format (collective when sharded)."""
    return idist.full_state_dict(net) if idist.is_sharded(net) else net.state_dict()


def optimizer_state(net: nn.Module, optimizer) -> dict:
    """``optimizer.state_dict()`` in the single-process format (collective when sharded)."""
    if idist.is_sharded(net):
        return idist.full_optimizer_state_dict(net, optimizer)
    return optimizer.state_dict()


def load_optimizer_state(net: nn.Module, optimizer, state: dict) -> None:
    """Load a single-process optimizer state; a sharded net's optimizer keeps its share."""
    if idist.is_sharded(net):
        idist.load_full_optimizer_state_dict(net, optimizer, state)
    else:
        optimizer.load_state_dict(state)


def rows_report(net: nn.Module) -> dict:
    """``{"world_size": P, "layers": {name: {"rows_total", "rows_per_process"}}}`` for
    metrics.json (world size 1 and one entry per layer without torchrun)."""
    report = idist.rows_report(net)
    report["world_size"] = world()
    return report


def global_rows(net: nn.Module) -> list[int]:
    """Rows per infinite layer of the whole net (not of this process's share)."""
    return idist.global_rows_per_layer(net)
