"""Reading Hugging Face checkpoint folders: safetensors (single or sharded with
an index) or pytorch_model*.bin, one tensor at a time."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open


def checkpoint_files(folder: str) -> list[str]:
    """The weight files of a model folder, safetensors preferred."""
    for index_name, pattern in (("model.safetensors.index.json", "*.safetensors"),
                                ("pytorch_model.bin.index.json", "pytorch_model*.bin")):
        index_path = os.path.join(folder, index_name)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(folder, shard) for shard in shards]
        files = sorted(glob.glob(os.path.join(folder, pattern)))
        if files:
            return files
    raise ValueError(f"no weights found in {folder}: looked for *.safetensors (with or without "
                     "model.safetensors.index.json) and pytorch_model*.bin")


def checkpoint_tensor_names(folder: str) -> set[str]:
    """The names of the checkpoint's tensors, from the safetensors headers (a .bin file
    is memory-mapped, not read)."""
    names: set[str] = set()
    for path in checkpoint_files(folder):
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                names.update(f.keys())
        else:
            names.update(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    return names


def iter_hf_weights(folder: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the checkpoint; safetensors are read
    lazily, so only one tensor is materialized at a time."""
    for path in checkpoint_files(folder):
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            yield from state.items()
            del state
