"""Fine-tune Phi-3.5-vision on Hateful Memes (yes/no: is this meme hateful?) with the HF Trainer.

Data: `HuggingFaceM4/the_cauldron`, config `hateful_memes` (one split, `train`; columns `images`, a
list of images, and `texts`, a list of {user, assistant, source} turns). The first `--eval_size`
rows (500) are held out for evaluation, the rest is trained on. Each sample is trained as one turn:

    <|user|>\n<|image_1|>\n{texts[0]['user']}<|end|>\n<|assistant|>\n{texts[0]['assistant']}<|end|>\n<|endoftext|>

with the loss on the answer only. Before and after training the script generates answers for the
held-out rows and writes `eval_before.json` / `eval_after.json` to `--output_dir` with
* `accuracy`: exact match after `.strip().strip('.').lower()` on prediction and gold answer;
* `auroc`: area under the ROC curve of P(yes), taken from the logits of the first answer token
  (see `yes_probability`), with the gold answer as the label (null when the labels are one class);
* `confusion_matrix`: rows the gold answers ("No", "Yes", then any other), columns the same plus
  "(other)" for any other prediction (see `confusion_matrix`);
* per sample `predictions`, `answers`, `scores`.
After training it also draws `loss_curve.png` (training loss, held-out loss with --eval_steps, and the
learning rate on a second axis) and `confusion_matrix.png` (after training) in `--output_dir`.

Launch (one node, 8 GPUs; `--batch_size` is the GLOBAL batch, split over GPUs and accumulation):

    torchrun --nproc_per_node=8 finetune_hf_trainer_hateful_memes.py --bf16 --use_flash_attention \\
        --batch_size 64 --learning_rate 5e-5 --num_train_epochs 2 --output_dir ./output/hateful_memes

Several nodes: add `--nnodes N --node_rank R --master_addr HOST --master_port PORT` to torchrun on
every node. One GPU or CPU: `python finetune_hf_trainer_hateful_memes.py ...` (full fine-tuning still
goes through DeepSpeed; the script sets the single-process rendezvous variables itself). The
`deepspeed --num_gpus N` launcher works too.

Which settings (published Phi-3-vision results on this task, global batch 64: full fine-tuning bf16
86.4 % accuracy, LoRA r128 a256 lr 2e-4 86.6 %, QLoRA 84.0 %):
* A100/H100: `--bf16 --use_flash_attention` (pip install flash-attn), full fine-tuning, lr 5e-5.
* V100 (no bf16, no flash attention): full fine-tuning in fp16 (the default without --bf16).
* Consumer GPUs: `--use_lora --lora_rank 128 --learning_rate 2e-4`, or add `--use_qlora` (4-bit,
  Turing or newer), with `--batch_size_per_gpu 1` and a smaller `--num_crops`.
* CPU (tests, debugging): everything runs in fp32 (bf16 with --bf16), attention "sdpa".

Full fine-tuning uses DeepSpeed ZeRO-2 (`ds_configs/zero2.json`); LoRA and QLoRA use plain DDP.
`--save_steps N` writes resumable checkpoints; `--resume_from_checkpoint latest` continues from the
newest complete one in `--output_dir` (a checkpoint left half-written by a kill is skipped). An
`--output_dir` that holds a finished run (eval_after.json, a saved model or adapter) is refused unless
`--overwrite_output_dir` is given.

Preflight: before any model is loaded, every training and held-out row the run will use is checked:
the image is there, is exactly one, and decodes fully (truncated or corrupt files, 1-pixel images;
CMYK, palette, 16-bit, alpha and EXIF-rotated images are valid and converted the same way everywhere
by `phi3v.validation.load_image`); the first turn has a non-empty user and assistant text without
`<|image_N|>` tags of its own; the sample fits `--max_length` (counted from the image header with the
token-count formula; samples are never truncated). Bad rows stop the run with one report (row number
in the dataset, split, reason; all of them in output_dir/invalid_rows.jsonl), or with `--skip_invalid`
are dropped and listed in output_dir/skipped_rows.jsonl.

Throughput: `--group_by_length` batches samples of similar token counts (less padding);
`--packing` concatenates each micro-batch into one padding-free row (see its help for the trade-off).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import multiprocessing
import os
import socket
import time
from pathlib import Path

import torch
from accelerate.utils import gather_object
from datasets import Dataset, DatasetDict, LargeList, List, Sequence, load_dataset, load_from_disk
from datasets import Image as ImageFeature
from sklearn.metrics import roc_auc_score
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    BitsAndBytesConfig,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.utils import is_flash_attn_2_available

import phi3v
import phi3v.saving  # drop-in model folders (the official layout) and LoRA merging
from phi3v.validation import InvalidSample, Preflight, image_size, image_tag_problem, load_image

# Adapt: the dataset and the yes/no vocabulary of your own binary task.
HUB_DATASET = "HuggingFaceM4/the_cauldron"
HUB_CONFIG = "hateful_memes"
POSITIVE_ANSWERS = ("Yes", "yes")  # label 1 for the AUROC ("hateful")
NEGATIVE_ANSWERS = ("No", "no")  # label 0
DEFAULT_DEEPSPEED = Path(__file__).resolve().parent / "ds_configs" / "zero2.json"
END_TOKEN_IDS = [32007, 32000]  # <|end|>, <|endoftext|>: generation stops at either


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", default="microsoft/Phi-3.5-vision-instruct")
    model.add_argument("--use_flash_attention", action="store_true",
                       help="flash_attention_2 (needs CUDA and flash-attn; implies --bf16)")
    model.add_argument("--bf16", action="store_true", help="bf16 (else fp16 mixed precision on GPU, fp32 on CPU)")
    model.add_argument("--use_lora", action="store_true", help="train LoRA adapters instead of all weights")
    model.add_argument("--use_qlora", action="store_true", help="LoRA on a 4-bit base model (implies --use_lora)")
    model.add_argument("--lora_rank", type=int, default=64)
    model.add_argument("--lora_alpha_ratio", type=float, default=2, help="lora_alpha = round(rank * ratio)")
    model.add_argument("--lora_dropout", type=float, default=0.0)
    model.add_argument("--freeze_vision_model", action="store_true", help="do not train CLIP and the projector")
    model.add_argument("--num_crops", type=int, default=16, help="max 336x336 crops per image (1..16)")
    model.add_argument("--resize_backend", choices=["pil", "torch"], default=None,
        help="resize in the HD transform (default: the model folder's setting, pil): pil is bit-identical to "
        "the official processor; torch (uint8 antialiased bilinear, in the same pass order) makes preprocessing 1.2x "
        "(portrait) to 1.4x (landscape) faster on RGB pages, within one uint8 level of pil on ~0.02%% of a page's pixel "
        "values. Saved with the processor.")

    data = parser.add_argument_group("data")
    data.add_argument("--dataset_path", default=None,
                      help=f"local copy of {HUB_DATASET}/{HUB_CONFIG} (save_to_disk folder or parquet file/folder, "
                           f"or a the_cauldron snapshot's root: its {HUB_CONFIG}/ is read); default: the hub")
    data.add_argument("--eval_size", type=int, default=500, help="the first N rows are held out for evaluation")
    data.add_argument("--max_train_samples", type=int, default=None, help="use only the first N training rows")
    data.add_argument("--max_eval_samples", type=int, default=None, help="evaluate on the first N held-out rows")
    data.add_argument("--max_length", type=int, default=None,
                      help="samples longer than this (image tokens included) are invalid: never truncated. Default: "
                           "the model's context length (max_position_embeddings in its config, 131072 for "
                           "Phi-3.5-vision), so nothing the original trains is refused; set it to have the preflight "
                           "report longer samples (a meme at --num_crops 16 is at most 2,653 image tokens). GPU "
                           "memory is the real limit: a rough estimate, not measured by this repo (worked out from "
                           "the original recipe's published A100 peaks, with gradient checkpointing and flash "
                           "attention), is 2-2.5 MB per token of a micro-batch on top of a fixed cost per GPU of "
                           "about 30 GB for full fine-tuning (ZeRO-2 over 8 GPUs), 10 GB for LoRA and 4.5 GB for "
                           "QLoRA: an 80 GB GPU holds roughly 20k tokens per micro-batch (full), 30k (LoRA), 33k "
                           "(QLoRA); a 24 GB GPU about 5k (LoRA) or 8k (QLoRA)")
    data.add_argument("--skip_invalid", action="store_true",
                      help="drop the rows the preflight check finds invalid (listed in output_dir/skipped_rows.jsonl) "
                           "and train on the rest; default: stop before training with a report of all of them")
    data.add_argument("--preflight_only", action="store_true",
                      help="check the data and print a summary (rows, images per row, tokens per row at --num_crops, "
                           "rows over --max_length, invalid rows), also written to output_dir/preflight_summary.json "
                           "(+ invalid_rows.jsonl), then exit: 0 if the data is clean, else 1. No model weights are "
                           "loaded; nothing else is written")

    train = parser.add_argument_group("training")
    train.add_argument("--batch_size", type=int, default=16, help="GLOBAL batch size (all GPUs x accumulation)")
    train.add_argument("--batch_size_per_gpu", type=int, default=1)
    train.add_argument("--packing", action="store_true",
                       help="pack each micro-batch (--batch_size_per_gpu samples) into one row without padding; "
                            "positions restart per sample and no token attends across samples; same loss as "
                            "padded batches. Saves the compute spent on padding: with --use_flash_attention "
                            "the varlen kernel also skips the cross-sample attention; with sdpa (CPU) a "
                            "block-diagonal mask over the whole row is built, so attention costs more when "
                            "samples are many and long, while the rest of the model saves the padding. "
                            "Training and held-out loss only (generation stays padded)")
    train.add_argument("--group_by_length", action="store_true",
                       help="sample batches of similar length (counted from image sizes and text, no pixel "
                            "decode), so less padding is wasted; the order stays random across groups")
    train.add_argument("--num_train_epochs", type=float, default=1)
    train.add_argument("--max_steps", type=int, default=-1, help="> 0 overrides --num_train_epochs")
    train.add_argument("--learning_rate", type=float, default=4.0e-5)
    train.add_argument("--wd", type=float, default=0.01, help="weight decay")
    train.add_argument("--warmup_steps", type=int, default=50)
    train.add_argument("--output_dir", default="./output/")
    train.add_argument("--overwrite_output_dir", action="store_true",
                       help="allow an --output_dir that holds a finished run (eval_after.json, a saved model or "
                            "adapter); its files are replaced as the new run writes them, nothing is deleted first")
    train.add_argument("--no-tqdm", dest="no_tqdm", action="store_true", help="no progress bars")
    train.add_argument("--logging_steps", type=int, default=10)
    train.add_argument("--save_steps", type=int, default=0,
                       help="> 0: resumable checkpoint every N steps; 0: only the final model")
    train.add_argument("--save_total_limit", type=int, default=None, help="keep only the newest N checkpoints")
    train.add_argument("--resume_from_checkpoint", default=None,
                       help="checkpoint folder, or 'latest' in --output_dir (keep --max_steps/--num_train_epochs: "
                            "the restored optimizer and LR schedule follow the old ones)")
    train.add_argument("--eval_steps", type=int, default=0,
                       help="> 0: held-out loss every N steps on --max_eval_loss_samples rows")
    train.add_argument("--max_eval_loss_samples", type=int, default=64)
    train.add_argument("--report_to", default="none", help="none, tensorboard, wandb, ... (comma separated)")
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--dataloader_num_workers", type=int, default=4)
    train.add_argument("--deepspeed", default=str(DEFAULT_DEEPSPEED),
                       help="DeepSpeed config for full fine-tuning ('none': plain DDP); never used with LoRA")
    train.add_argument("--merge_lora", action="store_true", help="LoRA/QLoRA: also write the base (reloaded in fp32) "
                       "with the adapter merged in to output_dir/merged, a drop-in model folder in the base's dtype "
                       "(as python -m phi3v.merge)")
    # The `deepspeed` launcher passes --local_rank; the rank is read from LOCAL_RANK instead.
    train.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)

    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--max_new_tokens", type=int, default=64)
    evaluation.add_argument("--eval_batch_size", type=int, default=None,
                            help="generation batch (default: --batch_size_per_gpu)")

    args = parser.parse_args(argv)
    if args.use_qlora:
        args.use_lora = True
    if args.eval_batch_size is None:
        args.eval_batch_size = args.batch_size_per_gpu

    # Checked before anything heavy is loaded, so a wrong flag fails in seconds.
    if args.use_flash_attention:
        if not torch.cuda.is_available():
            parser.error("--use_flash_attention needs a CUDA GPU; leave it out to use sdpa attention")
        if not is_flash_attn_2_available():
            parser.error("--use_flash_attention needs the flash-attn package "
                         "(pip install flash-attn --no-build-isolation)")
        # Flash attention implies bf16: it cannot run in fp16 mixed precision with fp32 weights (the original
        # loaded the weights in bf16 for it, then trained in fp16 without --bf16: a known issue of the recipe).
        args.bf16 = True
    if not 1 <= args.num_crops <= 16:
        parser.error(f"--num_crops must be between 1 and 16, got {args.num_crops}")
    if args.use_qlora and importlib.util.find_spec("bitsandbytes") is None:
        parser.error("--use_qlora needs bitsandbytes (pip install bitsandbytes)")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size_per_gpu < 1 or args.batch_size < 1:
        parser.error(f"--batch_size ({args.batch_size}) and --batch_size_per_gpu ({args.batch_size_per_gpu}) "
                     "must be >= 1")
    if args.batch_size % (world_size * args.batch_size_per_gpu) != 0:
        parser.error(f"--batch_size {args.batch_size} must be a multiple of world size {world_size} x "
                     f"--batch_size_per_gpu {args.batch_size_per_gpu}")
    if args.eval_size < 0:
        parser.error("--eval_size must be >= 0")
    if args.dataset_path is not None:
        folder, problem = cauldron_config_folder(Path(args.dataset_path))
        if problem:
            parser.error(f"--dataset_path {args.dataset_path}: {problem}")
        args.dataset_path = str(folder)
        problem = dataset_path_problem(folder)
        if problem:
            parser.error(f"--dataset_path {args.dataset_path}: {problem}")
    if args.preflight_only:
        args.deepspeed = "none"  # nothing is trained: no DeepSpeed set-up, and any --output_dir will do
    finished = finished_run_files(Path(args.output_dir))
    if finished and not args.overwrite_output_dir and not args.preflight_only:
        parser.error(f"--output_dir {args.output_dir} already holds a finished run ({', '.join(finished)}); "
                     "choose another --output_dir, or add --overwrite_output_dir to train into it anyway")
    return args


# A run is finished once it saved its model (or adapter) and history; checkpoint-* folders alone mean
# an unfinished run, which --resume_from_checkpoint continues in the same --output_dir.
FINISHED_RUN_FILES = ("eval_after.json", "log_history.json", "model.safetensors", "model.safetensors.index.json",
                      "pytorch_model.bin", "adapter_model.safetensors", "merged")


def finished_run_files(output_dir: Path) -> list[str]:
    return [name for name in FINISHED_RUN_FILES if (output_dir / name).exists()]


# A snapshot of the_cauldron holds each config in a folder named after it (ROOT/docvqa/train-*.parquet,
# ROOT/hateful_memes/..., ROOT/nlvr2/..., ...). Given such a root, reading every parquet file under
# it would mix the configs.
NOT_CONFIG_FOLDERS = {"train", "test", "validation", "val", "valid", "dev", "data"}  # split-like names


def cauldron_config_folder(path: Path) -> tuple[Path, str | None]:
    """(the folder to read, None), or (path, why not) for a copy of the_cauldron that may hold other configs.

    A folder holding a `hateful_memes/` folder: that folder. A folder holding two or more other folders of
    parquet files (a snapshot without hateful_memes): refused. Anything else (the config's own folder, a
    save_to_disk folder, parquet files): as it is.
    """
    if not path.is_dir() or any((path / name).exists() for name in ("state.json", "dataset_dict.json")):
        return path, None
    if (path / HUB_CONFIG).is_dir():
        return path / HUB_CONFIG, None
    others = sorted(d.name for d in path.iterdir()
                    if d.is_dir() and d.name not in NOT_CONFIG_FOLDERS and next(d.rglob("*.parquet"), None))
    if len(others) > 1:
        return path, (f"holds the folders {', '.join(name + '/' for name in others)} (a the_cauldron snapshot?) "
                      f"and no {HUB_CONFIG}/ folder; reading them all would mix them: give the {HUB_CONFIG} "
                      f"folder of the snapshot ({path / HUB_CONFIG} once downloaded), or parquet files of "
                      f"{HUB_CONFIG} only")
    return path, None


def dataset_path_problem(path: Path) -> str | None:
    """Why `load_data` cannot read --dataset_path, or None. Cheap: only looks at file names."""
    if not path.exists():
        return "does not exist"
    if path.is_file():
        return None if path.suffix == ".parquet" else "is a file but not a .parquet file"
    if any((path / name).exists() for name in ("state.json", "dataset_dict.json")):
        return None
    if not glob.glob(str(path / "**" / "*.parquet"), recursive=True):
        return ("is neither a save_to_disk folder (no state.json or dataset_dict.json) nor a folder of "
                ".parquet files")
    return None


def uses_deepspeed(args) -> bool:
    # As the original: DeepSpeed ZeRO-2 for full fine-tuning only; LoRA/QLoRA train with DDP.
    return not args.use_lora and bool(args.deepspeed) and args.deepspeed.lower() != "none"


def set_single_process_env(args):
    """DeepSpeed without a launcher looks for MPI (and needs mpi4py): give it a one-process rendezvous."""
    if not uses_deepspeed(args) or "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def load_data(dataset_path: str | None, eval_size: int) -> tuple[Dataset, Dataset]:
    """(train, eval): the first `eval_size` rows are the eval set, as the original `train[:500]`.

    A file that cannot be read, or lacks a column, stops the run here with a message.
    """
    source = f"--dataset_path {dataset_path}" if dataset_path else f"{HUB_DATASET}/{HUB_CONFIG}"
    try:
        if dataset_path is None:
            dataset = load_dataset(HUB_DATASET, HUB_CONFIG, split="train")
        else:
            path = Path(dataset_path)
            if path.is_dir() and any((path / f).exists() for f in ("state.json", "dataset_dict.json")):
                dataset = load_from_disk(str(path))
                if isinstance(dataset, DatasetDict):
                    dataset = dataset["train"] if "train" in dataset else dataset[next(iter(dataset))]
            else:
                files = sorted(glob.glob(str(path / "**" / "*.parquet"), recursive=True)) if path.is_dir() else [str(path)]
                dataset = load_dataset("parquet", data_files=files, split="train")
    except Exception as err:  # corrupt parquet/arrow files: report them, not datasets' internals
        raise SystemExit(f"{source} cannot be read: {type(err).__name__}: {err}") from None
    # Adapt: the columns of your own data.
    missing = [c for c in ("images", "texts") if c not in dataset.column_names]
    images = dataset.features.get("images")
    if missing:
        problem = f"missing column(s) {', '.join(missing)} (has {', '.join(dataset.column_names)})"
    elif not (isinstance(images, (List, LargeList, Sequence)) and isinstance(images.feature, ImageFeature)):
        problem = f"column 'images' is {images}, not a list of images"
    else:
        problem = None
    if problem:
        raise SystemExit(f"{source}: {problem}; expected the {HUB_DATASET}/{HUB_CONFIG} schema: images (a list "
                         "of images) and texts (a list of {user, assistant} turns)")
    eval_size = min(eval_size, len(dataset))
    train = dataset.select(range(eval_size, len(dataset)) if eval_size < len(dataset) else [])
    return train, dataset.select(range(eval_size))


def first_turn(row: dict) -> tuple[str, str]:
    # Adapt: the question/answer of your own dataset. The original trains on the first turn only.
    turn = row["texts"][0]
    return turn["user"], turn["assistant"]


def build_prompt(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": f"<|image_1|>\n{question}"}], tokenize=False, add_generation_prompt=True
    )


def answer_token_ids(tokenizer, answer: str) -> list[int]:
    # No BOS: the answer continues the prompt. <|end|> teaches the model to stop, as the original.
    return tokenizer(f"{answer}<|end|>\n<|endoftext|>", add_special_tokens=False).input_ids


def sample_length(processor, image, question: str, answer: str) -> tuple[int, int]:
    """(tokens, image tokens) of one training sample, from the image header only (no pixel decode)."""
    tokenizer = processor.tokenizer
    width, height = image_size(image)
    # The processor tokenizes the text around each image tag separately (each part gets <s>).
    parts = build_prompt(tokenizer, question).split("<|image_1|>")
    text = sum(len(tokenizer(part).input_ids) for part in parts)
    image_tokens = phi3v.num_image_tokens(width, height, processor.num_crops)
    return text + image_tokens + len(answer_token_ids(tokenizer, answer)), image_tokens


def sample_lengths(dataset: Dataset, processor) -> list[int]:
    """Token count (image tokens included) of every sample: what --max_length and --group_by_length use."""
    return [sample_length(processor, row["images"][0], *first_turn(row))[0] for row in dataset]


def text_problems(texts) -> list[str]:
    # Adapt: the shape of your own conversations. Only the first turn is trained (first_turn).
    if not isinstance(texts, list) or not texts or not isinstance(texts[0], dict):
        return ["texts is empty or not a list of {user, assistant} turns"]
    problems = []
    for role in ("user", "assistant"):
        value = texts[0].get(role)
        if not isinstance(value, str) or not value.strip():
            problems.append(f"empty or missing {role} text (texts[0]['{role}'])")
    if not problems:
        # The script adds the <|image_1|> tag itself: any tag in the text would be a second one.
        problem = image_tag_problem(f"<|image_1|>\n{texts[0]['user']}", 1)
        if problem:
            problems.append(f"user text: {problem}")
        problem = image_tag_problem(texts[0]["assistant"], 0)
        if problem:
            problems.append(f"assistant text: {problem}")
    return problems


def image_problem(images) -> str | None:
    """Why a row's images cannot be trained on (full decode: a truncated file only shows there), or None."""
    # Adapt: Hateful Memes has one image per sample (the prompt has one <|image_1|> tag).
    if not isinstance(images, list) or not images:
        return "no image (the images list is empty)"
    if len(images) > 1:
        return f"{len(images)} images; this recipe trains on exactly one image per sample"
    if images[0] is None:
        return "image is missing (null)"
    try:
        load_image(images[0])
    except InvalidSample as err:
        return str(err)
    return None


def raw_rows(dataset: Dataset, start: int, stop: int) -> tuple[list, list]:
    """(images, texts) of rows start..stop, images as undecoded {bytes, path} cells (load_image opens them)."""
    table = dataset.select_columns(["images", "texts"]).with_format("arrow")[start:stop]
    return table.column("images").to_pylist(), table.column("texts").to_pylist()


def _check_images_range(dataset: Dataset, start: int, stop: int) -> list[str | None]:
    return [image_problem(images) for images in raw_rows(dataset, start, stop)[0]]


def check_rows(dataset: Dataset, processor, max_length: int, workers: int = 0) -> list[tuple[list[str], int | None, int | None]]:
    """(problems, length, images) of every row; the length is None only when the row is too broken to count.

    Deterministic, so every rank of a distributed run reaches the same verdict without talking to
    the others. Image decoding (the slow part) runs in `workers` processes if > 0.
    """
    if len(dataset) == 0:
        return []
    ranges = [(start, min(start + 64, len(dataset))) for start in range(0, len(dataset), 64)]
    if workers > 0 and len(ranges) > 1:
        # fork: the workers share the memory-mapped dataset instead of receiving pickled images.
        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        with context.Pool(min(workers, len(ranges))) as pool:
            chunks = pool.starmap(_check_images_range, [(dataset, start, stop) for start, stop in ranges])
    else:
        chunks = [_check_images_range(dataset, start, stop) for start, stop in ranges]
    image_results = [problem for chunk in chunks for problem in chunk]
    results = []
    images_column, texts_column = raw_rows(dataset, 0, len(dataset))
    for texts, images, image_issue in zip(texts_column, images_column, image_results):
        problems = ([image_issue] if image_issue else []) + text_problems(texts)
        # Counted whatever the row's other problems (for --preflight_only): a bad row may be too long as well.
        try:
            length, image_tokens = sample_length(processor, images[0], *first_turn({"texts": texts}))
        except (InvalidSample, TypeError, KeyError, IndexError, AttributeError, ValueError):
            if not problems:
                raise  # a row without problems can always be counted
            length = None  # missing or mistyped fields, reported above: too broken to count
        if length is not None and length > max_length:
            # Never truncated: cutting image tokens would break the image-token/feature match.
            problems.append(f"{length} tokens ({image_tokens} of them image tokens) > --max_length {max_length}")
        results.append((problems, length, len(images) if isinstance(images, list) else None))
    return results


def context_length(model_name_or_path: str) -> int:
    """The model's context length: `max_position_embeddings` of its config (131072 for Phi-3.5-vision)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_name_or_path).max_position_embeddings


def preflight(train_set: Dataset, eval_set: Dataset, num_held_out: int, processor, args, is_main: bool):
    """Check every row the run will use; stop with one report, or (--skip_invalid) drop the bad rows.

    Returns (train_set, eval_set, train_lengths, eval_lengths) without the bad rows. Rows are named
    by their row number in the dataset (the held-out rows come first) and the split they belong to.
    """
    if args.max_length is None:  # the default: what the model can take, so nothing the original trains is refused
        args.max_length = context_length(args.model_name_or_path)
    report = Preflight(f"the dataset ({args.dataset_path or f'{HUB_DATASET}/{HUB_CONFIG}'})")
    checked = {}
    for split, dataset, first_row in (("eval", eval_set, 0), ("train", train_set, num_held_out)):
        results = check_rows(dataset, processor, args.max_length, args.dataloader_num_workers)
        for i, (problems, length, images) in enumerate(results):
            for problem in problems:
                report.add(f"row {first_row + i} ({split})", problem, key=(split, i))
            report.measure(split, (split, i), images, length)
        checked[split] = results
    if args.preflight_only:
        report.exit_with_summary(args.output_dir, args.max_length, args.num_crops, is_main)
    drop = report.finish(args.output_dir, args.skip_invalid, is_main)
    out = []
    for split, dataset in (("train", train_set), ("eval", eval_set)):
        keep = [i for i in range(len(dataset)) if (split, i) not in drop]
        out.append(dataset.select(keep) if len(keep) < len(dataset) else dataset)
        out.append([checked[split][i][1] for i in keep])
    num_train = len(train_set)
    train_set, train_lengths, eval_set, eval_lengths = out
    if len(train_set) == 0:
        raise SystemExit(f"all {num_train} training rows are invalid (listed in "
                         f"{os.path.join(args.output_dir, 'skipped_rows.jsonl')}): nothing to train on" if num_train else
                         f"no training rows: the dataset has {num_held_out} rows and --eval_size holds out "
                         f"{args.eval_size}")
    if is_main:
        print(f"preflight: {len(train_set)} training and {len(eval_set)} held-out rows valid, "
              f"tokens per sample max {max(train_lengths + eval_lengths, default=0)} (--max_length {args.max_length})")
    return train_set, eval_set, train_lengths, eval_lengths


class TrainCollator:
    """Raw rows -> training batch. Runs in the dataloader workers, so images decode there.

    Padded (default): one row per sample, right padding, an attention mask. `packing`: the samples
    of the micro-batch concatenated into one row without padding (`phi3v.pack_examples`; positions
    restart at each sample and no token attends across samples).
    """

    def __init__(self, processor, packing: bool = False):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.packing = packing

    def __call__(self, rows: list[dict]) -> dict:
        examples = []
        for row in rows:
            question, answer = first_turn(row)
            # Adapt: Hateful Memes has one image per sample; pass all of them for multi-image data.
            # load_image (modes, alpha, 16-bit) as in the preflight, which decoded every image already.
            encoded = self.processor(text=build_prompt(self.tokenizer, question), images=[load_image(row["images"][0])])
            prompt_ids = encoded["input_ids"][0].tolist()
            answer_ids = answer_token_ids(self.tokenizer, answer)
            examples.append({
                "input_ids": prompt_ids + answer_ids,
                "labels": [-100] * len(prompt_ids) + answer_ids,
                "pixel_values": encoded["pixel_values"],
                "image_sizes": encoded["image_sizes"],
            })
        if self.packing:
            return phi3v.pack_examples(examples)
        longest = max(len(e["input_ids"]) for e in examples)
        pad = self.tokenizer.pad_token_id
        # The mask marks real tokens by position: <|endoftext|> at the end of every answer has the
        # pad id too, and must stay visible.
        return {
            "input_ids": torch.tensor([e["input_ids"] + [pad] * (longest - len(e["input_ids"])) for e in examples]),
            "attention_mask": torch.tensor([[1] * len(e["input_ids"]) + [0] * (longest - len(e["input_ids"]))
                                            for e in examples]),
            "labels": torch.tensor([e["labels"] + [-100] * (longest - len(e["labels"])) for e in examples]),
            "pixel_values": torch.cat([e["pixel_values"] for e in examples]),
            "image_sizes": torch.cat([e["image_sizes"] for e in examples]),
        }


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def load_model(args, device: torch.device):
    use_cuda = torch.cuda.is_available()
    # As the original: bf16 weights for bf16 training; fp32 weights for fp16 AMP (and on CPU).
    dtype = torch.bfloat16 if (args.bf16 or args.use_flash_attention) else torch.float32
    kwargs = dict(dtype=dtype, attn_implementation="flash_attention_2" if args.use_flash_attention else "sdpa")
    if args.use_qlora:
        compute_dtype = torch.bfloat16 if args.bf16 else (torch.float16 if use_cuda else torch.float32)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
        )
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))} if use_cuda else "cpu"
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, **kwargs)
    if args.use_qlora:
        phi3v.fix_4bit_cpu_gradients(model)
    else:
        model.to(device)

    if args.freeze_vision_model:
        # Freezes CLIP, the separators and the projector. Unlike the original remote code, phi3v's
        # image embedder does not hold the token embedding, so token embeddings keep training.
        model.model.vision_embed_tokens.requires_grad_(False)

    if args.use_lora:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if args.use_qlora:
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
            )
            phi3v.fix_4bit_cpu_gradients(model)
        config = LoraConfig(
            r=args.lora_rank,
            lora_alpha=round(args.lora_rank * args.lora_alpha_ratio),
            lora_dropout=args.lora_dropout,
            # Language model always; CLIP layers in use + projector unless the vision side is frozen.
            target_modules=phi3v.lora_target_modules(model, vision=not args.freeze_vision_model),
            init_lora_weights="gaussian",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    return model


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


class ThroughputTrainer(Trainer):
    """Trainer that adds `images_per_second` and `tokens_per_second` (non-padding tokens, image
    tokens included, summed over all ranks) to every training log line and to the final metrics."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._seen = [0, 0]  # images, tokens since the last training log (this rank)
        self._total = [0, 0]  # images, tokens of this train() call up to the last log (all ranks)
        self._last_log_time = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        images = inputs["pixel_values"].shape[0] if "pixel_values" in inputs else 0
        # Kept as a device tensor: no GPU sync per step, only at logging time.
        # Packed rows (--packing) have no padding, hence no attention mask.
        tokens = inputs["attention_mask"].sum() if "attention_mask" in inputs else inputs["input_ids"].numel()
        self._seen = [self._seen[0] + images, self._seen[1] + tokens]
        return super().training_step(model, inputs, num_items_in_batch)

    def _all_ranks(self, counts) -> list[int]:
        # Every rank reaches log() for training logs and the final metrics, so the gather is safe.
        local = torch.stack([torch.as_tensor(c, device=self.args.device) for c in counts]).to(torch.int64)
        return self.accelerator.gather(local).reshape(-1, 2).sum(0).tolist()

    def log(self, logs, start_time=None):
        if "loss" in logs and start_time is not None:
            now = time.time()
            elapsed = now - (self._last_log_time or start_time)
            images, tokens = self._all_ranks(self._seen)
            self._total = [self._total[0] + images, self._total[1] + tokens]
            self._seen, self._last_log_time = [0, 0], now
            if elapsed > 0:
                logs["images_per_second"] = round(images / elapsed, 3)
                logs["tokens_per_second"] = round(tokens / elapsed, 3)
        elif "train_runtime" in logs:
            images, tokens = self._all_ranks(self._seen)  # the steps after the last log line
            images, tokens = images + self._total[0], tokens + self._total[1]
            if logs["train_runtime"] > 0:
                logs["train_images_per_second"] = round(images / logs["train_runtime"], 3)
                logs["train_tokens_per_second"] = round(tokens / logs["train_runtime"], 3)
        super().log(logs, start_time)


def make_training_args(args) -> TrainingArguments:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size_per_gpu,
        per_device_eval_batch_size=args.batch_size_per_gpu,
        # Uses the `length` column that main() adds from the preflight's token counts.
        train_sampling_strategy="group_by_length" if args.group_by_length else "random",
        length_column_name="length",
        gradient_accumulation_steps=args.batch_size // (world_size * args.batch_size_per_gpu),
        # (transformers 5 name of gradient_checkpointing.) Non-reentrant: needed for LoRA, whose
        # checkpointed inputs do not require grad.
        activation_checkpointing=True,
        activation_checkpointing_kwargs={"use_reentrant": False},
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
        save_only_model=False,  # keep optimizer, scheduler and RNG state: checkpoints must resume
        eval_strategy="steps" if args.eval_steps > 0 else "no",
        eval_steps=args.eval_steps if args.eval_steps > 0 else None,
        prediction_loss_only=True,
        bf16=args.bf16,
        fp16=use_cuda and not args.bf16,
        use_cpu=not use_cuda,
        # gloo for CPU process groups; only under a launcher (without one, accelerate would still
        # try to use the process group).
        ddp_backend="gloo" if not use_cuda and "WORLD_SIZE" in os.environ else None,
        remove_unused_columns=False,  # the collator needs the raw `images` and `texts` columns
        ddp_find_unused_parameters=False,
        dataloader_num_workers=args.dataloader_num_workers,
        dataloader_prefetch_factor=2 if args.dataloader_num_workers > 0 else None,
        report_to=[r for r in args.report_to.split(",") if r] if args.report_to != "none" else "none",
        disable_tqdm=args.no_tqdm,
        seed=args.seed,
        deepspeed=args.deepspeed if uses_deepspeed(args) else None,
    )


def resolve_checkpoint(args, is_main: bool) -> str | None:
    if args.resume_from_checkpoint != "latest":
        return args.resume_from_checkpoint
    # Skips (with a warning naming it) a checkpoint-N left half-written by a kill during saving.
    last = phi3v.last_complete_checkpoint(args.output_dir)
    if is_main:
        print(f"resuming from {last}" if last else f"no checkpoint-* in {args.output_dir}: starting from scratch")
    return last


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


def normalize(text: str) -> str:
    return text.strip().strip(".").lower()


def first_token_ids(tokenizer, answers) -> list[int]:
    # The first token the training target starts with, for each spelling of the answer.
    return sorted({answer_token_ids(tokenizer, a)[0] for a in answers})


def yes_probability(first_step_logits: torch.Tensor, yes_ids: list[int], no_ids: list[int]) -> torch.Tensor:
    """P(yes) among {yes, no} from the logits of the first generated token.

    Scores come from the first generation step (no extra forward pass): "Yes" and "No" are single
    tokens (and the first token of every spelling differs), so the first-token probabilities decide
    between the two answers. The spellings of each answer are pooled; computed in log space.
    """
    logprobs = first_step_logits.float().log_softmax(-1)
    yes = logprobs[:, yes_ids].logsumexp(-1)
    no = logprobs[:, no_ids].logsumexp(-1)
    return torch.sigmoid(yes - no)


def compute_metrics(predictions: list[str], answers: list[str], scores: list[float]) -> dict:
    correct = [normalize(p) == normalize(a) for p, a in zip(predictions, answers)]
    metrics = {"accuracy": sum(correct) / max(len(correct), 1), "auroc": None}
    positives = {normalize(a) for a in POSITIVE_ANSWERS}
    negatives = {normalize(a) for a in NEGATIVE_ANSWERS}
    labels, label_scores = [], []
    for answer, score in zip(answers, scores):
        if normalize(answer) in positives | negatives:
            labels.append(int(normalize(answer) in positives))
            label_scores.append(score)
    if len(set(labels)) == 2:
        metrics["auroc"] = float(roc_auc_score(labels, label_scores))
    else:
        metrics["auroc_note"] = (f"AUROC undefined: the {len(labels)} yes/no gold labels are all one class"
                                 if labels else "AUROC undefined: no yes/no gold answers")
    if len(labels) < len(answers):
        metrics["auroc_skipped_non_yes_no"] = len(answers) - len(labels)
    return metrics


def confusion_matrix(predictions: list[str], answers: list[str]) -> dict:
    """Rows: the gold classes ("No", "Yes", then any other gold answer); columns: the same classes,
    then "(other)" for a prediction that is none of them. Matched after `normalize`, as the accuracy."""
    labels = [NEGATIVE_ANSWERS[0], POSITIVE_ANSWERS[0]]
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


def save_plots(output_dir: str, log_history: list[dict], eval_after: dict | None):
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
        auroc = "n/a" if eval_after["auroc"] is None else f"{eval_after['auroc']:.3f}"
        ax.set(xlabel="prediction", ylabel="answer", title=f"accuracy {eval_after['accuracy']:.3f}, AUROC {auroc}")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        fig.savefig(output_dir / "confusion_matrix.png", dpi=100)
        plt.close(fig)


@torch.no_grad()
def evaluate(model, processor, dataset: Dataset, args, training_args: TrainingArguments, name: str) -> dict | None:
    """Generate on this rank's shard, gather, and (rank 0) score and write `{name}.json`."""
    rank, world_size = training_args.process_index, training_args.world_size
    shard = dataset.shard(num_shards=world_size, index=rank, contiguous=True)
    tokenizer = processor.tokenizer
    yes_ids = first_token_ids(tokenizer, POSITIVE_ANSWERS)
    no_ids = first_token_ids(tokenizer, NEGATIVE_ANSWERS)
    device = next(p for p in model.parameters()).device
    was_training = model.training
    model.eval()
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation needs left padding
    results = []
    try:
        for start in range(0, len(shard), args.eval_batch_size):
            rows = shard[start : start + args.eval_batch_size]
            questions, answers = zip(*(first_turn({"texts": t}) for t in rows["texts"]))
            inputs = processor(
                text=[build_prompt(tokenizer, q) for q in questions],
                images=[[load_image(images[0])] for images in rows["images"]],
                padding=True,
            ).to(device)
            out = model.generate(
                **inputs,
                max_new_tokens=args.max_new_tokens,
                eos_token_id=END_TOKEN_IDS,
                pad_token_id=tokenizer.pad_token_id,
                do_sample=False,
                use_cache=True,
                output_logits=True,
                return_dict_in_generate=True,
            )
            new_tokens = out.sequences[:, inputs["input_ids"].shape[1] :]
            texts = processor.batch_decode(new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            scores = yes_probability(out.logits[0], yes_ids, no_ids).tolist()
            results += [{"prediction": t, "answer": a, "score": s} for t, a, s in zip(texts, answers, scores)]
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)

    results = gather_object(results)  # contiguous shards: rank order is data order
    if rank != 0:
        return None
    predictions = [r["prediction"] for r in results]
    answers = [r["answer"] for r in results]
    scores = [r["score"] for r in results]
    metrics = {**compute_metrics(predictions, answers, scores), "num_samples": len(results),
               "confusion_matrix": confusion_matrix(predictions, answers)}
    report = {**metrics, "predictions": predictions, "answers": answers, "scores": scores}
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, f"{name}.json"), "w") as f:
        json.dump(report, f, indent=2)
    auroc = "n/a" if metrics["auroc"] is None else f"{metrics['auroc']:.4f}"
    print(f"{name}: accuracy {metrics['accuracy']:.4f}, AUROC {auroc} on {len(results)} samples")
    return metrics


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------


def save(trainer: Trainer, processor, args):
    # Full fine-tuning: the whole model (DeepSpeed ZeRO-2 weights gathered); LoRA: the adapter only.
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        processor.save_pretrained(args.output_dir)
        if not args.use_lora:  # a drop-in folder: replaces the base's as is, for the official code and vLLM too
            dtype = phi3v.saving.base_dtype(args.model_name_or_path)
            phi3v.saving.finish_drop_in(args.output_dir, args.model_name_or_path, processor.image_processor, dtype)
        with open(os.path.join(args.output_dir, "log_history.json"), "w") as f:
            json.dump(trainer.state.log_history, f, indent=2)


def save_merged(args, is_main: bool):
    """LoRA/QLoRA: write base + adapter as one drop-in model folder (loads without peft) to output_dir/merged.

    As `python -m phi3v.merge`: the base reloaded in fp32 (also for QLoRA: merging into 4-bit weights
    would round the adapter away), the saved adapter folded in, weights in the base's dtype.
    """
    if not is_main:
        return
    merged_dir = phi3v.saving.save_merged(args.output_dir, os.path.join(args.output_dir, "merged"),
                                          base=args.model_name_or_path)
    print(f"merged model saved to {merged_dir}")


def main(argv=None):
    args = parse_args(argv)
    set_single_process_env(args)
    finished = finished_run_files(Path(args.output_dir))
    if finished and not args.preflight_only and int(os.environ.get("RANK", "0")) == 0:
        print(f"--overwrite_output_dir: {args.output_dir} holds a finished run ({', '.join(finished)}); "
              "the new run replaces these files as it writes its own")
    training_args = make_training_args(args)  # before the model: sets up the process group (and DeepSpeed)
    is_main = training_args.process_index == 0
    set_seed(args.seed)  # LoRA weights are drawn before the Trainer sets its seed

    with training_args.main_process_first(local=True):  # rank 0 downloads, the others read the cache
        processor = AutoProcessor.from_pretrained(
            args.model_name_or_path, num_crops=args.num_crops,
            **({"resize_backend": args.resize_backend} if args.resize_backend else {}),
        )
        train_set, eval_set = load_data(args.dataset_path, args.eval_size)
    num_held_out = len(eval_set)
    if args.max_train_samples is not None:
        train_set = train_set.select(range(min(args.max_train_samples, len(train_set))))
    if args.max_eval_samples is not None:
        eval_set = eval_set.select(range(min(args.max_eval_samples, len(eval_set))))
    # Before the model is loaded: bad data fails in seconds, and on every rank alike.
    train_set, eval_set, train_lengths, eval_lengths = preflight(
        train_set, eval_set, num_held_out, processor, args, is_main)
    loss_eval_set = eval_set.select(range(min(args.max_eval_loss_samples, len(eval_set))))
    if args.group_by_length:  # the Trainer's length-grouped sampler reads this column
        train_set = train_set.add_column("length", train_lengths)
        loss_eval_set = loss_eval_set.add_column("length", eval_lengths[: len(loss_eval_set)])

    with training_args.main_process_first(local=True):
        model = load_model(args, training_args.device)
    if is_main and args.use_lora:
        model.print_trainable_parameters()

    resume = resolve_checkpoint(args, is_main) if args.resume_from_checkpoint else None
    if resume and os.path.exists(os.path.join(args.output_dir, "eval_before.json")):
        if is_main:
            print("resuming: keeping the existing eval_before.json")
    else:
        evaluate(model, processor, eval_set, args, training_args, "eval_before")

    trainer = ThroughputTrainer(
        model=model,
        args=training_args,
        data_collator=TrainCollator(processor, packing=args.packing),
        train_dataset=train_set,
        eval_dataset=loss_eval_set if args.eval_steps > 0 else None,
        processing_class=processor,  # saved into every checkpoint, so each one is usable on its own
    )
    # Full fine-tuning: every checkpoint-N also becomes a drop-in model folder (and stays resumable).
    trainer.add_callback(phi3v.saving.DropInCheckpoints(args.model_name_or_path, processor.image_processor))
    if is_main:
        mode = "QLoRA" if args.use_qlora else "LoRA" if args.use_lora else "full fine-tuning"
        print(f"training: {mode}, DeepSpeed {'on' if trainer.is_deepspeed_enabled else 'off'}, "
              f"world size {training_args.world_size}, batch {args.batch_size} = {args.batch_size_per_gpu} per GPU "
              f"x {training_args.world_size} x {training_args.gradient_accumulation_steps} accumulation; "
              f"{args.batch_size_per_gpu} samples per micro-batch, {'packed' if args.packing else 'padded'}"
              f"{', grouped by length' if args.group_by_length else ''}")
    trainer.train(resume_from_checkpoint=resume)
    save(trainer, processor, args)

    # The in-memory model is evaluated (for LoRA the peft model: no reload needed).
    model = trainer.accelerator.unwrap_model(trainer.model)
    eval_after = evaluate(model, processor, eval_set, args, training_args, "eval_after")
    if is_main:
        save_plots(args.output_dir, trainer.state.log_history, eval_after)

    if args.merge_lora and args.use_lora:
        save_merged(args, is_main)
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
