"""Fine-tune Phi-3.5-vision on DocVQA (document question answering), scored with ANLS.

What it trains
    By default the 1,000-row mini training set `nielsr/docvqa_1200_examples` (split `train`);
    with `--full_train` the DocVQA part of `HuggingFaceM4/the_cauldron` (about 10k pages with
    several questions each; one question per page is drawn at random every time a page is seen).
    Evaluation is always the 200-row `test` split of the mini set: greedy answers to
    `<|image_1|>\\n{question}\\nAnswer briefly.`, scored with ANLS (average normalised Levenshtein
    similarity, tau 0.5, best over the gold answers), before and after training. Results go to
    `eval_before.json` / `eval_after.json` in `--output_dir`; ANLS is stored as a fraction (the
    cookbook README quotes it x100, e.g. 83.65 for full fine-tuning of Phi-3-vision). The losses
    go to `log_history.json` and `loss_curve.png` (training loss, held-out loss with --eval_steps,
    and the learning rate on a second axis).

    Training modes: full fine-tuning (DeepSpeed ZeRO-2 from `ds_configs/zero2.json`),
    `--freeze_vision_model` (full fine-tuning of the language model and projector only; much
    faster), `--use_lora`, `--use_qlora` (4-bit NF4 base + LoRA). LoRA/QLoRA never use DeepSpeed.

How to launch
    One node, 8 GPUs:
        torchrun --nproc_per_node=8 finetune_hf_trainer_docvqa.py --bf16 --use_flash_attention \\
            --batch_size 64 --output_dir out/docvqa
    Several nodes (run on each node, with its own --node_rank):
        torchrun --nnodes=2 --node_rank=0 --master_addr=10.0.0.1 --master_port=29500 \\
            --nproc_per_node=8 finetune_hf_trainer_docvqa.py --full_train --bf16 --use_flash_attention
    One process (one GPU, or CPU for a smoke test):
        python finetune_hf_trainer_docvqa.py --use_lora --batch_size 16
    `--batch_size` is the GLOBAL batch: gradient accumulation is
    batch_size / (number of processes * --batch_size_per_gpu).

Hardware suggestions
    A100/H100: `--bf16 --use_flash_attention` (needs `pip install flash-attn`), full fine-tuning,
        `--batch_size 64`; the cookbook's settings for DocVQA were lr 5e-6 (full), 1e-4
        (`--freeze_vision_model`), 2e-4 (LoRA/QLoRA with `--lora_rank 32 --lora_alpha_ratio 0.5`).
    V100 (no bf16, no flash attention): fp16 mixed precision (the default without --bf16); the
        weights stay fp32, so full fine-tuning needs the ZeRO-2 sharding of the optimizer.
    Consumer GPUs (24 GB or less): `--use_lora`, or `--use_qlora` (Turing or newer), maybe with
        `--freeze_vision_model` and a smaller `--num_crops`.
    CPU: works for smoke tests with a tiny model (`python -m phi3v.tiny --output_dir tiny`), fp32.

Checks before training (nothing is loaded onto a GPU first)
    Arguments: flash attention without flash-attn or CUDA (it implies --bf16), --use_qlora without
    bitsandbytes, --num_crops outside 1..16, a --batch_size that world size x --batch_size_per_gpu
    does not divide, a --dataset_path / --full_train_dataset_path without the expected splits or
    files, and an --output_dir that holds a finished run (eval_after.json, a saved model or adapter;
    refused unless --overwrite_output_dir; checkpoint-* folders alone are an unfinished run that
    `--resume_from_checkpoint latest` continues, from the newest checkpoint written completely).
    Data (the "preflight"): every training row and every test row the run uses (after
    --max_*_samples) is checked: the columns of the schema are there; the page is there, is one
    image and decodes fully (truncated or corrupt files, tiny images; CMYK, palette, 16-bit, alpha
    and EXIF-rotated pages are valid and converted the same way everywhere by
    `phi3v.validation.load_image`); the question and every answer (every conversation turn of the
    cauldron) are non-empty text without `<|image_N|>` tags of their own; a training sample fits
    --max_length (counted from the image header with the token-count formula; samples are never
    truncated). Bad rows stop the run with one report (split, row number and id, reason; all of
    them in output_dir/invalid_rows.jsonl), or with --skip_invalid are dropped and listed in
    output_dir/skipped_rows.jsonl.

Throughput
    `--group_by_length` batches pages of similar token counts (less padding); `--packing` puts each
    micro-batch into one padding-free row (see its help for the trade-off). Evaluation generates
    `--eval_batch_size` answers at a time.

Data without the hub
    `--dataset_path` takes a local copy of the mini set: a `save_to_disk` DatasetDict with `train`
    and `test` splits, or a folder of parquet files named per split (`train-*.parquet`,
    `test-*.parquet`, or `train/` and `test/` sub-folders), in the hub schema: `image`, `query`
    (a struct with an `en` key), `answers` (list of str). `--full_train_dataset_path` takes the
    cauldron DocVQA copy (`save_to_disk` folder or parquet files, or the root of a the_cauldron
    snapshot, whose `docvqa/` folder is then read): `images` (list of images), `texts` (list of
    {user, assistant, source}).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import multiprocessing
import os
import random
import re
import socket
import time
from contextlib import nullcontext
from pathlib import Path

import datasets
import torch
from accelerate.utils import gather_object
from PIL import Image
from rapidfuzz.distance import Levenshtein
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    BitsAndBytesConfig,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

import phi3v
import phi3v.saving  # drop-in model folders (the official layout) and LoRA merging
from phi3v.validation import InvalidSample, Preflight, image_size, image_tag_problem, load_image

MINI_DOCVQA = "nielsr/docvqa_1200_examples"
MINI_DROP_COLUMNS = ["words", "bounding_boxes", "answer"]  # "id" stays: it names bad rows
CAULDRON, CAULDRON_CONFIG = "HuggingFaceM4/the_cauldron", "docvqa"
DEFAULT_DS_CONFIG = Path(__file__).resolve().parent / "ds_configs" / "zero2.json"
# <|end|> and <|endoftext|>: generation stops at either.
EOS_TOKEN_IDS = [32007, 32000]
ANSWER_SUFFIX = "<|end|>\n<|endoftext|>"
IMAGE_TAG = re.compile(r"<\|image_\d+\|>")


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model_name_or_path", default="microsoft/Phi-3.5-vision-instruct", help="hub id or local folder")
    add("--use_flash_attention", action="store_true",
        help="flash_attention_2 (needs flash-attn and CUDA; implies --bf16)")
    add("--bf16", action="store_true", help="bf16 weights and mixed precision (else fp16 AMP on GPU, fp32 on CPU)")
    add("--use_lora", action="store_true", help="train LoRA adapters instead of all weights")
    add("--use_qlora", action="store_true", help="4-bit NF4 base model + LoRA (implies --use_lora)")
    add("--lora_rank", type=int, default=64)
    add("--lora_alpha_ratio", type=float, default=2, help="lora_alpha = round(lora_rank * ratio)")
    add("--lora_dropout", type=float, default=0.0)
    add("--freeze_vision_model", action="store_true", help="do not train the CLIP tower, separators and projector")
    add("--full_train", action="store_true", help="train on the_cauldron DocVQA instead of the 1k-row mini set")
    add("--dataset_path", default=None, help="local copy of the mini set (train/test splits)")
    add("--full_train_dataset_path", default=None, help="local copy of the_cauldron docvqa (with --full_train)")
    add("--batch_size", type=int, default=16, help="GLOBAL batch size (all processes, with accumulation)")
    add("--batch_size_per_gpu", type=int, default=1, help="micro-batch per process")
    add("--eval_batch_size", type=int, default=None, help="generation batch per process (default: batch_size_per_gpu)")
    add("--num_crops", type=int, default=16, help="max 336x336 crops per image (1..16)")
    add("--resize_backend", choices=["pil", "torch"], default=None,
        help="resize in the HD transform (default: the model folder's setting, pil): pil is bit-identical to "
        "the official processor; torch (uint8 antialiased bilinear, in the same pass order) makes preprocessing 1.2x "
        "(portrait) to 1.4x (landscape) faster on RGB pages, within one uint8 level of pil on ~0.02%% of a page's pixel "
        "values. Saved with the processor.")
    add("--num_train_epochs", type=float, default=1)
    add("--max_steps", type=int, default=-1, help="> 0 overrides --num_train_epochs")
    add("--learning_rate", type=float, default=4.0e-5)
    add("--wd", type=float, default=0.01, help="weight decay")
    add("--warmup_steps", type=int, default=50)
    add("--output_dir", default="./output/")
    add("--no-tqdm", dest="no_tqdm", action="store_true", help="no progress bars (for log files)")
    add("--logging_steps", type=int, default=10)
    add("--save_steps", type=int, default=0, help="0: only the final save; N: resumable checkpoint every N steps")
    add("--save_total_limit", type=int, default=10, help="keep at most this many checkpoint-* folders")
    add("--resume_from_checkpoint", default=None,
        help="checkpoint folder, or 'latest': the newest checkpoint-N in --output_dir that was written completely "
             "(one cut off by a kill while saving is skipped)")
    add("--eval_steps", type=int, default=0, help="0: off; N: held-out loss every N steps")
    add("--max_eval_loss_samples", type=int, default=64, help="test rows used for the held-out loss")
    add("--max_train_samples", type=int, default=None, help="use only the first N training rows")
    add("--max_eval_samples", type=int, default=None, help="generate for only the first N test rows")
    add("--max_new_tokens", type=int, default=64)
    add("--max_length", type=int, default=None,
        help="training samples longer than this (tokens, image tokens included) are invalid: never truncated. "
             "Default: the model's context length (max_position_embeddings in its config, 131072 for "
             "Phi-3.5-vision), so nothing the original trains is refused; set it to have the preflight report "
             "longer samples (a page at --num_crops 16 is at most 2,653 image tokens). GPU memory is the real "
             "limit: a rough estimate, not measured by this repo (worked out from the original recipe's published "
             "A100 peaks, with gradient checkpointing and flash attention), is 2-2.5 MB per token of a micro-batch "
             "on top of a fixed cost per GPU of about 30 GB for full fine-tuning (ZeRO-2 over 8 GPUs), 10 GB for "
             "LoRA and 4.5 GB for QLoRA: an 80 GB GPU holds roughly 20k tokens per micro-batch (full), 30k (LoRA), "
             "33k (QLoRA); a 24 GB GPU about 5k (LoRA) or 8k (QLoRA)")
    add("--skip_invalid", action="store_true",
        help="drop the rows the preflight check finds invalid (listed in output_dir/skipped_rows.jsonl) and train "
             "on the rest; default: stop before training with one report of all of them")
    add("--preflight_only", action="store_true",
        help="check the data and print a summary (rows, images per row, tokens per row at --num_crops, rows over "
             "--max_length, invalid rows), also written to output_dir/preflight_summary.json (+ invalid_rows.jsonl), "
             "then exit: 0 if the data is clean, else 1. No model weights are loaded; nothing else is written")
    add("--packing", action="store_true",
        help="pack each micro-batch (--batch_size_per_gpu samples) into one row without padding; positions "
             "restart per sample and no token attends across samples, so the loss is that of padded batches. "
             "Saves the compute spent on padding (DocVQA pages vary a lot in token count). With "
             "--use_flash_attention the varlen kernel also skips attention across samples; with sdpa (CPU) "
             "each sample's causal block runs on its own. Training and held-out loss only: generation "
             "stays batched and padded")
    add("--group_by_length", action="store_true",
        help="sample micro-batches of similar length (token counts from the image headers and the token-count "
             "formula, no pixel decode), so less padding is wasted; the order stays random across groups")
    add("--overwrite_output_dir", action="store_true",
        help="allow an --output_dir that holds a finished run (eval_after.json, a saved model or adapter); its "
             "files are replaced as the new run writes them, nothing is deleted first")
    add("--merge_lora", action="store_true", help="LoRA/QLoRA runs: also write the base (reloaded in fp32) with the "
        "adapter merged in to output_dir/merged, a drop-in model folder in the base's dtype (as python -m phi3v.merge)")
    add("--report_to", default="none", help="none, tensorboard, wandb, ... (comma-separated)")
    add("--seed", type=int, default=42)
    add("--dataloader_num_workers", type=int, default=4)
    add("--deepspeed", default=str(DEFAULT_DS_CONFIG), help="DeepSpeed config for full fine-tuning ('none': plain DDP)")
    add("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # passed by the `deepspeed` launcher
    args = parser.parse_args(argv)

    if args.use_qlora:
        args.use_lora = True
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if args.use_flash_attention:
        if importlib.util.find_spec("flash_attn") is None:
            parser.error("--use_flash_attention needs the flash-attn package (pip install flash-attn --no-build-isolation)")
        if not torch.cuda.is_available():
            parser.error("--use_flash_attention needs a CUDA GPU; leave it out on CPU (sdpa is used)")
        # Flash attention implies bf16: it cannot run in fp16 mixed precision with fp32 weights (the original
        # loaded the weights in bf16 for it, then trained in fp16 without --bf16: a known issue of the recipe).
        args.bf16 = True
    if not 1 <= args.num_crops <= 16:
        parser.error(f"--num_crops must be between 1 and 16, got {args.num_crops}")
    if args.batch_size_per_gpu < 1 or args.batch_size % (world_size * args.batch_size_per_gpu) != 0:
        parser.error(f"--batch_size {args.batch_size} must be a multiple of world_size ({world_size}) x "
                     f"--batch_size_per_gpu ({args.batch_size_per_gpu})")
    if args.use_qlora and importlib.util.find_spec("bitsandbytes") is None:
        parser.error("--use_qlora needs the bitsandbytes package (pip install bitsandbytes)")
    if args.merge_lora and not args.use_lora:
        parser.error("--merge_lora only applies to --use_lora / --use_qlora runs")
    if args.full_train_dataset_path and not args.full_train:
        parser.error("--full_train_dataset_path is only used with --full_train")
    if args.resume_from_checkpoint not in (None, "latest") and not os.path.isdir(args.resume_from_checkpoint):
        parser.error(f"--resume_from_checkpoint {args.resume_from_checkpoint}: no such folder")
    if args.dataset_path is not None:
        # With --full_train the mini set still gives the test split.
        problem = dataset_path_problem(Path(args.dataset_path), ["test"] if args.full_train else ["train", "test"])
        if problem:
            parser.error(f"--dataset_path {args.dataset_path}: {problem}")
    if args.full_train_dataset_path is not None:
        folder, problem = cauldron_config_folder(Path(args.full_train_dataset_path))
        if problem:
            parser.error(f"--full_train_dataset_path {args.full_train_dataset_path}: {problem}")
        args.full_train_dataset_path = str(folder)
        problem = dataset_path_problem(folder, [])
        if problem:
            parser.error(f"--full_train_dataset_path {args.full_train_dataset_path}: {problem}")
    finished = finished_run_files(Path(args.output_dir))
    if finished and not args.overwrite_output_dir and not args.preflight_only:
        parser.error(f"--output_dir {args.output_dir} already holds a finished run ({', '.join(finished)}); "
                     "choose another --output_dir, or add --overwrite_output_dir to train into it anyway")
    if args.deepspeed.lower() == "none" or args.use_lora or args.preflight_only:
        args.deepspeed = None  # LoRA/QLoRA never use DeepSpeed, as in the original recipe; --preflight_only trains nothing
    elif not os.path.isfile(args.deepspeed):
        parser.error(f"--deepspeed {args.deepspeed}: no such file")
    if args.eval_batch_size is None:
        args.eval_batch_size = args.batch_size_per_gpu
    return args


# A run is finished once it saved its model (or adapter) and results; checkpoint-* folders alone mean
# an unfinished run, which --resume_from_checkpoint continues in the same --output_dir.
FINISHED_RUN_FILES = ("eval_after.json", "log_history.json", "model.safetensors", "model.safetensors.index.json",
                      "pytorch_model.bin", "adapter_model.safetensors", "merged")


def finished_run_files(output_dir: Path) -> list[str]:
    return [name for name in FINISHED_RUN_FILES if (output_dir / name).exists()]


def is_split_file(path: Path, split: str) -> bool:
    return path.stem == split or path.name.startswith(f"{split}-") or path.parent.name == split


# A snapshot of the_cauldron holds each config in a folder named after it (ROOT/docvqa/train-*.parquet,
# ROOT/hateful_memes/..., ROOT/nlvr2/..., ...). Given such a root, reading every parquet file under
# it would mix the configs.
NOT_CONFIG_FOLDERS = {"train", "test", "validation", "val", "valid", "dev", "data"}  # split-like names


def cauldron_config_folder(path: Path) -> tuple[Path, str | None]:
    """(the folder to read, None), or (path, why not) for a copy of the_cauldron that may hold other configs.

    A folder holding a `docvqa/` folder: that folder. A folder holding two or more other folders of
    parquet files (a snapshot without docvqa): refused. Anything else (the config's own folder, a
    save_to_disk folder, parquet files): as it is.
    """
    if not path.is_dir() or any((path / name).exists() for name in ("state.json", "dataset_dict.json")):
        return path, None
    if (path / CAULDRON_CONFIG).is_dir():
        return path / CAULDRON_CONFIG, None
    others = sorted(d.name for d in path.iterdir()
                    if d.is_dir() and d.name not in NOT_CONFIG_FOLDERS and next(d.rglob("*.parquet"), None))
    if len(others) > 1:
        return path, (f"holds the folders {', '.join(name + '/' for name in others)} (a the_cauldron snapshot?) "
                      f"and no {CAULDRON_CONFIG}/ folder; reading them all would mix them: give the {CAULDRON_CONFIG} "
                      f"folder of the snapshot ({path / CAULDRON_CONFIG} once downloaded), or parquet files of "
                      f"{CAULDRON_CONFIG} only")
    return path, None


def dataset_path_problem(path: Path, splits: list[str]) -> str | None:
    """Why load_split cannot read `splits` from a local copy, or None. Cheap: only looks at file names."""
    if not path.exists():
        return "does not exist"
    if path.is_file():
        if path.suffix != ".parquet":
            return "is a file but not a .parquet file"
        return f"is one parquet file; the splits {splits} need a folder" if len(splits) > 1 else None
    if (path / "dataset_dict.json").exists():
        saved = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        missing = [split for split in splits if split not in saved]
        return f"the saved DatasetDict has the splits {saved}; missing: {missing}" if missing else None
    if (path / "state.json").exists():
        return f"is a single saved Dataset; save a DatasetDict with the splits {splits}" if splits else None
    files = sorted(path.rglob("*.parquet"))
    if not files:
        return "is neither a save_to_disk folder (no dataset_dict.json or state.json) nor a folder of .parquet files"
    missing = [split for split in splits if not any(is_split_file(f, split) for f in files)]
    if missing:
        return (f"no parquet files for the split(s) {missing} (names like {missing[0]}-00000-of-00001.parquet, "
                f"{missing[0]}.parquet or a {missing[0]}/ folder)")
    return None


def set_single_process_env():
    """Plain `python script.py` with DeepSpeed: give it the rendezvous variables torchrun would set.

    Without them DeepSpeed looks for MPI (mpi4py) to discover the world.
    """
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))


def print0(*args):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, flush=True)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def load_split(hub_id: str, config: str | None, split: str, local_path: str | None, unsplit_ok: bool = False):
    """One split from the hub, or from a local copy (save_to_disk folder or parquet files).

    `unsplit_ok`: the local copy may hold just this one split (a single saved Dataset, or parquet
    files not named after a split), as the cauldron has only `train`.
    """
    if local_path is None:
        return datasets.load_dataset(hub_id, config, split=split)
    path = Path(local_path)
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise SystemExit(f"{path} holds the splits {list(loaded)}, not '{split}'")
            return loaded[split]
        if not unsplit_ok:
            raise SystemExit(f"{path} is a single Dataset; save a DatasetDict with a '{split}' split")
        return loaded
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    if path.is_dir():
        named = [f for f in files if is_split_file(f, split)]
        files = named or (files if unsplit_ok else [])
    if not files:
        raise SystemExit(f"no parquet files for split '{split}' under {path}")
    return datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")


def chat_prompt(tokenizer, user_content: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user_content}], tokenize=False, add_generation_prompt=True
    )


def mini_question(query: dict) -> str:
    # Adapt: the user turn for your own dataset goes here (same text in training and evaluation).
    return f"<|image_1|>\n{query['en']}\nAnswer briefly."


def training_example(row: dict) -> tuple[Image.Image, str, str]:
    """(image, user turn, answer) of one row of either schema, drawn at random where there is a choice.

    `random` is seeded by Trainer (set_seed) and by the DataLoader in each worker, so the draws are
    reproducible and differ between workers.
    """
    if "texts" in row:  # the_cauldron: one page, several question/answer turns
        turn = random.choice(row["texts"])
        return row["images"][0], f"<|image_1|>\n{turn['user']}", turn["assistant"]
    return row["image"], mini_question(row["query"]), random.choice(row["answers"])


class DocVQACollator:
    """Raw dataset rows -> a training batch; images are decoded here (in the dataloader workers).

    Only the answer, <|end|>, "\\n" and <|endoftext|> carry a loss; the prompt (with the image
    tokens) is masked with -100. Padded (default): one right-padded row per sample with an attention
    mask. `packing`: the micro-batch concatenated into one row without padding (`phi3v.pack_examples`:
    positions restart at each sample, no token attends across samples).
    """

    def __init__(self, processor, packing: bool = False):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.pad_id = self.tokenizer.pad_token_id
        self.packing = packing

    def encode(self, row: dict) -> dict:
        image, user, answer = training_example(row)
        # load_image as in the preflight, which decoded this image already: nothing here can fail on it.
        prompt = self.processor(text=chat_prompt(self.tokenizer, user), images=[load_image(image)])
        prompt_ids = prompt["input_ids"][0].tolist()
        # No BOS before the answer: it continues the prompt.
        answer_ids = self.tokenizer(f"{answer}{ANSWER_SUFFIX}", add_special_tokens=False).input_ids
        return {
            "input_ids": prompt_ids + answer_ids,
            "labels": [-100] * len(prompt_ids) + answer_ids,
            "pixel_values": prompt["pixel_values"],
            "image_sizes": prompt["image_sizes"],
        }

    def __call__(self, rows: list[dict]) -> dict:
        encoded = [self.encode(row) for row in rows]
        if self.packing:
            return phi3v.pack_examples(encoded)
        width = max(len(e["input_ids"]) for e in encoded)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        # From the lengths, not from input_ids != pad: <|endoftext|> has the pad id and is a real token.
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, e in enumerate(encoded):
            n = len(e["input_ids"])
            input_ids[i, :n] = torch.tensor(e["input_ids"])
            labels[i, :n] = torch.tensor(e["labels"])
            attention_mask[i, :n] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": torch.cat([e["pixel_values"] for e in encoded]),
            "image_sizes": torch.cat([e["image_sizes"] for e in encoded]),
        }


def text_tokens(tokenizer, prompt: str) -> int:
    """Text tokens of a prompt as the processor counts them (each chunk around an image tag has its BOS)."""
    return sum(len(tokenizer(chunk).input_ids) for chunk in IMAGE_TAG.split(prompt))


def row_turns(row: dict) -> list[tuple[str, list[str]]]:
    """(user turn, gold answers) of every question of a row of either schema (a valid row)."""
    if "texts" in row:
        return [(f"<|image_1|>\n{turn['user']}", [turn["assistant"]]) for turn in row["texts"]]
    return [(mini_question(row["query"]), row["answers"])]


def row_image(row: dict):
    return row["images"][0] if "texts" in row else row["image"]


def sample_length(tokenizer, row: dict, num_crops: int) -> tuple[int, int]:
    """(tokens, image tokens) of the longest training sequence a valid row can give.

    From the image header only (no pixel decode) with the token-count formula; the cauldron's longest
    question/answer turn counts, as any turn may be drawn.
    """
    width, height = image_size(row_image(row))
    image_tokens = phi3v.num_image_tokens(width, height, num_crops)
    text = max(
        text_tokens(tokenizer, chat_prompt(tokenizer, user))
        + max(len(tokenizer(f"{answer}{ANSWER_SUFFIX}", add_special_tokens=False).input_ids) for answer in answers)
        for user, answers in row_turns(row)
    )
    return text + image_tokens, image_tokens


def qa_problems(question, question_field: str, answers: list[tuple[object, str]]) -> list[str]:
    """Problems of one question and its answers ((value, field name) pairs)."""
    problems = []
    if not isinstance(question, str) or not question.strip():
        problems.append(f"empty or missing question ({question_field})")
    else:
        # The script puts the page's one <|image_1|> tag in front of the question itself.
        problem = image_tag_problem(f"<|image_1|>\n{question}", 1)
        if problem:
            problems.append(f"question ({question_field}): {problem}")
    for answer, field in answers:
        if not isinstance(answer, str) or not answer.strip():
            problems.append(f"empty or missing answer ({field})")
        elif image_tag_problem(answer, 0):
            problems.append(f"answer ({field}): {image_tag_problem(answer, 0)}")
    return problems


def text_problems(row: dict) -> list[str]:
    # Adapt: the shape of your own rows (mini set: query/answers; the_cauldron: texts).
    if "texts" in row:
        texts = row["texts"]
        if not isinstance(texts, list) or not texts or not all(isinstance(turn, dict) for turn in texts):
            return ["texts is empty or not a list of {user, assistant} turns"]
        problems = []
        for k, turn in enumerate(texts):
            problems += qa_problems(turn.get("user"), f"texts[{k}]['user']",
                                    [(turn.get("assistant"), f"texts[{k}]['assistant']")])
        return problems
    query = row["query"]
    problems = qa_problems(query.get("en") if isinstance(query, dict) else None, "query['en']",
                           [(a, f"answers[{k}]") for k, a in enumerate(row["answers"] or [])])
    if not row["answers"]:
        problems.append("no answers (the answers list is empty)")
    return problems


def image_problem(row: dict) -> str | None:
    """Why a row's page cannot be trained on (full decode: a truncated file only shows there), or None."""
    if "texts" in row:
        images = row["images"]
        if not isinstance(images, list) or not images:
            return "no image (the images list is empty)"
        if len(images) > 1:
            return f"{len(images)} images; this recipe trains on one page per sample"
    cell = row_image(row)
    if cell is None:
        return "image is missing (null)"
    try:
        load_image(cell)
    except InvalidSample as err:
        return str(err)
    return None


_CHECKED = None  # the dataset the image-checking workers read (inherited through fork, not pickled)


def _image_problems(start: int, stop: int) -> list[str | None]:
    return [image_problem(row) for row in _CHECKED.select(range(start, stop))]


def row_images(row: dict) -> int | None:
    """How many images a row lists (None: not a list)."""
    if "texts" in row:
        return len(row["images"]) if isinstance(row["images"], list) else None
    return int(row["image"] is not None)


def check_rows(dataset, tokenizer, args, max_length: int | None) -> list[tuple[list[str], int | None, int | None]]:
    """(problems, length, images) of every row; the length is None only when the row is too broken to count.

    `max_length`: rows longer than this are invalid (training rows; None for the test rows, which
    are generated from, not trained on).

    Deterministic, so every rank of a distributed run reaches the same verdict on its own. Images
    are fully decoded (the slow part) in --dataloader_num_workers processes.
    """
    global _CHECKED
    ranges = [(start, min(start + 64, len(dataset))) for start in range(0, len(dataset), 64)]
    workers = min(args.dataloader_num_workers, len(ranges))
    _CHECKED = dataset
    try:
        if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                chunks = pool.starmap(_image_problems, ranges)
        else:
            chunks = [_image_problems(start, stop) for start, stop in ranges]
    finally:
        _CHECKED = None
    image_issues = [issue for chunk in chunks for issue in chunk]
    results = []
    for row, image_issue in zip(dataset, image_issues):
        problems = ([image_issue] if image_issue else []) + text_problems(row)
        # Counted whatever the row's other problems (for --preflight_only): a bad row may be too long as well.
        try:
            length, image_tokens = sample_length(tokenizer, row, args.num_crops)
        except (InvalidSample, TypeError, KeyError, IndexError, AttributeError, ValueError):
            if not problems:
                raise  # a row without problems can always be counted
            length = None  # missing or mistyped fields, reported above: too broken to count
        if length is not None and max_length is not None and length > max_length:
            # Never truncated: cutting image tokens would break the image-token/feature match.
            problems.append(f"{length} tokens ({image_tokens} of them image tokens) > --max_length {max_length}")
        results.append((problems, length, row_images(row)))
    return results


def context_length(model_name_or_path: str) -> int:
    """The model's context length: `max_position_embeddings` of its config (131072 for Phi-3.5-vision)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_name_or_path).max_position_embeddings


def preflight(train, test, tokenizer, args, is_main: bool):
    """Check every row the run uses before any model is loaded; stop with one report, or drop them.

    `test`: the test rows used for generation and for the held-out loss. Returns (training rows,
    generation rows, held-out-loss rows or None, training lengths) without the bad rows.
    """
    if args.max_length is None:  # the default: what the model can take, so nothing the original trains is refused
        args.max_length = context_length(args.model_name_or_path)
    sources = [args.full_train_dataset_path or f"{CAULDRON}/{CAULDRON_CONFIG}"] if args.full_train else []
    report = Preflight(f"the DocVQA data ({', '.join(sources + [args.dataset_path or MINI_DOCVQA])})")
    verdicts = {}
    for split, dataset in (("train", train), ("test", test)):
        verdicts[split] = check_rows(dataset, tokenizer, args, args.max_length if split == "train" else None)
        ids = dataset["id"] if "id" in dataset.column_names else [None] * len(dataset)
        name = "cauldron train" if split == "train" and args.full_train else split
        for i, ((problems, length, images), row_id) in enumerate(zip(verdicts[split], ids)):
            for problem in problems:
                report.add(f"{name} row {i}" + (f" (id {row_id})" if row_id is not None else ""), problem, key=(split, i))
            report.measure(split, (split, i), images, length)
    if args.preflight_only:
        report.exit_with_summary(args.output_dir, args.max_length, args.num_crops, is_main)
    drop = report.finish(args.output_dir, args.skip_invalid, is_main)

    keep = [i for i in range(len(train)) if ("train", i) not in drop]
    if not keep:
        raise SystemExit(f"all {len(train)} training rows are invalid (listed in "
                         f"{Path(args.output_dir) / 'skipped_rows.jsonl'}): nothing to train on")
    train_lengths = [verdicts["train"][i][1] for i in keep]
    train = train.select(keep) if len(keep) < len(train) else train
    valid_test = [i for i in range(len(test)) if ("test", i) not in drop]
    num_generate = min(args.max_eval_samples or len(test), len(test))
    eval_data = test.select([i for i in valid_test if i < num_generate])
    if num_generate and not len(eval_data):
        raise SystemExit(f"all {num_generate} evaluation rows are invalid (listed in "
                         f"{Path(args.output_dir) / 'skipped_rows.jsonl'}): nothing to evaluate on")
    eval_loss = None
    if args.eval_steps > 0:
        eval_loss = test.select([i for i in valid_test if i < args.max_eval_loss_samples])
        # Always the first gold answer, so that the held-out loss is comparable between evaluations.
        eval_loss = eval_loss.map(lambda answers: {"answers": answers[:1]}, input_columns="answers", keep_in_memory=True)
    print0(f"preflight: {len(train)} training and {len(eval_data)} evaluation rows valid; longest training "
           f"sample {max(train_lengths)} tokens (--max_length {args.max_length})")
    return train, eval_data, eval_loss, train_lengths


def undecoded(dataset, image_column: str, columns: list[str], what: str):
    """The schema's columns, images as {bytes, path} cells, or a clear error naming what is missing.

    The images are decoded by load_image only: in the preflight and in the collator (dataloader
    workers), the same way everywhere.
    """
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise SystemExit(f"{what} has no column(s) {missing} (its columns: {dataset.column_names}); "
                         f"expected {columns}")
    image = datasets.Image(decode=False)
    try:
        return dataset.cast_column(image_column, datasets.List(image) if image_column == "images" else image)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"{what}: column '{image_column}' does not hold images ({err})") from None


def load_data(args):
    """(training rows, the test rows the run uses): raw rows, images left undecoded for the preflight."""
    mini = args.dataset_path or MINI_DOCVQA
    test = load_split(MINI_DOCVQA, None, "test", args.dataset_path)
    test = test.remove_columns([c for c in MINI_DROP_COLUMNS if c in test.column_names])
    test = undecoded(test, "image", ["image", "query", "answers"], f"{mini} split 'test'")
    if args.full_train:
        train = load_split(CAULDRON, CAULDRON_CONFIG, "train", args.full_train_dataset_path, unsplit_ok=True)
        where = args.full_train_dataset_path or f"{CAULDRON}/{CAULDRON_CONFIG}"
        train = undecoded(train, "images", ["images", "texts"], where).select_columns(["images", "texts"])
    else:
        train = load_split(MINI_DOCVQA, None, "train", args.dataset_path)
        train = train.remove_columns([c for c in MINI_DROP_COLUMNS if c in train.column_names])
        train = undecoded(train, "image", ["image", "query", "answers"], f"{mini} split 'train'")
    if args.max_train_samples:
        train = train.select(range(min(args.max_train_samples, len(train))))
    num_generate = min(args.max_eval_samples or len(test), len(test))
    num_loss = min(args.max_eval_loss_samples, len(test)) if args.eval_steps > 0 else 0
    test = test.select(range(max(num_generate, num_loss)))
    print0(f"training rows: {len(train)}, evaluation rows: {num_generate}")
    return train, test


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def load_model(args, on_gpu: bool, local_rank: int):
    # Phi-3.5-vision was trained in bf16; for fp16 mixed precision keep fp32 weights (as the original).
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    kwargs = dict(dtype=dtype, attn_implementation="flash_attention_2" if args.use_flash_attention else "sdpa")
    if args.use_qlora:
        compute_dtype = torch.bfloat16 if args.bf16 else (torch.float16 if on_gpu else torch.float32)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
        )
        kwargs["device_map"] = {"": local_rank} if on_gpu else "cpu"
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, **kwargs)
    model.config.use_cache = False  # no KV cache while training (generation asks for it explicitly)

    if args.use_qlora:
        from peft import prepare_model_for_kbit_training

        # Must come before any no-grad forward (evaluation): on CPUs with avx512_bf16, bitsandbytes
        # would otherwise repack the 4-bit weights into a layout without backward.
        phi3v.fix_4bit_cpu_gradients(model)
        print0(f"4-bit layers: {sum(type(m).__name__ == 'Linear4bit' for m in model.modules())}")
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
        )

    if args.freeze_vision_model:
        # CLIP tower, separators and projector. Unlike the original (where the image embedder holds
        # the token embedding too), phi3v keeps the token embeddings trainable here.
        model.model.vision_embed_tokens.requires_grad_(False)

    if args.use_lora:
        from peft import LoraConfig, get_peft_model

        # Adapt: LoRA targets. phi3v picks the language model layers (and lm_head), plus the CLIP
        # layers that feed the features and the projector unless the vision model is frozen.
        config = LoraConfig(
            r=args.lora_rank,
            lora_alpha=round(args.lora_rank * args.lora_alpha_ratio),
            lora_dropout=args.lora_dropout,
            target_modules=phi3v.lora_target_modules(model, vision=not args.freeze_vision_model),
            init_lora_weights="gaussian",
        )
        model = get_peft_model(model, config)
        # lm_head is a LoRA target, so peft would also store a full copy of its (unchanged) weight in
        # every adapter and checkpoint (~200M parameters for Phi-3.5-vision); the base model has it.
        model.save_pretrained = functools.partial(model.save_pretrained, save_embedding_layers=False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print0(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    return model


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


class ThroughputCallback(TrainerCallback):
    """Measures images and non-padding tokens per second between two loss logs (all processes).

    Tokens come from Trainer's own gathered count (include_num_input_tokens_seen="non_padding");
    DocVQA has one image per sample, so images = optimizer steps x global batch. Evaluation and
    checkpoint saving are left out of the time.
    """

    def __init__(self, samples_per_step: int):
        self.samples_per_step = samples_per_step
        self.since = self.step = self.tokens = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.since, self.step, self.tokens = time.perf_counter(), state.global_step, state.num_input_tokens_seen

    def on_evaluate(self, args, state, control, **kwargs):
        self.since = time.perf_counter()

    def on_save(self, args, state, control, **kwargs):
        self.since = time.perf_counter()

    def rates(self, state) -> dict:
        if self.since is None:
            return {}
        elapsed = max(time.perf_counter() - self.since, 1e-9)
        images = (state.global_step - self.step) * self.samples_per_step
        tokens = state.num_input_tokens_seen - self.tokens
        self.since, self.step, self.tokens = time.perf_counter(), state.global_step, state.num_input_tokens_seen
        return {"images_per_second": round(images / elapsed, 3), "tokens_per_second": round(tokens / elapsed, 1)}


class DocVQATrainer(Trainer):
    """Trainer that puts images_per_second / tokens_per_second next to every logged loss."""

    def __init__(self, *args, throughput: ThroughputCallback, **kwargs):
        super().__init__(*args, callbacks=[throughput], **kwargs)
        self.throughput = throughput

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update(self.throughput.rates(self.state))
        super().log(logs, start_time)


def make_training_args(args, on_gpu: bool, world_size: int) -> TrainingArguments:
    grad_accum = args.batch_size // (world_size * args.batch_size_per_gpu)
    workers = args.dataloader_num_workers
    return TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size_per_gpu,
        per_device_eval_batch_size=args.batch_size_per_gpu,
        gradient_accumulation_steps=grad_accum,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},  # needed for LoRA and frozen towers
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-7,
        learning_rate=args.learning_rate,
        weight_decay=args.wd,
        max_grad_norm=1.0,
        lr_scheduler_type="linear",
        warmup_steps=args.warmup_steps,
        logging_steps=args.logging_steps,
        eval_strategy="steps" if args.eval_steps > 0 else "no",
        eval_steps=args.eval_steps if args.eval_steps > 0 else None,
        prediction_loss_only=True,
        save_strategy="steps" if args.save_steps > 0 else "no",
        save_steps=args.save_steps if args.save_steps > 0 else 500,
        save_total_limit=args.save_total_limit,
        save_only_model=False,  # checkpoints keep optimizer, scheduler and RNG state: resumable
        bf16=args.bf16,
        fp16=on_gpu and not args.bf16,
        use_cpu=not on_gpu,
        # gloo for CPU runs under a launcher; a plain one-process run must not ask for a backend.
        ddp_backend="gloo" if not on_gpu and "WORLD_SIZE" in os.environ else None,
        ddp_find_unused_parameters=False,
        remove_unused_columns=False,  # the collator needs the raw columns
        dataloader_num_workers=workers,
        dataloader_prefetch_factor=2 if workers > 0 else None,
        # Packed rows have no padding (and no attention mask): every token counts.
        include_num_input_tokens_seen="all" if args.packing else "non_padding",
        # Lengths from the `length` column that main() adds from the preflight's token counts.
        train_sampling_strategy="group_by_length" if args.group_by_length else "random",
        length_column_name="length",
        report_to=args.report_to.split(","),
        disable_tqdm=args.no_tqdm,
        seed=args.seed,
        deepspeed=args.deepspeed,
    )


def resolve_checkpoint(args) -> str | None:
    if args.resume_from_checkpoint != "latest":
        return args.resume_from_checkpoint
    # Skips (with a warning naming it) a checkpoint-N left half-written by a kill while saving.
    last = phi3v.last_complete_checkpoint(args.output_dir)
    print0(f"resuming from {last}" if last else f"no checkpoint-* in {args.output_dir}: starting from scratch")
    return last


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


def clean_prediction(text: str) -> str:
    """The original's cleaning of a generated answer, applied once: whitespace, then dots, around it.

    Not idempotent ("5 ." becomes "5 "), so it runs once, in `evaluate`, as in the original."""
    return text.strip().strip(".")


def anls_score(prediction: str, gold_answers: list[str], tau: float = 0.5) -> float:
    """ANLS of one cleaned prediction (`clean_prediction`): best over the gold answers of 1 - normalised
    edit distance, 0 at or past tau.

    As the original recipe: case-sensitive, gold answers used as they are, an empty prediction scores 0.
    """
    if not prediction:
        return 0.0
    best = 0.0
    for gold in gold_answers:
        distance = Levenshtein.distance(gold, prediction) / max(len(gold), len(prediction))
        best = max(best, 1.0 - distance if distance < tau else 0.0)
    return best


def anls(predictions: list[str], answers: list[list[str]], tau: float = 0.5) -> float:
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions")
    if not predictions:
        return 0.0
    return sum(anls_score(p, a, tau) for p, a in zip(predictions, answers)) / len(predictions)


def autocast_context(args, device: torch.device):
    # Generation runs in the training precision; fp32 weights on GPU get fp16 autocast like training.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16 if args.bf16 else torch.float16)
    return nullcontext()


@torch.no_grad()
def evaluate(model, processor, dataset, args, device, out_file: Path, rank: int, world_size: int) -> float | None:
    """Greedy answers for this process's shard, gathered; rank 0 scores them and writes `out_file`."""
    tokenizer = processor.tokenizer
    padding_side, was_training = tokenizer.padding_side, model.training
    tokenizer.padding_side = "left"  # new tokens must follow every prompt directly
    model.eval()
    shard = dataset.shard(world_size, rank, contiguous=True)
    records = []
    try:
        for start in range(0, len(shard), args.eval_batch_size):
            rows = shard[start : start + args.eval_batch_size]
            prompts = [chat_prompt(tokenizer, mini_question(q)) for q in rows["query"]]
            images = [[load_image(image)] for image in rows["image"]]
            batch = processor(text=prompts, images=images, padding=True).to(device)
            with autocast_context(args, device):
                output = model.generate(
                    **batch,
                    max_new_tokens=args.max_new_tokens,
                    eos_token_id=EOS_TOKEN_IDS,
                    pad_token_id=tokenizer.pad_token_id,
                    do_sample=False,
                    use_cache=True,
                )
            texts = processor.batch_decode(
                output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
            for query, answers, text in zip(rows["query"], rows["answers"], texts):
                records.append({"question": query["en"], "prediction": clean_prediction(text), "answers": answers})
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)

    records = gather_object(records)
    if rank != 0:
        return None
    predictions = [r["prediction"] for r in records]
    answers = [r["answers"] for r in records]
    scores = [anls_score(p, a) for p, a in zip(predictions, answers)]
    score = sum(scores) / max(len(scores), 1)
    empty = sum(not p for p in predictions)
    if empty:
        print0(f"warning: {empty} empty predictions (scored 0)")
    result = {
        "anls": score,
        "num_samples": len(records),
        "questions": [r["question"] for r in records],
        "predictions": predictions,
        "answers": answers,
        "scores": scores,
    }
    out_file.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print0(f"{out_file.name}: ANLS {100 * score:.2f} on {len(records)} questions")
    return score


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------


def save_loss_curve(output_dir: Path, log_history: list[dict]):
    """loss_curve.png: training loss (and held-out loss with --eval_steps), learning rate on a second axis."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print0("matplotlib is not installed: no loss_curve.png")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    lines = []
    for key, name in (("loss", "train loss"), ("eval_loss", "held-out loss")):
        points = [(h["step"], h[key]) for h in log_history if key in h]
        if points:
            lines += ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=name)
    ax.set(xlabel="step", ylabel="loss", title="loss and learning rate")
    lr_points = [(h["step"], h["learning_rate"]) for h in log_history if "learning_rate" in h and "loss" in h]
    if lr_points:
        lr_ax = ax.twinx()
        lines += lr_ax.plot(*zip(*lr_points), color="tab:gray", linestyle="--", label="learning rate")
        lr_ax.set_ylabel("learning rate")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    if lines:
        ax.legend(lines, [line.get_label() for line in lines])
    fig.tight_layout()
    fig.savefig(output_dir / "loss_curve.png", dpi=100)
    plt.close(fig)


def save_merged_lora(args, output_dir: Path):
    """Write base + LoRA as one drop-in model folder to output_dir/merged (loads without peft).

    As `python -m phi3v.merge`: the base reloaded in fp32 on CPU (also for QLoRA: merging into 4-bit
    weights would quantise the update away), the saved adapter folded in, weights in the base's dtype.
    """
    merged_dir = phi3v.saving.save_merged(output_dir, output_dir / "merged", base=args.model_name_or_path)
    print0(f"merged model written to {merged_dir}")


def main(argv=None):
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if args.deepspeed:
        set_single_process_env()
    set_seed(args.seed)  # LoRA initialisation happens before Trainer seeds anything
    training_args = make_training_args(args, on_gpu, int(os.environ.get("WORLD_SIZE", 1)))
    rank, world_size = training_args.process_index, training_args.world_size
    local_rank = max(training_args.local_process_index, 0)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    finished = finished_run_files(output_dir)
    if finished and not args.preflight_only:
        print0(f"--overwrite_output_dir: {output_dir} holds a finished run ({', '.join(finished)}); the new run "
               "replaces these files as it writes its own")

    with training_args.main_process_first(local=True, desc="loading the processor and data"):
        processor = AutoProcessor.from_pretrained(
            args.model_name_or_path, num_crops=args.num_crops,
            **({"resize_backend": args.resize_backend} if args.resize_backend else {}),
        )
        processor.tokenizer.padding_side = "right"
        train_data, test_data = load_data(args)
    # Before the model is loaded: bad data fails in seconds, on every rank alike.
    train_data, eval_data, eval_loss_data, train_lengths = preflight(
        train_data, test_data, processor.tokenizer, args, is_main=rank == 0)
    if args.group_by_length:  # the Trainer's length-grouped sampler reads this column
        train_data = train_data.add_column("length", train_lengths)
    with training_args.main_process_first(local=True, desc="loading the model"):
        model = load_model(args, on_gpu, local_rank)
    if not args.use_qlora:
        model.to(training_args.device)

    checkpoint = resolve_checkpoint(args) if args.resume_from_checkpoint else None
    if checkpoint and (output_dir / "eval_before.json").exists():
        print0("resuming: keeping the existing eval_before.json")
    else:
        evaluate(model, processor, eval_data, args, training_args.device, output_dir / "eval_before.json",
                 rank, world_size)

    throughput = ThroughputCallback(samples_per_step=args.batch_size)
    trainer = DocVQATrainer(
        model=model,
        args=training_args,
        data_collator=DocVQACollator(processor, packing=args.packing),
        train_dataset=train_data,
        eval_dataset=eval_loss_data,
        processing_class=processor,
        throughput=throughput,
    )
    # Full fine-tuning: every checkpoint-N also becomes a drop-in model folder (and stays resumable).
    trainer.add_callback(phi3v.saving.DropInCheckpoints(args.model_name_or_path, processor.image_processor))
    trainer.train(resume_from_checkpoint=checkpoint)

    model = trainer.accelerator.unwrap_model(trainer.model)
    model.config.use_cache = True  # the saved config is for inference
    trainer.save_model(str(output_dir))  # full model, or the LoRA adapter only
    if trainer.is_world_process_zero():
        processor.save_pretrained(output_dir)
        if not args.use_lora:  # a drop-in folder: replaces the base's as is, for the official code and vLLM too
            dtype = phi3v.saving.base_dtype(args.model_name_or_path)
            phi3v.saving.finish_drop_in(output_dir, args.model_name_or_path, processor.image_processor, dtype)
        (output_dir / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2) + "\n")
        save_loss_curve(output_dir, trainer.state.log_history)

    evaluate(model, processor, eval_data, args, training_args.device, output_dir / "eval_after.json",
             rank, world_size)

    if args.merge_lora and trainer.is_world_process_zero():
        save_merged_lora(args, output_dir)
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
