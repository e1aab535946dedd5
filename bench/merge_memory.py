"""Time and peak memory of `python -m phi3v.merge` on a random-weight Phi-3.5-vision at the real size.

    python -m bench.merge_memory --workdir /tmp/merge-bench         # real size: writes ~17 GB, then deletes it
    python -m bench.merge_memory --workdir /tmp/merge-bench --tiny  # the same on the tiny model (the tests)

It writes, one tensor at a time (the model is never in memory):

* a base in bf16 with the real config (phi3v/assets/config.json) and tokenizer, random weights, in
  5 GB shards as the hub's snapshot has them (8.3 GB);
* an adapter as the UCF101 recipe's `--use_qlora` saves one with its defaults: rank 64, lora_alpha 128,
  LoRA on the language model's layers and lm_head, the CLIP layers that feed the features and the
  projector, lm_head's weight saved along (peft does so when lm_head is a target); lora_B random, not
  zero, so that every delta is really added;

then runs `python -m phi3v.merge` on them in a fresh process and prints its line (time and peak RSS,
the process's most resident memory, imports included) and the sizes. What it wrote is deleted at the
end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import phi3v
from phi3v.saving import write_sharded
from phi3v.tiny import ASSETS, PROCESSOR_FILES, tiny_config

ADAPTER_PREFIX = "base_model.model."


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def write_random_base(folder: Path, config) -> None:
    """The model of `config` in bf16 with random weights (std 0.02), one tensor made at a time."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    entries = [(k, torch.bfloat16, shape, math.prod(shape) * 2) for k, shape in shapes.items()]
    generator = torch.Generator().manual_seed(0)
    write_sharded(folder, entries, lambda key, dtype: (torch.randn(shapes[key], generator=generator) * 0.02).to(dtype))
    config_json = {**config.to_dict(), "torch_dtype": "bfloat16", "architectures": ["Phi3VForCausalLM"]}
    config_json.pop("dtype", None)
    (folder / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    for name in PROCESSOR_FILES:
        shutil.copy(ASSETS / name, folder / name)


def write_adapter(folder: Path, base: Path, config, rank: int = 64, alpha_ratio: float = 2) -> None:
    """A LoRA adapter with the UCF101 recipe's targets and settings, random A and B, lm_head saved along."""
    from peft import LoraConfig
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    targets = phi3v.lora_target_modules(model, vision=True)
    lora = LoraConfig(r=rank, lora_alpha=round(rank * alpha_ratio), lora_dropout=0.0, target_modules=targets,
                      init_lora_weights="gaussian", task_type="CAUSAL_LM", base_model_name_or_path=str(base))
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    modules = dict(model.named_modules())
    for name in targets:
        out_features, in_features = modules[name].weight.shape
        tensors[f"{ADAPTER_PREFIX}{name}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) / rank
        tensors[f"{ADAPTER_PREFIX}{name}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 1e-3
    index = base / "model.safetensors.index.json"
    lm_head_file = base / json.loads(index.read_text())["weight_map"]["lm_head.weight"] if index.is_file() else (
        base / "model.safetensors")
    with safe_open(lm_head_file, "pt") as f:  # trained as fp32 in a QLoRA run (prepare_model_for_kbit_training)
        tensors[f"{ADAPTER_PREFIX}lm_head.base_layer.weight"] = f.get_tensor("lm_head.weight").float()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    lora.save_pretrained(str(folder))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="folder for the base, the adapter and the merged model")
    parser.add_argument("--tiny", action="store_true", help="the tiny model instead of the real size")
    parser.add_argument("--keep", action="store_true", help="keep what was written")
    args = parser.parse_args(argv)
    from transformers import AutoConfig

    workdir = Path(args.workdir)
    config = tiny_config() if args.tiny else AutoConfig.from_pretrained(str(ASSETS))
    base, adapter, merged = workdir / "base", workdir / "adapter", workdir / "merged"
    try:
        write_random_base(base, config)
        write_adapter(adapter, base, config)
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run([sys.executable, "-m", "phi3v.merge", "--adapter", str(adapter), "--output_dir",
                               str(merged)], env=env, capture_output=True, text=True)  # fmt: skip
        if proc.returncode:
            sys.exit(f"phi3v.merge failed:\n{proc.stderr[-3000:]}")
        line = proc.stdout.strip().splitlines()[-1]
        print(line)
        print(f"base {folder_bytes(base) / 1e9:.2f} GB ({len(list(base.glob('model*.safetensors')))} shard(s)), "
              f"adapter {folder_bytes(adapter) / 1e9:.2f} GB, merged {folder_bytes(merged) / 1e9:.2f} GB "
              f"({len(list(merged.glob('model*.safetensors')))} shard(s))")
        return line
    finally:
        if not args.keep:
            for folder in (base, adapter, merged):
                shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
