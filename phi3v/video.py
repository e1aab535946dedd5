"""Frames of a video file, sampled the way the UCF101 converter samples them (one function for both).

`convert_ucf101.py` writes these frames as JPEGs for training, and `Phi3VProcessor.apply_chat_template`
turns a `{"type": "video", "path": "clip.mp4"}` part into them, so a clip given to a model at
inference is cut into frames exactly as the training data was.

    from phi3v.video import InvalidVideo, sample_frames

    frames = sample_frames(Path("clip.mp4"), num_frames=8)   # 8 RGB PIL images
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
from PIL import Image


class InvalidVideo(Exception):
    """A video that cannot be used (unreadable, corrupt, empty, too short); the message is the reason."""


def frame_indices(total_frames: int, num_frames: int) -> list[int]:
    """The original recipe's sampling: `num_frames` evenly spaced indices starting at frame 0.

    Videos shorter than `num_frames` repeat frames, so every clip still gives `num_frames` images.
    """
    indices = np.arange(0, total_frames, total_frames / num_frames).astype(int)
    return [int(i) for i in indices[:num_frames]]


def count_frames(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def decode_frames(path: Path, indices: list[int]) -> dict[int, Image.Image]:
    """Decode from the start and keep the frames at `indices` (RGB PIL images)."""
    wanted, last = set(indices), max(indices)
    frames = {}
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                frames[i] = Image.fromarray(frame.to_ndarray(format="rgb24")).convert("RGB")
            if i >= last:
                break
    return frames


def sample_frames(path: Path, num_frames: int, min_frames: int = 1) -> list[Image.Image]:
    """`num_frames` frames of one video; raises InvalidVideo (with the reason) when it cannot be used."""
    path = Path(path)
    if not path.is_file():
        raise InvalidVideo(f"video file not found: {path}")
    if path.stat().st_size == 0:
        raise InvalidVideo("empty file (0 bytes)")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InvalidVideo("no video stream")
            total = container.streams.video[0].frames
        if total <= 0:
            # Some containers (mkv, webm) do not store the frame count: decode once to count.
            total = count_frames(path)
        if total <= 0:
            raise InvalidVideo("no decodable frames (empty video stream)")
        indices = frame_indices(total, num_frames)
        frames = decode_frames(path, indices)
        if len(frames) < len(set(indices)):
            # The header promised more frames than the stream holds: sample from what is there.
            real_total = count_frames(path)
            if real_total <= 0:
                raise InvalidVideo("no decodable frames (empty video stream)")
            print(f"warning: {path} reports {total} frames but holds {real_total}; sampling from {real_total}")
            total = real_total
            indices = frame_indices(total, num_frames)
            frames = decode_frames(path, indices)
            if len(frames) < len(set(indices)):
                raise InvalidVideo("frame count changed between two decodes")
    except InvalidVideo:
        raise
    except (av.error.FFmpegError, OSError, ValueError, IndexError, RuntimeError, EOFError) as e:
        raise InvalidVideo(f"cannot decode: {type(e).__name__}: {e}") from e
    if total < min_frames:
        raise InvalidVideo(f"too short: {total} frame(s), --min_frames is {min_frames}")
    return [frames[i] for i in indices]
