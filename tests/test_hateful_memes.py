"""finetune_hf_trainer_hateful_memes.py on a tiny local copy of the_cauldron/hateful_memes.

Covers: the collator (labels, right padding, batch of 3, length count for --max_length), the
accuracy/AUROC metric (and the one-class case), the confusion matrix and the plots (loss curve with
held-out loss and learning rate), loading a parquet copy, argument validation,
full fine-tuning with DeepSpeed ZeRO-2 under torchrun (2 processes), and LoRA with
--batch_size_per_gpu 2, intermediate checkpoints, an exact resume, --eval_steps and --merge_lora;
--packing (the same losses as padded batches) and --group_by_length (the Trainer's sampler gets the
token-count formula lengths). Bad data and bad arguments: tests/test_preflight_hateful_memes.py.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from phi3v.validation import load_image
from cauldron_data import cauldron_features

REPO = Path(__file__).resolve().parents[1]
SCRIPT = "finetune_hf_trainer_hateful_memes.py"
SIZES = [(64, 48), (48, 64), (80, 40)]  # different image token counts at num_crops 2
COLOURS = ["red", "green", "blue", "yellow", "white", "black"]
ANSWERS = ["No", "Yes", "No", "Yes"]  # the 4 eval rows: both classes, so the AUROC is defined


def make_rows(n=12, seed=0):
    rng = random.Random(seed)
    images, texts = [], []
    for i in range(n):
        width, height = SIZES[i % len(SIZES)]
        image = Image.new("RGB", (width, height), COLOURS[i % len(COLOURS)])
        draw = ImageDraw.Draw(image)
        for _ in range(2):
            x, y = rng.randrange(width - 12), rng.randrange(height - 12)
            draw.rectangle([x, y, x + rng.randrange(3, 12), y + rng.randrange(3, 12)], fill=rng.choice(COLOURS))
        images.append([image])
        question = "Is this meme hateful?" + " Answer yes or no." * (i % 3)
        texts.append([{"user": question, "assistant": "Yes" if i % 2 else "No", "source": "hateful_memes"}])
    return {"images": images, "texts": texts}


@pytest.fixture(scope="module")
def memes_dataset():
    from datasets import Dataset

    features = cauldron_features()
    return Dataset.from_dict(make_rows(), features=features)


@pytest.fixture(scope="module")
def memes_dir(memes_dataset, tmp_path_factory):
    path = tmp_path_factory.mktemp("hateful_memes") / "data"
    memes_dataset.save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("finetune_hateful_memes", REPO / SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def common_args(tiny_model_dir, memes_dir, output_dir, *extra):
    return [
        "--model_name_or_path", tiny_model_dir, "--dataset_path", memes_dir, "--output_dir", output_dir,
        "--eval_size", 4, "--max_eval_samples", 4, "--max_new_tokens", 3, "--dataloader_num_workers", 0,
        "--warmup_steps", 0, "--logging_steps", 1, "--learning_rate", 1e-3, "--no-tqdm", *extra,
    ]


def read_json(path):
    return json.loads(path.read_text())


def check_eval_file(path, num=4):
    report = read_json(path)
    assert 0.0 <= report["accuracy"] <= 1.0
    assert isinstance(report["auroc"], float) and 0.0 <= report["auroc"] <= 1.0
    assert report["answers"] == ANSWERS[:num]
    assert len(report["predictions"]) == len(report["scores"]) == num
    assert all(isinstance(p, str) for p in report["predictions"])
    assert all(0.0 < s < 1.0 for s in report["scores"])
    # Confusion matrix: rows No/Yes (gold), columns No/Yes/(other) (prediction); every row counted once.
    cm = report["confusion_matrix"]
    assert cm["labels"] == ["No", "Yes"] and cm["columns"] == ["No", "Yes", "(other)"]
    assert sum(map(sum, cm["matrix"])) == report["num_samples"] == num
    assert [sum(row) for row in cm["matrix"]] == [ANSWERS[:num].count("No"), ANSWERS[:num].count("Yes")]
    assert cm["matrix"][0][0] + cm["matrix"][1][1] == round(report["accuracy"] * num)
    return report


def check_plots(output_dir):
    for name in ("loss_curve.png", "confusion_matrix.png"):
        with Image.open(output_dir / name) as image:  # a real PNG, not just a file with that name
            assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100
            image.load()


def loss_entries(history):
    return [e for e in history if "loss" in e]


def reference_scores(script, model, processor, dataset, indices):
    """P(yes) for single rows, unpadded, one forward each: what the batched eval must reproduce."""
    tokenizer = processor.tokenizer
    yes_ids = script.first_token_ids(tokenizer, script.POSITIVE_ANSWERS)
    no_ids = script.first_token_ids(tokenizer, script.NEGATIVE_ANSWERS)
    scores = []
    model.eval()
    with torch.no_grad():
        for i in indices:
            row = dataset[i]
            question, _ = script.first_turn(row)
            inputs = processor(text=script.build_prompt(tokenizer, question), images=[load_image(row["images"][0])])
            logits = model(**inputs).logits[:, -1]
            scores.append(script.yes_probability(logits, yes_ids, no_ids).item())
    return scores


# ------------------------------------------------------------------------------------------
# In-process checks of the script's pieces
# ------------------------------------------------------------------------------------------


def test_collator_and_sample_lengths(script, tiny_model_dir, memes_dataset):
    import phi3v  # noqa: F401
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir, num_crops=2)
    tokenizer = processor.tokenizer
    rows = [memes_dataset[i] for i in range(3)]
    batch = script.TrainCollator(processor)(rows)

    lengths = script.sample_lengths(memes_dataset.select(range(3)), processor)
    assert len(set(lengths)) == 3, "test rows should differ in length"
    longest = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, longest)
    assert batch["pixel_values"].shape == (3, 3, 3, 336, 336)
    assert batch["image_sizes"].tolist() == [[336, 336], [336, 336], [336, 672]]
    for i, row in enumerate(rows):
        n = lengths[i]  # the length count used by --max_length is the real sequence length
        question, answer = script.first_turn(row)
        answer_ids = tokenizer(f"{answer}<|end|>\n<|endoftext|>", add_special_tokens=False).input_ids
        prompt = processor(text=script.build_prompt(tokenizer, question), images=[load_image(row["images"][0])])
        prompt_ids = prompt["input_ids"][0].tolist()
        assert n == len(prompt_ids) + len(answer_ids)
        assert batch["input_ids"][i, :n].tolist() == prompt_ids + answer_ids
        assert batch["labels"][i, :n].tolist() == [-100] * len(prompt_ids) + answer_ids
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (longest - n)
        assert (batch["input_ids"][i, n:] == tokenizer.pad_token_id).all()
        assert (batch["labels"][i, n:] == -100).all()
        assert answer_ids[-1] == tokenizer.pad_token_id  # <|endoftext|>: why the mask is positional

    # --packing: the same samples in one row, no padding, positions restarting at every sample.
    packed = script.TrainCollator(processor, packing=True)(rows)
    assert "attention_mask" not in packed and packed["input_ids"].shape == (1, sum(lengths))
    starts = [sum(lengths[:i]) for i in range(3)]
    assert [i for i, p in enumerate(packed["position_ids"][0].tolist()) if p == 0] == starts
    for i, start in enumerate(starts):
        n = lengths[i]
        assert packed["input_ids"][0, start : start + n].tolist() == batch["input_ids"][i, :n].tolist()
        assert packed["labels"][0, start : start + n].tolist() == batch["labels"][i, :n].tolist()
    assert torch.equal(packed["pixel_values"], batch["pixel_values"])

    # The preflight gives the same lengths, and marks (never truncates) the samples above --max_length.
    results = script.check_rows(memes_dataset.select(range(3)), processor, max_length=sorted(lengths)[1])
    assert [length for _, length, _ in results] == lengths and [images for *_, images in results] == [1, 1, 1]
    assert [bool(problems) for problems, *_ in results] == [n > sorted(lengths)[1] for n in lengths]
    assert any(f"{max(lengths)} tokens" in p and "> --max_length" in p for problems, *_ in results for p in problems)


def test_metrics(script):
    from sklearn.metrics import roc_auc_score

    metrics = script.compute_metrics(["Yes.", " no", "Yes", "maybe"], ["yes", "No", "No", "Yes"], [0.9, 0.2, 0.6, 0.4])
    assert metrics["accuracy"] == 0.5
    assert metrics["auroc"] == pytest.approx(roc_auc_score([1, 0, 0, 1], [0.9, 0.2, 0.6, 0.4]))
    one_class = script.compute_metrics(["Yes", "No"], ["Yes", "yes."], [0.7, 0.1])
    assert one_class["accuracy"] == 0.5 and one_class["auroc"] is None and "one class" in one_class["auroc_note"]
    other = script.compute_metrics(["Yes", "No", "x"], ["Yes", "No", "hateful"], [0.7, 0.1, 0.5])
    assert other["auroc"] == 1.0 and other["auroc_skipped_non_yes_no"] == 1

    logits = torch.full((2, 10), -5.0)
    logits[0, 3], logits[0, 7] = 2.0, 0.0  # yes (id 3) twice as likely in log space
    logits[1, 4] = 1.0  # second spelling of no (id 4)
    p = script.yes_probability(logits, [3], [7, 4])
    assert p[0].item() == pytest.approx(math.exp(2) / (math.exp(2) + 1 + math.exp(-5)), rel=1e-5)
    assert p[1].item() == pytest.approx(math.exp(-5) / (math.exp(-5) + math.exp(-5) + math.exp(1)), rel=1e-5)


def test_confusion_matrix(script):
    predictions = ["Yes.", " no", "Yes", "maybe", "no"]
    answers = ["yes", "No", "No", "Yes", "hateful"]
    assert script.confusion_matrix(predictions, answers) == {
        "labels": ["No", "Yes", "hateful"],  # No/Yes always (fixed order), then other gold answers
        "columns": ["No", "Yes", "hateful", "(other)"],
        "matrix": [[1, 1, 0, 0], [0, 1, 0, 1], [1, 0, 0, 0]],  # matched as the accuracy (strip ".", case)
    }
    empty = script.confusion_matrix([], [])
    assert empty["matrix"] == [[0, 0, 0], [0, 0, 0]]


def test_save_plots(script, tmp_path, drawn_figures):
    """loss_curve.png draws the training loss, the held-out loss and the learning rate (second axis)."""
    drawn = drawn_figures
    history = [
        {"step": 1, "loss": 2.0, "learning_rate": 1e-3},
        {"step": 2, "loss": 1.5, "learning_rate": 5e-4},
        {"step": 2, "eval_loss": 1.7},
        {"step": 3, "loss": 1.0, "learning_rate": 0.0},
        {"step": 3, "train_runtime": 1.0, "train_loss": 1.5},
    ]
    report = {"accuracy": 0.5, "auroc": None, "num_samples": 2,
              "confusion_matrix": script.confusion_matrix(["Yes", "x"], ["Yes", "No"])}
    script.save_plots(str(tmp_path), history, report)
    assert drawn["loss_curve.png"] == {
        "train loss": [[1, 2.0], [2, 1.5], [3, 1.0]],
        "held-out loss": [[2, 1.7]],
        "learning rate": [[1, 1e-3], [2, 5e-4], [3, 0.0]],
    }
    assert drawn["loss_curve.png axes"] == [("step", "loss"), ("", "learning rate")]
    check_plots(tmp_path)

    # No held-out rows: the loss curve only, no confusion matrix.
    (tmp_path / "confusion_matrix.png").unlink()
    script.save_plots(str(tmp_path), history[:2], {**report, "num_samples": 0})
    assert "held-out loss" not in drawn["loss_curve.png"]
    assert (tmp_path / "loss_curve.png").exists() and not (tmp_path / "confusion_matrix.png").exists()


def test_load_data_parquet_and_disk(script, memes_dataset, memes_dir, tmp_path):
    parquet = tmp_path / "hm.parquet"
    memes_dataset.to_parquet(str(parquet))
    for source in (memes_dir, parquet, tmp_path):  # save_to_disk folder, parquet file, folder of parquet
        train, evaluation = script.load_data(str(source), eval_size=4)
        assert (len(train), len(evaluation)) == (8, 4)
        assert [t[0]["assistant"] for t in evaluation["texts"]] == ANSWERS
        assert isinstance(train[0]["images"][0], Image.Image) and train[0]["texts"] == memes_dataset[4]["texts"]


@pytest.mark.parametrize(
    "argv, env, message",
    [
        (["--num_crops", "17"], {}, "--num_crops"),
        (["--batch_size", "3", "--batch_size_per_gpu", "1"], {"WORLD_SIZE": "2"}, "multiple of world size"),
        (["--batch_size", "4", "--batch_size_per_gpu", "3"], {}, "multiple of world size"),
        (["--use_flash_attention", "--bf16"], {}, "--use_flash_attention"),
    ],
)
def test_argument_validation(script, monkeypatch, capsys, argv, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit):
        script.parse_args(argv)
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------


def test_full_finetune_deepspeed_two_processes(script, run_script, tiny_model_dir, memes_dir, memes_dataset, tmp_path):
    import phi3v  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoProcessor

    out = tmp_path / "full"
    proc = run_script(SCRIPT, *common_args(tiny_model_dir, memes_dir, out, "--batch_size", 2, "--max_steps", 2,
                                           "--num_crops", 1, "--resize_backend", "torch"), nproc=2)
    assert "full fine-tuning, DeepSpeed on, world size 2" in proc.stdout

    check_eval_file(out / "eval_before.json")
    after = check_eval_file(out / "eval_after.json")
    check_plots(out)
    history = read_json(out / "log_history.json")
    logged = loss_entries(history)
    assert [e["step"] for e in logged] == [1, 2]
    assert all(math.isfinite(e["loss"]) and e["images_per_second"] > 0 and e["tokens_per_second"] > 0 for e in logged)
    assert history[-1]["train_images_per_second"] > 0

    model = AutoModelForCausalLM.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert processor.num_crops == 1  # the training settings are saved with the model
    assert processor.image_processor.resize_backend == "torch"
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    trained = model.state_dict()
    assert trained.keys() == initial.keys()
    for name in ["model.layers.0.self_attn.qkv_proj.weight", "lm_head.weight",
                 "model.vision_embed_tokens.img_projection.0.weight",
                 "model.vision_embed_tokens.img_processor.vision_model.encoder.layers.0.mlp.fc1.weight"]:
        assert not torch.equal(trained[name], initial[name]), f"{name} did not train"
    # The saved model gives the scores of eval_after, for rows of both ranks' shards (gather order).
    _, eval_set = script.load_data(str(memes_dir), eval_size=4)
    assert reference_scores(script, model, processor, eval_set, [0, 3]) == pytest.approx(
        [after["scores"][0], after["scores"][3]], abs=1e-4)


def test_lora_checkpoints_resume_batch2(script, run_main, tiny_model_dir, memes_dir, tmp_path):
    import phi3v  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoProcessor

    lora = ["--use_lora", "--lora_rank", 4, "--batch_size", 2, "--batch_size_per_gpu", 2, "--num_crops", 2,
            "--save_steps", 2, "--max_steps", 4]
    # Run A: 4 steps straight, checkpoints at 2 and 4; batches of 2 rows of different lengths.
    out_a = tmp_path / "a"
    run_main(SCRIPT, *common_args(tiny_model_dir, memes_dir, out_a, *lora))
    for step in (2, 4):
        checkpoint = out_a / f"checkpoint-{step}"
        for name in ["adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"]:
            assert (checkpoint / name).exists(), f"{checkpoint.name}/{name} missing"
        assert read_json(checkpoint / "trainer_state.json")["global_step"] == step
    assert (out_a / "adapter_model.safetensors").exists() and (out_a / "processor_config.json").exists()
    before = check_eval_file(out_a / "eval_before.json")
    check_eval_file(out_a / "eval_after.json")
    check_plots(out_a)
    history_a = loss_entries(read_json(out_a / "log_history.json"))
    assert [e["step"] for e in history_a] == [1, 2, 3, 4]
    assert all(math.isfinite(e["loss"]) for e in history_a)

    # Batched eval (2 rows, left padded, different lengths) matches single unpadded forwards. The
    # LoRA B matrices start at zero, so the model before training is the base model.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    processor = AutoProcessor.from_pretrained(tiny_model_dir, num_crops=2)
    _, eval_set = script.load_data(str(memes_dir), eval_size=4)
    assert reference_scores(script, base, processor, eval_set, range(4)) == pytest.approx(before["scores"], abs=1e-4)

    # Run B: only checkpoint-2 of A; "latest" resumes there and must repeat A's steps 3-4 exactly.
    out_b = tmp_path / "b"
    out_b.mkdir()
    shutil.copytree(out_a / "checkpoint-2", out_b / "checkpoint-2")
    shutil.copy(out_a / "eval_before.json", out_b / "eval_before.json")
    resume = ["--resume_from_checkpoint", "latest", "--eval_steps", 2, "--max_eval_loss_samples", 2, "--merge_lora"]
    proc = run_main(SCRIPT, *common_args(tiny_model_dir, memes_dir, out_b, *lora, *resume))
    assert f"resuming from {out_b / 'checkpoint-2'}" in proc.stdout
    assert "keeping the existing eval_before.json" in proc.stdout
    assert read_json(out_b / "checkpoint-4" / "trainer_state.json")["global_step"] == 4
    history_b = read_json(out_b / "log_history.json")
    logged_b = loss_entries(history_b)
    assert [e["step"] for e in logged_b] == [1, 2, 3, 4]
    assert logged_b[:2] == history_a[:2], "steps 1-2 must come from the checkpoint, not be run again"
    for a, b in zip(history_a[2:], logged_b[2:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["learning_rate"] == pytest.approx(a["learning_rate"])
    final = history_b[-1]
    assert final["train_images_per_second"] * final["train_runtime"] == pytest.approx(4, abs=0.1)  # 2 steps x 2
    assert [e["step"] for e in history_b if "eval_loss" in e] == [4]
    assert all(math.isfinite(e["eval_loss"]) for e in history_b if "eval_loss" in e)
    check_eval_file(out_b / "eval_after.json")
    check_plots(out_b)

    merged = AutoModelForCausalLM.from_pretrained(out_b / "merged")
    assert not any("lora" in k for k in merged.state_dict())
    assert AutoProcessor.from_pretrained(out_b / "merged").num_crops == 2
    name = "model.layers.0.self_attn.qkv_proj.weight"
    assert not torch.equal(merged.state_dict()[name], base.state_dict()[name])


def test_packing_gives_the_same_losses(run_main, tiny_model_dir, memes_dir, tmp_path):
    """--packing (3 samples of different lengths in one padding-free row) trains exactly as padded batches."""
    args = ["--use_lora", "--lora_rank", 4, "--batch_size", 3, "--batch_size_per_gpu", 3, "--num_crops", 2,
            "--max_steps", 2, "--max_eval_samples", 0]
    histories = {}
    for name, extra in (("padded", []), ("packed", ["--packing"])):
        proc = run_main(SCRIPT, *common_args(tiny_model_dir, memes_dir, tmp_path / name, *args, *extra))
        assert f"3 samples per micro-batch, {name}" in proc.stdout
        histories[name] = read_json(tmp_path / name / "log_history.json")
    padded, packed = (loss_entries(histories[n]) for n in ("padded", "packed"))
    assert [e["step"] for e in packed] == [1, 2]
    for a, b in zip(padded, packed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
    # Throughput counts real tokens either way: the packed row has no padding to leave out.
    tokens = [h[-1]["train_tokens_per_second"] * h[-1]["train_runtime"] for h in histories.values()]
    assert tokens[1] == pytest.approx(tokens[0], rel=0.01)


@pytest.mark.parametrize("group_by_length", [False, True])
def test_group_by_length_sampler(script, tiny_model_dir, memes_dir, tmp_path, monkeypatch, group_by_length):
    """--group_by_length: the Trainer samples with the lengths of the token-count formula (no pixel decode)."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    seen = {}

    def capture(trainer, **kwargs):  # instead of training: look at what the Trainer would sample
        seen["sampler"] = trainer._get_train_sampler()
        seen["train_set"] = trainer.train_dataset
        raise SystemExit(0)

    monkeypatch.setattr(script.ThroughputTrainer, "train", capture)
    argv = common_args(tiny_model_dir, memes_dir, tmp_path / "out", "--use_lora", "--batch_size", 2,
                       "--batch_size_per_gpu", 2, "--num_crops", 2, "--max_eval_samples", 0)
    with pytest.raises(SystemExit):
        script.main([str(a) for a in argv + (["--group_by_length"] if group_by_length else [])])
    sampler = seen["sampler"]
    if not group_by_length:
        assert not isinstance(sampler, LengthGroupedSampler)
        return
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir, num_crops=2)
    lengths = script.sample_lengths(seen["train_set"], processor)
    assert isinstance(sampler, LengthGroupedSampler) and list(sampler.lengths) == lengths
    assert len(set(lengths)) > 2
    # 8 rows, batch 2: mega-batches of one batch each, sorted by decreasing length, the longest first.
    order = [lengths[i] for i in sampler]
    assert sorted(order) == sorted(lengths) and order[0] == max(lengths)
    assert all(order[i] >= order[i + 1] for i in range(0, len(order), 2))


def test_cauldron_snapshot_root(script, memes_dataset, tiny_model_dir, tmp_path, capsys):
    """--dataset_path at the root of a the_cauldron snapshot (a folder per config, the others with rows in the same
    schema): only hateful_memes/'s rows are read; a root without hateful_memes/ is refused, naming the folder."""
    root = tmp_path / "the_cauldron"
    for config, rows in (("hateful_memes", len(memes_dataset)), ("docvqa", 3), ("nlvr2", 5)):
        (root / config).mkdir(parents=True)
        memes_dataset.select(range(rows)).to_parquet(str(root / config / "train-00000-of-00001.parquet"))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        script.main([str(a) for a in common_args(tiny_model_dir, root, out, "--num_crops", 1, "--preflight_only")])
    assert exit_info.value.code == 0
    splits = json.loads((out / "preflight_summary.json").read_text())["splits"]
    assert sum(s["rows"] for s in splits.values()) == len(memes_dataset) == 12  # not 12 + 3 + 5
    assert script.parse_args(["--dataset_path", str(root / "hateful_memes")]).dataset_path == str(root / "hateful_memes")

    shutil.rmtree(root / "hateful_memes")
    with pytest.raises(SystemExit):
        script.parse_args(["--dataset_path", str(root)])
    err = capsys.readouterr().err
    assert (f"--dataset_path {root}: holds the folders docvqa/, nlvr2/ (a the_cauldron snapshot?) and no "
            "hateful_memes/ folder" in err and f"give the hateful_memes folder of the snapshot ({root / 'hateful_memes'}"
            in err)
