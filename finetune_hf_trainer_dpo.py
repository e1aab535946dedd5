"""Preference tuning (DPO) of Phi-3.5-vision: given images, a prompt, a preferred and a rejected answer, make the
model prefer the first, without a reward model. Trained by TRL's DPOTrainer (the loss, the reference model, the
reward metrics); this script brings the data layout, the checks, the evaluation and the drop-in saves.

The data (`convert_preference_data.py` writes it from a hub preference set such as openbmb/RLAIF-V-Dataset):

    data_dir/pref_train.jsonl   preferences to train on
    data_dir/pref_val.jsonl     held-out preferences (evaluated before and after training)
    data_dir/images/...         images; the jsonl image paths are relative to this folder

One preference per line:

    {"id": "...", "images": ["a.jpg"], "prompt": "What is in the picture?", "chosen": "A red square.", "rejected": "A blue circle."}

`images` (0..n paths) belong to the prompt: the user message is `<|image_1|>...<|image_n|>\\n{prompt}` (the script
writes the tags; the texts must not carry any). The answers are scored as `{answer}<|end|>\\n<|endoftext|>`, the way
the supervised recipes train them. A line may carry `"conversations"`, earlier turns in the layout of
convert_ucf101.py (`[{"images": [...], "user": ..., "assistant": ...}, ...]`, each its own chat-template block),
before the prompt; only the last answer is compared. Your own files: --train_file / --eval_file / --image_dir
(relative to --data_dir, or absolute).

DPO compares the policy with a reference model, the starting model: with full fine-tuning a second, frozen copy
of it is held in memory (TRL 1.16 refuses to precompute the reference log-probabilities for vision data); with
--use_lora/--use_qlora the reference is the same weights with the adapter switched off, so nothing is held twice.
--beta and --loss_type are TRL's.

Launch (full fine-tuning uses DeepSpeed ZeRO-2, `ds_configs/zero2.json`; LoRA/QLoRA use plain DDP):

    # one node, 8 GPUs
    torchrun --nproc_per_node=8 finetune_hf_trainer_dpo.py --data_dir ./rlaif_v --bf16 --use_flash_attention
    # several nodes: the same on every node, with its rank
    torchrun --nnodes=2 --node_rank=0 --master_addr=10.0.0.1 --master_port=29500 --nproc_per_node=8 \\
        finetune_hf_trainer_dpo.py --data_dir ./rlaif_v --bf16 --use_flash_attention
    # one process (one GPU, or CPU for a smoke test): plain python is enough
    python finetune_hf_trainer_dpo.py --data_dir ./rlaif_v --use_lora --bf16

Hardware suggestions (every step runs each row twice, chosen and rejected, plus a reference pass without grad):
  * A100/H100 x8: `--bf16 --use_flash_attention`, full fine-tuning (ZeRO-2; the reference copy adds the weights
    once more per GPU, 8 GB in bf16), or LoRA.
  * One 80 GB GPU: `--use_lora --bf16 --use_flash_attention` (full fine-tuning needs the optimizer states of
    4.2B parameters, about 50 GB, plus the reference copy).
  * V100 (no bf16, no flash attention): `--use_lora` in fp16 mixed precision (the default without --bf16).
  * Consumer GPUs: `--use_lora` (add `--bf16` on Ampere or newer), or `--use_qlora` (Turing or newer).
  * CPU (no CUDA): runs in fp32 (or --bf16) with gloo; only useful for smoke tests with a tiny model.

Before the model is loaded, every train and val line the run will use is checked (a "preflight"): malformed
JSON (file and line number), a line that is not {images, prompt, chosen, rejected}, an empty prompt, chosen or
rejected text, chosen == rejected, image tags written into the texts, malformed earlier turns, every image
(missing, unreadable, truncated: each one is decoded), and the length of the longer of the two sequences (prompt,
earlier turns and images included) against --max_length (nothing is truncated). Any problem stops the run with one
report naming every bad line and its reason (also in output_dir/invalid_rows.jsonl) and exit status 1;
`--skip_invalid` drops those lines (listed in output_dir/skipped_rows.jsonl) and trains on the rest;
`--preflight_only` prints and writes a summary (preflight_summary.json) without loading any weights. An
--output_dir that holds a finished run, or another run's checkpoints, is refused unless `--overwrite_output_dir`
(nothing is deleted); `--resume_from_checkpoint latest` resumes from the newest complete checkpoint.

Outputs in --output_dir: eval_before.json / eval_after.json (on the val lines: preference_accuracy, the share of
rows whose reward margin beta * ((log p - log p_ref)(chosen) - (log p - log p_ref)(rejected)) is positive, 0
before training where policy == reference; logp_accuracy, the share where the policy's mean log-probability per
answer token is higher for chosen than for rejected; mean_reward_margin; per row ids, margins and log-probs;
with --generate the greedy answers), log_history.json (TRL's loss, rewards/chosen, rewards/rejected,
rewards/margins, rewards/accuracies, logps/*, and pairs_per_second, tokens_per_second), loss_curve.png (loss and
learning rate; reward margins and accuracy), the model (full fine-tuning) or the LoRA adapter (+ `merged/` with
--merge_lora), the processor, and checkpoint-* with --save_steps. Model folders (full fine-tuning output and
checkpoint-N, merged/) replace the base model's folder as is (phi3v/saving.py), also for the official remote code
and vLLM.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import multiprocessing
import os
import socket
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import phi3v  # registers Phi-3.5-vision with the Auto classes
import phi3v.saving  # drop-in model folders (the official layout) and LoRA merging
# Adapt: the prompt format (chat template per turn, image tags, answer suffix) and the checks of earlier turns live
# in phi3v/conversation.py, shared with the other recipes and `python -m phi3v.predict`.
from phi3v.conversation import (
    IMAGE_TAG,
    answer_ids,
    conversation_length,
    conversation_problems,
    encode_conversation,
    generate_answers,
    generation_batch,
    image_problems,
)
from phi3v.validation import InvalidSample, Preflight

SCRIPT_DIR = Path(__file__).resolve().parent
TRAIN_FILE, EVAL_FILE, IMAGE_DIR = "pref_train.jsonl", "pref_val.jsonl", "images"
# TRL 1.16's DPO losses (DPOConfig.loss_type).
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")  # fmt: skip


# =============================================================================================
# Arguments
# =============================================================================================


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add = parser.add_argument
    add("--model_name_or_path", default="microsoft/Phi-3.5-vision-instruct", help="hub id or local folder: the "
        "starting model, and DPO's reference model")
    add("--data_dir", required=True, help="output folder of convert_preference_data.py (pref_{train,val}.jsonl + "
        "images/), or of your own preferences in that layout")
    add("--train_file", default=TRAIN_FILE, help="training lines (relative to --data_dir, or absolute)")
    add("--eval_file", default=EVAL_FILE, help="held-out lines: evaluated before and after training")
    add("--image_dir", default=IMAGE_DIR, help="folder the jsonl image paths are relative to (relative to --data_dir, "
        "or absolute)")
    add("--beta", type=float, default=0.1, help="TRL's beta: how far the policy may move from the reference (higher "
        "= closer); also scales the reward margins reported")
    add("--loss_type", choices=LOSS_TYPES, default="sigmoid", help="TRL's DPO loss (sigmoid: the DPO paper's)")
    add("--generate", action="store_true", help="also write the greedy answers to the val prompts into "
        "eval_before.json / eval_after.json")
    add("--preflight_only", action="store_true",
        help="check the data and print a summary (rows, images per row, tokens per row at --num_crops, rows over "
        "--max_length, invalid rows), also written to output_dir/preflight_summary.json (+ invalid_rows.jsonl), "
        "then exit: 0 if the data is clean, else 1. No model weights are loaded; nothing else is written")
    add("--use_flash_attention", action="store_true",
        help="flash-attention 2 (needs flash-attn and CUDA; implies --bf16, as the other recipes)")
    add("--bf16", action="store_true", help="bf16 (else fp16 mixed precision on GPU, fp32 on CPU)")
    add("--use_lora", action="store_true", help="LoRA instead of full fine-tuning (the reference is the base: the "
        "adapter switched off)")
    add("--use_qlora", action="store_true", help="4-bit QLoRA (implies --use_lora; needs bitsandbytes)")
    add("--lora_rank", type=int, default=64, help="LoRA rank")
    add("--lora_alpha_ratio", type=float, default=2, help="lora_alpha = round(lora_rank * ratio)")
    add("--lora_dropout", type=float, default=0.0, help="LoRA dropout")
    add("--freeze_vision_model", action="store_true", help="do not train the CLIP tower and the projector")
    add("--no_gradient_checkpointing", dest="gradient_checkpointing", action="store_false",
        help="keep all activations instead of recomputing them in the backward pass: faster, much more memory")
    add("--batch_size", type=int, default=16, help="global batch size in preference pairs (over all GPUs and "
        "accumulation steps)")
    add("--batch_size_per_gpu", type=int, default=1, help="pairs per micro-batch and process (each is 2 sequences)")
    add("--num_crops", type=int, default=4, help="max 336x336 crops per image (1..16)")
    add("--resize_backend", choices=["pil", "torch"], default=None,
        help="resize in the HD transform (default: the model folder's setting, pil); see the other recipes")
    add("--num_train_epochs", type=float, default=1, help="epochs (ignored when --max_steps > 0)")
    add("--max_steps", type=int, default=-1, help="> 0: train this many steps (overrides epochs)")
    add("--learning_rate", type=float, default=1e-6, help="peak learning rate (linear decay); TRL's default for "
        "full fine-tuning, LoRA usually wants 10-50x more")
    add("--wd", type=float, default=0.0, help="weight decay")
    add("--warmup_steps", type=int, default=10, help="linear warm-up steps")
    add("--output_dir", default="./output/", help="model, adapter, eval files, checkpoints")
    add("--overwrite_output_dir", action="store_true",
        help="allow an --output_dir that holds a finished run or another run's checkpoints (nothing is deleted; "
        "this run's files are written over them)")
    add("--no-tqdm", dest="no_tqdm", action="store_true", help="no progress bars")
    add("--logging_steps", type=int, default=10, help="log loss, rewards and throughput every N steps")
    add("--save_steps", type=int, default=0, help="0: only the final save; > 0: resumable checkpoints every N steps")
    add("--save_total_limit", type=int, default=None, help="keep at most this many checkpoints")
    add("--resume_from_checkpoint", default=None,
        help="checkpoint folder, or `latest` (the newest complete checkpoint-N in output_dir)")
    add("--max_train_samples", type=int, default=None, help="use only the first N training lines")
    add("--max_eval_samples", type=int, default=None, help="evaluate on the first N val lines only")
    add("--eval_batch_size", type=int, default=None, help="pairs per eval batch and process (default: "
        "batch_size_per_gpu)")
    add("--max_new_tokens", type=int, default=64, help="answer length for --generate")
    add("--max_length", type=int, default=None,
        help="lines whose longer sequence (earlier turns, prompt, image tokens and the longer answer) has more tokens "
        "than this are invalid (see --skip_invalid); nothing is truncated. None: the model's context length "
        "(131072 for Phi-3.5-vision); set it to have the preflight report longer lines")
    add("--skip_invalid", action="store_true",
        help="drop the lines the preflight check finds invalid (listed in output_dir/skipped_rows.jsonl) and "
        "train on the rest; default: stop before training with one report of all of them")
    add("--merge_lora", action="store_true", help="LoRA/QLoRA: also write the base (reloaded in fp32) with the adapter "
        "merged in to output_dir/merged, a drop-in model folder in the base's dtype (as python -m phi3v.merge)")
    add("--report_to", default="none", help="none, tensorboard, wandb, ... (comma-separated)")
    add("--seed", type=int, default=42, help="random seed")
    add("--dataloader_num_workers", type=int, default=4, help="processes decoding images")
    add("--deepspeed", default=str(SCRIPT_DIR / "ds_configs" / "zero2.json"),
        help="DeepSpeed config for full fine-tuning ('none' to turn it off); LoRA/QLoRA never use it")
    add("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # passed by the `deepspeed` launcher
    args = parser.parse_args(argv)
    validate_args(parser, args)
    return args


def validate_args(parser, args):
    """Fail in one line before anything heavy is loaded."""
    if args.use_qlora:
        args.use_lora = True
    if args.use_flash_attention:
        if importlib.util.find_spec("flash_attn") is None:
            parser.error("--use_flash_attention needs the flash-attn package (pip install flash-attn)")
        if not torch.cuda.is_available():
            parser.error("--use_flash_attention needs a CUDA GPU")
        args.bf16 = True  # flash attention cannot run in fp16 mixed precision with fp32 weights
    if args.use_qlora and importlib.util.find_spec("bitsandbytes") is None:
        parser.error("--use_qlora needs the bitsandbytes package (pip install bitsandbytes)")
    if not 1 <= args.num_crops <= 16:
        parser.error(f"--num_crops must be between 1 and 16, got {args.num_crops}")
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if args.batch_size_per_gpu < 1 or args.batch_size % (world_size * args.batch_size_per_gpu) != 0:
        parser.error(
            f"--batch_size {args.batch_size} must be a multiple of world size {world_size} x "
            f"--batch_size_per_gpu {args.batch_size_per_gpu}"
        )
    if args.beta <= 0:
        parser.error(f"--beta must be > 0, got {args.beta}")
    if args.lora_rank < 1:
        parser.error(f"--lora_rank must be >= 1, got {args.lora_rank}")
    if args.merge_lora and not args.use_lora:
        parser.error("--merge_lora only makes sense with --use_lora/--use_qlora")
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        parser.error(f"--data_dir {data_dir} does not exist: make it with python convert_preference_data.py "
                     f"--out_dir {data_dir}")
    train_file, eval_file, image_dir = data_paths(args)
    missing = [args.train_file] if not train_file.is_file() else []
    missing += [args.eval_file] if not eval_file.is_file() else []
    missing += [args.image_dir.rstrip("/") + "/"] if not image_dir.is_dir() else []
    if missing:
        parser.error(
            f"--data_dir {data_dir} lacks {', '.join(missing)}: expected the layout of convert_preference_data.py "
            f"(python convert_preference_data.py --out_dir {data_dir} ...), or your files named by --train_file, "
            "--eval_file and --image_dir"
        )
    if args.preflight_only:
        args.deepspeed = "none"  # nothing is trained: no DeepSpeed set-up, and any --output_dir will do
    else:
        check_output_dir(parser, args)
    if args.resume_from_checkpoint not in (None, "latest") and not Path(args.resume_from_checkpoint).is_dir():
        parser.error(f"--resume_from_checkpoint {args.resume_from_checkpoint} is not a folder")
    if args.deepspeed.lower() in ("", "none"):
        args.deepspeed = None
    if args.use_lora:
        args.deepspeed = None  # as the other recipes: LoRA/QLoRA train with plain DDP
    elif args.deepspeed and not Path(args.deepspeed).is_file():
        parser.error(f"--deepspeed config {args.deepspeed} not found")


def data_paths(args) -> tuple[Path, Path, Path]:
    """(train file, eval file, image folder): --train_file/--eval_file/--image_dir under --data_dir unless absolute."""
    data_dir = Path(args.data_dir)
    return data_dir / args.train_file, data_dir / args.eval_file, data_dir / args.image_dir


# Files that only a run that got to the end writes (the final model or adapter, its logs, its evaluation).
FINISHED_RUN_FILES = ("eval_after.json", "log_history.json", "model.safetensors", "model.safetensors.index.json",
                      "pytorch_model.bin", "adapter_model.safetensors", "adapter_config.json", "merged")  # fmt: skip


def check_output_dir(parser, args):
    """Never write over a finished run, nor start afresh over another run's checkpoints, by accident."""
    output_dir = Path(args.output_dir)
    if not output_dir.is_dir():
        return
    finished = [name for name in FINISHED_RUN_FILES if (output_dir / name).exists()]
    checkpoints = sorted(p.name for p in output_dir.glob("checkpoint-*") if p.is_dir())
    if args.overwrite_output_dir:
        if finished or checkpoints:
            print(
                f"--overwrite_output_dir: {output_dir} already holds {', '.join(finished + checkpoints)}; "
                "files of this run will be written over them (nothing is deleted)"
            )
        return
    if finished:
        parser.error(
            f"--output_dir {output_dir} already holds a finished run ({', '.join(finished)}); "
            "choose another --output_dir, or pass --overwrite_output_dir to write over it"
        )
    if checkpoints and not args.resume_from_checkpoint:
        parser.error(
            f"--output_dir {output_dir} holds checkpoints of an unfinished run ({', '.join(checkpoints)}); "
            "pass --resume_from_checkpoint latest to continue it, or --overwrite_output_dir to start over"
        )


def ensure_distributed_env():
    """Let `python script.py` (no launcher) run DeepSpeed: it wants the torch.distributed variables
    (otherwise it tries MPI discovery and fails without mpi4py)."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))


# =============================================================================================
# Data
# =============================================================================================


def read_jsonl(path: Path, name: str, limit: int | None, report) -> list[tuple[int, dict]]:
    """(line number, record) of the first `limit` non-empty lines; malformed lines go to the report as
    "{name} line N" (record None)."""
    records = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and len(records) >= limit:
                break
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                report.add(f"{name} line {line_no}", f"not valid JSON: {e}", key=(name, line_no))
                record = None
            records.append((line_no, record))
    return records


def turns_of(record: dict, answer: str | None = None) -> list[dict]:
    """The line as turns of the converter layout: the earlier turns, then the prompt turn (with `answer`, if given)."""
    last = {"images": record.get("images") or [], "user": record["prompt"]}
    if answer is not None:
        last["assistant"] = answer
    return [*(record.get("conversations") or []), last]


def preference_problems(record) -> list[str]:
    """Why a jsonl record is not a preference in the layout (empty list: it is)."""
    # Adapt: the shape of your own preference lines.
    if not isinstance(record, dict):
        return [f"a line must be a JSON object, got {type(record).__name__}"]
    problems = []
    for key in ("prompt", "chosen", "rejected"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            problems.append(f"empty or missing {key} text")
        elif IMAGE_TAG.search(record[key]):
            problems.append(f"{key} text has its own image tag (the script writes the tags for 'images')")
    if not problems and record["chosen"].strip() == record["rejected"].strip():
        problems.append("chosen and rejected are the same text: nothing to prefer")
    images = record.get("images", [])
    if not isinstance(images, list) or not all(isinstance(rel, str) and rel for rel in images):
        problems.append("'images' must be a list of image paths (relative to the image folder)")
    if "conversations" in record and record["conversations"] != []:
        # The earlier turns: each must be a full turn of the converter layout.
        problems += [f"earlier turns: {p}" for p in conversation_problems({"conversations": record["conversations"]})]
    return problems


def _image_problems_chunk(records: list[dict], image_dir: Path) -> list[list[str]]:
    return [image_problems({"conversations": turns_of(record)}, image_dir) for record in records]


def check_images(records: list[dict], image_dir: Path, workers: int) -> list[list[str]]:
    """The image problems of every record; decoding (the slow part) in `workers` processes if > 1."""
    chunks = [records[i : i + 32] for i in range(0, len(records), 32)]
    if workers > 1 and len(chunks) > 1:
        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        with context.Pool(min(workers, len(chunks))) as pool:
            results = pool.starmap(_image_problems_chunk, [(chunk, image_dir) for chunk in chunks])
    else:
        results = [_image_problems_chunk(chunk, image_dir) for chunk in chunks]
    return [problems for chunk in results for problems in chunk]


def line_size(processor, record, image_dir: Path, num_crops: int) -> tuple[int | None, int | None, int | None]:
    """(images, tokens, image tokens) of the longer of a line's two sequences (prompt + chosen, prompt + rejected),
    from the image headers; None where the line is too broken to tell."""
    if not isinstance(record, dict):
        return None, None, None
    turns = record.get("conversations") or []
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        return None, None, None
    image_lists = [t.get("images") or [] for t in turns] + [record.get("images") or []]
    if not all(isinstance(rels, list) and all(isinstance(rel, str) and rel for rel in rels) for rels in image_lists):
        return None, None, None
    images = sum(len(rels) for rels in image_lists)
    texts = [t.get("user") for t in turns] + [t.get("assistant") for t in turns]
    texts += [record.get(key) for key in ("prompt", "chosen", "rejected")]
    if not all(isinstance(text, str) for text in texts):
        return images, None, None
    try:
        lengths = [conversation_length(processor, turns_of(record, record[key]), image_dir, num_crops)
                   for key in ("chosen", "rejected")]  # fmt: skip
    except InvalidSample:  # an image missing or not an image (reported by check_images)
        return images, None, None
    return images, *max(lengths)


def context_length(model_name_or_path: str) -> int:
    """The model's context length: `max_position_embeddings` of its config (131072 for Phi-3.5-vision)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_name_or_path).max_position_embeddings


def load_data(args, processor, is_main: bool, log):
    """(train records, val records), after a preflight check of every line the run will use.

    Checked before the model is loaded: malformed JSON, the line's shape, empty texts, chosen == rejected, image
    tags in the texts, the earlier turns, every image (decoded completely) and the length of the longer sequence
    against --max_length (from the image headers and the token formula). Any problem stops the run with one report
    of all of them (every rank reaches the same verdict), or with --skip_invalid those lines are dropped and listed
    in output_dir/skipped_rows.jsonl. With --preflight_only the run ends here with a summary.
    """
    if args.max_length is None:
        args.max_length = context_length(args.model_name_or_path)
    train_file, eval_file, image_dir = data_paths(args)
    report = Preflight(f"{args.data_dir}")
    splits = {
        "train": (args.train_file, read_jsonl(train_file, args.train_file, args.max_train_samples, report)),
        "val": (args.eval_file, read_jsonl(eval_file, args.eval_file, args.max_eval_samples, report)),
    }
    lengths = {}
    for split, (name, lines) in splits.items():
        shaped = []
        for line_no, record in lines:
            where = f"{name} line {line_no}"
            if isinstance(record, dict) and "id" in record:
                where += f" (id {record['id']})"
            problems = preference_problems(record) if record is not None else []  # None: malformed JSON, reported
            for problem in problems:
                report.add(where, problem, key=(name, line_no))
            if record is not None and not problems:
                shaped.append((line_no, record, where))
        decoded = check_images([record for _, record, _ in shaped], image_dir, args.dataloader_num_workers)
        for (line_no, record, where), problems in zip(shaped, decoded):
            for problem in problems:
                report.add(where, problem, key=(name, line_no))
        # Every line's size, whatever its problems (for the summary): a broken line may also be too long.
        for line_no, record in lines:
            images, length, image_tokens = line_size(processor, record, image_dir, args.num_crops)
            report.measure(split, (name, line_no), images, length)
            if length is None:
                continue
            lengths[name, line_no] = length
            if length > args.max_length:
                report.add(
                    f"{name} line {line_no}" + (f" (id {record['id']})" if "id" in record else ""),
                    f"{length} tokens ({image_tokens} of them image tokens) with the longer answer > --max_length "
                    f"{args.max_length}: raise --max_length, or lower --num_crops or the images per line",
                    key=(name, line_no),
                )
    if args.preflight_only:
        report.exit_with_summary(args.output_dir, args.max_length, args.num_crops, is_main)
    drop = report.finish(args.output_dir, args.skip_invalid, is_main)
    train, val = ([r for line_no, r in lines if r is not None and (name, line_no) not in drop]
                  for name, lines in splits.values())  # fmt: skip
    if not train:
        raise SystemExit(f"error: no valid training line in {train_file}: nothing to train on")
    if not val:
        log(f"no line of {eval_file} is used (empty, --max_eval_samples 0 or all invalid): no evaluation")
    longest = max(lengths.values(), default=0)
    log(f"preflight: {len(train)} train, {len(val)} val preferences valid in {args.data_dir}; "
        f"longest {longest} tokens (--max_length {args.max_length})")  # fmt: skip
    return train, val


def trl_dataset(records: list[dict]):
    """The training lines as the `datasets.Dataset` DPOTrainer takes; its `images` column makes TRL treat it as vision
    data (no tokenizing up front: the collator opens the images in the dataloader workers)."""
    from datasets import Dataset

    return Dataset.from_list([
        {"images": r.get("images") or [], "prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"],
         # Earlier turns as JSON text: their shape may differ from line to line, which Arrow columns cannot hold.
         "conversations": json.dumps(r.get("conversations") or [])}
        for r in records
    ])  # fmt: skip


class PreferenceCollator:
    """A batch of preference pairs in the rows DPOTrainer expects: first every `prompt + chosen`, then every
    `prompt + rejected`, right-padded; `completion_mask` marks the answer tokens (the last answer only). The images
    (pixel_values/image_sizes) follow the rows: the pairs' images, then the same again."""

    def __init__(self, processor, image_dir: Path):
        self.processor = processor
        self.image_dir = image_dir
        self.pad_token_id = processor.tokenizer.pad_token_id

    def __call__(self, examples: list[dict]) -> dict:
        tokenizer = self.processor.tokenizer
        rows, pixel_values, image_sizes = [], [], []
        prompts = []
        for ex in examples:
            earlier = ex["conversations"]
            earlier = json.loads(earlier) if isinstance(earlier, str) else earlier or []
            # The prompt: earlier turns (their answers included, unsupervised here), then the prompt turn's header.
            prompt = encode_conversation(self.processor, turns_of({**ex, "conversations": earlier}), self.image_dir,
                                         include_last_answer=False)  # fmt: skip
            prompts.append(prompt["input_ids"])
            if prompt["pixel_values"] is not None:
                pixel_values.append(prompt["pixel_values"])
                image_sizes.append(prompt["image_sizes"])
        for key in ("chosen", "rejected"):
            for ex, prompt_ids in zip(examples, prompts):
                rows.append((prompt_ids, answer_ids(tokenizer, ex[key])))
        width = max(len(p) + len(a) for p, a in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, (prompt_ids, completion_ids) in enumerate(rows):
            n, m = len(prompt_ids), len(completion_ids)
            input_ids[row, : n + m] = torch.tensor(prompt_ids + completion_ids)
            attention_mask[row, : n + m] = 1
            completion_mask[row, n : n + m] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
        if pixel_values:
            batch["pixel_values"] = torch.cat(pixel_values * 2)
            batch["image_sizes"] = torch.cat(image_sizes * 2)
        return batch


# =============================================================================================
# Model
# =============================================================================================


def precision(args):
    """(model dtype, bf16, fp16) for the Trainer: fp32 weights for fp16 AMP."""
    if args.bf16:
        return torch.bfloat16, True, False
    if torch.cuda.is_available():
        return torch.float32, False, True
    return torch.float32, False, False


def load_model(args, training_args):
    from transformers import AutoModelForCausalLM

    dtype, _, _ = precision(args)
    kwargs = {"dtype": dtype, "attn_implementation": "flash_attention_2" if args.use_flash_attention else "sdpa"}
    if args.use_qlora:
        from transformers import BitsAndBytesConfig

        compute_dtype = torch.bfloat16 if args.bf16 else (torch.float16 if torch.cuda.is_available() else torch.float32)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
        )
        kwargs["device_map"] = {"": training_args.local_process_index} if torch.cuda.is_available() else "cpu"
    with training_args.main_process_first(local=True):  # the first process downloads, the others reuse
        model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, **kwargs)
    model.config.use_cache = False  # training; generation passes use_cache=True
    return model


def create_model(args, training_args):
    """(policy, reference model or None, peft config or None).

    The reference is DPO's starting model. Full fine-tuning: a second, frozen copy. LoRA: none; TRL wraps the
    model with the peft config and switches the adapter off for the reference pass.
    """
    model = load_model(args, training_args)
    if args.freeze_vision_model:
        # Only the CLIP tower, the separators and the projector: the token embeddings still train.
        model.model.vision_embed_tokens.requires_grad_(False)
    if args.use_qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=args.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        phi3v.fix_4bit_cpu_gradients(model)  # else eval forwards on CPU break later LoRA gradients
    peft_config = ref_model = None
    if args.use_lora:
        from peft import LoraConfig

        # Adapt: which layers get LoRA. Language model always; CLIP + projector unless frozen. Not lm_head: TRL's
        # log-probabilities read lm_head.weight directly, so an adapter there would never train (TRL refuses it).
        targets = [name for name in phi3v.lora_target_modules(model, vision=not args.freeze_vision_model)
                   if name.rsplit(".", 1)[-1] != "lm_head"]  # fmt: skip
        peft_config = LoraConfig(
            r=args.lora_rank,
            lora_alpha=round(args.lora_rank * args.lora_alpha_ratio),
            lora_dropout=args.lora_dropout,
            target_modules=targets,
            init_lora_weights="gaussian",  # B = 0: policy == reference at the start, as DPO assumes
            task_type="CAUSAL_LM",
        )
    else:
        ref_model = load_model(args, training_args).eval().requires_grad_(False)
        if not args.deepspeed:
            ref_model.to(training_args.device)  # with DeepSpeed, TRL places it (an inference engine)
    if not args.use_qlora:
        model.to(training_args.device)  # quantized models are placed by device_map
    return model, ref_model, peft_config


# =============================================================================================
# Training
# =============================================================================================


def build_training_args(args):
    from trl import DPOConfig

    _, bf16, fp16 = precision(args)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    use_cpu = not torch.cuda.is_available()
    return DPOConfig(
        output_dir=args.output_dir,
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size_per_gpu,
        per_device_eval_batch_size=args.eval_batch_size or args.batch_size_per_gpu,
        gradient_accumulation_steps=args.batch_size // (world_size * args.batch_size_per_gpu),
        activation_checkpointing=args.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},  # needed for LoRA and frozen parts
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
        save_strategy="steps" if args.save_steps > 0 else "no",
        save_steps=args.save_steps if args.save_steps > 0 else 500,
        save_total_limit=args.save_total_limit,
        save_only_model=False,  # checkpoints keep optimizer, scheduler and RNG states: resumable
        eval_strategy="no",  # the held-out evaluation is this script's, before and after training
        bf16=bf16,
        fp16=fp16,
        use_cpu=use_cpu,
        ddp_backend="gloo" if use_cpu and "LOCAL_RANK" in os.environ else None,
        remove_unused_columns=False,
        dataloader_num_workers=args.dataloader_num_workers,
        dataloader_prefetch_factor=2 if args.dataloader_num_workers > 0 else None,
        report_to=[r for r in args.report_to.split(",") if r] if args.report_to != "none" else "none",
        disable_tqdm=args.no_tqdm,
        seed=args.seed,
        deepspeed=args.deepspeed,
        # DPO: TRL's loss, reference handling and reward metrics.
        beta=args.beta,
        loss_type=[args.loss_type],
        max_length=None,  # the preflight refused longer lines; truncating would cut answers or image tokens
    )


@contextlib.contextmanager
def answer_tokens_only_on_cpu():
    """While in it, TRL's fused log-probability head scores only the answer tokens on CPU too, as on CUDA.

    TRL 1.16's head (`add_fused_lm_head`: the policy's and the reference's log-probabilities, and this script's
    evaluation) projects only the positions that have a label where Triton runs it (CUDA, XPU); elsewhere it scores
    every position of every row over the whole vocabulary and masks the result afterwards, so that the tile shapes
    stay fixed for compilers such as Neuron's. A vision prompt is nearly all image tokens: on CPU that is ~40 times
    the work (340-token rows with 8-token answers in the learning test), in [positions x 32064] fp32 temporaries,
    and the tiny model trained at 0.81 instead of 13.8 pairs/s. Eager CPU compiles nothing, and the labelled positions'
    log-probabilities and gradients are the same either way. TRL reads that choice from
    `trl.trainer.utils._use_triton` on every call; the original is put back on exit (in-process callers, tests).
    Without that name (another TRL version) nothing is changed."""
    import trl.trainer.utils as trl_utils

    original = getattr(trl_utils, "_use_triton", None)
    if original is None:
        yield
        return

    def compact(device: torch.device) -> bool:
        return device.type == "cpu" or original(device)

    trl_utils._use_triton = compact
    try:
        yield
    finally:
        trl_utils._use_triton = original


def make_trainer_class():
    from trl import DPOTrainer

    class Phi3VDPOTrainer(DPOTrainer):
        """DPOTrainer that also logs pairs_per_second / tokens_per_second (non-padding tokens of both sequences of
        every pair, all ranks), counted from the batches `training_step` sees in the main process."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self._interval = [0, 0]  # pairs, tokens since the last loss log
            self._total = [0, 0]
            self._interval_start = None

        def training_step(self, model, inputs, *a, **kw):
            if self._interval_start is None:
                self._interval_start = time.perf_counter()
            pairs, tokens = inputs["input_ids"].shape[0] // 2, int(inputs["attention_mask"].sum())
            for counts in (self._interval, self._total):
                counts[0] += pairs
                counts[1] += tokens
            return super().training_step(model, inputs, *a, **kw)

        def create_model_card(self, *a, **kw):
            pass  # no TRL model card over the output folder: the drop-in folders keep the base's README

        def _reduced(self, values):
            counts = torch.tensor(values, dtype=torch.float64, device=self.args.device)
            if self.args.world_size > 1:
                counts = self.accelerator.reduce(counts, reduction="sum")
            return counts.tolist()

        def log(self, logs, *a, **kw):
            if "loss" in logs and self._interval_start is not None:
                pairs, tokens = self._reduced(self._interval)
                seconds = max(time.perf_counter() - self._interval_start, 1e-9)
                logs["pairs_per_second"] = round(pairs / seconds, 3)
                logs["tokens_per_second"] = round(tokens / seconds, 3)
                self._interval = [0, 0]
                self._interval_start = time.perf_counter()
            elif "train_runtime" in logs:
                pairs, tokens = self._reduced(self._total)
                seconds = max(logs["train_runtime"], 1e-9)
                logs["train_pairs_per_second"] = round(pairs / seconds, 3)
                logs["train_tokens_per_second"] = round(tokens / seconds, 3)
            return super().log(logs, *a, **kw)

    return Phi3VDPOTrainer


def resolve_checkpoint(args, log):
    if args.resume_from_checkpoint != "latest":
        return args.resume_from_checkpoint
    # Skips (with a warning naming it) a checkpoint-N left half-written by a kill during saving.
    last = phi3v.last_complete_checkpoint(args.output_dir)
    log(f"resuming from {last}" if last else f"no complete checkpoint-* in {args.output_dir}: training from scratch")
    return last


# =============================================================================================
# Evaluation
# =============================================================================================


def contiguous_shard(items: list, num_shards: int, index: int) -> list:
    """The same split as `datasets.Dataset.shard(num_shards, index, contiguous=True)`."""
    div, mod = divmod(len(items), num_shards)
    start = div * index + min(index, mod)
    return items[start : start + div + (1 if index < mod else 0)]


@torch.no_grad()
def answer_log_probs(model, processor, records, args, training_args) -> list[dict]:
    """Per line of this rank's shard: the policy's summed log-probability of chosen and of rejected (the answer
    tokens, `<|end|>\\n<|endoftext|>` included) and their token counts, through TRL's fused head as in training."""
    collator = PreferenceCollator(processor, data_paths(args)[2])
    shard = contiguous_shard(records, training_args.world_size, training_args.process_index)
    batch_size = args.eval_batch_size or args.batch_size_per_gpu
    device = next(p for p in model.parameters()).device
    was_training = model.training
    model.eval()
    rows = []
    for start in range(0, len(shard), batch_size):
        chunk = shard[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collator([{"conversations": [], **r} for r in chunk]).items()}
        completion_mask = batch.pop("completion_mask")
        labels = batch["input_ids"].masked_fill(completion_mask == 0, -100)
        log_probs = model(**batch, labels=labels, use_cache=False, fused_lm_head=True).log_probs.float()
        sums, counts = log_probs.sum(dim=1).tolist(), completion_mask.sum(dim=1).tolist()
        n = len(chunk)
        for i, record in enumerate(chunk):
            rows.append({"id": record.get("id"), "chosen_logp": sums[i], "rejected_logp": sums[n + i],
                         "chosen_tokens": counts[i], "rejected_tokens": counts[n + i]})  # fmt: skip
    model.train(was_training)
    return rows


@torch.no_grad()
def evaluate(model, processor, records, args, training_args, out_path: Path, log, reference: dict | None = None):
    """Scores the val lines; rank 0 writes `out_path` and every rank returns the result (for `reference`).

    `reference`: the result of the evaluation of the starting model (DPO's reference) on the same lines; None
    means this model is the reference (before training: every margin 0).
    """
    from accelerate.utils import gather_object

    rows = gather_object(answer_log_probs(model, processor, records, args, training_args))  # in file order
    generations = None
    if args.generate:
        conversations = [turns_of(r) for r in contiguous_shard(records, training_args.world_size,
                                                               training_args.process_index)]  # fmt: skip
        generations = []
        batch_size = args.eval_batch_size or args.batch_size_per_gpu
        for start in range(0, len(conversations), batch_size):
            batch = generation_batch(processor, conversations[start : start + batch_size], data_paths(args)[2])
            generations += generate_answers(model, processor, batch, args.max_new_tokens)
        generations = gather_object(generations)
    chosen = [r["chosen_logp"] for r in rows]
    rejected = [r["rejected_logp"] for r in rows]
    ref_chosen = reference["chosen_logps"] if reference else chosen
    ref_rejected = reference["rejected_logps"] if reference else rejected
    # TRL's rewards: beta * (log p - log p_ref) of each answer, summed over its tokens.
    margins = [args.beta * ((c - rc) - (r - rr)) for c, rc, r, rr in zip(chosen, ref_chosen, rejected, ref_rejected)]
    # The policy alone, per answer token: a longer answer is not penalised for its length.
    preferred = [r["chosen_logp"] / max(r["chosen_tokens"], 1) > r["rejected_logp"] / max(r["rejected_tokens"], 1)
                 for r in rows]  # fmt: skip
    n = max(len(rows), 1)
    out = {
        "preference_accuracy": sum(m > 0 for m in margins) / n,
        "logp_accuracy": sum(preferred) / n,
        "mean_reward_margin": sum(margins) / n,
        "beta": args.beta,
        "num_samples": len(rows),
        "ids": [r["id"] for r in rows],
        "margins": margins,
        "chosen_logps": chosen,
        "rejected_logps": rejected,
        "chosen_tokens": [r["chosen_tokens"] for r in rows],
        "rejected_tokens": [r["rejected_tokens"] for r in rows],
    }
    if generations is not None:
        out["generations"] = generations
    if training_args.process_index == 0:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
        log(f"{out_path.name}: preference accuracy {out['preference_accuracy']:.4f}, log-prob accuracy "
            f"{out['logp_accuracy']:.4f}, mean reward margin {out['mean_reward_margin']:.4f} on {len(rows)} pairs")
    return out


def save_plots(output_dir: Path, log_history: list[dict], log):
    """loss_curve.png: the DPO loss with the learning rate on a second axis; the reward margins and accuracy."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plots")
        return
    fig, (loss_ax, reward_ax) = plt.subplots(1, 2, figsize=(12, 4))

    def points(key):
        return [(h["step"], h[key]) for h in log_history if key in h]

    def plot(ax, key, label, **style):
        xy = points(key)
        return ax.plot(*zip(*xy), marker="o" if len(xy) < 30 else None, label=label, **style) if xy else []

    lines = plot(loss_ax, "loss", "DPO loss")
    loss_ax.set(xlabel="step", ylabel="loss", title="loss and learning rate")
    if points("learning_rate"):
        lr_ax = loss_ax.twinx()
        lines += plot(lr_ax, "learning_rate", "learning rate", color="tab:gray", linestyle="--")
        lr_ax.set_ylabel("learning rate")
        lr_ax.set_ylim(bottom=0)
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    if lines:
        loss_ax.legend(handles=lines, loc="upper right")
    lines = plot(reward_ax, "rewards/margins", "reward margin (chosen - rejected)")
    lines += plot(reward_ax, "rewards/chosen", "reward of chosen", linestyle=":")
    lines += plot(reward_ax, "rewards/rejected", "reward of rejected", linestyle=":")
    reward_ax.set(xlabel="step", ylabel="reward (beta x log-ratio)", title="rewards and reward accuracy")
    if points("rewards/accuracies"):
        accuracy_ax = reward_ax.twinx()
        lines += plot(accuracy_ax, "rewards/accuracies", "reward accuracy", color="tab:gray", linestyle="--")
        accuracy_ax.set_ylabel("reward accuracy")
        accuracy_ax.set_ylim(0, 1.05)
    if lines:
        reward_ax.legend(handles=lines, loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(output_dir / "loss_curve.png", dpi=100)
    plt.close(fig)


# =============================================================================================
# Main
# =============================================================================================


@answer_tokens_only_on_cpu()
def main(argv=None):
    args = parse_args(argv)
    if args.deepspeed:
        ensure_distributed_env()

    from transformers import AutoProcessor, set_seed

    training_args = build_training_args(args)  # also sets up torch.distributed
    is_main = training_args.process_index == 0

    def log(message):
        if is_main:
            print(message, flush=True)

    set_seed(args.seed)
    output_dir = Path(args.output_dir)

    # --- data
    with training_args.main_process_first(local=True):
        processor = AutoProcessor.from_pretrained(
            args.model_name_or_path, num_crops=args.num_crops,
            **({"resize_backend": args.resize_backend} if args.resize_backend else {}),
        )
    # Before the model is loaded: bad data fails in seconds, on every rank alike.
    train_records, val_records = load_data(args, processor, is_main, log)
    image_dir = data_paths(args)[2]

    # --- model
    model, ref_model, peft_config = create_model(args, training_args)

    # --- training
    trainer = make_trainer_class()(
        model=model,
        ref_model=ref_model,
        args=training_args,
        data_collator=PreferenceCollator(processor, image_dir),
        train_dataset=trl_dataset(train_records),
        processing_class=processor,  # saved into every checkpoint-N: each one has the num_crops trained with
        peft_config=peft_config,
        # Every full fine-tuning checkpoint-N also becomes a drop-in model folder (and stays resumable).
        callbacks=[phi3v.saving.DropInCheckpoints(args.model_name_or_path, processor.image_processor)],
    )
    model = trainer.model  # with LoRA: the peft model TRL made
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    mode = "QLoRA" if args.use_qlora else "LoRA" if args.use_lora else "full fine-tuning"
    reference = "the base (adapter off)" if args.use_lora else "a frozen copy"
    log(f"DPO ({args.loss_type}, beta {args.beta}), {mode}: {trainable:,} trainable of {total:,} parameters; "
        f"frozen vision: {args.freeze_vision_model}; reference: {reference}")
    before = None
    if val_records:
        before = evaluate(model, processor, val_records, args, training_args, output_dir / "eval_before.json", log)
    trainer.train(resume_from_checkpoint=resolve_checkpoint(args, log))
    if trainer.is_world_process_zero():
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2) + "\n")

    # --- evaluation (the in-memory model: with LoRA the peft model, no reload); the reference is the evaluation
    # of the starting model above, so no reference model is needed here.
    model = trainer.accelerator.unwrap_model(trainer.model)
    if val_records:
        evaluate(model, processor, val_records, args, training_args, output_dir / "eval_after.json", log,
                 reference=before)  # fmt: skip
    if trainer.is_world_process_zero():
        save_plots(output_dir, trainer.state.log_history, log)

    # --- saving
    if args.use_lora:
        if trainer.is_world_process_zero():
            model.save_pretrained(str(output_dir))
            processor.save_pretrained(str(output_dir))  # its num_crops, for phi3v.merge and phi3v.predict
    else:
        trainer.save_model(str(output_dir))  # every rank takes part (DeepSpeed gathers the weights)
        if trainer.is_world_process_zero():
            dtype = phi3v.saving.base_dtype(args.model_name_or_path)
            phi3v.saving.finish_drop_in(output_dir, args.model_name_or_path, processor.image_processor, dtype)
    if args.merge_lora and trainer.is_world_process_zero():
        phi3v.saving.save_merged(output_dir, output_dir / "merged", base=args.model_name_or_path)
        log(f"merged model saved to {output_dir / 'merged'}")
    trainer.accelerator.wait_for_everyone()
    log(f"saved to {output_dir}")


if __name__ == "__main__":
    main()
