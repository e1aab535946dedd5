"""Distributed training on CPU (torchrun, gloo), as CI can run it.

* 2 processes give the same losses and weights as 1 process at the same global batch, for plain
  DDP (`--deepspeed none`) and for the scripts' default DeepSpeed ZeRO-2 (one process accumulates 2
  micro-batches; two processes take one each): finetune_hf_trainer_hateful_memes.py end to end.
* Batches that mix text-only and image samples across ranks (and within a batch) never hang, with
  ZeRO-2 and ZeRO-3: tests/mixed_batches_torchrun.py under torchrun, with a timeout that kills the
  whole process group, so a hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from safetensors.torch import load_file

import process_group
from conftest import REPO, free_port, script_env
from cauldron_data import write_memes_dataset
from mixed_batches_torchrun import EVAL_PLAN, PLAN

SCRIPT = "finetune_hf_trainer_hateful_memes.py"
HANG_TIMEOUT = 300  # seconds for a whole torchrun (a healthy one takes well under a minute)


@pytest.fixture(scope="module")
def memes_dir(tmp_path_factory):
    return write_memes_dataset(tmp_path_factory.mktemp("memes") / "data")


def logged(output_dir):
    history = json.loads((output_dir / "log_history.json").read_text())
    return {e["step"]: (e["loss"], e["grad_norm"], e["learning_rate"]) for e in history if "loss" in e}


def test_two_processes_match_one(run_script, tiny_model_dir, memes_dir, tmp_path):
    args = ["--model_name_or_path", tiny_model_dir, "--dataset_path", memes_dir, "--eval_size", 0,
            "--dataloader_num_workers", 0, "--num_crops", 1, "--batch_size", 2, "--batch_size_per_gpu", 1,
            "--max_steps", 3, "--warmup_steps", 0, "--logging_steps", 1, "--learning_rate", 1e-3, "--no-tqdm"]
    # The one-process run (one thread) goes side by side with the first two-process run.
    one, one_log = tmp_path / "one_process", tmp_path / "one_process.log"
    one_run = process_group.start([sys.executable, REPO / SCRIPT, *args, "--output_dir", one, "--deepspeed", "none"],
                                  script_env({"OMP_NUM_THREADS": "1"}), one_log, cwd=REPO)
    try:
        ddp = run_script(SCRIPT, *args, "--output_dir", tmp_path / "ddp", "--deepspeed", "none", nproc=2,
                         timeout=HANG_TIMEOUT)
        output = process_group.finish(one_run, one_log, timeout=HANG_TIMEOUT)
    finally:
        if one_run.poll() is None:
            process_group.kill_group(one_run)
    assert "world size 1, batch 2 = 1 per GPU x 1 x 2 accumulation" in output
    expected = logged(one)
    expected_weights = load_file(one / "model.safetensors")
    initial = load_file(tiny_model_dir / "model.safetensors")

    zero2 = run_script(SCRIPT, *args, "--output_dir", tmp_path / "zero2", nproc=2, timeout=HANG_TIMEOUT)  # the default

    for name, proc, banner in [("ddp", ddp, "DeepSpeed off"), ("zero2", zero2, "DeepSpeed on")]:
        out = tmp_path / name
        assert f"full fine-tuning, {banner}, world size 2, batch 2 = 1 per GPU x 2 x 1 accumulation" in proc.stdout
        got = logged(out)
        assert list(got) == list(expected) == [1, 2, 3]
        for step, (loss, grad_norm, learning_rate) in expected.items():
            # Losses are per supervised token over the whole global batch (counted across ranks).
            assert got[step][0] == pytest.approx(loss, rel=1e-5), f"{name} step {step} loss"
            assert got[step][1] == pytest.approx(grad_norm, rel=1e-4), f"{name} step {step} grad norm"
            assert got[step][2] == pytest.approx(learning_rate), f"{name} step {step} learning rate"
        weights = load_file(out / "model.safetensors")
        assert weights.keys() == expected_weights.keys()
        for key, tensor in expected_weights.items():
            # Each step moves weights by ~lr = 1e-3; summation order differs across ranks by ~1e-7.
            torch.testing.assert_close(weights[key], tensor, rtol=0, atol=1e-6, msg=lambda m: f"{name} {key}: {m}")
        assert max((weights[k] - initial[k]).abs().max().item() for k in initial) > 1e-3  # it did train


@pytest.mark.parametrize("stage", [2, 3])
def test_mixed_text_and_image_batches_do_not_hang(stage, tiny_model_dir, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           REPO / "tests" / "mixed_batches_torchrun.py", tiny_model_dir, tmp_path,
           REPO / "ds_configs" / f"zero{stage}.json"]
    output = process_group.run(cmd, script_env({"OMP_NUM_THREADS": "1"}), tmp_path / "torchrun.log",
                               timeout=HANG_TIMEOUT, cwd=REPO)
    assert "rank 0 done" in output and "rank 1 done" in output
    for rank in range(2):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert (record["deepspeed"], record["zero_stage"], record["world_size"]) == (True, stage, 2)
        # Each rank trained (and evaluated) on exactly the planned rows: text-only on one rank while
        # the other had images, and a batch mixing both.
        for steps, plan in ((record["steps"], PLAN), (record["eval_steps"], EVAL_PLAN)):
            assert [(s["rows"], s["images"]) for s in steps] == [(2, step[rank].count("image")) for step in plan]
            assert all(math.isfinite(s["loss"]) for s in steps)
