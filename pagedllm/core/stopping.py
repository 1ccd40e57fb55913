"""Stop conditions checked after every sampled token (stop strings live in the
output processor, which sees text)."""

from __future__ import annotations

from pagedllm.request import Request, RequestStatus


def check_stop(request: Request, max_model_len: int) -> RequestStatus | None:
    """The finished status the request reached with its last token, or None.
    Sets `request.stop_reason` to the matching stop token id."""
    params = request.sampling_params
    num_output = request.num_output_tokens
    if request.num_tokens >= max_model_len:
        return RequestStatus.FINISHED_LENGTH
    if request.grammar is not None and request.grammar.is_terminated():
        # The grammar is complete: only EOS could follow.
        return RequestStatus.FINISHED_STOPPED
    if num_output < params.min_tokens:
        return None
    last_token = request.output_token_ids[-1]
    if not params.ignore_eos and last_token in params.eos_token_ids:
        return RequestStatus.FINISHED_STOPPED
    if last_token in params.stop_token_ids:
        request.stop_reason = last_token
        return RequestStatus.FINISHED_STOPPED
    if params.max_tokens is not None and num_output >= params.max_tokens:
        return RequestStatus.FINISHED_LENGTH
    return None
