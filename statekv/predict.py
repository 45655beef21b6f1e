"""Predict a run's cost before running it (no weights loaded): FLOPs per method, memory.

The prediction walks the same chunks and applies the same carried-state sizes as the
prefill loop, with the same per-chunk formula, so for a checkpoint whose processor is at
hand the predicted LM prefill FLOPs equal what the run then reports.
"""

from __future__ import annotations

from dataclasses import dataclass

from statekv import accounting
from statekv.policies import Policy


def carried_before(policy: Policy, seen: int, pinned: int) -> int:
    """Keys a chunk sees besides its own (pinned prefix + carried state) after `seen` tokens."""
    history = seen - pinned
    capacity = history if policy.capacity is None else min(policy.capacity, history)
    return pinned + capacity


def chunk_sizes(layout: list[int], chunk_frames: int) -> list[int]:
    """Prefix, then the tokens of each chunk of `chunk_frames` frames."""
    prefix, frames = layout[0], layout[1:]
    return [prefix] + [sum(frames[i:i + chunk_frames]) for i in range(0, len(frames), chunk_frames)]


def predict_lm_flops(shape: accounting.LMShape, chunks: list[int], policy: Policy,
                     pin_prefix: bool = False) -> int:
    """LM prefill FLOPs of `chunks` (prefix first) under `policy`, as the loop counts them."""
    total, seen, pinned = 0, 0, 0
    for tokens in chunks:
        carried = carried_before(policy, seen, pinned)
        mass = policy.needs_mass and carried - pinned + tokens > policy.capacity
        total += accounting.chunk_flops(shape, tokens, carried, mass)
        seen += tokens
        if pinned == 0 and (pin_prefix or policy.pins_prefix):
            pinned = seen
    return total


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a run will need: weights, detailed cache and an activation allowance."""

    weights_bytes: int
    detailed_cache_bytes: int
    activation_bytes: int

    @property
    def peak_memory_bytes(self) -> int:
        return self.weights_bytes + self.detailed_cache_bytes + self.activation_bytes


def estimate_memory(shape: accounting.LMShape, parameters: int, element_size: int,
                    total_tokens: int, chunk_tokens: int, carried_tokens: int,
                    hidden: int, intermediate: int) -> MemoryEstimate:
    """Weights + detailed cache + the largest chunk's activations (float32 scores included)."""
    detailed = total_tokens * shape.kv_bytes_per_token(element_size)
    keys = carried_tokens + chunk_tokens
    scores = 4 * shape.heads * chunk_tokens * keys  # the mass pass's float32 scores
    activations = element_size * chunk_tokens * (4 * hidden + 2 * intermediate) + scores
    return MemoryEstimate(parameters * element_size, detailed, activations)
