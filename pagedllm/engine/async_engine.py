"""AsyncLLMEngine: the server's driver of an LLMEngine.

One background thread owns the engine: it applies the adds and aborts that
handlers queue, then steps. Every engine mutation happens on that thread, so the
engine needs no locks, and the model step never blocks the event loop. Each
`generate` call gets its outputs (per-step deltas) through its own asyncio
queue; closing or cancelling the call aborts its requests, freeing their blocks
right after the step in progress.

Test hook: with the environment variable PAGEDLLM_FAULT_INJECT_STEP=N, the N-th
model step (counting from 1) raises instead of running, so that tests can check
end to end how a failing step is reported. Never set it in production.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from pagedllm.core.scheduler import SchedulerStats
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# Called on the engine thread after every loop turn: (stats, outputs, turn start time).
StepObserver = Callable[[SchedulerStats, list[RequestOutput], float], None]
FAULT_INJECT_ENV = "PAGEDLLM_FAULT_INJECT_STEP"


class EngineDeadError(RuntimeError):
    """The engine loop stopped (a step failed, or the server is shutting down)."""


@dataclass(frozen=True)
class EngineRequest:
    """A tokenized, validated prompt to add to the engine."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    # Only requests with the same salt share prefix-cache blocks (LLMEngine.add_tokenized_request).
    cache_salt: str | None = None


class _Command(enum.Enum):
    ADD = "add"
    ABORT = "abort"
    STOP = "stop"


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, step_observer: StepObserver | None = None) -> None:
        self.engine = engine
        self._observer = step_observer
        self._commands: queue.SimpleQueue[tuple[_Command, list]] = queue.SimpleQueue()
        # Engine request id -> the queue of the generate() call that owns it (event loop only).
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.error: EngineDeadError | None = None
        # Written by the engine thread, read by handlers (plain attribute reads are atomic).
        self.stats: SchedulerStats = engine.engine_core.stats()
        self._num_submitted = 0  # requests handed to the thread (event loop writes)
        self._num_admitted = 0  # of those, added to the engine (engine thread writes)
        self._num_steps = 0
        self._fault_step = int(os.environ.get(FAULT_INJECT_ENV) or 0)  # the test hook; 0: off

    # ---- lifecycle (event loop) --------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="pagedllm-engine", daemon=True)
        self._thread.start()

    def fail_all_threadsafe(self, reason: str) -> None:
        """From any thread (or a signal handler): fail every in-flight request, whose
        callers then abort it, and refuse new ones."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._fail_all, EngineDeadError(reason))

    async def shutdown(self) -> None:
        if self._thread is None:
            return
        self._fail_all(EngineDeadError("the server is shutting down"))
        self._commands.put((_Command.STOP, []))
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        self.engine.engine_core.shutdown()

    @property
    def is_healthy(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    @property
    def num_waiting(self) -> int:
        """Requests not yet running: the scheduler's queue plus those not yet handed to it."""
        return self.stats.num_waiting + self._num_submitted - self._num_admitted

    # ---- requests (event loop) ---------------------------------------------------

    async def generate(self, requests: list[EngineRequest]) -> AsyncIterator[RequestOutput]:
        """Add the requests; yield their deltas as they come, until all finished.
        Raises EngineDeadError if the engine stops, ValueError if the engine
        refuses a request. Use with contextlib.aclosing so that leaving early
        aborts at once."""
        if not self.is_healthy:
            raise self.error or EngineDeadError("the engine is not running")
        outputs: asyncio.Queue = asyncio.Queue()
        unfinished = {request.request_id for request in requests}
        for request_id in unfinished:
            self._queues[request_id] = outputs
        self._num_submitted += len(requests)
        self._commands.put((_Command.ADD, requests))
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
            if unfinished:
                self._commands.put((_Command.ABORT, list(unfinished)))

    def _dispatch(self, items: list[tuple[str, RequestOutput | Exception]]) -> None:
        for request_id, item in items:
            outputs = self._queues.get(request_id)
            if outputs is not None:  # None: its caller left (aborted) meanwhile
                outputs.put_nowait(item)

    def _fail_all(self, error: EngineDeadError) -> None:
        self.error = error
        for outputs in set(self._queues.values()):
            outputs.put_nowait(error)

    # ---- the engine thread --------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                commands = self._next_commands()
                if any(kind is _Command.STOP for kind, _ in commands):
                    return
                started = time.monotonic()
                outputs, num_added = self._apply(commands)
                if self.engine.has_unfinished_requests():
                    outputs += self._step()
                self.stats = self.engine.engine_core.stats()
                # Counted only now that self.stats includes them: num_waiting may over-count, never under.
                self._num_admitted += num_added
                if self._observer is not None:
                    self._observer(self.stats, outputs, started)
                if outputs:
                    self._loop.call_soon_threadsafe(self._dispatch, [(o.request_id, o) for o in outputs])
        except Exception as failure:  # noqa: BLE001 - any failure kills the loop; clients get a clean 503
            logger.exception("engine loop failed; the engine is dead and in-flight requests fail")
            # The type says what happened; the message and trace may hold paths, so they stay in the log.
            error = EngineDeadError(f"the engine stopped after an internal error ({type(failure).__name__}); "
                                    "see the server log")
            self._loop.call_soon_threadsafe(self._fail_all, error)

    def _step(self) -> list[RequestOutput]:
        self._num_steps += 1
        if self._num_steps == self._fault_step:
            raise RuntimeError(f"fault injected into model step {self._num_steps} ({FAULT_INJECT_ENV})")
        return self.engine.step()

    def _next_commands(self) -> list[tuple[_Command, list]]:
        """Block while idle; otherwise take whatever arrived during the last step."""
        commands = []
        if not self.engine.has_unfinished_requests():
            commands.append(self._commands.get())
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _apply(self, commands: list[tuple[_Command, list]]) -> tuple[list[RequestOutput], int]:
        """Apply adds and aborts in arrival order -> (aborted requests' outputs, number added)."""
        aborted, num_added = [], 0
        for kind, payload in commands:
            if kind is _Command.ABORT:
                aborted += self.engine.abort_request(payload)
                continue
            for request in payload:
                try:
                    self.engine.add_tokenized_request(request.request_id, request.prompt, request.prompt_token_ids,
                                                      request.params, request.arrival_time, stream=True,
                                                      cache_salt=request.cache_salt)
                except ValueError as error:
                    self._loop.call_soon_threadsafe(self._dispatch, [(request.request_id, error)])
            num_added += len(payload)
        return aborted, num_added
