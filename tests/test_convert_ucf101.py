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
from phi3v.video import frame_indices

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


def check_output(out_dir: Path, extra_files=()) -> None:
    """Everything the trainer relies on, exactly as the original converter writes it."""
    expected = ["images", "ucf101_train.jsonl", "ucf101_val.jsonl", *extra_files]
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(expected)
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
        assert frame_indices(total, 8) == expected
    assert frame_indices(300, 8) == [0, 37, 75, 112, 150, 187, 225, 262]
    assert frame_indices(10, 4) == [0, 2, 5, 7]


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
def test_convert_archive(kind, video_root, tmp_path, run_main):
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
    run_main("convert_ucf101.py", "--src", archive, "--out_dir", out_dir, "--no-tqdm")
    check_output(out_dir)


def test_hub_download_default(video_root, tmp_path, monkeypatch):
    """Without --src the archive comes from the hub; the temporary folders are removed afterwards."""
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
    # The extraction folder and the staging folder next to out_dir.
    assert len(temp_dirs) == 2 and not any(Path(d).exists() for d in temp_dirs)
    check_output(out_dir)


def write_audio_only(path: Path) -> None:
    """A valid .mp4 with an AAC track and no video stream."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for i in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def truncated_copy(source: Path, path: Path) -> None:
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a download cut short: the mp4 index (moov) is lost


# (kind, file name, how to make it, the reason the report must give). --min_frames 4 for all.
BAD_VIDEOS = [
    ("corrupt header", "v_BabyCrawling_g00_c01.avi",
     lambda path, root: path.write_bytes(b"RIFF\x00\x00\x00\x00AVI garbage" + bytes(range(256)) * 8),
     "no video stream"),
    ("truncated", "v_BabyCrawling_g05_c01.mp4",
     lambda path, root: truncated_copy(root / "train" / "Archery" / "v_Archery_g02_c01.mp4", path),
     "cannot decode: InvalidDataError"),
    ("not a video", "v_BabyCrawling_g06_c01.mp4", lambda path, root: path.write_text("a text file\n"),
     "cannot decode: InvalidDataError"),
    ("empty file", "v_BabyCrawling_g07_c01.mkv", lambda path, root: path.write_bytes(b""), "empty file (0 bytes)"),
    ("no video stream", "v_BabyCrawling_g08_c01.mp4", lambda path, root: write_audio_only(path), "no video stream"),
    ("too short", "v_BabyCrawling_g09_c01.avi", lambda path, root: write_video(path, "mpeg4", 3),
     "too short: 3 frame(s), --min_frames is 4"),
]  # fmt: skip


def with_bad_videos(video_root: Path, root: Path, cases) -> list[Path]:
    shutil.copytree(video_root, root)
    paths = []
    for _, name, make, _ in cases:
        path = root / "train" / "BabyCrawling" / name
        make(path, root)
        paths.append(path)
    return paths


@pytest.mark.parametrize("case", BAD_VIDEOS, ids=[case[0] for case in BAD_VIDEOS])
def test_invalid_video(case, video_root, tmp_path, run_main):
    """Each kind of unusable video: its path and reason, exit status 1, nothing written, no traceback."""
    (bad,) = with_bad_videos(video_root, tmp_path / "videos", [case])
    out_dir = tmp_path / "out"
    proc = run_main("convert_ucf101.py", "--src", tmp_path / "videos", "--out_dir", out_dir, "--min_frames", 4,
                      "--no-tqdm", check=False)  # fmt: skip
    assert proc.returncode == 1, proc.stdout
    assert f"error: 1 of {len(VIDEOS) + 1} videos cannot be used:\n  {bad}: {case[3]}" in proc.stdout
    assert "--skip_invalid" in proc.stdout and "Traceback" not in proc.stdout
    assert not out_dir.exists()
    assert not any(p.name.startswith(".out.partial") for p in tmp_path.iterdir())  # no staging left over


def test_invalid_videos_one_report_and_skip(video_root, tmp_path, run_main):
    """All bad videos in one report, an earlier conversion left intact; --skip_invalid converts the rest."""
    root = tmp_path / "videos"
    bad = with_bad_videos(video_root, root, BAD_VIDEOS)
    out_dir = tmp_path / "out"
    run_main("convert_ucf101.py", "--src", video_root, "--out_dir", out_dir, "--no-tqdm")
    before = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*"))

    proc = run_main("convert_ucf101.py", "--src", root, "--out_dir", out_dir, "--overwrite", "--min_frames", 4,
                      "--no-tqdm", check=False)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stdout
    assert f"error: {len(bad)} of {len(VIDEOS) + len(bad)} videos cannot be used:" in proc.stdout
    for path, (_, _, _, reason) in zip(bad, BAD_VIDEOS):
        assert f"  {path}: {reason}" in proc.stdout
    assert sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*")) == before  # untouched
    check_output(out_dir)

    proc = run_main("convert_ucf101.py", "--src", root, "--out_dir", out_dir, "--overwrite", "--min_frames", 4,
                      "--skip_invalid", "--no-tqdm")  # fmt: skip
    assert f"--skip_invalid: skipped {len(bad)} of {len(VIDEOS) + len(bad)} videos" in proc.stdout
    skipped = read_jsonl(out_dir / "skipped_videos.jsonl")
    assert sorted(s["path"] for s in skipped) == sorted(map(str, bad))
    assert {s["path"]: s["reason"] for s in skipped}[str(bad[-1])] == BAD_VIDEOS[-1][3]
    check_output(out_dir, extra_files=["skipped_videos.jsonl"])  # the good videos keep consecutive ids

    # A clean conversion over it removes the stale list of skipped videos.
    run_main("convert_ucf101.py", "--src", video_root, "--out_dir", out_dir, "--overwrite", "--no-tqdm")
    check_output(out_dir)


def test_min_frames_argument(capsys):
    with pytest.raises(SystemExit):
        convert_ucf101.parse_args(["--min_frames", "0"])
    assert "--min_frames must be >= 1, got 0" in capsys.readouterr().err


def test_out_dir_not_empty(video_root, tmp_path, run_main):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "ucf101_test.jsonl").write_text("stale\n")
    (out_dir / "images" / "old").mkdir(parents=True)
    proc = run_main("convert_ucf101.py", "--src", video_root, "--out_dir", out_dir, check=False)
    assert proc.returncode != 0 and "is not empty; pass --overwrite" in proc.stdout
    assert (out_dir / "ucf101_test.jsonl").read_text() == "stale\n"

    run_main("convert_ucf101.py", "--src", video_root, "--out_dir", out_dir, "--overwrite", "--no-tqdm")
    check_output(out_dir)  # the stale test split and images are gone


def test_missing_train_split(tmp_path, run_script):
    write_video(tmp_path / "videos" / "val" / "Archery" / "a.avi", "mpeg4", 8)
    proc = run_script("convert_ucf101.py", "--src", tmp_path / "videos", "--out_dir", tmp_path / "out", check=False)
    assert proc.returncode != 0 and "no train/ folder" in proc.stdout
