"""Small helpers the recipes share for setting up training (LoRA targets, 4-bit on CPU, resuming)."""

from __future__ import annotations

import json
import os
import re
import warnings
import zipfile
from glob import glob

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


# What a resumable checkpoint holds besides trainer_state.json (one name of each group is enough).
CHECKPOINT_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
                      "pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_model.bin")


def checkpoint_problem(folder) -> str | None:
    """Why `folder` (a Trainer checkpoint-N) cannot be resumed from exactly, or None if it can.

    The Trainer saves, in this order: the weights, the optimizer and scheduler (DeepSpeed: one
    optimizer file per rank, then a barrier), each rank's RNG state, and last `trainer_state.json`
    (rank 0, without waiting for the other ranks' RNG files). A kill can stop it anywhere. Only
    cheap checks: `torch.save` writes zip archives, whose directory comes last, so a cut-off .pt/.pth
    fails to open as a zip without reading the data.
    """
    try:
        with open(os.path.join(folder, "trainer_state.json")) as f:
            json.load(f)
    except (OSError, ValueError):
        return "no readable trainer_state.json"
    deepspeed_optimizer = glob(os.path.join(folder, "global_step*", "*optim_states.pt"))
    deepspeed_model = glob(os.path.join(folder, "global_step*", "*model_states.pt"))  # ZeRO-3 without gathering
    if not any(os.path.isfile(os.path.join(folder, name)) for name in CHECKPOINT_WEIGHTS) and not deepspeed_model:
        return "no model or adapter weights"
    if not deepspeed_optimizer and not os.path.isfile(os.path.join(folder, "optimizer.pt")):
        return "no optimizer state"
    names = os.listdir(folder)
    ranks = sorted(int(m.group(1)) for m in (re.fullmatch(r"rng_state_(\d+)\.pth", n) for n in names) if m)
    if not ranks and "rng_state.pth" not in names:
        return "no rng_state.pth"
    # Several processes write rng_state_0..N-1 (N >= 2); with DeepSpeed, N is the number of optimizer files.
    if ranks and ranks != list(range(max(ranks[-1] + 1, 2, len(deepspeed_optimizer)))):
        return f"RNG state files of ranks {ranks} only"
    for name in names:
        if name.endswith((".pt", ".pth")) and not zipfile.is_zipfile(os.path.join(folder, name)):
            return f"{name} is cut off"
    return None


def last_complete_checkpoint(output_dir) -> str | None:
    """The newest `checkpoint-N` folder in `output_dir` that was written to the end, or None.

    A run killed while saving leaves a newest folder that is incomplete (see `checkpoint_problem`);
    transformers' `get_last_checkpoint` would pick it and the resume would fail, or silently
    continue without the optimizer or RNG state. This skips such folders, with a warning naming
    each. A rank count that changed between runs is not detected (the Trainer warns itself).
    """
    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            steps.append((int(match.group(1)), name))
    for _, name in sorted(steps, reverse=True):
        folder = os.path.join(output_dir, name)
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        warnings.warn(f"{folder} is incomplete ({problem}; the run was probably killed while saving it): "
                      "skipped for resuming", stacklevel=2)
    return None
