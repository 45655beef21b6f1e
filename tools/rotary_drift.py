"""How far does a chunked prefill drift from one forward under dynamic-NTK rope, with and without
statekv's one-base-per-video fix? The measurement behind statekv/rotary.py.

    python tools/rotary_drift.py                      # tiny InternVL, context 128, video ~4x it
    python tools/rotary_drift.py --rope longrope --frames 32

Builds a tiny random-weight InternVL checkpoint whose language model uses the chosen rope type
with `max_position_embeddings` = --context, prefills --frames frames with `full` one frame per
chunk, and prints the first answer token's max abs logit difference against
(a) one plain transformers forward over the same tokens padded with filler text to the planned
length (prefix + frames + answer room: the frequencies the fix holds) and
(b) one plain forward over exactly the prompt (what a user's single forward would use),
once with the fix and once without it (transformers updating the rope per chunk).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import statekv
import statekv.answer
import statekv.prefill
from statekv.testing import build_tiny_internvl, tiny_video_frames
from statekv.testing.rope import with_rope

QUESTION = "what happens in the video?"
ROPES = {
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
                 "long_factor": [1.0 + 2.0 * i for i in range(8)]},
}


def processor_inputs(path, frames):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    n = len(frames)
    return processor(text=text, videos=[frames], do_sample_frames=False, return_tensors="pt",
                     video_metadata=[{"total_num_frames": n, "fps": 1.0, "duration": float(n),
                                      "frames_indices": list(range(n))}])


def plain_forward(path, inputs, length: int) -> torch.Tensor:
    """Last prompt token's logits of one forward over `length` tokens (filler after the prompt)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa").eval()
    ids = inputs["input_ids"]
    padded = dict(inputs)
    filler = torch.full((1, length - ids.shape[1]), int(ids[0, -1]), dtype=ids.dtype)
    padded["input_ids"] = torch.cat([ids, filler], dim=1)
    padded["attention_mask"] = torch.ones_like(padded["input_ids"])
    with torch.inference_mode():
        return model(**padded).logits[0, ids.shape[1] - 1].float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rope", choices=sorted(ROPES), default="dynamic")
    parser.add_argument("--context", type=int, default=128, help="max_position_embeddings")
    parser.add_argument("--frames", type=int, default=22)
    args = parser.parse_args()
    rope = dict(ROPES[args.rope])
    if args.rope == "longrope":
        rope["original_max_position_embeddings"] = args.context
    work = Path(tempfile.mkdtemp())
    path = with_rope(build_tiny_internvl(work / "base"), work / "variant",
                     max_position_embeddings=args.context, rope_parameters=rope)
    frames = tiny_video_frames(args.frames)
    inputs = processor_inputs(path, frames)
    model = statekv.load(str(path), device="cpu", dtype="float32")
    rows = []
    for label in ("with the fix", "without the fix"):
        if label == "without the fix":
            for module in (statekv.prefill, statekv.answer):
                module.fixed_rotary = lambda *a, **k: contextlib.nullcontext()
        session = model.prefill_frames(frames, method="full")
        logits = session.question_logits(QUESTION)[-1]
        planned = plain_forward(path, inputs, session.state.rotary_length)
        prompt = plain_forward(path, inputs, inputs["input_ids"].shape[1])
        rows.append((label, (logits - planned).abs().max().item(),
                     (logits - prompt).abs().max().item()))
    video = session.state.cache.video_tokens
    print(f"{args.rope} rope, trained context {args.context}, {args.frames} frames: video "
          f"{video} tokens ({video / args.context:.1f}x), prompt {inputs['input_ids'].shape[1]}, "
          f"planned length {session.state.rotary_length}")
    print(f"first answer token, max abs logit difference (its logits' largest magnitude: "
          f"{planned.abs().max().item():.3g}):")
    for label, planned, prompt in rows:
        print(f"  {label:16s} vs one forward at the planned length {planned:.3g}; "
              f"vs one forward over the prompt alone {prompt:.3g}")


if __name__ == "__main__":
    main()
