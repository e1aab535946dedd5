"""Phi3VImageProcessor(resize_backend="torch"): torch's uint8 antialiased resize instead of PIL's.

The default ("pil") is bit-identical to the official processor (tests/test_preprocessing_reference.py);
"torch" may differ from it by one uint8 level on a few pixels, i.e. by at most 1/255/std (about 0.015)
after normalising (0.028 in the bicubic global crop), in landscape and portrait images alike: it
resizes in the official pass order too.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor

import phi3v  # noqa: F401  (registers the Auto classes)
from bench.workloads import document_page
from phi3v.processing_phi3_v import OPENAI_CLIP_STD, Phi3VImageProcessor

ONE_LEVEL = 1 / 255 / min(OPENAI_CLIP_STD) + 1e-6  # one uint8 level after normalising (~0.0150)
PROMPT = "<|user|>\n<|image_1|>\nWhat is shown?<|end|>\n<|assistant|>\n"


def images():
    page = document_page(425, 550, random.Random(0))
    noise = np.random.default_rng(0).integers(0, 256, (41, 67, 3), dtype=np.uint8)
    return [
        ("page RGB", page, 16),
        ("page L", page.convert("L"), 16),  # resized as one band by both backends
        ("page RGBA", page.convert("RGBA"), 4),  # converted to RGB first by both
        ("page P", page.convert("P"), 4),
        ("wide page, transposed", page.transpose(Image.Transpose.ROTATE_90), 16),
        ("odd-sized noise, upscaled", Image.fromarray(noise), 16),
        # Portrait noise: resized in the wrong pass order, a quarter of its values would be a level off.
        ("odd-sized portrait noise, upscaled", Image.fromarray(noise.transpose(1, 0, 2).copy()), 16),
        ("portrait noise, downscaled", Image.fromarray(np.tile(noise, (12, 3, 1))[:, :150]), 2),
        ("7x1001 sliver L", Image.fromarray(noise[:7, :, 0].repeat(15, axis=1)[:, :1001]), 16),
        ("1x1 pixel", Image.new("RGB", (1, 1), (10, 200, 30)), 16),
        ("2x3 pixels", Image.fromarray(noise[:3, :2]), 1),
    ]


@pytest.mark.parametrize("name, image, num_crops", images(), ids=[case[0] for case in images()])
def test_torch_backend_is_within_one_level_of_pil(name, image, num_crops):
    exact = Phi3VImageProcessor(num_crops=num_crops)(image)
    fast = Phi3VImageProcessor(num_crops=num_crops, resize_backend="torch")(image)
    assert fast["image_sizes"].tolist() == exact["image_sizes"].tolist()
    assert fast["num_img_tokens"] == exact["num_img_tokens"]
    assert fast["pixel_values"].shape == exact["pixel_values"].shape
    diff = (fast["pixel_values"] - exact["pixel_values"]).abs()
    assert diff[0, 1:].max() <= ONE_LEVEL, name  # the crops: cut out of the normalised picture
    # The global crop is a bicubic resize of it (torch's kernel, a = -0.75), whose negative lobes can
    # add up the one-level differences of neighbours: at most (sum of |weights|, 1.375 per axis at
    # half-pixel offsets)^2 levels.
    assert diff[0, 0].max() <= 1.375**2 * ONE_LEVEL, name
    assert (diff > 0).float().mean() < 0.005, name  # a few values in a thousand at most
    # Padding (white) and the unused slots (zeros) are written by the shared code: identical.
    rows, cols = (s // 336 for s in exact["image_sizes"][0].tolist())
    assert fast["pixel_values"][0, 1 + rows * cols :].abs().sum() == 0


def test_torch_backend_really_resizes_with_torch_and_is_the_default_nowhere():
    page = document_page(425, 550, random.Random(1))
    exact = Phi3VImageProcessor(num_crops=16)(page)["pixel_values"]
    fast = Phi3VImageProcessor(num_crops=16, resize_backend="torch")(page)["pixel_values"]
    assert (fast != exact).any()  # the two backends are different code, not one path twice
    assert Phi3VImageProcessor(num_crops=16).resize_backend == "pil"  # exact: see test_preprocessing_reference.py


def test_resize_backend_round_trips_and_reaches_the_image_processor(tiny_model_dir, tmp_path):
    assert AutoProcessor.from_pretrained(tiny_model_dir).image_processor.resize_backend == "pil"
    processor = AutoProcessor.from_pretrained(tiny_model_dir, resize_backend="torch", num_crops=16)
    assert processor.image_processor.resize_backend == "torch" and processor.num_crops == 16
    page = document_page(425, 550, random.Random(2))
    fast = Phi3VImageProcessor(num_crops=16, resize_backend="torch")(page)["pixel_values"]
    assert torch.equal(processor(PROMPT, [page])["pixel_values"], fast)

    processor.save_pretrained(tmp_path)  # transformers 5 keeps the image processor in processor_config.json
    assert json.loads((tmp_path / "processor_config.json").read_text())["image_processor"]["resize_backend"] == "torch"
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert reloaded.image_processor.resize_backend == "torch"
    assert torch.equal(reloaded(PROMPT, [page])["pixel_values"], fast)
    # A keyword overrides the saved value.
    assert AutoProcessor.from_pretrained(tmp_path, resize_backend="pil").image_processor.resize_backend == "pil"

    processor.image_processor.save_pretrained(tmp_path / "image")
    assert json.loads((tmp_path / "image" / "preprocessor_config.json").read_text())["resize_backend"] == "torch"
    assert AutoImageProcessor.from_pretrained(tmp_path / "image").resize_backend == "torch"
    assert AutoImageProcessor.from_pretrained(tmp_path / "image", resize_backend="pil").resize_backend == "pil"


def test_unknown_resize_backend_is_a_clear_error(tiny_model_dir, tmp_path):
    message = r"resize_backend must be one of 'pil', 'torch', got 'cv2'"
    with pytest.raises(ValueError, match=message):
        Phi3VImageProcessor(resize_backend="cv2")
    with pytest.raises(ValueError, match=message):
        AutoProcessor.from_pretrained(tiny_model_dir, resize_backend="cv2")
    with pytest.raises(ValueError, match=message):
        AutoImageProcessor.from_pretrained(tiny_model_dir, resize_backend="cv2")
    config = json.loads((tiny_model_dir / "preprocessor_config.json").read_text())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**config, "resize_backend": "cv2"}))
    with pytest.raises(ValueError, match=message):
        AutoImageProcessor.from_pretrained(tmp_path)
    processor = Phi3VImageProcessor()
    processor.resize_backend = "cv2"  # set after construction: caught at the first image
    with pytest.raises(ValueError, match=message):
        processor(Image.new("RGB", (8, 8)))
