"""Local datasets: read rows with their origin (file:line), validate conversations, mix sources by weight.

Formats: JSONL, JSON (a list of rows, or {"data": [...]}), Parquet, `datasets.save_to_disk` folders, and
plain folders of such files (read recursively in name order: sharded outputs, benchmark releases).
A name that is not a local path is tried as a hub dataset only when the hub is reachable (not offline).

Three row shapes: conversations (`messages`, for SFT), prompts (`messages` without a final assistant turn,
plus verifier fields, for sampling stages), and preference pairs (`prompt`, `chosen`, `rejected` in TRL's
format, for DPO and reward models).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError

ROLES = {"system", "user", "assistant", "tool"}
DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")


@dataclass
class Row:
    data: dict[str, Any]
    origin: str  # "file:line" or "file[row]"


@dataclass
class LoadReport:
    read: int = 0
    skipped_bad: int = 0
    bad_examples: list[str] = field(default_factory=list)  # first few "origin: reason"

    def add_bad(self, origin: str, reason: str) -> None:
        self.skipped_bad += 1
        if len(self.bad_examples) < 5:
            self.bad_examples.append(f"{origin}: {reason}")


def iter_rows(path: str | Path, split: str = "train") -> Iterator[Row]:
    """Yield rows with their origin. Malformed JSON lines raise DataError naming file and line."""
    p = Path(path)
    if p.is_dir():
        if _is_saved_dataset(p):
            yield from _iter_saved_dataset(p, split)
        else:
            yield from _iter_folder(p, split)
        return
    if not p.exists():
        if looks_like_hub_name(str(path)) and not _offline():
            yield from _iter_hub(str(path), split)
            return
        raise DataError(f"{path}: data file not found")
    suffix = "".join(p.suffixes[-2:]) if p.suffix == ".gz" else p.suffix
    if suffix in (".jsonl", ".jsonl.gz"):
        yield from _iter_jsonl(p)
    elif suffix == ".json":
        yield from _iter_json(p)
    elif suffix == ".parquet":
        yield from _iter_parquet(p)
    else:
        raise DataError(f"{path}: unsupported data format '{suffix}' (use .jsonl, .json, .parquet or a save_to_disk folder)")


def _iter_jsonl(p: Path) -> Iterator[Row]:
    import gzip

    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{p}:{lineno}: expected a JSON object per line, got {type(obj).__name__}")
            yield Row(obj, f"{p}:{lineno}")


def _iter_json(p: Path) -> Iterator[Row]:
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{p}:{e.lineno}: invalid JSON ({e.msg})") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise DataError(f"{p}: expected a JSON list of rows (or {{\"data\": [...]}})")
    for i, item in enumerate(obj):
        if not isinstance(item, dict):
            raise DataError(f"{p}[{i}]: expected an object, got {type(item).__name__}")
        yield Row(item, f"{p}[{i}]")


def _iter_parquet(p: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{p}: cannot read Parquet ({e})") from None
    for i, item in enumerate(table.to_pylist()):
        yield Row(item, f"{p}[{i}]")


def _is_saved_dataset(p: Path) -> bool:
    return any((p / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _iter_folder(p: Path, split: str) -> Iterator[Row]:
    """Every data file below `p` (hidden files and half-written temporaries skipped), in path order."""
    files = sorted(
        f for f in p.rglob("*")
        if f.is_file() and f.name.endswith(DATA_SUFFIXES)
        and not any(part.startswith(".") for part in f.relative_to(p).parts)
    )
    if not files:
        raise DataError(f"{p}: folder holds no data files ({', '.join(DATA_SUFFIXES)}) nor a save_to_disk dataset")
    for f in files:
        yield from iter_rows(f, split)


def _iter_saved_dataset(p: Path, split: str) -> Iterator[Row]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:
        raise DataError(f"{p}: not a datasets save_to_disk folder ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{p}: no split '{split}' (has {', '.join(ds)})")
        ds = ds[split]
    for i, item in enumerate(ds):
        yield Row(item, f"{p}[{i}]")


def looks_like_hub_name(name: str) -> bool:
    """'org/dataset' (no file suffix, not a relative or absolute path)."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~")) and not Path(parts[1]).suffix


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "")


def _iter_hub(name: str, split: str) -> Iterator[Row]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:
        raise DataError(f"{name}: not a local path, and loading it from the hub failed ({type(e).__name__})") from None
    for i, item in enumerate(ds):
        yield Row(item, f"{name}[{i}]")


# ---------------------------------------------------------------- conversations


def conversation_problem(row: dict[str, Any], need_assistant: bool = True) -> str | None:
    """Why `row` is not a valid conversational example, or None if it is."""
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return "missing 'messages' (a non-empty list of {role, content})"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"messages[{i}] is not an object"
        role = m.get("role")
        if role not in ROLES:
            return f"messages[{i}].role is {role!r}; expected one of {', '.join(sorted(ROLES))}"
        content = m.get("content")
        if not isinstance(content, str) and not (role == "assistant" and m.get("tool_calls")):
            return f"messages[{i}].content must be a string"
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        return "no assistant message to learn from"
    return None


def _messages_problem(messages: Any, name: str) -> str | None:
    if not isinstance(messages, list) or not messages:
        return f"'{name}' must be a non-empty list of {{role, content}}"
    problem = conversation_problem({"messages": messages}, need_assistant=False)
    return problem.replace("messages[", f"{name}[") if problem else None


def preference_problem(row: dict[str, Any]) -> str | None:
    """Why `row` is not a TRL preference pair, or None. Accepted: `prompt` (text or messages) with `chosen`
    and `rejected` (text, or messages ending with the assistant's answer), or implicit-prompt pairs (whole
    conversations that end with the answer)."""
    for key in ("chosen", "rejected"):
        if key not in row:
            return f"missing '{key}' (a preference row has prompt, chosen and rejected)"
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if isinstance(chosen, str) != isinstance(rejected, str):
        return "'chosen' and 'rejected' must both be text or both be message lists"
    if isinstance(chosen, str):
        if not isinstance(prompt, str):
            return "text pairs need 'prompt' as text too (or give chosen/rejected as message lists)"
        return None
    for key in ("chosen", "rejected"):
        problem = _messages_problem(row[key], key)
        if problem:
            return problem
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        what = "the answers" if prompt is not None else "whole conversations"
        return f"chosen and rejected must be {what} ending with an assistant turn"
    if prompt is not None:
        return _messages_problem(prompt, "prompt")
    return None


def prompt_problem(row: dict[str, Any]) -> str | None:
    """Why `row` is not a prompt for sampling (`messages` ending before the answer), or None."""
    problem = conversation_problem(row, need_assistant=False)
    if problem is None and row["messages"][-1]["role"] == "assistant":
        return "the prompt's last message is an assistant turn; end it with the user turn to answer"
    return problem


def load_conversations(
    path: str | Path, *, split: str = "train", on_bad_rows: str = "error", need_assistant: bool = True,
    report: LoadReport | None = None, problem_of=None,
) -> list[dict[str, Any]]:
    """Rows of `path` that pass `problem_of` (default: a conversation check); bad rows stop or are counted."""
    report = report if report is not None else LoadReport()
    problem_of = problem_of or (lambda r: conversation_problem(r, need_assistant))
    rows = []
    for row in iter_rows(path, split):
        report.read += 1
        problem = problem_of(row.data)
        if problem is None:
            rows.append(row.data)
        elif on_bad_rows == "skip":
            report.add_bad(row.origin, problem)
        else:
            raise DataError(f"{row.origin}: {problem} (set data.on_bad_rows: skip to drop such rows)")
    return rows


def mix_sources(per_source: list[tuple[list[dict], float]], seed: int) -> list[dict]:
    """Weighted mix: a weight w takes floor(w) full copies plus a seeded (w - floor(w)) share, then shuffles."""
    rng = random.Random(seed)
    mixed: list[dict] = []
    for rows, weight in per_source:
        whole = int(weight)
        mixed.extend(rows * whole)
        extra = round((weight - whole) * len(rows))
        if extra:
            mixed.extend(rng.sample(rows, extra))
    rng.shuffle(mixed)
    return mixed


def load_system_prompts(spec: str | list[str] | None) -> list[str]:
    if spec is None:
        return []
    if isinstance(spec, list):
        return [s for s in spec if s.strip()]
    p = Path(spec)
    if not p.is_file():
        raise DataError(f"{spec}: system prompt file not found")
    return [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def add_system_prompts(rows: list[dict], pool: list[str], probability: float, seed: int) -> int:
    """Give rows without a system message one from `pool` (seeded); returns how many got one."""
    if not pool or probability <= 0:
        return 0
    rng = random.Random(seed + 1)
    added = 0
    for i, row in enumerate(rows):
        messages = row["messages"]
        if messages[0]["role"] == "system" or rng.random() >= probability:
            continue
        rows[i] = {**row, "messages": [{"role": "system", "content": rng.choice(pool)}, *messages]}
        added += 1
    return added


ROW_KINDS = {"conversation": conversation_problem, "prompt": prompt_problem, "preference": preference_problem}


def with_verifier_check(problem_of: Callable[[dict[str, Any]], str | None]) -> Callable[[dict[str, Any]], str | None]:
    """`problem_of`, and for rows that name a `verifier`, whether that verifier can check them."""
    from .verifiers import row_problem

    def check(row: dict[str, Any]) -> str | None:
        return problem_of(row) or (row_problem(row) if row.get("verifier") is not None else None)

    return check


def load_training_rows(
    config, seed: int, need_assistant: bool = True, kind: str = "conversation", check_verifier: bool = False,
) -> tuple[list[dict], dict[str, Any]]:
    """Read, validate and mix a stage's `data` sources (a `recipe.DataConfig`); returns rows and a report.

    `kind` picks the row check: `conversation` (SFT), `prompt` (sampling stages) or `preference` (pairs).
    `check_verifier`: rows that name a verifier must also carry what it needs (stages that verify them).
    Every row is checked before this returns, so a bad one fails (file:line) before any compute.
    System prompts from the pool are added to conversations and prompts only.
    """
    report = LoadReport()
    problem_of = ROW_KINDS[kind]
    if kind == "conversation":
        problem_of = lambda r: conversation_problem(r, need_assistant)  # noqa: E731
    if check_verifier:
        problem_of = with_verifier_check(problem_of)
    per_source = []
    for src in config.sources:
        rows = load_conversations(
            src.path, split=src.split, on_bad_rows=config.on_bad_rows, report=report, problem_of=problem_of
        )
        if not rows:
            raise DataError(f"{src.path}: no usable rows")
        per_source.append((rows, src.weight))
    mixed = mix_sources(per_source, seed)
    if config.max_examples:
        mixed = mixed[: config.max_examples]
    with_system = 0
    if kind != "preference":
        with_system = add_system_prompts(
            mixed, load_system_prompts(config.system_prompts), config.system_prompt_probability, seed
        )
    summary = {
        "rows_read": report.read,
        "bad_rows_skipped": report.skipped_bad,
        "bad_row_examples": report.bad_examples,
        "examples": len(mixed),
        "system_prompts_added": with_system,
    }
    return mixed, summary
