"""convert_preference_data.py on local copies of a hub preference set it makes itself (no network): the
openbmb/RLAIF-V-Dataset schema (image, question, chosen, rejected, idx, ...) as a save_to_disk folder and as
parquet files, and TRL's conversational vision form (images, prompt/chosen/rejected messages). The output must be
what finetune_hf_trainer_dpo.py reads: its preflight passes on it (no weights loaded)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from datasets import Dataset, Features, Image as ImageFeature, List, Value
from PIL import Image

import convert_preference_data as converter
import finetune_hf_trainer_dpo as recipe
from preflight_helpers import refuse_model_weights


def encoded(colour, fmt="JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((30, 40, 3), colour, np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


ROWS = [  # (question, chosen, rejected, image format)
    ("What colour is the picture?", "It is red.", "It is blue.", "JPEG"),
    ("<image>\nDescribe the image.", "A plain green picture.", "A cat on a sofa.", "PNG"),
    ("Is there a person?", "No, only a colour.", "Yes, a woman.", "JPEG"),
    ("What is shown?", "A yellow area.", "A dog.", "JPEG"),
    ("Any text?", "No text.", "The word STOP.", "PNG"),
]


def rlaif_v_dataset() -> Dataset:
    """Five rows in the RLAIF-V-Dataset schema (its columns and types)."""
    features = Features({"ds_name": Value("string"), "image": ImageFeature(), "question": Value("string"),
                         "chosen": Value("string"), "rejected": Value("string"), "origin_dataset": Value("string"),
                         "origin_split": Value("string"), "idx": Value("string"), "image_path": Value("string")})  # fmt: skip
    colours = [(200, 20, 20), (20, 180, 40), (90, 90, 90), (240, 220, 30), (250, 250, 250)]
    return Dataset.from_dict({
        "ds_name": ["RLAIF-V"] * 5,
        "image": [{"bytes": encoded(c, fmt), "path": None} for c, (*_, fmt) in zip(colours, ROWS)],
        "question": [r[0] for r in ROWS], "chosen": [r[1] for r in ROWS], "rejected": [r[2] for r in ROWS],
        "origin_dataset": ["synthetic"] * 5, "origin_split": ["train"] * 5,
        "idx": [f"rlaif-{i}" for i in range(5)], "image_path": [f"img/{i}.jpg" for i in range(5)],
    }, features=features)  # fmt: skip


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_rlaif_v_output(out_dir, dataset):
    train, val = read_jsonl(out_dir / "pref_train.jsonl"), read_jsonl(out_dir / "pref_val.jsonl")
    assert [r["id"] for r in train] == ["rlaif-0", "rlaif-1", "rlaif-2"] and [r["id"] for r in val] == ["rlaif-3", "rlaif-4"]
    for i, record in enumerate(train + val):
        question, chosen, rejected, fmt = ROWS[i]
        ext = "jpg" if fmt == "JPEG" else "png"
        assert record == {"id": f"rlaif-{i}", "images": [f"{i:08d}.{ext}"], "prompt": question.replace("<image>", "").strip(),
                          "chosen": chosen, "rejected": rejected}  # fmt: skip
        # The stored bytes, not a re-encoding.
        assert (out_dir / "images" / record["images"][0]).read_bytes() == dataset[i]["image"]["bytes"]


@pytest.fixture
def no_weights(monkeypatch):
    refuse_model_weights(monkeypatch)


def test_rlaif_v_save_to_disk_and_parquet(tmp_path, tiny_model_dir, capsys, no_weights):
    dataset = rlaif_v_dataset()
    dataset.save_to_disk(str(tmp_path / "disk"))
    (tmp_path / "parquet").mkdir()
    dataset.select(range(3)).to_parquet(str(tmp_path / "parquet" / "train-00000.parquet"))
    dataset.select(range(3, 5)).to_parquet(str(tmp_path / "parquet" / "train-00001.parquet"))
    raw = rlaif_v_dataset().cast_column("image", ImageFeature(decode=False))
    for source in ("disk", "parquet"):
        out_dir = tmp_path / f"out_{source}"
        converter.main(["--dataset_path", str(tmp_path / source), "--out_dir", str(out_dir), "--num_eval", "2"])
        assert "wrote 3 train and 2 val preferences, 5 images" in capsys.readouterr().out
        check_rlaif_v_output(out_dir, raw)
    # The recipe reads it as it is: its preflight finds nothing wrong.
    with pytest.raises(SystemExit) as exit_info:
        recipe.main(["--model_name_or_path", str(tiny_model_dir), "--data_dir", str(tmp_path / "out_disk"),
                     "--output_dir", str(tmp_path / "run"), "--preflight_only", "--num_crops", "1",
                     "--dataloader_num_workers", "0"])  # fmt: skip
    assert exit_info.value.code == 0
    summary = json.loads((tmp_path / "run" / "preflight_summary.json").read_text())
    assert summary["splits"]["train"]["valid_rows"] == 3 and summary["splits"]["val"]["valid_rows"] == 2


def conversational_dataset() -> Dataset:
    """TRL's vision preference form: a list of images, typed prompt messages (here with an earlier turn), answers
    as assistant messages."""
    def user(text, images):
        return {"role": "user", "content": [*([{"type": "image", "text": None}] * images), {"type": "text", "text": text}]}

    def assistant(text):
        return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]

    return Dataset.from_list([
        {"images": [{"bytes": encoded((200, 20, 20)), "path": None}],
         "prompt": [user("What colour is it?", 1)], "chosen": assistant("Red."), "rejected": assistant("Blue.")},
        {"images": [{"bytes": encoded((20, 20, 200)), "path": None}, {"bytes": encoded((20, 200, 20), "PNG"), "path": None}],
         "prompt": [user("Look at this.", 1), {"role": "assistant", "content": [{"type": "text", "text": "I see blue."}]},
                    user("And this one?", 1)],
         "chosen": assistant("It is green."), "rejected": assistant("It is blue too.")},
    ]).cast_column("images", List(ImageFeature()))  # fmt: skip


def test_conversational_form_earlier_turns(tmp_path, capsys):
    conversational_dataset().save_to_disk(str(tmp_path / "disk"))
    converter.main(["--dataset_path", str(tmp_path / "disk"), "--out_dir", str(tmp_path / "out"), "--num_eval", "0"])
    first, second = read_jsonl(tmp_path / "out" / "pref_train.jsonl")
    assert first == {"id": "row-0", "images": ["00000000.jpg"], "prompt": "What colour is it?", "chosen": "Red.",
                     "rejected": "Blue."}  # fmt: skip
    # The earlier turn keeps its own image; the last user message's image belongs to the prompt.
    assert second == {"id": "row-1", "images": ["00000001_1.png"], "prompt": "And this one?", "chosen": "It is green.",
                      "rejected": "It is blue too.",
                      "conversations": [{"images": ["00000001.jpg"], "user": "Look at this.", "assistant": "I see blue."}]}  # fmt: skip
    assert (tmp_path / "out" / "pref_val.jsonl").read_text() == ""
    assert recipe.preference_problems(second) == []


def test_rows_that_cannot_be_converted(tmp_path, capsys):
    dataset = rlaif_v_dataset().to_list()
    dataset[1]["image"] = None  # no image
    Dataset.from_list(dataset).cast_column("image", ImageFeature()).save_to_disk(str(tmp_path / "disk"))
    with pytest.raises(SystemExit) as exit_info:
        converter.main(["--dataset_path", str(tmp_path / "disk"), "--out_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    assert "1 row(s) cannot be converted:\n  row 1: no image (the image column is empty)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    converter.main(["--dataset_path", str(tmp_path / "disk"), "--out_dir", str(tmp_path / "out"), "--num_eval", "1",
                    "--skip_invalid"])  # fmt: skip
    assert [r["id"] for r in read_jsonl(tmp_path / "out" / "pref_train.jsonl")] == ["rlaif-0", "rlaif-2", "rlaif-3"]
    assert "--skip_invalid: 1 row(s) left out" in capsys.readouterr().out


def test_missing_columns_named(tmp_path):
    Dataset.from_dict({"question": ["q"], "answer": ["a"]}).save_to_disk(str(tmp_path / "disk"))
    with pytest.raises(SystemExit) as exit_info:
        converter.main(["--dataset_path", str(tmp_path / "disk"), "--out_dir", str(tmp_path / "out")])
    assert "missing column(s) image or images, chosen, rejected (has question, answer)" in str(exit_info.value)
