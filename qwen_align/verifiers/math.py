"""`math` verifier: the response's final answer matches `example["answer"]` by value (math-verify).

math-verify extracts the answer from the response (a `\\boxed{}` first, else the last LaTeX or plain
expression) and compares it with the reference symbolically: 1/2 = 0.5 = \\frac{1}{2}, {1,2} = {2,1},
intervals, expressions up to simplification; a percentage `50%` is taken as 50/100 (and also matches a
reference of 50, as math-verify does).

Two pitfalls of math-verify handled here:
- It reads a bare reference `(1, 2)` as `2`; wrapped as `$(1, 2)$` it is the interval. The reference is
  therefore always parsed wrapped in `$...$`, falling back to the raw text when that yields nothing.
- Its timeouts use `signal.alarm`, which works only on the main thread. On other threads (thread-pool
  verification) its timeouts are switched off and the check instead runs in a daemon helper thread that
  the caller waits for at most `TIMEOUT_S`; a comparison that takes longer fails as "timed out" (the
  helper thread is abandoned, never joined), so a verifier call never hangs.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from ..errors import DataError
from . import VerifyResult

log = logging.getLogger(__name__)

TIMEOUT_S = 5  # per parse / comparison on the main thread; whole check off it
MAX_RESPONSE_CHARS = 20_000  # the answer is at the end: longer responses are checked on their tail


def _reference(example: dict[str, Any]) -> str:
    answer = example.get("answer")
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise DataError("verifier 'math' needs the field 'answer' in the row")
    return str(answer).strip()


def _parse_gold(answer: str, timeout: int | None):
    from math_verify import parse

    if "$" in answer or "\\boxed" in answer:
        wrapped = answer
    else:
        wrapped = f"${answer}$"
    gold = parse(wrapped, parsing_timeout=timeout)
    if not gold and wrapped != answer:
        gold = parse(answer, parsing_timeout=timeout)
    return gold


def _compare(answer: str, response: str, timeout: int | None) -> VerifyResult:
    from math_verify import parse, verify

    gold = _parse_gold(answer, timeout)
    if not gold:
        raise DataError(f"verifier 'math': the reference answer {answer!r} parses to no mathematical value")
    pred = parse(response[-MAX_RESPONSE_CHARS:], parsing_timeout=timeout)
    if not pred:
        return VerifyResult(False, 0.0, "no answer found in the response")
    ok = bool(verify(gold, pred, timeout_seconds=timeout))
    got = pred[-1] if isinstance(pred[-1], str) else str(pred[0])
    if ok:
        return VerifyResult(True, 1.0, f"matches the answer {answer!r}")
    return VerifyResult(False, 0.0, f"expected {answer!r}, got {got[:40]!r}")


def check_math(example: dict[str, Any], response: str) -> VerifyResult:
    answer = _reference(example)
    if not response or not response.strip():
        return VerifyResult(False, 0.0, "empty response")
    if threading.current_thread() is threading.main_thread():
        try:
            return _compare(answer, response, TIMEOUT_S)
        except DataError:
            raise
        except Exception as e:  # math-verify's TimeoutException and sympy errors
            return VerifyResult(False, 0.0, f"math-verify failed ({type(e).__name__})")
    return _off_main_thread(answer, response)


def _off_main_thread(answer: str, response: str) -> VerifyResult:
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["result"] = _compare(answer, response, None)
        except BaseException as e:  # noqa: BLE001 - handed back to the caller below
            box["error"] = e

    helper = threading.Thread(target=work, name="math-verify", daemon=True)
    helper.start()
    helper.join(TIMEOUT_S * 2)
    if helper.is_alive():
        log.warning("math-verify took over %ss on %r; counted as failed", TIMEOUT_S * 2, response[-80:])
        return VerifyResult(False, 0.0, "math-verify timed out")
    if "error" in box:
        if isinstance(box["error"], DataError):
            raise box["error"]
        return VerifyResult(False, 0.0, f"math-verify failed ({type(box['error']).__name__})")
    return box["result"]
