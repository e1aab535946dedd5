"""Configuration of Phi-3-vision / Phi-3.5-vision (model_type ``phi3_v``).

The official ``config.json`` is a Phi-3 decoder config plus three keys for the vision side:

* ``img_processor``: ``{"model_name": "openai/clip-vit-large-patch14-336", "image_dim_out": 1024,
  "num_img_tokens": 144, "name": "clip_vision_model"}`` and optionally ``layer_idx`` (default -2)
  and ``type_feature`` (default ``"patch"``);
* ``embd_layer``: ``{"embedding_cls": "image", "hd_transform_order": "sub_glb", ...}``;
* ``rope_scaling``: ``{"type": "su", "short_factor": [...], "long_factor": [...]}``.

transformers calls the ``su`` scheme ``longrope`` and, in 5.x, fails on a config that still says
``su``. This class rewrites it on load and writes the official form back on save, so a folder saved
here loads in the official remote code and the other way round.

An optional ``vision_config`` (fields of ``CLIPVisionConfig``) replaces the default CLIP
ViT-L/14-336 tower. The official checkpoints do not carry it; small test models do.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import CLIPVisionConfig, Phi3Config

# The tower the official code hard-codes for model_name "openai/clip-vit-large-patch14-336".
CLIP_VIT_LARGE_PATCH14_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    attention_dropout=0.0,
    dropout=0.0,
    initializer_range=0.02,
    initializer_factor=1.0,
)

DEFAULT_IMG_PROCESSOR = {
    "image_dim_out": 1024,
    "model_name": "openai/clip-vit-large-patch14-336",
    "name": "clip_vision_model",
    "num_img_tokens": 144,
}

DEFAULT_EMBD_LAYER = {
    "embedding_cls": "image",
    "hd_transform_order": "sub_glb",
    "projection_cls": "mlp",
    "use_hd_transform": True,
    "with_learnable_separator": True,
}

# Written into every saved config.json, so that the official remote code files, dropped next to
# the weights, load them with trust_remote_code as before.
OFFICIAL_AUTO_MAP = {
    "AutoConfig": "configuration_phi3_v.Phi3VConfig",
    "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM",
}


def _to_official_rope_scaling(rope_parameters: dict | None) -> dict | None:
    """Phi3VConfig.rope_parameters -> the `rope_scaling` dict the official config.json carries."""
    if not rope_parameters or rope_parameters.get("rope_type", "default") == "default":
        return None
    return {
        "long_factor": list(rope_parameters["long_factor"]),
        "short_factor": list(rope_parameters["short_factor"]),
        # The official configuration class accepts only "su" and "yarn".
        "type": "su" if rope_parameters["rope_type"] == "longrope" else rope_parameters["rope_type"],
    }


class Phi3VConfig(Phi3Config):
    r"""Phi-3.5-vision configuration: a `Phi3Config` for the decoder plus the vision settings.

    Args:
        img_processor (`dict`, *optional*): as in the official config.json. `image_dim_out` must equal
            the vision tower's hidden size; `layer_idx` (default -2) picks the CLIP hidden state the
            features come from; `num_img_tokens` is 144 (12x12 merged patches per 336x336 crop).
        embd_layer (`dict`, *optional*): as in the official config.json; only the HD transform with
            learnable separators, MLP projection and `sub_glb` order exists for this model.
        vision_config (`dict` or `CLIPVisionConfig`, *optional*): replaces the default CLIP
            ViT-L/14-336 tower (smaller towers for tests). `image_size` must stay 336 and
            `patch_size` 14, because the HD transform cuts 336x336 crops into 24x24 patches.
    """

    model_type = "phi3_v"
    sub_configs_defaults = {"vision_config": CLIPVisionConfig}

    img_processor: dict | None = None
    embd_layer: dict | str | None = None
    vision_config: dict | CLIPVisionConfig | None = None

    def __post_init__(self, **kwargs):
        if self.img_processor is None:
            self.img_processor = dict(DEFAULT_IMG_PROCESSOR)
        if self.embd_layer is None or self.embd_layer == "default":
            self.embd_layer = dict(DEFAULT_EMBD_LAYER)
        if self.vision_config is None:
            self.vision_config = dict(CLIP_VIT_LARGE_PATCH14_336)
        elif isinstance(self.vision_config, dict):
            # Fields left out keep the ViT-L/14-336 values, not CLIPVisionConfig's (224, patch 32).
            self.vision_config = {**CLIP_VIT_LARGE_PATCH14_336, **self.vision_config}
        # The official config.json says "flash_attention_2", which would fail on any machine without
        # flash-attn. The attention backend is a load-time choice (`attn_implementation=`), sdpa by
        # default, so the stored value is ignored.
        kwargs.pop("_attn_implementation", None)
        # `auto_map` points at the official remote code; registering this package with the Auto
        # classes makes it unnecessary, and keeping it would make transformers ask about remote code.
        kwargs.pop("auto_map", None)
        super().__post_init__(**kwargs)
        self._validate_vision()

    def convert_rope_params_to_dict(self, default_theta=10_000.0, ignore_keys=None, **kwargs):
        # transformers renames su -> longrope only after standardising the dict, and then misses
        # `original_max_position_embeddings` (a KeyError in 5.x). Rename first.
        rope_scaling = kwargs.get("rope_scaling") or self.rope_parameters
        if isinstance(rope_scaling, dict):
            rope_scaling = dict(rope_scaling)
            kind = rope_scaling.pop("type", None) or rope_scaling.get("rope_type")
            if kind == "su":
                kind = "longrope"
            if kind is not None:
                rope_scaling["rope_type"] = kind
            if kind == "longrope":
                rope_scaling.setdefault("original_max_position_embeddings", self.original_max_position_embeddings)
                # The attention scaling of `su` uses max / original positions (32 for the real model).
                rope_scaling.setdefault(
                    "factor", self.max_position_embeddings / rope_scaling["original_max_position_embeddings"]
                )
            if "rope_scaling" in kwargs:
                kwargs["rope_scaling"] = rope_scaling
            else:
                self.rope_parameters = rope_scaling
        return super().convert_rope_params_to_dict(default_theta=default_theta, ignore_keys=ignore_keys, **kwargs)

    def _validate_vision(self):
        vc = self.vision_config
        if vc.image_size != 336 or vc.patch_size != 14:
            raise ValueError(
                "Phi-3-vision cuts images into 336x336 crops of 24x24 patches of 14 pixels: "
                f"vision_config needs image_size=336 and patch_size=14, got {vc.image_size} and {vc.patch_size}."
            )
        dim_out = self.img_processor.get("image_dim_out", vc.hidden_size)
        if dim_out != vc.hidden_size:
            raise ValueError(
                f"img_processor.image_dim_out ({dim_out}) must equal vision_config.hidden_size ({vc.hidden_size})."
            )
        layer_idx = self.img_processor.get("layer_idx", -2)
        if not -vc.num_hidden_layers - 1 <= layer_idx <= vc.num_hidden_layers:
            raise ValueError(
                f"img_processor.layer_idx={layer_idx} is outside the {vc.num_hidden_layers}-layer vision tower."
            )
        if self.img_processor.get("type_feature", "patch") != "patch":
            raise ValueError("Only img_processor.type_feature='patch' (CLS token dropped) is supported.")
        if isinstance(self.embd_layer, dict) and self.embd_layer.get("hd_transform_order", "sub_glb") != "sub_glb":
            raise ValueError("Only embd_layer.hd_transform_order='sub_glb' exists for Phi-3-vision.")

    @property
    def vision_layer_idx(self) -> int:
        """Index into CLIP's hidden states (embeddings = 0) that the image features come from."""
        return self.img_processor.get("layer_idx", -2)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        # Write the official form: `rope_scaling` with type "su", `rope_theta` at the top level.
        rope_parameters = out.pop("rope_parameters", None) or {}
        out["rope_theta"] = rope_parameters.get("rope_theta", 10000.0)
        out["rope_scaling"] = _to_official_rope_scaling(rope_parameters)
        vision = out.get("vision_config")
        if isinstance(vision, dict) and self._is_default_vision_tower():
            out.pop("vision_config")  # the official layout has no such key for the real tower
        out["auto_map"] = dict(OFFICIAL_AUTO_MAP)
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        # The diff against class defaults would drop keys the official code requires.
        out = self.to_dict()
        for key in ("transformers_version",):
            out.setdefault(key, None)
        return out

    def _is_default_vision_tower(self) -> bool:
        vc = self.vision_config
        return all(getattr(vc, key) == value for key, value in CLIP_VIT_LARGE_PATCH14_336.items())
