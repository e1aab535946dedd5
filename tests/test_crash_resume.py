"""Crash safety: a run SIGKILLed in the middle and resumed with `--resume_from_checkpoint latest` ends
with the same logged losses and the same weights as a run that was never interrupted; half-written
checkpoints are never picked for resuming.

End to end on finetune_hf_trainer_hateful_memes.py (the cheapest recipe; the four scripts share the
resume code): full fine-tuning on the default DeepSpeed ZeRO-2 path, and LoRA (plain PyTorch
checkpoints: optimizer.pt, scheduler.pt, rng_state.pth) with LoRA dropout, so that the restored RNG
state matters. Plus `phi3v.last_complete_checkpoint` on hand-made broken checkpoint folders.
"""

from __future__ import annotations

import json
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import process_group
from conftest import REPO, script_env
from cauldron_data import write_memes_dataset

import phi3v

SCRIPT = "finetune_hf_trainer_hateful_memes.py"
NUM_STEPS = 4
KILL_AT = 2  # SIGKILL as soon as checkpoint-2 starts to be written: mid-save, steps 3-4 not run yet


@pytest.fixture(scope="module")
def memes_dir(tmp_path_factory):
    return write_memes_dataset(tmp_path_factory.mktemp("memes") / "data")


def script_args(tiny_model_dir, memes_dir, output_dir, mode):
    args = ["--model_name_or_path", tiny_model_dir, "--dataset_path", memes_dir, "--output_dir", output_dir,
            "--eval_size", 0, "--dataloader_num_workers", 0, "--num_crops", 1, "--batch_size", 1,
            "--max_steps", NUM_STEPS, "--save_steps", 1, "--warmup_steps", 0, "--logging_steps", 1,
            "--learning_rate", 1e-3, "--no-tqdm"]
    if mode == "lora":
        args += ["--use_lora", "--lora_rank", 4, "--lora_dropout", 0.1]
    return [sys.executable, REPO / SCRIPT, *args]


def logged_steps(output_dir: Path) -> dict[int, list[float]]:
    history = json.loads((output_dir / "log_history.json").read_text())
    return {e["step"]: [e["loss"], e["grad_norm"], e["learning_rate"]] for e in history if "loss" in e}


def break_copies(output_dir: Path, complete: Path):
    """Newer checkpoint folders as a kill while saving leaves them (resume must skip every one)."""
    no_state = output_dir / f"checkpoint-{NUM_STEPS + 1}"  # killed before trainer_state.json was written
    shutil.copytree(complete, no_state)
    (no_state / "trainer_state.json").unlink()
    cut_state = output_dir / f"checkpoint-{NUM_STEPS + 2}"  # killed while writing trainer_state.json
    shutil.copytree(complete, cut_state)
    text = (cut_state / "trainer_state.json").read_text()
    (cut_state / "trainer_state.json").write_text(text[: len(text) // 2])
    (output_dir / f"checkpoint-{NUM_STEPS + 3}").mkdir()  # killed right after creating the folder


@pytest.mark.parametrize("mode", ["full_zero2", "lora"])
def test_sigkill_and_resume_matches_uninterrupted_run(mode, tiny_model_dir, memes_dir, tmp_path):
    env = script_env({"OMP_NUM_THREADS": "1"})

    # A: NUM_STEPS steps, never interrupted (side by side with B: one thread each).
    reference = tmp_path / "reference"
    reference_log = tmp_path / "reference.log"
    reference_run = process_group.start(script_args(tiny_model_dir, memes_dir, reference, mode), env, reference_log,
                                        cwd=REPO)

    try:
        # B: the same run, SIGKILLed (whole process group) the moment checkpoint-KILL_AT appears.
        out = tmp_path / "killed"
        log = tmp_path / "killed.log"
        proc = process_group.start(script_args(tiny_model_dir, memes_dir, out, mode), env, log, cwd=REPO)
        process_group.wait_for(out / f"checkpoint-{KILL_AT}", proc, log, timeout=600)
        process_group.kill_group(proc)
        assert not (out / "log_history.json").exists() and not (out / f"checkpoint-{NUM_STEPS}").exists(), \
            "the kill must land in the middle of training"
        newest_complete = phi3v.last_complete_checkpoint(out)
        assert newest_complete is not None
        resumed_step = int(Path(newest_complete).name.split("-")[1])
        assert 1 <= resumed_step <= KILL_AT
        break_copies(out, Path(newest_complete))
        process_group.finish(reference_run, reference_log, timeout=600)
    finally:
        if reference_run.poll() is None:  # B failed: do not leave A running
            process_group.kill_group(reference_run)

    # Resume B with "latest": must continue from the newest complete checkpoint and end as A.
    output = process_group.run(
        script_args(tiny_model_dir, memes_dir, out, mode) + ["--resume_from_checkpoint", "latest"],
        env, tmp_path / "resumed.log", timeout=600, cwd=REPO)
    assert f"resuming from {newest_complete}" in output
    assert output.count("{'loss': ") == NUM_STEPS - resumed_step, "only the steps after the checkpoint run again"
    for step in (NUM_STEPS + 1, NUM_STEPS + 2, NUM_STEPS + 3):
        assert f"checkpoint-{step} is incomplete" in output

    # Same data order, RNG, optimizer and scheduler: the same loss, gradient norm and learning rate
    # at every step (the steps before the kill come from the checkpoint's trainer_state.json).
    expected, got = logged_steps(reference), logged_steps(out)
    assert list(got) == list(expected) == list(range(1, NUM_STEPS + 1))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), f"step {step}"
    weights = "adapter_model.safetensors" if mode == "lora" else "model.safetensors"
    expected_weights, got_weights = load_file(reference / weights), load_file(out / weights)
    assert got_weights.keys() == expected_weights.keys()
    for name, tensor in expected_weights.items():
        torch.testing.assert_close(got_weights[name], tensor, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
    # Steps after checkpoint-1 did change the weights (the comparison is not between two copies of it).
    first = load_file(out / "checkpoint-1" / weights)
    assert any(not torch.equal(got_weights[name], first[name]) for name in first)
    if mode == "full_zero2":  # each full fine-tuning checkpoint-N is also a drop-in model folder (phi3v/saving.py)
        for folder in (out / "checkpoint-1", out / f"checkpoint-{NUM_STEPS}", out):
            assert (folder / "tokenizer_config.json").read_bytes() == (tiny_model_dir / "tokenizer_config.json").read_bytes()
            assert json.loads((folder / "preprocessor_config.json").read_text())["num_crops"] == 1


# ------------------------------------------------------------------------------------------
# phi3v.last_complete_checkpoint on hand-made folders
# ------------------------------------------------------------------------------------------


def fake_checkpoint(output_dir: Path, step: int, ranks: int = 1, deepspeed: bool = False) -> Path:
    """The files the Trainer writes, in its order; trainer_state.json last (by rank 0)."""
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    if deepspeed:
        (folder / f"global_step{step}").mkdir()
        for rank in range(ranks):
            torch.save({}, folder / f"global_step{step}" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    else:
        torch.save({"state": {}}, folder / "optimizer.pt")
    torch.save({}, folder / "scheduler.pt")
    names = ["rng_state.pth"] if ranks == 1 else [f"rng_state_{rank}.pth" for rank in range(ranks)]
    for name in names:
        torch.save({"cpu": torch.random.get_rng_state()}, folder / name)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    return folder


def truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_last_complete_checkpoint(tmp_path):
    assert phi3v.last_complete_checkpoint(tmp_path / "missing") is None
    assert phi3v.last_complete_checkpoint(tmp_path) is None
    good = fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 9)  # older: never picked over 10
    (tmp_path / "checkpoint-99.tmp").mkdir()  # not a checkpoint-N name
    (tmp_path / "checkpoint-50").write_text("a file, not a folder")
    assert phi3v.last_complete_checkpoint(tmp_path) == str(good)

    # Each way a SIGKILL while saving leaves the newest folder: all skipped, with a warning naming it.
    broken = {
        11: lambda f: (f / "trainer_state.json").unlink(),
        12: lambda f: (f / "trainer_state.json").write_text('{"global_step": 12, "log_'),
        13: lambda f: (f / "model.safetensors").unlink(),
        # Rank 0 writes trainer_state.json without waiting for the other ranks' RNG files.
        14: lambda f: (f / "rng_state_1.pth").unlink(),
        15: lambda f: truncate(f / "rng_state_1.pth"),
        16: lambda f: truncate(f / "optimizer.pt"),
    }
    for step, damage in broken.items():
        damage(fake_checkpoint(tmp_path, step, ranks=2))
    with pytest.warns(UserWarning) as warned:
        assert phi3v.last_complete_checkpoint(tmp_path) == str(good)
    messages = "\n".join(str(w.message) for w in warned)
    for step in broken:
        assert f"checkpoint-{step} is incomplete" in messages

    # DeepSpeed: the optimizer is one file per rank (all written before trainer_state.json), and it
    # tells how many ranks must have left an RNG file.
    ds = fake_checkpoint(tmp_path, 20, ranks=2, deepspeed=True)
    assert phi3v.last_complete_checkpoint(tmp_path) == str(ds)
    ds3 = fake_checkpoint(tmp_path, 21, ranks=3, deepspeed=True)
    (ds3 / "rng_state_2.pth").unlink()
    with pytest.warns(UserWarning, match="checkpoint-21 is incomplete"):
        assert phi3v.last_complete_checkpoint(tmp_path) == str(ds)
    # LoRA checkpoints hold the adapter instead of the model; a one-process run has rng_state.pth.
    lora = fake_checkpoint(tmp_path, 30)
    (lora / "model.safetensors").rename(lora / "adapter_model.safetensors")
    assert phi3v.last_complete_checkpoint(tmp_path) == str(lora)
    assert zipfile.is_zipfile(lora / "rng_state.pth")  # torch.save writes zip archives: truncation shows
