"""Checks of a response against a dataset row: `verify(example, response) -> VerifyResult`.

`example["verifier"]` picks the check: `exact` (the stripped response equals `example["answer"]`; numbers
compare by value), `regex` (`example["pattern"]` must match the whole stripped response), and the heavier
checks, each in its own module and imported on first use: `math` (`math.py`), `code` (`code.py`, run in the
sandbox of `sandbox.py`) and `ifeval` (`ifeval.py`).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import DataError


@dataclass(frozen=True)
class VerifyResult:
    passed: bool
    score: float
    reason: str


def _result(passed: bool, reason: str) -> VerifyResult:
    return VerifyResult(passed, 1.0 if passed else 0.0, reason)


_NUMBER = re.compile(r"^[-+]?\d+(\.\d+)?$")


def _normalise(text: str) -> str:
    return " ".join(text.strip().split())


def check_exact(example: dict[str, Any], response: str) -> VerifyResult:
    got, want = _normalise(response), _normalise(str(_field(example, "answer")))
    if _NUMBER.match(got) and _NUMBER.match(want):
        ok = float(got) == float(want)
    else:
        ok = got == want
    return _result(ok, "matches the answer" if ok else f"expected {want!r}, got {got[:40]!r}")


def check_regex(example: dict[str, Any], response: str) -> VerifyResult:
    pattern = _field(example, "pattern")
    try:
        ok = re.fullmatch(pattern, response.strip(), flags=re.DOTALL) is not None
    except re.error as e:
        raise DataError(f"verifier regex: bad pattern {pattern!r} ({e})") from None
    return _result(ok, "matches the pattern" if ok else "does not match the pattern")


Check = Callable[[dict[str, Any], str], VerifyResult]

CHECKS: dict[str, Check | str] = {
    "exact": check_exact,
    "regex": check_regex,
    # "module:function", imported on first use so light callers do not pay for sympy or the sandbox.
    "math": "qwen_align.verifiers.math:check_math",
    "code": "qwen_align.verifiers.code:check_code",
    "ifeval": "qwen_align.verifiers.ifeval:check_ifeval",
}


def get_check(name: Any) -> Check:
    if name not in CHECKS:
        raise DataError(f"unknown verifier {name!r}; available: {', '.join(CHECKS)}")
    check = CHECKS[name]
    if isinstance(check, str):
        module, func = check.split(":")
        check = CHECKS[name] = getattr(importlib.import_module(module), func)
    return check


# Fields each verifier cannot do without; a verifier module may add a deeper `row_problem(row)` of its own.
REQUIRED_FIELDS = {
    "exact": ("answer",),
    "regex": ("pattern",),
    "math": ("answer",),
    "code": ("tests",),
    "ifeval": ("instruction_id_list",),
}


def row_problem(row: dict[str, Any]) -> str | None:
    """Why `row` cannot be verified (no or an unknown verifier, a missing field, a module's own check), or None.

    Every stage that verifies rows calls this before any compute, so a bad row fails at load with its file:line.
    """
    name = row.get("verifier")
    if name is None:
        return f"missing 'verifier' (one of: {', '.join(CHECKS)})"
    if not isinstance(name, str) or name not in CHECKS:
        return f"unknown verifier {name!r} (available: {', '.join(CHECKS)})"
    missing = [f for f in REQUIRED_FIELDS.get(name, ()) if row.get(f) is None or str(row[f]).strip() == ""]
    if missing:
        return f"verifier {name!r} needs the field(s) {', '.join(repr(m) for m in missing)}"
    if name == "regex":
        try:
            re.compile(row["pattern"])
        except (re.error, TypeError) as e:
            return f"verifier 'regex': bad pattern {row['pattern']!r}: not a valid regex ({e})"
    check = CHECKS[name]
    module = check.split(":")[0] if isinstance(check, str) else check.__module__
    if module == __name__:  # exact, regex: checked above
        return None
    try:
        row_check = getattr(importlib.import_module(module), "row_problem", None)
    except ImportError as e:
        return f"verifier {name!r} is not available in this installation ({e})"
    return row_check(row) if row_check else None


def _field(example: dict[str, Any], name: str) -> Any:
    if name not in example or example[name] is None:
        raise DataError(f"verifier {example.get('verifier')!r} needs the field '{name}' in the row")
    return example[name]


def verify(example: dict[str, Any], response: str) -> VerifyResult:
    return get_check(example.get("verifier"))(example, response)


def verify_batch(
    examples: list[dict[str, Any]], responses: list[str], workers: int | None = None
) -> list[VerifyResult]:
    """`verify` over many rows: `code` checks run in parallel on the sandbox pool (at most `workers` at
    once; default: the pool's size), the other checks one by one. Results are in input order."""
    if len(examples) != len(responses):
        raise ValueError(f"verify_batch: {len(examples)} examples but {len(responses)} responses")
    results: list[VerifyResult | None] = [None] * len(examples)
    code_rows = [i for i, e in enumerate(examples) if e.get("verifier") == "code"]
    if code_rows:
        from .code import check_code_batch  # imported only when a code row is present

        checked = check_code_batch([examples[i] for i in code_rows], [responses[i] for i in code_rows], workers)
        for i, result in zip(code_rows, checked):
            results[i] = result
    for i, result in enumerate(results):
        if result is None:
            results[i] = verify(examples[i], responses[i])
    return results  # type: ignore[return-value]
