"""The in-process executor: one worker in the engine's own process."""

from __future__ import annotations

from pagedllm.config import CacheConfig, ModelConfig
from pagedllm.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from pagedllm.worker.worker import Worker


class UniprocExecutor:
    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig) -> None:
        self.worker = Worker(model_config, cache_config)
        self.worker.init_device()
        self.worker.load_model()

    def determine_num_blocks(self) -> int:
        return self.worker.determine_num_blocks()

    def attention_window(self) -> int | None:
        """The model's sliding window when all layers share it (lets the KV
        manager free blocks that fall out of it)."""
        return self.worker.attention_window()

    def bytes_per_block(self) -> int:
        return self.worker.bytes_per_block()

    def init_kv_cache(self, num_blocks: int) -> None:
        self.worker.init_kv_cache(num_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute_model(scheduler_output)

    def check_health(self) -> None:
        """Raises if the workers cannot run steps (always healthy in-process)."""

    def shutdown(self) -> None:
        pass
