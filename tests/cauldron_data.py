"""the_cauldron's schema for the tests' generated datasets, and a tiny hateful_memes copy."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw


def cauldron_features():
    """HuggingFaceM4/the_cauldron's columns: `images` (list of Image), `texts` (list of turns)."""
    from datasets import Features, Image as ImageFeature, List, Value

    return Features({
        "images": List(ImageFeature()),
        "texts": List({"user": Value("string"), "assistant": Value("string"), "source": Value("string")}),
    })


def write_memes_dataset(path: Path, num_rows: int = 8) -> Path:
    """A save_to_disk copy of the_cauldron/hateful_memes for the crash and distributed tests: small
    images of a few sizes, both answers, questions of different lengths."""
    from datasets import Dataset

    rng = random.Random(0)
    images, texts = [], []
    for i in range(num_rows):
        image = Image.new("RGB", (48 + 8 * (i % 3), 40), ["red", "green", "blue", "white"][i % 4])
        ImageDraw.Draw(image).rectangle([rng.randrange(20), rng.randrange(20), 30, 30], fill="black")
        images.append([image])
        texts.append([{"user": "Is this meme hateful?" + " Answer yes or no." * (i % 2),
                       "assistant": "Yes" if i % 2 else "No", "source": "hateful_memes"}])
    Dataset.from_dict({"images": images, "texts": texts}, features=cauldron_features()).save_to_disk(str(path))
    return path
