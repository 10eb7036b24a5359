"""Where batch jobs run: worker processes on this machine, or a Dask distributed cluster.

Both are ``concurrent.futures`` executors, so ``run_batch`` has one code path; scheduling, retries after a lost
worker and the workers themselves are the libraries' own.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from concurrent.futures import Executor, ProcessPoolExecutor
from typing import Iterator

from loratools.errors import UsageError


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def local_executor(workers: int) -> Iterator[Executor | None]:
    """``workers`` processes on this machine (None for one: the jobs then run in this process). Each worker
    imports loratools once and runs many jobs, so a job does not pay an interpreter's start-up."""
    if workers <= 1:
        yield None
        return
    # forkserver: workers start from a clean process with loratools imported (not from this one, whose threads
    # a fork would copy in the middle of whatever they hold); spawn where there is no forkserver
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if context.get_start_method() == "forkserver":
        context.set_forkserver_preload(["loratools.batch"])
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        yield pool


@contextlib.contextmanager
def dask_executor(address: str, workers: int | None = None, *, processes: bool = True) -> Iterator[Executor]:
    """An executor on the Dask cluster whose scheduler is at ``address``, or, for ``"local"``, on a new
    ``LocalCluster`` of ``workers`` single-threaded workers (``processes=False`` keeps them in this process, for
    tests). Needs the ``dask`` extra: ``pip install 'loratools[dask]'``."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise UsageError("--dask needs Dask distributed: pip install 'loratools[dask]'") from None
    with contextlib.ExitStack() as stack:
        if address == "local":
            cluster = stack.enter_context(LocalCluster(n_workers=workers or cpu_count(), threads_per_worker=1,
                                                       processes=processes, dashboard_address=None))
            client = stack.enter_context(Client(cluster))
        else:
            try:
                client = stack.enter_context(Client(address, timeout="30s"))
            except (OSError, ValueError, TypeError) as exc:  # unreachable, or not an address (no port, bad scheme)
                first = (str(exc).splitlines() or [""])[0][:200]
                raise UsageError(f"--dask {address!r}: cannot reach a Dask scheduler there ({first}); give "
                                 "tcp://host:port or 'local'") from None
        # each job is a new task (pure=False): a rerun of the same job after its inputs changed is run again
        yield client.get_executor(pure=False)
