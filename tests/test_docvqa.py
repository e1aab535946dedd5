"""finetune_hf_trainer_docvqa.py end to end on a tiny model and a tiny DocVQA-shaped dataset (CPU, offline).

Also --packing (the same losses as padded batches) and --group_by_length (the Trainer's sampler gets the
token-count formula lengths). Bad data and bad arguments: tests/test_preflight_docvqa.py; learning:
tests/test_learning_docvqa.py.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image, ImageDraw

import cauldron_data

SCRIPT = "finetune_hf_trainer_docvqa.py"
REPO = Path(__file__).resolve().parents[1]
TRAIN_WORDS = ["cat", "dog", "sun", "tree", "book", "fish", "milk", "door"]
TEST_WORDS = ["car", "hat", "red", "blue"]
QUESTIONS = ["What word is written?", "Which word can be read in this picture of a page?"]
# One thread per process: the ops of the tiny model are too small to share, and on a busy 2-core
# machine a second OpenMP thread makes training steps many times slower.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")  # in-process runs: see conftest.one_thread


def load_script():
    spec = importlib.util.spec_from_file_location("finetune_hf_trainer_docvqa", REPO / SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def word_image(word: str, size: tuple[int, int]) -> Image.Image:
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).text((10, size[1] // 2 - 6), word, fill="black")
    return image


def query(en: str) -> dict:
    return {"de": f"de: {en}", "en": en, "es": f"es: {en}", "fr": f"fr: {en}", "it": f"it: {en}"}


MINI_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "image": datasets.Image(),
        "query": {k: datasets.Value("string") for k in ("de", "en", "es", "fr", "it")},
        "answers": datasets.List(datasets.Value("string")),
        "words": datasets.List(datasets.Value("string")),
        "bounding_boxes": datasets.List(datasets.List(datasets.Value("float32"))),
        "answer": datasets.Value("string"),
    }
)


def mini_split(words, sizes):
    rows = {k: [] for k in MINI_FEATURES}
    for i, (word, size) in enumerate(zip(words, sizes)):
        rows["id"].append(f"q{i}")
        rows["image"].append(word_image(word, size))
        rows["query"].append(query(QUESTIONS[i % 2]))
        rows["answers"].append([word, word.upper()])
        rows["words"].append([word])
        rows["bounding_boxes"].append([[10.0, 40.0, 40.0, 52.0]])
        rows["answer"].append(word)
    return datasets.Dataset.from_dict(rows, features=MINI_FEATURES)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The mini set (save_to_disk DatasetDict) and a cauldron-docvqa copy (parquet), in the hub schemas.

    Training pages 0-5 are square, 6-7 wide: at num_crops 2 a wide page takes 457 image tokens, a
    square one 313, so --max_length 400 makes exactly the two wide ones invalid.
    """
    root = tmp_path_factory.mktemp("docvqa-data")
    train = mini_split(TRAIN_WORDS, [(120, 120)] * 6 + [(200, 100)] * 2)
    test = mini_split(TEST_WORDS, [(200, 100)] * 4)
    datasets.DatasetDict(train=train, test=test).save_to_disk(str(root / "mini"))

    cauldron_features = cauldron_data.cauldron_features()
    cauldron = datasets.Dataset.from_dict(
        {
            "images": [[word_image(w, (200, 100))] for w in TRAIN_WORDS[:4]],
            "texts": [
                [
                    {"user": "What word is written?\nGive a very brief answer.", "assistant": w, "source": "docvqa"},
                    {"user": "How many letters?\nGive a very brief answer.", "assistant": str(len(w)),
                     "source": "docvqa"},
                ]
                for w in TRAIN_WORDS[:4]
            ],
        },
        features=cauldron_features,
    )
    (root / "cauldron" / "docvqa").mkdir(parents=True)
    cauldron.to_parquet(str(root / "cauldron" / "docvqa" / "train-00000-of-00001.parquet"))
    return {"mini": root / "mini", "cauldron": root / "cauldron"}


def common_args(tiny_model_dir, data, out):
    return [
        "--model_name_or_path", tiny_model_dir, "--dataset_path", data["mini"], "--output_dir", out,
        "--dataloader_num_workers", 0, "--warmup_steps", 0, "--logging_steps", 1, "--max_eval_samples", 4,
        "--max_new_tokens", 6, "--lora_rank", 4, "--no-tqdm",
    ]


def read_json(path: Path):
    return json.loads(path.read_text())


def check_eval_files(out: Path, module):
    for name in ("eval_before.json", "eval_after.json"):
        result = read_json(out / name)
        assert result["num_samples"] == 4
        assert result["answers"] == [[w, w.upper()] for w in TEST_WORDS]
        assert result["questions"] == [QUESTIONS[i % 2] for i in range(4)]
        assert len(result["predictions"]) == 4 and all(isinstance(p, str) for p in result["predictions"])
        assert 0.0 <= result["anls"] <= 1.0
        assert result["anls"] == pytest.approx(module.anls(result["predictions"], result["answers"]))


def losses(log_history):
    return {entry["step"]: entry["loss"] for entry in log_history if "loss" in entry}


def sample_inputs(model_dir):
    import phi3v  # noqa: F401
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir, num_crops=2)
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<|image_1|>\nWhat word is written?\nAnswer briefly."}],
        tokenize=False, add_generation_prompt=True,
    )
    return processor(text=prompt, images=[word_image("cat", (200, 100))])


def logits_of(model, inputs):
    with torch.no_grad():
        return model.eval()(**inputs).logits


def answer_ids(tokenizer, answer):
    return tokenizer(f"{answer}<|end|>\n<|endoftext|>", add_special_tokens=False).input_ids


# ---------------------------------------------------------------------------------------------- units


def test_anls_hand_computed():
    m = load_script()
    assert m.anls_score("cat", ["cat"]) == 1.0
    assert m.anls_score(m.clean_prediction("  cat. "), ["cat"]) == 1.0  # whitespace and dots around it go
    # Cleaned once, as the original: "5 ." -> "5 " (1 edit / 2 chars = tau: 0); a second clean would give 1.
    assert m.clean_prediction("5 .") == "5 " and m.anls_score(m.clean_prediction("5 ."), ["5"]) == 0.0
    assert m.anls_score(m.clean_prediction(". 42"), ["42"]) == pytest.approx(2 / 3)  # " 42": 1 edit / 3 chars
    assert m.anls_score("cats", ["cat"]) == pytest.approx(0.75)  # 1 edit / 4 chars
    assert m.anls_score("Cat", ["cat"]) == pytest.approx(2 / 3)  # case counts: 1 edit / 3 chars
    assert m.anls_score("dog", ["cat"]) == 0.0
    assert m.anls_score("abcd", ["abxy"]) == 0.0  # distance 0.5 is not < tau
    assert m.anls_score("abcde", ["abxye"]) == pytest.approx(0.6)  # 0.4 < tau
    assert m.anls_score("color", ["red", "colour"]) == pytest.approx(5 / 6)  # best gold answer
    assert m.anls_score("", ["cat"]) == 0.0
    assert m.anls_score(m.clean_prediction(" . "), ["."]) == 0.0  # empty after cleaning
    assert m.anls(["cat", "cats", "dog", ""], [["cat"], ["cat"], ["cat"], ["cat"]]) == pytest.approx(1.75 / 4)
    assert m.anls_score("ca", ["cat"], tau=0.3) == 0.0 and m.anls_score("ca", ["cat"]) == pytest.approx(2 / 3)


def test_collator_masks_prompt_and_pads_right(tiny_model_dir, data):
    m = load_script()
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir, num_crops=2)
    rows = [datasets.load_from_disk(str(data["mini"]))["train"][i] for i in (0, 6)]  # square, then wide page
    batch = m.DocVQACollator(processor)(rows)
    assert batch["pixel_values"].shape == (2, 3, 3, 336, 336)
    assert batch["image_sizes"].tolist() == [[336, 336], [336, 672]]
    tokenizer = processor.tokenizer
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths[0] < lengths[1] == batch["input_ids"].shape[1]
    for i, row in enumerate(rows):
        n = lengths[i]
        assert batch["attention_mask"][i, :n].all() and not batch["attention_mask"][i, n:].any()
        assert (batch["input_ids"][i, n:] == tokenizer.pad_token_id).all() and (batch["labels"][i, n:] == -100).all()
        supervised = batch["labels"][i][batch["labels"][i] != -100].tolist()
        assert supervised in [answer_ids(tokenizer, a) for a in row["answers"]]
        # The supervised tokens are the last real tokens; everything before (prompt, image) is masked.
        assert batch["input_ids"][i, n - len(supervised) : n].tolist() == supervised
        assert (batch["labels"][i, : n - len(supervised)] == -100).all()
        assert (batch["input_ids"][i, :n] < 0).sum() == (313 if i == 0 else 457)
        assert supervised[-1] == tokenizer.pad_token_id  # <|endoftext|> is a real, supervised token

    cauldron = datasets.load_dataset("parquet", data_files=str(next(data["cauldron"].rglob("*.parquet"))),
                                     split="train")
    batch = m.DocVQACollator(processor)([cauldron[0]])
    supervised = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert supervised in [answer_ids(tokenizer, "cat"), answer_ids(tokenizer, "3")]


def test_loss_curve_plot(tmp_path, monkeypatch):
    """Training loss, held-out loss and (second axis) learning rate, read back from the saved figure."""
    m = load_script()
    import matplotlib.pyplot as plt

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    history = [{"loss": 3.0 - 0.1 * step, "learning_rate": 1e-3 * (1 - step / 10), "step": step} for step in range(1, 9)]
    history += [{"eval_loss": 2.5, "step": 4}, {"eval_loss": 2.2, "step": 8}, {"train_runtime": 1.0, "step": 8}]
    m.save_loss_curve(tmp_path, history)
    with Image.open(tmp_path / "loss_curve.png") as image:
        assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100
    (fig,) = figures
    loss_ax, lr_ax = fig.axes
    assert lr_ax.get_shared_x_axes().joined(loss_ax, lr_ax)  # the learning rate shares the step axis
    lines = {line.get_label(): line for line in loss_ax.get_lines()}
    assert lines["train loss"].get_xydata().tolist() == [[h["step"], h["loss"]] for h in history[:8]]
    assert lines["held-out loss"].get_xydata().tolist() == [[4, 2.5], [8, 2.2]]
    (lr_line,) = lr_ax.get_lines()
    assert lr_line.get_ydata().tolist() == pytest.approx([h["learning_rate"] for h in history[:8]])
    assert lr_ax.get_ylabel() == "learning rate"


def test_argument_validation(capsys):
    m = load_script()
    for bad, message in [
        (["--num_crops", "17"], "--num_crops must be between 1 and 16"),
        (["--batch_size", "3", "--batch_size_per_gpu", "2"], "must be a multiple of"),
        (["--merge_lora"], "--merge_lora only applies"),
        (["--use_flash_attention"], "--use_flash_attention"),
    ]:
        with pytest.raises(SystemExit):
            m.parse_args(bad)
        assert message in capsys.readouterr().err
    args = m.parse_args(["--use_qlora"])
    assert args.use_lora and args.deepspeed is None
    assert m.parse_args([]).deepspeed.endswith("ds_configs/zero2.json")


# ---------------------------------------------------------------------------------------------- runs


def test_lora_resume_merge(tiny_model_dir, data, tmp_path, run_main):
    """LoRA with CLIP targets: 2 steps with a checkpoint, resumed to 4 with --merge_lora."""
    m = load_script()
    out = tmp_path / "lora"
    args = common_args(tiny_model_dir, data, out) + [
        "--use_lora", "--batch_size", 2, "--batch_size_per_gpu", 1, "--num_crops", 2, "--max_length", 400,
        "--eval_batch_size", 2, "--learning_rate", 5e-3, "--save_steps", 2, "--skip_invalid",
    ]
    first = run_main(SCRIPT, *args, "--max_steps", 2)
    assert "preflight: 6 training and 4 evaluation rows valid" in first.stdout
    skipped = [json.loads(line) for line in (out / "skipped_rows.jsonl").read_text().splitlines()]
    assert [s["where"] for s in skipped] == ["train row 6 (id q6)", "train row 7 (id q7)"]
    assert all("457 of them image tokens) > --max_length 400" in s["reason"] for s in skipped)
    assert (out / "checkpoint-2" / "adapter_model.safetensors").exists()
    assert (out / "checkpoint-2" / "optimizer.pt").exists()
    first_log = read_json(out / "log_history.json")
    assert sorted(losses(first_log)) == [1, 2]

    # A kill while saving leaves an incomplete newest checkpoint: 'latest' must skip it.
    (out / "checkpoint-3").mkdir()
    # The first run finished (eval_after.json, adapter): continuing it in place needs --overwrite_output_dir.
    refused = run_main(SCRIPT, *args, "--max_steps", 4, "--resume_from_checkpoint", "latest", check=False)
    assert refused.returncode == 2 and "already holds a finished run" in refused.stdout
    second = run_main(SCRIPT, *args, "--max_steps", 4, "--resume_from_checkpoint", "latest", "--merge_lora",
                      "--overwrite_output_dir")
    assert f"resuming from {out / 'checkpoint-2'}" in second.stdout
    assert "checkpoint-3 is incomplete" in second.stdout
    assert (out / "checkpoint-4").is_dir()
    assert read_json(out / "checkpoint-4" / "trainer_state.json")["global_step"] == 4
    log = read_json(out / "log_history.json")
    step_losses = losses(log)
    assert sorted(step_losses) == [1, 2, 3, 4]  # steps 1-2 restored from the checkpoint's state
    assert step_losses[1] == losses(first_log)[1]
    new_entries = [e for e in log if "loss" in e and e["step"] > 2]
    assert all(math.isfinite(e["loss"]) for e in new_entries)
    assert all(e["images_per_second"] > 0 and e["tokens_per_second"] > 0 for e in new_entries)
    check_eval_files(out, m)
    with Image.open(out / "loss_curve.png") as image:
        assert image.format == "PNG"
        image.verify()

    from safetensors import safe_open

    with safe_open(out / "adapter_model.safetensors", "pt") as adapter:
        assert all("lora_" in key for key in adapter.keys())  # no full copy of lm_head / embeddings
    adapter_config = read_json(out / "adapter_config.json")
    targets = adapter_config["target_modules"]
    assert any("vision_embed_tokens.img_processor" in t for t in targets)  # CLIP is trained too
    assert any(t.endswith("lm_head") for t in targets) and adapter_config["lora_alpha"] == 8

    import phi3v  # noqa: F401
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    inputs = sample_inputs(out / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    in_memory = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out).merge_and_unload()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    merged_logits = logits_of(merged, inputs)
    assert torch.isfinite(merged_logits).all()
    torch.testing.assert_close(merged_logits, logits_of(in_memory, inputs), rtol=1e-4, atol=1e-4)
    assert (merged_logits - logits_of(base, inputs)).abs().max() > 1e-3


def test_packing_same_losses(tiny_model_dir, data, tmp_path, run_main):
    """--packing (each micro-batch of 2 pages of different lengths in one padding-free row) gives the
    losses and gradient norms of padded batches, step after step, and counts the same tokens."""
    logs = {}
    for mode in ("padded", "packed"):
        out = tmp_path / mode
        run_main(SCRIPT, *common_args(tiny_model_dir, data, out), "--deepspeed", "none", "--num_crops", 2,
                 "--batch_size", 2, "--batch_size_per_gpu", 2, "--max_steps", 3, "--learning_rate", 1e-3,
                 "--max_eval_samples", 1, "--max_new_tokens", 1, *(["--packing"] if mode == "packed" else []))
        logs[mode] = [e for e in read_json(out / "log_history.json") if "loss" in e]
    assert len(logs["packed"]) == len(logs["padded"]) == 3
    for packed, padded in zip(logs["packed"], logs["padded"]):
        assert packed["loss"] == pytest.approx(padded["loss"], rel=1e-4)
        assert packed["grad_norm"] == pytest.approx(padded["grad_norm"], rel=1e-3)
        assert packed["num_input_tokens_seen"] == padded["num_input_tokens_seen"]
    assert logs["padded"][0]["loss"] != pytest.approx(logs["padded"][2]["loss"], rel=1e-3)  # it trained


@pytest.mark.parametrize("group_by_length", [False, True])
def test_group_by_length_sampler(tiny_model_dir, data, tmp_path, monkeypatch, group_by_length):
    """--group_by_length: the Trainer samples with the token-count formula's lengths (image headers, no
    pixel decode), which are the lengths the collator really produces."""
    from transformers import AutoProcessor
    from transformers.trainer_pt_utils import LengthGroupedSampler

    m = load_script()
    seen = {}

    def capture(trainer, **kwargs):  # instead of training: look at what the Trainer would sample
        seen["sampler"] = trainer._get_train_sampler()
        raise SystemExit(0)

    monkeypatch.setattr(m.DocVQATrainer, "train", capture)
    monkeypatch.setattr(m, "evaluate", lambda *args, **kwargs: None)
    argv = common_args(tiny_model_dir, data, tmp_path / "out") + [
        "--deepspeed", "none", "--num_crops", 2, "--batch_size", 2, "--batch_size_per_gpu", 2]
    with pytest.raises(SystemExit):
        m.main([str(a) for a in argv + (["--group_by_length"] if group_by_length else [])])
    sampler = seen["sampler"]
    if not group_by_length:
        assert not isinstance(sampler, LengthGroupedSampler)
        return
    processor = AutoProcessor.from_pretrained(tiny_model_dir, num_crops=2)
    rows = datasets.load_from_disk(str(data["mini"]))["train"]
    lengths = [m.sample_length(processor.tokenizer, row, 2)[0] for row in rows]
    assert isinstance(sampler, LengthGroupedSampler) and list(sampler.lengths) == lengths
    collator = m.DocVQACollator(processor)
    for row, length in zip(rows, lengths):  # the formula is exact: the longest gold answer's sequence
        assert length == max(len(collator.encode({**row, "answers": [a]})["input_ids"]) for a in row["answers"])
    # 8 rows, batch 2: mega-batches of one batch each, sorted by decreasing length, the longest first.
    order = [lengths[i] for i in sampler]
    assert sorted(order) == sorted(lengths) and order[0] == max(lengths)
    assert all(order[i] >= order[i + 1] for i in range(0, len(order), 2))


def test_qlora(tiny_model_dir, data, tmp_path, run_main):
    """4-bit base + LoRA on CPU, micro-batches of 2; merged into a full-precision reload of the base."""
    m = load_script()
    out = tmp_path / "qlora"
    proc = run_main(SCRIPT, *common_args(tiny_model_dir, data, out), "--use_qlora", "--batch_size", 2,
                    "--batch_size_per_gpu", 2, "--num_crops", 1, "--max_steps", 2, "--learning_rate", 5e-3,
                    "--merge_lora")
    layers = int(proc.stdout.split("4-bit layers: ")[1].split()[0])
    assert layers > 0
    assert (out / "adapter_model.safetensors").exists()
    step_losses = losses(read_json(out / "log_history.json"))
    assert sorted(step_losses) == [1, 2] and all(math.isfinite(v) for v in step_losses.values())
    check_eval_files(out, m)

    import phi3v  # noqa: F401
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert merged.dtype == torch.float32 and not any("lora" in n for n, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    inputs = sample_inputs(out / "merged")
    merged_logits = logits_of(merged, inputs)
    assert torch.isfinite(merged_logits).all()
    assert (merged_logits - logits_of(base, inputs)).abs().max() > 1e-3


def test_full_train_cauldron_deepspeed(tiny_model_dir, data, tmp_path, run_script):
    """--full_train on a cauldron-schema parquet copy: full fine-tuning with DeepSpeed ZeRO-2 from a plain
    `python` process, vision tower frozen, held-out loss every step; the output folder reloads."""
    m = load_script()
    out = tmp_path / "full"
    proc = run_script(SCRIPT, *common_args(tiny_model_dir, data, out), "--full_train",
                      "--full_train_dataset_path", data["cauldron"], "--freeze_vision_model", "--batch_size", 2,
                      "--num_crops", 1, "--max_steps", 2, "--learning_rate", 1e-3, "--eval_steps", 1,
                      "--max_eval_loss_samples", 2, "--resize_backend", "torch", env=ONE_THREAD)
    assert "training rows: 4, evaluation rows: 4" in proc.stdout
    log = read_json(out / "log_history.json")
    assert sorted(losses(log)) == [1, 2] and all(math.isfinite(v) for v in losses(log).values())
    eval_losses = [e["eval_loss"] for e in log if "eval_loss" in e]
    assert len(eval_losses) == 2 and all(math.isfinite(v) for v in eval_losses)
    training_args = torch.load(out / "training_args.bin", weights_only=False)
    assert str(training_args.deepspeed).endswith("ds_configs/zero2.json")
    check_eval_files(out, m)
    with Image.open(out / "loss_curve.png") as image:  # train and held-out loss, learning rate
        assert image.format == "PNG"
        image.verify()

    import phi3v  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoProcessor

    trained = AutoModelForCausalLM.from_pretrained(out)
    saved_processor = AutoProcessor.from_pretrained(out).image_processor
    assert saved_processor.num_crops == 1 and saved_processor.resize_backend == "torch"  # saved with the model
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trained_params, base_params = dict(trained.named_parameters()), dict(base.named_parameters())
    vision = [n for n in base_params if ".vision_embed_tokens." in n]
    assert vision and all(torch.equal(trained_params[n], base_params[n]) for n in vision)
    assert not torch.equal(trained_params["model.layers.0.self_attn.qkv_proj.weight"],
                           base_params["model.layers.0.self_attn.qkv_proj.weight"])
    assert torch.isfinite(logits_of(trained, sample_inputs(out))).all()
    assert not list(data["mini"].rglob("cache-*")), "the script wrote cache files into the user's dataset folder"


def test_full_train_from_a_cauldron_snapshot_root(tiny_model_dir, data, tmp_path, capsys):
    """--full_train_dataset_path at the root of a the_cauldron snapshot (a folder per config, the others with
    rows in the same schema): only docvqa/'s rows are read; a root without docvqa/ is refused, naming the folder."""
    m = load_script()
    root = tmp_path / "the_cauldron"
    shutil.copytree(data["cauldron"] / "docvqa", root / "docvqa")
    cauldron = datasets.load_dataset("parquet", data_files=str(root / "docvqa" / "train-00000-of-00001.parquet"),
                                     split="train")  # fmt: skip
    for config, rows in (("nlvr2", 3), ("hateful_memes", 1)):
        (root / config).mkdir()
        cauldron.select(range(rows)).to_parquet(str(root / config / "train-00000-of-00001.parquet"))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        m.main([str(a) for a in [*common_args(tiny_model_dir, data, out), "--full_train", "--full_train_dataset_path",
                                 root, "--num_crops", 1, "--preflight_only"]])  # fmt: skip
    assert exit_info.value.code == 0
    summary = json.loads((out / "preflight_summary.json").read_text())
    assert summary["splits"]["train"]["rows"] == len(cauldron) == 4  # not 4 + 3 + 1 (every parquet file)

    shutil.rmtree(root / "docvqa")
    with pytest.raises(SystemExit):
        m.parse_args(["--full_train", "--full_train_dataset_path", str(root), "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert (f"--full_train_dataset_path {root}: holds the folders hateful_memes/, nlvr2/ (a the_cauldron snapshot?) "
            "and no docvqa/ folder" in err and f"give the docvqa folder of the snapshot ({root / 'docvqa'}" in err)
