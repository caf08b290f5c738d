"""Files written so that nothing is lost: atomic writes and their stale temporaries.

:func:`atomic_write` writes a temporary sibling ``.NAME.tmp<PID>``, fsyncs it and renames it
over the file: a reader, or a crash, sees the old file or the new one, never a torn one. A
crash can leave the temporary behind; the next write into the folder removes temporaries
whose process no longer runs (:func:`clean_stale_temporaries`). Every file the library and
the programs write goes through here.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "clean_stale_temporaries"]

log = logging.getLogger("inf.fileio")

_TMP = re.compile(r"^\..+\.tmp(\d+)$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else
    return True


def clean_stale_temporaries(folder) -> list[Path]:
    """Remove ``.NAME.tmp<PID>`` files in ``folder`` whose process no longer runs.

    They are what an interrupted :func:`atomic_write` leaves; a live process's temporaries are
    kept (it may be writing). Returns the removed paths.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        match = _TMP.match(path.name)
        if match and path.is_file() and not _pid_alive(int(match.group(1))):
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass
    if removed:
        log.info(
            "removed %d stale temporary file(s) of an interrupted run in %s: %s",
            len(removed),
            folder,
            ", ".join(p.name for p in removed),
        )
    return removed


def atomic_write(path, write: Callable[[io.BufferedWriter], object]) -> None:
    """``write(f)`` into ``.NAME.tmp<PID>`` next to ``path``, fsync, then rename it over
    ``path``: a reader (or an interrupted run) sees the old file or the new one, never a torn
    one. Stale temporaries of dead processes in the folder are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path.parent)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
