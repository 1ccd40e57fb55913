"""Benchmark results: JSON files, a bar chart comparing runs, a console table."""

from __future__ import annotations

import json
import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _jsonable(value):
    # json.dump would write bare Infinity/NaN (e.g. request_rate=inf), which strict
    # JSON readers reject; spell them as strings instead.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_json(path: str | Path, result: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(result), indent=2, allow_nan=False) + "\n")


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def plot(results: list[dict], png_path: str | Path) -> None:
    """Grouped bars of output tok/s and total tok/s, one group per run label."""
    if not results:
        raise ValueError("plot needs at least one result")
    for r in results:
        missing = {"label", "output_tokens_per_s", "total_tokens_per_s"} - r.keys()
        if missing:
            raise ValueError(f"result {r.get('label', '?')!r} lacks {sorted(missing)}")
    labels = [str(r["label"]) for r in results]
    series = [
        ("output tok/s", [r["output_tokens_per_s"] for r in results]),
        ("total tok/s", [r["total_tokens_per_s"] for r in results]),
    ]
    # A Figure with its own Agg canvas, not pyplot: no global backend or figure state,
    # so this works headless and inside servers and tests.
    fig = Figure(figsize=(max(6.0, 1.6 * len(results) + 2), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.38
    for k, (name, values) in enumerate(series):
        xs = [i + (k - 0.5) * width for i in range(len(results))]
        bars = ax.bar(xs, values, width, label=name)
        ax.bar_label(bars, fmt="%.0f", fontsize=8, padding=2)
    ax.set_xticks(range(len(results)), labels, rotation=15 if len(results) > 3 else 0)
    ax.set_ylabel("tokens / s")
    ax.set_title("Throughput per run")
    ax.legend()
    ax.margins(y=0.12)  # room for the value labels above the tallest bar
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def format_table(title: str, rows: list[tuple[str, object]]) -> str:
    """A two-column text table (vLLM-style) for the console."""
    width = max([len(title) + 8, 50] + [len(k) + len(_fmt(v)) + 3 for k, v in rows])
    lines = [f" {title} ".center(width, "=")]
    for key, value in rows:
        text = _fmt(value)
        lines.append(f"{key + ':':<{width - len(text)}}{text}")
    lines.append("=" * width)
    return "\n".join(lines)
