"""DPO visibly teaches a preference: `finetune_hf_trainer_dpo.py` on coloured shapes (tests/preference_data.py).

Every image is one coloured shape; the prompt is always "What colour is the shape?"; the chosen answer names the
shape's colour ("The shape is red."), the rejected one another colour. Only the pixels tell which is right. The
held-out set is balanced (for every pair of colours, as many rows preferring each of the two), so a model that
ignores the image has a log-prob accuracy of exactly 0.5 there. The tiny random model (frozen vision, as the
other learning tests) is trained from scratch by the real script, against its frozen copy (TRL's reference).

Held-out log-prob accuracy (policy's mean log-probability per answer token higher for chosen than for rejected),
training seeds 0, 1, 2 (data seed 0), 48 steps: 1.000, 1.000, 1.000 under each of the default, avx2 and avx512
kernel sets (before: 0.500 in all nine runs; preference accuracy after: the same; mean reward margin 2.60,
2.41-2.49, 3.37-3.39 for the three seeds). Threshold 0.9; 24 steps gave seed 1 0.917 (22 of 24 pairs), hence 48.
Time per seed (`--durations`, one after another, loadavg 1.0-1.1 on 2 cores): 20-21 s under avx512, 22-23 s under
avx2, 40-41 s under default (unvectorised kernels). It was 6-11 minutes before the recipe made TRL's
log-probability head score only the answer tokens on CPU (`answer_tokens_only_on_cpu`).
"""

from __future__ import annotations

import json

import pytest
from preference_data import shape_preferences

NUM_TRAIN, VAL_REPEATS = 36, 2  # every ordered pair of colours 3 times; 24 held-out pairs
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dpo_learns_colour_preference(tiny_model_dir, tmp_path, run_script, seed):
    data_dir, output_dir = tmp_path / "shapes", tmp_path / "out"
    _, val = shape_preferences(data_dir, NUM_TRAIN, VAL_REPEATS, seed=0)
    run_script(
        "finetune_hf_trainer_dpo.py", "--model_name_or_path", tiny_model_dir, "--data_dir", data_dir,
        "--output_dir", output_dir, "--num_crops", 1, "--freeze_vision_model", "--no_gradient_checkpointing",
        "--batch_size", 4, "--batch_size_per_gpu", 2, "--max_steps", 48, "--learning_rate", "1e-2",
        "--warmup_steps", 2, "--logging_steps", 6, "--eval_batch_size", 2, "--dataloader_num_workers", 0,
        "--deepspeed", "none", "--seed", seed, "--no-tqdm", env=ONE_THREAD, timeout=1800,
    )  # fmt: skip
    before = json.loads((output_dir / "eval_before.json").read_text())
    after = json.loads((output_dir / "eval_after.json").read_text())
    assert before["num_samples"] == after["num_samples"] == len(val)
    print(f"log-prob accuracy before {before['logp_accuracy']:.3f}, after {after['logp_accuracy']:.3f}; "
          f"preference accuracy after {after['preference_accuracy']:.3f}, mean margin {after['mean_reward_margin']:.3f}")
    assert abs(before["logp_accuracy"] - 0.5) <= 0.2, before
    assert after["logp_accuracy"] >= 0.9, after["margins"]
    # Relative to the reference too: DPO's own criterion.
    assert after["preference_accuracy"] >= 0.9 and after["mean_reward_margin"] > 0
    history = json.loads((output_dir / "log_history.json").read_text())
    margins = [h["rewards/margins"] for h in history if "rewards/margins" in h]
    assert margins[-1] > margins[0]
