"""Shared fixtures: tiny random-weight checkpoints saved and loaded like real ones, test videos."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_internvl_dir(tmp_path_factory):
    from statekv.tiny import build_tiny_internvl

    return build_tiny_internvl(tmp_path_factory.mktemp("tiny_internvl") / "ckpt")


@pytest.fixture(scope="session")
def tiny_model(tiny_internvl_dir):
    """The statekv Model on the tiny checkpoint (float32, CPU)."""
    import statekv

    return statekv.load(str(tiny_internvl_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def reference(tiny_internvl_dir):
    """The unmodified transformers model and processor: the ground truth."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_internvl_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_internvl_dir, attn_implementation="sdpa")
    return model.eval(), processor


@pytest.fixture(scope="session")
def frames():
    from statekv.tiny import tiny_video_frames

    return tiny_video_frames(8)
