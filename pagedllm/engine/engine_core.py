"""EngineCore: the scheduler and the executor, stepped together, and EngineCoreRequest,
the one validated request type that the offline LLM and the server both hand it."""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass

from pagedllm.config import EngineConfig
from pagedllm.core.kv_cache_manager import KVCacheManager, cdiv
from pagedllm.core.scheduler import Scheduler, SchedulerStats
from pagedllm.core.scheduler_output import EngineCoreOutput, GrammarBitmask, SchedulerOutput
from pagedllm.request import Request, RequestStatus
from pagedllm.sampling_params import SamplingParams
from pagedllm.structured_output.grammar import GrammarCompiler, fill_bitmask

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineCoreRequest:
    """A tokenized prompt the input processor has validated (InputProcessor.validate):
    token ids and parameters only, the text stays with the caller. It crosses to an
    engine-core process as it is (core_process.py)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    # Only requests with the same salt share prefix-cache blocks (None: all unsalted ones).
    cache_salt: str | None = None

    @property
    def child_ids(self) -> list[str]:
        """The scheduler's request per sample: the id itself, or id#0..id#n-1 for n > 1."""
        n = self.params.n
        return [self.request_id] if n == 1 else [f"{self.request_id}#{i}" for i in range(n)]


def create_executor(config: EngineConfig):
    world_size = config.parallel.tensor_parallel_size
    if world_size == 1:
        from pagedllm.executor.uniproc import UniprocExecutor

        return UniprocExecutor(config.model, config.cache)
    if config.parallel.distributed_executor_backend == "ray":
        from pagedllm.executor.ray_executor import RayExecutor

        return RayExecutor(config.model, config.cache, world_size)
    from pagedllm.executor.multiproc import MultiprocExecutor

    return MultiprocExecutor(config.model, config.cache, world_size)


class EngineCore:
    def __init__(self, config: EngineConfig, grammar_compiler: GrammarCompiler | None) -> None:
        """grammar_compiler: compiles requests' structured_outputs (None: a model without
        tokenizer, whose requests the input processor already refuses them)."""
        self.config = config
        self.grammar_compiler = grammar_compiler
        self.executor = create_executor(config)
        try:
            self._init_kv_cache(config)
        except BaseException:
            self.executor.shutdown()  # worker processes must not outlive a failed start
            raise
        kv_cache_manager = KVCacheManager(self.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching,
                                          self.executor.attention_window())
        self.vocab_size = config.model.hf_config.vocab_size
        self.scheduler = Scheduler(kv_cache_manager, config.scheduler.max_num_seqs,
                                   config.scheduler.max_num_batched_tokens, config.model.max_model_len)
        # What exists now lives as long as the engine (imported modules, the model, one
        # Block per KV block): ~222 000 objects that each of Python's full collections
        # walked, a 150 ms pause of every running request (bfloat16 SmolLM2, 4 GiB of
        # KV). Frozen, they are left out: a full collection then takes 0.1 ms.
        gc.collect()
        gc.freeze()

    def _init_kv_cache(self, config: EngineConfig) -> None:
        block_size = config.cache.block_size
        num_blocks = self.executor.determine_num_blocks()
        max_model_len = config.model.max_model_len
        needed = cdiv(max_model_len, block_size)
        bytes_per_block = self.executor.bytes_per_block()
        if num_blocks < needed:
            raise ValueError(
                f"the KV cache holds {num_blocks} blocks ({num_blocks * block_size} tokens) but one request "
                f"of max_model_len={max_model_len} tokens needs {needed} blocks "
                f"({needed * bytes_per_block / 2**30:.3f} GiB); raise kv_cache_memory / num_kv_blocks "
                f"or lower max_model_len")
        self.executor.init_kv_cache(num_blocks)
        self.num_blocks = num_blocks
        self.kv_cache_bytes = num_blocks * bytes_per_block
        logger.info("KV cache: %d blocks x %d tokens = %d tokens, %.3f GiB (%s)%s", num_blocks, block_size,
                    num_blocks * block_size, self.kv_cache_bytes / 2**30, config.cache.kv_dtype(config.model.dtype),
                    f" on each of {config.parallel.tensor_parallel_size} ranks"
                    if config.parallel.tensor_parallel_size > 1 else "")

    def add_request(self, core_request: EngineCoreRequest) -> None:
        """Queue one scheduler request per sample. Raises ValueError if the grammar does
        not compile (the input processor compiled it already: a cache hit in-process)."""
        params = core_request.params
        grammar = None
        if params.structured_outputs is not None:
            grammar = self.grammar_compiler.compile(params.structured_outputs)
        samples = []
        for index, child_id in enumerate(core_request.child_ids):
            request = Request(child_id, core_request.prompt_token_ids, params, core_request.arrival_time,
                              sample_index=index, cache_salt=core_request.cache_salt)
            if grammar is not None:
                request.grammar = grammar.new_matcher()  # each sample walks the grammar on its own
            samples.append(request)
        self.scheduler.add_request(samples[0], samples[1:])

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> None:
        self.scheduler.finish_requests(request_ids, status)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.is_empty and not scheduler_output.freed_request_ids:
            return []
        scheduler_output.grammar_bitmask = self._grammar_bitmask(scheduler_output)
        runner_output = self.executor.execute_model(scheduler_output)
        return self.scheduler.update_from_output(scheduler_output, runner_output)

    def _grammar_bitmask(self, scheduler_output: SchedulerOutput) -> GrammarBitmask | None:
        """The masks of the requests with a grammar whose last scheduled token is
        sampled this step (a partial prompt chunk samples nothing)."""
        sampling = []
        for request_id, num_new in scheduler_output.num_scheduled_tokens.items():
            request = self.scheduler.requests[request_id]
            if request.grammar is not None and request.num_computed_tokens + num_new == request.num_tokens:
                sampling.append(request)
        if not sampling:
            return None
        bitmask = fill_bitmask([request.grammar for request in sampling], self.vocab_size)
        return GrammarBitmask([request.request_id for request in sampling], bitmask)

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    def shutdown(self) -> None:
        self.executor.shutdown()
