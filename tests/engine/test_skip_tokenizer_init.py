"""skip_tokenizer_init (vLLM's option): a model folder without tokenizer files runs
prompts given as token ids; without the option it fails at start-up, naming the files."""

from __future__ import annotations

import os

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.engine_args import EngineArgs
from pagedllm.entrypoints.cli import build_parser, main
from pagedllm.entrypoints.cli_args import engine_kwargs
from pagedllm.sampling_params import StructuredOutputsParams
from tests.tiny_models import hf_greedy, save_tiny_llama

MAX_MODEL_LEN = 64
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors")
PROMPTS = [[0, 72, 101, 108, 108, 111], [0, 5, 9, 200, 33, 17, 250, 3, 4]]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny Llama with every file but the model's own deleted (tokenizer.json,
    tokenizer_config.json, chat template, ...)."""
    folder = str(tmp_path_factory.mktemp("no-tokenizer"))
    model = save_tiny_llama(folder, MAX_MODEL_LEN)
    for name in os.listdir(folder):
        if name not in MODEL_FILES:
            os.remove(os.path.join(folder, name))
    assert sorted(os.listdir(folder)) == sorted(MODEL_FILES)
    return folder, model


@pytest.fixture(scope="module")
def llm(tiny):
    return LLM(tiny[0], dtype="float32", num_kv_blocks=32, block_size=4, skip_tokenizer_init=True)


def test_greedy_token_ids_equal_transformers(llm, tiny):
    assert llm.get_tokenizer() is None
    # EOS from config.json / generation_config.json alone.
    assert llm.llm_engine.input_processor.eos_token_ids == (1,)
    prompts = [{"prompt_token_ids": PROMPTS[0]}, PROMPTS[1]]  # a dict, and a list of ints
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, output in zip(PROMPTS, outputs):
        assert output.prompt is None and output.prompt_token_ids == prompt
        [completion] = output.outputs
        assert completion.token_ids == hf_greedy(tiny[1], prompt, GREEDY.max_tokens)
        assert completion.text == ""
        assert completion.finish_reason == "length"


def test_a_list_of_ints_is_one_prompt_and_logprobs_have_no_text(llm, tiny):
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    [output] = llm.generate(PROMPTS[0], params, use_tqdm=False)
    assert output.outputs[0].token_ids == hf_greedy(tiny[1], PROMPTS[0], 4)
    positions = output.outputs[0].logprobs + [p for p in output.prompt_logprobs if p is not None]
    assert positions and all(lp.decoded_token is None for position in positions for lp in position.values())


def test_streamed_engine_requests_carry_token_ids(llm, tiny):
    engine = llm.llm_engine
    engine.add_request("stream", PROMPTS[1], GREEDY, stream=True)
    token_ids = []
    while engine.has_unfinished_requests():
        for output in engine.step():
            token_ids += output.outputs[0].token_ids
            assert output.outputs[0].text == ""
    assert token_ids == hf_greedy(tiny[1], PROMPTS[1], GREEDY.max_tokens)


@pytest.mark.parametrize("prompt", ["hello", {"prompt": "hello"}])
def test_text_prompts_are_refused(llm, prompt):
    with pytest.raises(ValueError, match=r"^a text prompt needs a tokenizer.*skip_tokenizer_init=True.*token ids"):
        llm.generate(prompt, GREEDY, use_tqdm=False)


@pytest.mark.parametrize("field, params", [
    ("stop", SamplingParams(stop=["lo"])),
    ("bad_words", SamplingParams(bad_words=["lo"])),
    ("structured_outputs", SamplingParams(structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))),
])
def test_text_controls_are_refused(llm, field, params):
    with pytest.raises(ValueError, match=rf"^{field} needs a tokenizer.*skip_tokenizer_init=True"):
        llm.generate(PROMPTS[0], params, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_chat_is_refused(llm):
    with pytest.raises(ValueError, match=r"^chat needs a tokenizer.*skip_tokenizer_init=True"):
        llm.chat([{"role": "user", "content": "Hi"}], GREEDY, use_tqdm=False, chat_template="{{ 'x' }}")


def test_the_grammar_compiler_without_a_tokenizer_raises(llm):
    compiler = llm.llm_engine.input_processor.grammar_compiler
    with pytest.raises(ValueError, match="structured outputs need .*tokenizer"):
        compiler.compile(StructuredOutputsParams(regex="[ab]+"))


def test_a_folder_without_tokenizer_files_fails_at_start_up(tiny):
    with pytest.raises(ValueError) as error:
        LLM(tiny[0], dtype="float32", num_kv_blocks=32, block_size=4)
    message = str(error.value)
    assert f"{tiny[0]} has no tokenizer" in message
    assert "tokenizer.json" in message and "tokenizer.model" in message
    assert "skip_tokenizer_init=True" in message and "--skip-tokenizer-init" in message


def test_the_option_and_the_flag(tiny):
    assert EngineArgs(tiny[0], skip_tokenizer_init=True).create_engine_config().model.skip_tokenizer_init
    args = build_parser().parse_args(["generate", "--skip-tokenizer-init", "--prompt", "x"])
    assert engine_kwargs(args)["skip_tokenizer_init"] is True
    args = build_parser().parse_args(["generate", "--prompt", "x"])
    assert engine_kwargs(args)["skip_tokenizer_init"] is False


def test_serve_refuses_the_flag(tiny, capsys):
    assert main(["serve", tiny[0], "--skip-tokenizer-init", "--num-kv-blocks", "8", "--port", "0"]) == 2
    assert "pagedllm serve does not support --skip-tokenizer-init" in capsys.readouterr().err
