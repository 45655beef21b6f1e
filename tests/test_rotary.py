"""One rotary base per video: chunked prefill rotates like one forward over the planned sequence.

Tiny checkpoints get a small `max_position_embeddings` and every rope type transformers 5.23
offers (length-dependent: dynamic NTK, LongRoPE; static: default, linear, YaRN, llama3), and
each family its real checkpoint's scheme (presets/*.yaml record them); the videos are about 4x
the trained context. The reference is one plain transformers forward over the same tokens,
extended with filler text to the planned length (prefix + frames + answer room): attention is
causal, so the filler changes no earlier logit, and transformers' own rope update then picks
the frequencies for exactly that length.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import FAMILIES, _tiny_frames

import statekv
import statekv.answer
import statekv.prefill
from statekv.rotary import fixed_rotary, length_dependent, rotary_modules
from statekv.testing.rope import with_rope

QUESTION = "what happens in the video?"
HALF = 8  # the tiny InternVL's head_dim / 2: LongRoPE's factor lists have one entry per pair

ROPES = {
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(HALF)],
                 "long_factor": [1.0 + 2.0 * i for i in range(HALF)],
                 "original_max_position_embeddings": 128},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 128},
    "default": {"rope_type": "default"},
}
# LongRoPE states its trained context in max_position_embeddings, its switch point apart.
MAX_POSITIONS = {"longrope": 512}

# Each shipped family's real position scheme, as its preset records the checkpoint's config
# (presets/*.yaml `rope`), with the trained context shrunk so the test video is about 4x it.
# M-RoPE's `mrope_section` stays the tiny model's: it must match the tiny head size.
PRESETS = {"internvl": "internvl3-1b", "smolvlm": "smolvlm2-256m",
           "llava_onevision": "llava-onevision-0.5b", "qwen2_5_vl": "qwen2.5-vl-3b",
           "qwen3_vl": "qwen3-vl-2b"}


def _real_rope(family: str) -> dict:
    from statekv.presets import load_preset

    rope = load_preset(PRESETS[family]).rope
    return {k: v for k, v in rope.items() if k != "mrope_section"}
FRAMES = {"qwen2_5_vl": 88, "qwen3_vl": 128}  # frame sizes the tiny Qwen processors expect


def _frames(family: str, n: int):
    return _tiny_frames(n, FRAMES.get(family, 64))


@pytest.fixture(scope="module")
def variant(checkpoints, tmp_path_factory):
    """(path, statekv Model) of a family's tiny checkpoint with other rope settings."""
    built = {}

    def get(family: str, rope: dict, max_positions: int):
        key = (family, repr(rope), max_positions)
        if key not in built:
            out = tmp_path_factory.mktemp(f"{family}-rope")
            path = with_rope(checkpoints(family), out, max_position_embeddings=max_positions,
                             rope_parameters=rope)
            built[key] = path, statekv.load(str(path), device="cpu", dtype="float32")
        return built[key]

    return get


def _inputs(family: str, path, frames, question=QUESTION):
    from transformers import AutoProcessor

    spec = FAMILIES[family]
    from conftest import chat_video_inputs

    return (spec.reference_inputs or chat_video_inputs)(AutoProcessor.from_pretrained(path),
                                                         frames, question)


def _reference_logits(path, inputs, length: int) -> torch.Tensor:
    """Last prompt token's logits of one forward over the inputs plus filler text, the whole
    forward's largest position being `length - 1` (a fresh model: dynamic rope keeps state)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa").eval()
    ids = inputs["input_ids"]
    largest = []
    hook = rotary_modules(model.model.language_model if hasattr(model.model, "language_model")
                          else model.model.text_model)[0].register_forward_pre_hook(
        lambda module, args, kwargs: largest.append(
            int((args[1] if len(args) > 1 else kwargs["position_ids"]).max())), with_kwargs=True)
    with torch.inference_mode():
        model(**inputs)
    hook.remove()
    pad = length - (largest[0] + 1)  # text after the video: one position per token on every axis
    assert pad >= 0
    padded = dict(inputs)
    filler = torch.full((1, pad), int(ids[0, -1]), dtype=ids.dtype)
    padded["input_ids"] = torch.cat([ids, filler], dim=1)
    padded["attention_mask"] = torch.ones_like(padded["input_ids"])
    if "mm_token_type_ids" in inputs:
        padded["mm_token_type_ids"] = torch.cat(
            [inputs["mm_token_type_ids"], torch.zeros_like(filler)], dim=1)
    with torch.inference_mode():
        return model(**padded).logits[0, ids.shape[1] - 1].float()


def _max_positions(family: str, path, frames) -> int:
    """A trained context about a quarter of the test video's tokens."""
    return max(16, _inputs(family, path, frames)["input_ids"].shape[1] // 4)


METHODS = [("full", {}), ("statekv", {"budget": 100_000}), ("window", {"window_frames": 10_000}),
           ("statekv", {"budget": 100_000, "chunk_frames": 4})]


@pytest.mark.parametrize("rope", sorted(ROPES))
def test_chunked_prefill_rotates_like_one_forward(variant, rope):
    frames = _frames("internvl", 24)
    path, model = variant("internvl", ROPES[rope], MAX_POSITIONS.get(rope, 128))
    inputs = _inputs("internvl", path, frames)
    assert inputs["input_ids"].shape[1] > 4 * 128  # the video runs past 4x the trained context
    expected = None
    for method, options in METHODS:
        session = model.prefill_frames(frames, method=method, **options)
        if expected is None:
            expected = _reference_logits(path, inputs, session.state.rotary_length)
        logits = session.question_logits(QUESTION)[-1]
        assert (logits - expected).abs().max().item() < 1e-4, (rope, method)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_family_real_scheme_rotates_like_one_forward(variant, checkpoints, name):
    frames = _frames(name, 16)
    path, model = variant(name, _real_rope(name), _max_positions(name, checkpoints(name), frames))
    inputs = _inputs(name, path, frames)
    session = model.prefill_frames(frames, method="full")
    expected = _reference_logits(path, inputs, session.state.rotary_length)
    logits = session.question_logits(QUESTION)[-1]
    assert (logits - expected).abs().max().item() < 1e-4


def test_mrope_gets_the_same_guarantee_under_dynamic_rope(variant, checkpoints):
    # No shipped Qwen checkpoint uses a length-dependent rope; one that did would rotate with the
    # base for its largest M-RoPE position (not its token count): the adapter says which.
    frames = _frames("qwen2_5_vl", 16)
    path, model = variant("qwen2_5_vl", {"rope_type": "dynamic", "factor": 2.0},
                          _max_positions("qwen2_5_vl", checkpoints("qwen2_5_vl"), frames))
    session = model.prefill_frames(frames, method="full")
    assert session.state.rotary_length < session.state.cache.video_tokens + 512
    expected = _reference_logits(path, _inputs("qwen2_5_vl", path, frames),
                                 session.state.rotary_length)
    logits = session.question_logits(QUESTION)[-1]
    assert (logits - expected).abs().max().item() < 1e-4


@pytest.fixture
def unfixed(monkeypatch):
    """The engine without the fix: transformers updates the rope on every chunk."""
    for module in (statekv.prefill, statekv.answer):
        monkeypatch.setattr(module, "fixed_rotary", lambda *a, **k: contextlib.nullcontext())


@pytest.mark.parametrize("rope", ["dynamic", "longrope"])
def test_without_the_fix_chunks_disagree_with_one_forward(variant, unfixed, rope, monkeypatch):
    # The control: the equality above can fail for the length-dependent types (frame by
    # frame: `full`'s grouped forwards would hide part of the drift).
    monkeypatch.setattr(statekv.prefill, "FULL_FORWARD_TOKENS", 0)
    frames = _frames("internvl", 24)
    path, model = variant("internvl", ROPES[rope], MAX_POSITIONS.get(rope, 128))
    session = model.prefill_frames(frames, method="full")
    expected = _reference_logits(path, _inputs("internvl", path, frames),
                                 session.state.rotary_length)
    logits = session.question_logits(QUESTION)[-1]
    assert (logits - expected).abs().max().item() > 1e-4


def _rotary_state(model):
    return [(m.rope_type, m.inv_freq.clone(), getattr(m, "max_seq_len_cached", None),
             m.attention_scaling) for m in rotary_modules(model.adapter.language_model)]


@pytest.mark.parametrize("rope", ["dynamic", "longrope"])
def test_the_rotary_module_is_restored_after_each_video(variant, rope):
    _, model = variant("internvl", ROPES[rope], MAX_POSITIONS.get(rope, 128))
    before = _rotary_state(model)
    assert all(length_dependent(state[0]) for state in before)
    session = model.prefill_frames(_frames("internvl", 24), method="statekv", budget=64)
    session.ask([QUESTION], max_new_tokens=3)
    after = _rotary_state(model)
    for (t1, f1, c1, s1), (t2, f2, c2, s2) in zip(before, after):
        assert (t1, c1, s1) == (t2, c2, s2)
        assert torch.equal(f1, f2)


def test_fixed_rotary_changes_the_frequencies_only_beyond_the_switch(variant):
    _, model = variant("internvl", ROPES["dynamic"], 128)
    lm = model.adapter.language_model
    original = rotary_modules(lm)[0].original_inv_freq.clone()  # inv_freq: the last call's
    with fixed_rotary(lm, 100):  # within the trained context: dynamic NTK is the default rope
        assert torch.equal(rotary_modules(lm)[0].inv_freq, original)
    with fixed_rotary(lm, 512):
        assert bool((rotary_modules(lm)[0].inv_freq[1:] < original[1:]).all())  # a larger base


@pytest.mark.parametrize("rope", ["dynamic", "longrope", "yarn", "default"])
def test_ask_full_answers_what_generate_answers_within_the_trained_context(variant, rope):
    from transformers import AutoModelForImageTextToText

    frames = _frames("internvl", 8)
    settings = dict(ROPES[rope])
    if "original_max_position_embeddings" in settings:
        settings["original_max_position_embeddings"] = 1024
    path, model = variant("internvl", settings, 1024)
    session = model.prefill_frames(frames, method="full")
    assert session.state.rotary_length <= 1024  # video, question and answer room all fit
    inputs = _inputs("internvl", path, frames)
    reference = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa").eval()
    with torch.inference_mode():
        generated = reference.generate(**inputs, max_new_tokens=8, do_sample=False)
    expected = generated[0, inputs["input_ids"].shape[1]:].tolist()
    eos = model.adapter.eos_token_ids()
    expected = expected[:next((i for i, t in enumerate(expected) if t in eos), len(expected))]
    assert session.ask([QUESTION], max_new_tokens=8)[0].token_ids == expected
