"""The files of a Hugging Face model folder, by one rule for every model clipcli loads from one: the
image-text models of the ``hf:`` family (:mod:`clipcli.models.families.hf`) and the NLI models of
``classify-text`` (:mod:`clipcli.models.nli`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clipcli.errors import ModelError

# What transformers loads, in its order of preference: safetensors before pickles, one file before shards.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def read_json_object(path: Path, unreadable: Callable[[Exception], str], not_object: str) -> dict[str, Any]:
    """A JSON file that holds an object (a config), or a ModelError: ``unreadable(reason)`` when it cannot be
    read or parsed, ``not_object`` when it holds something else."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(unreadable(e)) from e
    if not isinstance(value, dict):
        raise ModelError(not_object)
    return value


def index_shards(index: Path) -> list[str]:
    """The shard file names a ``*.index.json`` names, each once, sorted."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelError(f"{index}: cannot read the weights' index ({e})") from None


def weight_files(folder: Path) -> list[Path]:
    """The weight files transformers loads from ``folder``: the one file, or the shards its index names
    (see :data:`WEIGHT_FILES`); none when the folder holds no weights."""
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            return [folder / shard for shard in index_shards(path)] if name.endswith(".index.json") else [path]
    return []
