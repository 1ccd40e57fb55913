import json
from pathlib import Path

import pytest

from pagedllm.bench.workload import (
    FIRST_NON_SPECIAL_ID,
    load_workload,
    num_output_tokens,
    num_prompt_tokens,
    random_workload,
)

SHARED_WORKLOAD = Path(__file__).resolve().parents[2] / "../shared/bench/workload_w.json"


@pytest.fixture(scope="module")
def shared_workload():
    if not SHARED_WORKLOAD.is_file():
        pytest.skip(f"shared workload not present at {SHARED_WORKLOAD}")
    return json.loads(SHARED_WORKLOAD.read_text())


def test_loads_shared_workload(shared_workload):
    meta = shared_workload["meta"]
    requests = load_workload(SHARED_WORKLOAD)
    assert len(requests) == meta["num_requests"] == 128
    assert num_prompt_tokens(requests) == meta["total_prompt_tokens"]
    assert num_output_tokens(requests) == meta["total_output_tokens"]
    assert max(r.prompt_len + r.output_len for r in requests) == meta["max_seq_len"]
    for req, entry in zip(requests, shared_workload["requests"]):
        assert req.prompt_token_ids == entry["prompt_token_ids"]
        assert req.output_len == entry["output_len"]


def test_limit_keeps_arrival_order(shared_workload):
    full = load_workload(SHARED_WORKLOAD)
    first = load_workload(SHARED_WORKLOAD, limit=5)
    assert first == full[:5]
    assert load_workload(SHARED_WORKLOAD, limit=10_000) == full
    with pytest.raises(ValueError, match="limit"):
        load_workload(SHARED_WORKLOAD, limit=0)


GOOD = {"id": 0, "prompt_len": 2, "output_len": 3, "prompt_token_ids": [20, 21]}


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not valid JSON"),
        ("[]", '"requests" list'),
        (json.dumps({"meta": {}}), '"requests" list'),
        (json.dumps({"requests": []}), "no requests"),
        (json.dumps({"requests": [GOOD, 5]}), r"requests\[1\] is not an object"),
        (json.dumps({"requests": [{**GOOD, "output_len": 0}]}), "output_len"),
        (json.dumps({"requests": [{**GOOD, "output_len": "3"}]}), "output_len"),
        (json.dumps({"requests": [{**GOOD, "prompt_token_ids": []}]}), "non-empty"),
        (json.dumps({"requests": [{**GOOD, "prompt_token_ids": [1, "a"]}]}), "integers"),
        (json.dumps({"requests": [{**GOOD, "prompt_token_ids": [1, True]}]}), "integers"),
        (json.dumps({"requests": [{**GOOD, "prompt_token_ids": [1, -4]}]}), "integers"),
        (json.dumps({"requests": [{**GOOD, "prompt_len": 3}]}), "prompt_len is 3"),
    ],
)
def test_malformed_files_raise_value_error(tmp_path, text, message):
    path = tmp_path / "w.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_workload(path)


def test_minimal_file_without_meta_or_prompt_len(tmp_path):
    path = tmp_path / "w.json"
    path.write_text(json.dumps({"requests": [{"prompt_token_ids": [5, 6, 7], "output_len": 2}]}))
    (req,) = load_workload(path)
    assert (req.prompt_token_ids, req.prompt_len, req.output_len) == ([5, 6, 7], 3, 2)


def test_random_workload_lengths_and_range():
    requests = random_workload(num_prompts=20, input_len=50, output_len=7, vocab_size=40)
    assert len(requests) == 20
    assert all(r.prompt_len == 50 and r.output_len == 7 for r in requests)
    ids = {t for r in requests for t in r.prompt_token_ids}
    assert min(ids) >= FIRST_NON_SPECIAL_ID and max(ids) < 40
    assert ids == set(range(FIRST_NON_SPECIAL_ID, 40))  # 1000 draws cover all 23 ids
    assert num_prompt_tokens(requests) == 1000 and num_output_tokens(requests) == 140


def test_random_workload_is_seeded():
    a = random_workload(3, 16, 4, 1000, seed=1)
    assert a == random_workload(3, 16, 4, 1000, seed=1)
    assert a != random_workload(3, 16, 4, 1000, seed=2)


@pytest.mark.parametrize("args", [(0, 4, 4, 100), (2, 0, 4, 100), (2, 4, 0, 100), (2, 4, 4, 17)])
def test_random_workload_rejects_bad_sizes(args):
    with pytest.raises(ValueError):
        random_workload(*args)
