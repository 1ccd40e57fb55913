"""Without a GPU, Triton kernels run in its interpreter on CPU tensors. The
interpreter is chosen when a kernel is decorated, i.e. when
pagedllm.attention.triton_backend is first imported, so set it here, before any
test module of this directory imports it. With CUDA the kernels compile for real."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    """These tensors are tiny: a second intra-op thread only adds contention
    (many times slower on a loaded 2-core machine)."""
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)
