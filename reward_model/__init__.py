"""Reward-model stage: Bradley-Terry training of Qwen2ForSequenceClassification (one output) on preference
pairs with TRL's RewardTrainer, initialised from a policy checkpoint (SFT or DPO); held-out pair accuracy
and mean margin in the manifest. Evaluation on the public RM benchmarks lives in `qwen_align.rm_eval`."""

from .config import Config


def run(stage, context):
    from .stage import run as _run  # torch/TRL load only when the stage runs, not for `qwen-align plan`

    return _run(stage, context)


__all__ = ["Config", "run"]
