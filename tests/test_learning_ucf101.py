"""The UCF101 recipe visibly learns: the quickstart's pipeline, shrunk to fit a unit test.

Real video files (`scripts/make_synthetic_videos.py`: a large shape of the class colour moving over a
background tinted with it) -> `convert_ucf101.py --src` -> `finetune_hf_trainer_ucf101.py` on the
tiny random model. The prompt lists every class name and is the same for every clip, so only the
frames tell the classes apart: the test fails if the frames stop reaching the model, if the labels,
the loss or the optimizer break, or if the evaluation scores the wrong thing.

Smaller than the quickstart (10 classes, 4 frames, 160 steps): 4 classes, 2 frames per clip, 50
steps of 4 clips. Held-out accuracy after training, data and training seeds 0-3: 16/16, 16/16, 16/16,
16/16 (threshold 12/16); seeds 0-2 under the default, avx2 and avx512 kernel sets (README, Tests):
16/16 in all nine runs (final loss 0.04-0.15, 58-195x below the first). Before: 0/16 (the random
model does not answer with a class name). About 30 s of CPU time on one thread.
"""

from __future__ import annotations

import json

import torch

SEED = 0
NUM_CLASSES = 4
NUM_VAL = 4 * NUM_CLASSES
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def test_ucf101_learns_colour_from_frames(tiny_model_dir, tmp_path, run_script, run_main):
    videos, data_dir, output_dir = tmp_path / "videos", tmp_path / "ucf101", tmp_path / "out"
    # Data in this process; the training run (its thresholds were measured so) as a user runs it.
    run_main(
        "scripts/make_synthetic_videos.py", "--out_dir", videos, "--num_classes", NUM_CLASSES,
        "--train_per_class", 8, "--val_per_class", NUM_VAL // NUM_CLASSES, "--test_per_class", 0,
        "--num_frames", 4, "--width", 64, "--height", 48, "--seed", SEED,
    )  # fmt: skip
    run_main("convert_ucf101.py", "--src", videos, "--out_dir", data_dir, "--num_frames", 2, "--no-tqdm")
    train = [json.loads(line) for line in (data_dir / "ucf101_train.jsonl").read_text().splitlines()]
    assert len(train) == 8 * NUM_CLASSES and all(len(r["conversations"][0]["images"]) == 2 for r in train)
    assert len({r["conversations"][0]["user"] for r in train}) == 1  # the text gives no hint

    run_script(
        "finetune_hf_trainer_ucf101.py", "--model_name_or_path", tiny_model_dir, "--data_dir", data_dir,
        "--output_dir", output_dir, "--num_crops", 1, "--freeze_vision_model", "--no_gradient_checkpointing",
        "--batch_size", 4, "--batch_size_per_gpu", 4, "--max_steps", 50, "--learning_rate", "1e-2",
        "--warmup_steps", 5, "--logging_steps", 10, "--max_new_tokens", 4, "--eval_batch_size", NUM_VAL,
        "--dataloader_num_workers", 0, "--deepspeed", "none", "--seed", SEED, "--no-tqdm", env=ONE_THREAD,
    )  # fmt: skip

    before = json.loads((output_dir / "eval_before.json").read_text())
    after = json.loads((output_dir / "eval_after.json").read_text())
    assert before["num_samples"] == after["num_samples"] == NUM_VAL
    chance = 1 / NUM_CLASSES
    assert before["accuracy"] <= chance + 0.15, before["predictions"]
    assert after["accuracy"] >= 0.75, after["predictions"]
    assert after["accuracy"] >= before["accuracy"] + 0.5
    history = json.loads((output_dir / "log_history.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[-1] < losses[0] / 5
    # --no_gradient_checkpointing reached the Trainer (activations kept, not recomputed).
    training_args = torch.load(output_dir / "training_args.bin", weights_only=False)
    assert training_args.activation_checkpointing is False
    assert (output_dir / "loss_curve.png").is_file() and (output_dir / "confusion_matrix.png").is_file()
