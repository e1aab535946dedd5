"""The converter layout's prompt format: one place for the UCF101 recipe, `phi3v.predict` and your data.

`convert_ucf101.py` writes one jsonl line per sample,

    {"id": ..., "conversations": [{"images": ["rel/a.jpg", ...], "user": "...", "assistant": "..."}, ...]}

with image paths relative to an image folder. Each turn is its own chat-template block whose user
message is `<|image_1|>...<|image_n|>\\n{user}` (the turn's images, numbered from 1 in every turn, as
in the original recipe); the model learns `{assistant}<|end|>\\n<|endoftext|>` after each block.

    from phi3v.conversation import encode_conversation, generation_batch, generate_answers, exact_match

    batch = generation_batch(processor, [record["conversations"] for record in records], image_dir)
    predictions = generate_answers(model, processor, batch, max_new_tokens=64)
    correct = [exact_match(p, r["conversations"][-1]["assistant"]) for p, r in zip(predictions, records)]

`finetune_hf_trainer_ucf101.py` trains and evaluates with these functions and `python -m phi3v.predict`
runs a fine-tuned model with them, so a prediction there is made exactly as the recipe's eval made it.
Adapt: change the prompt in `turn_prompt`, the supervised text in `answer_ids`, the checks of a line
in `conversation_problems`, the metric in `normalize_answer`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from rapidfuzz.distance import Levenshtein

from .processing_phi3_v import num_image_tokens
from .validation import InvalidSample, image_size, image_tag_problem, load_image

IMAGE_TAG = re.compile(r"<\|image_\d+\|>")
ANSWER_SUFFIX = "<|end|>\n<|endoftext|>"
EOS_TOKEN_IDS = [32007, 32000]  # <|end|>, <|endoftext|>: generation stops at either


def turn_prompt(tokenizer, user: str, num_images: int) -> str:
    """The chat-template text of one user turn, ending with the assistant header."""
    # Adapt: the user message of one turn. The images' tags come back to back, then a newline.
    tags = "".join(f"<|image_{i}|>" for i in range(1, num_images + 1))
    content = f"{tags}\n{user}" if num_images else user
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )


def answer_ids(tokenizer, answer: str) -> list[int]:
    """The supervised token ids of one answer: `{answer}<|end|>\\n<|endoftext|>`, no BOS before it."""
    return tokenizer(f"{answer}{ANSWER_SUFFIX}", add_special_tokens=False).input_ids


def encode_conversation(processor, turns: list[dict], image_dir: Path, include_last_answer: bool = True) -> dict:
    """Token ids, labels and pixels of one jsonl line.

    Each turn is its own chat-template block with its own images (`<|image_1|>` restarts at 1), as
    in the original recipe; only the answers (with `<|end|>\\n<|endoftext|>`) are supervised.
    Without `include_last_answer` the sequence ends with the last turn's prompt (for generation).
    """
    tokenizer = processor.tokenizer
    input_ids, labels, pixel_values, image_sizes = [], [], [], []
    for t, turn in enumerate(turns):
        # load_image: the same decoding (modes, alpha, EXIF) as the preflight, which checked every image.
        images = [load_image(Path(image_dir) / rel) for rel in turn.get("images") or []]
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
    """(tokens, image tokens) of `encode_conversation(...)["input_ids"]`, from the image headers only."""
    tokenizer = processor.tokenizer
    length = image_tokens = 0
    for turn in turns:
        rels = turn.get("images") or []
        prompt = turn_prompt(tokenizer, turn["user"], len(rels))
        # The processor tokenizes the text between image tags chunk by chunk (each with its own <s>).
        length += sum(len(tokenizer(chunk).input_ids) for chunk in IMAGE_TAG.split(prompt))
        for rel in rels:
            image_tokens += num_image_tokens(*image_size(Path(image_dir) / rel), num_crops)
        length += len(answer_ids(tokenizer, turn["assistant"]))
    return length + image_tokens, image_tokens


def conversation_problems(record, answer_required: bool = True) -> list[str]:
    """Why a jsonl record does not have the layout's shape (empty list: it does).

    `answer_required=False` (prediction): the last turn may have no assistant text (nothing to score).
    """
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
        last_open = not answer_required and t == len(turns) - 1 and turn.get("assistant") is None
        for role in ("user",) if last_open else ("user", "assistant"):
            if not isinstance(turn.get(role), str) or not turn[role].strip():
                problems.append(f"conversations[{t}]: empty or missing {role} text")
        images = turn.get("images") or []
        if not isinstance(images, list) or not all(isinstance(rel, str) and rel for rel in images):
            problems.append(f"conversations[{t}]: 'images' must be a list of frame paths (relative to the image folder)")
            continue
        if isinstance(turn.get("user"), str):
            # turn_prompt writes the tags itself: any tag in the text would be one too many.
            tags = "".join(f"<|image_{i}|>" for i in range(1, len(images) + 1))
            problem = image_tag_problem(f"{tags}\n{turn['user']}", len(images))
            if problem:
                problems.append(f"conversations[{t}]: user text has its own image tags: {problem}")
        if isinstance(turn.get("assistant"), str) and IMAGE_TAG.search(turn["assistant"]):
            problems.append(f"conversations[{t}]: assistant text has an image tag")
    return problems


def image_problems(record: dict, image_dir: Path) -> list[str]:
    """Every listed image (a photo, a page, a video frame) must decode completely (a truncated JPEG only shows when decoded)."""
    problems = []
    for turn in record["conversations"]:
        for rel in turn.get("images") or []:
            try:
                load_image(Path(image_dir) / rel)
            except InvalidSample as e:
                problems.append(f"image {rel}: {e}")
    return problems


def concat_images(encoded: list[dict], batch: dict) -> dict:
    """Adds the pixel_values/image_sizes of all encoded samples, concatenated in order, to `batch`."""
    pixel_values = [e["pixel_values"] for e in encoded if e["pixel_values"] is not None]
    if pixel_values:
        batch["pixel_values"] = torch.cat(pixel_values)
        batch["image_sizes"] = torch.cat([e["image_sizes"] for e in encoded if e["image_sizes"] is not None])
    return batch


def generation_batch(processor, conversations: list[list[dict]], image_dir: Path) -> dict:
    """Left-padded prompts (each conversation up to its last answer) for batched generation."""
    encoded = [encode_conversation(processor, turns, image_dir, include_last_answer=False) for turns in conversations]
    width = max(len(e["input_ids"]) for e in encoded)
    input_ids = torch.full((len(encoded), width), processor.tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, e in enumerate(encoded):
        n = len(e["input_ids"])
        input_ids[row, width - n :] = torch.tensor(e["input_ids"])
        attention_mask[row, width - n :] = 1
    return concat_images(encoded, {"input_ids": input_ids, "attention_mask": attention_mask})


@torch.no_grad()
def generate_answers(model, processor, batch: dict, max_new_tokens: int) -> list[str]:
    """Greedy answers of a `generation_batch` (moved to the model's device here), decoded without special tokens."""
    device = next(p for p in model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    output = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        eos_token_id=EOS_TOKEN_IDS,
        pad_token_id=processor.tokenizer.pad_token_id,
        do_sample=False,
        use_cache=True,
    )
    new_tokens = output[:, batch["input_ids"].shape[1] :]
    return processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def normalize_answer(text: str) -> str:
    """The original UCF101 recipe's normalisation: strip whitespace, then periods, then lower-case."""
    return text.strip().strip(".").lower()


def exact_match(prediction: str, answer: str) -> bool:
    """Whether the prediction equals the answer after `normalize_answer` on both."""
    return normalize_answer(prediction) == normalize_answer(answer)


def anls_score(prediction: str, answer: str, tau: float = 0.5) -> float:
    """ANLS of one free-form answer, as the original DocVQA recipe scores it: 1 - the normalised Levenshtein
    distance, 0 at or past `tau`. Case-sensitive; only whitespace and periods around the prediction go."""
    prediction = prediction.strip().strip(".")
    if not prediction:
        return 0.0
    distance = Levenshtein.distance(answer, prediction) / max(len(answer), len(prediction))
    return 1.0 - distance if distance < tau else 0.0
