"""Phi3VImageProcessor against the official image preprocessing, bit for bit.

`official_preprocess` below is the official processor's algorithm (facts doc, section 6.2) written
out literally, in its own order and with its own constants, sharing no code with phi3v: convert to
RGB; if the image is taller than wide, transpose it; search the scale; PIL bilinear resize; pad the
height with white, centred; transpose back; ToTensor and Normalize; bicubic 336x336 global crop;
row-major 336x336 crops; zero slots up to num_crops + 1; the padded (h, w); the token formula.

The order matters: PIL resizes in two passes, rounding to uint8 in between, and the axis that goes
first depends on the orientation, so resizing a portrait image without transposing it moves a share
of its values by one level (test_the_order_matters_on_these_images). The
images are random noise, where that rounding shows on many pixels, in every orientation and shape
(square, one pixel off square, extreme slivers, odd and tiny sizes) and in 17 PIL modes
`convert("RGB")` takes. Every num_crops from 1 to 16 runs on a portrait and a landscape image.
The default resize backend ("pil") must give exactly these tensors: `torch.equal`, no tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from phi3v.processing_phi3_v import Phi3VImageProcessor
from phi3v.validation import load_image

# The official preprocessor_config.json's values, written out here on purpose.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
SIDE = 336
TOKENS_PER_CROP = 144


def official_hd_transform(img: Image.Image, hd_num: int) -> Image.Image:
    width, height = img.size
    trans = False
    if width < height:
        img = img.transpose(Image.TRANSPOSE)
        trans = True
        width, height = img.size
    ratio = width / height
    scale = 1
    while scale * np.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    new_w = int(scale * SIDE)
    new_h = int(new_w / ratio)
    img = img.resize((new_w, new_h), Image.BILINEAR)  # torchvision's resize of a PIL image
    # padding_336: the height up to a multiple of 336, centred, white; no left or right padding
    width, height = img.size
    tar = int(np.ceil(height / SIDE) * SIDE)
    top_padding = int((tar - height) / 2)
    canvas = Image.new("RGB", (width, tar), (255, 255, 255))
    canvas.paste(img, (0, top_padding))
    if trans:
        canvas = canvas.transpose(Image.TRANSPOSE)
    return canvas


def official_preprocess(images: list[Image.Image], num_crops: int):
    images = [image.convert("RGB") for image in images]
    elems = [official_hd_transform(image, num_crops) for image in images]
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=torch.float32)[:, None, None]
    hd_images = []
    for elem in elems:  # ToTensor, then Normalize
        tensor = torch.from_numpy(np.array(elem, dtype=np.uint8)).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
        hd_images.append(tensor.sub(mean).div(std))
    global_images = [F.interpolate(im.unsqueeze(0).float(), size=(SIDE, SIDE), mode="bicubic").to(im.dtype)
                     for im in hd_images]
    shapes = [[im.size(1), im.size(2)] for im in hd_images]
    num_img_tokens = [int(((h // SIDE) * (w // SIDE) + 1) * TOKENS_PER_CROP + 1 + (h // SIDE + 1) * 12)
                      for h, w in shapes]
    crops = [im.reshape(1, 3, h // SIDE, SIDE, w // SIDE, SIDE).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3, SIDE, SIDE)
             for im, (h, w) in zip(hd_images, shapes)]
    slots = []
    for global_image, crop in zip(global_images, crops):
        stacked = torch.cat([global_image, crop], dim=0)
        if stacked.shape[0] < num_crops + 1:
            padding = torch.zeros(num_crops + 1 - stacked.shape[0], 3, SIDE, SIDE, dtype=stacked.dtype)
            stacked = torch.cat([stacked, padding], dim=0)
        slots.append(stacked)
    return torch.stack(slots, dim=0), shapes, num_img_tokens


def noise(width: int, height: int, seed: int, bands: int = 3, dtype=np.uint8, high: int = 256) -> np.ndarray:
    shape = (height, width, bands) if bands > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, high, shape).astype(dtype)


def rgb(width, height, seed=0):
    return Image.fromarray(noise(width, height, seed))


def palette(width, height, seed, transparency=None):
    image = rgb(width, height, seed).quantize(colors=200)  # mode "P"
    if transparency is not None:
        image.info["transparency"] = transparency
    return image


def raw(mode, width, height, seed, bands):
    return Image.frombytes(mode, (width, height), noise(width, height, seed, bands).tobytes())


ALL_CROPS = list(range(1, 17))
# (name, image, the num_crops to run). Large num_crops make 1344-pixel pictures: a few per image.
CASES = [
    ("portrait 200x900", rgb(200, 900, 1), ALL_CROPS),
    ("landscape 900x200", rgb(900, 200, 2), ALL_CROPS),
    ("portrait page 425x550", rgb(425, 550, 3), [1, 4, 16]),
    ("landscape page 550x425", rgb(550, 425, 4), [3, 16]),
    ("square 300x300", rgb(300, 300, 5), [1, 4, 9]),
    ("one pixel taller 300x301", rgb(300, 301, 6), [1, 4, 16]),
    ("one pixel wider 301x300", rgb(301, 300, 7), [2, 16]),
    ("sliver 50x8000", rgb(50, 8000, 8), [1, 16]),
    ("sliver 8000x50", rgb(8000, 50, 9), [1, 16]),
    ("odd 333x777", rgb(333, 777, 10), [5, 16]),
    ("odd 777x333", rgb(777, 333, 11), [7, 16]),
    ("tiny 2x3", rgb(2, 3, 12), [1, 4]),
    ("tiny 3x2", rgb(3, 2, 13), [1, 4]),
    ("tiny 1x1", rgb(1, 1, 14), [1]),
    ("L portrait", Image.fromarray(noise(180, 400, 15, bands=1)), [1, 6, 16]),
    ("L landscape", Image.fromarray(noise(400, 180, 16, bands=1)), [2, 16]),
    ("1 (bilevel)", rgb(150, 260, 17).convert("1"), [4]),
    ("LA", Image.fromarray(noise(160, 240, 18, bands=2), "LA"), [4]),
    ("P", palette(240, 160, 19), [4]),
    ("P with transparency", palette(160, 240, 20, transparency=3), [4]),
    ("PA", palette(160, 240, 21).convert("PA"), [2]),
    ("RGBA", Image.fromarray(noise(160, 240, 22, bands=4), "RGBA"), [4]),
    ("RGBa", raw("RGBa", 160, 240, 23, 4), [2]),
    ("RGBX", raw("RGBX", 240, 160, 24, 4), [2]),
    ("CMYK", raw("CMYK", 160, 240, 25, 4), [4]),
    ("YCbCr", raw("YCbCr", 160, 240, 26, 3), [4]),
    ("HSV", raw("HSV", 240, 160, 27, 3), [2]),
    ("LAB", raw("LAB", 160, 240, 28, 3), [2]),
    ("I;16", Image.fromarray(noise(160, 240, 29, bands=1, dtype=np.uint16, high=700)), [4]),
    ("I;16B", Image.fromarray(noise(160, 240, 30, bands=1, dtype=np.uint16, high=700)).convert("I;16B"), [2]),
    ("I", Image.fromarray(noise(240, 160, 31, bands=1, dtype=np.int32, high=400)), [4]),
    ("F", Image.fromarray(noise(160, 240, 32, bands=1, dtype=np.float32, high=300) + 0.5), [4]),
]


@pytest.mark.parametrize("name, image, crop_counts", CASES, ids=[case[0] for case in CASES])
def test_default_processor_is_bit_identical_to_the_official_order(name, image, crop_counts):
    processor = Phi3VImageProcessor()
    assert processor.resize_backend == "pil"
    for num_crops in crop_counts:
        expected, shapes, tokens = official_preprocess([image], num_crops)
        ours = processor([image], num_crops=num_crops)
        assert ours["pixel_values"].dtype == expected.dtype and ours["pixel_values"].shape == expected.shape
        assert torch.equal(ours["pixel_values"], expected), (name, num_crops)
        assert ours["image_sizes"].tolist() == shapes, (name, num_crops)
        assert ours["num_img_tokens"] == tokens, (name, num_crops)


def test_the_sweep_covers_every_num_crops_in_both_orientations():
    portrait = {n for name, image, counts in CASES if image.width < image.height for n in counts}
    landscape = {n for name, image, counts in CASES if image.width > image.height for n in counts}
    assert portrait >= set(ALL_CROPS) and landscape >= set(ALL_CROPS)
    modes = {image.mode for _, image, _ in CASES}
    assert modes >= {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "I", "F"}
    # The recipes open every image with load_image, which hands the processor RGB in every case.
    loadable = [image for _, image, _ in CASES if min(image.size) >= 2]
    assert {load_image(image.copy()).mode for image in loadable} == {"RGB"}


def test_the_order_matters_on_these_images():
    """Resizing a portrait image without transposing it gives other values: the sweep can tell."""
    image = rgb(200, 900, 1)  # at 16 crops the official code resizes it to 597 wide, 2688 high
    direct = np.asarray(image.resize((597, 2688), Image.BILINEAR))
    official = np.asarray(image.transpose(Image.TRANSPOSE).resize((2688, 597), Image.BILINEAR).transpose(Image.TRANSPOSE))
    assert official.shape == direct.shape == (2688, 597, 3)
    assert (direct != official).mean() > 0.1  # about a quarter of the values of noise


def test_reused_buffers_leave_earlier_results_and_other_threads_alone():
    """Preprocessing keeps its padded and normalised pictures in per-thread buffers between calls:
    a result must not change when later images (larger, smaller, other orientation) are processed,
    and threads working at once must each get what they get alone."""
    from concurrent.futures import ThreadPoolExecutor

    images = [rgb(900, 200, 40), rgb(200, 900, 41), rgb(425, 550, 42), rgb(30, 20, 43),
              Image.fromarray(noise(400, 180, 44, bands=1))]
    processor = Phi3VImageProcessor()
    first = [processor([image], num_crops=16)["pixel_values"] for image in images]
    kept = [tensor.clone() for tensor in first]
    for image in reversed(images):
        processor([image], num_crops=7)
    assert all(torch.equal(a, b) for a, b in zip(first, kept))
    for image, tensor in zip(images, first):
        assert torch.equal(tensor, official_preprocess([image], 16)[0])
    # hd_transform's default result is the caller's own, not the shared buffer
    own = processor.hd_transform(images[0], 16)
    copy = own.clone()
    processor.hd_transform(images[2], 16, reuse_buffer=True)
    processor([images[2]], num_crops=16)
    assert torch.equal(own, copy)

    def work(index):
        return [processor([images[(index + k) % len(images)]], num_crops=16)["pixel_values"] for k in range(10)]

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(work, range(8)))
    for index, tensors in enumerate(results):
        for k, tensor in enumerate(tensors):
            assert torch.equal(tensor, kept[(index + k) % len(images)]), (index, k)
