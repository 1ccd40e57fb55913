"""Request controls handled before the engine core, on a tiny random checkpoint:
cache_salt (prefix-cache isolation), truncate_prompt_tokens, bad_words' token ids,
token-id fields checked against the vocabulary, and the model's generation_config.json
sampling defaults (--generation-config auto | vllm | folder)."""

from __future__ import annotations

import json
import logging
import os

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.config import load_default_sampling
from tests.tiny_models import TINY_VOCAB_SIZE, hf_greedy, save_tiny_llama

MAX_MODEL_LEN = 128
ENGINE_KWARGS = dict(dtype="float32", num_kv_blocks=64, block_size=4)
GREEDY = SamplingParams(temperature=0, max_tokens=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny-llama"))
    model = save_tiny_llama(folder, MAX_MODEL_LEN)
    return folder, model


@pytest.fixture(scope="module")
def llm(tiny):
    return LLM(tiny[0], **ENGINE_KWARGS)


def _num_cached(llm: LLM, prompt: dict) -> int:
    [output] = llm.generate([prompt], GREEDY, use_tqdm=False)
    return output.num_cached_tokens


def test_cache_salt_shares_the_prefix_cache_only_with_the_same_salt(llm):
    llm.llm_engine.engine_core.scheduler.kv.reset_prefix_cache()
    ids = list(range(3, 3 + 21))  # 5 full blocks + 1 token
    assert _num_cached(llm, {"prompt_token_ids": ids, "cache_salt": "tenant-a"}) == 0
    assert _num_cached(llm, {"prompt_token_ids": ids, "cache_salt": "tenant-a"}) == 20
    assert _num_cached(llm, {"prompt_token_ids": ids, "cache_salt": "tenant-b"}) == 0
    assert _num_cached(llm, {"prompt_token_ids": ids}) == 0
    assert _num_cached(llm, {"prompt_token_ids": ids}) == 20
    text = "the same words, salted " * 2
    assert _num_cached(llm, {"prompt": text, "cache_salt": "tenant-a"}) == 0
    assert _num_cached(llm, {"prompt": text, "cache_salt": "tenant-a"}) > 0
    # The engine's own entry point takes the salt as an argument too.
    engine = llm.llm_engine
    engine.add_request("salted", ids, GREEDY, cache_salt="tenant-b")
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.finished]
    assert [o.num_cached_tokens for o in outputs] == [20]


@pytest.mark.parametrize("salt", ["", 7, ["a"]])
def test_cache_salt_must_be_a_non_empty_string(llm, salt):
    with pytest.raises(ValueError, match="cache_salt must be a non-empty string"):
        llm.generate([{"prompt_token_ids": [5, 6], "cache_salt": salt}], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="cache_salt must be a non-empty string"):
        llm.llm_engine.add_request("bad-salt", [5, 6], GREEDY, cache_salt=salt)
    assert not llm.llm_engine.has_unfinished_requests()


def test_truncate_prompt_tokens_keeps_the_last_tokens(llm, tiny):
    ids = [(7 * i) % 250 + 3 for i in range(300)]  # longer than the model's context
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, truncate_prompt_tokens=10)
    [output] = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
    assert output.prompt_token_ids == ids[-10:]
    assert output.outputs[0].token_ids == hf_greedy(tiny[1], ids[-10:], 4)
    # A prompt already short enough is kept whole.
    short = SamplingParams(temperature=0, max_tokens=4, truncate_prompt_tokens=50)
    assert llm.generate([{"prompt_token_ids": ids[:20]}], short, use_tqdm=False)[0].prompt_token_ids == ids[:20]


def test_truncate_prompt_tokens_limits(llm):
    processor = llm.llm_engine.input_processor
    ids = list(range(3, 103))
    # -1 means max_model_len (vLLM): a shorter prompt is kept whole, a longer one still has no room.
    assert processor.validate(ids, SamplingParams(max_tokens=8, truncate_prompt_tokens=-1))[0] == ids
    with pytest.raises(ValueError, match=f"maximum context length is {MAX_MODEL_LEN}"):
        processor.validate(ids * 2, SamplingParams(max_tokens=8, truncate_prompt_tokens=-1))
    with pytest.raises(ValueError, match=rf"truncate_prompt_tokens \({MAX_MODEL_LEN + 1}\) is greater than "
                                         rf"max_model_len \({MAX_MODEL_LEN}\)"):
        processor.validate(ids, SamplingParams(truncate_prompt_tokens=MAX_MODEL_LEN + 1))
    # Checked after truncation: the kept tokens plus max_tokens must fit.
    with pytest.raises(ValueError, match="100 in the prompt"):
        processor.validate(ids * 3, SamplingParams(max_tokens=40, truncate_prompt_tokens=100))


def test_bad_words_become_token_id_sequences(llm):
    tokenizer = llm.get_tokenizer()
    processor = llm.llm_engine.input_processor
    _, params = processor.validate([5, 6], SamplingParams(bad_words=["cat", " cat", "dog house"]))

    def encode(text: str) -> tuple[int, ...]:
        return tuple(tokenizer(text, add_special_tokens=False).input_ids)

    # The word alone and after a space (the byte tokenizer makes the space a token of its
    # own); " cat" strips to "cat" and adds nothing new.
    assert params.bad_words_token_ids == (encode("cat"), encode(" cat"), encode("dog house"), encode(" dog house"))
    assert processor.validate([5, 6], SamplingParams())[1].bad_words_token_ids == ()


@pytest.mark.parametrize("field, value", [
    ("logit_bias", {TINY_VOCAB_SIZE: 5.0}), ("allowed_token_ids", [3, TINY_VOCAB_SIZE + 1]),
    ("stop_token_ids", [TINY_VOCAB_SIZE]),
])
def test_token_id_fields_must_be_in_the_vocabulary(llm, field, value):
    with pytest.raises(ValueError, match=f"{field} must be token ids below the vocabulary size {TINY_VOCAB_SIZE}"):
        llm.generate([{"prompt_token_ids": [5, 6]}], SamplingParams(**{field: value}), use_tqdm=False)
    in_range = {k - 1: v for k, v in value.items()} if isinstance(value, dict) else [t - 2 for t in value]
    llm.llm_engine.input_processor.validate([5, 6], SamplingParams(**{field: in_range}))


def _model_with_generation_config(tiny_folder: str, folder, generation_config: dict) -> str:
    """The tiny model's files, with this generation_config.json."""
    folder.mkdir()
    for name in os.listdir(tiny_folder):
        if name != "generation_config.json":
            os.symlink(os.path.join(tiny_folder, name), folder / name)
    (folder / "generation_config.json").write_text(json.dumps(generation_config))
    return str(folder)


GENERATION_CONFIG = {"bos_token_id": 0, "eos_token_id": 1, "do_sample": False, "temperature": 0.0, "top_k": 7,
                     "top_p": None, "max_new_tokens": 3, "max_length": 20}
DEFAULT_SAMPLING = {"temperature": 0.0, "top_k": 7, "max_tokens": 3}


def test_generation_config_gives_the_default_sampling_params(tiny, tmp_path, caplog):
    folder = _model_with_generation_config(tiny[0], tmp_path / "model", GENERATION_CONFIG)
    with caplog.at_level(logging.INFO, logger="pagedllm.config"):
        llm = LLM(folder, **ENGINE_KWARGS)
    assert f"default sampling parameters from the model's generation_config.json: {DEFAULT_SAMPLING}" in caplog.text
    assert llm.llm_engine.input_processor.default_sampling == DEFAULT_SAMPLING
    assert llm.get_default_sampling_params() == SamplingParams(temperature=0.0, top_k=7, max_tokens=3)
    ids = {"prompt_token_ids": [5, 6, 7, 8]}
    [output] = llm.generate([ids], use_tqdm=False)
    [expected] = llm.generate([ids], SamplingParams(temperature=0, top_k=7, max_tokens=3), use_tqdm=False)
    assert output.outputs[0].token_ids == expected.outputs[0].token_ids
    [chat] = llm.chat([{"role": "user", "content": "Hi"}], use_tqdm=False)
    assert len(chat.outputs[0].token_ids) <= 3
    # Explicit SamplingParams replace the defaults.
    explicit = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    assert len(llm.generate([ids], explicit, use_tqdm=False)[0].outputs[0].token_ids) == 6


def test_generation_config_vllm_ignores_the_file_and_a_folder_supplies_one(tiny, tmp_path):
    folder = _model_with_generation_config(tiny[0], tmp_path / "model", GENERATION_CONFIG)
    llm = LLM(folder, generation_config="vllm", **ENGINE_KWARGS)
    assert llm.llm_engine.input_processor.default_sampling == {}
    assert llm.get_default_sampling_params() == SamplingParams()
    other = tmp_path / "other"
    other.mkdir()
    (other / "generation_config.json").write_text(json.dumps({"top_p": 0.5, "repetition_penalty": 1.2}))
    llm = LLM(tiny[0], generation_config=str(other), **ENGINE_KWARGS)
    assert llm.llm_engine.input_processor.default_sampling == {"top_p": 0.5, "repetition_penalty": 1.2}


def test_generation_config_refused_at_start_up(tiny, tmp_path):
    with pytest.raises(ValueError, match="holding a generation_config.json"):
        LLM(tiny[0], generation_config=str(tmp_path / "nowhere"), **ENGINE_KWARGS)
    folder = _model_with_generation_config(tiny[0], tmp_path / "model", {"top_p": 0.0})
    with pytest.raises(ValueError, match="top_p must be"):
        LLM(folder, **ENGINE_KWARGS)


def test_gguf_and_plain_folders_have_no_defaults(tiny, tmp_path):
    assert load_default_sampling("auto", str(tmp_path / "model.gguf"), is_gguf=True) == {}
    assert load_default_sampling("auto", str(tmp_path), is_gguf=False) == {}  # no generation_config.json
    assert load_default_sampling("auto", tiny[0], is_gguf=False) == {}  # one without sampling keys
