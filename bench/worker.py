"""Runs one benchmark configuration and writes its measurements as JSON.

    python -m bench.worker CONFIG.json RESULT.json

`bench.run` starts one process per configuration: the peak RSS of a process only grows, so a
fresh process is the only way to attribute CPU memory to one configuration (and it keeps CUDA
allocator state and bitsandbytes patches from leaking between runs).
"""

from __future__ import annotations

import contextlib
import io
import json
import resource
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch
from PIL import Image

import phi3v
from phi3v.tiny import ASSETS, PROCESSOR_FILES, tiny_config

from .baseline import encode_all_slots, full_vocab_loss
from .flops import Architecture, batch_counts
from .workloads import SampleDataset, length_grouped_batches, make_samples, pad_collate, sequential_batches

# Decoder / vision sizes of the model each --model_size builds (random weights, real tokenizer).
MODEL_SIZES = {
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, vision_hidden_size=32, vision_layers=2, vision_heads=2),
    "mid": dict(hidden_size=256, num_layers=4, num_heads=4, vision_hidden_size=128, vision_layers=3, vision_heads=2),
}
# Dense bf16 peak of the GPUs MFU knows about, first match in this order (SXM unless named).
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def model_config(size: str):
    if size == "full":  # the released config.json: Phi3VConfig() sizes, su RoPE, 128k context
        return phi3v.Phi3VConfig.from_dict(json.loads((ASSETS / "config.json").read_text()))
    return tiny_config(**MODEL_SIZES[size])


def prepare_model_dir(model_dir: Path, size: str, device: str, dtype: torch.dtype) -> None:
    """Save a random-weight model once; every configuration then loads the same weights."""
    if (model_dir / "config.json").exists():
        return
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # the full model is built straight on the GPU
            model = phi3v.Phi3VForCausalLM(model_config(size))
    finally:
        torch.set_default_dtype(default_dtype)
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    model.save_pretrained(tmp)
    for name in PROCESSOR_FILES:
        shutil.copy(ASSETS / name, tmp / name)
    tmp.rename(model_dir)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


def load_model(cfg: dict, dtype: torch.dtype):
    """The model as the recipes set it up for the strategy."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qlora = cfg["strategy"] == "qlora"
    kwargs = dict(dtype=dtype, attn_implementation=cfg["attn"], device_map={"": 0} if cfg["device"] == "cuda" else "cpu")
    if qlora:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(cfg["model_dir"], **kwargs)
    model.config.use_cache = False
    checkpointing = {"use_reentrant": False}
    if qlora:
        from peft import prepare_model_for_kbit_training

        phi3v.fix_4bit_cpu_gradients(model)
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg["gradient_checkpointing"], gradient_checkpointing_kwargs=checkpointing)
    elif cfg["gradient_checkpointing"]:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing)
    if cfg["strategy"] == "frozen_vision":
        model.model.vision_embed_tokens.requires_grad_(False)
    if cfg["strategy"] in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=cfg["lora_rank"], lora_alpha=cfg["lora_alpha"], lora_dropout=0.05,
                          target_modules=phi3v.lora_target_modules(model), init_lora_weights="gaussian")
        model = get_peft_model(model, lora)
    if cfg["all_slots"]:
        encode_all_slots(model)
    return model


def batch_stats(batch: dict, cfg: dict) -> dict:
    """What a micro-batch holds, for the throughput and FLOPs counts."""
    if "position_ids" in batch:  # packed: samples start where the positions restart
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["position_ids"].shape[1]]
        lengths = [b - a for a, b in zip(starts, starts[1:])]
    else:
        lengths = batch["attention_mask"].sum(1).tolist()
    sizes = batch["image_sizes"].tolist()
    return {
        "lengths": lengths,
        "supervised": int(batch["labels"][:, 1:].ne(-100).sum()),
        "images": len(sizes),
        "real_crops": sum(1 + (h // 336) * (w // 336) for h, w in sizes),
        "slots": len(sizes) * batch["pixel_values"].shape[1],
        "image_tokens": int(batch["input_ids"].lt(0).sum()),
        "packed": cfg["packed"],
        "attn": cfg["attn"],
        "all_slots": cfg["all_slots"],
        "full_vocab_loss": cfg["full_vocab_loss"],
    }


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def mixed_precision(cfg: dict):
    """bf16 autocast on a GPU, as the recipes' Trainer runs `--bf16`: the weights are already bf16 (full
    fine-tuning), but peft keeps LoRA weights in fp32 and prepare_model_for_kbit_training upcasts the
    QLoRA model's norms, embeddings and lm_head to fp32; autocast runs their matmuls in bf16 too."""
    if cfg["device"] == "cuda" and cfg["dtype"] == "bfloat16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def peak_memory_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_memory_bytes(device: str) -> int | None:
    """Memory held now (after loading the model): CUDA allocated, or the process's RSS."""
    if device == "cuda":
        return torch.cuda.memory_allocated()
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:  # not Linux
        return None
    return next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:"))


def train(model, loader, cfg: dict, warmup_batches: int):
    """Timed micro-steps: stats, data wait, compute, process CPU seconds and data CPU seconds of the
    measured ones, last loss. With cfg["measure_seconds"], measuring stops at the first micro-step
    that ends past that many seconds of measured time (a time box for short GPU leases)."""
    device = cfg["device"]
    params = [p for p in model.parameters() if p.requires_grad]
    # torch's AdamW keeps its two states in the parameters' dtype (bf16 for full fine-tuning in bf16,
    # what the recipes' Trainer does on one GPU without DeepSpeed); fused on a GPU, as the Trainer's
    # default optimizer, which also avoids the foreach path's model-sized temporaries.
    optimizer = torch.optim.AdamW(params, lr=1e-6, betas=(0.9, 0.95), eps=1e-7, weight_decay=0.0,
                                  fused=device == "cuda")
    model.train()
    stats, data_s, compute_s, cpu_s, data_cpu_s = [], [], [], [], []
    pending = 0
    batches = iter(loader)
    for step in range(len(loader)):
        start, start_cpu = time.perf_counter(), time.process_time()
        batch = next(batches)
        fetched, fetched_cpu = time.perf_counter(), time.process_time()
        info = batch_stats(batch, cfg)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with mixed_precision(cfg):
            if cfg["full_vocab_loss"]:
                loss = full_vocab_loss(model, batch)
            else:
                loss = model(**batch, num_items_in_batch=info["supervised"]).loss
        loss.backward()
        pending += len(info["lengths"])
        synchronize(device)  # the time box below reads the clock
        measured = sum(data_s) + sum(compute_s) + time.perf_counter() - start
        last = step == len(loader) - 1 or bool(
            step >= warmup_batches and cfg.get("measure_seconds") and measured >= cfg["measure_seconds"])
        # The optimizer steps every samples_per_update samples (gradient accumulation, as the
        # recipes do), and once at the end of the warm-up so its state exists before measuring.
        if pending >= cfg["samples_per_update"] or step == warmup_batches - 1 or last:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            pending = 0
        synchronize(device)
        done = time.perf_counter()
        if step >= warmup_batches:
            stats.append(info)
            data_s.append(fetched - start)
            compute_s.append(done - fetched)
            cpu_s.append(time.process_time() - start_cpu)
            data_cpu_s.append(fetched_cpu - start_cpu)
        if last:
            break
    return stats, data_s, compute_s, cpu_s, data_cpu_s, float(loss.detach())


def generation_speed(model, processor, samples, cfg: dict) -> tuple[float, float]:
    """Greedy generation of max_new_tokens per eval prompt, batched left-padded or one at a time.

    Returns generations per second (wall) and process CPU seconds per generation. With
    cfg["eval_seconds"], no further generate call starts once that many seconds have passed (the
    rates count the prompts generated)."""
    model.eval()
    images = [[Image.open(io.BytesIO(data)) for data in s.images] for s in samples]
    prompts = [s.prompt for s in samples]
    processor.tokenizer.padding_side = "left"
    if cfg["eval_batched"]:
        size = cfg["eval_batch_size"]
        inputs = [processor(text=prompts[i : i + size], images=images[i : i + size], padding=True,
                            num_crops=cfg["num_crops"]) for i in range(0, len(prompts), size)]
    else:
        inputs = [processor(p, imgs, num_crops=cfg["num_crops"]) for p, imgs in zip(prompts, images)]
    inputs = [{k: v.to(cfg["device"]) for k, v in x.items()} for x in inputs]
    n = cfg["max_new_tokens"]
    kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id,
                  eos_token_id=[32007, 32000], use_cache=True)
    done = 0
    with torch.no_grad(), mixed_precision(cfg):
        model.generate(**inputs[0], **{**kwargs, "max_new_tokens": 1, "min_new_tokens": 1})  # warm-up
        synchronize(cfg["device"])
        start, start_cpu = time.perf_counter(), time.process_time()
        for x in inputs:
            model.generate(**x, **kwargs)
            done += len(x["input_ids"])
            if cfg.get("eval_seconds") and time.perf_counter() - start >= cfg["eval_seconds"]:
                break
        synchronize(cfg["device"])
    return done / (time.perf_counter() - start), (time.process_time() - start_cpu) / done


def run(cfg: dict) -> dict:
    from torch.utils.data import DataLoader
    from transformers import AutoProcessor

    device = cfg["device"]
    dtype = getattr(torch, cfg["dtype"])
    torch.manual_seed(cfg["seed"])
    if cfg.get("cpu_threads"):
        torch.set_num_threads(cfg["cpu_threads"])
    prepare_model_dir(Path(cfg["model_dir"]), cfg["model_size"], device, dtype)
    processor = AutoProcessor.from_pretrained(cfg["model_dir"], resize_backend=cfg.get("resize_backend", "pil"))

    # The same samples for every configuration; warm-up samples come first and are not measured.
    warmup, measured = cfg["warmup_samples"], cfg["samples"]
    samples, num_crops = make_samples(cfg["workload"], warmup + measured + cfg["eval_samples"], cfg["seed"], cfg["quick"])
    cfg["num_crops"] = num_crops
    eval_samples, samples = samples[warmup + measured :], samples[: warmup + measured]
    dataset = SampleDataset(samples, processor, num_crops)
    plan = []
    for first, count in ((0, warmup), (warmup, measured)):
        if cfg["group_by_length"]:
            groups = length_grouped_batches(dataset.lengths[first : first + count], cfg["batch_size"], cfg["seed"])
        else:
            groups = sequential_batches(count, cfg["batch_size"])
        plan.append([[first + i for i in group] for group in groups])
    pad_id = processor.tokenizer.pad_token_id
    collate = phi3v.pack_examples if cfg["packed"] else (lambda examples: pad_collate(examples, pad_id))
    loader = DataLoader(dataset, batch_sampler=plan[0] + plan[1], collate_fn=collate, num_workers=cfg["num_workers"],
                        pin_memory=device == "cuda", persistent_workers=False)

    model = load_model(cfg, dtype)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    loaded_memory = current_memory_bytes(device)
    load_done = time.perf_counter()
    stats, data_s, compute_s, cpu_s, data_cpu_s, loss = train(model, loader, cfg, warmup_batches=len(plan[0]))
    train_wall = time.perf_counter() - load_done
    peak = peak_memory_bytes(device)

    seconds = sum(data_s) + sum(compute_s)
    run_arch = Architecture.from_config(model_config(cfg["model_size"]))
    full_arch = Architecture.from_config(model_config("full"))
    strategy = cfg["strategy"]
    useful = sum(run_arch.step_flops(strategy, **batch_counts(s, executed=False)) for s in stats)
    # The full-size architecture runs on a GPU with flash_attention_2 (each sample's own causal block,
    # also in padded and packed batches); this run's backend may compute more attention than that.
    executed_full = sum(full_arch.step_flops(strategy, **batch_counts(s, executed=True, attn="flash_attention_2"))
                        for s in stats)
    executed_run = sum(run_arch.step_flops(strategy, **batch_counts(s, executed=True)) for s in stats)
    n_samples = sum(len(s["lengths"]) for s in stats)
    per_micro_batch = max(len(s["lengths"]) for s in stats)
    images = sum(s["images"] for s in stats)
    real_tokens = sum(sum(s["lengths"]) for s in stats)
    computed_tokens = sum(batch_counts(s, executed=True)["tokens"] for s in stats)
    result = {
        **cfg,
        "measured_samples": n_samples,
        "micro_steps": len(stats),
        "seconds": seconds,
        "train_wall_seconds": train_wall,
        "samples_per_s": n_samples / seconds,
        "img_per_s": images / seconds,
        "tokens_per_s": real_tokens / seconds,
        # Non-padding tokens per second of process CPU time: with one torch thread, per core, and
        # much less moved by other jobs on a shared machine than wall-clock rates.
        "tokens_per_cpu_s": real_tokens / sum(cpu_s),
        "mean_tokens_per_sample": real_tokens / n_samples,
        "padding_fraction": 1 - real_tokens / computed_tokens,
        "real_crops_per_s": sum(s["real_crops"] for s in stats) / seconds,
        "encoded_crops_per_s": sum(s["slots" if cfg["all_slots"] else "real_crops"] for s in stats) / seconds,
        "data_wait_fraction": sum(data_s) / seconds,
        # With num_workers=0 the main process decodes, transforms and tokenizes: its CPU time per
        # image is what one dataloader worker spends per image.
        "loader_img_per_cpu_s": images / sum(data_cpu_s) if cfg["num_workers"] == 0 and sum(data_cpu_s) else None,
        "step_seconds": seconds / len(stats),
        # On a shared CPU machine the process's CPU time per sample moves less with other jobs than
        # wall time does (with one thread it is the per-core cost).
        "cpu_seconds_per_sample": sum(cpu_s) / n_samples,
        "torch_threads": torch.get_num_threads(),
        "peak_memory_bytes": peak,
        "samples_per_micro_batch": per_micro_batch,
        "peak_memory_per_sample_bytes": peak / per_micro_batch,
        "loaded_memory_bytes": loaded_memory,
        # What training adds to the loaded model (activations, gradients, optimizer state), per sample.
        "training_memory_per_sample_bytes": None if loaded_memory is None else (peak - loaded_memory) / per_micro_batch,
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if device == "cuda" else "peak RSS (ru_maxrss)",
        # What the caching allocator held at its peak: what nvidia-smi would show, fragmentation included.
        "peak_reserved_bytes": torch.cuda.max_memory_reserved() if device == "cuda" else None,
        "model_tflops_per_s": useful / seconds / 1e12,
        "useful_tflops_per_sample_full_arch": sum(
            full_arch.step_flops(strategy, **batch_counts(s, executed=False)) for s in stats) / n_samples / 1e12,
        "executed_tflops_per_sample_full_arch": executed_full / n_samples / 1e12,
        "executed_tflops_per_sample_this_run": executed_run / n_samples / 1e12,
        "last_loss": loss,
    }
    peak_flops = cfg.get("peak_tflops") and cfg["peak_tflops"] * 1e12
    if device == "cuda" and not peak_flops:
        name = torch.cuda.get_device_name()
        peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        result["gpu"] = name
    result["mfu"] = useful / seconds / peak_flops if device == "cuda" and peak_flops else None
    if cfg["eval_samples"]:
        result["eval_generations_per_s"], result["eval_cpu_seconds_per_generation"] = generation_speed(
            model, processor, eval_samples, cfg)
        if cfg.get("eval_one_at_a_time_too"):  # the speed-up of batching on the same model and prompts
            one = {**cfg, "eval_batched": False}
            result["eval_one_at_a_time_generations_per_s"], result["eval_one_at_a_time_cpu_seconds_per_generation"] = (
                generation_speed(model, processor, eval_samples, one))
    return result


def main(argv=None):
    config_path, result_path = (argv or sys.argv[1:])[:2]
    cfg = json.loads(Path(config_path).read_text())
    try:
        result = run(cfg)
    except torch.cuda.OutOfMemoryError as error:  # a finding, not a crash: record it
        result = {**cfg, "error": f"out of memory: {str(error).splitlines()[0]}"}
    except Exception:
        result = {**cfg, "error": traceback.format_exc(limit=8)}
    Path(result_path).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
