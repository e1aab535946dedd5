"""The project's training step side by side with Microsoft's own Phi-3.5-vision code.

    python -m bench.vs_official --official_code DIR --official_python PATH [--device cpu|cuda]
    python -m bench.vs_official --official_code DIR --official_python PATH --growth 1,2,4,8
    python -m bench.vs_official --ours_only            # the project's side alone

DIR holds the three remote-code files of microsoft/Phi-3.5-vision-instruct (configuration_phi3_v.py,
modeling_phi3_v.py, processing_phi3_v.py; the hub snapshot folder will do) and PATH is a Python with
transformers 4.4x, torch and torchvision (README, "Speed and memory", sets one up). The official code
is not part of this repository: it is copied next to the random checkpoint in --output_dir.

It writes one random checkpoint in the official layout (by default decoder 512 wide, 4 layers,
8 heads, MLP 1536, the real 32064-token vocabulary and tokenizer; CLIP 256 wide, 4 layers, 4 heads),
and DocVQA-like pages (1700x2200, 1240x1754, 850x1100, 1600x900) as PNG files with a question and an
answer each. Then each side, in its own fresh process (`bench.vs_official_side`), processes the pages
with its own processor at num_crops 16, loads the checkpoint (ours with --attn, default sdpa; the
official code with --official_attn, default eager as its model card runs it without flash-attn) and
trains on one page per step (batch 1, gradient checkpointing on, forward with labels on the answer,
backward), after one warm-up step.

It checks that both sides fed the models the same ids and pixels and got the same losses and
gradient norms (relative difference <= --tolerance, 1e-6), and prints the image processor's CPU time
per page (one thread, the exact path: ours with resize_backend="pil", best of --preprocess_repeats),
training tokens/s (wall clock) and tokens per CPU-second (the speed target's measure), and the peak training memory above the
loaded model, for both sides with the ratios, then the issue's targets as PASS/FAIL.

--ours_without_checkpointing runs the project's side without gradient checkpointing (the official
side keeps it): the project's speed with nothing recomputed, not the targets' workload.

--growth 1,2,4,8 instead puts that many pages in one sample (the four sizes in turn; past the
fourth, other pictures of the same sizes, since phi3v encodes a repeated picture once) and measures
one training step per page count and side, each in a fresh process capped at --time_cap seconds and
--memory_cap GB (the process is stopped past either), best step time of --repeats runs; it stops a
side at the first page count that does not fit, draws peak memory and step time against tokens to
--plot, and fits a line through the project's memory to show how it grows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

OFFICIAL_FILES = ("configuration_phi3_v.py", "modeling_phi3_v.py", "processing_phi3_v.py")
PAGE_SIZES = [(1700, 2200), (1240, 1754), (850, 1100), (1600, 900)]
MODEL_SIZES = {
    "mid": dict(hidden_size=512, num_layers=4, num_heads=8, intermediate_size=1536,
                vision_hidden_size=256, vision_layers=4, vision_heads=4),
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, vision_hidden_size=32, vision_layers=2, vision_heads=2),
}
TARGETS = {"tokens_per_s": 3.0, "training_memory": 0.5, "preprocess": 1.6}
REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--official_code", help="folder with the three official .py files (e.g. the hub snapshot)")
    add("--official_python", help="Python interpreter with transformers 4.4x (and torchvision) for the official side")
    add("--ours_only", action="store_true", help="run the project's side only (no official code needed)")
    add("--device", choices=["cpu", "cuda"], default="cpu")
    add("--attn", default="sdpa", help="the project's attention backend")
    add("--official_attn", default="eager", help="the official code's attention (eager, or flash_attention_2 where installed)")
    add("--dtype", choices=["float32", "bfloat16"], help="default float32 on CPU, bfloat16 on CUDA")
    add("--model_size", choices=sorted(MODEL_SIZES), default="mid")
    add("--num_crops", type=int, default=16)
    add("--page_scale", type=float, default=1.0, help="shrink the pages (the tests use small ones)")
    add("--threads", type=int, default=1, help="torch threads on each side (0: torch's default); 1 is steadier on a shared machine")
    add("--preprocess_repeats", type=int, default=15)
    add("--tolerance", type=float, default=1e-6, help="largest relative difference of losses and gradient norms")
    add("--growth", help="comma-separated page counts per sample (e.g. 1,2,4,8) instead of the comparison")
    add("--repeats", type=int, default=1, help="--growth: runs per page count and side (best step time, largest memory)")
    add("--time_cap", type=float, default=600, help="seconds one side's process may run")
    add("--memory_cap", type=float, default=12, help="GB of resident memory one side's process may use")
    add("--malloc_mmap_threshold", type=int,
        help="set glibc's MALLOC_MMAP_THRESHOLD_ to this many bytes on both sides: blocks at least that large "
             "go back to the OS when freed, so peak RSS comes close to the peak of live tensors (slower)")
    add("--ours_without_checkpointing", action="store_true",
        help="run the project's side without gradient checkpointing (the official side keeps it): how fast the "
             "project gets when nothing is recomputed, at the memory that costs; not the targets' workload")
    add("--plot", help="--growth: PNG to draw (default OUTPUT_DIR/growth_DEVICE.png)")
    add("--output_dir", default="outputs/vs_official")
    add("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not args.ours_only and not (args.official_code and args.official_python):
        p.error("--official_code and --official_python are required (or --ours_only)")
    if args.official_code:
        missing = [f for f in OFFICIAL_FILES if not (Path(args.official_code) / f).is_file()]
        if missing:
            p.error(f"--official_code {args.official_code} lacks {', '.join(missing)}")
    if args.official_python and not Path(args.official_python).exists():
        p.error(f"--official_python {args.official_python} does not exist")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    return args


# ----------------------------------------------------------------------------------------------
# What both sides get


def prepare_model(args, out: Path) -> tuple[Path, Path | None]:
    """The random checkpoint (official layout, written by phi3v) and, next to it, a folder that also
    holds the official .py files (the checkpoint's files linked, not copied)."""
    from phi3v.tiny import make_tiny_model

    model_dir = out / f"model-{args.model_size}-crops{args.num_crops}"
    if not (model_dir / "config.json").exists():
        tmp = model_dir.with_name(model_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        make_tiny_model(tmp, seed=args.seed, num_crops=args.num_crops, **MODEL_SIZES[args.model_size])
        tmp.rename(model_dir)
    if args.ours_only:
        return model_dir, None
    official_dir = out / f"official-{args.model_size}-crops{args.num_crops}"
    shutil.rmtree(official_dir, ignore_errors=True)
    official_dir.mkdir(parents=True)
    for item in model_dir.iterdir():
        (official_dir / item.name).symlink_to(item.resolve())
    for name in OFFICIAL_FILES:
        shutil.copy(Path(args.official_code) / name, official_dir / name)
    return model_dir, official_dir


def prepare_pages(args, out: Path, variant: int = 0) -> list[dict]:
    """The four pages as PNG files, each with a question and an answer. Variant v > 0 gives four more pages of
    the same sizes with other content, for samples of more than four pages: a repeated page would be
    encoded once by phi3v (see Phi3VImageEmbedding._first_copies) and twice by the official code."""
    from .workloads import WORDS, document_page

    rng = random.Random(args.seed if variant == 0 else f"{args.seed}-{variant}")
    pages = []
    for width, height in PAGE_SIZES:
        width, height = round(width * args.page_scale), round(height * args.page_scale)
        path = out / "pages" / f"page_{width}x{height}{f'_{variant}' if variant else ''}.png"
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(5, 18))).capitalize() + "?"
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 5)))
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            document_page(width, height, rng).save(path)
        else:
            document_page(width, height, rng)  # keep the random stream the same
        pages.append({"path": str(path.resolve()), "question": question, "answer": answer})
    return pages


def one_page_samples(pages: list[dict]) -> list[dict]:
    return [{"prompt": f"<|user|>\n<|image_1|>\n{p['question']}<|end|>\n<|assistant|>\n", "answer": p["answer"],
             "pages": [p["path"]]} for p in pages]


def multi_page_sample(variants: list[list[dict]], count: int) -> dict:
    """One sample of `count` pages: the four sizes in turn, each page a different picture."""
    chosen = [variants[i // len(variants[0])][i % len(variants[0])] for i in range(count)]
    tags = "".join(f"<|image_{k}|>" for k in range(1, count + 1))
    return {"prompt": f"<|user|>\n{tags}\n{chosen[0]['question']}<|end|>\n<|assistant|>\n",
            "answer": chosen[0]["answer"], "pages": [p["path"] for p in chosen]}


# ----------------------------------------------------------------------------------------------
# Running one side


def child_rss_bytes(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0)


def run_side(args, side: str, model_dir: Path, samples: list[dict], name: str, out: Path,
             warmup: bool, preprocess_repeats: int) -> dict:
    """Runs bench.vs_official_side in a fresh process under the side's Python, within the caps."""
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    cfg = dict(side=side, model_dir=str(model_dir), device=args.device, dtype=args.dtype, seed=args.seed,
               attn=args.attn if side == "ours" else args.official_attn, threads=args.threads,
               num_crops=args.num_crops, samples=samples, warmup=warmup, preprocess_repeats=preprocess_repeats,
               gradient_checkpointing=not (side == "ours" and args.ours_without_checkpointing))
    config_path, result_path, log_path = (runs / f"{name}.config.json", runs / f"{name}.json", runs / f"{name}.log")
    config_path.write_text(json.dumps(cfg, indent=2))
    result_path.unlink(missing_ok=True)
    python = [sys.executable] if side == "ours" else [args.official_python]
    if side == "official" and MODEL_SIZES[args.model_size]["vision_hidden_size"] != 1024:
        # The official 2x2 merge asserts a 1024-wide CLIP (ViT-L). -O drops assert statements, and
        # nothing else: the smaller tower then runs through the very same code.
        python.append("-O")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    if args.malloc_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    cap = args.memory_cap * 1e9
    stopped, peak_seen = [], [0]
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*python, "-m", "bench.vs_official_side", str(config_path), str(result_path)],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

        def watch():  # the memory cap: resident memory sampled every 20 ms
            while proc.poll() is None:
                rss = child_rss_bytes(proc.pid)
                peak_seen[0] = max(peak_seen[0], rss)
                if rss > cap:
                    stopped.append(f"stopped above the {args.memory_cap:g} GB memory cap")
                    proc.kill()
                    return
                time.sleep(0.02)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            proc.wait(timeout=args.time_cap)
        except subprocess.TimeoutExpired:
            stopped.append(f"stopped at the {args.time_cap:g} s time cap")
            proc.kill()
            proc.wait()
        watcher.join()
    if stopped:
        return {"side": side, "error": stopped[0], "limit": True}
    if result_path.exists():
        return json.loads(result_path.read_text())
    tail = log_path.read_text()[-2000:]
    # The kernel's OOM killer ends the process with SIGKILL and no result.
    return {"side": side, "error": f"exited with {proc.returncode} (SIGKILL: out of memory?)" if proc.returncode == -9
            else f"exited with {proc.returncode}: {tail}", "limit": proc.returncode == -9}


# ----------------------------------------------------------------------------------------------
# Comparison


def relative_difference(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def numerics(ours: dict, official: dict) -> dict:
    """Same inputs, same losses, same gradient norms (total and per part), step by step."""
    worst_loss = worst_grad = 0.0
    same_inputs = True
    for a, b in zip(ours["steps"], official["steps"]):
        same_inputs &= a["fingerprint"] == b["fingerprint"]
        worst_loss = max(worst_loss, relative_difference(a["loss"], b["loss"]))
        for key, value in a["grad_norms"].items():
            if value or b["grad_norms"][key]:
                worst_grad = max(worst_grad, relative_difference(value, b["grad_norms"][key]))
    return {"same_inputs": same_inputs and len(ours["steps"]) == len(official["steps"]),
            "max_rel_loss_diff": worst_loss, "max_rel_grad_norm_diff": worst_grad}


def mean(values):
    values = list(values)
    return sum(values) / len(values)


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def mb(n):
    return f"{n / 1e6:,.0f} MB"


def mean_preprocess_ms(side: dict) -> float | None:
    """Mean CPU ms per page of the side's image processor; None when not measured."""
    return mean(side["preprocess_ms"].values()) if side.get("preprocess_ms") else None


def comparison_table(ours: dict, official: dict | None) -> list[str]:
    rows = [("preprocessing per page (CPU ms, 1 thread, exact path)", mean_preprocess_ms,
             lambda v: f"{v:.1f} ms", "faster", lambda o, f: f / o),
            ("training tokens/s (wall)", lambda r: r["tokens_per_s"], lambda v: f"{v:,.0f}", "x", lambda o, f: o / f),
            ("training tokens per CPU-second", lambda r: r["tokens_per_cpu_s"], lambda v: f"{v:,.0f}", "x",
             lambda o, f: o / f),
            ("peak training memory above the loaded model", lambda r: r["training_memory_bytes"], mb, "x",
             lambda o, f: o / f)]
    lines = ["| | project | official | ratio |", "|---|---|---|---|"]
    for label, get, fmt, unit, ratio in rows:
        o = get(ours)
        if o is None:  # --preprocess_repeats 0
            continue
        if official is None or "error" in official:
            lines.append(f"| {label} | {fmt(o)} | n/a | |")
            continue
        f = get(official)
        r = ratio(o, f)
        lines.append(f"| {label} | {fmt(o)} | {fmt(f)} | {r:.2f}x{' faster' if unit == 'faster' else ''} |")
    return lines


def compare(args, out: Path, model_dir: Path, official_dir: Path | None) -> dict:
    pages = prepare_pages(args, out)
    samples = one_page_samples(pages)
    meta = {"device": args.device, "model_size": args.model_size, "sizes": MODEL_SIZES[args.model_size],
            "num_crops": args.num_crops, "threads": args.threads, "dtype": args.dtype, "load_before": loadavg(),
            "platform": platform.platform(), "pages": [Path(p["path"]).stem for p in pages]}
    ours = run_side(args, "ours", model_dir, samples, "compare-ours", out, True, args.preprocess_repeats)
    if "error" in ours:
        raise SystemExit(f"the project's side failed: {ours['error']}")
    official = None
    if official_dir is not None:
        official = run_side(args, "official", official_dir, samples, "compare-official", out, True,
                            args.preprocess_repeats)
    meta["load_after"] = loadavg()
    result = {"meta": meta, "ours": ours, "official": official}
    lines = [f"## The project against the official code: {args.device}, {args.model_size} model, "
             f"{len(samples)} pages at num_crops {args.num_crops}, batch 1", "",
             f"Tokens per step: {', '.join(str(s['tokens']) for s in ours['steps'])}. Threads per side: "
             f"{ours['threads']}. Attention: project {args.attn}, official {args.official_attn}. "
             f"Load average before/after: {meta['load_before']} / {meta['load_after']}. "
             f"Memory: {ours['memory_kind']}"
             + (f", with MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold} on both sides" if args.malloc_mmap_threshold
                else ", glibc's default allocator settings") + ".", ""]
    if args.ours_without_checkpointing:
        lines += ["**The project's side ran without gradient checkpointing** (--ours_without_checkpointing), the "
                  "official side with it: not the workload the targets are set on.", ""]
    lines += comparison_table(ours, official)
    if official is not None and "error" not in official:
        check = numerics(ours, official)
        result["numerics"] = check
        same = (check["same_inputs"] and check["max_rel_loss_diff"] <= args.tolerance
                and check["max_rel_grad_norm_diff"] <= args.tolerance)
        lines += ["", f"Same inputs (ids and pixels): {check['same_inputs']}; largest relative difference of the "
                  f"losses {check['max_rel_loss_diff']:.1e}, of the gradient norms (total and per part) "
                  f"{check['max_rel_grad_norm_diff']:.1e}: {'EQUAL' if same else 'DIFFERENT'} within {args.tolerance:g}.",
                  "", f"Official side: torch {official['torch']}, transformers {official['transformers']}; project: "
                  f"torch {ours['torch']}, transformers {ours['transformers']}."]
        # Per CPU-second with one thread each: what a core costs, which other jobs on a shared machine
        # move much less than the wall clock (on an idle machine the two agree).
        speed = ours["tokens_per_cpu_s"] / official["tokens_per_cpu_s"]
        memory = ours["training_memory_bytes"] / official["training_memory_bytes"]
        result["targets"] = targets = [
            (f"training tokens per CPU-second >= {TARGETS['tokens_per_s']:g}x official", f"{speed:.2f}x", speed >= TARGETS["tokens_per_s"]),
            (f"peak training memory <= {TARGETS['training_memory']:g}x official", f"{memory:.2f}x",
             memory <= TARGETS["training_memory"]),
            ("identical losses and gradient norms", f"{max(check['max_rel_loss_diff'], check['max_rel_grad_norm_diff']):.1e}", same)]
        if mean_preprocess_ms(ours) and mean_preprocess_ms(official):
            pre = mean_preprocess_ms(official) / mean_preprocess_ms(ours)
            targets.append((f"exact preprocessing >= {TARGETS['preprocess']:g}x faster", f"{pre:.2f}x",
                            pre >= TARGETS["preprocess"]))
        lines += ["", "| target | measured | status |", "|---|---|---|"]
        lines += [f"| {t} | {m} | {'PASS' if ok else 'FAIL'} |" for t, m, ok in targets]
    elif official is not None:
        lines += ["", f"Official side failed: {official['error'][-500:]}"]
    else:
        lines += ["", "Official side not run (--ours_only)."]
    result["markdown"] = "\n".join(lines)
    return result


# ----------------------------------------------------------------------------------------------
# Growth with sequence length


def growth(args, out: Path, model_dir: Path, official_dir: Path | None) -> dict:
    counts = [int(c) for c in args.growth.split(",") if c]
    variants = [prepare_pages(args, out, v) for v in range(math.ceil(max(counts) / len(PAGE_SIZES)))]
    sides = [("ours", model_dir)] + ([("official", official_dir)] if official_dir is not None else [])
    meta = {"device": args.device, "model_size": args.model_size, "num_crops": args.num_crops, "threads": args.threads,
            "time_cap_s": args.time_cap, "memory_cap_gb": args.memory_cap, "repeats": args.repeats,
            "load_before": loadavg()}
    rows = {side: [] for side, _ in sides}
    for side, folder in sides:
        for count in counts:
            sample = multi_page_sample(variants, count)
            runs = [run_side(args, side, folder, [sample], f"growth-{side}-{count}p-{r}", out, False, 0)
                    for r in range(args.repeats)]
            good = [r for r in runs if "error" not in r]
            if not good:
                rows[side].append({"pages": count, "error": runs[0]["error"]})
                print(f"{side}: {count} pages: {runs[0]['error'][-300:]}", flush=True)
                break
            step = min((r["steps"][0] for r in good), key=lambda s: s["wall_s"])
            rows[side].append({"pages": count, "tokens": step["tokens"], "step_s": step["wall_s"], "cpu_s": step["cpu_s"],
                               "training_memory_bytes": max(r["training_memory_bytes"] for r in good),
                               "loss": step["loss"], "grad_norm": step["grad_norms"]["total"]})
            print(f"{side}: {count} pages, {step['tokens']} tokens: step {step['wall_s']:.1f} s, training memory "
                  f"{mb(rows[side][-1]['training_memory_bytes'])}", flush=True)
    meta["load_after"] = loadavg()
    result = {"meta": meta, "rows": rows}
    ours = [r for r in rows["ours"] if "error" not in r]
    if len(ours) >= 2:
        result["ours_memory_fit"] = linear_fit([r["tokens"] for r in ours], [r["training_memory_bytes"] for r in ours])
    lines = [f"## Training memory and step time against sequence length: {args.device}, {args.model_size} model, "
             f"num_crops {args.num_crops}, one sample of N pages", "",
             f"Caps per process: {args.time_cap:g} s, {args.memory_cap:g} GB. Best of {args.repeats} run(s). Threads per "
             f"side: {args.threads}. Load average before/after: {meta['load_before']} / {meta['load_after']}.", "",
             "| pages | tokens | project step s (wall / CPU) | project training memory | official step s (wall / CPU) "
             "| official training memory | memory ratio |",
             "|---|---|---|---|---|---|---|"]
    official_rows = {r["pages"]: r for r in rows.get("official", [])}
    for r in rows["ours"]:
        if "error" in r:
            lines.append(f"| {r['pages']} | | {r['error']} | | | | |")
            continue
        o = official_rows.get(r["pages"])
        if o is None:
            other = ["not run", "", ""]
        elif "error" in o:
            other = [o["error"][:80], "", ""]
        else:
            other = [f"{o['step_s']:.1f} / {o['cpu_s']:.1f}", mb(o["training_memory_bytes"]),
                     f"{r['training_memory_bytes'] / o['training_memory_bytes']:.2f}x"]
        lines.append(f"| {r['pages']} | {r['tokens']:,} | {r['step_s']:.1f} / {r['cpu_s']:.1f} | {mb(r['training_memory_bytes'])} | "
                     + " | ".join(other) + " |")
    if "ours_memory_fit" in result:
        fit = result["ours_memory_fit"]
        lines += ["", f"Project memory = {fit['intercept'] / 1e6:,.0f} MB + {fit['slope'] * 1e3 / 1e6:,.1f} MB per "
                  f"1k tokens; largest deviation from that line {fit['max_rel_residual'] * 100:.1f}%."]
    result["markdown"] = "\n".join(lines)
    plot = Path(args.plot) if args.plot else out / f"growth_{args.device}.png"
    draw_growth(rows, plot, f"{args.model_size} model, num_crops {args.num_crops}, {args.device}")
    result["plot"] = str(plot)
    return result


def linear_fit(xs: list[float], ys: list[float]) -> dict:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    intercept = my - slope * mx
    residuals = [abs(y - (intercept + slope * x)) / y for x, y in zip(xs, ys)]
    return {"slope": slope, "intercept": intercept, "max_rel_residual": max(residuals)}


def draw_growth(rows: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem_ax, time_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for side, style in (("ours", "o-"), ("official", "s--")):
        good = [r for r in rows.get(side, []) if "error" not in r]
        if not good:
            continue
        label = "project" if side == "ours" else "official"
        tokens = [r["tokens"] / 1000 for r in good]
        mem_ax.plot(tokens, [r["training_memory_bytes"] / 1e9 for r in good], style, label=label)
        time_ax.plot(tokens, [r["step_s"] for r in good], style, label=label)
        failed = [r for r in rows[side] if "error" in r]
        if failed:
            mem_ax.annotate(f"official: {failed[0]['pages']} pages {failed[0]['error'].split(' ')[0]}"
                            if side == "official" else f"{failed[0]['error']}",
                            xy=(tokens[-1], good[-1]["training_memory_bytes"] / 1e9), fontsize=7,
                            xytext=(5, -12), textcoords="offset points")
    mem_ax.set(xlabel="tokens in the sample (thousands)", ylabel="peak training memory above the model (GB)")
    time_ax.set(xlabel="tokens in the sample (thousands)", ylabel="forward + backward (s)")
    for ax in (mem_ax, time_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_dir, official_dir = prepare_model(args, out)
    result = (growth if args.growth else compare)(args, out, model_dir, official_dir)
    name = "growth" if args.growth else "compare"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{name}.md").write_text(result["markdown"] + "\n")
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
