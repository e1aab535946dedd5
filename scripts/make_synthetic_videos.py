"""Write a small synthetic video-classification dataset in the UCF101 subset layout.

    python scripts/make_synthetic_videos.py --out_dir synthetic_videos

Layout: `out_dir/{train,val,test}/<Class>/<Class>_<k>.mp4`, real H.264 (or MPEG-4) files written
with PyAV, exactly what `convert_ucf101.py --src` reads. Each clip shows one shape moving across a
noisy grey background; the class is the shape's colour, so only the pixels tell the classes apart
(the prompt lists every class name, so the text alone gives no hint). Shape, size, start point,
direction and noise vary from clip to clip.
"""

from __future__ import annotations

import argparse
import random
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

COLOURS = {
    "Red": (220, 30, 30),
    "Green": (30, 190, 40),
    "Blue": (30, 60, 220),
    "Yellow": (235, 220, 30),
    "Cyan": (30, 210, 220),
    "Magenta": (215, 40, 200),
    "Orange": (245, 140, 20),
    "Purple": (120, 40, 160),
    "White": (250, 250, 250),
    "Black": (10, 10, 10),
}


def clip_frames(colour, rng: random.Random, width=160, height=120, num_frames=16) -> list[np.ndarray]:
    size = rng.randint(height // 5, height // 2)
    x, y = rng.uniform(0, width - size), rng.uniform(0, height - size)
    dx, dy = rng.uniform(-4, 4), rng.uniform(-4, 4)
    round_shape = rng.random() < 0.5
    grey = rng.randint(90, 160)
    noise = np.random.default_rng(rng.randint(0, 2**31))
    yy, xx = np.mgrid[0:height, 0:width]
    frames = []
    for _ in range(num_frames):
        frame = noise.normal(grey, 12, (height, width, 3)).clip(0, 255).astype(np.uint8)
        if round_shape:
            r = size / 2
            inside = (xx - x - r) ** 2 + (yy - y - r) ** 2 <= r * r
        else:
            inside = (xx >= x) & (xx < x + size) & (yy >= y) & (yy < y + size)
        frame[inside] = colour
        frames.append(frame)
        x, y = x + dx, y + dy
        if not 0 <= x <= width - size:
            dx, x = -dx, min(max(x, 0), width - size)
        if not 0 <= y <= height - size:
            dy, y = -dy, min(max(y, 0), height - size)
    return frames


def write_video(path: Path, frames: list[np.ndarray], fps: int = 8) -> None:
    with av.open(str(path), mode="w") as container:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = "yuv420p"
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--train_per_class", type=int, default=16)
    parser.add_argument("--val_per_class", type=int, default=5)
    parser.add_argument("--test_per_class", type=int, default=2)
    parser.add_argument("--num_classes", type=int, default=10, help=f"at most {len(COLOURS)}")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    out = Path(args.out_dir)
    classes = list(COLOURS)[: args.num_classes]
    count = 0
    for split, per_class in [("train", args.train_per_class), ("val", args.val_per_class), ("test", args.test_per_class)]:
        for name in classes:
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                write_video(folder / f"{name}_{split}_{k:03d}.mp4", clip_frames(COLOURS[name], rng))
                count += 1
    print(f"wrote {count} videos of {len(classes)} classes to {out}")


if __name__ == "__main__":
    main()
