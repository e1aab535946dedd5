"""One side of `bench.vs_official`, in its own fresh process: the project's model, or Microsoft's.

    python -m bench.vs_official_side CONFIG.json RESULT.json

The "official" side runs under the Python the user points at (transformers 4.4x with the model's
remote code, loaded with trust_remote_code from a folder holding the checkpoint and the official
.py files), so this module imports neither phi3v nor anything that needs transformers 5; the
project's side imports phi3v only inside `load_ours`.

Both sides do exactly the same things in the same order: build every sample with their own
processor (prompt with the page tags, answer tokens appended, labels on the answer only), time the
image processor per page, load the model, reset the peak-memory mark, then run forward with
labels and backward per sample (batch 1, gradient checkpointing on, no optimizer step so both sides
see the same weights at every step), recording loss, gradient norms, wall and CPU time.

Peak memory is measured the same way on both sides: on CPU the process's resident set size, with
its high-water mark reset (`/proc/self/clear_refs`, value 5) once the model is loaded, so the
increase is VmHWM after training minus VmRSS after loading; on CUDA torch.cuda.max_memory_allocated
after reset_peak_memory_stats, minus memory_allocated after loading.
"""

from __future__ import annotations

import gc
import hashlib
import json
import resource
import sys
import time
import traceback
from pathlib import Path

import torch
from PIL import Image

from .timing import cpu_seconds_per_call

ANSWER_SUFFIX = "<|end|>\n<|endoftext|>"
# CLIPVisionConfig fields the official code's hard-wired CLIP-L/336 config is rebuilt from when
# the checkpoint's vision tower is smaller (see `load_official`).
CLIP_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act",
               "image_size", "patch_size", "layer_norm_eps", "attention_dropout", "dropout", "num_channels",
               "projection_dim", "initializer_range", "initializer_factor")


def proc_status_bytes(field: str) -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    return next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith(field + ":")), None)


class PeakMemory:
    """Training memory above the loaded model, the same way on both sides (see the module doc)."""

    def __init__(self, device: str):
        self.device = device
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.kind = "torch.cuda.max_memory_allocated - memory_allocated after loading"
            self.baseline = torch.cuda.memory_allocated()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.kind = "VmHWM (reset after loading) - VmRSS after loading"
            self.baseline = proc_status_bytes("VmRSS")
        except OSError:  # not Linux: the peak since the process started
            self.kind = "ru_maxrss - VmRSS after loading (peak not resettable here)"
            self.baseline = proc_status_bytes("VmRSS") or 0

    def peak(self) -> int:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        if self.kind.startswith("VmHWM"):
            return proc_status_bytes("VmHWM")
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load_ours(cfg: dict):
    import phi3v  # noqa: F401  (registers the project's classes with the Auto* factories)
    from transformers import AutoProcessor

    from .worker import load_model

    processor = AutoProcessor.from_pretrained(cfg["model_dir"])

    def model_loader():
        run = dict(strategy="full", attn=cfg["attn"], device=cfg["device"], model_dir=cfg["model_dir"],
                   gradient_checkpointing=cfg.get("gradient_checkpointing", True), all_slots=False)
        return load_model(run, getattr(torch, cfg["dtype"]))

    def image_processor(image):
        return processor.image_processor([image], num_crops=cfg["num_crops"])

    def process(prompt, images):
        return processor(prompt, images, num_crops=cfg["num_crops"])

    return processor.tokenizer, process, image_processor, model_loader


def load_official(cfg: dict):
    from transformers import AutoConfig, AutoProcessor, CLIPVisionConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    model_dir = cfg["model_dir"]
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True, num_crops=cfg["num_crops"])

    def model_loader():
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
        model_class = get_class_from_dynamic_module(config.auto_map["AutoModelForCausalLM"], model_dir)
        vision = getattr(config, "vision_config", None)
        if vision:
            # The official code always builds CLIP ViT-L/14-336 from a module-level config; a smaller
            # checkpoint's tower is described by the config.json's vision_config.
            remote = sys.modules[model_class.__module__]
            remote.CLIP_VIT_LARGE_PATCH14_336_CONFIG = CLIPVisionConfig(
                **{k: vision[k] for k in CLIP_FIELDS if k in vision})
        model = model_class.from_pretrained(
            model_dir, config=config, torch_dtype=getattr(torch, cfg["dtype"]), attn_implementation=cfg["attn"],
            device_map={"": 0} if cfg["device"] == "cuda" else None)
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    def image_processor(image):
        return processor.image_processor([image], return_tensors="pt")

    def process(prompt, images):
        return processor(prompt, images, return_tensors="pt")

    return processor.tokenizer, process, image_processor, model_loader


def build_batch(tokenizer, process, sample: dict, images: list) -> dict:
    """input_ids = processed prompt + answer tokens; labels on the answer only (the recipes' layout)."""
    inputs = process(sample["prompt"], images)
    prompt_ids = inputs["input_ids"][0]
    answer = torch.tensor(tokenizer(sample["answer"] + ANSWER_SUFFIX, add_special_tokens=False).input_ids)
    input_ids = torch.cat([prompt_ids, answer])[None]
    labels = torch.cat([torch.full_like(prompt_ids, -100), answer])[None]
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": inputs["pixel_values"],
        "image_sizes": torch.as_tensor(inputs["image_sizes"]),
        "labels": labels,
    }


def batch_fingerprint(batch: dict) -> str:
    """Equal on both sides only if the two processors produced the same ids and the same pixels."""
    digest = hashlib.sha256()
    for key in ("input_ids", "labels", "image_sizes", "pixel_values"):
        digest.update(batch[key].contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


GRADIENT_GROUPS = {
    "embed_tokens": "model.embed_tokens.",
    "vision": "model.vision_embed_tokens.",
    "decoder": "model.layers.",
    "final_norm": "model.norm.",
    "lm_head": "lm_head.",
}


# Elements per float64 slice when summing squared gradients (8 MB): a float64 copy of a whole
# 32064 x 512 gradient and its square (260 MB) would otherwise set the peak memory the benchmark
# reports, on both sides, instead of the training step.
NORM_SLICE = 1 << 20


def gradient_norms(model) -> dict:
    """L2 norms (float64 sums, slice by slice) of all gradients and per part of the model."""
    sums = {name: 0.0 for name in GRADIENT_GROUPS}
    total = 0.0
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        square = sum(float(part.double().pow(2).sum()) for part in param.grad.detach().reshape(-1).split(NORM_SLICE))
        total += square
        for group, prefix in GRADIENT_GROUPS.items():
            if name.startswith(prefix):
                sums[group] += square
    return {"total": total**0.5, **{k: v**0.5 for k, v in sums.items()}}


def run(cfg: dict) -> dict:
    device = cfg["device"]
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    tokenizer, process, image_processor, model_loader = (load_ours if cfg["side"] == "ours" else load_official)(cfg)

    pages = {}
    for sample in cfg["samples"]:
        for path in sample["pages"]:
            if path not in pages:
                with Image.open(path) as image:
                    pages[path] = image.convert("RGB")
    batches = [build_batch(tokenizer, process, s, [pages[p] for p in s["pages"]]) for s in cfg["samples"]]

    preprocess_ms = None
    if cfg["preprocess_repeats"]:
        # The exact image processor on one page at a time; the thread count is the run's (--threads).
        best = cpu_seconds_per_call({path: (lambda image=image: image_processor(image)) for path, image in pages.items()},
                                    cfg["preprocess_repeats"])
        preprocess_ms = {Path(path).stem: 1000 * seconds for path, seconds in best.items()}

    model = model_loader()
    model.train()
    gc.collect()
    memory = PeakMemory(device)

    steps = []
    order = ([0] if cfg["warmup"] else []) + list(range(len(batches)))
    for position, index in enumerate(order):
        batch = {k: v.to(device) for k, v in batches[index].items()}
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        loss = model(**batch).loss
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
        norms = gradient_norms(model)
        model.zero_grad(set_to_none=True)
        if cfg["warmup"] and position == 0:
            continue
        steps.append({"sample": index, "tokens": int(batch["input_ids"].shape[1]), "loss": float(loss.detach()),
                      "grad_norms": norms, "wall_s": wall, "cpu_s": cpu,
                      "fingerprint": batch_fingerprint(batches[index])})
        del loss, batch
    peak = memory.peak()
    tokens = sum(s["tokens"] for s in steps)
    import transformers

    return {
        "side": cfg["side"],
        "attn": cfg["attn"],
        "gradient_checkpointing": cfg.get("gradient_checkpointing", True),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "steps": steps,
        "tokens": tokens,
        "wall_s": sum(s["wall_s"] for s in steps),
        "cpu_s": sum(s["cpu_s"] for s in steps),
        "tokens_per_s": tokens / sum(s["wall_s"] for s in steps),
        "tokens_per_cpu_s": tokens / sum(s["cpu_s"] for s in steps),
        "preprocess_ms": preprocess_ms,
        "loaded_memory_bytes": memory.baseline,
        "peak_memory_bytes": peak,
        "training_memory_bytes": peak - memory.baseline,
        "memory_kind": memory.kind,
    }


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    config_path, result_path = Path(argv[0]), Path(argv[1])
    cfg = json.loads(config_path.read_text())
    try:
        result = run(cfg)
    except Exception:
        traceback.print_exc()
        result = {"side": cfg["side"], "error": traceback.format_exc()[-3000:]}
    result_path.write_text(json.dumps(result, indent=2))
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
