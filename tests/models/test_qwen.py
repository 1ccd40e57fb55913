"""Qwen v1 (`QWenLMHeadModel`) in its published layout: `transformer.wte`,
`h.N.ln_1/ln_2`, fused `attn.c_attn` with bias, `mlp.w1` (up) / `mlp.w2`
(gate) / `mlp.c_proj`, `ln_f`, converted from a transformers Qwen2 with
multi-head attention and compared with it."""

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from tests.models.helpers import (MAX_POSITIONS, assert_matches_reference, make_llm, make_prompts,
                                  save_converted_checkpoint, save_hf_model, tiny_kwargs)
from tests.tiny_models import TINY_VOCAB_SIZE

ROPE_THETA = 20000.0
EPS = 1e-5


def qwen2_to_qwen(state: dict) -> dict:
    renames = [("model.embed_tokens.", "transformer.wte."), ("model.norm.", "transformer.ln_f."),
               ("model.layers.", "transformer.h."), ("input_layernorm.", "ln_1."),
               ("post_attention_layernorm.", "ln_2."), ("self_attn.o_proj.", "attn.c_proj."),
               ("mlp.gate_proj.", "mlp.w2."), ("mlp.up_proj.", "mlp.w1."), ("mlp.down_proj.", "mlp.c_proj.")]
    out = {}
    for name, tensor in state.items():
        if ".self_attn.q_proj." in name:
            parts = [state[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            name, tensor = name.replace("self_attn.q_proj", "attn.c_attn"), torch.cat(parts)
        elif ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            continue
        for old, new in renames:
            name = name.replace(old, new)
        out[name] = tensor
    return out


def test_qwen_v1(tmp_path):
    hf_config = Qwen2Config(**tiny_kwargs(num_key_value_heads=4, rms_norm_eps=EPS,
                                          rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA}))
    hf_model = save_hf_model(tmp_path / "qwen2", Qwen2ForCausalLM, hf_config)
    state = qwen2_to_qwen(hf_model.state_dict())
    assert {"transformer.h.0.attn.c_attn.bias", "transformer.h.1.mlp.w2.weight", "lm_head.weight"} <= set(state)
    config = dict(
        architectures=["QWenLMHeadModel"], model_type="qwen",
        auto_map={"AutoConfig": "configuration_qwen.QWenConfig",
                  "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        hidden_size=64, num_attention_heads=4, num_hidden_layers=2, kv_channels=16,
        intermediate_size=2 * hf_config.intermediate_size,  # Qwen v1 halves it for w1/w2
        layer_norm_epsilon=EPS, max_position_embeddings=MAX_POSITIONS, seq_length=MAX_POSITIONS,
        rotary_emb_base=ROPE_THETA, rotary_pct=1.0, no_bias=True, vocab_size=TINY_VOCAB_SIZE,
        tie_word_embeddings=False, use_dynamic_ntk=True, use_logn_attn=True, use_flash_attn="auto",
        bf16=False, fp16=False, fp32=True, scale_attn_weights=True, initializer_range=0.02,
        tokenizer_class="QWenTokenizer", use_cache=True)
    folder = save_converted_checkpoint(tmp_path / "qwen", state, config)
    assert_matches_reference(make_llm(folder), hf_model, make_prompts(seed=8))
