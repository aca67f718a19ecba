"""Run a function in N real processes joined by a gloo process group on 127.0.0.1 (for tests).

Multi-rank behaviour (collectives, group layouts, tensor-parallel parity) can only be tested with real processes:
mocking ``torch.distributed`` would test the mock. :func:`run_distributed` starts ``world_size`` fresh processes,
initialises ``torch.distributed`` in each, calls ``fn(rank, world_size, *args)`` and returns every rank's result::

    def check(rank: int, world_size: int, n: int) -> float:    # module level: it must be importable by the children
        groups = initialize_parallel_groups(tp=world_size)
        ...
        return value

    values = run_distributed(check, 2, 16)   # [value_of_rank0, value_of_rank1]

Guarantees:

* rendezvous through a ``TCPStore`` that the parent opens on a kernel-chosen port and keeps open, so there is no
  "pick a free port, then hope nobody takes it" race between concurrent test runs;
* an exception in any rank is re-raised in the parent as :class:`DistributedRunError` carrying that rank's full
  traceback (and the other ranks' if they failed too); a rank that dies without reporting (segfault, ``os._exit``)
  is reported with its exit code;
* the ranks still running after a failure (typically blocked in a collective waiting for the dead one) and all ranks
  after ``timeout`` seconds are terminated, then killed; nothing is left behind. A timeout raises ``TimeoutError``
  naming the ranks that had not finished;
* results travel pickled by value (no shared-memory tensor handles that die with the child process).

Start method: by default a ``forkserver`` (where the platform has one, else ``spawn``). Its server process is a fresh
interpreter that imports torch once; every rank is then forked from it, so ranks start in a fraction of a second
instead of paying interpreter start plus ``import torch`` each (8 ranks on 2 cores: ~10 s with spawn). Ranks inherit
nothing from the calling process but its ``sys.path`` and environment variables (no RNG state, no globals), as
with spawn. ``fn`` defined in a script's
``__main__`` falls back to spawn, which re-imports the script; such scripts need the usual
``if __name__ == "__main__":`` guard. Pass ``start_method="spawn"`` to force fully independent interpreters.

Practicalities: group several checks into one run anyway. Each rank gets ``torch.set_num_threads(num_threads)``
(default 1: ranks share the machine's cores). ``fn``, ``args`` and the results must be picklable; ``fn`` must live at
module level in an importable module (pytest test modules are: the ranks get the caller's ``sys.path``).
"""

from __future__ import annotations

import os
import pickle
import queue as queue_module
import socket
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["DistributedRunError", "find_free_port", "run_distributed"]

_HOST = "127.0.0.1"
_GRACE_AFTER_FAILURE_S = 3.0  # let the other ranks report their own errors before they are terminated
_GRACE_AFTER_DEATH_S = 1.0  # a rank that exited may still have its message in flight
_FORKSERVER_PRELOAD = ["torch", "torch.distributed"]


class DistributedRunError(RuntimeError):
    """One or more ranks of :func:`run_distributed` raised or died; the message holds their tracebacks."""

    def __init__(self, message: str, failures: dict[int, str]) -> None:
        super().__init__(message)
        self.failures = failures


def find_free_port(host: str = _HOST) -> int:
    """A TCP port that was free a moment ago (racy by nature; ``run_distributed`` does not rely on it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _worker(
    rank: int,
    world_size: int,
    port: int,
    job: bytes,
    parent_sys_path: list[str],
    parent_environ: dict[str, str],
    results: Any,
    backend: str,
    num_threads: int,
    timeout_s: float,
) -> None:
    """Body of each rank: set up the process group, run ``fn``, report (result or traceback)."""
    try:
        # A forkserver was started with the sys.path and environment of its time: take the caller's current ones.
        sys.path[:0] = [entry for entry in parent_sys_path if entry not in sys.path]
        os.environ.clear()
        os.environ.update(parent_environ)
        fn, args = pickle.loads(job)
        os.environ.update(
            {
                "MASTER_ADDR": _HOST,
                "MASTER_PORT": str(port),
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(world_size),
                "LOCAL_WORLD_SIZE": str(world_size),
            }
        )
        if backend == "gloo" and sys.platform.startswith("linux"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # do not depend on the hostname resolving
        torch.set_num_threads(num_threads)
        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore(_HOST, port, world_size, is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        try:
            payload = pickle.dumps(fn(rank, world_size, *args))
        finally:
            dist.destroy_process_group()
        results.put((rank, True, payload))
    except BaseException:  # everything, SystemExit and KeyboardInterrupt included, must reach the parent
        results.put((rank, False, traceback.format_exc()))


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    backend: str = "gloo",
    num_threads: int = 1,
    start_method: str | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` new processes; return their results in rank order.

    ``torch.distributed`` is initialised (``backend``, default gloo on 127.0.0.1) before ``fn`` runs and destroyed
    after. Raises :class:`DistributedRunError` if any rank fails and ``TimeoutError`` if the ranks have not all
    finished after ``timeout`` seconds. ``start_method`` is a multiprocessing start method; the default is
    ``"forkserver"`` where the platform has it (see the module docstring), else ``"spawn"``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    try:
        job = pickle.dumps((fn, args))
    except Exception as exc:
        raise TypeError(
            f"run_distributed: fn and args must be picklable (fn a module-level function), got {fn!r}: {exc}"
        ) from exc

    if start_method is None and getattr(fn, "__module__", None) == "__main__":
        start_method = "spawn"  # only spawn re-imports the main script, where fn lives
    ctx = _context(start_method)
    results = ctx.Queue()
    # The parent owns the rendezvous store: the port is chosen by the kernel and stays ours until we close it.
    store = dist.TCPStore(_HOST, 0, None, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout))
    processes = [
        ctx.Process(
            target=_worker,
            args=(rank, world_size, store.port, job, list(sys.path), dict(os.environ), results, backend, num_threads,
                  timeout),
            name=f"run_distributed-rank{rank}",
        )
        for rank in range(world_size)
    ]
    outputs: dict[int, Any] = {}
    failures: dict[int, str] = {}
    try:
        for process in processes:
            process.start()
        deadline = time.monotonic() + timeout
        dead_since: dict[int, float] = {}
        timed_out = False
        while len(outputs) + len(failures) < world_size:
            now = time.monotonic()
            if now >= deadline:
                timed_out = not failures
                break
            try:
                rank, ok, payload = results.get(timeout=min(0.1, deadline - now))
            except queue_module.Empty:
                for rank, process in enumerate(processes):
                    if rank in outputs or rank in failures or process.exitcode is None:
                        continue
                    dead_since.setdefault(rank, now)
                    if now - dead_since[rank] > _GRACE_AFTER_DEATH_S:
                        failures[rank] = f"rank {rank} exited with code {process.exitcode} without reporting a result"
                        deadline = min(deadline, now + _GRACE_AFTER_FAILURE_S)
                continue
            if ok:
                outputs[rank] = pickle.loads(payload)
            else:
                failures[rank] = payload
                deadline = min(deadline, time.monotonic() + _GRACE_AFTER_FAILURE_S)
    finally:
        _stop(processes)
        results.close()
        del store

    name = getattr(fn, "__qualname__", repr(fn))
    if failures:
        report = "\n".join(f"----- rank {rank} -----\n{failures[rank].rstrip()}" for rank in sorted(failures))
        stopped = [rank for rank in range(world_size) if rank not in outputs and rank not in failures]
        if stopped:
            report += f"\n(ranks {stopped} were still running and were terminated)"
        raise DistributedRunError(
            f"run_distributed({name}, world_size={world_size}): {len(failures)} rank(s) failed\n{report}", failures
        )
    if timed_out:
        pending = [rank for rank in range(world_size) if rank not in outputs]
        raise TimeoutError(
            f"run_distributed({name}, world_size={world_size}): ranks {pending} not done after {timeout}s"
        )
    return [outputs[rank] for rank in range(world_size)]


def _context(start_method: str | None) -> Any:
    """The multiprocessing context; a default forkserver imports torch once, before its first fork."""
    if start_method is None:
        start_method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        # Only takes effect if this process' fork server is not running yet; modules that fail to import are skipped.
        ctx.set_forkserver_preload(_FORKSERVER_PRELOAD)
    return ctx


def _stop(processes: list[Any]) -> None:
    """Join finished ranks; terminate, then kill, the ones still running."""
    for process in processes:
        if process.pid is None:  # never started
            continue
        process.join(timeout=0.5 if process.exitcode is None else None)
        if process.is_alive():
            process.terminate()
    for process in processes:
        if process.pid is None:
            continue
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join()
