"""finetune_hf_trainer_ucf101.py end to end on a tiny converted dataset (8 frames per clip), plus its prompt format."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import finetune_hf_trainer_ucf101 as recipe

SCRIPT = "finetune_hf_trainer_ucf101.py"
CLASSES = ["Archery", "BabyCrawling"]
PROMPT = "Classify the video into one of the following classes: Archery, BabyCrawling."
FOLLOW_UP = {"images": [], "user": "Is it indoors?", "assistant": "yes"}
# 32x24 frames at num_crops 1: one 336x336 crop + the global crop -> 2*144 + 1 + 2*12 tokens.
TOKENS_PER_FRAME = 313


def make_dataset(root: Path) -> Path:
    """The layout convert_ucf101.py writes: 8 jpg frames per clip, ucf101_{train,val}.jsonl.

    Clip 1 of each split has a second, text-only turn (multi-turn conversations are supported).
    """
    index = 0
    for split, num_clips in [("train", 4), ("val", 2)]:
        lines = []
        for c in range(num_clips):
            label = CLASSES[c % 2]
            rels = []
            for k in range(8):
                rel = f"{split}/{label}/v_{label}_g{c:02d}_c01.{k}.jpg"
                (root / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
                pixels = np.full((24, 32, 3), (20 * k + 90 * (c % 2), 40 * c, 100), np.uint8)
                Image.fromarray(pixels).save(root / "images" / rel)
                rels.append(rel)
            conversations = [{"images": rels, "user": PROMPT, "assistant": label}]
            if c == 1:
                conversations.append(dict(FOLLOW_UP))
            record = {"id": f"{split}-{index:010d}", "source": "ucf101", "conversations": conversations}
            lines.append(json.dumps(record))
            index += 1
        (root / f"ucf101_{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ucf101"))


def records(data_dir: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (data_dir / f"ucf101_{split}.jsonl").read_text().splitlines()]


def common_args(tiny_model_dir, data_dir, output_dir):
    return [
        "--model_name_or_path", tiny_model_dir, "--data_dir", data_dir, "--output_dir", output_dir,
        "--num_crops", 1, "--max_eval_samples", 2, "--max_new_tokens", 2,
        "--dataloader_num_workers", 0, "--warmup_steps", 0, "--logging_steps", 1, "--no-tqdm",
    ]  # fmt: skip


def check_eval_files(output_dir: Path, data_dir: Path, num_samples: int):
    expected_answers = [r["conversations"][-1]["assistant"] for r in records(data_dir, "val")][:num_samples]
    for name in ("eval_before.json", "eval_after.json"):
        result = json.loads((output_dir / name).read_text())
        assert result["num_samples"] == num_samples
        assert result["answers"] == expected_answers  # the last answer of every line, in file order
        assert len(result["predictions"]) == num_samples and all(isinstance(p, str) for p in result["predictions"])
        # The original's normalisation on both sides: whitespace, then periods, then case.
        correct = [p.strip().strip(".").lower() == a.strip().strip(".").lower()
                   for p, a in zip(result["predictions"], result["answers"])]  # fmt: skip
        assert result["accuracy"] == pytest.approx(sum(correct) / num_samples)
        cm = result["confusion_matrix"]  # rows: gold classes; columns: classes + "(other)"
        assert cm["labels"] == sorted(set(expected_answers), key=str.lower)
        assert cm["columns"] == cm["labels"] + ["(other)"]
        assert sum(map(sum, cm["matrix"])) == num_samples
        assert sum(cm["matrix"][i][i] for i in range(len(cm["labels"]))) == sum(correct)
    for plot in ("loss_curve.png", "confusion_matrix.png"):
        assert Image.open(output_dir / plot).format == "PNG"


def check_log_history(output_dir: Path, steps=(1, 2)):
    history = json.loads((output_dir / "log_history.json").read_text())
    train_logs = [h for h in history if "loss" in h]
    assert [h["step"] for h in train_logs] == list(steps)
    for h in train_logs:
        assert math.isfinite(h["loss"]) and h["loss"] > 0
        assert h["images_per_second"] > 0 and h["tokens_per_second"] > h["images_per_second"]
    summary = history[-1]
    assert summary["train_images_per_second"] > 0 and summary["train_tokens_per_second"] > 0
    return history


# ---------------------------------------------------------------------------------------------
# Prompt format and collators (in process, no training)
# ---------------------------------------------------------------------------------------------


def test_prompt_format_and_collators(tiny_model_dir, data_dir):
    import datasets
    from transformers import AutoProcessor

    import phi3v  # noqa: F401

    processor = AutoProcessor.from_pretrained(tiny_model_dir, num_crops=1)
    tokenizer = processor.tokenizer
    image_dir = data_dir / "images"
    single, multi, _, _ = records(data_dir, "train")
    frames = [Image.open(image_dir / rel).convert("RGB") for rel in multi["conversations"][0]["images"]]

    # Written out by hand: the chat template, the 8 frame tags back to back, answers with <|end|> + <|endoftext|>.
    tags = "".join(f"<|image_{i}|>" for i in range(1, 9))
    turn1 = processor(text=f"<|user|>\n{tags}\n{PROMPT}<|end|>\n<|assistant|>\n", images=frames)
    answer1 = tokenizer("BabyCrawling<|end|>\n<|endoftext|>", add_special_tokens=False).input_ids
    turn2 = tokenizer("<|user|>\nIs it indoors?<|end|>\n<|assistant|>\n").input_ids
    answer2 = tokenizer("yes<|end|>\n<|endoftext|>", add_special_tokens=False).input_ids
    assert answer1[0] != tokenizer.bos_token_id and 32007 in answer1 and answer1[-1] == 32000
    prompt1 = turn1["input_ids"][0].tolist()
    assert turn2[0] == tokenizer.bos_token_id  # every turn is its own template block

    encoded = recipe.encode_conversation(processor, multi["conversations"], image_dir)
    assert encoded["input_ids"] == prompt1 + answer1 + turn2 + answer2
    assert encoded["labels"] == [-100] * len(prompt1) + answer1 + [-100] * len(turn2) + answer2
    assert sum(i < 0 for i in encoded["input_ids"]) == 8 * TOKENS_PER_FRAME
    assert torch.equal(encoded["pixel_values"], turn1["pixel_values"])
    assert encoded["pixel_values"].shape == (8, 2, 3, 336, 336)
    assert encoded["image_sizes"].tolist() == [[336, 336]] * 8
    # --max_length counts exactly what the collator builds, without decoding pixels.
    assert recipe.conversation_length(processor, multi["conversations"], image_dir, 1) == (
        len(encoded["input_ids"]), 8 * TOKENS_PER_FRAME)

    # Eval prompt: everything up to the last answer.
    eval_encoded = recipe.encode_conversation(processor, multi["conversations"], image_dir, include_last_answer=False)
    assert eval_encoded["input_ids"] == prompt1 + answer1 + turn2

    # Train batch: right padding (pad id / -100), attention on every real token, images in order.
    first = recipe.encode_conversation(processor, single["conversations"], image_dir)
    batch = recipe.TrainCollator(processor, image_dir)([multi, single])
    n0, n1 = len(encoded["input_ids"]), len(first["input_ids"])
    assert n0 > n1 and batch["input_ids"].shape == (2, n0)
    assert batch["input_ids"][0].tolist() == encoded["input_ids"]
    assert batch["input_ids"][1].tolist() == first["input_ids"] + [32000] * (n0 - n1)
    assert batch["labels"][1].tolist() == first["labels"] + [-100] * (n0 - n1)
    assert batch["attention_mask"].sum(1).tolist() == [n0, n1]  # <|endoftext|> (= pad id) inside is attended
    assert batch["pixel_values"].shape[0] == 16
    assert torch.equal(batch["pixel_values"][:8], encoded["pixel_values"])
    assert torch.equal(batch["pixel_values"][8:], first["pixel_values"])

    # Eval batch: left padding, answers of the last turn.
    eval_batch = recipe.EvalCollator(processor, image_dir)([single, multi])
    e0 = recipe.encode_conversation(processor, single["conversations"], image_dir, include_last_answer=False)
    width = eval_batch["input_ids"].shape[1]
    assert width == len(eval_encoded["input_ids"])
    assert eval_batch["input_ids"][0].tolist() == [32000] * (width - len(e0["input_ids"])) + e0["input_ids"]
    assert eval_batch["attention_mask"][0].tolist() == [0] * (width - len(e0["input_ids"])) + [1] * len(e0["input_ids"])
    assert eval_batch["answers"] == ["Archery", "yes"]
    assert eval_batch["ids"] == [single["id"], multi["id"]]

    # Eval sharding matches datasets' contiguous shards (gathered in rank order = file order).
    items = list(range(7))
    for num_shards in (1, 2, 3):
        ds = datasets.Dataset.from_dict({"x": items})
        for index in range(num_shards):
            expected = ds.shard(num_shards, index, contiguous=True)["x"]
            assert recipe.contiguous_shard(items, num_shards, index) == list(expected)


def test_confusion_matrix():
    predictions = ["Archery", " archery", "Archery.", "BabyCrawling", "babycrawling "]
    answers = ["Archery", "Archery", "Archery", "BabyCrawling", "BabyCrawling"]
    assert recipe.confusion_matrix(predictions, answers) == {
        "labels": ["Archery", "BabyCrawling"],
        "columns": ["Archery", "BabyCrawling", "(other)"],
        "matrix": [[3, 0, 0], [0, 2, 0]],  # "Archery." matches: the metric strips periods, as the original
    }
    assert recipe.confusion_matrix(["Arch"], ["Archery"])["matrix"] == [[0, 1]]  # anything else is "(other)"


def test_eval_scores_answers_as_the_original(tiny_model_dir, data_dir, tmp_path):
    """The script's real evaluation on the tiny model: gold answers that differ from what the model says only
    by the spelling the original forgives (strip(), then strip('.'), then lower(), e.g. "BabyCrawling." for
    "BabyCrawling") count as right in the accuracy and in the confusion matrix."""
    import copy

    from transformers import AutoModelForCausalLM, AutoProcessor

    argv = ["--data_dir", data_dir, "--output_dir", tmp_path / "out", "--model_name_or_path", tiny_model_dir,
            "--num_crops", 1, "--max_new_tokens", 3, "--eval_batch_size", 2, "--deepspeed", "none",
            "--dataloader_num_workers", 0]  # fmt: skip
    args = recipe.parse_args([str(a) for a in argv])
    training_args = recipe.build_training_args(args)
    processor = AutoProcessor.from_pretrained(tiny_model_dir, num_crops=1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    val = records(data_dir, "val")
    said = recipe.evaluate(model, processor, val, args, training_args, tmp_path / "said.json", print)["predictions"]

    respelled = copy.deepcopy(val)  # the last answer of each line (the one generated) becomes " {said}. "
    for record, prediction in zip(respelled, said):
        record["conversations"][-1]["assistant"] = f" {prediction.strip()}. "
    result = recipe.evaluate(model, processor, respelled, args, training_args, tmp_path / "eval.json", print)
    assert result["predictions"] == said  # the gold answer is not part of the prompt
    assert result["answers"] == [f" {p.strip()}. " for p in said]
    assert result["accuracy"] == 1.0
    cm = result["confusion_matrix"]
    assert sum(cm["matrix"][i][i] for i in range(len(cm["labels"]))) == len(val) == sum(map(sum, cm["matrix"]))
    assert json.loads((tmp_path / "eval.json").read_text())["accuracy"] == 1.0


def test_save_plots(tmp_path, drawn_figures):
    """loss_curve.png draws the training loss, the held-out loss and the learning rate (second axis)."""
    history = [
        {"step": 1, "loss": 9.0, "learning_rate": 1e-2},
        {"step": 2, "loss": 3.0, "learning_rate": 5e-3},
        {"step": 2, "eval_loss": 4.0},
        {"step": 3, "loss": 1.0, "learning_rate": 0.0},
        {"step": 3, "train_runtime": 1.0, "train_loss": 4.3},
    ]
    eval_after = {"metric": "accuracy", "accuracy": 0.5,
                  "confusion_matrix": recipe.confusion_matrix(["Archery", "x"], ["Archery", "Run"])}
    recipe.save_plots(tmp_path, history, eval_after, print)
    assert drawn_figures["loss_curve.png"] == {
        "train loss": [[1, 9.0], [2, 3.0], [3, 1.0]],
        "held-out loss": [[2, 4.0]],
        "learning rate": [[1, 1e-2], [2, 5e-3], [3, 0.0]],
    }
    assert drawn_figures["loss_curve.png axes"] == [("step", "loss"), ("", "learning rate")]
    for name in ("loss_curve.png", "confusion_matrix.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG"

    (tmp_path / "confusion_matrix.png").unlink()  # no evaluation: the loss curve only
    recipe.save_plots(tmp_path, history[:1], None, print)
    assert not (tmp_path / "confusion_matrix.png").exists()


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------


def load_state(path) -> dict:
    from transformers import AutoModelForCausalLM

    import phi3v  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_full_finetune(tiny_model_dir, data_dir, tmp_path, run_script):
    """Plain `python` (the script sets up DeepSpeed's single-process environment), batch 2 per step."""
    from transformers import AutoModelForCausalLM, AutoProcessor

    import phi3v  # noqa: F401

    output_dir = tmp_path / "out"
    run_script(
        SCRIPT, *common_args(tiny_model_dir, data_dir, output_dir),
        "--max_steps", 2, "--batch_size", 2, "--batch_size_per_gpu", 2, "--resize_backend", "torch",
    )  # fmt: skip
    check_eval_files(output_dir, data_dir, 2)
    check_log_history(output_dir)
    training_args = torch.load(output_dir / "training_args.bin", weights_only=False)
    assert training_args.max_steps == 2
    assert training_args.deepspeed.endswith("ds_configs/zero2.json")  # full fine-tuning goes through DeepSpeed
    assert training_args.per_device_train_batch_size == 2 and training_args.gradient_accumulation_steps == 1

    # The saved folder reloads and runs; both the language model and the vision tower were trained.
    model = AutoModelForCausalLM.from_pretrained(output_dir, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(output_dir)
    assert processor.num_crops == 1 and processor.image_processor.resize_backend == "torch"
    before = load_state(tiny_model_dir)
    after = model.state_dict()
    for name in ("model.layers.0.self_attn.qkv_proj.weight", "model.vision_embed_tokens.img_projection.0.weight"):
        assert not torch.equal(before[name], after[name]), name
    batch = recipe.TrainCollator(processor, data_dir / "images")(records(data_dir, "val")[:1])
    with torch.no_grad():
        out = model.eval()(**{k: v for k, v in batch.items() if k != "labels"})
    assert out.logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(out.logits).all()


def test_lora_frozen_vision(tiny_model_dir, data_dir, tmp_path, run_main):
    """LoRA on the language model only; the merged model proves nothing else changed."""
    from safetensors.torch import load_file

    output_dir = tmp_path / "out"
    run_main(
        SCRIPT, *common_args(tiny_model_dir, data_dir, output_dir),
        "--max_steps", 1, "--batch_size", 2, "--batch_size_per_gpu", 1, "--max_eval_samples", 1,
        "--use_lora", "--lora_rank", 4, "--lora_alpha_ratio", 2, "--freeze_vision_model", "--merge_lora",
        "--learning_rate", "1e-3", "--eval_steps", 1, "--max_eval_loss_samples", 1,
    )  # fmt: skip
    check_eval_files(output_dir, data_dir, 1)
    history = check_log_history(output_dir, steps=[1])
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert len(eval_losses) == 1 and math.isfinite(eval_losses[0])  # held-out loss at step 1

    config = json.loads((output_dir / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["init_lora_weights"] == "gaussian"
    targets = set(config["target_modules"])
    assert not any("vision_embed_tokens" in t for t in targets)
    layer_modules = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    expected = {f"model.layers.{i}.{m}" for i in range(2) for m in layer_modules} | {"lm_head"}
    assert targets == expected

    adapter = load_file(output_dir / "adapter_model.safetensors")
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)  # no full weights saved
    assert not any("vision_embed_tokens" in k for k in adapter)
    lora_b = [v for k, v in adapter.items() if ".lora_B." in k]
    assert len(lora_b) == len(expected) and all(v.abs().sum() > 0 for v in lora_b)  # trained (B starts at 0)

    # merged = base + (alpha / r) * B @ A on the LoRA targets, and bit-identical everywhere else.
    base, merged = load_state(tiny_model_dir), load_state(output_dir / "merged")
    assert base.keys() == merged.keys()
    scale = config["lora_alpha"] / config["r"]
    for name, weight in base.items():
        module = name.removesuffix(".weight")
        if module in targets:
            a = adapter[f"base_model.model.{module}.lora_A.weight"]
            b = adapter[f"base_model.model.{module}.lora_B.weight"]
            torch.testing.assert_close(merged[name], weight + scale * (b @ a), rtol=1e-5, atol=1e-6)
            assert not torch.equal(merged[name], weight)
        else:
            assert torch.equal(merged[name], weight), f"{name} changed outside LoRA"


def test_missing_data_dir(tmp_path, run_script):
    missing = tmp_path / "ucf101"
    proc = run_script(SCRIPT, "--data_dir", missing, check=False)
    assert proc.returncode == 2
    assert f"--data_dir {missing} does not exist: make it with python convert_ucf101.py" in proc.stdout
    assert "Traceback" not in proc.stdout


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batch_size", "3", "--batch_size_per_gpu", "2"], "--batch_size 3 must be a multiple of world size 1 x"),
        (["--num_crops", "17"], "--num_crops must be between 1 and 16"),
        (["--num_crops", "0"], "--num_crops must be between 1 and 16"),
        (["--merge_lora"], "--merge_lora only makes sense with --use_lora"),
        (["--resume_from_checkpoint", "/nonexistent/checkpoint-2"], "is not a folder"),
        (["--use_lora", "--deepspeed", "/nonexistent.json"], None),  # LoRA ignores --deepspeed
        (["--deepspeed", "/nonexistent.json"], "--deepspeed config /nonexistent.json not found"),
    ],
)
def test_argument_errors(extra, message, data_dir, tmp_path, capsys):
    argv = ["--data_dir", str(data_dir), *extra]
    if message is None:
        assert recipe.parse_args(argv).deepspeed is None
        return
    with pytest.raises(SystemExit) as exit_info:
        recipe.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_data_dir_layout_errors(tmp_path, capsys):
    data_dir = tmp_path / "half"
    (data_dir / "images").mkdir(parents=True)
    (data_dir / "ucf101_val.jsonl").write_text("")
    with pytest.raises(SystemExit):
        recipe.parse_args(["--data_dir", str(data_dir)])
    err = capsys.readouterr().err
    assert f"--data_dir {data_dir} lacks ucf101_train.jsonl: expected the layout of convert_ucf101.py" in err
    (data_dir / "images").rmdir()
    with pytest.raises(SystemExit):
        recipe.parse_args(["--data_dir", str(data_dir)])
    assert "lacks ucf101_train.jsonl, images/" in capsys.readouterr().err


def test_flash_attention_checks(data_dir, capsys, monkeypatch):
    """No flash-attn (or no CUDA) here; with both faked, flash attention alone trains in bf16 (as the original)."""
    with pytest.raises(SystemExit):
        recipe.parse_args(["--data_dir", str(data_dir), "--use_flash_attention", "--bf16"])
    assert "--use_flash_attention needs" in capsys.readouterr().err
    monkeypatch.setattr(recipe.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(recipe.torch.cuda, "is_available", lambda: True)
    args = recipe.parse_args(["--data_dir", str(data_dir), "--use_flash_attention"])
    assert args.bf16 and recipe.precision(args) == (torch.bfloat16, True, False)
    args = recipe.parse_args(["--data_dir", str(data_dir), "--use_flash_attention", "--bf16", "--use_qlora"])
    assert args.use_lora and args.deepspeed is None  # QLoRA implies LoRA, never DeepSpeed


# ---------------------------------------------------------------------------------------------
# --packing and --group_by_length
# ---------------------------------------------------------------------------------------------


def test_packing_same_losses(tiny_model_dir, data_dir, tmp_path, run_main):
    """Packed micro-batches (one row, no padding) train exactly like padded ones: same losses.

    Micro-batches of 2 clips, one of them with a second, text-only turn: the padded rows differ in
    length, so padding and the attention mask matter."""
    histories = []
    for packing in ([], ["--packing"]):
        output_dir = tmp_path / f"out{len(packing)}"
        run_main(
            SCRIPT, *common_args(tiny_model_dir, data_dir, output_dir), "--max_eval_samples", 0,
            "--max_steps", 2, "--batch_size", 2, "--batch_size_per_gpu", 2, "--learning_rate", "1e-3",
            "--deepspeed", "none", *packing,
        )  # fmt: skip
        history = json.loads((output_dir / "log_history.json").read_text())
        histories.append([h["loss"] for h in history if "loss" in h])
    padded, packed = histories
    assert len(padded) == 2  # step 2: after one update from the packed gradients
    assert packed == pytest.approx(padded, rel=1e-4)

    # What the --packing collator builds: one row, no padding, positions restarting per clip.
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir, num_crops=1)
    single, multi = records(data_dir, "train")[:2]
    image_dir = data_dir / "images"
    rows = [recipe.encode_conversation(processor, r["conversations"], image_dir) for r in (multi, single)]
    batch = recipe.TrainCollator(processor, image_dir, packing=True)([multi, single])
    n0, n1 = (len(r["input_ids"]) for r in rows)
    assert "attention_mask" not in batch and batch["input_ids"].shape == (1, n0 + n1)
    assert batch["input_ids"][0].tolist() == rows[0]["input_ids"] + rows[1]["input_ids"]
    assert batch["position_ids"][0].tolist() == list(range(n0)) + list(range(n1))
    assert batch["pixel_values"].shape[0] == 16


@pytest.mark.parametrize("group_by_length", [False, True])
def test_group_by_length_sampler(group_by_length, tiny_model_dir, data_dir, tmp_path):
    """--group_by_length: the train sampler groups by the preflight's formula lengths; without it,
    plain random order."""
    from transformers import AutoModelForCausalLM, AutoProcessor
    from transformers.trainer_pt_utils import LengthGroupedSampler

    argv = ["--data_dir", str(data_dir), "--output_dir", str(tmp_path / "out"), "--model_name_or_path",
            str(tiny_model_dir), "--num_crops", "1", "--batch_size", "2", "--batch_size_per_gpu", "2",
            "--deepspeed", "none", "--dataloader_num_workers", "0"]  # fmt: skip
    argv += ["--group_by_length"] if group_by_length else []
    args = recipe.parse_args(argv)
    training_args = recipe.build_training_args(args)
    processor = AutoProcessor.from_pretrained(tiny_model_dir, num_crops=1)
    train, _, lengths = recipe.load_data(args, processor, True, print)
    expected = [recipe.conversation_length(processor, r["conversations"], data_dir / "images", 1)[0] for r in train]
    assert lengths == expected and len(set(lengths)) > 1  # the multi-turn clip is longer
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trainer = recipe.make_trainer_class()(
        model=model, args=training_args, train_dataset=recipe.RecordDataset(train, lengths),
        data_collator=recipe.TrainCollator(processor, data_dir / "images"),
    )  # fmt: skip
    sampler = trainer._get_train_sampler()
    if not group_by_length:
        assert not isinstance(sampler, LengthGroupedSampler)
        return
    assert isinstance(sampler, LengthGroupedSampler) and sampler.lengths == lengths
    order = list(sampler)
    assert sorted(order) == list(range(len(train)))
    # 4 clips in micro-batches of 2: each mega-batch (here one micro-batch) is sorted, longest first,
    # and the batch with the longest clip comes first (an out-of-memory error shows at once).
    grouped = [[lengths[i] for i in order[k : k + 2]] for k in range(0, len(order), 2)]
    assert all(batch == sorted(batch, reverse=True) for batch in grouped) and grouped[0][0] == max(lengths)
    widths = [batch["input_ids"].shape[1] for batch in trainer.get_train_dataloader()]
    assert widths[0] == max(lengths)
