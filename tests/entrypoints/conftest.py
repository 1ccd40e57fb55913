"""A real `pagedllm serve` process on 127.0.0.1 for the server tests, and a tiny model
to serve (random weights, byte-level tokenizer: starts in seconds)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.tiny_models import save_tiny_llama

TINY_MAX_MODEL_LEN = 512
# The shared tiny server.
API_KEY = "test-key"
MODEL = "tiny"
NUM_KV_BLOCKS = 160
STARTUP_TIMEOUT_S = 300  # the embedded model needs ~30 s on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`python -m pagedllm serve ARGS` with its log in a file; stop() sends a signal
    and checks the clean shutdown."""

    def __init__(self, args: list[str], log_path: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "pagedllm", "serve", *args, "--port", str(self.port)],
                                     stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        self._wait_ready()

    @property
    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited with {self.proc.returncode}:\n{self.log[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.proc.kill()
        pytest.fail(f"the server did not become healthy in {STARTUP_TIMEOUT_S} s:\n{self.log[-3000:]}")

    def stop(self, sig: int = signal.SIGINT) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._log.close()


def usage_counts(usage) -> tuple[int, int, int]:
    """A usage's token counts (its cached_tokens depend on what earlier requests left in the cache)."""
    return usage.prompt_tokens, usage.completion_tokens, usage.total_tokens


def metric_value(metrics_text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    for line in metrics_text.splitlines():
        match = re.fullmatch(r"([^{\s]+)(?:\{(.*)\})?\s+(\S+)", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(key) == value for key, value in labels.items()):
            return float(match.group(3))
    return 0.0


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("tiny-llama"))
    save_tiny_llama(folder, TINY_MAX_MODEL_LEN)
    return folder


def start_server(tmp_path_factory, args: list[str], name: str, env: dict[str, str] | None = None) -> ServerProcess:
    log_path = os.path.join(str(tmp_path_factory.mktemp(name)), "server.log")
    return ServerProcess(args, log_path, env)


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_model_dir):
    """The tiny model behind an API key; a clean exit on SIGINT is checked at the end."""
    process = start_server(tmp_path_factory, [tiny_model_dir, "--dtype", "float32", "--num-kv-blocks",
                                              str(NUM_KV_BLOCKS), "--api-key", API_KEY, "--served-model-name", MODEL],
                           "tiny-server")
    yield process
    assert process.stop(signal.SIGINT) == 0
    assert "Application shutdown complete" in process.log


@pytest.fixture(scope="session")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="session")
def http(server) -> httpx.Client:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as http:
        yield http
