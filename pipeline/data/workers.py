"""The training loader's worker processes: how they live and die beside their training process.

Slurm signals every process of a job step: USR1 before the time limit, TERM on preemption. A
worker ignores both, so that its training process can finish the step and save, until that
process exits, on success or on an exception: then TERM ends the worker, or the exit would wait
for it forever. If the training process dies without exiting (SIGKILL), the kernel kills the
worker (PR_SET_PDEATHSIG, Linux only).
"""

import atexit
import ctypes
import functools
import multiprocessing.util  # registers multiprocessing's exit handler before ours (see worker_init)
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_exiting = None  # set to True as the training process exits (see worker_init)


def worker_init() -> Callable[[int], None]:
    """The DataLoader's worker_init_fn for training workers. On first use it registers the exit
    flag the workers read: multiprocessing's own exit handler terminates (SIGTERM), then joins,
    its child processes, and atexit runs handlers last-registered first, so ours runs before it."""
    global _exiting
    if _exiting is None:
        _exiting = multiprocessing.RawValue(ctypes.c_bool, False)
        atexit.register(setattr, _exiting, "value", True)
    return functools.partial(set_up_worker, _exiting)


def set_up_worker(exiting: ctypes.c_bool, worker_id: int) -> None:
    """Runs in each training loader worker; `exiting` is the exit flag (passed on, for any start method)."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0) if exiting.value else None)
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
