"""Using the fine-tuned model: drop-in model folders, `python -m phi3v.merge`, `python -m phi3v.predict`.

A drop-in folder replaces the base model's folder as is, for the official remote code (transformers
4.4x, vLLM) too. transformers 4.4x cannot run here, so the folders' files are checked against the
official layout: tokenizer_class, every base file byte for byte (remote-code .py files included),
the official keys of config.json and preprocessor_config.json, weights in the base's dtype.

The base is `drop_in_base`: the tiny model in bf16 with the official config.json keys it lacks
(`torch_dtype`, `_attn_implementation`), stand-ins for the remote-code .py files and a README, as a
hub snapshot of Phi-3.5-vision looks. Training runs call the recipe's main() in this process, except
the full fine-tuning run (DeepSpeed) and the torchrun run of predict.
"""

from __future__ import annotations

import json
import random
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, PreTrainedModel

import finetune_hf_trainer_ucf101 as recipe
import phi3v
from own_data import OWN_FILES, photo, photo_set, write_jsonl
from phi3v import merge, predict, saving
from phi3v.conversation import generation_batch
from phi3v.saving import adapter_base, load_with_adapter, run_processor, save_drop_in

pytestmark = pytest.mark.usefixtures("one_thread")  # in-process training: see conftest.one_thread

REMOTE_CODE = ("configuration_phi3_v.py", "modeling_phi3_v.py", "processing_phi3_v.py")
BASE_FILES = (*REMOTE_CODE, "README.md", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json")
OFFICIAL_PREPROCESSOR_KEYS = {"auto_map", "do_convert_rgb", "image_mean", "image_processor_type", "image_std",
                              "num_crops", "num_img_tokens", "processor_class"}


@pytest.fixture(scope="module")
def drop_in_base(tiny_model_dir, tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("base") / "phi3v-base"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    model.save_pretrained(base)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json",
                 "processor_config.json", "generation_config.json"):
        shutil.copy(tiny_model_dir / name, base / name)
    config = json.loads((base / "config.json").read_text())
    config.pop("dtype")
    config.update(torch_dtype="bfloat16", _attn_implementation="flash_attention_2", transformers_version="4.38.1")
    (base / "config.json").write_text(json.dumps(config, indent=2))
    for i, name in enumerate(REMOTE_CODE):
        (base / name).write_text(f"# stand-in for the official {name}\nVERSION = {i}\n")
    (base / "README.md").write_text("---\nlicense: mit\n---\n# model card\n")
    return base


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    photo_set(root, num_train=4, num_val=5)  # val: one-image, text-turn-then-image and two-image lines
    return root


def check_drop_in(folder: Path, base: Path, num_crops: int, dtype: str = "bfloat16"):
    """`folder` replaces `base` as is: the official files, the base's files unchanged, weights in `dtype`."""
    for name in BASE_FILES:
        assert (folder / name).read_bytes() == (base / name).read_bytes(), name
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "LlamaTokenizer"
    assert not (folder / "chat_template.jinja").exists()  # the template stays in tokenizer_config.json
    assert json.loads((folder / "processor_config.json").read_text()) == {
        "auto_map": {"AutoProcessor": "processing_phi3_v.Phi3VProcessor"}, "processor_class": "Phi3VProcessor"}
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    official = json.loads((base / "preprocessor_config.json").read_text())
    assert set(pre) == OFFICIAL_PREPROCESSOR_KEYS  # no 5.x key (resize_backend is left out when "pil")
    assert pre == {**official, "num_crops": num_crops}
    config, base_config = json.loads((folder / "config.json").read_text()), json.loads((base / "config.json").read_text())
    assert config["torch_dtype"] == dtype and "dtype" not in config
    assert config["rope_scaling"]["type"] == "su" and set(config["rope_scaling"]) == {"type", "long_factor", "short_factor"}
    assert config["auto_map"] == base_config["auto_map"] and config["_attn_implementation"] == "flash_attention_2"
    assert {k: v for k, v in config.items() if k in base_config and k != "torch_dtype"} == {
        k: v for k, v in base_config.items() if k != "torch_dtype"}  # every official key, the base's value
    with safe_open(folder / "model.safetensors", "pt") as f, safe_open(base / "model.safetensors", "pt") as g:
        assert set(f.keys()) == set(g.keys())  # the official key names
        assert "model.vision_embed_tokens.img_processor.vision_model.embeddings.patch_embedding.weight" in f.keys()
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {{"bfloat16": "BF16", "float32": "F32"}[dtype]}


def logits(folder, processor, photos_dir, records) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    batch = generation_batch(processor, [r["conversations"] for r in records], photos_dir)
    with torch.no_grad():
        return model(**batch).logits


def val_records(photos: Path) -> list[dict]:
    return [json.loads(line) for line in (photos / "my_val.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# LoRA: the run's merged/, the merge CLI on the final adapter and on checkpoint-N, predict
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(drop_in_base, photos, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("lora") / "out"
    recipe.main([str(a) for a in [
        "--model_name_or_path", drop_in_base, "--data_dir", photos, *OWN_FILES, "--output_dir", output_dir,
        "--num_crops", 1, "--batch_size", 2, "--batch_size_per_gpu", 2, "--max_steps", 2, "--save_steps", 2,
        "--learning_rate", 1e-2, "--use_lora", "--lora_rank", 4, "--merge_lora", "--max_new_tokens", 4,
        "--eval_batch_size", 2, "--logging_steps", 1, "--dataloader_num_workers", 0, "--deepspeed", "none",
        "--no-tqdm",
    ]])  # fmt: skip
    return output_dir


def test_merge_cli_equals_the_runs_merged_folder(lora_run, drop_in_base, photos, tmp_path):
    """`python -m phi3v.merge` on the final adapter and on checkpoint-2 writes what --merge_lora wrote: same logits,
    drop-in folders (base from adapter_config.json, weights in the base's bf16 unless --dtype, num_crops 1 trained)."""
    processor = AutoProcessor.from_pretrained(lora_run)
    assert processor.num_crops == 1
    check_drop_in(lora_run / "merged", drop_in_base, num_crops=1)
    records = val_records(photos)[:3]
    expected = logits(lora_run / "merged", processor, photos / "photos", records)
    base_logits = logits(drop_in_base, processor, photos / "photos", records)
    assert not torch.equal(expected, base_logits)  # the adapter changed the model

    for adapter in (lora_run, lora_run / "checkpoint-2"):
        out = tmp_path / f"merged-{adapter.name}"
        merge.main(["--adapter", str(adapter), "--output_dir", str(out)])
        check_drop_in(out, drop_in_base, num_crops=1)
        assert torch.equal(logits(out, processor, photos / "photos", records), expected), adapter

    out = tmp_path / "merged-fp32"
    merge.main(["--adapter", str(lora_run / "checkpoint-2"), "--output_dir", str(out), "--dtype", "float32",
                "--base", str(drop_in_base)])
    check_drop_in(out, drop_in_base, num_crops=1, dtype="float32")
    torch.testing.assert_close(logits(out, processor, photos / "photos", records), expected, atol=0.05, rtol=0.05)


def test_merge_cli_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="has no adapter_config.json: not a LoRA adapter folder"):
        merge.main(["--adapter", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="is not a folder"):
        merge.main(["--adapter", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "out")])


# ---------------------------------------------------------------------------------------------
# The lean merge (one weight at a time) writes the bytes of the whole-model merge it replaced
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qlora_run(drop_in_base, photos, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("qlora") / "out"
    recipe.main([str(a) for a in [
        "--model_name_or_path", drop_in_base, "--data_dir", photos, *OWN_FILES, "--output_dir", output_dir,
        "--num_crops", 1, "--batch_size", 2, "--batch_size_per_gpu", 2, "--max_steps", 2, "--learning_rate", 1e-2,
        "--use_qlora", "--lora_rank", 4, "--max_eval_samples", 0, "--logging_steps", 1,
        "--dataloader_num_workers", 0, "--deepspeed", "none", "--no-tqdm",
    ]])  # fmt: skip
    return output_dir


@pytest.fixture(scope="module")
def rich_adapter(drop_in_base, tmp_path_factory) -> Path:
    """A LoRA adapter with every setting the lean merge reads: rslora, rank and alpha patterns, random B
    everywhere (CLIP and projector too), and a saved lm_head that differs from the base's."""
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(drop_in_base, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=7, use_rslora=True, rank_pattern={"qkv_proj": 2}, alpha_pattern={"o_proj": 3},
                        target_modules=phi3v.lora_target_modules(model), init_lora_weights="gaussian")
    model = get_peft_model(model, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
        model.base_model.model.lm_head.base_layer.weight.mul_(1.5)
    folder = tmp_path_factory.mktemp("rich") / "adapter"
    model.save_pretrained(folder, save_embedding_layers=True)
    return folder


def whole_model_merge(adapter: Path, output_dir: Path, dtype=None) -> Path:
    """The merge as it was before it went weight by weight: the base in fp32 with peft's merge_and_unload,
    save_pretrained, then the weights cast to the output dtype."""
    base = adapter_base(adapter)
    model = load_with_adapter(adapter, base).merge_and_unload()
    return save_drop_in(model, output_dir, base, run_processor(adapter, base).image_processor, dtype)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("model*.safetensors"))
    assert files
    out = {}
    for path in files:
        with safe_open(path, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def assert_same_folder(folder: Path, expected: Path):
    """The same files; json equal, other files byte for byte; every tensor equal, in the same dtype."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in expected.iterdir())
    for path in expected.iterdir():
        if path.suffix == ".json":
            assert json.loads((folder / path.name).read_text()) == json.loads(path.read_text()), path.name
        elif path.suffix != ".safetensors":
            assert (folder / path.name).read_bytes() == path.read_bytes(), path.name
    got, want = weights(folder), weights(expected)
    assert list(got) == list(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key


@pytest.mark.parametrize("run, dtype", [("lora_run", None), ("qlora_run", None), ("qlora_run", "float16"),
                                        ("rich_adapter", None), ("rich_adapter", "float32")])
def test_lean_merge_is_bit_identical_to_the_whole_model_merge(run, dtype, request, drop_in_base, tmp_path):
    """`python -m phi3v.merge` (weight by weight) writes what the whole-model merge in fp32 wrote: the
    recipe's LoRA and QLoRA adapters (the UCF101 recipe saves lm_head, a LoRA target, with the adapter),
    and an adapter with rslora, rank/alpha patterns and a changed saved lm_head; bf16 (the base's), fp16, fp32."""
    adapter = request.getfixturevalue(run)
    expected = whole_model_merge(adapter, tmp_path / "whole", {None: None, "float16": torch.float16,
                                                                "float32": torch.float32}[dtype])
    merge.main(["--adapter", str(adapter), "--output_dir", str(tmp_path / "lean"), *(["--dtype", dtype] if dtype else [])])
    assert_same_folder(tmp_path / "lean", expected)
    merged, base = weights(tmp_path / "lean"), weights(drop_in_base)
    assert not torch.equal(merged["model.layers.0.self_attn.qkv_proj.weight"].float(),
                           base["model.layers.0.self_attn.qkv_proj.weight"].float())  # the adapter is in


def test_lean_merge_shards_and_streams(rich_adapter, drop_in_base, tmp_path, monkeypatch, capsys):
    """Shards of bounded size with the official index, loadable and equal to the one-file output; one weight in
    memory at a time: when a weight is merged, every weight merged before it is gone."""
    merge.main(["--adapter", str(rich_adapter), "--output_dir", str(tmp_path / "one")])
    assert "GiB max RSS)" in capsys.readouterr().out
    one = weights(tmp_path / "one")

    merged_so_far = []
    lean_merged = saving.LoraMerge.merged

    def spy(self, key, weight):
        assert all(ref() is None for ref in merged_so_far), "an earlier weight is still in memory"
        out = lean_merged(self, key, weight)
        merged_so_far.append(weakref.ref(out))
        return out

    monkeypatch.setattr(saving.LoraMerge, "merged", spy)
    shard_bytes = sum(t.numel() * 4 for t in one.values()) // 5  # fp32; the two 32064-row embeddings fill most
    monkeypatch.setattr(saving, "MAX_SHARD_BYTES", shard_bytes)
    out = tmp_path / "sharded"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"stale")  # an earlier save's weights do not stay
    merge.main(["--adapter", str(rich_adapter), "--output_dir", str(out), "--dtype", "float32"])
    assert len(merged_so_far) == len(one)
    files = sorted(p.name for p in out.glob("model*.safetensors"))
    assert len(files) >= 3 and files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"} and set(index["metadata"]) == {"total_size"}
    sharded = weights(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in sharded.values())
    for name in files:
        with safe_open(out / name, "pt") as f:
            assert {k for k, v in index["weight_map"].items() if v == name} == set(f.keys())
            size = sum(torch.Size(f.get_slice(k).get_shape()).numel() * 4 for k in f.keys())
            assert size <= shard_bytes or len(list(f.keys())) == 1
    assert set(sharded) == set(one) and all(torch.equal(sharded[k].to(v.dtype), v) for k, v in one.items())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.equal(v, sharded[k]) for k, v in model.state_dict().items())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"


def test_merge_memory_bench_at_tiny_size(tmp_path, capsys):
    """`python -m bench.merge_memory --tiny`: the README's real-size measurement on the tiny model. Its random
    base and UCF101-style adapter (random B, lm_head saved along) merge as peft merges them."""
    from bench import merge_memory

    line = merge_memory.main(["--workdir", str(tmp_path), "--tiny", "--keep"])
    assert line.startswith(f"merged {tmp_path / 'adapter'} into its base") and "GiB max RSS)" in line
    assert "base 0.0" in capsys.readouterr().out
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (64, 128, str(tmp_path / "base"))
    assert "lm_head" in config["target_modules"]
    expected = whole_model_merge(tmp_path / "adapter", tmp_path / "whole")
    assert_same_folder(tmp_path / "merged", expected)


def test_lean_merge_refuses_what_it_does_not_merge(rich_adapter, tmp_path):
    """A DoRA adapter (its merge is not W + BA): a clear refusal, no folder written."""
    dora = tmp_path / "dora"
    shutil.copytree(rich_adapter, dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(SystemExit, match="merging an adapter with use_dora is not supported here"):
        merge.main(["--adapter", str(dora), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_predict_reproduces_eval_after(lora_run, photos, tmp_path, capsys):
    """Base + adapter on the run's val file with its settings: the predictions of its eval_after.json, exactly."""
    eval_after = json.loads((lora_run / "eval_after.json").read_text())
    output = tmp_path / "predictions.jsonl"
    predict.main(["--adapter", str(lora_run), "--data", str(photos / "my_val.jsonl"), "--image_dir",
                  str(photos / "photos"), "--batch_size", "2", "--max_new_tokens", "4", "--output", str(output),
                  "--no-tqdm"])  # fmt: skip
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["id"] for line in lines] == eval_after["ids"]
    assert [line["prediction"] for line in lines] == eval_after["predictions"]
    assert [line["answer"] for line in lines] == eval_after["answers"]
    correct = round(eval_after["accuracy"] * len(lines))
    assert f"accuracy {eval_after['accuracy']:.4f} ({correct} of {len(lines)} answers" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Full fine-tuning (DeepSpeed ZeRO-2): the output folder and every checkpoint-N are drop-in
# ---------------------------------------------------------------------------------------------


def test_full_finetuning_folders_are_drop_in(drop_in_base, photos, tmp_path, run_script):
    output_dir = tmp_path / "out"
    run = ["finetune_hf_trainer_ucf101.py", "--model_name_or_path", drop_in_base, "--data_dir", photos, *OWN_FILES,
           "--num_crops", 2, "--batch_size", 2, "--batch_size_per_gpu", 2, "--max_steps", 2, "--save_steps", 1,
           "--max_eval_samples", 0, "--dataloader_num_workers", 0, "--logging_steps", 1, "--no-tqdm"]  # fmt: skip
    run_script(*run, "--output_dir", output_dir)
    final = AutoModelForCausalLM.from_pretrained(output_dir).state_dict()
    for folder in (output_dir, output_dir / "checkpoint-1", output_dir / "checkpoint-2"):
        check_drop_in(folder, drop_in_base, num_crops=2)
        model = AutoModelForCausalLM.from_pretrained(folder)  # a checkpoint-N loads as a model
        assert AutoProcessor.from_pretrained(folder).num_crops == 2
        if folder.name != "checkpoint-1":
            assert all(torch.equal(v, final[k]) for k, v in model.state_dict().items())
    base = AutoModelForCausalLM.from_pretrained(drop_in_base).state_dict()
    assert not torch.equal(final["model.layers.0.self_attn.qkv_proj.weight"], base["model.layers.0.self_attn.qkv_proj.weight"])
    # Still resumable (DeepSpeed resumes from global_step*/, not from the bf16 model.safetensors): resuming from
    # checkpoint-1 ends with the weights of the run that was not interrupted.
    assert phi3v.last_complete_checkpoint(output_dir) == str(output_dir / "checkpoint-2")
    resumed_dir = tmp_path / "resumed"
    proc = run_script(*run, "--output_dir", resumed_dir, "--resume_from_checkpoint", output_dir / "checkpoint-1")
    assert proc.stdout.count("{'loss': ") == 1  # it did resume: only step 2 trained
    resumed = AutoModelForCausalLM.from_pretrained(resumed_dir).state_dict()
    assert all(torch.equal(v, final[k]) for k, v in resumed.items())


def test_full_finetuning_without_deepspeed_checkpoints_keep_the_trained_dtype(drop_in_base, photos, tmp_path, capsys):
    """Without DeepSpeed resuming reads checkpoint-N/model.safetensors: it keeps the fp32 trained in (and says so in
    torch_dtype) so that the resume is exact; the final folder is in the base's bf16."""
    run = [str(a) for a in [
        "--model_name_or_path", drop_in_base, "--data_dir", photos, *OWN_FILES, "--num_crops", 1, "--batch_size", 2,
        "--batch_size_per_gpu", 2, "--max_steps", 2, "--save_steps", 1, "--max_eval_samples", 0,
        "--dataloader_num_workers", 0, "--deepspeed", "none", "--logging_steps", 1, "--no-tqdm",
    ]]  # fmt: skip
    recipe.main([*run, "--output_dir", str(tmp_path / "out")])
    assert capsys.readouterr().out.count("{'loss': ") == 2
    check_drop_in(tmp_path / "out" / "checkpoint-1", drop_in_base, num_crops=1, dtype="float32")
    check_drop_in(tmp_path / "out", drop_in_base, num_crops=1, dtype="bfloat16")
    recipe.main([*run, "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint",
                 str(tmp_path / "out" / "checkpoint-1")])  # fmt: skip
    for name in ("out", "resumed"):
        check_drop_in(tmp_path / name / "checkpoint-2", drop_in_base, num_crops=1, dtype="float32")
    assert capsys.readouterr().out.count("{'loss': ") == 1  # it did resume: only step 2 trained
    first = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "checkpoint-2").state_dict()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "resumed" / "checkpoint-2").state_dict()
    assert all(torch.equal(v, first[k]) for k, v in again.items())


def test_drop_in_from_a_base_without_remote_code(tiny_model_dir, tmp_path):
    """`python -m phi3v.tiny` has no .py files and no torch_dtype: the folder is written all the same."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(tiny_model_dir, num_crops=3, resize_backend="torch")
    save_drop_in(model, tmp_path / "out", tiny_model_dir, processor.image_processor)
    assert not list((tmp_path / "out").glob("*.py"))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float32"
    pre = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert pre["num_crops"] == 3 and pre["resize_backend"] == "torch"  # a non-default backend is kept for phi3v
    reloaded = AutoProcessor.from_pretrained(tmp_path / "out")
    assert reloaded.num_crops == 3 and reloaded.image_processor.resize_backend == "torch"
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in again.state_dict().items())


# ---------------------------------------------------------------------------------------------
# predict: one query, bad input, several processes
# ---------------------------------------------------------------------------------------------


def test_predict_one_query_as_a_data_line(tiny_model_dir, photos, tmp_path, capsys):
    """--image/--prompt gives what the same conversation gives as a --data line."""
    record = next(r for r in val_records(photos) if len(r["conversations"]) == 1)
    turn = record["conversations"][0]
    common = ["--model", str(tiny_model_dir), "--num_crops", "1", "--max_new_tokens", "5"]
    as_data = predict.main(["--data", str(write_jsonl(tmp_path / "one.jsonl", [record])), "--image_dir",
                            str(photos / "photos"), *common])  # fmt: skip
    err = capsys.readouterr().err
    assert "1 line(s), torch.float32 on cpu, 1 process(es), num_crops 1" in err and "predicting" in err  # + progress bar
    images = [arg for rel in turn["images"] for arg in ("--image", str(photos / "photos" / rel))]
    query = predict.main([*images, "--prompt", turn["user"], *common, "--no-tqdm"])
    assert query == [{"id": 0, "prediction": as_data[0]["prediction"]}]  # no answer: no accuracy
    captured = capsys.readouterr()
    assert json.loads(captured.out.splitlines()[0]) == query[0] and "accuracy" not in captured.out
    assert "predicting" not in captured.err  # --no-tqdm
    predict.main([*images, "--prompt", turn["user"], *common, "--no-tqdm", "--bf16"])
    assert "torch.bfloat16 on cpu" in capsys.readouterr().err


def test_predict_bad_input_one_report(tiny_model_dir, photos, tmp_path, capsys, monkeypatch):
    """Every bad line in one report, exit 1, before any weights are loaded."""
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(lambda cls, *a, **k: pytest.fail("loaded")))
    good = val_records(photos)[0]
    (photos / "photos" / "broken.png").write_bytes((photos / "photos" / good["conversations"][-1]["images"][0])
                                                    .read_bytes()[:60])  # fmt: skip
    lines = [
        good,
        "{not json",
        {"id": "no-user", "conversations": [{"images": [], "assistant": "x"}]},
        {"id": "missing", "conversations": [{"images": ["nowhere.png"], "user": "What colour is the photo?"}]},
        {"id": "cut", "conversations": [{"images": ["broken.png"], "user": "What colour is the photo?"}]},
        {"id": "tagged", "conversations": [{"images": [], "user": "<|image_1|> what?"}]},
    ]
    data = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--model", str(tiny_model_dir), "--data", str(data), "--image_dir", str(photos / "photos")])
    report = str(exit_info.value.code)
    assert report.startswith("5 invalid row(s) in ")
    for expected in ("bad.jsonl line 2: not valid JSON", "bad.jsonl line 3 (id no-user): conversations[0]: empty "
                     "or missing user text", "bad.jsonl line 4 (id missing): image nowhere.png: image file not found",
                     "bad.jsonl line 5 (id cut): image broken.png: corrupt or truncated image",
                     "bad.jsonl line 6 (id tagged): conversations[0]: user text has its own image tags"):
        assert expected in report, expected
    assert "bad.jsonl line 1" not in report
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--model", str(tiny_model_dir), "--image", str(tmp_path / "nope.jpg"), "--prompt", "hi"])
    assert "the query: image " in str(exit_info.value.code) and "not found" in str(exit_info.value.code)
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--model", str(tiny_model_dir), "--prompt", "hi", "--data", str(data)])
    assert exit_info.value.code == 2



def test_predict_unloadable_model_is_one_clear_error(photos, tmp_path):
    """A --model or --adapter that is no model folder: one line naming the flag and the folder, no traceback."""
    data = write_jsonl(tmp_path / "ok.jsonl", val_records(photos)[:1])
    for flag, folder in (("--model", tmp_path / "no-such-model"), ("--adapter", tmp_path)):
        with pytest.raises(SystemExit) as exit_info:
            predict.main([flag, str(folder), "--data", str(data), "--image_dir", str(photos / "photos")])
        assert str(exit_info.value.code).startswith(f"error: cannot load {flag} {folder}"), exit_info.value.code

def test_predict_torchrun_keeps_input_order(tiny_model_dir, tmp_path, run_script):
    """Two processes (gloo): the lines are sharded and gathered back in input order, the same as one process."""
    root = tmp_path / "data"
    lines = []
    for i in range(5):  # shards of 3 and 2 lines, in batches of 2: uneven shards and batches
        photo(root / f"{i}.png", ["dark red", "deep blue"][i % 2], random.Random(i), size=(40 + 8 * i, 32))
        lines.append({"id": f"q{i}", "conversations": [{"images": [f"{i}.png"], "user": f"Question {i}?",
                                                        "assistant": "a photo"}]})  # fmt: skip
    data = write_jsonl(root / "q.jsonl", lines)
    args = ["--model", tiny_model_dir, "--data", data, "--num_crops", 1, "--max_new_tokens", 4, "--batch_size", 2,
            "--no-tqdm"]  # fmt: skip
    run_script("phi3v/predict.py", *args, "--output", tmp_path / "two.jsonl", nproc=2)
    one = predict.main([str(a) for a in args + ["--output", tmp_path / "one.jsonl"]])
    two = [json.loads(line) for line in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert [r["id"] for r in two] == [f"q{i}" for i in range(5)]
    assert two == one


# ---------------------------------------------------------------------------------------------
# A test model for vLLM: the real CLIP ViT-L/14-336 tower (vLLM hard-codes it), a tiny decoder
# ---------------------------------------------------------------------------------------------


def test_tiny_vision_intermediate_size(tmp_path):
    """`python -m phi3v.tiny --vision_intermediate_size N` sets the CLIP MLP width (default still twice the
    width); with the README's vLLM sizes the vision config is the real model's, key for key."""
    from phi3v import tiny

    tiny.main(["--output_dir", str(tmp_path / "m"), "--vision_hidden_size", "32", "--vision_intermediate_size", "48"])
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["vision_config"]["intermediate_size"] == 48
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    fc1 = model.model.vision_embed_tokens.img_processor.vision_model.encoder.layers[0].mlp.fc1
    assert tuple(fc1.weight.shape) == (48, 32)
    assert tiny.tiny_config().vision_config.intermediate_size == 64

    real = AutoConfig.from_pretrained(tiny.ASSETS)
    vllm_sizes = tiny.tiny_config(vision_hidden_size=1024, vision_layers=24, vision_heads=16,
                                  vision_intermediate_size=4096)  # the README's command
    assert vllm_sizes.vision_config.to_dict() == real.vision_config.to_dict()
    assert vllm_sizes.img_processor == real.img_processor and vllm_sizes.hidden_size == 64
