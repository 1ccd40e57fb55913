"""Tiny random-weight checkpoints written to disk for tests (no downloads)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]
# 256 byte tokens + the special ones, rounded up: ids past the tokenizer's are valid but unused.
TINY_VOCAB_SIZE = 320
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")


def edit_json(path: str, edit: Callable[[dict], None]) -> None:
    """Rewrite a JSON file (a config.json, a tokenizer_config.json) after `edit`
    changed the loaded dict in place."""
    with open(path) as f:
        data = json.load(f)
    edit(data)
    with open(path, "w") as f:
        json.dump(data, f)


def save_byte_tokenizer(folder: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer without merges: every byte is a token, so any
    text round-trips and multi-byte characters span several tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return tokenizer


def save_tiny_model(folder: str, model_class, config, seed: int = 0) -> torch.nn.Module:
    """Random weights (scaled up so logits are well separated: no greedy ties),
    saved as safetensors with a byte tokenizer; returns the HF model in float32."""
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0, 0.2)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    save_byte_tokenizer(folder)
    return model


def save_tiny_llama(folder: str, max_model_len: int) -> torch.nn.Module:
    """The tests' usual tiny Llama (2 layers, 4 query / 2 KV heads, BOS 0, EOS 1) with a
    byte tokenizer, saved in `folder`; returns the HF model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=TINY_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_model_len,
                         bos_token_id=0, eos_token_id=1)
    return save_tiny_model(folder, LlamaForCausalLM, config)


def hf_greedy(model, prompt_token_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of one prompt with EOS not special (like
    ignore_eos): a plain argmax loop over the model's own KV cache, so no
    generation config can mask or stop on any token."""
    tokens: list[int] = []
    with torch.no_grad():
        out = model(torch.tensor([prompt_token_ids]), use_cache=True)
        for _ in range(max_new_tokens):
            tokens.append(int(out.logits[0, -1].argmax()))
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens
