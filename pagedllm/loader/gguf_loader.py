"""GGUF reader: a llama.cpp GGUF file as a Hugging Face config dict, HF-named weights and tokenizer.

The models are written against Hugging Face configs and parameter names, so a GGUF file is
translated into exactly what `transformers` loads from it: same names, same float32 values.
llama.cpp's converter changed three things that are undone here: tensor names, the rotary row
order of llama's Q/K projections, and gemma's RMSNorm weights (stored as w + 1).

Parsing a GGUF header with `gguf.GGUFReader` walks every vocabulary string (seconds for a 49k
vocabulary), and converting its tokenizer takes longer still, so the config dict and the tokenizer
are cached on disk, keyed by the file's absolute path, size and mtime.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pagedllm.paths import cache_dir
from pagedllm.layers.quantization import GGUF_FORMATS, QuantizedTensor
from pagedllm.loader.tokenizer import load_tokenizer_folder

if TYPE_CHECKING:
    import gguf
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# Bump when gguf_hf_config's or _tensor_index's output changes, so caches of older code are not reused.
_CACHE_VERSION = 3
# Dequantized weights are cached (float32 safetensors, memory-mapped on load) for
# models up to this many bytes: re-parsing and dequantizing costs seconds per start.
_WEIGHT_CACHE_MAX_BYTES = int(float(os.environ.get("PAGEDLLM_GGUF_WEIGHT_CACHE_GIB", "2")) * 2**30)


@dataclass(frozen=True)
class _ArchSpec:
    hf_architecture: str
    model_type: str
    layer_names: dict[str, str]  # llama.cpp leaf in blk.N -> HF module path in model.layers.N
    permute_qk: bool = False  # convert_hf_to_gguf interleaved llama's Q/K rows for its rotary
    norm_offset: bool = False  # convert_hf_to_gguf stored gemma's RMSNorm weights as w + 1


_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_ARCHS = {
    "llama": _ArchSpec("LlamaForCausalLM", "llama", _LAYER_NAMES, permute_qk=True),
    "qwen2": _ArchSpec("Qwen2ForCausalLM", "qwen2", _LAYER_NAMES),
    "qwen3": _ArchSpec(
        "Qwen3ForCausalLM",
        "qwen3",
        _LAYER_NAMES | {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"},
    ),
    "gemma": _ArchSpec("GemmaForCausalLM", "gemma", _LAYER_NAMES, norm_offset=True),
    # Gemma 2 norms both sides of attention and MLP; its ffn_norm is the *pre*-MLP one.
    "gemma2": _ArchSpec(
        "Gemma2ForCausalLM",
        "gemma2",
        _LAYER_NAMES
        | {
            "post_attention_norm": "post_attention_layernorm",
            "ffn_norm": "pre_feedforward_layernorm",
            "post_ffw_norm": "post_feedforward_layernorm",
        },
        norm_offset=True,
    ),
}
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Llama 3.x rope scaling, which llama.cpp keeps only as this per-frequency factor tensor.
_ROPE_FREQS = "rope_freqs.weight"


# --- config -------------------------------------------------------------------------------


def gguf_hf_config(path: str) -> dict[str, Any]:
    """A Hugging Face `config.json`-style dict for the model in the GGUF file at `path`."""
    cache_file = os.path.join(_cache_dir(path), "config.json")
    if os.path.isfile(cache_file):
        with open(cache_file, encoding="utf-8") as f:
            return json.load(f)
    import gguf  # only on a cache miss: importing it costs ~0.25 s of start-up

    config = _build_config(gguf.GGUFReader(path), path)
    try:
        os.makedirs(os.path.dirname(cache_file), exist_ok=True)
        tmp = f"{cache_file}.{os.getpid()}.tmp"  # a reader never sees a half-written file
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        os.replace(tmp, cache_file)
    except OSError as e:  # the cache only saves time; a read-only home must still load
        logger.warning("could not cache the GGUF config in %s: %s", cache_file, e)
    return config


def _build_config(reader: gguf.GGUFReader, path: str) -> dict[str, Any]:
    arch = _architecture(reader, path)
    spec = _ARCHS[arch]

    def key(name: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{name}", default)

    def need(name: str) -> Any:
        if (value := key(name)) is None:
            raise ValueError(f"{path}: GGUF metadata lacks {arch}.{name}, which the config needs")
        return value

    hidden, heads, layers = need("embedding_length"), need("attention.head_count"), need("block_count")
    # llama writes head_dim as the rotary width; qwen3 and gemma as the key length
    head_dim = key("attention.key_length") or key("rope.dimension_count") or hidden // heads
    rope_theta = float(key("rope.freq_base", 10000.0))
    tensor_names = {t.name for t in reader.tensors}
    config = {
        "architectures": [spec.hf_architecture],
        "model_type": spec.model_type,
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": need("attention.layer_norm_rms_epsilon"),
        "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling(reader, arch, head_dim, rope_theta, path),
        "max_position_embeddings": need("context_length"),
        "vocab_size": key("vocab_size") or _vocab_length(reader, path),
        # llama.cpp writes output.weight only when it differs from the embedding
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _eos_token_ids(reader),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }
    if arch == "gemma2":
        config |= {
            # llama.cpp's defaults when the keys are absent (also transformers')
            "attn_logit_softcapping": key("attn_logit_softcapping", 50.0),
            "final_logit_softcapping": key("final_logit_softcapping", 30.0),
            "sliding_window": need("attention.sliding_window"),
            # No GGUF key: llama.cpp scales queries by hidden/heads for the 27B (46 layers), else by
            # head_dim, as gemma_pytorch's configs do.
            "query_pre_attn_scalar": hidden // heads if layers == 46 else head_dim,
        }
    return config


def _architecture(reader: gguf.GGUFReader, path: str) -> str:
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHS:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(_ARCHS))}"
        )
    return arch


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _vocab_length(reader: gguf.GGUFReader, path: str) -> int:
    tokens = reader.get_field("tokenizer.ggml.tokens")
    if tokens is None:
        raise ValueError(f"{path}: GGUF has neither a vocab_size key nor a tokenizer.ggml.tokens list")
    return len(tokens.data)  # one data part per token: no need to decode 100k strings


def _eos_token_ids(reader: gguf.GGUFReader) -> int | list[int] | None:
    """EOS plus llama.cpp's end-of-turn / end-of-message tokens, which also end generation."""
    ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        token_id = _field(reader, key)
        if token_id is not None and token_id not in ids:
            ids.append(token_id)
    if not ids:
        return None
    return ids[0] if len(ids) == 1 else ids


def _rope_scaling(
    reader: gguf.GGUFReader, arch: str, head_dim: int, rope_theta: float, path: str
) -> dict[str, Any] | None:
    kind = _field(reader, f"{arch}.rope.scaling.type", "none")
    factor = _field(reader, f"{arch}.rope.scaling.factor")
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        scaling = {
            "rope_type": "yarn",
            "factor": factor,
            "original_max_position_embeddings": _field(reader, f"{arch}.rope.scaling.original_context_length"),
        }
        # convert_hf_to_gguf writes HF's attention_factor as yarn_attn_factor
        for gguf_key, hf_key in (
            ("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"), ("yarn_attn_factor", "attention_factor")
        ):
            if (value := _field(reader, f"{arch}.rope.scaling.{gguf_key}")) is not None:
                scaling[hf_key] = value
        return scaling
    if kind != "none":
        raise ValueError(f"{path}: rope scaling type {kind!r} is not supported; supported: linear, yarn, llama3")
    if (old_linear := _field(reader, f"{arch}.rope.scale_linear")) is not None:  # pre-2024 GGUFs
        return {"rope_type": "linear", "factor": old_linear}
    freqs = next((t for t in reader.tensors if t.name == _ROPE_FREQS), None)
    if freqs is None:
        return None
    return _llama3_rope_scaling(np.asarray(freqs.data, dtype=np.float32), head_dim, rope_theta, path)


def _llama3_rope_scaling(factors: np.ndarray, head_dim: int, rope_theta: float, path: str) -> dict[str, Any]:
    """Rebuild HF's llama3 rope_scaling from llama.cpp's factor tensor ([head_dim // 2]).

    convert_hf_to_gguf drops the parameters. Every Llama 3.x uses low 1, high 4 and an original
    context of 8192 (the converter's defaults too) with factor = the largest one; check that these
    reproduce the tensor rather than trusting it.
    """
    low, high, original = 1.0, 4.0, 8192
    factor = float(factors.max())
    # the converter's formula (LlamaModel.generate_extra_tensors), vectorised
    freqs = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    wavelen = 2 * np.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    expected = np.where(
        wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, 1 / ((1 - smooth) / factor + smooth))
    )
    if expected.shape != factors.shape or not np.allclose(expected, factors, rtol=1e-4):
        raise ValueError(f"{path}: {_ROPE_FREQS} does not match llama3 rope scaling (low 1, high 4, context 8192)")
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original,
    }


# --- weights ------------------------------------------------------------------------------


def iter_gguf_weights(path: str, quantized: bool = False) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
    """Yield (HF parameter name, tensor in HF shape) for every tensor, one at a time.

    Linear weights come out as [out_features, in_features], norms and biases as [n].
    quantized: matrices of a type in GGUF_FORMATS come as QuantizedTensor (their blocks
    as stored), the rest dequantized; else everything as float32, small models
    from the dequantized cache after the first load.
    """
    if quantized:
        yield from _read_weights(path, keep_quantized=True)
        return
    cache_file = os.path.join(_cache_dir(path), "weights-float32.safetensors")
    if os.path.isfile(cache_file):
        with safe_open(cache_file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
        return
    cached: dict[str, torch.Tensor] = {}
    num_bytes = 0
    for name, weight in _read_weights(path, keep_quantized=False):
        num_bytes += weight.numel() * 4
        if num_bytes <= _WEIGHT_CACHE_MAX_BYTES:
            cached[name] = weight
        yield name, weight
    if num_bytes <= _WEIGHT_CACHE_MAX_BYTES:
        _write_weight_cache(cached, cache_file)


def _read_weights(path: str, keep_quantized: bool) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
    """Each tensor is read from the file into memory of its own, one at a time (read, not
    memory-mapped: decode streamed quantized weights from mapped 4 KiB page-cache pages
    ~15 % slower than from anonymous memory; embedded model, one stream). keep_quantized:
    matrices of a type in GGUF_FORMATS stay as stored, so the float model is never built;
    everything else is dequantized to float32 in HF layout."""
    index = _tensor_index(path)
    spec = _ARCHS[index["architecture"]]
    kept: Counter[str] = Counter()
    dequantized: Counter[str] = Counter()
    with open(path, "rb") as file:
        for entry in index["tensors"]:
            raw = torch.empty(entry["bytes"], dtype=torch.uint8)
            file.seek(entry["offset"])
            if file.readinto(raw.numpy()) != entry["bytes"]:
                raise ValueError(f"{path}: the file ends inside tensor {entry['gguf_name']}")
            raw = raw.reshape(entry["rows"], -1)
            fmt = GGUF_FORMATS.get(entry["type"]) if keep_quantized and entry["matrix"] else None
            if fmt is not None:
                kept[fmt.name] += 1
                if spec.permute_qk and entry["heads"]:
                    raw = raw[_unpermute_rotary_rows(torch.arange(entry["rows"]), entry["heads"])]
                yield entry["name"], QuantizedTensor(raw, fmt, entry["cols"])
                continue
            dequantized[entry["type_name"]] += 1
            weight = torch.from_numpy(_dequantize(raw.numpy(), entry, path)).reshape(entry["shape"])
            if spec.permute_qk and entry["heads"]:
                weight = _unpermute_rotary_rows(weight, entry["heads"])
            if spec.norm_offset and entry["gguf_name"].endswith("norm.weight"):
                weight = weight - 1  # as transformers' GGUF loader does, in float32
            yield entry["name"], weight
    if keep_quantized:
        logger.info("GGUF weights kept quantized: %s; dequantized to float: %s",
                    ", ".join(f"{n} {t}" for t, n in sorted(kept.items())) or "none",
                    ", ".join(f"{n} {t}" for t, n in sorted(dequantized.items())) or "none")


def _dequantize(raw: np.ndarray, entry: dict[str, Any], path: str) -> np.ndarray:
    """A tensor's bytes as float32 values (gguf's reference dequantization)."""
    if entry["type_name"] == "F32":  # norms and biases: no need to import gguf
        return np.array(raw.view(np.float32))
    import gguf

    try:
        return np.array(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(entry["type"])), dtype=np.float32)
    except NotImplementedError as e:
        raise ValueError(f"{path}: tensor {entry['gguf_name']} is {entry['type_name']}, "
                         "which gguf cannot dequantize") from e


def _tensor_index(path: str) -> dict[str, Any]:
    """Where each tensor lies in the file and what it is, cached beside the config
    (parsing the header with gguf.GGUFReader walks every vocabulary string: ~2.8 s
    for SmolLM2's 49k)."""
    cache_file = os.path.join(_cache_dir(path), "tensors.json")
    if os.path.isfile(cache_file):
        with open(cache_file, encoding="utf-8") as f:
            return json.load(f)
    import gguf

    reader = gguf.GGUFReader(path)
    arch = _architecture(reader, path)
    spec = _ARCHS[arch]
    heads = _field(reader, f"{arch}.attention.head_count")
    kv_heads = _field(reader, f"{arch}.attention.head_count_kv", heads)
    tensors = []
    for tensor in reader.tensors:
        if tensor.name == _ROPE_FREQS:  # folded into the config's rope_scaling
            continue
        shape = [int(n) for n in reversed(tensor.shape.tolist())]  # GGUF lists the fastest dimension first
        rotary_heads = heads if ".attn_q." in tensor.name else kv_heads if ".attn_k." in tensor.name else None
        tensors.append({
            "name": _hf_name(tensor.name, spec, path),
            "gguf_name": tensor.name,
            "type": int(tensor.tensor_type),
            "type_name": tensor.tensor_type.name,
            "shape": shape,
            "rows": int(np.prod(shape[:-1])) if len(shape) > 1 else 1,
            "cols": shape[-1],
            "matrix": len(shape) == 2,
            "heads": rotary_heads,
            "offset": int(tensor.data_offset),
            "bytes": int(tensor.n_bytes),
        })
    index = {"architecture": arch, "tensors": tensors}
    try:
        os.makedirs(os.path.dirname(cache_file), exist_ok=True)
        tmp = f"{cache_file}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(index, f)
        os.replace(tmp, cache_file)
    except OSError as e:
        logger.warning("could not cache the GGUF tensor index in %s: %s", cache_file, e)
    return index


def _write_weight_cache(weights: dict[str, torch.Tensor], cache_file: str) -> None:
    try:
        os.makedirs(os.path.dirname(cache_file), exist_ok=True)
        tmp = f"{cache_file}.{os.getpid()}.tmp"
        save_file({name: w.contiguous() for name, w in weights.items()}, tmp)
        os.replace(tmp, cache_file)
    except OSError as e:
        logger.warning("could not cache the dequantized GGUF weights in %s: %s", cache_file, e)


def _hf_name(gguf_name: str, spec: _ArchSpec, path: str) -> str:
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    match = _BLOCK_TENSOR.fullmatch(gguf_name)
    if match is None or match[2] not in spec.layer_names:
        raise ValueError(f"{path}: GGUF tensor {gguf_name!r} has no Hugging Face name for {spec.hf_architecture}")
    return f"model.layers.{match[1]}.{spec.layer_names[match[2]]}.{match[3]}"


def _unpermute_rotary_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf's `permute` of a Q/K weight [num_heads * head_dim, in] (or bias).

    llama.cpp rotates adjacent pairs (x0, x1) where HF rotates halves (x_i, x_{i + head_dim/2}), so
    the converter reordered each head's rows [half 0 | half 1] -> interleaved; reverse that.
    """
    head_dim = weight.shape[0] // num_heads
    rows = weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
    return rows.transpose(1, 2).reshape(weight.shape)


# --- tokenizer ----------------------------------------------------------------------------


def load_gguf_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """A transformers fast tokenizer (with the GGUF's chat template) for the GGUF file at `path`.

    The first call converts the GGUF vocabulary (seconds) and caches the result with
    `save_pretrained`; later calls load that cache.
    """
    # imported here: weight loading in worker processes does not need transformers
    import transformers

    # keyed by the transformers version too: its GGUF tokenizer conversion may change
    cache = os.path.join(_cache_dir(path), f"tokenizer-transformers-{transformers.__version__}")
    if os.path.isdir(cache):
        return load_tokenizer_folder(cache)
    dirname, basename = os.path.split(os.path.abspath(path))
    # transformers copies tokenizer.chat_template from the metadata onto the tokenizer
    tokenizer = transformers.AutoTokenizer.from_pretrained(dirname, gguf_file=basename)
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(cache), prefix=".tmp-tokenizer-")
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, cache)  # atomic: a concurrent reader sees no directory or a full one
        except OSError:  # another process cached it first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        logger.warning("could not cache the GGUF tokenizer in %s: %s", cache, e)
    return tokenizer


def _cache_dir(path: str) -> str:
    """`$PAGEDLLM_CACHE_DIR` (or ~/.cache/pagedllm) / gguf / <name>-<hash of path, size, mtime>."""
    path = os.path.abspath(path)
    stat = os.stat(path)
    identity = f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{_CACHE_VERSION}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return os.path.join(cache_dir(), "gguf", f"{os.path.basename(path)}-{digest}")
