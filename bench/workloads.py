"""Synthetic workloads shaped like the recipes' data, and the ways of batching them.

* docvqa: one document page per sample (paper, lines of "words", letterhead, tables, a stamp), sizes from
  800x1000 to 1700x2200 with some landscape pages, stored as PNG bytes and decoded when loaded,
  num_crops 16, a DocVQA-style question and a short answer. Real DocVQA averages 2,443 tokens per
  sample at num_crops 16; these pages give 1,900-2,530.
* video: 8 frames of 320x240 (UCF101-like, JPEG), num_crops 4, "what is happening" and a class name.

Lengths are known without decoding a pixel (`phi3v.num_image_tokens`), which is what the
length-grouped sampler sorts by.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw

import phi3v
from phi3v.processing_phi3_v import IMAGE_TAG

WORDS = ("what is the total amount date of invoice name company address number page report figure "
         "table value year shown in this document who signed letter sent to from percentage").split()
ACTIONS = ["apply eye makeup", "basketball", "biking", "playing guitar", "rowing", "surfing", "tai chi", "typing"]


@dataclass
class Sample:
    prompt: str  # chat-formatted, with <|image_k|> tags
    answer: str
    images: list  # encoded image bytes
    sizes: list  # (width, height) per image


def document_page(width: int, height: int, rng: random.Random) -> Image.Image:
    """Off-white paper, lines of dark-blue or black "words", a coloured letterhead and a stamp."""
    page = Image.new("RGB", (width, height), (250, 249, 244))
    draw = ImageDraw.Draw(page)
    margin, line = width // 12, max(6, height // 90)
    draw.rectangle((margin, margin // 2, width // 2, margin // 2 + 3 * line), fill=(30, 60, 160))  # letterhead
    y = margin + 4 * line
    while y < height - margin:
        x = margin + (rng.randrange(0, width // 4) if rng.random() < 0.1 else 0)
        ink = (20, 20, 20) if rng.random() < 0.7 else (20, 30, 110)
        while x < width - margin:
            word = rng.randrange(line, line * 5)
            draw.rectangle((x, y, min(x + word, width - margin), y + line - 2), fill=ink)
            x += word + line // 2
        y += line * (2 if rng.random() < 0.85 else 4)
    for _ in range(rng.randrange(0, 3)):  # a table
        x0, y0 = rng.randrange(margin, width // 2), rng.randrange(margin, height // 2)
        draw.rectangle((x0, y0, x0 + width // 3, y0 + height // 8), outline=(0, 0, 0), width=3)
    x0, y0 = rng.randrange(width // 2, width - margin), rng.randrange(height // 2, height - margin)
    draw.ellipse((x0 - 4 * line, y0 - 4 * line, x0 + 4 * line, y0 + 4 * line), outline=(190, 30, 40), width=4)  # stamp
    return page


def video_frame(index: int, rng_seed: int, width: int, height: int) -> Image.Image:
    rng = random.Random(rng_seed)
    frame = Image.new("RGB", (width, height), tuple(rng.randrange(40, 200) for _ in range(3)))
    draw = ImageDraw.Draw(frame)
    x = (rng.randrange(width) + index * width // 16) % width
    draw.ellipse((x, height // 3, x + width // 5, height // 3 + height // 4), fill=(230, 190, 150))
    draw.rectangle((0, height * 3 // 4, width, height), fill=(60, 120, 60))
    return frame


def encode(image: Image.Image, kind: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kind, **({"quality": 90} if kind == "JPEG" else {}))
    return buffer.getvalue()


def make_samples(workload: str, count: int, seed: int = 0, quick: bool = False) -> tuple[list[Sample], int]:
    """`count` samples of the workload and its num_crops."""
    rng = random.Random(seed)
    samples = []
    for i in range(count):
        if workload == "docvqa":
            width, height = rng.randrange(800, 1701), rng.randrange(1000, 2201)
            if rng.random() < 0.15:
                width, height = height, width
            if quick:
                width, height = width // 8, height // 8
            question = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(5, 18))).capitalize() + "?"
            answer = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 5)))
            prompt = f"<|user|>\n<|image_1|>\n{question}<|end|>\n<|assistant|>\n"
            samples.append(Sample(prompt, answer, [encode(document_page(width, height, rng), "PNG")], [(width, height)]))
        elif workload == "video":
            frames, (width, height) = (2, (80, 60)) if quick else (8, (320, 240))
            tags = "".join(f"<|image_{k}|>" for k in range(1, frames + 1))
            prompt = f"<|user|>\n{tags}\nWhat is happening in this video?<|end|>\n<|assistant|>\n"
            images = [encode(video_frame(k, seed * 100_003 + i, width, height), "JPEG") for k in range(frames)]
            samples.append(Sample(prompt, rng.choice(ACTIONS), images, [(width, height)] * frames))
        else:
            raise ValueError(f"unknown workload {workload!r}")
    num_crops = {"docvqa": 2 if quick else 16, "video": 1 if quick else 4}[workload]
    return samples, num_crops


class SampleDataset(torch.utils.data.Dataset):
    """Decodes and processes one sample per item: input_ids and labels (prompt masked), pixel_values."""

    def __init__(self, samples: list[Sample], processor, num_crops: int):
        self.samples, self.processor, self.num_crops = samples, processor, num_crops
        tokenizer = processor.tokenizer
        self.answer_ids = [tokenizer(f"{s.answer}<|end|>\n<|endoftext|>", add_special_tokens=False).input_ids
                           for s in samples]
        # Exact lengths from the image sizes alone (each text chunk is tokenized on its own, as the
        # processor does).
        self.lengths, self.image_tokens = [], []
        for sample, answer in zip(samples, self.answer_ids):
            text = sum(len(tokenizer(chunk).input_ids) for chunk in IMAGE_TAG.split(sample.prompt)[::2])
            image = sum(phi3v.num_image_tokens(w, h, num_crops) for w, h in sample.sizes)
            self.lengths.append(text + image + len(answer))
            self.image_tokens.append(image)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        sample = self.samples[index]
        images = [Image.open(io.BytesIO(data)) for data in sample.images]
        batch = self.processor(sample.prompt, images, num_crops=self.num_crops)
        prompt_ids = batch["input_ids"][0]
        answer = torch.tensor(self.answer_ids[index])
        return {
            "input_ids": torch.cat([prompt_ids, answer]),
            "labels": torch.cat([torch.full_like(prompt_ids, -100), answer]),
            "pixel_values": batch["pixel_values"],
            "image_sizes": batch["image_sizes"],
        }


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int = 0) -> list[list[int]]:
    """Batches of similar length (sorted within the shuffled set), in shuffled order, longest first."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: -lengths[i])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rest = batches[1:]
    random.Random(seed + 1).shuffle(rest)
    return batches[:1] + rest  # the longest first, so running out of memory shows at once


def sequential_batches(count: int, batch_size: int) -> list[list[int]]:
    return [list(range(i, min(i + batch_size, count))) for i in range(0, count, batch_size)]


def pad_collate(examples: list[dict], pad_id: int) -> dict:
    """Right-padded batch with attention_mask (the original collators' layout); text-only examples allowed."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    attention_mask = torch.zeros(len(examples), width, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[row, :n], labels[row, :n], attention_mask[row, :n] = e["input_ids"], e["labels"], 1
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    with_images = [e for e in examples if e.get("pixel_values") is not None]
    if with_images:
        batch["pixel_values"] = torch.cat([e["pixel_values"] for e in with_images])
        batch["image_sizes"] = torch.cat([e["image_sizes"] for e in with_images])
    return batch
