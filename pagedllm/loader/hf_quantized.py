"""Hugging Face weight-only quantized checkpoints (GPTQ, AWQ) run on llama.cpp's blocks.

Both formats store a linear layer's weight W [out, in] as 4- or 8-bit integers q packed
into int32 words, with an fp16 scale s and an integer zero point z per (group of
`group_size` input features, output feature) -- g(i) is input feature i's group:

    W[o, i] = s[g(i), o] * (q[i, o] - z[g(i), o])

Where every run of 32 input features lies in one group (group sizes that are multiples
of 32, act-order groups that do not mix within 32 features), that is exactly a llama.cpp
block of 32 values with one scale, so the CPU's GGUF kernels (layers/quantization.py)
run these checkpoints too, repacked once at load, tensor by tensor:

    4-bit, z = 8 everywhere (symmetric)  -> Q4_0: d = s, nibble q        (exact)
    4-bit, any z                         -> Q4_1: d = s, m = -s z, nibble q
    8-bit, z = 128 everywhere            -> Q8_0: d = s, int8 q - 128    (exact)

Q4_1 keeps m in fp16: -s z rounds by at most 2^-11 |s z| <= 0.008 s, under a hundredth
of a quantization step. Scales stored in another dtype than fp16 round to fp16 too.
Anything else (act-order groups mixed inside 32 features, groups that are not multiples
of 32, asymmetric 8-bit) is dequantized to float32 at load; the log line counts both.

Packing: GPTQ packs qweight [in / per_word, out] along the input features and qzeros
[groups, out / per_word] along the outputs, both from the low bits up; its original
("gptq", v1) format stores z - 1. AWQ (GEMM layout) packs qweight [in, out / 8] and
qzeros [groups, out / 8] along the outputs in the interleaved order AWQ_ORDER.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from pagedllm.layers.quantization import GGUF_FORMATS, QuantizedTensor
from pagedllm.loader.hf_loader import checkpoint_tensor_names, iter_hf_weights

logger = logging.getLogger(__name__)

HF_QUANTIZATIONS = ("gptq", "awq")
# Where AWQ's GEMM kernels put output feature AWQ_ORDER[k] of each 8: in bits [4k, 4k + 4).
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
BLOCK = 32  # values per Q4_0 / Q4_1 / Q8_0 block
Q4_0, Q4_1, Q8_0 = (next(fmt for fmt in GGUF_FORMATS.values() if fmt.name == name)
                    for name in ("Q4_0", "Q4_1", "Q8_0"))


@dataclass(frozen=True)
class HFQuantization:
    """What a checkpoint's quantization_config says about how to read its weights."""

    method: str  # gptq | awq
    bits: int
    group_size: int  # -1: one group of all input features
    zero_offset: int  # added to the stored zero points (GPTQ v1 stores z - 1)

    @property
    def parts(self) -> tuple[str, ...]:
        """The tensors of one quantized layer, after its module name; g_idx is optional."""
        return ("qweight", "qzeros", "scales", "g_idx") if self.method == "gptq" else ("qweight", "qzeros", "scales")


def parse_quantization_config(config: Any, path: str) -> HFQuantization:
    """The HFQuantization of a config.json's quantization_config; a ValueError names any
    setting that changes how weights are stored and is not read here."""
    if not isinstance(config, dict):
        raise ValueError(f"{path}: quantization_config must be an object, got {config!r}")
    method = str(config.get("quant_method", "")).lower()
    if method not in HF_QUANTIZATIONS:
        raise ValueError(f"{path}: quantization_config quant_method {config.get('quant_method')!r} is not "
                         f"supported; supported: {', '.join(HF_QUANTIZATIONS)} (weight-only), or GGUF files")
    bits, group_size = config.get("bits", config.get("w_bit")), config.get("group_size", config.get("q_group_size"))
    supported_bits = (4, 8) if method == "gptq" else (4,)
    if bits not in supported_bits:
        raise ValueError(f"{path}: {method} with bits={bits!r} is not supported; supported: "
                         f"{', '.join(map(str, supported_bits))}")
    if not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
        raise ValueError(f"{path}: {method} group_size must be a positive integer or -1, got {group_size!r}")
    if method == "gptq":
        layout = config.get("checkpoint_format", "gptq")
        if layout not in ("gptq", "gptq_v2"):
            raise ValueError(f"{path}: GPTQ checkpoint_format {layout!r} is not supported; supported: gptq, gptq_v2")
        if config.get("dynamic"):
            raise ValueError(f"{path}: GPTQ 'dynamic' per-module settings are not supported")
        return HFQuantization(method, bits, group_size, zero_offset=1 if layout == "gptq" else 0)
    version = str(config.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"{path}: AWQ version {config.get('version')!r} is not supported; supported: gemm")
    if config.get("zero_point", True) is not True:
        raise ValueError(f"{path}: AWQ zero_point={config.get('zero_point')!r} is not supported; supported: true")
    return HFQuantization(method, bits, group_size, zero_offset=0)


def iter_hf_quantized_weights(folder: str, scheme: HFQuantization) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
    """iter_hf_weights, with each quantized layer's tensors (`<module>.qweight`, ...) given
    as one `<module>.weight`: a QuantizedTensor [out, in] where the blocks allow, else
    float32. A layer's parts may lie in different shards: they wait here (a few MB)."""
    names = checkpoint_tensor_names(folder)
    modules = [name.removesuffix(".qweight") for name in names if name.endswith(".qweight")]
    expected = {module: {part for part in scheme.parts if f"{module}.{part}" in names} for module in modules}
    for module, parts in expected.items():
        missing = [part for part in scheme.parts[:3] if part not in parts]
        if missing:
            raise ValueError(f"{folder}: quantized layer {module} lacks {', '.join(missing)}")
    pending: dict[str, dict[str, torch.Tensor]] = {}
    kept: Counter[str] = Counter()
    for name, tensor in iter_hf_weights(folder):
        module, _, part = name.rpartition(".")
        if module not in expected or part not in scheme.parts:
            yield name, tensor
            continue
        got = pending.setdefault(module, {})
        got[part] = tensor
        if got.keys() == expected[module]:
            del pending[module]
            weight = _layer_weight(got, scheme, f"{folder}: {module}")
            kept[weight.format.name if isinstance(weight, QuantizedTensor) else "float32 (dequantized)"] += 1
            yield f"{module}.weight", weight
    logger.info("%s %d-bit weights: %s", scheme.method.upper(), scheme.bits,
                ", ".join(f"{n} as {kind}" for kind, n in sorted(kept.items())))


def _layer_weight(parts: dict[str, torch.Tensor], scheme: HFQuantization, name: str) -> torch.Tensor | QuantizedTensor:
    """One layer's q [in, out], z [groups, out], s [groups, out] and groups [in], as blocks or float32."""
    qweight, qzeros, scales = parts["qweight"], parts["qzeros"], parts["scales"]
    if scheme.method == "gptq":
        q = unpack(qweight, scheme.bits, dim=0)
        zeros = unpack(qzeros, scheme.bits, dim=1)
    else:
        q = _awq_order(unpack(qweight, scheme.bits, dim=1))
        zeros = _awq_order(unpack(qzeros, scheme.bits, dim=1))
    in_features, out_features = q.shape
    zeros = zeros[:, :out_features].to(torch.int16) + scheme.zero_offset
    scales = scales[:, :out_features]
    if "g_idx" in parts:
        groups = parts["g_idx"].long()
    else:
        group_size = in_features if scheme.group_size == -1 else scheme.group_size
        groups = torch.arange(in_features) // group_size
    if groups.shape != (in_features,) or scales.shape != zeros.shape or int(groups.max()) >= scales.shape[0]:
        raise ValueError(f"{name}: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, scales "
                         f"{tuple(scales.shape)} and {groups.shape[0]} group indices do not fit together")
    fmt = _block_format(scheme.bits, zeros, groups)
    if fmt is None:
        return (scales.float()[groups] * (q.float() - zeros[groups].float())).T.contiguous()
    return QuantizedTensor(_blocks(fmt, q, zeros, scales, groups), fmt, in_features)


def unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words [r, c] -> their bits-wide values (uint8), low bits first, along dim:
    [r * 32 // bits, c] for dim 0, [r, c * 32 // bits] for dim 1. One shift at a time, so
    an 8B model's largest layer needs no int32 copy per value (~0.9 GB) while loading."""
    per_word, mask = 32 // bits, (1 << bits) - 1
    rows, cols = packed.shape
    values = torch.empty((rows, per_word, cols) if dim == 0 else (rows, cols, per_word), dtype=torch.uint8)
    for k in range(per_word):
        values.select(1 if dim == 0 else 2, k).copy_((packed >> (bits * k)) & mask)
    return values.reshape((rows * per_word, cols) if dim == 0 else (rows, cols * per_word))


def _awq_order(values: torch.Tensor) -> torch.Tensor:
    """AWQ's unpacked columns [r, c] in output-feature order: column 8j + AWQ_ORDER[k] is at 8j + k."""
    order = torch.tensor(AWQ_ORDER)
    rows, cols = values.shape
    restored = torch.empty_like(values).view(rows, cols // 8, 8)
    restored[:, :, order] = values.view(rows, cols // 8, 8)
    return restored.view(rows, cols)


def _block_format(bits: int, zeros: torch.Tensor, groups: torch.Tensor):
    """The llama.cpp block type holding these weights exactly, or None."""
    if groups.shape[0] % BLOCK or not bool((groups.view(-1, BLOCK) == groups.view(-1, BLOCK)[:, :1]).all()):
        return None
    if bits == 4:
        return Q4_0 if bool((zeros == 8).all()) else Q4_1
    return Q8_0 if bool((zeros == 128).all()) else None


def _blocks(fmt, q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """q [in, out], zeros/scales [groups, out] -> fmt's blocks, uint8 [out, in / 32 * block_bytes].

    A block: fp16 d (Q4_1: then fp16 m), then 16 bytes holding value j in the low and
    value j + 16 in the high nibble (Q4_0, Q4_1), or 32 int8 values (Q8_0)."""
    in_features, out_features = q.shape
    block_groups = groups[::BLOCK]  # [in / 32]: the group of each block
    d = scales.float()[block_groups].T  # [out, blocks]
    values = q.T.reshape(out_features, -1, BLOCK)  # [out, blocks, 32]
    fields = [_fp16_bytes(d)]
    if fmt is Q4_1:
        fields.append(_fp16_bytes(-d * zeros[block_groups].T.float()))
    if fmt is Q8_0:
        fields.append((values.to(torch.int16) - 128).to(torch.int8).view(torch.uint8))
    else:
        fields.append((values[..., :16] | (values[..., 16:] << 4)).to(torch.uint8))
    return torch.cat(fields, dim=-1).reshape(out_features, -1)


def _fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    """float [out, blocks] -> its fp16 bytes, uint8 [out, blocks, 2]."""
    return values.to(torch.float16).contiguous().view(torch.uint8).view(*values.shape, 2)
