"""One rank: its device and process group, its model shard, its KV pool."""

from __future__ import annotations

import logging

import psutil
import torch

from pagedllm.config import (DEFAULT_CPU_KV_BYTES, DEFAULT_CPU_KV_FRACTION, DEFAULT_GPU_KV_FRACTION,
                             CacheConfig, ModelConfig)
from pagedllm.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from pagedllm.distributed.parallel_state import set_tensor_parallel_group
from pagedllm.layers.linear import shard_attention_heads
from pagedllm.platforms import get_platform
from pagedllm.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


class Worker:
    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, rank: int = 0,
                 world_size: int = 1, distributed_init_method: str | None = None) -> None:
        self.model_config = model_config
        self.cache_config = cache_config
        self.rank = rank
        self.world_size = world_size
        self.distributed_init_method = distributed_init_method
        self.num_kv_heads = shard_attention_heads(model_config.hf_config.num_attention_heads, model_config.num_kv_heads,
                                                  world_size, rank).num_kv_heads
        self.runner = ModelRunner(model_config, cache_config, is_driver=rank == 0)

    def init_device(self) -> None:
        if self.world_size > 1:
            backend = "nccl" if self.model_config.device == "cuda" else "gloo"
            if self.model_config.device == "cuda":
                # A Ray actor sees only its own GPU; worker processes on one host see them all.
                torch.cuda.set_device(self.rank % torch.cuda.device_count())
            torch.distributed.init_process_group(backend, init_method=self.distributed_init_method,
                                                 rank=self.rank, world_size=self.world_size)
        set_tensor_parallel_group(self.rank, self.world_size)
        get_platform(self.model_config.device).prepare_process()
        torch.manual_seed(self.model_config.seed)

    def load_model(self) -> None:
        self.runner.load_model()

    def attention_window(self) -> int | None:
        return self.runner.attention_window()

    def bytes_per_block(self) -> int:
        return self.runner.kv_bytes_per_block(self.num_kv_heads)

    def determine_num_blocks(self) -> int:
        """Blocks this rank's KV budget holds: num_kv_blocks if given, else
        kv_cache_memory bytes, else the documented default share of memory."""
        if self.cache_config.num_kv_blocks is not None:
            return self.cache_config.num_kv_blocks
        budget = self.cache_config.kv_cache_memory
        if budget is None:
            if self.model_config.device == "cuda":
                free, _ = torch.cuda.mem_get_info()
                budget = int(free * DEFAULT_GPU_KV_FRACTION) - (1 << 30)
            else:
                budget = min(DEFAULT_CPU_KV_BYTES, int(psutil.virtual_memory().available * DEFAULT_CPU_KV_FRACTION))
                budget //= self.world_size  # the ranks may all share this host's memory
        return max(0, budget // self.bytes_per_block())

    def init_kv_cache(self, num_blocks: int) -> None:
        self.runner.init_kv_cache(num_blocks, self.num_kv_heads)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput | None:
        return self.runner.execute_model(scheduler_output)
