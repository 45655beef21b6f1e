"""Tiny random-weight checkpoints of real transformers model classes, built offline from configs.

Tests and the benchmark command use these to exercise the real loading path
(``AutoProcessor`` + ``AutoModelForImageTextToText.from_pretrained(dir)`` with
``HF_HUB_OFFLINE=1``) without downloading any weights.

The checkpoints mimic the layout of the ``OpenGVLab/InternVL3-*-hf`` repositories:

* a Qwen2 byte-level BPE tokenizer (here trained on a small embedded English corpus) that carries
  the InternVL named special tokens ``start_image_token`` (``<img>``), ``end_image_token``
  (``</img>``), ``context_image_token`` (``<IMG_CONTEXT>``) and ``video_token`` (``<video>``);
* the InternVL -hf ChatML chat template (an image item renders ``<IMG_CONTEXT>\\n``, a video item
  ``<video>\\n``; no default system message);
* ``GotOcr2ImageProcessor`` + ``InternVLVideoProcessor`` inside an ``InternVLProcessor``;
* an ``InternVLForConditionalGeneration`` with a Qwen2 text model and an InternVL vision tower.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "CHAT_TEMPLATE",
    "INTERNVL_SPECIAL_TOKENS",
    "build_tiny_internvl",
    "tiny_video_frames",
]

# The chat template shipped with the OpenGVLab/InternVL3-*-hf checkpoints (same text as
# transformers' convert_internvl_weights_to_hf.py): ChatML, no default system message.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}"
    "{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{'<|im_end|>\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{'<|im_start|>assistant\n' }}"
    "{% endif %}"
)

# Named multimodal tokens, as in the -hf tokenizer_config.json ("extra_special_tokens" dict).
# The tokenizer exposes each as an attribute plus an ``<name>_id`` attribute, which is what
# InternVLProcessor reads (tokenizer.start_image_token, tokenizer.context_image_token_id, ...).
INTERNVL_SPECIAL_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}

# Added tokens, in id order after the BPE vocabulary (same relative order as Qwen2.5 + InternVL).
_ADDED_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
    "<video>",
]

_CORPUS = """
What happens in the video? Describe the video in detail. Give a short summary of the video.
Who enters the room? A man enters the room and sits on a chair near the window.
A woman walks into the kitchen and opens the door of the fridge.
What color is the car? The car is red. The ball is blue. The sky is blue and the grass is green.
What is the person holding? She is holding a cup of coffee and a small book.
How many people are there in the scene? There are two people, one child and one dog.
When does the light turn on? At 00:12 the light turns on; at 01:05 it turns off again.
Frame1: Frame2: Frame3: Frame4: Frame5: Frame6: Frame7: Frame8: Frame9: Frame10: Frame11: Frame12:
The frame shows a street with cars, a bus, a bike and people walking on the road.
Where is the cat? The cat is sleeping under the table next to the yellow lamp.
Why does the boy run? Because it starts to rain and he wants to go back home.
Answer the question with a single word. Answer with the option letter. Yes or no?
The answer is yes. The answer is no. The first option is correct. The second one is wrong.
Please watch the clip and then answer: what did the girl pick up from the floor?
At the beginning of the video a white van stops; later a black truck passes by quickly.
In the end everyone leaves the building and the screen turns dark.
The time is 0:00, 0:30, 1:00, 1:30, 2:00, 12:45, 23:59 and 3.5 seconds, 10.25 minutes.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 20 25 30 42 50 64 99 100 128 256 512 1000.
The old man opens the window, looks outside, then closes it and turns around slowly.
A teacher writes on the board while the students listen and take notes in class.
The player kicks the ball, the goalkeeper jumps, and the crowd cheers loudly.
Is the door open or closed? It is open. Is it day or night? It is night.
Count the objects: three apples, four oranges, five bananas and six eggs.
The video is about cooking: she cuts onions, boils water, adds salt and stirs the soup.
System: you are a helpful assistant. User: hello. Assistant: hello, how can I help you?
Describe what you see. I see a mountain, a river, a bridge, trees, birds and clouds.
The camera moves left, then right, then zooms in on the face of the speaker.
What is written on the sign? The sign says stop. The text on the screen says hello.
"""

_WORDS = """
a an the this that these those it its he she they we you i me him her them us my your our their
is are was were be been being am do does did done have has had will would can could should may
might must shall not no yes and or but if then else so because while when where why how what
which who whom whose there here now later before after during until since again once always
never often sometimes video frame frames image images clip clips scene scenes shot camera screen
picture photo movie film summary summarize describe description detail details question
questions answer answers option options color colors red blue green yellow black white orange
purple pink brown gray grey gold silver dark light man men woman women boy girl child children
person people baby dog cat bird horse cow fish animal room door window wall floor table chair
bed sofa lamp kitchen house home building street road city car bus truck bike train plane boat
ship van ball book cup bottle phone computer bag box hat shoe enters enter entered leaves leave
left walks walk walked runs run ran sits sit sat stands stand stood opens open opened closes
close closed picks pick picked holds hold held drops drop dropped throws throw looks look looked
sees see saw watches watch watched talks talk talked says say said eats eat ate drinks drink
drank plays play played moves move moved turns turn turned stops stop stopped starts start first
second third last next previous beginning middle end time times minute minutes second seconds
hour one two three four five six seven eight nine ten eleven twelve hundred thousand many few
some all none big small large tiny long short tall high low fast slow quick quickly slowly happy
sad angry calm inside outside above below under over near far left right front back top bottom
side center around happens happened happen event events action actions activity object objects
thing things place places day night morning evening sun moon sky cloud rain snow wind tree trees
grass flower water river sea up down in out on off of to from with without by for at as into
onto about between through across user assistant system helpful hello please thanks sure okay
answer video: frame: zero 0 1 2 3 4 5 6 7 8 9 : . , ? ! ' " - ( ) / + = % # @
"""


def _training_corpus() -> list[str]:
    lines = [line.strip() for line in _CORPUS.strip().splitlines() if line.strip()]
    words = _WORDS.split()
    # Words both alone and with a leading space, so "Ġword" pieces get learned too.
    lines.append(" ".join(words))
    lines.extend(words)
    lines.append("".join(f"Frame{i}: " for i in range(1, 65)))
    return lines


def _build_tokenizer():
    """Train a small byte-level BPE and wrap it in the class transformers maps ``qwen2`` to."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast  # alias of Qwen2Tokenizer in transformers 5
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    # BPE training is deterministic: the same corpus always gives the same vocab and merges.
    bpe = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    # Same normalizer / pre-tokenizer as Qwen2Tokenizer, so what we learn matches what it applies.
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    bpe.train_from_iterator(_training_corpus(), trainer=trainer)

    model_json = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(model_json["vocab"])
    merges = [
        tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model_json["merges"]
    ]
    # Reserve the ids of the added tokens right after the BPE vocabulary, in a fixed order.
    for tok in _ADDED_TOKENS:
        vocab[tok] = len(vocab)

    tokenizer = Qwen2TokenizerFast(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=dict(INTERNVL_SPECIAL_TOKENS),
        model_max_length=8192,
        return_token_type_ids=False,
        padding_side="left",
    )
    # Everything else the template/processor emit must be atomic special tokens, never split by BPE.
    tokenizer.add_special_tokens(
        {"extra_special_tokens": list(_ADDED_TOKENS)},
        replace_extra_special_tokens=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_internvl(
    out_dir: str | Path,
    *,
    image_size: int = 64,
    patch_size: int = 8,
    text_layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    vision_layers: int = 1,
    rope_theta: float = 1000000.0,
    max_positions: int = 4096,
    seed: int = 0,
    dtype=torch.float32,
) -> Path:
    """Write a random-weight InternVL checkpoint directory and return its path.

    The directory loads offline with ``AutoProcessor.from_pretrained(dir)`` and
    ``AutoModelForImageTextToText.from_pretrained(dir)`` (``InternVLForConditionalGeneration``).
    Each frame/image becomes ``(image_size // patch_size) ** 2 // 4`` image tokens (16 for 64/8).
    """
    from transformers import (
        GenerationConfig,
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
    )

    if image_size % patch_size:
        raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}")
    grid = image_size // patch_size
    if grid % 2:
        raise ValueError(f"image_size // patch_size = {grid} must be even (pixel shuffle 0.5)")
    if hidden % heads or heads % kv_heads:
        raise ValueError("hidden must be divisible by heads, and heads by kv_heads")
    downsample_ratio = 0.5
    image_seq_length = int(grid * grid * downsample_ratio * downsample_ratio)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = _build_tokenizer()
    vocab_size = len(tokenizer)
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    image_token_id = tokenizer.context_image_token_id

    norm = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    size = {"height": image_size, "width": image_size}
    image_processor = GotOcr2ImageProcessor(
        do_resize=True,
        size=size,
        crop_to_patches=False,
        min_patches=1,
        max_patches=12,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        do_convert_rgb=True,
        **norm,
    )
    video_processor = InternVLVideoProcessor(
        do_resize=True,
        size=size,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        do_convert_rgb=True,
        do_sample_frames=False,
        **norm,
    )
    processor = InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        image_seq_length=image_seq_length,
        chat_template=CHAT_TEMPLATE,
    )

    vision_hidden = 32
    text_config = {
        "model_type": "qwen2",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": text_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_positions,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(rope_theta)},
        "use_sliding_window": False,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
    }
    vision_config = {
        "hidden_size": vision_hidden,
        "intermediate_size": 2 * vision_hidden,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": 2,
        "image_size": [image_size, image_size],
        "patch_size": [patch_size, patch_size],
        "attention_bias": True,
        "use_qk_norm": False,
        "norm_type": "layer_norm",
        "use_absolute_position_embeddings": True,
        "use_mean_pooling": True,
    }
    config = InternVLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=image_token_id,
        image_seq_length=image_seq_length,
        downsample_ratio=downsample_ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    config.architectures = ["InternVLForConditionalGeneration"]

    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).to(dtype).eval()
    generation_config = GenerationConfig(
        bos_token_id=None, eos_token_id=eos_id, pad_token_id=pad_id, do_sample=False
    )
    model.generation_config = generation_config

    model.save_pretrained(out)  # safetensors
    processor.save_pretrained(out)
    generation_config.save_pretrained(out)
    return out


def tiny_video_frames(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """``n`` deterministic uint8 RGB frames ``(n, size, size, 3)``, each with distinct content.

    Every frame is a 4x4 grid of random solid-colour blocks plus a per-frame bright bar, so no two
    frames are equal.
    """
    if n < 0 or size < 4:
        raise ValueError("need n >= 0 and size >= 4")
    rng = np.random.default_rng(seed)
    cells = 4
    colours = rng.integers(0, 256, size=(n, cells, cells, 3), dtype=np.uint8)
    reps = -(-size // cells)
    frames = np.repeat(np.repeat(colours, reps, axis=1), reps, axis=2)[:, :size, :size, :]
    frames = np.ascontiguousarray(frames)
    for i in range(n):
        row = (i * 3) % size
        frames[i, row, :, :] = 255 - frames[i, row, :, :]
    return frames
