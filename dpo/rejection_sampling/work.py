"""Work in progress of a rejection-sampling run: one shard per chunk, a marker per finished chunk.

work/
  plan.json               fingerprint of the queries and sampling settings this work belongs to
  pairs/part-00003.jsonl  chunk 3's pairs      (each written atomically: tmp + fsync + rename)
  sft/part-00003.jsonl    chunk 3's SFT rows
  done/00003.json         chunk 3's statistics; written last, so its presence means "chunk 3 is finished"

A restart skips chunks with a marker and redoes the others (a torn shard write leaves only a hidden tmp
file, which `prepare` clears); each chunk's sampling seed depends only on (seed, chunk index), so the result
equals an uninterrupted run. Work whose fingerprint differs (other data, chunking or sampling) is discarded.

Under several processes the main rank alone prepares, publishes and removes the folder; every rank commits
only its own chunks, each to files no other rank writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from qwen_align.fsutil import atomic_dir, atomic_write_json, atomic_write_text

SHARDS = ("pairs", "sft")


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def shard_name(chunk: int) -> str:
    return f"part-{chunk:05d}.jsonl"


class Work:
    def __init__(self, folder: Path):
        self.folder = folder

    def prepare(self, fingerprint: str) -> None:
        """Make the folder belong to `fingerprint`: discard other work and torn writes (main rank only)."""
        plan = self.folder / "plan.json"
        if plan.is_file():
            try:
                same = json.loads(plan.read_text(encoding="utf-8")).get("fingerprint") == fingerprint
            except ValueError:
                same = False
            if not same:
                shutil.rmtree(self.folder)
        for sub in (*SHARDS, "done"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
            for torn in (self.folder / sub).glob(".*.tmp"):
                with contextlib.suppress(FileNotFoundError):
                    torn.unlink()
        if not plan.is_file():
            atomic_write_json(plan, {"fingerprint": fingerprint})

    def _marker(self, chunk: int) -> Path:
        return self.folder / "done" / f"{chunk:05d}.json"

    def is_done(self, chunk: int) -> bool:
        return self._marker(chunk).is_file()

    def chunk_stats(self, chunk: int) -> dict[str, Any]:
        return json.loads(self._marker(chunk).read_text(encoding="utf-8"))

    def commit(self, chunk: int, pairs: list[dict], sft: list[dict], stats: dict[str, Any]) -> None:
        atomic_write_text(self.folder / "pairs" / shard_name(chunk), _jsonl(pairs))
        atomic_write_text(self.folder / "sft" / shard_name(chunk), _jsonl(sft))
        atomic_write_json(self._marker(chunk), stats)

    def publish(self, final: Path, chunks: int, stats: dict[str, Any]) -> None:
        """Replace `final` in one rename with pairs/, sft/ (hard links to the shards) and stats.json."""
        with atomic_dir(final) as tmp:
            for sub in SHARDS:
                (tmp / sub).mkdir()
                for c in range(chunks):
                    src, dst = self.folder / sub / shard_name(c), tmp / sub / shard_name(c)
                    try:
                        os.link(src, dst)
                    except OSError:
                        shutil.copyfile(src, dst)
            atomic_write_json(tmp / "stats.json", stats)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
