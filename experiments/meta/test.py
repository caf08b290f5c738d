"""Evaluate a run of ``experiments.meta.train`` on the Omniglot test split.

::

    python -m experiments.meta.test results/inf_0123456789 [--num-test-batches 500]

reads ``config.json`` and the model (``model.pt``, the best validation epoch, or
``model_last.pt`` with ``--checkpoint last``) from the run folder, rebuilds the network
as training did, adapts it on ``--num-test-batches`` batches of test tasks (the run's
N-way K-shot setting and inner loop) and reports the mean query accuracy with the
half-width of its normal 95% confidence interval over the tasks,
``1.96 · std / sqrt(#tasks)``. The result is printed and written to
``test_results.json`` in the run folder (``--output`` to change it).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from experiments import cli, runs
from experiments.cli import ConfigError
from experiments.meta.train import (
    BEST_MODEL,
    CONFIG_JSON,
    LAST_MODEL,
    build_net,
    load_splits,
    load_state,
    make_learner,
    split_seed,
    task_sampler,
)

__all__ = ["build_parser", "main"]

PROG = "python -m experiments.meta.test"


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog=PROG, description="Test-split accuracy of a MAML run (mean and 95% CI).")
    p.add_argument("run_dir", help="run folder written by experiments.meta.train")
    p.add_argument("--folder", default=None, help="Omniglot data folder (default: the run's)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="split to evaluate")
    p.add_argument(
        "--checkpoint",
        default="best",
        choices=("best", "last"),
        help=f"best: {BEST_MODEL} (best validation accuracy); last: {LAST_MODEL}",
    )
    p.add_argument(
        "--num-test-batches",
        type=int,
        default=None,
        help="batches of tasks (default: the run's --num-test-batches)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="tasks per batch (default: the run's)")
    p.add_argument(
        "--seed", type=int, default=None, help="seed of the test tasks (default: derived from the run's seed)"
    )
    p.add_argument(
        "--use-cuda", action="store_true", help="evaluate on the GPU (an error on a machine without one)"
    )
    cli.add_threads_arg(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--output", default=None, help="result JSON (default: RUN_DIR/test_results.json)")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except (*cli.USER_ERRORS, OSError) as e:
        message = cli.user_error_message(e)
        if message is None:
            raise
        cli.fail(PROG, message)


def _main(args) -> dict:
    run = Path(args.run_dir)
    cfg_path = run / CONFIG_JSON
    if not cfg_path.is_file():
        raise ConfigError(
            f"{cfg_path} not found — pass a run folder written by experiments.meta.train with --output-folder"
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{cfg_path} is not readable JSON ({type(e).__name__}) — pass an intact run folder"
        ) from None
    device = cli.resolve_device_flag("cuda" if args.use_cuda else "cpu", "--use-cuda")
    cli.apply_threads(args.threads)
    folder = args.folder or cfg["folder"]
    splits, _ = load_splits(
        folder,
        cfg.get("split_sizes_resolved", cfg["split_sizes"]),
        names=(args.split,),
        cache_file=cfg.get("cache_file", True),
    )
    net = build_net(cfg, device)
    model_path = run / (BEST_MODEL if args.checkpoint == "best" else LAST_MODEL)
    load_state(net, model_path, device, flag="--checkpoint")
    learner = make_learner(net, cfg, train=False)
    num_batches = cfg["num_test_batches"] if args.num_test_batches is None else args.num_test_batches
    seed = split_seed(cfg["seed"], args.split) if args.seed is None else args.seed
    sampler = task_sampler(splits[args.split], cfg, seed, batch_size=args.batch_size)
    t0 = time.time()
    bar = cli.progress_bar(
        total=num_batches, desc=f"test ({args.split})", enabled=not args.no_progress, leave=False
    )
    res = learner.evaluate((sampler.sample_batch(i) for i in range(num_batches)), bar)
    bar.close()
    doc = {
        "run_dir": str(run.resolve()),
        "model": str(model_path),
        "split": args.split,
        "num_batches": num_batches,
        "seed": seed,
        "time_s": time.time() - t0,
        "num_ways": cfg["num_ways"],
        "num_shots": cfg["num_shots"],
        **res,
    }
    print(
        f"{args.split} accuracy {100 * res['accuracy']:.2f}% ± {100 * res['accuracy_ci95']:.2f}% "
        f"(95% CI over {res['num_tasks']} tasks), mean outer loss {res['mean_outer_loss']:.4f}"
    )
    out = Path(args.output) if args.output else run / "test_results.json"
    runs.write_json(out, doc)
    return doc


if __name__ == "__main__":
    main(sys.argv[1:])
