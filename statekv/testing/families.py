"""Tiny random-weight SmolVLM2 and LLaVA-OneVision checkpoints that load like the real ones.

Built the way `statekv.testing.internvl` builds InternVL: the BPE vocabulary trained there, wrapped in each
family's own fast tokenizer class with every special token its processor and chat template
emit; the family's real chat template; the real processor classes configured for small frames;
a tiny text model (2 layers, hidden 64, 4 heads, 2 KV heads) and vision tower; saved with
`save_pretrained` so `AutoProcessor` + `AutoModelForImageTextToText` load them offline.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

__all__ = [
    "LLAVA_ONEVISION_CHAT_TEMPLATE",
    "SMOLVLM_CHAT_TEMPLATE",
    "build_tiny_llava_onevision",
    "build_tiny_smolvlm",
    "smolvlm_model",
]

# The chat template shipped with the HuggingFaceTB/SmolVLM2-* checkpoints. It has no video
# branch: SmolVLMProcessor.apply_chat_template swaps in its DEFAULT_CHAT_TEMPLATE (this text plus
# "{% elif line['type'] == 'video' %}{{ '<video>' }}") whenever a message holds a video.
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}"
    "{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# The llava-hf/llava-onevision-qwen2-*-ov-hf chat template (transformers'
# convert_llava_onevision_weights_to_hf.py): ChatML, images then videos then text.
LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all video then #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}"
    "{% endif %}"
    "{{'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Added tokens after the BPE vocabulary, in the real tokenizers' relative order.
_SMOLVLM_ADDED = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<global-img>",
    *[f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)],
    "<fake_token_around_image>", "<image>", "<end_of_utterance>",
]
_LLAVA_ONEVISION_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]

_TEXT = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2}
_NORM_HALF = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


@lru_cache(maxsize=1)
def _bpe() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    """statekv.testing.internvl's trained byte-level BPE (vocab without InternVL's added tokens, merges)."""
    from statekv.testing.internvl import _ADDED_TOKENS, _build_tokenizer

    model = json.loads(_build_tokenizer().backend_tokenizer.to_str())["model"]
    vocab = sorted(((t, i) for t, i in model["vocab"].items() if t not in set(_ADDED_TOKENS)),
                   key=lambda item: item[1])
    assert [i for _, i in vocab] == list(range(len(vocab)))  # added tokens came last
    merges = tuple(tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"])
    return tuple(vocab), merges


def _vocab_with(added: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    base, merges = _bpe()
    vocab = dict(base)
    for token in added:
        vocab[token] = len(vocab)
    return vocab, list(merges)


def _save(model, processor, out: Path, eos_id, pad_id, bos_id=None) -> Path:
    from transformers import GenerationConfig

    generation_config = GenerationConfig(
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, do_sample=False)
    model.generation_config = generation_config
    model.save_pretrained(out)
    processor.save_pretrained(out)
    generation_config.save_pretrained(out)
    return out


def _text_config(model_type: str, vocab_size: int, **extra) -> dict:
    hidden = _TEXT["hidden"]
    return {
        "model_type": model_type, "vocab_size": vocab_size, "hidden_size": hidden,
        "intermediate_size": 2 * hidden, "num_hidden_layers": _TEXT["layers"],
        "num_attention_heads": _TEXT["heads"], "num_key_value_heads": _TEXT["kv_heads"],
        "hidden_act": "silu", "max_position_embeddings": 4096, "tie_word_embeddings": False,
        **extra,
    }


# SmolVLM2 ------------------------------------------------------------------------------------
def _smolvlm_tokenizer():
    from tokenizers import pre_tokenizers
    from transformers import GPT2TokenizerFast  # SmolVLM2 ships a GPT2Tokenizer (SmolLM2's)

    vocab, merges = _vocab_with(_SMOLVLM_ADDED)
    tokenizer = GPT2TokenizerFast(
        vocab=vocab, merges=merges, unk_token="<|endoftext|>", bos_token="<|im_start|>",
        eos_token="<end_of_utterance>", pad_token="<|im_end|>", add_prefix_space=False,
        model_max_length=8192,
    )
    # SmolLM2's tokenizer.json splits digits one by one before the GPT-2 byte-level split, so
    # "Frame from 00:12:" has as many tokens whatever the digits (transformers loads smolvlm
    # tokenizers from tokenizer.json as a plain TokenizersBackend, so this is what runs).
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tokenizer.add_special_tokens({"extra_special_tokens": list(_SMOLVLM_ADDED)},
                                 replace_extra_special_tokens=False)
    tokenizer.chat_template = SMOLVLM_CHAT_TEMPLATE
    return tokenizer


def build_tiny_smolvlm(out_dir: str | Path, *, image_size: int = 64, patch_size: int = 8,
                       scale_factor: int = 2, seed: int = 0, dtype=torch.float32) -> Path:
    """A random-weight `SmolVLMForConditionalGeneration` directory (SmolVLM2 layout).

    A video frame becomes one `image_size` square image (the video path never splits frames)
    of `(image_size // patch_size) ** 2 // scale_factor ** 2` tokens (16 for 64/8/2).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, processor = smolvlm_model(image_size=image_size, patch_size=patch_size,
                                     scale_factor=scale_factor, seed=seed, dtype=dtype)
    tokenizer = processor.tokenizer
    ids = tokenizer.convert_tokens_to_ids
    return _save(model, processor, out, ids("<end_of_utterance>"), ids("<|im_end|>"),
                 ids("<|im_start|>"))


def smolvlm_model(*, image_size: int = 64, patch_size: int = 8, scale_factor: int = 2,
                  text: dict | None = None, vision: dict | None = None, seed: int = 0,
                  dtype=torch.float32):
    """(model, processor) of a random-weight SmolVLM2 in memory, of any size: `text` overrides
    the language model's config fields (hidden_size, num_hidden_layers, ...), `vision` the
    vision tower's (defaults: the tiny test sizes)."""
    from transformers import (
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )

    grid = image_size // patch_size
    if image_size % patch_size or grid % scale_factor:
        raise ValueError("image_size must be a multiple of patch_size * scale_factor")
    image_seq_len = grid * grid // scale_factor**2

    tokenizer = _smolvlm_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    eos_id, pad_id, bos_id = ids("<end_of_utterance>"), ids("<|im_end|>"), ids("<|im_start|>")
    edge = {"longest_edge": image_size}
    # As in the real preprocessor_config.json: images are split into max_image_size squares
    # (up to 4 x 4), videos are resized to one max_image_size square per frame.
    image_processor = SmolVLMImageProcessor(
        do_resize=True, size={"longest_edge": 4 * image_size}, max_image_size=edge,
        do_image_splitting=True, do_pad=True, resample=1, **_NORM_HALF)
    video_processor = SmolVLMVideoProcessor(
        do_resize=True, size=edge, max_image_size=edge, do_pad=True, resample=1,
        video_sampling={"fps": 1, "max_frames": 64, "video_size": edge}, **_NORM_HALF)
    processor = SmolVLMProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=video_processor, image_seq_len=image_seq_len,
                                 chat_template=SMOLVLM_CHAT_TEMPLATE)

    config = SmolVLMConfig(
        text_config={**_text_config(
            "llama", len(tokenizer), rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
            bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id), **(text or {})},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": image_size,
                       "patch_size": patch_size, **(vision or {})},
        scale_factor=scale_factor,
        image_token_id=ids("<image>"),
        pad_token_id=pad_id,
        tie_word_embeddings=False,
    )
    config.architectures = ["SmolVLMForConditionalGeneration"]
    torch.manual_seed(seed)
    model = SmolVLMForConditionalGeneration(config).to(dtype).eval()
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, do_sample=False)
    return model, processor


# LLaVA-OneVision ----------------------------------------------------------------------------
def _llava_onevision_tokenizer():
    from transformers import Qwen2TokenizerFast  # the llava-hf checkpoints ship Qwen2's

    vocab, merges = _vocab_with(_LLAVA_ONEVISION_ADDED)
    tokenizer = Qwen2TokenizerFast(
        vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>",
        pad_token="<|endoftext|>", model_max_length=8192, padding_side="left",
    )
    tokenizer.add_special_tokens({"extra_special_tokens": list(_LLAVA_ONEVISION_ADDED)},
                                 replace_extra_special_tokens=False)
    tokenizer.chat_template = LLAVA_ONEVISION_CHAT_TEMPLATE
    return tokenizer


def build_tiny_llava_onevision(out_dir: str | Path, *, image_size: int = 56, patch_size: int = 8,
                               seed: int = 0, dtype=torch.float32) -> Path:
    """A random-weight `LlavaOnevisionForConditionalGeneration` directory.

    56 px / 8 px patches is an odd 7 x 7 grid like the real 27 x 27 (384 / 14); video frames are
    pooled to ceil(7 / 2) ** 2 = 16 tokens, and one `image_newline` token closes the video.
    """
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    if image_size % patch_size:
        raise ValueError("image_size must be a multiple of patch_size")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = _llava_onevision_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    eos_id, pad_id = ids("<|im_end|>"), ids("<|endoftext|>")
    size = {"height": image_size, "width": image_size}
    pinpoints = [[image_size * r, image_size * c] for r in (1, 2) for c in (1, 2)]
    image_processor = LlavaOnevisionImageProcessor(
        size=size, image_grid_pinpoints=pinpoints, do_pad=True, resample=3)
    video_processor = LlavaOnevisionVideoProcessor(size=size, resample=3)
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        num_image_tokens=(image_size // patch_size) ** 2, vision_feature_select_strategy="full",
        chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE, vision_aspect_ratio="anyres_max_9")

    config = LlavaOnevisionConfig(
        text_config=_text_config(
            "qwen2", len(tokenizer), rms_norm_eps=1e-6, use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            bos_token_id=None, eos_token_id=eos_id, pad_token_id=pad_id),
        vision_config={"model_type": "siglip_vision_model", "hidden_size": 32,
                       "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": image_size, "patch_size": patch_size,
                       "vision_use_head": False},
        image_token_index=ids("<image>"),
        video_token_index=ids("<video>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints,
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
    )
    config.architectures = ["LlavaOnevisionForConditionalGeneration"]
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).to(dtype).eval()
    return _save(model, processor, out, eos_id, pad_id)
