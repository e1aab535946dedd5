"""phi3v.validation: image loading, tag checks, the preflight report (checkpoints: test_crash_resume.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from phi3v.validation import InvalidSample, Preflight, image_size, image_tag_problem, load_image
from preflight_helpers import encode


def half_red_half_blue(width=40, height=20) -> Image.Image:
    array = np.zeros((height, width, 3), np.uint8)
    array[:, : width // 2] = (255, 0, 0)
    array[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(array)


def test_unusual_modes_become_the_rgb_a_person_sees():
    # CMYK: a pure-red image stays (nearly) pure red.
    cmyk = half_red_half_blue().convert("CMYK")
    out = np.asarray(load_image(encode(cmyk, "JPEG", quality=95)))
    assert out.shape == (20, 40, 3) and out[5, 5, 0] > 200 and out[5, 5, 2] < 60

    # RGBA: fully transparent pixels are white (not the black or garbage stored under them).
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[:, :5] = (0, 0, 0, 0)  # transparent black
    rgba[:, 5:] = (0, 128, 0, 255)  # opaque green
    out = np.asarray(load_image(encode(Image.fromarray(rgba), "PNG")))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 9].tolist() == [0, 128, 0]

    # Palette with a transparent index: that index is white.
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (4, 0, 8, 8))
    out = np.asarray(load_image(encode(palette, "PNG", transparency=0)))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 7].tolist() == [255, 0, 0]

    # 16-bit grayscale: a ramp over 0..65535 keeps its gradation instead of clipping to white.
    ramp = (np.linspace(0, 65535, 64, dtype=np.float64)[None].repeat(4, 0)).astype(np.uint16)
    out = np.asarray(load_image(encode(Image.fromarray(ramp), "PNG")))
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, -1].tolist() == [255, 255, 255]
    assert 100 < out[0, 32, 0] < 155  # the middle of the ramp is mid-grey
    assert (np.diff(out[0, :, 0].astype(int)) >= 0).all()

    # Grayscale and 1-bit.
    assert load_image(encode(Image.new("L", (5, 5), 7), "PNG")).getpixel((0, 0)) == (7, 7, 7)
    assert load_image(encode(Image.new("1", (5, 5), 1), "PNG")).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied_and_image_size_agrees():
    photo = half_red_half_blue(40, 20)  # red left, blue right, stored landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    data = encode(photo, "JPEG", exif=exif.tobytes(), quality=95)
    shown = load_image(data)
    assert shown.size == (20, 40) == image_size(data)
    top, bottom = np.asarray(shown)[2, 10], np.asarray(shown)[-3, 10]
    assert top[0] > 200 and bottom[2] > 200  # the red half is now on top
    plain = encode(photo, "JPEG")
    assert image_size(plain) == load_image(plain).size == (40, 20)


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda tmp: encode(half_red_half_blue(300, 300), "JPEG")[:2000], "corrupt or truncated"),
        (lambda tmp: encode(half_red_half_blue(300, 300), "PNG")[:-400], "corrupt or truncated"),
        (lambda tmp: b"this is not an image", "not an image"),
        (lambda tmp: b"", "empty"),
        (lambda tmp: str(tmp / "missing.png"), "not found"),
        (lambda tmp: encode(Image.new("RGB", (1, 5)), "PNG"), "1x5 pixels"),
        (lambda tmp: {"bytes": None, "path": None}, "neither bytes nor a path"),
    ],
    ids=["truncated-jpeg", "truncated-png", "not-an-image", "empty", "missing-file", "too-small", "empty-cell"],
)
def test_bad_images_raise_invalid_sample_with_the_reason(tmp_path, make, reason):
    with pytest.raises(InvalidSample, match=reason):
        load_image(make(tmp_path))


def test_image_size_reads_the_header_only(tmp_path):
    data = encode(half_red_half_blue(300, 200), "JPEG")
    truncated = data[:1000]  # header intact, pixels cut
    assert image_size(truncated) == (300, 200)
    with pytest.raises(InvalidSample):
        load_image(truncated)
    path = tmp_path / "page.png"
    path.write_bytes(encode(Image.new("RGB", (17, 9)), "PNG"))
    assert image_size(str(path)) == image_size({"bytes": None, "path": str(path)}) == (17, 9)


def test_image_tag_problem():
    assert image_tag_problem("<|image_1|>\nWhat is it?", 1) is None
    assert image_tag_problem("<|image_2|> vs <|image_1|>", 2) is None
    assert image_tag_problem("plain text", 0) is None
    assert "no <|image_N|> tag" in image_tag_problem("What is it?", 1)
    assert "no images are listed" in image_tag_problem("<|image_1|> hi", 0)
    assert "do not match the 2 image(s)" in image_tag_problem("<|image_1|> <|image_1|>", 2)
    assert "do not match the 1 image(s)" in image_tag_problem("<|image_2|>", 1)


def test_preflight_stops_with_every_problem_or_skips_them(tmp_path, capsys):
    preflight = Preflight("the training set")
    assert preflight.finish(tmp_path / "clean", skip_invalid=False) == set()
    for i in range(105):
        preflight.add(f"train row {i}", f"reason {i}", key=("train", i))
    with pytest.raises(SystemExit) as stop:
        preflight.finish(tmp_path / "out", skip_invalid=False)
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert "105 invalid row(s) in the training set" in err and "train row 99: reason 99" in err
    assert "... and 5 more" in err and "--skip_invalid" in err
    listed = [json.loads(line) for line in (tmp_path / "out" / "invalid_rows.jsonl").read_text().splitlines()]
    assert len(listed) == 105 and listed[104] == {"where": "train row 104", "reason": "reason 104"}

    keys = preflight.finish(tmp_path / "skip", skip_invalid=True)
    assert keys == {("train", i) for i in range(105)}
    assert len((tmp_path / "skip" / "skipped_rows.jsonl").read_text().splitlines()) == 105
    assert not (tmp_path / "quiet").exists()
    preflight.finish(tmp_path / "quiet", skip_invalid=True, is_main=False)
    assert not (tmp_path / "quiet").exists()  # only the main process writes

