# Makes the repository root importable for pytest (``inf``, ``experiments``, ``benchmarks``),
# and pins the test session to one thread.
#
# Why one thread: the machines this runs on are often small and shared (CI runners, a laptop
# with other work), where torch's default of one thread per core makes every process compete
# for every core and a 2.5-minute run takes 20 minutes. Single-threaded runs are also
# bit-reproducible whatever the machine. The environment variables must be set before torch
# (and numpy's BLAS) is first imported, which is why this happens at the top of the root
# conftest, before any test module is collected. Set PILIMIT_TEST_THREADS=N to use N threads.
import os

_THREADS = os.environ.get("PILIMIT_TEST_THREADS", "1")
for _var in (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
):
    os.environ[_var] = _THREADS

import torch  # noqa: E402  (after the environment variables on purpose)

torch.set_num_threads(int(_THREADS))
try:
    torch.set_num_interop_threads(int(_THREADS))
except RuntimeError:  # already started by an earlier import in this process; harmless
    pass
