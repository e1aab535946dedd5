"""Write a small random Phi-3.5-vision in the official layout, with the real tokenizer.

    python -m phi3v.tiny --output_dir tiny-phi3v

The decoder and the CLIP tower are shrunk through the config (a `vision_config` dict); everything
else is the real model's: vocabulary and tokenizer, special tokens, `su` RoPE with 4096 original
positions (factors subsampled from the real ones to the smaller head size), HD transform, 2x2 merge
and separators, 144 tokens per crop. The folder loads with `AutoModelForCausalLM.from_pretrained`
and `AutoProcessor.from_pretrained` after `import phi3v`. Used by the tests and the quickstart.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from .configuration_phi3_v import Phi3VConfig
from .modeling_phi3_v import Phi3VForCausalLM

ASSETS = Path(__file__).parent / "assets"
PROCESSOR_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
]


def tiny_config(
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    vision_hidden_size: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 2,
    intermediate_size: int | None = None,
    vision_intermediate_size: int | None = None,
) -> Phi3VConfig:
    """The tiny config; `intermediate_size` / `vision_intermediate_size` None: twice `hidden_size` /
    `vision_hidden_size`."""
    real = json.loads((ASSETS / "config.json").read_text())
    half_head = hidden_size // num_heads // 2
    step = len(real["rope_scaling"]["long_factor"]) // half_head

    def subsample(factors):
        return [float(f) for f in factors[::step][:half_head]]

    overrides = dict(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        rope_scaling={
            "type": "su",
            "long_factor": subsample(real["rope_scaling"]["long_factor"]),
            "short_factor": subsample(real["rope_scaling"]["short_factor"]),
        },
        img_processor={**real["img_processor"], "image_dim_out": vision_hidden_size},
        vision_config=dict(
            hidden_size=vision_hidden_size,
            intermediate_size=vision_intermediate_size or 2 * vision_hidden_size,
            num_hidden_layers=vision_layers,
            num_attention_heads=vision_heads,
        ),
    )
    config = {k: v for k, v in real.items() if k not in ("torch_dtype", "transformers_version")}
    config.update(overrides)
    return Phi3VConfig.from_dict(config)


def make_tiny_model(output_dir: str | Path, seed: int = 0, num_crops: int = 4, **sizes) -> Path:
    """Write the tiny model and its processor files to `output_dir`; returns the folder."""
    output_dir = Path(output_dir)
    torch.manual_seed(seed)
    model = Phi3VForCausalLM(tiny_config(**sizes))
    with torch.no_grad():
        # The official initialisation leaves the separators at zero; random ones make the tests
        # notice a separator in the wrong place.
        model.model.vision_embed_tokens.glb_GN.normal_()
        model.model.vision_embed_tokens.sub_GN.normal_()
    model.save_pretrained(output_dir)
    for name in PROCESSOR_FILES:
        shutil.copy(ASSETS / name, output_dir / name)
    preprocessor = json.loads((output_dir / "preprocessor_config.json").read_text())
    preprocessor["num_crops"] = num_crops
    (output_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    return output_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="folder to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    parser.add_argument("--num_crops", type=int, default=4, help="num_crops written to preprocessor_config.json")
    parser.add_argument("--hidden_size", type=int, default=64, help="decoder hidden size")
    parser.add_argument("--num_layers", type=int, default=2, help="decoder layers")
    parser.add_argument("--num_heads", type=int, default=4, help="decoder attention heads")
    parser.add_argument("--vision_hidden_size", type=int, default=32, help="CLIP hidden size")
    parser.add_argument("--vision_layers", type=int, default=2, help="CLIP layers (features come from layer -2)")
    parser.add_argument("--vision_heads", type=int, default=2, help="CLIP attention heads")
    parser.add_argument("--vision_intermediate_size", type=int, default=None,
                        help="CLIP MLP width (default: twice --vision_hidden_size; the real CLIP ViT-L/14-336: 4096)")
    args = parser.parse_args(argv)
    out = make_tiny_model(
        args.output_dir,
        seed=args.seed,
        num_crops=args.num_crops,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        vision_hidden_size=args.vision_hidden_size,
        vision_layers=args.vision_layers,
        vision_heads=args.vision_heads,
        vision_intermediate_size=args.vision_intermediate_size,
    )
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print(f"wrote a tiny Phi-3.5-vision to {out} ({size:.1f} MiB)")


if __name__ == "__main__":
    main()
