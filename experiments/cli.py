"""Command-line plumbing shared by every program under ``experiments/``.

One error type and one way to report it:

* :class:`ConfigError` — the options (or the files they name) ask for something that cannot be
  done. Its message says what was wrong and how to fix it, ``what — fix``.
* :func:`run_main` — the ``if __name__ == "__main__"`` entry of every program: runs
  ``main()`` and turns a user error (:class:`ConfigError`, a dataset error, a bad option) into
  one line on stderr, ``prog: error: <what> — <fix>``, and exit status 2. No traceback, no
  usage dump.
* :class:`ArgumentParser` — argparse with a one-line :meth:`~ArgumentParser.error` (argparse
  prints the whole usage block first; for a program with 60 options that hides the message).

Option helpers: argparse ``type=`` validators (:func:`positive_float`, :func:`nonnegative_float`,
:func:`positive_int`, :func:`nonnegative_int`, :func:`existing_path`), :func:`add_threads_arg` /
:func:`apply_threads`, :func:`resolve_device_flag` (``--cuda`` / ``--device`` without a GPU says
"drop --cuda"), and :func:`progress_bar` (tqdm that stays quiet when stderr is not a terminal).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import torch
from tqdm.auto import tqdm

from inf.utils import resolve_device

__all__ = [
    "ConfigError",
    "USER_ERRORS",
    "ArgumentParser",
    "HelpFormatter",
    "fail",
    "run_main",
    "user_error_message",
    "positive_float",
    "nonnegative_float",
    "positive_int",
    "nonnegative_int",
    "existing_path",
    "add_threads_arg",
    "apply_threads",
    "resolve_device_flag",
    "progress_bar",
    "is_tty",
]


class ConfigError(ValueError):
    """The options ask for something this machine, data or checkpoint cannot give.

    The message names the option or file and says how to fix it (``what — fix``).
    """


def _user_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConfigError]
    try:
        from experiments.data.cifar import DatasetError

        errors.append(DatasetError)
    except ImportError:  # pragma: no cover - the data package is part of the repository
        pass
    try:
        from experiments.data.omniglot import OmniglotError

        errors.append(OmniglotError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


#: the exceptions :func:`run_main` reports as one line (options, data, checkpoints)
USER_ERRORS = _user_errors()


def fail(prog: str, message: str) -> NoReturn:
    """Print ``prog: error: message`` (one line) on stderr and exit with status 2."""
    text = " ".join(str(message).split())  # one line, whatever the message held
    print(f"{prog}: error: {text}", file=sys.stderr)
    raise SystemExit(2)


def user_error_message(err: BaseException) -> str | None:
    """The one-line message of a user error, or None for anything else (a bug: let it raise).

    User errors: :data:`USER_ERRORS`, and a file-system error on a named path (a folder that
    cannot be written, a disk that is full).
    """
    if isinstance(err, USER_ERRORS):
        return str(err)
    if isinstance(err, OSError) and err.filename:
        return (
            f"{err.filename}: {err.strerror or type(err).__name__} — check the path, its "
            f"permissions and the free space"
        )
    return None


def run_main(main: Callable[..., object], prog: str, argv=None) -> None:
    """Run ``main(argv)``; a user error becomes one line on stderr and exit status 2."""
    try:
        from experiments import distributed  # under torchrun: join the job (docs/distributed.md)

        distributed.init()
        main(argv)
    except (*USER_ERRORS, OSError) as err:
        message = user_error_message(err)
        if message is None:
            raise
        fail(prog, message)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` for options that take a value, not for on/off flags (whose
    "default" is only argparse's internal True/False) nor for ``None`` defaults."""

    def _get_help_string(self, action):
        if action.nargs == 0 or action.default is None:
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line (no usage block) and exit 2.

    The help lists defaults with :class:`HelpFormatter` unless another formatter is given.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        if "—" not in message:  # argparse's own messages say what, not how to fix it
            message = f"{message} — see {self.prog} --help"
        fail(self.prog, message)


# --------------------------------------------------------------------------- validators


def _number(text: str, kind: type, what: str):
    try:
        value = kind(text)
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {noun} — give {what}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not finite — give {what}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (learning rates, widths of kernels, …)."""
    value = _number(text, float, "a number > 0")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not positive — give a number > 0")
    return value


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number >= 0 (weight decay, clipping thresholds, step sizes)."""
    value = _number(text, float, "a number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative — give a number >= 0")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (rank r, epochs, batch sizes)."""
    value = _number(text, int, "an integer >= 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is less than 1 — give an integer >= 1")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _number(text, int, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative — give an integer >= 0")
    return value


def existing_path(text: str) -> Path:
    """argparse type: a path that exists (file or folder)."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text} does not exist — check the path")
    return path


# --------------------------------------------------------------------------- threads, device


def add_threads_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--threads N``: torch CPU threads (default: torch's choice)."""
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        metavar="N",
        help="torch CPU threads (default: torch's choice, usually one per "
        "core); results can differ in the last bits between thread counts",
    )


def apply_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` when given."""
    if threads:
        if threads < 1:
            raise ConfigError(f"--threads {threads} — give a number of threads >= 1")
        torch.set_num_threads(int(threads))


def resolve_device_flag(device: str | None, flag: str = "--cuda") -> torch.device:
    """The torch device of ``--cuda`` / ``--use-cuda`` / ``--device NAME``.

    Without a usable GPU the error says to drop the flag (or pick the CPU), not torch's wording.
    """
    name = "cpu" if device is None else str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{flag} {name!r} is not a device — use cpu, cuda or cuda:K") from None
    if dev.type == "cuda":
        fix = f"drop {flag}" if flag != "--device" else "use --device cpu"
        if not torch.cuda.is_available():
            raise ConfigError(
                f"{flag}: this machine has no CUDA GPU that torch can use — {fix} to run on the CPU"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"{flag} {name}: only {torch.cuda.device_count()} GPU(s) — "
                f"pick an index below {torch.cuda.device_count()}"
            )
    try:
        return resolve_device(dev)
    except RuntimeError as err:  # pragma: no cover - resolve_device agrees with the checks
        raise ConfigError(f"{flag}: {err}") from None


# --------------------------------------------------------------------------- progress


def is_tty(stream=None) -> bool:
    """Whether ``stream`` (default stderr, where tqdm draws) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress_bar(iterable=None, *, enabled: bool = True, nested: bool = False, **kwargs):
    """A tqdm bar, drawn only when ``enabled`` and stderr is a terminal.

    In a log file a bar is a stream of carriage returns, and a nested bar (``nested``, e.g. the
    batches inside an epoch bar) adds cursor-movement escape codes, so both stay quiet there;
    the programs log one summary line per epoch instead (``--human`` for periodic lines).
    """
    disable = not enabled or not is_tty() or os.environ.get("TQDM_DISABLE") == "1"
    kwargs.setdefault("dynamic_ncols", True)
    if nested:
        kwargs.setdefault("leave", False)
    return tqdm(iterable, disable=disable, **kwargs)
