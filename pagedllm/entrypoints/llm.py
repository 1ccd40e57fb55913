"""LLM: offline batched inference."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from tqdm.auto import tqdm

from pagedllm.engine.input_processor import PromptInput
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams

Conversation = list[dict]


class LLM:
    """Load a model once, then generate for many prompts with continuous batching.

    Keyword arguments are EngineArgs' fields (pagedllm/engine_args.py, where each is
    documented; the same options as `pagedllm serve`'s flags), for instance:
    model: a Hugging Face model folder, a .gguf file, or an alias; None = the
        embedded SmolLM2-135M-Instruct.
    dtype: auto | float32 | bfloat16 | float16.
    kv_cache_memory: KV pool size in GiB (or '512MiB'); default min(4 GiB, 25%
        of available memory) on CPU. num_kv_blocks overrides it.
    quantization: None | "gguf" (a .gguf file's quantized matrices run as they are, CPU) |
        "gptq" | "awq" (a Hugging Face checkpoint's; taken from its quantization_config when None).
    tensor_parallel_size: split the model over this many worker processes.
    An unknown keyword is a TypeError naming it.
    """

    def __init__(self, model: str | None = None, **engine_args) -> None:
        self.llm_engine = LLMEngine.from_args(model=model, **engine_args)
        self._request_counter = itertools.count()

    def get_tokenizer(self):
        """The tokenizer; None with skip_tokenizer_init."""
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's recommended defaults (generation_config.json,
        unless the engine was made with generation_config="vllm"); what generate and chat
        use when given no sampling_params."""
        return SamplingParams(**self.llm_engine.input_processor.default_sampling)

    def generate(self, prompts: PromptInput | list[int] | Sequence[PromptInput | list[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Outputs in the order of `prompts`: text, a list of token ids, {"prompt": text}
        or {"prompt_token_ids": [...]}, a dict optionally with "cache_salt" (only prompts
        with the same salt share prefix-cache blocks); a list of ints is one prompt. Every
        prompt is validated before any is queued, so a bad one raises without leaving
        others half-run."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                 and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params_list = self._params_list(sampling_params, len(prompts))
        engine = self.llm_engine
        processor = engine.input_processor
        validated = []
        for prompt, params in zip(prompts, params_list):
            text, token_ids = processor.tokenize(prompt)
            token_ids, params = processor.validate(token_ids, params)
            validated.append((text, token_ids, params, processor.cache_salt(prompt)))
        request_ids = []
        for text, token_ids, params, cache_salt in validated:
            request_id = str(next(self._request_counter))
            engine.add_tokenized_request(request_id, text, token_ids, params, cache_salt=cache_salt)
            request_ids.append(request_id)
        return self._run(request_ids, use_tqdm)

    def chat(self, messages: Conversation | Sequence[Conversation],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template: str | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        processor = self.llm_engine.input_processor
        prompts = []
        for conversation in conversations:
            text = processor.apply_chat_template(conversation, chat_template, add_generation_prompt)
            prompts.append({"prompt": text, "prompt_token_ids": processor.tokenize_chat(text)})
        return self.generate(prompts, sampling_params, use_tqdm)

    def _params_list(self, sampling_params, count: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [self.get_default_sampling_params()] * count
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * count
        params_list = list(sampling_params)
        if len(params_list) != count:
            raise ValueError(f"got {len(params_list)} SamplingParams for {count} prompts; "
                             "pass one, or one per prompt")
        return params_list

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        finished: dict[str, RequestOutput] = {}
        progress = tqdm(total=len(request_ids), desc="Processed prompts", dynamic_ncols=True,
                        disable=not use_tqdm)
        num_output_tokens, started = 0, progress.format_dict["elapsed"]
        try:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        num_output_tokens += output.num_generated_tokens
                        progress.update(1)
                        elapsed = progress.format_dict["elapsed"] - started
                        if elapsed > 0:
                            progress.set_postfix_str(f"output {num_output_tokens / elapsed:.1f} tok/s",
                                                     refresh=False)
        except BaseException:
            engine.abort_request([r for r in request_ids if r not in finished])
            raise
        finally:
            progress.close()
        return [finished[r] for r in request_ids]
