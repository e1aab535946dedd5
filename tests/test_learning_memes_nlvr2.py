"""The hateful memes and NLVR2 recipes visibly learn.

The tiny random model (2-layer decoder, 2-layer CLIP, real tokenizer) is trained from scratch by the
real scripts on small synthetic sets in which ONLY the image(s) decide the answer: the question text is
the same on every row. Before training the random model answers nonsense (accuracy ~0); after a few
epochs it must answer the HELD-OUT rows (new pictures, generated with another seed) well above chance.
So these tests fail if the images stop reaching the model, if the labels, the loss or the optimizer
break, or if the evaluation scores the wrong thing.

* hateful memes: a red picture (with random shapes and noise) -> "Yes", a blue one -> "No".
* NLVR2: "Both images are red." -> "True" for two red pictures, "False" when exactly one of them is red
  (the other blue, green or yellow; on the left or on the right). Either picture alone answers at
  most 75 % of the rows right, so the accuracy threshold (13/16) needs both images. The vision side
  is frozen here (`--freeze_vision_model`, the cookbook's second setting): trained at this high
  learning rate, the random CLIP tower loses the colour features in the first steps and the
  two-image task then stays at chance within the time budget of a unit test.

Both run single-process, without DeepSpeed, at --num_crops 1 with 64x64 pictures; each takes about
20-40 s on an idle 2-core machine.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cauldron_data import cauldron_features

# Data and training seed. Held-out accuracy after training, seeds 0, 1, 2 under the default, avx2 and
# avx512 kernel sets (README, Tests): hateful memes 16/16 in all nine runs; NLVR2 (threshold 13) 16/16
# for seeds 0 and 1 under each, 15, 16, 15 for seed 2. Before training: 0/16 everywhere. NLVR2 trains on 96 rows for 4 epochs:
# with 48 rows for 7 epochs it memorised them and gave 14/16 on some seeds and kernels (more epochs: worse).
SEED = 0
NUM_EVAL = 16  # held-out rows, both classes equally often
NUM_TRAIN = 48
NLVR2_NUM_TRAIN = 96  # the two-image rule needs more examples than one colour to generalise
BACKGROUNDS = {"red": (210, 30, 30), "blue": (30, 40, 210), "green": (30, 180, 40), "yellow": (220, 210, 30)}
SHAPE_COLOURS = [(255, 255, 255), (0, 0, 0), (128, 128, 128), (160, 80, 200), (250, 150, 40)]
# One OpenMP thread: with other jobs on the machine, 2 spinning threads per process are far slower.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def picture(rng: random.Random, colour: str, size: int = 64) -> Image.Image:
    """A `colour` background with 1-3 random rectangles/ellipses of other colours and pixel noise."""
    base = [min(255, max(0, c + rng.randint(-30, 30))) for c in BACKGROUNDS[colour]]
    image = Image.new("RGB", (size, size), tuple(base))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 3)):
        x, y = rng.randrange(size - 16), rng.randrange(size - 16)
        box = [x, y, x + rng.randint(4, 16), y + rng.randint(4, 16)]
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)(box, fill=rng.choice(SHAPE_COLOURS))
    noise = np.random.default_rng(rng.randrange(2**32)).integers(-20, 21, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.int64) + noise, 0, 255).astype(np.uint8))


def balanced(kinds: list, n: int, rng: random.Random) -> list:
    rows = (kinds * (n // len(kinds) + 1))[:n]
    rng.shuffle(rows)
    return rows


def memes_rows(n: int, rng: random.Random) -> dict:
    rows = {"images": [], "texts": []}
    for hateful in balanced([True, False], n, rng):
        rows["images"].append([picture(rng, "red" if hateful else "blue")])
        answer = "Yes" if hateful else "No"
        rows["texts"].append([{"user": "Is this meme hateful?", "assistant": answer, "source": "synthetic"}])
    return rows


def nlvr2_rows(n: int, rng: random.Random) -> dict:
    rows = {"images": [], "texts": []}
    for kind in balanced(["both", "left", "both", "right"], n, rng):  # half True; False: one red picture
        other = rng.choice(["blue", "green", "yellow"])
        left, right = {"both": ("red", "red"), "left": ("red", other), "right": (other, "red")}[kind]
        rows["images"].append([picture(rng, left), picture(rng, right)])
        answer = "True" if kind == "both" else "False"
        rows["texts"].append([{"user": "Both images are red.", "assistant": answer, "source": "synthetic"}])
    return rows


def save_dataset(make_rows, folder: Path, seed: int, num_train: int = NUM_TRAIN) -> Path:
    """the_cauldron layout; the first NUM_EVAL rows (the scripts' --eval_size) come from another seed."""
    from datasets import Dataset

    features = cauldron_features()
    held_out, train = make_rows(NUM_EVAL, random.Random(seed + 1000)), make_rows(num_train, random.Random(seed))
    rows = {key: held_out[key] + train[key] for key in held_out}
    Dataset.from_dict(rows, features=features).save_to_disk(str(folder))
    return folder


def run_args(tiny_model_dir, data_dir, output_dir, seed=SEED):
    return [
        "--model_name_or_path", tiny_model_dir, "--dataset_path", data_dir, "--output_dir", output_dir,
        "--eval_size", NUM_EVAL, "--deepspeed", "none", "--num_crops", 1,
        "--batch_size", 4, "--batch_size_per_gpu", 4, "--eval_batch_size", NUM_EVAL,
        "--learning_rate", 1e-2, "--warmup_steps", 0, "--logging_steps", 1, "--max_new_tokens", 3,
        "--dataloader_num_workers", 0, "--seed", seed, "--no-tqdm",
    ]  # fmt: skip


def check_learned(output_dir: Path, min_accuracy: float):
    before = json.loads((output_dir / "eval_before.json").read_text())
    after = json.loads((output_dir / "eval_after.json").read_text())
    summary = f"accuracy before {before['accuracy']:.3f}, after {after['accuracy']:.3f}"
    print(summary)
    assert before["num_samples"] == after["num_samples"] == NUM_EVAL
    assert after["accuracy"] >= min_accuracy, summary
    assert after["accuracy"] >= before["accuracy"] + 0.3, summary
    # The confusion matrix agrees with the accuracy: every held-out row counted once, hits on the diagonal.
    matrix = after["confusion_matrix"]["matrix"]
    assert sum(map(sum, matrix)) == NUM_EVAL
    assert sum(matrix[i][i] for i in range(len(matrix))) == round(after["accuracy"] * NUM_EVAL)
    losses = [h["loss"] for h in json.loads((output_dir / "log_history.json").read_text()) if "loss" in h]
    assert losses[-1] < losses[0] / 10, f"training loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    for plot in ("loss_curve.png", "confusion_matrix.png"):
        with Image.open(output_dir / plot) as image:
            assert image.format == "PNG"
    return before, after


def test_hateful_memes_learns_from_the_image(tiny_model_dir, run_script, tmp_path):
    data = save_dataset(memes_rows, tmp_path / "memes", SEED)
    out = tmp_path / "out"
    run_script("finetune_hf_trainer_hateful_memes.py", *run_args(tiny_model_dir, data, out),
               "--num_train_epochs", 5, env=ONE_THREAD)
    _, after = check_learned(out, min_accuracy=0.8)
    assert after["auroc"] >= 0.9  # P(yes) ranks the red pictures first


def test_nlvr2_learns_from_both_images(tiny_model_dir, run_script, tmp_path):
    data = save_dataset(nlvr2_rows, tmp_path / "nlvr2", SEED, num_train=NLVR2_NUM_TRAIN)
    out = tmp_path / "out"
    run_script("finetune_hf_trainer_nlvr2.py", *run_args(tiny_model_dir, data, out),
               "--freeze_vision_model", "--num_train_epochs", 4, env=ONE_THREAD)
    check_learned(out, min_accuracy=13 / 16)  # more than either picture alone can give (12/16)
