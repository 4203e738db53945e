"""Rejection-sampling stage: the policy answers verifiable queries N times; verified answers become DPO pairs.

config.py   the stage's options          queries.py  prompt rows, checked before any sampling
pairs.py    one query's samples -> pairs review.py   the reward-model half of the review
work.py     per-chunk shards and markers stage.py    the chunk loop, sharded across ranks
See docs/rejection_sampling.md.
"""

from qwen_align.stage import StageContext, StageResult

from .config import RejectionSamplingConfig as Config


def run(stage: Config, context: StageContext) -> StageResult:
    from .stage import run as run_stage  # heavy imports (torch, transformers) stay out of `qwen-align plan`

    return run_stage(stage, context)


__all__ = ["Config", "run"]
