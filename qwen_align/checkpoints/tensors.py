"""One tensor (or a block of its rows) of a safetensors checkpoint by name, without loading the model.

Works for a single `model.safetensors` and for sharded checkpoints (`model.safetensors.index.json` maps each
name to its file). Reads go through `safe_open(...).get_slice`, so asking for rows [a, b) reads those rows only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qwen_align.errors import UserError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def has_safetensors(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / INDEX_FILE).is_file() or (folder / SINGLE_FILE).is_file()


class CheckpointTensors:
    """`names()`, `shape(name)`, `rows(name, start, stop)` of the safetensors checkpoint in `folder`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._handles: dict[str, object] = {}
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError) as e:
                raise UserError(f"{index}: not a safetensors index with a `weight_map` ({e})") from None
        elif (self.folder / SINGLE_FILE).is_file():
            weight_map = {name: SINGLE_FILE for name in self._open(SINGLE_FILE).keys()}
        else:
            raise UserError(f"{self.folder}: no {SINGLE_FILE} or {INDEX_FILE}")
        self._file_of = dict(weight_map)

    def _open(self, file: str):
        from safetensors import safe_open

        if file not in self._handles:
            self._handles[file] = safe_open(str(self.folder / file), framework="pt")
        return self._handles[file]

    def names(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self._file_of[name]).get_slice(name).get_shape())

    def rows(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) along dim 0 (the whole tensor by default; a 0-dim tensor whole)."""
        part = self._open(self._file_of[name]).get_slice(name)
        if not part.get_shape():
            return part[...]
        return part[start:stop]

    def close(self) -> None:
        self._handles.clear()
