"""The `pagedllm` command imports the benchmarks, and the optional packages of the
extras, only for `pagedllm bench`: a plain `pip install pagedllm` serves."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from pagedllm.entrypoints.cli import OPTIONAL_PACKAGES, build_parser, main

REPO = Path(__file__).resolve().parents[2]
# Only in extras (bench, cuda, ray): a plain install lacks them.
OPTIONAL = ("matplotlib", "openai", "httpx", "accelerate", "ray", "triton")

# In a fresh interpreter, so that no other test has imported anything yet: the
# optional and benchmark modules loaded by importing the CLI, then by parsing the
# command lines of the commands a plain install runs.
LOADED_MODULES = f"""
import json, sys

def loaded():
    return sorted(name for name in sys.modules
                  if name.partition(".")[0] in {OPTIONAL!r} or name.startswith("pagedllm.bench"))

import pagedllm.entrypoints.cli
after_import = loaded()
parser = pagedllm.entrypoints.cli.build_parser()
for argv in (["serve"], ["generate", "--prompt", "hi"], ["models"]):
    parser.parse_args(argv)
print(json.dumps({{"import": after_import, "parse": loaded()}}))
"""


def test_plain_commands_import_no_optional_package():
    result = subprocess.run([sys.executable, "-c", LOADED_MODULES], capture_output=True, text=True, timeout=300,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"import": [], "parse": []}


def test_bench_commands_are_added_when_a_bench_command_line_is_parsed():
    args = build_parser().parse_args(["bench", "throughput", "--random-input-len", "4", "--random-output-len", "2",
                                      "--num-prompts", "1", "--seed", "3"])
    assert (args.command, args.bench_command, args.seed) == ("bench", "throughput", 3)


@pytest.mark.parametrize("package, argv, user, extra", [
    ("matplotlib", ["bench", "plot", "a.json", "--png", "b.png"], "the benchmarks", "bench"),
    ("httpx", ["bench", "serve", "--random-input-len", "2", "--random-output-len", "2", "--num-prompts", "1"],
     "the benchmarks", "bench"),
    ("ray", ["generate", "--prompt", "hi", "--tensor-parallel-size", "2", "--distributed-executor-backend", "ray"],
     "Ray executors", "ray"),
])
def test_a_command_without_its_extra_exits_with_one_line(monkeypatch, capsys, package, argv, user, extra):
    # None in sys.modules makes importing a module raise ModuleNotFoundError, as when it is not installed
    # (its submodules too: one already imported would be found without its package); the benchmark modules
    # are dropped so that they are imported anew.
    monkeypatch.setitem(sys.modules, package, None)
    for name in list(sys.modules):
        if name.startswith(f"{package}."):
            monkeypatch.setitem(sys.modules, name, None)
        elif name.startswith("pagedllm.bench."):
            monkeypatch.delitem(sys.modules, name)
    assert main(argv) == 1
    assert capsys.readouterr().err == (f"error: {package} is not installed, and {user} need it: "
                                       f"pip install 'pagedllm[{extra}]'\n")


def test_bench_extra_matches_pyproject():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    bench_packages = {name for name, (extra, _) in OPTIONAL_PACKAGES.items() if extra == "bench"}
    assert bench_packages == {re.match(r"[\w.-]+", requirement).group() for requirement in extras["bench"]}
