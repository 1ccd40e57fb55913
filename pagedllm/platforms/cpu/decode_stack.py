"""Decode steps of Llama-shaped float32 models (Llama, Mistral, Qwen2/3, InternLM,
Baichuan-7B, SmolLM) in one C call (csrc/decode_stack.c).

At batch 1 the Python between a layer's kernels cost more than the kernels: ~60 tensor
and ctypes operations a layer, ~500 us of a GGUF layer's ~830 us on a 2-core AVX2
EPYC. A DecodeStack holds every layer's weights, norms and KV-cache pointers in C
structures built once, so a decode step's layers are one call with a handful of
per-step arrays. It runs the kernels the layers would run, in their order, so its
outputs equal theirs bit for bit; the layers stay the path for everything else
(prompt chunks, 16-bit models, tensor parallelism, layer kinds it does not know).
"""

from __future__ import annotations

import ctypes

import torch

from pagedllm.attention.metadata import AttentionMetadata
from pagedllm.distributed.parallel_state import get_tp_size
from pagedllm.layers.activation import SiluAndMul
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.quantization import QuantizedWeight
from pagedllm.layers.rotary import RotaryEmbedding
from pagedllm.platforms.cpu import attention as cpu_attention
from pagedllm.platforms.cpu.kernels import INT64, pointer
from pagedllm.platforms.cpu.linear import SMALL_GEMM_MAX_ROWS

_P, _I64, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class _Linear(ctypes.Structure):
    _fields_ = [("dense", _P), ("num_segments", _I64), ("segments", _P), ("row_bytes", _P), ("types", _P),
                ("first_rows", _P), ("num_rows", _P), ("bias", _P), ("out", _I64)]


class _Layer(ctypes.Structure):
    _fields_ = [("qkv", _Linear), ("o", _Linear), ("gate_up", _Linear), ("down", _Linear), ("input_norm", _P),
                ("post_norm", _P), ("q_norm", _P), ("k_norm", _P), ("kv_cache", _P), ("sliding_window", _I64)]


class _Stack(ctypes.Structure):
    _fields_ = [(name, _I64) for name in ("num_layers", "hidden", "intermediate", "num_heads", "num_kv_heads",
                                          "head_dim", "rotary_dim", "num_blocks", "block_size")]
    _fields_ += [("eps", _F), ("norm_offset", _F), ("scale", _F), ("cos_cache", _P), ("sin_cache", _P),
                 ("layers", _P)]


def _norms(layer) -> tuple:
    """A layer's RMSNorms: input, post-attention (and Qwen3's per-head q and k norms)."""
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    return norms + tuple(getattr(layer.self_attn, name) for name in ("q_norm", "k_norm")
                         if hasattr(layer.self_attn, name))


def _eligible_layer(layer, quantized) -> bool:
    from pagedllm.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP
    from pagedllm.models.qwen2 import Qwen3Attention

    attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if not (type(layer) is LlamaDecoderLayer and type(attention) in (LlamaAttention, Qwen3Attention)
            and type(mlp) is LlamaMLP and type(mlp.act) is SiluAndMul and mlp.act.fused is not None):
        return False
    norms = _norms(layer)
    if any(type(norm) is not RMSNorm or norm.fused is None or norm.weight.dtype != torch.float32 for norm in norms):
        return False
    rotary, attn = attention.rotary_emb, attention.attn
    if rotary is not None and (type(rotary) is not RotaryEmbedding or rotary.fused is None):
        return False
    if (attn.backend is not cpu_attention or attn.alibi_slopes is not None or attn.logits_soft_cap is not None
            or attn.head_dim % 8):
        return False
    return all(_linear_kind(module, quantized) is not None
               for module in (attention.qkv_proj, attention.o_proj, mlp.gate_up_proj, mlp.down_proj))


def _linear_kind(module, quantized) -> str | None:
    """'dense' (float32: the small-batch GEMM), 'int8' (GGUF 32-value blocks), or None."""
    weight = module.weight
    if isinstance(weight, QuantizedWeight):
        if quantized is not None and module.linear == quantized.linear and quantized.int8_table(weight):
            return "int8"
        return None
    if weight.dtype == torch.float32 and weight.is_contiguous() and (module.bias is None
                                                                     or module.bias.dtype == torch.float32):
        return "dense"
    return None


def _out_features(module) -> int:
    weight = module.weight
    return weight.out_features if isinstance(weight, QuantizedWeight) else weight.shape[0]


class DecodeStack:
    """Runs a LlamaModel's layers for decode-only steps (see the module docstring)."""

    def __init__(self, lib: ctypes.CDLL, model, quantized) -> None:
        self._lib, self._quantized = lib, quantized
        self._keep: list = []  # what the C structures point into
        layers = list(model.layers)
        self._layers = (_Layer * len(layers))()  # weights now, KV pointers when the pool is known
        for entry, layer in zip(self._layers, layers):
            attention, mlp = layer.self_attn, layer.mlp
            entry.qkv, entry.o = self._linear(attention.qkv_proj), self._linear(attention.o_proj)
            entry.gate_up, entry.down = self._linear(mlp.gate_up_proj), self._linear(mlp.down_proj)
            entry.input_norm = layer.input_layernorm.weight.data_ptr()
            entry.post_norm = layer.post_attention_layernorm.weight.data_ptr()
            if hasattr(attention, "q_norm"):
                entry.q_norm, entry.k_norm = attention.q_norm.weight.data_ptr(), attention.k_norm.weight.data_ptr()
            entry.sliding_window = attention.attn.sliding_window or 0
        self._dense = any(entry.dense for layer in self._layers
                          for entry in (layer.qkv, layer.o, layer.gate_up, layer.down))
        first = layers[0]
        attention, rotary = first.self_attn.attn, first.self_attn.rotary_emb
        self._stack = _Stack(num_layers=len(layers), hidden=first.input_layernorm.weight.shape[0],
                             intermediate=_out_features(first.mlp.gate_up_proj) // 2,
                             num_heads=attention.num_heads, num_kv_heads=attention.num_kv_heads,
                             head_dim=attention.head_dim,
                             rotary_dim=rotary.cos_cache.shape[1] if rotary is not None else 0,
                             eps=first.input_layernorm.eps, norm_offset=first.input_layernorm.weight_offset,
                             scale=attention.scale,
                             cos_cache=rotary.cos_cache.data_ptr() if rotary is not None else None,
                             sin_cache=rotary.sin_cache.data_ptr() if rotary is not None else None,
                             layers=ctypes.addressof(self._layers))
        self._kv_caches: list[torch.Tensor] | None = None  # the pool the structures point into
        self._kv_usable = False

    @staticmethod
    def build(lib: ctypes.CDLL | None, model, quantized) -> DecodeStack | None:
        """A DecodeStack for model (a LlamaModel), or None where its layers are not all of
        the kinds this runs exactly as they would."""
        layers = list(getattr(model, "layers", ()))
        if lib is None or not layers or get_tp_size() != 1:
            return None
        if not all(_eligible_layer(layer, quantized) for layer in layers):
            return None
        reference = layers[0]
        for layer in layers:  # one set of shapes and constants for every layer
            a, r = layer.self_attn, reference.self_attn
            norms = _norms(layer)
            if (len(norms) != len(_norms(reference)) or {n.eps for n in norms} != {reference.input_layernorm.eps}
                    or {n.weight_offset for n in norms} != {reference.input_layernorm.weight_offset}
                    or a.rotary_emb is not r.rotary_emb or a.attn.scale != r.attn.scale
                    or (a.attn.num_heads, a.attn.num_kv_heads, a.attn.head_dim) != (
                        r.attn.num_heads, r.attn.num_kv_heads, r.attn.head_dim)
                    or _out_features(layer.mlp.gate_up_proj) != _out_features(reference.mlp.gate_up_proj)):
                return None
        return DecodeStack(lib, model, quantized)

    def _linear(self, module) -> _Linear:
        weight, bias = module.weight, module.bias
        out = _out_features(module)
        if bias is not None:
            bias = bias.detach().float().contiguous()
            self._keep.append(bias)
        bias_pointer = bias.data_ptr() if bias is not None else None
        if not isinstance(weight, QuantizedWeight):
            return _Linear(dense=weight.data_ptr(), bias=bias_pointer, out=out)
        count, segments, row_bytes, types, first_rows, num_rows = self._quantized.int8_table(weight)
        self._keep.append((segments, row_bytes, types, first_rows, num_rows))
        return _Linear(None, count, ctypes.addressof(segments), ctypes.addressof(row_bytes), ctypes.addressof(types),
                       ctypes.addressof(first_rows), ctypes.addressof(num_rows), bias_pointer, out)

    def _attach(self, kv_caches: list[torch.Tensor]) -> bool:
        """Points the layers at this KV pool (once: the pool does not move) and says
        whether the kernels read it: float32 blocks, one tensor per layer."""
        if kv_caches is not self._kv_caches:
            self._kv_caches = kv_caches
            self._kv_usable = len(kv_caches) == len(self._layers) and all(
                kv.dtype == torch.float32 and kv.dim() == 5 and kv.is_contiguous() for kv in kv_caches)
            if self._kv_usable:
                for entry, kv in zip(self._layers, kv_caches):
                    entry.kv_cache = kv.data_ptr()
                _, self._stack.num_blocks, self._stack.block_size, _, _ = kv_caches[0].shape
        return self._kv_usable

    def takes(self, hidden_states: torch.Tensor, kv_caches: list[torch.Tensor], metadata: AttentionMetadata) -> bool:
        """Whether this step is one the stack runs: decode tokens only, float32 K/V in
        the layout the kernels read, and few enough rows for the small-batch GEMM when
        a layer has float32 weights (more go through oneDNN in the layers)."""
        return (metadata.is_decode_only and hidden_states.dtype == torch.float32
                and not (self._dense and hidden_states.shape[0] > SMALL_GEMM_MAX_ROWS) and self._attach(kv_caches))

    def __call__(self, hidden_states: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                 metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden_states [rows, hidden] (the embeddings, taken over as the residual) ->
        (the last layer's MLP output, the residual stream), as the layers return them.
        Only for steps takes() accepted (which also points the layers at kv_caches)."""
        plan = cpu_attention.StepPlan.of(metadata)
        residual = hidden_states.contiguous()
        x = torch.empty_like(residual)
        positions = positions.to(torch.int64).contiguous()
        slots = metadata.slot_mapping.to(torch.int64).contiguous()
        status = self._lib.decode_stack_f32(
            ctypes.byref(self._stack), pointer(x), pointer(residual), INT64(residual.shape[0]), pointer(positions),
            pointer(slots), plan.block_table_pointer, INT64(plan.block_table.shape[1]), *plan.decode_args)
        if status != 0:
            raise RuntimeError(f"decode_stack_f32 failed ({status}) on a batch of {residual.shape[0]}")
        return x, residual
