"""finetune_hf_trainer_ucf101.py refuses bad data and bad arguments before training, with clear messages.

Every bad-data case is a small converted dataset (the convert_ucf101.py layout, 2 frames per clip)
with exactly one kind of defect among good lines. The real script must stop before the model is
loaded: exit status 1, one report naming the file, line and reason, no traceback, no training.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import finetune_hf_trainer_ucf101 as recipe
from preflight_helpers import parse_error, truncated_jpeg, unusual_images
from phi3v.validation import load_image

SCRIPT = "finetune_hf_trainer_ucf101.py"
PROMPT = "Classify the video into one of the following classes: Archery, BabyCrawling."
CLASSES = ["Archery", "BabyCrawling"]


def frame(path: Path, seed: int, size=(32, 24)):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def clip(root: Path, split: str, c: int, num_frames: int = 2) -> dict:
    label = CLASSES[c % 2]
    rels = [f"{split}/{label}/v_{label}_g{c:02d}_c01.{k}.jpg" for k in range(num_frames)]
    for k, rel in enumerate(rels):
        frame(root / "images" / rel, seed=100 * c + k)
    return {"id": f"{split}-{c:010d}", "source": "ucf101",
            "conversations": [{"images": rels, "user": PROMPT, "assistant": label}]}  # fmt: skip


def write_dataset(root: Path, train: list, val: list) -> Path:
    """Lines are records (dicts) or raw strings (written as they are)."""
    for name, lines in (("ucf101_train.jsonl", train), ("ucf101_val.jsonl", val)):
        text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
        (root / name).write_text(text)
    (root / "images").mkdir(exist_ok=True)
    return root


def good_dataset(root: Path, num_train: int = 4, num_val: int = 2) -> tuple[list, list]:
    return [clip(root, "train", c) for c in range(num_train)], [clip(root, "val", 10 + c) for c in range(num_val)]


def first_frame(root: Path, record: dict) -> Path:
    return root / "images" / record["conversations"][0]["images"][0]


def truncate(path: Path):
    path.write_bytes(truncated_jpeg())


def turn(record: dict) -> dict:
    return record["conversations"][0]


# Each case: (id, how to spoil line i of a good train set (or val line 1) -> extra args, the report line).
# In the report line, {where} is "ucf101_train.jsonl line {i + 1} (id train-{i})" and {frame} the
# first frame of that clip.
def spoil_json(root, train, val, i):
    train[i] = '{"id": "train-%010d", "conversations": [ oops' % i


def spoil_no_conversations(root, train, val, i):
    del train[i]["conversations"]


def spoil_turn_shape(root, train, val, i):
    train[i]["conversations"] = ["Archery"]


def spoil_empty_user(root, train, val, i):
    turn(train[i])["user"] = "  "


def spoil_missing_assistant(root, train, val, i):
    del turn(val[0])["assistant"]


def spoil_image_tag(root, train, val, i):
    turn(train[i])["user"] = "<|image_1|> " + PROMPT


def spoil_images_not_list(root, train, val, i):
    turn(train[i])["images"] = turn(train[i])["images"][0]


def spoil_missing_frame(root, train, val, i):
    first_frame(root, train[i]).unlink()


def spoil_truncated_frame(root, train, val, i):
    truncate(first_frame(root, train[i]))


def spoil_not_an_image(root, train, val, i):
    first_frame(root, train[i]).write_text("not a picture")


def spoil_too_long(root, train, val, i):
    train[i] = clip(root, "train", i, num_frames=3)  # 3 x 313 image tokens; the others have 2 x 313
    return ["--max_length", 800]


BAD_DATA = [
    ("malformed_json", spoil_json, "ucf101_train.jsonl line {line}: not valid JSON"),
    ("no_conversations", spoil_no_conversations, "{where}: 'conversations' is missing"),
    ("turn_not_object", spoil_turn_shape, "{where}: conversations[0] is not an object"),
    ("empty_user", spoil_empty_user, "{where}: conversations[0]: empty or missing user text"),
    ("missing_assistant", spoil_missing_assistant,
     "ucf101_val.jsonl line 1 (id val-0000000010): conversations[0]: empty or missing assistant text"),
    ("image_tag_in_text", spoil_image_tag, "{where}: conversations[0]: user text has its own image tags"),
    ("images_not_list", spoil_images_not_list, "{where}: conversations[0]: 'images' must be a list of frame paths"),
    ("missing_frame", spoil_missing_frame, "{where}: image {frame}: image file not found"),
    ("truncated_frame", spoil_truncated_frame, "{where}: image {frame}: corrupt or truncated image"),
    ("not_an_image", spoil_not_an_image, "{where}: image {frame}: not an image"),
    ("too_long", spoil_too_long, "{where}: 9"),  # "9xx tokens (939 of them image tokens) > --max_length 800"
]  # fmt: skip


def report_line(template: str, train: list, i: int) -> str:
    """The expected report line for a defect on train line i+1 (call before spoiling: names its frame)."""
    return template.format(line=i + 1, where=f"ucf101_train.jsonl line {i + 1} (id train-{i:010d})",
                           frame=turn(train[i])["images"][0])  # fmt: skip


def run_args(tiny_model_dir, data_dir, output_dir, *extra):
    return [
        "--model_name_or_path", tiny_model_dir, "--data_dir", data_dir, "--output_dir", output_dir,
        "--num_crops", 1, "--batch_size", 2, "--batch_size_per_gpu", 2, "--max_steps", 1,
        "--max_new_tokens", 2, "--logging_steps", 1, "--dataloader_num_workers", 0, "--deepspeed", "none", "--no-tqdm",
        *extra,
    ]  # fmt: skip


def assert_not_trained(output_dir: Path):
    assert not (output_dir / "log_history.json").exists() and not (output_dir / "eval_before.json").exists()
    assert not list(output_dir.glob("checkpoint-*")) and not (output_dir / "model.safetensors").exists()


@pytest.mark.parametrize("spoil, message", [case[1:] for case in BAD_DATA], ids=[case[0] for case in BAD_DATA])
def test_bad_data_stops_before_training(spoil, message, tiny_model_dir, tmp_path, capsys):
    """One defect per case, through the script's main() in this process (no interpreter start per case)."""
    root = tmp_path / "ucf101"
    train, val = good_dataset(root)
    message = report_line(message, train, 1)
    extra = spoil(root, train, val, 1) or []
    write_dataset(root, train, val)
    output_dir = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        recipe.main([str(a) for a in run_args(tiny_model_dir, root, output_dir, *extra)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "1 invalid row(s)" in err and f"  {message}" in err, err
    assert "--skip_invalid" in err
    if spoil is spoil_too_long:
        assert "(939 of them image tokens) > --max_length 800" in err
    invalid = [json.loads(line) for line in (output_dir / "invalid_rows.jsonl").read_text().splitlines()]
    assert len(invalid) == 1 and message.startswith(invalid[0]["where"])
    assert_not_trained(output_dir)


def test_all_bad_lines_in_one_report(tiny_model_dir, tmp_path, run_script):
    """The real script on every defect at once (train line i+1 has defect i): one report naming all of
    them, exit 1, no traceback, stopped before the model was loaded."""
    root = tmp_path / "ucf101"
    train, val = good_dataset(root, num_train=len(BAD_DATA) + 1)
    messages, extra = [], []
    for i, (_, spoil, template) in enumerate(BAD_DATA, 1):
        messages.append(report_line(template, train, i))
        extra += spoil(root, train, val, i) or []
    write_dataset(root, train, val)
    output_dir = tmp_path / "out"
    proc = run_script(SCRIPT, *run_args(tiny_model_dir, root, output_dir, *extra), check=False)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout
    assert f"{len(BAD_DATA)} invalid row(s)" in proc.stdout, proc.stdout[-3000:]
    for message in messages:
        assert f"  {message}" in proc.stdout, (message, proc.stdout[-3000:])
    assert "Loading weights" not in proc.stdout  # stopped before the model was loaded
    assert_not_trained(output_dir)


def unusual_frames(root: Path) -> list[str]:
    """The shared unusual but valid images as frame files of one clip; all must load the same way and train."""
    folder = root / "images" / "train" / "Archery"
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in unusual_images().items():
        (folder / name).write_bytes(image.data)
    return [f"train/Archery/{name}" for name in unusual_images()]


def test_unusual_frames_pass_and_train(tiny_model_dir, tmp_path, run_main):
    root = tmp_path / "ucf101"
    train, val = good_dataset(root, num_train=1, num_val=1)
    rels = unusual_frames(root)
    modes = [Image.open(root / "images" / rel).mode for rel in rels]
    assert modes == ["CMYK", "P", "I;16", "RGBA", "RGB", "RGB", "RGB", "LA"]
    conversations = [{"images": rels, "user": PROMPT, "assistant": "Archery"}]
    train.append({"id": "train-0000000005", "conversations": conversations})
    write_dataset(root, train, val)
    output_dir = tmp_path / "out"
    proc = run_main(SCRIPT, *run_args(tiny_model_dir, root, output_dir))
    assert "preflight: 2 train, 1 val samples valid" in proc.stdout
    history = json.loads((output_dir / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == [1]
    assert not (output_dir / "invalid_rows.jsonl").exists() and not (output_dir / "skipped_rows.jsonl").exists()
    # The collator sees what the preflight checked: EXIF-rotated frames come out upright (40 wide).
    assert rels[4].endswith("exif_rotated.jpg") and load_image(root / "images" / rels[4]).size == (40, 90)
    sizes = [load_image(root / "images" / rel).size for rel in rels]
    assert sizes == [image.size for image in unusual_images().values()]


def test_skip_invalid(tiny_model_dir, tmp_path, run_main):
    """--skip_invalid: trains on the good lines and lists exactly the bad ones (all of them, one report)."""
    root = tmp_path / "ucf101"
    train, val = good_dataset(root, num_train=5, num_val=2)
    spoil_json(root, train, val, 1)  # line 2
    first_frame(root, train[3]).unlink()  # line 4
    turn(val[1])["user"] = ""  # val line 2
    write_dataset(root, train, val)
    output_dir = tmp_path / "out"
    proc = run_main(SCRIPT, *run_args(tiny_model_dir, root, output_dir, "--skip_invalid"))
    assert "3 invalid row(s)" in proc.stdout and "--skip_invalid: training without them" in proc.stdout
    skipped = [json.loads(line) for line in (output_dir / "skipped_rows.jsonl").read_text().splitlines()]
    assert [s["where"] for s in skipped] == [
        "ucf101_train.jsonl line 2",
        "ucf101_train.jsonl line 4 (id train-0000000003)",
        "ucf101_val.jsonl line 2 (id val-0000000011)",
    ]
    assert "preflight: 3 train, 1 val samples valid" in proc.stdout
    after = json.loads((output_dir / "eval_after.json").read_text())
    assert after["ids"] == ["val-0000000010"]
    assert (output_dir / "log_history.json").exists()


def test_nothing_valid_left(tiny_model_dir, tmp_path):
    root = tmp_path / "ucf101"
    train, val = good_dataset(root, num_train=1, num_val=1)
    turn(train[0])["assistant"] = ""
    write_dataset(root, train, val)
    with pytest.raises(SystemExit) as exit_info:
        recipe.main([str(a) for a in run_args(tiny_model_dir, root, tmp_path / "out", "--skip_invalid")])
    expected = f"error: no valid training sample in {root / 'ucf101_train.jsonl'}: nothing to train on"
    assert exit_info.value.code == expected
    assert_not_trained(tmp_path / "out")


# ----------------------------------------------------------------------------------------------
# Bad arguments (the others are in test_ucf101.py::test_argument_errors)
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def data_dir(tmp_path) -> Path:
    root = tmp_path / "ucf101"
    return write_dataset(root, *good_dataset(root, num_train=1, num_val=1))


def test_qlora_without_bitsandbytes(data_dir, capsys, monkeypatch):
    real_find_spec = recipe.importlib.util.find_spec
    monkeypatch.setattr(
        recipe.importlib.util, "find_spec", lambda name: None if name == "bitsandbytes" else real_find_spec(name)
    )
    err = parse_error(recipe, capsys, ["--data_dir", str(data_dir), "--use_qlora"])
    assert "--use_qlora needs the bitsandbytes package" in err


def test_batch_size_world_size(data_dir, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    err = parse_error(recipe, capsys, ["--data_dir", str(data_dir), "--batch_size", "6", "--batch_size_per_gpu", "2"])
    assert "--batch_size 6 must be a multiple of world size 2 x --batch_size_per_gpu 2" in err
    args = recipe.parse_args(["--data_dir", str(data_dir), "--batch_size", "8", "--batch_size_per_gpu", "2"])
    assert args.batch_size == 8


def test_output_dir_of_a_finished_run(data_dir, tmp_path, capsys):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "eval_after.json").write_text("{}")
    argv = ["--data_dir", str(data_dir), "--output_dir", str(output_dir)]
    err = parse_error(recipe, capsys, argv)
    assert f"--output_dir {output_dir} already holds a finished run (eval_after.json)" in err
    assert "--overwrite_output_dir" in err
    recipe.parse_args([*argv, "--overwrite_output_dir"])
    assert "nothing is deleted" in capsys.readouterr().out
    assert (output_dir / "eval_after.json").exists()


def test_output_dir_with_checkpoints(data_dir, tmp_path, capsys):
    """Another run's checkpoints: refused unless resumed (an unfinished run) or overwritten."""
    output_dir = tmp_path / "out"
    (output_dir / "checkpoint-2").mkdir(parents=True)
    argv = ["--data_dir", str(data_dir), "--output_dir", str(output_dir)]
    err = parse_error(recipe, capsys, argv)
    assert "holds checkpoints of an unfinished run (checkpoint-2)" in err and "--resume_from_checkpoint latest" in err
    assert recipe.parse_args([*argv, "--resume_from_checkpoint", "latest"]).resume_from_checkpoint == "latest"
    recipe.parse_args([*argv, "--overwrite_output_dir"])


def test_resume_latest_skips_half_written_checkpoint(data_dir, tmp_path):
    """`latest` is the newest COMPLETE checkpoint: a kill while saving checkpoint-4 leaves it without state."""
    output_dir = tmp_path / "out"
    complete = output_dir / "checkpoint-2"
    complete.mkdir(parents=True)
    (complete / "trainer_state.json").write_text("{}")
    (complete / "model.safetensors").write_bytes(b"")
    torch.save({}, complete / "optimizer.pt")
    torch.save({}, complete / "rng_state.pth")
    (output_dir / "checkpoint-4").mkdir()
    (output_dir / "checkpoint-4" / "model.safetensors").write_bytes(b"")
    args = recipe.parse_args(["--data_dir", str(data_dir), "--output_dir", str(output_dir),
                              "--resume_from_checkpoint", "latest"])  # fmt: skip
    messages = []
    with pytest.warns(UserWarning, match="checkpoint-4 is incomplete"):
        assert recipe.resolve_checkpoint(args, messages.append) == str(complete)
    assert messages == [f"resuming from {complete}"]
