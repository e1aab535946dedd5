"""Training throughput and memory of Phi-3.5-vision fine-tuning: the original recipe against phi3v.

    python -m bench.run --device cuda --workload docvqa            # full-size model, random weights
    python -m bench.run --device cuda --short                       # the same, about 5 minutes (see SHORT)
    python -m bench.run --device cpu --attn sdpa                    # mid-size model, all strategies
    python -m bench.run --device cpu --strategies lora --attn sdpa  # one strategy
    python -m bench.run --quick                                     # smoke test, tiny model

For every training strategy (full, frozen_vision, lora, qlora) and attention backend (sdpa, eager,
flash_attention_2 when installed) it runs two configurations, each in a fresh process:

* baseline, the original recipe's behaviour: one sample per micro-batch, CLIP on all num_crops + 1
  slots (padding crops included), fp32 logits of the whole vocabulary at every position for the
  loss, generation one prompt at a time;
* ours: micro-batches of --batch_size samples grouped by length (known from the image sizes, without
  decoding pixels), packed into one padding-free row with flash_attention_2 and sdpa (see --packing), CLIP on
  the real crops only, logits of the supervised positions only, batched left-padded generation, and
  the image processor's fast resize (resize_backend="torch", within one uint8 level of PIL's).

Then, for the first strategy and backend, each lever alone on top of the baseline (+batching,
+real crops only, +supervised-only loss, +packing), with the training FLOPs each removes per sample
for the full-size architecture. Also the image processor's per-core speed, exact and fast
(bench.preprocess).

It measures images/s, non-padding tokens/s (and, on CPU, per CPU-second: with one torch thread a
per-core rate that other jobs on a shared machine move much less than wall time), CLIP crops/s, the
share of step time spent waiting for data, peak memory (torch.cuda.max_memory_allocated, or the
process's peak RSS on CPU) in total and per sample of a micro-batch, generations/s, what one
dataloader worker delivers per CPU-second, and, on GPU, MFU counting decoder and CLIP FLOPs
(bench.flops). It ends with the issue's targets, each marked PASS or FAIL from these numbers (GPU-only
targets read "not measured" on CPU). Writes results.json and results.md to --output_dir and prints
the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

STRATEGIES = ("full", "frozen_vision", "lora", "qlora")
BASELINE = dict(batch_size=1, group_by_length=False, packed=False, all_slots=True, full_vocab_loss=True,
                eval_batched=False, resize_backend="pil")
LEVERS = {  # each on its own, on top of the baseline; batch_size None means --batch_size
    "+batching": dict(batch_size=None, group_by_length=True),
    "+real crops only": dict(all_slots=False),
    "+supervised-only loss": dict(full_vocab_loss=False),
    "+packing": dict(batch_size=None, packed=True),
}
OURS = dict(batch_size=None, group_by_length=True, packed=None, all_slots=False, full_vocab_loss=False,
            eval_batched=True, resize_backend="torch")  # packed None: --packing decides
REPO = Path(__file__).resolve().parents[1]
# --short: one pass that fits a few minutes of a lent GPU (under 8 minutes on an H100, model build
# included): `ours` for full fine-tuning, LoRA and QLoRA with one attention backend, each in its own
# process after one warm-up micro-step; the first strategy's run also generates one prompt at a time
# on the same model and prompts, for batched evaluation's speed-up. Every part is time-boxed.
SHORT = dict(
    strategies=("full", "lora", "qlora"),
    steps=4,  # planned measured micro-steps; measuring stops earlier past measure_seconds
    measure_seconds=30,
    eval_seconds=45,  # per evaluation mode: one at a time stops starting prompts after this
    total_seconds=450,  # every configuration's timeout is cut to what is left of this
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    add("--workload", choices=["docvqa", "video"], default="docvqa")
    add("--strategies", default=",".join(STRATEGIES), help="comma-separated subset of " + ",".join(STRATEGIES))
    add("--attn", help="comma-separated backends (default: sdpa,eager, plus flash_attention_2 on GPU when installed)")
    add("--mode", choices=["both", "baseline", "ours"], default="both")
    add("--no_ablation", action="store_true", help="skip the one-lever-at-a-time rows")
    add("--steps", type=int, help="measured micro-steps of `ours`; every configuration trains on the same "
                                  "steps x batch_size samples (default: 2 on CPU, 5 on GPU)")
    add("--warmup_steps", type=int, default=1, help="unmeasured micro-steps of `ours` (same rule)")
    add("--batch_size", type=int, help="samples per micro-batch for `ours` (default: 2 on CPU, 8 on GPU)")
    add("--packing", choices=["auto", "on", "off"], default="auto",
        help="pack `ours` micro-batches into one padding-free row: auto = with flash_attention_2 and sdpa, "
             "which compute each packed sample's own causal block (eager computes the row's whole masked "
             "L x L matrix, so there length-grouped padded batches are cheaper)")
    add("--samples_per_update", type=int, default=8, help="samples per optimizer step (gradient accumulation)")
    add("--eval_samples", type=int, help="prompts generated for eval generations/s (default: 4 on CPU, 16 on GPU)")
    add("--eval_batch_size", type=int, help="prompts per batched generate call (default: all of them)")
    add("--max_new_tokens", type=int, help="tokens generated per prompt (default: 8 on CPU, 32 on GPU)")
    add("--model_size", choices=["tiny", "mid", "full"], help="default: full on GPU, mid on CPU, tiny with --quick")
    add("--dtype", choices=["bfloat16", "float32"], help="default: bfloat16 on GPU, float32 on CPU")
    add("--num_workers", type=int, help="DataLoader workers (default: 8 on GPU, 0 on CPU)")
    add("--cpu_threads", type=int, help="torch threads per configuration (default: 1 on CPU, torch's choice on GPU); "
                                        "1 makes CPU-seconds per sample a per-core cost, steadier on a shared machine")
    add("--no_gradient_checkpointing", action="store_true", help="the recipes checkpoint; this turns it off")
    add("--lora_rank", type=int, default=32)
    add("--lora_alpha", type=int, default=16)
    add("--peak_tflops", type=float, help="accelerator peak for MFU (default: known from the GPU name)")
    add("--quick", action="store_true", help="tiny model, tiny images, few steps: a smoke test")
    add("--short", action="store_true",
        help="under 8 minutes on one H100: `ours` only, full/lora/qlora (or --strategies), one attention backend "
             "(flash_attention_2 when installed, else sdpa), time-boxed steps, batched vs one-at-a-time evaluation "
             "in the first strategy's run; no ablation, no preprocessing table")
    add("--no_preprocess", action="store_true", help="skip the image processor measurement")
    add("--output_dir", default="outputs/bench")
    add("--timeout", type=int, default=3600, help="seconds allowed per configuration")
    add("--seed", type=int, default=0)
    args = p.parse_args(argv)

    gpu, quick = args.device == "cuda", args.quick
    if args.short:
        args.mode, args.no_ablation, args.no_preprocess = "ours", True, True
        if args.strategies == p.get_default("strategies"):
            args.strategies = ",".join(SHORT["strategies"])
        if args.attn is None:
            from transformers.utils import is_flash_attn_2_available

            args.attn = "flash_attention_2" if gpu and is_flash_attn_2_available() else "sdpa"
    defaults = dict(
        steps=2 if quick else (SHORT["steps"] if args.short else 5 if gpu else 2),
        batch_size=2 if quick or not gpu else 8,
        eval_samples=2 if quick else (16 if gpu else 4),
        max_new_tokens=2 if quick else (32 if gpu else 8),
        model_size="tiny" if quick else ("full" if gpu else "mid"),
        dtype="bfloat16" if gpu else "float32",
        num_workers=8 if gpu else 0,
        cpu_threads=None if gpu else 1,
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.eval_batch_size = args.eval_batch_size or args.eval_samples
    args.strategies = [s for s in args.strategies.split(",") if s]
    if unknown := set(args.strategies) - set(STRATEGIES):
        p.error(f"unknown strategies {sorted(unknown)}")
    if args.attn is None:
        from transformers.utils import is_flash_attn_2_available

        args.attn = "sdpa,eager" + (",flash_attention_2" if gpu and is_flash_attn_2_available() else "")
    args.attn = [a for a in args.attn.split(",") if a]
    if gpu and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no GPU")
    return args


def plan_runs(args) -> list[dict]:
    common = dict(
        device=args.device, dtype=args.dtype, model_size=args.model_size, workload=args.workload, quick=args.quick,
        samples=args.steps * args.batch_size, warmup_samples=args.warmup_steps * args.batch_size,
        samples_per_update=args.samples_per_update, eval_batch_size=args.eval_batch_size,
        max_new_tokens=args.max_new_tokens, num_workers=args.num_workers,
        gradient_checkpointing=not args.no_gradient_checkpointing, lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha, peak_tflops=args.peak_tflops, seed=args.seed, cpu_threads=args.cpu_threads,
        model_dir=str(Path(args.output_dir).resolve() / f"model-{args.model_size}"),
    )
    if args.short:
        common.update(measure_seconds=SHORT["measure_seconds"], eval_seconds=SHORT["eval_seconds"])
    runs = []

    def add(label, strategy, attn, settings, eval_samples):
        settings = {**settings, "batch_size": settings["batch_size"] or args.batch_size}
        if settings["packed"] is None:
            settings["packed"] = args.packing == "on" or (args.packing == "auto" and attn != "eager")
        runs.append({**common, **settings, "label": label, "strategy": strategy, "attn": attn,
                     "eval_samples": eval_samples, "name": f"{args.workload}-{strategy}-{attn}-{label}"})

    modes = ["baseline", "ours"] if args.mode == "both" else [args.mode]
    for strategy in args.strategies:
        for attn in args.attn:
            for mode in modes:
                first = strategy == args.strategies[0] and attn == args.attn[0]
                add(mode, strategy, attn, BASELINE if mode == "baseline" else OURS,
                    args.eval_samples if first or not args.short else 0)
                runs[-1]["eval_one_at_a_time_too"] = args.short and first
    if args.mode == "both" and not args.no_ablation:
        for label, lever in LEVERS.items():
            add(label, args.strategies[0], args.attn[0], {**BASELINE, **lever}, 0)
    return runs


def run_in_subprocess(module: str, argv: list[str], log: Path, timeout: int) -> int:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    with open(log, "w") as out:
        try:
            return subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            out.write(f"\ntimed out after {timeout} s\n")
            return -1


def smaller_batch(cfg: dict, args) -> dict | None:
    """The configuration with half the micro-batch (same number of micro-steps), or None at batch 1."""
    if cfg["batch_size"] == 1:
        return None
    size = cfg["batch_size"] // 2
    return {**cfg, "batch_size": size, "samples": args.steps * size, "warmup_samples": args.warmup_steps * size,
            "name": f"{cfg['name']}-batch{size}"}


def run_config(cfg: dict, out_dir: Path, timeout: int) -> dict:
    runs_dir = out_dir / "runs"
    config_path, result_path = runs_dir / f"{cfg['name']}.config.json", runs_dir / f"{cfg['name']}.json"
    config_path.write_text(json.dumps(cfg, indent=2))
    result_path.unlink(missing_ok=True)
    log = runs_dir / f"{cfg['name']}.log"
    code = run_in_subprocess("bench.worker", [str(config_path), str(result_path)], log, timeout)
    if result_path.exists():
        return json.loads(result_path.read_text())
    tail = log.read_text()[-2000:] if log.exists() else ""
    return {**cfg, "error": f"worker exited with {code}: {tail}"}


# ----------------------------------------------------------------------------------------------
# Tables


def fmt(value, digits=2):
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def gib(n):
    return None if n is None else n / 2**30


def ratio(a, b):
    return None if not a or not b else a / b


def batching(run: dict) -> str:
    size = run["batch_size"]
    return "1" if size == 1 else f"{size} {'packed' if run['packed'] else 'padded'}"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(meta: dict, results: list[dict], preprocess: list[dict] | None) -> str:
    gpu = meta["device"] == "cuda"
    out = [f"## Benchmark: {meta['workload']} on {meta['device_name']}", "",
           f"Model: {meta['model_size']} ({meta['model_params'] / 1e6:,.0f}M parameters, random weights, "
           f"{meta['dtype']}). "
           f"Samples: {meta['samples']} measured after {meta['warmup_samples']} warm-up, "
           f"{fmt(meta.get('mean_tokens_per_sample'), 0)} tokens/sample on average, num_crops {meta.get('num_crops')}. "
           f"Optimizer step every {meta['samples_per_update']} samples. "
           f"Gradient checkpointing: {'on' if meta['gradient_checkpointing'] else 'off'}. "
           f"Load average before/after: {meta['load_before']} / {meta['load_after']}."
           + ("" if gpu else " Wall-clock rates (img/s, s/step, gen/s) move with other jobs on a shared machine; "
              "CPU s/sample and CPU s/gen are the process's CPU time, steadier."), ""]
    ok = [r for r in results if "error" not in r]
    speed = "MFU %" if gpu else "model TFLOP/s"
    rows = []
    for r in results:
        if "error" in r:
            error = "error: " + r["error"].strip().splitlines()[-1][:80]
            rows.append([r["name"], batching(r), error] + [""] * (11 if gpu else 13))
            continue
        rows.append([r["name"], batching(r), r["img_per_s"], r["tokens_per_s"],
                     *([] if gpu else [r["tokens_per_cpu_s"]]), r["real_crops_per_s"],
                     r["encoded_crops_per_s"], 100 * r["data_wait_fraction"], r["step_seconds"],
                     *([] if gpu else [r["cpu_seconds_per_sample"]]),
                     gib(r["peak_memory_bytes"]), gib(r["peak_memory_per_sample_bytes"]),
                     gib(r.get("training_memory_per_sample_bytes")), r.get("eval_generations_per_s"),
                     100 * r["mfu"] if gpu and r.get("mfu") else r["model_tflops_per_s"] if not gpu else None,
                     r["executed_tflops_per_sample_full_arch"]])
    out += [table(["configuration", "batch", "img/s", "tokens/s", *([] if gpu else ["tokens/CPU-s"]), "real crops/s",
                   "CLIP crops/s", "data wait %", "s/step", *([] if gpu else ["CPU s/sample"]), "peak mem GiB",
                   "peak GiB/sample", "training GiB/sample", "eval gen/s", speed, "TFLOP/sample (full size)"], rows),
            "", "tokens: non-padding tokens. peak GiB/sample: peak memory / samples per micro-batch; training "
            "GiB/sample: the same above the memory held once the model is loaded. TFLOP/sample (full size): what "
            "the full-size architecture executes for these samples with flash_attention_2 (padding tokens, padding "
            "crops and full-vocabulary logits counted as executed work). Image processor: ours resizes with "
            "resize_backend=\"torch\" (see the preprocessing table), the baseline and the single levers with the "
            "exact \"pil\".", ""]

    by_key = {(r["strategy"], r["attn"], r["label"]): r for r in ok}
    pairs = []
    for r in ok:
        if r["label"] == "ours" and (base := by_key.get((r["strategy"], r["attn"], "baseline"))):
            cpu = [] if gpu else [base["cpu_seconds_per_sample"], r["cpu_seconds_per_sample"],
                                  ratio(base["cpu_seconds_per_sample"], r["cpu_seconds_per_sample"])]
            eval_cpu = [] if gpu else [base.get("eval_cpu_seconds_per_generation"),
                                       r.get("eval_cpu_seconds_per_generation"),
                                       ratio(base.get("eval_cpu_seconds_per_generation"),
                                             r.get("eval_cpu_seconds_per_generation"))]
            pairs.append([r["strategy"], r["attn"], base["img_per_s"], r["img_per_s"],
                          ratio(r["img_per_s"], base["img_per_s"]), *cpu,
                          gib(base["peak_memory_per_sample_bytes"]), gib(r["peak_memory_per_sample_bytes"]),
                          ratio(r["peak_memory_per_sample_bytes"], base["peak_memory_per_sample_bytes"]),
                          base.get("eval_generations_per_s"), r.get("eval_generations_per_s"),
                          ratio(r.get("eval_generations_per_s"), base.get("eval_generations_per_s")), *eval_cpu])
    if pairs:
        cpu = [] if gpu else ["CPU s/sample baseline", "CPU s/sample ours", "x"]
        eval_cpu = [] if gpu else ["CPU s/gen baseline", "CPU s/gen ours", "x"]
        out += ["Ours against the baseline (x: how many times faster):", "",
                table(["strategy", "attention", "img/s baseline", "img/s ours", "x", *cpu, "peak GiB/sample baseline",
                       "peak GiB/sample ours", "ratio", "gen/s baseline", "gen/s ours", "x", *eval_cpu], pairs), ""]

    levers = [r for r in results if r["label"] not in ("baseline", "ours")]
    if levers:
        first = levers[0]
        base = by_key.get((first["strategy"], first["attn"], "baseline"))
        ours = by_key.get((first["strategy"], first["attn"], "ours"))
        rows = []
        for r in [base, *levers, ours]:
            if r is None:
                continue
            label = "combined (ours)" if r is ours else r["label"]
            if "error" in r:
                rows.append([label, batching(r), "error"] + [""] * (5 if gpu else 7))
                continue
            flops = r["executed_tflops_per_sample_full_arch"]
            removed = base["executed_tflops_per_sample_full_arch"] - flops if base else None
            here = r["executed_tflops_per_sample_this_run"]
            cpu = [] if gpu else [r["cpu_seconds_per_sample"],
                                  ratio(base and base["cpu_seconds_per_sample"], r["cpu_seconds_per_sample"])]
            rows.append([label, batching(r), r["img_per_s"], ratio(r["img_per_s"], base and base["img_per_s"]), *cpu,
                         gib(r["peak_memory_per_sample_bytes"]), flops, removed,
                         ratio(here, base and base["executed_tflops_per_sample_this_run"])])
        out += [f"Each lever alone on the baseline ({first['strategy']}, {first['attn']}); FLOPs are analytic, for the "
                "full-size architecture with flash_attention_2 and these samples (removed: the baseline's minus the "
                "lever's; negative is work added):", "",
                table(["configuration", "batch", "img/s", "x baseline", *([] if gpu else ["CPU s/sample", "x baseline"]),
                       "peak GiB/sample", "TFLOP/sample executed", "TFLOP/sample removed",
                       f"work x baseline ({meta['model_size']}, {first['attn']})"], rows), "",
                "Batching and packing remove no FLOPs: they exist to keep a GPU busy (batching adds the padding of "
                "length-grouped rows; a packed row has none, and flash_attention_2 and phi3v's sdpa compute each "
                "sample's own causal block, so packing executes exactly the baseline's work). The last column is this "
                "run's own executed work: sdpa with a mask (padded rows) and eager compute the whole L x L score "
                "matrix of a row instead of its causal half (eager on a packed row: the whole matrix of all its "
                "samples). At the mid size attention is a large share of the work, which is why +batching costs CPU "
                "time here; that is inherent to the masked path.", ""]
    if preprocess:
        rows = [[p["image"], p["num_crops"], p["plain_ms"], p["phi3v_ms"], p["phi3v_img_per_s_per_core"],
                 p["speedup_per_core"], p["max_abs_diff"], p.get("phi3v_fast_ms"), p.get("phi3v_fast_img_per_s_per_core"),
                 p.get("fast_speedup_per_core"), fast_diff(p), p["resize_ms"], p.get("torch_resize_ms"),
                 p["speedup_bound_exact_resize"], p["png_decode_ms"]] for p in preprocess]
        out += ["Image preprocessing (HD transform and normalise), one thread (best CPU time per image); exact: "
                "phi3v's default resize_backend=\"pil\", fast: resize_backend=\"torch\":", "",
                table(["image", "num_crops", "plain path ms", "exact ms", "exact img/s/core", "x", "exact max abs diff",
                       "fast ms", "fast img/s/core", "x", "fast max abs diff vs exact (share differing)",
                       "PIL resize ms", "torch resize ms", "x bound exact", "PNG decode ms"], rows), "",
                "x: plain path time / phi3v time. The plain path is the official order (a portrait page is turned, "
                "resized, padded and turned back); PIL resize: the exact processor's bilinear resize, the same two "
                "passes in the same order without turning (two single-axis resizes for a portrait page), whose output "
                "it matches bit for bit (max abs diff against the plain path); x bound exact = plain / PIL resize, the "
                "most any exact path can gain. The fast processor resizes with torch's uint8 antialiased bilinear "
                "instead, in the same pass order (PIL's kernel, fixed point, its own rounding): one uint8 level apart "
                "on the share of values shown, 1/255/std = 0.015 after normalising (bicubic global crop: at most "
                "1.375^2 levels, 0.028). PNG decode: not in any path's time.", ""]
    return "\n".join(out)


def fast_diff(p: dict) -> str | None:
    if p.get("fast_max_abs_diff") is None:
        return None
    return f"{p['fast_max_abs_diff']:.3f} ({100 * p['fast_differing_fraction']:.3f}%)"


H100_PEAK_BF16 = 989e12  # dense bf16, SXM
FAST_RESIZE_MAX_DIFF = 0.05  # what the fast preprocessing target accepts against the exact output
TARGET_MFU = 0.45


def check(ok) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def targets(meta: dict, results: list[dict], preprocess: list[dict] | None) -> list[list]:
    """The issue's targets, each computed from this run's measurements: [target, measured, status]."""
    gpu = meta["device"] == "cuda"
    ok = [r for r in results if "error" not in r]
    by_key = {(r["strategy"], r["attn"], r["label"]): r for r in ok}
    rows = []
    for strategy in meta["strategies"]:
        attn = meta["attn"][0]
        base, ours = by_key.get((strategy, attn, "baseline")), by_key.get((strategy, attn, "ours"))
        if not ours:
            continue
        if base:
            memory = ratio(ours["peak_memory_per_sample_bytes"], base["peak_memory_per_sample_bytes"])
            rows.append([f"{strategy}: peak training memory per sample <= 0.6x baseline",
                         f"{gib(ours['peak_memory_per_sample_bytes']):.2f} GiB (batch {ours['samples_per_micro_batch']})"
                         f" / {gib(base['peak_memory_per_sample_bytes']):.2f} GiB (batch "
                         f"{base['samples_per_micro_batch']}) = {memory:.2f}x", check(memory <= 0.6)])
            key, unit = ("tokens_per_s", "tokens/s") if gpu else ("tokens_per_cpu_s", "tokens per CPU-second")
            speed = ratio(ours[key], base[key])
            rows.append([f"{strategy}: non-padding {unit} >= 1.3x baseline, both {meta['samples_per_update']} "
                         "samples per optimizer step", f"{ours[key]:.1f} / {base[key]:.1f} = {speed:.2f}x",
                         check(speed >= 1.3)])
        if gpu:
            rows.append([f"{strategy}: MFU >= 45% (full fine-tuning, full size, H100)" if strategy == "full"
                         else f"{strategy}: MFU (reported)", f"{100 * ours['mfu']:.1f}%" if ours.get("mfu") else "n/a",
                         check(ours["mfu"] >= TARGET_MFU if ours.get("mfu") and strategy == "full" else None)])
        # One at a time: the baseline's run, or (--short) the same run's model and prompts.
        base_gen = base.get("eval_generations_per_s") if base else ours.get("eval_one_at_a_time_generations_per_s")
        ours_gen = ours.get("eval_generations_per_s")
        if base_gen and ours_gen:
            x = ours_gen / base_gen
            rows.append([f"{strategy}: eval batched vs one at a time" + (" >= 5x" if gpu else " (reported on CPU; "
                         "the 5x target is for a GPU)"), f"{ours_gen:.2f} / {base_gen:.2f} gen/s = {x:.2f}x",
                         check(x >= 5) if gpu else "reported"])
    for row in preprocess or []:
        if row["num_crops"] != 16:
            continue
        if row.get("phi3v_fast_ms") is not None:
            rows.append([f"preprocessing {row['image']}, num_crops 16: >= 2x per core vs the plain path "
                         f"(fast: resize_backend=\"torch\", max abs diff vs exact <= {FAST_RESIZE_MAX_DIFF})",
                         f"{row['plain_ms']:.1f} / {row['phi3v_fast_ms']:.1f} ms = {row['fast_speedup_per_core']:.2f}x, "
                         f"max abs diff vs exact {row['fast_max_abs_diff']:.3f} on "
                         f"{100 * row['fast_differing_fraction']:.3f}% of values",
                         check(row["fast_speedup_per_core"] >= 2 and row["max_abs_diff"] == 0
                               and row["fast_max_abs_diff"] <= FAST_RESIZE_MAX_DIFF)])
        rows.append([f"preprocessing {row['image']}, num_crops 16, exact (default resize_backend=\"pil\", "
                     "bit-identical to the plain path)",
                     f"{row['plain_ms']:.1f} / {row['phi3v_ms']:.1f} ms = {row['speedup_per_core']:.2f}x "
                     f"(PIL resize alone {row['resize_ms']:.1f} ms: at most {row['speedup_bound_exact_resize']:.2f}x), "
                     f"max abs diff {row['max_abs_diff']:.1e}", "reported" if row["max_abs_diff"] == 0 else "FAIL"])
    # The training loader of `ours` (its resize backend) when it was measured, else the first one.
    loading = sorted((r for r in ok if r.get("loader_img_per_cpu_s")), key=lambda r: r["label"] != "ours")
    full = next((r for r in ok if r["strategy"] == "full"), None)
    if loading and full and meta["workload"] == "docvqa":
        loader, backend = loading[0]["loader_img_per_cpu_s"], loading[0].get("resize_backend", "pil")
        # What one H100 consumes training the full-size model at the MFU target on these samples.
        need = TARGET_MFU * H100_PEAK_BF16 / (full["useful_tflops_per_sample_full_arch"] * 1e12)
        rows.append([f"4 dataloader workers (decode PNG, HD transform with resize_backend=\"{backend}\", tokenize) "
                     "feed a full-size step on an H100 at 45% MFU",
                     f"4 x {loader:.1f} = {4 * loader:.1f} img/s delivered, {need:.1f} img/s needed",
                     check(4 * loader >= need)])
    if not gpu:
        rows.append(["GPU targets (MFU >= 45%, batched eval >= 5x)", "need --device cuda", "not measured"])
    return rows


def main(argv=None):
    args = parse_args(argv)
    out_dir = Path(args.output_dir)
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in vars(args).items()}
    meta.update(
        device_name=torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({platform.machine()}), "
        f"{os.cpu_count()} cores, {args.cpu_threads or torch.get_num_threads()} torch threads",
        load_before=fmt(os.getloadavg()[0]), torch=torch.__version__,
        samples=args.steps * args.batch_size, warmup_samples=args.warmup_steps * args.batch_size,
        gradient_checkpointing=not args.no_gradient_checkpointing,
    )
    preprocess = None
    if not args.no_preprocess:
        path = out_dir / "runs" / "preprocess.json"
        argv = ["--output", str(path)] + (["--quick", "--repeats", "1"] if args.quick else [])
        if run_in_subprocess("bench.preprocess", argv, out_dir / "runs" / "preprocess.log", args.timeout) == 0:
            preprocess = json.loads(path.read_text())

    results = []
    deadline = time.time() + SHORT["total_seconds"] if args.short else None
    for cfg in plan_runs(args):
        start = time.time()
        timeout = args.timeout if deadline is None else int(min(args.timeout, deadline - start))
        if timeout <= 0:
            result = {**cfg, "error": f"not run: the {SHORT['total_seconds']} s of --short were spent"}
        else:
            result = run_config(cfg, out_dir, timeout)
        # A short lease is not spent on finding a batch that fits: out of memory, try half the batch.
        while args.short and result.get("error", "").startswith("out of memory") and (
                smaller := smaller_batch(cfg, args)) and deadline - time.time() > 30:
            print(f"[{time.time() - start:6.1f} s] {cfg['name']}: {result['error']}; again at batch "
                  f"{smaller['batch_size']}", flush=True)
            cfg = smaller
            result = run_config(cfg, out_dir, int(min(args.timeout, deadline - time.time())))
        results.append(result)
        status = result["error"].strip().splitlines()[-1] if "error" in result else (
            f"{result['img_per_s']:.3f} img/s, peak {gib(result['peak_memory_bytes']):.2f} GiB")
        print(f"[{time.time() - start:6.1f} s] {cfg['name']}: {status}", flush=True)

    ok = [r for r in results if "error" not in r]
    meta["load_after"] = fmt(os.getloadavg()[0])
    if ok:
        meta.update(mean_tokens_per_sample=ok[0]["mean_tokens_per_sample"], num_crops=ok[0]["num_crops"])
    from phi3v import Phi3VForCausalLM

    from .worker import model_config

    with torch.device("meta"):  # shapes only
        meta["model_params"] = sum(p.numel() for p in Phi3VForCausalLM(model_config(args.model_size)).parameters())
    report = markdown(meta, results, preprocess)
    checks = targets(meta, results, preprocess)
    report += "\n".join(["", "Targets (computed from this run; load average before/after: "
                          f"{meta['load_before']} / {meta['load_after']}):", "",
                          table(["target", "measured (ours / baseline)", "status"], checks), ""])
    (out_dir / "results.json").write_text(json.dumps(
        {"meta": meta, "runs": results, "preprocess": preprocess, "targets": checks}, indent=2))
    (out_dir / "results.md").write_text(report + "\n")
    print()
    print(report)
    return 0 if len(ok) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
