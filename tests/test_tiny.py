"""The tiny random-weight InternVL checkpoint loads through the real transformers path, offline."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from statekv.testing.internvl import CHAT_TEMPLATE, build_tiny_internvl, tiny_video_frames

TOKENS_PER_FRAME = 16  # (64 // 8) ** 2 * 0.5 ** 2


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_internvl(tmp_path_factory.mktemp("tiny_internvl") / "ckpt")


@pytest.fixture(scope="module")
def loaded(ckpt):
    """Load through the Auto classes with the Hub in offline mode (no network is ever touched)."""
    import huggingface_hub.constants
    from transformers import AutoModelForImageTextToText, AutoProcessor

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        # huggingface_hub reads the variable once at import time; force the flag too.
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        assert huggingface_hub.constants.is_offline_mode()
        processor = AutoProcessor.from_pretrained(ckpt)
        model = AutoModelForImageTextToText.from_pretrained(ckpt).eval()
    return processor, model


def _video_messages(frames, question="what happens?"):
    return [
        {
            "role": "user",
            "content": [{"type": "video", "video": frames}, {"type": "text", "text": question}],
        }
    ]


def _video_inputs(processor, frames, question="what happens?"):
    t = len(frames)
    text = processor.apply_chat_template(
        _video_messages(frames, question), add_generation_prompt=True, tokenize=False
    )
    return processor(
        text=text,
        videos=[frames],
        video_metadata=[
            {"total_num_frames": t, "fps": 1.0, "frames_indices": list(range(t)), "duration": t}
        ],
        do_sample_frames=False,
        return_tensors="pt",
    )


def test_checkpoint_files_small(ckpt):
    names = {p.name for p in ckpt.iterdir()}
    for required in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ):
        assert required in names
    total = sum(p.stat().st_size for p in ckpt.iterdir())
    assert total < 8 * 1024 * 1024


def test_loads_real_classes_offline(loaded):
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
        Qwen2TokenizerFast,
    )

    processor, model = loaded
    tok = processor.tokenizer
    assert isinstance(processor, InternVLProcessor)
    assert isinstance(tok, Qwen2TokenizerFast)
    assert isinstance(processor.image_processor, GotOcr2ImageProcessor)
    assert isinstance(processor.video_processor, InternVLVideoProcessor)
    assert isinstance(model, InternVLForConditionalGeneration)

    assert tok.start_image_token == "<img>"
    assert tok.end_image_token == "</img>"
    assert tok.context_image_token == "<IMG_CONTEXT>"
    assert tok.video_token == "<video>"
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token == "<|endoftext|>"
    for t in (
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<img>",
        "</img>",
        "<IMG_CONTEXT>",
        "<video>",
    ):
        assert tok(t, add_special_tokens=False).input_ids == [tok.convert_tokens_to_ids(t)]

    assert processor.image_token == "<IMG_CONTEXT>"
    assert processor.video_token == "<video>"
    assert processor.image_token_id == tok.context_image_token_id == model.config.image_token_id
    assert processor.start_image_token_id == tok.start_image_token_id
    assert processor.end_image_token_id == tok.end_image_token_id
    assert processor.image_seq_length == model.config.image_seq_length == TOKENS_PER_FRAME
    assert processor.chat_template == CHAT_TEMPLATE

    assert model.config.text_config.vocab_size == len(tok)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.lm_head.weight.shape[0] == len(tok)
    for i in range(len(tok)):
        tok.decode([i])  # every id decodes
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id


def test_tokenizer_round_trips_text(loaded):
    tok = loaded[0].tokenizer
    for s in ("Frame12: ", "At 01:23.5 who enters the room? Describe the video.", "Zebra quiz!"):
        ids = tok(s, add_special_tokens=False).input_ids
        assert tok.decode(ids) == s
    assert len(tok("what color is the red car", add_special_tokens=False).input_ids) <= 8


def test_chat_template_renders_video_placeholder(loaded):
    processor, _ = loaded
    text = processor.apply_chat_template(
        _video_messages(tiny_video_frames(2)), add_generation_prompt=True, tokenize=False
    )
    assert text == "<|im_start|>user\n<video>\nwhat happens?<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("t", [2, 3])
def test_video_expands_to_frame_blocks(loaded, t):
    processor, _ = loaded
    tok = processor.tokenizer
    inputs = _video_inputs(processor, tiny_video_frames(t))
    ids = inputs["input_ids"][0]
    assert int((ids == processor.image_token_id).sum()) == t * TOKENS_PER_FRAME
    assert int((ids == processor.start_image_token_id).sum()) == t
    assert int((ids == processor.end_image_token_id).sum()) == t
    assert tuple(inputs["pixel_values"].shape) == (t, 3, 64, 64)
    assert inputs["pixel_values"].dtype == torch.float32

    decoded = tok.decode(ids)
    block = "<img>" + "<IMG_CONTEXT>" * TOKENS_PER_FRAME + "</img>"
    frames_text = "\n".join(f"Frame{i + 1}: {block}" for i in range(t))
    assert decoded == (
        f"<|im_start|>user\n{frames_text}\nwhat happens?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_split_at_special_tokens_tokenizes_identically(loaded):
    processor, _ = loaded
    tok = processor.tokenizer
    inputs = _video_inputs(processor, tiny_video_frames(2))
    whole_ids = inputs["input_ids"][0].tolist()
    text = tok.decode(whole_ids)
    assert tok(text, add_special_tokens=False).input_ids == whole_ids

    specials = sorted(tok.all_special_tokens, key=len, reverse=True)
    pattern = "(" + "|".join(re.escape(s) for s in specials) + ")"
    # (a) each segment starts right after a special token (ends with one)
    cuts = [m.end() for m in re.finditer(pattern, text)]
    segments = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)]) if b > a]
    # (b) special tokens isolated from the text around them
    isolated = [s for s in re.split(pattern, text) if s]
    for parts in (segments, isolated):
        assert "".join(parts) == text
        pieced = [i for p in parts for i in tok(p, add_special_tokens=False).input_ids]
        assert pieced == whole_ids


def test_forward_and_generate(loaded):
    processor, model = loaded
    inputs = _video_inputs(processor, tiny_video_frames(2))
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model(**inputs)
    assert tuple(out.logits.shape) == (1, n, len(processor.tokenizer))
    assert torch.isfinite(out.logits).all()

    with torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert gen.shape[0] == 1 and n < gen.shape[1] <= n + 3
    assert gen[0, :n].tolist() == inputs["input_ids"][0].tolist()
    processor.tokenizer.decode(gen[0, n:])


def test_image_forward(loaded):
    processor, model = loaded
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": tiny_video_frames(1)[0]},
                {"type": "text", "text": "what color is it?"},
            ],
        }
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == TOKENS_PER_FRAME
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()


def test_build_is_deterministic(ckpt, tmp_path):
    from safetensors.torch import load_file

    again = build_tiny_internvl(tmp_path / "again")
    a, b = load_file(ckpt / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (ckpt / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()
    other = load_file(build_tiny_internvl(tmp_path / "seed1", seed=1) / "model.safetensors")
    assert any(not torch.equal(a[k], other[k]) for k in a)


def test_tiny_video_frames():
    f = tiny_video_frames(5, size=64, seed=0)
    assert f.shape == (5, 64, 64, 3) and f.dtype == np.uint8
    assert len({fr.tobytes() for fr in f}) == 5
    assert np.array_equal(f, tiny_video_frames(5, size=64, seed=0))
    assert not np.array_equal(f, tiny_video_frames(5, size=64, seed=1))
    assert tiny_video_frames(2, size=30).shape == (2, 30, 30, 3)
