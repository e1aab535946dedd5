"""Padding-free packing (`phi3v.pack_examples`): a packed row trains exactly like the padded batch."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

import phi3v
from bench.workloads import pad_collate
from transformers import AutoModelForCausalLM, AutoProcessor

NUM_CROPS = 4


def picture(width, height, seed):
    g = torch.Generator().manual_seed(seed)
    image = Image.new("RGB", (width, height), tuple(torch.randint(0, 255, (3,), generator=g).tolist()))
    ImageDraw.Draw(image).rectangle((0, 0, width // 2, height // 3), fill=(20, 200, 90))
    return image


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return AutoProcessor.from_pretrained(tiny_model_dir)


def sample(processor, question, answer, image=None):
    """One unpadded training sample: prompt masked, answer supervised (the recipes' format)."""
    tag = "<|image_1|>\n" if image is not None else ""
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{tag}{question}"}], tokenize=False, add_generation_prompt=True)
    batch = processor(prompt, [image] if image is not None else None, num_crops=NUM_CROPS)
    prompt_ids = batch["input_ids"][0]
    answer_ids = torch.tensor(processor.tokenizer(f"{answer}<|end|>\n<|endoftext|>", add_special_tokens=False).input_ids)
    example = {"input_ids": torch.cat([prompt_ids, answer_ids]),
               "labels": torch.cat([torch.full_like(prompt_ids, -100), answer_ids])}
    if image is not None:
        example.update(pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"])
    return example


@pytest.fixture(scope="module")
def examples(processor):
    wide = sample(processor, "What is written at the top?", "Invoice 2041", picture(500, 200, 1))
    # Text only and supervised from its very first token (as in text pretraining): packed, its first
    # label would be predicted from the previous sample's last token unless pack_examples masks it.
    text = sample(processor, "Say hello.", "Hello there")
    text["labels"] = text["input_ids"].clone()
    tall = sample(processor, "Which colour is the box?", "green", picture(120, 300, 2))
    return [wide, text, tall]


def loss_and_grads(model, batch, num_items_in_batch):
    model.zero_grad()
    loss = model(**batch, num_items_in_batch=num_items_in_batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def test_pack_examples_layout(examples):
    packed = phi3v.pack_examples(examples)
    lengths = [len(e["input_ids"]) for e in examples]
    assert packed["input_ids"].shape == packed["labels"].shape == packed["position_ids"].shape == (1, sum(lengths))
    assert "attention_mask" not in packed
    assert packed["position_ids"][0].tolist() == [i for n in lengths for i in range(n)]
    assert torch.equal(packed["input_ids"][0], torch.cat([e["input_ids"] for e in examples]))
    starts = [0, lengths[0], lengths[0] + lengths[1]]
    assert all(packed["labels"][0, s] == -100 for s in starts)  # no sample predicts across a boundary
    # Counting labels gives the supervised tokens, as the Trainer counts them on the unpacked batch.
    assert int(packed["labels"].ne(-100).sum()) == sum(int(e["labels"][1:].ne(-100).sum()) for e in examples)
    assert packed["pixel_values"].shape == (2, NUM_CROPS + 1, 3, 336, 336)
    assert torch.equal(packed["image_sizes"], torch.cat([examples[0]["image_sizes"], examples[2]["image_sizes"]]))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_row_gives_the_loss_and_gradients_of_the_padded_batch(tiny_model_dir, processor, examples, attn):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn).train()
    num_items = sum(int(e["labels"][1:].ne(-100).sum()) for e in examples)
    padded_loss, padded_grads = loss_and_grads(model, pad_collate(examples, processor.tokenizer.pad_token_id), num_items)
    packed_loss, packed_grads = loss_and_grads(model, phi3v.pack_examples(examples), num_items)
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-6)
    assert padded_grads.keys() == packed_grads.keys() and len(packed_grads) > 20
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # The vision tower, the projector and the separators all got their gradient through the packed row.
    assert packed_grads["model.vision_embed_tokens.sub_GN"].abs().sum() > 0


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_each_sample_alone_even_with_use_cache(tiny_model_dir, examples, attn):
    # In eval mode use_cache defaults to True (config); a cache would hide the sample boundaries
    # from transformers' mask builders, so the model turns it off for packed rows.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn).eval()
    assert model.config.use_cache
    packed = phi3v.pack_examples(examples)
    with torch.no_grad():
        logits = model(**{k: v for k, v in packed.items() if k != "labels"}).logits[0]
        start = 0
        for e in examples:
            alone = {"input_ids": e["input_ids"][None], **{k: e[k] for k in ("pixel_values", "image_sizes") if k in e}}
            n = len(e["input_ids"])
            torch.testing.assert_close(logits[start : start + n], model(**alone).logits[0], rtol=1e-4, atol=1e-4)
            start += n
