"""Predict a run's cost before running it (no weights loaded): FLOPs per method, memory.

The prediction walks the same chunks and applies the same carried-state sizes as the
prefill loop, with the same per-chunk formula, so for a checkpoint whose processor is at
hand the predicted LM prefill FLOPs equal what the run then reports.
"""

from __future__ import annotations

from statekv import accounting
from statekv.policies import Policy


def chunk_sizes(layout: list[int], chunk_frames: int) -> list[int]:
    """Prefix, then the tokens of each chunk of `chunk_frames` frames."""
    prefix, frames = layout[0], layout[1:]
    return [prefix] + [sum(frames[i:i + chunk_frames]) for i in range(0, len(frames), chunk_frames)]


def predict_lm_flops(shape: accounting.LMShape, chunks: list[int], policy: Policy,
                     pin_prefix: bool = False) -> int:
    """LM prefill FLOPs of `chunks` (prefix first) under `policy`, as the loop counts them."""
    return sum(accounting.policy_chunk_flops(shape, chunks, policy, pin_prefix))


def available_memory(device) -> int:
    """Bytes free for a run: available RAM, or free memory on the CUDA device."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def human_bytes(value: float) -> str:
    """Bytes with a binary unit, for messages."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"
