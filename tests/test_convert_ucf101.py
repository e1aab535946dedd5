"""convert_ucf101.py on tiny real videos: layout, frame choice, jsonl format, archives, errors."""

from __future__ import annotations

import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

import convert_ucf101

WIDTH, HEIGHT = 64, 48
CLASSES = ["Archery", "BabyCrawling"]
PROMPT = "Classify the video into one of the following classes: Archery, BabyCrawling."

# (split, class, file name, codec, frames). The names sort in this order within each class folder.
# .mkv and .webm store no frame count (the converter decodes to count); 5 frames < 8 repeats frames.
VIDEOS = [
    ("train", "Archery", "v_Archery_g01_c01.avi", "mpeg4", 24),
    ("train", "Archery", "v_Archery_g02_c01.mp4", "libx264", 20),
    ("train", "BabyCrawling", "v_BabyCrawling_g01_c01.mkv", "mpeg4", 16),
    ("train", "BabyCrawling", "v_BabyCrawling_g02_c01.avi", "mpeg4", 5),
    ("val", "Archery", "v_Archery_g03_c01.mp4", "mpeg4", 16),
    ("val", "BabyCrawling", "v_BabyCrawling_g03_c01.webm", "libvpx-vp9", 18),
]
# np.arange(0, total, total / 8).astype(int), written out by hand.
EXPECTED_INDICES = {
    24: [0, 3, 6, 9, 12, 15, 18, 21],
    20: [0, 2, 5, 7, 10, 12, 15, 17],
    16: [0, 2, 4, 6, 8, 10, 12, 14],
    18: [0, 2, 4, 6, 9, 11, 13, 15],
    5: [0, 0, 1, 1, 2, 3, 3, 4],
}


def brightness(i: int) -> int:
    """Grey level of frame i: frames are told apart by their brightness after decoding."""
    return 5 + 10 * i


def write_video(path: Path, codec: str, num_frames: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=24)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for i in range(num_frames):
            # A flat grey frame whose level encodes its index.
            pixels = np.full((HEIGHT, WIDTH, 3), brightness(i), np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


@pytest.fixture(scope="module")
def video_root(tmp_path_factory) -> Path:
    """<split>/<Class>/<video> folder (no top folder), with a stray text file to ignore."""
    root = tmp_path_factory.mktemp("videos") / "subset"
    for split, label, name, codec, frames in VIDEOS:
        write_video(root / split / label / name, codec, frames)
    (root / "train" / "Archery" / "notes.txt").write_text("not a video\n")
    return root


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_output(out_dir: Path) -> None:
    """Everything the trainer relies on, exactly as the original converter writes it."""
    assert sorted(p.name for p in out_dir.iterdir()) == ["images", "ucf101_train.jsonl", "ucf101_val.jsonl"]
    records = read_jsonl(out_dir / "ucf101_train.jsonl") + read_jsonl(out_dir / "ucf101_val.jsonl")
    assert len(records) == len(VIDEOS)
    all_jpgs = sorted(str(p.relative_to(out_dir / "images")) for p in (out_dir / "images").rglob("*"))
    all_jpgs = [p for p in all_jpgs if p.endswith(".jpg")]
    assert len(all_jpgs) == 8 * len(VIDEOS)
    for i, (record, (split, label, name, _, total)) in enumerate(zip(records, VIDEOS)):
        stem = Path(name).stem
        assert list(record) == ["id", "source", "conversations"]
        assert record["id"] == f"{split}-{i:010d}"  # one index over train then val
        assert record["source"] == "ucf101"
        assert len(record["conversations"]) == 1
        turn = record["conversations"][0]
        assert list(turn) == ["images", "user", "assistant"]
        assert turn["user"] == PROMPT
        assert turn["assistant"] == label
        assert turn["images"] == [f"{split}/{label}/{stem}.{k}.jpg" for k in range(8)]
        for rel, frame_index in zip(turn["images"], EXPECTED_INDICES[total]):
            image = Image.open(out_dir / "images" / rel)
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (WIDTH, HEIGHT)
            mean = np.asarray(image, dtype=np.float64).mean()
            # Codecs and JPEG move the grey level by a few units; neighbours are 10 apart.
            decoded_index = int(np.argmin([abs(mean - brightness(j)) for j in range(total)]))
            assert decoded_index == frame_index, (rel, mean, frame_index)


def test_frame_indices():
    for total, expected in EXPECTED_INDICES.items():
        assert convert_ucf101.frame_indices(total, 8) == expected
    assert convert_ucf101.frame_indices(300, 8) == [0, 37, 75, 112, 150, 187, 225, 262]
    assert convert_ucf101.frame_indices(10, 4) == [0, 2, 5, 7]


def test_convert_folder(video_root, tmp_path, run_script):
    out_dir = tmp_path / "ucf101"
    proc = run_script("convert_ucf101.py", "--src", video_root, "--out_dir", out_dir)
    check_output(out_dir)
    assert "2 classes: Archery, BabyCrawling" in proc.stdout
    assert "videos:" in proc.stdout and "100%" in proc.stdout  # tqdm bar
    # The jsonl text itself: one compact json object per line.
    first = (out_dir / "ucf101_val.jsonl").read_text().splitlines()[0]
    assert first.startswith('{"id": "val-0000000004", "source": "ucf101", "conversations": [{"images": ["val/Archery/')


@pytest.mark.parametrize("kind", ["tar.gz with top folder", "zip without top folder"])
def test_convert_archive(kind, video_root, tmp_path, run_script):
    if kind.startswith("tar.gz"):
        archive = tmp_path / "UCF101_subset.tar.gz"
        with tarfile.open(archive, "w:gz") as tf:
            tf.add(video_root, arcname="UCF101_subset")
    else:
        archive = tmp_path / "videos.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            for path in sorted(video_root.rglob("*")):
                zf.write(path, path.relative_to(video_root).as_posix())
    out_dir = tmp_path / "out"
    run_script("convert_ucf101.py", "--src", archive, "--out_dir", out_dir, "--no-tqdm")
    check_output(out_dir)


def test_hub_download_default(video_root, tmp_path, monkeypatch):
    """Without --src the archive comes from the hub; the temporary folder is removed afterwards."""
    import huggingface_hub

    archive = tmp_path / "hub" / "UCF101_subset.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(video_root, arcname="UCF101_subset")
    calls, temp_dirs = [], []

    def fake_download(**kwargs):
        calls.append(kwargs)
        return str(archive)

    real_mkdtemp = convert_ucf101.tempfile.mkdtemp

    def recording_mkdtemp(*args, **kwargs):
        temp_dirs.append(real_mkdtemp(*args, **kwargs))
        return temp_dirs[-1]

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(convert_ucf101.tempfile, "mkdtemp", recording_mkdtemp)
    out_dir = tmp_path / "ucf101"
    convert_ucf101.main(["--out_dir", str(out_dir), "--no-tqdm"])
    assert calls == [{"repo_id": "sayakpaul/ucf101-subset", "filename": "UCF101_subset.tar.gz", "repo_type": "dataset"}]
    assert len(temp_dirs) == 1 and not Path(temp_dirs[0]).exists()
    check_output(out_dir)


def test_corrupt_video(video_root, tmp_path, run_script):
    root = tmp_path / "videos"
    shutil.copytree(video_root, root)
    broken = root / "train" / "BabyCrawling" / "v_BabyCrawling_g00_c01.avi"
    broken.write_bytes(b"RIFF\x00\x00\x00\x00AVI garbage" + bytes(range(256)) * 8)

    out_dir = tmp_path / "out"
    proc = run_script("convert_ucf101.py", "--src", root, "--out_dir", out_dir, check=False)
    assert proc.returncode != 0
    assert f"cannot read video {broken}" in proc.stdout
    assert "--skip_invalid" in proc.stdout
    assert not out_dir.exists()  # nothing half-written

    proc = run_script("convert_ucf101.py", "--src", root, "--out_dir", out_dir, "--skip_invalid")
    assert "skipped 1 unreadable video(s)" in proc.stdout and str(broken) in proc.stdout
    check_output(out_dir)  # the other videos keep consecutive ids


def test_out_dir_not_empty(video_root, tmp_path, run_script):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "ucf101_test.jsonl").write_text("stale\n")
    (out_dir / "images" / "old").mkdir(parents=True)
    proc = run_script("convert_ucf101.py", "--src", video_root, "--out_dir", out_dir, check=False)
    assert proc.returncode != 0 and "is not empty; pass --overwrite" in proc.stdout
    assert (out_dir / "ucf101_test.jsonl").read_text() == "stale\n"

    run_script("convert_ucf101.py", "--src", video_root, "--out_dir", out_dir, "--overwrite", "--no-tqdm")
    check_output(out_dir)  # the stale test split and images are gone


def test_missing_train_split(tmp_path, run_script):
    write_video(tmp_path / "videos" / "val" / "Archery" / "a.avi", "mpeg4", 8)
    proc = run_script("convert_ucf101.py", "--src", tmp_path / "videos", "--out_dir", tmp_path / "out", check=False)
    assert proc.returncode != 0 and "no train/ folder" in proc.stdout
