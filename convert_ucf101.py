"""Turn the UCF101 subset (or your own videos) into the multi-image layout the UCF101 recipe trains on.

Each video becomes 8 uniformly spaced frames (JPEG) and one jsonl line whose single conversation turn
asks for the action class:

    out_dir/images/{split}/{Class}/{video_stem}.{k}.jpg          k = 0..7
    out_dir/ucf101_{split}.jsonl                                 one line per video:
        {"id": "train-0000000000", "source": "ucf101",
         "conversations": [{"images": ["train/Archery/v_Archery_g01_c01.0.jpg", ...],
                            "user": "Classify the video into one of the following classes: ApplyEyeMakeup, ...",
                            "assistant": "Archery"}]}

Image paths are relative to `out_dir/images`. Ids count over all videos in the order train, val, test
(so the first val id follows the last train id), as in the original converter.

Usage:

    # download UCF101_subset.tar.gz (171 MB, 10 classes, 405 videos) from the hub dataset
    # sayakpaul/ucf101-subset and convert it to ./ucf101
    python convert_ucf101.py
    # the original's command line: --tmp_dir is the new folder the archive is extracted into (removed at the end)
    python convert_ucf101.py --tmp_dir /scratch/ucf101_tmp --out_dir ./ucf101

    # your own videos: an archive (.tar.gz/.tgz/.tar/.zip) or a folder laid out <split>/<Class>/<video>
    # (optionally under one top folder), any container PyAV reads (.avi .mp4 .mkv .webm .mov)
    python convert_ucf101.py --src my_videos/ --out_dir my_dataset --num_frames 8

    # then
    python finetune_hf_trainer_ucf101.py --data_dir ./ucf101 ...

Splits: `train` is required; `val` (the recipe evaluates on it) and `test` are converted when present.
Class labels are the sorted class folder names over all splits.

Every video is checked before anything is written to out_dir: one that PyAV cannot open or decode
(corrupt, truncated, not a video), an empty one (0 bytes, no video stream, no frames) or one shorter
than --min_frames is reported with its path and reason, all of them in one report, and the
conversion exits with status 1 leaving out_dir untouched. With --skip_invalid they are left out and
listed (on the console and in out_dir/skipped_videos.jsonl), and the others are converted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from tqdm import tqdm

# Frame sampling lives in phi3v, where the processor cuts video files into frames the same way.
from phi3v.video import InvalidVideo, sample_frames

SPLITS = ("train", "val", "test")
VIDEO_EXTENSIONS = (".avi", ".mp4", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
HUB_REPO_ID = "sayakpaul/ucf101-subset"
HUB_FILENAME = "UCF101_subset.tar.gz"
# Adapt: the question asked for every clip. The class list is appended to it.
PROMPT_PREFIX = "Classify the video into one of the following classes: "


SKIPPED_FILE = "skipped_videos.jsonl"  # with --skip_invalid: {"path", "reason"} per left-out video


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--src",
        default=None,
        help="local archive (.tar.gz/.tgz/.tar/.zip) or folder laid out <split>/<Class>/<video>; "
        f"default: download {HUB_FILENAME} from the hub dataset {HUB_REPO_ID}",
    )
    parser.add_argument("--out_dir", default="./ucf101", help="output folder (default ./ucf101)")
    parser.add_argument(
        "--tmp_dir",
        default=None,
        help="folder the archive (the hub download, or a --src archive) is extracted into, as in the original: "
        "created (it must not exist yet) and removed at the end; it needs room for the extracted videos. "
        "Default: a new folder in the system temporary directory (the original used the fixed /tmp/ucf101)",
    )
    parser.add_argument("--num_frames", type=int, default=8, help="frames sampled per video (default 8)")
    parser.add_argument(
        "--min_frames",
        type=int,
        default=1,
        help="videos with fewer decodable frames are invalid (default 1: only empty ones); shorter videos "
        "than --num_frames repeat frames, as the original",
    )
    parser.add_argument(
        "--skip_invalid",
        action="store_true",
        help="leave out the videos that cannot be used (unreadable, corrupt, empty, shorter than --min_frames) "
        f"and list them (on the console and in out_dir/{SKIPPED_FILE}); default: stop with one report of "
        "all of them before anything is written",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=f"allow a non-empty out_dir: its images/ folder, ucf101_*.jsonl and {SKIPPED_FILE} are replaced "
        "(only after the new conversion succeeded); other files there are kept",
    )
    parser.add_argument("--no-tqdm", dest="tqdm", action="store_false", help="no progress bar")
    args = parser.parse_args(argv)
    if args.num_frames < 1:
        parser.error(f"--num_frames must be >= 1, got {args.num_frames}")
    if args.min_frames < 1:
        parser.error(f"--min_frames must be >= 1, got {args.min_frames}")
    if args.src is not None and not Path(args.src).exists():
        parser.error(f"--src {args.src} does not exist")
    if args.tmp_dir is not None:
        if Path(args.tmp_dir).exists():
            parser.error(
                f"--tmp_dir {args.tmp_dir} already exists: the archive is extracted into a new folder that is "
                "removed at the end, so give a path that does not exist yet"
            )
        if args.src is not None and Path(args.src).is_dir():
            parser.error(
                f"--tmp_dir is where an archive is extracted, but --src {args.src} is a folder (read in place)"
            )
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        parser.error(f"--out_dir {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not args.overwrite:
        parser.error(f"--out_dir {out_dir} is not empty; pass --overwrite to replace its images/ and ucf101_*.jsonl")
    return args


# ---------------------------------------------------------------------------------------------
# Source: hub download, archive or folder
# ---------------------------------------------------------------------------------------------


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def extract(archive: Path, dest: Path) -> None:
    print(f"extracting {archive} to {dest}")
    if archive.name.lower().endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(dest)
    else:
        with tarfile.open(archive) as tf:
            # The "data" filter refuses absolute paths, links out of dest and device files.
            tf.extractall(dest, filter="data")


def find_root(folder: Path) -> Path:
    """The folder that holds train/: `folder` itself or its only sub-folder (e.g. UCF101_subset/)."""
    if (folder / "train").is_dir():
        return folder
    subdirs = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__MACOSX"))]
    if len(subdirs) == 1 and (subdirs[0] / "train").is_dir():
        return subdirs[0]
    raise SystemExit(
        f"error: no train/ folder in {folder}: expected <split>/<Class>/<video> "
        "(splits train, val, test), optionally under a single top folder such as UCF101_subset/"
    )


def list_videos(root: Path) -> dict[str, list[tuple[str, Path]]]:
    """{split: [(class name, video path), ...]} in a stable order (classes, then files, sorted)."""
    videos = {}
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        items = []
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            files = sorted(
                p
                for p in class_dir.iterdir()
                if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in VIDEO_EXTENSIONS
            )
            stems = {}
            for path in files:
                if path.stem in stems:
                    raise SystemExit(
                        f"error: {stems[path.stem]} and {path} would write the same frame files "
                        f"({split}/{class_dir.name}/{path.stem}.k.jpg); rename one of them"
                    )
                stems[path.stem] = path
            items += [(class_dir.name, path) for path in files]
        videos[split] = items
    if not videos.get("train"):
        raise SystemExit(f"error: no videos found under {root / 'train'} (expected train/<Class>/<video>)")
    return videos


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------


def convert(
    root: Path, out_dir: Path, num_frames: int, skip_invalid: bool, show_progress: bool = True, min_frames: int = 1
) -> dict:
    """Decode every video into a staging folder, then either publish the result or report every bad video.

    All videos are checked before anything is written to `out_dir`: the frames go to a hidden
    staging folder next to it and are moved in only when the whole conversion succeeded (so an
    earlier conversion in `out_dir` survives a failed one). Without `skip_invalid`, any unusable
    video (unreadable, corrupt, empty, too short) stops the conversion with one report of all of them.
    """
    videos = list_videos(root)
    class_labels = sorted({label for items in videos.values() for label, _ in items})
    prompt = PROMPT_PREFIX + ", ".join(class_labels) + "."
    print(f"{len(class_labels)} classes: {', '.join(class_labels)}")
    print("videos: " + ", ".join(f"{split} {len(items)}" for split, items in videos.items()))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        records = {split: [] for split in videos}
        invalid = []
        index = 0
        total = sum(len(items) for items in videos.values())
        with tqdm(total=total, desc="videos", unit="video", disable=not show_progress) as bar:
            for split, items in videos.items():
                for label, path in items:
                    bar.update(1)
                    try:
                        frames = sample_frames(path, num_frames, min_frames)
                    except InvalidVideo as e:
                        invalid.append({"path": str(path), "reason": str(e)})
                        continue
                    rel_dir = f"{split}/{label}"
                    (staging / "images" / rel_dir).mkdir(parents=True, exist_ok=True)
                    rel_paths = []
                    for k, frame in enumerate(frames):
                        rel = f"{rel_dir}/{path.stem}.{k}.jpg"
                        frame.save(staging / "images" / rel)
                        rel_paths.append(rel)
                    # Adapt: more turns can be appended to "conversations" (the trainer supports multi-turn).
                    records[split].append(
                        {
                            "id": f"{split}-{index:010d}",
                            "source": "ucf101",
                            "conversations": [{"images": rel_paths, "user": prompt, "assistant": label}],
                        }
                    )
                    index += 1

        listing = "\n".join(f"  {v['path']}: {v['reason']}" for v in invalid)
        if invalid and not skip_invalid:
            raise SystemExit(
                f"error: {len(invalid)} of {total} videos cannot be used:\n{listing}\n"
                f"Nothing was written to {out_dir}. Fix or remove these videos, or pass --skip_invalid "
                "to convert the others."
            )
        if not records.get("train"):
            raise SystemExit(f"error: no usable training video; nothing written to {out_dir}")
        for split, split_records in records.items():
            with open(staging / f"ucf101_{split}.jsonl", "w") as f:
                for record in split_records:
                    f.write(json.dumps(record) + "\n")
        if invalid:
            with open(staging / SKIPPED_FILE, "w") as f:
                for video in invalid:
                    f.write(json.dumps(video) + "\n")
        publish(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    if invalid:
        print(f"--skip_invalid: skipped {len(invalid)} of {total} videos (listed in {out_dir / SKIPPED_FILE}):")
        print(listing)
    print(
        f"wrote {index} videos x {num_frames} frames to {out_dir}: "
        + ", ".join(f"ucf101_{split}.jsonl ({len(r)})" for split, r in records.items())
    )
    return {"class_labels": class_labels, "records": records, "invalid": invalid}


def publish(staging: Path, out_dir: Path) -> None:
    """Replace the outputs of an earlier conversion in out_dir with the staged ones (nothing else)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out_dir / "images", ignore_errors=True)
    for old in [*out_dir.glob("ucf101_*.jsonl"), out_dir / SKIPPED_FILE]:
        old.unlink(missing_ok=True)
    for item in staging.iterdir():
        item.rename(out_dir / item.name)


def main(argv=None):
    args = parse_args(argv)
    if args.tmp_dir is not None:
        tmp_dir = Path(args.tmp_dir)
        tmp_dir.mkdir(parents=True)  # a new folder (exist_ok=False, as the original): removed below
    else:
        tmp_dir = Path(tempfile.mkdtemp(prefix="ucf101-"))
    try:
        if args.src is None:
            from huggingface_hub import hf_hub_download

            archive = Path(hf_hub_download(repo_id=HUB_REPO_ID, filename=HUB_FILENAME, repo_type="dataset"))
            extract(archive, tmp_dir)
            root = find_root(tmp_dir)
        else:
            src = Path(args.src)
            if src.is_dir():
                root = find_root(src)
            elif is_archive(src):
                extract(src, tmp_dir)
                root = find_root(tmp_dir)
            else:
                raise SystemExit(f"error: --src {src} is neither a folder nor a .tar.gz/.tgz/.tar/.zip archive")
        convert(root, Path(args.out_dir), args.num_frames, args.skip_invalid, args.tqdm, args.min_frames)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
