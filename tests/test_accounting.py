"""The analytic FLOP counts (accounting.py) against torch's FlopCounterMode.

Linear layers: the counter's mm/addmm over a real prefill must equal 2 x in x out per token.
Attention: the eager reference path multiplies the whole (queries x [carried ; chunk]) rectangle,
which the counter sees as bmm; the convention (docs/measurement.md) counts causally, i.e. the rectangle
minus the hidden upper triangle of the chunk's own square. Both within 2%.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from statekv import accounting, attention
from statekv.models.synthetic import SyntheticAdapter, build_language_model, synthetic_chunks, text_config
from statekv.policies import make_policy
from statekv.prefill import prefill_chunks
from statekv.presets import Architecture

ARCH = Architecture(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128,
                    tokens_per_frame=8)
LINEAR_OPS = {"aten.mm", "aten.addmm"}
ATTENTION_OPS = {"aten.bmm", "aten.baddbmm", "aten._scaled_dot_product_flash_attention_for_cpu"}


@pytest.fixture(scope="module")
def adapter():
    return SyntheticAdapter(build_language_model(ARCH), ARCH.tokens_per_frame, prefix_tokens=5)


def _counted(fn, *args, **kwargs):
    accounting._register_cpu_sdpa_formula()
    with FlopCounterMode(display=False) as counter:
        result = fn(*args, **kwargs)
    totals: dict[str, int] = {}
    for op, flops in counter.get_flop_counts()["Global"].items():
        totals[str(op).removesuffix(".default")] = int(flops)
    return result, totals


def _carried(policy, chunk_tokens):
    """Keys each chunk saw besides its own (no pinning): min(capacity, history)."""
    seen, out = 0, []
    for tokens in chunk_tokens:
        out.append(seen if policy.capacity is None else min(policy.capacity, seen))
        seen += tokens
    return out


def _within(counted: int, expected: int, tolerance: float = 0.02) -> bool:
    return abs(counted - expected) <= tolerance * expected


def test_shape_from_config_equals_shape_from_model(adapter):
    from_model = accounting.LMShape.from_model(adapter.language_model, adapter.text_config)
    assert from_model == accounting.LMShape.from_config(text_config(ARCH))


@pytest.mark.parametrize("method", ["full", "statekv", "window"])
def test_prefill_counts_match_the_counter_on_the_eager_path(adapter, method):
    policy = make_policy(method, budget=20, window_tokens=16)
    result, totals = _counted(prefill_chunks, adapter, synthetic_chunks(6, 1), policy, frame_count=6,
                              timestamps=(), attention="eager")
    shape = accounting.LMShape.from_model(adapter.language_model, adapter.text_config)
    chunks = result.chunk_tokens
    carried = _carried(policy, chunks)
    linear = sum(accounting.linear_flops(shape, t) for t in chunks)
    assert _within(sum(totals.get(op, 0) for op in LINEAR_OPS), linear)
    rectangle = sum(accounting.attention_flops(shape, t, c, causal=False)
                    for t, c in zip(chunks, carried))
    assert _within(sum(totals.get(op, 0) for op in ATTENTION_OPS), rectangle)
    # The causal convention is the rectangle minus each chunk's hidden upper triangle.
    causal = sum(accounting.attention_flops(shape, t, c) for t, c in zip(chunks, carried))
    hidden = sum(4 * shape.heads * shape.head_dim * shape.layers * t * (t - 1) // 2 for t in chunks)
    assert causal == rectangle - hidden
    # What the loop reports is what the prediction walks to, chunk by chunk.
    assert result.lm_prefill_flops == sum(accounting.policy_chunk_flops(shape, chunks, policy))
    mass = [policy.needs_mass and c + t > policy.capacity for t, c in zip(chunks, carried)]
    assert result.lm_prefill_flops == linear + causal + sum(
        accounting.mass_flops(shape, t, c) for t, c, m in zip(chunks, carried, mass) if m)


def _attention_work(strategy: str, shape, q_len: int, carried: int) -> int:
    """FLOPs each fast path multiplies for one chunk with masses."""
    rectangle = accounting.attention_flops(shape, q_len, carried, causal=False)  # QK^T + PV
    if strategy == "one-pass":  # the masses come out of the output's own softmax
        return rectangle
    if strategy == "two-pass":  # plus one QK^T pass for the masses
        return rectangle * 3 // 2
    # reverse-flash: the kernel run backwards over the carried keys (QK^T and a discarded PV),
    # and one QK^T block for the chunk's own keys
    own = accounting.attention_flops(shape, q_len, 0, causal=False)
    return 2 * rectangle - own // 2


@pytest.mark.parametrize("strategy", ["two-pass", "one-pass", "reverse-flash"])
def test_fast_path_attention_work_matches_its_count(monkeypatch, strategy):
    monkeypatch.setattr(attention, "MASS_STRATEGY", strategy)
    heads, kv_heads, q_len, carried, head_dim = 4, 2, 24, 200, 16
    query = torch.randn(1, heads, q_len, head_dim)
    key = torch.randn(1, kv_heads, carried + q_len, head_dim)
    (out, mass), totals = _counted(attention.attend, query, key, torch.randn_like(key),
                                   head_dim ** -0.5, True, "sdpa")
    shape = accounting.LMShape(layers=1, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                               linear_params=0)
    assert _within(sum(totals.values()), _attention_work(strategy, shape, q_len, carried))
    assert mass is not None and out.shape == query.shape


def test_full_prefill_flops_is_quadratic_and_linear_layers_are_per_token():
    shape = accounting.LMShape.from_config(text_config(ARCH))
    one = accounting.full_prefill_flops(shape, [64] * 10)
    two = accounting.full_prefill_flops(shape, [64] * 20)
    linear = accounting.linear_flops(shape, 64 * 10)
    assert (two - 2 * linear) > 3.5 * (one - linear)  # attention ~4x for 2x the frames
