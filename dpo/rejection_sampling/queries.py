"""Queries for rejection sampling: prompt rows with verifier fields, checked before any sampling starts."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from qwen_align.data import iter_rows, load_training_rows, prompt_problem
from qwen_align.errors import DataError
from qwen_align.verifiers import row_problem as verifier_problem

# Fields a verifier reads from its row. They travel with every output row, so a later stage can re-verify.
VERIFIER_FIELDS = ("answer", "tests", "entry_point", "pattern", "instruction_id_list", "kwargs")


def _problem(row: dict[str, Any]) -> str | None:
    return prompt_problem(row) or verifier_problem(row)


def load_queries(data, seed: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The stage's prompt rows, mixed and seeded like any stage's data; bad rows stop (file:line) or are skipped."""
    if data.on_bad_rows == "error":
        for src in data.sources:  # a first pass that knows each row's file and line
            for row in iter_rows(src.path, src.split):
                problem = _problem(row.data)
                if problem:
                    raise DataError(f"{row.origin}: {problem} (set data.on_bad_rows: skip to drop such rows)")
    rows, report = load_training_rows(data, seed, kind="prompt")
    kept = [r for r in rows if verifier_problem(r) is None]
    report["bad_rows_skipped"] += len(rows) - len(kept)
    report["examples"] = len(kept)
    if not kept:
        raise DataError("rejection_sampling: no usable prompt rows (each needs messages and verifier fields)")
    return kept, report


def query_id(row: dict[str, Any]) -> str:
    """The row's `id` when it has one, else a hash of the whole row (stable across runs)."""
    if row.get("id") is not None:
        return str(row["id"])
    blob = json.dumps(row, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def provenance(row: dict[str, Any]) -> dict[str, Any]:
    """The row's verifier and its fields, copied under their own names."""
    out = {"verifier": row["verifier"]}
    out.update({f: row[f] for f in VERIFIER_FIELDS if f in row})
    return out
