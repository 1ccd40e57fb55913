"""GPTQ and AWQ checkpoints written from a float model for tests (no downloads).

The weights are quantized by round-to-nearest per group, the way AutoGPTQ and AutoAWQ
compute scales and zero points, and packed as their checkpoints store them (written
here from the formats' descriptions, independently of pagedllm's reader). Each writer
also returns the float weights the checkpoint stands for, s * (q - z), so a test can
compare the quantized engine with a float engine on exactly those weights.
"""

from __future__ import annotations

import os
import shutil

import torch
from safetensors.torch import save_file

from tests.tiny_models import edit_json

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble k of each word holds output feature 8j + AWQ_PACK_ORDER[k]


def quantize_rtn(weight: torch.Tensor, bits: int, groups: torch.Tensor, sym: bool):
    """weight [out, in] -> q [in, out], zeros [num_groups, out], fp16 scales [num_groups, out]."""
    maxq = (1 << bits) - 1
    num_groups = int(groups.max()) + 1
    w = weight.T.double()  # [in, out]
    lows = torch.stack([w[groups == g].min(0).values for g in range(num_groups)]).clamp(max=0)
    highs = torch.stack([w[groups == g].max(0).values for g in range(num_groups)]).clamp(min=0)
    if sym:
        highs = torch.maximum(highs, -lows)
        lows = -highs
    scales = ((highs - lows) / maxq).clamp(min=1e-5).half()
    zeros = (torch.full_like(scales, (maxq + 1) // 2, dtype=torch.int64) if sym
             else torch.round(-lows / scales.double()).long().clamp(0, maxq))
    q = (torch.round(w / scales.double()[groups]) + zeros[groups]).clamp(0, maxq).long()
    return q, zeros, scales


def dequantized(q, zeros, scales, groups) -> torch.Tensor:
    """The float32 weight [out, in] a checkpoint stands for: s * (q - z)."""
    return (scales.double()[groups] * (q - zeros[groups]).double()).T.float().contiguous()


def pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Integers [n, m] into int32 words along dim (low bits first)."""
    per_word = 32 // bits
    values = values.long()
    if dim == 0:
        values = values.reshape(-1, per_word, values.shape[1]).transpose(1, 2)  # [n / per_word, m, per_word]
    else:
        values = values.reshape(values.shape[0], -1, per_word)
    words = (values << (torch.arange(per_word) * bits)).sum(-1)
    return ((words + 2**31) % 2**32 - 2**31).to(torch.int32)  # the same 32 bits, as int32


def gptq_layer(weight, bits: int, group_size: int, sym: bool, act_order: bool, v2: bool = False, seed: int = 0):
    """A GPTQ layer's tensors (qweight, qzeros, scales, g_idx) and its float reference."""
    in_features = weight.shape[1]
    size = in_features if group_size == -1 else group_size
    if act_order:  # GPTQ's desc_act: features quantized in another order, groups follow that order
        order = torch.randperm(in_features, generator=torch.Generator().manual_seed(seed))
        groups = torch.empty(in_features, dtype=torch.long)
        groups[order] = torch.arange(in_features) // size
    else:
        groups = torch.arange(in_features) // size
    q, zeros, scales = quantize_rtn(weight, bits, groups, sym)
    stored_zeros = zeros if v2 else zeros - 1  # the original GPTQ format stores z - 1
    tensors = {"qweight": pack(q, bits, dim=0), "qzeros": pack(stored_zeros, bits, dim=1),
               "scales": scales, "g_idx": groups.to(torch.int32)}
    return tensors, dequantized(q, zeros, scales, groups)


def awq_layer(weight, group_size: int):
    """An AWQ (GEMM) layer's tensors (qweight, qzeros, scales) and its float reference."""
    groups = torch.arange(weight.shape[1]) // group_size
    q, zeros, scales = quantize_rtn(weight, 4, groups, sym=False)
    order = list(AWQ_PACK_ORDER)

    def interleave(values):  # [r, c] -> columns 8j + AWQ_PACK_ORDER[k] at 8j + k
        return values.reshape(values.shape[0], -1, 8)[:, :, order].reshape(values.shape)

    tensors = {"qweight": pack(interleave(q), 4, dim=1), "qzeros": pack(interleave(zeros), 4, dim=1),
               "scales": scales}
    return tensors, dequantized(q, zeros, scales, groups)


def write_quantized_checkpoint(source: str, folder: str, quantization_config: dict, layer) -> str:
    """Copy the float checkpoint folder `source` (safetensors) to `folder` with every
    decoder linear layer quantized by layer(weight) -> (tensors, reference), and write
    `folder`-reference: the same model with the reference float weights. Returns that path."""
    from safetensors import safe_open

    reference_folder = f"{folder}-reference"
    for out in (folder, reference_folder):
        shutil.copytree(source, out, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    quantized, reference = {}, {}
    for path in sorted(p for p in os.listdir(source) if p.endswith(".safetensors")):
        with safe_open(os.path.join(source, path), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name).float()
                module, _, leaf = name.rpartition(".")
                if leaf == "weight" and module.rpartition(".")[2] in LINEAR_NAMES:
                    parts, reference[name] = layer(tensor)
                    quantized.update({f"{module}.{part}": value for part, value in parts.items()})
                else:
                    quantized[name] = reference[name] = tensor
    save_file(quantized, os.path.join(folder, "model.safetensors"))
    save_file(reference, os.path.join(reference_folder, "model.safetensors"))
    edit_json(os.path.join(folder, "config.json"),
              lambda config: config.update(quantization_config=quantization_config))
    return reference_folder
