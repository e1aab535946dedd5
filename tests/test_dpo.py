"""finetune_hf_trainer_dpo.py end to end on the tiny model and a coloured-shapes preference set
(tests/preference_data.py): the batch layout TRL gets, full fine-tuning against a frozen copy, LoRA against the base with the adapter off, checkpoints and
resuming, the evaluation files (checked against the saved model's own log-probabilities), plots, saves, and the
argument and output-folder checks. Runs call main() in this process."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import finetune_hf_trainer_dpo as recipe
from preference_data import PROMPT, answer, shape_preferences, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")  # in-process training: see conftest.one_thread

NUM_EVAL = 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    shape_preferences(root, num_train=4, val_repeats=1, seed=0)
    return root


def read(path):
    return json.loads(path.read_text())


def run_args(tiny_model_dir, data_dir, output_dir, *extra) -> list[str]:
    return [str(a) for a in [
        "--model_name_or_path", tiny_model_dir, "--data_dir", data_dir, "--output_dir", output_dir, "--num_crops", 1,
        "--batch_size", 2, "--batch_size_per_gpu", 2, "--max_steps", 2, "--logging_steps", 1, "--warmup_steps", 0,
        "--learning_rate", "1e-2", "--max_eval_samples", NUM_EVAL, "--eval_batch_size", 2,
        "--no_gradient_checkpointing", "--dataloader_num_workers", 0, "--deepspeed", "none", "--no-tqdm", *extra,
    ]]  # fmt: skip


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, data_dir, tmp_path_factory, one_thread):
    """Full fine-tuning against a frozen copy, with --generate, and one invalid train line skipped."""
    root = tmp_path_factory.mktemp("full")
    train_file = data_dir / "pref_train.jsonl"
    lines = train_file.read_text().splitlines()
    same = {"id": "same", "images": [], "prompt": "Say hi.", "chosen": "Hi.", "rejected": " Hi. "}
    (root / "train_with_bad_line.jsonl").write_text("\n".join([*lines, json.dumps(same)]) + "\n")
    output_dir = root / "out"
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        recipe.main(run_args(tiny_model_dir, data_dir, output_dir, "--train_file", root / "train_with_bad_line.jsonl",
                             "--skip_invalid", "--generate", "--max_new_tokens", 2))  # fmt: skip
    return output_dir, stdout.getvalue()


def answer_logp(model, processor, image_dir, record, key) -> float:
    """log p(answer | prompt) from the model's own logits (no TRL): the reference for the eval files."""
    from phi3v.conversation import answer_ids, encode_conversation

    prompt = encode_conversation(processor, recipe.turns_of(record), image_dir, include_last_answer=False)
    ids = answer_ids(processor.tokenizer, record[key])
    input_ids = torch.tensor([prompt["input_ids"] + ids])
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=prompt["pixel_values"], image_sizes=prompt["image_sizes"]).logits
    log_probs = logits[0, len(prompt["input_ids"]) - 1 : -1].float().log_softmax(-1)
    return float(log_probs.gather(1, torch.tensor(ids)[:, None]).sum())


def test_collator_rows_for_trl(tiny_model_dir, data_dir):
    """First every prompt + chosen, then every prompt + rejected; completion_mask covers exactly the answer
    tokens; the images follow the rows; earlier turns (with their own images) come before the prompt."""
    from transformers import AutoProcessor

    from phi3v.conversation import answer_ids, encode_conversation

    processor = AutoProcessor.from_pretrained(tiny_model_dir, num_crops=1)
    val = [json.loads(line) for line in (data_dir / "pref_val.jsonl").read_text().splitlines()]
    first, second = val[0], dict(val[1])
    second["conversations"] = [{"images": [val[2]["images"][0]], "user": "And this?", "assistant": "Another shape."}]
    rows = recipe.trl_dataset([first, second])
    assert rows.column_names == ["images", "prompt", "chosen", "rejected", "conversations"]
    batch = recipe.PreferenceCollator(processor, data_dir / "images")(list(rows))
    tokenizer = processor.tokenizer
    for row, (record, key) in enumerate([(first, "chosen"), (second, "chosen"), (first, "rejected"), (second, "rejected")]):
        prompt = encode_conversation(processor, recipe.turns_of(record), data_dir / "images", include_last_answer=False)
        completion = answer_ids(tokenizer, record[key])  # `{answer}<|end|>\n<|endoftext|>`
        ids = prompt["input_ids"] + completion
        n = len(ids)
        assert batch["input_ids"][row, :n].tolist() == ids
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        mask = batch["completion_mask"][row].tolist()
        assert mask == [0] * len(prompt["input_ids"]) + [1] * len(completion) + [0] * (len(mask) - n)
    assert tokenizer.decode(batch["input_ids"][1][batch["input_ids"][1] > 0]).count("And this?") == 1
    # One image for the first pair, two (earlier turn, then prompt) for the second; then the same again.
    assert batch["pixel_values"].shape[0] == 6 and batch["image_sizes"].shape == (6, 2)
    assert torch.equal(batch["pixel_values"][:3], batch["pixel_values"][3:])


def test_full_fine_tuning(full_run, tiny_model_dir, data_dir, drawn_figures):
    output_dir, out = full_run
    assert "preflight: 4 train, 4 val preferences valid" in out and "reference: a frozen copy" in out
    skipped = [json.loads(line) for line in (output_dir / "skipped_rows.jsonl").read_text().splitlines()]
    assert skipped == [{"where": "train_with_bad_line.jsonl line 5 (id same)".replace(
        "train_with_bad_line.jsonl", str(output_dir.parent / "train_with_bad_line.jsonl")),
        "reason": "chosen and rejected are the same text: nothing to prefer"}]  # fmt: skip

    history = read(output_dir / "log_history.json")
    steps = [h for h in history if "loss" in h]
    assert [h["step"] for h in steps] == [1, 2]
    for h in steps:
        assert h["pairs_per_second"] > 0 and h["tokens_per_second"] > 300 * h["pairs_per_second"]
        assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"} <= h.keys()
    # Step 1 runs the starting model: policy == reference, every reward 0 (TRL's reference is right).
    assert steps[0]["rewards/chosen"] == steps[0]["rewards/rejected"] == 0 and steps[0]["loss"] == pytest.approx(0.6931, abs=1e-4)
    assert steps[1]["rewards/margins"] != 0
    assert history[-1]["train_pairs_per_second"] > 0

    before, after = read(output_dir / "eval_before.json"), read(output_dir / "eval_after.json")
    val = [json.loads(line) for line in (data_dir / "pref_val.jsonl").read_text().splitlines()][:NUM_EVAL]
    for result in (before, after):
        assert result["num_samples"] == NUM_EVAL and result["ids"] == [r["id"] for r in val] and result["beta"] == 0.1
        per_token = [(c / nc, r / nr) for c, nc, r, nr in zip(result["chosen_logps"], result["chosen_tokens"],
                                                             result["rejected_logps"], result["rejected_tokens"])]  # fmt: skip
        assert result["logp_accuracy"] == sum(c > r for c, r in per_token) / NUM_EVAL
        assert result["preference_accuracy"] == sum(m > 0 for m in result["margins"]) / NUM_EVAL
        assert result["mean_reward_margin"] == pytest.approx(sum(result["margins"]) / NUM_EVAL)
        assert len(result["generations"]) == NUM_EVAL and all(isinstance(g, str) for g in result["generations"])
    assert before["margins"] == [0.0] * NUM_EVAL and before["preference_accuracy"] == 0.0
    expected = [0.1 * ((c - c0) - (r - r0)) for c, c0, r, r0 in zip(after["chosen_logps"], before["chosen_logps"],
                                                                      after["rejected_logps"], before["rejected_logps"])]  # fmt: skip
    assert after["margins"] == pytest.approx(expected) and any(m != 0 for m in after["margins"])

    # The eval's log-probabilities are the models' own: the base before, the saved (drop-in) folder after.
    from transformers import AutoModelForCausalLM, AutoProcessor

    import phi3v  # noqa: F401

    processor = AutoProcessor.from_pretrained(output_dir)
    assert processor.num_crops == 1
    for folder, result in ((tiny_model_dir, before), (output_dir, after)):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        for i in (0, 3):
            for key in ("chosen", "rejected"):
                own = answer_logp(model, processor, data_dir / "images", val[i], key)
                assert result[f"{key}_logps"][i] == pytest.approx(own, abs=2e-3), (folder, i, key)
    assert read(output_dir / "config.json")["torch_dtype"] == "float32"  # drop-in: the official config form

    # loss_curve.png: the loss and the rewards per step.
    recipe.save_plots(output_dir, history, print)
    drawn = drawn_figures["loss_curve.png"]
    assert [x for x, _ in drawn["DPO loss"]] == [1, 2]
    assert [y for _, y in drawn["reward margin (chosen - rejected)"]] == [h["rewards/margins"] for h in steps]
    assert "reward accuracy" in drawn and "learning rate" in drawn


def test_lora_checkpoints_resume_merge(tiny_model_dir, data_dir, tmp_path, capsys):
    """LoRA (not on lm_head: TRL reads its weight directly), reference = the adapter off; checkpoint-N every
    step; a run resumed from checkpoint-1 gives the uninterrupted run's step-2 loss; --merge_lora."""
    output_dir = tmp_path / "out"
    lora = ["--use_lora", "--lora_rank", 4, "--freeze_vision_model", "--save_steps", 1, "--max_eval_samples", 2]
    recipe.main(run_args(tiny_model_dir, data_dir, output_dir, *lora, "--merge_lora"))
    out = capsys.readouterr().out
    assert "LoRA:" in out and "reference: the base (adapter off)" in out and "merged model saved to" in out
    config = read(output_dir / "adapter_config.json")
    assert config["r"] == 4 and "lm_head" not in config["target_modules"]
    assert {"model.layers.0.self_attn.qkv_proj", "model.layers.1.mlp.down_proj"} <= set(config["target_modules"])
    assert not (output_dir / "ref").exists()  # one adapter only: TRL made no "ref" copy
    assert (output_dir / "merged" / "model.safetensors").is_file() and (output_dir / "checkpoint-2").is_dir()
    history = [h for h in read(output_dir / "log_history.json") if "loss" in h]
    assert history[0]["rewards/margins"] == 0 and history[1]["rewards/margins"] != 0
    assert read(output_dir / "eval_before.json")["margins"] == [0.0, 0.0]

    # Resume: a folder holding only checkpoint-1 of that run.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(output_dir / "checkpoint-1", resumed / "checkpoint-1")
    recipe.main(run_args(tiny_model_dir, data_dir, resumed, *lora, "--resume_from_checkpoint", "latest"))
    assert f"resuming from {resumed / 'checkpoint-1'}" in capsys.readouterr().out
    again = [h for h in read(resumed / "log_history.json") if "loss" in h]
    assert [h["step"] for h in again] == [1, 2]
    assert again[1]["loss"] == pytest.approx(history[1]["loss"], rel=1e-5)
    assert again[1]["rewards/margins"] == pytest.approx(history[1]["rewards/margins"], rel=1e-4, abs=1e-7)


def test_no_silent_overwrite(full_run, tiny_model_dir, data_dir, capsys):
    output_dir, _ = full_run
    with pytest.raises(SystemExit):
        recipe.parse_args(run_args(tiny_model_dir, data_dir, output_dir))
    assert "already holds a finished run" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--merge_lora"], "--merge_lora only makes sense with --use_lora/--use_qlora"),
        (["--beta", "0"], "--beta must be > 0"),
        (["--loss_type", "dpo"], "argument --loss_type: invalid choice: 'dpo'"),
        (["--batch_size", "3", "--batch_size_per_gpu", "2"], "--batch_size 3 must be a multiple"),
        (["--train_file", "nope.jsonl"], "lacks nope.jsonl: expected the layout of convert_preference_data.py"),
    ],
)
def test_argument_errors(extra, message, data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        recipe.parse_args(["--data_dir", str(data_dir), "--output_dir", str(tmp_path / "out"), *extra])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_help_has_launch_lines_and_hardware(capsys):
    with pytest.raises(SystemExit):
        recipe.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "torchrun --nproc_per_node=8 finetune_hf_trainer_dpo.py" in text and "python finetune_hf_trainer_dpo.py" in text
    assert "Hardware suggestions" in text and "--loss_type" in text


def test_prompt_text_is_the_chat_template(tiny_model_dir, data_dir):
    """Written out by hand: the user turn with its image tag, the assistant header, then the answer with
    <|end|> and <|endoftext|>, as the supervised recipes train answers."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir, num_crops=1)
    record = {"images": ["val/0000.png"], "prompt": PROMPT, "chosen": answer("red"), "rejected": answer("blue")}
    batch = recipe.PreferenceCollator(processor, data_dir / "images")([{**record, "conversations": "[]"}])
    image = Image.open(data_dir / "images" / "val/0000.png").convert("RGB")
    prompt = processor(text=f"<|user|>\n<|image_1|>\n{PROMPT}<|end|>\n<|assistant|>\n", images=[image])
    for row, key in enumerate(("chosen", "rejected")):
        completion = processor.tokenizer(f"{record[key]}<|end|>\n<|endoftext|>", add_special_tokens=False).input_ids
        expected = prompt["input_ids"][0].tolist() + completion
        assert batch["input_ids"][row, : len(expected)].tolist() == expected
    assert torch.equal(batch["pixel_values"][0], prompt["pixel_values"][0])
