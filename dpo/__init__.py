"""DPO stage (offline RL). Not built yet: its options validate and plan, running it fails clearly."""

from qwen_align.stage import StageContext, StageResult, not_built

from .config import Config


def run(stage: Config, context: StageContext) -> StageResult:
    return not_built(stage)


__all__ = ["Config", "run"]
