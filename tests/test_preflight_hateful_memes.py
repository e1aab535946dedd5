"""finetune_hf_trainer_hateful_memes.py: bad arguments and bad data are refused before training.

Bad arguments are checked in-process with `parse_args`. Bad data runs the real script on a small
save_to_disk copy of the_cauldron/hateful_memes with exactly one kind of defect per case: it must
exit non-zero with one report naming every bad row, without a traceback, before any model is loaded.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from preflight_helpers import encode, fake_environment, parse_error, refuse_model_weights, truncated_jpeg, unusual_images
from cauldron_data import cauldron_features

REPO = Path(__file__).resolve().parents[1]
SCRIPT = "finetune_hf_trainer_hateful_memes.py"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("finetune_hateful_memes_preflight", REPO / SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # importable by name: the preflight's worker processes need that
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


# ------------------------------------------------------------------------------------------
# Bad arguments
# ------------------------------------------------------------------------------------------


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
        (["--use_qlora"], {"bitsandbytes": False}, "--use_qlora needs bitsandbytes"),
    ],
)
def test_bad_arguments(script, monkeypatch, capsys, tmp_path, argv, fake, message):
    """Each bad flag combination fails at parse time with its own message (GPU/packages faked)."""
    fake_environment(monkeypatch, script, fake)
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


# ------------------------------------------------------------------------------------------
# Bad data: one kind of defect per case, the real script's main()
# ------------------------------------------------------------------------------------------

EVAL_SIZE = 2  # rows 0-1 are held out, rows 2.. are training rows


def good_image(i) -> dict:
    colour = ["red", "green", "blue", "yellow"][i % 4]
    return {"bytes": encode(Image.new("RGB", (48 + 8 * (i % 3), 40), colour)), "path": None}


def good_row(i) -> dict:
    return {"images": [good_image(i)],
            "texts": [{"user": "Is this meme hateful?", "assistant": "Yes" if i % 2 else "No", "source": "hm"}]}


def save_rows(rows: list[dict], path: Path) -> Path:
    """A save_to_disk folder; a .parquet file if `path` ends so (written as is: image paths stay paths)."""
    from datasets import Dataset

    features = cauldron_features()
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows, schema=features.arrow_schema), path)
    else:
        Dataset.from_list(rows, features=features).save_to_disk(str(path))
    return path


def with_defect(defect, bad_rows=(5,), n=8, tmp_path=None) -> list[dict]:
    rows = [good_row(i) for i in range(n)]
    for i in bad_rows:
        rows[i] = {**rows[i], **defect(i, tmp_path)} if callable(defect) else {**rows[i], **defect}
    return rows


def image_file_missing(i, tmp_path) -> dict:
    return {"images": [{"bytes": None, "path": str(tmp_path / "images" / f"meme_{i}.png")}]}


def texts(user="Is this meme hateful?", assistant="No") -> dict:
    return {"texts": [{"user": user, "assistant": assistant, "source": "hm"}]}


# (name, defect of the bad rows, bad rows, extra arguments, expected reason)
DEFECTS = [
    ("truncated_jpeg", {"images": [{"bytes": truncated_jpeg(), "path": None}]}, (1, 5), [],
     "corrupt or truncated image"),
    ("not_an_image", {"images": [{"bytes": b"<html>not found</html>", "path": None}]}, (5,), [],
     "not an image PIL can read"),
    ("missing_file", image_file_missing, (5,), [], "image file not found: "),
    ("null_image", {"images": [None]}, (6,), [], "image is missing (null)"),
    ("no_image", {"images": []}, (5,), [], "no image (the images list is empty)"),
    ("two_images", lambda i, _: {"images": [good_image(i), good_image(i + 1)]}, (5,), [],
     "2 images; this recipe trains on exactly one image per sample"),
    ("image_1x1", {"images": [{"bytes": encode(Image.new("RGB", (1, 1))), "path": None}]}, (5,), [],
     "image is 1x1 pixels"),
    ("empty_user", texts(user="  "), (0, 5), [], "empty or missing user text (texts[0]['user'])"),
    ("empty_assistant", texts(assistant=""), (5,), [], "empty or missing assistant text (texts[0]['assistant'])"),
    ("no_turns", {"texts": []}, (5,), [], "texts is empty or not a list of {user, assistant} turns"),
    ("extra_image_tag", texts(user="<|image_2|> Is this meme hateful?"), (5,), [],
     "user text: the text's image tags (<|image_1|>, <|image_2|>) do not match the 1 image(s) listed"),
    ("image_tag_in_answer", texts(assistant="<|image_1|> No"), (5,), [],
     "assistant text: the text has image tags (<|image_1|>) but no images are listed"),
    ("too_long", texts(user="Is this meme hateful? " * 120), (5,), ["--max_length", 400],
     "> --max_length 400"),
]


def run_main(script, argv) -> int:
    """The script's main() in this process (the slow imports are paid once); returns the exit status."""
    with pytest.raises(SystemExit) as exit_info:  # any other exception would be a traceback for the user
        script.main([str(a) for a in argv])
    return exit_info.value.code


def preflight_args(tiny_model_dir, data, out, *extra):
    return ["--model_name_or_path", tiny_model_dir, "--dataset_path", data, "--output_dir", out, "--use_lora",
            "--eval_size", EVAL_SIZE, "--num_crops", 1, "--batch_size", 1, "--dataloader_num_workers", 0,
            "--max_steps", 1, "--no-tqdm", *extra]


@pytest.mark.parametrize("name, defect, bad_rows, extra, reason", DEFECTS, ids=[d[0] for d in DEFECTS])
def test_bad_rows_stop_before_training(script, tiny_model_dir, tmp_path, capfd, name, defect, bad_rows, extra, reason):
    # Image paths (not bytes) only survive in parquet: save_to_disk would embed the files.
    data = save_rows(with_defect(defect, bad_rows, tmp_path=tmp_path),
                     tmp_path / ("data.parquet" if name == "missing_file" else "data"))
    out = tmp_path / "out"
    status = run_main(script, preflight_args(tiny_model_dir, data, out, *extra))
    captured = capfd.readouterr()
    assert status == 1
    report = captured.err
    assert f"{len(bad_rows)} invalid row(s)" in report and "--skip_invalid" in report
    for i in bad_rows:  # every bad row, by its dataset row number and split, with its reason
        where = f"row {i} ({'eval' if i < EVAL_SIZE else 'train'})"
        assert any(line.strip().startswith(f"{where}:") and reason in line for line in report.splitlines()), report
    listed = [json.loads(line) for line in (out / "invalid_rows.jsonl").read_text().splitlines()]
    assert [p["where"] for p in listed] == [f"row {i} ({'eval' if i < EVAL_SIZE else 'train'})"
                                            for i in sorted(bad_rows)]  # in dataset order
    assert all(reason in p["reason"] for p in listed)
    # Stopped before the model: no evaluation, no checkpoint, no history.
    assert sorted(p.name for p in out.iterdir()) == ["invalid_rows.jsonl"]
    assert "Traceback" not in captured.out + captured.err


def test_unreadable_dataset(script, tiny_model_dir, tmp_path, capfd):
    """Whole-dataset problems: a corrupt parquet file, a missing column."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "train-0.parquet").write_bytes(b"PAR1 this is not really parquet")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        script.main([str(a) for a in preflight_args(tiny_model_dir, broken, out)])
    assert f"--dataset_path {broken} cannot be read" in str(exit_info.value.code)

    from datasets import Dataset

    no_texts = tmp_path / "no_texts"
    Dataset.from_dict({"images": [[good_image(0)["bytes"]]], "caption": ["x"]}).save_to_disk(str(no_texts))
    with pytest.raises(SystemExit) as exit_info:
        script.main([str(a) for a in preflight_args(tiny_model_dir, no_texts, out)])
    message = str(exit_info.value.code)
    assert f"--dataset_path {no_texts}: missing column(s) texts (has images, caption)" in message
    assert not out.exists() or not any(out.iterdir())


def test_real_process_exit_and_report(run_script, tiny_model_dir, tmp_path):
    """As a user runs it: several kinds of bad rows, one report on stderr, exit status 1, no traceback."""
    rows = with_defect({"images": [{"bytes": truncated_jpeg(), "path": None}]}, (3,))
    rows[6] = {**rows[6], **texts(assistant="")}
    data = save_rows(rows, tmp_path / "data")
    out = tmp_path / "out"
    proc = run_script(SCRIPT, *preflight_args(tiny_model_dir, data, out), env=ONE_THREAD, check=False)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "2 invalid row(s)" in proc.stdout
    assert "row 3 (train): corrupt or truncated image" in proc.stdout
    assert "row 6 (train): empty or missing assistant text" in proc.stdout
    assert "Traceback" not in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["invalid_rows.jsonl"]


def test_unusual_images_lengths_match_collator(script, tiny_model_dir):
    """Unusual but valid images pass the preflight, and the token count it computes from the header
    (EXIF rotation included) is the length the collator produces from the decoded image."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir, num_crops=2)
    collate = script.TrainCollator(processor)
    unusual = unusual_images()
    for name, image in unusual.items():
        cell = {"bytes": image.data, "path": None}
        assert script.image_problem([cell]) is None, name
        row = {"images": [cell], **texts()}
        length, _ = script.sample_length(processor, cell, *script.first_turn(row))
        batch = collate([row])
        assert batch["input_ids"].shape == (1, length), name
        assert torch.isfinite(batch["pixel_values"]).all() and batch["pixel_values"].abs().sum() > 0, name
    # The rotated photo is seen upright (40 wide, 90 high): its crops follow the rotated shape.
    assert unusual["exif_rotated.jpg"].size == (40, 90)
    rotated = collate([{"images": [{"bytes": unusual["exif_rotated.jpg"].data, "path": None}], **texts()}])
    assert rotated["image_sizes"].tolist() == [[672, 336]]  # (height, width) of the HD canvas


def test_skip_invalid_trains_on_the_rest(run_main, tiny_model_dir, tmp_path):
    """--skip_invalid: the bad rows (train and held-out) are listed and dropped, the unusual-but-valid
    images all pass the preflight and are trained on in one batch."""
    rows = [good_row(0), {**good_row(1), **texts(user="")}]  # held out: row 1 is bad
    rows += [{"images": [{"bytes": image.data, "path": None}], **texts(assistant="Yes")} for image in unusual_images().values()]
    rows.insert(4, {**good_row(4), "images": [{"bytes": truncated_jpeg(), "path": None}]})
    rows.append({**good_row(9), **texts(user="Is this meme hateful? " * 120)})
    data = save_rows(rows, tmp_path / "data")
    out = tmp_path / "out"
    n = len(unusual_images())
    proc = run_main(SCRIPT, *preflight_args(tiny_model_dir, data, out, "--skip_invalid", "--max_length", 600,
                                            "--batch_size", n, "--batch_size_per_gpu", n, "--logging_steps", 1,
                                            "--max_new_tokens", 2))
    skipped = [json.loads(line) for line in (out / "skipped_rows.jsonl").read_text().splitlines()]
    assert [(s["where"], s["reason"].split(":")[0]) for s in skipped] == [
        ("row 1 (eval)", "empty or missing user text (texts[0]['user'])"),
        ("row 4 (train)", "corrupt or truncated image"),
        (f"row {len(rows) - 1} (train)", f"{skipped[2]['reason'].split(' ')[0]} tokens (313 of them image tokens) > --max_length 600"),
    ]
    assert f"preflight: {n} training and 1 held-out rows valid" in proc.stdout
    assert "Traceback" not in proc.stdout
    history = json.loads((out / "log_history.json").read_text())
    step = [e for e in history if "loss" in e]
    assert len(step) == 1 and math.isfinite(step[0]["loss"])
    assert history[-1]["train_images_per_second"] * history[-1]["train_runtime"] == pytest.approx(n, abs=0.05)
    assert json.loads((out / "eval_after.json").read_text())["num_samples"] == 1
    assert not (out / "invalid_rows.jsonl").exists()


def test_check_rows_in_worker_processes(script, tiny_model_dir, tmp_path):
    """--dataloader_num_workers > 0 decodes in a process pool: same verdicts, same order as serial."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir, num_crops=1)
    rows = with_defect({"images": [{"bytes": b"junk", "path": None}]}, bad_rows=(3, 70), n=150)
    dataset = script.load_data(str(save_rows(rows, tmp_path / "rows150")), eval_size=0)[0]
    serial = script.check_rows(dataset, processor, max_length=8192, workers=0)
    assert script.check_rows(dataset, processor, max_length=8192, workers=2) == serial
    assert [i for i, (problems, *_) in enumerate(serial) if problems] == [3, 70]


def test_nothing_left_to_train(script, tiny_model_dir, tmp_path):
    """--skip_invalid that drops every training row, and a dataset held out entirely: a clear error."""
    data = save_rows(with_defect(texts(assistant=""), bad_rows=range(EVAL_SIZE, 5), n=5), tmp_path / "data")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        script.main([str(a) for a in preflight_args(tiny_model_dir, data, out, "--skip_invalid")])
    assert str(exit_info.value.code) == (f"all 3 training rows are invalid (listed in {out / 'skipped_rows.jsonl'}): "
                                         "nothing to train on")
    assert len((out / "skipped_rows.jsonl").read_text().splitlines()) == 3
    with pytest.raises(SystemExit) as exit_info:
        script.main([str(a) for a in preflight_args(tiny_model_dir, data, out, "--eval_size", 10, "--skip_invalid")])
    assert str(exit_info.value.code) == "no training rows: the dataset has 5 rows and --eval_size holds out 10"


def test_preflight_only(script, tiny_model_dir, tmp_path, capsys, monkeypatch):
    """--preflight_only: every row measured (bad ones too), a summary printed and written, exit 0 when the data is
    clean and 1 when not; no model weights loaded, nothing else written."""
    from transformers import AutoProcessor

    refuse_model_weights(monkeypatch)
    processor = AutoProcessor.from_pretrained(tiny_model_dir, num_crops=1)
    rows = [good_row(i) for i in range(6)]
    rows[3] = {**rows[3], **texts(assistant="")}  # invalid, but its length counts
    rows[4] = {**rows[4], "images": []}  # invalid, no length
    rows[5] = {**rows[5], **texts(user="Is this meme hateful? " * 120)}  # over --max_length 400
    lengths = [script.sample_length(processor, row["images"][0], row["texts"][0]["user"], row["texts"][0]["assistant"])[0]
               for row in rows if row["images"]]  # fmt: skip
    for name, data, code in (("clean", [good_row(i) for i in range(6)], 0), ("broken", rows, 1)):
        out = tmp_path / f"out_{name}"
        argv = preflight_args(tiny_model_dir, save_rows(data, tmp_path / name), out, "--preflight_only", "--max_length", 400)
        assert run_main(script, argv) == code
        written = ["invalid_rows.jsonl", "preflight_summary.json"] if code else ["preflight_summary.json"]
        assert sorted(p.name for p in out.iterdir()) == written
        summary = json.loads((out / "preflight_summary.json").read_text())
        assert summary["clean"] is (code == 0) and list(summary["splits"]) == ["eval", "train"]
        assert summary["splits"]["eval"]["rows"] == EVAL_SIZE and summary["splits"]["eval"]["invalid_rows"] == 0
    train = summary["splits"]["train"]
    assert (train["rows"], train["invalid_rows"], train["rows_without_length"], train["rows_over_max_length"]) == (4, 3, 1, 1)
    assert train["images_per_row"] == {"0": 1, "1": 3}
    assert train["tokens"]["max"] == lengths[-1] > 400 and train["tokens"]["total"] == sum(lengths[EVAL_SIZE:])
    assert "preflight only: 3 invalid row(s)" in capsys.readouterr().out
