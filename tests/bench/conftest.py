"""Fixtures for the benchmark tests: a tiny random-weight Llama folder and a minimal
OpenAI-compatible streaming server (a stand-in until the pagedllm server exists)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

FAIL_OVER_MAX_TOKENS = 1000  # the fake server answers 400 above this many tokens


class FakeServer:
    """Streams max_tokens chunks of OpenAI completion SSE, then (when asked for) a
    usage chunk, then [DONE]; records the payloads and the peak number in flight."""

    def __init__(self):
        self.app = FastAPI()
        self.reset()
        self.app.get("/v1/models")(self.models)
        self.app.post("/v1/completions")(self.completions)

    def reset(self):
        self.payloads: list[dict] = []
        self.send_usage = True
        self.token_delay_s = 0.002
        self.api_key: str | None = None
        self.in_flight = 0
        self.max_in_flight = 0

    async def models(self):
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    async def completions(self, request: Request):
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return JSONResponse({"error": {"message": "bad api key"}}, status_code=401)
        body = await request.json()
        self.payloads.append(body)
        n = body["max_tokens"]
        if n > FAIL_OVER_MAX_TOKENS:
            return JSONResponse({"error": {"message": "max_tokens too large"}}, status_code=400)
        include_usage = (body.get("stream_options") or {}).get("include_usage")
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

        async def events():
            try:
                for i in range(n):
                    await asyncio.sleep(self.token_delay_s)
                    choice = {"index": 0, "text": f" t{i}",
                              "finish_reason": "length" if i == n - 1 else None}
                    chunk = {"id": "cmpl-1", "object": "text_completion", "created": 0,
                             "model": body["model"], "choices": [choice]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                if include_usage and self.send_usage:
                    usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": n,
                             "total_tokens": len(body["prompt"]) + n}
                    chunk = {"id": "cmpl-1", "object": "text_completion", "created": 0,
                             "model": body["model"], "choices": [], "usage": usage}
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                self.in_flight -= 1

        return StreamingResponse(events(), media_type="text/event-stream")


@pytest.fixture(scope="session")
def _fake_server_process():
    fake = FakeServer()
    # Bind port 0 ourselves and hand the socket to uvicorn: a free port, no race.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(fake.app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the fake OpenAI server did not start")
        time.sleep(0.01)
    fake.base_url = f"http://127.0.0.1:{port}"
    yield fake
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture
def fake_server(_fake_server_process):
    _fake_server_process.reset()
    return _fake_server_process


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A 2-layer random-weight Llama with a word-level tokenizer (eos, no pad token)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny_llama")
    vocab_size = 128
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=2, eos_token_id=1)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    vocab = {"<unk>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>",
                            unk_token="<unk>").save_pretrained(path)
    return path
