"""The Ray executor: one Ray actor per rank, placed by a placement group, on one
machine or several.

The engine process connects to the Ray cluster (`ray.init()` finds one started
with `ray start`, or starts a local one) and reserves one bundle per rank; PACK
keeps the ranks on as few machines as possible, since every layer all-reduces.
The ranks meet at a free port on rank 0's node and talk through torch.distributed,
as the multi-process executor's do; only the calls and rank 0's result go through Ray.
Ray is optional (`pip install pagedllm[ray]`): imported only here and in ray_utils.py
(connecting, placement, release; shared with the Ray-hosted engine cores).
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from typing import Any

from pagedllm.config import CacheConfig, ModelConfig
from pagedllm.distributed.rendezvous import tcp_init_method
from pagedllm.executor.distributed import FAILURE_GRACE_S, DistributedExecutor, Failures, start_worker
from pagedllm.executor.ray_utils import connect, place, release, reserve

logger = logging.getLogger(__name__)


class RayWorker:
    """One rank inside a Ray actor (made a Ray actor class by `ray.remote` at run time)."""

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, rank: int, world_size: int) -> None:
        self.args = (model_config, cache_config, rank, world_size)
        self.worker = None

    def rendezvous(self) -> str:
        """Called on rank 0: where the ranks meet, on this actor's node."""
        import ray

        return tcp_init_method(ray.util.get_node_ip_address())

    def start(self, init_method: str) -> None:
        self.worker = start_worker(*self.args, init_method)

    def pid(self) -> int:
        return os.getpid()

    def execute_method(self, method: str, *args: Any) -> Any:
        return getattr(self.worker, method)(*args)


class RayExecutor(DistributedExecutor):
    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, world_size: int) -> None:
        ray = connect()
        self.world_size = world_size
        self.actors: list = []
        bundle = {"CPU": 1, "GPU": 1} if model_config.device == "cuda" else {"CPU": 1}
        self.placement_group = reserve([bundle] * world_size, "PACK", f"{world_size} ranks of {bundle}")
        self._finalizer = weakref.finalize(self, release, self.actors, self.placement_group)
        try:
            actor_class = ray.remote(RayWorker)
            for rank in range(world_size):
                self.actors.append(place(actor_class, self.placement_group, rank, bundle).remote(
                    model_config, cache_config, rank, world_size))
            init_method = ray.get(self.actors[0].rendezvous.remote())
            self._gather([actor.start.remote(init_method) for actor in self.actors])
            self.pids = self._gather([actor.pid.remote() for actor in self.actors])
        except BaseException:
            self.shutdown()
            raise
        logger.info("tensor parallel: %d Ray actors (pids %s), rendezvous %s", world_size, self.pids, init_method)

    def _call_ranks(self, method: str, args: tuple) -> list[Any]:
        return self._gather([actor.execute_method.remote(method, *args) for actor in self.actors])

    def _gather(self, refs: list) -> list[Any]:
        """The results of one call per rank, in rank order; raises WorkerError on any failure."""
        import ray

        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        failures = Failures()
        pending, deadline = list(refs), None
        while pending:
            if failures and deadline is None:
                deadline = time.monotonic() + FAILURE_GRACE_S
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, pending = ray.wait(pending, num_returns=1, timeout=timeout)
            if not ready:
                break  # the others are still busy (stuck in a collective); the failure is known
            try:
                ray.get(ready[0])
            except ray.exceptions.RayActorError as e:
                failures.died(rank_of[ready[0]], str(e).strip().splitlines()[0])
            except ray.exceptions.RayTaskError as e:
                failures.raised(rank_of[ready[0]], str(e))
        if failures:
            raise failures.error()
        return ray.get(refs)

    def _check_ranks(self) -> None:
        self._gather([actor.pid.remote() for actor in self.actors])

    def shutdown(self) -> None:
        self._finalizer()
