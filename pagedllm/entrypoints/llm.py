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

    model: a Hugging Face model folder, a .gguf file, or an alias; None = the
        embedded SmolLM2-135M-Instruct.
    dtype: auto | float32 | bfloat16 | float16 (auto: see pagedllm.config).
    kv_cache_memory: KV pool size in GiB (or '512MiB'); default min(4 GiB, 25%
        of available memory) on CPU. num_kv_blocks overrides it.
    kv_cache_dtype: auto (the model's dtype) | float32 | bfloat16 | float16:
        how K/V are stored; attention computes in the model's dtype.
    generation_config: auto (the model's generation_config.json sets the default
        sampling parameters: get_default_sampling_params) | vllm (ignore it) | a
        folder holding a generation_config.json.
    skip_tokenizer_init: load no tokenizer (for a folder without one): prompts must
        be token ids, outputs have token_ids and empty text.
    quantization: None (weights as float) | "gguf": a .gguf file's Q4_0/Q4_1/Q5_0/
        Q5_1/Q8_0/Q4_K/Q5_K/Q6_K matrices stay quantized and run through quantized
        kernels (CPU).
    Other arguments: see EngineConfig.create.
    """

    def __init__(self, model: str | None = None, dtype: str = "auto", seed: int = 0,
                 max_model_len: int | None = None, kv_cache_memory: float | str | None = None,
                 num_kv_blocks: int | None = None, block_size: int = 16, max_num_seqs: int = 256,
                 max_num_batched_tokens: int | None = None, enable_prefix_caching: bool = True,
                 **engine_kwargs) -> None:
        self.llm_engine = LLMEngine.from_args(
            model=model, dtype=dtype, seed=seed, max_model_len=max_model_len, kv_cache_memory=kv_cache_memory,
            num_kv_blocks=num_kv_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, enable_prefix_caching=enable_prefix_caching,
            **engine_kwargs)
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
