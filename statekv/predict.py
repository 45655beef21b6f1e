"""Predict a run's cost before running it (no weights loaded): FLOPs per method, memory.

The prediction walks the same chunks and applies the same carried-state sizes as the
prefill loop, with the same per-chunk formula, so for a checkpoint whose processor is at
hand the predicted LM prefill FLOPs equal what the run then reports.
"""

from __future__ import annotations

from dataclasses import dataclass

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


RUNTIME_BYTES = 64 * 2**20  # processor, tokenizer, kernels' workspaces, decoder: measured ~60-70 MB


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a run will need: weights, detailed cache, carried state, activations, runtime."""

    weights_bytes: int
    detailed_cache_bytes: int
    carried_cache_bytes: int
    activation_bytes: int
    runtime_bytes: int = RUNTIME_BYTES

    @property
    def peak_memory_bytes(self) -> int:
        return (self.weights_bytes + self.detailed_cache_bytes + self.carried_cache_bytes
                + self.activation_bytes + self.runtime_bytes)


def estimate_memory(shape: accounting.LMShape, parameters: int, element_size: int,
                    total_tokens: int, chunk_tokens: int, visible_keys: int,
                    carried_state_tokens: int, hidden: int, intermediate: int) -> MemoryEstimate:
    """Weights + detailed cache (with the answer room) + StateKV's gathered carried state
    (twice: the old one lives while the new one is built) + the largest chunk's activations
    (float32 attention scores of the mass pass included) + a fixed runtime allowance."""
    from statekv.prefill import ANSWER_ROOM

    per_token = shape.kv_bytes_per_token(element_size)
    detailed = total_tokens * per_token
    carried = 2 * carried_state_tokens * per_token
    scores = 4 * shape.heads * chunk_tokens * (visible_keys + chunk_tokens)
    activations = element_size * chunk_tokens * (4 * hidden + 2 * intermediate) + scores
    activations += ANSWER_ROOM * per_token  # the detailed cache's room for a question
    return MemoryEstimate(parameters * element_size, detailed, carried, activations)


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
