"""Turn a SchedulerOutput into one flat model batch, run it, sample.

The runner keeps each request's token ids and block table between steps and
applies the scheduler's deltas; batch tensors are built with numpy, with
Python work per request, not per token.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from pagedllm.attention.metadata import AttentionMetadata
from pagedllm.config import CacheConfig, ModelConfig
from pagedllm.core.scheduler_output import GrammarBitmask, ModelRunnerOutput, SchedulerOutput
from pagedllm.layers.attention import Attention
from pagedllm.layers.sampler import SamplingBatch, gather_logprobs, mix_seed, sample
from pagedllm.loader.model_loader import load_model, torch_dtype
from pagedllm.platforms import StepClock, get_platform
from pagedllm.sampling_params import SamplingParams
from pagedllm.worker.cache_engine import CacheEngine


@dataclass
class RequestState:
    token_ids: list[int]
    num_prompt_tokens: int
    block_ids: list[int]
    num_computed_tokens: int
    sampling_params: SamplingParams
    sample_index: int
    # allowed_token_ids as a bitmask (int32 [ceil(V / 32)]), None if unrestricted.
    allowed_bitmask: np.ndarray | None = None

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


@dataclass
class ModelInput:
    request_ids: list[str]
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    metadata: AttentionMetadata
    sample_request_ids: list[str]  # requests whose last scheduled token gets a sample
    sample_rows: torch.Tensor  # [S] rows of the flat batch whose hidden states are sampled
    # request id -> (first target position, hidden-state rows, target token ids)
    prompt_logprob_rows: dict[str, tuple[int, np.ndarray, np.ndarray]]
    grammar_bitmask: GrammarBitmask | None


class ModelRunner:
    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, is_driver: bool = True) -> None:
        self.model_config = model_config
        self.block_size = cache_config.block_size
        self.is_driver = is_driver
        self.device = torch.device(model_config.device)
        self.kv_cache_dtype = torch_dtype(cache_config.kv_dtype(model_config.dtype))
        self.model: torch.nn.Module | None = None
        self.cache: CacheEngine | None = None
        self.step_clock = StepClock()
        self.platform = get_platform(model_config.device)
        self.requests: dict[str, RequestState] = {}
        self.vocab_size = model_config.hf_config.vocab_size

    def load_model(self) -> None:
        self.model = load_model(self.model_config)

    def attention_window(self) -> int | None:
        """The sliding window if every attention layer has the same one, else None."""
        windows = {m.sliding_window for m in self.model.modules() if isinstance(m, Attention)}
        return windows.pop() if len(windows) == 1 else None

    def kv_bytes_per_block(self, num_kv_heads: int) -> int:
        return CacheEngine.bytes_per_block(self.model_config.num_layers, self.block_size, num_kv_heads,
                                           self.model_config.head_dim, self.kv_cache_dtype)

    def init_kv_cache(self, num_blocks: int, num_kv_heads: int) -> None:
        self.cache = CacheEngine(self.model_config.num_layers, num_blocks, self.block_size, num_kv_heads,
                                 self.model_config.head_dim, self.kv_cache_dtype, self.model_config.device,
                                 self.step_clock)

    # ---- per-step state -----------------------------------------------------

    def _update_states(self, scheduler_output: SchedulerOutput) -> None:
        for request_id in scheduler_output.freed_request_ids:
            self.requests.pop(request_id, None)
        for new in scheduler_output.new_requests:
            allowed = new.sampling_params.allowed_token_ids
            self.requests[new.request_id] = RequestState(
                list(new.token_ids), new.num_prompt_tokens, list(new.block_ids), new.num_computed_tokens,
                new.sampling_params, new.sample_index,
                None if allowed is None else token_bitmask(allowed, self.vocab_size))
        for delta in scheduler_output.cached_requests:
            state = self.requests[delta.request_id]
            state.token_ids.extend(delta.new_token_ids)
            state.block_ids[delta.block_table_start:] = delta.new_block_ids
            state.num_computed_tokens = delta.num_computed_tokens

    def _prepare_inputs(self, scheduler_output: SchedulerOutput) -> ModelInput:
        request_ids = list(scheduler_output.num_scheduled_tokens)
        states = [self.requests[r] for r in request_ids]
        num_requests = len(states)
        query_lens = np.fromiter(scheduler_output.num_scheduled_tokens.values(), np.int64, num_requests)
        computed = np.fromiter((s.num_computed_tokens for s in states), np.int64, num_requests)
        seq_lens = computed + query_lens
        query_start = np.zeros(num_requests + 1, np.int64)
        np.cumsum(query_lens, out=query_start[1:])
        num_tokens = int(query_start[-1])
        # Position of every token: its request's computed count plus its offset in the chunk.
        request_of_token = np.repeat(np.arange(num_requests), query_lens)
        positions = np.arange(num_tokens) - np.repeat(query_start[:-1] - computed, query_lens)

        max_blocks = int(-(-seq_lens.max() // self.block_size))
        block_table = np.zeros((num_requests, max_blocks), np.int32)
        input_ids = np.empty(num_tokens, np.int64)
        sample_request_ids, sample_rows, prompt_logprob_rows = [], [], {}
        for i, state in enumerate(states):
            start, end = int(computed[i]), int(seq_lens[i])
            input_ids[query_start[i]:query_start[i + 1]] = state.token_ids[start:end]
            num_blocks = -(-end // self.block_size)
            block_table[i, :num_blocks] = state.block_ids[:num_blocks]
            if end == len(state.token_ids):
                sample_request_ids.append(request_ids[i])
                sample_rows.append(int(query_start[i + 1]) - 1)
            if state.sampling_params.prompt_logprobs is not None and start < state.num_prompt_tokens:
                # Targets t in [start+1, min(end, P-1)] are predicted by the hidden state at t-1.
                targets = np.arange(start + 1, min(end, state.num_prompt_tokens - 1) + 1)
                rows = query_start[i] + (targets - 1 - start)
                prompt_logprob_rows[request_ids[i]] = (start, rows, np.asarray(state.token_ids)[targets])
        slot_mapping = (block_table[request_of_token, positions // self.block_size].astype(np.int64)
                        * self.block_size + positions % self.block_size)

        device = self.device
        metadata = AttentionMetadata(
            query_start_loc=torch.from_numpy(query_start.astype(np.int32)).to(device),
            seq_lens=torch.from_numpy(seq_lens.astype(np.int32)).to(device),
            block_table=torch.from_numpy(block_table).to(device),
            slot_mapping=torch.from_numpy(slot_mapping).to(device),
            query_start_np=query_start, query_lens_np=query_lens, seq_lens_np=seq_lens, block_size=self.block_size)
        return ModelInput(request_ids, torch.from_numpy(input_ids).to(device), torch.from_numpy(positions).to(device),
                          metadata, sample_request_ids, torch.tensor(sample_rows, dtype=torch.int64, device=device),
                          prompt_logprob_rows, scheduler_output.grammar_bitmask)

    # ---- the step -----------------------------------------------------------

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput | None:
        self.step_clock.idle_since = math.inf
        try:
            return self._execute_model(scheduler_output)
        finally:
            self.step_clock.idle_since = time.monotonic()
            self.platform.after_step()

    @torch.inference_mode()
    def _execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput | None:
        self._update_states(scheduler_output)
        if scheduler_output.is_empty:
            return ModelRunnerOutput()
        model_input = self._prepare_inputs(scheduler_output)
        hidden_states = self.model(model_input.input_ids, model_input.positions, self.cache.kv_caches,
                                   model_input.metadata)
        if not self.is_driver:
            # Other ranks still join the LM head's collective, then drop the logits.
            self.model.compute_logits(hidden_states[model_input.sample_rows])
            return None
        output = ModelRunnerOutput()
        self._sample(hidden_states, model_input, output)
        self._prompt_logprobs(hidden_states, model_input, output)
        return output

    def _sample(self, hidden_states: torch.Tensor, model_input: ModelInput, output: ModelRunnerOutput) -> None:
        request_ids = model_input.sample_request_ids
        logits = self.model.compute_logits(hidden_states[model_input.sample_rows])
        if not request_ids:
            return
        states = [self.requests[r] for r in request_ids]
        token_ids, raw_logprobs = sample(logits, self._sampling_batch(states, request_ids,
                                                                      model_input.grammar_bitmask))
        output.sampled_token_ids = dict(zip(request_ids, token_ids.tolist()))
        rows = [i for i, s in enumerate(states) if s.sampling_params.logprobs is not None]
        if rows:
            num_top = max(states[i].sampling_params.logprobs for i in rows)
            row_index = torch.tensor(rows, device=logits.device)
            entries = gather_logprobs(raw_logprobs[row_index], token_ids[row_index], num_top)
            for i, entry in zip(rows, entries):
                keep = states[i].sampling_params.logprobs + 1
                entry.token_ids, entry.logprobs, entry.ranks = (
                    entry.token_ids[:keep], entry.logprobs[:keep], entry.ranks[:keep])
                output.logprobs[request_ids[i]] = entry

    def _prompt_logprobs(self, hidden_states: torch.Tensor, model_input: ModelInput,
                         output: ModelRunnerOutput) -> None:
        for request_id, (start, rows, targets) in model_input.prompt_logprob_rows.items():
            num_top = self.requests[request_id].sampling_params.prompt_logprobs
            entries = []
            if len(rows):
                logits = self.model.compute_logits(hidden_states[torch.from_numpy(rows).to(self.device)])
                entries = gather_logprobs(torch.log_softmax(logits, dim=-1),
                                          torch.from_numpy(targets).to(self.device), num_top)
            # Position 0 has no prompt logprob: the list starts with None there.
            output.prompt_logprobs[request_id] = (start, ([None] if start == 0 else []) + entries)

    def _sampling_batch(self, states: list[RequestState], request_ids: list[str],
                        grammar_bitmask: GrammarBitmask | None) -> SamplingBatch:
        device, vocab = self.device, self.vocab_size
        params = [s.sampling_params for s in states]

        def column(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device)

        def optional(values, neutral, dtype=torch.float32):
            return column(values, dtype) if any(v != neutral for v in values) else None

        top_k = [p.top_k or vocab for p in params]
        penalized = any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 for p in params)
        counts = prompt_mask = presence = frequency = repetition = None
        if penalized:
            counts = torch.zeros(len(states), vocab, dtype=torch.int32, device=device)
            prompt_mask = torch.zeros(len(states), vocab, dtype=torch.bool, device=device)
            for row, state in enumerate(states):
                outputs = column(state.token_ids[state.num_prompt_tokens:], torch.int64)
                counts[row].scatter_add_(0, outputs, torch.ones_like(outputs, dtype=torch.int32))
                prompt_mask[row, column(state.token_ids[:state.num_prompt_tokens], torch.int64)] = True
            presence = column([p.presence_penalty for p in params]).unsqueeze(1)
            frequency = column([p.frequency_penalty for p in params]).unsqueeze(1)
            repetition = column([p.repetition_penalty for p in params]).unsqueeze(1)
        suppressed = []
        for row, state in enumerate(states):
            ids = _suppressed_token_ids(state)
            if ids:
                suppressed.append((row, ids))
        return SamplingBatch(
            temperature=column([p.temperature for p in params]),
            top_k=optional(top_k, vocab, torch.int64), top_p=optional([p.top_p for p in params], 1.0),
            min_p=optional([p.min_p for p in params], 0.0),
            presence_penalty=presence, frequency_penalty=frequency, repetition_penalty=repetition,
            output_token_counts=counts, prompt_token_mask=prompt_mask, suppressed_tokens=suppressed,
            seeds=[None if p.seed is None else mix_seed(p.seed, s.sample_index, s.num_output_tokens)
                   for s, p in zip(states, params)],
            num_logprobs=[p.logprobs for p in params],
            logit_bias=self._logit_bias(params), allowed_bitmask=self._allowed_bitmask(states, request_ids,
                                                                                      grammar_bitmask))

    def _logit_bias(self, params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        rows, token_ids, biases = [], [], []
        for row, p in enumerate(params):
            if p.logit_bias:
                rows += [row] * len(p.logit_bias)
                token_ids += p.logit_bias.keys()
                biases += p.logit_bias.values()
        if not rows:
            return None
        return (torch.tensor(rows, device=self.device), torch.tensor(token_ids, device=self.device),
                torch.tensor(biases, dtype=torch.float32, device=self.device))

    def _allowed_bitmask(self, states: list[RequestState], request_ids: list[str],
                         grammar_bitmask: GrammarBitmask | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rows restricted by a grammar, allowed_token_ids or both (the masks' AND)."""
        grammar_rows = {} if grammar_bitmask is None else dict(zip(grammar_bitmask.request_ids,
                                                                  grammar_bitmask.bitmask))
        rows, masks = [], []
        for row, (request_id, state) in enumerate(zip(request_ids, states)):
            mask = grammar_rows.get(request_id)
            if state.allowed_bitmask is not None:
                mask = state.allowed_bitmask if mask is None else mask & state.allowed_bitmask
            if mask is not None:
                rows.append(row)
                masks.append(mask)
        if not rows:
            return None
        return torch.tensor(rows, device=self.device), torch.from_numpy(np.stack(masks)).to(self.device)


def token_bitmask(token_ids: list[int], vocab_size: int) -> np.ndarray:
    """int32 [ceil(vocab_size / 32)] with bit j of word i set for token 32 * i + j in token_ids."""
    bits = np.zeros(-(-vocab_size // 32) * 32, bool)
    bits[token_ids] = True
    return np.packbits(bits, bitorder="little").view("<i4")


def _suppressed_token_ids(state: RequestState) -> list[int]:
    """Tokens the request may not sample now: EOS and stop tokens before min_tokens
    (unless a grammar decides where the output ends), and the last token of each bad
    word whose other tokens were just generated."""
    params = state.sampling_params
    ids = []
    if state.num_output_tokens < params.min_tokens and params.structured_outputs is None:
        ids += list(params.stop_token_ids) + ([] if params.ignore_eos else list(params.eos_token_ids))
    for word in params.bad_words_token_ids:
        prefix = word[:-1]
        if not prefix or (len(prefix) <= state.num_output_tokens and tuple(state.token_ids[-len(prefix):]) == prefix):
            ids.append(word[-1])
    return ids
