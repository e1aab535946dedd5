"""The DPO recipe's preflight: every bad preference line named with its file, line, id and reason in one report
before any weights are loaded (exit 1), and --preflight_only's summary. In process; no model weights."""

from __future__ import annotations

import json

import pytest
from transformers import AutoProcessor

import finetune_hf_trainer_dpo as recipe
from phi3v.conversation import conversation_length
from preference_data import shape_preferences, write_jsonl
from preflight_helpers import refuse_model_weights, truncated_jpeg


@pytest.fixture
def no_weights(monkeypatch):
    refuse_model_weights(monkeypatch)


def preflight(tiny_model_dir, data_dir, output_dir, *extra):
    with pytest.raises(SystemExit) as exit_info:
        recipe.main([str(a) for a in ["--model_name_or_path", tiny_model_dir, "--data_dir", data_dir, "--output_dir",
                                      output_dir, "--num_crops", 1, "--dataloader_num_workers", 0, "--deepspeed",
                                      "none", *extra]])  # fmt: skip
    return exit_info.value.code


def test_every_bad_line_in_one_report(tiny_model_dir, tmp_path, capsys, no_weights):
    data_dir, output_dir = tmp_path / "data", tmp_path / "out"
    train, _ = shape_preferences(data_dir, num_train=3, val_repeats=1)
    (data_dir / "images" / "corrupt.jpg").write_bytes(truncated_jpeg())
    good = train[0]
    long_text = " ".join(["word"] * 400)
    bad = [
        {**good, "id": "missing", "images": ["nowhere.png"]},
        {**good, "id": "corrupt", "images": ["corrupt.jpg"]},
        {**good, "id": "no-prompt", "prompt": "  "},
        {**good, "id": "no-chosen", "chosen": ""},
        {k: v for k, v in good.items() if k != "rejected"} | {"id": "no-rejected"},
        {**good, "id": "same", "rejected": good["chosen"] + " "},
        {**good, "id": "tagged", "prompt": "<|image_1|>\nWhat colour?"},
        {**good, "id": "long", "chosen": long_text},
        {**good, "id": "images-not-list", "images": "a.png"},
        {**good, "id": "bad-turns", "conversations": [{"images": [], "user": "hi"}]},
        '{"id": "broken", "prompt": ',
        ["not", "an", "object"],
    ]
    write_jsonl(data_dir / "pref_train.jsonl", [*train, *bad])
    assert preflight(tiny_model_dir, data_dir, output_dir, "--max_length", 500) == 1
    err = capsys.readouterr().err
    name = "pref_train.jsonl"
    expected = [
        f"{name} line 4 (id missing): image nowhere.png: image file not found",
        f"{name} line 5 (id corrupt): image corrupt.jpg: corrupt or truncated image",
        f"{name} line 6 (id no-prompt): empty or missing prompt text",
        f"{name} line 7 (id no-chosen): empty or missing chosen text",
        f"{name} line 8 (id no-rejected): empty or missing rejected text",
        f"{name} line 9 (id same): chosen and rejected are the same text: nothing to prefer",
        f"{name} line 10 (id tagged): prompt text has its own image tag",
        f"{name} line 11 (id long): ",
        "with the longer answer > --max_length 500",
        f"{name} line 12 (id images-not-list): 'images' must be a list of image paths",
        f"{name} line 13 (id bad-turns): earlier turns: conversations[0]: empty or missing assistant text",
        f"{name} line 14: not valid JSON",
        f"{name} line 15: a line must be a JSON object, got list",
    ]
    for line in expected:
        assert line in err, line
    assert "12 invalid row(s)" in err and "Nothing was trained" in err and "Traceback" not in err
    listed = [json.loads(line)["where"] for line in (output_dir / "invalid_rows.jsonl").read_text().splitlines()]
    assert len(set(listed)) == 12 and not any("line 1 " in w or "line 2 " in w or "line 3 " in w for w in listed)


def test_preflight_only_summary(tiny_model_dir, tmp_path, capsys, no_weights):
    """Lengths are those of the longer sequence of each pair, image tokens included; nothing but the summary."""
    data_dir, output_dir = tmp_path / "data", tmp_path / "out"
    train, val = shape_preferences(data_dir, num_train=3, val_repeats=1)
    train[1]["rejected"] = "A much longer rejected answer that names no colour at all, on purpose."
    train[2] = {"id": "text-only", "images": [], "prompt": "Say a colour.", "chosen": "Red.", "rejected": "Blue.",
                "conversations": [{"images": [train[2]["images"][0]], "user": "Look.", "assistant": "I see it."}]}
    write_jsonl(data_dir / "pref_train.jsonl", train)
    assert preflight(tiny_model_dir, data_dir, output_dir, "--preflight_only", "--max_length", 700) == 0
    assert sorted(p.name for p in output_dir.iterdir()) == ["preflight_summary.json"]
    summary = json.loads((output_dir / "preflight_summary.json").read_text())
    processor = AutoProcessor.from_pretrained(tiny_model_dir, num_crops=1)
    tokens = sorted(max(conversation_length(processor, recipe.turns_of(r, r[key]), data_dir / "images", 1)[0]
                        for key in ("chosen", "rejected")) for r in train)  # fmt: skip
    split = summary["splits"]["train"]
    assert split["rows"] == split["valid_rows"] == 3 and split["images_per_row"] == {"1": 3}
    assert split["tokens"]["max"] == tokens[-1] and split["tokens"]["total"] == sum(tokens)
    assert summary["splits"]["val"]["rows"] == len(val) and summary["clean"] is True
    assert "preflight only: the data is clean" in capsys.readouterr().out
