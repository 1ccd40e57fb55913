import json

import pytest

from pagedllm.bench.report import format_table, plot, read_json, write_json

RESULTS = [
    {"label": "hf-static bs=8", "output_tokens_per_s": 120.5, "total_tokens_per_s": 400.0},
    {"label": "pagedllm", "output_tokens_per_s": 900.0, "total_tokens_per_s": 2500.25},
]


def test_write_json_is_strict_json(tmp_path):
    path = tmp_path / "out" / "r.json"
    write_json(path, {"request_rate": float("inf"), "x": [1.5, None], "label": "a"})
    text = path.read_text()
    assert "Infinity" not in text
    assert json.loads(text) == {"request_rate": "inf", "x": [1.5, None], "label": "a"}
    assert read_json(path)["label"] == "a"


def test_plot_writes_png(tmp_path):
    path = tmp_path / "charts" / "cmp.png"
    plot(RESULTS, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_validates(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        plot([], tmp_path / "a.png")
    with pytest.raises(ValueError, match="total_tokens_per_s"):
        plot([{"label": "x", "output_tokens_per_s": 1.0}], tmp_path / "a.png")


def test_format_table():
    text = format_table("Result", [("Requests", 4), ("Output tok/s", 12.345), ("TTFT", None)])
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1  # aligned
    assert lines[2].startswith("Output tok/s:") and lines[2].endswith("12.35")
    assert lines[3].endswith("-")
