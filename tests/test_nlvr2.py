"""finetune_hf_trainer_nlvr2.py end to end on a tiny model and a tiny NLVR2-shaped dataset (CPU, offline)."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import REPO
from cauldron_data import cauldron_features

SCRIPT = "finetune_hf_trainer_nlvr2.py"
COLOURS = {"red": (220, 20, 20), "blue": (20, 20, 220), "green": (20, 200, 20)}


def load_script():
    spec = importlib.util.spec_from_file_location("finetune_nlvr2", REPO / SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def turn(question, answer):
    return {"user": question, "assistant": answer, "source": "nlvr2"}


def make_rows():
    """10 rows: pairs of solid colours (64x64 and 64x48), 1 turn (even rows) or 2 turns (odd rows)."""
    names = list(COLOURS)
    rows = []
    for i in range(10):
        left, right = names[i % 3], names[(i // 3) % 3]
        images = [Image.new("RGB", (64, 64), COLOURS[left]), Image.new("RGB", (64, 48), COLOURS[right])]
        texts = [turn("Are both images red?", str(left == right == "red"))]
        if i % 2:
            texts.append(turn(f"Is the left image {left}?", "True"))
        rows.append({"images": images, "texts": texts})
    return rows


@pytest.fixture(scope="module")
def nlvr2_dir(tmp_path_factory):
    from datasets import Dataset

    features = cauldron_features()
    rows = make_rows()
    data = Dataset.from_dict({k: [r[k] for r in rows] for k in ("images", "texts")}, features=features)
    folder = tmp_path_factory.mktemp("nlvr2")
    data.save_to_disk(str(folder / "data"))
    data.to_parquet(str(folder / "data.parquet"))  # the other --dataset_path form
    return folder / "data"


def common_args(tiny_model_dir, nlvr2_dir, output_dir):
    return [
        "--model_name_or_path", tiny_model_dir, "--dataset_path", nlvr2_dir, "--output_dir", output_dir,
        "--eval_size", 4, "--num_crops", 1, "--batch_size", 2, "--warmup_steps", 0, "--logging_steps", 1,
        "--dataloader_num_workers", 0, "--max_new_tokens", 4, "--learning_rate", 1e-3, "--no-tqdm",
    ]


def load_state_dict(path):
    from safetensors.torch import load_file

    state = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def check_eval_files(output_dir, num_samples):
    for name in ("eval_before.json", "eval_after.json"):
        result = json.loads((output_dir / name).read_text())
        assert 0.0 <= result["accuracy"] <= 1.0
        assert len(result["predictions"]) == len(result["answers"]) == num_samples
        assert all(isinstance(p, str) for p in result["predictions"])
        assert result["answers"][0] in ("True", "False")
        # Confusion matrix: rows False/True (gold), columns False/True/(other); every row counted once.
        cm = result["confusion_matrix"]
        assert cm["labels"] == ["False", "True"] and cm["columns"] == ["False", "True", "(other)"]
        assert sum(map(sum, cm["matrix"])) == result["num_samples"] == num_samples
        assert [sum(row) for row in cm["matrix"]] == [result["answers"].count(a) for a in ("False", "True")]
        assert cm["matrix"][0][0] + cm["matrix"][1][1] == round(result["accuracy"] * num_samples)
    for name in ("loss_curve.png", "confusion_matrix.png"):
        with Image.open(output_dir / name) as image:  # a real PNG, not just a file with that name
            assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100
            image.load()


def train_losses(output_dir):
    history = json.loads((output_dir / "log_history.json").read_text())
    steps = [entry for entry in history if "loss" in entry]
    assert steps and all(math.isfinite(entry["loss"]) for entry in steps)
    assert all(entry["images_per_second"] > 0 and entry["tokens_per_second"] > 0 for entry in steps)
    return steps


def test_collator_masks_prompts_of_every_turn(tiny_model_dir):
    import phi3v  # noqa: F401
    from transformers import AutoProcessor

    module = load_script()
    processor = AutoProcessor.from_pretrained(tiny_model_dir, num_crops=1)
    tokenizer = processor.tokenizer
    red = Image.new("RGB", (64, 64), COLOURS["red"])
    blue = Image.new("RGB", (80, 40), COLOURS["blue"])
    two_turns = {"images": [red, blue], "texts": [turn("Are both images red?", "False"), turn("Is one blue?", "True")]}
    one_turn = {"images": [blue, red], "texts": [turn("Is the right image red?", "True")]}
    batch = module.NLVR2DataCollator(processor)([two_turns, one_turn])

    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape
    assert batch["pixel_values"].shape == (4, 2, 3, 336, 336) and batch["image_sizes"].shape == (4, 2)

    # Expected layout, built independently: each turn is its own chat prompt (starting with <s><|user|>),
    # then the answer tokens; only the answer tokens are supervised.
    expected_ids, expected_labels = [], []
    for index, t in enumerate(two_turns["texts"]):
        content = f"<|image_1|><|image_2|>\n{t['user']}" if index == 0 else t["user"]
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                               add_generation_prompt=True)
        prompt_ids = processor(prompt, two_turns["images"] if index == 0 else None)["input_ids"][0].tolist()
        assert prompt_ids[:2] == [tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("<|user|>")]
        answer_ids = tokenizer(f"{t['assistant']}<|end|>\n<|endoftext|>", add_special_tokens=False).input_ids
        expected_ids += prompt_ids + answer_ids
        expected_labels += [-100] * len(prompt_ids) + answer_ids
    n = len(expected_ids)
    assert ids[0].tolist() == expected_ids  # the longer row: no padding
    assert labels[0].tolist() == expected_labels
    supervised = labels[0] != -100
    assert torch.equal(labels[0][supervised], ids[0][supervised])
    assert (ids[0] < 0).sum() == 2 * 313  # both images expanded in turn 0 (64x64 and 80x40 at num_crops=1)
    # Both turns contribute: two <|user|> starts, two supervised answer spans, the second turn text-only.
    assert (ids[0] == tokenizer.convert_tokens_to_ids("<|user|>")).sum() == 2
    spans = torch.diff(supervised.int()).eq(1).sum() + int(supervised[0])
    assert spans == 2
    # attention covers every real token, including the <|endoftext|> (== pad id) that ends turn 1.
    assert mask[0].tolist() == [1] * n
    assert (ids[0] == tokenizer.pad_token_id).sum() == 2

    # The shorter row is right-padded with the pad id, labels -100 and attention 0.
    real = int(mask[1].sum())
    assert real < n and ids[1, real:].eq(tokenizer.pad_token_id).all() and labels[1, real:].eq(-100).all()
    answer_ids = tokenizer("True<|end|>\n<|endoftext|>", add_special_tokens=False).input_ids
    assert labels[1, :real].ne(-100).sum() == len(answer_ids)

    # The length filter counts exactly what the collator builds, without running the image processor.
    assert module.conversation_length(tokenizer, two_turns["texts"], [(64, 64), (80, 40)], 1) == n


def test_confusion_matrix():
    module = load_script()
    predictions = ["True.", " false", "True", "maybe", "false"]
    answers = ["true", "False", "False", "True", "unknown"]
    assert module.confusion_matrix(predictions, answers) == {
        "labels": ["False", "True", "unknown"],  # False/True always (fixed order), then other gold answers
        "columns": ["False", "True", "unknown", "(other)"],
        "matrix": [[1, 1, 0, 0], [0, 1, 0, 1], [1, 0, 0, 0]],  # matched as the accuracy (strip ".", case)
    }


def test_save_plots(tmp_path, drawn_figures):
    """loss_curve.png draws the training loss, the held-out loss and the learning rate (second axis)."""
    module = load_script()
    drawn = drawn_figures
    history = [
        {"step": 1, "loss": 2.0, "learning_rate": 1e-3},
        {"step": 1, "eval_loss": 2.5},
        {"step": 2, "loss": 1.0, "learning_rate": 0.0},
        {"step": 2, "eval_loss": 1.5},
        {"step": 2, "train_runtime": 1.0, "train_loss": 1.5},
    ]
    result = {"accuracy": 0.5, "num_samples": 2,
              "confusion_matrix": module.confusion_matrix(["True", ""], ["True", "False"])}
    module.save_plots(tmp_path, history, result)
    assert drawn["loss_curve.png"] == {
        "train loss": [[1, 2.0], [2, 1.0]],
        "held-out loss": [[1, 2.5], [2, 1.5]],
        "learning rate": [[1, 1e-3], [2, 0.0]],
    }
    assert drawn["loss_curve.png axes"] == [("step", "loss"), ("", "learning rate")]
    for name in ("loss_curve.png", "confusion_matrix.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG"

    # Without held-out rows (eval_after None): the loss curve only.
    (tmp_path / "confusion_matrix.png").unlink()
    module.save_plots(tmp_path, history[:1], None)
    assert drawn["loss_curve.png"] == {"train loss": [[1, 2.0]], "learning rate": [[1, 1e-3]]}
    assert not (tmp_path / "confusion_matrix.png").exists()


def test_preflight_lengths_and_length_limit(tiny_model_dir, nlvr2_dir):
    """The preflight counts image tokens in each row's length, and flags (never cuts) rows over --max_length."""
    import datasets
    from transformers import AutoProcessor

    module = load_script()
    processor = AutoProcessor.from_pretrained(tiny_model_dir, num_crops=1)
    data = datasets.load_from_disk(str(nlvr2_dir))
    expected = [module.conversation_length(processor.tokenizer, row["texts"], [im.size for im in row["images"]], 1)
                for row in data]
    assert min(expected) > 2 * 313  # 2 x 313 image tokens (num_crops 1) + text
    limit = max(n for i, n in enumerate(expected) if i % 2 == 0)  # the longest one-turn row fits
    assert all(expected[i] > limit for i in range(1, len(data), 2))  # two-turn rows are longer
    problems, lengths, images = module.check_rows(data, processor.tokenizer, 1, limit, 0, "train")
    assert list(lengths) == expected and set(images) == {2}
    assert [bool(p) for p in problems] == [i % 2 == 1 for i in range(len(data))]
    assert problems[1] == [f"{expected[1]} tokens (images included) > --max_length {limit}"]
    problems, lengths, _ = module.check_rows(data, processor.tokenizer, 1, None, 0, "eval")
    assert not any(problems) and list(lengths) == expected


def test_full_finetune_frozen_vision_zero2(tiny_model_dir, nlvr2_dir, run_script, tmp_path):
    import phi3v  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoProcessor

    out = tmp_path / "out"
    proc = run_script(SCRIPT, *common_args(tiny_model_dir, nlvr2_dir, out), "--freeze_vision_model",
                      "--batch_size_per_gpu", 2, "--max_steps", 2, "--resize_backend", "torch", nproc="single")
    log = proc.stdout
    assert "setup: full fine-tuning | DeepSpeed ZeRO-2 | world size 1 x micro batch 2 x accumulation 1" in log
    assert "vision frozen" in log
    assert "data: 6 training rows, 4 held-out rows" in log
    check_eval_files(out, 4)
    assert len(train_losses(out)) == 2

    initial = load_state_dict(tiny_model_dir)
    trained = load_state_dict(out)
    assert initial.keys() == trained.keys()
    vision = [k for k in initial if k.startswith("model.vision_embed_tokens.")]
    decoder = [k for k in initial if k.startswith("model.layers.")]
    assert vision and decoder
    assert all(torch.equal(initial[k], trained[k]) for k in vision)
    assert any(not torch.equal(initial[k], trained[k]) for k in decoder)
    assert not torch.equal(initial["model.embed_tokens.weight"], trained["model.embed_tokens.weight"])

    model = AutoModelForCausalLM.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out, num_crops=1)
    assert processor.image_processor.resize_backend == "torch"  # --resize_backend is saved with the model
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<|image_1|><|image_2|>\nAre both images red?"}], tokenize=False,
        add_generation_prompt=True)
    inputs = processor(prompt, [Image.new("RGB", (64, 64)), Image.new("RGB", (64, 64))])
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()


def test_plain_python_deepspeed_trains_vision(tiny_model_dir, nlvr2_dir, run_script, tmp_path):
    """No launcher and no distributed env: the script sets it up for DeepSpeed itself."""
    out = tmp_path / "out"
    proc = run_script(SCRIPT, *common_args(tiny_model_dir, nlvr2_dir, out), "--max_steps", 2,
                      "--max_eval_samples", 2, nproc=None)
    assert "setup: full fine-tuning | DeepSpeed ZeRO-2 | world size 1 x micro batch 1 x accumulation 2" in proc.stdout
    check_eval_files(out, 2)
    assert len(train_losses(out)) == 2

    initial = load_state_dict(tiny_model_dir)
    trained = load_state_dict(out)
    vision = [k for k in initial if k.startswith("model.vision_embed_tokens.img_projection.")]
    assert any(not torch.equal(initial[k], trained[k]) for k in vision)


def test_lora_parquet_eval_loss_checkpoint_merge(tiny_model_dir, nlvr2_dir, run_main, tmp_path):
    """LoRA (no DeepSpeed) from a parquet copy, with held-out loss, a checkpoint and --merge_lora."""
    import phi3v  # noqa: F401
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    args = common_args(tiny_model_dir, nlvr2_dir.with_suffix(".parquet"), out)
    proc = run_main(SCRIPT, *args, "--use_lora", "--lora_rank", 4, "--max_steps", 2, "--save_steps", 2,
                    "--eval_steps", 1, "--max_eval_loss_samples", 1, "--max_eval_samples", 1, "--merge_lora")
    assert "setup: LoRA | single process | world size 1 x micro batch 1 x accumulation 2" in proc.stdout
    check_eval_files(out, 1)
    assert len(train_losses(out)) == 2
    history = json.loads((out / "log_history.json").read_text())
    eval_losses = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    assert len(eval_losses) == 2 and all(math.isfinite(x) for x in eval_losses)
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / "optimizer.pt").exists() and (checkpoint / "adapter_model.safetensors").exists()
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 2

    # The merged model loads without peft; the adapters on the decoder and on the projector are folded in.
    AutoModelForCausalLM.from_pretrained(out / "merged")
    initial, merged = load_state_dict(tiny_model_dir), load_state_dict(out / "merged")
    assert initial.keys() == merged.keys()
    for name in ("model.layers.0.self_attn.qkv_proj.weight", "model.vision_embed_tokens.img_projection.0.weight"):
        assert not torch.equal(initial[name], merged[name]), name
    assert torch.equal(initial["model.embed_tokens.weight"], merged["model.embed_tokens.weight"])


def test_packing_trains_like_padded_batches(tiny_model_dir, nlvr2_dir, run_main, tmp_path):
    """--packing: each micro batch is one padding-free row; same data, seed and steps give the same losses."""
    runs = {}
    for name, extra in (("padded", []), ("packed", ["--packing"])):
        out = tmp_path / name
        args = common_args(tiny_model_dir, nlvr2_dir, out)
        proc = run_main(SCRIPT, *args, "--eval_size", 0, "--deepspeed", "none", "--batch_size", 4,
                        "--batch_size_per_gpu", 2, "--max_steps", 2, *extra)
        expected = "packed rows" if extra else "padded batches"
        assert f"micro batch 2 x accumulation 2 = batch 4 | fp32 | vision trained | {expected}" in proc.stdout
        runs[name] = train_losses(out)
    padded, packed = runs["padded"], runs["packed"]
    assert len(padded) == len(packed) == 2
    for a, b in zip(padded, packed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
    # The pairs differ in length (1 or 2 turns, images of two sizes): padding only without packing.
    assert all(entry["padding_fraction"] > 0 for entry in padded)
    assert all(entry["padding_fraction"] == 0 for entry in packed)
    assert padded[1]["loss"] != padded[0]["loss"]  # the second step trained on updated weights


def test_group_by_length_sampler_uses_preflight_lengths(tiny_model_dir, nlvr2_dir, tmp_path):
    """--group_by_length: the Trainer's sampler groups by the lengths the preflight counted (image sizes +
    token formula, no pixels), and those are the lengths the collator really builds."""
    from transformers import AutoProcessor
    from transformers.trainer_pt_utils import LengthGroupedSampler

    module = load_script()
    processor = AutoProcessor.from_pretrained(tiny_model_dir, num_crops=1)
    samplers = {}
    for grouped in (False, True):
        argv = [*common_args(tiny_model_dir, nlvr2_dir, tmp_path / f"out{grouped}"), "--deepspeed", "none",
                "--batch_size_per_gpu", 2, *(["--group_by_length"] if grouped else [])]
        args = module.parse_args([str(a) for a in argv])
        training_args = module.create_training_arguments(args, False, 1)
        train_set, _ = module.prepare_datasets(args, training_args, processor.tokenizer)
        trainer = module.make_trainer_class()(
            model=module.create_model(args, False), args=training_args, train_dataset=train_set,
            data_collator=module.NLVR2DataCollator(processor), processing_class=processor)
        samplers[grouped] = trainer._get_train_sampler()
    assert not isinstance(samplers[False], LengthGroupedSampler)
    sampler = samplers[True]
    assert isinstance(sampler, LengthGroupedSampler)
    rows = list(train_set)
    expected = [module.conversation_length(processor.tokenizer, row["texts"], [im.size for im in row["images"]], 1)
                for row in rows]
    assert list(sampler.lengths) == expected and len(set(expected)) > 1
    # The sampler puts the longest sample in the first batch; the collator builds exactly that length.
    batch = next(iter(trainer.get_train_dataloader()))
    assert int(batch["attention_mask"].sum(dim=1).max()) == max(expected)


def test_cauldron_snapshot_root(tiny_model_dir, nlvr2_dir, tmp_path, capsys):
    """--dataset_path at the root of a the_cauldron snapshot (a folder per config, the others with rows in the same
    schema): only nlvr2/'s rows are read; a root without nlvr2/ is refused, naming the folder."""
    import datasets

    module = load_script()
    data = datasets.load_from_disk(str(nlvr2_dir))
    root = tmp_path / "the_cauldron"
    for config, rows in (("nlvr2", len(data)), ("docvqa", 3), ("hateful_memes", 5)):
        (root / config).mkdir(parents=True)
        data.select(range(rows)).to_parquet(str(root / config / "train-00000-of-00001.parquet"))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        module.main([str(a) for a in [*common_args(tiny_model_dir, root, out), "--preflight_only"]])
    assert exit_info.value.code == 0
    splits = json.loads((out / "preflight_summary.json").read_text())["splits"]
    assert sum(s["rows"] for s in splits.values()) == len(data) == 10  # not 10 + 3 + 5
    args = module.parse_args(["--dataset_path", str(root / "nlvr2"), "--output_dir", str(tmp_path / "o")])
    assert args.dataset_path == str(root / "nlvr2")

    shutil.rmtree(root / "nlvr2")
    with pytest.raises(SystemExit):
        module.parse_args(["--dataset_path", str(root), "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert (f"--dataset_path {root}: holds the folders docvqa/, hateful_memes/ (a the_cauldron snapshot?) and no "
            f"nlvr2/ folder" in err and f"give the nlvr2 folder of the snapshot ({root / 'nlvr2'}" in err)
