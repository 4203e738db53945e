"""The one place the core reaches stage packages: stage kind -> importable module.

A stage module exposes `Config` (a `qwen_align.recipe.StageConfig` subclass) and
`run(stage: Config, context: StageContext) -> StageResult`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

STAGE_KINDS: dict[str, str] = {
    "sft": "sft",
    "rejection_sampling": "dpo.rejection_sampling",
    "dpo": "dpo",
    "reward_model": "reward_model",
    "grpo": "grpo",
}


def stage_module(kind: str) -> ModuleType:
    return importlib.import_module(STAGE_KINDS[kind])


def config_class(kind: str):
    return stage_module(kind).Config
