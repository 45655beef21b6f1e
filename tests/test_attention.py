"""The fast attention paths against the eager reference: outputs and per-key masses.

Random shapes (grouped-query attention included, queries fewer than keys) in float32, relative
error below 1e-5 on outputs (against the largest output) and on every key's mass.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from statekv import attention


def _inputs(heads, kv_heads, q_len, carried, head_dim, seed, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    k_len = carried + q_len
    # The queries come from transformers as a transposed view: keep that layout.
    query = torch.randn(1, q_len, heads, head_dim, generator=generator).transpose(1, 2)
    key = torch.randn(1, kv_heads, k_len, head_dim, generator=generator)
    value = torch.randn(1, kv_heads, k_len, head_dim, generator=generator)
    return query.to(dtype), key.to(dtype), value.to(dtype), head_dim ** -0.5


def _reference(query, key, value, scale):
    return attention.attend(query, key, value, scale, True, "eager")


def _assert_close(out, mass, ref_out, ref_mass, rel=1e-5):
    scale = ref_out.abs().max().item()
    assert (out.float() - ref_out.float()).abs().max().item() <= rel * scale
    if ref_mass is not None:
        assert mass.shape == ref_mass.shape and mass.dtype == torch.float32
        assert ((mass - ref_mass).abs() / ref_mass.abs()).max().item() < rel


shapes = st.tuples(
    st.sampled_from([(1, 1), (2, 1), (4, 2), (4, 4), (6, 2), (8, 1)]),  # (heads, kv_heads)
    st.integers(1, 40),  # queries (the chunk)
    st.integers(0, 150),  # carried keys before the chunk
    st.sampled_from([8, 16, 64]),  # head_dim
    st.integers(0, 2**16),  # seed
)


@settings(max_examples=30, deadline=None)
@given(shapes, st.sampled_from([1 << 19, 97]))
def test_one_pass_matches_eager(shape, block_entries):
    (heads, kv_heads), q_len, carried, head_dim, seed = shape
    query, key, value, scale = _inputs(heads, kv_heads, q_len, carried, head_dim, seed)
    out, mass = attention.one_pass_attention(query, key, value, scale, block_entries)
    _assert_close(out, mass, *_reference(query, key, value, scale))


@settings(max_examples=30, deadline=None)
@given(shapes, st.sampled_from([1 << 22, 2000]))
def test_fused_output_and_two_pass_mass_match_eager(shape, block_entries):
    (heads, kv_heads), q_len, carried, head_dim, seed = shape
    query, key, value, scale = _inputs(heads, kv_heads, q_len, carried, head_dim, seed)
    out, lse = attention.fused_attention(query, key, value, scale)
    mass = attention.key_mass(query, key, lse, scale, block_entries)
    _assert_close(out, mass, *_reference(query, key, value, scale))
    # The portable (non-CPU) lse agrees with the CPU flash kernel's.
    torch.testing.assert_close(attention._torch_lse(query, key, scale, block_entries), lse,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", ["auto", "one-pass", "two-pass", "reverse-flash"])
@pytest.mark.parametrize("heads,kv_heads,q_len,carried", [
    (4, 2, 64, 1024),  # the benchmark's shape: a frame against a full budget
    (14, 2, 17, 300),  # InternVL3-1B's heads, a chunk shorter than a frame
    (4, 2, 1, 50),  # one query (a decode step)
    (4, 2, 33, 0),  # the chunk alone (no carried state)
])
def test_attend_matches_eager_with_and_without_mass(monkeypatch, strategy, heads, kv_heads,
                                                    q_len, carried):
    monkeypatch.setattr(attention, "MASS_STRATEGY", strategy)
    query, key, value, scale = _inputs(heads, kv_heads, q_len, carried, 64, seed=q_len)
    ref_out, ref_mass = _reference(query, key, value, scale)
    out, mass = attention.attend(query, key, value, scale, True, "sdpa")
    _assert_close(out, mass, ref_out, ref_mass)
    out, mass = attention.attend(query, key, value, scale, False, "sdpa")
    assert mass is None
    _assert_close(out, None, ref_out, None)


@settings(max_examples=30, deadline=None)
@given(shapes)
def test_reverse_flash_mass_matches_eager(shape):
    (heads, kv_heads), q_len, carried, head_dim, seed = shape
    query, key, value, scale = _inputs(heads, kv_heads, q_len, carried, head_dim, seed)
    out, lse = attention.fused_attention(query, key, value, scale)
    mass = attention.reverse_flash_mass(query, key, lse, scale)
    _assert_close(out, mass, *_reference(query, key, value, scale))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reverse_flash_mass_keeps_float32_precision_in_reduced_dtypes(dtype):
    # The kernel accumulates scores in float32 from the reduced-precision inputs, as the float32
    # reference does from the same (rounded) inputs: the masses agree far below bf16's 4e-3.
    query, key, value, scale = _inputs(9, 3, 75, 1024, 64, seed=4, dtype=dtype)
    _, ref_mass = _reference(query.float(), key.float(), value.float(), scale)
    _, lse = attention.fused_attention(query, key, value, scale)
    mass = attention.reverse_flash_mass(query, key, lse, scale)
    assert mass.dtype == torch.float32
    assert ((mass - ref_mass).abs() / ref_mass).max().item() < 2e-4


def test_auto_mass_strategy_by_device_and_dtype():
    query = torch.zeros(1, 2, 3, 8)
    assert attention._mass_strategy(query) == "one-pass"
    assert attention._mass_strategy(query.bfloat16()) == "reverse-flash"
    assert attention._mass_strategy(query.half()) == "reverse-flash"
    assert attention._mass_strategy(query.to("meta")) == "two-pass"


def test_masses_sum_to_the_number_of_queries():
    query, key, value, scale = _inputs(4, 2, 20, 100, 16, seed=1)
    _, mass = attention.attend(query, key, value, scale, True, "sdpa")
    # Every query row's probabilities sum to 1: a KV head's masses sum to groups x queries.
    torch.testing.assert_close(mass.sum(dim=1), torch.full((2,), 2.0 * 20), rtol=1e-5, atol=0)


def test_causal_keys_of_the_chunk_get_no_mass_from_earlier_queries():
    # The chunk's last key is seen only by its last query: its mass is that query's weight.
    query, key, value, scale = _inputs(2, 1, 5, 3, 8, seed=2)
    _, mass = attention.attend(query, key, value, scale, True, "sdpa")
    scores = (query[0, :, -1].float() @ key[0, 0].float().T) * scale  # (heads, k_len)
    last = torch.softmax(scores, dim=-1)[:, -1].sum()
    torch.testing.assert_close(mass[0, -1], last, rtol=1e-5, atol=1e-7)


def test_bfloat16_close_to_float32_reference():
    query, key, value, scale = _inputs(4, 2, 16, 64, 32, seed=3, dtype=torch.bfloat16)
    ref_out, ref_mass = _reference(query.float(), key.float(), value.float(), scale)
    out, mass = attention.attend(query, key, value, scale, True, "sdpa")
    assert out.dtype == torch.bfloat16
    _assert_close(out, mass, ref_out, ref_mass, rel=1e-2)
