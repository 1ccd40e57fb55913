"""Each tensor-parallel layer, sharded over 2 gloo processes, equals the same layer
unsharded: column, merged column, QKV (KV heads split, replicated, and split
unevenly), row, vocab-parallel embedding and LM head (vocab not divisible by 2)."""

from __future__ import annotations

import multiprocessing
import traceback

import pytest
import torch
import torch.distributed as dist

from pagedllm.distributed.parallel_state import get_tp_rank, get_tp_size, set_tensor_parallel_group, tp_all_gather
from pagedllm.distributed.rendezvous import tcp_init_method
from pagedllm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from pagedllm.layers.linear import (ColumnParallelLinear, HeadShard, MergedColumnParallelLinear, QKVParallelLinear,
                                    RowParallelLinear, shard_attention_heads)

WORLD_SIZE = 2
HIDDEN, HEAD_DIM, VOCAB = 16, 4, 321
NUM_TOKENS = 5


def _build(factory, rank: int, tp_size: int, weights: dict[str, tuple[torch.Tensor, object]]):
    """The layer as rank `rank` of `tp_size` builds it, loaded from the full weights."""
    set_tensor_parallel_group(rank, tp_size)
    layer = factory()
    params = dict(layer.named_parameters())
    for name, (tensor, shard_id) in weights.items():
        param = params[name.split("#")[0]]
        param.weight_loader(param, tensor, *(() if shard_id is None else (shard_id,)))
    return layer


def _reference_and_sharded(factory, rank, weights, forward):
    """forward(unsharded layer), and the sharded layer. The unsharded layer runs before
    the group is switched to 2 ranks: its forward must not all-reduce."""
    reference = forward(_build(factory, 0, 1, weights))
    return reference, _build(factory, rank, WORLD_SIZE, weights)


def _column(rank, x):
    weights = {"weight": (torch.randn(12, HIDDEN), None), "bias": (torch.randn(12), None)}
    reference, sharded = _reference_and_sharded(lambda: ColumnParallelLinear(HIDDEN, 12, bias=True), rank, weights,
                                                lambda layer: layer(x))
    torch.testing.assert_close(tp_all_gather(sharded(x)), reference)


def _merged(rank, x):
    sizes = [8, 12]
    weights = {"weight#0": (torch.randn(8, HIDDEN), 0), "weight#1": (torch.randn(12, HIDDEN), 1)}
    reference, sharded = _reference_and_sharded(lambda: MergedColumnParallelLinear(HIDDEN, sizes), rank, weights,
                                                lambda layer: layer(x))
    gate, up = reference.split(sizes, dim=-1)
    expected = torch.cat([gate.chunk(WORLD_SIZE, -1)[rank], up.chunk(WORLD_SIZE, -1)[rank]], dim=-1)
    torch.testing.assert_close(sharded(x), expected)


def _qkv(num_heads, num_kv_heads):
    def check(rank, x):
        q_rows, kv_rows = num_heads * HEAD_DIM, num_kv_heads * HEAD_DIM
        weights = {"weight#q": (torch.randn(q_rows, HIDDEN), "q"), "weight#k": (torch.randn(kv_rows, HIDDEN), "k"),
                   "weight#v": (torch.randn(kv_rows, HIDDEN), "v"), "bias#q": (torch.randn(q_rows), "q"),
                   "bias#k": (torch.randn(kv_rows), "k"), "bias#v": (torch.randn(kv_rows), "v")}
        reference, sharded = _reference_and_sharded(
            lambda: QKVParallelLinear(HIDDEN, HEAD_DIM, num_heads, num_kv_heads, bias=True), rank, weights,
            lambda layer: layer(x))
        q, k, v = reference.split([q_rows, kv_rows, kv_rows], dim=-1)
        heads = sharded.heads

        def rows(t, start, count):
            return t[:, start * HEAD_DIM:(start + count) * HEAD_DIM]

        expected = torch.cat([rows(q, heads.q_start, heads.num_heads), rows(k, heads.kv_start, heads.num_kv_heads),
                              rows(v, heads.kv_start, heads.num_kv_heads)], dim=-1)
        torch.testing.assert_close(sharded(x), expected)
    return check


def _row(input_shards):
    def check(rank, x):
        weights = {"weight": (torch.randn(8, HIDDEN), None), "bias": (torch.randn(8), None)}
        def factory():  # the explicit shards apply to the 2-rank layer only
            shard = input_shards[get_tp_rank()] if input_shards and get_tp_size() > 1 else None
            return RowParallelLinear(HIDDEN, 8, bias=True, input_shard=shard)

        reference, sharded = _reference_and_sharded(factory, rank, weights, lambda layer: layer(x))
        start, size = sharded.in_start, sharded.in_per_rank
        torch.testing.assert_close(sharded(x[:, start:start + size].contiguous()), reference)
    return check


def _embedding(rank, _):
    weights = {"weight": (torch.randn(VOCAB, HIDDEN), None)}
    ids = torch.tensor([0, 1, 160, 161, 200, 319, 320])  # both sides of the split, and the last id
    reference, sharded = _reference_and_sharded(lambda: VocabParallelEmbedding(VOCAB, HIDDEN), rank, weights,
                                                lambda layer: layer(ids))
    torch.testing.assert_close(sharded(ids), reference)


def _lm_head(rank, x):
    weights = {"weight": (torch.randn(VOCAB, HIDDEN), None), "bias": (torch.randn(VOCAB), None)}
    reference, sharded = _reference_and_sharded(lambda: ParallelLMHead(VOCAB, HIDDEN, bias=True), rank, weights,
                                                lambda layer: layer.compute_logits(x))
    logits = sharded.compute_logits(x)
    assert logits.shape == (NUM_TOKENS, VOCAB)
    torch.testing.assert_close(logits, reference)


CHECKS = {
    "column": _column,
    "merged_column": _merged,
    "qkv_kv_heads_split": _qkv(4, 2),
    "qkv_kv_heads_replicated": _qkv(4, 1),
    "qkv_kv_heads_uneven": _qkv(6, 3),
    "row": _row(None),
    "row_uneven": _row([(0, 12), (12, 4)]),
    "vocab_parallel_embedding": _embedding,
    "lm_head": _lm_head,
}


def _rank_main(rank: int, init_method: str, conn) -> None:
    results = {}
    try:
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD_SIZE)
        for name, check in CHECKS.items():
            torch.manual_seed(0)  # both ranks draw the same full weights and inputs
            x = torch.randn(NUM_TOKENS, HIDDEN)
            try:
                check(rank, x)
                results[name] = None
            except Exception:  # noqa: BLE001 - reported per layer to the test
                results[name] = traceback.format_exc()
        dist.destroy_process_group()
    finally:
        conn.send(results)


@pytest.fixture(scope="module")
def rank_results() -> list[dict[str, str | None]]:
    context = multiprocessing.get_context("spawn")
    init_method = tcp_init_method("127.0.0.1")
    pipes, processes = [], []
    for rank in range(WORLD_SIZE):
        conn, child_conn = context.Pipe()
        process = context.Process(target=_rank_main, args=(rank, init_method, child_conn), daemon=True)
        process.start()
        pipes.append(conn)
        processes.append(process)
    try:
        results = []
        for rank, conn in enumerate(pipes):
            assert conn.poll(180), f"rank {rank} did not report"
            results.append(conn.recv())
        return results
    finally:
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.kill()


@pytest.mark.parametrize("layer", list(CHECKS))
def test_sharded_layer_equals_unsharded(rank_results, layer):
    for rank, results in enumerate(rank_results):
        assert results.get(layer, "not run") is None, f"rank {rank}:\n{results.get(layer)}"


@pytest.mark.parametrize("num_heads, num_kv_heads, tp_size, expected", [
    (8, 4, 2, [HeadShard(0, 4, 0, 2), HeadShard(4, 4, 2, 2)]),  # even split
    (8, 1, 2, [HeadShard(0, 4, 0, 1), HeadShard(4, 4, 0, 1)]),  # one KV head, replicated
    (8, 2, 4, [HeadShard(0, 2, 0, 1), HeadShard(2, 2, 0, 1), HeadShard(4, 2, 1, 1), HeadShard(6, 2, 1, 1)]),
    (9, 3, 2, [HeadShard(0, 3, 0, 1), HeadShard(3, 6, 1, 2)]),  # the embedded SmolLM2: whole KV groups
])
def test_attention_heads_are_sharded_by_kv_group(num_heads, num_kv_heads, tp_size, expected):
    assert [shard_attention_heads(num_heads, num_kv_heads, tp_size, rank) for rank in range(tp_size)] == expected


def test_unshardable_heads_are_refused():
    with pytest.raises(ValueError, match="divisible"):
        shard_attention_heads(6, 2, 4, 0)  # 2 replicas of each KV head cannot split its 3 query heads
