"""Pydantic models of the OpenAI-compatible API (requests, responses, stream chunks).

Field names, defaults and shapes follow OpenAI's API, plus vLLM's extras. Nothing is
dropped silently: every field that changes a response is either honoured or listed in
`unsupported_fields()` (the server answers 400 naming it when it is set); fields no
model here knows are kept in `model_extra` for the server to log once as ignored, as
OpenAI clients send fields that change nothing (`store`, `metadata`, ...). Range checks
live in SamplingParams, so they are written once. Text with lone surrogates (JSON allows
"\\ud800", Unicode does not) is refused here, naming the field.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator
from pydantic_core import PydanticCustomError

from pagedllm.sampling_params import SamplingParams, StructuredOutputsParams

# ---- requests ---------------------------------------------------------------------


def _lone_surrogate_path(data: Any) -> str | None:
    """The dotted path of the first string (value or key) in parsed JSON that holds a
    lone surrogate; None if there is none. Iterative: JSON may nest deeply."""
    pending: list[tuple[str, Any]] = [("", data)]
    while pending:
        path, value = pending.pop()
        if isinstance(value, dict):
            pending += [(f"{path}.{key}".lstrip("."), item) for key, item in value.items()]
            value = "".join(key for key in value if isinstance(key, str))
        elif isinstance(value, list):
            pending += [(f"{path}.{i}".lstrip("."), item) for i, item in enumerate(value)]
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return path or "body"
    return None


class ApiRequest(BaseModel):
    """A request body: its text must be valid Unicode; unknown fields are kept in
    model_extra (see the module docstring)."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        path = _lone_surrogate_path(data)
        if path is not None:
            raise PydanticCustomError("invalid_unicode", "{path}: the text holds a lone surrogate (such as "
                                      "\\ud800), which is not valid Unicode", {"path": path})
        return data


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage in every chunk (refused)


class StructuredOutputsRequest(BaseModel):
    """vLLM's `structured_outputs` extra: exactly one constraint (see
    pagedllm.sampling_params.StructuredOutputsParams). Options of vLLM's that pagedllm
    does not implement (structural_tag, whitespace_pattern, ...) are refused by name."""

    model_config = ConfigDict(extra="forbid")
    json_: dict | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class JsonSchemaFormat(BaseModel):
    name: str = "response"
    description: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")
    strict: bool | None = None  # the schema is enforced either way


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("response_format of type json_schema needs json_schema.schema")
        return self


class SamplingRequest(ApiRequest):
    """The sampling fields shared by completions and chat completions."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extras.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = None
    cache_salt: str | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    # vLLM's older names for structured_outputs' fields.
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # Parsed only to be refused when set (see unsupported_fields).
    best_of: int | None = None
    use_beam_search: bool = False
    length_penalty: float = 1.0
    priority: int = 0
    return_tokens_as_token_ids: bool = False
    spaces_between_special_tokens: bool = True

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def unsupported_fields(self) -> list[tuple[str, str]]:
        """(field, why) for each field set to something pagedllm cannot honour."""
        checks = [
            ("best_of", self.best_of not in (None, self.n), "best_of (other than n) is not supported: request n "
                                                             "samples and rank them yourself"),
            ("use_beam_search", self.use_beam_search, "beam search is not supported"),
            ("length_penalty", self.length_penalty != 1.0, "length_penalty applies to beam search, which is "
                                                           "not supported"),
            ("priority", self.priority != 0, "priority scheduling is not supported: priority must be 0"),
            ("return_tokens_as_token_ids", self.return_tokens_as_token_ids,
             "return_tokens_as_token_ids is not supported"),
            ("spaces_between_special_tokens", not self.spaces_between_special_tokens,
             "spaces_between_special_tokens=false is not supported"),
            ("stream_options.continuous_usage_stats",
             self.stream_options is not None and self.stream_options.continuous_usage_stats,
             "continuous_usage_stats is not supported: use include_usage"),
        ]
        return [(name, why) for name, unsupported, why in checks if unsupported]

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        """The one output constraint the request asks for (structured_outputs, response_format
        or a guided_* field). Raises ValueError naming the field when several are given."""
        given = []
        if self.structured_outputs is not None:
            so = self.structured_outputs
            given.append(("structured_outputs", dict(json=so.json_, regex=so.regex, choice=so.choice,
                                                     grammar=so.grammar, json_object=bool(so.json_object))))
        if self.response_format is not None and self.response_format.type != "text":
            schema = self.response_format.json_schema
            given.append(("response_format", dict(json=schema.schema_) if self.response_format.type == "json_schema"
                          else dict(json_object=True)))
        for name in ("json", "regex", "choice", "grammar"):
            value = getattr(self, f"guided_{name}")
            if value is not None:
                given.append((f"guided_{name}", {name: value}))
        if not given:
            return None
        if len(given) > 1:
            raise ValueError(f"{given[1][0]}: give only one output constraint, "
                             f"not both {given[0][0]} and {given[1][0]}")
        name, fields = given[0]
        try:
            return StructuredOutputsParams(**fields)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None,
                        defaults: dict[str, Any] | None = None,
                        structured_outputs: StructuredOutputsParams | None = None) -> SamplingParams:
        """Raises ValueError naming the first invalid field. `defaults` (the model's
        generation_config) fill the fields the request leaves unset, but max_tokens."""
        fields = dict(n=self.n, temperature=self.temperature, top_p=self.top_p, stop=self.stop, seed=self.seed,
                      presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                      top_k=self.top_k, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                      min_tokens=self.min_tokens, ignore_eos=self.ignore_eos, stop_token_ids=self.stop_token_ids,
                      include_stop_str_in_output=self.include_stop_str_in_output,
                      skip_special_tokens=self.skip_special_tokens, max_tokens=max_tokens, logprobs=logprobs,
                      prompt_logprobs=prompt_logprobs, logit_bias=self.logit_bias,
                      allowed_token_ids=self.allowed_token_ids, bad_words=self.bad_words,
                      truncate_prompt_tokens=self.truncate_prompt_tokens, structured_outputs=structured_outputs)
        fields = {k: v for k, v in fields.items() if v is not None}
        for key, value in (defaults or {}).items():
            if key != "max_tokens":  # depends on the prompt's length: the server applies it per prompt
                fields.setdefault(key, value)
        # Fields left out take SamplingParams' defaults (max_tokens=None means "up to max_model_len").
        fields.setdefault("max_tokens", None)
        return SamplingParams(**fields)


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    def unsupported_fields(self) -> list[tuple[str, str]]:
        suffix = [("suffix", "suffix (fill-in-the-middle) is not supported")] if self.suffix else []
        return super().unsupported_fields() + suffix


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    # Extra keys (tool_calls, ...) are passed on to the chat template.
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class FunctionDefinition(BaseModel):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of the arguments
    strict: bool | None = None  # calls forced by tool_choice follow the schema either way


class ChatTool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    prompt_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict[str, Any]] | None = None
    include_reasoning: bool = True
    # Parsed only to be refused when set (see unsupported_fields).
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    chat_template: str | None = None
    echo: bool = False
    add_special_tokens: bool = False

    def unsupported_fields(self) -> list[tuple[str, str]]:
        checks = [
            ("functions", self.functions is not None, "functions is deprecated and not supported: use tools"),
            ("function_call", self.function_call is not None,
             "function_call is deprecated and not supported: use tool_choice"),
            ("audio", self.audio is not None, "audio output is not supported"),
            ("modalities", self.modalities not in (None, ["text"]), "only the text modality is supported"),
            ("prediction", self.prediction is not None, "predicted outputs are not supported"),
            ("web_search_options", self.web_search_options is not None, "web search is not supported"),
            ("reasoning_effort", self.reasoning_effort is not None,
             "reasoning_effort is not supported: use chat_template_kwargs (e.g. enable_thinking) if the "
             "model's template has such a switch"),
            ("chat_template", self.chat_template is not None,
             "a chat template per request is not accepted: start the server with --chat-template"),
            ("echo", self.echo, "echo is not supported on chat completions"),
            ("add_special_tokens", self.add_special_tokens,
             "add_special_tokens is not supported on chat completions: the chat template writes them"),
        ]
        return super().unsupported_fields() + [(name, why) for name, unsupported, why in checks if unsupported]


class TokenizeRequest(ApiRequest):
    """Either a prompt, or chat messages rendered through the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' and 'messages'")
        return self


class DetokenizeRequest(ApiRequest):
    model: str | None = None
    tokens: list[int]


# ---- responses --------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose K/V came from the prefix cache


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> UsageInfo:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    logprob: float
    rank: int
    decoded_token: str


# vLLM's prompt_logprobs: per prompt position (None for the first), token id -> logprob.
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    # vLLM's extra: the stop string or stop token id that ended the choice.
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(BaseModel):
    """A whole completion, or (with usage None) one chunk of a stream: OpenAI uses
    the same object for both."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ChatLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobToken(ChatLogprob):
    top_logprobs: list[ChatLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatLogprobToken] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # the arguments as JSON text, as OpenAI sends them


def tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCall(BaseModel):
    id: str = Field(default_factory=tool_call_id)
    type: Literal["function"] = "function"
    function: FunctionCall


class _DropNone(BaseModel):
    """A stream delta: OpenAI's deltas carry only what changed (no "role": null after
    the first, no empty tool-call fields)."""

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class DeltaFunctionCall(_DropNone):
    name: str | None = None
    arguments: str | None = None  # the next piece of the arguments' JSON text


class DeltaToolCall(_DropNone):
    index: int  # which tool call of the choice this piece belongs to
    id: str | None = None  # sent with the call's first piece
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = None


class DeltaMessage(_DropNone):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "pagedllm"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
