"""load_tokenizer_folder: the generic tokenizers-backed class directly, anything else via AutoTokenizer."""

from __future__ import annotations

import os

import transformers

from pagedllm.loader.tokenizer import load_tokenizer_folder
from tests.tiny_models import edit_json, save_byte_tokenizer

TEXTS = ["Hello, world!", "naïve café 🤖", "<s>tags</s> stay"]


def _set_tokenizer_class(folder, name: str) -> None:
    edit_json(os.path.join(folder, "tokenizer_config.json"), lambda config: config.update(tokenizer_class=name))


def test_generic_folder_loads_without_auto_and_tokenizes_like_auto(tmp_path):
    save_byte_tokenizer(str(tmp_path))
    tokenizer = load_tokenizer_folder(str(tmp_path))
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert type(tokenizer) is transformers.PreTrainedTokenizerFast
    for text in TEXTS:
        ids = tokenizer(text).input_ids
        assert ids == reference(text).input_ids
        assert tokenizer.decode(ids) == reference.decode(ids)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (reference.bos_token_id, reference.eos_token_id)
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_model_specific_class_goes_through_auto(tmp_path):
    save_byte_tokenizer(str(tmp_path))
    _set_tokenizer_class(tmp_path, "GPT2Tokenizer")
    tokenizer = load_tokenizer_folder(str(tmp_path))
    assert type(tokenizer) is type(transformers.AutoTokenizer.from_pretrained(str(tmp_path)))
    assert type(tokenizer).__name__.startswith("GPT2Tokenizer")
