"""finetune_hf_trainer_nlvr2.py refuses bad arguments and bad data before training, with clear messages."""

from __future__ import annotations

import importlib.util
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import REPO
from preflight_helpers import encode, parse_error, refuse_model_weights, truncated_jpeg, unusual_images
from cauldron_data import cauldron_features

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
], ids=["crops0", "crops17", "flash_no_cuda", "flash_no_package", "qlora_no_bnb",
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
    assert message in parse_error(script, capsys, [*argv, "--output_dir", tmp_path / "out"])


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
    err = parse_error(script, capsys, ["--dataset_path", path, "--output_dir", tmp_path / "out"])
    assert f"--dataset_path {path}: {message}" in err


@pytest.mark.parametrize("finished_file", ["eval_after.json", "model.safetensors", "adapter_config.json"])
def test_output_dir_with_finished_run(script, capsys, tmp_path, finished_file):
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval_before.json").write_text("{}")
    (out / finished_file).write_text("{}")
    err = parse_error(script, capsys, ["--output_dir", out])
    assert f"--output_dir {out} already holds a finished run ({finished_file})" in err
    assert "--overwrite_output_dir" in err
    # Resuming does not make a finished run writable either.
    write_checkpoint(out / "checkpoint-2", 2)
    err = parse_error(script, capsys, ["--output_dir", out, "--resume_from_checkpoint", out / "checkpoint-2"])
    assert "already holds a finished run" in err

    args = script.parse_args(["--output_dir", str(out), "--overwrite_output_dir"])
    assert args.overwrite_output_dir
    assert "files of this run will be written over them (nothing is deleted)" in capsys.readouterr().out
    assert (out / finished_file).exists() and (out / "checkpoint-2").exists()  # nothing deleted


def write_checkpoint(folder, step):
    """What the Trainer leaves in a complete checkpoint-N (contents made up)."""
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    torch.save({}, folder / "optimizer.pt")
    torch.save({}, folder / "rng_state.pth")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))


def test_output_dir_with_checkpoints_of_unfinished_run(script, capsys, tmp_path):
    out = tmp_path / "out"
    write_checkpoint(out / "checkpoint-4", 4)
    (out / "eval_before.json").write_text("{}")  # written before training: not a finished run
    err = parse_error(script, capsys, ["--output_dir", out])
    assert "holds checkpoints of an unfinished run (checkpoint-4); pass --resume_from_checkpoint latest" in err
    # 'latest' skips a newer checkpoint cut off by a kill while it was saved (no trainer_state.json).
    (out / "checkpoint-6").mkdir()
    (out / "checkpoint-6" / "model.safetensors").write_text("half written")
    with pytest.warns(UserWarning, match="checkpoint-6 is incomplete"):
        args = script.parse_args(["--output_dir", str(out), "--resume_from_checkpoint", "latest"])
    assert args.resume_from_checkpoint == str(out / "checkpoint-4")
    assert f"resuming from {out / 'checkpoint-4'}" in capsys.readouterr().out
    assert script.parse_args(["--output_dir", str(out), "--overwrite_output_dir"]).resume_from_checkpoint is None


# ----------------------------------------------------------------------------------------------
# Bad data: the real script stops before training with one report naming the row and the reason
# ----------------------------------------------------------------------------------------------

NUM_EVAL = 2  # --eval_size: rows 0-1 are held out, the rest are training rows


def picture(width=64, height=48, colour=(200, 30, 30)):
    return {"bytes": encode(Image.new("RGB", (width, height), colour)), "path": None}


def good_row(question="Are both images red?", answer="True"):
    return {"images": [picture(), picture(40, 64, (30, 30, 200))],
            "texts": [{"user": question, "assistant": answer, "source": "nlvr2"}]}


def write_rows(folder, rows, form="disk", columns=("images", "texts")):
    """the_cauldron's nlvr2 layout (images: list of Image, texts: list of turns), as save_to_disk or parquet."""
    from datasets import Dataset

    features = cauldron_features()
    data = Dataset.from_dict({k: [r[k] for r in rows] for k in ("images", "texts")}, features=features)
    if list(columns) != ["images", "texts"]:
        data = data.rename_columns(dict(zip(["images", "texts"], columns)))
    if form == "disk":
        data.save_to_disk(str(folder))
    elif form == "parquet":
        folder.mkdir(parents=True)
        data.to_parquet(str(folder / "part-0.parquet"))
    else:  # "parquet_by_path": images that are files stay references (save_to_disk would embed them)
        import pyarrow.parquet as pq

        folder.mkdir(parents=True)
        pq.write_table(data.data.table, str(folder / "part-0.parquet"))
    return folder


def with_defect(row_index, change):
    """Good rows 0..5; row `row_index` changed in place by `change(row)`."""
    rows = [good_row() for _ in range(6)]
    change(rows[row_index])
    return rows


def set_image(index, value):
    def change(row):
        row["images"][index] = value
    return change


def set_turn(**fields):
    def change(row):
        row["texts"][-1].update(fields)
    return change


def truncated_jpeg_cell():
    return {"bytes": truncated_jpeg(), "path": None}


# Stored by path only (bytes None), and gone by the time of the run.
MOVED_IMAGE = Path(tempfile.mkdtemp(prefix="nlvr2-preflight-")) / "left.png"
LONG_QUESTION = "Is the left picture " + "very " * 400 + "red?"

# (id, rows, storage, extra arguments, message in the report, where in the report): one kind of defect each.
BAD_DATA = [
    ("one_image", lambda: with_defect(3, lambda r: r["images"].pop()), "disk", [],
     "1 image(s); NLVR2 rows need exactly 2", "row 3 (train)"),
    ("missing_image_file", lambda: with_defect(2, set_image(0, {"bytes": None, "path": str(MOVED_IMAGE)})),
     "parquet_by_path", [],
     f"image 1: image file not found: {MOVED_IMAGE}", "part-0.parquet row 2 (train)"),
    ("truncated_jpeg", lambda: with_defect(5, set_image(1, truncated_jpeg_cell())), "disk", [],
     "image 2: corrupt or truncated image", "row 5 (train)"),
    ("not_an_image", lambda: with_defect(1, set_image(0, {"bytes": b"<html>404 not found</html>", "path": None})),
     "disk", [],
     "image 1: not an image PIL can read", "row 1 (eval)"),
    ("empty_answer", lambda: with_defect(4, set_turn(assistant="  ")), "disk", [], "turn 1: empty assistant text",
     "row 4 (train)"),
    ("no_turns", lambda: with_defect(3, lambda r: r["texts"].clear()), "disk", [],
     "no conversation: 'texts' must be a non-empty list", "row 3 (train)"),
    ("image_tag_in_question", lambda: with_defect(2, set_turn(user="<|image_1|>Is the left image red?")), "disk", [],
     "turn 1 (the prompt with both images): the text's image tags (<|image_1|>, <|image_2|>, <|image_1|>)",
     "row 2 (train)"),
    ("too_long", lambda: with_defect(4, set_turn(user=LONG_QUESTION)), "disk", ["--max_length", 1000],
     "tokens (images included) > --max_length 1000", "row 4 (train)"),
]


def run_args(tiny_model_dir, data, out, *extra):
    return ["--model_name_or_path", tiny_model_dir, "--dataset_path", data, "--output_dir", out,
            "--eval_size", NUM_EVAL, "--num_crops", 1, "--batch_size", 2, "--deepspeed", "none",
            "--dataloader_num_workers", 0, "--no-tqdm", *extra]


def assert_stopped_before_training(exit_code, output, out):
    assert exit_code == 1, output[-3000:]
    assert "Traceback" not in output
    assert "setup:" not in output  # the trainer was never built
    assert not (out / "eval_before.json").exists() and not (out / "log_history.json").exists()
    assert not list(out.glob("checkpoint-*")) and not list(out.glob("*.safetensors"))


@pytest.mark.parametrize("make_rows, storage, extra, message, where", [case[1:] for case in BAD_DATA],
                         ids=[case[0] for case in BAD_DATA])
def test_bad_row_stops_before_training(script, tiny_model_dir, tmp_path, capsys, make_rows, storage, extra, message,
                                       where):
    """In this process (a new one per case would add ~8 s of imports each); a real process exiting with status
    1 and no traceback: test_unreadable_dataset_stops_before_training."""
    Image.new("RGB", (32, 32)).save(MOVED_IMAGE)  # exists while the dataset is written
    data = write_rows(tmp_path / "data", make_rows(), form=storage)
    MOVED_IMAGE.unlink()
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:  # any other exception fails the test
        script.main([str(a) for a in run_args(tiny_model_dir, data, out, *extra)])
    output = "".join(capsys.readouterr())  # stdout and stderr, as the subprocess runs see them
    assert_stopped_before_training(exit_info.value.code, output, out)
    assert "1 invalid row(s) in the NLVR2 data" in output
    report_line = next(line for line in output.splitlines() if line.startswith(f"  {where}: "))
    assert message in report_line, report_line
    assert "pass --skip_invalid to train without them" in output
    listed = [json.loads(line) for line in (out / "invalid_rows.jsonl").read_text().splitlines()]
    assert len(listed) == 1 and listed[0]["where"] == where and message in listed[0]["reason"]


@pytest.mark.parametrize("case", ["missing_column", "unreadable_parquet"])
def test_unreadable_dataset_stops_before_training(tiny_model_dir, run_script, tmp_path, case):
    if case == "missing_column":
        data = write_rows(tmp_path / "data", [good_row() for _ in range(4)], columns=("images", "conversations"))
        message = f"--dataset_path {data}: missing column(s) texts (found: images, conversations)"
    else:
        data = write_rows(tmp_path / "data", [good_row() for _ in range(4)], form="parquet")
        (data / "part-1.parquet").write_bytes(b"PAR1 not really parquet")
        message = f"{data / 'part-1.parquet'}: not a readable parquet file"
    out = tmp_path / "out"
    proc = run_script(SCRIPT, *run_args(tiny_model_dir, data, out), check=False)
    assert_stopped_before_training(proc.returncode, proc.stdout, out)
    assert message in proc.stdout


def test_skip_invalid_trains_on_the_rest_with_unusual_images(tiny_model_dir, run_main, tmp_path):
    """--skip_invalid: bad rows (eval and train) are listed in skipped_rows.jsonl and left out; the unusual
    but valid images pass the preflight and go through the collator and generation (one step sees all)."""
    unusual = unusual_images()
    valid_train = [good_row() for _ in unusual]
    for row, image in zip(valid_train, unusual.values()):
        row["images"][0] = {"bytes": image.data, "path": None}
    eval_rows = [good_row(), good_row()]
    eval_rows[0]["images"][1] = {"bytes": unusual["cmyk.jpg"].data, "path": None}
    eval_rows[1]["images"][1] = None
    bad_train = [good_row() for _ in range(4)]
    bad_train[0]["images"].append(picture())
    bad_train[1]["images"][0] = picture(1, 1)
    bad_train[2]["texts"][0]["user"] = None
    bad_train[3]["texts"].append({"user": "And <|image_1|>?", "assistant": "No", "source": "nlvr2"})
    train_rows = valid_train[:3] + bad_train[:2] + valid_train[3:] + bad_train[2:]
    # Two parquet files: the report names the file and the row in it.
    data = tmp_path / "data"
    write_rows(tmp_path / "part0", eval_rows, form="parquet")
    write_rows(tmp_path / "part1", train_rows, form="parquet")
    data.mkdir()
    (tmp_path / "part0" / "part-0.parquet").rename(data / "part-0.parquet")
    (tmp_path / "part1" / "part-0.parquet").rename(data / "part-1.parquet")

    out = tmp_path / "out"
    n = len(valid_train)
    proc = run_main(SCRIPT, *run_args(tiny_model_dir, data, out, "--skip_invalid", "--max_steps", 1,
                                      "--batch_size", n, "--batch_size_per_gpu", n, "--max_new_tokens", 2,
                                      "--logging_steps", 1, "--learning_rate", 1e-3))
    assert "Traceback" not in proc.stdout
    assert "5 invalid row(s) in the NLVR2 data" in proc.stdout and "--skip_invalid: training without them" in proc.stdout
    assert f"data: {n} training rows, 1 held-out rows (5 invalid rows skipped)" in proc.stdout
    skipped = [json.loads(line) for line in (out / "skipped_rows.jsonl").read_text().splitlines()]
    assert [(s["where"], s["reason"]) for s in skipped] == [
        ("part-0.parquet row 1 (eval)", "image 2: missing (null)"),
        ("part-1.parquet row 3 (train)", "3 image(s); NLVR2 rows need exactly 2"),
        ("part-1.parquet row 4 (train)", "image 1: image is 1x1 pixels; at least 2x2 needed"),
        ("part-1.parquet row 10 (train)", "turn 1: missing user text"),
        ("part-1.parquet row 11 (train)",
         "turn 2 (a text-only turn): the text has image tags (<|image_1|>) but no images are listed"),
    ]
    assert not (out / "invalid_rows.jsonl").exists()
    # One step of n samples: every unusual image was decoded, cropped and trained on.
    history = json.loads((out / "log_history.json").read_text())
    steps = [h for h in history if "loss" in h]
    assert len(steps) == 1 and math.isfinite(steps[0]["loss"]) and steps[0]["images_per_second"] > 0
    assert json.loads((out / "eval_after.json").read_text())["num_samples"] == 1


def test_preflight_only(script, tiny_model_dir, tmp_path, capsys, monkeypatch):
    """--preflight_only: every row measured (bad ones too), a summary printed and written, exit 0 when the data is
    clean and 1 when not; no model weights loaded, nothing else written."""
    refuse_model_weights(monkeypatch)
    broken = [good_row() for _ in range(6)]
    broken[3]["images"].pop()  # invalid, still counted with its one image
    broken[4]["texts"][0]["user"] = LONG_QUESTION  # over --max_length 1000
    broken[5]["texts"].clear()  # invalid, no length
    for name, rows, code in (("clean", [good_row() for _ in range(6)], 0), ("broken", broken, 1)):
        out = tmp_path / f"out_{name}"
        with pytest.raises(SystemExit) as exit_info:
            script.main([str(a) for a in run_args(tiny_model_dir, write_rows(tmp_path / name, rows), out,
                                                  "--preflight_only", "--max_length", 1000)])  # fmt: skip
        assert exit_info.value.code == code
        written = ["invalid_rows.jsonl", "preflight_summary.json"] if code else ["preflight_summary.json"]
        assert sorted(p.name for p in out.iterdir()) == written
        summary = json.loads((out / "preflight_summary.json").read_text())
        assert summary["clean"] is (code == 0) and summary["splits"]["eval"]["rows"] == NUM_EVAL
        if code == 0:
            clean_tokens = summary["splits"]["train"]["tokens"]
    train = summary["splits"]["train"]
    assert (train["rows"], train["invalid_rows"], train["rows_without_length"], train["rows_over_max_length"]) == (4, 3, 1, 1)
    assert train["images_per_row"] == {"1": 1, "2": 3} and train["tokens"]["max"] > 1000
    assert train["tokens"]["min"] == clean_tokens["min"] - 313  # the row with one image: 313 tokens fewer
    assert "preflight only: 3 invalid row(s)" in capsys.readouterr().out
