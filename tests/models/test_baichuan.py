"""Baichuan in its published layout (fused `W_pack`): Baichuan-7B (RoPE)
against transformers' Llama it was converted from; Baichuan-13B and
Baichuan2-13B (ALiBi, Baichuan2's normalized LM head) against a plain-PyTorch
ALiBi reference written here, with the slopes of the ALiBi paper."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from pagedllm.layers.alibi import alibi_slopes
from pagedllm.models.baichuan import BaichuanForCausalLM, BaiChuanForCausalLM
from tests.models.helpers import (MAX_POSITIONS, assert_matches_reference, make_llm, make_prompts,
                                  save_converted_checkpoint, save_hf_model, tiny_kwargs)
from tests.tiny_models import TINY_VOCAB_SIZE

BAICHUAN2_VOCAB_SIZE = 125696


def baichuan_config(architecture: str, hidden_size: int, num_heads: int, vocab_size: int, **extra) -> dict:
    """config.json keys as the Baichuan repositories have them (13B: no max_position_embeddings)."""
    return dict(architectures=[architecture], model_type="baichuan", auto_map={
        "AutoConfig": "configuration_baichuan.BaichuanConfig",
        "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"},
        hidden_act="silu", hidden_size=hidden_size, intermediate_size=2 * hidden_size, initializer_range=0.02,
        model_max_length=MAX_POSITIONS, num_attention_heads=num_heads, num_hidden_layers=2, rms_norm_eps=1e-6,
        vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
        torch_dtype="float32", use_cache=True, **extra)


def llama_to_baichuan(state: dict) -> dict:
    """transformers Llama tensors -> Baichuan-7B's: q/k/v stacked into W_pack."""
    out = {}
    for name, tensor in state.items():
        if name.endswith("self_attn.q_proj.weight"):
            prefix = name[:-len("q_proj.weight")]
            out[prefix + "W_pack.weight"] = torch.cat([state[prefix + p + ".weight"] for p in ("q_proj", "k_proj",
                                                                                               "v_proj")])
            # Baichuan-7B checkpoints carry the rotary buffer; it must be skipped.
            out[prefix + "rotary_emb.inv_freq"] = torch.ones(8)
        elif not name.endswith(("k_proj.weight", "v_proj.weight")):
            out[name] = tensor
    return out


def test_baichuan_7b_rope(tmp_path):
    hf_model = save_hf_model(tmp_path / "llama", LlamaForCausalLM,
                             LlamaConfig(**tiny_kwargs(num_key_value_heads=4, rms_norm_eps=1e-6)))
    folder = save_converted_checkpoint(
        tmp_path / "baichuan", llama_to_baichuan(hf_model.state_dict()),
        baichuan_config("BaiChuanForCausalLM", 64, 4, TINY_VOCAB_SIZE, max_position_embeddings=MAX_POSITIONS))
    assert_matches_reference(make_llm(folder), hf_model, make_prompts(seed=1))


# --- ALiBi ------------------------------------------------------------------


def paper_slopes(num_heads: int) -> list[float]:
    """ALiBi slopes as in the paper's reference code (ofirpress/attention_with_linear_biases)."""
    def power_of_2(n):
        start = 2 ** (-2 ** -(math.log2(n) - 3))
        return [start * start ** i for i in range(n)]
    if math.log2(num_heads).is_integer():
        return power_of_2(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_2(closest) + paper_slopes(2 * closest)[0::2][:num_heads - closest]


def test_alibi_slopes_follow_the_paper():
    assert alibi_slopes(8).tolist() == [2.0 ** -i for i in range(1, 9)]
    assert alibi_slopes(6).tolist() == [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]
    for num_heads in range(1, 65):
        torch.testing.assert_close(alibi_slopes(num_heads), torch.tensor(paper_slopes(num_heads)))


def random_baichuan_weights(config: dict, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]

    def randn(*shape, std=0.2):
        return std * torch.randn(*shape, generator=generator)
    # LM head rows of very different norms, so that Baichuan2's normalization matters.
    weights = {"model.embed_tokens.weight": randn(vocab, hidden),
               "model.norm.weight": 1 + randn(hidden),
               "lm_head.weight": randn(vocab, hidden) * torch.rand(vocab, 1, generator=generator) * 4}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights.update({p + "input_layernorm.weight": 1 + randn(hidden),
                        p + "post_attention_layernorm.weight": 1 + randn(hidden),
                        p + "self_attn.W_pack.weight": randn(3 * hidden, hidden),
                        p + "self_attn.o_proj.weight": randn(hidden, hidden),
                        p + "mlp.gate_proj.weight": randn(inter, hidden),
                        p + "mlp.up_proj.weight": randn(inter, hidden),
                        p + "mlp.down_proj.weight": randn(hidden, inter)})
    return weights


def alibi_reference(weights: dict, config: dict, norm_head: bool):
    """Plain-PyTorch Baichuan-13B forward: token ids -> logits [len, vocab]."""
    hidden, num_heads, eps = config["hidden_size"], config["num_attention_heads"], config["rms_norm_eps"]
    head_dim = hidden // num_heads
    slopes = torch.tensor(paper_slopes(num_heads))
    lm_head = F.normalize(weights["lm_head.weight"], dim=-1) if norm_head else weights["lm_head.weight"]

    def rms_norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def logits(token_ids: list[int]) -> torch.Tensor:
        length = len(token_ids)
        pos = torch.arange(length)
        distance = (pos[None, :] - pos[:, None]).float()  # key - query: <= 0 where attended
        bias = (slopes[:, None, None] * distance).masked_fill(distance > 0, float("-inf"))  # [H, Lq, Lk]
        x = weights["model.embed_tokens.weight"][token_ids]
        for i in range(config["num_hidden_layers"]):
            w = {name[len(f"model.layers.{i}."):]: t for name, t in weights.items()
                 if name.startswith(f"model.layers.{i}.")}
            h = rms_norm(x, w["input_layernorm.weight"])
            q, k, v = (h @ w["self_attn.W_pack.weight"].T).view(length, 3, num_heads, head_dim).unbind(1)
            scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(head_dim) + bias
            attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(length, hidden)
            x = x + attn @ w["self_attn.o_proj.weight"].T
            h = rms_norm(x, w["post_attention_layernorm.weight"])
            x = x + (F.silu(h @ w["mlp.gate_proj.weight"].T) * (h @ w["mlp.up_proj.weight"].T)) @ \
                w["mlp.down_proj.weight"].T
        return rms_norm(x, weights["model.norm.weight"]) @ lm_head.T
    return logits


@pytest.mark.parametrize("name, hidden_size, num_heads, vocab_size", [
    ("baichuan-13b", 48, 6, TINY_VOCAB_SIZE),  # 6 heads: not a power of two (13B has 40)
    ("baichuan2-13b", 32, 8, BAICHUAN2_VOCAB_SIZE),  # Baichuan2: normalized LM head
])
def test_baichuan_13b_alibi(tmp_path, name, hidden_size, num_heads, vocab_size):
    config = baichuan_config("BaichuanForCausalLM", hidden_size, num_heads, vocab_size)
    weights = random_baichuan_weights(config, seed=num_heads)
    folder = save_converted_checkpoint(tmp_path / name, weights, config)
    reference = alibi_reference(weights, config, norm_head=vocab_size == BAICHUAN2_VOCAB_SIZE)
    # The 125696-token head is slow on CPU: two prompts (both prefilled in chunks) suffice there.
    prompts = make_prompts(seed=num_heads)[-2 if vocab_size == BAICHUAN2_VOCAB_SIZE else 0:]
    assert_matches_reference(make_llm(folder), reference, prompts)


def test_position_encoding_by_release():
    """7B models (hidden 4096) use RoPE, 13B (5120) ALiBi; BaiChuan* (Baichuan-7B) always RoPE."""
    assert not BaichuanForCausalLM.uses_alibi(SimpleNamespace(hidden_size=4096))
    assert BaichuanForCausalLM.uses_alibi(SimpleNamespace(hidden_size=5120))
    assert not BaiChuanForCausalLM.uses_alibi(SimpleNamespace(hidden_size=5120))
