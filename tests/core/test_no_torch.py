"""Invariant 8: the core is pure Python; importing it loads no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pagedllm

PACKAGE = Path(pagedllm.__file__).parent
PURE_MODULES = [*sorted((PACKAGE / "core").glob("*.py")), PACKAGE / "request.py", PACKAGE / "sampling_params.py"]


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_core_sources_import_no_torch_or_numpy():
    for path in PURE_MODULES:
        assert not imported_roots(path) & {"torch", "numpy", "triton"}, path


def test_importing_the_core_loads_no_torch():
    code = ("import sys; import pagedllm.core.scheduler, pagedllm.core.kv_cache_manager, "
            "pagedllm.core.block_pool, pagedllm.core.stopping; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
