"""Former home of the shared experiment machinery, now split by job; kept as re-exports.

=============================  ===========================================================
module                         what lives there
=============================  ===========================================================
``experiments.cli``            ``ConfigError``, one-line errors (``run_main``), validators,
                               ``--threads``, ``--cuda``/``--device``, progress bars
``experiments.options``        the option groups of the π-MLP programs, ``check_args``,
                               ``model_spec``
``experiments.models``         the model kinds (infinite, finite, mup) and ``build_model``
``experiments.losses``         ``--loss xent`` / ``--loss mse``
``experiments.data.images``    ``ImageSet``, ``fixed_subset``, ``load_cifar10_set``
``experiments.training``       ``Trainer``, ``fit``, optimizer, schedule, precision
``experiments.runs``           run folders, atomic writes, checkpoints, metrics, plots
``experiments.feature_kernels``  feature kernels of trained nets for kernel regression
=============================  ===========================================================

New code imports from those modules.
"""

from __future__ import annotations

from experiments.cli import ConfigError
from experiments.data.images import (
    CIFAR10_PIXEL_MEAN,
    CIFAR10_PIXEL_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageSet,
    fixed_subset,
    load_cifar10_set,
)
from experiments.feature_kernels import feature_kernel_accuracy, feature_kernel_inputs
from experiments.models import build_model as build_model_from_spec
from experiments.options import (
    ARCH_KEYS,
    IntListAction,
    add_krr_args,
    add_model_args,
    add_optim_args,
    add_run_args,
    check_args,
    device_from_args,
    model_kind,
    model_spec,
    seed_everything,
    setup_logging,
)
from experiments.runs import (
    CHECKPOINT_NAME,
    CURVES_PNG,
    METRICS_CSV,
    METRICS_JSON,
    MetricsLog,
    atomic_write,
    load_checkpoint,
    plot_curves,
    save_checkpoint,
)
from experiments.training import (
    Trainer,
    adopt_architecture,
    apply_precision,
    batch_loss,
    checkpoint_model,
    fit,
    gclip_at,
    make_optimizer,
    make_scheduler,
    memory_text,
    rng_state,
    rows_text,
    set_rng_state,
)

__all__ = [
    "ConfigError",
    "CIFAR10_PIXEL_MEAN",
    "CIFAR10_PIXEL_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IntListAction",
    "add_model_args",
    "add_optim_args",
    "add_run_args",
    "add_krr_args",
    "check_args",
    "setup_logging",
    "device_from_args",
    "seed_everything",
    "ImageSet",
    "fixed_subset",
    "load_cifar10_set",
    "model_kind",
    "build_model",
    "apply_precision",
    "make_optimizer",
    "make_scheduler",
    "gclip_at",
    "batch_loss",
    "Trainer",
    "fit",
    "atomic_write",
    "save_checkpoint",
    "load_checkpoint",
    "checkpoint_model",
    "MetricsLog",
    "plot_curves",
    "ARCH_KEYS",
    "adopt_architecture",
    "feature_kernel_inputs",
    "feature_kernel_accuracy",
    "memory_text",
    "rows_text",
    "rng_state",
    "set_rng_state",
    "CHECKPOINT_NAME",
    "METRICS_CSV",
    "METRICS_JSON",
    "CURVES_PNG",
]


def build_model(args, d_in: int, d_out: int, device):
    """The net the options of ``args`` describe (``experiments.models.build_model`` of
    ``experiments.options.model_spec(args, d_in, d_out)``)."""
    return build_model_from_spec(model_spec(args, d_in, d_out), device)
