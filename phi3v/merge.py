"""Merge a LoRA or QLoRA adapter into its base model and write a drop-in model folder.

    python -m phi3v.merge --adapter runs/lora --output_dir runs/lora-merged
    python -m phi3v.merge --adapter runs/lora/checkpoint-500 --output_dir merged-500 --dtype float16

The adapter is a recipe's finished `--use_lora`/`--use_qlora` output folder or any of its checkpoint-N
(a plain peft LoRA adapter of a Phi-3-vision model does; DoRA and other variants are refused). The base
is the one the adapter's adapter_config.json names (`base_model_name_or_path`) unless `--base` is
given. The merge is done in fp32, also for QLoRA (whose adapter trained against 4-bit weights: merging
into them would round it away), and the merged weights are written in the base's dtype (its
config.json's `torch_dtype`) unless `--dtype` is given: the bytes of peft's `merge_and_unload` on the
base loaded in fp32, cast to that dtype. It goes one weight at a time, straight from the base's
safetensors shards to the output's (5 GB at most each, with model.safetensors.index.json when there are
several), so memory stays far below the model's size; it prints the time and the peak memory (max RSS).
num_crops is the one saved with the adapter (else the base's).

The output replaces the base model's folder as is (see `phi3v/saving.py`): official key names and
config.json, the base's tokenizer, remote-code .py files and other files copied unchanged, and
preprocessor_config.json with the trained num_crops. It loads with phi3v on transformers 5.x, with
the official remote code on transformers 4.4x (`trust_remote_code=True`), and in vLLM
(`vllm serve OUTPUT_DIR --trust-remote-code`). The recipes' `--merge_lora` runs the same code.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m phi3v.merge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapter", required=True, help="LoRA/QLoRA adapter folder (a run's output or checkpoint-N)")
    parser.add_argument("--output_dir", required=True, help="folder to write the merged model to")
    parser.add_argument("--base", default=None, help="base model folder or hub id (default: the adapter's base)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="dtype of the written weights (default: the base's config.json torch_dtype)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from phi3v.saving import save_merged

    if not Path(args.adapter).is_dir():
        sys.exit(f"error: --adapter {args.adapter} is not a folder")
    start = time.perf_counter()
    try:
        out = save_merged(args.adapter, args.output_dir, base=args.base, dtype=DTYPES.get(args.dtype))
    except ValueError as err:
        sys.exit(f"error: {err}")
    # ru_maxrss: the most resident memory this process ever held (KiB on Linux), imports included
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"merged {args.adapter} into its base: {out} ({time.perf_counter() - start:.0f} s, peak memory "
          f"{peak:.2f} GiB max RSS)")


if __name__ == "__main__":
    main()
