import argparse
import json

import pytest

from pagedllm.bench.cli import add_bench_subcommands, add_workload_args, workload_from_args


def parse(argv):
    parser = argparse.ArgumentParser(prog="pagedllm bench")
    add_bench_subcommands(parser.add_subparsers(dest="bench_command", required=True))
    return parser.parse_args(argv)


def workload_args(argv):
    parser = argparse.ArgumentParser()
    add_workload_args(parser)
    return parser.parse_args(argv)


def test_workload_from_file_with_limit(tmp_path):
    path = tmp_path / "w.json"
    reqs = [{"prompt_token_ids": [20 + i, 21], "output_len": i + 1} for i in range(5)]
    path.write_text(json.dumps({"meta": {}, "requests": reqs}))
    requests = workload_from_args(workload_args(["--workload", str(path), "--limit", "3"]))
    assert [r.output_len for r in requests] == [1, 2, 3]


def test_random_workload_flags():
    args = workload_args(["--random-input-len", "9", "--random-output-len", "4",
                          "--num-prompts", "6", "--limit", "5", "--random-vocab-size", "100"])
    requests = workload_from_args(args)
    assert len(requests) == 5
    assert all(r.prompt_len == 9 and r.output_len == 4 for r in requests)
    assert max(t for r in requests for t in r.prompt_token_ids) < 100


@pytest.mark.parametrize("argv, message", [
    ([], "give --workload"),
    (["--random-input-len", "9", "--num-prompts", "2"], "give --workload"),
    (["--workload", "w.json", "--num-prompts", "2"], "excludes --num-prompts"),
    (["--random-input-len", "9", "--random-output-len", "4", "--num-prompts", "6",
      "--limit", "0"], "--limit"),
])
def test_workload_flag_errors(argv, message):
    with pytest.raises(ValueError, match=message):
        workload_from_args(workload_args(argv))


def test_serve_command_end_to_end(fake_server, tmp_path, capsys):
    out_json, out_png = tmp_path / "serve.json", tmp_path / "serve.png"
    args = parse(["serve", "--base-url", fake_server.base_url, "--random-input-len", "5",
                  "--random-output-len", "3", "--num-prompts", "4", "--max-concurrency", "2",
                  "--label", "fake", "--json", str(out_json), "--png", str(out_png)])
    args.func(args)
    printed = capsys.readouterr().out
    assert "Successful requests:" in printed and "P99 TTFT (ms):" in printed
    result = json.loads(out_json.read_text())
    assert result["label"] == "fake" and result["completed"] == 4
    assert result["total_output_tokens"] == 12 and result["request_rate"] == "inf"
    assert result["workload"].startswith("random(in=5, out=3, n=4")
    assert out_png.read_bytes()[:4] == b"\x89PNG"


def test_serve_command_exits_when_every_request_fails(capsys):
    args = parse(["serve", "--base-url", "http://127.0.0.1:9", "--model", "m",
                  "--random-input-len", "2", "--random-output-len", "2", "--num-prompts", "1"])
    with pytest.raises(SystemExit, match="every request failed"):
        args.func(args)


def test_hf_baseline_command_and_plot(tiny_llama_dir, tmp_path, capsys):
    out_json = tmp_path / "hf.json"
    args = parse(["hf-baseline", "--model", str(tiny_llama_dir), "--random-input-len", "6",
                  "--random-output-len", "3", "--num-prompts", "3", "--random-vocab-size",
                  "128", "--batch-size", "2", "--device", "cpu", "--json", str(out_json)])
    args.func(args)
    assert "Output tok/s:" in capsys.readouterr().out
    result = json.loads(out_json.read_text())
    assert result["output_tokens"] == 9 and result["generated_tokens"] == 9
    assert result["label"] == "hf-static bs=2"

    other = tmp_path / "other.json"
    other.write_text(json.dumps({**result, "label": "other"}))
    png = tmp_path / "cmp.png"
    args = parse(["plot", str(out_json), str(other), "--png", str(png)])
    args.func(args)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_bad_workload_exits_cleanly(tmp_path):
    args = parse(["serve", "--workload", str(tmp_path / "missing.json")])
    with pytest.raises(SystemExit, match="error:"):
        args.func(args)
