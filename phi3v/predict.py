"""Run a fine-tuned Phi-3.5-vision on new data, with no code written.

    # a model folder (a full fine-tuning output, a checkpoint-N, merged/), on a jsonl file
    python -m phi3v.predict --model runs/full --data val.jsonl --image_dir data/images --output predictions.jsonl
    # a base plus a LoRA adapter (the base the adapter names, unless --model is given)
    python -m phi3v.predict --adapter runs/lora --data val.jsonl --image_dir data/images --output predictions.jsonl
    # one query
    python -m phi3v.predict --model runs/full --image a.jpg --image b.jpg --prompt "What changed?"
    # several GPUs (the data sharded, the results gathered in input order)
    torchrun --nproc_per_node=8 -m phi3v.predict --model runs/full --data val.jsonl --image_dir data/images ...

The data is the layout `convert_ucf101.py` writes (one line per sample:
`{"id", "conversations": [{"images": [...], "user": ..., "assistant": ...}, ...]}`, image paths
relative to --image_dir). The last turn's answer is generated from the conversation before it, the
same way the recipe `finetune_hf_trainer_ucf101.py` evaluates (phi3v/conversation.py: the same
prompt, left-padded batches, greedy decoding stopping at <|end|> or <|endoftext|>), so on a run's
val file with its settings (--num_crops, --max_new_tokens, --batch_size = its eval batch size, the
precision it trained in) the predictions are those of its eval_after.json. The last turn's
"assistant" may be left out; where it is present it is the `answer`, and the exact-match accuracy
(after strip().strip(".").lower(), the original UCF101 normalisation) is printed.

--output gets one line per input, in input order: {"id", "prediction", "answer"} (`answer` only when
the data has one; `id` is the line's own, else its line number). Without --output the lines are
printed. Every line and image is checked before the model is loaded: malformed JSON, a wrong shape,
missing, unreadable or truncated images give one report naming every bad line, and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from phi3v.conversation import conversation_problems, exact_match, image_problems, generate_answers, generation_batch
from phi3v.validation import Preflight


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m phi3v.predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--model", default=None, help="model folder or hub id; with --adapter the base (default: the adapter's)")
    add("--adapter", default=None, help="LoRA/QLoRA adapter folder (a run's output or checkpoint-N), applied to --model")
    add("--data", default=None, help="jsonl file in the converter's layout")
    add("--image_dir", default=None, help="folder the --data image paths are relative to (default: the file's folder)")
    add("--image", action="append", default=[], help="one query: an image (repeat for several, in order)")
    add("--prompt", default=None, help="one query: the user text (the image tags are added before it)")
    add("--output", default=None, help="jsonl file to write the predictions to (default: print them)")
    add("--batch_size", type=int, default=1, help="generation batch per process (default: 1)")
    add("--num_crops", type=int, default=None, help="HD crops per image (default: the saved processor's)")
    add("--max_new_tokens", type=int, default=64, help="generation length (default: 64)")
    add("--bf16", action="store_true", help="run in bfloat16 (default: float32)")
    add("--no-tqdm", dest="tqdm", action="store_false", help="no progress bar")
    args = parser.parse_args(argv)
    if not args.model and not args.adapter:
        parser.error("give --model (a model folder or hub id), or --adapter (with its base, or --model as base)")
    if bool(args.data) == bool(args.prompt is not None):
        parser.error("give either --data FILE.jsonl or --prompt TEXT (with --image PATH ...)")
    if args.image and args.data:
        parser.error("--image goes with --prompt; the images of --data are listed in its lines")
    if args.batch_size < 1 or args.max_new_tokens < 1 or (args.num_crops is not None and args.num_crops < 1):
        parser.error("--batch_size, --max_new_tokens and --num_crops must be at least 1")
    if args.data and not Path(args.data).is_file():
        parser.error(f"--data {args.data} is not a file")
    return args


def read_data(args) -> tuple[list[dict], Path]:
    """The records to predict and their image folder; every bad line or image gives one report and exit 1."""
    if args.data is None:
        record = {"id": 0, "conversations": [{"images": list(args.image), "user": args.prompt}]}
        lines, image_dir, where = [(1, record)], Path(""), lambda line_no, record: "the query"
    else:
        path = Path(args.data)
        image_dir = Path(args.image_dir) if args.image_dir else path.parent
        lines, where = [], lambda line_no, record: f"{path.name} line {line_no}" + (
            f" (id {record['id']})" if isinstance(record, dict) and "id" in record else "")
    preflight = Preflight(args.data or "the query")
    if args.data is not None:
        with open(args.data) as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    lines.append((line_no, json.loads(line)))
                except json.JSONDecodeError as err:
                    preflight.add(f"{Path(args.data).name} line {line_no}", f"not valid JSON: {err}")
    records = []
    for line_no, record in lines:
        problems = conversation_problems(record, answer_required=False)
        problems = problems or image_problems(record, image_dir)  # every image decoded: truncation shows
        for problem in problems:
            preflight.add(where(line_no, record), problem)
        if not problems:
            records.append({**record, "id": record.get("id", line_no)})
    quiet = int(os.environ.get("RANK", "0")) != 0  # under torchrun every process checks; one reports
    if len(preflight):
        sys.exit(1 if quiet else preflight.report() + "\nnothing was predicted")
    if not records:
        sys.exit(1 if quiet else f"{args.data} holds no lines: nothing to predict")
    return records, image_dir


def contiguous_shard(items: list, num_shards: int, index: int) -> list:
    """The same split as `datasets.Dataset.shard(num_shards, index, contiguous=True)`, as the recipes' eval."""
    div, mod = divmod(len(items), num_shards)
    start = div * index + min(index, mod)
    return items[start : start + div + (1 if index < mod else 0)]


def answer_of(record: dict) -> str | None:
    answer = record["conversations"][-1].get("assistant")
    return answer if isinstance(answer, str) and answer.strip() else None


def main(argv=None):
    args = parse_args(argv)
    records, image_dir = read_data(args)  # before the model: bad data fails in seconds

    from transformers import AutoModelForCausalLM

    from phi3v.saving import adapter_base, load_with_adapter, run_processor

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world_size > 1:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's gather below runs on the current device
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    base = args.model
    try:
        if args.adapter:
            base = args.model or adapter_base(args.adapter)
            model = load_with_adapter(args.adapter, base, dtype=dtype)  # unmerged, as the recipe's eval
        else:
            model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    except (ValueError, OSError) as err:
        what = f"--adapter {args.adapter}" + (f" on {base}" if base else "") if args.adapter else f"--model {base}"
        sys.exit(f"error: cannot load {what} (a model folder, or a hub id in the local cache): {err}")
    processor = run_processor(args.adapter or args.model, base, args.num_crops)
    model.to(device).eval()
    if rank == 0:
        what = f"{args.adapter} on {base}" if args.adapter else base
        print(f"{what}: {len(records)} line(s), {dtype} on {device}, {world_size} process(es), "
              f"num_crops {processor.num_crops}, batch {args.batch_size}", file=sys.stderr)

    shard = contiguous_shard(records, world_size, rank)
    batches = [shard[i : i + args.batch_size] for i in range(0, len(shard), args.batch_size)]
    if args.tqdm and rank == 0:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"predicting ({world_size} process(es))", unit="batch")
    results = []
    for chunk in batches:
        batch = generation_batch(processor, [r["conversations"] for r in chunk], image_dir)
        for record, prediction in zip(chunk, generate_answers(model, processor, batch, args.max_new_tokens)):
            result = {"id": record["id"], "prediction": prediction}
            if answer_of(record) is not None:
                result["answer"] = answer_of(record)
            results.append(result)
    if world_size > 1:
        gathered = [None] * world_size
        torch.distributed.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]  # rank order = contiguous shard order = input order
        torch.distributed.destroy_process_group()
    if rank != 0:
        return None

    lines = "".join(json.dumps(r) + "\n" for r in results)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(lines)
        print(f"{len(results)} predictions written to {args.output}")
    else:
        print(lines, end="")
    scored = [r for r in results if "answer" in r]
    if scored:
        correct = sum(exact_match(r["prediction"], r["answer"]) for r in scored)
        print(f"accuracy {correct / len(scored):.4f} ({correct} of {len(scored)} answers, exact match after "
              "strip().strip('.').lower())")
    return results


if __name__ == "__main__":
    main()
