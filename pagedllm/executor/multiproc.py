"""The multi-process executor: one spawned process per rank on this host, driven over pipes.

Each call is pickled once and written to every rank's pipe; the engine then waits
on the pipes and on the processes' sentinels together, so a rank that dies (killed,
OOM) is reported at once as a WorkerError naming it, never a hang. Workers ignore
SIGINT (the engine decides when they stop) and exit when the engine process dies.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
import traceback
import weakref
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

import torch

from pagedllm.config import CacheConfig, ModelConfig
from pagedllm.distributed.rendezvous import tcp_init_method
from pagedllm.executor.distributed import FAILURE_GRACE_S, DistributedExecutor, Failures, start_worker

logger = logging.getLogger(__name__)

_SHUTDOWN = pickle.dumps(("shutdown", ()))
# How long shutdown waits for ranks to exit by themselves before killing them.
_EXIT_TIMEOUT_S = 5.0


class MultiprocExecutor(DistributedExecutor):
    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, world_size: int) -> None:
        self.world_size = world_size
        self.processes: list[BaseProcess] = []
        self.conns: list[Connection] = []
        # Stops the workers on shutdown(), on garbage collection and at interpreter exit.
        self._finalizer = weakref.finalize(self, _stop_workers, self.processes, self.conns)
        context = multiprocessing.get_context("spawn")  # fork would copy threads and CUDA state
        init_method = tcp_init_method("127.0.0.1")
        try:
            for rank in range(world_size):
                conn, child_conn = context.Pipe()
                process = context.Process(
                    target=_worker_main, name=f"pagedllm-rank{rank}", daemon=True,
                    args=(model_config, cache_config, rank, world_size, init_method, child_conn))
                process.start()
                child_conn.close()  # only the child holds its end: its death reads as EOF here
                self.processes.append(process)
                self.conns.append(conn)
            self._gather(Failures())  # each rank replies once its shard is loaded
        except BaseException:
            self.shutdown()
            raise
        logger.info("tensor parallel: %d worker processes (pids %s), rendezvous %s", world_size,
                    [p.pid for p in self.processes], init_method)

    def _call_ranks(self, method: str, args: tuple) -> list[Any]:
        message = pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)
        failures = Failures()
        for rank, conn in enumerate(self.conns):
            try:
                conn.send_bytes(message)
            except OSError:  # its process is gone
                failures.died(rank, self._exit_status(rank))
        return self._gather(failures)

    def _gather(self, failures: Failures) -> list[Any]:
        """Every rank's reply, in rank order; raises WorkerError on any failure."""
        results: list[Any] = [None] * self.world_size
        pending = {rank for rank in range(self.world_size) if rank not in failures}
        deadline = None
        while pending:
            if failures and deadline is None:
                deadline = time.monotonic() + FAILURE_GRACE_S
            waitables = {self.conns[r]: r for r in pending} | {self.processes[r].sentinel: r for r in pending}
            ready = wait(list(waitables), None if deadline is None else max(0.0, deadline - time.monotonic()))
            if not ready:
                break  # the others are still busy (stuck in a collective); the failure is known
            for rank in {waitables[obj] for obj in ready}:
                pending.discard(rank)
                try:
                    ok, value = self.conns[rank].recv()
                except (EOFError, OSError):
                    failures.died(rank, self._exit_status(rank))
                    continue
                if ok:
                    results[rank] = value
                else:
                    failures.raised(rank, value)
        if failures:
            raise failures.error()
        return results

    def _exit_status(self, rank: int) -> str:
        return exit_status(self.processes[rank])

    def _check_ranks(self) -> None:
        failures = Failures()
        for rank, process in enumerate(self.processes):
            if not process.is_alive():
                failures.died(rank, self._exit_status(rank))
        if failures:
            raise failures.error()

    def shutdown(self) -> None:
        self._finalizer()


def _stop_workers(processes: list[BaseProcess], conns: list[Connection]) -> None:
    """Ask every rank to exit, then kill whichever has not (stuck in a collective)."""
    for conn in conns:
        try:
            conn.send_bytes(_SHUTDOWN)
        except OSError:
            pass
    deadline = time.monotonic() + _EXIT_TIMEOUT_S
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    for conn in conns:
        conn.close()


# ---- inside a worker process ---------------------------------------------------------


def _worker_main(model_config: ModelConfig, cache_config: CacheConfig, rank: int, world_size: int,
                 init_method: str, conn: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exit_with_parent()
    if model_config.device == "cpu":
        # The ranks share this host's cores; each one's default (all of them) would oversubscribe.
        torch.set_num_threads(max(1, torch.get_num_threads() // world_size))
    ok, worker = _call(start_worker, model_config, cache_config, rank, world_size, init_method)
    conn.send((ok, None if ok else worker))
    if not ok:
        return
    while True:
        try:
            method, args = pickle.loads(conn.recv_bytes())
        except EOFError:  # the engine closed the pipe
            return
        if method == "shutdown":
            return
        conn.send(_call(getattr(worker, method), *args))


def _call(function, *args) -> tuple[bool, Any]:
    """(True, result) or (False, the formatted traceback)."""
    try:
        return True, function(*args)
    except Exception:  # noqa: BLE001 - every failure goes back to the engine
        return False, traceback.format_exc()


def exit_status(process: BaseProcess) -> str:
    """How a child process ended, for error messages: 'pid N, killed by SIGKILL' / 'pid N, exit code 1'."""
    process.join(timeout=1.0)  # its pipe may close a moment before the exit status is ready
    code = process.exitcode
    how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
    return f"pid {process.pid}, {how}"


def exit_with_parent() -> None:
    """Leave no orphan: exit as soon as the parent process (the engine, or the server
    for an engine core) dies, whatever this process is doing (loading weights, blocked
    in a collective, stepping)."""
    parent = multiprocessing.parent_process()

    def watch() -> None:
        wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="pagedllm-parent-watch", daemon=True).start()
