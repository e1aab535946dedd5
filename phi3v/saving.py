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

`python -m phi3v.merge` merges a LoRA/QLoRA adapter into its base and writes such a folder, one weight
at a time from the base's safetensors shards (`LoraMerge`, `merge_into_shards`: the bytes of peft's
`merge_and_unload` in fp32, in far less memory than the model); the recipes' `--merge_lora` calls the
same `save_merged`, and their full fine-tuning saves (the final one
and every checkpoint-N, through `DropInCheckpoints`) go through `finish_drop_in`.
"""

from __future__ import annotations

import functools
import json
import math
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


def load_with_adapter(adapter_dir, base=None, dtype: torch.dtype = torch.float32):
    """The base in full precision (also for a QLoRA adapter: never 4-bit) with the adapter on top (a peft model)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = base or adapter_base(adapter_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    except OSError as err:
        raise ValueError(f"cannot load the base model {base!r} ({err}); pass it with --base/--model") from None
    return PeftModel.from_pretrained(model, str(adapter_dir))


def run_processor(folder, base, num_crops: int | None = None):
    """The processor a run saved next to its model or adapter (`folder`), else the base's."""
    from transformers import AutoProcessor

    folder = Path(folder)
    has_own = (folder / "preprocessor_config.json").is_file() or (folder / "processor_config.json").is_file()
    return AutoProcessor.from_pretrained(str(folder) if has_own else base, num_crops=num_crops)


# Output shards of the merged model: at most this many bytes each, as the hub's shards of
# Phi-3.5-vision-instruct (4.97 GB + 3.30 GB); one shard is written as model.safetensors with no index.
MAX_SHARD_BYTES = 5 * 10**9
SAFETENSORS_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                           torch.uint8: "U8", torch.bool: "BOOL"}
# LoRA settings whose merge is not `W + (B @ A) * scaling` on the Linear layers' weights (or that change the
# base at load time): the lean merge refuses them rather than write something peft would not.
UNSUPPORTED_LORA_SETTINGS = ("use_dora", "lora_bias", "modules_to_save", "layer_replication", "target_parameters",
                             "trainable_token_indices", "alora_invocation_tokens", "use_qalora", "use_bdlora",
                             "velora_config", "monteclora_config", "arrow_config", "kasa_config", "megatron_config")
ADAPTER_PREFIX = "base_model.model."


class LoraMerge:
    """What merging a peft LoRA adapter does to each weight of its base, read lazily from the files.

    peft's `merge_and_unload` on a base loaded in fp32 computes, for each LoRA'd Linear,
    `W + (B @ A) * scaling` in fp32 (`fan_in_fan_out` does not apply to nn.Linear: peft turns it off), with
    `scaling = alpha / r` (`alpha / sqrt(r)` with rslora; r and alpha from rank_pattern/alpha_pattern); a
    full weight the adapter saved (`save_embedding_layers`, e.g. lm_head when it is a LoRA target; biases of
    `bias="all"`) replaces the base's first. `merged(key, base_weight)` does the same for one weight.
    """

    def __init__(self, adapter_dir):
        from peft import PeftConfig
        from peft.utils.other import get_pattern_key

        adapter_dir = Path(adapter_dir)
        weights = adapter_dir / "adapter_model.safetensors"
        if not weights.is_file():
            raise ValueError(f"{adapter_dir} has no adapter_model.safetensors (the only adapter format merged here)")
        config = PeftConfig.from_pretrained(str(adapter_dir))
        if str(config.peft_type) not in ("LORA", "PeftType.LORA"):
            raise ValueError(f"{adapter_dir}: a {config.peft_type} adapter, not LoRA: cannot merge it")
        used = [name for name in UNSUPPORTED_LORA_SETTINGS if getattr(config, name, None)]
        if config.init_lora_weights not in (True, False, "gaussian"):
            used.append(f"init_lora_weights={config.init_lora_weights!r}")
        if used:
            raise ValueError(f"{adapter_dir}: merging an adapter with {', '.join(used)} is not supported here "
                             "(plain LoRA/QLoRA adapters only, as the recipes train them); merge it with peft's "
                             "merge_and_unload")
        self.path, self.config = weights, config
        pairs = {}  # module name -> {"lora_A": key, "lora_B": key}
        self.replaced = {}  # base weight key -> adapter key of the full weight that replaces it
        with safe_open(weights, "pt") as f:
            keys = list(f.keys())
        for key in keys:
            if not key.startswith(ADAPTER_PREFIX):
                raise ValueError(f"{weights}: unexpected key {key} (not a peft model's)")
            name = key.removeprefix(ADAPTER_PREFIX)
            if name.endswith((".lora_A.weight", ".lora_B.weight")):
                module = name.rsplit(".", 2)[0]
                pairs.setdefault(module, {})[name.rsplit(".", 2)[1]] = key
            elif ".lora_" in name:
                raise ValueError(f"{weights}: {key} is not a LoRA weight of a Linear layer: not supported here")
            else:
                self.replaced[name.replace(".base_layer.", ".")] = key
        for module, pair in pairs.items():
            if set(pair) != {"lora_A", "lora_B"}:
                raise ValueError(f"{weights}: {module} has {', '.join(pair)} only")
        self.scaling = {}  # base weight key -> scaling
        for module in pairs:
            r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
            alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
            self.scaling[f"{module}.weight"] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        # base weight key -> (lora_A key, lora_B key)
        self.lora = {f"{module}.weight": (pair["lora_A"], pair["lora_B"]) for module, pair in pairs.items()}

    def check(self, shapes: dict[str, torch.Size]):
        """Raise if the adapter does not fit a base whose weights have these shapes."""
        for key, adapter_key in self.replaced.items():
            if key not in shapes:
                raise ValueError(f"{self.path}: {adapter_key} replaces {key}, which the base model does not have")
        with safe_open(self.path, "pt") as f:
            for key, (a_key, b_key) in self.lora.items():
                a, b = f.get_slice(a_key).get_shape(), f.get_slice(b_key).get_shape()
                if key not in shapes:
                    raise ValueError(f"{self.path}: LoRA on {key.removesuffix('.weight')}, which the base model "
                                     "does not have")
                if len(shapes[key]) != 2 or a[1] != shapes[key][1] or b[0] != shapes[key][0] or a[0] != b[1]:
                    raise ValueError(f"{self.path}: LoRA shapes {a_key} {a}, {b_key} {b} do not fit {key} "
                                     f"{list(shapes[key])}")

    def source(self, key: str, base_files: dict[str, Path]) -> tuple[Path, str]:
        """The file and key to read the base's weight `key` from: the adapter's copy if it saved one."""
        return (self.path, self.replaced[key]) if key in self.replaced else (base_files[key], key)

    def merged(self, key: str, weight: torch.Tensor) -> torch.Tensor:
        """`weight` (read from `source(key)`) as the merged model has it, in fp32 (non-floating ones unchanged)."""
        if not weight.is_floating_point():
            return weight
        weight = weight.to(torch.float32)  # the caller's own tensor (safe_open copies): changed in place below
        if key in self.lora:
            with safe_open(self.path, "pt") as f:
                a_key, b_key = self.lora[key]
                lora_a, lora_b = (f.get_tensor(k).to(torch.float32) for k in (a_key, b_key))
            # peft: base_layer.weight.data += get_delta_weight(), the delta being (B @ A) * scaling in fp32.
            # In place, the same operations: two fp32 copies of the weight at most, not four.
            delta = lora_b @ lora_a
            delta *= self.scaling[key]
            weight += delta
        return weight


def _base_weights(base) -> dict[str, Path]:
    """Which safetensors file of the base holds each weight (a hub id: its snapshot, fetched if missing)."""
    folder = base_model_folder(base)
    files = _weight_files(folder)
    if not files and not Path(base).is_dir():
        from huggingface_hub import snapshot_download

        patterns = ["model*.safetensors", "model.safetensors.index.json"]
        try:
            folder = Path(snapshot_download(str(base), allow_patterns=patterns))
        except Exception:
            folder = Path(snapshot_download(str(base), allow_patterns=patterns, local_files_only=True))
        files = _weight_files(folder)
    if not files:
        raise ValueError(f"the base model {base}: no model*.safetensors in {folder} (merging reads safetensors)")
    where = {}
    for path in files:
        with safe_open(path, "pt") as f:
            where.update(dict.fromkeys(f.keys(), path))
    return where


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _write_safetensors(path: Path, entries: list[tuple[str, torch.dtype, list[int], int]], tensors):
    """A safetensors file of `entries` (key, dtype, shape, bytes), whose tensors `tensors` yields one by one.

    The header (sizes and offsets) is known before any tensor is: each one is written as soon as it is
    made, so only one is in memory at a time.
    """
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, dtype, shape, size in entries:
        header[key] = {"dtype": SAFETENSORS_DTYPE_NAMES[dtype], "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format aligns the tensors' bytes on 8

    def write(tmp):
        with open(tmp, "wb") as out:
            out.write(len(head).to_bytes(8, "little") + head)
            made = iter(tensors)  # not zip(): it would keep the previous tensor while the next is made
            for key, dtype, shape, size in entries:
                name, tensor = next(made)
                assert name == key and tensor.dtype == dtype and list(tensor.shape) == shape, (key, name)
                out.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
                del tensor  # before the next one is made

    _write_atomically(path, write)


def write_sharded(folder, entries: list[tuple[str, torch.dtype, list[int], int]], make, max_shard_bytes=None):
    """Write `entries` (key, dtype, shape, bytes) as `folder`'s model*.safetensors, `make(key, dtype)` giving
    each tensor when its turn comes: at most one in memory at a time.

    Shards of at most `max_shard_bytes` (default MAX_SHARD_BYTES) in the entries' order, named and indexed
    as transformers' save_pretrained and the hub do (one shard: model.safetensors, no index).
    """
    folder = Path(folder)
    shards, max_shard_bytes = [[]], max_shard_bytes or MAX_SHARD_BYTES
    for entry in entries:
        if shards[-1] and sum(e[3] for e in shards[-1]) + entry[3] > max_shard_bytes:
            shards.append([])
        shards[-1].append(entry)
    names = _shard_names(len(shards))
    folder.mkdir(parents=True, exist_ok=True)
    for stale in [*_weight_files(folder), folder / "model.safetensors.index.json"]:
        if stale.name not in names and stale.exists():
            stale.unlink()  # a previous save's shards would mix with these

    def made(shard):
        for key, dtype, _, _ in shard:
            tensor = make(key, dtype)
            yield key, tensor
            del tensor  # before the next one is made

    for name, shard in zip(names, shards):
        _write_safetensors(folder / name, shard, made(shard))
    if len(names) > 1:
        _write_json(folder / "model.safetensors.index.json", {
            "metadata": {"total_size": sum(e[3] for e in entries)},
            "weight_map": {e[0]: name for name, shard in zip(names, shards) for e in shard},
        })  # fmt: skip


def merge_into_shards(adapter_dir, base, output_dir, dtype: torch.dtype, max_shard_bytes: int | None = None):
    """Write base + adapter, merged, as `output_dir`'s model*.safetensors in `dtype` (+ config.json).

    The bytes `merge_and_unload` on the base in fp32 gives once cast to `dtype`, one weight at a time: each
    is read from the base's shards, upcast to fp32 while its delta is added, cast and written. The weights
    are the ones the model class has (as its save_pretrained writes them: a key of the base that phi3v
    ignores on load is left out too).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    output_dir = Path(output_dir)
    lora = LoraMerge(adapter_dir)
    where = _base_weights(base)
    config = AutoConfig.from_pretrained(str(base_model_folder(base)))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    ignored = getattr(model, "_keys_to_ignore_on_save", None) or ()
    expected = {k: v for k, v in model.state_dict().items() if k not in ignored}
    missing = [k for k in expected if k not in where and k not in lora.replaced]
    if missing:
        raise ValueError(f"the base model {base} lacks {len(missing)} weight(s) of {type(model).__name__}: "
                         f"{', '.join(missing[:3])}")
    entries, shapes = [], {}
    for key, meta in expected.items():  # the safetensors headers only: no weight is read yet
        source, name = lora.source(key, where)
        with safe_open(source, "pt") as f:
            shape = f.get_slice(name).get_shape()
        if list(shape) != list(meta.shape):  # what from_pretrained would refuse
            raise ValueError(f"{source}: {name} has shape {list(shape)}, {type(model).__name__} {list(meta.shape)}")
        out_dtype = dtype if meta.is_floating_point() else meta.dtype
        entries.append((key, out_dtype, list(shape), math.prod(shape) * out_dtype.itemsize))
        shapes[key] = meta.shape
    lora.check(shapes)

    def merged(key, out_dtype):
        source, name = lora.source(key, where)
        with safe_open(source, "pt") as f:  # opened per weight: no file stays mapped
            weight = f.get_tensor(name)
        return lora.merged(key, weight).to(out_dtype)

    write_sharded(output_dir, entries, merged, max_shard_bytes)
    # config.json and generation_config.json as the model's save_pretrained writes them (finish_drop_in
    # then gives config.json the official form and copies the base's generation_config.json over).
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(str(output_dir))
    if model.can_generate():
        model.generation_config.save_pretrained(str(output_dir))
    return output_dir


def save_merged(adapter_dir, output_dir, base=None, dtype: torch.dtype | None = None, num_crops: int | None = None):
    """Merge a LoRA/QLoRA adapter into its base and write a drop-in folder; returns the folder.

    `base`: default the adapter's base_model_name_or_path. `dtype`: default the base's (config.json).
    The processor settings (num_crops) are those saved with the adapter, else the base's. The weights are
    those of peft's `merge_and_unload` on the base in fp32 (never the 4-bit one of a QLoRA run) cast to
    `dtype`, bit for bit, but made one weight at a time (`merge_into_shards`): memory stays about one fp32
    weight, not the model.
    """
    base = base or adapter_base(adapter_dir)
    dtype = dtype or base_dtype(base) or torch.float32
    processor = run_processor(adapter_dir, base, num_crops)
    merge_into_shards(adapter_dir, base, output_dir, dtype)
    return finish_drop_in(output_dir, base, processor.image_processor)
