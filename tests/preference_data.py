"""Synthetic preference sets in the layout of `finetune_hf_trainer_dpo.py`, for its tests.

Each image is one coloured shape on a grey background (with a little noise: no two files are the same);
the prompt is always "What colour is the shape?"; the chosen answer names the shape's colour, the rejected
one another colour. Only the pixels tell which answer is right.

The val set is balanced: for every ordered pair of colours (a, b) it has as many rows "image a, chosen a,
rejected b" as rows "image b, chosen b, rejected a". A model that ignores the image prefers the same one of
the two answers in both, so its log-prob accuracy on such a set is exactly 0.5.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (210, 30, 30), "green": (30, 170, 50), "blue": (30, 50, 210), "yellow": (240, 220, 30)}
SHAPES = ("square", "circle", "triangle")
PROMPT = "What colour is the shape?"


def answer(colour: str) -> str:
    return f"The shape is {colour}."


def shape_image(path: Path, colour: str, shape: str, rng: random.Random, size=(48, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, (128, 128, 128))
    draw = ImageDraw.Draw(image)
    w, h = size
    box = (rng.randint(2, 10), rng.randint(2, 8), w - rng.randint(2, 10), h - rng.randint(2, 8))
    if shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    elif shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    else:
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=COLOURS[colour])
    noise = np.random.default_rng(rng.randrange(2**32)).integers(-12, 13, (h, w, 3))
    Image.fromarray(np.clip(np.asarray(image, dtype=np.int64) + noise, 0, 255).astype(np.uint8)).save(path)


def preference_line(root: Path, split: str, i: int, colour: str, other: str, rng: random.Random) -> dict:
    rel = f"{split}/{i:04d}.png"
    shape_image(root / "images" / rel, colour, rng.choice(SHAPES), rng)
    return {"id": f"{split}-{i}", "images": [rel], "prompt": PROMPT, "chosen": answer(colour),
            "rejected": answer(other)}  # fmt: skip


def write_jsonl(path: Path, lines: list) -> Path:
    """Lines are records (dicts) or raw strings (written as they are)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def shape_preferences(root: Path, num_train: int, val_repeats: int = 1, seed: int = 0) -> tuple[list, list]:
    """Writes root/pref_train.jsonl (the ordered pairs of colours in turn, in a shuffled order: each colour is
    chosen equally often), root/pref_val.jsonl (every ordered pair `val_repeats` times: balanced) and
    root/images/; returns the (train, val) records."""
    rng = random.Random(seed)
    names = sorted(COLOURS)
    pairs = list(itertools.permutations(names, 2))
    train_pairs = [pairs[i % len(pairs)] for i in range(num_train)]
    rng.shuffle(train_pairs)
    train = [preference_line(root, "train", i, colour, other, rng) for i, (colour, other) in enumerate(train_pairs)]
    pairs = pairs * val_repeats
    val = [preference_line(root, "val", i, colour, other, rng) for i, (colour, other) in enumerate(pairs)]
    write_jsonl(root / "pref_train.jsonl", train)
    write_jsonl(root / "pref_val.jsonl", val)
    return train, val
