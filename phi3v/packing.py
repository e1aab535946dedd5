"""Padding-free packing: several training samples in one row, without attention across samples.

`pack_examples` builds the row. Attention stays inside each sample by three routes: flash_attention_2
runs its varlen kernel on offsets it finds from the restarting `position_ids`; sdpa runs each
sample's own causal block from the row's `cu_seq_lens_q` (`segment_sdpa_attention`, installed as
transformers' "sdpa" function when phi3v is imported; without `cu_seq_lens_q` it is transformers'
sdpa unchanged); eager uses the block-diagonal causal mask transformers builds from the positions.
With sdpa that mask would also work, but sdpa computes every entry of the row's L x L score matrix,
masked or not: for a row of n samples of length L, about 2n times the causal attention of the
samples one by one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward


def segment_sdpa_attention(module, query, key, value, attention_mask, *, cu_seq_lens_q=None, cu_seq_lens_k=None,
                           max_length_q=None, max_length_k=None, **kwargs):
    """transformers' sdpa attention, run sample by sample over a packed row when `cu_seq_lens_q` says
    where its samples start (batch 1, no cache); anything else goes to transformers' sdpa unchanged.

    Each sample is plain causal attention over its own tokens (the mask transformers builds for the
    row, block-diagonal causal, says the same and is not needed)."""
    packed = (
        cu_seq_lens_q is not None
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2] == int(cu_seq_lens_q[-1])
        and (cu_seq_lens_k is None or torch.equal(cu_seq_lens_k, cu_seq_lens_q))
    )
    if not packed:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    bounds = cu_seq_lens_q.tolist()
    outputs = [
        sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, **kwargs)[0]
        for a, b in zip(bounds, bounds[1:])
        if b > a
    ]
    return torch.cat(outputs, dim=1), None  # [1, L, heads, head_dim], as sdpa_attention_forward returns


AttentionInterface.register("sdpa", segment_sdpa_attention)


def pack_examples(examples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Concatenate tokenized samples into one packed row for `Phi3VForCausalLM` training.

    Each example holds `input_ids` (1-D, negative ids at image positions, no padding), `labels`
    (1-D, same length, -100 where there is no loss) and, if it has images, `pixel_values`
    [n_img, num_crops + 1, 3, 336, 336] and `image_sizes` [n_img, 2] (as `Phi3VProcessor` returns
    them, with the batch dimension of `input_ids` removed).

    Returns `input_ids`, `labels` and `position_ids` of shape [1, total length], plus `pixel_values`
    and `image_sizes` of all images in order when there are any, and `cu_seq_lens_q`/`cu_seq_lens_k`
    (int32 [n + 1], where each sample starts, then the total; transformers' flash-attention kwargs),
    which `segment_sdpa_attention` reads. There is no `attention_mask`: positions restarting at 0 also
    mark the boundaries, from which transformers builds the block-diagonal causal mask (eager) and
    flash-attn's varlen offsets (max_length_* are left out on purpose, so that path is unchanged).

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

    lengths = torch.tensor([len(ids) for ids in input_ids])
    offsets = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    batch = {
        "input_ids": torch.cat(input_ids)[None],
        "labels": torch.cat(labels)[None],
        "position_ids": torch.cat(positions)[None],
        "cu_seq_lens_q": offsets,
        "cu_seq_lens_k": offsets.clone(),
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
