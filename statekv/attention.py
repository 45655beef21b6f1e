"""Attention for the language model that can also return each key's attention mass.

Registered with transformers as ``"statekv"`` and used for the text model only. The mass
of a key is the sum over the chunk's queries of the softmax probability it received,
summed over the query heads that share its KV head (grouped-query attention), computed
in float32 whatever the model's dtype.

Two implementations:
- ``sdpa`` (the fast path). Without masses (full, window, a StateKV chunk that fits): the
  fused attention kernel. With masses on the CPU: one exact softmax pass in blocks of query
  rows (scores of a block against all keys, softmax, P @ V, and the column sums of P, which are
  the masses): the keys and values are read once per block, the probability matrix is never
  held whole, and no QK^T is computed twice. Measured on a 2-core CPU at the shape StateKV
  runs (a chunk against budget + chunk keys) it costs ~1.1x the fused kernel alone, where
  fused kernel + a second QK^T pass for the masses cost ~2x. In bfloat16 / float16 on the CPU
  that pass would run its products in float32, slower than the fused kernel's reduced-
  precision ones; there the fused kernel gives the output and log-sum-exp, and the masses come
  from the same kernel run backwards (`reverse_flash_mass`: each carried key as a query over
  the chunk's queries with -lse as a bias; its log-sum-exp is the key's log mass), ~2.3x
  faster than the float32 mass pass at a frame against 1,024 carried keys. Elsewhere (CUDA)
  the fused kernel gives the output and the log-sum-exp, then a blocked second pass over keys
  sums exp(score - lse) per key (`fused_attention` + `key_mass`, also tested on the CPU).
- ``eager``: explicit float32 softmax, the numerical reference whose matmuls torch's FLOP
  counter can see. Tests hold the fast path to it.

Keys are [carried ; chunk]: every carried key is visible to every query, the chunk's own keys
causally (bottom-right aligned). The fused path runs those two parts as two kernel calls (the
carried part needs no mask at all, the chunk part is an ordinary causal square) and merges
them through their log-sum-exps, so no (queries x keys) mask is ever built or read.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

# Score entries per block of the two-pass mass pass (defined with the memory estimate).
from statekv.accounting import MASS_BLOCK_ENTRIES

ATTENTION_NAME = "statekv"
IMPLEMENTATIONS = ("sdpa", "eager")
# Score entries per block of query rows in the one-pass CPU path (2 MB float32, about one
# core's L2 cache, where it measured fastest); also bounds that path's extra memory.
ROW_BLOCK_ENTRIES = 1 << 19
# "auto": on the CPU one pass for float32 and the reverse flash pass for bfloat16 / float16,
# two passes elsewhere; "one-pass" / "two-pass" / "reverse-flash" force one (CPU only).
MASS_STRATEGY = "auto"

_mask_memo: dict[tuple, torch.Tensor] = {}
_rows_memo: dict[tuple, torch.Tensor] = {}
_CPU_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_CPU_FLASH_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


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


# eager reference ---------------------------------------------------------------------------
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
    """Per-key attention mass (kv_heads, k_len), float32, from an explicit softmax (reference)."""
    return _masked_probs(query, key, scaling, mask).sum(dim=(1, 2))


def eager_attention(query, key, value, scaling, mask, need_mass):
    """Reference attention: explicit float32 softmax; returns (output (1, heads, q, d), mass | None)."""
    probs = _masked_probs(query, key, scaling, mask)  # (kv_heads, groups, q_len, k_len)
    kv_heads, groups, q_len, _ = probs.shape
    out = torch.matmul(probs.view(kv_heads, groups * q_len, -1), value[0].float())
    out = out.view(1, kv_heads * groups, q_len, -1).to(query.dtype)
    return out, (probs.sum(dim=(1, 2)) if need_mass else None)


# fast path: fused output + log-sum-exp ------------------------------------------------------
def _uses_cpu_flash(query: torch.Tensor) -> bool:
    return query.device.type == "cpu" and query.dtype in _CPU_FLASH_DTYPES


def _fold_groups(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(1, heads, q, d) -> (1, kv_heads, groups * q, d): the queries sharing a KV head as one
    longer query block, so keys are read once per KV head and never repeated."""
    _, heads, q_len, head_dim = query.shape
    return query.reshape(1, kv_heads, (heads // kv_heads) * q_len, head_dim)


def _merge(out1, lse1, out2, lse2):
    """Attention over the union of two disjoint key sets from each part's output and lse."""
    lse = torch.logaddexp(lse1, lse2)
    out = out1 * (lse1 - lse).exp_().unsqueeze(-1)
    out.addcmul_(out2, (lse2 - lse).exp_().unsqueeze(-1))
    return out, lse


def _cpu_flash_with_lse(query, key, value, scaling):
    """CPU flash kernel over [carried ; chunk]: output (1, heads, q, d) and lse (1, heads, q) float32."""
    _, heads, q_len, head_dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[-2]
    carried = k_len - q_len
    if carried == 0:  # the chunk alone: an ordinary causal square
        out, lse = _CPU_FLASH(query, key, value, 0.0, q_len > 1, scale=scaling)
        return out, lse.reshape(1, heads, q_len).float()
    if q_len == 1:  # a decode step: no key hidden
        out, lse = _CPU_FLASH(_fold_groups(query, kv_heads), key, value, 0.0, False, scale=scaling)
        return out.reshape(1, heads, 1, head_dim), lse.reshape(1, heads, 1).float()
    out1, lse1 = _CPU_FLASH(_fold_groups(query, kv_heads), key[:, :, :carried],
                            value[:, :, :carried], 0.0, False, scale=scaling)
    out2, lse2 = _CPU_FLASH(query, key[:, :, carried:], value[:, :, carried:], 0.0, True,
                            scale=scaling)
    out1 = out1.reshape(1, heads, q_len, head_dim)
    return _merge(out1, lse1.reshape(1, heads, q_len).float(), out2,
                  lse2.reshape(1, heads, q_len).float())


def _torch_lse(query, key, scaling, block_entries: int = MASS_BLOCK_ENTRIES,
               causal: bool = True) -> torch.Tensor:
    """Log-sum-exp (1, heads, q) of every query's visible scores, blockwise over keys (any device)."""
    _, heads, q_len, _ = query.shape
    lse = None
    for start, part in _score_blocks(query, key, scaling, block_entries, causal=causal):
        part_lse = torch.logsumexp(part, dim=-1)  # (kv_heads, groups * q)
        lse = part_lse if lse is None else torch.logaddexp(lse, part_lse)
    return lse.reshape(1, heads, q_len)


def fused_attention(query, key, value, scaling, need_lse: bool = True):
    """Output (1, heads, q, d) of the fused kernel and, if asked, the lse (1, heads, q) float32.

    On the CPU the flash kernel gives both. Elsewhere (CUDA) the output comes from SDPA and
    the lse from one blocked QK^T pass in torch: the same two-pass scheme, portable.
    """
    if _uses_cpu_flash(query):
        out, lse = _cpu_flash_with_lse(query, key, value, scaling)
        return out.to(query.dtype), (lse if need_lse else None)
    mask = causal_mask(query.shape[-2], key.shape[-2], query.device)
    q_len, k_len = query.shape[-2], key.shape[-2]
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=None if q_len == k_len else mask, is_causal=q_len == k_len > 1,
        scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out, (_torch_lse(query, key, scaling) if need_lse else None)


# fast path: the mass pass -------------------------------------------------------------------
def _score_blocks(query, key, scaling, block_entries, neg_lse=None, causal: bool = True):
    """Yield (first key, float32 block (kv_heads, groups * q, keys)) of masked scores (minus lse).

    Carried keys come in blocks of at most `block_entries` scores; the chunk's own keys come
    last, in one block with the causal mask applied (-inf where hidden) unless `causal` is off.
    """
    _, heads, q_len, _ = query.shape
    kv_heads, k_len = key.shape[1], key.shape[-2]
    rows = (heads // kv_heads) * q_len
    q = _fold_groups(query, kv_heads)[0].float().mul(scaling)  # (kv_heads, rows, d), scaled once
    keys = key[0].float() if key.dtype != torch.float32 else key[0]  # (kv_heads, k_len, d)
    bias = neg_lse if neg_lse is not None else q.new_zeros(1, 1, 1)
    carried = k_len - q_len
    step = max(1, block_entries // (kv_heads * rows))
    for start in range(0, carried, step):
        end = min(carried, start + step)
        yield start, torch.baddbmm(bias, q, keys[:, start:end].transpose(1, 2))
    block = torch.baddbmm(bias, q, keys[:, carried:].transpose(1, 2))  # (kv_heads, rows, q_len)
    if q_len > 1 and causal:
        hidden = ~causal_mask(q_len, q_len, query.device)
        block.view(kv_heads, rows // q_len, q_len, q_len).masked_fill_(hidden, float("-inf"))
    yield carried, block


def key_mass(query, key, lse, scaling, block_entries: int = MASS_BLOCK_ENTRIES,
             causal: bool = True) -> torch.Tensor:
    """Per-key attention mass (kv_heads, k_len) float32: sum over queries and grouped heads of
    exp(score - lse), one extra QK^T pass in blocks of keys."""
    kv_heads, k_len = key.shape[1], key.shape[-2]
    neg_lse = lse.reshape(kv_heads, -1, 1).neg()  # rows in the same (group, query) order
    mass = torch.empty(kv_heads, k_len, dtype=torch.float32, device=key.device)
    for start, block in _score_blocks(query, key, scaling, block_entries, neg_lse, causal):
        torch.sum(block.exp_(), dim=1, out=mass[:, start:start + block.shape[-1]])
    return mass


def _hidden_rows(q_len: int, groups: int, device: torch.device) -> torch.Tensor:
    """(groups * q_len, q_len) True where a folded query row may not see a chunk key."""
    key = (q_len, groups, str(device))
    hidden = _rows_memo.get(key)
    if hidden is None:
        visible = torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril()
        hidden = (~visible).repeat(groups, 1)
        _rows_memo.clear()
        _rows_memo[key] = hidden
    return hidden


def one_pass_attention(query, key, value, scaling, block_entries: int = ROW_BLOCK_ENTRIES):
    """Output (1, heads, q, d) and per-key mass (kv_heads, k_len) float32 in one exact pass.

    Blocks of query rows (the queries of all heads sharing a KV head, folded) against every
    visible key: scores, causal mask on the chunk's own keys, softmax, P @ V, and P's column
    sums. Only one block of probabilities exists at a time.
    """
    _, heads, q_len, head_dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[-2]
    rows, carried = (heads // kv_heads) * q_len, k_len - q_len
    q = _fold_groups(query, kv_heads)[0].float()  # (kv_heads, rows, d)
    keys_t = key[0].float().transpose(1, 2)  # (kv_heads, d, k_len)
    values = value[0].float()  # (kv_heads, k_len, d)
    hidden = _hidden_rows(q_len, heads // kv_heads, query.device) if q_len > 1 else None
    out = q.new_empty(kv_heads, rows, head_dim)
    mass = None
    step = max(1, block_entries // (kv_heads * k_len))
    for start in range(0, rows, step):
        end = min(rows, start + step)
        scores = torch.baddbmm(q.new_empty(()), q[:, start:end], keys_t, beta=0.0, alpha=scaling)
        if hidden is not None:
            scores[:, :, carried:].masked_fill_(hidden[start:end], float("-inf"))
        probs = torch.softmax(scores, dim=-1)  # (kv_heads, block rows, k_len)
        torch.bmm(probs, values, out=out[:, start:end])
        block_mass = probs.sum(dim=1)
        mass = block_mass if mass is None else mass.add_(block_mass)
    return out.view(1, heads, q_len, head_dim).to(query.dtype), mass


def reverse_flash_mass(query, key, lse, scaling) -> torch.Tensor:
    """Per-key attention mass (kv_heads, k_len) float32 from the CPU flash kernel run backwards.

    A carried key j's mass is sum_i exp(s_ij - lse_i): the log-sum-exp of an attention in which
    key j is the query, the chunk's (folded) queries are the keys and -lse_i is an additive
    bias. The kernel returns that log-sum-exp, computed like its forward (scores accumulated in
    float32 from the model's dtype), so exp() of it is the mass; its output is discarded. The
    chunk's own keys (a small causal square) come from one float32 block (`key_mass`).
    """
    q_len = query.shape[2]
    kv_heads, k_len = key.shape[1], key.shape[-2]
    carried = k_len - q_len
    mass = torch.empty(kv_heads, k_len, dtype=torch.float32, device=key.device)
    if carried:
        folded = _fold_groups(query, kv_heads)  # (1, kv_heads, groups * q, d)
        bias = lse.reshape(1, kv_heads, 1, -1).neg()  # rows in the folded order
        _, log_mass = _CPU_FLASH(key[:, :, :carried], folded, folded, 0.0, False,
                                 attn_mask=bias, scale=scaling)
        torch.exp(log_mass.reshape(kv_heads, carried), out=mass[:, :carried])
    mass[:, carried:] = key_mass(query, key[:, :, carried:], lse, scaling)
    return mass


def _mass_strategy(query: torch.Tensor) -> str:
    """One pass for float32 on the CPU; the reverse flash pass for bfloat16 / float16 on the
    CPU (where the flash kernel's reduced-precision products beat float32 ones); two passes
    elsewhere."""
    if MASS_STRATEGY != "auto":
        return MASS_STRATEGY
    if not _uses_cpu_flash(query):
        return "two-pass"
    return "one-pass" if query.dtype in (torch.float32, torch.float64) else "reverse-flash"


def sdpa_attention(query, key, value, scaling, mask, need_mass):
    """Fast path: the fused kernel for the output; with masses, one exact pass in blocks of
    query rows (CPU, float32), fused output + lse and the reverse flash mass pass (CPU,
    bfloat16 / float16), or fused output + lse and a blocked mass pass (elsewhere)."""
    if not need_mass:
        return fused_attention(query, key, value, scaling, need_lse=False)[0], None
    strategy = _mass_strategy(query)
    if strategy == "one-pass":
        return one_pass_attention(query, key, value, scaling)
    out, lse = fused_attention(query, key, value, scaling)
    if strategy == "reverse-flash":
        return out, reverse_flash_mass(query, key, lse, scaling)
    return out, key_mass(query, key, lse, scaling)


def bidirectional_mass(query, key, scaling, implementation="sdpa") -> torch.Tensor:
    """Per-key mass (kv_heads, k_len) as if every query of the chunk saw every key of the chunk
    (no causal mask): a scoring view only, the attention output stays causal."""
    if implementation == "eager":
        return attention_mass(query, key, scaling, None)
    lse = _torch_lse(query, key, scaling, causal=False)
    return key_mass(query, key, lse, scaling, causal=False)


def attend(query, key, value, scaling, need_mass, implementation="sdpa", causal_mass=True):
    """Chunk attention over [carried ; chunk] keys, bottom-right causal, batch 1. With
    `causal_mass` off the mass comes from the bidirectional view (`bidirectional_mass`)."""
    if need_mass and not causal_mass:
        out, _ = attend(query, key, value, scaling, False, implementation)
        return out, bidirectional_mass(query, key, scaling, implementation)
    if implementation == "eager":
        mask = causal_mask(query.shape[-2], key.shape[-2], query.device)
        return eager_attention(query, key, value, scaling, mask, need_mass)
    return sdpa_attention(query, key, value, scaling, None, need_mass)


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
    if layer.group is None:
        out = _attend_chunk(layer, cache, query, key, value, scale, layer.seen - query.shape[-2])
        return out.transpose(1, 2).contiguous(), None
    # Grouped prefill: the forward holds several chunks; `key`/`value` are their own keys (all
    # in the detailed cache now). Each chunk attends to its layer's state in turn and commits
    # its selection before the next one asks, as if each were its own forward.
    _, heads, tokens, head_dim = query.shape
    out = query.new_empty(1, tokens, heads, head_dim)
    first = 0
    for count in layer.group:
        part = slice(first, first + count)
        start = layer.group_start + first
        keys, values = layer.chunk_keys(key[:, :, part], value[:, :, part], start)
        out[:, part] = _attend_chunk(layer, cache, query[:, :, part], keys, values, scale,
                                     start).transpose(1, 2)
        first += count
    return out, None


def _attend_chunk(layer, cache, query, key, value, scale, start):
    """One chunk's attention over the keys its layer serves; hands the mass to the layer (its
    selection) and to a mass observer. Returns the output (1, heads, q, d)."""
    observed = layer.mass_observer is not None and not layer.answering
    serial = getattr(cache, "serial", None)
    scores = query.shape[1] * query.shape[2] * key.shape[2]
    with serial.attention(scores) if serial is not None else nullcontext():
        out, mass = attend(query, key, value, scale, layer.wants_mass or observed,
                           cache.attention,
                           causal_mass=not (layer.wants_mass and cache.policy.bidirectional_scores))
    if observed:
        layer.mass_observer(layer.index, start, mass)
    if mass is not None and layer.wants_mass:
        layer.commit(mass)
    return out


AttentionInterface.register(ATTENTION_NAME, statekv_attention)
