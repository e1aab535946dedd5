"""finetune_hf_trainer_nlvr2.py refuses bad arguments and bad data before training, with clear messages."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import REPO

SCRIPT = "finetune_hf_trainer_nlvr2.py"


def load_script():
    spec = importlib.util.spec_from_file_location("finetune_nlvr2_preflight", REPO / SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return load_script()


# ----------------------------------------------------------------------------------------------
# Bad arguments: parse_args stops with one line naming the flag
# ----------------------------------------------------------------------------------------------

NO_FLASH_ATTN = {"cuda": True, "missing": {"flash_attn"}}
NO_BITSANDBYTES = {"missing": {"bitsandbytes"}}


@pytest.mark.parametrize("argv, env, message", [
    (["--num_crops", "0"], {}, "--num_crops must be between 1 and 16, got 0"),
    (["--num_crops", "17"], {}, "--num_crops must be between 1 and 16, got 17"),
    (["--use_flash_attention"], {}, "--use_flash_attention needs --bf16"),  # fp16 AMP with flash attention
    (["--use_flash_attention", "--bf16"], {"cuda": False}, "--use_flash_attention needs a CUDA GPU"),
    (["--use_flash_attention", "--bf16"], NO_FLASH_ATTN, "--use_flash_attention needs the flash-attn package"),
    (["--use_qlora"], NO_BITSANDBYTES, "--use_qlora needs the bitsandbytes package"),
    (["--batch_size", "3", "--batch_size_per_gpu", "2"], {}, "--batch_size 3 is not divisible by world_size 1 x "
                                                             "--batch_size_per_gpu 2"),
    (["--batch_size", "6", "--batch_size_per_gpu", "2"], {"WORLD_SIZE": "2"},
     "--batch_size 6 is not divisible by world_size 2 x --batch_size_per_gpu 2"),
    (["--merge_lora"], {}, "--merge_lora only applies"),
    (["--max_length", "-1"], {}, "--max_length must be >= 0"),
    (["--eval_batch_size", "0"], {}, "--eval_batch_size must be >= 1"),
    (["--resume_from_checkpoint", "/nonexistent/ckpt"], {}, "is not a folder"),
], ids=["crops0", "crops17", "flash_fp16", "flash_no_cuda", "flash_no_package", "qlora_no_bnb",
        "batch_divisible", "batch_divisible_world2", "merge_without_lora", "max_length", "eval_batch", "resume_dir"])
def test_bad_arguments(script, monkeypatch, capsys, tmp_path, argv, env, message):
    env = dict(env)
    if "cuda" in env:
        cuda = env.pop("cuda")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    missing = env.pop("missing", set())
    if missing:
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else find_spec(name, *a))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args([*argv, "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_good_arguments(script, tmp_path):
    args = script.parse_args(["--use_qlora", "--output_dir", str(tmp_path / "out")])
    assert args.use_lora and args.deepspeed  # QLoRA implies LoRA; the DeepSpeed config is ignored later
    args = script.parse_args(["--batch_size", "8", "--batch_size_per_gpu", "2", "--deepspeed", "none",
                              "--output_dir", str(tmp_path / "out")])
    assert args.deepspeed == ""


@pytest.mark.parametrize("layout, message", [
    ("missing", "no such file or folder"),
    ("empty_dir", "the folder holds neither a save_to_disk dataset (state.json or dataset_dict.json) nor any *.parquet file"),
    ("json_file", "not a .parquet file"),
], ids=["missing", "empty_dir", "json_file"])
def test_dataset_path_without_expected_files(script, capsys, tmp_path, layout, message):
    path = tmp_path / "data"
    if layout == "empty_dir":
        path.mkdir()
        (path / "README.md").write_text("no data here")
    elif layout == "json_file":
        path = tmp_path / "data.json"
        path.write_text("{}")
    with pytest.raises(SystemExit):
        script.parse_args(["--dataset_path", str(path), "--output_dir", str(tmp_path / "out")])
    assert f"--dataset_path {path}: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("finished_file", ["eval_after.json", "model.safetensors", "adapter_config.json"])
def test_output_dir_with_finished_run(script, capsys, tmp_path, finished_file):
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval_before.json").write_text("{}")
    (out / finished_file).write_text("{}")
    with pytest.raises(SystemExit):
        script.parse_args(["--output_dir", str(out)])
    err = capsys.readouterr().err
    assert f"--output_dir {out} already holds a finished run ({finished_file})" in err
    assert "--overwrite_output_dir" in err
    # Resuming does not make a finished run writable either.
    (out / "checkpoint-2").mkdir()
    (out / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2}')
    with pytest.raises(SystemExit):
        script.parse_args(["--output_dir", str(out), "--resume_from_checkpoint", str(out / "checkpoint-2")])
    assert "already holds a finished run" in capsys.readouterr().err

    args = script.parse_args(["--output_dir", str(out), "--overwrite_output_dir"])
    assert args.overwrite_output_dir
    assert "files of this run will be written over them (nothing is deleted)" in capsys.readouterr().out
    assert (out / finished_file).exists() and (out / "checkpoint-2").exists()  # nothing deleted


def test_output_dir_with_checkpoints_of_unfinished_run(script, capsys, tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-4").mkdir(parents=True)
    (out / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4}')
    (out / "eval_before.json").write_text("{}")  # written before training: not a finished run
    with pytest.raises(SystemExit):
        script.parse_args(["--output_dir", str(out)])
    assert "holds checkpoints of an unfinished run (checkpoint-4); pass --resume_from_checkpoint latest" in (
        capsys.readouterr().err)
    # 'latest' skips a newer checkpoint cut off by a kill while it was saved (no trainer_state.json).
    (out / "checkpoint-6").mkdir()
    (out / "checkpoint-6" / "model.safetensors").write_text("half written")
    with pytest.warns(UserWarning, match="checkpoint-6 is incomplete"):
        args = script.parse_args(["--output_dir", str(out), "--resume_from_checkpoint", "latest"])
    assert args.resume_from_checkpoint == str(out / "checkpoint-4")
    assert f"resuming from {out / 'checkpoint-4'}" in capsys.readouterr().out
    assert script.parse_args(["--output_dir", str(out), "--overwrite_output_dir"]).resume_from_checkpoint is None
