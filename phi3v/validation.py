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
import math
import os
import re
import sys
from collections import Counter
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
        self.measured: dict[str, list[tuple[Hashable, int | None, int | None]]] = {}  # split -> rows

    def measure(self, split: str, key: Hashable, images: int | None, tokens: int | None):
        """Record one row the run reads, valid or not, for the `--preflight_only` summary.

        `key` is the one `add` gets for that row's problems; `images` and `tokens` (the training
        sequence, image tokens included) are None where the row is too broken to tell.
        """
        self.measured.setdefault(split, []).append((key, images, tokens))

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

    def summary(self, max_length: int, num_crops: int) -> dict:
        """Rows, images per row and token lengths per split (of the rows given to `measure`).

        Percentiles are nearest-rank: every figure is the length of a real row.
        """
        splits = {}
        for split, rows in self.measured.items():
            images = Counter(n for _, n, _ in rows if n is not None)
            tokens = sorted(t for _, _, t in rows if t is not None)
            invalid = sum(key in self._keys for key, _, _ in rows)
            splits[split] = {
                "rows": len(rows),
                "valid_rows": len(rows) - invalid,
                "invalid_rows": invalid,
                "images": sum(n * count for n, count in images.items()),
                "images_per_row": {str(n): images[n] for n in sorted(images)},
                "rows_without_length": len(rows) - len(tokens),  # too broken to count (e.g. an image missing)
                "tokens": {"min": tokens[0], "median": _nearest_rank(tokens, 0.5), "p95": _nearest_rank(tokens, 0.95),
                           "max": tokens[-1], "total": sum(tokens)} if tokens else None,  # fmt: skip
                "rows_over_max_length": sum(t > max_length for t in tokens) if max_length else 0,  # 0/None: no limit
            }
        return {"clean": not self.problems, "num_crops": num_crops, "max_length": max_length,
                "invalid_rows": len({p["where"] for p in self.problems}), "splits": splits}  # fmt: skip

    def exit_with_summary(self, output_dir, max_length: int, num_crops: int, is_main: bool = True):
        """`--preflight_only`: print the summary and write it to output_dir/preflight_summary.json, list the
        invalid rows (if any) in output_dir/invalid_rows.jsonl, and exit: status 0 if the data is clean, else 1.
        Nothing else is written."""
        summary = self.summary(max_length, num_crops)
        output_dir = Path(output_dir)
        if is_main:
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / "preflight_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            if self.problems:
                self._write(output_dir / "invalid_rows.jsonl")
                print(self.report(), file=sys.stderr, flush=True)
            print(format_summary(summary), flush=True)
            verdict = (f"{summary['invalid_rows']} invalid row(s), listed in {output_dir / 'invalid_rows.jsonl'}"
                       if self.problems else "the data is clean")  # fmt: skip
            print(f"preflight only: {verdict}; summary in {output_dir / 'preflight_summary.json'}", flush=True)
        raise SystemExit(0 if summary["clean"] else 1)

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


def _nearest_rank(sorted_values: list[int], q: float) -> int:
    return sorted_values[max(math.ceil(q * len(sorted_values)) - 1, 0)]


def format_summary(summary: dict) -> str:
    """The `Preflight.summary` a person reads: one block per split."""
    lines = [f"preflight summary (--num_crops {summary['num_crops']}, --max_length {summary['max_length']}):"]
    for split, s in summary["splits"].items():
        lines.append(f"  {split}: {s['rows']:,} rows, {s['valid_rows']:,} valid, {s['invalid_rows']:,} invalid")
        per_row = ", ".join(f"{n} ({count:,} rows)" for n, count in s["images_per_row"].items())
        if per_row:
            lines.append(f"    images per row: {per_row}; {s['images']:,} images in all")
        t = s["tokens"]
        if t:
            lines.append(f"    tokens per row: min {t['min']:,}, median {t['median']:,}, p95 {t['p95']:,}, "
                         f"max {t['max']:,}; {t['total']:,} in all")  # fmt: skip
        lines.append(f"    rows over --max_length: {s['rows_over_max_length']:,}")
        if s["rows_without_length"]:
            lines.append(f"    rows too broken to count their tokens: {s['rows_without_length']:,}")
    return "\n".join(lines)
