"""keep_freed_memory: a CPU worker's prefill steps find their activation memory
mapped already instead of page-faulting it in again."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pagedllm.platforms.cpu import memory

# 2048-token prefill steps of the embedded model in float32 (8 distinct prompts
# of 256 tokens each; no prefix caching, and a KV pool of 136 blocks, one step's
# 128 and a few: later steps rewrite blocks the first ones touched, so the pool's
# own first-touch faults stay out of the count): two to settle the heap, then
# prints the page faults of three more.
# float32, not the CPU's `auto` choice: bfloat16 activations are half as large
# and glibc's defaults already fault few of them in again (measured on an
# AVX-512 BF16 CI machine, where `auto` is bfloat16: 2567 kept, 7218 default).
_PROBE = """
import resource
from pagedllm import LLM, SamplingParams
llm = LLM(enable_prefix_caching=False, dtype="float32", max_model_len=512, num_kv_blocks=136)
params = SamplingParams(max_tokens=1, ignore_eos=True)
def prompts(offset):
    return [{"prompt_token_ids": [offset + 300 * i + t for t in range(256)]} for i in range(8)]
for offset in (1000, 4000):
    llm.generate(prompts(offset), params, use_tqdm=False)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for offset in (7000, 10000, 13000):
    llm.generate(prompts(offset), params, use_tqdm=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _prefill_step_faults(env: dict[str, str]) -> int:
    result = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, check=True,
                            timeout=300)
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_prefill_steps_reuse_activation_memory():
    env = {k: v for k, v in os.environ.items() if k not in memory.USER_SETTINGS}
    kept = _prefill_step_faults(env)
    # Any malloc setting in the environment makes the worker leave malloc as it is.
    default = _prefill_step_faults({**env, "GLIBC_TUNABLES": "glibc.malloc.check=0"})
    # Measured: 0-6700 page faults kept (the heap now and then still grows once),
    # 24 000-660 000 by default (24 305 against 3840 kept in one full CI run).
    assert default > 4 * kept, (kept, default)
