"""Helpers the preflight tests of all four recipes share: encoded images and argparse errors.

`unusual_images()` is the one set of unusual but valid images (modes and shapes a plain
`.convert("RGB")` or a resize gets wrong); each test file stores them in its own data format.
"""

from __future__ import annotations

import io
from typing import NamedTuple

import numpy as np
import pytest
from PIL import Image, ImageDraw


def encode(image: Image.Image, fmt: str = "PNG", **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


class UnusualImage(NamedTuple):
    data: bytes  # the encoded file
    mode: str  # the mode PIL opens it in
    size: tuple[int, int]  # (width, height) as a person sees it: after the EXIF rotation


def unusual_images() -> dict[str, UnusualImage]:
    """Valid images in modes and shapes that need converting, keyed by a file name with its format's
    extension. Each shows the word "cat" in black on white, so a document recipe can read it too."""
    base = Image.new("RGB", (90, 40), "white")
    ImageDraw.Draw(base).text((10, 14), "cat", fill="black")
    base.paste((200, 30, 30), (60, 0, 90, 10))  # a colour, so the colour conversions are checked
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    sixteen = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    gray_alpha = base.convert("LA")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display: stored 90x40, seen 40x90
    return {
        "cmyk.jpg": UnusualImage(encode(base.convert("CMYK"), "JPEG"), "CMYK", (90, 40)),
        "palette_transparent.png": UnusualImage(encode(palette, transparency=0), "P", (90, 40)),
        "gray16.png": UnusualImage(encode(sixteen), "I;16", (90, 40)),
        "rgba.png": UnusualImage(encode(rgba), "RGBA", (90, 40)),
        "exif_rotated.jpg": UnusualImage(encode(base, "JPEG", exif=exif.tobytes()), "RGB", (40, 90)),
        "tiny_3x3.png": UnusualImage(encode(base.resize((3, 3))), "RGB", (3, 3)),
        "very_wide.png": UnusualImage(encode(base.resize((1500, 12))), "RGB", (1500, 12)),
        "gray_alpha.png": UnusualImage(encode(gray_alpha), "LA", (90, 40)),
    }


def parse_error(script, capsys, argv) -> str:
    """What `script.parse_args(argv)` prints when it refuses the arguments with argparse's usage error."""
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args([str(a) for a in argv])
    assert exit_info.value.code == 2  # argparse's usage error, not a crash
    return capsys.readouterr().err


def truncated_jpeg() -> bytes:
    """The first half of a noisy JPEG: PIL reads its header but cannot decode it."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "JPEG", quality=90)
    return data[: len(data) // 2]


def fake_environment(monkeypatch, script, fake: dict):
    """Pretend, for `script.parse_args`, a world size, a CUDA GPU or not and optional packages installed or not:
    fake = {"WORLD_SIZE": "2", "cuda": bool, "flash_attn": bool, "bitsandbytes": bool}; a package left out
    stays as it really is, WORLD_SIZE left out means a single process."""
    if "WORLD_SIZE" in fake:
        monkeypatch.setenv("WORLD_SIZE", fake["WORLD_SIZE"])
    else:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    if "cuda" in fake:
        monkeypatch.setattr(script.torch.cuda, "is_available", lambda: fake["cuda"])
    missing = {name for name in ("flash_attn", "bitsandbytes") if fake.get(name) is False}
    present = {name for name in ("flash_attn", "bitsandbytes") if fake.get(name) is True}
    find_spec = script.importlib.util.find_spec
    monkeypatch.setattr(script.importlib.util, "find_spec",
                        lambda name, *a: None if name in missing else object() if name in present else find_spec(name, *a))
    if "flash_attn" in fake and hasattr(script, "is_flash_attn_2_available"):  # scripts that ask transformers
        monkeypatch.setattr(script, "is_flash_attn_2_available", lambda: fake["flash_attn"])


def refuse_model_weights(monkeypatch):
    """Make any loading of model weights (PreTrainedModel.from_pretrained) fail the test: for --preflight_only."""
    from transformers import PreTrainedModel

    def refuse(cls, *args, **kwargs):
        raise AssertionError(f"model weights loaded ({cls.__name__}.from_pretrained)")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))
