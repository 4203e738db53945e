"""Generate the embedded demo's data: tasks whose answers can be checked, plus a small tokenizer.

    python -m qwen_align.demo --out recipes/demo_data

Two task families:
- two-digit sums and differences with a numeric answer (verifier `exact`);
- small Python functions with unit tests (verifier `code`, checked by the sandboxed code verifier).
Files: sft.jsonl (training conversations), heldout.jsonl (arithmetic prompts + answers),
heldout_code.jsonl (code prompts + tests), prompts.jsonl (fresh prompts for sampling stages),
system_prompts.txt, tokenizer/ (a 512-token byte-level BPE trained on this data).
Everything is seeded: the same command writes the same files.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
from pathlib import Path
from typing import Any, Iterator

from .fsutil import atomic_write_text

NAMES = ["Tom", "Ana", "Li", "Sam", "Mia", "Omar", "Eva", "Raj", "Zoe", "Ben"]
ITEMS = ["apple", "book", "coin", "pen", "card", "shell", "stamp", "marble"]

# Short task instructions. SFT rows carry none: the recipe's system-prompt pool (system_prompts.txt) gives each one
# of these, as the report's "robust system instruction" does; evaluation and sampling rows name one explicitly.
SYSTEM_PROMPTS = [
    "Answer with the number only.",
    "Reply with just the number.",
    "Give only the final number.",
]
CODE_SYSTEM_PROMPT = "You write short, correct Python."


MATH_MIX = {"plain_add": 6, "plain_sub": 4}  # relative shares of the problem kinds in the demo's data
TOKENIZER_MIX = {"plain_add": 6, "plain_sub": 3, "add": 0.5, "sub": 0.5}  # the tokenizer's fixed corpus


def _math_problem(rng: random.Random, mix: dict[str, float] = MATH_MIX) -> tuple[str, int, str]:
    """(question, answer, key) — key identifies the problem so held-out sets stay disjoint from training.

    Sums and differences of two-digit numbers, bare (`mix` also knows word problems of the same arithmetic,
    which the tokenizer's corpus keeps). A 1M-parameter model goes from nothing to about half right in two
    minutes of CPU, leaving room for the RL stages. Word problems are out of the demo: the model barely
    learned them (0-8% after every stage), and their rows, 1.3x the others' length, padded every batch.
    """
    kind = rng.choices(list(mix), weights=list(mix.values()))[0]
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if kind.endswith("sub"):
        a, b = max(a, b), min(a, b)
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    question = {
        "plain_add": f"What is {a}+{b}?",
        "plain_sub": f"What is {a}-{b}?",
        "add": f"{name} has {a} {item}s and gets {b} more. How many {item}s does {name} have now?",
        "sub": f"{name} has {a} {item}s and gives away {b}. How many {item}s are left?",
    }[kind]
    return question, a + b if kind.endswith("add") else a - b, f"{kind}:{a}:{b}"


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


FAMILIES = {"plain_add": "sums", "plain_sub": "differences", "add": "word problems", "sub": "word problems"}


def _family(key: str) -> str:
    """The held-out report's group of a math problem (its kind, from the key `kind:a:b`)."""
    return FAMILIES[key.split(":")[0]]


def _prompt(question: str, system: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def build_rows(seed: int = 0, n_math: int = 1000, n_code: int = 0, n_heldout: int = 1000,
               n_prompts: int = 2048, mix: dict[str, float] = MATH_MIX) -> dict[str, list[dict[str, Any]]]:
    rng = random.Random(seed)
    math_problem = functools.partial(_math_problem, mix=mix)
    taken_math: set[str] = set()
    taken_code: set[str] = set()
    # Held-out first, so training never sees those problems.
    heldout = [
        {"messages": _prompt(q, SYSTEM_PROMPTS[0]), "verifier": "exact", "answer": str(a), "family": _family(key)}
        for q, a, key in _unique(math_problem, rng, n_heldout, taken_math)
    ]
    heldout_code = [
        {"messages": _prompt(q, CODE_SYSTEM_PROMPT), "verifier": "code", "tests": t, "entry_point": f,
         "family": "code"}
        for q, _, t, f, _ in _unique(_code_problem, rng, 30, taken_code)
    ]
    prompts = [
        {"messages": _prompt(q, SYSTEM_PROMPTS[0]), "verifier": "exact", "answer": str(a), "family": _family(key)}
        for q, a, key in _unique(math_problem, rng, n_prompts, taken_math)
    ]
    sft = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": str(a)}]}
        for q, a, _ in _unique(math_problem, rng, n_math, taken_math)
    ]
    # Code problems are few (3 ops x 29 constants): training repeats them, held-out ones stay unseen.
    for _ in range(n_code):
        q, sol, _, _, key = _code_problem(rng)
        if key not in taken_code:
            sft.append({"messages": [*_prompt(q, CODE_SYSTEM_PROMPT), {"role": "assistant", "content": sol}]})
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

    # The tokenizer is trained on a fixed corpus (arithmetic and code conversations of a larger draw, role names
    # and system prompts, weighted as the model reads them), so resizing the data sets never changes token ids.
    corpus = build_rows(seed, n_math=6000, n_code=400, n_heldout=200, n_prompts=1024, mix=TOKENIZER_MIX)["sft"]
    texts = [m["content"] for r in corpus for m in r["messages"]]
    texts += ["system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\nuser\nassistant\n"] * 500
    texts += (SYSTEM_PROMPTS + [CODE_SYSTEM_PROMPT]) * 1000
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
