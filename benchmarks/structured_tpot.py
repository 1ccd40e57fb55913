"""Time per output token of one request alone (batch 1), with and without a JSON-schema
constraint: what structured outputs add to a decode step.

One process, one engine: a warm-up pair, then --repeats pairs of runs, the order
alternating (free, constrained, constrained, free, ...) so that drift in the machine's
speed hits both alike. Each run times every llm_engine.step() of one greedy request of
--output-len tokens; the first step (prefill and first token) is left out, so the
TPOT of a run is the median of its decode steps. The speed of a shared machine drifts
by 10-30 % within minutes, so besides the ratio of the medians the script reports the
median of each repeat's constrained / free ratio (its two runs are next to each other). The constraint is
`pagedllm bench throughput`'s default schema, which cannot complete in fewer than
~256 tokens: constrained runs decode as many tokens as free ones.

    python benchmarks/structured_tpot.py [MODEL] [--output-len 128 --repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from pagedllm import LLM, SamplingParams
from pagedllm.bench.throughput import DEFAULT_STRUCTURED_SCHEMA
from pagedllm.sampling_params import StructuredOutputsParams

PROMPT = ("Describe the paper 'Efficient Memory Management for Large Language Model Serving with "
          "PagedAttention' as a JSON object with its title, language and keywords.")


def time_decode_steps(llm: LLM, params: SamplingParams, request_id: str) -> tuple[list[float], int]:
    """(seconds of each step after the first, tokens generated) of one request run alone."""
    engine = llm.llm_engine
    engine.add_request(request_id, PROMPT, params)
    durations, num_tokens = [], 0
    while engine.has_unfinished_requests():
        started = time.perf_counter()
        outputs = engine.step()
        durations.append(time.perf_counter() - started)
        for output in outputs:
            num_tokens = output.num_generated_tokens
    return durations[1:], num_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None, help="default: the embedded model")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="measured runs of each kind")
    parser.add_argument("--json", metavar="OUT", help="write every run's figures as JSON")
    args = parser.parse_args()

    llm = LLM(args.model, dtype=args.dtype)
    kinds = {
        "free": SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True),
        "constrained": SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True,
                                      structured_outputs=StructuredOutputsParams(json=DEFAULT_STRUCTURED_SCHEMA)),
    }
    # Warm-up: first-step costs (kernels, the grammar's tokenizer and compilation) are not TPOT.
    for kind, params in kinds.items():
        time_decode_steps(llm, params, f"warmup-{kind}")
    runs, pair_ratios = [], []
    for repeat in range(args.repeats):
        order = ["free", "constrained"] if repeat % 2 == 0 else ["constrained", "free"]
        tpot = {}
        for kind in order:
            durations, num_tokens = time_decode_steps(llm, kinds[kind], f"{kind}-{repeat}")
            tpot[kind] = 1000 * statistics.median(durations)
            runs.append({"kind": kind, "repeat": repeat, "output_tokens": num_tokens, "median_tpot_ms": tpot[kind],
                         "mean_tpot_ms": 1000 * statistics.fmean(durations)})
            print(f"{kind:>11} #{repeat}: {num_tokens} tokens, median TPOT {tpot[kind]:.2f} ms, "
                  f"mean {runs[-1]['mean_tpot_ms']:.2f} ms", flush=True)
        pair_ratios.append(tpot["constrained"] / tpot["free"])
    medians = {kind: statistics.median(r["median_tpot_ms"] for r in runs if r["kind"] == kind) for kind in kinds}
    ratio = medians["constrained"] / medians["free"]
    print(f"median TPOT: free {medians['free']:.2f} ms, constrained {medians['constrained']:.2f} ms, "
          f"ratio {ratio:.3f}; constrained / free per repeat: {', '.join(f'{r:.3f}' for r in pair_ratios)} "
          f"(median {statistics.median(pair_ratios):.3f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": runs, "median_tpot_ms": medians, "ratio": ratio, "pair_ratios": pair_ratios}, f,
                      indent=2)


if __name__ == "__main__":
    main()
