"""load_tokenizer_folder: the generic tokenizers-backed class directly, anything else via AutoTokenizer."""

from __future__ import annotations

import json
import os

import transformers

from pagedllm.loader.tokenizer import load_tokenizer_folder
from tests.tiny_models import save_byte_tokenizer

TEXTS = ["Hello, world!", "naïve café 🤖", "<s>tags</s> stay"]


def _set_tokenizer_class(folder, name: str) -> None:
    path = os.path.join(folder, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    config["tokenizer_class"] = name
    with open(path, "w") as f:
        json.dump(config, f)


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
