"""An engine core hosted by a Ray actor: `pagedllm serve -dp N --distributed-executor-backend
ray` runs each data-parallel replica wherever the Ray cluster has room for it, on this
machine or another, behind the server's one endpoint.

    API-server process (the Ray driver)                 CoreActor (a Ray worker process)
      RayCore.send(msg) ── actor.send.remote ──▶ commands pipe ──▶ thread: run_core, CoreLoop
      receiver thread: ray.get(actor.reports.remote()) ◀── reports pipe ◀──┘

RayCore is the server's handle, a CoreHandle as CoreProcess is: AsyncLLMEngine uses one
or the other. The actor runs the core process's own run_core (load, CoreReady, CoreLoop) in
a thread, over a pair of pipes inside the actor, so the messages and the loop are the
same. A Ray actor cannot push to its caller, so the receiver thread long-polls: each
`reports` call blocks until the core has reported and returns every report pending (one
call per step while busy, one waiting while idle). When the actor dies (killed, out of
memory, its node lost) that call fails with a RayActorError at once, which reaches
on_death as a core process's EOF does. Ray is optional (`pip install
pagedllm[ray]`): the server imports this module only with the ray backend.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading

from pagedllm.config import EngineConfig
from pagedllm.engine.core_process import (EXIT_TIMEOUT_S, AddRequests, CoreFailed, CoreGone, CoreHandle, CoreReady,
                                          FinishRequests, Shutdown, StepReport, run_core)
from pagedllm.executor.ray_utils import connect, place, release, reserve

logger = logging.getLogger(__name__)

# `reports` blocks while the core is idle, so it runs in a concurrency group of its own.
# Every other method runs on the default group's one thread, which (max_concurrency 1)
# keeps the order they were sent in: AddRequests before the FinishRequests that aborts it.
REPORTS_GROUP = "reports"


class CoreActor:
    """One engine core in a Ray actor (made one by `ray.remote` at run time)."""

    def __init__(self, config: EngineConfig, replica: int, log_level: int, num_threads: int | None) -> None:
        core_commands, self._commands = multiprocessing.Pipe(duplex=False)
        self._reports, core_reports = multiprocessing.Pipe(duplex=False)
        # Held here too, so that the core thread's end (after Shutdown or CoreFailed) closes
        # nothing: its last reports stay readable, with no EOF racing them.
        self._core_ends = (core_commands, core_reports)
        self._core = threading.Thread(target=run_core, name=f"pagedllm-core{replica}", daemon=True,
                                      args=(config, replica, core_commands, core_reports, log_level, num_threads))
        self._core.start()  # loading in the background: the replicas load in parallel

    def send(self, message: AddRequests | FinishRequests | Shutdown) -> None:
        self._commands.send(message)

    def reports(self) -> list[CoreReady | CoreFailed | StepReport]:
        """Block until the core has reported; every report it has sent since the last call."""
        reports = [self._reports.recv()]
        while self._reports.poll():
            reports.append(self._reports.recv())
        return reports

    def join(self) -> None:
        """Return once the core thread has stopped (after Shutdown), its executor freed."""
        self._core.join()


def _bundle(ray, config: EngineConfig) -> dict[str, float]:
    """What one replica's actor holds. With -tp 1 it runs the model: one GPU on CUDA; on CPUs
    its share of the cluster's cores, as the core processes split one machine's. With -tp > 1
    its ranks are Ray actors holding their own, and the core only schedules: one CPU."""
    if config.parallel.tensor_parallel_size > 1:
        return {"CPU": 1}
    if config.model.device == "cuda":
        return {"CPU": 1, "GPU": 1}
    return {"CPU": max(1, int(ray.cluster_resources().get("CPU", 0)) // config.parallel.data_parallel_size)}


class RayCore(CoreHandle):
    """An engine core in a Ray actor, wherever the cluster has room for it."""

    def __init__(self, config: EngineConfig, replica: int) -> None:
        super().__init__(replica)
        self._ray = ray = connect()
        bundle = _bundle(ray, config)
        self.placement_group = reserve([bundle], "PACK", f"engine core {replica} ({bundle})")
        # The core's torch threads are the CPUs its actor holds.
        num_threads = int(bundle["CPU"]) if config.model.device == "cpu" else None
        actor_class = ray.remote(concurrency_groups={REPORTS_GROUP: 1})(CoreActor)
        self.actor = place(actor_class, self.placement_group, 0, bundle).remote(
            config, replica, logging.getLogger().getEffectiveLevel(), num_threads)

    def _receive(self) -> list[CoreReady | CoreFailed | StepReport]:
        """The long poll (see the module's docstring)."""
        try:
            return self._ray.get(self.actor.reports.options(concurrency_group=REPORTS_GROUP).remote())
        except self._ray.exceptions.RayError as error:
            if not self._stopping:  # Ray's account names hosts and ids: the log gets it, clients a summary
                logger.error("engine core %d's Ray actor died: %s", self.replica, error)
            raise CoreGone(f"engine core {self.replica} (a Ray actor) died") from None

    def send(self, message: AddRequests | FinishRequests | Shutdown) -> None:
        """Queue a command; a dead actor is reported by the receiver, not here."""
        self.actor.send.remote(message)

    def is_alive(self) -> bool:
        # The receiver runs until the actor dies or the core fails (or shutdown kills it).
        return self._receiver is None or self._receiver.is_alive()

    def shutdown(self) -> None:
        """Ask the core to stop (it finishes the step in progress and frees its executor),
        then kill the actor (after EXIT_TIMEOUT_S at most) and free its placement group."""
        self._stopping = True
        self.send(Shutdown())
        try:
            self._ray.get(self.actor.join.remote(), timeout=EXIT_TIMEOUT_S)
        except self._ray.exceptions.RayError:
            pass  # it died already, or is stuck: the kill below ends it either way
        release([self.actor], self.placement_group)
