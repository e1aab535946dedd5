"""Opening images the same way in every recipe, and collecting bad rows before training starts.

The recipes validate their data up front (a "preflight"): every bad row is named with its reason in
one report, and the run stops before any model is loaded, or, with `--skip_invalid`, drops those
rows and lists them in the output folder. A bad sample must never surface hours later as a
traceback from inside a dataloader worker.

    from phi3v.validation import InvalidSample, Preflight, image_size, load_image

    preflight = Preflight("training data")
    for i, row in enumerate(rows):
        try:
            load_image(row["image"])
        except InvalidSample as err:
            preflight.add(f"train row {i}", str(err), key=i)
    drop = preflight.finish(output_dir, skip_invalid=args.skip_invalid)
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
from collections.abc import Hashable
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

# Anything smaller cannot be resized into a crop in a meaningful way (and 1-pixel sides break the
# bicubic resize's aspect-ratio arithmetic in the HD transform).
MIN_SIDE = 2
IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")
MAX_REPORTED = 100  # rows printed on the console; the file always lists all of them

# EXIF orientations 5-8 rotate by 90 or 270 degrees: width and height swap.
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112


class InvalidSample(ValueError):
    """A row that cannot be trained on; the message is the reason, for the preflight report."""


def _open(source) -> Image.Image:
    """Open lazily (header only) from a path, bytes, a file object, a PIL image or a datasets cell."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, dict):  # datasets' Image feature without decoding: {"bytes": ..., "path": ...}
        source = source.get("bytes") or source.get("path")
        if source is None:
            raise InvalidSample("image cell has neither bytes nor a path")
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise InvalidSample("image is empty (0 bytes)")
        source = io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        if not os.path.exists(source):
            raise InvalidSample(f"image file not found: {source}")
        if os.path.getsize(source) == 0:
            raise InvalidSample(f"image file is empty (0 bytes): {source}")
    try:
        return Image.open(source)
    except UnidentifiedImageError:
        raise InvalidSample("not an image PIL can read (unknown format or corrupt header)") from None
    except Image.DecompressionBombError as err:
        raise InvalidSample(f"image too large: {err}") from None
    except OSError as err:
        raise InvalidSample(f"cannot read image: {err}") from None


def _oriented_size(image: Image.Image) -> tuple[int, int]:
    width, height = image.size
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # a broken EXIF block is ignored, as exif_transpose ignores it
        orientation = None
    return (height, width) if orientation in _TRANSPOSING_ORIENTATIONS else (width, height)


def _check_size(width: int, height: int):
    if width < MIN_SIDE or height < MIN_SIDE:
        raise InvalidSample(f"image is {width}x{height} pixels; at least {MIN_SIDE}x{MIN_SIDE} needed")


def image_size(source) -> tuple[int, int]:
    """(width, height) as the model will see the image (EXIF orientation applied), from the header only.

    Cheap enough to run over a whole dataset: with `phi3v.num_image_tokens` it gives each sample's
    length without decoding any pixels. Raises InvalidSample for a missing file or a non-image.
    """
    image = _open(source)
    width, height = _oriented_size(image)
    _check_size(width, height)
    return width, height


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB the way every recipe sees it: transparency on white, 16-bit scaled down, CMYK converted."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16/32-bit grayscale: convert("RGB") would clip everything above 255 to white. Scale the
        # actual range (16-bit PNGs use 0..65535; some scanners write less) down to 8 bits.
        image = image.convert("F") if image.mode != "F" else image
        low, high = image.getextrema()
        scale = 255.0 / (high - low) if high > low else 0.0
        image = image.point(lambda v: (v - low) * scale).convert("L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGBX, composited RGBA


def load_image(source) -> Image.Image:
    """Open and fully decode an image as RGB, the same way in every script and in the preflight.

    `source`: a path, bytes, a file object, a PIL image or a datasets Image cell ({"bytes", "path"}).
    Applies the EXIF orientation (phone photos), composites transparency on white (RGBA, LA,
    palette with a transparent colour), scales 16-bit grayscale to 8 bits, converts CMYK and the
    other modes to RGB. Raises InvalidSample with the reason for a missing file, a non-image,
    truncated or corrupt data (only a full decode finds those) or an image too small or too large.
    """
    image = _open(source)
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        image = _to_rgb(image)
    except InvalidSample:
        raise
    except Image.DecompressionBombError as err:
        raise InvalidSample(f"image too large: {err}") from None
    except (OSError, SyntaxError, ValueError) as err:  # PIL reports truncation and bad data as these
        raise InvalidSample(f"corrupt or truncated image: {err}") from None
    _check_size(*image.size)
    return image


def image_tag_problem(text: str, num_images: int) -> str | None:
    """Why the `<|image_N|>` tags of a prompt do not match its images, or None if they do.

    The processor needs each of `<|image_1|>` .. `<|image_{num_images}|>` exactly once.
    """
    tags = [int(n) for n in IMAGE_TAG.findall(text or "")]
    expected = list(range(1, num_images + 1))
    if sorted(tags) == expected:
        return None
    if not tags:
        return f"the text has no <|image_N|> tag but {num_images} image(s) are listed"
    shown = ", ".join(f"<|image_{n}|>" for n in tags)
    if num_images == 0:
        return f"the text has image tags ({shown}) but no images are listed"
    return f"the text's image tags ({shown}) do not match the {num_images} image(s) listed (need <|image_1|>..<|image_{num_images}|> once each)"


class Preflight:
    """Collects every problem found in a dataset, then stops the run with one report or drops the rows."""

    def __init__(self, description: str = "data"):
        self.description = description
        self.problems: list[dict] = []
        self._keys: set[Hashable] = set()

    def add(self, where: str, reason: str, key: Hashable = None):
        """Record one bad row: `where` names it for a person (file and line, split and row id)."""
        self.problems.append({"where": where, "reason": reason})
        if key is not None:
            self._keys.add(key)

    def __len__(self) -> int:
        return len(self.problems)

    def report(self) -> str:
        lines = [f"{len(self.problems)} invalid row(s) in {self.description}:"]
        lines += [f"  {p['where']}: {p['reason']}" for p in self.problems[:MAX_REPORTED]]
        if len(self.problems) > MAX_REPORTED:
            lines.append(f"  ... and {len(self.problems) - MAX_REPORTED} more")
        return "\n".join(lines)

    def _write(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            for problem in self.problems:
                f.write(json.dumps(problem) + "\n")

    def finish(self, output_dir, skip_invalid: bool, is_main: bool = True) -> set:
        """Stop with a report (exit status 1), or with `skip_invalid` return the keys of rows to drop.

        Every process of a distributed run must call it with the same problems, so that all of
        them stop (or go on) together. Only `is_main` prints and writes files.
        """
        if not self.problems:
            return set()
        output_dir = Path(output_dir)
        if not skip_invalid:
            listing = output_dir / "invalid_rows.jsonl"
            if is_main:
                self._write(listing)
                print(
                    f"{self.report()}\nNothing was trained. Fix these rows, or pass --skip_invalid to "
                    f"train without them (all of them are listed in {listing}).",
                    file=sys.stderr,
                    flush=True,
                )
            raise SystemExit(1)
        listing = output_dir / "skipped_rows.jsonl"
        if is_main:
            self._write(listing)
            print(f"{self.report()}\n--skip_invalid: training without them (listed in {listing}).", flush=True)
        return set(self._keys)
