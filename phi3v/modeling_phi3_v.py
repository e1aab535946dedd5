"""Phi-3-vision / Phi-3.5-vision on transformers' own Phi-3 decoder and CLIP vision modules.

Checkpoint layout (unchanged from the official release, so weights load and save both ways):

    model.embed_tokens.weight                              token embedding (shared with the image embedder)
    model.layers.N.*, model.norm.weight, lm_head.weight    transformers' Phi-3 decoder
    model.vision_embed_tokens.img_processor.vision_model.* transformers' CLIP vision modules
    model.vision_embed_tokens.glb_GN / sub_GN              learnable separators
    model.vision_embed_tokens.img_projection.{0,2}.*       MLP projector (Linear, GELU, Linear)

How an image becomes tokens (the processor has already made the HD crops):

    crops [1 + h*w real, 3, 336, 336]  --CLIP, hidden state layer_idx (-2), CLS dropped-->  [n, 576, C]
    each crop: 24x24 patches -> 2x2 neighbours concatenated -> 12x12 tokens of 4C
    sub-crops stitched row-major into a (12h x 12w) grid, sub_GN appended to every row
    tokens = [sub grid + separators] + [glb_GN] + [global crop 12x12 + separators] -> img_projection

The processor marks image positions with negative ids (-k for image k), one per image token; the
features are written into those positions in row-major order over (batch, sequence).

Differences from the official remote code, none of which changes a number:

* Only the real crops (1 + h*w of each image's num_crops + 1 slots) go through CLIP, in one batch
  for all images; the official code also encodes the zero padding crops and throws them away. An
  image that repeats an earlier one of the batch exactly (DPO's chosen and rejected rows) is encoded
  once and its features used for both.
* CLIP runs only the layers the features need (23 of 24 for layer_idx -2). The last layer and the
  post-layernorm stay in the checkpoint but get `requires_grad=False`, since they never receive a
  gradient (this is what lets DDP run without `find_unused_parameters`).
* With labels in training mode, the loss uses the logits of the supervised positions only (the
  fp32 logits of the whole sequence are never built) and is normalised by `num_items_in_batch`
  when the Trainer passes it, i.e. per token across gradient accumulation. `logits` is then None.
* A training step on a batch without images still touches the vision tower (x0), so distributed
  runs where only some ranks see images do not hang; under DeepSpeed ZeRO-3 every forward does.
* Under non-reentrant gradient checkpointing the sdpa kernels' outputs are kept, so the backward
  pass does not recompute attention (`attention_outputs_kept`); the gradients are bit-identical.
* Padding-free packing (`phi3v.pack_examples`): several samples in one row, `position_ids`
  restarting at each sample, `cu_seq_lens_q/k` at the boundaries and no `attention_mask`.
  flash_attention_2 runs its varlen kernel; sdpa runs each sample's own causal attention
  (`phi3v.packing.segment_sdpa_attention`); eager gets transformers' block-diagonal mask built
  from the position restarts. Each sample gives what it gives alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts
from transformers import initialization as init
from transformers.generation.logits_process import LogitsProcessor, RepetitionPenaltyLogitsProcessor
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.clip.modeling_clip import CLIPEncoder, CLIPVisionEmbeddings
from transformers.models.phi3.modeling_phi3 import Phi3ForCausalLM, Phi3Model, Phi3PreTrainedModel
from transformers.utils import can_return_tuple

from .configuration_phi3_v import Phi3VConfig

CROP_SIZE = 336
MAX_INPUT_ID = int(1e9)  # ids in (-1e9, 0) are image positions, as in the official processor


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None (another C library, another OS)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_cpu_memory(tensor: torch.Tensor) -> None:
    """When the backward pass reaches `tensor` (a CPU tensor), hand the heap memory freed so far back
    to the OS.

    glibc keeps freed blocks below its (self-raising) mmap threshold in the heap; a training step's
    many mid-size temporaries then leave the process holding several hundred MB it no longer uses,
    and the next phase (the backward pass, then CLIP's backward) allocates on top of that. One
    malloc_trim at each of these two points cost about 1 % of a CPU step and lowered the peak RSS
    of a DocVQA page's step by a quarter. Nothing numeric changes."""
    trim = _malloc_trim()
    if trim is None or tensor.device.type != "cpu" or not tensor.requires_grad:
        return

    def hook(grad):
        trim(0)
        return grad

    tensor.register_hook(hook)


class Phi3VVisionTower(nn.Module):
    """CLIP vision transformer (transformers' modules), keyed like the official `vision_model`."""

    def __init__(self, vision_config):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(vision_config)
        self.pre_layrnorm = nn.LayerNorm(vision_config.hidden_size, eps=vision_config.layer_norm_eps)
        self.encoder = CLIPEncoder(vision_config)
        self.post_layernorm = nn.LayerNorm(vision_config.hidden_size, eps=vision_config.layer_norm_eps)

    def hidden_state(self, pixel_values: torch.Tensor, num_layers: int) -> torch.Tensor:
        """Hidden state after `num_layers` encoder layers (== CLIP's `hidden_states[num_layers]`)."""
        hidden = self.pre_layrnorm(self.embeddings(pixel_values))
        for layer in self.encoder.layers[:num_layers]:
            hidden = layer(hidden, None)
        return hidden


class Phi3VImageEmbedding(nn.Module):
    """Turns HD crops into projected image tokens and writes them into the token embeddings."""

    def __init__(self, config: Phi3VConfig):
        super().__init__()
        vision_config = config.vision_config
        dim = vision_config.hidden_size
        self.image_dim_out = dim
        self.num_tokens_per_crop = config.img_processor.get("num_img_tokens", 144)
        # ModuleDict only to keep the official key prefix `img_processor.vision_model.`.
        self.img_processor = nn.ModuleDict({"vision_model": Phi3VVisionTower(vision_config)})
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, dim * 4))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, dim * 4))
        self.img_projection = nn.Sequential(
            nn.Linear(dim * 4, config.hidden_size), nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size)
        )
        self.drop = nn.Dropout(config.embd_pdrop)

        # hidden_states has num_layers + 1 entries (the embeddings first), so layer_idx -2 means
        # "after layer 23 of 24". Layers past that one, and the post-layernorm, never contribute.
        num_layers = vision_config.num_hidden_layers
        self.num_vision_layers_used = config.vision_layer_idx % (num_layers + 1)
        self.freeze_unused_vision_layers()

    def freeze_unused_vision_layers(self):
        tower = self.img_processor["vision_model"]
        for unused in [*tower.encoder.layers[self.num_vision_layers_used :], tower.post_layernorm]:
            unused.requires_grad_(False)

    @property
    def vision_tower(self) -> Phi3VVisionTower:
        return self.img_processor["vision_model"]

    def crop_features(self, crops: torch.Tensor) -> torch.Tensor:
        """[n, 3, 336, 336] -> [n, 576, C]: patch features without the CLS token.

        In training under gradient checkpointing the crops go through CLIP a few at a time: each
        crop's features depend on that crop alone, and the backward pass then recomputes one layer
        for `crops_per_checkpointed_batch` crops at a time instead of for all of them (a page at
        num_crops 16 has 17), which bounds the largest transient of a training step."""
        dtype = self.vision_tower.embeddings.patch_embedding.weight.dtype
        crops = crops.to(dtype)
        chunk = self.crops_per_checkpointed_batch if self._checkpointing_vision() else len(crops)
        if len(crops) <= chunk:
            return self.vision_tower.hidden_state(crops, self.num_vision_layers_used)[:, 1:]
        return torch.cat([self.vision_tower.hidden_state(part, self.num_vision_layers_used)[:, 1:]
                          for part in crops.split(chunk)])

    # Crops per CLIP batch when the vision layers are checkpointed in training (see crop_features).
    crops_per_checkpointed_batch = 4

    def _checkpointing_vision(self) -> bool:
        return self.training and torch.is_grad_enabled() and any(
            getattr(layer, "gradient_checkpointing", False) for layer in self.vision_tower.encoder.layers)

    @staticmethod
    def _merge_2x2(features: torch.Tensor) -> torch.Tensor:
        """[n, 576, C] -> [n, 12, 12, 4C]: each 2x2 block of patches concatenated along channels."""
        n, num_patches, dim = features.shape
        side = int(num_patches**0.5)
        merged = features.reshape(n, side // 2, 2, side // 2, 2, dim).permute(0, 1, 3, 2, 4, 5)
        return merged.reshape(n, side // 2, side // 2, 4 * dim)

    def _with_row_separators(self, grids: torch.Tensor) -> torch.Tensor:
        """[n, H, W, 4C] -> [n, H * (W + 1), 4C], with sub_GN closing every row."""
        n, rows = grids.shape[:2]
        separators = self.sub_GN.reshape(1, 1, 1, -1).expand(n, rows, 1, -1)
        return torch.cat([grids, separators], dim=2).reshape(n, -1, grids.shape[-1])

    def image_tokens(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """Projected tokens of all images, concatenated in order: [sum of tokens per image, hidden]."""
        if pixel_values.dim() != 5 or pixel_values.shape[2:] != (3, CROP_SIZE, CROP_SIZE):
            raise ValueError(
                f"pixel_values must be [num_images, num_crops + 1, 3, 336, 336], got {tuple(pixel_values.shape)}"
            )
        image_sizes = torch.as_tensor(image_sizes).reshape(-1, 2).tolist()
        if len(image_sizes) != pixel_values.shape[0]:
            raise ValueError(f"{pixel_values.shape[0]} images in pixel_values but {len(image_sizes)} image_sizes")
        grids = [(int(h) // CROP_SIZE, int(w) // CROP_SIZE) for h, w in image_sizes]
        slots = pixel_values.shape[1]
        for rows, cols in grids:
            if rows * cols + 1 > slots:
                raise ValueError(f"image_sizes ask for {rows}x{cols} crops but pixel_values has {slots} slots")

        # Encode only the real crops, in one CLIP batch: the global crops of all images first, then
        # the rows*cols sub-crops of each image. One `split` hands the features back out (its
        # backward is a single concatenation; indexing per image would allocate a gradient the
        # size of the whole batch once per image). An image that is an exact copy of an earlier one
        # in the batch (DPO's chosen and rejected rows carry the same images) reuses its features.
        sub_counts = [rows * cols for rows, cols in grids]
        first_copy = self._first_copies(pixel_values, grids, sub_counts)
        encoded = sorted(set(first_copy))
        global_crops = pixel_values[:, 0] if len(encoded) == len(grids) else pixel_values[encoded, 0]
        sub_crops = [pixel_values[i, 1 : 1 + sub_counts[i]] for i in encoded]
        features = self._merge_2x2(self.crop_features(torch.cat([global_crops, *sub_crops])))
        global_features, *sub_features = features.split([len(encoded), *(sub_counts[i] for i in encoded)])
        side = global_features.shape[1]
        global_tokens = self._with_row_separators(global_features).unbind(0)
        slot = {image: k for k, image in enumerate(encoded)}
        sub_features = [sub_features[slot[i]] for i in first_copy]
        global_tokens = [global_tokens[slot[i]] for i in first_copy]

        tokens = []
        glb_gn = self.glb_GN.reshape(1, -1)
        for (rows, cols), sub, global_image in zip(grids, sub_features, global_tokens):
            # Sub-crops are in row-major order: stitch them into one (rows*12) x (cols*12) grid.
            grid = sub.reshape(rows, cols, side, side, -1).permute(0, 2, 1, 3, 4)
            grid = grid.reshape(1, rows * side, cols * side, -1)
            tokens += [self._with_row_separators(grid)[0], glb_gn, global_image]
        projection_in = torch.cat(tokens, dim=0)
        # dtype only: under a device_map, accelerate's hook brings the input to the projector's device
        # (an offloaded projector's own weights are on "meta" until then).
        return self.img_projection(projection_in.to(self.img_projection[0].bias.dtype))

    # Encode an image that repeats an earlier one of the batch once (see `_first_copies`).
    encode_repeated_images_once = True

    def _first_copies(self, pixel_values: torch.Tensor, grids: list, sub_counts: list) -> list[int]:
        """For each image, the index of the first image of the batch with the same crops (its own if none).

        A repeated image gives the same features, so CLIP runs on it once and its tokens are used twice;
        the gradients that reach those features add up, as those of two encodings would. Candidates
        share the crop grid and a sum over a sample of their pixels; `torch.equal` then decides. Not
        with dropout in CLIP's attention, where two encodings would be two different draws."""
        count = len(grids)
        dropout = self.training and any(layer.self_attn.dropout for layer in self.vision_tower.encoder.layers)
        if count < 2 or not self.encode_repeated_images_once or dropout:
            return list(range(count))
        sample = pixel_values.reshape(count, -1)[:, ::997].float().sum(-1).tolist()
        first_copy = []
        for i, grid in enumerate(grids):
            real = 1 + sub_counts[i]
            match = next((j for j in range(i) if first_copy[j] == j and grids[j] == grid and sample[j] == sample[i]
                          and torch.equal(pixel_values[j, :real], pixel_values[i, :real])), i)
            first_copy.append(match)
        return first_copy

    def vision_anchor(self) -> torch.Tensor:
        """A zero that depends on every trainable vision parameter (for batches without images)."""
        dummy = torch.zeros(1, 1, 3, CROP_SIZE, CROP_SIZE, device=self.glb_GN.device, dtype=self.glb_GN.dtype)
        sizes = torch.tensor([[CROP_SIZE, CROP_SIZE]])
        return self.image_tokens(dummy.expand(1, 2, -1, -1, -1), sizes).sum() * 0.0

    def _anchor_needed(self) -> bool:
        """Whether a batch without images must still run the vision tower (see `vision_anchor`).

        In training with trainable vision weights, DDP and ZeRO-2 wait for a gradient of every one on
        every rank. Under DeepSpeed ZeRO-3 (parameters carry `ds_id`) every rank must gather the same
        parameters, with or without gradients, in training and in evaluation alike.
        """
        if hasattr(self.glb_GN, "ds_id"):
            return True
        return self.training and torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())

    def forward(
        self,
        input_ids: torch.LongTensor,
        text_embeds: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_sizes: torch.Tensor | None,
    ) -> torch.Tensor:
        """`text_embeds`: the token embeddings of `input_ids` (any id at the image positions). A tensor,
        not the embedding module: accelerate's device_map hooks move every argument with `.to()`, which
        would move (or, offloaded, fail on) the shared embedding itself."""
        is_image = (input_ids < 0) & (input_ids > -MAX_INPUT_ID)
        hidden = text_embeds
        num_positions = int(is_image.sum())
        if num_positions == 0:
            if self._anchor_needed():
                # The same modules in the same order as with images (dropout included): ZeRO-3 checks
                # that every rank calls the same modules.
                return self.drop(hidden + self.vision_anchor().to(hidden.dtype))
            return hidden
        if pixel_values is None or image_sizes is None:
            raise ValueError(
                f"input_ids hold {num_positions} image positions (negative ids) but no pixel_values/image_sizes were given."
            )
        features = self.image_tokens(pixel_values, image_sizes)
        if features.shape[0] != num_positions:
            raise ValueError(
                f"The images give {features.shape[0]} image tokens but input_ids hold {num_positions} image positions. "
                "Every <|image_k|> tag must be expanded by the processor with the same images and num_crops, "
                "and image tokens must never be truncated."
            )
        release_freed_cpu_memory(features)  # before CLIP's backward
        hidden = hidden.index_put(is_image.nonzero(as_tuple=True), features.to(hidden.device, hidden.dtype))
        return self.drop(hidden)


class ImagePositionsSkipped(LogitsProcessor):
    """Runs a logits processor that indexes the vocabulary with the sequence's ids (the repetition
    penalty) on ids where the image positions (negative ids) read as one id past the vocabulary,
    which it leaves out: images are not tokens that could repeat."""

    def __init__(self, processor: LogitsProcessor):
        self.processor = processor

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        return self.processor(input_ids.masked_fill(input_ids < 0, scores.shape[-1]), scores)


# The fused attention kernels whose outputs (attention output and log-sum-exp, tokens x hidden) are
# kept under gradient checkpointing rather than recomputed (see `attention_outputs_kept`).
KEPT_UNDER_CHECKPOINTING = tuple(
    op for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
    if (op := getattr(getattr(torch.ops.aten, name, None), "default", None)) is not None
)


def attention_outputs_kept(checkpoint_func):
    """`checkpoint_func` (transformers' `functools.partial(checkpoint, use_reentrant=False, ...)`) with
    a selective-checkpointing policy that keeps the sdpa kernels' outputs.

    Plain checkpointing recomputes each layer's whole forward in the backward pass, attention
    included, although the attention backward only needs the kernel's output and log-sum-exp next to
    q, k, v (which the cheap projections recompute). Keeping those costs tokens x hidden per layer
    (5 MB for a DocVQA page at width 512) and saves the most expensive recomputation: about 5 % of a
    CPU training step. The kept values are the ones the recomputation would produce, so losses and
    gradients are bit-identical. Left alone: reentrant checkpointing (no context_fn there), a
    caller's own context_fn, and any other checkpoint function (e.g. offloading wrappers)."""
    if not (isinstance(checkpoint_func, functools.partial) and checkpoint_func.func is checkpoint):
        return checkpoint_func
    options = checkpoint_func.keywords
    if options.get("use_reentrant", True) or "context_fn" in options or not KEPT_UNDER_CHECKPOINTING:
        return checkpoint_func
    context_fn = functools.partial(create_selective_checkpoint_contexts, list(KEPT_UNDER_CHECKPOINTING))
    return functools.partial(checkpoint, *checkpoint_func.args, **options, context_fn=context_fn)


class Phi3VPreTrainedModel(Phi3PreTrainedModel):
    config_class = Phi3VConfig
    input_modalities = ("image", "text")
    _no_split_modules = ["Phi3DecoderLayer", "CLIPEncoderLayer"]

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=checkpoint,
                                    every_n_layers: int = 1):
        if enable:
            gradient_checkpointing_func = attention_outputs_kept(gradient_checkpointing_func)
        super()._set_gradient_checkpointing(enable, gradient_checkpointing_func, every_n_layers)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, CLIPVisionEmbeddings):
            std = module.config.initializer_range
            init.normal_(module.class_embedding, mean=0.0, std=module.embed_dim**-0.5)
            init.normal_(module.patch_embedding.weight, std=std)
            init.normal_(module.position_embedding.weight, std=std)
            init.copy_(module.position_ids, torch.arange(module.num_positions).expand((1, -1)))
        elif isinstance(module, Phi3VImageEmbedding):
            init.zeros_(module.glb_GN)  # as the official initialisation
            init.zeros_(module.sub_GN)


class Phi3VModel(Phi3VPreTrainedModel, Phi3Model):
    def __init__(self, config: Phi3VConfig):
        super().__init__(config)
        # The CLIP modules read the backend from the vision sub-config, which transformers only fills
        # for sub-models that are PreTrainedModels: give it the decoder's choice.
        if config.vision_config._attn_implementation is None:
            config.vision_config._attn_implementation_internal = config._attn_implementation
        self.vision_embed_tokens = Phi3VImageEmbedding(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ):
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
            text_embeds = self.embed_tokens(input_ids.clamp(min=0, max=self.embed_tokens.num_embeddings - 1))
            inputs_embeds = self.vision_embed_tokens(input_ids, text_embeds, pixel_values, image_sizes)
        if attention_mask is None and past_key_values is None and position_ids is not None and use_cache is not False:
            # A packed row (`pack_examples`: positions restart at every sample, no mask). transformers
            # finds the sample boundaries from the restarts only when no cache is passed, so the cache
            # that use_cache=True (the config default) creates would let samples attend to each other.
            if bool((position_ids.diff(dim=-1) != 1).any()):
                use_cache = False
        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
            # Positions restart after padding, so each row of a padded batch gives what it gives alone.
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            positions = attention_mask.long().cumsum(-1) - 1
            positions = positions.masked_fill(attention_mask == 0, 1)
            position_ids = positions[:, past : past + inputs_embeds.shape[1]]
        return super().forward(
            input_ids=None,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )


class Phi3VForCausalLM(Phi3VPreTrainedModel, Phi3ForCausalLM):
    """Phi-3.5-vision: `Phi3VModel` + `lm_head`, with `generate()` support.

    Inputs are what `Phi3VProcessor` returns: `input_ids` (negative ids at image positions),
    `attention_mask`, `pixel_values` [num_images, num_crops + 1, 3, 336, 336] and `image_sizes`
    [num_images, 2] for all images of the batch in reading order. `labels` use -100 (any negative
    value) for positions without loss.
    """

    _tied_weights_keys = {}
    # Some ports store the shared embedding a second time under the image embedder.
    _keys_to_ignore_on_load_unexpected = [r"model\.vision_embed_tokens\.wte\.weight"]

    def __init__(self, config: Phi3VConfig):
        Phi3PreTrainedModel.__init__(self, config)
        self.model = Phi3VModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        # Loading replaces the parameters, which resets requires_grad.
        model.model.vision_embed_tokens.freeze_unused_vision_layers()
        return model

    # `return_dict=False` (or config.return_dict False) gives `to_tuple()` of the output, as transformers'
    # causal LMs do: (loss, logits, past_key_values, ...) with the None entries left out.
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            use_cache=use_cache,
            **kwargs,
            return_dict=True,
        )
        hidden = outputs.last_hidden_state

        loss = logits = None
        if labels is not None and self.training:
            loss = self.supervised_loss(hidden, labels, num_items_in_batch)
        else:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden[:, keep, :])
            if labels is not None:
                loss = self.supervised_loss(hidden, labels, num_items_in_batch)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def supervised_loss(
        self, hidden: torch.Tensor, labels: torch.LongTensor, num_items_in_batch: int | torch.Tensor | None = None
    ) -> torch.Tensor:
        """Next-token cross-entropy over the positions whose label is >= 0.

        Only those positions go through `lm_head` (in fp32 for the softmax), so memory does not grow
        with the prompt and image length. Summed, then divided by `num_items_in_batch` (the Trainer's
        count of supervised tokens over the whole accumulated batch) or by the local count.
        """
        targets = labels[:, 1:].to(hidden.device)
        supervised = targets >= 0
        selected_hidden = hidden[:, :-1][supervised]
        logits = self.lm_head(selected_hidden).float()
        loss = F.cross_entropy(logits, targets[supervised], reduction="sum")
        release_freed_cpu_memory(loss)  # before the backward pass starts
        if num_items_in_batch is None:
            return loss / supervised.sum().clamp(min=1)
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        return loss / num_items_in_batch

    def prepare_inputs_for_generation(
        self, input_ids, pixel_values=None, image_sizes=None, inputs_embeds=None, **kwargs
    ):  # inputs_embeds named: generate() accepts it only where this signature has it
        model_inputs = super().prepare_inputs_for_generation(input_ids, inputs_embeds=inputs_embeds, **kwargs)
        step_ids = model_inputs.get("input_ids")
        # The images are needed whenever image positions are (re)computed: the first step, and the
        # step where the cache is dropped because the sequence crossed the short/long RoPE switch.
        if pixel_values is not None and step_ids is not None and bool((step_ids < 0).any()):
            model_inputs["pixel_values"] = pixel_values
            model_inputs["image_sizes"] = image_sizes
        else:
            model_inputs.pop("pixel_values", None)
            model_inputs.pop("image_sizes", None)
        return model_inputs

    def _get_logits_processor(self, *args, **kwargs):
        processors = super()._get_logits_processor(*args, **kwargs)
        for index, processor in enumerate(processors):
            if isinstance(processor, RepetitionPenaltyLogitsProcessor):
                processors[index] = ImagePositionsSkipped(processor)
        return processors

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """Beam search and num_return_sequences repeat every row `expand_size` times. transformers repeats
        every tensor along its first dim, but `pixel_values`/`image_sizes` list images, not rows: a row's
        images must repeat as a group ([a, b] -> [a, b, a, b], not [a, a, b, b]) to stay in reading order."""
        images = {key: model_kwargs.pop(key) for key in ("pixel_values", "image_sizes") if key in model_kwargs}
        expanded_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        if expand_size > 1 and images.get("pixel_values") is not None and input_ids is not None:
            # Tags number each row's images 1..n, so the most negative id of a row is -n.
            is_image = (input_ids < 0) & (input_ids > -MAX_INPUT_ID)
            images_per_row = torch.where(is_image, -input_ids, 0).amax(dim=1).tolist()
            starts = [sum(images_per_row[:row]) for row in range(len(images_per_row))]
            order = [i for start, n in zip(starts, images_per_row) for _ in range(expand_size)
                     for i in range(start, start + n)]
            if len(order) != expand_size * len(images["pixel_values"]):  # forward will name the mismatch
                order = torch.arange(len(images["pixel_values"])).repeat_interleave(expand_size)
            images = {key: None if value is None else torch.as_tensor(value)[order] for key, value in images.items()}
        model_kwargs.update(images)
        return expanded_ids, model_kwargs
