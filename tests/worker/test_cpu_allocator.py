"""keep_freed_memory: a CPU worker's second prefill step finds its activation
memory mapped already instead of page-faulting it in again."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pagedllm.worker import cpu_allocator

# Two 2048-token prefill steps of the embedded model (8 distinct prompts of 256
# tokens each time; no prefix caching, so the second step reuses the first
# one's KV blocks): prints the page faults of the second step.
_PROBE = """
import resource
from pagedllm import LLM, SamplingParams
llm = LLM(enable_prefix_caching=False)
params = SamplingParams(max_tokens=1, ignore_eos=True)
def prompts(offset):
    return [{"prompt_token_ids": [offset + 300 * i + t for t in range(256)]} for i in range(8)]
llm.generate(prompts(1000), params, use_tqdm=False)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
llm.generate(prompts(5000), params, use_tqdm=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _second_step_faults(env: dict[str, str]) -> int:
    result = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, check=True,
                            timeout=300)
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_second_prefill_step_reuses_activation_memory():
    env = {k: v for k, v in os.environ.items() if k not in cpu_allocator.USER_SETTINGS}
    kept = _second_step_faults(env)
    # Any malloc setting in the environment makes the worker leave malloc as it is.
    default = _second_step_faults({**env, "GLIBC_TUNABLES": "glibc.malloc.check=0"})
    assert kept < 2000 and default > 5 * kept, (kept, default)
