"""The benchmark (`python -m bench.run`): a CPU smoke run, and the pieces its numbers rest on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor

import phi3v
from bench.baseline import encode_all_slots, full_vocab_loss
from bench.flops import Architecture, batch_counts
from bench.worker import model_config
from bench.workloads import SampleDataset, length_grouped_batches, make_samples, pad_collate
from conftest import REPO, script_env


def test_quick_cpu_run_writes_positive_measurements(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--device", "cpu", "--strategies", "full", "--attn", "sdpa",
         "--no_ablation", "--steps", "1", "--output_dir", str(out)],
        cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Ours against the baseline" in proc.stdout and (out / "results.md").exists()
    results = json.loads((out / "results.json").read_text())
    runs = {r["label"]: r for r in results["runs"]}
    assert set(runs) == {"baseline", "ours"} and not any("error" in r for r in runs.values())
    for run in runs.values():
        for key in ("img_per_s", "tokens_per_s", "tokens_per_cpu_s", "real_crops_per_s", "encoded_crops_per_s",
                    "step_seconds", "peak_memory_bytes", "peak_memory_per_sample_bytes", "loader_img_per_cpu_s",
                    "eval_generations_per_s", "model_tflops_per_s", "executed_tflops_per_sample_full_arch"):
            assert run[key] > 0, key
        assert run["peak_memory_per_sample_bytes"] == run["peak_memory_bytes"] / run["batch_size"]
        assert 0 <= run["data_wait_fraction"] < 1 and run["measured_samples"] == 2
        assert run["mfu"] is None  # CPU: no accelerator peak
    base, ours = runs["baseline"], runs["ours"]
    assert base["batch_size"] == 1 and ours["batch_size"] == 2
    # The baseline runs CLIP on the padding slots too and builds the logits of every position.
    assert base["encoded_crops_per_s"] > base["real_crops_per_s"]
    assert base["executed_tflops_per_sample_full_arch"] > ours["executed_tflops_per_sample_full_arch"]
    for row in results["preprocess"]:
        assert row["max_abs_diff"] == 0 and row["phi3v_ms"] > 0 and row["plain_ms"] > 0
        assert row["phi3v_fast_ms"] > 0 and 0 < row["fast_max_abs_diff"] <= 0.05  # torch's resize, not PIL's
    assert (base["resize_backend"], ours["resize_backend"]) == ("pil", "torch")
    # The targets table is computed from these numbers, not written by hand.
    statuses = {target: status for target, _, status in results["targets"]}
    memory = ours["peak_memory_per_sample_bytes"] / base["peak_memory_per_sample_bytes"]
    assert statuses["full: peak training memory per sample <= 0.6x baseline"] == ("PASS" if memory <= 0.6 else "FAIL")
    tokens = ours["tokens_per_cpu_s"] / base["tokens_per_cpu_s"]
    assert statuses["full: non-padding tokens per CPU-second >= 1.3x baseline, both 8 samples per optimizer step"] == (
        "PASS" if tokens >= 1.3 else "FAIL")
    assert "| status |" in proc.stdout and "not measured" in proc.stdout  # GPU targets named, not faked


def test_short_gpu_mode_at_tiny_size_on_cpu(tmp_path, monkeypatch, one_thread):
    """`--short`, the run sized for a few minutes of a lent GPU: `ours` for full, LoRA and QLoRA, time-boxed
    measuring, batched and one-at-a-time generation on the same model, half the batch after running out of
    memory. Workers run in this process (the process boundary is not what is tested here)."""
    import importlib

    import bench.run

    def in_process(module, argv, log, timeout):
        importlib.import_module(module).main(argv)
        return 0

    configs = []

    def out_of_memory_once(cfg, out_dir, timeout):
        configs.append(cfg)
        if len(configs) == 1:
            return {**cfg, "error": "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB"}
        return run_config(cfg, out_dir, timeout)

    run_config = bench.run.run_config
    monkeypatch.setattr(bench.run, "run_in_subprocess", in_process)
    monkeypatch.setattr(bench.run, "run_config", out_of_memory_once)
    monkeypatch.setitem(bench.run.SHORT, "measure_seconds", 1e-9)  # stop at the first measured micro-step
    out = tmp_path / "bench"
    assert bench.run.main(["--short", "--quick", "--device", "cpu", "--steps", "3", "--output_dir", str(out)]) == 0
    assert [(c["strategy"], c["batch_size"]) for c in configs] == [("full", 2), ("full", 1), ("lora", 2), ("qlora", 2)]
    results = json.loads((out / "results.json").read_text())
    assert results["preprocess"] is None
    runs = {r["strategy"]: r for r in results["runs"]}
    assert list(runs) == ["full", "lora", "qlora"]
    for run in runs.values():
        assert (run["label"], run["attn"], run["model_size"], run["num_crops"]) == ("ours", "sdpa", "tiny", 2)
        assert run["micro_steps"] == 1 < 3  # the time box, not the planned steps, ended measuring
        for key in ("img_per_s", "tokens_per_s", "model_tflops_per_s", "peak_memory_bytes"):
            assert run[key] > 0, key
    assert runs["full"]["batch_size"] == 1 and runs["lora"]["batch_size"] == 2
    assert runs["full"]["eval_generations_per_s"] > 0 and runs["full"]["eval_one_at_a_time_generations_per_s"] > 0
    assert "eval_generations_per_s" not in runs["lora"]  # evaluation once, in the first strategy's run
    statuses = {target: status for target, _, status in results["targets"]}
    assert statuses["full: eval batched vs one at a time (reported on CPU; the 5x target is for a GPU)"] == "reported"
    assert statuses["GPU targets (MFU >= 45%, batched eval >= 5x)"] == "not measured"


def test_targets_fail_when_ours_is_not_better():
    """A run where ours uses as much memory per sample and is slower must FAIL both targets."""
    from bench.run import targets

    meta = dict(device="cpu", strategies=["full"], attn=["sdpa"], samples_per_update=8, workload="docvqa")
    common = dict(strategy="full", attn="sdpa", eval_generations_per_s=1.0, loader_img_per_cpu_s=0.5,
                  useful_tflops_per_sample_full_arch=70.0)
    base = dict(common, label="baseline", peak_memory_per_sample_bytes=2**30, samples_per_micro_batch=1,
                tokens_per_cpu_s=100.0)
    ours = dict(common, label="ours", peak_memory_per_sample_bytes=0.7 * 2**30, samples_per_micro_batch=2,
                tokens_per_cpu_s=120.0)
    page = dict(image="page", num_crops=16, plain_ms=60.0, phi3v_ms=38.0, resize_ms=25.0,
                speedup_per_core=60 / 38, speedup_bound_exact_resize=2.4, max_abs_diff=0.0,
                phi3v_fast_ms=31.0, fast_speedup_per_core=60 / 31, fast_max_abs_diff=0.015,
                fast_differing_fraction=2e-4)

    def status(rows, prefix):
        (found,) = [status for target, _, status in rows if target.startswith(prefix)]
        return found

    rows = targets(meta, [base, ours], [page])
    assert status(rows, "full: peak training memory") == "FAIL" and status(rows, "full: non-padding") == "FAIL"
    assert status(rows, "preprocessing page, num_crops 16: >= 2x") == "FAIL"  # 1.94x
    assert status(rows, "preprocessing page, num_crops 16, exact") == "reported"
    # 4 workers x 0.5 img/s = 2 img/s; an H100 at 45% MFU takes 0.45 * 989 / 70 = 6.4 img/s.
    assert status(rows, "4 dataloader workers") == "FAIL"
    assert status(rows, "GPU targets") == "not measured"
    base["loader_img_per_cpu_s"] = 2.0  # the loader of `ours` counts when there is one
    assert status(targets(meta, [base, ours], [page]), "4 dataloader workers") == "FAIL"
    ours.update(peak_memory_per_sample_bytes=0.5 * 2**30, tokens_per_cpu_s=140.0, loader_img_per_cpu_s=2.0)
    rows = targets(meta, [base, ours], [dict(page, phi3v_fast_ms=29.0, fast_speedup_per_core=60 / 29)])
    for prefix in ("full: peak training memory", "full: non-padding", "preprocessing page, num_crops 16: >= 2x",
                   "4 dataloader workers"):
        assert status(rows, prefix) == "PASS", prefix
    # Fast enough but too far from the exact output: FAIL.
    rows = targets(meta, [base, ours], [dict(page, phi3v_fast_ms=29.0, fast_speedup_per_core=60 / 29,
                                             fast_max_abs_diff=0.2)])
    assert status(rows, "preprocessing page, num_crops 16: >= 2x") == "FAIL"


def test_plain_path_is_the_official_preprocessing():
    """The benchmark's baseline path is the official processor's algorithm (the reference test's copy),
    portrait pages included, so its times and the exact processor's max abs diff of 0 against it hold."""
    import random

    from PIL import Image

    from bench.preprocess import plain_preprocess
    from bench.workloads import document_page
    from test_preprocessing_reference import official_preprocess

    rng = random.Random(3)
    for (width, height), mode, num_crops in [((401, 613), "RGB", 16), ((613, 401), "L", 4), ((337, 335), "RGBA", 1),
                                             ((500, 509), "RGB", 9), ((90, 700), "P", 16)]:
        image = document_page(width, height, rng).convert(mode)
        assert torch.equal(plain_preprocess([image], num_crops), official_preprocess([image], num_crops)[0])
    noise = Image.frombytes("RGB", (150, 320), random.Random(4).randbytes(150 * 320 * 3))  # portrait
    assert torch.equal(plain_preprocess([noise], 16), official_preprocess([noise], 16)[0])


def test_baseline_costs_change_no_number(tiny_model_dir):
    """The all-slot CLIP pass and the full-vocabulary loss give phi3v's loss and gradients."""
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    samples, num_crops = make_samples("docvqa", 2, quick=True)
    batch = pad_collate([SampleDataset(samples, processor, num_crops)[i] for i in range(2)], 32000)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()

    def loss_and_grads(loss_fn):
        model.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ours, ours_grads = loss_and_grads(lambda: model(**batch).loss)
    encode_all_slots(model)
    base, base_grads = loss_and_grads(lambda: full_vocab_loss(model, batch))
    torch.testing.assert_close(base, ours, rtol=1e-5, atol=1e-6)
    assert base_grads.keys() == ours_grads.keys()
    for name, grad in ours_grads.items():
        torch.testing.assert_close(base_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_lengths_are_known_without_pixels_and_grouping_keeps_every_sample(tiny_model_dir):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    samples, num_crops = make_samples("docvqa", 7, quick=True)
    dataset = SampleDataset(samples, processor, num_crops)
    assert [len(dataset[i]["input_ids"]) for i in range(7)] == dataset.lengths
    batches = length_grouped_batches(dataset.lengths, 3)
    assert sorted(i for b in batches for i in b) == list(range(7)) and [len(b) for b in batches][0] == 3
    assert max(dataset.lengths[i] for i in batches[0]) == max(dataset.lengths)  # longest first


def test_flops_model_matches_the_published_parameter_counts():
    arch = Architecture.from_config(model_config("full"))
    language = arch.decoder_params + 2 * arch.hidden * arch.vocab  # + norms (a few 100k)
    assert abs(language - 3_821_079_552) / 3_821_079_552 < 1e-4
    clip_all_layers = 24 * arch.vision_layer_params + arch.patch_params
    assert abs(clip_all_layers - 303_507_456) / 303_507_456 < 5e-3  # + biases, norms, positions
    assert arch.vision_layers_used == 23
    with torch.device("meta"):
        assert sum(p.numel() for p in phi3v.Phi3VForCausalLM(model_config("full")).parameters()) == 4_146_621_440
    # One crop through 23 CLIP layers, trained: about 6 x 290M x 577 FLOPs.
    assert 0.95e12 < arch.crop_flops("full") < 1.15e12
    stats = dict(lengths=[2000, 2400], supervised=10, real_crops=30, slots=34, image_tokens=4000, packed=False,
                 all_slots=True, full_vocab_loss=True, attn="sdpa")
    useful = arch.step_flops("full", **batch_counts(stats, executed=False))
    executed = arch.step_flops("full", **batch_counts(stats, executed=True))
    assert executed > useful  # padding, padding crops, full-vocabulary logits, masked attention
    assert batch_counts({**stats, "attn": "flash_attention_2"}, executed=True)["length_squared"] == 2000**2 + 2400**2


def test_packed_sdpa_runs_each_sample_alone_and_matches_the_masked_path(tiny_model_dir, monkeypatch):
    """The bench's packed rows (sdpa): attention per sample, no L x L mask, the loss of eager's masked row."""
    import phi3v.packing

    torch.manual_seed(0)
    lengths = [37, 5, 60]
    examples = [{"input_ids": torch.randint(0, 32000, (n,)), "labels": torch.randint(0, 32000, (n,))} for n in lengths]
    packed = phi3v.pack_examples(examples)
    assert packed["cu_seq_lens_q"].tolist() == [0, 37, 42, 102]
    calls = []
    original = phi3v.packing.sdpa_attention_forward

    def recording(module, query, key, value, attention_mask, **kwargs):
        calls.append((query.shape[2], attention_mask is None))
        return original(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(phi3v.packing, "sdpa_attention_forward", recording)
    losses = {}
    for attn in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn).train()
        losses[attn] = model(**packed).loss
    decoder_calls = [c for c in calls if c[0] != 577]  # CLIP's anchor pass on 577 positions, untouched
    assert decoder_calls == [(n, True) for _ in range(model.config.num_hidden_layers) for n in lengths]
    torch.testing.assert_close(losses["sdpa"], losses["eager"], rtol=1e-5, atol=1e-6)
    calls.clear()  # without cu_seq_lens (a padded batch) it is transformers' sdpa, mask and all
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").train()
    attention_mask = torch.tensor([[1] * n + [0] * (60 - n) for n in lengths])
    model(input_ids=torch.stack([torch.nn.functional.pad(e["input_ids"], (0, 60 - len(e["input_ids"])))
                                 for e in examples]), attention_mask=attention_mask)
    assert {c for c in calls if c[0] != 577} == {(60, False)}


def test_vs_official_ours_only_measures_and_draws_growth(tmp_path):
    """`bench.vs_official` without the official code (a user without the second Python): the project's
    side runs in its own process on the four pages and on 1 and 2 pages per sample, and the growth plot
    is drawn. The official side is covered by the next test where that environment exists."""
    from bench.vs_official import main

    common = ["--ours_only", "--model_size", "tiny", "--page_scale", "0.2", "--num_crops", "4",
              "--output_dir", str(tmp_path)]
    assert main([*common, "--preprocess_repeats", "1"]) == 0
    result = json.loads((tmp_path / "compare.json").read_text())
    ours = result["ours"]
    assert result["official"] is None and "Official side not run" in result["markdown"]
    assert len(ours["steps"]) == 4 and set(ours["preprocess_ms"]) == {
        "page_340x440", "page_248x351", "page_170x220", "page_320x180"}
    assert all(s["loss"] > 0 and s["grad_norms"]["total"] > 0 and s["grad_norms"]["vision"] > 0 for s in ours["steps"])
    assert ours["training_memory_bytes"] > 0 and ours["tokens_per_cpu_s"] > 0
    assert ours["memory_kind"].startswith("VmHWM")
    # --preprocess_repeats 0 measures no preprocessing: the table leaves that row out
    from bench.vs_official import comparison_table

    assert any(line.startswith("| preprocessing") for line in comparison_table(ours, None))
    unmeasured = comparison_table({**ours, "preprocess_ms": None}, None)
    assert len(unmeasured) == 5 and not any(line.startswith("| preprocessing") for line in unmeasured)

    # Without checkpointing (the speed when nothing is recomputed): the same losses and gradients
    assert main([*common, "--preprocess_repeats", "0", "--ours_without_checkpointing",
                 "--output_dir", str(tmp_path / "no_checkpointing")]) == 0
    plain = json.loads((tmp_path / "no_checkpointing" / "compare.json").read_text())
    assert ours["gradient_checkpointing"] and not plain["ours"]["gradient_checkpointing"]
    assert "without gradient checkpointing" in plain["markdown"]
    for checkpointed, recorded in zip(ours["steps"], plain["ours"]["steps"]):
        assert recorded["loss"] == pytest.approx(checkpointed["loss"], rel=1e-6)
        assert recorded["grad_norms"]["total"] == pytest.approx(checkpointed["grad_norms"]["total"], rel=1e-6)

    assert main([*common, "--growth", "1,5", "--plot", str(tmp_path / "growth.png")]) == 0
    growth = json.loads((tmp_path / "growth.json").read_text())
    one, five = growth["rows"]["ours"]
    assert (one["pages"], five["pages"]) == (1, 5) and five["tokens"] > one["tokens"]
    # past four pages the sizes repeat but the pictures do not (phi3v would encode a repeated one once)
    pages = json.loads((tmp_path / "runs" / "growth-ours-5p-0.config.json").read_text())["samples"][0]["pages"]
    assert len(set(pages)) == 5 and Path(pages[4]).name == "page_340x440_1.png"
    assert Image.open(pages[4]).size == Image.open(pages[0]).size
    assert not np.array_equal(np.asarray(Image.open(pages[4])), np.asarray(Image.open(pages[0])))
    assert "ours_memory_fit" in growth and (tmp_path / "growth.png").stat().st_size > 10_000


@pytest.mark.skipif(not (os.environ.get("PHI3V_OFFICIAL_CODE") and os.environ.get("PHI3V_OFFICIAL_PYTHON")),
                    reason="set PHI3V_OFFICIAL_CODE (the three official .py files) and PHI3V_OFFICIAL_PYTHON "
                           "(scripts/setup_official_env.sh) to compare with the official code")
def test_vs_official_same_losses_and_gradients_as_the_official_code(tmp_path):
    from bench.vs_official import main

    assert main(["--official_code", os.environ["PHI3V_OFFICIAL_CODE"], "--official_python",
                 os.environ["PHI3V_OFFICIAL_PYTHON"], "--model_size", "tiny", "--page_scale", "0.25",
                 "--num_crops", "4", "--preprocess_repeats", "1", "--output_dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "compare.json").read_text())
    assert "error" not in result["official"], result["official"].get("error")
    assert result["numerics"]["same_inputs"]
    assert result["numerics"]["max_rel_loss_diff"] <= 1e-6 and result["numerics"]["max_rel_grad_norm_diff"] <= 1e-6
    assert "EQUAL" in result["markdown"]


def test_vs_official_gradient_norms_sum_in_slices_like_whole_tensors(monkeypatch):
    """The side's float64 norms go slice by slice (so the check does not set the peak memory it
    reports); they equal the norms of whole float64 copies."""
    from bench import vs_official_side

    monkeypatch.setattr(vs_official_side, "NORM_SLICE", 7)  # several slices, one partial
    model = torch.nn.ModuleDict({"lm_head": torch.nn.Linear(5, 9), "other": torch.nn.Linear(3, 2)})
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    norms = vs_official_side.gradient_norms(model)
    expected = model["lm_head"].weight.grad.double().pow(2).sum() + model["lm_head"].bias.grad.double().pow(2).sum()
    assert norms["lm_head"] == pytest.approx(float(expected) ** 0.5, rel=1e-12)
    everything = sum(float(p.grad.double().pow(2).sum()) for p in model.parameters())
    assert norms["total"] == pytest.approx(everything**0.5, rel=1e-12)
