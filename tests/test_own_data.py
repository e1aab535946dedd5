"""finetune_hf_trainer_ucf101.py on your own data: custom file names, 0..n images per turn, several turns per
line, free-form answers, --metric anls / none, and --preflight_only (the data checked and summarised, nothing
trained, no weights loaded).

The data is tests/own_data.py's photo-QA set in the converter layout (my_train.jsonl, my_val.jsonl,
photos/). Runs call the script's main() in this process (no interpreter start per case).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoProcessor

import finetune_hf_trainer_ucf101 as recipe
from own_data import OWN_FILES, photo_set, write_jsonl
from phi3v.conversation import anls_score, conversation_length
from preflight_helpers import refuse_model_weights

pytestmark = pytest.mark.usefixtures("one_thread")  # in-process training: see conftest.one_thread


def run_args(tiny_model_dir, data_dir, output_dir, *extra) -> list[str]:
    return [str(a) for a in [
        "--model_name_or_path", tiny_model_dir, "--data_dir", data_dir, *OWN_FILES, "--output_dir", output_dir,
        "--num_crops", 1, "--batch_size", 2, "--batch_size_per_gpu", 2, "--max_steps", 2, "--max_new_tokens", 3,
        "--logging_steps", 1, "--dataloader_num_workers", 0, "--deepspeed", "none", "--no-tqdm", *extra,
    ]]  # fmt: skip


@pytest.fixture
def no_weights(monkeypatch):
    refuse_model_weights(monkeypatch)


def test_free_form_qa_trains_and_evaluates_with_anls(tiny_model_dir, tmp_path, capsys):
    """Custom file names, a text-only turn, two-turn lines and free-form answers: trains, then scores with ANLS."""
    data_dir, output_dir = tmp_path / "mine", tmp_path / "out"
    train, val = photo_set(data_dir, num_train=6, num_val=3)
    shapes = [[len(turn["images"]) for turn in line["conversations"]] for line in train[:3]]
    assert shapes == [[1], [0, 1], [1, 1]]  # one image; a text-only turn, then one image; two image turns
    assert not (data_dir / "ucf101_train.jsonl").exists() and not (data_dir / "images").exists()
    recipe.main(run_args(tiny_model_dir, data_dir, output_dir, "--metric", "anls"))
    out = capsys.readouterr().out
    assert f"preflight: 6 train, 3 val samples valid in {data_dir}" in out
    history = json.loads((output_dir / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == [1, 2]
    for name in ("eval_before.json", "eval_after.json"):
        result = json.loads((output_dir / name).read_text())
        assert result["metric"] == "anls" and result["num_samples"] == 3
        # The last answer of every val line, the ones after a text-only turn and after a first image turn too.
        assert result["answers"] == [line["conversations"][-1]["assistant"] for line in val]
        assert result["scores"] == [anls_score(p, a) for p, a in zip(result["predictions"], result["answers"])]
        assert result["anls"] == pytest.approx(sum(result["scores"]) / 3)
        assert f"{name}: anls {result['anls']:.4f} on 3 samples" in out
        assert result["confusion_matrix"]["labels"] == sorted({a.rstrip(".") for a in result["answers"]}, key=str.lower)
    assert (output_dir / "model.safetensors").is_file() and (output_dir / "confusion_matrix.png").is_file()


def test_anls_score_is_the_docvqa_definition():
    import finetune_hf_trainer_docvqa as docvqa

    cases = [("a dark red photo", "a dark red photo"), (" a dark red photo. ", "a dark red photo"),
             ("a dark rod photo", "a dark red photo"), ("A Dark Red Photo", "a dark red photo"),
             ("blue", "a dark red photo"), ("", "a dark red photo")]  # fmt: skip
    scores = [anls_score(p, a) for p, a in cases]
    assert scores == [docvqa.anls_score(docvqa.clean_prediction(p), [a]) for p, a in cases]
    assert scores[:2] == [1.0, 1.0] and scores[2] == pytest.approx(1 - 1 / 16) and scores[4:] == [0.0, 0.0]
    assert scores[3] == pytest.approx(1 - 4 / 16)  # case-sensitive, as the original DocVQA recipe


def test_metric_none_reports_held_out_loss(tiny_model_dir, tmp_path, capsys):
    """--metric none: no generation; eval_before/after.json hold the held-out loss per answer token, and it is
    the loss the model gives those lines."""
    data_dir, output_dir = tmp_path / "mine", tmp_path / "out"
    photo_set(data_dir, num_train=4, num_val=3)
    recipe.main(run_args(tiny_model_dir, data_dir, output_dir, "--metric", "none", "--learning_rate", "1e-2",
                         "--max_steps", 4, "--warmup_steps", 0, "--freeze_vision_model"))  # fmt: skip
    before = json.loads((output_dir / "eval_before.json").read_text())
    after = json.loads((output_dir / "eval_after.json").read_text())
    assert before.keys() == after.keys() == {"metric", "loss", "num_samples", "answer_tokens"}
    assert before["metric"] == "loss" and before["num_samples"] == 3 and before["answer_tokens"] > 3 * 5
    assert after["loss"] < before["loss"] - 1  # a random model is at ~ln(32064) = 10.4; four steps at lr 1e-2 help
    out = capsys.readouterr().out
    assert f"eval_after.json: held-out loss {after['loss']:.4f} per answer token on 3 samples" in out
    assert not (output_dir / "confusion_matrix.png").exists()


def test_no_confusion_matrix_for_open_answers(tiny_model_dir, tmp_path):
    """Over 50 distinct answers are free text, not classes: no confusion matrix (text-only lines: cheap)."""
    data_dir, output_dir = tmp_path / "mine", tmp_path / "out"
    photo_set(data_dir, num_train=2, num_val=0)
    write_jsonl(data_dir / "my_val.jsonl", [
        {"id": f"v{i}", "conversations": [{"user": f"Spell {i}.", "assistant": f"number {i}"}]} for i in range(51)
    ])  # fmt: skip
    recipe.main(run_args(tiny_model_dir, data_dir, output_dir, "--max_steps", 1, "--max_new_tokens", 1,
                         "--eval_batch_size", 51))  # fmt: skip
    after = json.loads((output_dir / "eval_after.json").read_text())
    assert after["metric"] == "accuracy" and after["num_samples"] == 51 and "confusion_matrix" not in after
    assert not (output_dir / "confusion_matrix.png").exists() and (output_dir / "loss_curve.png").exists()


def test_paths_absolute_or_relative_and_missing_named(tmp_path, capsys):
    data_dir = tmp_path / "mine"
    photo_set(data_dir, num_train=1, num_val=1)
    elsewhere = tmp_path / "elsewhere.jsonl"
    elsewhere.write_text((data_dir / "my_train.jsonl").read_text())
    args = recipe.parse_args(["--data_dir", str(data_dir), "--train_file", str(elsewhere), "--eval_file",
                              "my_val.jsonl", "--image_dir", str(data_dir / "photos")])  # fmt: skip
    assert recipe.data_paths(args) == (elsewhere, data_dir / "my_val.jsonl", data_dir / "photos")
    with pytest.raises(SystemExit):
        recipe.parse_args(["--data_dir", str(data_dir), "--train_file", "nope.jsonl", "--image_dir", "pics"])
    err = capsys.readouterr().err
    assert f"--data_dir {data_dir} lacks nope.jsonl, ucf101_val.jsonl, pics/" in err
    assert "--train_file, --eval_file and --image_dir" in err


def expected_tokens(tiny_model_dir, data_dir: Path, lines: list[dict]) -> list[int]:
    processor = AutoProcessor.from_pretrained(tiny_model_dir, num_crops=1)
    return [conversation_length(processor, line["conversations"], data_dir / "photos", 1)[0] for line in lines]


def test_preflight_only_clean(tiny_model_dir, tmp_path, capsys, no_weights):
    data_dir, output_dir = tmp_path / "mine", tmp_path / "out"
    train, val = photo_set(data_dir, num_train=7, num_val=3)
    with pytest.raises(SystemExit) as exit_info:
        recipe.main(run_args(tiny_model_dir, data_dir, output_dir, "--preflight_only", "--max_length", 700))
    assert exit_info.value.code == 0
    assert sorted(p.name for p in output_dir.iterdir()) == ["preflight_summary.json"]  # nothing else written
    summary = json.loads((output_dir / "preflight_summary.json").read_text())
    tokens = sorted(expected_tokens(tiny_model_dir, data_dir, train))
    assert len(set(tokens)) == 3  # one image (+ text-only turn: longer), two images
    assert summary["clean"] is True and summary["invalid_rows"] == 0
    assert summary["num_crops"] == 1 and summary["max_length"] == 700
    assert summary["splits"]["train"] == {
        "rows": 7, "valid_rows": 7, "invalid_rows": 0, "images": 9, "images_per_row": {"1": 5, "2": 2},
        "rows_without_length": 0, "rows_over_max_length": 0,
        "tokens": {"min": tokens[0], "median": tokens[3], "p95": tokens[6], "max": tokens[6], "total": sum(tokens)},
    }  # fmt: skip
    assert summary["splits"]["val"]["rows"] == 3 and summary["splits"]["val"]["images_per_row"] == {"1": 2, "2": 1}
    out = capsys.readouterr().out
    assert "preflight summary (--num_crops 1, --max_length 700):" in out
    assert "  train: 7 rows, 7 valid, 0 invalid" in out and "    images per row: 1 (5 rows), 2 (2 rows)" in out
    assert f"    tokens per row: min {tokens[0]}, median {tokens[3]}, p95 {tokens[6]}, max {tokens[6]}" in out
    assert "preflight only: the data is clean" in out


def test_preflight_only_broken(tiny_model_dir, tmp_path, capsys, no_weights):
    """Every line is measured, bad or not; invalid lines are listed; exit 1; still no weights, no training."""
    data_dir, output_dir = tmp_path / "mine", tmp_path / "out"
    train, val = photo_set(data_dir, num_train=6, num_val=2)
    (data_dir / "photos" / train[0]["conversations"][0]["images"][0]).unlink()  # line 1: a missing photo
    train[3]["conversations"][0]["assistant"] = ""  # line 4: empty answer (its length still counts)
    write_jsonl(data_dir / "my_train.jsonl", [*train, '{"id": "broken", "conversations": ['])  # line 7: not JSON
    # At --num_crops 1 every photo is 313 tokens: the two-image lines 3 and 6 are over --max_length 600.
    with pytest.raises(SystemExit) as exit_info:
        recipe.main(run_args(tiny_model_dir, data_dir, output_dir, "--preflight_only", "--max_length", 600))
    assert exit_info.value.code == 1
    assert sorted(p.name for p in output_dir.iterdir()) == ["invalid_rows.jsonl", "preflight_summary.json"]
    summary = json.loads((output_dir / "preflight_summary.json").read_text())
    assert summary["clean"] is False and summary["invalid_rows"] == 5
    split = summary["splits"]["train"]
    assert (split["rows"], split["valid_rows"], split["invalid_rows"]) == (7, 2, 5)
    assert split["rows_without_length"] == 2  # the missing photo, the line that is not JSON
    assert split["images_per_row"] == {"1": 4, "2": 2}  # the missing photo is still listed
    assert split["rows_over_max_length"] == 2 and split["tokens"]["max"] > 600
    tokens = expected_tokens(tiny_model_dir, data_dir, [train[i] for i in (1, 2, 3, 4, 5)])
    assert split["tokens"]["total"] == sum(tokens)  # the line with an empty answer counted too
    assert summary["splits"]["val"]["invalid_rows"] == 0
    invalid = [json.loads(line)["where"] for line in (output_dir / "invalid_rows.jsonl").read_text().splitlines()]
    assert sorted(invalid) == sorted(["my_train.jsonl line 7"] + [f"my_train.jsonl line {i + 1} (id train-{i})"
                                                                 for i in (0, 2, 3, 5)])  # fmt: skip
    captured = capsys.readouterr()
    assert "5 invalid row(s)" in captured.err and "> --max_length 600" in captured.err
    assert "my_train.jsonl line 1 (id train-0): image train/0000.png: image file not found" in captured.err
    assert "preflight only: 5 invalid row(s), listed in" in captured.out and "Traceback" not in captured.err
