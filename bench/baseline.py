"""The original recipe's costs, reproduced on top of phi3v without changing phi3v.

* CLIP on every one of the num_crops + 1 slots of each image, zero padding crops included, in one
  batch, with the real crops picked out afterwards (so the backward pass runs over all slots too).
* The loss from fp32 logits of the whole vocabulary at every position, mean cross-entropy.
* Generation one prompt at a time (see `bench.worker`).

The image tokens and the loss value are the same as phi3v's; only the work differs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from phi3v.modeling_phi3_v import CROP_SIZE, Phi3VImageEmbedding


class AllSlotsImageEmbedding(Phi3VImageEmbedding):
    _padding_crops = 0

    def image_tokens(self, pixel_values, image_sizes):
        sizes = torch.as_tensor(image_sizes).reshape(-1, 2).tolist()
        real = sum(1 + (int(h) // CROP_SIZE) * (int(w) // CROP_SIZE) for h, w in sizes)
        self._padding_crops = pixel_values.shape[0] * pixel_values.shape[1] - real
        try:
            return super().image_tokens(pixel_values, image_sizes)
        finally:
            self._padding_crops = 0

    def crop_features(self, crops):
        # phi3v asks for the real crops only; add the zero padding slots to the same CLIP batch and
        # drop their features, as the original does (whatever order phi3v batches the real ones in).
        padding = crops.new_zeros(self._padding_crops, *crops.shape[1:])
        return super().crop_features(torch.cat([crops, padding]))[: len(crops)]


def encode_all_slots(model) -> None:
    """Make the model's image embedder encode every slot (the original code's vision cost)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.model.vision_embed_tokens.__class__ = AllSlotsImageEmbedding


def full_vocab_loss(model, batch: dict) -> torch.Tensor:
    """The original loss: lm_head over every position, fp32 logits, shifted mean cross-entropy."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits.float()  # no labels: phi3v builds the logits of all positions
    shift_logits = logits[..., :-1, :].contiguous()
    shift_labels = batch["labels"][..., 1:].contiguous()
    return F.cross_entropy(shift_logits.view(-1, shift_logits.shape[-1]), shift_labels.view(-1), ignore_index=-100)
