"""TRL's SFTTrainer fine-tunes phi3v on a dataset in TRL's vision format.

The dataset is what TRL's documentation describes: a `messages` column of typed turns (an
`{"type": "image"}` placeholder and the question in the user turn, the answer in the assistant turn)
and an `images` column. TRL's own collator renders it with `Phi3VProcessor.apply_chat_template`;
the loss covers the answers only (`assistant_only_loss=True` with phi3v's marked copy of the
official template), so the image positions, whose ids are negative, are never labels.

The tiny random model answers nonsense before training; after 20 steps of 2 samples the held-out
photo (a size and shade it never saw) gets the trained answer. Training seeds 0, 1, 2 under the
default, avx2 and avx512 kernel sets all printed the same losses (10.41-10.44 at the first step;
0.27, 0.33, 0.45 at the last; the threshold on the last three's mean is 0.15 of the first three's,
the worst ratio was 0.058) and `red square` after training. 39-46 s per seed (avx512 kernels) to
84-88 s (default kernels) on 2 busy cores (load average 8-9): TRL's CPU loss scores every position
(image positions too) against the whole vocabulary.
"""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

import phi3v  # noqa: F401  (registers the Auto classes)
from phi3v.processing_phi3_v import ASSISTANT_MASK_CHAT_TEMPLATE

pytest.importorskip("trl")

QUESTION = "What is in the photo?"
ANSWER = "red square"
NUM_TRAIN, STEPS, BATCH = 16, 20, 2


def photo(rng: random.Random, size=(48, 40)) -> Image.Image:
    """A red square on a grey background, each photo with its own shade and place."""
    image = Image.new("RGB", size, tuple(rng.randint(100, 160) for _ in range(3)))
    side = min(size) // 2
    left, top = rng.randint(0, size[0] - side), rng.randint(0, size[1] - side)
    image.paste((rng.randint(190, 240), rng.randint(0, 40), rng.randint(0, 40)), (left, top, left + side, top + side))
    return image


def vision_dataset(num_rows: int, seed: int):
    from datasets import Dataset

    rng = random.Random(seed)
    rows = [
        {
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
                {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]},
            ],
            "images": [photo(rng)],
        }
        for _ in range(num_rows)
    ]
    return Dataset.from_list(rows)


def greedy_answer(model, processor, image) -> str:
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    model.eval()
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=[32007, 32000])
    return processor.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def sft_config(output_dir, seed: int, **overrides):
    from trl import SFTConfig

    settings = dict(
        output_dir=str(output_dir), use_cpu=True, bf16=False, max_steps=STEPS, per_device_train_batch_size=BATCH,
        learning_rate=1e-2, lr_scheduler_type="constant_with_warmup", warmup_steps=3, logging_steps=1,
        save_strategy="no", report_to=[], seed=seed, assistant_only_loss=True, gradient_checkpointing=False,
        dataloader_num_workers=0,
    )  # fmt: skip
    settings.update(overrides)
    return SFTConfig(**settings)


def load(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoProcessor

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    processor = AutoProcessor.from_pretrained(tiny_model_dir, num_crops=1)  # 313 tokens per photo
    processor.chat_template = ASSISTANT_MASK_CHAT_TEMPLATE  # renders the official text, marks the answers
    return model, processor


# Seed 0 in the suite (its time budget); seeds 1 and 2 gave the figures in the module docstring when run
# by editing this list.
@pytest.mark.parametrize("seed", [0])
def test_sft_trainer_learns_the_answer(tiny_model_dir, tmp_path, one_thread, seed):
    from trl import SFTTrainer

    model, processor = load(tiny_model_dir)
    held_out = photo(random.Random(1000 + seed), size=(64, 52))
    before = greedy_answer(model, processor, held_out)
    trainer = SFTTrainer(
        model=model, args=sft_config(tmp_path, seed), train_dataset=vision_dataset(NUM_TRAIN, seed), processing_class=processor
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    after = greedy_answer(model, processor, held_out)
    print(f"seed {seed}: losses {[round(x, 3) for x in losses]}; before {before!r}, after {after!r}")
    assert len(losses) == STEPS
    assert before != ANSWER
    assert after == ANSWER
    assert sum(losses[-3:]) / 3 < 0.15 * sum(losses[:3]) / 3


def test_what_trl_refuses_for_vision_data(tiny_model_dir, tmp_path):
    """TRL's packing and padding-free modes are refused for vision datasets, and assistant_only_loss
    with the official template (no {% generation %} markers) is refused too, each before training."""
    from trl import SFTTrainer

    model, processor = load(tiny_model_dir)
    dataset = vision_dataset(2, seed=0)
    with pytest.raises(ValueError, match="Packing is not supported for vision datasets"):
        SFTTrainer(model=model, args=sft_config(tmp_path, 0, packing=True), train_dataset=dataset, processing_class=processor)
    with pytest.raises(ValueError, match="Padding-free training is yet not supported for vision datasets"):
        SFTTrainer(model=model, args=sft_config(tmp_path, 0, padding_free=True), train_dataset=dataset, processing_class=processor)
    processor.chat_template = processor.tokenizer.chat_template
    with pytest.raises(ValueError, match="patching is not supported for this template"):
        SFTTrainer(model=model, args=sft_config(tmp_path, 0), train_dataset=dataset, processing_class=processor)


@pytest.mark.parametrize("variant", ["lora", "gradient_checkpointing"])
def test_lora_and_gradient_checkpointing_train(tiny_model_dir, tmp_path, one_thread, variant):
    """Two steps through TRL's LoRA path (peft_config) and through its default gradient checkpointing:
    the trained weights move, the frozen ones do not."""
    from peft import LoraConfig
    from trl import SFTTrainer

    model, processor = load(tiny_model_dir)
    overrides = {"max_steps": 2, "per_device_train_batch_size": 1}
    peft_config = None
    if variant == "lora":
        # The recipes' targets less lm_head: TRL's fused loss reads lm_head.weight directly and refuses
        # an adapter there (checked below).
        targets = phi3v.lora_target_modules(model)
        with pytest.raises(ValueError, match="Applying a PEFT adapter to `lm_head` is not supported"):
            SFTTrainer(
                model=model, args=sft_config(tmp_path, 0), train_dataset=vision_dataset(2, seed=0),
                processing_class=processor, peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=targets),
            )  # fmt: skip
        model, processor = load(tiny_model_dir)
        targets = [name for name in targets if not name.endswith("lm_head")]
        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    else:
        overrides["gradient_checkpointing"] = True  # TRL's default
    trainer = SFTTrainer(
        model=model, args=sft_config(tmp_path, 0, **overrides), train_dataset=vision_dataset(2, seed=0),
        processing_class=processor, peft_config=peft_config,
    )  # fmt: skip
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    moved = {name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])}
    if variant == "lora":
        assert moved and all("lora_" in name for name in moved)
        assert any(".vision_embed_tokens." in name for name in moved)  # LoRA on CLIP and the projector too
    else:
        assert any(name.endswith("lm_head.weight") for name in moved)
        assert any(".img_projection." in name for name in moved)


def test_full_sequence_labels_hold_the_image_ids(tiny_model_dir):
    """Why the README says not to train with assistant_only_loss=False: TRL's collator then copies
    input_ids into labels, image positions (negative ids) included, and its loss does not skip them."""
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    _, processor = load(tiny_model_dir)
    rows = list(vision_dataset(2, seed=0))
    batch = DataCollatorForVisionLanguageModeling(processor)(rows)
    labels = batch["labels"]
    image_labels = int(((labels < 0) & (labels != -100)).sum())
    print(f"{image_labels} of {labels.numel()} labels are image ids")
    assert image_labels == int((batch["input_ids"] < 0).sum()) > 0
    masked = DataCollatorForVisionLanguageModeling(processor, assistant_only_loss=True)(list(vision_dataset(2, seed=0)))
    assert not ((masked["labels"] < 0) & (masked["labels"] != -100)).any()
