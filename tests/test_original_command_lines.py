"""The original recipe's command lines run unchanged: every flag of the five original scripts is accepted,
keeps its default and does what it did (issue 10, part 3).

The flags and defaults are those of the cookbook's finetune_hf_trainer_{docvqa,hateful_memes,nlvr2,ucf101}.py
and convert_ucf101.py (docs: phi3v_facts.md sections 10.3 and 11-15). Each case parses an original
command line with the script's own `parse_args` and checks the setting it produces; the behaviours
that need more than parsing (--tmp_dir, --max_length's default) run the real code below.
"""

from __future__ import annotations

import importlib
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from preflight_helpers import fake_environment

SCRIPTS = ["docvqa", "hateful_memes", "nlvr2", "ucf101"]


def load(name: str):
    return importlib.import_module(f"finetune_hf_trainer_{name}")


@pytest.fixture
def ucf101_data_dir(tmp_path) -> Path:
    """The layout `--data_dir` must have at parse time (the lines themselves are read by the preflight)."""
    data_dir = tmp_path / "ucf101"
    (data_dir / "images").mkdir(parents=True)
    for name in ("ucf101_train.jsonl", "ucf101_val.jsonl"):
        (data_dir / name).write_text("")
    return data_dir


def parse(name: str, argv: list, data_dir: Path):
    """The script's parse_args on an original command line (ucf101's required --data_dir added)."""
    argv = [str(a) for a in argv]
    if name == "ucf101" and "--data_dir" not in argv:
        argv = ["--data_dir", str(data_dir), *argv]
    return load(name).parse_args(argv)


# The original defaults, per script (the same flag names in all four unless noted).
ORIGINAL_DEFAULTS = {
    "model_name_or_path": "microsoft/Phi-3.5-vision-instruct",
    "use_flash_attention": False,
    "bf16": False,
    "use_lora": False,
    "use_qlora": False,
    "output_dir": "./output/",
    "batch_size": 16,
    "num_crops": 16,
    "num_train_epochs": 1,
    "learning_rate": 4.0e-5,
    "wd": 0.01,
    "no_tqdm": False,  # --no-tqdm
    "lora_rank": 64,
    "lora_alpha_ratio": 2,
    "lora_dropout": 0.0,
    "freeze_vision_model": False,
    "batch_size_per_gpu": 1,  # an original flag of nlvr2 and ucf101 (docvqa and memes fixed it at 1)
}
SCRIPT_DEFAULTS = {"docvqa": {"full_train": False}, "ucf101": {"num_crops": 4}}  # ucf101: "4 to reduce memory"


@pytest.mark.parametrize("name", SCRIPTS)
def test_original_defaults(name, ucf101_data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --output_dir ./output/ is checked for a finished run
    args = parse(name, [], ucf101_data_dir)
    expected = {**ORIGINAL_DEFAULTS, **SCRIPT_DEFAULTS.get(name, {})}
    assert {key: getattr(args, key) for key in expected} == expected
    assert args.max_length is None  # not a cap of our own: the model's context length, read at preflight


# (original command-line flags, faked environment, check of the setting they give). The faked
# environment stands for the GPU machine the flag needs (this one has no CUDA, flash-attn nor bitsandbytes).
COMMON_FLAGS = [
    (["--model_name_or_path", "/models/phi-3.5-v"], {}, lambda a: a.model_name_or_path == "/models/phi-3.5-v"),
    # Flash attention trains in bf16 (as the original nlvr2 and ucf101 scripts force; docvqa and memes loaded
    # the weights in bf16 for it): never refused for a missing --bf16.
    (["--use_flash_attention"], {"cuda": True, "flash_attn": True}, lambda a: a.use_flash_attention and a.bf16),
    (["--bf16"], {}, lambda a: a.bf16),
    (["--use_lora"], {}, lambda a: a.use_lora and not a.use_qlora),
    (["--use_qlora"], {"bitsandbytes": True}, lambda a: a.use_qlora and a.use_lora),  # implies --use_lora
    (["--output_dir", "runs/a"], {}, lambda a: a.output_dir == "runs/a"),
    (["--batch_size", "64"], {}, lambda a: a.batch_size == 64),
    (["--num_crops", "8"], {}, lambda a: a.num_crops == 8),
    (["--num_train_epochs", "3"], {}, lambda a: a.num_train_epochs == 3),
    (["--learning_rate", "2e-4"], {}, lambda a: a.learning_rate == 2e-4),
    (["--wd", "0.1"], {}, lambda a: a.wd == 0.1),
    (["--no-tqdm"], {}, lambda a: a.no_tqdm),
    (["--lora_rank", "32"], {}, lambda a: a.lora_rank == 32),
    (["--lora_alpha_ratio", "0.5"], {}, lambda a: round(a.lora_rank * a.lora_alpha_ratio) == 32),
    (["--lora_dropout", "0.05"], {}, lambda a: a.lora_dropout == 0.05),
    (["--freeze_vision_model"], {}, lambda a: a.freeze_vision_model),
    # The published settings, as whole command lines.
    (["--full_train", "--bf16", "--use_flash_attention", "--batch_size", "64", "--num_train_epochs", "2",
      "--learning_rate", "5e-6"], {"cuda": True, "flash_attn": True, "WORLD_SIZE": "4"},
     lambda a: a.bf16 and a.batch_size == 64 and a.num_train_epochs == 2),
    (["--use_qlora", "--bf16", "--lora_rank", "128", "--lora_alpha_ratio", "2", "--learning_rate", "2e-4"],
     {"bitsandbytes": True}, lambda a: a.use_lora and round(a.lora_rank * a.lora_alpha_ratio) == 256),
]
SCRIPT_FLAGS = {
    "docvqa": [(["--full_train"], {}, lambda a: a.full_train)],
    "nlvr2": [(["--batch_size_per_gpu", "2"], {"WORLD_SIZE": "8"}, lambda a: a.batch_size_per_gpu == 2)],
    "ucf101": [
        (["--batch_size_per_gpu", "2"], {"WORLD_SIZE": "8"}, lambda a: a.batch_size_per_gpu == 2),
        (["--data_dir", "{data_dir}"], {}, lambda a: Path(a.data_dir).name == "ucf101"),
    ],
}
CASES = [
    (name, argv, fake, check)
    for name in SCRIPTS
    for argv, fake, check in COMMON_FLAGS + SCRIPT_FLAGS.get(name, [])
    if name == "docvqa" or "--full_train" not in argv  # --full_train is DocVQA's
]


@pytest.mark.parametrize("name, argv, fake, check", CASES,
                         ids=[f"{name}:{' '.join(argv)}" for name, argv, _, _ in CASES])  # fmt: skip
def test_original_flag(name, argv, fake, check, ucf101_data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake_environment(monkeypatch, load(name), fake)
    args = parse(name, [a.format(data_dir=ucf101_data_dir) for a in argv], ucf101_data_dir)
    assert check(args)


# ----------------------------------------------------------------------------------------------
# --max_length: the default is the model's context length, read from its config at preflight
# ----------------------------------------------------------------------------------------------


def model_folder(tmp_path: Path, context_length: int | None = None) -> Path:
    """The official config, tokenizer and processor files (no weights: the preflight runs before the model
    loads), optionally with another max_position_embeddings."""
    folder = tmp_path / "model"
    shutil.copytree(REPO / "phi3v" / "assets", folder)
    if context_length is not None:
        config = json.loads((folder / "config.json").read_text())
        config["max_position_embeddings"] = context_length
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def video_dataset(root: Path, size=(320, 240), num_frames: int = 8) -> Path:
    """One train and one val clip of 8 frames of 320x240 (the UCF101 frame size), in the converter layout."""
    prompt = "Classify the video into one of the following classes: Archery, BabyCrawling."
    for split, label in (("train", "Archery"), ("val", "BabyCrawling")):
        rels = [f"{split}/{label}/v_{label}_g01_c01.{k}.jpg" for k in range(num_frames)]
        for k, rel in enumerate(rels):
            (root / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
            pixels = np.random.default_rng(k).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / rel)
        record = {"id": f"{split}-0", "conversations": [{"images": rels, "user": prompt, "assistant": label}]}
        (root / f"ucf101_{split}.jsonl").write_text(json.dumps(record) + "\n")
    return root


def test_ucf101_num_crops_16_passes_the_default_max_length(tmp_path, capsys):
    """8 frames of 320x240 at --num_crops 16 (about 15,400 tokens, the original trains them) pass the preflight
    by default (131072, Phi-3.5-vision's context length); an explicit --max_length 8192 reports the clip."""
    import phi3v
    from transformers import AutoProcessor

    recipe = load("ucf101")
    data_dir = video_dataset(tmp_path / "ucf101")
    model = model_folder(tmp_path)
    argv = ["--data_dir", data_dir, "--model_name_or_path", model, "--num_crops", 16, "--output_dir",
            tmp_path / "out", "--dataloader_num_workers", 0, "--deepspeed", "none"]  # fmt: skip
    args = recipe.parse_args([str(a) for a in argv])
    processor = AutoProcessor.from_pretrained(model, num_crops=16)
    messages = []
    train, val, lengths = recipe.load_data(args, processor, True, messages.append)
    assert len(train) == len(val) == 1 and args.max_length == 131072
    assert 8 * phi3v.num_image_tokens(320, 240, 16) == 15368 and 15368 < lengths[0] < 15600
    assert "preflight: 1 train, 1 val samples valid" in messages[-1] and "(--max_length 131072)" in messages[-1]

    with pytest.raises(SystemExit) as exit_info:  # the same run with an explicit 8192: stopped, not truncated
        recipe.main([str(a) for a in argv + ["--max_length", 8192]])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert f"line 1 (id train-0): {lengths[0]} tokens (15368 of them image tokens) > --max_length 8192" in err


@pytest.mark.parametrize("name", SCRIPTS)
def test_default_max_length_is_read_from_the_model_config(name, tmp_path, capfd):
    """A model folder whose config says 300 positions: by default every training row (over 300 tokens at
    --num_crops 1) is reported against 300, which no flag gave: it came from the config."""
    from cauldron_data import cauldron_features, write_memes_dataset
    from test_preflight_docvqa import write_data

    model = model_folder(tmp_path, context_length=300)
    common = ["--model_name_or_path", model, "--output_dir", tmp_path / "out", "--num_crops", 1, "--batch_size", 1,
              "--dataloader_num_workers", 0, "--deepspeed", "none", "--no-tqdm"]  # fmt: skip
    if name == "docvqa":
        argv = ["--dataset_path", write_data(tmp_path / "docvqa")["mini"]]
    elif name == "hateful_memes":
        argv = ["--dataset_path", write_memes_dataset(tmp_path / "memes", num_rows=4), "--eval_size", 2]
    elif name == "nlvr2":
        from datasets import Dataset

        turn = {"user": "Are both pictures red?", "assistant": "True", "source": "nlvr2"}
        pictures = [[Image.new("RGB", (48, 40), "red"), Image.new("RGB", (40, 48), "red")] for _ in range(4)]
        Dataset.from_dict({"images": pictures, "texts": [[turn]] * 4}, features=cauldron_features()).save_to_disk(
            str(tmp_path / "nlvr2"))
        argv = ["--dataset_path", tmp_path / "nlvr2", "--eval_size", 2]
    else:
        argv = ["--data_dir", video_dataset(tmp_path / "ucf101", size=(32, 24), num_frames=2)]
    with pytest.raises(SystemExit) as exit_info:
        load(name).main([str(a) for a in common + argv])
    assert exit_info.value.code == 1
    captured = capfd.readouterr()
    assert "> --max_length 300" in captured.out + captured.err


# ----------------------------------------------------------------------------------------------
# convert_ucf101.py: --tmp_dir and --out_dir
# ----------------------------------------------------------------------------------------------


def test_convert_defaults_and_flags(tmp_path):
    import convert_ucf101

    args = convert_ucf101.parse_args([])
    assert args.out_dir == "./ucf101" and args.tmp_dir is None  # None: a fresh folder (the original: /tmp/ucf101)
    args = convert_ucf101.parse_args(["--tmp_dir", str(tmp_path / "tmp"), "--out_dir", str(tmp_path / "out")])
    assert (args.tmp_dir, args.out_dir) == (str(tmp_path / "tmp"), str(tmp_path / "out"))


def test_convert_tmp_dir_is_where_the_archive_is_extracted(tmp_path, monkeypatch, capsys):
    """`python convert_ucf101.py --tmp_dir DIR --out_dir OUT`, the original's command line (hub download
    faked): the archive is extracted into DIR, a new folder, removed at the end; DIR must not exist yet."""
    import huggingface_hub

    import convert_ucf101
    from test_convert_ucf101 import write_video

    videos = tmp_path / "UCF101_subset"
    for split, label in (("train", "Archery"), ("train", "BabyCrawling"), ("val", "Archery")):
        write_video(videos / split / label / f"v_{label}_{split}.avi", "mpeg4", 8)
    archive = tmp_path / "hub" / "UCF101_subset.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(videos, arcname="UCF101_subset")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda **kwargs: str(archive))
    extracted = []
    real_extract = convert_ucf101.extract

    def recording_extract(source, dest):
        real_extract(source, dest)
        extracted.append(sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*.avi")))

    monkeypatch.setattr(convert_ucf101, "extract", recording_extract)
    tmp_dir, out_dir = tmp_path / "scratch" / "ucf101_tmp", tmp_path / "ucf101"
    convert_ucf101.main(["--tmp_dir", str(tmp_dir), "--out_dir", str(out_dir), "--no-tqdm"])
    assert f"extracting {archive} to {tmp_dir}" in capsys.readouterr().out
    assert extracted == [["UCF101_subset/train/Archery/v_Archery_train.avi",
                          "UCF101_subset/train/BabyCrawling/v_BabyCrawling_train.avi",
                          "UCF101_subset/val/Archery/v_Archery_val.avi"]]  # fmt: skip
    assert not tmp_dir.exists() and (tmp_dir.parent).is_dir()  # removed at the end, as the original
    lines = [json.loads(line) for line in (out_dir / "ucf101_train.jsonl").read_text().splitlines()]
    assert [line["conversations"][0]["assistant"] for line in lines] == ["Archery", "BabyCrawling"]

    # DIR exists already: refused before anything is downloaded or written (the original's exist_ok=False).
    tmp_dir.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        convert_ucf101.main(["--tmp_dir", str(tmp_dir), "--out_dir", str(tmp_path / "other")])
    assert exit_info.value.code == 2
    assert f"--tmp_dir {tmp_dir} already exists" in capsys.readouterr().err
    # A --src folder is read in place: there is nothing to extract, so --tmp_dir would do nothing.
    with pytest.raises(SystemExit):
        convert_ucf101.parse_args(["--src", str(videos), "--tmp_dir", str(tmp_path / "new")])
    assert "--tmp_dir is where an archive is extracted" in capsys.readouterr().err
