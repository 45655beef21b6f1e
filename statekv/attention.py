"""Attention for the language model that can also return each key's attention mass.

Registered with transformers as ``"statekv"`` and used for the text model only. The mass
of a key is the sum over the chunk's queries of the softmax probability it received,
summed over the query heads that share its KV head (grouped-query attention), computed
in float32 whatever the model's dtype.

Two implementations: ``sdpa`` (the fused kernel for the output, plus one explicit QK^T
pass for the mass only when the cache asks for it) and ``eager`` (explicit softmax, the
numerical reference whose matmuls torch's FLOP counter can see).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ATTENTION_NAME = "statekv"
IMPLEMENTATIONS = ("sdpa", "eager")

_mask_memo: dict[tuple, torch.Tensor] = {}


def causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor | None:
    """Bottom-right aligned causal mask (True = visible): query i sees keys j <= k_len - q_len + i.

    The queries are always the last `q_len` positions of the keys (carried entries first,
    then the chunk itself), so every carried entry is visible to every query. None when no
    key is hidden. Memoised for one shape because every layer of a chunk asks for the same.
    """
    if q_len == 1:
        return None
    key = (q_len, k_len, str(device))
    mask = _mask_memo.get(key)
    if mask is None:
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)
        _mask_memo.clear()
        _mask_memo[key] = mask
    return mask


def _grouped_scores(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """Float32 scores (kv_heads, groups, q_len, k_len) without repeating the keys per group."""
    _, heads, q_len, head_dim = query.shape  # (1, heads, q_len, head_dim)
    kv_heads = key.shape[1]
    q = query[0].float().reshape(kv_heads, (heads // kv_heads) * q_len, head_dim)
    scores = torch.matmul(q, key[0].float().transpose(-1, -2)).mul_(scaling)
    return scores.view(kv_heads, heads // kv_heads, q_len, -1)


def _masked_probs(query, key, scaling, mask) -> torch.Tensor:
    scores = _grouped_scores(query, key, scaling)
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1)


def attention_mass(
    query: torch.Tensor, key: torch.Tensor, scaling: float, mask: torch.Tensor | None
) -> torch.Tensor:
    """Per-key attention mass (kv_heads, k_len), float32: one extra QK^T pass."""
    return _masked_probs(query, key, scaling, mask).sum(dim=(1, 2))


def eager_attention(query, key, value, scaling, mask, need_mass):
    """Reference attention: explicit float32 softmax; returns (output (1, heads, q, d), mass | None)."""
    probs = _masked_probs(query, key, scaling, mask)  # (kv_heads, groups, q_len, k_len)
    kv_heads, groups, q_len, _ = probs.shape
    out = torch.matmul(probs.view(kv_heads, groups * q_len, -1), value[0].float())
    out = out.view(1, kv_heads * groups, q_len, -1).to(query.dtype)
    return out, (probs.sum(dim=(1, 2)) if need_mass else None)


def sdpa_attention(query, key, value, scaling, mask, need_mass):
    """Fused attention for the output; the mass pass runs only when asked."""
    q_len, k_len = query.shape[-2], key.shape[-2]
    causal_only = mask is not None and q_len == k_len
    out = F.scaled_dot_product_attention(
        query, key, value,
        attn_mask=None if causal_only else mask,
        is_causal=causal_only,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out, (attention_mass(query, key, scaling, mask) if need_mass else None)


def attend(query, key, value, scaling, need_mass, implementation="sdpa"):
    """Chunk attention over [carried ; chunk] keys, bottom-right causal, batch 1."""
    mask = causal_mask(query.shape[-2], key.shape[-2], query.device)
    fn = eager_attention if implementation == "eager" else sdpa_attention
    return fn(query, key, value, scaling, mask, need_mass)


def statekv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The function transformers calls for every text-model attention layer.

    A StateCache passed as the ``statekv_cache`` keyword tells whether this layer needs
    the mass (StateKV prefill) and receives it. Without one (or with a padding mask) this
    behaves like ordinary causal attention, so a model left in this mode still works.
    """
    cache = kwargs.get("statekv_cache")
    if cache is None or attention_mask is not None:
        if attention_mask is None:
            mask = causal_mask(query.shape[-2], key.shape[-2], query.device)
            attention_mask = None if mask is None else mask[None, None]
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, is_causal=False)
    layer = cache.layers[module.layer_idx]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out, mass = attend(query, key, value, scale, layer.wants_mass, cache.attention)
    if mass is not None:
        layer.commit(mass)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, statekv_attention)
