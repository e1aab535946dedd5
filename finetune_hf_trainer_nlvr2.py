"""Fine-tune Phi-3.5-vision on NLVR2: two images, one true/false statement per turn.

Data: `HuggingFaceM4/the_cauldron`, config `nlvr2` (columns `images`: exactly 2 images, `texts`: a
list of turns {user, assistant, source}). As in Microsoft's cookbook recipe, the first 500 rows of its
only split are held out for evaluation (`--eval_size`) and the rest is trained on. Every turn of a
conversation is trained: the first turn carries both images, `<|image_1|><|image_2|>\\n{statement}`;
later turns are text only. Evaluation asks the first statement of each held-out row and reports
exact-match accuracy (the answers are "True" / "False"), before and after training.

Preflight: before the model is loaded, every row the run will use (after --max_*_samples) is checked:
the table can be read and has `images` and `texts`; each row has exactly 2 images that all decode
(missing, unreadable, truncated or corrupt images are found by a full decode; CMYK, palette,
16-bit, transparent and EXIF-rotated images are converted the same way the collator opens them);
every turn has non-empty user and assistant text and the first-turn prompt's image tags are exactly
<|image_1|><|image_2|> (no tags in later turns); training rows fit in --max_length tokens (counted
from the image sizes, never truncated). By default any bad row stops the run with one report naming
every bad row (parquet file or table row) and its reason, also written to output_dir/invalid_rows.jsonl;
`--skip_invalid` trains without them and lists them in output_dir/skipped_rows.jsonl.

Launch (one node, 8 GPUs; full fine-tuning uses DeepSpeed ZeRO-2 from ds_configs/zero2.json):

    torchrun --nproc_per_node=8 finetune_hf_trainer_nlvr2.py --bf16 --use_flash_attention \\
        --batch_size 64 --batch_size_per_gpu 2 --learning_rate 1e-5 --num_train_epochs 3 --output_dir out-nlvr2

Several nodes: add `--nnodes N --node_rank R --master_addr HOST --master_port PORT` to torchrun on every
node. One process (one GPU, or CPU for a smoke test): `python finetune_hf_trainer_nlvr2.py ...` works as
is, DeepSpeed included (the script sets the single-process rendezvous variables itself).

Hardware suggestions:
  * A100 / H100 (80 GB): `--bf16 --use_flash_attention`, full fine-tuning. The cookbook reports 89.4%
    accuracy with `--batch_size 64 --learning_rate 1e-5 --num_train_epochs 3` on 4 GPUs, and 89.2% with
    `--freeze_vision_model --learning_rate 2e-5 --num_train_epochs 2`.
  * V100 (no bf16, no flash attention): fp16 mixed precision with sdpa attention (the default without
    `--bf16`); full fine-tuning needs 32 GB cards, else use `--use_lora`.
  * Consumer GPUs (24 GB or less): `--use_qlora --bf16` (Ampere or newer; drop `--bf16` on older cards),
    `--num_crops 4` and `--batch_size_per_gpu 1` to keep sequences short.

A quick CPU check of the whole pipeline (tiny random model from `python -m phi3v.tiny`):

    python finetune_hf_trainer_nlvr2.py --model_name_or_path tiny-phi3v --dataset_path my_nlvr2_copy \\
        --max_steps 2 --batch_size 2 --num_crops 1 --eval_size 4 --dataloader_num_workers 0

Outputs in `--output_dir`: the model (full fine-tuning: a drop-in replacement of the base model's folder,
also for the official remote code and vLLM, as is every full fine-tuning checkpoint-N and `merged/` with
--merge_lora; see phi3v/saving.py) or the LoRA adapter, the processor,
`eval_before.json` / `eval_after.json` (accuracy, confusion matrix and per-sample predictions),
`log_history.json` (losses, learning rate, images/s, tokens/s, fraction of padding positions),
`loss_curve.png` (training loss, held-out loss with `--eval_steps`, learning rate on a second axis),
`confusion_matrix.png` (after training), checkpoints with `--save_steps`. An --output_dir holding a finished run (or another run's
checkpoints) is refused unless `--overwrite_output_dir` (nothing is deleted); `--resume_from_checkpoint
latest` continues from the newest complete checkpoint in it.

Throughput: `--packing` trains each micro batch as one padding-free row, `--group_by_length` draws
micro batches of similar length (both off by default; see --help).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import socket
import time
from pathlib import Path

import torch

DATASET_NAME = "HuggingFaceM4/the_cauldron"
DATASET_CONFIG = "nlvr2"
IGNORE_INDEX = -100
IMAGE_TAG = re.compile(r"<\|image_\d+\|>")
DEFAULT_DS_CONFIG = Path(__file__).resolve().parent / "ds_configs" / "zero2.json"
ANSWER_CLASSES = ("False", "True")  # Adapt: the answers of your task (rows/columns of the confusion matrix)


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Fine-tune Phi-3.5-vision on NLVR2 (two images per sample).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # Model and precision
    parser.add_argument("--model_name_or_path", default="microsoft/Phi-3.5-vision-instruct",
                        help="hub id or local folder")
    parser.add_argument("--use_flash_attention", action="store_true",
                        help="flash_attention_2 (needs flash-attn and CUDA; implies --bf16, as the original)")
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 weights and mixed precision (else fp16 AMP on GPU, fp32 on CPU)")
    parser.add_argument("--num_crops", type=int, default=16, help="max 336x336 crops per image (1..16)")
    parser.add_argument("--resize_backend", choices=["pil", "torch"], default=None,
        help="resize in the HD transform (default: the model folder's setting, pil): pil is bit-identical to "
        "the official processor; torch (uint8 antialiased bilinear, in the same pass order) makes preprocessing 1.2x "
        "(portrait) to 1.4x (landscape) faster on RGB pages, within one uint8 level of pil on ~0.02%% of a page's pixel "
        "values. Saved with the processor.")
    # LoRA / QLoRA
    parser.add_argument("--use_lora", action="store_true", help="train LoRA adapters instead of the full model")
    parser.add_argument("--use_qlora", action="store_true", help="LoRA on a 4-bit (nf4) base model; implies --use_lora")
    parser.add_argument("--lora_rank", type=int, default=64)
    parser.add_argument("--lora_alpha_ratio", type=float, default=2, help="lora_alpha = round(lora_rank * ratio)")
    parser.add_argument("--lora_dropout", type=float, default=0.0)
    parser.add_argument("--merge_lora", action="store_true",
                        help="LoRA/QLoRA runs: also write the base (reloaded in fp32) with the adapter merged in to "
                        "output_dir/merged, a drop-in model folder in the base's dtype (as python -m phi3v.merge)")
    parser.add_argument("--freeze_vision_model", action="store_true", help="do not train the CLIP tower and projector")
    # Optimisation
    parser.add_argument("--batch_size", type=int, default=16, help="GLOBAL batch size (over all GPUs and accumulation)")
    parser.add_argument("--batch_size_per_gpu", type=int, default=1, help="micro batch per device")
    parser.add_argument("--num_train_epochs", type=float, default=1)
    parser.add_argument("--max_steps", type=int, default=-1, help="> 0 overrides --num_train_epochs")
    parser.add_argument("--learning_rate", type=float, default=4.0e-5)
    parser.add_argument("--wd", type=float, default=0.01, help="weight decay")
    parser.add_argument("--warmup_steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--deepspeed",
        default=str(DEFAULT_DS_CONFIG),
        help="DeepSpeed config for full fine-tuning ('' or 'none' = plain DDP); LoRA/QLoRA never use it",
    )
    # Output, logging, checkpoints
    parser.add_argument("--output_dir", default="./output/")
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="allow writing into an --output_dir that holds a finished run or another run's "
                             "checkpoints; files are written over, nothing is deleted")
    parser.add_argument("--no-tqdm", dest="no_tqdm", action="store_true", help="disable progress bars")
    parser.add_argument("--logging_steps", type=int, default=10)
    parser.add_argument("--report_to", default="none", help="none, tensorboard, wandb, ... (comma-separated)")
    parser.add_argument("--save_steps", type=int, default=0,
                        help="0 = only the final save; > 0 = resumable checkpoints")
    parser.add_argument("--save_total_limit", type=int, default=None, help="keep at most this many checkpoints")
    parser.add_argument("--resume_from_checkpoint", default=None,
                        help="checkpoint folder, or 'latest' (newest complete checkpoint-N in output_dir; "
                             "one cut off by a kill during its save is skipped with a warning)")
    # Data
    parser.add_argument("--dataset_path", default=None,
                        help=f"local copy of {DATASET_NAME}/{DATASET_CONFIG} (save_to_disk folder or parquet, or a "
                             f"the_cauldron snapshot's root: its {DATASET_CONFIG}/ is read)")
    parser.add_argument("--eval_size", type=int, default=500, help="the first N rows are held out for evaluation")
    parser.add_argument("--max_train_samples", type=int, default=None, help="use only the first N training rows")
    parser.add_argument("--max_eval_samples", type=int, default=None, help="evaluate only the first N held-out rows")
    parser.add_argument("--max_length", type=int, default=None,
                        help="longest training conversation (tokens, images included); longer rows are reported "
                             "as invalid, never truncated; 0 = no limit. Default: the model's context length "
                             "(max_position_embeddings in its config, 131072 for Phi-3.5-vision), so nothing the "
                             "original trains is refused; set it to have the preflight report longer rows (two "
                             "images at --num_crops 16 are at most 5,306 image tokens). GPU memory is the real "
                             "limit: a rough estimate, not measured by this repo (worked out from the original "
                             "recipe's published A100 peaks, with gradient checkpointing and flash attention), is "
                             "2-2.5 MB per token of a micro-batch on top of a fixed cost per GPU of about 30 GB for "
                             "full fine-tuning (ZeRO-2 over 8 GPUs), 10 GB for LoRA and 4.5 GB for QLoRA: an 80 GB "
                             "GPU holds roughly 20k tokens per micro-batch (full), 30k (LoRA), 33k (QLoRA); a 24 GB "
                             "GPU about 5k (LoRA) or 8k (QLoRA)")
    parser.add_argument("--dataloader_num_workers", type=int, default=4,
                        help="dataloader processes (also the processes of the preflight check on large data)")
    parser.add_argument("--skip_invalid", action="store_true",
                        help="train without the rows that fail the preflight checks (listed in "
                             "output_dir/skipped_rows.jsonl) instead of stopping with a report")
    parser.add_argument("--preflight_only", action="store_true",
                        help="check the data and print a summary (rows, images per row, tokens per row at "
                             "--num_crops, rows over --max_length, invalid rows), also written to "
                             "output_dir/preflight_summary.json (+ invalid_rows.jsonl), then exit: 0 if the data is "
                             "clean, else 1. No model weights are loaded; nothing else is written")
    parser.add_argument("--packing", action="store_true",
                        help="pack each micro batch (--batch_size_per_gpu samples) into one row without padding "
                             "(positions restart per sample, no attention across samples): no compute spent on "
                             "padding, the more so the more the lengths differ; flash-attn runs its varlen kernel "
                             "on GPU, sdpa/eager keep attention inside each sample on CPU. Same loss as the padded "
                             "batch. Training (and --eval_steps loss) only: generation stays batched and padded")
    parser.add_argument("--group_by_length", action="store_true",
                        help="draw micro batches of similar length (tokens counted from the image sizes, without "
                             "decoding): less padding, at the price of a less random order")
    # Evaluation
    parser.add_argument("--eval_steps", type=int, default=0, help="> 0: held-out loss every N steps")
    parser.add_argument("--max_eval_loss_samples", type=int, default=64, help="held-out rows used for --eval_steps")
    parser.add_argument("--eval_batch_size", type=int, default=None,
                        help="generation batch per device (default --batch_size_per_gpu)")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    # The `deepspeed` launcher passes --local_rank; torchrun uses the LOCAL_RANK variable instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    validate_args(parser, args)
    return args


def validate_args(parser, args):
    """Fail in one line before anything heavy is loaded."""
    if args.use_qlora:
        args.use_lora = True
    if args.deepspeed and args.deepspeed.lower() == "none" or args.preflight_only:
        args.deepspeed = ""  # --preflight_only trains nothing: no DeepSpeed set-up
    if not 1 <= args.num_crops <= 16:
        parser.error(f"--num_crops must be between 1 and 16, got {args.num_crops}")
    if args.use_flash_attention:
        # As the original: flash attention implies bf16 (fp16 mixed precision keeps the weights in fp32,
        # which flash attention cannot run).
        args.bf16 = True
        if not torch.cuda.is_available():
            parser.error("--use_flash_attention needs a CUDA GPU")
        if importlib.util.find_spec("flash_attn") is None:
            parser.error("--use_flash_attention needs the flash-attn package (pip install flash-attn)")
    if args.use_qlora and importlib.util.find_spec("bitsandbytes") is None:
        parser.error("--use_qlora needs the bitsandbytes package (pip install bitsandbytes)")
    if args.merge_lora and not args.use_lora:
        parser.error("--merge_lora only applies to --use_lora / --use_qlora runs")
    if args.batch_size_per_gpu < 1 or args.batch_size < 1:
        parser.error("--batch_size and --batch_size_per_gpu must be >= 1")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size % (world_size * args.batch_size_per_gpu) != 0:
        parser.error(f"--batch_size {args.batch_size} is not divisible by world_size {world_size} x "
                     f"--batch_size_per_gpu {args.batch_size_per_gpu}")
    if args.lora_rank < 1:
        parser.error("--lora_rank must be >= 1")
    if args.max_length is not None and args.max_length < 0:
        parser.error("--max_length must be >= 0 (0 = no limit)")
    if args.dataloader_num_workers < 0:
        parser.error("--dataloader_num_workers must be >= 0")
    if args.eval_batch_size is not None and args.eval_batch_size < 1:
        parser.error("--eval_batch_size must be >= 1")
    if args.eval_size < 0:
        parser.error("--eval_size must be >= 0")
    if args.eval_steps > 0 and (args.eval_size == 0 or args.max_eval_loss_samples < 1 or args.max_eval_samples == 0):
        parser.error("--eval_steps needs held-out rows: "
                     "--eval_size, --max_eval_loss_samples (and --max_eval_samples) > 0")
    if not args.use_lora and args.deepspeed and not Path(args.deepspeed).is_file():
        parser.error(f"--deepspeed config {args.deepspeed} not found")
    if args.dataset_path is not None:
        folder, problem = cauldron_config_folder(Path(args.dataset_path))
        if problem:
            parser.error(f"--dataset_path {args.dataset_path}: {problem}")
        args.dataset_path = str(folder)
        problem = dataset_path_problem(folder)
        if problem:
            parser.error(f"--dataset_path {args.dataset_path}: {problem}")
    if args.resume_from_checkpoint == "latest":
        import phi3v

        # Skips (and warns about) a checkpoint-N left without trainer_state.json by a kill during its save.
        last = phi3v.last_complete_checkpoint(args.output_dir)
        if last is None:
            parser.error(f"--resume_from_checkpoint latest: no complete checkpoint-* folder in {args.output_dir}")
        print(f"--resume_from_checkpoint latest: resuming from {last}")
        args.resume_from_checkpoint = last
    elif args.resume_from_checkpoint and not Path(args.resume_from_checkpoint).is_dir():
        parser.error(f"--resume_from_checkpoint {args.resume_from_checkpoint} is not a folder")
    if not args.preflight_only:  # it writes only its summary: any --output_dir will do
        check_output_dir(parser, args)


# Files that only a run that got to the end writes (the final model or adapter, its logs, its evaluation).
FINISHED_RUN_FILES = ("eval_after.json", "log_history.json", "model.safetensors", "model.safetensors.index.json",
                      "pytorch_model.bin", "adapter_model.safetensors", "adapter_config.json", "merged")


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
            print(f"--overwrite_output_dir: {output_dir} already holds {', '.join(finished + checkpoints)}; "
                  "files of this run will be written over them (nothing is deleted)")
        return
    if finished:
        parser.error(f"--output_dir {output_dir} already holds a finished run ({', '.join(finished)}); "
                     "choose another --output_dir, or pass --overwrite_output_dir to write over it")
    if checkpoints and not args.resume_from_checkpoint:
        parser.error(f"--output_dir {output_dir} holds checkpoints of an unfinished run ({', '.join(checkpoints)}); "
                     "pass --resume_from_checkpoint latest to continue it, or --overwrite_output_dir to start over")


# A snapshot of the_cauldron holds each config in a folder named after it (ROOT/docvqa/train-*.parquet,
# ROOT/hateful_memes/..., ROOT/nlvr2/..., ...). Given such a root, reading every parquet file under
# it would mix the configs.
NOT_CONFIG_FOLDERS = {"train", "test", "validation", "val", "valid", "dev", "data"}  # split-like names


def cauldron_config_folder(path: Path) -> tuple[Path, str | None]:
    """(the folder to read, None), or (path, why not) for a copy of the_cauldron that may hold other configs.

    A folder holding a `nlvr2/` folder: that folder. A folder holding two or more other folders of
    parquet files (a snapshot without nlvr2): refused. Anything else (the config's own folder, a
    save_to_disk folder, parquet files): as it is.
    """
    if not path.is_dir() or any((path / name).exists() for name in ("state.json", "dataset_dict.json")):
        return path, None
    if (path / DATASET_CONFIG).is_dir():
        return path / DATASET_CONFIG, None
    others = sorted(d.name for d in path.iterdir()
                    if d.is_dir() and d.name not in NOT_CONFIG_FOLDERS and next(d.rglob("*.parquet"), None))
    if len(others) > 1:
        return path, (f"holds the folders {', '.join(name + '/' for name in others)} (a the_cauldron snapshot?) "
                      f"and no {DATASET_CONFIG}/ folder; reading them all would mix them: give the {DATASET_CONFIG} "
                      f"folder of the snapshot ({path / DATASET_CONFIG} once downloaded), or parquet files of "
                      f"{DATASET_CONFIG} only")
    return path, None


def dataset_path_problem(path):
    """What is missing at --dataset_path (None when it looks loadable): see load_data for the accepted forms."""
    if not path.exists():
        return "no such file or folder"
    if path.is_file():
        return None if path.suffix == ".parquet" else "not a .parquet file (nor a save_to_disk folder)"
    if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
        return None
    if next(path.rglob("*.parquet"), None) is None:
        return ("the folder holds neither a save_to_disk dataset (state.json or dataset_dict.json) "
                "nor any *.parquet file")
    return None


def set_single_process_env():
    """Let `python script.py` (no launcher) run DeepSpeed: it wants a rendezvous, else it looks for MPI."""
    if any(k in os.environ for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK")):
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def load_data(dataset_path=None):
    """The whole NLVR2 table of the_cauldron (it has a single `train` split), from the hub or a local copy.

    Returns (dataset, row_name): row_name(n) names row n of the table for a person, with its parquet
    file when the data came from several files. A copy that cannot be read stops the run here.
    """
    import datasets

    if dataset_path is None:
        return datasets.load_dataset(DATASET_NAME, DATASET_CONFIG, split="train"), "row {}".format
    path = Path(dataset_path)
    if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        try:
            data = datasets.load_from_disk(str(path))
        except Exception as error:  # a damaged copy: say which folder, not where in datasets it broke
            raise SystemExit(f"error: --dataset_path {path}: cannot load the save_to_disk dataset "
                             f"({type(error).__name__}: {error})") from None
        if isinstance(data, datasets.DatasetDict):
            data = data["train"]
        return data, "row {}".format
    import pyarrow.parquet as pq

    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    counts = []
    for file in files:
        try:
            counts.append(pq.ParquetFile(file).metadata.num_rows)
        except Exception as error:
            raise SystemExit(f"error: {file}: not a readable parquet file ({type(error).__name__}: {error})") from None
    try:
        data = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    except Exception as error:
        raise SystemExit(f"error: --dataset_path {path}: cannot read the parquet data "
                         f"({type(error).__name__}: {error})") from None

    def row_name(row):  # the files are read in this (sorted) order, one after the other
        for file, count in zip(files, counts):
            if row < count:
                return f"{file.relative_to(path) if path.is_dir() else file.name} row {row}"
            row -= count
        return f"row {row}"

    return data, row_name


def user_prompt(tokenizer, content):
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )


def first_turn_content(question):
    # Adapt: the two image tags come back to back, as in the cookbook recipe; reorder or reword here.
    return f"<|image_1|><|image_2|>\n{question}"


def answer_token_ids(tokenizer, answer):
    # No BOS inside the sequence; <|endoftext|> ends the answer so the model learns to stop.
    return tokenizer(f"{answer}<|end|>\n<|endoftext|>", add_special_tokens=False).input_ids


def conversation_length(tokenizer, texts, image_sizes, num_crops):
    """Tokens the train collator produces for one row, counted without running the image processor."""
    import phi3v

    total = 0
    for turn_index, turn in enumerate(texts):
        content = first_turn_content(turn["user"]) if turn_index == 0 else turn["user"]
        # The processor tokenizes the text around each image tag separately, each piece with its <s>.
        total += sum(len(tokenizer(chunk).input_ids) for chunk in IMAGE_TAG.split(user_prompt(tokenizer, content)))
        if turn_index == 0:
            total += sum(phi3v.num_image_tokens(w, h, num_crops) for w, h in image_sizes)
        total += len(answer_token_ids(tokenizer, turn["assistant"]))
    return total


def row_problems(images, texts, tokenizer, num_crops, max_length):
    """(reasons, length, images): why one raw row cannot be trained on (empty list: it can), its length in
    tokens and its number of images.

    Every image is fully decoded with phi3v's load_image (a truncated JPEG only shows on decode),
    exactly as the collator will open it. The length (None when an image or a text cannot be read) comes from the decoded
    image sizes and the token-count formula; max_length None means no limit (the held-out rows).
    """
    from phi3v.validation import InvalidSample, image_tag_problem, load_image

    reasons = []
    # Adapt: the checks of your own row layout (here the_cauldron's: 2 images, turns of user/assistant).
    if not isinstance(texts, list) or not texts:
        reasons.append("no conversation: 'texts' must be a non-empty list of {user, assistant} turns")
        texts = []
    for number, turn in enumerate(texts, start=1):
        if not isinstance(turn, dict):
            reasons.append(f"turn {number} is a {type(turn).__name__}, not a {{user, assistant}} record")
            continue
        for role in ("user", "assistant"):
            value = turn.get(role)
            if not isinstance(value, str) or not value.strip():
                reasons.append(f"turn {number}: {'missing' if value is None else 'empty'} {role} text")
        if isinstance(turn.get("user"), str):
            # The script writes the tags of the first turn itself; tags inside the data would clash with them.
            prompt, num_images = (first_turn_content(turn["user"]), 2) if number == 1 else (turn["user"], 0)
            problem = image_tag_problem(prompt, num_images)
            if problem:
                kind = "the prompt with both images" if number == 1 else "a text-only turn"
                reasons.append(f"turn {number} ({kind}): {problem}")
    images = list(images) if isinstance(images, (list, tuple)) else []
    if len(images) != 2:
        reasons.append(f"{len(images)} image(s); NLVR2 rows need exactly 2")
    sizes = []
    for number, image in enumerate(images, start=1):
        if image is None:
            reasons.append(f"image {number}: missing (null)")
            continue
        try:
            sizes.append(load_image(image).size)
        except InvalidSample as error:
            reasons.append(f"image {number}: {error}")
    # Counted whatever the row's other problems (for --preflight_only), unless an image or a text cannot be read.
    length = None
    if texts and len(sizes) == len(images):
        try:
            length = conversation_length(tokenizer, texts, sizes, num_crops)
        except (TypeError, KeyError, AttributeError, ValueError):
            if not reasons:
                raise  # a row without problems can always be counted
            length = None  # a turn that is not {user, assistant} text, reported above: too broken to count
    if length is not None and max_length is not None and length > max_length:
        # Never cut: truncation would drop image tokens or the answer.
        reasons.append(f"{length} tokens (images included) > --max_length {max_length}")
    return reasons, length, len(images)


def check_rows(dataset, tokenizer, num_crops, max_length, num_proc, split):
    """row_problems for every row: (reasons per row, length per row, images per row).

    A datasets map: with several processes on large tables, and cached, so that the other processes
    of a distributed run (waiting in main_process_first) read the main process's results.
    """
    from datasets import Features, List, Value

    if len(dataset) == 0:  # datasets skips the map (and its new columns) on an empty table
        return [], [], []

    def check(table):
        results = [row_problems(images, texts, tokenizer, num_crops, max_length)
                   for images, texts in zip(table.column("images").to_pylist(), table.column("texts").to_pylist())]
        return {"problems": [reasons for reasons, _, _ in results], "num_tokens": [n for _, n, _ in results],
                "num_images": [n for _, _, n in results]}

    checked = dataset.select_columns(["images", "texts"]).with_format("arrow").map(
        check, batched=True, batch_size=64, remove_columns=["images", "texts"],
        features=Features({"problems": List(Value("string")), "num_tokens": Value("int64"), "num_images": Value("int64")}),
        num_proc=num_proc if num_proc and num_proc > 1 and len(dataset) >= 1000 else None,
        desc=f"preflight of the {split} rows",
    ).with_format(None)
    return checked["problems"], checked["num_tokens"], checked["num_images"]


def context_length(model_name_or_path: str) -> int:
    """The model's context length: `max_position_embeddings` of its config (131072 for Phi-3.5-vision)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_name_or_path).max_position_embeddings


def create_datasets(args, tokenizer):
    """(train, eval, preflight): the first --eval_size rows are held out, as the cookbook's train[:500] / train[500:].

    Every row that will be used (after --max_*_samples) is checked; the problems are collected in
    `preflight`, not acted on, so that the caller can stop or drop rows on every process alike. Both
    sets get a `length` column (tokens, from the image sizes) for --group_by_length.
    """
    from phi3v.validation import Preflight

    data, row_name = load_data(args.dataset_path)
    missing = [name for name in ("images", "texts") if name not in data.column_names]
    if missing:
        raise SystemExit(f"error: --dataset_path {args.dataset_path or DATASET_NAME}: missing column(s) "
                         f"{', '.join(missing)} (found: {', '.join(data.column_names)}); NLVR2 rows need "
                         "`images` (2 images) and `texts` (turns of user/assistant text)")
    if "length" in data.column_names:
        data = data.remove_columns("length")

    eval_size = min(args.eval_size, len(data))
    eval_set = data.select(range(eval_size))
    train_set = data.select(range(eval_size, len(data)))
    if args.max_train_samples is not None:
        train_set = train_set.select(range(min(args.max_train_samples, len(train_set))))
    if args.max_eval_samples is not None:
        eval_set = eval_set.select(range(min(args.max_eval_samples, len(eval_set))))
    if len(train_set) == 0:
        raise SystemExit(f"error: no training rows: the table has {len(data)} rows and the first --eval_size "
                         f"{args.eval_size} are held out")

    if args.max_length is None:  # the default: what the model can take, so nothing the original trains is refused
        args.max_length = context_length(args.model_name_or_path)
    preflight = Preflight(f"the NLVR2 data ({args.dataset_path or DATASET_NAME})")
    # Held-out rows have no length limit: generation asks the first statement only.
    limits = {"eval": (eval_set, 0, None), "train": (train_set, eval_size, args.max_length or None)}
    checked = {}
    for split, (subset, first_row, max_length) in limits.items():
        problems, lengths, num_images = check_rows(subset, tokenizer, args.num_crops, max_length,
                                                   args.dataloader_num_workers, split)
        for index, reasons in enumerate(problems):
            if reasons:
                preflight.add(f"{row_name(first_row + index)} ({split})", "; ".join(reasons), key=(split, index))
            preflight.measure(split, (split, index), num_images[index], lengths[index])
        checked[split] = subset.add_column("length", lengths)
    return checked["train"], checked["eval"], preflight


def without_rows(dataset, split, dropped):
    """The rows of `dataset` whose key (split, index) the preflight did not drop."""
    keep = [index for index in range(len(dataset)) if (split, index) not in dropped]
    return dataset.select(keep) if len(keep) != len(dataset) else dataset


def prepare_datasets(args, training_args, tokenizer):
    """Checked (train, eval) sets; every process of a distributed run ends with the same rows or the same stop.

    The checks run on the main process first (the others then read its cached results); the
    decision to stop or drop is taken by every process only after that, so none exits alone.
    """
    with training_args.main_process_first(local=True, desc="checking the data"):
        train_set, eval_set, preflight = create_datasets(args, tokenizer)
    if args.preflight_only:
        preflight.exit_with_summary(args.output_dir, args.max_length, args.num_crops, is_main=training_args.should_save)
    dropped = preflight.finish(args.output_dir, args.skip_invalid, is_main=training_args.should_save)
    train_set, eval_set = without_rows(train_set, "train", dropped), without_rows(eval_set, "eval", dropped)
    if len(train_set) == 0:
        raise SystemExit(f"error: no valid training rows left after --skip_invalid (all {len(preflight)} "
                         f"listed in {Path(args.output_dir) / 'skipped_rows.jsonl'})")
    if training_args.should_save:
        print(f"data: {len(train_set)} training rows, {len(eval_set)} held-out rows"
              f"{f' ({len(preflight)} invalid rows skipped)' if dropped else ''}")
    return train_set, eval_set


class NLVR2DataCollator:
    """Raw rows -> a training batch; every turn of every conversation is supervised.

    Each turn is its own chat-template call, so every turn starts with <s><|user|> (as the cookbook):
    turn = [prompt | answer], labels = [-100 ... | answer]. The first turn holds both images.
    Runs in the dataloader workers, so image decoding and cropping happen there. Every image goes
    through phi3v's load_image (EXIF rotation, transparency, CMYK, 16-bit -> RGB) exactly as in the
    preflight, so nothing the preflight accepted can fail here.

    Default: a right-padded batch with an attention mask. packing=True: the samples are concatenated
    into ONE row without padding (phi3v.pack_examples: positions restart at every sample and no token
    attends across samples), which wastes no compute on padding tokens.
    """

    def __init__(self, processor, packing=False):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.packing = packing

    def encode(self, example):
        from phi3v.validation import load_image

        images = [load_image(image) for image in example["images"]]
        if len(images) != 2:
            raise ValueError(f"NLVR2 rows need exactly 2 images, got {len(images)}: {example['texts']}")
        input_ids, labels = [], []
        pixel_values = image_sizes = None
        for turn_index, turn in enumerate(example["texts"]):
            # Adapt: build the prompt of each turn for your own dataset here.
            if turn_index == 0:
                inputs = self.processor(user_prompt(self.tokenizer, first_turn_content(turn["user"])), images)
                pixel_values, image_sizes = inputs["pixel_values"], inputs["image_sizes"]
            else:
                inputs = self.processor(user_prompt(self.tokenizer, turn["user"]))
            prompt_ids = inputs["input_ids"][0].tolist()
            answer_ids = answer_token_ids(self.tokenizer, turn["assistant"])
            input_ids += prompt_ids + answer_ids
            labels += [IGNORE_INDEX] * len(prompt_ids) + answer_ids
        return input_ids, labels, pixel_values, image_sizes

    def __call__(self, examples):
        encoded = [self.encode(example) for example in examples]
        if self.packing:
            import phi3v

            return phi3v.pack_examples([
                {"input_ids": ids, "labels": row_labels, "pixel_values": pixels, "image_sizes": sizes}
                for ids, row_labels, pixels, sizes in encoded
            ])
        longest = max(len(ids) for ids, *_ in encoded)
        input_ids = torch.full((len(encoded), longest), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(encoded), longest), IGNORE_INDEX, dtype=torch.long)
        # attention_mask is 1 on every real token. The cookbook used input_ids != pad_token_id, but
        # <|endoftext|> *is* the pad token (32000), so it also hid the <|endoftext|> that ends every
        # turn of a multi-turn conversation from the later turns.
        attention_mask = torch.zeros((len(encoded), longest), dtype=torch.long)
        for row, (ids, row_labels, _, _) in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(ids)] = torch.tensor(row_labels)
            attention_mask[row, : len(ids)] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": torch.cat([pv for *_, pv, _ in encoded]),
            "image_sizes": torch.cat([sizes for *_, sizes in encoded]),
        }


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def create_model(args, use_cuda):
    import phi3v
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    # Phi-3.5-vision was trained in bf16; for fp16 mixed precision the weights stay fp32 (AMP master copy).
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    kwargs = dict(dtype=dtype, attn_implementation="flash_attention_2" if args.use_flash_attention else "sdpa")
    if args.use_qlora:
        compute_dtype = torch.bfloat16 if args.bf16 else (torch.float16 if use_cuda else torch.float32)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
        )
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))} if use_cuda else "cpu"
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, **kwargs)
    if args.use_qlora:
        phi3v.fix_4bit_cpu_gradients(model)

    if args.freeze_vision_model:
        # Freezes CLIP, the separators and the projector. Unlike the original remote code, phi3v's image
        # embedder does not hold the token embedding matrix, so the token embeddings keep training.
        model.model.vision_embed_tokens.requires_grad_(False)

    if args.use_lora:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if args.use_qlora:
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        config = LoraConfig(
            r=args.lora_rank,
            lora_alpha=round(args.lora_rank * args.lora_alpha_ratio),
            lora_dropout=args.lora_dropout,
            # Adapt: which layers get adapters (the language model, plus CLIP and the projector unless frozen).
            target_modules=phi3v.lora_target_modules(model, vision=not args.freeze_vision_model),
            init_lora_weights="gaussian",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
        model.print_trainable_parameters()
    return model


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def create_training_arguments(args, use_cuda, world_size):
    from transformers import TrainingArguments

    use_deepspeed = bool(args.deepspeed) and not args.use_lora
    return TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size_per_gpu,
        per_device_eval_batch_size=args.eval_batch_size or args.batch_size_per_gpu,
        gradient_accumulation_steps=args.batch_size // (world_size * args.batch_size_per_gpu),
        gradient_checkpointing=True,
        # Non-reentrant checkpointing gives gradients to LoRA weights behind frozen inputs.
        gradient_checkpointing_kwargs={"use_reentrant": False},
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
        save_only_model=False,  # checkpoints keep optimizer, scheduler and RNG state, so they resume
        bf16=args.bf16,
        fp16=use_cuda and not args.bf16,
        use_cpu=not use_cuda,
        # gloo for several CPU processes; a lone process (plain `python`, no LOCAL_RANK) must get no backend,
        # else accelerate asks for a process group that nobody created.
        ddp_backend="gloo" if not use_cuda and "LOCAL_RANK" in os.environ else None,
        remove_unused_columns=False,  # the collator needs the raw `images` and `texts` columns
        # The `length` column comes from the preflight: image sizes + token-count formula, no pixel decoding.
        train_sampling_strategy="group_by_length" if args.group_by_length else "random",
        length_column_name="length",
        ddp_find_unused_parameters=False,
        dataloader_num_workers=args.dataloader_num_workers,
        dataloader_prefetch_factor=2 if args.dataloader_num_workers > 0 else None,
        report_to=[r.strip() for r in args.report_to.split(",")] if args.report_to != "none" else "none",
        disable_tqdm=args.no_tqdm,
        seed=args.seed,
        deepspeed=args.deepspeed if use_deepspeed else None,
    )


def make_trainer_class():
    from transformers import Trainer

    class ThroughputTrainer(Trainer):
        """Trainer that logs training images/s, non-padding tokens/s and the fraction of the batches' positions
        that are padding next to the loss (all ranks summed).

        Counted from the batches the model actually gets (so dataloader workers and resumed runs are
        right), and added in `log` before the entry reaches `log_history` and the loggers.
        """

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._since_log = torch.zeros(3, dtype=torch.float64)  # images, real tokens, positions on this rank
            self._total = torch.zeros(3, dtype=torch.float64)
            self._last_log_time = None

        def training_step(self, model, inputs, num_items_in_batch=None):
            if self._last_log_time is None:
                self._last_log_time = time.perf_counter()
            images = len(inputs["image_sizes"]) if "image_sizes" in inputs else 0
            # Packed rows (--packing) have no padding and no attention_mask: every token is real.
            positions = inputs["input_ids"].numel()
            tokens = float(inputs["attention_mask"].sum()) if "attention_mask" in inputs else positions
            self._since_log += torch.tensor([images, tokens, positions], dtype=torch.float64)
            return super().training_step(model, inputs, num_items_in_batch)

        def _summed(self, counts):
            # log() runs on every rank at the same step, so a collective is safe here.
            return self.accelerator.reduce(counts.to(self.args.device), reduction="sum").cpu()

        def log(self, logs, start_time=None):
            if "loss" in logs and self._last_log_time is not None:
                now = time.perf_counter()
                counts = self._summed(self._since_log)
                seconds = max(now - self._last_log_time, 1e-9)
                logs["images_per_second"] = round(float(counts[0]) / seconds, 3)
                logs["tokens_per_second"] = round(float(counts[1]) / seconds, 3)
                logs["padding_fraction"] = round(1 - float(counts[1]) / max(float(counts[2]), 1.0), 4)
                self._total += self._since_log
                self._since_log.zero_()
                self._last_log_time = now
            elif "train_runtime" in logs:
                self._total += self._since_log
                self._since_log.zero_()
                counts = self._summed(self._total)
                runtime = max(logs["train_runtime"], 1e-9)
                logs["train_images_per_second"] = round(float(counts[0]) / runtime, 3)
                logs["train_tokens_per_second"] = round(float(counts[1]) / runtime, 3)
                logs["train_padding_fraction"] = round(1 - float(counts[1]) / max(float(counts[2]), 1.0), 4)
            super().log(logs, start_time)

    return ThroughputTrainer


def describe_setup(trainer, args, world_size):
    """One line saying what will actually run (method, DeepSpeed stage, batch arithmetic, precision)."""
    targs = trainer.args
    method = "QLoRA" if args.use_qlora else "LoRA" if args.use_lora else "full fine-tuning"
    if trainer.is_deepspeed_enabled:
        engine = f"DeepSpeed ZeRO-{trainer.accelerator.state.deepspeed_plugin.zero_stage}"
    else:
        engine = "DDP" if world_size > 1 else "single process"
    params = list(trainer.model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    precision = "bf16" if targs.bf16 else "fp16 AMP" if targs.fp16 else "fp32"
    return (f"setup: {method} | {engine} | world size {world_size} x micro batch {targs.per_device_train_batch_size}"
            f" x accumulation {targs.gradient_accumulation_steps} = batch {args.batch_size} | {precision}"
            f" | vision {'frozen' if args.freeze_vision_model else 'trained'}"
            f" | {'packed rows' if args.packing else 'padded batches'}"
            f"{', length-grouped' if targs.train_sampling_strategy == 'group_by_length' else ''}"
            f" | trainable parameters {trainable:,} of {sum(p.numel() for p in params):,}")


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


def normalize(text):
    return text.strip().strip(".").lower()


def contiguous_shard(dataset, world_size, rank):
    """Like dataset.shard(contiguous=True), but also fine when there are fewer rows than ranks."""
    per_rank, extra = divmod(len(dataset), world_size)
    start = rank * per_rank + min(rank, extra)
    return dataset.select(range(start, start + per_rank + (rank < extra)))


def confusion_matrix(predictions, answers):
    """Rows: the gold classes (ANSWER_CLASSES, then any other gold answer); columns: the same classes,
    then "(other)" for a prediction that is none of them. Matched after `normalize`, as the accuracy."""
    labels = list(ANSWER_CLASSES)
    known = {normalize(a) for a in labels}
    for answer in sorted({a.strip().strip(".") for a in answers}, key=str.lower):
        if normalize(answer) not in known:
            labels.append(answer)
            known.add(normalize(answer))
    column = {normalize(label): i for i, label in enumerate(labels)}
    matrix = [[0] * (len(labels) + 1) for _ in labels]
    for prediction, answer in zip(predictions, answers):
        matrix[column[normalize(answer)]][column.get(normalize(prediction), len(labels))] += 1
    return {"labels": labels, "columns": labels + ["(other)"], "matrix": matrix}


def save_plots(output_dir, log_history, eval_after):
    """loss_curve.png (training loss, held-out loss, learning rate) and confusion_matrix.png (after training)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots")
        return
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    lines = []
    for key, name in (("loss", "train loss"), ("eval_loss", "held-out loss")):
        points = [(h["step"], h[key]) for h in log_history if key in h]
        if points:
            lines += ax.plot(*zip(*points), marker="o" if len(points) < 30 or key == "eval_loss" else None,
                             label=name)
    ax.set(xlabel="step", ylabel="loss", title="loss and learning rate")
    rates = [(h["step"], h["learning_rate"]) for h in log_history if "learning_rate" in h]
    if rates:
        lr_axis = ax.twinx()
        lines += lr_axis.plot(*zip(*rates), color="tab:gray", linestyle="--", label="learning rate")
        lr_axis.set_ylabel("learning rate")
        lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    if lines:
        ax.legend(lines, [line.get_label() for line in lines], loc="upper right")
    fig.tight_layout()
    fig.savefig(output_dir / "loss_curve.png", dpi=100)
    plt.close(fig)
    if eval_after and eval_after.get("num_samples"):
        cm = eval_after["confusion_matrix"]
        size = 2 + 0.5 * len(cm["columns"])
        fig, ax = plt.subplots(figsize=(size + 1, size))
        image = ax.imshow(cm["matrix"], cmap="Blues", vmin=0)
        ax.set_xticks(range(len(cm["columns"])), cm["columns"], rotation=60, ha="right")
        ax.set_yticks(range(len(cm["labels"])), cm["labels"])
        darkest = max(map(max, cm["matrix"]))
        for i, row in enumerate(cm["matrix"]):
            for j, count in enumerate(row):
                if count:
                    ax.text(j, i, count, ha="center", va="center", fontsize=10,
                            color="white" if count > darkest / 2 else "black")
        ax.set(xlabel="prediction", ylabel="answer", title=f"accuracy {eval_after['accuracy']:.3f}")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        fig.savefig(output_dir / "confusion_matrix.png", dpi=100)
        plt.close(fig)


def evaluate(model, processor, dataset, args, training_args, output_file):
    """Greedy answers to the first statement of each row; exact-match accuracy written by rank 0."""
    from accelerate.utils import gather_object
    from phi3v.validation import load_image

    tokenizer = processor.tokenizer
    shard = contiguous_shard(dataset, training_args.world_size, training_args.process_index)
    batch_size = args.eval_batch_size or args.batch_size_per_gpu
    device = next(model.parameters()).device
    end_ids = [tokenizer.convert_tokens_to_ids("<|end|>"), tokenizer.eos_token_id]
    records = []
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(shard), batch_size):
                rows = shard[start : start + batch_size]
                # Adapt: the evaluation prompt (here the first turn only, as the cookbook).
                questions = [texts[0]["user"] for texts in rows["texts"]]
                prompts = [user_prompt(tokenizer, first_turn_content(q)) for q in questions]
                images = [[load_image(image) for image in row_images] for row_images in rows["images"]]
                inputs = processor(text=prompts, images=images, padding=True)
                inputs = inputs.to(device)
                generated = model.generate(
                    **inputs,
                    max_new_tokens=args.max_new_tokens,
                    eos_token_id=end_ids,
                    pad_token_id=tokenizer.pad_token_id,
                    do_sample=False,
                    use_cache=True,
                )
                new_tokens = generated[:, inputs["input_ids"].shape[1] :]
                texts = processor.batch_decode(new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
                for question, texts_row, prediction in zip(questions, rows["texts"], texts):
                    answer = texts_row[0]["assistant"]
                    records.append({"question": question, "answer": answer, "prediction": prediction})
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)

    records = gather_object(records)
    if not training_args.should_save:  # only the main process (rank 0) writes
        return None
    correct = [normalize(r["prediction"]) == normalize(r["answer"]) for r in records]
    result = {
        "accuracy": sum(correct) / max(len(correct), 1),
        "num_samples": len(records),
        "confusion_matrix": confusion_matrix([r["prediction"] for r in records], [r["answer"] for r in records]),
        "questions": [r["question"] for r in records],
        "answers": [r["answer"] for r in records],
        "predictions": [r["prediction"] for r in records],
    }
    Path(output_file).parent.mkdir(parents=True, exist_ok=True)
    Path(output_file).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{Path(output_file).name}: accuracy {result['accuracy']:.4f} on {len(records)} samples")
    return result


# ----------------------------------------------------------------------------------------------
# Saving and main
# ----------------------------------------------------------------------------------------------


def save(trainer, processor, args):
    """Full fine-tuning: the whole model; LoRA: the adapter. Plus the processor and the log history."""
    output_dir = Path(args.output_dir)
    trainer.save_model(str(output_dir))  # on every rank: DeepSpeed gathers the weights collectively
    if trainer.args.should_save:
        processor.save_pretrained(str(output_dir))
        if not args.use_lora:  # a drop-in folder: replaces the base's as is, for the official code and vLLM too
            import phi3v.saving

            dtype = phi3v.saving.base_dtype(args.model_name_or_path)
            phi3v.saving.finish_drop_in(output_dir, args.model_name_or_path, processor.image_processor, dtype)
        (output_dir / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2) + "\n")


def merge_lora(args, training_args):
    """--merge_lora: the base model with the adapter folded in, a drop-in model folder loadable without peft.

    As `python -m phi3v.merge`: the base reloaded in fp32 (also for QLoRA: folding the adapter into 4-bit
    weights would round it away), the saved adapter merged in, weights in the base's dtype.
    """
    if not training_args.should_save:
        return
    import phi3v.saving

    merged_dir = phi3v.saving.save_merged(args.output_dir, Path(args.output_dir) / "merged", base=args.model_name_or_path)
    print(f"merged model written to {merged_dir}")


def main(argv=None):
    args = parse_args(argv)
    use_cuda = torch.cuda.is_available()
    if args.deepspeed and not args.use_lora:
        set_single_process_env()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))

    import phi3v  # noqa: F401  (registers Phi-3.5-vision with the Auto classes)
    import phi3v.saving  # drop-in model folders (the official layout) and LoRA merging
    from transformers import AutoProcessor, set_seed

    training_args = create_training_arguments(args, use_cuda, world_size)
    set_seed(args.seed)
    with training_args.main_process_first(local=True, desc="loading the processor"):
        processor = AutoProcessor.from_pretrained(
            args.model_name_or_path, num_crops=args.num_crops,
            **({"resize_backend": args.resize_backend} if args.resize_backend else {}),
        )
    # Before the model is loaded: bad data stops the run in seconds, with one report.
    train_set, eval_set = prepare_datasets(args, training_args, processor.tokenizer)
    with training_args.main_process_first(local=True, desc="loading model"):
        model = create_model(args, use_cuda)
    if not args.use_qlora:
        model.to(training_args.device)

    output_dir = Path(args.output_dir)
    if len(eval_set) and not args.resume_from_checkpoint:
        evaluate(model, processor, eval_set, args, training_args, output_dir / "eval_before.json")
    elif args.resume_from_checkpoint:
        print("resuming: eval_before.json is left to the run that started the training")

    eval_loss_set = None
    if args.eval_steps > 0:
        eval_loss_set = eval_set.select(range(min(args.max_eval_loss_samples, len(eval_set))))
    trainer = make_trainer_class()(
        model=model,
        args=training_args,
        data_collator=NLVR2DataCollator(processor, packing=args.packing),
        train_dataset=train_set,
        eval_dataset=eval_loss_set,
        processing_class=processor,  # checkpoints then hold the processor too
    )
    # Full fine-tuning: every checkpoint-N also becomes a drop-in model folder (and stays resumable).
    trainer.add_callback(phi3v.saving.DropInCheckpoints(args.model_name_or_path, processor.image_processor))
    if training_args.should_save:
        print(describe_setup(trainer, args, world_size))
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)

    model = trainer.accelerator.unwrap_model(trainer.model)
    save(trainer, processor, args)
    eval_after = None
    if len(eval_set):
        eval_after = evaluate(model, processor, eval_set, args, training_args, output_dir / "eval_after.json")
    if training_args.should_save:
        save_plots(output_dir, trainer.state.log_history, eval_after)
    if args.merge_lora:
        merge_lora(args, training_args)  # from the saved adapter: the in-memory model stays as it is


if __name__ == "__main__":
    main()
