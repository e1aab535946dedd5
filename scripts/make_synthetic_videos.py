"""Write a small synthetic video-classification dataset in the UCF101 subset layout.

    python scripts/make_synthetic_videos.py --out_dir synthetic_videos

Layout: `out_dir/{train,val,test}/<Class>/<Class>_<split>_<k>.mp4`, real H.264 (or MPEG-4) files
written with PyAV, exactly what `convert_ucf101.py --src` reads.

The class is a colour, so only the pixels tell the classes apart (the prompt lists every class name,
so the text alone gives no hint). Each clip shows a large shape of the class colour (a square or a
disc, 40-75 % of the frame height) moving and bouncing across a background tinted with the same
colour (mixed with a random grey), with a small distractor shape of a neutral colour and pixel
noise. Tint, grey level, shape, size, start point, direction and noise change from clip to clip.
The colour covers most of every frame, so even a tiny randomly initialised model picks it up in
160 steps (the quickstart); the moving shapes make the frames of a clip differ.
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
NEUTRALS = [(128, 128, 128), (70, 70, 70), (190, 190, 190)]


def shape_mask(xx, yy, x, y, size, round_shape):
    if round_shape:
        r = size / 2
        return (xx - x - r) ** 2 + (yy - y - r) ** 2 <= r * r
    return (xx >= x) & (xx < x + size) & (yy >= y) & (yy < y + size)


class Mover:
    """A shape of side `size` at (x, y) moving by (dx, dy) per frame, bouncing off the borders."""

    def __init__(self, rng: random.Random, size: int, width: int, height: int, speed: float):
        self.size, self.width, self.height = size, width, height
        self.x, self.y = rng.uniform(0, width - size), rng.uniform(0, height - size)
        self.dx, self.dy = rng.uniform(-speed, speed), rng.uniform(-speed, speed)
        self.round = rng.random() < 0.5

    def mask(self, xx, yy):
        return shape_mask(xx, yy, self.x, self.y, self.size, self.round)

    def step(self):
        self.x, self.y = self.x + self.dx, self.y + self.dy
        if not 0 <= self.x <= self.width - self.size:
            self.dx, self.x = -self.dx, min(max(self.x, 0), self.width - self.size)
        if not 0 <= self.y <= self.height - self.size:
            self.dy, self.y = -self.dy, min(max(self.y, 0), self.height - self.size)


def clip_frames(colour, rng: random.Random, width=160, height=120, num_frames=8) -> list[np.ndarray]:
    colour = np.array(colour, dtype=np.float64)
    tint = rng.uniform(0.65, 0.85)  # share of the class colour in the background
    grey = rng.uniform(100, 155)
    background = tint * colour + (1 - tint) * grey
    noise_level = rng.uniform(4, 12)
    main = Mover(rng, rng.randint(int(height * 0.4), int(height * 0.75)), width, height, speed=6)
    distractor = Mover(rng, rng.randint(height // 8, height // 4), width, height, speed=8)
    distractor_colour = rng.choice(NEUTRALS)
    noise = np.random.default_rng(rng.randrange(2**32))
    yy, xx = np.mgrid[0:height, 0:width]
    frames = []
    for _ in range(num_frames):
        frame = np.broadcast_to(background, (height, width, 3)).copy()
        frame[main.mask(xx, yy)] = colour
        frame[distractor.mask(xx, yy)] = distractor_colour
        frame += noise.normal(0, noise_level, frame.shape)
        frames.append(frame.clip(0, 255).astype(np.uint8))
        main.step()
        distractor.step()
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
    parser.add_argument("--out_dir", required=True, help="folder to write <split>/<Class>/<video>.mp4 into")
    parser.add_argument("--train_per_class", type=int, default=16, help="train videos per class")
    parser.add_argument("--val_per_class", type=int, default=5, help="val videos per class")
    parser.add_argument("--test_per_class", type=int, default=2, help="test videos per class")
    parser.add_argument("--num_classes", type=int, default=10, help=f"at most {len(COLOURS)}")
    parser.add_argument("--num_frames", type=int, default=8, help="frames per video")
    parser.add_argument("--width", type=int, default=160, help="frame width in pixels")
    parser.add_argument("--height", type=int, default=120, help="frame height in pixels")
    parser.add_argument("--seed", type=int, default=0, help="random seed (the same seed writes the same videos)")
    args = parser.parse_args(argv)
    if not 1 <= args.num_classes <= len(COLOURS):
        parser.error(f"--num_classes must be between 1 and {len(COLOURS)}, got {args.num_classes}")
    rng = random.Random(args.seed)
    out = Path(args.out_dir)
    classes = list(COLOURS)[: args.num_classes]
    count = 0
    for split, per_class in [("train", args.train_per_class), ("val", args.val_per_class), ("test", args.test_per_class)]:
        for name in classes:
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                frames = clip_frames(COLOURS[name], rng, args.width, args.height, args.num_frames)
                write_video(folder / f"{name}_{split}_{k:03d}.mp4", frames)
                count += 1
    print(f"wrote {count} videos of {len(classes)} classes to {out}")


if __name__ == "__main__":
    main()
