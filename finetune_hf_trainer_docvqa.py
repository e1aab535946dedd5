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

Data without the hub
    `--dataset_path` takes a local copy of the mini set: a `save_to_disk` DatasetDict with `train`
    and `test` splits, or a folder of parquet files named per split (`train-*.parquet`,
    `test-*.parquet`, or `train/` and `test/` sub-folders), in the hub schema: `image`, `query`
    (a struct with an `en` key), `answers` (list of str). `--full_train_dataset_path` takes the
    cauldron DocVQA copy (`save_to_disk` folder or parquet files): `images` (list of images),
    `texts` (list of {user, assistant, source}).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import io
import json
import math
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
from transformers.trainer_utils import get_last_checkpoint

import phi3v

MINI_DOCVQA = "nielsr/docvqa_1200_examples"
MINI_DROP_COLUMNS = ["id", "words", "bounding_boxes", "answer"]
CAULDRON, CAULDRON_CONFIG = "HuggingFaceM4/the_cauldron", "docvqa"
DEFAULT_DS_CONFIG = Path(__file__).resolve().parent / "ds_configs" / "zero2.json"
# <|end|> and <|endoftext|>: generation stops at either.
EOS_TOKEN_IDS = [32007, 32000]
ANSWER_SUFFIX = "<|end|>\n<|endoftext|>"
IMAGE_TAG = re.compile(r"<\|image_\d+\|>")
TOKENS_PER_CROP = 144


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model_name_or_path", default="microsoft/Phi-3.5-vision-instruct", help="hub id or local folder")
    add("--use_flash_attention", action="store_true", help="flash_attention_2 (needs flash-attn, CUDA and --bf16)")
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
    add("--resume_from_checkpoint", default=None, help="checkpoint folder, or 'latest' (newest in output_dir)")
    add("--eval_steps", type=int, default=0, help="0: off; N: held-out loss every N steps")
    add("--max_eval_loss_samples", type=int, default=64, help="test rows used for the held-out loss")
    add("--max_train_samples", type=int, default=None, help="use only the first N training rows")
    add("--max_eval_samples", type=int, default=None, help="generate for only the first N test rows")
    add("--max_new_tokens", type=int, default=64)
    add("--max_length", type=int, default=8192, help="drop training samples longer than this (tokens)")
    add("--merge_lora", action="store_true", help="LoRA runs: also write a merged full model to output_dir/merged")
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
        if not args.bf16:
            parser.error("--use_flash_attention needs --bf16: flash attention cannot run in fp16 mixed precision "
                         "with fp32 weights")
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
    if args.deepspeed.lower() == "none" or args.use_lora:
        args.deepspeed = None  # LoRA/QLoRA never use DeepSpeed, as in the original recipe
    elif not os.path.isfile(args.deepspeed):
        parser.error(f"--deepspeed {args.deepspeed}: no such file")
    if args.eval_batch_size is None:
        args.eval_batch_size = args.batch_size_per_gpu
    return args


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
        named = [f for f in files if f.stem == split or f.name.startswith(f"{split}-") or f.parent.name == split]
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
    """Raw dataset rows -> a right-padded training batch; images are decoded here (in the workers).

    Only the answer, <|end|>, "\\n" and <|endoftext|> carry a loss; the prompt (with the image
    tokens) is masked with -100.
    """

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.pad_id = self.tokenizer.pad_token_id

    def encode(self, row: dict) -> tuple[list[int], list[int], torch.Tensor, torch.Tensor]:
        image, user, answer = training_example(row)
        prompt = self.processor(text=chat_prompt(self.tokenizer, user), images=[image])
        prompt_ids = prompt["input_ids"][0].tolist()
        # No BOS before the answer: it continues the prompt.
        answer_ids = self.tokenizer(f"{answer}{ANSWER_SUFFIX}", add_special_tokens=False).input_ids
        labels = [-100] * len(prompt_ids) + answer_ids
        return prompt_ids + answer_ids, labels, prompt["pixel_values"], prompt["image_sizes"]

    def __call__(self, rows: list[dict]) -> dict:
        encoded = [self.encode(row) for row in rows]
        width = max(len(ids) for ids, *_ in encoded)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        # From the lengths, not from input_ids != pad: <|endoftext|> has the pad id and is a real token.
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, row_labels, _, _) in enumerate(encoded):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(ids)] = torch.tensor(row_labels)
            attention_mask[i, : len(ids)] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": torch.cat([e[2] for e in encoded]),
            "image_sizes": torch.cat([e[3] for e in encoded]),
        }


def text_tokens(tokenizer, prompt: str) -> int:
    """Text tokens of a prompt as the processor counts them (each chunk around an image tag has its BOS)."""
    return sum(len(tokenizer(chunk).input_ids) for chunk in IMAGE_TAG.split(prompt))


def image_size_from_header(cell) -> tuple[int, int]:
    """(width, height) of a stored image ({bytes, path}) without decoding its pixels."""
    with Image.open(io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell["path"]) as image:
        return image.size


def drop_long_samples(dataset, tokenizer, max_length: int, num_crops: int):
    """Drop training rows whose longest possible sequence exceeds max_length (image tokens are never cut).

    Rows that fit even with the largest image at `num_crops` are kept without opening the image;
    for the others the size is read from the image file header.
    """
    cauldron = "texts" in dataset.column_names
    image_column = "images" if cauldron else "image"
    most_image_tokens = (num_crops + 1) * TOKENS_PER_CROP + 1 + (num_crops + 1) * int(math.isqrt(TOKENS_PER_CROP))
    suffix = len(tokenizer(ANSWER_SUFFIX, add_special_tokens=False).input_ids)
    keep = []
    stored = dataset.with_format("arrow")  # raw {bytes, path} cells: nothing decoded
    texts = dataset.select_columns(["texts"] if cauldron else ["query", "answers"])
    for index, row in enumerate(texts):
        if cauldron:
            turns = [(f"<|image_1|>\n{t['user']}", [t["assistant"]]) for t in row["texts"]]
        else:
            turns = [(mini_question(row["query"]), row["answers"])]
        text = max(
            text_tokens(tokenizer, chat_prompt(tokenizer, user))
            + max(len(tokenizer(a, add_special_tokens=False).input_ids) for a in answers)
            + suffix
            for user, answers in turns
        )
        if text + most_image_tokens > max_length:
            cell = stored[index][image_column][0].as_py()
            width, height = image_size_from_header(cell[0] if cauldron else cell)
            if text + phi3v.num_image_tokens(width, height, num_crops) > max_length:
                continue
        keep.append(index)
    if len(keep) < len(dataset):
        print0(f"dropped {len(dataset) - len(keep)} of {len(dataset)} training samples longer than "
               f"--max_length {max_length}")
        dataset = dataset.select(keep)
    return dataset


def load_data(args, tokenizer):
    """(training rows, generation-eval rows, held-out-loss rows or None); rows stay raw (lazy images)."""
    test = load_split(MINI_DOCVQA, None, "test", args.dataset_path)
    test = test.remove_columns([c for c in MINI_DROP_COLUMNS if c in test.column_names])
    if args.full_train:
        train = load_split(CAULDRON, CAULDRON_CONFIG, "train", args.full_train_dataset_path, unsplit_ok=True)
        train = train.select_columns(["images", "texts"])
    else:
        train = load_split(MINI_DOCVQA, None, "train", args.dataset_path)
        train = train.remove_columns([c for c in MINI_DROP_COLUMNS if c in train.column_names])
    if args.max_train_samples:
        train = train.select(range(min(args.max_train_samples, len(train))))
    train = drop_long_samples(train, tokenizer, args.max_length, args.num_crops)

    eval_loss = None
    if args.eval_steps > 0:
        eval_loss = test.select(range(min(args.max_eval_loss_samples, len(test))))
        # Always the first gold answer, so that the held-out loss is comparable between evaluations.
        eval_loss = eval_loss.map(lambda answers: {"answers": answers[:1]}, input_columns="answers", keep_in_memory=True)
    if args.max_eval_samples:
        test = test.select(range(min(args.max_eval_samples, len(test))))
    print0(f"training rows: {len(train)}, evaluation rows: {len(test)}")
    return train, test, eval_loss


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
        include_num_input_tokens_seen="non_padding",
        report_to=args.report_to.split(","),
        disable_tqdm=args.no_tqdm,
        seed=args.seed,
        deepspeed=args.deepspeed,
    )


def resolve_checkpoint(args) -> str | None:
    if args.resume_from_checkpoint != "latest":
        return args.resume_from_checkpoint
    last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
    print0(f"resuming from {last}" if last else f"no checkpoint-* in {args.output_dir}: starting from scratch")
    return last


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


def clean_prediction(text: str) -> str:
    return text.strip().strip(".")


def anls_score(prediction: str, gold_answers: list[str], tau: float = 0.5) -> float:
    """ANLS of one answer: best over the gold answers of 1 - normalised edit distance, 0 at or past tau.

    Case-sensitive, as the original recipe (only whitespace and dots around the prediction go).
    """
    prediction = clean_prediction(prediction)
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
            batch = processor(text=prompts, images=[[image] for image in rows["image"]], padding=True).to(device)
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


def save_merged_lora(model, args, processor, output_dir: Path):
    """Write base + LoRA as one full model to output_dir/merged (loads without peft)."""
    merged_dir = output_dir / "merged"
    if args.use_qlora:
        # Merging into 4-bit weights would quantise the update away: reload the base model in full
        # precision on CPU and merge the saved adapter into it instead.
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(
            args.model_name_or_path, dtype=torch.bfloat16 if args.bf16 else torch.float32, device_map="cpu"
        )
        merged = PeftModel.from_pretrained(base, str(output_dir)).merge_and_unload()
    else:
        merged = model.merge_and_unload()
    merged.config.use_cache = True
    merged.save_pretrained(merged_dir)
    processor.save_pretrained(merged_dir)
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

    with training_args.main_process_first(local=True, desc="loading the processor, data and model"):
        processor = AutoProcessor.from_pretrained(args.model_name_or_path, num_crops=args.num_crops)
        processor.tokenizer.padding_side = "right"
        train_data, eval_data, eval_loss_data = load_data(args, processor.tokenizer)
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
        data_collator=DocVQACollator(processor),
        train_dataset=train_data,
        eval_dataset=eval_loss_data,
        processing_class=processor,
        throughput=throughput,
    )
    trainer.train(resume_from_checkpoint=checkpoint)

    model = trainer.accelerator.unwrap_model(trainer.model)
    model.config.use_cache = True  # the saved config is for inference
    trainer.save_model(str(output_dir))  # full model, or the LoRA adapter only
    if trainer.is_world_process_zero():
        processor.save_pretrained(output_dir)
        (output_dir / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2) + "\n")
        save_loss_curve(output_dir, trainer.state.log_history)

    evaluate(model, processor, eval_data, args, training_args.device, output_dir / "eval_after.json",
             rank, world_size)

    if args.merge_lora and trainer.is_world_process_zero():
        save_merged_lora(model, args, processor, output_dir)
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
