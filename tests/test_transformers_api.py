"""transformers' usual model API on phi3v: Auto classes, the image-text-to-text pipeline, return_dict=False,
and the generate/forward/save options people reach for, each held to what it must give."""

from __future__ import annotations

import json
import time

import pytest
import torch
from PIL import Image, ImageDraw

import phi3v
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    Phi3Config,
    Phi3ForCausalLM,
    pipeline,
)

PROMPT = "<|user|>\n<|image_1|>\nWhat is shown?<|end|>\n<|assistant|>\n"
TWO_IMAGES = "<|user|>\n<|image_1|>\n<|image_2|>\nCompare the two pictures.<|end|>\n<|assistant|>\n"
TEXT_ONLY = "<|user|>\nTell me a story.<|end|>\n<|assistant|>\n"
# No stop token, so every sequence has the same length and beam scores compare as plain means.
FIXED_LENGTH = dict(max_new_tokens=6, min_new_tokens=6, eos_token_id=[], pad_token_id=32000)


def picture(width, height, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = Image.new("RGB", (width, height), tuple(torch.randint(0, 255, (3,), generator=g).tolist()))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, width // 2, height // 2), fill=tuple(torch.randint(0, 255, (3,), generator=g).tolist()))
    draw.line((0, 0, width, height), fill=(255, 255, 0), width=max(1, width // 20))
    return image


@pytest.fixture(scope="module", autouse=True)
def own_random_state():
    """These tests draw random numbers (seeded sampling, new embedding rows, a random Phi-3): the global
    generator is left as it was found, so the tests that run after them see the same state."""
    with torch.random.fork_rng():
        yield


@pytest.fixture(scope="module")
def one_image(processor):
    return processor(PROMPT, [picture(400, 300, 1)], num_crops=2)


@pytest.fixture(scope="module")
def two_images(processor):
    # Different sizes, so images in the wrong order give wrong token counts or wrong features.
    return processor(TWO_IMAGES, [picture(400, 300, 2), picture(200, 500, 3)], num_crops=2)


def greedy(model, inputs, **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, do_sample=False, **{**FIXED_LENGTH, **kwargs})


def new_tokens(sequences, inputs):
    return sequences[:, inputs["input_ids"].shape[1] :]


def mean_log_prob(model, inputs, sequence):
    """Mean log-probability of the tokens after the prompt, from one forward pass over the whole sequence."""
    prompt_length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        logits = model(input_ids=sequence[None], pixel_values=inputs.get("pixel_values"),
                       image_sizes=inputs.get("image_sizes")).logits[0]
    log_probs = logits[prompt_length - 1 : -1].log_softmax(-1)
    return log_probs.gather(-1, sequence[prompt_length:, None]).mean().item()


# ----------------------------------------------------------------------------------------------
# Auto classes and the image-text-to-text pipeline


def test_auto_model_for_image_text_to_text_loads_phi3v(tiny_model_dir, model, one_image):
    auto = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()
    assert type(auto) is phi3v.Phi3VForCausalLM
    assert auto.input_modalities == ("image", "text")
    with torch.no_grad():
        torch.testing.assert_close(auto(**one_image).logits, model(**one_image).logits, rtol=0, atol=0)
    base = AutoModel.from_pretrained(tiny_model_dir).eval()  # the decoder with the image embedder, no lm_head
    assert type(base) is phi3v.Phi3VModel
    with torch.no_grad():
        torch.testing.assert_close(base(**one_image).last_hidden_state, model.model(**one_image).last_hidden_state,
                                   rtol=0, atol=0)


def test_decoding_a_whole_generated_sequence_skips_the_image_positions(model, processor, one_image):
    # generate() returns the prompt too, image positions (negative ids) included: decode and batch_decode
    # give the prompt's text and the answer, as they do for a text-only model.
    sequence = greedy(model, one_image)
    text_ids = [i for i in sequence[0].tolist() if i >= 0]
    assert len(text_ids) < sequence.shape[1]  # the prompt holds image positions
    expected = processor.tokenizer.decode(text_ids, skip_special_tokens=True)
    assert processor.batch_decode(sequence, skip_special_tokens=True) == [expected]
    assert processor.decode(sequence[0], skip_special_tokens=True) == expected
    assert processor.decode(sequence[0].tolist(), skip_special_tokens=True) == expected
    assert "What is shown?" in expected  # the prompt's text, around where its image stood


@pytest.fixture(scope="module")
def image_pipeline(tiny_model_dir):
    return pipeline("image-text-to-text", model=str(tiny_model_dir))


def test_pipeline_loads_without_asking_about_remote_code(tiny_model_dir, monkeypatch):
    # The official preprocessor_config.json names remote code (auto_map); the pipeline's probe for a video
    # processor would ask on the terminal whether to run it, unless phi3v says it has none.
    questions = []
    monkeypatch.setattr("builtins.input", lambda prompt="": questions.append(prompt) or "n")
    pipe = pipeline("image-text-to-text", model=str(tiny_model_dir))
    assert questions == [] and isinstance(pipe.processor, phi3v.Phi3VProcessor)


def test_pipeline_answers_tagged_text_with_images_as_generate_does(image_pipeline, model, processor):
    assert type(image_pipeline.model) is phi3v.Phi3VForCausalLM
    image = picture(400, 300, 1)
    inputs = processor(PROMPT, [image])  # the folder's num_crops, as the pipeline uses
    expected = greedy(model, inputs)
    out = image_pipeline(images=image, text=PROMPT, return_tensors=True, generate_kwargs=dict(FIXED_LENGTH))
    assert out[0]["generated_token_ids"].tolist() == expected[0].tolist()
    text = image_pipeline(images=image, text=PROMPT, return_full_text=False, generate_kwargs=dict(FIXED_LENGTH))
    answer = processor.batch_decode(new_tokens(expected, inputs), skip_special_tokens=True)[0]
    # The pipeline cuts the decoded prompt off the decoded whole, so a first token that starts a word
    # keeps its leading space there (sentencepiece drops it when the answer is decoded alone).
    assert text[0]["generated_text"].lstrip() == answer.lstrip() and answer.strip()
    # The full text is the prompt plus the answer: decoding the prompt skips its image positions.
    full = image_pipeline(images=image, text=PROMPT, generate_kwargs=dict(FIXED_LENGTH))
    assert full[0]["generated_text"] == PROMPT + text[0]["generated_text"]


def test_pipeline_answers_text_only_prompts(image_pipeline, model, processor):
    expected = greedy(model, processor(TEXT_ONLY))
    out = image_pipeline(text=TEXT_ONLY, return_tensors=True, generate_kwargs=dict(FIXED_LENGTH))
    assert out[0]["generated_token_ids"].tolist() == expected[0].tolist()


def test_pipeline_answers_several_images_in_one_prompt(image_pipeline, model, processor):
    images = [picture(400, 300, 2), picture(200, 500, 3)]
    expected = greedy(model, processor(TWO_IMAGES, images))
    out = image_pipeline(images=images, text=TWO_IMAGES, return_tensors=True, generate_kwargs=dict(FIXED_LENGTH))
    assert out[0]["generated_token_ids"].tolist() == expected[0].tolist()


def test_pipeline_answers_typed_chat_messages_as_generate_does(image_pipeline, model, processor, tmp_path):
    image, second = picture(400, 300, 2), picture(200, 500, 3)
    second.save(tmp_path / "second.png")  # lossless: the same pixels
    content = [{"type": "image", "image": image}, {"type": "image", "path": str(tmp_path / "second.png")},
               {"type": "text", "text": "Compare the two pictures."}]
    messages = [{"role": "user", "content": content}]
    inputs = processor(TWO_IMAGES, [image, second])
    expected = greedy(model, inputs)
    out = image_pipeline(text=messages, return_tensors=True, generate_kwargs=dict(FIXED_LENGTH))
    assert out[0]["generated_token_ids"].tolist() == expected[0].tolist()
    # The chat comes back with the answer as a new assistant turn.
    chat = image_pipeline(text=messages, generate_kwargs=dict(FIXED_LENGTH))[0]["generated_text"]
    answer = processor.batch_decode(new_tokens(expected, inputs), skip_special_tokens=True)[0]
    assert chat[:-1] == messages and chat[-1]["role"] == "assistant"
    assert chat[-1]["content"].lstrip() == answer.lstrip()


def test_batched_pipeline_with_left_padding_answers_each_prompt_as_alone(image_pipeline, model, processor):
    # A list of prompts is one padded batch (one answer each); generate needs the padding on the left (the official
    # tokenizer pads on the right, for training), as with every decoder-only model in transformers.
    images = [[picture(400, 300, 1)], [picture(400, 300, 2), picture(200, 500, 3)]]
    image_pipeline.processor.tokenizer.padding_side = "left"
    try:
        out = image_pipeline(images=images, text=[PROMPT, TWO_IMAGES],
                             return_tensors=True, generate_kwargs=dict(FIXED_LENGTH))
    finally:
        image_pipeline.processor.tokenizer.padding_side = "right"
    for answer, prompt, prompt_images in zip(out, [PROMPT, TWO_IMAGES], images):
        inputs = processor(prompt, prompt_images)
        expected = new_tokens(greedy(model, inputs), inputs)[0]
        assert answer["generated_token_ids"][-len(expected):].tolist() == expected.tolist()


# ----------------------------------------------------------------------------------------------
# return_dict=False


def test_return_dict_false_in_inference_is_the_tuple_of_transformers_causal_lms(model, one_image):
    labels = one_image["input_ids"].clamp(min=-100)
    with torch.no_grad():
        as_dict = model(**one_image, labels=labels)
        as_tuple = model(**one_image, labels=labels, return_dict=False)
        without_labels = model(**one_image, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(as_dict.to_tuple()) == 3
    loss, logits, cache = as_tuple
    torch.testing.assert_close(loss, as_dict.loss, rtol=0, atol=0)
    torch.testing.assert_close(logits, as_dict.logits, rtol=0, atol=0)
    assert cache.get_seq_length() == one_image["input_ids"].shape[1]
    torch.testing.assert_close(without_labels[0], as_dict.logits, rtol=0, atol=0)  # no loss: logits first

    # The same call on transformers' own Phi-3 gives the same kinds in the same order.
    text = model.config
    phi3 = Phi3ForCausalLM(Phi3Config(vocab_size=text.vocab_size, hidden_size=text.hidden_size, num_hidden_layers=1,
                                      num_attention_heads=text.num_attention_heads, intermediate_size=64,
                                      pad_token_id=text.pad_token_id)).eval()
    ids = one_image["input_ids"].clamp(min=0)
    with torch.no_grad():
        reference = phi3(input_ids=ids, labels=ids, return_dict=False)
        reference_without_labels = phi3(input_ids=ids, return_dict=False)
    assert [type(x) for x in reference] == [type(x) for x in as_tuple]
    assert [type(x) for x in reference_without_labels] == [type(x) for x in without_labels]


def test_return_dict_false_in_training_puts_the_loss_first(tiny_model_dir, one_image):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    labels = one_image["input_ids"].clamp(min=-100)
    loss_as_dict = model(**one_image, labels=labels).loss
    as_tuple = model(**one_image, labels=labels, return_dict=False)
    # In training the loss runs lm_head only over the supervised positions, so there are no logits
    # (None, left out of the tuple as transformers' to_tuple does).
    assert isinstance(as_tuple, tuple) and as_tuple[0].dim() == 0
    torch.testing.assert_close(as_tuple[0], loss_as_dict, rtol=0, atol=0)
    as_tuple[0].backward()
    assert model.lm_head.weight.grad is not None and model.model.vision_embed_tokens.glb_GN.grad is not None
    # config.return_dict=False is the same switch, as in transformers' models.
    model.config.return_dict = False
    from_config = model(**one_image, labels=labels)
    assert isinstance(from_config, tuple)
    torch.testing.assert_close(from_config[0], loss_as_dict, rtol=0, atol=0)


def test_base_model_return_dict_false(model, one_image):
    with torch.no_grad():
        hidden = model.model(**one_image, return_dict=False)[0]
        expected = model.model(**one_image).last_hidden_state
    torch.testing.assert_close(hidden, expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# generate(): the decoding modes


def test_sampling_is_seeded_and_top_k_1_is_greedy(model, two_images):
    expected = greedy(model, two_images)
    with torch.no_grad():
        torch.manual_seed(0)
        first = model.generate(**two_images, do_sample=True, num_return_sequences=3, **FIXED_LENGTH)
        torch.manual_seed(0)
        again = model.generate(**two_images, do_sample=True, num_return_sequences=3, **FIXED_LENGTH)
        top_1 = model.generate(**two_images, do_sample=True, top_k=1, num_return_sequences=2, **FIXED_LENGTH)
    assert first.shape[0] == 3 and torch.equal(first, again)
    assert len({tuple(row) for row in new_tokens(first, two_images).tolist()}) > 1  # it samples
    # Every returned row sees both images in order (each row's images repeat as a group).
    assert top_1.tolist() == expected.tolist() * 2


def test_num_return_sequences_on_a_batch_with_one_and_two_images(model, processor):
    processor.tokenizer.padding_side = "left"
    try:
        batch = processor(text=[PROMPT, TWO_IMAGES], images=[[picture(400, 300, 1)], [picture(400, 300, 2),
                          picture(200, 500, 3)]], padding=True, num_crops=2)
    finally:
        processor.tokenizer.padding_side = "right"
    expected = greedy(model, batch)
    with torch.no_grad():
        top_1 = model.generate(**batch, do_sample=True, top_k=1, num_return_sequences=2, **FIXED_LENGTH)
    assert top_1.tolist() == [expected[0].tolist()] * 2 + [expected[1].tolist()] * 2


def test_beam_search_returns_the_best_beams_with_their_scores(model, two_images):
    with torch.no_grad():
        beams = model.generate(**two_images, do_sample=False, num_beams=4, num_return_sequences=2, output_scores=True,
                               return_dict_in_generate=True, **FIXED_LENGTH)
    expected_greedy = greedy(model, two_images)[0]
    assert beams.sequences.shape[0] == 2
    scores = beams.sequences_scores.tolist()
    assert scores[0] >= scores[1]
    # Each beam's score is its mean log-probability (length_penalty 1), recomputed here in one forward pass
    # with both images: wrong images or a wrongly reordered cache would give other numbers.
    for sequence, score in zip(beams.sequences, scores):
        assert mean_log_prob(model, two_images, sequence) == pytest.approx(score, abs=1e-4)
    assert scores[0] >= mean_log_prob(model, two_images, expected_greedy) - 1e-5


def test_output_scores_are_the_logits_of_each_greedy_step(model, one_image):
    with torch.no_grad():
        out = model.generate(**one_image, do_sample=False, output_scores=True, output_logits=True,
                             return_dict_in_generate=True, **FIXED_LENGTH)
    generated = new_tokens(out.sequences, one_image)[0]
    assert len(out.scores) == len(out.logits) == FIXED_LENGTH["max_new_tokens"]
    assert [step.argmax(-1).item() for step in out.scores] == generated.tolist()
    with torch.no_grad():
        first_step = model(**one_image).logits[0, -1]
    torch.testing.assert_close(out.logits[0][0], first_step, rtol=1e-5, atol=1e-5)


def test_repetition_penalty_skips_the_image_positions(model, one_image):
    penalty = 1.5
    with torch.no_grad():
        out = model.generate(**one_image, do_sample=False, repetition_penalty=penalty, output_scores=True,
                             return_dict_in_generate=True, **FIXED_LENGTH)
        logits = model(**one_image).logits[0, -1]
    # The first step by hand: every text token of the prompt penalised, the image positions ignored.
    seen = one_image["input_ids"][0][one_image["input_ids"][0] >= 0].unique()
    expected = logits.clone()
    expected[seen] = torch.where(logits[seen] < 0, logits[seen] * penalty, logits[seen] / penalty)
    torch.testing.assert_close(out.scores[0][0], expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(expected, logits)


def test_generate_from_inputs_embeds(model, two_images):
    # Embeddings computed once (images included) and handed to generate() instead of input_ids.
    with torch.no_grad():
        ids = two_images["input_ids"]
        embeds = model.model.vision_embed_tokens(ids, model.model.embed_tokens(ids.clamp(min=0)),
                                                 two_images["pixel_values"], two_images["image_sizes"])
        from_embeds = model.generate(inputs_embeds=embeds, attention_mask=two_images["attention_mask"],
                                     do_sample=False, **FIXED_LENGTH)
    assert from_embeds.tolist() == new_tokens(greedy(model, two_images), two_images).tolist()


def test_static_cache_gives_the_dynamic_cache_tokens(model, processor):
    processor.tokenizer.padding_side = "left"
    try:
        batch = processor(text=[PROMPT, TEXT_ONLY], images=[[picture(400, 300, 1)], []], padding=True, num_crops=2)
    finally:
        processor.tokenizer.padding_side = "right"
    dynamic = greedy(model, batch)
    static = greedy(model, batch, cache_implementation="static")
    assert torch.equal(static, dynamic)


# ----------------------------------------------------------------------------------------------
# forward(): hidden states and attentions


def test_output_hidden_states(model, one_image):
    with torch.no_grad():
        out = model(**one_image, output_hidden_states=True)
        text_embeds = model.model.embed_tokens(one_image["input_ids"].clamp(min=0))
        embeddings = model.model.vision_embed_tokens(one_image["input_ids"], text_embeds, one_image["pixel_values"],
                                                     one_image["image_sizes"])
    seq = one_image["input_ids"].shape[1]
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert all(h.shape == (1, seq, model.config.hidden_size) for h in out.hidden_states)
    torch.testing.assert_close(out.hidden_states[0], embeddings, rtol=0, atol=0)  # images included
    torch.testing.assert_close(model.lm_head(out.hidden_states[-1]), out.logits, rtol=1e-5, atol=1e-5)


def test_output_attentions_under_eager(tiny_model_dir, one_image):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(**one_image, output_attentions=True)
    seq = one_image["input_ids"].shape[1]
    assert len(out.attentions) == model.config.num_hidden_layers
    for attention in out.attentions:
        assert attention.shape == (1, model.config.num_attention_heads, seq, seq)
        torch.testing.assert_close(attention.sum(-1), torch.ones(1, model.config.num_attention_heads, seq))
        assert attention.triu(diagonal=1).abs().max() == 0  # causal


# ----------------------------------------------------------------------------------------------
# Loading, saving, resizing, precision, devices


def test_resize_token_embeddings_keeps_the_old_logits(tiny_model_dir, model, one_image):
    resized = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    old_vocab = resized.config.vocab_size
    resized.resize_token_embeddings(old_vocab + 8)
    assert resized.config.vocab_size == old_vocab + 8
    assert resized.get_input_embeddings().weight.shape[0] == resized.lm_head.weight.shape[0] == old_vocab + 8
    with torch.no_grad():
        logits = resized(**one_image).logits
        torch.testing.assert_close(logits[..., :old_vocab], model(**one_image).logits, rtol=0, atol=0)
    assert logits.shape[-1] == old_vocab + 8


def test_sharded_save_and_reload_give_identical_logits(model, one_image, tmp_path):
    model.save_pretrained(tmp_path, max_shard_size="5MB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / shard).exists() for shard in shards)
    assert set(index["weight_map"]) == set(model.state_dict())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**one_image).logits, model(**one_image).logits, rtol=0, atol=0)


def test_device_map_auto_loads_and_generates_the_same(tiny_model_dir, model, two_images, tmp_path):
    mapped = AutoModelForCausalLM.from_pretrained(tiny_model_dir, device_map="auto").eval()
    assert torch.equal(greedy(mapped, two_images), greedy(model, two_images))
    # Too little memory: accelerate offloads the weights and its hooks load each module's weights and
    # move every argument of its forward to the execution device just in time.
    offloaded = AutoModelForCausalLM.from_pretrained(tiny_model_dir, device_map="auto", max_memory={"cpu": "12MB"},
                                                     offload_folder=tmp_path).eval()
    assert "disk" in offloaded.hf_device_map.values()
    assert torch.equal(greedy(offloaded, two_images), greedy(model, two_images))


def test_bf16_generate(tiny_model_dir, model, one_image):
    bf16 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        logits = bf16(**one_image).logits  # fp32 pixel_values are cast by the image embedder
        reference = model(**one_image).logits
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), reference, rtol=0, atol=0.02)  # measured 0.006
    sequences = greedy(bf16, one_image)
    assert new_tokens(sequences, one_image)[0, 0] == logits[0, -1].argmax()
    assert sequences.shape[1] == one_image["input_ids"].shape[1] + FIXED_LENGTH["max_new_tokens"]


# ----------------------------------------------------------------------------------------------
# Training options and compilation


def gradients(model, inputs):
    model.zero_grad()
    model(**inputs, labels=inputs["input_ids"].clamp(min=-100)).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_reentrant_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir, one_image):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    plain = gradients(model, one_image)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    checkpointed = gradients(model, one_image)
    assert set(checkpointed) == set(plain)  # every parameter still gets its gradient
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace")  # index_put: a graph break, not an error
def test_torch_compile_forward_matches_eager(model, one_image):
    compiled = torch.compile(model, backend="aot_eager")
    start = time.perf_counter()
    with torch.no_grad():
        logits = compiled(**one_image).logits
        reference = model(**one_image).logits
    print(f"torch.compile forward: {time.perf_counter() - start:.1f} s")
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
