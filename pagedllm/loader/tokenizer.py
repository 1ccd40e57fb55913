"""A Hugging Face tokenizer folder -> a transformers tokenizer, without AutoTokenizer's import cost.

`AutoTokenizer.from_pretrained` imports `transformers.models`, whose lazy import table scans every
model family's package (~0.7 s, a seventh of start-up). A folder whose tokenizer_config.json names
the generic tokenizers-backed class needs none of that: load that class directly. Any other
class name goes through AutoTokenizer, which resolves model-specific classes.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# transformers 5 names the generic class TokenizersBackend; 4.x wrote PreTrainedTokenizerFast
# (an alias of it in 5.x).
_GENERIC_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
# A folder holds a tokenizer only with one of these: the tokenizers library's file, or the
# vocabulary of a slow tokenizer (SentencePiece, BPE, WordPiece, tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "qwen.tiktoken", "tokenizer.tiktoken")


def load_tokenizer_folder(folder: str) -> PreTrainedTokenizerBase:
    """The tokenizer saved in `folder` (tokenizer.json / tokenizer_config.json / chat template)."""
    import transformers

    config_path = os.path.join(folder, "tokenizer_config.json")
    tokenizer_class = None
    if os.path.isfile(config_path) and os.path.isfile(os.path.join(folder, "tokenizer.json")):
        with open(config_path) as f:
            tokenizer_class = json.load(f).get("tokenizer_class")
    if tokenizer_class in _GENERIC_CLASSES:
        return transformers.PreTrainedTokenizerFast.from_pretrained(folder)
    return transformers.AutoTokenizer.from_pretrained(folder)
