"""Turn a hub preference set (image, question, chosen, rejected) into the layout finetune_hf_trainer_dpo.py trains on.

    out_dir/images/{row:08d}.{ext}   the images, their bytes as stored in the dataset (PNG when only pixels are)
    out_dir/pref_train.jsonl         one preference per line:
        {"id": "...", "images": ["00000000.jpg"], "prompt": "...", "chosen": "...", "rejected": "..."}
    out_dir/pref_val.jsonl           the last --num_eval rows (after the shuffle with --seed, if any)

Accepted columns (those of TRL's vision preference sets):
  * openbmb/RLAIF-V-Dataset: `image` (one image), `question`, `chosen`, `rejected` (strings); its `idx` becomes
    the id, as do `id` columns of other sets.
  * the conversational form, e.g. HuggingFaceH4/rlaif-v_formatted: `images` (a list), `prompt` (a list of
    messages whose content is typed parts, `{"type": "image"}` and `{"type": "text", "text": ...}`, or a string),
    `chosen` and `rejected` (assistant messages). Earlier user/assistant turns of the prompt become the line's
    `conversations` (each with the images its user message names); the images of the last user message belong
    to the prompt.
Image tags written into the question (`<image>`, `<|image_1|>`) are dropped: the recipe writes its own tags.

Usage:

    # from the hub (about 83k rows, 12 GB of images): all of it, or --max_samples N
    python convert_preference_data.py --dataset_name openbmb/RLAIF-V-Dataset --out_dir ./rlaif_v
    # a local copy in the same schema: a save_to_disk folder, or parquet files (a file or a folder of them)
    python convert_preference_data.py --dataset_path ./RLAIF-V-Dataset --out_dir ./rlaif_v --num_eval 500
    # then
    python finetune_hf_trainer_dpo.py --data_dir ./rlaif_v --use_lora --bf16

A row that cannot be converted (no image where the prompt needs one, a text that is not a string) is reported
with its row number and reason, all of them at once, and nothing is written (exit status 1), unless
--skip_invalid. Content problems (empty answers, chosen == rejected, corrupt images) are the recipe's preflight's
to report: it names the jsonl line.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import re
import sys
from pathlib import Path

from PIL import Image

TAG = re.compile(r"<\|image_\d+\|>|<image>")
FORMATS = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset_name", help="hub id, e.g. openbmb/RLAIF-V-Dataset")
    source.add_argument("--dataset_path", help="local copy: a save_to_disk folder, a .parquet file or a folder of them")
    parser.add_argument("--dataset_config", default=None, help="hub config name, if the set has several")
    parser.add_argument("--split", default="train", help="split to read (a DatasetDict on disk: this key)")
    parser.add_argument("--out_dir", required=True, help="folder to write (must be empty or not exist)")
    parser.add_argument("--num_eval", type=int, default=500, help="rows held out as pref_val.jsonl")
    parser.add_argument("--max_samples", type=int, default=None, help="convert only the first N rows (after shuffling)")
    parser.add_argument("--shuffle", action="store_true", help="shuffle the rows (with --seed) before taking any")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed")
    parser.add_argument("--skip_invalid", action="store_true", help="leave out rows that cannot be converted")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        parser.error(f"--out_dir {out_dir} is not empty: choose a new folder")
    if args.dataset_path and not Path(args.dataset_path).exists():
        parser.error(f"--dataset_path {args.dataset_path} does not exist")
    if args.num_eval < 0:
        parser.error("--num_eval must be >= 0")
    return args


def load_rows(args):
    """The dataset (a `datasets.Dataset`) with its images left undecoded: bytes are copied as they are."""
    from datasets import DatasetDict, Image as ImageFeature, load_dataset, load_from_disk

    source = args.dataset_path or args.dataset_name
    try:
        if args.dataset_name:
            dataset = load_dataset(args.dataset_name, args.dataset_config, split=args.split)
        else:
            path = Path(args.dataset_path)
            if path.is_dir() and any((path / f).exists() for f in ("state.json", "dataset_dict.json")):
                dataset = load_from_disk(str(path))
                if isinstance(dataset, DatasetDict):
                    if args.split not in dataset:
                        raise SystemExit(f"{source} has splits {', '.join(dataset)}, not --split {args.split}")
                    dataset = dataset[args.split]
            else:
                files = sorted(glob.glob(str(path / "**" / "*.parquet"), recursive=True)) if path.is_dir() else [str(path)]
                if not files:
                    raise SystemExit(f"{source} is neither a save_to_disk folder nor holds .parquet files")
                dataset = load_dataset("parquet", data_files=files, split="train")
    except SystemExit:
        raise
    except Exception as err:
        raise SystemExit(f"{source} cannot be read: {type(err).__name__}: {err}") from None
    columns = set(dataset.column_names)
    image_column = "image" if "image" in columns else "images" if "images" in columns else None
    prompt_column = "question" if "question" in columns else "prompt" if "prompt" in columns else None
    missing = [name for name, present in (("image or images", image_column), ("question or prompt", prompt_column),
                                          ("chosen", "chosen" in columns), ("rejected", "rejected" in columns))
               if not present]  # fmt: skip
    if missing:
        raise SystemExit(f"{source}: missing column(s) {', '.join(missing)} (has {', '.join(dataset.column_names)}); "
                         "expected a vision preference set: image(s), question/prompt, chosen, rejected")
    # Keep the stored bytes (and file format) instead of decoding and re-encoding every image.
    feature = dataset.features[image_column]
    if isinstance(feature, ImageFeature):
        dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
    elif hasattr(feature, "feature") and isinstance(feature.feature, ImageFeature):
        dataset = dataset.cast_column(image_column, type(feature)(ImageFeature(decode=False)))
    if args.shuffle:
        dataset = dataset.shuffle(seed=args.seed)
    if args.max_samples is not None:
        dataset = dataset.select(range(min(args.max_samples, len(dataset))))
    return dataset, image_column, prompt_column


def image_bytes(cell) -> tuple[bytes, str]:
    """(encoded bytes, file extension) of one image cell: {"bytes", "path"}, a PIL image, or a path."""
    if isinstance(cell, dict):
        if cell.get("bytes"):
            data = cell["bytes"]
        elif cell.get("path"):
            data = Path(cell["path"]).read_bytes()
        else:
            raise ValueError("image cell has neither bytes nor a path")
    elif isinstance(cell, Image.Image):
        buffer = io.BytesIO()
        cell.save(buffer, format="PNG")
        return buffer.getvalue(), "png"
    elif isinstance(cell, str):
        data = Path(cell).read_bytes()
    else:
        raise ValueError(f"image cell is a {type(cell).__name__}, not an image")
    try:
        kind = Image.open(io.BytesIO(data)).format
    except Exception:  # unreadable: written as it is, for the recipe's preflight to report with its line
        kind = None
    return data, FORMATS.get(kind, "img")


def text_of(content) -> tuple[str, int]:
    """(text, number of image parts) of a message content: a string, or a list of typed parts."""
    if isinstance(content, str):
        return content, 0
    if not isinstance(content, list):
        raise ValueError(f"message content is a {type(content).__name__}, not text or a list of parts")
    texts = [part.get("text") or "" for part in content if part.get("type") == "text"]
    return "\n".join(texts), sum(part.get("type") == "image" for part in content)


def answer_text(value, name: str) -> str:
    """A chosen/rejected cell: a string, or assistant messages (their text)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        return "\n".join(text_of(m["content"])[0] for m in value if m.get("role", "assistant") == "assistant")
    raise ValueError(f"{name} is neither a string nor a list of assistant messages")


def clean(text: str) -> str:
    return TAG.sub("", text).strip()


def convert_row(row: dict, image_column: str, prompt_column: str, rel_of) -> dict:
    """One dataset row as a jsonl record; `rel_of(k)` writes the row's image k and returns its relative path."""
    cells = row[image_column]
    if image_column == "image" and cells is None:
        raise ValueError("no image (the image column is empty)")
    cells = cells or [] if image_column == "images" else [cells]
    prompt = row[prompt_column]
    conversations = []
    if isinstance(prompt, str):
        images = list(range(len(cells)))  # a plain question: every image belongs to it
        question = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        next_image, pending, question, images = 0, None, None, []
        for message in prompt:
            text, count = text_of(message.get("content"))
            if message.get("role") == "system":
                continue  # Phi-3.5-vision's chat template has no system turn
            if message.get("role") == "user":
                if pending is not None:
                    raise ValueError("two user messages in a row in the prompt")
                pending = (clean(text), list(range(next_image, next_image + count)))
                next_image += count
            elif message.get("role") == "assistant":
                if pending is None:
                    raise ValueError("an assistant message without a user message before it")
                conversations.append({"images": pending[1], "user": pending[0], "assistant": text.strip()})
                pending = None
        if pending is None:
            raise ValueError("the prompt does not end with a user message")
        question, images = pending
        if next_image != len(cells) and next_image != 0:
            raise ValueError(f"the prompt names {next_image} image(s) but the row has {len(cells)}")
        if next_image == 0:  # the messages name no image: they all belong to the question
            images = list(range(len(cells)))
    else:
        raise ValueError(f"{prompt_column} is neither a string nor a list of messages")
    record = {"images": [rel_of(cells[k], k) for k in images], "prompt": clean(question),
              "chosen": answer_text(row["chosen"], "chosen").strip(),
              "rejected": answer_text(row["rejected"], "rejected").strip()}  # fmt: skip
    if conversations:
        record["conversations"] = [{**turn, "images": [rel_of(cells[k], k) for k in turn["images"]]}
                                   for turn in conversations]  # fmt: skip
    return record


def main(argv=None):
    args = parse_args(argv)
    dataset, image_column, prompt_column = load_rows(args)
    out_dir = Path(args.out_dir)
    image_dir = out_dir / "images"
    records, problems = [], []
    pending_images: dict[str, bytes] = {}
    for index, row in enumerate(dataset):
        def rel_of(cell, k, index=index):
            data, ext = image_bytes(cell)
            rel = f"{index:08d}.{ext}" if k == 0 else f"{index:08d}_{k}.{ext}"
            pending_images[rel] = data
            return rel

        try:
            record = convert_row(row, image_column, prompt_column, rel_of)
        except (ValueError, OSError) as err:
            problems.append(f"row {index}: {err}")
            continue
        row_id = row.get("idx", row.get("id"))
        records.append({"id": str(row_id) if row_id is not None else f"row-{index}", **record})
        if len(pending_images) >= 256:  # write in chunks: a whole set's images would not fit in memory
            image_dir.mkdir(parents=True, exist_ok=True)
            for rel, data in pending_images.items():
                (image_dir / rel).write_bytes(data)
            pending_images.clear()
    if problems and not args.skip_invalid:
        shown = "\n".join(f"  {p}" for p in problems[:100])
        more = f"\n  ... and {len(problems) - 100} more" if len(problems) > 100 else ""
        if image_dir.exists():  # nothing half-written is left behind
            import shutil

            shutil.rmtree(out_dir)
        print(f"{len(problems)} row(s) cannot be converted:\n{shown}{more}\nNothing was written; pass "
              "--skip_invalid to convert the others.", file=sys.stderr)
        raise SystemExit(1)
    image_dir.mkdir(parents=True, exist_ok=True)
    for rel, data in pending_images.items():
        (image_dir / rel).write_bytes(data)
    if problems:
        print(f"--skip_invalid: {len(problems)} row(s) left out:\n" + "\n".join(f"  {p}" for p in problems))
    num_eval = min(args.num_eval, len(records))
    splits = {"pref_train.jsonl": records[: len(records) - num_eval], "pref_val.jsonl": records[len(records) - num_eval :]}
    for name, lines in splits.items():
        with open(out_dir / name, "w") as f:
            for record in lines:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"wrote {len(splits['pref_train.jsonl'])} train and {num_eval} val preferences, "
          f"{sum(1 for _ in image_dir.iterdir())} images, to {out_dir}")


if __name__ == "__main__":
    main()
