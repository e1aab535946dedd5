"""Image processor and processor of Phi-3.5-vision, with PIL and torch only (no torchvision).

HD transform (as the official `HD_transform`): turn the image so it is wider than tall, pick the
largest `scale` with `scale * ceil(scale / ratio) <= num_crops`, resize (PIL bilinear) to width
`scale * 336` keeping the aspect ratio, pad the height with white to a multiple of 336 (centred),
turn it back. The padded picture is normalised with the CLIP mean/std and cut into 336x336 crops
in row-major order; a bicubic 336x336 resize of the whole normalised picture comes first (the
global crop). Every image gets `num_crops + 1` slots; unused slots are zeros.

The output is bit-identical to the official processor's, for every size, orientation, num_crops
and PIL mode (tests/test_preprocessing_reference.py holds it to the official steps written out one
by one), but a portrait image is not turned (its resize runs as two single-axis resizes in the
order PIL's two passes take on the turned image, see `pil_resize`), the padding is done in uint8,
normalising is one table lookup per two pixels (a 65,536-entry table of float pairs per channel)
and every image goes straight into its slots of the batch tensor. That leaves PIL's resize, which
the output must match, as about two thirds of the cost (`python -m bench.preprocess` measures it
against the step-by-step path).

`resize_backend="torch"` (opt-in; saved in preprocessor_config.json) swaps PIL's resize for torch's
uint8 antialiased bilinear resize, which follows PIL's algorithm in fixed point with a different
rounding, in the same pass order: on a 1700x2200 RGB page at num_crops 16 the whole preprocessing
is 1.6x faster (portrait; the resize 2.0x) to 1.9x (the page turned to landscape; the resize 2.9x),
and 0.020 % of the values of either page are off by one uint8 level (random noise: 0.23 %). After
normalising that is at most 1/255/std = 0.015 in the crops and 0.028 in the bicubic global crop
(measured: 0.015 and 0.023). Everything else is the same code.

`num_crops` is an upper bound on the number of crops, and the number of image tokens depends only
on the image size and `num_crops` (see `num_image_tokens`), so sequence lengths can be known
without decoding pixels.

The processor expands every `<|image_k|>` tag into `num_image_tokens` copies of the id `-k` and
tokenizes each text chunk separately, so every chunk starts with `<s>`, exactly as the official
processor does. It also takes a batch: a list of prompts with a list of images per prompt.
"""

from __future__ import annotations

import functools
import math
import re
import sys
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_processing_base import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ImagesKwargs, ProcessorMixin

CROP_SIZE = 336
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")
RESIZE_BACKENDS = ("pil", "torch")


def check_resize_backend(resize_backend) -> str:
    if resize_backend not in RESIZE_BACKENDS:
        raise ValueError(
            f"resize_backend must be one of {', '.join(map(repr, RESIZE_BACKENDS))}, got {resize_backend!r}: "
            "'pil' matches the official processor bit for bit, 'torch' is faster and within 1/255 of it"
        )
    return resize_backend


def hd_transform_size(width: int, height: int, num_crops: int) -> tuple[int, int, int, int]:
    """(resized width, resized height, padded width, padded height) of the HD transform."""
    if num_crops < 1:
        raise ValueError(f"num_crops must be >= 1, got {num_crops}")
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    transposed = width < height
    if transposed:
        width, height = height, width
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_w = int(scale * CROP_SIZE)
    new_h = max(int(new_w / ratio), 1)
    padded_h = math.ceil(new_h / CROP_SIZE) * CROP_SIZE
    if transposed:
        return new_h, new_w, padded_h, new_w
    return new_w, new_h, new_w, padded_h


def resize_pass_sizes(width: int, height: int, new_width: int, new_height: int) -> list[tuple[int, int]]:
    """The (width, height) of each resize that reproduces the official HD transform's resize.

    One resize for an image at least as wide as tall; for a taller one, the height first and then
    the width: the order in which the official code's two-pass resize of the transposed image
    treats the original's axes (see `Phi3VImageProcessor.pil_resize`).
    """
    if width < height:
        return [(width, new_height), (new_width, new_height)]
    return [(new_width, new_height)]


def num_image_tokens(width: int, height: int, num_crops: int, tokens_per_crop: int = 144) -> int:
    """Number of image tokens one image of `width` x `height` pixels takes at `num_crops`."""
    _, _, padded_w, padded_h = hd_transform_size(width, height, num_crops)
    rows, cols = padded_h // CROP_SIZE, padded_w // CROP_SIZE
    side = int(math.isqrt(tokens_per_crop))  # 12 merged patches per crop side
    return (rows * cols + 1) * tokens_per_crop + 1 + (rows + 1) * side


@functools.lru_cache(maxsize=4)
def _normalised_pairs(image_mean: tuple, image_std: tuple) -> np.ndarray:
    levels = Phi3VImageProcessor(image_mean=image_mean, image_std=image_std).normalised_levels()
    pairs = np.stack([np.tile(levels, (1, 256)), np.repeat(levels, 256, axis=1)], axis=-1)
    return np.ascontiguousarray(pairs).view(np.int64)[..., 0]


class Phi3VImagesKwargs(ImagesKwargs, total=False):
    # from_pretrained(path, **kwargs) hands these to __init__ (validated there) instead of setting them
    num_crops: int
    num_img_tokens: int
    resize_backend: str


class Phi3VImageProcessor(BaseImageProcessor):
    r"""HD crop transform of Phi-3-vision.

    Args:
        num_crops (`int`, defaults to 4): upper bound on the number of 336x336 sub-crops per image
            (the model card: 4 for multi-frame inputs, 16 for single images).
        image_mean, image_std (`list[float]`): normalisation (OpenAI CLIP values).
        do_convert_rgb (`bool`): convert every image to RGB first (always done, as the official code).
        num_img_tokens (`int`): tokens per crop after the 2x2 merge (144).
        resize_backend (`str`, defaults to "pil"): the bilinear resize of the HD transform. "pil" is
            PIL's, bit-identical to the official processor; "torch" is torch's uint8 antialiased
            bilinear, making preprocessing 1.6x (portrait) to 1.9x (landscape) faster on RGB pages,
            within one uint8 level of PIL's on two values in ten thousand of a page (for dataloader
            workers that cannot keep up).
    """

    model_input_names = ["pixel_values", "image_sizes"]
    valid_kwargs = Phi3VImagesKwargs

    def __init__(
        self,
        num_crops: int = 4,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
        do_convert_rgb: bool = True,
        num_img_tokens: int = 144,
        resize_backend: str = "pil",
        **kwargs,
    ):
        kwargs.pop("auto_map", None)  # points at the official remote code; not needed here
        super().__init__(**kwargs)
        if int(num_crops) < 1:
            raise ValueError(f"num_crops must be >= 1, got {num_crops}")
        self.num_crops = int(num_crops)
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.do_convert_rgb = do_convert_rgb
        self.num_img_tokens = num_img_tokens
        self.resize_backend = check_resize_backend(resize_backend)

    def num_image_tokens(self, width: int, height: int, num_crops: int | None = None) -> int:
        return num_image_tokens(width, height, num_crops or self.num_crops, self.num_img_tokens)

    def normalised_levels(self) -> np.ndarray:
        """[3, 256] float32: the normalised value of each uint8 level, per channel.

        Built with the same float32 operations as normalising every pixel, `(x / 255 - mean) / std`,
        so looking pixels up in it gives bit-identical values at one read per pixel instead of four
        passes over a float picture.
        """
        levels = torch.arange(256, dtype=torch.float32).div(255)
        mean = torch.tensor(self.image_mean, dtype=torch.float32)[:, None]
        std = torch.tensor(self.image_std, dtype=torch.float32)[:, None]
        return ((levels - mean) / std).numpy()

    def normalised_pairs(self) -> np.ndarray:
        """[3, 65536] int64: the normalised values of two neighbouring uint8 pixels, per channel.

        Entry `a + 256 * b` holds the float32 values of levels a and b side by side, which is the
        uint16 that two neighbouring bytes read as on a little-endian machine: one lookup writes two
        output pixels, half the lookups of `normalised_levels` (numpy's take costs per element).
        """
        return _normalised_pairs(tuple(self.image_mean), tuple(self.image_std))

    def hd_transform(self, image: Image.Image, num_crops: int) -> torch.Tensor:
        """One PIL image -> normalised, padded HD picture [3, H, W] (H and W multiples of 336)."""
        # A grayscale page resized as one band equals its RGB conversion resized (PIL and torch
        # resample each band alone with the same integer weights), at a third of the cost.
        # convert() of an RGB image would only copy it. Every other mode takes the official
        # convert("RGB") (tests/test_preprocessing_reference.py checks both, mode by mode).
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        new_w, new_h, padded_w, padded_h = hd_transform_size(image.width, image.height, num_crops)
        if check_resize_backend(self.resize_backend) == "torch":
            resized = self.torch_resize(image, new_w, new_h)
        else:
            resized = self.pil_resize(image, new_w, new_h)
        # Pad in uint8 (white, centred, the remainder at the bottom or right) and normalise the
        # padded picture in one lookup pass: normalised white is the table's entry for 255, so this
        # equals normalising after padding. padded_w is a multiple of 336, so rows pair up evenly.
        top, left = (padded_h - new_h) // 2, (padded_w - new_w) // 2
        padded = np.full((3, padded_h, padded_w), 255, dtype=np.uint8)
        inside = padded[:, top : top + new_h, left : left + new_w]
        inside[...] = resized[None] if resized.ndim == 2 else resized.transpose(2, 0, 1)
        hd = torch.empty(3, padded_h, padded_w)
        out = hd.numpy()
        if sys.byteorder == "little":
            pairs = self.normalised_pairs()
            for channel in range(3):
                # mode="wrap" skips numpy's buffered bounds check (a uint16 index is always in range).
                np.take(pairs[channel], padded[channel].view(np.uint16), out=out[channel].view(np.int64), mode="wrap")
        else:
            table = self.normalised_levels()
            for channel in range(3):
                np.take(table[channel], padded[channel], out=out[channel], mode="wrap")
        return hd

    @staticmethod
    def pil_resize(image: Image.Image, width: int, height: int) -> np.ndarray:
        """RGB or L PIL image -> uint8 [height, width, 3] or [height, width]: PIL's bilinear resize
        as the official HD transform runs it, bit for bit, in every orientation.

        The official code turns an image taller than wide on its side (Image.TRANSPOSE), resizes
        it and turns it back. PIL resizes in two passes, rounding to uint8 in between, so which
        axis goes first changes the result (by one level, on 0.09 % of the values of a 1700x2200
        page at num_crops 16 and on a quarter of those of random noise). On the turned image,
        wider than tall and scaled by about the same factor on both axes, PIL runs the horizontal
        pass first: along the original's height. Resizing the height alone, then the width, runs
        those two passes in that order with the same weights without turning anything:
        bit-identical, and cheaper than turning the page (1700x2200 page at num_crops 16, one
        core: 25 ms against 7 + 27 ms; one direct resize, in the wrong order, takes 26 ms).
        Pillow 13 picks the pass order per call and runs some tall images vertically first, but
        not the turned images the official code resizes; tests/test_preprocessing_reference.py
        holds this to the literal official code on the installed Pillow.
        """
        for size in resize_pass_sizes(image.width, image.height, width, height):
            image = image.resize(size, Image.BILINEAR)
        return np.asarray(image)

    @staticmethod
    def torch_resize(image: Image.Image, width: int, height: int) -> np.ndarray:
        """RGB or L PIL image -> uint8 [height, width, 3] or [height, width], as `pil_resize` but
        with torch's antialiased bilinear resize (PIL's kernel and support, in fixed point with its
        own rounding).

        torch's uint8 kernel also runs two passes, horizontal first, rounding in between, so it
        takes the same single-axis passes as `pil_resize`, in the official order. On a 1700x2200
        portrait page at num_crops 16 that brings the share of pixel_values one level off the
        exact ones from 0.110 % (one resize) to 0.020 %, the share on the same page turned to
        landscape; on portrait random noise from 26.8 % to 0.23 % (landscape: 0.22 %). The resize
        takes 12 ms instead of 9 (one core).

        An RGB image goes in as its HWC buffer viewed as a channels-last NCHW tensor (no copy), the
        layout torch's vectorised uint8 kernel takes; an L image stays one band, as in the PIL path.
        """
        with warnings.catch_warnings():  # PIL's buffer is read-only; the resize only reads it
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(np.asarray(image))
        tensor = tensor[None, None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)[None]
        for size in resize_pass_sizes(image.width, image.height, width, height):
            tensor = F.interpolate(tensor, size=size[::-1], mode="bilinear", antialias=True, align_corners=False)
        resized = tensor[0]
        return resized[0].numpy() if image.mode == "L" else resized.permute(1, 2, 0).numpy()

    def crops(self, hd: torch.Tensor, num_crops: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised HD picture -> [num_crops + 1, 3, 336, 336]: global, sub-crops, zero slots.

        Writes into `out` when given (a slot of the batch tensor), so no image is copied twice.
        """
        _, height, width = hd.shape
        rows, cols = height // CROP_SIZE, width // CROP_SIZE
        slots = torch.empty(num_crops + 1, 3, CROP_SIZE, CROP_SIZE, dtype=hd.dtype) if out is None else out
        slots[0] = F.interpolate(hd.unsqueeze(0), size=(CROP_SIZE, CROP_SIZE), mode="bicubic")[0]
        sub_crops = slots[1 : 1 + rows * cols].view(rows, cols, 3, CROP_SIZE, CROP_SIZE)
        sub_crops.copy_(hd.view(3, rows, CROP_SIZE, cols, CROP_SIZE).permute(1, 3, 0, 2, 4))
        slots[1 + rows * cols :].zero_()
        return slots

    def preprocess(self, images, num_crops: int | None = None, return_tensors="pt", **kwargs) -> BatchFeature:
        """Images (one or a list of PIL images) -> pixel_values, image_sizes (padded h, w), num_img_tokens."""
        num_crops = int(num_crops or self.num_crops)
        if num_crops < 1:
            raise ValueError(f"num_crops must be >= 1, got {num_crops}")
        images = [images] if isinstance(images, Image.Image) else list(images)
        for image in images:
            if not isinstance(image, Image.Image):
                raise TypeError(f"Phi3VImageProcessor takes PIL images, got {type(image).__name__}")
        # Every image is written straight into its slots of the batch tensor (no stacking copy).
        pixel_values = torch.empty(len(images), num_crops + 1, 3, CROP_SIZE, CROP_SIZE)
        image_sizes, tokens = [], []
        for image, slots in zip(images, pixel_values):
            hd = self.hd_transform(image, num_crops)
            self.crops(hd, num_crops, out=slots)
            image_sizes.append([hd.shape[1], hd.shape[2]])
            tokens.append(self.num_image_tokens(image.width, image.height, num_crops))
        image_sizes = torch.tensor(image_sizes, dtype=torch.long).reshape(-1, 2)
        return BatchFeature(data={"pixel_values": pixel_values, "image_sizes": image_sizes, "num_img_tokens": tokens})

    __call__ = preprocess

    def to_dict(self):
        out = super().to_dict()
        out["image_processor_type"] = "Phi3VImageProcessor"
        out["auto_map"] = {
            "AutoImageProcessor": "processing_phi3_v.Phi3VImageProcessor",
            "AutoProcessor": "processing_phi3_v.Phi3VProcessor",
        }
        return out


class Phi3VProcessor(ProcessorMixin):
    r"""Tokenizer + `Phi3VImageProcessor`.

    `processor(text, images)` takes either one prompt and a flat list of images, or a list of
    prompts and a list of image lists (one per prompt; an empty list or None for text-only
    prompts). Image tags `<|image_1|>`..`<|image_n|>` number the images of each prompt. Returns
    `input_ids` (negative ids at image positions), `attention_mask`, and, when there are images,
    `pixel_values` and `image_sizes` for all images in reading order.
    """

    attributes = ["image_processor", "tokenizer"]
    special_image_token = "<|image|>"

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        if chat_template is None and tokenizer is not None:
            chat_template = getattr(tokenizer, "chat_template", None)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @property
    def num_crops(self) -> int:
        return self.image_processor.num_crops

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path, num_crops: int | None = None, resize_backend: str | None = None, **kwargs
    ):
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if num_crops is not None:
            if int(num_crops) < 1:
                raise ValueError(f"num_crops must be >= 1, got {num_crops}")
            processor.image_processor.num_crops = int(num_crops)
        if resize_backend is not None:
            processor.image_processor.resize_backend = check_resize_backend(resize_backend)
        return processor

    def __call__(
        self,
        text=None,
        images=None,
        padding: bool | str = False,
        truncation: bool | None = None,
        max_length: int | None = None,
        return_tensors: str | None = "pt",
        num_crops: int | None = None,
        **kwargs,
    ) -> BatchFeature:
        if text is None:
            raise ValueError("Phi3VProcessor needs `text` (a prompt, or a list of prompts).")
        batched = not isinstance(text, str)
        prompts = list(text) if batched else [text]
        per_prompt_images = self._images_per_prompt(prompts, images, batched)

        sequences, all_images = [], []
        for row, (prompt, prompt_images) in enumerate(zip(prompts, per_prompt_images)):
            ids = self._prompt_ids(prompt, prompt_images, num_crops, row if batched else None)
            if max_length is not None and truncation and len(ids) > max_length:
                if any(i < 0 for i in ids[max_length:]) or prompt_images:
                    raise ValueError(
                        f"prompt{f' {row}' if batched else ''} has {len(ids)} tokens, more than max_length="
                        f"{max_length}, and holds images: image tokens are never truncated; drop or shorten the sample."
                    )
                ids = ids[:max_length]
            sequences.append(ids)
            all_images.extend(prompt_images)

        data = self._pad(sequences, padding, max_length)
        if all_images:
            image_inputs = self.image_processor(all_images, num_crops=num_crops)
            data["pixel_values"] = image_inputs["pixel_values"]
            data["image_sizes"] = image_inputs["image_sizes"]
        if return_tensors == "pt":
            data = {
                k: (torch.tensor(v, dtype=torch.long) if isinstance(v, list) else v) for k, v in data.items()
            }
        elif return_tensors is not None:
            raise ValueError(f"return_tensors={return_tensors!r} is not supported; use 'pt' or None")
        return BatchFeature(data=data)

    @staticmethod
    def _images_per_prompt(prompts, images, batched):
        if images is None:
            return [[] for _ in prompts]
        if isinstance(images, Image.Image):
            images = [images]
        images = list(images)
        if not batched:
            return [images]
        if all(isinstance(x, (list, tuple)) or x is None for x in images):
            if len(images) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
            return [list(x or []) for x in images]
        # A flat list for a batch: hand the images out in order, as many as each prompt has tags.
        out, start = [], 0
        for prompt in prompts:
            count = len(set(IMAGE_TAG.findall(prompt)))
            out.append(images[start : start + count])
            start += count
        if start != len(images):
            raise ValueError(f"the prompts have {start} distinct image tags but {len(images)} images were given")
        return out

    def _prompt_ids(self, prompt: str, images: list, num_crops: int | None, row: int | None) -> list[int]:
        where = f"prompt {row}" if row is not None else "prompt"
        tags = [int(t) for t in IMAGE_TAG.findall(prompt)]
        if not tags:
            if images:
                raise ValueError(f"{where} has {len(images)} images but no <|image_k|> tag")
            return self.tokenizer(prompt).input_ids
        distinct = sorted(set(tags))
        if distinct != list(range(1, len(distinct) + 1)):
            raise ValueError(f"{where}: image tags must be numbered 1..n without gaps, got {tags}")
        if len(tags) != len(distinct):
            raise ValueError(f"{where}: each image tag may appear once, got {tags}")
        if len(distinct) != len(images):
            raise ValueError(f"{where} has {len(distinct)} image tags but {len(images)} images")
        crops = num_crops or self.image_processor.num_crops
        counts = [self.image_processor.num_image_tokens(im.width, im.height, crops) for im in images]
        chunks = [self.tokenizer(chunk).input_ids for chunk in IMAGE_TAG.split(prompt)[::2]]
        ids = list(chunks[0])
        for tag, chunk in zip(tags, chunks[1:]):
            ids += [-tag] * counts[tag - 1]
            ids += chunk  # every chunk keeps its own <s>, as in the official processor
        return ids

    def _pad(self, sequences: list[list[int]], padding, max_length) -> dict:
        if padding is True or padding == "longest":
            target = max(len(s) for s in sequences)
        elif padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            target = max(max_length, max(len(s) for s in sequences))
        elif padding in (False, None, "do_not_pad"):
            if len({len(s) for s in sequences}) > 1:
                raise ValueError("prompts of different lengths need padding=True")
            target = len(sequences[0])
        else:
            raise ValueError(f"unknown padding={padding!r}")
        pad_id = self.tokenizer.pad_token_id
        left = self.tokenizer.padding_side == "left"
        input_ids, attention_mask = [], []
        for seq in sequences:
            fill = target - len(seq)
            input_ids.append([pad_id] * fill + seq if left else seq + [pad_id] * fill)
            mask = [1] * len(seq)
            attention_mask.append([0] * fill + mask if left else mask + [0] * fill)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs):
        """Text of generated sequences that still hold the prompt (the image-text-to-text pipeline
        decodes those): image positions are negative ids, which the tokenizer cannot decode, so they
        are left out."""
        sequences = torch.as_tensor(generated_outputs)
        rows = [[i for i in row if i >= 0] for row in sequences.reshape(-1, sequences.shape[-1]).tolist()]
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens, **kwargs)
        return texts if sequences.dim() > 1 else texts[0]

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values", "image_sizes"]
