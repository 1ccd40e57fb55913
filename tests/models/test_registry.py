"""Every registered architecture resolves to a model class; an unknown one is
refused with the list of supported ones."""

import pytest

from pagedllm.models.registry import get_model_class, supported_architectures

FAMILIES = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "QWenLMHeadModel",
            "GemmaForCausalLM", "Gemma2ForCausalLM", "BaichuanForCausalLM", "BaiChuanForCausalLM",
            "InternLMForCausalLM", "InternLM2ForCausalLM"]


@pytest.mark.parametrize("architecture", FAMILIES)
def test_registered(architecture):
    assert architecture in supported_architectures()
    model_class = get_model_class(architecture)
    assert callable(getattr(model_class, "load_weights")) and callable(getattr(model_class, "compute_logits"))


def test_unknown_architecture_lists_supported():
    with pytest.raises(ValueError, match="not supported") as info:
        get_model_class("GPTBigCodeForCausalLM")
    assert all(name in str(info.value) for name in FAMILIES)
