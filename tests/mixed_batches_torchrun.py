"""torchrun harness for test_distributed.py: trains the tiny Phi-3.5-vision for a few steps with the HF
Trainer where the ranks get different mixes of text-only and image samples, and records what each
rank trained on.

    torchrun --nproc_per_node=2 tests/mixed_batches_torchrun.py MODEL_DIR OUTPUT_DIR DEEPSPEED_CONFIG|none

With 2 ranks and 2 rows per rank, step by step (t = text-only row, i = row with an image):

    step 1: rank 0 [t, t]  rank 1 [i, i]    only rank 1 has images
    step 2: rank 0 [i, i]  rank 1 [t, t]    and the other way round
    step 3: rank 0 [t, i]  rank 1 [t, t]    a mixed batch against a text-only one
    step 4: rank 0 [t, t]  rank 1 [t, t]    no images anywhere

Under ZeRO-3 every rank must gather the same parameters in the same order, and under DDP / ZeRO-2
every trainable parameter needs a gradient on every rank, so a text-only rank that skipped the
vision tower would hang the others (or fail). Then one evaluation step, rank 0 text-only and rank 1
images. Writes OUTPUT_DIR/rank{R}.json: per step the rows, images and loss of that rank's batch.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import SequentialSampler
from transformers import AutoModelForCausalLM, AutoProcessor, Trainer, TrainingArguments

import phi3v  # noqa: F401  (registers phi3_v with the Auto classes)

PLAN = [  # PLAN[step][rank]: the rows of that rank's batch
    [["text", "text"], ["image", "image"]],
    [["image", "image"], ["text", "text"]],
    [["text", "image"], ["text", "text"]],
    [["text", "text"], ["text", "text"]],
]
EVAL_PLAN = [[["text", "text"], ["image", "image"]]]  # evaluation (no gradients) too


def flat_plan(plan, world_size: int) -> list[dict]:
    # The Trainer's dataloader hands global batch b (per-rank batches, in order) to rank b % world size.
    kinds = [kind for step in plan for rank in range(world_size) for kind in step[rank]]
    return [{"kind": kind, "index": i} for i, kind in enumerate(kinds)]


class Collator:
    def __init__(self, processor):
        self.processor = processor

    def __call__(self, rows: list[dict]) -> dict:
        tokenizer = self.processor.tokenizer
        input_ids, pixel_values, image_sizes = [], [], []
        for row in rows:
            if row["kind"] == "image":
                image = Image.new("RGB", (40 + 8 * row["index"] % 32, 48), (row["index"] * 40 % 256, 90, 200))
                encoded = self.processor(text=f"<|user|>\n<|image_1|>\nWhat colour is this?<|end|>\n"
                                              f"<|assistant|>\nBlue, sample {row['index']}.<|end|>",
                                         images=[image])
                pixel_values.append(encoded["pixel_values"])
                image_sizes.append(encoded["image_sizes"])
            else:
                encoded = self.processor(text=f"<|user|>\nCount to {row['index']}.<|end|>\n<|assistant|>\n"
                                              f"{' '.join(map(str, range(row['index'] % 5 + 1)))}<|end|>")
            input_ids.append(encoded["input_ids"][0].tolist())
        longest = max(map(len, input_ids))
        pad = tokenizer.pad_token_id
        batch = {
            "input_ids": torch.tensor([ids + [pad] * (longest - len(ids)) for ids in input_ids]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (longest - len(ids)) for ids in input_ids]),
            # Image positions (negative ids) carry no label.
            "labels": torch.tensor([[t if t >= 0 else -100 for t in ids] + [-100] * (longest - len(ids))
                                    for ids in input_ids]),
        }
        if pixel_values:
            batch["pixel_values"] = torch.cat(pixel_values)
            batch["image_sizes"] = torch.cat(image_sizes)
        return batch


class RecordingTrainer(Trainer):
    """In plan order (no shuffling), and remembers what this rank trained on at each step."""

    record: list[dict]
    eval_record: list[dict]

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        images = inputs["pixel_values"].shape[0] if "pixel_values" in inputs else 0
        self.record.append({"rows": int(inputs["input_ids"].shape[0]), "images": images, "loss": loss.item()})
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        images = inputs["pixel_values"].shape[0] if "pixel_values" in inputs else 0
        self.eval_record.append({"rows": int(inputs["input_ids"].shape[0]), "images": images, "loss": loss.item()})
        return loss, logits, labels


def main(model_dir: str, output_dir: str, deepspeed: str):
    args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        prediction_loss_only=True,
        max_steps=len(PLAN),
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        ddp_backend="gloo",
        ddp_timeout=120,  # a collective that waits this long fails instead of hanging forever
        ddp_find_unused_parameters=False,
        activation_checkpointing=True,  # as the recipes
        activation_checkpointing_kwargs={"use_reentrant": False},
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        deepspeed=None if deepspeed == "none" else deepspeed,
    )
    world_size = args.world_size  # (reading it sets up the process group, as the scripts do)
    if args.deepspeed:
        import deepspeed

        # On GPUs accelerate does this; with use_cpu it sets up only torch.distributed, and ZeRO-3's
        # zero.Init in from_pretrained would then see a world of one process.
        deepspeed.init_distributed(dist_backend="gloo")
    # After the process group: under ZeRO-3 the weights are partitioned while they load (zero.Init).
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir, num_crops=1)
    trainer = RecordingTrainer(model=model, args=args, train_dataset=flat_plan(PLAN, world_size),
                               eval_dataset=flat_plan(EVAL_PLAN, world_size), data_collator=Collator(processor))
    trainer.record, trainer.eval_record = [], []
    trainer.train()
    trainer.evaluate()
    assert all(math.isfinite(step["loss"]) for step in trainer.record + trainer.eval_record), trainer.record
    Path(output_dir, f"rank{args.process_index}.json").write_text(json.dumps({
        "deepspeed": trainer.is_deepspeed_enabled,
        "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None,
        "world_size": args.world_size,
        "steps": trainer.record,
        "eval_steps": trainer.eval_record,
    }))


if __name__ == "__main__":
    main(*sys.argv[1:4])
    # Only after every rank wrote its record: a rank that leaves early must not look like success.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    print(f"rank {os.environ.get('RANK', 0)} done")
