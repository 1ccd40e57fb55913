"""`pagedllm serve` on a tiny model, driven by the official openai client and httpx:
completions and chat, streaming, usage, logprobs, stop strings, echo, concurrency,
disconnects and metrics."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from pagedllm import LLM, SamplingParams
from tests.entrypoints.conftest import API_KEY, MODEL, NUM_KV_BLOCKS, metric_value, usage_counts

IGNORE_EOS = {"ignore_eos": True}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
# Ten prompts of 480 tokens (the context is 512) in one request, for the disconnect tests:
# at most five fit in the KV pool at a time, so they need two rounds of 480 model steps.
# A client that leaves once they run leaves long before the last can finish, however
# fast the machine; no test relies on how long generation takes.
LONG_PROMPTS = [f"A long story, part {i}" for i in range(10)]
LONG_MAX_TOKENS = 480


def greedy(**kwargs) -> dict:
    return dict(model=MODEL, temperature=0, **kwargs)


def test_startup_log_models_health_version(server, client, http):
    assert f"KV pool: {NUM_KV_BLOCKS} blocks x 16 = {NUM_KV_BLOCKS * 16} tokens" in server.log
    assert f"{server.url}/v1" in server.log
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server.url}/health").status_code == 200  # no key needed
    assert http.get("/version").json()["version"]
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize"} <= set(paths)


def test_completion_stream_equals_non_stream_with_exact_usage(client, http):
    prompt = "The quick brown fox"
    num_prompt = len(http.post("/tokenize", json={"prompt": prompt}).json()["tokens"])
    full = client.completions.create(prompt=prompt, max_tokens=12, extra_body=IGNORE_EOS, **greedy())
    assert full.choices[0].finish_reason == "length"
    assert (full.usage.prompt_tokens, full.usage.completion_tokens, full.usage.total_tokens) == (
        num_prompt, 12, num_prompt + 12)
    chunks = list(client.completions.create(prompt=prompt, max_tokens=12, stream=True, extra_body=IGNORE_EOS,
                                            stream_options={"include_usage": True}, **greedy()))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].choices == [] and usage_counts(chunks[-1].usage) == usage_counts(full.usage)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_stream_equals_non_stream_with_role_first(client):
    full = client.chat.completions.create(messages=CHAT, max_completion_tokens=10, **greedy())
    assert full.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(messages=CHAT, max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}, **greedy()))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert usage_counts(chunks[-1].usage) == usage_counts(full.usage)
    assert full.usage.completion_tokens == 10 or full.choices[0].finish_reason == "stop"


def test_chat_template_tokens_equal_transformers(client, http, tiny_model_dir):
    expected = AutoTokenizer.from_pretrained(tiny_model_dir).apply_chat_template(
        CHAT, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert http.post("/tokenize", json={"messages": CHAT}).json()["tokens"] == expected
    response = client.chat.completions.create(messages=CHAT, max_tokens=1, **greedy())
    assert response.usage.prompt_tokens == len(expected)


def test_n_with_seed_is_reproducible(client):
    def texts():
        response = client.completions.create(model=MODEL, prompt="Once upon a time", n=3, temperature=1.0,
                                             seed=1234, max_tokens=8, extra_body=IGNORE_EOS)
        assert [c.index for c in response.choices] == [0, 1, 2]
        assert response.usage.completion_tokens == 3 * 8
        return [c.text for c in response.choices]

    first = texts()
    assert texts() == first
    assert len(set(first)) > 1  # the samples differ from each other


def test_prompt_lists_give_one_choice_per_prompt_and_sample(client, http):
    prompts = ["First prompt", "Second prompt"]
    singles = [client.completions.create(prompt=p, max_tokens=6, **greedy()).choices[0].text for p in prompts]
    both = client.completions.create(prompt=prompts, n=2, max_tokens=6, **greedy())
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert [c.text for c in both.choices] == [singles[0], singles[0], singles[1], singles[1]]
    token_prompts = [http.post("/tokenize", json={"prompt": p}).json()["tokens"] for p in prompts]
    by_ids = client.completions.create(prompt=token_prompts, max_tokens=6, **greedy())
    assert [c.text for c in by_ids.choices] == singles
    one_by_ids = client.completions.create(prompt=token_prompts[1], max_tokens=6, **greedy())
    assert one_by_ids.choices[0].text == singles[1]


def test_completion_logprobs_and_echo(client, http):
    prompt = "Tell me"
    num_prompt = len(http.post("/tokenize", json={"prompt": prompt}).json()["tokens"])
    response = client.completions.create(prompt=prompt, max_tokens=5, logprobs=3, extra_body=IGNORE_EOS, **greedy())
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    for top, logprob in zip(logprobs.top_logprobs, logprobs.token_logprobs):
        # Up to 3 + the chosen token; tokens that decode alike ("\ufffd") share a key.
        assert 1 <= len(top) <= 4
        assert 0 >= logprob >= max(top.values()) - 1e-5  # greedy: the chosen token is the most likely
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    echoed = client.completions.create(prompt=prompt, max_tokens=5, logprobs=1, echo=True, extra_body=IGNORE_EOS,
                                       **greedy())
    choice = echoed.choices[0]
    assert choice.text == prompt + response.choices[0].text
    assert len(choice.logprobs.tokens) == num_prompt + 5
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert choice.logprobs.token_logprobs[num_prompt:] == pytest.approx(logprobs.token_logprobs)


def test_chat_logprobs_shapes(client):
    response = client.chat.completions.create(messages=CHAT, max_tokens=4, logprobs=True, top_logprobs=2,
                                              **greedy())
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.bytes == list(entry.token.encode())


def test_stop_strings(client):
    def complete(**kwargs):
        extra_body = {**IGNORE_EOS, **kwargs.pop("extra_body", {})}
        return client.completions.create(prompt="Stop here", max_tokens=24, extra_body=extra_body, **greedy(),
                                         **kwargs)

    text = complete().choices[0].text
    stop = next(ch for ch in text[1:] if ch.isprintable() and ch != "\ufffd")
    cut = text.index(stop)
    choice = complete(stop=[stop]).choices[0]
    assert (choice.text, choice.finish_reason, choice.stop_reason) == (text[:cut], "stop", stop)
    kept = complete(stop=stop, extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == text[:cut + 1]
    assert "".join(c.choices[0].text for c in complete(stop=[stop], stream=True)) == text[:cut]


def test_vllm_extras_are_applied(client):
    sampled = dict(model=MODEL, prompt="Extras", max_tokens=8, seed=7)
    top1 = client.completions.create(temperature=1.0, extra_body=dict(top_k=1, ignore_eos=True), **sampled)
    assert top1.choices[0].text == client.completions.create(temperature=0, extra_body=IGNORE_EOS,
                                                             **sampled).choices[0].text
    extras = dict(min_p=0.1, repetition_penalty=1.3, min_tokens=4, skip_special_tokens=False, stop_token_ids=[5])
    response = client.completions.create(presence_penalty=0.5, frequency_penalty=0.5, user="someone",
                                         extra_body=extras, **sampled)
    assert response.usage.completion_tokens >= 4


async def _complete_all(server, prompts: list[str]) -> list[str]:
    async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0) as client:
        responses = await asyncio.gather(*(client.completions.create(prompt=p, max_tokens=16, extra_body=IGNORE_EOS,
                                                                     **greedy()) for p in prompts))
    return [r.choices[0].text for r in responses]


def test_32_concurrent_greedy_requests_equal_offline_generate(server, tiny_model_dir):
    prompts = [f"Request number {i}: " + "abc" * (i % 5) for i in range(32)]
    served = asyncio.run(_complete_all(server, prompts))
    llm = LLM(tiny_model_dir, dtype="float32", num_kv_blocks=NUM_KV_BLOCKS)
    offline = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    assert served == [o.outputs[0].text for o in offline]


def _wait_until_idle(http: httpx.Client) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = http.get("/metrics").text
        if (metric_value(text, "pagedllm:num_requests_running") == 0
                and metric_value(text, "pagedllm:kv_cache_usage_perc") == 0):
            return text
        time.sleep(0.05)
    pytest.fail(f"the engine did not become idle:\n{text}")


def _num_finished(http: httpx.Client) -> tuple[float, float]:
    """-> (requests aborted, requests finished by length) so far."""
    text = http.get("/metrics").text
    return tuple(metric_value(text, "pagedllm:request_success_total", finished_reason=reason)
                 for reason in ("abort", "length"))


def _check_aborted_once_idle(http: httpx.Client, finished_before: tuple[float, float]) -> None:
    _wait_until_idle(http)
    num_aborted, num_finished = (now - before for now, before in zip(_num_finished(http), finished_before))
    # Every prompt is accounted for, and the client left before the last one could finish.
    assert num_aborted >= 1 and num_aborted + num_finished == len(LONG_PROMPTS), (num_aborted, num_finished)


def test_disconnect_mid_stream_frees_the_kv_pool(server, http):
    finished_before = _num_finished(http)
    body = dict(model=MODEL, prompt=LONG_PROMPTS, max_tokens=LONG_MAX_TOKENS, ignore_eos=True, stream=True)
    with http.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        running = metric_value(http.get("/metrics").text, "pagedllm:kv_cache_usage_perc")
    assert running > 0  # the request held blocks while streaming
    _check_aborted_once_idle(http, finished_before)


async def _leave_once_running(url: str, body: dict) -> None:
    """POST `body` and close the connection as soon as the engine runs it, not after a
    guessed time: a non-streamed response gives no sign of progress until its end."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as client:
        posting = asyncio.create_task(client.post("/v1/completions", json=body))
        deadline = time.monotonic() + 30
        while True:
            running = metric_value((await client.get("/metrics")).text, "pagedllm:num_requests_running")
            assert not posting.done(), f"answered before the client could leave: {posting.result().text[:300]}"
            if running:
                break
            assert time.monotonic() < deadline, "the request never ran"
            await asyncio.sleep(0.01)
        posting.cancel()  # httpx closes a connection whose response is unread
        await asyncio.gather(posting, return_exceptions=True)


def test_disconnect_while_waiting_for_a_non_streamed_response_aborts(server, http):
    finished_before = _num_finished(http)
    body = dict(model=MODEL, prompt=LONG_PROMPTS, max_tokens=LONG_MAX_TOKENS, ignore_eos=True)
    asyncio.run(_leave_once_running(server.url, body))
    _check_aborted_once_idle(http, finished_before)


def test_metrics_have_vllm_names_with_the_model_label(client, http):
    client.completions.create(prompt="Metrics", max_tokens=3, **greedy())
    text = _wait_until_idle(http)
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert f'pagedllm:{name}{{model_name="{MODEL}"}}' in text
    for name in ("prompt_tokens_total", "generation_tokens_total", "num_preemptions_total",
                 "prefix_cache_queries_total", "prefix_cache_hits_total"):
        assert f'pagedllm:{name}{{model_name="{MODEL}"}}' in text
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds"):
        assert metric_value(text, f"pagedllm:{name}_count", model_name=MODEL) > 0
    assert metric_value(text, "pagedllm:request_success_total", finished_reason="length", model_name=MODEL) > 0
    assert metric_value(text, "pagedllm:prompt_tokens_total") > 0
    assert metric_value(text, "pagedllm:prefix_cache_hits_total") > 0  # repeated prompts above
