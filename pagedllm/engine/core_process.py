"""The engine core in its own process, so that the server's model steps never share a
GIL with HTTP, JSON, tokenization, detokenization or stop-string matching.

    API-server process                          engine-core process (one per replica)
      CoreProcess.send(AddRequests | FinishRequests | Shutdown) ──▶ CoreLoop: apply, step
      receiver thread ◀── StepReport (every output of one step, stats) ──┘

Messages are the dataclasses below, pickled over a pair of one-way pipes; they carry
token ids, never text. A thread of the core reads its command pipe as commands arrive,
steps or not: a pipe holds 64 KiB, and while the core ran a long prefill step a burst
of requests (256 at once) filled it, so the server's event loop blocked in send() until
the step ended (/metrics answered after 3-4 s). The core loop waits for that thread's
commands while idle; while requests run it takes whatever arrived during the last step
before each step, so adds and aborts wait at most one step. The core process ignores
SIGINT (the server decides when it stops), exits when its pipe closes or the server
process dies, and reports a failing step before it exits; the server sees its death
as EOF on the report pipe at once.
With -dp N and the ray backend a Ray actor hosts the same run_core and loop instead
(ray_core.py).

Test hook: with the environment variable PAGEDLLM_FAULT_INJECT_STEP=N, the N-th model
step of each core (counting from 1) raises instead of running, so that tests can check
end to end how a failing step is reported. Never set it in production.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection

from pagedllm.config import EngineConfig
from pagedllm.core.scheduler import SchedulerStats
from pagedllm.core.scheduler_output import EngineCoreOutput
from pagedllm.engine.engine_core import EngineCore, EngineCoreRequest
from pagedllm.request import RequestStatus

logger = logging.getLogger(__name__)

FAULT_INJECT_ENV = "PAGEDLLM_FAULT_INJECT_STEP"
# How long shutdown waits for a core to exit by itself before killing it.
EXIT_TIMEOUT_S = 10.0


# ---- messages ----------------------------------------------------------------------------


@dataclass
class AddRequests:
    requests: list[EngineCoreRequest]


@dataclass
class FinishRequests:
    """Scheduler request ids (samples) to finish: aborted, or stopped by a stop string."""

    request_ids: list[str]
    status: RequestStatus


@dataclass
class Shutdown:
    pass


@dataclass
class CoreReady:
    num_blocks: int
    kv_cache_bytes: int
    pid: int  # of the process hosting the core (a Ray actor's worker process), for the log


@dataclass
class CoreFailed:
    """The core could not start (error: the exception, re-raised by the server) or its
    loop failed (reason: what clients are told; the trace stays in the core's log)."""

    reason: str
    error: BaseException | None = None


@dataclass
class StepReport:
    """One loop turn: the step's outputs, the scheduler's stats after it, when the turn
    started (time.monotonic), how many AddRequests requests it admitted, and the
    requests it refused (id, reason)."""

    outputs: list[EngineCoreOutput]
    stats: SchedulerStats
    turn_started: float
    num_admitted: int
    refused: list[tuple[str, str]]


# ---- inside the engine-core process -------------------------------------------------------


_SERVER_GONE = object()  # what the command reader queues when the pipe closes


class CoreLoop:
    def __init__(self, core: EngineCore, commands: Connection, reports: Connection) -> None:
        self.core = core
        self.commands = commands
        self.reports = reports
        self.num_steps = 0
        self.fault_step = int(os.environ.get(FAULT_INJECT_ENV) or 0)  # the test hook; 0: off
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._read_commands, name="pagedllm-core-commands", daemon=True).start()

    def _read_commands(self) -> None:
        """The command pipe -> the inbox, as commands arrive (see the module docstring)."""
        while True:
            try:
                command = self.commands.recv()
            except (EOFError, OSError):
                self._inbox.put(_SERVER_GONE)
                return
            self._inbox.put(command)
            if isinstance(command, Shutdown):
                return

    def run(self) -> None:
        while True:
            try:
                commands = self._next_commands()
            except (EOFError, OSError):
                return  # the server is gone
            started = time.monotonic()
            num_admitted, refused = 0, []
            for command in commands:
                if isinstance(command, Shutdown):
                    return
                if isinstance(command, FinishRequests):
                    self.core.finish_requests(command.request_ids, command.status)
                    continue
                for request in command.requests:
                    try:
                        self.core.add_request(request)
                    except ValueError as error:
                        refused.append((request.request_id, str(error)))
                num_admitted += len(command.requests)
            outputs = self._step() if self.core.has_unfinished_requests() else []
            self.reports.send(StepReport(outputs, self.core.stats(), started, num_admitted, refused))

    def _next_commands(self) -> list:
        """Block while idle; otherwise take whatever arrived during the last step.
        Raises EOFError once the server is gone."""
        commands = [] if self.core.has_unfinished_requests() else [self._inbox.get()]
        while True:
            try:
                commands.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        if any(command is _SERVER_GONE for command in commands):
            raise EOFError
        return commands

    def _step(self) -> list[EngineCoreOutput]:
        self.num_steps += 1
        if self.num_steps == self.fault_step:
            raise RuntimeError(f"fault injected into model step {self.num_steps} ({FAULT_INJECT_ENV})")
        return self.core.step()


def _core_main(config: EngineConfig, replica: int, commands: Connection, reports: Connection,
               log_level: int) -> None:
    from pagedllm.executor.multiproc import exit_with_parent

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exit_with_parent()
    num_threads = None
    num_replicas = config.parallel.data_parallel_size
    if num_replicas > 1 and config.model.device == "cpu":
        import torch

        # The replicas share this host's cores; each one's default (all of them) would oversubscribe.
        num_threads = max(1, torch.get_num_threads() // num_replicas)
    run_core(config, replica, commands, reports, log_level, num_threads)


def run_core(config: EngineConfig, replica: int, commands: Connection, reports: Connection, log_level: int,
             num_threads: int | None) -> None:
    """Load the engine core, report CoreReady (or CoreFailed with the start-up error), then
    run its loop until Shutdown, reporting a failure as CoreFailed. A core process runs
    this in its main thread, a Ray actor (ray_core.py) in a thread of its own.
    num_threads: torch's CPU threads (None: torch's default)."""
    # Imported here: the API process never needs the executor (torch) modules this pulls in.
    from pagedllm.engine.input_processor import eos_token_ids, load_tokenizer
    from pagedllm.structured_output.grammar import GrammarCompiler

    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s %(name)s[core{replica}]: %(message)s")
    if num_threads is not None:
        import torch

        torch.set_num_threads(num_threads)
    try:
        tokenizer = load_tokenizer(config.model)
        compiler = None
        if tokenizer is not None:
            compiler = GrammarCompiler(tokenizer, config.model.hf_config.vocab_size,
                                       eos_token_ids(config.model, tokenizer))
            compiler.prepare()  # llguidance's vocabulary now, not under the first structured request
        core = EngineCore(config, compiler)
    except BaseException as error:  # noqa: BLE001 - the server re-raises it as its start-up error
        reports.send(_start_failure(error))
        return
    try:
        reports.send(CoreReady(core.num_blocks, core.kv_cache_bytes, os.getpid()))
        CoreLoop(core, commands, reports).run()
    except Exception as failure:  # noqa: BLE001 - any failure kills the core; the server answers 503
        logger.exception("engine core %d failed; it stops and its requests fail", replica)
        # The type says what happened; the message and trace may hold paths, so they stay in the log.
        reason = f"the engine stopped after an internal error ({type(failure).__name__}); see the server log"
        try:
            reports.send(CoreFailed(reason))
        except OSError:
            pass
    finally:
        core.shutdown()


def _start_failure(error: BaseException) -> CoreFailed:
    """A ValueError (a limit, a bad option) or a missing optional package is the user's
    to fix and keeps its type; anything else becomes a RuntimeError naming it."""
    if not isinstance(error, (ValueError, ImportError)):
        error = RuntimeError(f"the engine core failed to start: {type(error).__name__}: {error}")
    try:
        pickle.dumps(error)
    except Exception:  # noqa: BLE001 - an exception type that cannot cross processes
        error = RuntimeError(f"the engine core failed to start: {type(error).__name__}: {error}")
    return CoreFailed(str(error), error)


# ---- in the API-server process ----------------------------------------------------------


class CoreGone(Exception):
    """The core's process or actor is gone; the message says which and how."""


class CoreHandle:
    """The server's handle on one engine core (replica `replica`), whatever hosts it: a
    local process (CoreProcess) or a Ray actor (ray_core.RayCore). A subclass starts the
    core and provides _receive, send, is_alive and shutdown; this class turns the core's
    reports into wait_ready and the receiver thread."""

    def __init__(self, replica: int) -> None:
        self.replica = replica
        self.ready: CoreReady | None = None
        self._receiver: threading.Thread | None = None
        self._stopping = False  # set by shutdown: the core's end that follows is no news

    def _receive(self) -> list[CoreReady | CoreFailed | StepReport]:
        """Block until the core reports; what it has reported. Raises CoreGone once it is gone."""
        raise NotImplementedError

    def wait_ready(self) -> CoreReady:
        """Block until the core has loaded the model and sized its KV cache; re-raise
        its start-up error (a ValueError names the limit, as in-process)."""
        try:
            message, = self._receive()  # alone: no command was sent yet
        except CoreGone as gone:
            raise RuntimeError(f"{gone} during start-up; see the log above") from None
        if isinstance(message, CoreFailed):
            raise message.error
        self.ready = message
        return message

    def start_receiving(self, on_report: Callable[[int, StepReport], None],
                        on_death: Callable[[int, str], None]) -> None:
        """Hand every report to on_report(replica, report) from a receiver thread;
        on_death(replica, reason) once if the core fails or its host dies."""
        def receive() -> None:
            while True:
                try:
                    messages = self._receive()
                except CoreGone as gone:
                    if not self._stopping:
                        on_death(self.replica, str(gone))
                    return
                for message in messages:
                    if isinstance(message, CoreFailed):
                        on_death(self.replica, message.reason)
                        return
                    on_report(self.replica, message)

        self._receiver = threading.Thread(target=receive, name=f"pagedllm-core{self.replica}-reports", daemon=True)
        self._receiver.start()


class CoreProcess(CoreHandle):
    """An engine core in a process of its own, on this machine."""

    def __init__(self, config: EngineConfig, replica: int) -> None:
        super().__init__(replica)
        context = multiprocessing.get_context("spawn")  # fork would copy threads and torch state
        child_commands, self._commands = context.Pipe(duplex=False)
        self._reports, child_reports = context.Pipe(duplex=False)
        self.process = context.Process(target=_core_main, name=f"pagedllm-core{replica}",
                                       args=(config, replica, child_commands, child_reports,
                                             logging.getLogger().getEffectiveLevel()))
        self.process.start()
        # Only the child holds these ends now: its death reads as EOF here.
        child_commands.close()
        child_reports.close()

    def _receive(self) -> list[CoreReady | CoreFailed | StepReport]:
        try:
            return [self._reports.recv()]
        except (EOFError, OSError):
            raise CoreGone(f"engine core {self.replica} exited ({self.exit_status()})") from None

    def send(self, message: AddRequests | FinishRequests | Shutdown) -> None:
        """Queue a command; a dead core is reported by the receiver, not here."""
        try:
            self._commands.send(message)
        except OSError:
            pass

    def is_alive(self) -> bool:
        return self.process.is_alive()

    def exit_status(self) -> str:
        from pagedllm.executor.multiproc import exit_status

        return exit_status(self.process)

    def shutdown(self) -> None:
        """Ask the core to stop (it finishes the step in progress), then kill it if it
        has not exited in EXIT_TIMEOUT_S."""
        self._stopping = True
        self.send(Shutdown())
        self.process.join(EXIT_TIMEOUT_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self._commands.close()
