"""Checkpoints, in one home for every stage.

- `published`: model checkpoints in the layout Qwen publishes them (sharded safetensors + index, config,
  generation_config, tokenizer files with the chat template): reading them as a stage's start, writing a
  stage's output so that transformers and serving engines load it.
- `resume`: the trainer's own `checkpoint-N` folders (model, optimizer, scheduler, RNG, trainer state):
  written atomically, checked before a resume, set aside when torn.
- `tensors`: one tensor, or a block of its rows, read from a (sharded) safetensors checkpoint without loading
  the model (the online merging optimizers build τ_r from it shard by shard).
"""
