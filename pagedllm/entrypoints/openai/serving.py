"""The logic behind the OpenAI endpoints: requests -> engine requests -> responses.

Every request is checked before anything is queued (model name, load, sampling
fields, prompt limits) so that a bad one fails with a 400 before a stream starts.
The engine always streams deltas: streaming responses forward them as SSE chunks,
the others fold them into one final output per prompt.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from contextlib import aclosing
from typing import Any

import jinja2
from pydantic import BaseModel

from pagedllm.engine.async_engine import AsyncLLMEngine, EngineDeadError
from pagedllm.engine.engine_core import EngineCoreRequest
from pagedllm.engine.input_processor import validate_cache_salt
from pagedllm.entrypoints.openai.limits import ServerLimits
from pagedllm.entrypoints.openai.protocol import (ChatChoice, ChatCompletionChunk, ChatCompletionRequest,
                                                  ChatCompletionResponse, ChatLogprob, ChatLogprobs,
                                                  ChatLogprobToken, ChatMessage, ChatResponseMessage,
                                                  ChatStreamChoice, CompletionChoice, CompletionLogprobs,
                                                  CompletionRequest, CompletionResponse, DeltaMessage,
                                                  DetokenizeRequest, DetokenizeResponse, ErrorInfo, ErrorResponse,
                                                  ModelCard, ModelList, PromptLogprob, TokenizeRequest,
                                                  TokenizeResponse, UsageInfo)
from pagedllm.entrypoints.openai.tool_use import ChoiceParser, ToolUse, join_deltas, template_messages
from pagedllm.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from pagedllm.sampling_params import SamplingParams, StructuredOutputsParams

logger = logging.getLogger(__name__)

# JSON has no -inf; OpenAI-compatible servers clamp to this.
MIN_LOGPROB = -9999.0
RETRY_AFTER_S = 1


class ApiError(Exception):
    """An error answered as OpenAI's error JSON with this HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers
        self.info = ErrorInfo(message=message, type=type_, param=param, code=code)


def bad_request(error: Exception, request: BaseModel | None = None) -> ApiError:
    """A 400 from a ValueError; SamplingParams' messages start with the field's name."""
    message = str(error)
    name = message.split(" ", 1)[0]
    param = name if request is not None and name in type(request).model_fields else None
    return ApiError(400, message, param=param)


def _sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


def _finite(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB) if not math.isnan(logprob) else MIN_LOGPROB


def _merge(final: RequestOutput | None, delta: RequestOutput) -> RequestOutput:
    """Fold a streamed delta into the output accumulated so far (deltas are fresh objects)."""
    if final is None:
        return delta
    samples = {sample.index: sample for sample in final.outputs}
    for part in delta.outputs:
        sample = samples.get(part.index)
        if sample is None:
            final.outputs.append(part)
            continue
        sample.text += part.text
        sample.token_ids += part.token_ids
        if part.logprobs:
            sample.logprobs = (sample.logprobs or []) + part.logprobs
        sample.cumulative_logprob, sample.finish_reason, sample.stop_reason = (
            part.cumulative_logprob, part.finish_reason, part.stop_reason)
    final.finished, final.prompt_logprobs = delta.finished, delta.prompt_logprobs
    final.num_generated_tokens = delta.num_generated_tokens
    return final


# Template arguments the server sets itself (or that would break rendering).
_RESERVED_TEMPLATE_ARGS = {"messages", "conversation", "chat_template", "add_generation_prompt", "tokenize",
                           "tools", "documents", "continue_final_message"}


def _chat_finish_reason(finish_reason: str | None, tools_called: bool) -> str | None:
    """A choice that ended normally after calling tools finished with "tool_calls"."""
    return "tool_calls" if finish_reason == "stop" and tools_called else finish_reason


def _engine_error(error: EngineDeadError | ValueError) -> ApiError:
    """What to answer when the engine fails a request: 503 if it died, else 400."""
    if isinstance(error, EngineDeadError):
        return ApiError(503, str(error), type_="server_error", code="engine_dead")
    return bad_request(error)


_warned_fields: set[str] = set()


def _warn_ignored_fields(request: BaseModel) -> None:
    """Fields no request model knows change nothing here: accepted, logged once each."""
    for name in (request.model_extra or {}):
        if name not in _warned_fields:
            _warned_fields.add(name)
            logger.warning("ignoring the request field %r: pagedllm does not know it (logged once)", name)


@dataclasses.dataclass(frozen=True)
class EngineBatch:
    """One API request's engine requests (a completion may have several prompts) and
    their prompt texts, which stay on this side."""

    requests: list[EngineCoreRequest]
    texts: list[str | None]


class OpenAIServing:
    def __init__(self, engine: AsyncLLMEngine, model_name: str, chat_template: str | None,
                 limits: ServerLimits, tool_parser: str | None = None, reasoning_parser: str | None = None) -> None:
        self.engine = engine
        self.model_name = model_name
        self.chat_template = chat_template
        self.limits = limits
        self.tool_parser = tool_parser
        self.reasoning_parser = reasoning_parser
        self.processor = engine.input_processor
        self.tokenizer = engine.tokenizer
        self.created = int(time.time())

    # ---- small endpoints ---------------------------------------------------------------

    def models(self) -> ModelList:
        card = ModelCard(id=self.model_name, created=self.created, max_model_len=self.processor.max_model_len)
        return ModelList(data=[card])

    def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        self._check_model(request.model)
        try:
            if request.messages is not None:
                _, token_ids = self._chat_prompt(request.messages, request.add_generation_prompt)
            else:
                token_ids = self.tokenizer(request.prompt, add_special_tokens=request.add_special_tokens).input_ids
        except ValueError as error:
            raise bad_request(error, request) from None
        return TokenizeResponse(count=len(token_ids), max_model_len=self.processor.max_model_len, tokens=token_ids)

    def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self._check_model(request.model)
        vocab_size = self.processor.vocab_size
        if not all(0 <= token_id < vocab_size for token_id in request.tokens):
            raise ApiError(400, f"token ids must be in [0, {vocab_size})", param="tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(request.tokens))

    # ---- completions --------------------------------------------------------------------

    async def create_completion(self, request: CompletionRequest) -> CompletionResponse | AsyncIterator[str]:
        self._admit(request.model)
        self._check_request(request)
        response_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        self._check_limits(request.n, request.logprobs, "logprobs")
        try:
            prompts = self._completion_prompts(request.prompt)
            # Echoing logprobs needs the prompt tokens' logprobs too.
            prompt_logprobs = request.logprobs if request.echo and request.logprobs is not None else None
            if request.prompt_logprobs is not None:
                prompt_logprobs = max(prompt_logprobs or 0, request.prompt_logprobs)
            constraint = request.structured_outputs_params()
            await self._compile(constraint)
            params = request.sampling_params(request.max_tokens, request.logprobs, prompt_logprobs,
                                             self.processor.default_sampling, constraint)
            batch = self._engine_requests(response_id, prompts, params, request.cache_salt)
        except ValueError as error:
            raise bad_request(error, request) from None

        def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> CompletionResponse:
            return CompletionResponse(id=response_id, created=created, model=self.model_name, choices=choices,
                                      usage=usage)

        if request.stream:
            prompt_index = {r.request_id: i for i, r in enumerate(batch.requests)}
            offsets: dict[int, int] = {}

            def to_chunks(delta: RequestOutput) -> Iterable[CompletionResponse]:
                i = prompt_index[delta.request_id]
                for sample in delta.outputs:
                    yield chunk([self._completion_choice(request, delta, sample, i, offsets)])

            usage_chunk = (lambda usage: chunk([], usage)) if request.include_usage else None
            return self._stream(batch, await self._start(batch), to_chunks, usage_chunk)
        finals = await self._generate_all(batch)
        choices = [self._completion_choice(request, final, sample, i, {})
                   for i, final in enumerate(finals) for sample in sorted(final.outputs, key=lambda s: s.index)]
        if request.prompt_logprobs is not None:
            for choice in choices:
                choice.prompt_logprobs = self._prompt_logprobs(finals[choice.index // request.n],
                                                               request.prompt_logprobs)
        return chunk(choices, self._usage(batch, finals))

    def _completion_prompts(self, prompt: str | list) -> list[tuple[str | None, list[int]]]:
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise ValueError("prompt must not be empty")
        return [self.processor.tokenize(p if isinstance(p, str) else {"prompt_token_ids": p}) for p in prompt]

    def _completion_choice(self, request: CompletionRequest, output: RequestOutput, sample: CompletionOutput,
                           prompt_index: int, offsets: dict[int, int]) -> CompletionChoice:
        """One choice (or a stream's chunk of it); `offsets` holds the characters already
        sent per choice: the first chunk of a choice carries the echoed prompt."""
        index = prompt_index * request.n + sample.index
        text, token_ids, positions = sample.text, sample.token_ids, sample.logprobs or []
        if request.echo and index not in offsets:
            prompt_text = output.prompt if output.prompt is not None else self.tokenizer.decode(output.prompt_token_ids)
            text, token_ids = prompt_text + text, output.prompt_token_ids + token_ids
            positions = (output.prompt_logprobs or []) + positions
        offset = offsets.get(index, 0)
        offsets[index] = offset + len(text)
        logprobs = None if request.logprobs is None else self._completion_logprobs(token_ids, positions, offset)
        return CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=sample.finish_reason,
                                stop_reason=sample.stop_reason)

    def _completion_logprobs(self, token_ids: list[int], positions: list[PositionLogprobs | None],
                             offset: int) -> CompletionLogprobs:
        result = CompletionLogprobs()
        for token_id, position in zip(token_ids, positions):
            chosen = position.get(token_id) if position else None
            token = self._token_text(token_id, chosen)
            result.tokens.append(token)
            result.text_offset.append(offset)
            offset += len(token)
            result.token_logprobs.append(None if chosen is None else _finite(chosen.logprob))
            result.top_logprobs.append(None if position is None else {
                self._token_text(i, logprob): _finite(logprob.logprob) for i, logprob in position.items()})
        return result

    # ---- chat completions -----------------------------------------------------------------

    async def create_chat_completion(self, request: ChatCompletionRequest
                                     ) -> ChatCompletionResponse | AsyncIterator[str]:
        self._admit(request.model)
        self._check_request(request)
        response_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self._check_limits(request.n, request.top_logprobs, "top_logprobs")
        try:
            if request.top_logprobs is not None and not request.logprobs:
                raise ValueError("top_logprobs needs logprobs set to true")
            num_top = (request.top_logprobs or 0) if request.logprobs else None
            max_tokens = request.max_tokens if request.max_completion_tokens is None else request.max_completion_tokens
            tool_use = ToolUse.of(request, self.tool_parser)
            constraint = request.structured_outputs_params()
            if constraint is not None and tool_use.constraint is not None:
                raise ValueError("tool_choice: a required or named tool choice cannot be combined with "
                                 "response_format or structured_outputs")
            constraint = constraint or tool_use.constraint
            await self._compile(constraint)
            params = request.sampling_params(max_tokens, num_top, request.prompt_logprobs,
                                             self.processor.default_sampling, constraint)
            prompt = self._chat_prompt(request.messages, request.add_generation_prompt,
                                       self._template_kwargs(request, tool_use))
            batch = self._engine_requests(response_id, [prompt], params, request.cache_salt)
        except ValueError as error:
            raise bad_request(error, request) from None

        def choice_parser() -> ChoiceParser:
            return ChoiceParser(tool_use, self.tool_parser, self.reasoning_parser, request.include_reasoning)

        def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=response_id, created=created, model=self.model_name, choices=choices,
                                       usage=usage)

        if request.stream:
            # As OpenAI: each choice opens with a delta that carries only the role.
            opening = [chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
                       for i in range(request.n)]
            parsers = [choice_parser() for _ in range(request.n)]

            def to_chunks(delta: RequestOutput) -> Iterable[ChatCompletionChunk]:
                for sample in delta.outputs:
                    parser = parsers[sample.index]
                    message = parser.stream(sample.text) if sample.text else None
                    if sample.finish_reason is not None:
                        message = join_deltas([message, parser.finish()])
                    logprobs = self._chat_logprobs(sample, num_top)
                    if message is None and sample.finish_reason is None and not logprobs:
                        continue  # the parsers hold the text back (a tag may be starting)
                    yield chunk([ChatStreamChoice(
                        index=sample.index, delta=message or DeltaMessage(), logprobs=logprobs,
                        finish_reason=_chat_finish_reason(sample.finish_reason, parser.tools_called),
                        stop_reason=sample.stop_reason)])

            usage_chunk = (lambda usage: chunk([], usage)) if request.include_usage else None
            return self._stream(batch, await self._start(batch), to_chunks, usage_chunk, opening)
        finals = await self._generate_all(batch)
        choices = []
        for sample in sorted(finals[0].outputs, key=lambda s: s.index):
            parsed = choice_parser().parse(sample.text)
            message = ChatResponseMessage(content=parsed.content, reasoning_content=parsed.reasoning_content,
                                          tool_calls=parsed.tool_calls)
            choices.append(ChatChoice(index=sample.index, message=message,
                                      logprobs=self._chat_logprobs(sample, num_top),
                                      finish_reason=_chat_finish_reason(sample.finish_reason, bool(parsed.tool_calls)),
                                      stop_reason=sample.stop_reason))
        prompt_logprobs = (None if request.prompt_logprobs is None
                           else self._prompt_logprobs(finals[0], request.prompt_logprobs))
        return ChatCompletionResponse(id=response_id, created=created, model=self.model_name, choices=choices,
                                      usage=self._usage(batch, finals), prompt_logprobs=prompt_logprobs)

    def _template_kwargs(self, request: ChatCompletionRequest, tool_use: ToolUse) -> dict[str, Any]:
        """What the chat template gets besides the messages. Raises ValueError."""
        if request.continue_final_message and request.add_generation_prompt:
            raise ValueError("continue_final_message: set add_generation_prompt to false to continue the final "
                             "message")
        ours = dict(tools=tool_use.template_tools, documents=request.documents,
                    continue_final_message=request.continue_final_message or None)
        ours = {key: value for key, value in ours.items() if value is not None}
        extra = request.chat_template_kwargs or {}
        clashes = sorted(set(extra) & _RESERVED_TEMPLATE_ARGS)
        if clashes:
            raise ValueError(f"chat_template_kwargs: {clashes[0]!r} cannot be set here; use the request field")
        return {**extra, **ours}

    def _chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool,
                     template_kwargs: dict[str, Any] | None = None) -> tuple[str, list[int]]:
        """Messages through the chat template -> (text, token ids). Raises ValueError."""
        conversation = []
        for message in messages:
            entry = message.model_dump(exclude_none=True)
            # An assistant turn that only called tools has content null; templates read it.
            entry.setdefault("content", "")
            if isinstance(message.content, list):
                if any(part.type != "text" or part.text is None for part in message.content):
                    raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
                entry["content"] = "\n".join(part.text for part in message.content)
            conversation.append(entry)
        try:
            text = self.processor.apply_chat_template(template_messages(conversation), self.chat_template,
                                                      add_generation_prompt, **(template_kwargs or {}))
        except (jinja2.TemplateError, TypeError) as error:
            # Templates reject conversations they cannot render (roles out of order, ...).
            raise ValueError(f"the chat template failed on these messages: {error}") from None
        return text, self.processor.tokenize_chat(text)

    def _chat_logprobs(self, sample: CompletionOutput, num_top: int | None) -> ChatLogprobs | None:
        if num_top is None:
            return None
        content = []
        for token_id, position in zip(sample.token_ids, sample.logprobs or []):
            top = sorted((item for item in position.items() if item[1].rank <= num_top), key=lambda i: i[1].rank)
            content.append(ChatLogprobToken(**self._chat_logprob(token_id, position[token_id]).model_dump(),
                                            top_logprobs=[self._chat_logprob(*item) for item in top]))
        return ChatLogprobs(content=content)

    def _chat_logprob(self, token_id: int, logprob: Logprob) -> ChatLogprob:
        token = self._token_text(token_id, logprob)
        return ChatLogprob(token=token, logprob=_finite(logprob.logprob), bytes=list(token.encode()))

    def _prompt_logprobs(self, output: RequestOutput, num_top: int) -> list[dict[str, PromptLogprob] | None]:
        """vLLM's prompt_logprobs: per prompt position, None for the first, else token id ->
        logprob, rank and text of the prompt's token and the num_top most likely ones."""
        result = []
        for position in output.prompt_logprobs or []:
            if position is None:
                result.append(None)
                continue
            prompt_token = next(iter(position))  # the position's own token comes first, then the top ones
            result.append({str(token_id): PromptLogprob(logprob=_finite(logprob.logprob), rank=logprob.rank,
                                                        decoded_token=self._token_text(token_id, logprob))
                           for token_id, logprob in position.items()
                           if token_id == prompt_token or logprob.rank <= num_top})
        return result

    # ---- shared -------------------------------------------------------------------------------

    def _check_request(self, request: CompletionRequest | ChatCompletionRequest) -> None:
        """400 for a field set to what pagedllm cannot honour; unknown fields logged."""
        unsupported = request.unsupported_fields()
        if unsupported:
            name, why = unsupported[0]
            raise ApiError(400, f"{name}: {why}", param=name)
        if request.stream and request.prompt_logprobs is not None:
            raise ApiError(400, "prompt_logprobs: not available when streaming", param="prompt_logprobs")
        if request.prompt_logprobs is not None:
            self._check_limits(1, request.prompt_logprobs, "prompt_logprobs")
        _warn_ignored_fields(request)

    async def _compile(self, constraint: StructuredOutputsParams | None) -> None:
        """Compile (or find in the cache) the request's grammar in a worker thread, so
        that neither the event loop nor the engine waits for it. Raises ValueError."""
        if constraint is not None:
            await asyncio.to_thread(self.processor.grammar_compiler.compile, constraint)

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")

    def _admit(self, model: str | None) -> None:
        """Refuse early: unknown model, dead engine, or a full waiting queue."""
        self._check_model(model)
        if not self.engine.is_healthy:
            raise ApiError(503, str(self.engine.error or "the engine is not running"), type_="server_error",
                           code="engine_dead")
        max_waiting = self.limits.max_waiting_requests
        if self.engine.num_waiting >= max_waiting:
            raise ApiError(503, f"the server is overloaded: {max_waiting} requests are already waiting; retry "
                                "later", type_="server_error", code="overloaded",
                           headers={"Retry-After": str(RETRY_AFTER_S)})

    def _check_limits(self, n: int, logprobs: int | None, logprobs_field: str) -> None:
        """The server's caps on `n` and logprobs (flags), checked before any work."""
        if not 1 <= n <= self.limits.max_n:
            raise ApiError(400, f"n must be an integer in [1, {self.limits.max_n}] on this server (--max-n), "
                                f"got {n}", param="n")
        if logprobs is not None and not 0 <= logprobs <= self.limits.max_logprobs:
            raise ApiError(400, f"{logprobs_field} must be an integer in [0, {self.limits.max_logprobs}] on this "
                                f"server (--max-logprobs), got {logprobs}", param=logprobs_field)

    def _engine_requests(self, response_id: str, prompts: list[tuple[str | None, list[int]]],
                         params: SamplingParams, cache_salt: str | None = None) -> EngineBatch:
        """Validate every prompt (ValueError in vLLM's words) before any is queued."""
        arrival_time = time.monotonic()
        max_prompt_tokens = self.limits.max_prompt_tokens
        for _, token_ids in prompts:
            if max_prompt_tokens is not None and len(token_ids) > max_prompt_tokens:
                raise ValueError(f"prompt has {len(token_ids)} tokens, more than this server's limit of "
                                 f"{max_prompt_tokens} (--max-prompt-tokens)")
        cache_salt = validate_cache_salt(cache_salt)
        requests = [EngineCoreRequest(f"{response_id}-{i}", *self.processor.validate(
                        token_ids, self._default_max_tokens(params, len(token_ids))), arrival_time, cache_salt)
                    for i, (_, token_ids) in enumerate(prompts)]
        return EngineBatch(requests, [text for text, _ in prompts])

    def _default_max_tokens(self, params: SamplingParams, num_prompt_tokens: int) -> SamplingParams:
        """Without max_tokens, the model's generation_config max_new_tokens applies, as far
        as the context leaves room (vLLM's rule)."""
        default = self.processor.default_sampling.get("max_tokens")
        if params.max_tokens is not None or default is None:
            return params
        room = self.processor.max_model_len - num_prompt_tokens
        return dataclasses.replace(params, max_tokens=max(1, min(default, room)))

    def _token_text(self, token_id: int, logprob: Logprob | None) -> str:
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        return self.tokenizer.decode([token_id])

    @staticmethod
    def _usage(batch: EngineBatch, outputs: list[RequestOutput]) -> UsageInfo:
        """Token counts over the request's prompts; `outputs` holds each prompt's latest
        output (for a stream, the latest delta: its counts are totals)."""
        return UsageInfo.of(sum(len(r.prompt_token_ids) for r in batch.requests),
                            sum(output.num_generated_tokens for output in outputs),
                            sum(output.num_cached_tokens for output in outputs))

    async def _generate_all(self, batch: EngineBatch) -> list[RequestOutput]:
        """Run to the end; the final output of each request, in request order."""
        finals: dict[str, RequestOutput] = {}
        try:
            async with aclosing(self.engine.generate(batch.requests, batch.texts)) as deltas:
                async for delta in deltas:
                    finals[delta.request_id] = _merge(finals.get(delta.request_id), delta)
        except (EngineDeadError, ValueError) as error:
            raise _engine_error(error) from None
        return [finals[r.request_id] for r in batch.requests]

    async def _start(self, batch: EngineBatch
                     ) -> tuple[AsyncGenerator[RequestOutput, None], RequestOutput]:
        """Queue a stream's requests now and wait for their first output: the load is
        counted at once (so a burst of streams cannot slip past the overload check),
        and a failure before the first token is an HTTP error, not a 200 stream."""
        deltas = self.engine.generate(batch.requests, batch.texts)
        try:
            return deltas, await anext(deltas)  # an exception here has closed `deltas`
        except (EngineDeadError, ValueError) as error:
            raise _engine_error(error) from None

    async def _stream(self, batch: EngineBatch,
                      started: tuple[AsyncGenerator[RequestOutput, None], RequestOutput],
                      to_chunks: Callable[[RequestOutput], Iterable[BaseModel]],
                      usage_chunk: Callable[[UsageInfo], BaseModel] | None,
                      opening: Iterable[BaseModel] = ()) -> AsyncIterator[str]:
        """SSE lines as OpenAI sends them; errors after the start become an error event."""
        deltas, delta = started
        latest: dict[str, RequestOutput] = {}
        try:
            async with aclosing(deltas):  # leaving early (client gone) aborts the requests
                for chunk in opening:
                    yield _sse(chunk)
                while delta is not None:
                    latest[delta.request_id] = delta
                    for chunk in to_chunks(delta):
                        yield _sse(chunk)
                    delta = await anext(deltas, None)
            if usage_chunk is not None:
                yield _sse(usage_chunk(self._usage(batch, list(latest.values()))))
        except (EngineDeadError, ValueError) as error:
            yield _sse(ErrorResponse(error=_engine_error(error).info))
        yield "data: [DONE]\n\n"
