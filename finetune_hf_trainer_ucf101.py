"""Fine-tune Phi-3.5-vision on UCF101 action recognition: each video is 8 frames fed as 8 images.

The data is the layout `convert_ucf101.py` writes (run it first):

    data_dir/ucf101_train.jsonl   train split (the trainer uses it)
    data_dir/ucf101_val.jsonl     validation split (accuracy before and after training)
    data_dir/images/...           frames; the jsonl image paths are relative to this folder

Every jsonl line is `{"id", "source", "conversations": [{"images": [...], "user": ..., "assistant": ...}, ...]}`.
Each turn's user message is `<|image_1|>...<|image_n|>\\n{user}` with that turn's images; the
model learns `{assistant}<|end|>\\n<|endoftext|>`. Several turns per line are supported (each turn is
its own chat-template block, as in the original recipe), so your own video QA data fits as is.
The metric is exact-match accuracy (after strip().strip(".").lower(), as the original) of the last answer of every val line,
generated from the conversation up to that answer.

Your own data (documents, screenshots, photos, videos): write it in this layout and name the files with
--train_file / --eval_file / --image_dir (relative to --data_dir, or absolute). A turn may have any
number of images, none included (a text-only turn); lines may have several turns; answers are free
text. --metric anls scores free-form answers (ANLS, as DocVQA), --metric none reports the held-out
loss alone; confusion_matrix.png is drawn when the val answers are a closed set (at most 50 distinct).
--preflight_only checks the data and prints what a run will cost (rows, images per row, tokens per row,
rows over --max_length, invalid rows) without loading the model's weights.

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

Outputs in --output_dir: eval_before.json / eval_after.json (the --metric score, the confusion matrix
of a closed set of answers, per-sample predictions and scores; --metric none: the held-out loss),
log_history.json (losses, learning rate, images_per_second, tokens_per_second), loss_curve.png
(losses, and the learning rate on a second axis), confusion_matrix.png (after training), the model
(full fine-tuning) or the LoRA adapter (+ `merged/` with --merge_lora), the processor, and
checkpoint-* with --save_steps. Model folders (full fine-tuning output and checkpoint-N,
merged/) replace the base model's folder as is (phi3v/saving.py), also for the official remote code and
vLLM; `python -m phi3v.predict` runs them (or base + adapter) on new data in this layout.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import socket
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

import phi3v  # registers Phi-3.5-vision with the Auto classes
import phi3v.saving  # drop-in model folders (the official layout) and LoRA merging
# Adapt: the prompt format (chat template per turn, image tags, answer suffix) and the line checks live in
# phi3v/conversation.py, shared with `python -m phi3v.predict`; change turn_prompt/answer_ids/conversation_problems
# there (or copy them here) for your data.
from phi3v.conversation import (
    anls_score,
    concat_images,
    conversation_length,
    conversation_problems,
    image_problems,
    encode_conversation,
    exact_match,
    generate_answers,
    generation_batch,
    normalize_answer,
)
from phi3v.validation import InvalidSample, Preflight

SCRIPT_DIR = Path(__file__).resolve().parent
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
    add("--data_dir", required=True, help="output folder of convert_ucf101.py (ucf101_{train,val}.jsonl + images/), "
        "or of your own data in that layout")
    # Your own data: any jsonl files of conversations in the layout (paths relative to --data_dir, or absolute).
    add("--train_file", default=TRAIN_FILE, help="training lines (relative to --data_dir, or absolute)")
    add("--eval_file", default=EVAL_FILE, help="validation lines: the metric before and after training")
    add("--image_dir", default=IMAGE_DIR, help="folder the jsonl image paths are relative to (relative to --data_dir, "
        "or absolute)")
    add("--metric", choices=["exact", "anls", "none"], default="exact",
        help="the score of the last answer of every val line: exact = exact match after strip().strip('.').lower() "
        "(closed sets of answers: classes, yes/no); anls = ANLS, 1 - normalised edit distance, 0 past 0.5, as "
        "DocVQA (free-form answers); none = no generation, the held-out loss per answer token only")
    add("--preflight_only", action="store_true",
        help="check the data and print a summary (rows, images per row, tokens per row at --num_crops, rows over "
        "--max_length, invalid rows), also written to output_dir/preflight_summary.json (+ invalid_rows.jsonl), "
        "then exit: 0 if the data is clean, else 1. No model weights are loaded; nothing else is written")
    add(
        "--use_flash_attention",
        action="store_true",
        help="flash-attention 2 (needs flash-attn and CUDA; implies --bf16, as the original)",
    )
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
        "the official processor; torch (uint8 antialiased bilinear, in the same pass order) makes preprocessing 1.2x "
        "(portrait) to 1.4x (landscape) faster on RGB pages, within one uint8 level of pil on ~0.02%% of a page's pixel "
        "values. Saved with the processor.")
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
    add("--max_eval_samples", type=int, default=None, help="evaluate (--metric) on the first N val samples only")
    add("--eval_batch_size", type=int, default=None, help="generation batch per process (default: batch_size_per_gpu)")
    add("--max_new_tokens", type=int, default=64, help="generation length for the --metric eval")
    add(
        "--max_length",
        type=int,
        default=None,
        help="samples longer than this many tokens (image tokens included) are invalid (see --skip_invalid); "
        "nothing is truncated. None: the model's context length (max_position_embeddings in its config, 131072 "
        "for Phi-3.5-vision), so nothing the original trains is refused; set it to have the preflight report "
        "longer lines. 8 frames of 320x240 are about 6,100 tokens at --num_crops 4 and 15,400 at 16. GPU memory "
        "is the real limit: a rough estimate, not measured by this repo (worked out from the original recipe's "
        "published A100 peaks, with gradient checkpointing and flash attention), is 2-2.5 MB per token of a "
        "micro-batch on top of a fixed cost per GPU of about 30 GB for full fine-tuning (ZeRO-2 over 8 GPUs), "
        "10 GB for LoRA and 4.5 GB for QLoRA: an 80 GB GPU holds roughly 20k tokens per micro-batch (full), "
        "30k (LoRA), 33k (QLoRA); a 24 GB GPU about 5k (LoRA) or 8k (QLoRA). --freeze_vision_model needs less",
    )
    add(
        "--skip_invalid",
        action="store_true",
        help="drop the lines the preflight check finds invalid (listed in output_dir/skipped_rows.jsonl) and "
        "train on the rest; default: stop before training with one report of all of them",
    )
    add("--merge_lora", action="store_true", help="LoRA/QLoRA: also write the base (reloaded in fp32) with the adapter "
        "merged in to output_dir/merged, a drop-in model folder in the base's dtype (as python -m phi3v.merge)")
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
        # As the original: flash attention implies bf16 (it cannot run in fp16 mixed precision, fp32 weights).
        args.bf16 = True
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
    train_file, eval_file, image_dir = data_paths(args)
    missing = [args.train_file] if not train_file.is_file() else []
    missing += [args.eval_file] if not eval_file.is_file() else []
    missing += [args.image_dir.rstrip("/") + "/"] if not image_dir.is_dir() else []
    if missing:
        parser.error(
            f"--data_dir {data_dir} lacks {', '.join(missing)}: expected the layout of convert_ucf101.py "
            f"(python convert_ucf101.py --out_dir {data_dir}), or your files named by --train_file, --eval_file "
            "and --image_dir"
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
        args.deepspeed = None  # as the original: LoRA/QLoRA train with plain DDP
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


def _image_problems_chunk(records: list[dict], image_dir: Path) -> list[list[str]]:
    return [image_problems(record, image_dir) for record in records]


def check_images(records: list[dict], image_dir: Path, workers: int) -> list[list[str]]:
    """image_problems of every record; decoding (the slow part) in `workers` processes if > 1."""
    chunks = [records[i : i + 32] for i in range(0, len(records), 32)]
    if workers > 1 and len(chunks) > 1:
        # fork (where there is one): no re-import of torch in every worker.
        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        with context.Pool(min(workers, len(chunks))) as pool:
            results = pool.starmap(_image_problems_chunk, [(chunk, image_dir) for chunk in chunks])
    else:
        results = [_image_problems_chunk(chunk, image_dir) for chunk in chunks]
    return [problems for chunk in results for problems in chunk]


def line_size(processor, record, image_dir: Path, num_crops: int) -> tuple[int | None, int | None, int | None]:
    """(images, tokens, image tokens) of a jsonl record, from the image headers; None where it is too broken
    to tell (not a list of turns, a text that is not a string, an image that cannot be opened)."""
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) for t in turns):
        return None, None, None
    image_lists = [t.get("images") or [] for t in turns]
    if not all(isinstance(rels, list) and all(isinstance(rel, str) and rel for rel in rels) for rels in image_lists):
        return None, None, None
    images = sum(len(rels) for rels in image_lists)
    if not all(isinstance(t.get("user"), str) and isinstance(t.get("assistant"), str) for t in turns):
        return images, None, None
    try:
        return images, *conversation_length(processor, turns, image_dir, num_crops)
    except InvalidSample:  # an image file missing or not an image (reported by check_images)
        return images, None, None


def context_length(model_name_or_path: str) -> int:
    """The model's context length: `max_position_embeddings` of its config (131072 for Phi-3.5-vision)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_name_or_path).max_position_embeddings


def load_data(args, processor, is_main: bool, log):
    """(train records, val records, train lengths), after a preflight check of every line the run will use.

    Checked before the model is loaded: malformed JSON, the conversation shape, empty texts, image
    tags in the texts, every image (decoded completely) and the length against --max_length
    (from the image headers and the token formula: image tokens are never truncated). Any problem
    stops the run with one report of all of them (every rank reaches the same verdict: the checks
    are deterministic), or with --skip_invalid those lines are dropped and listed in
    output_dir/skipped_rows.jsonl. The lengths (tokens, image tokens included) feed --group_by_length.
    With --preflight_only the run ends here with a summary of the data (Preflight.exit_with_summary).
    """
    if args.max_length is None:  # the default: what the model can take, so nothing the original trains is refused
        args.max_length = context_length(args.model_name_or_path)
    train_file, eval_file, image_dir = data_paths(args)
    report = Preflight(f"{args.data_dir}")
    # The val lines the run uses: the metric on the first --max_eval_samples, held-out loss on the
    # first --max_eval_loss_samples.
    num_val = None
    if args.max_eval_samples is not None:
        num_val = max(args.max_eval_samples, args.max_eval_loss_samples if args.eval_steps > 0 else 0)
    # Lines are named "{file as given} line N" in the report.
    splits = {
        "train": (args.train_file, read_jsonl(train_file, args.train_file, args.max_train_samples, report)),
        "val": (args.eval_file, read_jsonl(eval_file, args.eval_file, num_val, report)),
    }
    lengths = {}
    for split, (name, lines) in splits.items():
        shaped = []
        for line_no, record in lines:
            where = f"{name} line {line_no}"
            if isinstance(record, dict) and "id" in record:
                where += f" (id {record['id']})"
            problems = conversation_problems(record) if record is not None else []  # None: malformed JSON, reported
            for problem in problems:
                report.add(where, problem, key=(name, line_no))
            if record is not None and not problems:
                shaped.append((line_no, record, where))
        frames = check_images([record for _, record, _ in shaped], image_dir, args.dataloader_num_workers)
        for (line_no, record, where), problems in zip(shaped, frames):
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
                    f"{length} tokens ({image_tokens} of them image tokens) > --max_length {args.max_length}: "
                    "raise --max_length, or lower --num_crops or the images per line",
                    key=(name, line_no),
                )
    if args.preflight_only:
        report.exit_with_summary(args.output_dir, args.max_length, args.num_crops, is_main)
    drop = report.finish(args.output_dir, args.skip_invalid, is_main)
    kept = {split: [(line_no, r) for line_no, r in lines if r is not None and (name, line_no) not in drop]
            for split, (name, lines) in splits.items()}  # fmt: skip
    train, val = ([r for _, r in kept[split]] for split in ("train", "val"))
    train_lengths = [lengths[args.train_file, line_no] for line_no, _ in kept["train"]]
    if not train:
        raise SystemExit(f"error: no valid training sample in {train_file}: nothing to train on")
    if not val and args.eval_steps > 0:
        raise SystemExit(f"error: --eval_steps needs validation samples, but {eval_file} has none")
    if not val:
        log(f"no line of {eval_file} is used (empty, --max_eval_samples 0 or all invalid): no evaluation")
    longest = max(lengths.values(), default=0)
    log(f"preflight: {len(train)} train, {len(val)} val samples valid in {args.data_dir}; "
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

    def __call__(self, examples: list[dict]) -> dict:
        batch = generation_batch(self.processor, [ex["conversations"] for ex in examples], self.image_dir)
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


# More distinct answers than this are free-form text rather than classes: no confusion matrix.
MAX_CONFUSION_CLASSES = 50


def confusion_matrix(predictions: list[str], answers: list[str]) -> dict:
    """Rows: the gold classes; columns: the same classes, then "(other)" for any other prediction."""
    # One class per normalised answer ("Yes" and "yes." are one), shown in one of its spellings.
    labels = sorted({normalize_answer(a): a.strip().strip(".") for a in answers}.values(), key=str.lower)
    column = {normalize_answer(label): i for i, label in enumerate(labels)}
    matrix = [[0] * (len(labels) + 1) for _ in labels]
    for prediction, answer in zip(predictions, answers):
        matrix[column[normalize_answer(answer)]][column.get(normalize_answer(prediction), len(labels))] += 1
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
    if eval_after and "confusion_matrix" in eval_after:
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
        ax.set(xlabel="prediction", ylabel="answer", title=f"{eval_after['metric']} {eval_after[eval_after['metric']]:.3f}")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        fig.savefig(output_dir / "confusion_matrix.png", dpi=100)
        plt.close(fig)


def shard_loader(records: list[dict], collator, args, training_args) -> DataLoader:
    """This rank's contiguous shard of `records`, in batches of --eval_batch_size."""
    return DataLoader(
        RecordDataset(contiguous_shard(records, training_args.world_size, training_args.process_index)),
        batch_size=args.eval_batch_size or args.batch_size_per_gpu,
        collate_fn=collator,
        num_workers=args.dataloader_num_workers,
    )


@torch.no_grad()
def evaluate(model, processor, records, args, training_args, out_path: Path, log):
    """Batched greedy generation on this rank's shard; rank 0 writes the --metric score and the predictions."""
    from accelerate.utils import gather_object

    records = records[: args.max_eval_samples]
    loader = shard_loader(records, EvalCollator(processor, data_paths(args)[2]), args, training_args)
    was_training = model.training
    model.eval()
    results = []
    for batch in loader:
        ids, answers = batch.pop("ids"), batch.pop("answers")
        # Greedy, stopping at <|end|> or <|endoftext|> (phi3v/conversation.py, as phi3v.predict).
        predictions = generate_answers(model, processor, batch, args.max_new_tokens)
        results += [{"id": i, "prediction": p, "answer": a} for i, p, a in zip(ids, predictions, answers)]
    model.train(was_training)
    results = gather_object(results)  # rank order = contiguous shard order = file order
    if training_args.process_index != 0:
        return None
    # Adapt: the metric (--metric). exact: exact match after strip().strip(".").lower() (normalize_answer), as
    # the original; anls: ANLS of free-form answers, as the DocVQA recipe (case-sensitive).
    predictions, answers = [r["prediction"] for r in results], [r["answer"] for r in results]
    if args.metric == "anls":
        name, scores = "anls", [anls_score(p, a) for p, a in zip(predictions, answers)]
    else:
        name, scores = "accuracy", [float(exact_match(p, a)) for p, a in zip(predictions, answers)]
    score = sum(scores) / max(len(scores), 1)
    out = {"metric": name, name: score, "num_samples": len(results)}
    if len({normalize_answer(a) for a in answers}) <= MAX_CONFUSION_CLASSES:
        out["confusion_matrix"] = confusion_matrix(predictions, answers)
    out.update(ids=[r["id"] for r in results], predictions=predictions, answers=answers, scores=scores)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    log(f"{out_path.name}: {name} {score:.4f} on {len(results)} samples")
    return out


@torch.no_grad()
def evaluate_loss(model, processor, records, args, training_args, out_path: Path, log):
    """--metric none: the held-out loss per answer token over the val lines (no generation); rank 0 writes it.

    The model's own forward, not Trainer.evaluate: that cannot run before training under ZeRO-2.
    """
    from accelerate.utils import gather_object

    records = records[: args.max_eval_samples]
    loader = shard_loader(records, TrainCollator(processor, data_paths(args)[2]), args, training_args)
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    loss_sum, tokens = 0.0, 0
    for batch in loader:
        # The loss is the mean over the supervised (shifted) positions of the batch: weight it by their count.
        supervised = int((batch["labels"][:, 1:] != -100).sum())
        loss_sum += float(model(**{k: v.to(device) for k, v in batch.items()}).loss) * supervised
        tokens += supervised
    model.train(was_training)
    totals = gather_object([(loss_sum, tokens)])
    if training_args.process_index != 0:
        return None
    loss = sum(s for s, _ in totals) / max(sum(n for _, n in totals), 1)
    out = {"metric": "loss", "loss": loss, "num_samples": len(records), "answer_tokens": sum(n for _, n in totals)}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=2) + "\n")
    log(f"{out_path.name}: held-out loss {loss:.4f} per answer token on {len(records)} samples")
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
    image_dir = data_paths(args)[2]

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
        processing_class=processor,  # saved into every checkpoint-N: each one has the num_crops trained with
        # Every full fine-tuning checkpoint-N also becomes a drop-in model folder (and stays resumable).
        callbacks=[phi3v.saving.DropInCheckpoints(args.model_name_or_path, processor.image_processor)],
    )
    # --metric: the score of generated answers, or (none) the held-out loss alone.
    run_eval = evaluate_loss if args.metric == "none" else evaluate
    if val_records:
        run_eval(model, processor, val_records, args, training_args, output_dir / "eval_before.json", log)
    trainer.train(resume_from_checkpoint=resolve_checkpoint(args, log))
    if trainer.is_world_process_zero():
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2) + "\n")

    # --- evaluation (the in-memory model: with LoRA the peft model, no reload)
    model = trainer.accelerator.unwrap_model(trainer.model)
    eval_after = None
    if val_records:
        eval_after = run_eval(model, processor, val_records, args, training_args, output_dir / "eval_after.json", log)
    if trainer.is_world_process_zero():
        save_plots(output_dir, trainer.state.log_history, eval_after, log)

    # --- saving
    # Model folders are drop-in (phi3v/saving.py): they replace the base model's folder as is, also for the
    # official remote code and vLLM (the base's config, tokenizer and .py files, weights in the base's dtype).
    if args.use_lora:
        if trainer.is_world_process_zero():
            # Only the adapter; lm_head carries LoRA but its frozen base weight need not be saved again.
            model.save_pretrained(str(output_dir), save_embedding_layers=False)
            processor.save_pretrained(str(output_dir))  # its num_crops, for phi3v.merge and phi3v.predict
    else:
        trainer.save_model(str(output_dir))  # every rank takes part (DeepSpeed gathers the weights)
        if trainer.is_world_process_zero():
            dtype = phi3v.saving.base_dtype(args.model_name_or_path)
            phi3v.saving.finish_drop_in(output_dir, args.model_name_or_path, processor.image_processor, dtype)
    if args.merge_lora and trainer.is_world_process_zero():
        # As `python -m phi3v.merge`: the base reloaded in fp32 (also for QLoRA) and the saved adapter folded in.
        phi3v.saving.save_merged(output_dir, output_dir / "merged", base=args.model_name_or_path)
        log(f"merged model saved to {output_dir / 'merged'}")
    trainer.accelerator.wait_for_everyone()
    log(f"saved to {output_dir}")


if __name__ == "__main__":
    main()
