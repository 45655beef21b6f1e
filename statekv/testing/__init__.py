"""Tiny random-weight checkpoints of every supported family, built offline from configs.

For tests and benchmarks here and downstream: each builder writes a directory that loads
like a real checkpoint (`AutoProcessor` + `AutoModelForImageTextToText.from_pretrained`,
offline), so the real loading path runs without downloading weights.

    from statekv.testing import build_tiny_qwen2_5_vl, tiny_video_frames
    model = statekv.load(str(build_tiny_qwen2_5_vl("/tmp/tiny-qwen")), device="cpu")
    session = model.prefill_frames(tiny_video_frames(8, size=88), method="full")

Random weights repeat tokens: compare token ids and logits, not text. Builders are
deterministic for a seed.
"""

from statekv.testing.families import build_tiny_llava_onevision, build_tiny_smolvlm
from statekv.testing.internvl import build_tiny_internvl, tiny_video_frames
from statekv.testing.qwen import build_tiny_qwen2_5_vl, build_tiny_qwen3_vl

BUILDERS = {
    "internvl": build_tiny_internvl,
    "smolvlm": build_tiny_smolvlm,
    "llava_onevision": build_tiny_llava_onevision,
    "qwen2_5_vl": build_tiny_qwen2_5_vl,
    "qwen3_vl": build_tiny_qwen3_vl,
}

__all__ = ["BUILDERS", "build_tiny_internvl", "build_tiny_smolvlm", "build_tiny_llava_onevision",
           "build_tiny_qwen2_5_vl", "build_tiny_qwen3_vl", "tiny_video_frames"]
