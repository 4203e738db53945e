"""Small data builders for tests."""

from __future__ import annotations

import json
from pathlib import Path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def arithmetic_rows(n: int, start: int = 10) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = start + i % 50, 11 + (i * 7) % 40
        rows.append({"messages": [{"role": "user", "content": f"What is {a}+{b}?"},
                                  {"role": "assistant", "content": str(a + b)}]})
    return rows
