"""Shared fixtures: tiny random-weight checkpoints saved and loaded like real ones, test videos."""

from __future__ import annotations

import os

# Tiny models are faster on one thread, and the suite must not fight itself (or the subprocesses
# it starts) for the cores: set before numpy and torch read it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from dataclasses import dataclass  # noqa: E402
from pathlib import Path
from typing import Any, Callable

import numpy as np  # noqa: E402
import pytest  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `--dtype auto` picks bfloat16 on CPUs with native bf16 matmul: keep the suite at float32 on
# every machine (tests of the bf16 choice mock the CPU instead).
os.environ.setdefault("STATEKV_CPU_BF16", "0")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _fresh_video_cache():
    """Probes are memoised per file; tests that swap decoders must not see earlier answers."""
    from statekv import video

    video.clear_cache()
    yield



@dataclass(frozen=True)
class FamilySpec:
    """How the shared contract tests build and drive one model family."""

    build: Callable[[Path], Path]  # writes a tiny checkpoint directory, returns it
    frames: Callable[[], np.ndarray]  # the test video, uint8 (n, H, W, 3)
    # the family's own processor on the whole video + question (the layout ground truth)
    reference_inputs: Callable[[Any, np.ndarray, str], dict] | None = None


def chat_video_inputs(processor, frames, question):
    """The processor's own inputs for a video and a question (generic chat-template path)."""
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    n = len(frames)
    return processor(text=text, videos=[frames], do_sample_frames=False, return_tensors="pt",
                     video_metadata=[{"total_num_frames": n, "fps": 1.0, "duration": float(n),
                                      "frames_indices": list(range(n))}])


def _internvl_build(path):
    from statekv.testing import build_tiny_internvl

    return build_tiny_internvl(path)


def _smolvlm_build(path):
    from statekv.testing import build_tiny_smolvlm

    return build_tiny_smolvlm(path)


def _llava_onevision_build(path):
    from statekv.testing import build_tiny_llava_onevision

    return build_tiny_llava_onevision(path)


def smolvlm_video_inputs(processor, frames, question):
    """SmolVLM's processor on the video: its built-in video template (which apply_chat_template
    swaps in for any video message) and `Frame from MM:SS:` labels from the metadata's fps.
    The metadata holds what statekv gives the adapter (frame times, no duration), so the intro's
    duration is the processor's own fallback, the last frame's time."""
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    n = len(frames)
    return processor(text=text, videos=[frames], do_sample_frames=False, return_tensors="pt",
                     video_metadata=[{"total_num_frames": n, "fps": 1.0, "duration": None,
                                      "frames_indices": list(range(n))}])


def _qwen2_5_vl_build(path):
    from statekv.testing import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(path)


def _qwen3_vl_build(path):
    from statekv.testing import build_tiny_qwen3_vl

    return build_tiny_qwen3_vl(path)


def _tiny_frames(n=8, size=64):
    from statekv.testing import tiny_video_frames

    return tiny_video_frames(n, size=size)


# One entry per model family: every contract test runs on each.
FAMILIES: dict[str, FamilySpec] = {
    "internvl": FamilySpec(build=_internvl_build, frames=_tiny_frames),
    "smolvlm": FamilySpec(build=_smolvlm_build, frames=_tiny_frames,
                          reference_inputs=smolvlm_video_inputs),
    "llava_onevision": FamilySpec(build=_llava_onevision_build, frames=_tiny_frames),
    # tiny_qwen.*_FRAME_SIZE: 88 px resize to 96 px; 128 px shrink to 96 px (whole-video budget).
    "qwen2_5_vl": FamilySpec(build=_qwen2_5_vl_build, frames=lambda: _tiny_frames(8, 88)),
    "qwen3_vl": FamilySpec(build=_qwen3_vl_build, frames=lambda: _tiny_frames(8, 128)),
}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Tiny checkpoint directories, built once per family per test session."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = FAMILIES[family].build(tmp_path_factory.mktemp(family) / "ckpt")
        return built[family]

    return get


@pytest.fixture(scope="session", params=sorted(FAMILIES))
def family(request, checkpoints):
    """(name, statekv Model, unmodified transformers model, processor, frames, spec) per family."""
    import statekv
    from transformers import AutoModelForImageTextToText, AutoProcessor

    name = request.param
    path = checkpoints(name)
    model = statekv.load(str(path), device="cpu", dtype="float32")
    processor = AutoProcessor.from_pretrained(path)
    reference = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa").eval()
    spec = FAMILIES[name]
    return Family(name, model, reference, processor, spec.frames(), spec)


@dataclass
class Family:
    name: str
    model: Any
    reference: Any
    processor: Any
    frames: np.ndarray
    spec: FamilySpec

    def reference_inputs(self, question: str) -> dict:
        fn = self.spec.reference_inputs or chat_video_inputs
        return fn(self.processor, self.frames, question)


@pytest.fixture(scope="session")
def tiny_internvl_dir(checkpoints):
    return checkpoints("internvl")


@pytest.fixture(scope="session")
def tiny_model(tiny_internvl_dir):
    """The statekv Model on the tiny InternVL checkpoint (float32, CPU)."""
    import statekv

    return statekv.load(str(tiny_internvl_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def frames():
    return _tiny_frames(8)


def write_video(path, frames: int = 12, size: tuple[int, int] = (96, 64), fps: int = 4) -> Path:
    """A small h264 video whose frames differ visibly (moving bar, changing colour)."""
    import av

    path = Path(path)
    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            image = np.zeros((height, width, 3), np.uint8)
            image[:, :, 0] = (40 * i) % 256
            x = (i * 7) % max(1, width - 8)
            image[:, x:x + 8, 1] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="session")
def clip(tmp_path_factory) -> Path:
    """A 3-second, 12-frame test video."""
    return write_video(tmp_path_factory.mktemp("videos") / "clip.mp4")
