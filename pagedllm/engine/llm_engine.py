"""LLMEngine: the synchronous driver (input processing, engine core, outputs)."""

from __future__ import annotations

import logging
import time

from pagedllm.config import EngineConfig
from pagedllm.engine.engine_core import EngineCore, EngineCoreRequest
from pagedllm.engine_args import EngineArgs
from pagedllm.engine.input_processor import InputProcessor, PromptInput, load_tokenizer, validate_cache_salt
from pagedllm.engine.output_processor import OutputProcessor
from pagedllm.outputs import RequestOutput
from pagedllm.request import RequestStatus
from pagedllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        started = time.monotonic()
        if config.parallel.data_parallel_size > 1:
            raise ValueError(f"data_parallel_size={config.parallel.data_parallel_size}: the offline engine runs one "
                             "engine core in this process; data-parallel replicas are served by "
                             "`pagedllm serve --data-parallel-size N`")
        self.config = config
        self.tokenizer = load_tokenizer(config.model)  # None with skip_tokenizer_init
        self.input_processor = InputProcessor(config.model, self.tokenizer)
        self.engine_core = EngineCore(config, self.input_processor.grammar_compiler)
        self.output_processor = OutputProcessor(self.tokenizer)
        logger.info("engine ready in %.1f s: %s (%s, %s)", time.monotonic() - started, config.model.path,
                    config.model.architecture, config.model.dtype)

    @classmethod
    def from_args(cls, **kwargs) -> LLMEngine:
        """kwargs: EngineArgs' fields."""
        return cls(EngineArgs(**kwargs).create_engine_config())

    def add_request(self, request_id: str, prompt: PromptInput | list[int], params: SamplingParams,
                    arrival_time: float | None = None, stream: bool = False, cache_salt: str | None = None) -> None:
        """Validate and queue a prompt (text, {"prompt": text} or {"prompt_token_ids": [...]},
        or token ids already tokenized). cache_salt: see add_tokenized_request; a prompt dict
        may carry it as "cache_salt" instead. Raises ValueError naming the violated limit."""
        if request_id in self.output_processor.parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, list):
            prompt = {"prompt_token_ids": prompt}
        text, token_ids = self.input_processor.tokenize(prompt)
        if cache_salt is None:
            cache_salt = self.input_processor.cache_salt(prompt)
        self.add_tokenized_request(request_id, text, token_ids, params, arrival_time, stream, cache_salt)

    def add_tokenized_request(self, request_id: str, prompt: str | None, token_ids: list[int],
                              params: SamplingParams, arrival_time: float | None = None,
                              stream: bool = False, cache_salt: str | None = None) -> None:
        """Queue a tokenized prompt. cache_salt: only requests with the same salt share
        prefix-cache blocks (a non-empty string; None shares with all unsalted requests)."""
        cache_salt = validate_cache_salt(cache_salt)
        token_ids, params = self.input_processor.validate(token_ids, params)
        arrival_time = time.monotonic() if arrival_time is None else arrival_time
        core_request = EngineCoreRequest(request_id, token_ids, params, arrival_time, cache_salt)
        self.engine_core.add_request(core_request)
        self.output_processor.add_request(request_id, core_request.child_ids, prompt, token_ids, params, stream,
                                          arrival_time)

    def abort_request(self, request_ids: list[str]) -> list[RequestOutput]:
        """Abort parents (all their samples); frees their blocks at once."""
        outputs = []
        for request_id in request_ids:
            child_ids = self.output_processor.child_ids(request_id)
            self.engine_core.finish_requests(child_ids, RequestStatus.FINISHED_ABORTED)
            output = self.output_processor.abort(request_id)
            if output is not None:
                outputs.append(output)
        return outputs

    def step(self) -> list[RequestOutput]:
        core_outputs = self.engine_core.step()
        request_outputs, stopped_ids = self.output_processor.process_outputs(core_outputs)
        if stopped_ids:
            self.engine_core.finish_requests(stopped_ids, RequestStatus.FINISHED_STOPPED)
        return request_outputs

    def has_unfinished_requests(self) -> bool:
        return self.engine_core.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return len(self.output_processor.parents)
