"""Fine-tune Phi-3.5-vision on UCF101 action recognition: each video is 8 frames fed as 8 images.

The data is the layout `convert_ucf101.py` writes (run it first):

    data_dir/ucf101_train.jsonl   train split (the trainer uses it)
    data_dir/ucf101_val.jsonl     validation split (accuracy before and after training)
    data_dir/images/...           frames; the jsonl image paths are relative to this folder

Every jsonl line is `{"id", "source", "conversations": [{"images": [...], "user": ..., "assistant": ...}, ...]}`.
Each turn's user message is `<|image_1|>...<|image_n|>\\n{user}` with that turn's images; the
model learns `{assistant}<|end|>\\n<|endoftext|>`. Several turns per line are supported (each turn is
its own chat-template block, as in the original recipe), so your own video QA data fits as is.
The metric is exact-match accuracy (after strip().lower()) of the last answer of every val line,
generated from the conversation up to that answer.

Launch (full fine-tuning uses DeepSpeed ZeRO-2, `ds_configs/zero2.json`; LoRA/QLoRA use plain DDP):

    # one node, 8 GPUs
    torchrun --nproc_per_node=8 finetune_hf_trainer_ucf101.py --data_dir ./ucf101 --bf16 --use_flash_attention
    # several nodes: the same on every node, with its rank
    torchrun --nnodes=2 --node_rank=0 --master_addr=10.0.0.1 --master_port=29500 --nproc_per_node=8 \\
        finetune_hf_trainer_ucf101.py --data_dir ./ucf101 --bf16 --use_flash_attention
    # one process (one GPU, or CPU for a smoke test): plain python is enough
    python finetune_hf_trainer_ucf101.py --data_dir ./ucf101 --use_lora

Hardware suggestions (8 frames at --num_crops 4 are about 6,100 image tokens per clip):
  * A100/H100: `--bf16 --use_flash_attention`, full fine-tuning; raise --batch_size_per_gpu if memory allows.
  * V100 (no bf16, no flash attention): full fine-tuning in fp16 (the default without --bf16), or
    `--freeze_vision_model` to save memory and time.
  * Consumer GPUs: `--use_lora` (add `--bf16` on Ampere or newer), or `--use_qlora` (Turing or newer).
  * CPU (no CUDA): runs in fp32 (or --bf16) with gloo; only useful for smoke tests with a tiny model.

Before the model is loaded, every train and val line the run will use is checked (a "preflight"):
malformed JSON (file and line number), a conversation that is not a list of {images, user,
assistant} turns, empty user or assistant text, image tags written into the texts (the script writes
the frames' tags itself), every frame file (missing, unreadable, truncated: each one is decoded), and
the length against --max_length (from the frame headers and the token formula; image tokens are
never truncated). Any problem stops the run with one report naming every bad line and its reason
(also written to output_dir/invalid_rows.jsonl) and exit status 1; `--skip_invalid` drops those lines,
lists them in output_dir/skipped_rows.jsonl and trains on the rest. An --output_dir that holds a
finished run, or another run's checkpoints, is refused unless `--overwrite_output_dir` (nothing is
deleted); `--resume_from_checkpoint latest` resumes from the newest complete checkpoint (one left
half-written by a kill is skipped).

Outputs in --output_dir: eval_before.json / eval_after.json (accuracy, confusion matrix, per-sample
predictions), log_history.json (losses, learning rate, images_per_second, tokens_per_second),
loss_curve.png (losses, and the learning rate on a second axis), confusion_matrix.png (after
training), the model (full fine-tuning) or the LoRA adapter (+ `merged/` with --merge_lora), the
processor, and checkpoint-* with --save_steps.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import re
import socket
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

import phi3v  # registers Phi-3.5-vision with the Auto classes
from phi3v.validation import InvalidSample, Preflight, image_size, image_tag_problem, load_image

SCRIPT_DIR = Path(__file__).resolve().parent
IMAGE_TAG = re.compile(r"<\|image_\d+\|>")
ANSWER_SUFFIX = "<|end|>\n<|endoftext|>"
EOS_TOKEN_IDS = [32007, 32000]  # <|end|>, <|endoftext|>
TRAIN_FILE, EVAL_FILE, IMAGE_DIR = "ucf101_train.jsonl", "ucf101_val.jsonl", "images"


# =============================================================================================
# Arguments
# =============================================================================================


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add = parser.add_argument
    add("--model_name_or_path", default="microsoft/Phi-3.5-vision-instruct", help="hub id or local folder")
    add("--data_dir", required=True, help="output folder of convert_ucf101.py (ucf101_{train,val}.jsonl + images/)")
    add("--use_flash_attention", action="store_true", help="flash-attention 2 (needs flash-attn, CUDA and --bf16)")
    add("--bf16", action="store_true", help="bf16 (else fp16 mixed precision on GPU, fp32 on CPU)")
    add("--use_lora", action="store_true", help="LoRA instead of full fine-tuning")
    add("--use_qlora", action="store_true", help="4-bit QLoRA (implies --use_lora; needs bitsandbytes)")
    add("--lora_rank", type=int, default=64, help="LoRA rank")
    add("--lora_alpha_ratio", type=float, default=2, help="lora_alpha = round(lora_rank * ratio)")
    add("--lora_dropout", type=float, default=0.0, help="LoRA dropout")
    add("--freeze_vision_model", action="store_true", help="do not train the CLIP tower and the projector")
    add(
        "--no_gradient_checkpointing",
        dest="gradient_checkpointing",
        action="store_false",
        help="keep all activations instead of recomputing them in the backward pass: faster (about 25%% "
        "on a tiny model on CPU), but much more memory on the real model",
    )
    add("--batch_size", type=int, default=16, help="global batch size (over all GPUs and accumulation steps)")
    add("--batch_size_per_gpu", type=int, default=1, help="micro-batch per process")
    add(
        "--packing",
        action="store_true",
        help="pack each micro-batch (--batch_size_per_gpu clips) into one row without padding (phi3v.pack_examples): "
        "positions restart per clip and no token attends across clips. No compute is spent on padding (with "
        "flash-attn, its varlen kernel); on CPU/sdpa each clip's attention runs on its own block, so the gain "
        "there is the padding removed. Training and held-out loss only; the accuracy eval stays batched",
    )
    add(
        "--group_by_length",
        action="store_true",
        help="sample micro-batches of clips of similar length (token counts from the preflight: frame headers "
        "and text, no pixel decode) so less padding is wasted; the order stays random across groups",
    )
    # 8 frames per clip: 4 crops (instead of 16) keep the sequence near 6k tokens.
    add("--num_crops", type=int, default=4, help="max 336x336 crops per frame (1..16)")
    add("--resize_backend", choices=["pil", "torch"], default=None,
        help="resize in the HD transform (default: the model folder's setting, pil): pil is bit-identical to "
        "the official processor; torch (uint8 antialiased bilinear) makes preprocessing about 1.9x faster on RGB pages, within "
        "one uint8 level of pil on ~0.02%% of pixel values. Saved with the processor.")
    add("--num_train_epochs", type=float, default=1, help="epochs (ignored when --max_steps > 0)")
    add("--max_steps", type=int, default=-1, help="> 0: train this many steps (overrides epochs)")
    add("--learning_rate", type=float, default=4.0e-5, help="peak learning rate (linear decay)")
    add("--wd", type=float, default=0.01, help="weight decay")
    add("--warmup_steps", type=int, default=50, help="linear warm-up steps")
    add("--output_dir", default="./output/", help="model, adapter, eval files, checkpoints")
    add(
        "--overwrite_output_dir",
        action="store_true",
        help="allow an --output_dir that holds a finished run or another run's checkpoints (nothing is deleted; "
        "this run's files are written over them)",
    )
    add("--no-tqdm", dest="no_tqdm", action="store_true", help="no progress bars")
    add("--logging_steps", type=int, default=10, help="log loss and throughput every N steps")
    add("--save_steps", type=int, default=0, help="0: only the final save; > 0: resumable checkpoints every N steps")
    add("--save_total_limit", type=int, default=None, help="keep at most this many checkpoints")
    add(
        "--resume_from_checkpoint",
        default=None,
        help="checkpoint folder, or `latest` (the newest complete checkpoint-N in output_dir)",
    )
    add("--eval_steps", type=int, default=0, help="> 0: held-out loss every N steps (on --max_eval_loss_samples)")
    add("--max_eval_loss_samples", type=int, default=32, help="val samples used for the held-out loss")
    add("--max_train_samples", type=int, default=None, help="use only the first N training samples")
    add("--max_eval_samples", type=int, default=None, help="evaluate accuracy on the first N val samples only")
    add("--eval_batch_size", type=int, default=None, help="generation batch per process (default: batch_size_per_gpu)")
    add("--max_new_tokens", type=int, default=64, help="generation length for the accuracy eval")
    add(
        "--max_length",
        type=int,
        default=8192,
        help="samples longer than this (image tokens included) are invalid (see --skip_invalid): never truncated",
    )
    add(
        "--skip_invalid",
        action="store_true",
        help="drop the lines the preflight check finds invalid (listed in output_dir/skipped_rows.jsonl) and "
        "train on the rest; default: stop before training with one report of all of them",
    )
    add("--merge_lora", action="store_true", help="LoRA: also save a merged full model to output_dir/merged")
    add("--report_to", default="none", help="none, tensorboard, wandb, ... (comma-separated)")
    add("--seed", type=int, default=42, help="random seed")
    add("--dataloader_num_workers", type=int, default=4, help="processes decoding frames")
    add(
        "--deepspeed",
        default=str(SCRIPT_DIR / "ds_configs" / "zero2.json"),
        help="DeepSpeed config for full fine-tuning ('none' to turn it off); LoRA/QLoRA never use it",
    )
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
        if not args.bf16:
            parser.error("--use_flash_attention needs --bf16: flash attention cannot run with fp16 mixed precision")
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
    if args.lora_rank < 1:
        parser.error(f"--lora_rank must be >= 1, got {args.lora_rank}")
    if args.merge_lora and not args.use_lora:
        parser.error("--merge_lora only makes sense with --use_lora/--use_qlora")
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        parser.error(
            f"--data_dir {data_dir} does not exist: make it with python convert_ucf101.py --out_dir {data_dir}"
        )
    missing = [name for name in (TRAIN_FILE, EVAL_FILE) if not (data_dir / name).is_file()]
    missing += [IMAGE_DIR + "/"] if not (data_dir / IMAGE_DIR).is_dir() else []
    if missing:
        parser.error(
            f"--data_dir {data_dir} lacks {', '.join(missing)}: expected the layout of convert_ucf101.py "
            f"(python convert_ucf101.py --out_dir {data_dir})"
        )
    check_output_dir(parser, args)
    if args.resume_from_checkpoint not in (None, "latest") and not Path(args.resume_from_checkpoint).is_dir():
        parser.error(f"--resume_from_checkpoint {args.resume_from_checkpoint} is not a folder")
    if args.deepspeed.lower() in ("", "none"):
        args.deepspeed = None
    if args.use_lora:
        args.deepspeed = None  # as the original: LoRA/QLoRA train with plain DDP
    elif args.deepspeed and not Path(args.deepspeed).is_file():
        parser.error(f"--deepspeed config {args.deepspeed} not found")


# Files that only a run that got to the end writes (the final model or adapter, its logs, its evaluation).
FINISHED_RUN_FILES = ("eval_after.json", "log_history.json", "model.safetensors", "model.safetensors.index.json",
                      "pytorch_model.bin", "adapter_model.safetensors", "adapter_config.json", "merged")  # fmt: skip


def check_output_dir(parser, args):
    """Never write over a finished run, nor start afresh over another run's checkpoints, by accident.

    Resuming (--resume_from_checkpoint) an unfinished run in the same folder is what checkpoints are for.
    """
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


def read_jsonl(path: Path, limit: int | None, report) -> list[tuple[int, dict]]:
    """(line number, record) of the first `limit` non-empty lines; malformed lines go to the report."""
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
                report.add(f"{path.name} line {line_no}", f"not valid JSON: {e}", key=(path.name, line_no))
                record = None
            records.append((line_no, record))
    return records


def turn_prompt(tokenizer, user: str, num_images: int) -> str:
    # Adapt: the user message of one turn. The frames' tags come back to back, then a newline.
    tags = "".join(f"<|image_{i}|>" for i in range(1, num_images + 1))
    content = f"{tags}\n{user}" if num_images else user
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )


def answer_ids(tokenizer, answer: str) -> list[int]:
    return tokenizer(f"{answer}{ANSWER_SUFFIX}", add_special_tokens=False).input_ids  # no BOS before answers


def encode_conversation(processor, turns: list[dict], image_dir: Path, include_last_answer: bool = True) -> dict:
    """Token ids, labels and pixels of one jsonl line.

    Each turn is its own chat-template block with its own images (`<|image_1|>` restarts at 1), as
    in the original recipe; only the answers (with `<|end|>\\n<|endoftext|>`) are supervised.
    Without `include_last_answer` the sequence ends with the last turn's prompt (for generation).
    """
    tokenizer = processor.tokenizer
    input_ids, labels, pixel_values, image_sizes = [], [], [], []
    for t, turn in enumerate(turns):
        # load_image: the same decoding (modes, alpha, EXIF) as the preflight, which checked every frame.
        images = [load_image(image_dir / rel) for rel in turn.get("images") or []]
        inputs = processor(text=turn_prompt(tokenizer, turn["user"], len(images)), images=images or None)
        prompt_ids = inputs["input_ids"][0].tolist()
        input_ids += prompt_ids
        labels += [-100] * len(prompt_ids)
        if images:
            pixel_values.append(inputs["pixel_values"])
            image_sizes.append(inputs["image_sizes"])
        if include_last_answer or t < len(turns) - 1:
            ids = answer_ids(tokenizer, turn["assistant"])
            input_ids += ids
            labels += ids
    return {
        "input_ids": input_ids,
        "labels": labels,
        "pixel_values": torch.cat(pixel_values) if pixel_values else None,
        "image_sizes": torch.cat(image_sizes) if image_sizes else None,
    }


def conversation_length(processor, turns: list[dict], image_dir: Path, num_crops: int) -> tuple[int, int]:
    """(tokens, image tokens) of `encode_conversation(...)["input_ids"]`, from the frame headers only."""
    tokenizer = processor.tokenizer
    length = image_tokens = 0
    for turn in turns:
        rels = turn.get("images") or []
        prompt = turn_prompt(tokenizer, turn["user"], len(rels))
        # The processor tokenizes the text between image tags chunk by chunk (each with its own <s>).
        length += sum(len(tokenizer(chunk).input_ids) for chunk in IMAGE_TAG.split(prompt))
        for rel in rels:
            image_tokens += phi3v.num_image_tokens(*image_size(image_dir / rel), num_crops)
        length += len(answer_ids(tokenizer, turn["assistant"]))
    return length + image_tokens, image_tokens


def conversation_problems(record) -> list[str]:
    """Why a jsonl record does not have the shape the collators expect (empty list: it does)."""
    # Adapt: the shape of your own conversations.
    if not isinstance(record, dict):
        return [f"a line must be a JSON object, got {type(record).__name__}"]
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        return ["'conversations' is missing or not a non-empty list of {images, user, assistant} turns"]
    problems = []
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict):
            problems.append(f"conversations[{t}] is not an object {{images, user, assistant}}")
            continue
        for role in ("user", "assistant"):
            if not isinstance(turn.get(role), str) or not turn[role].strip():
                problems.append(f"conversations[{t}]: empty or missing {role} text")
        images = turn.get("images") or []
        if not isinstance(images, list) or not all(isinstance(rel, str) and rel for rel in images):
            problems.append(f"conversations[{t}]: 'images' must be a list of frame paths (relative to images/)")
            continue
        if isinstance(turn.get("user"), str):
            # The script writes the tags itself (turn_prompt): any tag in the text would be one too many.
            tags = "".join(f"<|image_{i}|>" for i in range(1, len(images) + 1))
            problem = image_tag_problem(f"{tags}\n{turn['user']}", len(images))
            if problem:
                problems.append(f"conversations[{t}]: user text has its own image tags: {problem}")
        if isinstance(turn.get("assistant"), str) and IMAGE_TAG.search(turn["assistant"]):
            problems.append(f"conversations[{t}]: assistant text has an image tag")
    return problems


def frame_problems(record: dict, image_dir: Path) -> list[str]:
    """Every listed frame must decode completely (a truncated JPEG only shows when decoded)."""
    problems = []
    for turn in record["conversations"]:
        for rel in turn.get("images") or []:
            try:
                load_image(image_dir / rel)
            except InvalidSample as e:
                problems.append(f"frame {rel}: {e}")
    return problems


def _frame_problems_chunk(records: list[dict], image_dir: Path) -> list[list[str]]:
    return [frame_problems(record, image_dir) for record in records]


def check_frames(records: list[dict], image_dir: Path, workers: int) -> list[list[str]]:
    """frame_problems of every record; decoding (the slow part) in `workers` processes if > 1."""
    chunks = [records[i : i + 32] for i in range(0, len(records), 32)]
    if workers > 1 and len(chunks) > 1:
        # fork (where there is one): no re-import of torch in every worker.
        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        with context.Pool(min(workers, len(chunks))) as pool:
            results = pool.starmap(_frame_problems_chunk, [(chunk, image_dir) for chunk in chunks])
    else:
        results = [_frame_problems_chunk(chunk, image_dir) for chunk in chunks]
    return [problems for chunk in results for problems in chunk]


def load_data(args, processor, is_main: bool, log):
    """(train records, val records, train lengths), after a preflight check of every line the run will use.

    Checked before the model is loaded: malformed JSON, the conversation shape, empty texts, image
    tags in the texts, every frame (decoded completely) and the length against --max_length
    (from the frame headers and the token formula: image tokens are never truncated). Any problem
    stops the run with one report of all of them (every rank reaches the same verdict: the checks
    are deterministic), or with --skip_invalid those lines are dropped and listed in
    output_dir/skipped_rows.jsonl. The lengths (tokens, image tokens included) feed --group_by_length.
    """
    data_dir = Path(args.data_dir)
    image_dir = data_dir / IMAGE_DIR
    report = Preflight(f"{data_dir}")
    # The val lines the run uses: accuracy on the first --max_eval_samples, held-out loss on the
    # first --max_eval_loss_samples.
    num_val = None
    if args.max_eval_samples is not None:
        num_val = max(args.max_eval_samples, args.max_eval_loss_samples if args.eval_steps > 0 else 0)
    splits = {
        TRAIN_FILE: read_jsonl(data_dir / TRAIN_FILE, args.max_train_samples, report),
        EVAL_FILE: read_jsonl(data_dir / EVAL_FILE, num_val, report),
    }
    lengths = {}
    for name, lines in splits.items():
        shaped = []
        for line_no, record in lines:
            if record is None:
                continue  # malformed JSON, already reported
            where = f"{name} line {line_no}"
            if isinstance(record, dict) and "id" in record:
                where += f" (id {record['id']})"
            problems = conversation_problems(record)
            for problem in problems:
                report.add(where, problem, key=(name, line_no))
            if not problems:
                shaped.append((line_no, record, where))
        frames = check_frames([record for _, record, _ in shaped], image_dir, args.dataloader_num_workers)
        for (line_no, record, where), problems in zip(shaped, frames):
            for problem in problems:
                report.add(where, problem, key=(name, line_no))
            if problems:
                continue
            length, image_tokens = conversation_length(processor, record["conversations"], image_dir, args.num_crops)
            lengths[name, line_no] = length
            if length > args.max_length:
                report.add(
                    where,
                    f"{length} tokens ({image_tokens} of them image tokens) > --max_length {args.max_length}: "
                    "raise --max_length, or lower --num_crops or the frames per clip",
                    key=(name, line_no),
                )
    drop = report.finish(args.output_dir, args.skip_invalid, is_main)
    kept = {name: [(line_no, r) for line_no, r in splits[name] if r is not None and (name, line_no) not in drop]
            for name in (TRAIN_FILE, EVAL_FILE)}  # fmt: skip
    train, val = ([r for _, r in kept[name]] for name in (TRAIN_FILE, EVAL_FILE))
    train_lengths = [lengths[TRAIN_FILE, line_no] for line_no, _ in kept[TRAIN_FILE]]
    if not train:
        raise SystemExit(f"error: no valid training sample in {data_dir / TRAIN_FILE}: nothing to train on")
    if not val and args.eval_steps > 0:
        raise SystemExit(f"error: --eval_steps needs validation samples, but {data_dir / EVAL_FILE} has none")
    if not val:
        log(f"no line of {data_dir / EVAL_FILE} is used (empty, --max_eval_samples 0 or all invalid): no accuracy eval")
    longest = max(lengths.values(), default=0)
    log(f"preflight: {len(train)} train, {len(val)} val samples valid in {data_dir}; "
        f"longest {longest} tokens (--max_length {args.max_length})")  # fmt: skip
    return train, val, train_lengths


class RecordDataset(Dataset):
    """Raw jsonl records; the collators open the frames (so decoding runs in the dataloader workers).

    `lengths`: the token count of every record (from the preflight), for --group_by_length.
    """

    def __init__(self, records: list[dict], lengths: list[int] | None = None):
        self.records = records
        self.lengths = lengths

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        return self.records[index]


def concat_images(encoded: list[dict], batch: dict) -> dict:
    pixel_values = [e["pixel_values"] for e in encoded if e["pixel_values"] is not None]
    if pixel_values:
        batch["pixel_values"] = torch.cat(pixel_values)
        batch["image_sizes"] = torch.cat([e["image_sizes"] for e in encoded if e["image_sizes"] is not None])
    return batch


class TrainCollator:
    """Training batch; pixel_values/image_sizes of all clips concatenated in order.

    Padded (default): one right-padded row per sample with an attention mask. `packing`: the samples
    concatenated into one row without padding (`phi3v.pack_examples`: positions restart at each
    sample, no token attends across samples, no attention mask).
    """

    def __init__(self, processor, image_dir: Path, packing: bool = False):
        self.processor = processor
        self.image_dir = image_dir
        self.pad_token_id = processor.tokenizer.pad_token_id
        self.packing = packing

    def __call__(self, examples: list[dict]) -> dict:
        encoded = [encode_conversation(self.processor, ex["conversations"], self.image_dir) for ex in examples]
        if self.packing:
            return phi3v.pack_examples(encoded)
        width = max(len(e["input_ids"]) for e in encoded)
        input_ids = torch.full((len(encoded), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(encoded), width), -100, dtype=torch.long)
        # Not `input_ids != pad`: <|endoftext|> closing every answer has the pad id too.
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, e in enumerate(encoded):
            n = len(e["input_ids"])
            input_ids[row, :n] = torch.tensor(e["input_ids"])
            labels[row, :n] = torch.tensor(e["labels"])
            attention_mask[row, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        return concat_images(encoded, batch)


class EvalCollator:
    """Left-padded prompts (the conversation up to the last answer) for batched generation."""

    def __init__(self, processor, image_dir: Path):
        self.processor = processor
        self.image_dir = image_dir
        self.pad_token_id = processor.tokenizer.pad_token_id

    def __call__(self, examples: list[dict]) -> dict:
        encoded = [
            encode_conversation(self.processor, ex["conversations"], self.image_dir, include_last_answer=False)
            for ex in examples
        ]
        width = max(len(e["input_ids"]) for e in encoded)
        input_ids = torch.full((len(encoded), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, e in enumerate(encoded):
            n = len(e["input_ids"])
            input_ids[row, width - n :] = torch.tensor(e["input_ids"])
            attention_mask[row, width - n :] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        batch = concat_images(encoded, batch)
        batch["ids"] = [ex.get("id") for ex in examples]
        batch["answers"] = [ex["conversations"][-1]["assistant"] for ex in examples]
        return batch


# =============================================================================================
# Model
# =============================================================================================


def precision(args):
    """(model dtype, TrainingArguments bf16, fp16). The original loads fp32 weights for fp16 AMP."""
    if args.bf16:
        return torch.bfloat16, True, False
    if torch.cuda.is_available():
        return torch.float32, False, True
    return torch.float32, False, False


def create_model(args, training_args):
    from transformers import AutoModelForCausalLM

    dtype, _, _ = precision(args)
    kwargs = {
        "dtype": dtype,
        "attn_implementation": "flash_attention_2" if args.use_flash_attention else "sdpa",
    }
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

    if args.freeze_vision_model:
        # Unlike the original (where vision_embed_tokens.wte *is* the token embedding), this freezes
        # only the CLIP tower, the separators and the projector: the token embeddings still train.
        model.model.vision_embed_tokens.requires_grad_(False)
    if args.use_qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=args.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        phi3v.fix_4bit_cpu_gradients(model)  # else eval forwards on CPU break later LoRA gradients
    if args.use_lora:
        from peft import LoraConfig, get_peft_model

        # Adapt: which layers get LoRA. Language model always; CLIP + projector unless frozen.
        lora_config = LoraConfig(
            r=args.lora_rank,
            lora_alpha=round(args.lora_rank * args.lora_alpha_ratio),
            lora_dropout=args.lora_dropout,
            target_modules=phi3v.lora_target_modules(model, vision=not args.freeze_vision_model),
            init_lora_weights="gaussian",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora_config)
    if not args.use_qlora:
        model.to(training_args.device)  # quantized models are placed by device_map
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return model, trainable, total


# =============================================================================================
# Training
# =============================================================================================


def build_training_args(args):
    from transformers import TrainingArguments

    _, bf16, fp16 = precision(args)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    use_cpu = not torch.cuda.is_available()
    eval_on = args.eval_steps > 0
    return TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size_per_gpu,
        per_device_eval_batch_size=args.eval_batch_size or args.batch_size_per_gpu,
        gradient_accumulation_steps=args.batch_size // (world_size * args.batch_size_per_gpu),
        train_sampling_strategy="group_by_length" if args.group_by_length else "random",
        activation_checkpointing=args.gradient_checkpointing,  # formerly gradient_checkpointing
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
        eval_strategy="steps" if eval_on else "no",
        eval_steps=args.eval_steps if eval_on else None,
        prediction_loss_only=True,
        label_names=["labels"],
        bf16=bf16,
        fp16=fp16,
        use_cpu=use_cpu,
        # gloo only under a launcher: this accelerate fails on a backend without a process group.
        ddp_backend="gloo" if use_cpu and "LOCAL_RANK" in os.environ else None,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=args.dataloader_num_workers,
        dataloader_prefetch_factor=2 if args.dataloader_num_workers > 0 else None,
        report_to=[r for r in args.report_to.split(",") if r] if args.report_to != "none" else "none",
        disable_tqdm=args.no_tqdm,
        seed=args.seed,
        deepspeed=args.deepspeed,
    )


def make_trainer_class():
    from transformers import Trainer

    class Phi3VTrainer(Trainer):
        """Trainer that logs images_per_second / tokens_per_second (non-padding tokens, all ranks).

        The counts come from the batches seen by `training_step` in the main process, so they are
        right whatever the number of dataloader workers.
        """

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self._interval = [0, 0]  # images, tokens since the last loss log
            self._total = [0, 0]
            self._interval_start = None

        def training_step(self, model, inputs, *a, **kw):
            if self._interval_start is None:
                self._interval_start = time.perf_counter()
            images = int(inputs["pixel_values"].shape[0]) if "pixel_values" in inputs else 0
            # Packed rows (--packing) have no padding, hence no attention mask.
            tokens = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else inputs["input_ids"].numel()
            for counts in (self._interval, self._total):
                counts[0] += images
                counts[1] += tokens
            return super().training_step(model, inputs, *a, **kw)

        def _get_train_sampler(self, train_dataset=None):
            # --group_by_length: the Trainer can only read lengths from a datasets.Dataset column;
            # ours come from the preflight (frame headers + token formula, no pixel decode).
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            if self.args.train_sampling_strategy == "group_by_length":
                from transformers.trainer_pt_utils import LengthGroupedSampler

                batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
                return LengthGroupedSampler(batch, lengths=dataset.lengths)
            return super()._get_train_sampler(train_dataset)

        def compute_loss(self, model, inputs, *a, **kw):
            if not model.training:
                # Held-out loss only: skip the full-vocabulary logits over ~6k positions per clip.
                inputs = {**inputs, "logits_to_keep": 1}
            return super().compute_loss(model, inputs, *a, **kw)

        def _reduced(self, values):
            counts = torch.tensor(values, dtype=torch.float64, device=self.args.device)
            if self.args.world_size > 1:
                counts = self.accelerator.reduce(counts, reduction="sum")
            return counts.tolist()

        def log(self, logs, *a, **kw):
            # Both kinds of log happen on every rank at the same step, so the reduce is safe.
            if "loss" in logs and self._interval_start is not None:
                images, tokens = self._reduced(self._interval)
                seconds = max(time.perf_counter() - self._interval_start, 1e-9)
                logs["images_per_second"] = round(images / seconds, 3)
                logs["tokens_per_second"] = round(tokens / seconds, 3)
                self._interval = [0, 0]
                self._interval_start = time.perf_counter()
            elif "train_runtime" in logs:
                images, tokens = self._reduced(self._total)
                seconds = max(logs["train_runtime"], 1e-9)
                logs["train_images_per_second"] = round(images / seconds, 3)
                logs["train_tokens_per_second"] = round(tokens / seconds, 3)
            return super().log(logs, *a, **kw)

    return Phi3VTrainer


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


def confusion_matrix(predictions: list[str], answers: list[str]) -> dict:
    """Rows: the gold classes; columns: the same classes, then "(other)" for any other prediction."""
    labels = sorted({a.strip() for a in answers}, key=str.lower)
    column = {label.lower(): i for i, label in enumerate(labels)}
    matrix = [[0] * (len(labels) + 1) for _ in labels]
    for prediction, answer in zip(predictions, answers):
        matrix[column[answer.strip().lower()]][column.get(prediction.strip().lower(), len(labels))] += 1
    return {"labels": labels, "columns": labels + ["(other)"], "matrix": matrix}


def save_plots(output_dir: Path, log_history: list[dict], eval_after: dict | None, log):
    """loss_curve.png (train and held-out loss, learning rate on a second axis) and confusion_matrix.png."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plots")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    lines, losses = [], []
    for key, name in (("loss", "train loss"), ("eval_loss", "held-out loss")):
        points = [(h["step"], h[key]) for h in log_history if key in h]
        if points:
            lines += ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=name)
            losses += [loss for _, loss in points]
    ax.set(xlabel="step", ylabel="loss", title="loss and learning rate")
    if losses and min(losses) > 0:
        ax.set_yscale("log")  # the first steps (~10 from scratch) would flatten the rest of the curve
    lr_points = [(h["step"], h["learning_rate"]) for h in log_history if "learning_rate" in h]
    if lr_points:  # the learning rate the optimizer used at each logged step, on a second axis
        lr_ax = ax.twinx()
        lines += lr_ax.plot(*zip(*lr_points), color="tab:gray", linestyle="--", label="learning rate")
        lr_ax.set_ylabel("learning rate")
        lr_ax.set_ylim(bottom=0)
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    if lines:
        ax.legend(handles=lines, loc="upper right")
    fig.tight_layout()
    fig.savefig(output_dir / "loss_curve.png", dpi=100)
    plt.close(fig)
    if eval_after:
        cm = eval_after["confusion_matrix"]
        size = 2 + 0.5 * len(cm["columns"])
        fig, ax = plt.subplots(figsize=(size + 1, size))
        image = ax.imshow(cm["matrix"], cmap="Blues")
        ax.set_xticks(range(len(cm["columns"])), cm["columns"], rotation=60, ha="right")
        ax.set_yticks(range(len(cm["labels"])), cm["labels"])
        for i, row in enumerate(cm["matrix"]):
            for j, count in enumerate(row):
                if count:
                    ax.text(j, i, count, ha="center", va="center", fontsize=8)
        ax.set(xlabel="prediction", ylabel="answer", title=f"accuracy {eval_after['accuracy']:.3f}")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        fig.savefig(output_dir / "confusion_matrix.png", dpi=100)
        plt.close(fig)


@torch.no_grad()
def evaluate(model, processor, records, args, training_args, out_path: Path, log):
    """Batched greedy generation on this rank's shard; rank 0 writes the accuracy and predictions."""
    from accelerate.utils import gather_object

    records = records[: args.max_eval_samples]
    shard = contiguous_shard(records, training_args.world_size, training_args.process_index)
    loader = DataLoader(
        RecordDataset(shard),
        batch_size=args.eval_batch_size or args.batch_size_per_gpu,
        collate_fn=EvalCollator(processor, Path(args.data_dir) / IMAGE_DIR),
        num_workers=args.dataloader_num_workers,
    )
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    results = []
    for batch in loader:
        ids, answers = batch.pop("ids"), batch.pop("answers")
        batch = {k: v.to(device) for k, v in batch.items()}
        output = model.generate(
            **batch,
            max_new_tokens=args.max_new_tokens,
            eos_token_id=EOS_TOKEN_IDS,
            pad_token_id=processor.tokenizer.pad_token_id,
            do_sample=False,
            use_cache=True,
        )
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        predictions = processor.tokenizer.batch_decode(
            new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        results += [{"id": i, "prediction": p, "answer": a} for i, p, a in zip(ids, predictions, answers)]
    model.train(was_training)
    results = gather_object(results)  # rank order = contiguous shard order = file order
    if training_args.process_index != 0:
        return None
    # Adapt: the metric. Exact match after strip().lower(), as the original.
    predictions, answers = [r["prediction"] for r in results], [r["answer"] for r in results]
    correct = [p.strip().lower() == a.strip().lower() for p, a in zip(predictions, answers)]
    accuracy = sum(correct) / max(len(correct), 1)
    out = {
        "accuracy": accuracy,
        "num_samples": len(results),
        "confusion_matrix": confusion_matrix(predictions, answers),
        "ids": [r["id"] for r in results],
        "predictions": predictions,
        "answers": answers,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=2) + "\n")
    log(f"{out_path.name}: accuracy {accuracy:.4f} on {len(results)} samples")
    return out


# =============================================================================================
# Main
# =============================================================================================


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
    train_records, val_records, train_lengths = load_data(args, processor, is_main, log)
    image_dir = Path(args.data_dir) / IMAGE_DIR

    # --- model
    model, trainable, total = create_model(args, training_args)
    mode = "QLoRA" if args.use_qlora else "LoRA" if args.use_lora else "full fine-tuning"
    log(f"{mode}: {trainable:,} trainable of {total:,} parameters; frozen vision: {args.freeze_vision_model}")

    # --- training
    trainer = make_trainer_class()(
        model=model,
        args=training_args,
        data_collator=TrainCollator(processor, image_dir, packing=args.packing),
        train_dataset=RecordDataset(train_records, train_lengths),
        eval_dataset=RecordDataset(val_records[: args.max_eval_loss_samples]) if args.eval_steps > 0 else None,
    )
    if val_records:
        evaluate(model, processor, val_records, args, training_args, output_dir / "eval_before.json", log)
    trainer.train(resume_from_checkpoint=resolve_checkpoint(args, log))
    if trainer.is_world_process_zero():
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2) + "\n")

    # --- evaluation (the in-memory model: with LoRA the peft model, no reload)
    model = trainer.accelerator.unwrap_model(trainer.model)
    eval_after = None
    if val_records:
        eval_after = evaluate(model, processor, val_records, args, training_args, output_dir / "eval_after.json", log)
    if trainer.is_world_process_zero():
        save_plots(output_dir, trainer.state.log_history, eval_after, log)

    # --- saving
    if args.use_lora:
        if trainer.is_world_process_zero():
            # Only the adapter; lm_head carries LoRA but its frozen base weight need not be saved again.
            model.save_pretrained(str(output_dir), save_embedding_layers=False)
    else:
        trainer.save_model(str(output_dir))  # every rank takes part (DeepSpeed gathers the weights)
    if trainer.is_world_process_zero():
        processor.save_pretrained(str(output_dir))
    if args.merge_lora:
        if args.use_qlora:
            log(
                "--merge_lora skipped for QLoRA: merging into 4-bit weights loses precision. Load the base "
                "model in bf16/fp16, then PeftModel.from_pretrained(base, output_dir).merge_and_unload()."
            )
        else:
            merged = model.merge_and_unload()
            if trainer.is_world_process_zero():
                merged.save_pretrained(str(output_dir / "merged"))
                processor.save_pretrained(str(output_dir / "merged"))
                log(f"merged model saved to {output_dir / 'merged'}")
    trainer.accelerator.wait_for_everyone()
    log(f"saved to {output_dir}")


if __name__ == "__main__":
    main()
