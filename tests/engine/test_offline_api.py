"""LLM.generate / chat on a tiny random checkpoint: inputs, sampling, stops,
logprobs, parallel sampling, and every error path (ValueError naming the limit)."""

from __future__ import annotations

import json
import math
import os

import pytest

from pagedllm import LLM, SamplingParams
from tests.tiny_models import TINY_VOCAB_SIZE, hf_greedy, save_tiny_llama

MAX_MODEL_LEN = 128


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny-llama"))
    model = save_tiny_llama(folder, MAX_MODEL_LEN)
    return folder, model


@pytest.fixture(scope="module")
def llm(tiny):
    return LLM(tiny[0], dtype="float32", num_kv_blocks=64, block_size=4)


def _free(llm: LLM) -> bool:
    kv = llm.llm_engine.engine_core.scheduler.kv
    return kv.num_free_blocks == kv.pool.num_blocks and not kv.requests


def test_mixed_prompt_kinds_in_input_order(llm, tiny):
    tokenizer = llm.get_tokenizer()
    prompts = ["hello world", {"prompt_token_ids": [5, 6, 7]}, "héllo ✓"]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert [o.prompt for o in outputs] == ["hello world", None, "héllo ✓"]
    assert outputs[0].prompt_token_ids == tokenizer("hello world").input_ids
    assert outputs[1].prompt_token_ids == [5, 6, 7]
    for output in outputs:
        assert output.outputs[0].token_ids == hf_greedy(tiny[1], output.prompt_token_ids, 8)
        assert output.outputs[0].finish_reason == "length"
    assert _free(llm)


def test_text_is_the_decoded_tokens_and_never_splits_characters(llm):
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=40, ignore_eos=True)
    [output] = llm.generate(["€ ☃ 💡"], params, use_tqdm=False)
    completion = output.outputs[0]
    assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)


def test_a_prompt_ending_in_a_partial_character_stays_out_of_the_text(llm):
    # 'â' alone is the first byte of a 3-byte character: the prompt's text ends in U+FFFD.
    tokenizer = llm.get_tokenizer()
    prompt = tokenizer.encode(" Ping Joan radon", add_special_tokens=False) + [tokenizer.convert_tokens_to_ids("â")]
    assert tokenizer.decode(prompt).endswith("\ufffd")
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    [output] = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    completion = output.outputs[0]
    assert "Ping" not in completion.text
    assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)


def test_chat_applies_the_template(llm):
    messages = [{"role": "user", "content": "Hi"}]
    [output] = llm.chat(messages, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    expected_text = llm.get_tokenizer().apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert output.prompt == expected_text
    assert output.prompt_token_ids == llm.get_tokenizer()(expected_text, add_special_tokens=False).input_ids


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate(["abc"], params, use_tqdm=False)[0].outputs[0].token_ids
    crowd = llm.generate(["xyz", "abc", "hello"], [SamplingParams(temperature=1.0, max_tokens=20), params,
                                                     SamplingParams(temperature=0.5, max_tokens=3)],
                         use_tqdm=False)
    assert crowd[1].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=99, max_tokens=16, ignore_eos=True)
    assert llm.generate(["abc"], other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_parallel_sampling_shares_prompt_blocks(llm):
    prompt = {"prompt_token_ids": list(range(3, 3 + 41))}  # 41 tokens: 10 full blocks + 1 partial
    engine = llm.llm_engine
    kv = engine.engine_core.scheduler.kv

    def peak_blocks(params_list) -> int:
        for i, params in enumerate(params_list):
            engine.add_request(f"peak-{i}", prompt, params)
        peak = 0
        while engine.has_unfinished_requests():
            engine.step()
            peak = max(peak, kv.pool.num_blocks - kv.num_free_blocks)
        kv.reset_prefix_cache()
        return peak

    kv.reset_prefix_cache()
    sample = dict(temperature=1.0, max_tokens=6, ignore_eos=True)
    forked = peak_blocks([SamplingParams(n=4, seed=5, **sample)])
    separate = peak_blocks([SamplingParams(seed=5 + i, **sample) for i in range(4)])
    assert forked < separate
    outputs = llm.generate([prompt], SamplingParams(n=4, seed=5, **sample), use_tqdm=False)[0].outputs
    assert [c.index for c in outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in outputs}) > 1  # samples differ
    again = llm.generate([prompt], SamplingParams(n=4, seed=5, **sample), use_tqdm=False)[0].outputs
    assert [c.token_ids for c in again] == [c.token_ids for c in outputs]
    assert _free(llm)


def test_stop_strings_and_stop_tokens(llm, tiny):
    ids = [5, 6, 7, 8]
    greedy = hf_greedy(tiny[1], ids, 12)
    tokenizer = llm.get_tokenizer()
    full_text = tokenizer.decode(greedy)
    stop = full_text[3:5]
    assert stop and full_text.find(stop) == 3
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop])
    [out] = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
    assert out.outputs[0].text == full_text[:3]
    assert (out.outputs[0].finish_reason, out.outputs[0].stop_reason) == ("stop", stop)
    keep = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop], include_stop_str_in_output=True)
    assert llm.generate([{"prompt_token_ids": ids}], keep, use_tqdm=False)[0].outputs[0].text == full_text[:5]

    by_token = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[greedy[4]])
    [out] = llm.generate([{"prompt_token_ids": ids}], by_token, use_tqdm=False)
    first = greedy.index(greedy[4])
    assert out.outputs[0].token_ids == greedy[:first + 1]
    assert out.outputs[0].stop_reason == greedy[4]
    assert _free(llm)


def test_min_tokens_masks_stop_tokens(llm, tiny):
    ids = [5, 6, 7, 8]
    greedy = hf_greedy(tiny[1], ids, 6)
    params = SamplingParams(temperature=0, max_tokens=6, min_tokens=6, stop_token_ids=[greedy[0]], ignore_eos=True)
    [out] = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 6 and greedy[0] not in out.outputs[0].token_ids


def test_logprobs_and_prompt_logprobs(llm):
    params = SamplingParams(temperature=0, max_tokens=5, logprobs=3, prompt_logprobs=2)
    [out] = llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}], params, use_tqdm=False)
    completion = out.outputs[0]
    assert len(completion.logprobs) == 5
    for token_id, position in zip(completion.token_ids, completion.logprobs):
        assert token_id in position and position[token_id].rank == 1  # greedy picks the top token
        assert 3 <= len(position) <= 4
        assert all(lp.logprob <= 0 for lp in position.values())
    assert math.isclose(completion.cumulative_logprob,
                        sum(p[t].logprob for t, p in zip(completion.token_ids, completion.logprobs)), rel_tol=1e-5)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == 4
    for token_id, position in zip([6, 7, 8], out.prompt_logprobs[1:]):
        assert token_id in position and 2 <= len(position) <= 3


def test_penalties_change_greedy_choice(llm):
    ids = {"prompt_token_ids": [5, 6, 7, 8]}
    plain = llm.generate([ids], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    penalized = llm.generate([ids], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                   frequency_penalty=2.0, repetition_penalty=2.0), use_tqdm=False)
    tokens = penalized[0].outputs[0].token_ids
    assert tokens != plain[0].outputs[0].token_ids
    assert len(set(tokens)) > len(set(plain[0].outputs[0].token_ids)) or len(set(tokens)) == len(tokens)


@pytest.mark.parametrize("prompt_len, max_tokens, numbers", [
    (MAX_MODEL_LEN, 1, [str(MAX_MODEL_LEN)]),
    (100, 40, [str(MAX_MODEL_LEN), "140"]),
])
def test_too_long_requests_name_the_limit(llm, prompt_len, max_tokens, numbers):
    with pytest.raises(ValueError) as error:
        llm.generate([{"prompt_token_ids": [5] * prompt_len}], SamplingParams(max_tokens=max_tokens), use_tqdm=False)
    assert all(n in str(error.value) for n in numbers)
    assert _free(llm) and not llm.llm_engine.has_unfinished_requests()


@pytest.mark.parametrize("field, value", [
    ("temperature", -1.0), ("top_p", 0.0), ("top_k", -5), ("min_p", 1.5), ("n", 0), ("max_tokens", 0),
    ("presence_penalty", 3.0), ("repetition_penalty", 0.0), ("logprobs", 10**4), ("temperature", math.nan),
    ("stop", [""]), ("min_tokens", -1),
])
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_out_of_vocabulary_token_ids(llm):
    with pytest.raises(ValueError, match=str(TINY_VOCAB_SIZE)):
        llm.generate([{"prompt_token_ids": [TINY_VOCAB_SIZE + 5]}], use_tqdm=False)


def test_pool_too_small_for_one_request(tiny):
    with pytest.raises(ValueError, match="needs 32 blocks"):
        LLM(tiny[0], dtype="float32", num_kv_blocks=8, block_size=4)


def test_unknown_kv_cache_dtype_lists_the_choices(tiny):
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, float32, bfloat16, float16"):
        LLM(tiny[0], dtype="float32", kv_cache_dtype="fp8")


def test_missing_model_names_what_was_looked_for(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        LLM(str(tmp_path / "nowhere"))


def test_unsupported_architecture_lists_supported(tiny, tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    with open(os.path.join(tiny[0], "config.json")) as f:
        config = json.load(f)
    config["architectures"] = ["FancyNewForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    for name in os.listdir(tiny[0]):
        if name != "config.json":
            os.symlink(os.path.join(tiny[0], name), folder / name)
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        LLM(str(folder), dtype="float32", num_kv_blocks=64, block_size=4)
