"""Per-core image preprocessing speed: phi3v's image processor against the plain path.

The plain path is the HD transform written step by step, as the original processor does it with
torchvision: convert to RGB, turn a portrait image on its side, PIL resize, paste onto a white
canvas, turn it back, to a float tensor, normalise, bicubic global crop, cut the crops, pad with
zero slots, stack. phi3v's exact processor (the default, resize_backend="pil") gives the same
numbers (checked here on every run) with fewer passes over the pixels; its fast one (resize_backend="torch") also swaps PIL's resize, which then dominates,
for torch's uint8 antialiased resize, and its largest difference from the exact output is reported.

    python -m bench.preprocess --output results_preprocess.json
"""

from __future__ import annotations

import argparse
import io
import json
import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from phi3v.processing_phi3_v import CROP_SIZE, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Phi3VImageProcessor, hd_transform_size

from .timing import cpu_seconds_per_call
from .workloads import document_page, video_frame


def plain_preprocess(images: list[Image.Image], num_crops: int) -> torch.Tensor:
    """[n, num_crops + 1, 3, 336, 336], the straightforward way."""
    mean = torch.tensor(OPENAI_CLIP_MEAN)[:, None, None]
    std = torch.tensor(OPENAI_CLIP_STD)[:, None, None]
    out = []
    for image in images:
        image = image.convert("RGB")
        transposed = image.width < image.height
        if transposed:  # the official order: PIL's two resize passes then run along these axes
            image = image.transpose(Image.TRANSPOSE)
        new_w, new_h, padded_w, padded_h = hd_transform_size(image.width, image.height, num_crops)
        canvas = Image.new("RGB", (padded_w, padded_h), (255, 255, 255))
        canvas.paste(image.resize((new_w, new_h), Image.BILINEAR), (0, (padded_h - new_h) // 2))
        if transposed:
            canvas = canvas.transpose(Image.TRANSPOSE)
            padded_w, padded_h = padded_h, padded_w
        hd = (torch.from_numpy(np.array(canvas)).permute(2, 0, 1).float() / 255 - mean) / std
        rows, cols = padded_h // CROP_SIZE, padded_w // CROP_SIZE
        global_crop = F.interpolate(hd[None], size=(CROP_SIZE, CROP_SIZE), mode="bicubic")
        crops = hd.reshape(3, rows, CROP_SIZE, cols, CROP_SIZE).permute(1, 3, 0, 2, 4).reshape(-1, 3, CROP_SIZE, CROP_SIZE)
        padding = torch.zeros(num_crops - rows * cols, 3, CROP_SIZE, CROP_SIZE)
        out.append(torch.cat([global_crop, crops, padding]))
    return torch.stack(out)


def measure(repeats: int = 15, quick: bool = False) -> list[dict]:
    """Per-image cost of the paths on one thread, for a portrait DocVQA page (RGB and grayscale), the
    same page turned to landscape, and a video frame.

    Also times the two steps both paths share and neither can skip: decoding the page from PNG (not
    in either path's time) and PIL's bilinear resize as the exact processor runs it (in the official
    pass order, see Phi3VImageProcessor.pil_resize), which the output must match bit for bit; the
    resize alone bounds the speed-up any exact path can reach (plain time / resize time)."""
    torch.set_num_threads(1)
    page = document_page(*((425, 550) if quick else (1700, 2200)), random.Random(0))
    cases = [
        ("DocVQA page 1700x2200 RGB" if not quick else "page 425x550 RGB", page, 16),
        ("DocVQA page 1700x2200 grayscale" if not quick else "page 425x550 grayscale", page.convert("L"), 16),
        ("landscape page 2200x1700 RGB" if not quick else "landscape page 550x425 RGB",
         page.transpose(Image.Transpose.ROTATE_90), 16),
        ("video frame 320x240 RGB", video_frame(0, 0, 320, 240), 4),
    ]
    processor, fast = Phi3VImageProcessor(), Phi3VImageProcessor(resize_backend="torch")
    rows = []
    for name, image, num_crops in cases:
        ours = processor([image], num_crops=num_crops)["pixel_values"]
        ours_fast = fast([image], num_crops=num_crops)["pixel_values"]
        plain = plain_preprocess([image], num_crops)
        new_w, new_h, _, _ = hd_transform_size(image.width, image.height, num_crops)
        png = io.BytesIO()
        image.save(png, format="PNG")
        png = png.getvalue()
        best = cpu_seconds_per_call({
            "plain": lambda: plain_preprocess([image], num_crops),
            "phi3v": lambda: processor([image], num_crops=num_crops),
            "phi3v_fast": lambda: fast([image], num_crops=num_crops),
            "resize": lambda: processor.pil_resize(image, new_w, new_h),
            "torch_resize": lambda: fast.torch_resize(image, new_w, new_h),
            "decode": lambda: Image.open(io.BytesIO(png)).load(),
        }, repeats)
        fast_diff = (ours_fast - ours).abs()
        rows.append({
            "image": name,
            "num_crops": num_crops,
            "plain_ms": 1000 * best["plain"],
            "phi3v_ms": 1000 * best["phi3v"],
            "resize_ms": 1000 * best["resize"],
            "png_decode_ms": 1000 * best["decode"],
            "plain_img_per_s_per_core": 1 / best["plain"],
            "phi3v_img_per_s_per_core": 1 / best["phi3v"],
            "speedup_per_core": best["plain"] / best["phi3v"],
            "speedup_bound_exact_resize": best["plain"] / best["resize"],
            "max_abs_diff": float((ours - plain).abs().max()),
            # resize_backend="torch": time, and how far its pixel_values are from the exact ones
            "phi3v_fast_ms": 1000 * best["phi3v_fast"],
            "phi3v_fast_img_per_s_per_core": 1 / best["phi3v_fast"],
            "fast_speedup_per_core": best["plain"] / best["phi3v_fast"],
            "torch_resize_ms": 1000 * best["torch_resize"],
            "fast_max_abs_diff": float(fast_diff.max()),
            "fast_differing_fraction": float((fast_diff > 0).float().mean()),
        })
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", help="write the rows as JSON here")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="small page, few repeats")
    args = parser.parse_args(argv)
    rows = measure(args.repeats, args.quick)
    for row in rows:
        print(f"{row['image']:<34} num_crops {row['num_crops']:>2}: plain {row['plain_ms']:.1f} ms, "
              f"phi3v {row['phi3v_ms']:.1f} ms per image and core ({row['speedup_per_core']:.2f}x; PIL resize alone "
              f"{row['resize_ms']:.1f} ms, bound {row['speedup_bound_exact_resize']:.2f}x), "
              f"max |diff| {row['max_abs_diff']:.1e}; phi3v fast {row['phi3v_fast_ms']:.1f} ms "
              f"({row['fast_speedup_per_core']:.2f}x; torch resize {row['torch_resize_ms']:.1f} ms), max |diff| vs exact "
              f"{row['fast_max_abs_diff']:.3f} on {100 * row['fast_differing_fraction']:.3f}% of values")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
