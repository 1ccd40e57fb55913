"""AsyncLLMEngine: the server's engine.

The text side lives here, on the event loop: the tokenizer, the input processor
(the handlers validate each prompt once into an EngineCoreRequest) and the output
processor (incremental detokenization, stop strings, logprobs, per-request deltas).
The engine cores -- scheduler, KV cache manager, executor -- run in their own
processes (core_process.py), one per data-parallel replica, or with -dp N and the ray
backend in Ray actors (ray_core.py, the same handle interface), fed token ids; a router
(dp_router.py) picks each request's replica. A receiver thread per core hands its
per-step report to the event loop, which turns it into deltas for the `generate`
calls waiting on them; closing or cancelling a call aborts its requests, freeing
their blocks right after the step in progress. A core that dies fails every request
in flight and turns the engine unhealthy at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

from pagedllm.config import EngineConfig
from pagedllm.core.scheduler import SchedulerStats, combined_stats
from pagedllm.engine.core_process import AddRequests, CoreHandle, CoreProcess, FinishRequests, StepReport
from pagedllm.engine.dp_router import DataParallelRouter
from pagedllm.engine.engine_core import EngineCoreRequest
from pagedllm.engine.input_processor import InputProcessor, load_tokenizer
from pagedllm.engine.output_processor import OutputProcessor
from pagedllm.outputs import RequestOutput
from pagedllm.request import RequestStatus

logger = logging.getLogger(__name__)

# Called on the event loop for every report: (replica, its stats, the deltas, the turn's start time).
StepObserver = Callable[[int, SchedulerStats, list[RequestOutput], float], None]


class EngineDeadError(RuntimeError):
    """An engine core stopped (a step failed, its process died, or the server is shutting down)."""


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig, step_observer: StepObserver | None = None,
                 routing: str = "prefix") -> None:
        """Start the engine cores (config.parallel.data_parallel_size of them, loading in
        parallel) and wait until all are ready; a core's start-up error is raised here."""
        self.config = config
        self.tokenizer = load_tokenizer(config.model)
        self.input_processor = InputProcessor(config.model, self.tokenizer)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._observer = step_observer
        core_class = CoreProcess
        if config.parallel.data_parallel_size > 1 and config.parallel.distributed_executor_backend == "ray":
            from pagedllm.engine.ray_core import RayCore  # Ray is optional: imported only when asked for

            core_class = RayCore
        self.cores: list[CoreHandle] = []
        try:
            for replica in range(config.parallel.data_parallel_size):
                self.cores.append(core_class(config, replica))
            ready = [core.wait_ready() for core in self.cores]
        except BaseException:
            for core in self.cores:
                core.shutdown()
            raise
        self.num_blocks = ready[0].num_blocks  # per replica
        self.kv_cache_bytes = ready[0].kv_cache_bytes
        self.router = DataParallelRouter([r.num_blocks for r in ready], config.cache.block_size, routing)
        idle = SchedulerStats(0, 0, 0.0, 0, 0, 0, 0, 0)
        self.replica_stats: list[SchedulerStats] = [idle] * len(self.cores)
        # Requests sent to a replica that its reports have not counted yet.
        self._num_unadmitted = [0] * len(self.cores)
        # Engine request id -> the queue of the generate() call that owns it.
        self._queues: dict[str, asyncio.Queue] = {}
        # Engine request id -> (its replica, its number of samples) while in flight.
        self._placement: dict[str, tuple[int, int]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.error: EngineDeadError | None = None
        self._stopping = False

    # ---- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """On the event loop: start taking the cores' reports."""
        self._loop = loop = asyncio.get_running_loop()
        for core in self.cores:
            core.start_receiving(lambda replica, report: loop.call_soon_threadsafe(self._on_report, replica, report),
                                 lambda replica, reason: loop.call_soon_threadsafe(self._on_death, replica, reason))

    def fail_all_threadsafe(self, reason: str) -> None:
        """From any thread (or a signal handler): fail every in-flight request, whose
        callers then abort it, and refuse new ones."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._fail_all, EngineDeadError(reason))

    async def shutdown(self) -> None:
        self._stopping = True  # the cores' exits that follow are expected
        self._fail_all(EngineDeadError("the server is shutting down"))
        await asyncio.gather(*(asyncio.to_thread(core.shutdown) for core in self.cores))

    @property
    def is_healthy(self) -> bool:
        return self.error is None and self._loop is not None and all(core.is_alive() for core in self.cores)

    @property
    def stats(self) -> SchedulerStats:
        return combined_stats(self.replica_stats)

    @property
    def num_waiting(self) -> int:
        """Requests not yet running: the schedulers' queues plus those not yet in them."""
        return sum(stats.num_waiting for stats in self.replica_stats) + sum(self._num_unadmitted)

    # ---- requests ---------------------------------------------------------------------

    async def generate(self, requests: list[EngineCoreRequest],
                       prompts: list[str | None] | None = None) -> AsyncIterator[RequestOutput]:
        """Add validated requests (prompts: their text, for the outputs); yield their
        deltas as they come, until all finished. Raises EngineDeadError if an engine
        core stops, ValueError if a core refuses a request. Use with
        contextlib.aclosing so that leaving early aborts at once."""
        if not self.is_healthy:
            raise self.error or EngineDeadError("the engine is not running")
        for request in requests:
            if request.request_id in self._queues:
                raise ValueError(f"request id {request.request_id!r} is already in use")
        outputs: asyncio.Queue = asyncio.Queue()
        batches: dict[int, list[EngineCoreRequest]] = {}
        for request, prompt in zip(requests, prompts or [None] * len(requests)):
            params = request.params
            replica = self.router.route(request.prompt_token_ids, request.cache_salt, params.n)
            self.output_processor.add_request(request.request_id, request.child_ids, prompt,
                                              request.prompt_token_ids, params, True, request.arrival_time)
            self._queues[request.request_id] = outputs
            self._placement[request.request_id] = (replica, params.n)
            batches.setdefault(replica, []).append(request)
        for replica, batch in batches.items():
            self._num_unadmitted[replica] += len(batch)
            self.cores[replica].send(AddRequests(batch))
        unfinished = {request.request_id for request in requests}
        try:
            while unfinished:
                item = await outputs.get()
                if isinstance(item, Exception):
                    raise item
                if item.finished:
                    unfinished.discard(item.request_id)
                yield item
        finally:
            for request in requests:
                self._queues.pop(request.request_id, None)
            for request_id in unfinished:
                self._abort(request_id)

    def _abort(self, request_id: str) -> None:
        """Stop a request its caller left: its samples finish in its core, its blocks free."""
        placement = self._placement.get(request_id)
        if placement is None:
            return  # already finished, refused, or failed with its core
        child_ids = self.output_processor.child_ids(request_id)
        output = self.output_processor.abort(request_id)
        self._release(request_id)
        replica = placement[0]
        self.cores[replica].send(FinishRequests(child_ids, RequestStatus.FINISHED_ABORTED))
        if output is not None and self._observer is not None:
            self._observer(replica, self.replica_stats[replica], [output], time.monotonic())

    def _release(self, request_id: str) -> None:
        replica, num_samples = self._placement.pop(request_id)
        self.router.finished(replica, num_samples)

    def _on_report(self, replica: int, report: StepReport) -> None:
        self.replica_stats[replica] = report.stats
        self._num_unadmitted[replica] -= report.num_admitted
        for request_id, reason in report.refused:
            self.output_processor.abort(request_id)
            self._release(request_id)
            self._dispatch(request_id, ValueError(reason))
        outputs, to_stop = self.output_processor.process_outputs(report.outputs)
        if to_stop:  # samples that reached a stop string: their core stops them now
            self.cores[replica].send(FinishRequests(to_stop, RequestStatus.FINISHED_STOPPED))
        for output in outputs:
            if output.finished:
                self._release(output.request_id)
            self._dispatch(output.request_id, output)
        if self._observer is not None:
            self._observer(replica, report.stats, outputs, report.turn_started)

    def _dispatch(self, request_id: str, item: RequestOutput | Exception) -> None:
        outputs = self._queues.get(request_id)
        if outputs is not None:  # None: its caller left meanwhile
            outputs.put_nowait(item)

    def _on_death(self, replica: int, reason: str) -> None:
        if self._stopping:
            return
        logger.error("engine core %d stopped: %s; failing every request in flight", replica, reason)
        self._fail_all(EngineDeadError(reason))

    def _fail_all(self, error: EngineDeadError) -> None:
        if self.error is None:
            self.error = error
        for request_id in list(self._placement):
            self.output_processor.abort(request_id)
            self._release(request_id)
        for outputs in set(self._queues.values()):
            outputs.put_nowait(error)
