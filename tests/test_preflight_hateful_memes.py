"""finetune_hf_trainer_hateful_memes.py: bad arguments and bad data are refused before training.

Bad arguments are checked in-process with `parse_args`. Bad data runs the real script on a small
save_to_disk copy of the_cauldron/hateful_memes with exactly one kind of defect per case: it must
exit non-zero with one report naming every bad row, without a traceback, before any model is loaded.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = "finetune_hf_trainer_hateful_memes.py"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("finetune_hateful_memes_preflight", REPO / SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------
# Bad arguments
# ------------------------------------------------------------------------------------------


def parse_error(script, capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args([str(a) for a in argv])
    assert exit_info.value.code == 2  # argparse's usage error, not a crash
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, fake, message",
    [
        (["--num_crops", "0"], {}, "--num_crops must be between 1 and 16, got 0"),
        (["--num_crops", "17"], {}, "--num_crops must be between 1 and 16, got 17"),
        (["--batch_size", "4", "--batch_size_per_gpu", "3"], {}, "--batch_size 4 must be a multiple of world size 1"),
        (["--batch_size", "6", "--batch_size_per_gpu", "2"], {"WORLD_SIZE": "2"},
         "--batch_size 6 must be a multiple of world size 2 x --batch_size_per_gpu 2"),
        (["--batch_size_per_gpu", "0"], {}, "--batch_size_per_gpu (0) must be >= 1"),
        (["--use_flash_attention", "--bf16"], {"cuda": False}, "--use_flash_attention needs a CUDA GPU"),
        (["--use_flash_attention", "--bf16"], {"cuda": True, "flash_attn": False},
         "--use_flash_attention needs the flash-attn package"),
        (["--use_flash_attention"], {"cuda": True, "flash_attn": True}, "--use_flash_attention needs --bf16"),
        (["--use_qlora"], {"bitsandbytes": False}, "--use_qlora needs bitsandbytes"),
    ],
)
def test_bad_arguments(script, monkeypatch, capsys, tmp_path, argv, fake, message):
    """Each bad flag combination fails at parse time with its own message (GPU/packages faked)."""
    if "WORLD_SIZE" in fake:
        monkeypatch.setenv("WORLD_SIZE", fake["WORLD_SIZE"])
    else:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    if "cuda" in fake:
        monkeypatch.setattr(script.torch.cuda, "is_available", lambda: fake["cuda"])
    if "flash_attn" in fake:
        monkeypatch.setattr(script, "is_flash_attn_2_available", lambda: fake["flash_attn"])
    if "bitsandbytes" in fake:
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(script.importlib.util, "find_spec",
                            lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a))
    assert message in parse_error(script, capsys, [*argv, "--output_dir", tmp_path / "out"])


def test_good_arguments_pass(script, monkeypatch, tmp_path):
    monkeypatch.setattr(script.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(script, "is_flash_attn_2_available", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = script.parse_args(["--use_flash_attention", "--bf16", "--batch_size", "8", "--batch_size_per_gpu", "2",
                              "--num_crops", "1", "--output_dir", str(tmp_path / "out")])
    assert args.use_flash_attention and args.num_crops == 1


def test_bad_dataset_path(script, capsys, tmp_path):
    out = ["--output_dir", tmp_path / "out"]
    message = parse_error(script, capsys, ["--dataset_path", tmp_path / "nowhere", *out])
    assert f"--dataset_path {tmp_path / 'nowhere'}: does not exist" in message
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "train.jsonl").write_text("{}\n")
    message = parse_error(script, capsys, ["--dataset_path", empty, *out])
    assert f"--dataset_path {empty}: is neither a save_to_disk folder (no state.json or dataset_dict.json)" in message
    message = parse_error(script, capsys, ["--dataset_path", empty / "sub" / "train.jsonl", *out])
    assert "train.jsonl: is a file but not a .parquet file" in message
    # What load_data reads passes: a parquet file, a folder holding parquet files, a save_to_disk folder.
    (empty / "sub" / "part-0.parquet").write_bytes(b"")
    for good in (empty, empty / "sub" / "part-0.parquet"):
        assert script.parse_args(["--dataset_path", str(good), "--output_dir", str(tmp_path / "out")])
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "state.json").write_text("{}")
    assert script.parse_args(["--dataset_path", str(saved), "--output_dir", str(tmp_path / "out")])


@pytest.mark.parametrize("finished_file", ["eval_after.json", "model.safetensors", "adapter_model.safetensors",
                                           "log_history.json"])
def test_finished_output_dir_needs_overwrite(script, capsys, tmp_path, finished_file):
    out = tmp_path / "run"
    (out / "checkpoint-4").mkdir(parents=True)
    (out / finished_file).write_text("{}")
    message = parse_error(script, capsys, ["--output_dir", out])
    assert f"--output_dir {out} already holds a finished run ({finished_file})" in message
    assert "--overwrite_output_dir" in message
    # Resuming does not make a finished run unfinished.
    message = parse_error(script, capsys, ["--output_dir", out, "--resume_from_checkpoint", "latest"])
    assert "already holds a finished run" in message
    assert script.parse_args(["--output_dir", str(out), "--overwrite_output_dir"]).overwrite_output_dir
    assert (out / finished_file).exists()  # parsing deletes nothing


def test_unfinished_output_dir_resumes(script, tmp_path):
    """An interrupted run (checkpoints, eval_before.json, no final model) is resumed in place."""
    out = tmp_path / "run"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "eval_before.json").write_text("{}")
    args = script.parse_args(["--output_dir", str(out), "--resume_from_checkpoint", "latest"])
    assert args.resume_from_checkpoint == "latest" and not args.overwrite_output_dir
