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
and every image goes straight into its slots of the batch tensor. The padded and normalised
pictures live in per-thread buffers kept from call to call, and the batch tensor in memory numpy
allocates (with transparent huge pages): fresh 4 KB pages for those 50 MB cost up to ~13,000 page
faults a page at num_crops 16, as much CPU as normalising and cropping, depending on what the
allocator happened to keep. That leaves PIL's resize, which the output must match, as about half
of the cost (`python -m bench.preprocess` measures it against the step-by-step path).

`resize_backend="torch"` (opt-in; saved in preprocessor_config.json) swaps PIL's resize for torch's
uint8 antialiased bilinear resize, which follows PIL's algorithm in fixed point with a different
rounding, in the same pass order: on a 1700x2200 RGB page at num_crops 16 the whole preprocessing
is 1.2x faster (portrait; the resize 1.3x) to 1.4x (the page turned to landscape; the resize 1.7x),
and 0.020 % of the values of either page are off by one uint8 level (random noise: 0.23 %). After
normalising that is at most 1/255/std = 0.015 in the crops and 0.028 in the bicubic global crop
(measured: 0.015 and 0.023). Everything else is the same code.

`num_crops` is an upper bound on the number of crops, and the number of image tokens depends only
on the image size and `num_crops` (see `num_image_tokens`), so sequence lengths can be known
without decoding pixels.

The processor expands every `<|image_k|>` tag into `num_image_tokens` copies of the id `-k` and
tokenizes each text chunk separately, so every chunk starts with `<s>`, exactly as the official
processor does. It also takes a batch: a list of prompts with a list of images per prompt.

`Phi3VProcessor.apply_chat_template` also takes transformers 5's typed messages (image, video and
text parts, as TRL's vision collator sends them): each image or frame becomes `<|image_N|>` and a
newline, numbered across the conversation, and the official string template renders the rest, so
the saved files keep the official template and the inputs equal those of the hand-written prompt.
"""

from __future__ import annotations

import base64
import binascii
import functools
import math
import os
import re
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_processing_base import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ImagesKwargs, ProcessorMixin

from .validation import InvalidSample, load_image

CROP_SIZE = 336
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")
RESIZE_BACKENDS = ("pil", "torch")
GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
IMAGE_SOURCE_KEYS = ("image", "path", "url", "base64")  # transformers 5's keys of an image part
VIDEO_SOURCE_KEYS = ("video", "path", "url")
DEFAULT_VIDEO_FRAMES = 8  # frames cut from a video file, as convert_ucf101.py's default

# The official chat template with `{% generation %}` around each assistant answer and its `<|end|>\n`.
# It renders the same text as the official one (tests/test_chat_messages.py checks it), so the same
# tokens; the markers only tell `apply_chat_template(..., return_assistant_tokens_mask=True)`, and
# TRL's `assistant_only_loss`, which tokens are the answers. Set it on the processor for training
# (`processor.chat_template = ASSISTANT_MASK_CHAT_TEMPLATE`); the tokenizer keeps the official one.
ASSISTANT_MASK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>' + '\n' }}{% generation %}{{ message['content'] + '<|end|>\n' }}{% endgeneration %}"
    "{% else %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{- '<|assistant|>\n' -}}{% endif %}"
)


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


def _local_path(value, what: str) -> Path:
    """A path, or a file:// URL, as a local path."""
    if isinstance(value, str) and value.startswith("file://"):
        return Path(url2pathname(urlparse(value).path))
    if isinstance(value, (str, os.PathLike)):
        return Path(value)
    raise ValueError(f"{what} must be a path or a file:// URL, got {type(value).__name__}")


def _base64_bytes(value: str) -> bytes:
    """The bytes of a base64 string, raw or as a data URI (data:image/png;base64,....)."""
    if not isinstance(value, str):
        raise ValueError(f"'base64' must be a string, got {type(value).__name__}")
    if value.startswith("data:"):
        header, _, value = value.partition(",")
        if not header.endswith(";base64"):
            raise ValueError(f"a data URI must be base64-encoded (data:<type>;base64,...), got {header!r}")
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"not valid base64: {err}") from None


def _one_source(part: dict, keys: tuple[str, ...]) -> tuple[str, object]:
    found = [key for key in keys if key in part]
    if len(found) != 1:
        named = ", ".join(repr(k) for k in keys)
        raise ValueError(f"the {part['type']} part needs exactly one of {named}; it has {sorted(part)}")
    return found[0], part[found[0]]


def load_image_part(part: dict) -> Image.Image:
    """The RGB image of a typed `{"type": "image", ...}` part (transformers 5's keys), opened with
    `phi3v.validation.load_image` as the recipes open their images (EXIF, transparency, 16-bit).

    `image`: a PIL image (or anything load_image takes: path, bytes, a datasets cell); `path`: a local
    path or file:// URL; `url`: file://, http(s):// (where the network allows) or a base64 data URI;
    `base64`: a data URI or raw base64. Raises ValueError with the reason.
    """
    key, value = _one_source(part, IMAGE_SOURCE_KEYS)
    try:
        if key == "image":
            return load_image(value)
        if key == "path":
            return load_image(_local_path(value, "'path'"))
        if key == "base64":
            return load_image(_base64_bytes(value))
        if not isinstance(value, str):
            raise ValueError(f"'url' must be a string, got {type(value).__name__}")
        if value.startswith("file://"):
            return load_image(_local_path(value, "'url'"))
        if value.startswith("data:"):
            return load_image(_base64_bytes(value))
        if value.startswith(("http://", "https://")):
            import httpx  # transformers' own HTTP client

            try:
                response = httpx.get(value, follow_redirects=True)
                response.raise_for_status()
            except httpx.HTTPError as err:
                raise ValueError(f"cannot fetch {value}: {err}") from None
            return load_image(response.content)
        raise ValueError(f"'url' must start with file://, http://, https:// or data:, got {value[:60]!r}")
    except InvalidSample as err:
        raise ValueError(str(err)) from None


def video_part_frames(part: dict, num_frames: int) -> list[Image.Image]:
    """The frames of a typed `{"type": "video", ...}` part: a list of frames (each anything
    `load_image_part`'s `image` takes), or a local video file (path or file:// URL) read with PyAV
    and sampled as `convert_ucf101.py` samples clips (`phi3v.video.sample_frames`)."""
    key, value = _one_source(part, VIDEO_SOURCE_KEYS)
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("the video has no frames")
        frames = []
        for f, frame in enumerate(value):
            try:
                frames.append(load_image(_local_path(frame, "a frame") if isinstance(frame, str) else frame))
            except InvalidSample as err:
                raise ValueError(f"frame {f}: {err}") from None
        return frames
    if isinstance(value, str) and value.startswith(("http://", "https://")):
        raise ValueError("video URLs are not read; download the file and give its path")
    from .video import InvalidVideo, sample_frames  # PyAV is needed only for video files

    path = _local_path(value, f"'{key}'")
    try:
        return sample_frames(path, num_frames)
    except InvalidVideo as err:
        raise ValueError(f"video {path}: {err}") from None


def video_part_length(part: dict, num_frames: int) -> int:
    """How many images a video part becomes, without decoding anything."""
    _, value = _one_source(part, VIDEO_SOURCE_KEYS)
    return len(value) if isinstance(value, (list, tuple)) else num_frames


@functools.lru_cache(maxsize=4)
def _normalised_pairs(image_mean: tuple, image_std: tuple) -> np.ndarray:
    levels = Phi3VImageProcessor(image_mean=image_mean, image_std=image_std).normalised_levels()
    pairs = np.stack([np.tile(levels, (1, 256)), np.repeat(levels, 256, axis=1)], axis=-1)
    return np.ascontiguousarray(pairs).view(np.int64)[..., 0]


class _ScratchBuffers(threading.local):
    """Buffers that preprocessing reuses from image to image, one set per thread.

    A page at num_crops 16 passes through a 5 MB uint8 picture and a 22 MB float one. Fresh
    buffers of that size come from the kernel as zeroed pages, one fault per 4 KB page: ~13,000
    faults a page, which cost as much CPU as normalising and cropping together (measured with
    getrusage). Kept buffers are faulted in once. Neither buffer leaves `preprocess`. A thread keeps
    the largest it needed: 5 bytes per pixel of the padded picture, at most 3 x num_crops x 336^2
    pixels (27 MB at num_crops 16).
    """

    def __init__(self):
        self.buffers = {}

    def get(self, name: str, numel: int, dtype) -> np.ndarray:
        """A flat array of `numel` elements, overwritten by the next call with the same name."""
        buffer = self.buffers.get(name)
        if buffer is None or buffer.size < numel:
            buffer = self.buffers[name] = np.empty(numel, dtype=dtype)
        return buffer[:numel]


_scratch = _ScratchBuffers()


def _new_float_tensor(*shape: int) -> torch.Tensor:
    """torch.empty(shape) in memory numpy allocates: numpy asks for transparent huge pages on large
    arrays (madvise), so where the kernel grants them a fresh 23 MB pixel_values tensor takes a few
    dozen page faults instead of 5,600."""
    return torch.from_numpy(np.empty(shape, dtype=np.float32))


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
            bilinear, making preprocessing 1.2x (portrait) to 1.4x (landscape) faster on RGB pages,
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

    def hd_transform(self, image: Image.Image, num_crops: int, reuse_buffer: bool = False) -> torch.Tensor:
        """One PIL image -> normalised, padded HD picture [3, H, W] (H and W multiples of 336).

        With `reuse_buffer` the picture lives in this thread's scratch buffer, which the next call
        overwrites (what `preprocess` does: it copies the picture into the batch at once).
        """
        # A grayscale page resized as one band equals its RGB conversion resized (PIL and torch
        # resample each band alone with the same integer weights), at a third of the cost.
        # convert() of an RGB image would only copy it. Every other mode takes the official
        # convert("RGB") (tests/test_preprocessing_reference.py checks both, mode by mode).
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        new_w, new_h, padded_w, padded_h = hd_transform_size(image.width, image.height, num_crops)
        # Pad in uint8 (white, centred, the remainder at the bottom or right) and normalise the
        # padded picture in one lookup pass: normalised white is the table's entry for 255, so this
        # equals normalising after padding. padded_w is a multiple of 336, so rows pair up evenly.
        top, left = (padded_h - new_h) // 2, (padded_w - new_w) // 2
        padded = _scratch.get("padded", 3 * padded_h * padded_w, np.uint8).reshape(3, padded_h, padded_w)
        padded.fill(255)
        inside = padded[:, top : top + new_h, left : left + new_w]
        if check_resize_backend(self.resize_backend) == "torch":
            resized = self.torch_resize(image, new_w, new_h)
            inside[...] = resized[None] if resized.ndim == 2 else resized.transpose(2, 0, 1)
        else:
            # PIL hands out each band as a copy of its rows, a fifth cheaper than transposing
            # the interleaved RGB array; an L page has one band, which serves all three channels.
            bands = [np.asarray(band) for band in self.pil_resize(image, new_w, new_h).split()]
            for channel in range(3):
                inside[channel] = bands[channel % len(bands)]
        if reuse_buffer:
            out = _scratch.get("hd", 3 * padded_h * padded_w, np.float32).reshape(3, padded_h, padded_w)
        else:
            out = np.empty((3, padded_h, padded_w), dtype=np.float32)
        hd = torch.from_numpy(out)
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
    def pil_resize(image: Image.Image, width: int, height: int) -> Image.Image:
        """RGB or L PIL image -> the same mode at width x height: PIL's bilinear resize as the
        official HD transform runs it, bit for bit, in every orientation.

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
        return image

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
        pixel_values = _new_float_tensor(len(images), num_crops + 1, 3, CROP_SIZE, CROP_SIZE)
        image_sizes, tokens = [], []
        for image, slots in zip(images, pixel_values):
            hd = self.hd_transform(image, num_crops, reuse_buffer=True)
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
        padding_side: str | None = None,
        pad_to_multiple_of: int | None = None,
        add_special_tokens: bool = True,
        return_offsets_mapping: bool = False,
        **kwargs,
    ) -> BatchFeature:
        """`add_special_tokens=False` leaves out the `<s>` that starts the text (for text that continues a
        sequence); the `<s>` after each image block is part of the official format and stays.
        `return_offsets_mapping=True` adds `offset_mapping`: each token's (start, end) characters in its
        prompt, (0, 0) for image tokens, `<s>` and padding (transformers' assistant masks read it)."""
        if text is None:
            raise ValueError("Phi3VProcessor needs `text` (a prompt, or a list of prompts).")
        # Sent by ProcessorMixin.apply_chat_template with return_assistant_tokens_mask: offset_mapping
        # is already in the coordinates of the text before the image tags are expanded.
        kwargs.pop("return_text_replacement_offsets", None)
        batched = not isinstance(text, str)
        prompts = list(text) if batched else [text]
        per_prompt_images = self._images_per_prompt(prompts, images, batched)

        sequences, offsets, all_images = [], [], []
        for row, (prompt, prompt_images) in enumerate(zip(prompts, per_prompt_images)):
            ids, spans = self._prompt_ids(
                prompt, prompt_images, num_crops, row if batched else None, add_special_tokens, return_offsets_mapping
            )
            if max_length is not None and truncation and len(ids) > max_length:
                if any(i < 0 for i in ids[max_length:]) or prompt_images:
                    raise ValueError(
                        f"prompt{f' {row}' if batched else ''} has {len(ids)} tokens, more than max_length="
                        f"{max_length}, and holds images: image tokens are never truncated; drop or shorten the sample."
                    )
                ids, spans = ids[:max_length], spans[:max_length]
            sequences.append(ids)
            offsets.append(spans)
            all_images.extend(prompt_images)

        data = self._pad(sequences, padding, max_length, padding_side, pad_to_multiple_of)
        if return_offsets_mapping:
            left = (padding_side or self.tokenizer.padding_side) == "left"
            width = len(data["input_ids"][0])
            data["offset_mapping"] = [
                [(0, 0)] * (width - len(spans)) + spans if left else spans + [(0, 0)] * (width - len(spans))
                for spans in offsets
            ]
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

    def apply_chat_template(
        self,
        conversation,
        chat_template: str | None = None,
        tokenize: bool = False,
        return_assistant_tokens_mask: bool = False,
        processor_kwargs: dict | None = None,
        **kwargs,
    ):
        """transformers' `ProcessorMixin.apply_chat_template`, with transformers 5's typed content.

        Message content is a string (the official form, `<|image_N|>` tags written by hand, the images
        in `processor_kwargs={"images": [...]}`) or a list of typed parts: `{"type": "text", "text"}`,
        `{"type": "image", "image"|"path"|"url"|"base64"}` and `{"type": "video", "video"|"path"|"url"}`
        (a list of frames, or a video file cut into `processor_kwargs["num_frames"]` frames, default 8,
        as `convert_ucf101.py` cuts clips). Each image, and each frame, becomes `<|image_N|>` and one
        newline where it stands, numbered across the conversation; then the official string template
        renders it, and with `tokenize=True` the processor tokenizes it with the images: the same
        input_ids, attention_mask, pixel_values and image_sizes as writing the tags by hand.
        A list of conversations gives a batch. Bad input raises ValueError naming the message and part.

        `return_assistant_tokens_mask=True` needs a template with `{% generation %}` markers: pass
        `chat_template=ASSISTANT_MASK_CHAT_TEMPLATE` (renders the official text) or set it on the processor.
        """
        conversations, is_batched = self._normalize_conversations(conversation)
        processor_kwargs = dict(processor_kwargs or {})
        num_frames = int(processor_kwargs.pop("num_frames", DEFAULT_VIDEO_FRAMES))
        # The official template writes no <s>, so the processor adds it (as for the prompts written by
        # hand); ProcessorMixin turns it off itself when a rendered prompt starts with <s>. TRL asks for
        # add_special_tokens=False against a doubled <s>, which would drop the only one here.
        processor_kwargs.pop("add_special_tokens", None)
        if kwargs.get("return_tensors", "auto") == "auto":
            # Lists, as the tokenizer's apply_chat_template gives them (TRL reads token ids one by one);
            # return_tensors="pt" gives tensors, pixel_values are always one.
            processor_kwargs.setdefault("return_tensors", None)

        rendered, batch_images = [], []
        for c, messages in enumerate(conversations):
            where = f"conversation {c}, " if is_batched else ""
            messages, images = self._tagged_messages(messages, where, tokenize, num_frames)
            rendered.append(messages)
            batch_images.append(images)
        if any(batch_images):
            if processor_kwargs.get("images") is not None:
                raise ValueError("images are given both as typed content parts and in processor_kwargs['images']")
            if tokenize:
                processor_kwargs["images"] = batch_images if is_batched else batch_images[0]
        if return_assistant_tokens_mask and not GENERATION_MARKER.search(self._resolve_chat_template(chat_template)):
            raise ValueError(
                "return_assistant_tokens_mask=True needs a chat template with {% generation %} markers around the "
                "assistant turns, and Phi-3.5-vision's has none: pass "
                "chat_template=phi3v.processing_phi3_v.ASSISTANT_MASK_CHAT_TEMPLATE (it renders the same text) or "
                "set processor.chat_template to it"
            )
        return super().apply_chat_template(
            rendered if is_batched else rendered[0],
            chat_template=chat_template,
            tokenize=tokenize,
            return_assistant_tokens_mask=return_assistant_tokens_mask,
            processor_kwargs=processor_kwargs,
            **kwargs,
        )

    @staticmethod
    def _tagged_messages(messages: list[dict], where: str, load: bool, num_frames: int) -> tuple[list[dict], list]:
        """Messages with string content (typed parts joined, `<|image_N|>\\n` for each image or frame)
        and the conversation's images in order (opened only when `load`)."""
        out, images, hand_tagged = [], [], False
        for m, message in enumerate(messages):
            content = message.get("content")
            if not isinstance(content, (list, tuple)):
                hand_tagged = hand_tagged or (isinstance(content, str) and bool(IMAGE_TAG.search(content)))
                out.append(message)
                continue
            text = []
            for j, part in enumerate(content):
                at = f"{where}message {m} ({message.get('role')}), part {j}"
                kind = part.get("type") if isinstance(part, dict) else None
                try:
                    if kind == "text":
                        if not isinstance(part.get("text"), str):
                            raise ValueError("a text part needs a string 'text'")
                        if IMAGE_TAG.search(part["text"]):
                            raise ValueError(
                                "the text holds an <|image_N|> tag: give each image as an image part "
                                "(the tags are written and numbered for you), or write the whole content as a string"
                            )
                        text.append(part["text"])
                        continue
                    if kind == "image":
                        new = [load_image_part(part) if load else None]
                    elif kind == "video":
                        if load:
                            new = video_part_frames(part, num_frames)
                        else:
                            new = [None] * video_part_length(part, num_frames)
                    else:
                        raise ValueError(f"unknown part {part!r:.80}: the types are 'text', 'image' and 'video'")
                except ValueError as err:
                    raise ValueError(f"{at}: {err}") from None
                text += [f"<|image_{len(images) + k + 1}|>\n" for k in range(len(new))]
                images += new
            out.append({**message, "content": "".join(text)})
        if hand_tagged and images:
            raise ValueError(
                f"{where}the conversation has <|image_N|> tags written in string content and typed image parts: "
                "use one or the other (the typed parts are numbered from <|image_1|>)"
            )
        return out, images

    @staticmethod
    def _images_per_prompt(prompts, images, batched):
        if images is None:
            return [[] for _ in prompts]
        if isinstance(images, Image.Image):
            images = [images]
        images = list(images)
        if not batched:
            if len(images) == 1 and isinstance(images[0], (list, tuple)):
                return [list(images[0])]  # one prompt's list, nested as ProcessorMixin.apply_chat_template passes it
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

    def _prompt_ids(
        self,
        prompt: str,
        images: list,
        num_crops: int | None,
        row: int | None,
        add_special_tokens: bool = True,
        with_offsets: bool = False,
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of one prompt and, `with_offsets`, each token's character span in it."""
        where = f"prompt {row}" if row is not None else "prompt"
        tags = [int(t) for t in IMAGE_TAG.findall(prompt)]
        if tags:
            distinct = sorted(set(tags))
            if distinct != list(range(1, len(distinct) + 1)):
                raise ValueError(f"{where}: image tags must be numbered 1..n without gaps, got {tags}")
            if len(tags) != len(distinct):
                raise ValueError(f"{where}: each image tag may appear once, got {tags}")
            if len(distinct) != len(images):
                raise ValueError(f"{where} has {len(distinct)} image tags but {len(images)} images")
        elif images:
            raise ValueError(f"{where} has {len(images)} images but no <|image_k|> tag")
        crops = num_crops or self.image_processor.num_crops
        counts = [self.image_processor.num_image_tokens(im.width, im.height, crops) for im in images]
        ids, offsets = [], []
        start = 0
        matches = [*IMAGE_TAG.finditer(prompt), None]
        for k, match in enumerate(matches):
            chunk = prompt[start : match.start() if match else len(prompt)]
            # Every chunk keeps its own <s>, as in the official processor.
            encoded = self.tokenizer(
                chunk, add_special_tokens=add_special_tokens or k > 0, return_offsets_mapping=with_offsets
            )
            ids += encoded.input_ids
            if with_offsets:
                offsets += [(a + start, b + start) if b > a else (0, 0) for a, b in encoded.offset_mapping]
            if match:
                count = counts[int(match.group(1)) - 1]
                ids += [-int(match.group(1))] * count
                offsets += [(0, 0)] * count if with_offsets else []
                start = match.end()
        return ids, offsets

    def _pad(self, sequences: list[list[int]], padding, max_length, padding_side=None, pad_to_multiple_of=None) -> dict:
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
        if pad_to_multiple_of and padding not in (False, None, "do_not_pad"):
            target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
        pad_id = self.tokenizer.pad_token_id
        padding_side = padding_side or self.tokenizer.padding_side
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        left = padding_side == "left"
        input_ids, attention_mask = [], []
        for seq in sequences:
            fill = target - len(seq)
            input_ids.append([pad_id] * fill + seq if left else seq + [pad_id] * fill)
            mask = [1] * len(seq)
            attention_mask.append([0] * fill + mask if left else mask + [0] * fill)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    @staticmethod
    def _text_ids(sequences) -> list[list[int]]:
        """Rows of token ids without the image positions (negative ids, which the tokenizer cannot
        decode), so that a whole generated sequence, prompt included, decodes to its text."""
        if torch.is_tensor(sequences) or isinstance(sequences, np.ndarray):
            sequences = sequences.tolist()
        return [[i for i in row if i >= 0] for row in sequences]

    def batch_decode(self, sequences, *args, **kwargs):
        return self.tokenizer.batch_decode(self._text_ids(sequences), *args, **kwargs)

    def decode(self, token_ids, *args, **kwargs):
        if torch.is_tensor(token_ids) or isinstance(token_ids, np.ndarray):
            token_ids = token_ids.tolist()
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        return self.tokenizer.decode(self._text_ids([token_ids])[0], *args, **kwargs)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs):
        """Text of generated sequences that still hold the prompt (the image-text-to-text pipeline
        decodes those), image positions left out."""
        sequences = torch.as_tensor(generated_outputs)
        texts = self.batch_decode(sequences.reshape(-1, sequences.shape[-1]), skip_special_tokens=skip_special_tokens, **kwargs)
        return texts if sequences.dim() > 1 else texts[0]

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values", "image_sizes"]
