"""Model folders that replace the base model's folder as is ("drop-in"), and LoRA merging.

A fine-tuned model is usable by the official remote code (transformers 4.4x with
`trust_remote_code=True`, vLLM's `--trust-remote-code`, the ONNX and Azure tooling) only if its folder
looks like the official one. transformers 5.x's own `save_pretrained` does not give that: it writes a
`tokenizer_config.json` naming the 5.x class `TokenizersBackend`, nests the image processor's settings
in `processor_config.json` instead of writing `preprocessor_config.json`, and does not copy the
remote-code `.py` files that `config.json`'s `auto_map` names. A drop-in folder here holds:

* the weights, with the official key names, in the base's dtype (its config.json's `torch_dtype`)
  unless another is asked for;
* `config.json` in the official form: the base's config.json with `torch_dtype` set to the weights'
  dtype (not 5.x's `dtype`), plus the keys phi3v writes that the base lacks (`rope_scaling` of type
  `su` and `auto_map` are phi3v's own form too);
* every other file of the base folder, copied unchanged: the remote-code `*.py`, the tokenizer files,
  `special_tokens_map.json`, `generation_config.json`, a README, and so on (not the base's weights);
  for a hub id, from its local snapshot;
* `preprocessor_config.json` and `processor_config.json` in the official form, with the `num_crops`
  trained with. phi3v's `resize_backend` is written only when it is not the default "pil" (the
  official image processor keeps an unknown key as an unused attribute, so such a file still loads
  there, and phi3v then preprocesses as the run did).

    from phi3v.saving import save_drop_in
    save_drop_in(model, "out", base="microsoft/Phi-3.5-vision-instruct", image_processor=processor.image_processor)

`python -m phi3v.merge` merges a LoRA/QLoRA adapter into its base and writes such a folder; the
recipes' `--merge_lora` calls the same `save_merged`, and their full fine-tuning saves (the final one
and every checkpoint-N, through `DropInCheckpoints`) go through `finish_drop_in`.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

# Files of the base folder that are not copied: its weights (the folder gets its own), what
# `finish_drop_in` writes itself, and training state.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".onnx_data")
NOT_COPIED = {"config.json", "preprocessor_config.json", "processor_config.json", "adapter_config.json",
              "trainer_state.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}
# What transformers 5.x's processor save writes that the official layout keeps inside tokenizer_config.json.
FIVE_X_ONLY = ("chat_template.jinja", "chat_template.json")

OFFICIAL_PROCESSOR_CONFIG = {
    "auto_map": {"AutoProcessor": "processing_phi3_v.Phi3VProcessor"},
    "processor_class": "Phi3VProcessor",
}
OFFICIAL_PREPROCESSOR_KEYS = ("auto_map", "do_convert_rgb", "image_mean", "image_processor_type", "image_std",
                              "num_crops", "num_img_tokens")


@functools.lru_cache(maxsize=None)  # one look-up per run, not one per checkpoint
def base_model_folder(name_or_path) -> Path:
    """The local folder of a base model: the folder itself, or the hub id's snapshot in the HF cache.

    For a hub id the small files (remote code, tokenizer, configs) are fetched into the snapshot if
    they are missing and the hub can be reached (loading with phi3v never downloads the .py files);
    offline (HF_HUB_OFFLINE=1) the snapshot is used as it is.
    """
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path), ignore_patterns=[f"*{s}" for s in WEIGHT_SUFFIXES]))
    except Exception:  # offline, or the hub unreachable: whatever the cache holds
        try:
            return Path(snapshot_download(str(name_or_path), local_files_only=True))
        except Exception as err:
            raise ValueError(f"{name_or_path}: not a folder, and no local snapshot of that hub id ({err})") from None


def config_dtype(folder) -> torch.dtype | None:
    """The dtype a model folder's config.json states (`torch_dtype`, or 5.x's `dtype`), or None."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    name = config.get("torch_dtype") or config.get("dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) else None


def base_dtype(base) -> torch.dtype | None:
    """The dtype the base model's config.json states (folder or hub id), or None."""
    return config_dtype(base_model_folder(base))


def preprocessor_config(image_processor) -> dict:
    """The official `preprocessor_config.json` of a phi3v image processor (its num_crops included)."""
    settings = image_processor.to_dict()
    out = {key: settings[key] for key in OFFICIAL_PREPROCESSOR_KEYS if key in settings}
    out["processor_class"] = "Phi3VProcessor"
    if getattr(image_processor, "resize_backend", "pil") != "pil":
        out["resize_backend"] = image_processor.resize_backend  # phi3v only; see the module docstring
    return out


_UMASK = os.umask(0)
os.umask(_UMASK)


def _write_atomically(path: Path, write):
    """`write(tmp_path)`, then rename over `path`: a kill never leaves a half-written file behind."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # as a plain open() would (mkstemp makes the file private)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_json(path: Path, data: dict):
    _write_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("model*.safetensors") if p.is_file())


FLOAT_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def _float_dtypes(path: Path) -> set[torch.dtype]:
    """The floating dtypes of a safetensors file, from its header (no tensor is read)."""
    with safe_open(path, "pt") as f:
        return {FLOAT_DTYPES[f.get_slice(k).get_dtype()] for k in f.keys() if f.get_slice(k).get_dtype() in FLOAT_DTYPES}


def _cast_weights(folder: Path, dtype: torch.dtype):
    """Rewrite the folder's model*.safetensors whose floating tensors are not all `dtype` (shard by shard)."""
    changed = False
    for path in _weight_files(folder):
        if _float_dtypes(path) - {dtype}:
            tensors = {k: t.to(dtype) if t.is_floating_point() else t for k, t in load_file(path).items()}
            _write_atomically(path, lambda tmp, tensors=tensors: save_file(tensors, tmp, metadata={"format": "pt"}))
            changed = True
    index = folder / "model.safetensors.index.json"
    if changed and index.is_file():
        # A safetensors file is an 8-byte header length, the JSON header, then the tensors' bytes.
        total_size = 0
        for path in _weight_files(folder):
            with open(path, "rb") as f:
                total_size += path.stat().st_size - 8 - int.from_bytes(f.read(8), "little")
        data = json.loads(index.read_text())
        data.setdefault("metadata", {})["total_size"] = total_size
        _write_json(index, data)


def _saved_dtype(folder: Path) -> torch.dtype | None:
    """The floating dtype of the folder's weights (None when it has none, or several)."""
    dtypes = set().union(*(_float_dtypes(path) for path in _weight_files(folder)))
    return dtypes.pop() if len(dtypes) == 1 else None


def finish_drop_in(folder, base, image_processor, dtype: torch.dtype | None = None) -> Path:
    """Make `folder` (weights and config.json from `save_pretrained` or the Trainer) a drop-in folder.

    `base`: the base model's folder or hub id; `image_processor`: the one trained with (its num_crops
    goes into preprocessor_config.json); `dtype`: the weights' dtype, None to keep the saved one.
    Every file is replaced atomically, so a checkpoint killed here stays loadable and resumable.
    """
    folder, base_dir = Path(folder), base_model_folder(base)
    if dtype is not None:
        _cast_weights(folder, dtype)
    for path in sorted(base_dir.iterdir()):
        name = path.name
        if not path.is_file() or name.startswith(".") or name in NOT_COPIED or name.endswith(WEIGHT_SUFFIXES):
            continue
        _write_atomically(folder / name, lambda tmp, path=path: shutil.copyfile(path, tmp))
    for name in FIVE_X_ONLY:
        if not (base_dir / name).exists() and (folder / name).exists():
            (folder / name).unlink()

    config = json.loads((folder / "config.json").read_text())
    saved = _saved_dtype(folder)
    config.pop("dtype", None)  # transformers 5.x's name; 4.4x reads torch_dtype (5.x reads both)
    if saved is not None:
        config["torch_dtype"] = str(saved).removeprefix("torch.")
    base_config = base_dir / "config.json"
    if base_config.is_file():
        # Fine-tuning changes no setting: the base's values win (the Trainer, for one, rewrites eos_token_id
        # from the tokenizer), its keys that phi3v drops (_attn_implementation) come back; the dtype is ours.
        base_values = json.loads(base_config.read_text())
        config.update({k: v for k, v in base_values.items() if k not in ("torch_dtype", "dtype")})
    _write_json(folder / "config.json", config)
    _write_json(folder / "preprocessor_config.json", preprocessor_config(image_processor))
    _write_json(folder / "processor_config.json", OFFICIAL_PROCESSOR_CONFIG)
    return folder


def save_drop_in(model, folder, base, image_processor, dtype: torch.dtype | None = None) -> Path:
    """`model.save_pretrained(folder)`, then `finish_drop_in`; dtype None: the base's (config.json)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    return finish_drop_in(folder, base, image_processor, dtype or base_dtype(base))


class DropInCheckpoints(TrainerCallback):
    """Makes every full fine-tuning checkpoint-N a drop-in folder as soon as the Trainer has written it.

    Resuming still works: the Trainer's files stay (trainer_state.json, optimizer, RNG state). The
    weights go to the base's dtype when DeepSpeed saved the run's own copy of them (global_step*/,
    which is what resuming reads); without DeepSpeed resuming reads model.safetensors, so they keep
    the dtype trained in. LoRA checkpoints (adapters) are left as they are.
    """

    def __init__(self, base, image_processor):
        self.base = base
        self.image_processor = image_processor

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and (folder / "config.json").is_file():
            dtype = base_dtype(self.base) if args.deepspeed else None
            finish_drop_in(folder, self.base, self.image_processor, dtype)
        return control


def adapter_base(adapter_dir) -> str:
    """The base model a peft adapter folder names (`base_model_name_or_path` of adapter_config.json)."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise ValueError(f"{adapter_dir} has no adapter_config.json: not a LoRA adapter folder (a run's output "
                         "folder or one of its checkpoint-N)")
    base = json.loads(path.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{path} names no base_model_name_or_path: pass the base model")
    return base


def load_with_adapter(adapter_dir, base=None, dtype: torch.dtype = torch.float32, merge: bool = False):
    """The base in full precision (also for a QLoRA adapter: never 4-bit) with the adapter on top.

    `merge`: folded into the weights (`merge_and_unload`, a plain Phi3VForCausalLM); otherwise a peft model.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = base or adapter_base(adapter_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    except OSError as err:
        raise ValueError(f"cannot load the base model {base!r} ({err}); pass it with --base/--model") from None
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model.merge_and_unload() if merge else model


def run_processor(folder, base, num_crops: int | None = None):
    """The processor a run saved next to its model or adapter (`folder`), else the base's."""
    from transformers import AutoProcessor

    folder = Path(folder)
    has_own = (folder / "preprocessor_config.json").is_file() or (folder / "processor_config.json").is_file()
    return AutoProcessor.from_pretrained(str(folder) if has_own else base, num_crops=num_crops)


def save_merged(adapter_dir, output_dir, base=None, dtype: torch.dtype | None = None, num_crops: int | None = None):
    """Merge a LoRA/QLoRA adapter into its base in fp32 and write a drop-in folder; returns the folder.

    `base`: default the adapter's base_model_name_or_path. `dtype`: default the base's (config.json).
    The processor settings (num_crops) are those saved with the adapter, else the base's.
    """
    base = base or adapter_base(adapter_dir)
    model = load_with_adapter(adapter_dir, base, merge=True)
    processor = run_processor(adapter_dir, base, num_crops)
    return save_drop_in(model, output_dir, base, processor.image_processor, dtype)
