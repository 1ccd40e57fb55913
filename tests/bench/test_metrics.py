"""The serving metrics' arithmetic on hand-made records, checked against values
computed here by hand (linear-interpolation percentiles, vLLM's TPOT)."""

import pytest

from pagedllm.bench.serve_client import RequestRecord, summarize


def percentile(values, q):
    """Linear interpolation between closest ranks, written out independently."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


RECORDS = [
    RequestRecord(prompt_len=10, success=True, ttft=0.1, itl=[0.02, 0.03, 0.05],
                  latency=0.2, output_tokens=4),
    RequestRecord(prompt_len=20, success=True, ttft=0.3, itl=[], latency=0.3, output_tokens=1),
    RequestRecord(prompt_len=5, success=True, ttft=0.05, itl=[0.01, 0.01],
                  latency=0.08, output_tokens=3),
    RequestRecord(prompt_len=7, error="HTTPError: boom"),
]


def test_counts_and_throughput():
    s = summarize(RECORDS, elapsed=2.0)
    assert s["completed"] == 3 and s["failed"] == 1
    assert s["errors"] == ["HTTPError: boom"]
    assert s["total_input_tokens"] == 35  # the failed request's prompt is not counted
    assert s["total_output_tokens"] == 8
    assert s["requests_per_s"] == pytest.approx(1.5)
    assert s["output_tokens_per_s"] == pytest.approx(4.0)
    assert s["total_tokens_per_s"] == pytest.approx(21.5)


def test_ttft_and_e2e():
    s = summarize(RECORDS, elapsed=2.0)
    assert s["mean_ttft_ms"] == pytest.approx(150.0)
    assert s["p50_ttft_ms"] == pytest.approx(100.0)
    assert s["p99_ttft_ms"] == pytest.approx(296.0)  # 100 + 0.98 * (300 - 100)
    assert s["mean_e2e_ms"] == pytest.approx((200 + 300 + 80) / 3)
    assert s["p50_e2e_ms"] == pytest.approx(200.0)
    assert s["p99_e2e_ms"] == pytest.approx(298.0)


def test_tpot_skips_single_token_requests():
    s = summarize(RECORDS, elapsed=2.0)
    tpots = [(200 - 100) / 3, (80 - 50) / 2]  # ms; the 1-token request has no TPOT
    assert s["mean_tpot_ms"] == pytest.approx(sum(tpots) / 2)
    assert s["p50_tpot_ms"] == pytest.approx(sum(tpots) / 2)
    assert s["p99_tpot_ms"] == pytest.approx(percentile(tpots, 99))


def test_itl_pools_all_gaps():
    s = summarize(RECORDS, elapsed=2.0)
    gaps = [20, 30, 50, 10, 10]
    assert s["mean_itl_ms"] == pytest.approx(24.0)
    assert s["p50_itl_ms"] == pytest.approx(20.0)
    assert s["p99_itl_ms"] == pytest.approx(percentile(gaps, 99))
    assert s["p99_itl_ms"] == pytest.approx(49.2)


def test_no_success_gives_empty_stats():
    s = summarize([RequestRecord(prompt_len=3, error="x")], elapsed=1.0)
    assert s["completed"] == 0 and s["failed"] == 1 and s["output_tokens_per_s"] == 0
    assert s["mean_ttft_ms"] is None and s["p99_tpot_ms"] is None


def test_elapsed_must_be_positive():
    with pytest.raises(ValueError, match="elapsed"):
        summarize(RECORDS, elapsed=0)
