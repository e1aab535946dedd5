"""finetune_hf_trainer_docvqa.py: bad arguments and bad data are refused before training.

Bad arguments: in-process `parse_args` (GPU and packages faked). Bad data: small parquet copies of the
mini set (and of the_cauldron for --full_train) with exactly one kind of defect each, run through the
script's main() in-process (it validates before any model is loaded, so a case takes about a second);
each must exit 1 with one report naming the bad row and its reason, and leave nothing trained. Then
the real script as a subprocess: all defects at once (one report listing every one, no traceback);
and unusual but valid pages (CMYK, palette with transparency, 16-bit grayscale, RGBA, EXIF-rotated,
3x3, very wide, gray with alpha) that must pass and train, next to bad rows that --skip_invalid drops and lists.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from preflight_helpers import encode, fake_environment, parse_error, refuse_model_weights, truncated_jpeg, unusual_images

REPO = Path(__file__).resolve().parents[1]
SCRIPT = "finetune_hf_trainer_docvqa.py"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
WORDS = ["cat", "dog", "sun", "tree", "book", "fish"]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("finetune_docvqa_preflight", REPO / SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # importable by name: the preflight's worker processes need that
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def page(word: str, size=(120, 80)) -> bytes:
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).text((10, size[1] // 2 - 6), word, fill="black")
    return encode(image)


def mini_row(i: int, split: str = "train", **changes) -> dict:
    word = WORDS[i % len(WORDS)]
    row = {"id": f"{split[:2]}{i}", "image": {"bytes": page(word), "path": None},
           "query": {"en": "What word is written?", "de": "Welches Wort?"}, "answers": [word]}
    row.update(changes)
    return row


def cauldron_row(i: int, **changes) -> dict:
    word = WORDS[i % len(WORDS)]
    row = {"images": [{"bytes": page(word), "path": None}],
           "texts": [{"user": "What word is written?", "assistant": word, "source": "docvqa"},
                     {"user": "How many letters?", "assistant": str(len(word)), "source": "docvqa"}]}
    row.update(changes)
    return row


def write_parquet(rows: list[dict], path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def write_data(root: Path, train=None, test=None, cauldron=None) -> dict:
    """A mini set (train/test parquet files) and, if given, a cauldron copy; 4 good rows by default."""
    write_parquet(train or [mini_row(i) for i in range(4)], root / "mini" / "train-00000-of-00001.parquet")
    write_parquet(test or [mini_row(i, "test") for i in range(2)], root / "mini" / "test-00000-of-00001.parquet")
    paths = {"mini": root / "mini"}
    if cauldron is not None:
        write_parquet(cauldron, root / "cauldron" / "train-00000-of-00001.parquet")
        paths["cauldron"] = root / "cauldron"
    return paths


def base_args(tiny_model_dir, data: dict, out: Path, num_crops: int = 1) -> list[str]:
    args = ["--model_name_or_path", tiny_model_dir, "--dataset_path", data["mini"], "--output_dir", out,
            "--deepspeed", "none", "--num_crops", num_crops, "--batch_size", 2, "--batch_size_per_gpu", 2,
            "--dataloader_num_workers", 0, "--max_new_tokens", 2, "--no-tqdm"]
    if "cauldron" in data:
        args += ["--full_train", "--full_train_dataset_path", data["cauldron"]]
    return [str(a) for a in args]


# ------------------------------------------------------------------------------------------
# Bad arguments
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, fake, message",
    [
        (["--num_crops", "0"], {}, "--num_crops must be between 1 and 16, got 0"),
        (["--num_crops", "17"], {}, "--num_crops must be between 1 and 16, got 17"),
        (["--batch_size", "4", "--batch_size_per_gpu", "3"], {}, "--batch_size 4 must be a multiple of world_size (1)"),
        (["--batch_size", "6", "--batch_size_per_gpu", "2"], {"WORLD_SIZE": "2"},
         "--batch_size 6 must be a multiple of world_size (2) x --batch_size_per_gpu (2)"),
        (["--use_flash_attention", "--bf16"], {"flash_attn": False}, "--use_flash_attention needs the flash-attn package"),
        (["--use_flash_attention", "--bf16"], {"flash_attn": True, "cuda": False}, "--use_flash_attention needs a CUDA GPU"),
        (["--use_qlora"], {"bitsandbytes": False}, "--use_qlora needs the bitsandbytes package"),
    ],
)
def test_bad_arguments(script, monkeypatch, capsys, tmp_path, argv, fake, message):
    """Each bad flag combination fails at parse time with its own message."""
    fake_environment(monkeypatch, script, fake)
    assert message in parse_error(script, capsys, [*argv, "--output_dir", tmp_path / "out"])


def test_dataset_paths_name_what_is_missing(script, capsys, tmp_path):
    data = write_data(tmp_path)
    only_train = tmp_path / "only-train"
    write_parquet([mini_row(0)], only_train / "train-00000-of-00001.parquet")
    (tmp_path / "empty").mkdir()
    out = ["--output_dir", tmp_path / "out"]
    for argv, message in [
        (["--dataset_path", tmp_path / "nowhere"], "does not exist"),
        (["--dataset_path", tmp_path / "empty"], "is neither a save_to_disk folder"),
        (["--dataset_path", only_train], "no parquet files for the split(s) ['test']"),
        (["--dataset_path", only_train / "train-00000-of-00001.parquet"], "is one parquet file; the splits"),
        (["--full_train", "--full_train_dataset_path", tmp_path / "nowhere"],
         "--full_train_dataset_path " + str(tmp_path / "nowhere") + ": does not exist"),
    ]:
        assert message in parse_error(script, capsys, [*argv, *out])
    # --full_train takes only the test split from the mini set; a cauldron copy can be one parquet file.
    args = script.parse_args([str(a) for a in ["--dataset_path", data["mini"], "--full_train",
                                               "--full_train_dataset_path", data["mini"] / "train-00000-of-00001.parquet", *out]])
    assert args.full_train


def test_finished_output_dir_is_refused(script, capsys, tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    script.parse_args(["--output_dir", str(out)])  # checkpoints only: an unfinished run, resumable
    (out / "eval_after.json").write_text("{}")
    (out / "adapter_model.safetensors").write_bytes(b"")
    error = parse_error(script, capsys, ["--output_dir", out])
    assert "already holds a finished run (eval_after.json, adapter_model.safetensors)" in error
    assert "--overwrite_output_dir" in error
    assert script.parse_args(["--output_dir", str(out), "--overwrite_output_dir"]).overwrite_output_dir
    assert (out / "eval_after.json").exists()  # nothing deleted


# ------------------------------------------------------------------------------------------
# Bad data: one defect per case, through main() in-process
# ------------------------------------------------------------------------------------------

MISSING_FILE = "/nonexistent/page-17.png"
CASES = {
    # name: (train rows, test rows, cauldron rows or None, where, reason)
    "null image": ([mini_row(0), mini_row(1, image=None)], None, None, "train row 1 (id tr1)", "image is missing"),
    "missing file": ([mini_row(0), mini_row(1, image={"bytes": None, "path": MISSING_FILE})], None, None,
                     "train row 1 (id tr1)", f"image file not found: {MISSING_FILE}"),
    "not an image": ([mini_row(0), mini_row(1, image={"bytes": b"<html>not found</html>", "path": None})], None, None,
                     "train row 1 (id tr1)", "not an image PIL can read"),
    "truncated jpeg": ([mini_row(0), mini_row(1, image={"bytes": truncated_jpeg(), "path": None})], None, None,
                       "train row 1 (id tr1)", "corrupt or truncated image"),
    "1-pixel image": ([mini_row(0), mini_row(1, image={"bytes": encode(Image.new("RGB", (1, 40))), "path": None})],
                      None, None, "train row 1 (id tr1)", "image is 1x40 pixels"),
    "empty question": ([mini_row(0), mini_row(1, query={"en": "  ", "de": "x"})], None, None,
                       "train row 1 (id tr1)", "empty or missing question (query['en'])"),
    "image tag in question": ([mini_row(0), mini_row(1, query={"en": "<|image_2|> Which word?", "de": "x"})], None,
                              None, "train row 1 (id tr1)", "question (query['en']): the text's image tags"),
    "empty answer": ([mini_row(0), mini_row(1, answers=["cat", ""])], None, None,
                     "train row 1 (id tr1)", "empty or missing answer (answers[1])"),
    "no answers": ([mini_row(0), mini_row(1, answers=[])], None, None, "train row 1 (id tr1)", "no answers"),
    # At --num_crops 2 a 120x80 page takes 313 image tokens, a 200x100 one 457: over --max_length 400.
    "too long": ([mini_row(0), mini_row(1, image={"bytes": page("long", (200, 100)), "path": None})], None, None,
                 "train row 1 (id tr1)", "482 tokens (457 of them image tokens) > --max_length 400"),
    "bad test page": (None, [mini_row(0, "test"), mini_row(1, "test", image={"bytes": b"<html>", "path": None})],
                      None, "test row 1 (id te1)", "not an image PIL can read"),
    "cauldron: no turns": (None, None, [cauldron_row(0), cauldron_row(1, texts=[])], "cauldron train row 1",
                           "texts is empty or not a list of {user, assistant} turns"),
    "cauldron: empty assistant": (None, None, [cauldron_row(0, texts=[
        {"user": "Which word?", "assistant": "cat", "source": "docvqa"},
        {"user": "How many letters?", "assistant": "", "source": "docvqa"}]), cauldron_row(1)],
        "cauldron train row 0", "empty or missing answer (texts[1]['assistant'])"),
    "cauldron: two images": (None, None, [cauldron_row(0), cauldron_row(1, images=cauldron_row(1)["images"] * 2)],
                             "cauldron train row 1", "2 images; this recipe trains on one page per sample"),
    "cauldron: tag in assistant": (None, None, [cauldron_row(0), cauldron_row(1, texts=[
        {"user": "Which word?", "assistant": "<|image_1|> cat", "source": "docvqa"}])],
        "cauldron train row 1", "answer (texts[0]['assistant']): the text has image tags"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_rows_stop_before_training(script, tiny_model_dir, tmp_path, capsys, case):
    train, test, cauldron, where, reason = CASES[case]
    data = write_data(tmp_path, train=train, test=test, cauldron=cauldron)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        script.main(base_args(tiny_model_dir, data, out, num_crops=2) + ["--max_length", "400"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "1 invalid row(s)" in err and f"{where}: {reason}" in err, err
    assert "--skip_invalid" in err and "Traceback" not in err
    listed = [json.loads(line) for line in (out / "invalid_rows.jsonl").read_text().splitlines()]
    assert len(listed) == 1 and listed[0]["where"] == where and reason in listed[0]["reason"]
    assert not (out / "log_history.json").exists() and not list(out.glob("checkpoint-*"))
    assert not (out / "eval_before.json").exists()  # stopped before the model was even loaded


def test_missing_columns(script, tiny_model_dir, tmp_path):
    data = write_data(tmp_path, train=[{k: v for k, v in mini_row(i).items() if k != "answers"} for i in range(2)])
    with pytest.raises(SystemExit) as exit_info:
        script.main(base_args(tiny_model_dir, data, tmp_path / "out"))
    assert "split 'train' has no column(s) ['answers']" in str(exit_info.value.code)


# ------------------------------------------------------------------------------------------
# The real script
# ------------------------------------------------------------------------------------------


def test_all_defects_in_one_report(tiny_model_dir, tmp_path, run_script):
    """Every bad row of the mini set (train and test) in one report; non-zero exit, no traceback."""
    mini_cases = [c for c in CASES.values() if c[2] is None]
    train = [mini_row(0)] + [c[0][1] for c in mini_cases if c[0]]
    train = [dict(row, id=f"tr{i}") for i, row in enumerate(train)]
    data = write_data(tmp_path, train=train, test=CASES["bad test page"][1])
    out = tmp_path / "out"
    proc = run_script(SCRIPT, *base_args(tiny_model_dir, data, out, num_crops=2), "--max_length", 400, env=ONE_THREAD,
                      check=False)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout
    assert f"{len(train)} invalid row(s)" in proc.stdout  # all but the first training row, and 1 test row
    for i, (_, _, _, _, reason) in enumerate(c for c in mini_cases if c[0]):
        assert f"train row {i + 1} (id tr{i + 1}): {reason}" in proc.stdout
    assert "test row 1 (id te1): not an image PIL can read" in proc.stdout
    assert len((out / "invalid_rows.jsonl").read_text().splitlines()) == len(train)
    assert not (out / "log_history.json").exists() and not (out / "eval_before.json").exists()


def test_unusual_pages_train_and_skip_invalid(tiny_model_dir, tmp_path, run_main):
    """Unusual but valid pages pass the preflight, train and are evaluated; --skip_invalid drops exactly the
    bad rows, lists them in skipped_rows.jsonl and trains on the rest."""
    pages = [image.data for image in unusual_images().values()]
    n = len(pages)
    good = [mini_row(i, image={"bytes": data, "path": None}) for i, data in enumerate(pages)]
    bad = [mini_row(0, image=None), mini_row(1, answers=[""])]
    train = [dict(row, id=f"tr{i}") for i, row in enumerate(good[:4] + bad[:1] + good[4:] + bad[1:])]
    test = [mini_row(i, "test", image={"bytes": data, "path": None}) for i, data in enumerate(pages)]
    data = write_data(tmp_path, train=train, test=test)
    out = tmp_path / "out"
    proc = run_main(SCRIPT, *base_args(tiny_model_dir, data, out), "--skip_invalid", "--batch_size", n,
                    "--batch_size_per_gpu", n, "--max_steps", 1, "--logging_steps", 1, "--eval_batch_size", n)
    assert f"preflight: {n} training and {n} evaluation rows valid" in proc.stdout
    skipped = [json.loads(line) for line in (out / "skipped_rows.jsonl").read_text().splitlines()]
    assert skipped == [{"where": "train row 4 (id tr4)", "reason": "image is missing (null)"},
                       {"where": f"train row {n + 1} (id tr{n + 1})", "reason": "empty or missing answer (answers[0])"}]
    history = json.loads((out / "log_history.json").read_text())
    (step,) = [h for h in history if "loss" in h]
    assert step["loss"] > 0 and step["num_input_tokens_seen"] > n * 313  # all valid pages in the one step
    after = json.loads((out / "eval_after.json").read_text())
    assert after["num_samples"] == n


def test_parallel_check_matches_serial(script, tiny_model_dir, tmp_path):
    """--dataloader_num_workers > 1 decodes the pages in a process pool: the same verdicts as serially."""
    from transformers import AutoProcessor

    rows = [mini_row(i) for i in range(130)]  # three chunks of up to 64 rows
    rows[5]["image"] = None
    rows[100]["image"] = {"bytes": truncated_jpeg(), "path": None}
    data = write_data(tmp_path, train=rows)
    args = script.parse_args(base_args(tiny_model_dir, data, tmp_path / "out") + ["--dataloader_num_workers", "3"])
    train, _ = script.load_data(args)
    tokenizer = AutoProcessor.from_pretrained(tiny_model_dir).tokenizer
    parallel = script.check_rows(train, tokenizer, args, max_length=8192)
    args.dataloader_num_workers = 0
    assert parallel == script.check_rows(train, tokenizer, args, max_length=8192)
    assert [i for i, (problems, *_) in enumerate(parallel) if problems] == [5, 100]
    assert "corrupt or truncated image" in parallel[100][0][0]


def test_preflight_only(script, tiny_model_dir, tmp_path, capsys, monkeypatch):
    """--preflight_only: every row measured (bad ones too), a summary printed and written, exit 0 when the data is
    clean and 1 when not; no model weights loaded, nothing else written."""
    from transformers import AutoProcessor

    refuse_model_weights(monkeypatch)
    tokenizer = AutoProcessor.from_pretrained(tiny_model_dir).tokenizer
    broken = [mini_row(0), mini_row(1, image=None), mini_row(2, answers=["cat", ""]),  # no length; length counts
              mini_row(3, image={"bytes": page("long", (200, 100)), "path": None})]  # 482 tokens at --num_crops 2
    lengths = [script.sample_length(tokenizer, row, 2)[0] for row in broken if row["image"]]
    for name, train, code in (("clean", None, 0), ("broken", broken, 1)):
        out = tmp_path / f"out_{name}"
        with pytest.raises(SystemExit) as exit_info:
            script.main(base_args(tiny_model_dir, write_data(tmp_path / name, train=train), out, num_crops=2)
                        + ["--max_length", "400", "--preflight_only"])  # fmt: skip
        assert exit_info.value.code == code
        written = ["invalid_rows.jsonl", "preflight_summary.json"] if code else ["preflight_summary.json"]
        assert sorted(p.name for p in out.iterdir()) == written
        summary = json.loads((out / "preflight_summary.json").read_text())
        assert summary["clean"] is (code == 0) and (summary["num_crops"], summary["max_length"]) == (2, 400)
        assert summary["splits"]["test"]["rows"] == 2 and summary["splits"]["test"]["invalid_rows"] == 0
    train = summary["splits"]["train"]
    assert (train["rows"], train["invalid_rows"], train["rows_without_length"], train["rows_over_max_length"]) == (4, 3, 1, 1)
    assert train["images_per_row"] == {"0": 1, "1": 3} and train["tokens"]["max"] == 482
    assert train["tokens"]["total"] == sum(lengths) and train["tokens"]["min"] == min(lengths)
    assert "preflight only: 3 invalid row(s)" in capsys.readouterr().out
