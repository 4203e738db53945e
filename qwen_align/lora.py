"""LoRA and QLoRA for every training stage: the peft config, the quantized load, the saved output.

A stage passes `peft_config(stage.lora, task)` to its TRL trainer, loads its model through `load_model(...,
quantize=...)` and saves through `stage.save_trained_model`, which calls `save_trained` here. Output
(`lora.save`): `merged` writes plain weights; `adapter` writes a peft adapter folder (adapter_config.json,
adapter_model.safetensors, tokenizer) whose base is the stage's start, and `load_model` reads such a folder
back as base + adapter, merged.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from . import distributed
from .checkpoints.published import write_tokenizer
from .errors import UserError
from .fsutil import atomic_dir

if TYPE_CHECKING:
    from peft import LoraConfig
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .recipe import LoraOptions

log = logging.getLogger(__name__)

Task = Literal["causal_lm", "reward"]
# Beside adapter_config.json: what the adapter's base is, with the seed that rebuilds a preset's random init.
BASE_FILE = "qwen_align_base.json"
ADAPTER_CONFIG = "adapter_config.json"


def check_runnable(options: LoraOptions | None, stage_name: str) -> None:
    """Refuse in one line, before any work, what cannot run here: QLoRA without bitsandbytes and a CUDA GPU."""
    if options is None or options.quantize is None:
        return
    import torch

    missing = []
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("bitsandbytes is not installed")
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU is visible")
    if missing:
        bits = options.quantize.removesuffix("bit")
        raise UserError(f"stage '{stage_name}': lora.quantize: {bits}-bit QLoRA needs bitsandbytes on a CUDA GPU; "
                        f"{' and '.join(missing)} (drop `quantize` to train plain LoRA)")


def peft_config(options: LoraOptions | None, task: Task) -> LoraConfig | None:
    """The peft LoraConfig for a stage's trainer; None without `lora`. The reward model's `score` head trains."""
    if options is None:
        return None
    from peft import LoraConfig

    adapter = options.model_dump(include={"r", "lora_alpha", "lora_dropout", "target_modules"})
    if task == "reward":
        return LoraConfig(task_type="SEQ_CLS", modules_to_save=["score"], **adapter)
    return LoraConfig(task_type="CAUSAL_LM", **adapter)


def quantization_config(quantize: str):
    """bitsandbytes settings of QLoRA: nf4 with double quantization and bf16 compute, or LLM.int8()."""
    import torch
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def quantized_load_kwargs(quantize: str) -> dict:
    """`from_pretrained` options that load a checkpoint k-bit on this rank's GPU (QLoRA)."""
    return {"quantization_config": quantization_config(quantize), "device_map": {"": str(distributed.device())}}


def prepare_quantized(model: PreTrainedModel) -> PreTrainedModel:
    """A k-bit model prepared for adapter training (base frozen, norms fp32)."""
    from peft import prepare_model_for_kbit_training

    # The Trainer switches on gradient checkpointing itself when the stage asks for it.
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def is_adapter_folder(path: str | Path) -> bool:
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def load_adapter_folder(path: Path, role: str, load_base, tokenizer=None) -> PreTrainedModel:
    """Base + adapter of a `lora.save: adapter` output, merged into plain weights.

    `load_base(source, role, tokenizer, seed)` loads the base (the model loader, which may recurse into another
    adapter folder).
    """
    from peft import PeftConfig, PeftModel

    config = PeftConfig.from_pretrained(str(path))
    if role == "policy" and config.task_type == "SEQ_CLS":
        raise UserError(f"model '{path}': a reward-model adapter (sequence classification) cannot start a policy")
    base_file = path / BASE_FILE
    base = json.loads(base_file.read_text(encoding="utf-8")) if base_file.is_file() else {}
    source = base.get("base_model") or config.base_model_name_or_path
    if not source:
        raise UserError(f"model '{path}': adapter folder names no base model ({ADAPTER_CONFIG}: base_model_name_or_path)")
    from .presets import preset_name

    if preset_name(source) is None and not Path(source).exists():
        raise UserError(f"model '{path}': its base model '{source}' ({BASE_FILE}) is not a preset nor an existing "
                        "folder; put the base back there, or write the path it has now into that file")
    if tokenizer is None and (path / "tokenizer_config.json").is_file():
        from .tokenizer import load_tokenizer

        tokenizer = load_tokenizer(path)
    model = load_base(source, role, tokenizer, base.get("seed", 0))
    if (role == "reward") != (config.task_type == "SEQ_CLS"):
        config.task_type = None  # a policy adapter on a reward model's body: only the shared layers apply
    merged = PeftModel.from_pretrained(model, str(path), config=config).merge_and_unload()
    log.info("loaded adapter %s on base %s (merged)", path, source)
    return merged


def save_trained(model, tokenizer: PreTrainedTokenizerBase, out_dir: Path, options: LoraOptions | None,
                 base: str, seed: int, writes: bool, layout: dict | None = None) -> PreTrainedModel:
    """Write a trained model as `lora.save` says (only where `writes`: the main rank); every rank gets back a
    model for evaluation (merged, unless its base is quantized). `layout`: options of the checkpoint writer
    (`qwen_align.checkpoints.published.save_checkpoint`) for merged output."""
    from accelerate.utils import is_peft_model

    from .model import save_checkpoint

    layout = layout or {}

    if not is_peft_model(model):
        if writes:
            save_checkpoint(model, tokenizer, out_dir, **layout)
        return model
    if options is not None and options.save == "adapter":
        if writes:
            save_adapter(model, tokenizer, out_dir, base, seed)
        return model if _is_quantized(model) else model.merge_and_unload()
    if _is_quantized(model):  # the writer merges into a bf16 copy of the base; evaluation uses the k-bit model
        if writes:
            save_checkpoint(_merged_on_plain_base(model, tokenizer, base, seed), tokenizer, out_dir, **layout)
        return model
    merged = model.merge_and_unload()
    if writes:
        save_checkpoint(merged, tokenizer, out_dir, **layout)
    return merged


def save_adapter(model, tokenizer: PreTrainedTokenizerBase, out_dir: Path, base: str, seed: int) -> Path:
    """An adapter folder peft loads (`PeftModel.from_pretrained(base_model, out_dir)`), with the tokenizer; atomic."""
    for config in model.peft_config.values():
        config.base_model_name_or_path = base
    with atomic_dir(out_dir) as tmp:
        # No stage resizes the vocabulary, so the base's embeddings stay with the base.
        model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)
        write_tokenizer(tokenizer, Path(tmp))
        (Path(tmp) / BASE_FILE).write_text(json.dumps({"base_model": base, "seed": seed}) + "\n", encoding="utf-8")
    return out_dir


def _is_quantized(model) -> bool:
    base = model.get_base_model()
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


def _merged_on_plain_base(model, tokenizer, base: str, seed: int) -> PreTrainedModel:
    """QLoRA: merge the adapter into the base loaded unquantized (bf16), not into rounded k-bit weights."""
    from peft import PeftModel

    from .model import load_model
    from .reward_score import copy_mark

    role = "reward" if model.peft_config["default"].task_type == "SEQ_CLS" else "policy"
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        plain = load_model(base, role, tokenizer=tokenizer, dtype="bfloat16", seed=seed)
        merged = PeftModel.from_pretrained(plain, tmp).merge_and_unload()
    copy_mark(model.config, merged)  # a likelihood reward model stays one (qwen_align.reward_score)
    return merged
