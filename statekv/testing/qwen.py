"""Tiny random-weight Qwen2.5-VL and Qwen3-VL checkpoints, built offline like the real ones.

Each directory loads with ``AutoProcessor`` + ``AutoModelForImageTextToText`` under
``HF_HUB_OFFLINE=1``: a Qwen2 byte-level BPE (trained by ``statekv.testing.internvl``) with Qwen's special
tokens, the chat template the Instruct checkpoints ship, the real processor classes configured
small (8 px patches, merge 2, temporal patches of 2 frames) and the real model classes.

* Qwen2.5-VL: 88 px frames are resized to 96 px: 36 tokens per temporal patch (18 per frame);
  windowed vision attention (one window block, one full block); ``tokens_per_second=2`` so the
  temporal M-RoPE ids of consecutive patches are 4 apart at 1 fps.
* Qwen3-VL: the video processor's whole-video pixel budget (``size.longest_edge``) is small,
  so 8 frames of 128 px are shrunk to 96 px (36 tokens per patch) while a 2-frame clip of the
  same frames would not be (64 tokens): the per-chunk vision input must follow the whole
  video's size.
  Two DeepStack levels (vision blocks 0 and 1) feed the first two decoder layers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Qwen's special tokens in their real id order (151643...), after the tiny BPE vocabulary.
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# chat_template.json of Qwen/Qwen2.5-VL-*-Instruct (same as Qwen2-VL): default system prompt.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# chat template of Qwen/Qwen3-VL-*-Instruct: no default system prompt, tool-calling turns.
QWEN3_VL_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

PATCH = 8  # vision patch size in pixels (real checkpoints: 14 for Qwen2.5-VL, 16 for Qwen3-VL)
MERGE = 2
TEMPORAL = 2
QWEN2_5_VL_FRAME_SIZE = 88  # resized to 96 px: 36 tokens per temporal patch
QWEN3_VL_FRAME_SIZE = 128  # shrunk to 96 px by the whole-video budget at 8 frames
QWEN3_VL_VIDEO_PIXELS = 80_000  # the whole-video budget (real checkpoints: 25_165_824)
NORM = {"image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711]}


def _qwen_tokenizer(chat_template: str):
    """The tiny BPE of statekv.testing.internvl re-wrapped with Qwen's special tokens (and only those)."""
    from transformers import Qwen2TokenizerFast

    from statekv.testing.internvl import _build_tokenizer

    base = _build_tokenizer()
    model = json.loads(base.backend_tokenizer.to_str())["model"]
    added = {token.content for token in base.added_tokens_decoder.values()}
    vocab = {piece: i for piece, i in model["vocab"].items() if piece not in added}
    assert sorted(vocab.values()) == list(range(len(vocab)))  # added tokens came last
    for token in QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = Qwen2TokenizerFast(
        vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>",
        pad_token="<|endoftext|>", model_max_length=32768, padding_side="left",
        return_token_type_ids=False,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS[1:]})
    tokenizer.chat_template = chat_template
    return tokenizer


def _token_ids(tokenizer) -> dict:
    """The config's multimodal token ids, read back from the tokenizer."""
    return {name: tokenizer.convert_tokens_to_ids(token) for name, token in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}


def _text_config(tokenizer, hidden: int, mrope_section: list[int], **extra) -> dict:
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return {
        "vocab_size": len(tokenizer), "hidden_size": hidden, "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "bos_token_id": pad, "eos_token_id": eos, "pad_token_id": pad,
        "rope_parameters": {"rope_type": "default", "mrope_section": mrope_section, **extra},
    }


def _save(model, processor, tokenizer, out: Path) -> Path:
    from transformers import GenerationConfig

    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    generation_config = GenerationConfig(
        bos_token_id=pad, eos_token_id=[eos, pad], pad_token_id=pad, do_sample=False)
    model.generation_config = generation_config
    model.save_pretrained(out)
    processor.save_pretrained(out)
    generation_config.save_pretrained(out)
    return out


def build_tiny_qwen2_5_vl(path: str | Path, seed: int = 0) -> Path:
    """A random-weight Qwen2_5_VLForConditionalGeneration checkpoint directory."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _qwen_tokenizer(QWEN2_5_VL_CHAT_TEMPLATE)
    common = dict(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL, **NORM)
    factor = PATCH * MERGE
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            size={"shortest_edge": factor * factor, "longest_edge": 36 * factor * factor},
            **common),
        video_processor=Qwen2VLVideoProcessor(
            size={"shortest_edge": factor * factor, "longest_edge": 36 * factor * factor},
            cap_pixels_per_frame=False, **common),
        tokenizer=tokenizer, chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
    )
    hidden = 64
    config = Qwen2_5_VLConfig(
        text_config=_text_config(tokenizer, hidden, [2, 3, 3], rope_theta=1000000.0),
        vision_config={
            "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
            "patch_size": PATCH, "spatial_merge_size": MERGE, "temporal_patch_size": TEMPORAL,
            "tokens_per_second": 2, "window_size": 2 * factor, "out_hidden_size": hidden,
            "fullatt_block_indexes": [1],
        },
        tie_word_embeddings=False, **_token_ids(tokenizer),
    )
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    return _save(model, processor, tokenizer, out)


def build_tiny_qwen3_vl(path: str | Path, seed: int = 0) -> Path:
    """A random-weight Qwen3VLForConditionalGeneration checkpoint directory (with DeepStack)."""
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _qwen_tokenizer(QWEN3_VL_CHAT_TEMPLATE)
    common = dict(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL, **NORM)
    factor = PATCH * MERGE
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            size={"shortest_edge": factor * factor, "longest_edge": 64 * factor * factor},
            **common),
        video_processor=Qwen3VLVideoProcessor(
            size={"shortest_edge": factor * factor, "longest_edge": QWEN3_VL_VIDEO_PIXELS},
            cap_pixels_per_frame=False, fps=2, min_frames=4, max_frames=768, **common),
        tokenizer=tokenizer, chat_template=QWEN3_VL_CHAT_TEMPLATE,
    )
    hidden = 64
    config = Qwen3VLConfig(
        text_config={**_text_config(tokenizer, hidden, [4, 2, 2], rope_theta=5000000.0,
                                    mrope_interleaved=True), "head_dim": 16},
        vision_config={
            "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
            "patch_size": PATCH, "spatial_merge_size": MERGE, "temporal_patch_size": TEMPORAL,
            "out_hidden_size": hidden, "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0, 1],
        },
        tie_word_embeddings=False, **_token_ids(tokenizer),
    )
    config.architectures = ["Qwen3VLForConditionalGeneration"]
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    return _save(model, processor, tokenizer, out)
