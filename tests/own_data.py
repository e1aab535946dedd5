"""Your-own-data sets in the converter layout, for the tests of `finetune_hf_trainer_ucf101.py` on custom data.

A photo-QA set: each photo is one colour (with noise) and the answer to "What colour is the photo?"
is a free-form phrase naming it ("a dark red photo"), so only the pixels decide it. Lines come in
the shapes users write: one image turn; a text-only turn first, then the image turn; two image turns.
Files get custom names (`my_train.jsonl`, `my_val.jsonl`, `photos/`), not the converter's.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"dark red": (150, 20, 20), "light green": (120, 230, 120), "deep blue": (20, 30, 170), "bright yellow": (250, 230, 40)}
QUESTION = "What colour is the photo?"
INTRO = ("Can you help me with my photos?", "Yes, show me one.")  # a text-only turn


def answer(colour: str) -> str:
    return f"a {colour} photo"


def photo(path: Path, colour: str, rng: random.Random, size=(48, 40)):
    """One colour with noise, so no two photos are the same file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(rng.randrange(2**32)).integers(-25, 26, (size[1], size[0], 3))
    pixels = np.clip(np.array(COLOURS[colour]) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)


def photo_line(root: Path, split: str, i: int, colour: str, shape: str, rng: random.Random) -> dict:
    """shape: "single" (one image turn), "intro" (text-only turn, then the image turn), "two" (two image turns)."""
    rel = f"{split}/{i:04d}.png"
    photo(root / "photos" / rel, colour, rng)
    turns = [{"images": [rel], "user": QUESTION, "assistant": answer(colour)}]
    if shape == "intro":
        turns.insert(0, {"images": [], "user": INTRO[0], "assistant": INTRO[1]})
    elif shape == "two":
        other = rng.choice(sorted(COLOURS))
        rel_first = f"{split}/{i:04d}a.png"
        photo(root / "photos" / rel_first, other, rng)
        turns.insert(0, {"images": [rel_first], "user": QUESTION, "assistant": answer(other)})
    return {"id": f"{split}-{i}", "conversations": turns}


def photo_split(root: Path, split: str, n: int, rng: random.Random) -> list[dict]:
    """n lines, colours balanced, shapes cycling single/intro/two."""
    colours = [sorted(COLOURS)[i % len(COLOURS)] for i in range(n)]
    rng.shuffle(colours)
    shapes = ["single", "intro", "two"]
    return [photo_line(root, split, i, c, shapes[i % 3], rng) for i, c in enumerate(colours)]


def write_jsonl(path: Path, lines: list) -> Path:
    """Lines are records (dicts) or raw strings (written as they are)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def photo_set(root: Path, num_train: int, num_val: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Writes root/my_train.jsonl, root/my_val.jsonl and root/photos/; returns the (train, val) records."""
    rng = random.Random(seed)
    train, val = photo_split(root, "train", num_train, rng), photo_split(root, "val", num_val, rng)
    write_jsonl(root / "my_train.jsonl", train)
    write_jsonl(root / "my_val.jsonl", val)
    return train, val


OWN_FILES = ["--train_file", "my_train.jsonl", "--eval_file", "my_val.jsonl", "--image_dir", "photos"]
