"""`pagedllm serve`: the OpenAI-compatible HTTP server (FastAPI app, errors, API key,
start-up and shutdown)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagedllm import __version__
from pagedllm.config import DEFAULT_MODEL_ALIAS
from pagedllm.engine.async_engine import AsyncLLMEngine
from pagedllm.engine.dp_router import ROUTING_POLICIES
from pagedllm.engine_args import EngineArgs
from pagedllm.entrypoints.cli_args import add_engine_args
from pagedllm.entrypoints.openai.guards import ApiKeyMiddleware, BodyLimitMiddleware, error_response
from pagedllm.entrypoints.openai.limits import add_limit_args, limits_from_args
from pagedllm.entrypoints.openai.protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                                                  CompletionResponse, DetokenizeRequest, DetokenizeResponse,
                                                  ErrorInfo, ErrorResponse, ModelList, TokenizeRequest,
                                                  TokenizeResponse, VersionResponse)
from pagedllm.entrypoints.openai.reasoning_parsers import REASONING_PARSERS
from pagedllm.entrypoints.openai.serving import ApiError, OpenAIServing
from pagedllm.entrypoints.openai.tool_parsers import TOOL_PARSERS
from pagedllm.metrics import EngineMetrics

logger = logging.getLogger(__name__)

STATS_LOG_INTERVAL_S = 10.0
# After SIGINT/SIGTERM, connections still open after this long are cut.
GRACEFUL_SHUTDOWN_S = 5
_ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 500, 503)}
# With "stream": true, generation routes answer server-sent events; each event's data
# is a chunk (JSON), an error (JSON) or [DONE]. The schema describes one event.
_SSE_EVENT = {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}
_GENERATION_RESPONSES = {**_ERROR_RESPONSES, 200: {"content": {"text/event-stream": {"schema": _SSE_EVENT}}}}


def _add_error_handlers(app: FastAPI) -> None:
    """Every error is OpenAI's JSON; client mistakes are 400, never 422 or 500."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return error_response(error.status, error.info, error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        if first["type"] == "json_invalid":
            return error_response(400, ErrorInfo(message="the request body is not valid JSON",
                                                 type="invalid_request_error"))
        param = ".".join(str(part) for part in first["loc"] if part != "body") or None
        message = f"{param}: {first['msg']}" if param else first["msg"]
        return error_response(400, ErrorInfo(message=message, type="invalid_request_error", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(error.status_code, ErrorInfo(message=str(error.detail), type="invalid_request_error"),
                              error.headers)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, error: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return error_response(500, ErrorInfo(message="internal server error", type="server_error"))


async def _wait_for_disconnect(request: Request) -> None:
    # The body is already read, so the next ASGI message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _respond(request: Request, work: Awaitable[BaseModel | AsyncIterator[str]]) -> Response:
    """Run a handler; if the client leaves first, cancel it (which aborts its engine
    requests and frees their blocks). A stream is then watched by StreamingResponse."""
    task = asyncio.ensure_future(work)
    disconnect = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait([task, disconnect], return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return Response(status_code=499)  # nobody is listening
    result = task.result()
    if isinstance(result, BaseModel):
        return Response(result.model_dump_json(), media_type="application/json")
    return StreamingResponse(result, media_type="text/event-stream")


def build_app(serving: OpenAIServing, metrics: EngineMetrics, api_key: str | None = None,
              allowed_origins: list[str] | None = None) -> FastAPI:
    engine = serving.engine

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        stats_logger = asyncio.create_task(_log_stats_periodically(metrics))
        try:
            yield
        finally:
            stats_logger.cancel()
            await engine.shutdown()

    app = FastAPI(title="pagedllm", version=__version__, lifespan=lifespan)
    _add_error_handlers(app)
    # The last added runs first: CORS answers preflights (which carry no key), the key
    # is checked before a body is read, the body is capped before it is parsed.
    app.add_middleware(BodyLimitMiddleware, max_bytes=serving.limits.max_request_bytes)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    if allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.get("/health", response_class=Response, responses={200: {"content": {}}, 503: {"content": {}}})
    async def health() -> Response:
        return Response(status_code=200 if engine.is_healthy else 503)

    @app.get("/version")
    async def version() -> VersionResponse:
        return VersionResponse(version=__version__)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", responses=_ERROR_RESPONSES)
    async def models() -> ModelList:
        return serving.models()

    @app.post("/v1/completions", response_model=CompletionResponse, responses=_GENERATION_RESPONSES)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _respond(request, serving.create_completion(body))

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_GENERATION_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await _respond(request, serving.create_chat_completion(body))

    @app.post("/tokenize", responses=_ERROR_RESPONSES)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        return serving.tokenize(body)

    @app.post("/detokenize", responses=_ERROR_RESPONSES)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        return serving.detokenize(body)

    return app


async def _log_stats_periodically(metrics: EngineMetrics) -> None:
    while True:
        await asyncio.sleep(STATS_LOG_INTERVAL_S)
        metrics.log_stats()


def load_chat_template(value: str | None) -> str | None:
    """--chat-template: the Jinja template itself, or a file holding it."""
    if value is None or "{" in value:
        return value
    try:
        with open(value, encoding="utf-8") as f:
            return f.read()
    except OSError as error:
        raise ValueError(f"--chat-template {value!r} is neither a Jinja template nor a readable file "
                         f"({error.strerror})") from None


class _Server(uvicorn.Server):
    """On SIGINT/SIGTERM, fails in-flight requests at once (streams end with an error
    event) so that open connections close now rather than at the graceful timeout."""

    def __init__(self, config: uvicorn.Config, engine: AsyncLLMEngine) -> None:
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig: int, frame) -> None:
        super().handle_exit(sig, frame)
        self.engine.fail_all_threadsafe("the server is shutting down")


def run_server(args: argparse.Namespace) -> int:
    if args.skip_tokenizer_init:
        # No response here has a field for generated token ids: without text, a client would get nothing.
        raise ValueError("pagedllm serve does not support --skip-tokenizer-init: its responses carry the "
                         "generated text, not token ids. Serve a model folder with tokenizer files, or run "
                         "token-id prompts offline with LLM(model, skip_tokenizer_init=True)")
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (one of "
                         f"{', '.join(sorted(TOOL_PARSERS))})")
    chat_template = load_chat_template(args.chat_template)
    limits = limits_from_args(args)
    allowed_origins = [origin.strip() for origin in (args.allowed_origins or "").split(",") if origin.strip()]
    config = EngineArgs.from_cli_args(args).create_engine_config()
    model_name = args.served_model_name or args.model or DEFAULT_MODEL_ALIAS
    metrics = EngineMetrics(model_name)
    engine = AsyncLLMEngine(config, metrics.observe, args.data_parallel_routing)
    engine.input_processor.grammar_compiler.prepare()
    serving = OpenAIServing(engine, model_name, chat_template, limits, args.tool_call_parser, args.reasoning_parser)
    app = build_app(serving, metrics, args.api_key, allowed_origins)
    num_replicas = len(engine.cores)
    logger.info("serving %s (%s, %s, max_model_len %d); KV pool: %d blocks x %d = %d tokens, %.3f GiB%s; "
                "engine core%s in pid %s; http://%s:%d/v1%s", model_name, config.model.path, config.model.dtype,
                config.model.max_model_len, engine.num_blocks, config.cache.block_size,
                engine.num_blocks * config.cache.block_size, engine.kv_cache_bytes / 2**30,
                f" in each of {num_replicas} data-parallel replicas ({args.data_parallel_routing} routing)"
                if num_replicas > 1 else "", "s" if num_replicas > 1 else "",
                ", ".join(str(core.ready.pid) for core in engine.cores), args.host, args.port,
                " (API key required)" if args.api_key else "")
    server = _Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                    timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S), serving.engine)
    # uvicorn handles SIGINT/SIGTERM, shuts down, then re-raises the signal; by then
    # all is closed, so the re-raised signal must not kill the process or print a trace.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    return 0 if server.started else 1


def add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    add_engine_args(parser)
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default %(default)s: this machine only; 0.0.0.0: all interfaces)")
    group.add_argument("--port", type=int, default=8000)
    group.add_argument("--api-key", default=os.environ.get("PAGEDLLM_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on /v1/* (default: $PAGEDLLM_API_KEY)")
    group.add_argument("--served-model-name", default=None,
                       help="the model name clients use (default: MODEL as given, or the default alias)")
    group.add_argument("--chat-template", default=None,
                       help="Jinja chat template, or a file holding it (default: the tokenizer's)")
    group.add_argument("--allowed-origins", default=None,
                       help="comma-separated origins allowed by CORS, or '*' (default: none, CORS off)")
    group.add_argument("--tool-call-parser", default=None, choices=sorted(set(TOOL_PARSERS) - {"required"}),
                       help="how to find tool calls in the model's text for tool_choice 'auto' (hermes: "
                            "<tool_call> JSON as Qwen2.5/Qwen3 and Hermes write it; llama3_json: Llama 3.x JSON). "
                            "Without it, 'auto' is refused; 'required' and named tool choices work regardless")
    group.add_argument("--enable-auto-tool-choice", action="store_true",
                       help="accepted for vLLM compatibility: --tool-call-parser enables tool_choice 'auto'")
    group.add_argument("--reasoning-parser", default=None, choices=sorted(REASONING_PARSERS),
                       help="split the model's <think> block into reasoning_content (qwen3, deepseek_r1)")
    group.add_argument("--data-parallel-routing", default="prefix", choices=ROUTING_POLICIES,
                       help="with -dp > 1, where each request goes: prefix = the replica that holds the longest "
                            "cached prefix of its prompt unless it is much busier than the least loaded one; "
                            "round_robin = in turn (default %(default)s)")
    add_limit_args(parser)
    parser.set_defaults(func=run_server)
