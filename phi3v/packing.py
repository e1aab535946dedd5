"""Padding-free packing: several training samples in one row, without attention across samples."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pack_examples(examples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Concatenate tokenized samples into one packed row for `Phi3VForCausalLM` training.

    Each example holds `input_ids` (1-D, negative ids at image positions, no padding), `labels`
    (1-D, same length, -100 where there is no loss) and, if it has images, `pixel_values`
    [n_img, num_crops + 1, 3, 336, 336] and `image_sizes` [n_img, 2] (as `Phi3VProcessor` returns
    them, with the batch dimension of `input_ids` removed).

    Returns `input_ids`, `labels` and `position_ids` of shape [1, total length], plus `pixel_values`
    and `image_sizes` of all images in order when there are any. There is no `attention_mask`:
    positions restarting at 0 mark the sample boundaries, from which transformers builds a
    block-diagonal causal mask (sdpa, eager) or the `cu_seqlens` of flash-attn's varlen kernel.

    The first label of every sample is set to -100. The loss predicts `labels[t + 1]` from token t,
    so otherwise the last token of one sample would be trained to predict the first token of the
    next. Unpacked, that first label is never a target either, so the loss of each sample is
    unchanged, and counting `labels != -100` gives the number of supervised tokens.
    """
    if not examples:
        raise ValueError("pack_examples needs at least one example")
    input_ids, labels, positions, pixel_values, image_sizes = [], [], [], [], []
    for i, example in enumerate(examples):
        ids = torch.as_tensor(example["input_ids"], dtype=torch.long).reshape(-1)
        target = torch.as_tensor(example["labels"], dtype=torch.long).reshape(-1).clone()
        if ids.shape != target.shape:
            raise ValueError(f"example {i}: {ids.numel()} input_ids but {target.numel()} labels")
        target[0] = -100
        input_ids.append(ids)
        labels.append(target)
        positions.append(torch.arange(ids.numel()))
        pixels = example.get("pixel_values")
        if pixels is not None and len(pixels):
            pixel_values.append(pixels)
            image_sizes.append(torch.as_tensor(example["image_sizes"]).reshape(-1, 2))

    batch = {
        "input_ids": torch.cat(input_ids)[None],
        "labels": torch.cat(labels)[None],
        "position_ids": torch.cat(positions)[None],
    }
    if pixel_values:
        # Samples processed with different num_crops have different slot counts; the extra slots
        # are zero padding, which the model never encodes.
        slots = max(p.shape[1] for p in pixel_values)
        batch["pixel_values"] = torch.cat(
            [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, slots - p.shape[1])) for p in pixel_values]
        )
        batch["image_sizes"] = torch.cat(image_sizes)
    return batch
