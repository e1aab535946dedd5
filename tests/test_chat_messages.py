"""transformers 5's typed chat messages through `Phi3VProcessor.apply_chat_template`.

The reference is always the string route written by hand: `<|image_N|>\\n` tags in string content,
rendered by the tokenizer's own (official) chat template, and the processor called on that text with
the images opened by `phi3v.validation.load_image`. The typed route must give exactly those tensors.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

import phi3v  # noqa: F401  (registers the Auto classes)
from phi3v.processing_phi3_v import ASSISTANT_MASK_CHAT_TEMPLATE
from phi3v.validation import load_image
from phi3v.video import frame_indices, sample_frames

KEYS = ("input_ids", "attention_mask", "pixel_values", "image_sizes")


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir, num_crops=1)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict:
    """Three small images on disk: an RGB JPEG, an RGBA PNG (transparency goes on white) and a portrait."""
    folder = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    paths = {}
    for name, mode, size in (("photo.jpg", "RGB", (60, 40)), ("logo.png", "RGBA", (50, 50)), ("tall.png", "RGB", (30, 70))):
        channels = len(mode)
        pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
        Image.fromarray(pixels, mode).save(folder / name)
        paths[name] = folder / name
    return paths


def hand_written(processor, messages: list[dict], images: list, **template_kwargs):
    """The string route: the official template on string content, then the processor on text + images."""
    prompt = processor.tokenizer.apply_chat_template(messages, tokenize=False, **template_kwargs)
    return prompt, processor(prompt, images or None, return_tensors="pt")


def assert_same_inputs(typed, reference):
    assert set(typed.keys()) == set(reference.keys())
    for key in reference.keys():
        assert torch.equal(typed[key], reference[key]), key


def test_typed_messages_give_the_string_routes_inputs(processor, pictures):
    photo, logo, tall = pictures["photo.jpg"], pictures["logo.png"], pictures["tall.png"]
    png_bytes = logo.read_bytes()
    raw_base64 = base64.b64encode(png_bytes).decode()
    pil = Image.open(photo).convert("RGB")
    messages = [
        {"role": "system", "content": "Answer in one word."},
        {
            "role": "user",
            "content": [
                {"type": "image", "path": str(photo)},
                {"type": "image", "url": tall.as_uri()},
                {"type": "text", "text": "Which one is taller?"},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "The second."}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "And these?"},
                {"type": "image", "base64": raw_base64},
                {"type": "image", "url": f"data:image/png;base64,{raw_base64}"},
                {"type": "image", "image": pil},
            ],
        },
    ]
    by_hand = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "<|image_1|>\n<|image_2|>\nWhich one is taller?"},
        {"role": "assistant", "content": "The second."},
        {"role": "user", "content": "And these?<|image_3|>\n<|image_4|>\n<|image_5|>\n"},
    ]
    images = [load_image(photo), load_image(tall), load_image(logo), load_image(logo), pil]
    prompt, reference = hand_written(processor, by_hand, images, add_generation_prompt=True)

    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == prompt
    assert text.endswith("<|user|>\nAnd these?<|image_3|>\n<|image_4|>\n<|image_5|>\n<|end|>\n<|assistant|>\n")
    typed = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert_same_inputs(typed, reference)
    assert typed["pixel_values"].shape[0] == 5
    # tokenize=True alone gives the token ids (as lists without return_tensors, like the tokenizer's)
    ids = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert ids == reference["input_ids"].tolist()
    # The transparent PNG was composited on white by the repo's loader, not turned black by convert("RGB").
    assert load_image(logo).getpixel((0, 0)) != Image.open(logo).convert("RGB").getpixel((0, 0))


def test_batched_conversations_and_string_content(processor, pictures):
    photo, tall = pictures["photo.jpg"], pictures["tall.png"]
    first = [{"role": "user", "content": [{"type": "image", "path": str(photo)}, {"type": "text", "text": "Describe."}]}]
    second = [
        {"role": "user", "content": "Hello, no image here."},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": [{"type": "image", "path": str(tall)}, {"type": "image", "path": str(photo)}]},
    ]
    prompts = [
        hand_written(
            processor, [{"role": "user", "content": "<|image_1|>\nDescribe."}], [load_image(photo)],
            add_generation_prompt=True,
        )[0],
        hand_written(
            processor,
            [{"role": "user", "content": "Hello, no image here."}, {"role": "assistant", "content": "Hi."},
             {"role": "user", "content": "<|image_1|>\n<|image_2|>\n"}],
            [load_image(tall), load_image(photo)],
            add_generation_prompt=True,
        )[0],
    ]  # fmt: skip
    processor.tokenizer.padding_side = "left"
    try:
        reference = processor(prompts, [[load_image(photo)], [load_image(tall), load_image(photo)]], padding=True)
        typed = processor.apply_chat_template(
            [first, second], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
            processor_kwargs={"padding": True},
        )  # fmt: skip
    finally:
        processor.tokenizer.padding_side = "right"
    assert_same_inputs(typed, reference)
    assert processor.apply_chat_template([first, second], add_generation_prompt=True) == prompts

    # String content with hand-written tags is rendered as before, the images in processor_kwargs.
    by_hand = [{"role": "user", "content": "<|image_1|>\nWhat is shown?"}]
    prompt, reference = hand_written(processor, by_hand, [load_image(photo)], add_generation_prompt=True)
    assert processor.apply_chat_template(by_hand, add_generation_prompt=True) == prompt
    typed = processor.apply_chat_template(
        by_hand, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        processor_kwargs={"images": [load_image(photo)]},
    )  # fmt: skip
    assert_same_inputs(typed, reference)


def write_video(path: Path, num_frames: int, size=(64, 48)) -> None:
    """Grey frames whose level tells them apart (5, 15, 25, ...)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=24)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(num_frames):
            pixels = np.full((size[1], size[0], 3), 5 + 10 * i, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def test_video_parts(processor, pictures, tmp_path):
    photo, tall = pictures["photo.jpg"], pictures["tall.png"]
    # A list of frames: each frame is an image of its own, numbered on from the images before it.
    messages = [
        {"role": "user", "content": [
            {"type": "image", "path": str(tall)},
            {"type": "video", "path": [str(photo), Image.open(tall).convert("RGB")]},
            {"type": "text", "text": "What happens?"},
        ]},
    ]  # fmt: skip
    by_hand = [{"role": "user", "content": "<|image_1|>\n<|image_2|>\n<|image_3|>\nWhat happens?"}]
    images = [load_image(tall), load_image(photo), load_image(tall)]
    _, reference = hand_written(processor, by_hand, images, add_generation_prompt=True)
    typed = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert_same_inputs(typed, reference)

    # A video file: frames sampled as convert_ucf101.py samples clips (20 frames, 4 asked: 0, 5, 10, 15).
    clip = tmp_path / "clip.avi"
    write_video(clip, 20)
    assert frame_indices(20, 4) == [0, 5, 10, 15]
    frames = sample_frames(clip, 4)
    levels = [round(float(np.asarray(f).mean())) for f in frames]
    assert [min(range(20), key=lambda i: abs(5 + 10 * i - level)) for level in levels] == [0, 5, 10, 15]
    messages = [{"role": "user", "content": [{"type": "video", "path": str(clip)}, {"type": "text", "text": "Describe."}]}]
    by_hand = [{"role": "user", "content": "<|image_1|>\n<|image_2|>\n<|image_3|>\n<|image_4|>\nDescribe."}]
    prompt, reference = hand_written(processor, by_hand, frames, add_generation_prompt=True)
    assert processor.apply_chat_template(messages, add_generation_prompt=True, processor_kwargs={"num_frames": 4}) == prompt
    typed = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        processor_kwargs={"num_frames": 4},
    )  # fmt: skip
    assert_same_inputs(typed, reference)


@pytest.mark.parametrize(
    "content, expected",
    [
        ([{"type": "audio", "path": "a.wav"}], r"message 1 \(user\), part 0: unknown part .*'text', 'image' and 'video'"),
        ([{"type": "text", "text": "hi"}, {"type": "image", "path": "/nonexistent/x.png"}],
         r"message 1 \(user\), part 1: image file not found: /nonexistent/x.png"),
        ([{"type": "image"}], r"part 0: the image part needs exactly one of 'image', 'path', 'url', 'base64'"),
        ([{"type": "image", "path": "a.png", "url": "file:///a.png"}], r"part 0: the image part needs exactly one of"),
        ([{"type": "image", "base64": "not base64!"}], r"part 0: not valid base64"),
        ([{"type": "image", "url": "ftp://host/x.png"}], r"part 0: 'url' must start with file://, http://, https:// or data:"),
        ([{"type": "text", "text": "<|image_1|>\nhi"}], r"part 0: the text holds an <\|image_N\|> tag"),
        ([{"type": "text"}], r"part 0: a text part needs a string 'text'"),
        ([{"type": "video", "path": "/nonexistent/clip.mp4"}], r"part 0: video /nonexistent/clip.mp4: video file not found"),
        ([{"type": "video", "path": []}], r"part 0: the video has no frames"),
        (["just a string"], r"part 0: unknown part"),
    ],
)  # fmt: skip
def test_bad_parts_name_the_message_and_part(processor, content, expected):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}]
    with pytest.raises(ValueError, match=expected):
        processor.apply_chat_template(messages, tokenize=True, return_dict=True)


def test_bad_input_elsewhere(processor, pictures, tmp_path):
    photo = str(pictures["photo.jpg"])
    good = [{"role": "user", "content": [{"type": "image", "path": photo}, {"type": "text", "text": "hi"}]}]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    bad = [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image", "path": str(broken)}]}]
    # In a batch the conversation is named too.
    with pytest.raises(ValueError, match=r"conversation 1, message 0 \(user\), part 1: not an image PIL can read"):
        processor.apply_chat_template([good, bad], tokenize=True, return_dict=True)
    # Hand-written tags and typed images in one conversation would number the images twice.
    mixed = [{"role": "user", "content": "<|image_1|>\nFirst."}, *good]
    with pytest.raises(ValueError, match=r"tags written in string content and typed image parts"):
        processor.apply_chat_template(mixed)
    # More hand-written tags than images.
    with pytest.raises(ValueError, match=r"prompt has 2 image tags but 1 images"):
        processor.apply_chat_template(
            [{"role": "user", "content": "<|image_1|>\n<|image_2|>\nTwo?"}], tokenize=True,
            processor_kwargs={"images": [load_image(photo)]},
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"both as typed content parts and in processor_kwargs"):
        processor.apply_chat_template(good, tokenize=True, processor_kwargs={"images": [load_image(photo)]})
    # tokenize=False writes the tags without opening any file.
    assert processor.apply_chat_template(bad) == "<|user|>\nhi<|image_1|>\n<|end|>\n"


def test_continue_final_message(processor, pictures):
    photo = str(pictures["photo.jpg"])
    messages = [
        {"role": "user", "content": [{"type": "image", "path": photo}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "It is a"}]},
    ]
    text = processor.apply_chat_template(messages, continue_final_message=True)
    assert text == "<|user|>\n<|image_1|>\nWhat is it?<|end|>\n<|assistant|>\nIt is a"
    inputs = processor.apply_chat_template(
        messages, continue_final_message=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert torch.equal(inputs["input_ids"], processor(text, [load_image(photo)])["input_ids"])


def test_assistant_tokens_mask(processor, pictures):
    photo = str(pictures["photo.jpg"])
    conversations = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
         {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A two"}],
    ]  # fmt: skip
    official = processor.tokenizer.chat_template
    for conversation in conversations:
        for add_generation_prompt in (False, True):
            marked = processor.tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=ASSISTANT_MASK_CHAT_TEMPLATE
            )
            assert marked == processor.tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=official
            )
    messages = [
        {"role": "user", "content": [{"type": "image", "path": photo}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Mostly grey."}]},
        {"role": "user", "content": [{"type": "text", "text": "Sure?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]},
    ]
    with pytest.raises(ValueError, match=r"needs a chat template with \{% generation %\} markers.*ASSISTANT_MASK_CHAT_TEMPLATE"):
        processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    for padding_side in ("right", "left"):
        out = processor.apply_chat_template(
            [messages, messages[:2]], tokenize=True, return_dict=True, return_tensors="pt", return_assistant_tokens_mask=True,
            chat_template=ASSISTANT_MASK_CHAT_TEMPLATE, processor_kwargs={"padding": True, "padding_side": padding_side},
        )  # fmt: skip
        assert out["assistant_masks"].shape == out["input_ids"].shape
        answers = [processor.decode(ids[mask.bool()]) for ids, mask in zip(out["input_ids"], out["assistant_masks"])]
        # The answers with their <|end|> and newline: the tokens a model must learn to say and stop
        # (spaces left out: decoding writes the tokenizer's word-start marks as spaces).
        assert [a.replace(" ", "") for a in answers] == ["Mostlygrey.<|end|>\nYes.<|end|>\n", "Mostlygrey.<|end|>\n"]
        assert not (out["assistant_masks"].bool() & (out["input_ids"] < 0)).any()  # never an image position
        reference = processor.apply_chat_template(
            [messages, messages[:2]], tokenize=True, return_dict=True, return_tensors="pt",
            processor_kwargs={"padding": True, "padding_side": padding_side},
        )  # fmt: skip
        assert_same_inputs({k: out[k] for k in KEYS}, reference)


def test_saved_folder_keeps_the_official_template(processor, tiny_model_dir, tmp_path):
    """Nothing of this lives in the files: the template the tokenizer saves is the official one."""
    official = json.loads((Path(phi3v.__file__).parent / "assets" / "tokenizer_config.json").read_text())["chat_template"]
    assert processor.tokenizer.chat_template == official
    assert json.loads((tiny_model_dir / "tokenizer_config.json").read_text())["chat_template"] == official
