"""Checks of a response against a dataset row: `verify(example, response) -> VerifyResult`.

`example["verifier"]` picks the check. Built so far: `exact` (the stripped response equals
`example["answer"]`; numbers compare by value) and `regex` (`example["pattern"]` must match the whole
stripped response). More checks (math, code, ifeval) register in `CHECKS`.
"""

from __future__ import annotations

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


CHECKS: dict[str, Callable[[dict[str, Any], str], VerifyResult]] = {
    "exact": check_exact,
    "regex": check_regex,
}


def _field(example: dict[str, Any], name: str) -> Any:
    if name not in example or example[name] is None:
        raise DataError(f"verifier {example.get('verifier')!r} needs the field '{name}' in the row")
    return example[name]


def verify(example: dict[str, Any], response: str) -> VerifyResult:
    name = example.get("verifier")
    if name not in CHECKS:
        raise DataError(f"unknown verifier {name!r}; available: {', '.join(CHECKS)}")
    return CHECKS[name](example, response)
