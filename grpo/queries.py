"""The GRPO query set: the stage's prompt rows, or by default the reward-model stage's prompts.

Every row is checked before any compute: its prompt, and for a row that names a verifier, the fields that
verifier needs (`qwen_align.verifiers.row_problem`), so a bad row stops the stage at load with its file:line.
Each query becomes a row `{"prompt": messages, "verifier_row": JSON of its verifier fields or "", "query_id": i}`;
the verifier fields travel as one JSON column because rows with different verifiers have different fields.
"""

from __future__ import annotations

import json
from typing import Any

from qwen_align.data import load_training_rows
from qwen_align.errors import UserError

from .rewards import VERIFIER_COLUMN

PAIR_KEYS = {"prompt", "chosen", "rejected", "messages"}


def reward_model_stage(stage, recipe):
    """The recipe's last reward_model stage before `stage`, or None."""
    found = stage.earlier_reward_models(recipe)
    return found[-1] if found else None


def _verifier_fields(row: dict[str, Any]) -> str:
    if not row.get("verifier"):
        return ""
    return json.dumps({k: v for k, v in row.items() if k not in PAIR_KEYS}, sort_keys=True, default=str)


def _pair_prompt(row: dict[str, Any]) -> list[dict[str, Any]]:
    prompt = row.get("prompt")
    if prompt is None:  # implicit-prompt pair: the conversation before the final answer
        return list(row["chosen"][:-1])
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def load_queries(stage, context) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    if stage.data is not None:
        rows, report = load_training_rows(stage.data, context.seed, kind="prompt", check_verifier=True)
        prompts = [(r["messages"], _verifier_fields(r)) for r in rows]
        report["query_source"] = "data"
    else:
        rm = reward_model_stage(stage, context.recipe)
        if rm is None or rm.data is None:
            raise UserError(f"stage '{stage.name}': no query set; give it `data` (prompt rows), or give the "
                            f"reward_model stage{' ' + repr(rm.name) if rm else ''} `data` to share its prompts")
        rows, report = load_training_rows(context.resolve_data(rm.data), context.seed, kind="preference",
                                          check_verifier=True)
        prompts = [(_pair_prompt(r), _verifier_fields(r)) for r in rows]
        report["query_source"] = f"stage {rm.name} (prompts of its preference pairs)"
    queries, seen = [], set()
    for messages, fields in prompts:
        key = json.dumps(messages, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        queries.append({"prompt": messages, VERIFIER_COLUMN: fields, "query_id": len(queries)})
    report["queries"] = len(queries)
    report["queries_with_verifier"] = sum(bool(q[VERIFIER_COLUMN]) for q in queries)
    return queries, report
