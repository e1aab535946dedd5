"""Training FLOPs of Phi-3.5-vision from its config: decoder, lm_head, CLIP tower and projector.

Counting rules (multiply-add = 2 FLOPs):

* A weight matrix with P parameters costs 2P per token forward, 2P backward for the input gradient
  and 2P for the weight gradient: 6P when trained, 4P when frozen but the gradient flows through it
  (LoRA and QLoRA base weights), 2P when nothing below it needs a gradient (a frozen vision tower).
* Causal decoder attention over a sequence of L tokens: 2 * L^2 * hidden per layer forward (QK^T and
  AV, each L^2 * hidden for the causal half), times 3 with the backward pass. A packed row counts
  each sample's own L^2 (what flash-attn's varlen kernel computes).
* CLIP attention, bidirectional over 577 positions (576 patches + CLS): 4 * 577^2 * hidden per
  layer forward, times 3 when the gradient flows into the tower.
* lm_head: 2 * hidden * vocab per position forward, for every position whose logits are built
  (all of them in the original loss, only the supervised ones in phi3v's).
* Embedding lookups, norms, activations and the optimizer step are left out (small).
"""

from __future__ import annotations

from dataclasses import dataclass

CLIP_POSITIONS = 577  # 24 x 24 patches + CLS
PATCHES = 576

# weight multiplier (decoder, lm_head, vision, projector) and whether the gradient enters CLIP
STRATEGY_MULTIPLIERS = {
    "full": dict(decoder=6, head=6, vision=6, projector=6, vision_backward=True),
    "frozen_vision": dict(decoder=6, head=6, vision=2, projector=2, vision_backward=False),
    "lora": dict(decoder=4, head=4, vision=4, projector=4, vision_backward=True),
    "qlora": dict(decoder=4, head=4, vision=4, projector=4, vision_backward=True),
}


@dataclass(frozen=True)
class Architecture:
    hidden: int
    layers: int
    vocab: int
    decoder_layer_params: int
    vision_hidden: int
    vision_layers_used: int
    vision_layer_params: int
    patch_params: int
    projector_params: int

    @classmethod
    def from_config(cls, config) -> "Architecture":
        head_dim = config.hidden_size // config.num_attention_heads
        qkv = config.hidden_size * (config.num_attention_heads + 2 * config.num_key_value_heads) * head_dim
        out = config.num_attention_heads * head_dim * config.hidden_size
        mlp = 3 * config.hidden_size * config.intermediate_size  # gate_up (2 x) and down
        vision = config.vision_config
        used = config.vision_layer_idx % (vision.num_hidden_layers + 1)
        return cls(
            hidden=config.hidden_size,
            layers=config.num_hidden_layers,
            vocab=config.vocab_size,
            decoder_layer_params=qkv + out + mlp,
            vision_hidden=vision.hidden_size,
            vision_layers_used=used,
            vision_layer_params=4 * vision.hidden_size**2 + 2 * vision.hidden_size * vision.intermediate_size,
            patch_params=3 * vision.patch_size**2 * vision.hidden_size,
            projector_params=4 * vision.hidden_size * config.hidden_size + config.hidden_size**2,
        )

    @property
    def decoder_params(self) -> int:
        return self.layers * self.decoder_layer_params

    def crop_flops(self, strategy: str) -> float:
        """One 336x336 crop through the CLIP layers the features need."""
        m = STRATEGY_MULTIPLIERS[strategy]
        weights = m["vision"] * (self.vision_layers_used * self.vision_layer_params * CLIP_POSITIONS
                                 + self.patch_params * PATCHES)
        attention = (3 if m["vision_backward"] else 1) * 4 * CLIP_POSITIONS**2 * self.vision_hidden
        return weights + attention * self.vision_layers_used

    def token_flops(self, strategy: str) -> float:
        """One decoder token, without attention and lm_head."""
        return STRATEGY_MULTIPLIERS[strategy]["decoder"] * self.decoder_params

    def attention_flops(self, length_squared: float) -> float:
        """Causal decoder attention, training, for sum of L^2 over the sequences."""
        return 3 * 2 * length_squared * self.hidden * self.layers

    def logit_flops(self, strategy: str) -> float:
        """lm_head for one position."""
        return STRATEGY_MULTIPLIERS[strategy]["head"] * self.hidden * self.vocab

    def projector_flops(self, strategy: str) -> float:
        """One image token through img_projection."""
        return STRATEGY_MULTIPLIERS[strategy]["projector"] * self.projector_params

    def step_flops(self, strategy: str, *, tokens, length_squared, logit_positions, crops, image_tokens) -> float:
        """Training FLOPs for a micro-batch described by its counts."""
        return (
            tokens * self.token_flops(strategy)
            + self.attention_flops(length_squared)
            + logit_positions * self.logit_flops(strategy)
            + crops * self.crop_flops(strategy)
            + image_tokens * self.projector_flops(strategy)
        )


def batch_counts(batch_stats: dict, *, executed: bool, attn: str | None = None) -> dict:
    """Counts for `Architecture.step_flops` from what the bench records about one micro-batch.

    executed=False: the useful work (real tokens, each sample's own causal attention, supervised
    logits, real crops), the same for every configuration of the same samples; MFU uses it.
    executed=True: what the configuration computes: padding tokens, padding crops, full-vocabulary
    logits, and attention as the backend runs it. flash_attention_2 (varlen) and sdpa on a packed
    row (phi3v.packing runs it sample by sample) compute each sample's causal block; sdpa skips the
    masked half only when it needs no mask; eager and padded sdpa compute the whole L x L matrix of
    every row, twice the causal count (eager on a packed row: the matrix of all its samples). `attn` overrides the backend the
    batch ran with (the full-size architecture is counted as flash_attention_2 runs it).
    """
    lengths = batch_stats["lengths"]
    own = sum(n * n for n in lengths)
    if not executed:
        return dict(tokens=sum(lengths), length_squared=own, logit_positions=batch_stats["supervised"],
                    crops=batch_stats["real_crops"], image_tokens=batch_stats["image_tokens"])
    rows = [sum(lengths)] if batch_stats["packed"] else [max(lengths)] * len(lengths)
    padded = not batch_stats["packed"] and min(lengths) != max(lengths)
    attn = attn or batch_stats["attn"]
    if attn.startswith("flash_attention") or (attn == "sdpa" and batch_stats["packed"]):
        length_squared = own  # varlen kernel / phi3v's per-sample sdpa (phi3v.packing)
    elif attn == "eager" or batch_stats["packed"] or padded:
        length_squared = 2 * sum(n * n for n in rows)
    else:
        length_squared = sum(n * n for n in rows)
    tokens = sum(rows)
    return dict(
        tokens=tokens,
        length_squared=length_squared,
        logit_positions=tokens if batch_stats["full_vocab_loss"] else batch_stats["supervised"],
        crops=batch_stats["slots"] if batch_stats["all_slots"] else batch_stats["real_crops"],
        image_tokens=batch_stats["image_tokens"],
    )
