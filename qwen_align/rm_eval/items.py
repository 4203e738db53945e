"""One evaluation item: a prompt (chat messages) and the responses to score, correct ones first."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import DataError


@dataclass
class Item:
    id: str
    subset: str
    prompt: list[dict[str, str]]  # the conversation before the scored assistant turn
    responses: list[str]  # correct (chosen / best) responses first
    num_correct: int = 1
    pairwise: bool = True  # True: one chosen vs one rejected (scores_chosen/scores_rejected rows)
    extra: dict[str, Any] = field(default_factory=dict)  # kept in the scores row (category_path, labels, ...)


def as_messages(prompt: Any, origin: str, field_name: str = "prompt") -> list[dict[str, str]]:
    """A prompt given as text (one user turn) or as a list of {role, content} messages."""
    if prompt is None:
        return []
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list):
        out = []
        for i, m in enumerate(prompt):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (
                "system", "user", "assistant", "tool"
            ):
                raise DataError(f"{origin}: {field_name}[{i}] must be an object with role and text content")
            out.append({"role": m["role"], "content": m["content"]})
        return out
    raise DataError(f"{origin}: '{field_name}' must be text or a list of messages, got {type(prompt).__name__}")


def as_text(value: Any, origin: str, field_name: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{origin}: '{field_name}' must be text, got {type(value).__name__}")
    return value


def need(row: dict[str, Any], keys: tuple[str, ...], origin: str, what: str) -> None:
    missing = [k for k in keys if k not in row or row[k] is None]
    if missing:
        raise DataError(
            f"{origin}: missing {', '.join(repr(k) for k in missing)} (a {what} row has {', '.join(keys)})"
        )
