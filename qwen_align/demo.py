"""Generate the embedded demo's data: tasks whose answers can be checked, plus a small tokenizer.

    python -m qwen_align.demo --out recipes/demo_data

Two task families:
- arithmetic word problems with a numeric answer (verifier `exact`);
- small Python functions with unit tests (verifier `code`, checked by the sandboxed code verifier).
Files: sft.jsonl (training conversations), heldout.jsonl (arithmetic prompts + answers),
heldout_code.jsonl (code prompts + tests), prompts.jsonl (fresh prompts for sampling stages),
system_prompts.txt, tokenizer/ (a 512-token byte-level BPE trained on this data).
Everything is seeded: the same command writes the same files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any, Iterator

from .fsutil import atomic_write_text

NAMES = ["Tom", "Ana", "Li", "Sam", "Mia", "Omar", "Eva", "Raj", "Zoe", "Ben"]
ITEMS = ["apple", "book", "coin", "pen", "card", "shell", "stamp", "marble"]

SYSTEM_PROMPTS = [
    "You are a careful math tutor. Answer with the number only.",
    "You are a helpful assistant.",
    "Answer concisely.",
    "You write short, correct Python.",
]


def _math_problem(rng: random.Random) -> tuple[str, int, str]:
    """(question, answer, key) — key identifies the problem so held-out sets stay disjoint from training."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.choice(["add", "sub", "mul", "plain_add", "plain_mul"])
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if kind == "add":
        q = f"{name} has {a} {item}s and gets {b} more. How many {item}s does {name} have now?"
        ans = a + b
    elif kind == "sub":
        a, b = max(a, b), min(a, b)
        q = f"{name} has {a} {item}s and gives away {b}. How many {item}s are left?"
        ans = a - b
    elif kind == "mul":
        b = rng.randint(2, 9)
        q = f"There are {a} boxes with {b} {item}s in each box. How many {item}s are there in total?"
        ans = a * b
    elif kind == "plain_add":
        q = f"What is {a}+{b}?"
        ans = a + b
    else:
        b = rng.randint(2, 9)
        q = f"What is {a}*{b}?"
        ans = a * b
    return q, ans, f"{kind}:{a}:{b}"


OPS = {
    "add": ("plus", "+", lambda x, k: x + k),
    "sub": ("minus", "-", lambda x, k: x - k),
    "mul": ("times", "*", lambda x, k: x * k),
}


def _code_problem(rng: random.Random) -> tuple[str, str, str, str, str]:
    """(question, solution, tests, entry_point, key)."""
    op = rng.choice(list(OPS))
    k = rng.randint(2, 30)
    word, sym, apply = OPS[op]
    fname = f"{op}_{k}"
    q = f"Write a Python function {fname}(x) that returns x {word} {k}."
    solution = f"```python\ndef {fname}(x):\n    return x {sym} {k}\n```"
    xs = [rng.randint(-20, 50) for _ in range(3)]
    tests = "\n".join(f"assert {fname}({x}) == {apply(x, k)}" for x in xs)
    return q, solution, tests, fname, f"{op}:{k}"


def _unique(gen, rng: random.Random, n: int, taken: set[str]) -> Iterator[tuple]:
    made = 0
    while made < n:
        item = gen(rng)
        if item[-1] in taken:
            continue
        taken.add(item[-1])
        made += 1
        yield item


def build_rows(seed: int = 0, n_math: int = 4000, n_code: int = 600) -> dict[str, list[dict[str, Any]]]:
    rng = random.Random(seed)
    taken_math: set[str] = set()
    taken_code: set[str] = set()
    # Held-out first, so training never sees those problems.
    heldout = [
        {"messages": [{"role": "user", "content": q}], "verifier": "exact", "answer": str(a), "family": "arithmetic"}
        for q, a, _ in _unique(_math_problem, rng, 200, taken_math)
    ]
    heldout_code = [
        {"messages": [{"role": "user", "content": q}], "verifier": "code", "tests": t, "entry_point": f,
         "family": "code"}
        for q, _, t, f, _ in _unique(_code_problem, rng, 30, taken_code)
    ]
    prompts = [
        {"messages": [{"role": "user", "content": q}], "verifier": "exact", "answer": str(a), "family": "arithmetic"}
        for q, a, _ in _unique(_math_problem, rng, 1024, taken_math)
    ]
    sft = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": str(a)}]}
        for q, a, _ in _unique(_math_problem, rng, n_math, taken_math)
    ]
    # Code problems are few (3 ops x 29 constants): training repeats them, held-out ones stay unseen.
    for _ in range(n_code):
        q, sol, _, _, key = _code_problem(rng)
        if key not in taken_code:
            sft.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": sol}]})
    rng.shuffle(sft)
    return {"sft": sft, "heldout": heldout, "heldout_code": heldout_code, "prompts": prompts}


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_demo_data(out: Path, seed: int = 0) -> None:
    from .tokenizer import save_tokenizer, train_demo_tokenizer

    rows = build_rows(seed)
    for name, items in rows.items():
        atomic_write_text(out / f"{name}.jsonl", _jsonl(items))
    atomic_write_text(out / "system_prompts.txt", "\n".join(SYSTEM_PROMPTS) + "\n")

    # Train the tokenizer on what the model will read, weighted as it reads it: every example also carries
    # role names and a system prompt (mostly the template's default one).
    texts = [m["content"] for r in rows["sft"] for m in r["messages"]]
    texts += ["system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\nuser\nassistant\n"] * 2000
    texts += SYSTEM_PROMPTS * 200
    tokenizer = train_demo_tokenizer(texts, vocab_size=512)
    save_tokenizer(tokenizer, out / "tokenizer")
    print(f"wrote {out}: " + ", ".join(f"{k} {len(v)}" for k, v in rows.items()) + f", tokenizer {len(tokenizer)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("recipes/demo_data"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    write_demo_data(args.out, args.seed)


if __name__ == "__main__":
    main()
