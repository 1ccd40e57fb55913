"""What the multi-process and Ray executors share: N ranks outside the engine process.

The engine process only schedules. Every rank (0..N-1) runs in a worker process
or Ray actor and receives the same calls in the same order; each step's plain-data
SchedulerOutput goes to all of them, they run the model together (their
collectives meet in torch.distributed) and rank 0 alone returns the sampled tokens.
Keeping the engine process out of the process group means it never blocks inside
a collective: it only waits for replies, so a dead rank is always noticed.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any

from pagedllm.config import CacheConfig, ModelConfig
from pagedllm.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from pagedllm.worker.worker import Worker

logger = logging.getLogger(__name__)


# A rank killed outright makes its peers fail in their collectives a moment later;
# after the first failure, wait this long for the others so the report names the dead one.
FAILURE_GRACE_S = 1.0


class WorkerError(RuntimeError):
    """A rank died or raised; the executor cannot run further steps."""


class Failures:
    """What went wrong with the ranks during one call."""

    def __init__(self) -> None:
        self.deaths: dict[int, str] = {}
        self.errors: dict[int, str] = {}

    def died(self, rank: int, how: str) -> None:
        self.deaths[rank] = f"worker rank {rank} died ({how})"

    def raised(self, rank: int, traceback_text: str) -> None:
        logger.error("tensor-parallel worker rank %d raised:\n%s", rank, traceback_text)
        self.errors[rank] = f"worker rank {rank} raised {traceback_text.strip().splitlines()[-1]}"

    def __bool__(self) -> bool:
        return bool(self.deaths or self.errors)

    def __contains__(self, rank: int) -> bool:
        return rank in self.deaths or rank in self.errors

    def error(self) -> WorkerError:
        # Deaths first: a peer's failure in a collective is their consequence.
        messages = [self.deaths[r] for r in sorted(self.deaths)] + [self.errors[r] for r in sorted(self.errors)]
        return WorkerError("; ".join(messages))


def start_worker(model_config: ModelConfig, cache_config: CacheConfig, rank: int, world_size: int,
                 init_method: str) -> Worker:
    """Inside the rank's own process: join the process group and load this rank's shard."""
    worker = Worker(model_config, cache_config, rank, world_size, init_method)
    worker.init_device()
    worker.load_model()
    return worker


class DistributedExecutor(ABC):
    """The executor interface on top of `_call_ranks`, which subclasses implement.
    After any failure every call raises: the ranks may be out of step."""

    world_size: int
    _error: WorkerError | None = None

    @abstractmethod
    def _call_ranks(self, method: str, args: tuple) -> list[Any]:
        """Call `Worker.method(*args)` on every rank; their results in rank order.
        Raises WorkerError naming the rank if any rank dies or raises."""

    @abstractmethod
    def _check_ranks(self) -> None:
        """Raises WorkerError if a rank is gone."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stops every rank; safe to call twice."""

    def run_workers(self, method: str, *args: Any) -> list[Any]:
        self._raise_if_failed()
        try:
            return self._call_ranks(method, args)
        except WorkerError as error:
            self._error = error
            raise
        except BaseException as error:
            # Interrupted (Ctrl-C): some ranks may have the call and others not, or
            # replies are still due, so the ranks and the engine are out of step for good.
            self._error = WorkerError(f"a call to the workers was interrupted ({type(error).__name__})")
            raise

    def check_health(self) -> None:
        """Raises WorkerError if a rank is gone or a call failed."""
        self._raise_if_failed()
        try:
            self._check_ranks()
        except WorkerError as error:
            self._error = error
            raise

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise WorkerError(f"the tensor-parallel workers failed earlier: {self._error}")

    def determine_num_blocks(self) -> int:
        # Block ids are global: every rank must hold every block, so the pool is the smallest rank's.
        return min(self.run_workers("determine_num_blocks"))

    def attention_window(self) -> int | None:
        return self.run_workers("attention_window")[0]  # the same model on every rank

    def bytes_per_block(self) -> int:
        """KV bytes of one block on the rank holding the most KV heads (shares can differ by one)."""
        return max(self.run_workers("bytes_per_block"))

    def init_kv_cache(self, num_blocks: int) -> None:
        self.run_workers("init_kv_cache", num_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.run_workers("execute_model", scheduler_output)[0]
