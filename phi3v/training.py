"""Small helpers the recipes share for setting up training (LoRA targets, 4-bit on CPU)."""

from __future__ import annotations

from torch import nn

# Module names the original recipes put LoRA on.
LANGUAGE_LORA_MODULES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")
VISION_LORA_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
PROJECTOR_LORA_MODULES = ("img_projection.0", "img_projection.2")


def lora_target_modules(model: nn.Module, vision: bool = True) -> list[str]:
    """Full names of the Linear layers to put LoRA on, as the original recipes choose them.

    The language model always; with `vision=True` also the CLIP layers that feed the image
    features and the projector. CLIP layers past `img_processor.layer_idx` are left out: they
    never get a gradient, and LoRA weights there would break DDP without find_unused_parameters.
    """
    base = getattr(model, "get_base_model", lambda: model)()
    embedder = base.model.vision_embed_tokens
    used_layers = embedder.num_vision_layers_used
    names = []
    for name, module in base.named_modules():
        if not isinstance(module, nn.Linear) and type(module).__name__ not in ("Linear4bit", "Linear8bitLt"):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if ".vision_embed_tokens." not in name:
            if leaf in LANGUAGE_LORA_MODULES:
                names.append(name)
        elif vision:
            if name.endswith(PROJECTOR_LORA_MODULES):
                names.append(name)
            elif leaf in VISION_LORA_MODULES:
                layer = int(name.split(".encoder.layers.")[1].split(".")[0])
                if layer < used_layers:
                    names.append(name)
    return names


def fix_4bit_cpu_gradients(model: nn.Module) -> int:
    """Keep bitsandbytes 4-bit layers on CPUs with avx512_bf16 differentiable.

    On such CPUs, a `Linear4bit` forward without grad (any evaluation) repacks its weight into a
    format whose kernel has no backward; later training steps then get silently wrong LoRA
    gradients. Turning the repacking off keeps them exact. A no-op on GPUs. Returns the number of
    layers changed.
    """
    changed = 0
    for module in model.modules():
        if type(module).__name__ == "Linear4bit" and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def last_complete_checkpoint(output_dir) -> str | None:
    """The newest `checkpoint-N` folder in `output_dir` that was written to the end, or None.

    transformers' Trainer writes `trainer_state.json` last when it saves a checkpoint, so a run
    killed while saving leaves a folder without it (or with a cut-off file). `get_last_checkpoint`
    would pick that folder and the resume would fail or silently start from broken state; this
    skips it and warns.
    """
    import json
    import os
    import re
    import warnings

    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            steps.append((int(match.group(1)), name))
    for _, name in sorted(steps, reverse=True):
        folder = os.path.join(output_dir, name)
        try:
            with open(os.path.join(folder, "trainer_state.json")) as f:
                json.load(f)
        except (OSError, ValueError):
            warnings.warn(f"{folder} is incomplete (no readable trainer_state.json; the run was probably "
                          "killed while saving it): skipped for resuming", stacklevel=2)
            continue
        return folder
    return None
