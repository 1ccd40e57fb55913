"""Engine-core outputs -> RequestOutputs: incremental detokenization, stop
strings, logprobs, and the fan-in of a parent's n samples.

Text is decoded with the tokenizers library's DecodeStream, which never splits
a multi-byte character. While a sample can still hit a stop string, the last
(longest stop string - 1) characters are held back from streamed deltas, so
streamed text always equals the final text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tokenizers.decoders import DecodeStream

from pagedllm.core.scheduler_output import EngineCoreOutput, TokenLogprobs
from pagedllm.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestMetrics, RequestOutput
from pagedllm.sampling_params import SamplingParams

# Prompt tokens given to the decoder as context (enough for leading-space rules).
_DECODE_CONTEXT_TOKENS = 6


@dataclass
class SampleState:
    """One of a parent's n samples (one engine-core request)."""

    index: int
    params: SamplingParams
    decoder: DecodeStream | None
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # What previous streamed deltas already delivered.
    num_sent_chars: int = 0
    num_sent_tokens: int = 0
    num_sent_logprobs: int = 0
    finish_sent: bool = False


@dataclass
class ParentState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    stream: bool
    samples: list[SampleState]
    metrics: RequestMetrics
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self.parents: dict[str, ParentState] = {}
        # engine-core request id -> (parent, sample)
        self.samples: dict[str, tuple[ParentState, SampleState]] = {}

    def add_request(self, request_id: str, child_ids: list[str], prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, stream: bool, arrival_time: float) -> None:
        samples = []
        for index, child_id in enumerate(child_ids):
            decoder = None
            if self._backend is not None:
                decoder = DecodeStream(ids=self._decode_context(prompt_token_ids, params),
                                       skip_special_tokens=params.skip_special_tokens)
            sample = SampleState(index, params, decoder, logprobs=[] if params.logprobs is not None else None,
                                 cumulative_logprob=0.0 if params.logprobs is not None else None)
            samples.append(sample)
        parent = ParentState(request_id, prompt, prompt_token_ids, stream, samples, RequestMetrics(arrival_time),
                             prompt_logprobs=[] if params.prompt_logprobs is not None else None)
        self.parents[request_id] = parent
        for child_id, sample in zip(child_ids, samples):
            self.samples[child_id] = (parent, sample)

    def _decode_context(self, prompt_token_ids: list[int], params: SamplingParams) -> list[int]:
        """The last prompt tokens, without a trailing partial character: DecodeStream
        takes a context whose text ends in U+FFFD as not yet emitted, and would put
        that prompt text in front of the first output token."""
        context = prompt_token_ids[-_DECODE_CONTEXT_TOKENS:]
        while context and self._backend.decode(context, skip_special_tokens=params.skip_special_tokens).endswith(
                "\ufffd"):
            context = context[:-1]
        return context

    def child_ids(self, request_id: str) -> list[str]:
        return [cid for cid, (parent, _) in self.samples.items() if parent.request_id == request_id]

    def abort(self, request_id: str) -> RequestOutput | None:
        """Mark a parent aborted and forget it; returns its final output."""
        parent = self.parents.get(request_id)
        if parent is None:
            return None
        for sample in parent.samples:
            if sample.finish_reason is None:
                sample.finish_reason = "abort"
        output = self._make_output(parent)
        self._forget(parent)
        return output

    def process_outputs(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """-> (request outputs to hand out, engine-core ids to stop for a stop string)."""
        now = time.monotonic()
        touched: dict[str, ParentState] = {}
        to_stop = []
        for out in outputs:
            entry = self.samples.get(out.request_id)
            if entry is None:
                continue
            parent, sample = entry
            touched[parent.request_id] = parent
            parent.num_cached_tokens = max(parent.num_cached_tokens, out.num_cached_tokens)
            if out.new_prompt_logprobs and parent.prompt_logprobs is not None and sample.index == 0:
                self._add_prompt_logprobs(parent, out)
            if not out.new_token_ids:
                continue
            if parent.metrics.first_token_time is None:
                parent.metrics.first_token_time = now
            parent.metrics.last_token_time = now
            if self._add_tokens(sample, out) and out.finish_reason is None:
                to_stop.append(out.request_id)
        results = []
        for parent in touched.values():
            if parent.finished:
                parent.metrics.finished_time = now
            if parent.stream or parent.finished:
                results.append(self._make_output(parent))
            if parent.finished:
                self._forget(parent)
        return results, to_stop

    def _forget(self, parent: ParentState) -> None:
        self.parents.pop(parent.request_id, None)
        for child_id in [cid for cid, (p, _) in self.samples.items() if p is parent]:
            del self.samples[child_id]

    def _add_tokens(self, sample: SampleState, out: EngineCoreOutput) -> bool:
        """Append tokens/text/logprobs; True when a stop string ended the sample."""
        params = sample.params
        sample.token_ids.extend(out.new_token_ids)
        sample.finish_reason, sample.stop_reason = out.finish_reason, out.stop_reason
        if out.new_logprobs and sample.logprobs is not None:
            for entry in out.new_logprobs:
                sample.logprobs.append(self._position_logprobs(entry))
                sample.cumulative_logprob += entry.logprobs[0]
        # A stop token (EOS or stop_token_ids) ends the text without its own text; a
        # completed grammar ends it after an ordinary token, which stays.
        last_token = out.new_token_ids[-1]
        stopped_by_token = (out.finish_reason == "stop" and not params.include_stop_str_in_output
                            and (last_token == out.stop_reason
                                 or (not params.ignore_eos and last_token in params.eos_token_ids)))
        new_ids = out.new_token_ids[:-1] if stopped_by_token else out.new_token_ids
        if sample.decoder is None:
            return False
        previous_len = len(sample.text)
        for token_id in new_ids:
            piece = sample.decoder.step(self._backend, token_id)
            if piece:
                sample.text += piece
        if sample.finish_reason is not None:
            self._flush_incomplete_character(sample, stopped_by_token)
        return self._check_stop_strings(sample, previous_len)

    def _flush_incomplete_character(self, sample: SampleState, stopped_by_token: bool) -> None:
        """The stream holds back bytes of a character not yet complete; at the end
        they will never complete, so emit what a full decode shows for them (U+FFFD)."""
        token_ids = sample.token_ids[:-1] if stopped_by_token else sample.token_ids
        full = self.tokenizer.decode(token_ids, skip_special_tokens=sample.params.skip_special_tokens)
        if len(full) > len(sample.text) and full.startswith(sample.text):
            sample.text = full

    def _check_stop_strings(self, sample: SampleState, previous_len: int) -> bool:
        params = sample.params
        if not params.stop or len(sample.text) == previous_len:
            return False
        search_from = max(0, previous_len - params.max_stop_str_len + 1)
        best = None
        for stop in params.stop:
            position = sample.text.find(stop, search_from)
            if position != -1 and (best is None or position < best[0]):
                best = (position, stop)
        if best is None:
            return False
        position, stop = best
        sample.text = sample.text[:position + len(stop) if params.include_stop_str_in_output else position]
        sample.finish_reason, sample.stop_reason = "stop", stop
        return True

    def _position_logprobs(self, entry: TokenLogprobs) -> PositionLogprobs:
        # Without a tokenizer (skip_tokenizer_init) a logprob carries no token text.
        return {token_id: Logprob(value, rank, None if self.tokenizer is None else self.tokenizer.decode([token_id]))
                for token_id, value, rank in zip(entry.token_ids, entry.logprobs, entry.ranks)}

    def _add_prompt_logprobs(self, parent: ParentState, out: EngineCoreOutput) -> None:
        # A request recomputed after preemption sends positions again: keep the first copy.
        position = out.prompt_logprobs_start
        for entry in out.new_prompt_logprobs:
            if position == len(parent.prompt_logprobs):
                parent.prompt_logprobs.append(None if entry is None else self._position_logprobs(entry))
            position += 1

    def _make_output(self, parent: ParentState) -> RequestOutput:
        outputs = []
        for sample in parent.samples:
            if not parent.stream:
                outputs.append(CompletionOutput(sample.index, sample.text, list(sample.token_ids),
                                                sample.cumulative_logprob, sample.logprobs,
                                                sample.finish_reason, sample.stop_reason))
                continue
            delta = self._delta(sample)
            if delta is not None:
                outputs.append(delta)
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids, outputs, parent.finished,
                             parent.prompt_logprobs, parent.num_cached_tokens, parent.metrics,
                             sum(len(s.token_ids) for s in parent.samples))

    def _delta(self, sample: SampleState) -> CompletionOutput | None:
        """What this sample produced since its last delta (None if nothing)."""
        finished = sample.finish_reason is not None
        visible = len(sample.text)
        if not finished and sample.params.stop:
            visible = max(sample.num_sent_chars, visible - (sample.params.max_stop_str_len - 1))
        text = sample.text[sample.num_sent_chars:visible]
        token_ids = sample.token_ids[sample.num_sent_tokens:]
        logprobs = None
        if sample.logprobs is not None:
            logprobs = sample.logprobs[sample.num_sent_logprobs:]
        if not text and not token_ids and not (finished and not sample.finish_sent):
            return None
        sample.num_sent_chars = visible
        sample.num_sent_tokens = len(sample.token_ids)
        sample.num_sent_logprobs = len(sample.logprobs or [])
        sample.finish_sent = finished
        return CompletionOutput(sample.index, text, token_ids, sample.cumulative_logprob, logprobs,
                                sample.finish_reason, sample.stop_reason)
