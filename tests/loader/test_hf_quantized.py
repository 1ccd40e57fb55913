"""GPTQ and AWQ checkpoints: their layers repacked into llama.cpp blocks equal the
checkpoint's own dequantization (s * (q - z)), layouts without a block type are
dequantized, unsupported settings are errors naming them, and a quantized tiny Llama
generates what a float engine on the checkpoint's dequantized weights generates."""

from __future__ import annotations

import json
import os

import gguf
import numpy as np
import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.layers.quantization import QuantizedTensor
from pagedllm.loader.hf_quantized import _layer_weight, parse_quantization_config
from tests.quantized_checkpoints import awq_layer, gptq_layer, write_quantized_checkpoint
from tests.tiny_models import save_tiny_llama

OUT, IN = 48, 128


def _weight(seed: int = 0) -> torch.Tensor:
    return torch.randn(OUT, IN, generator=torch.Generator().manual_seed(seed))


def _convert(parts: dict, config: dict):
    scheme = parse_quantization_config(config, "test")
    return _layer_weight(parts, scheme, "test layer")


def _as_float(weight) -> torch.Tensor:
    """A converted layer as float32 [out, in]: blocks through gguf's reference dequantization."""
    if not isinstance(weight, QuantizedTensor):
        return weight
    values = gguf.quants.dequantize(weight.data.numpy(), gguf.GGMLQuantizationType(weight.format.ggml_type))
    return torch.from_numpy(np.asarray(values, dtype=np.float32)).reshape(weight.shape)


def _gptq_config(bits, group_size, sym, desc_act=False, checkpoint_format="gptq"):
    return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": sym, "desc_act": desc_act,
            "checkpoint_format": checkpoint_format}


@pytest.mark.parametrize("bits, group_size, sym, v2, expected", [
    (4, 32, True, False, "Q4_0"),
    (4, 128, True, True, "Q4_0"),
    (4, -1, True, False, "Q4_0"),
    (4, 64, False, False, "Q4_1"),
    (8, 32, True, False, "Q8_0"),
    (8, 64, False, False, None),  # asymmetric 8-bit has no block type
])
def test_gptq_layers_become_blocks_equal_to_their_dequantization(bits, group_size, sym, v2, expected):
    parts, reference = gptq_layer(_weight(), bits, group_size, sym, act_order=False, v2=v2)
    weight = _convert(parts, _gptq_config(bits, group_size, sym,
                                          checkpoint_format="gptq_v2" if v2 else "gptq"))
    assert (weight.format.name if isinstance(weight, QuantizedTensor) else None) == expected
    assert weight.shape == (OUT, IN)
    if expected == "Q4_1":
        # m = -s z is kept in fp16: off by at most 2^-11 |s z| (max z 15)
        tolerance = parts["scales"].float().abs().max().item() * 15 * 2**-11
        torch.testing.assert_close(_as_float(weight), reference, rtol=0, atol=tolerance)
    else:
        torch.testing.assert_close(_as_float(weight), reference, rtol=0, atol=0)


def test_act_order_groups_mixed_within_32_features_are_dequantized():
    parts, reference = gptq_layer(_weight(), 4, 32, sym=True, act_order=True)
    weight = _convert(parts, _gptq_config(4, 32, True, desc_act=True))
    assert not isinstance(weight, QuantizedTensor)
    torch.testing.assert_close(weight, reference, rtol=0, atol=0)


def test_awq_layers_become_q4_1_blocks():
    parts, reference = awq_layer(_weight(1), 64)
    weight = _convert(parts, {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True,
                              "version": "gemm"})
    assert weight.format.name == "Q4_1"
    tolerance = parts["scales"].float().abs().max().item() * 15 * 2**-11
    torch.testing.assert_close(_as_float(weight), reference, rtol=0, atol=tolerance)


@pytest.mark.parametrize("config, named", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "'bitsandbytes'"),
    ({"quant_method": "fp8"}, "'fp8'"),
    (_gptq_config(3, 128, True), "bits=3"),
    (_gptq_config(4, 128, True, checkpoint_format="marlin"), "'marlin'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "'gemv'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": False}, "zero_point=False"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 0}, "group_size"),
])
def test_unsupported_settings_are_errors_naming_them(config, named):
    with pytest.raises(ValueError, match=named):
        parse_quantization_config(config, "model")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("tiny-llama"))
    save_tiny_llama(folder, 256)
    return folder


PROMPTS = [[0, 5, 17, 99, 42], [0, 250, 3, 8, 8, 8, 71], [0] + list(range(40, 80)), [0, 300, 301]]
# Decode steps round activations to int8 per 32 values (layers/quantization.py): on the
# tiny model that moves logprobs by ~0.05, so greedy paths may part where the float
# engine's two best tokens are this close, and each token's logprob stays this close.
NEAR_TIE = 0.2


def _engine(folder: str, **engine_args) -> LLM:
    return LLM(folder, max_model_len=256, num_kv_blocks=64, **engine_args)


def _greedy(llm: LLM) -> list:
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=5)
    return [out.outputs[0] for out in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params,
                                                   use_tqdm=False)]


def _assert_equal_up_to_near_ties(ours: list, reference: list) -> None:
    for prompt, (mine, theirs) in enumerate(zip(ours, reference)):
        for step, (token, expected) in enumerate(zip(mine.token_ids, theirs.token_ids)):
            candidates = theirs.logprobs[step]
            assert token in candidates, (prompt, step)
            assert abs(mine.logprobs[step][token].logprob - candidates[token].logprob) < NEAR_TIE, (prompt, step)
            if token != expected:  # only a near tie may flip; the paths part from here
                assert candidates[expected].logprob - candidates[token].logprob < NEAR_TIE, (prompt, step)
                break


@pytest.mark.parametrize("name, config, layer", [
    ("gptq-q4_0", _gptq_config(4, 32, True), lambda w: gptq_layer(w, 4, 32, True, act_order=False)),
    ("gptq-8bit", _gptq_config(8, 64, True), lambda w: gptq_layer(w, 8, 64, True, act_order=False)),
    ("awq", {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "GEMM"},
     lambda w: awq_layer(w, 32)),
])
def test_quantized_tiny_llama_generates_what_its_dequantized_weights_do(tiny_llama, tmp_path, name, config, layer):
    folder = str(tmp_path / name)
    reference = write_quantized_checkpoint(tiny_llama, folder, config, layer)
    quantized = _greedy(_engine(folder))  # the method comes from config.json
    _assert_equal_up_to_near_ties(quantized, _greedy(_engine(reference, dtype="float32")))


def test_quantization_disagreeing_with_the_checkpoint_is_an_error(tiny_llama, tmp_path):
    folder = str(tmp_path / "gptq")
    write_quantized_checkpoint(tiny_llama, folder, _gptq_config(4, 32, True),
                               lambda w: gptq_layer(w, 4, 32, True, act_order=False))
    with pytest.raises(ValueError, match="is a gptq checkpoint"):
        LLM(folder, quantization="awq")
    with pytest.raises(ValueError, match="has none"):
        LLM(tiny_llama, quantization="gptq")
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f)["quantization_config"]["quant_method"] == "gptq"


@pytest.mark.timeout(300)
def test_tensor_parallel_ranks_hold_whole_blocks_of_a_gptq_checkpoint(tiny_llama, tmp_path):
    """Column-parallel layers split the output rows, row-parallel ones (o_proj: 32 input
    features a rank, down_proj: 64) split between blocks; each rank keeps its blocks."""
    from tests.distributed.conftest import shutdown

    folder = str(tmp_path / "gptq")
    write_quantized_checkpoint(tiny_llama, folder, _gptq_config(4, 32, True),
                               lambda w: gptq_layer(w, 4, 32, True, act_order=False))
    reference = _greedy(_engine(folder))
    llm = _engine(folder, tensor_parallel_size=2)
    try:
        outputs = _greedy(llm)
    finally:
        shutdown(llm)
    _assert_equal_up_to_near_ties(outputs, reference)
