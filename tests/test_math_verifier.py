"""`math` verifier: math-verify answer matching, the (1, 2) pitfall, and use off the main thread."""

from __future__ import annotations

import threading

import pytest

from qwen_align.errors import DataError
from qwen_align.verifiers import verify


def check(answer, response):
    return verify({"verifier": "math", "answer": answer}, response)


@pytest.mark.parametrize("answer, response", [
    ("1/2", "0.5"),
    ("0.5", "The answer is $\\frac{1}{2}$."),
    ("\\frac{1}{2}", "1/2"),
    ("0.5", "50%"),                                   # math-verify reads 50% as 50/100
    ("50", "50%"),                                    # ... and also accepts it for a reference of 50
    ("10", "10.0"),
    ("7", "First 3+4, so we get \\boxed{7}. Done."),  # boxed inside prose
    ("\\{1,2\\}", "\\boxed{\\{2,1\\}}"),              # sets compare unordered
    ("1,2", "\\boxed{2, 1}"),
    ("(1, 2)", "The interval is $(1,2)$"),            # the reference must not shrink to 2
    ("[0,1)", "\\boxed{[0,1)}"),
    ("x^2+1", "\\boxed{1+x^2}"),
    ("\\sqrt{2}/2", "\\boxed{\\frac{\\sqrt{2}}{2}}"),
    (3, "so the result is 3"),                        # a numeric answer field
    ("$\\frac{3}{4}$", "0.75"),                       # a reference already in $...$
])
def test_equivalent_answers_pass(answer, response):
    result = check(answer, response)
    assert result.passed and result.score == 1.0, result


@pytest.mark.parametrize("answer, response", [
    ("1/2", "0.25"),
    ("7", "\\boxed{8}"),
    ("3", "\\boxed{4}, or maybe 3"),                  # the boxed answer wins over a later number
    ("(1, 2)", "2"),                                  # the interval is not its right end
    ("[0,1)", "\\boxed{[0,1]}"),
    ("\\{1,2\\}", "\\boxed{\\{1,3\\}}"),
    ("\\pi", "3.14159"),
    ("5", "no number here"),
])
def test_wrong_answers_fail(answer, response):
    result = check(answer, response)
    assert not result.passed and result.score == 0.0, result


@pytest.mark.parametrize("response", ["", "   \n"])
def test_empty_response_fails(response):
    result = check("1", response)
    assert not result.passed and result.reason == "empty response"


@pytest.mark.parametrize("row", [{"verifier": "math"}, {"verifier": "math", "answer": None}, {"verifier": "math", "answer": " "}])
def test_missing_answer_is_a_data_error(row):
    with pytest.raises(DataError, match="answer"):
        verify(row, "\\boxed{1}")


def test_works_off_the_main_thread():
    results = []
    threads = [threading.Thread(target=lambda: results.append(check("(1, 2)", "\\boxed{(1,2)}"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 3 and all(r.passed for r in results)


def test_off_main_thread_timeout_fails_instead_of_hanging(monkeypatch):
    import time

    from qwen_align.verifiers import math as math_check

    monkeypatch.setattr(math_check, "TIMEOUT_S", 0.1)
    monkeypatch.setattr(math_check, "_compare", lambda *a: time.sleep(2))
    out = []
    t = threading.Thread(target=lambda: out.append(check("1", "1")))
    start = time.time()
    t.start()
    t.join(5)
    assert out and not out[0].passed and "timed out" in out[0].reason
    assert time.time() - start < 1.5
