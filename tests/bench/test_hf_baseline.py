import os

import pytest

from pagedllm.bench.hf_baseline import _left_padded, default_model_path, run_hf_baseline
from pagedllm.bench.workload import BenchRequest

# Varied prompt lengths exercise left padding; batch 1 runs 5 steps, batch 2 runs 4.
REQUESTS = [
    BenchRequest([20, 21, 22], 3),
    BenchRequest([30, 31, 32, 33, 34, 35, 36], 5),
    BenchRequest([40, 41, 42, 43, 44], 2),
    BenchRequest([50, 51], 4),
]


def test_static_batches(tiny_llama_dir):
    r = run_hf_baseline(str(tiny_llama_dir), REQUESTS, batch_size=2, dtype="float32",
                        device="cpu")
    assert r["output_tokens"] == 3 + 5 + 2 + 4
    assert r["generated_tokens"] == 2 * 5 + 2 * 4  # shorter requests ride to the batch's end
    assert r["prompt_tokens"] == 17 and r["num_requests"] == 4
    assert r["batch_size"] == 2 and r["dtype"] == "float32" and r["device"] == "cpu"
    assert r["elapsed_s"] > 0
    assert r["output_tokens_per_s"] == pytest.approx(14 / r["elapsed_s"])
    assert r["total_tokens_per_s"] == pytest.approx(31 / r["elapsed_s"])
    assert r["requests_per_s"] == pytest.approx(4 / r["elapsed_s"])


def test_left_padding():
    ids, mask = _left_padded(REQUESTS[:2], pad_id=1, device="cpu")
    assert ids.tolist() == [[1, 1, 1, 1, 20, 21, 22], [30, 31, 32, 33, 34, 35, 36]]
    assert mask.tolist() == [[0, 0, 0, 0, 1, 1, 1], [1] * 7]


def test_rejects_bad_input(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        run_hf_baseline(str(tiny_llama_dir), REQUESTS, 2, dtype="int8")
    with pytest.raises(ValueError, match="batch_size"):
        run_hf_baseline(str(tiny_llama_dir), REQUESTS, 0)
    with pytest.raises(ValueError, match="vocab size"):
        run_hf_baseline(str(tiny_llama_dir), [BenchRequest([500], 2)], 1, device="cpu")
    with pytest.raises(FileNotFoundError):
        run_hf_baseline(str(tmp_path / "missing.gguf"), REQUESTS, 2)


def test_default_model_is_the_embedded_gguf():
    path = default_model_path()
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(path)
