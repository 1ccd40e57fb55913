"""Vocab-parallel token embedding and LM head.

The vocabulary is padded to a multiple of the tensor-parallel size; rank r
holds rows [r*n, (r+1)*n). Embedding: each rank looks up the ids it owns and
the partial results are summed. LM head: each rank computes its logits slice
and the slices are gathered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.distributed.parallel_state import get_tp_rank, get_tp_size, tp_all_gather, tp_all_reduce
from pagedllm.layers.linear import linear_method
from pagedllm.layers.quantization import place_rows


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.rows_per_rank = -(-vocab_size // self.tp_size)
        self.vocab_start = self.tp_rank * self.rows_per_rank
        self.vocab_end = min(self.vocab_start + self.rows_per_rank, vocab_size)
        # Empty, not zeros: a quantized checkpoint never fills it (an 8B vocabulary's float32
        # table is 2 GiB), and only the padding rows need a value
        weight = torch.empty(self.rows_per_rank, hidden_size)
        weight[max(0, self.vocab_end - self.vocab_start):].zero_()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.lookup = F.embedding  # (ids [T], weight) -> [T, hidden]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if loaded.shape[0] < self.vocab_size or loaded.shape[1] != param.shape[1]:
            raise ValueError(f"{type(self).__name__}: checkpoint tensor has shape {tuple(loaded.shape)}, "
                             f"expected ({self.vocab_size}, {param.shape[1]})")
        num_rows = self.vocab_end - self.vocab_start
        place_rows(self, param, 0, num_rows, loaded.narrow(0, self.vocab_start, num_rows), type(self).__name__)

    def use_quantized(self, kernels) -> None:
        self.lookup = kernels.embedding

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self.lookup(input_ids, self.weight)
        owned = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = torch.where(owned, input_ids - self.vocab_start, 0)
        embeds = self.lookup(local_ids, self.weight)
        return tp_all_reduce(embeds * owned.unsqueeze(-1).to(embeds.dtype))


class ParallelLMHead(VocabParallelEmbedding):
    """hidden [T, hidden] -> logits [T, vocab]; may share the embedding's weight."""

    def __init__(self, vocab_size: int, hidden_size: int, bias: bool = False) -> None:
        super().__init__(vocab_size, hidden_size)
        self.linear = linear_method()
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.rows_per_rank), requires_grad=False)
            self.bias.weight_loader = self._bias_loader

    def _bias_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        param.data[:self.vocab_end - self.vocab_start].copy_(loaded[self.vocab_start:self.vocab_end])

    def tie(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight
        # followed when the embedding's weight is quantized; in __dict__: not a submodule
        self.__dict__["tied_to"] = embedding

    def use_quantized(self, kernels) -> None:
        self.linear = kernels.float_activations.linear

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.linear(hidden_states, self.weight, self.bias)
        return tp_all_gather(logits)[..., :self.vocab_size]
