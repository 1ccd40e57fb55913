"""InternLM (Llama with q/k/v/o biases, `rotary.base`) and InternLM2 (grouped
`wqkv`, `w1/w3/w2`, `tok_embeddings`, `output`, dynamic NTK config) in their
published layouts, against the transformers Llama each was converted from."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.models.helpers import (MAX_POSITIONS, assert_matches_reference, make_llm, make_prompts,
                                  save_converted_checkpoint, save_hf_model, tiny_kwargs)
from tests.tiny_models import TINY_VOCAB_SIZE

ROPE_THETA = 20000.0


def internlm_config(architecture: str, hf_config: LlamaConfig, **extra) -> dict:
    return dict(architectures=[architecture], model_type=architecture[:-len("ForCausalLM")].lower(),
                hidden_act="silu", hidden_size=hf_config.hidden_size, intermediate_size=hf_config.intermediate_size,
                num_attention_heads=hf_config.num_attention_heads, num_hidden_layers=hf_config.num_hidden_layers,
                max_position_embeddings=MAX_POSITIONS, rms_norm_eps=hf_config.rms_norm_eps,
                vocab_size=TINY_VOCAB_SIZE, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                tie_word_embeddings=False, torch_dtype="float32", use_cache=True, **extra)


def llama_to_internlm2(state: dict, config: LlamaConfig) -> dict:
    num_kv_heads, head_dim = config.num_key_value_heads, config.head_dim
    group = config.num_attention_heads // num_kv_heads
    renames = {"model.embed_tokens.": "model.tok_embeddings.", "self_attn.o_proj.": "attention.wo.",
               "input_layernorm.": "attention_norm.", "post_attention_layernorm.": "ffn_norm.",
               "mlp.gate_proj.": "feed_forward.w1.", "mlp.up_proj.": "feed_forward.w3.",
               "mlp.down_proj.": "feed_forward.w2.", "lm_head.": "output."}
    out = {}
    for name, tensor in state.items():
        if name.endswith("self_attn.q_proj.weight"):
            prefix = name[:-len("self_attn.q_proj.weight")]
            q = tensor.view(num_kv_heads, group, head_dim, -1)
            k = state[prefix + "self_attn.k_proj.weight"].view(num_kv_heads, 1, head_dim, -1)
            v = state[prefix + "self_attn.v_proj.weight"].view(num_kv_heads, 1, head_dim, -1)
            # Per KV head: its query heads, then its key, then its value.
            out[prefix + "attention.wqkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, q.shape[-1])
        elif not name.endswith(("k_proj.weight", "v_proj.weight")):
            for old, new in renames.items():
                name = name.replace(old, new)
            out[name] = tensor
    return out


@pytest.mark.parametrize("architecture", ["InternLMForCausalLM", "InternLM2ForCausalLM"])
def test_internlm(tmp_path, architecture):
    if architecture == "InternLMForCausalLM":
        hf_config = LlamaConfig(**tiny_kwargs(num_key_value_heads=4, attention_bias=True,
                                              rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA}))
        hf_model = save_hf_model(tmp_path / "llama", LlamaForCausalLM, hf_config)
        assert hf_model.model.layers[0].self_attn.o_proj.bias is not None
        state = hf_model.state_dict()
        config = internlm_config(architecture, hf_config, bias=True,
                                 rotary={"base": ROPE_THETA, "type": "dynamic", "scaling_factor": 1.0})
    else:
        hf_config = LlamaConfig(**tiny_kwargs(num_attention_heads=8, num_key_value_heads=2,
                                              rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA}))
        hf_model = save_hf_model(tmp_path / "llama", LlamaForCausalLM, hf_config)
        state = llama_to_internlm2(hf_model.state_dict(), hf_config)
        assert "model.layers.0.attention.wqkv.weight" in state and "output.weight" in state
        config = internlm_config(architecture, hf_config, bias=False, num_key_value_heads=2, rope_theta=ROPE_THETA,
                                 rope_scaling={"type": "dynamic", "factor": 2.0}, attn_implementation="eager")
    folder = save_converted_checkpoint(tmp_path / architecture, state, config)
    assert_matches_reference(make_llm(folder), hf_model, make_prompts(seed=7))
