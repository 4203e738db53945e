"""Content fingerprints of a stage's inputs, for its config hash: an input edited in place changes the hash,
the same input copied elsewhere does not.

- A data file: sha256 of its bytes, streamed. A folder: every file below it that is not hidden, in relative-path
  order, each by its relative path and sha256.
- A checkpoint folder (it holds `config.json`): the small files (config, index, tokenizer, generation config)
  by content, the weight files (`*.safetensors`, `*.bin`, ...) by relative path and size only. Cheap on a 72B
  checkpoint; a retrain that changes weights but none of their sizes goes unseen, which is why a checkpoint
  made by an earlier stage of the recipe enters the hash by that stage's hash instead.
- Anything else (a preset or hub name, a path that does not exist) counts as written.

File digests are cached per (path, size, mtime_ns) in `<run_dir>/fingerprints.json` (main process only), so a
rerun does not read big inputs again; measured: `benchmarks/fingerprint_cost.py`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from . import distributed
from .fsutil import atomic_write_json

CACHE_FILE = "fingerprints.json"
CHUNK = 1 << 20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _visible_files(folder: Path) -> list[Path]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    visible = [p for p in files if not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    return sorted(visible, key=lambda p: p.relative_to(folder).as_posix())


class Fingerprints:
    """Fingerprints of input paths, with file digests cached across runs in `cache_dir` (None: no cache)."""

    def __init__(self, cache_dir: str | Path | None = None):
        self.cache_path = Path(cache_dir) / CACHE_FILE if cache_dir is not None else None
        self.cache: dict[str, dict] = {}
        self.dirty = False
        if self.cache_path is not None and self.cache_path.is_file():
            try:
                self.cache = json.loads(self.cache_path.read_text(encoding="utf-8"))
            except ValueError:
                self.cache = {}  # a cache only: start it again

    def of(self, path: str) -> str:
        """The fingerprint of `path` (see the module's doc), or `path` itself when it is not a local path."""
        p = Path(path)
        if p.is_file():
            return "file:" + self._file_digest(p)
        if p.is_dir():
            if (p / "config.json").is_file():
                return "checkpoint:" + self._checkpoint_digest(p)
            return "folder:" + self._folder_digest(p)
        return path

    def _file_digest(self, p: Path) -> str:
        st = p.stat()
        key = str(p.resolve())
        hit = self.cache.get(key)
        if hit and hit["size"] == st.st_size and hit["mtime_ns"] == st.st_mtime_ns:
            return hit["sha256"]
        digest = sha256_file(p)
        self.cache[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        self.dirty = True
        return digest

    def _folder_digest(self, folder: Path) -> str:
        h = hashlib.sha256()
        for f in _visible_files(folder):
            h.update(f"{f.relative_to(folder).as_posix()}\0{self._file_digest(f)}\n".encode())
        return h.hexdigest()

    def _checkpoint_digest(self, folder: Path) -> str:
        h = hashlib.sha256()
        for f in _visible_files(folder):
            rel = f.relative_to(folder).as_posix()
            if f.name.endswith(WEIGHT_SUFFIXES):
                h.update(f"{rel}\0size={f.stat().st_size}\n".encode())
            else:
                h.update(f"{rel}\0{self._file_digest(f)}\n".encode())
        return h.hexdigest()

    def save(self) -> None:
        """Write the cache (main process; atomic) when something new was digested."""
        if self.cache_path is None or not self.dirty or not distributed.is_main():
            return
        if self.cache_path.parent.is_dir():
            atomic_write_json(self.cache_path, self.cache)
        self.dirty = False


def fingerprint(path: str) -> str:
    """One path's fingerprint, uncached."""
    return Fingerprints().of(path)


__all__ = ["Fingerprints", "fingerprint", "sha256_file", "CACHE_FILE"]
