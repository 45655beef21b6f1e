"""StateCache: the carried state (what a chunk attends to) and the detailed cache (every token).

A transformers ``Cache`` whose layers are ``StateLayer``s. During prefill ``update`` appends
the chunk's keys/values to the detailed cache and returns the keys the chunk may attend to:
[pinned prefix ; carried state ; chunk]. For recency policies (full, window, isolated) the
carried state is a contiguous tail of the detailed cache, so it is served as a view with no
copy. For StateKV it is a gathered set of at most ``budget`` entries per KV head, replaced
in ``commit`` once the attention function has measured every key's mass.

The detailed cache is preallocated (from the planned token count) and grows by doubling
only if a question needs more room, so nothing is re-copied per chunk or per decoded token.
While answering, questions are written after the video and ``rewind`` forgets them again.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from statekv.policies import Policy


class StateLayer(CacheLayerMixin):
    """One decoder layer's detailed cache plus its carried state."""

    is_sliding = False

    def __init__(self, policy: Policy, reserve_tokens: int) -> None:
        super().__init__()
        self.policy = policy
        self.reserve_tokens = reserve_tokens
        self.seen = 0  # tokens in the detailed cache
        self.pinned = 0  # leading tokens always visible, outside the budget
        self.answering = False
        self.prefixing = False  # the text prefix about to be pinned: plain causal attention
        self.wants_mass = False
        self.carried_keys: torch.Tensor | None = None  # (1, kv_heads, carried, head_dim)
        self.carried_values: torch.Tensor | None = None
        self.carried_positions: torch.Tensor | None = None  # (kv_heads, carried) token indices
        self.max_carried = 0
        self.carried_scores: torch.Tensor | None = None  # (kv_heads, carried) running scores
        self.index = 0  # the decoder layer this is
        # Called with (layer index, tokens seen, kept positions (kv_heads, kept)) each time a
        # selecting policy keeps its carried state; None (the default) costs nothing.
        self.observer: Callable[[int, int, torch.Tensor], None] | None = None
        # Called with (layer index, first position of the chunk, mass (kv_heads, keys)) after
        # every prefill chunk's attention, whatever the policy: it makes the attention compute
        # the mass even where the policy needs none. None (the default) costs nothing.
        self.mass_observer: Callable[[int, int, torch.Tensor], None] | None = None
        # Grouped prefill (several chunks in one language-model forward): the token counts of
        # the chunks this forward holds, in order, and the first token of the first; None when
        # the forward is one chunk. The attention function then runs the chunks one by one
        # against this layer's state (`chunk_keys`), exactly as separate forwards would.
        self.group: list[int] | None = None
        self.group_start = 0
        self._chunk_end = 0  # last token + 1 of the chunk being attended (for the observer)
        # (keys, values, positions) of [carried ; chunk] between update() and commit()
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._buffers = _CarriedBuffers()

    # transformers' layer contract -------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        _, kv_heads, tokens, head_dim = key_states.shape
        shape = (1, kv_heads, max(self.reserve_tokens, tokens), head_dim)
        self.keys = torch.empty(shape, dtype=key_states.dtype, device=key_states.device)
        self.values = torch.empty(shape, dtype=value_states.dtype, device=value_states.device)
        self._buffers.init(key_states)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """Append the chunk to the detailed cache; return the keys/values it attends to."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.seen
        self._append(key_states, value_states)
        self._chunk_end = self.seen
        if self.group is not None:  # the attention function asks chunk by chunk (chunk_keys)
            self.group_start = start
            return key_states, value_states
        if self.answering or self.prefixing or self.policy.recency:
            return self._recent(start)
        return self._candidates(key_states, value_states, start)

    def chunk_keys(self, key_states, value_states, start: int):
        """Grouped prefill: the keys/values one chunk of the forward attends to, the chunk's own
        keys being `key_states` at token `start` (already in the detailed cache). Chunks must
        come in order, each one's selection committed before the next asks."""
        end = start + key_states.shape[-2]
        self._chunk_end = end
        if self.policy.recency:
            return self._recent(start, end)
        return self._candidates(key_states, value_states, start)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    # detailed cache -------------------------------------------------------------------
    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        end = self.seen + key_states.shape[-2]
        if end > self.keys.shape[-2]:
            self._grow(max(end, 2 * self.keys.shape[-2]))
        self.keys[:, :, self.seen:end] = key_states
        self.values[:, :, self.seen:end] = value_states
        self.seen = end

    def _grow(self, capacity: int) -> None:
        # Rare: only when answers need more room than was reserved; doubling keeps it amortised.
        keys = self.keys.new_empty((*self.keys.shape[:2], capacity, self.keys.shape[-1]))
        values = self.values.new_empty(keys.shape)
        keys[:, :, : self.seen] = self.keys[:, :, : self.seen]
        values[:, :, : self.seen] = self.values[:, :, : self.seen]
        self.keys, self.values = keys, values

    def rewind(self, tokens: int) -> None:
        """Forget everything after the first `tokens` entries (a question and its answer)."""
        self.seen = tokens

    # carried state --------------------------------------------------------------------
    def _recent(self, start: int, end: int | None = None):
        """Keys for recency policies (and answering): views of the detailed cache, up to `end`
        (default: everything seen)."""
        end = self.seen if end is None else end
        first = None if self.answering else self.policy.first_visible(start)
        lo = self.pinned if first is None else min(start, max(self.pinned, first))
        if not self.answering:
            self.max_carried = max(self.max_carried, start - lo + self.pinned)
        if lo == self.pinned:  # the pinned prefix runs on into the recent part: one view
            return self.keys[:, :, :end], self.values[:, :, :end]
        if self.pinned == 0:  # nothing pinned: the recent part alone, a view
            return self.keys[:, :, lo:end], self.values[:, :, lo:end]
        pinned = slice(0, self.pinned)
        recent = slice(lo, end)
        return (torch.cat([self.keys[:, :, pinned], self.keys[:, :, recent]], dim=2),
                torch.cat([self.values[:, :, pinned], self.values[:, :, recent]], dim=2))

    def _candidates(self, key_states, value_states, start: int):
        """Keys for StateKV: [pinned ; carried ; chunk]; selection waits for the mass.

        They live in a fixed buffer laid out exactly so: the chunk is written after the carried
        entries, and the returned keys/values are views of it (nothing is concatenated).
        """
        tokens = key_states.shape[-2]
        visible = self.pinned + self.carried_count  # entries before the chunk
        front = self._buffers.front(visible + tokens, self.pinned + self.policy.capacity + tokens)
        kv, positions = front
        kv[0, :, visible:visible + tokens] = key_states[0]
        kv[1, :, visible:visible + tokens] = value_states[0]
        torch.arange(start, start + tokens, out=positions[0, visible:visible + tokens])
        positions[1:, visible:visible + tokens] = positions[0, visible:visible + tokens]
        end = visible + tokens
        self.max_carried = max(self.max_carried, visible)
        self._pending = (kv[0:1, :, self.pinned:end], kv[1:2, :, self.pinned:end],
                         positions[:, self.pinned:end])  # (1, kv_heads, candidates, head_dim) x2
        self.wants_mass = end - self.pinned > self.policy.capacity
        if not self.wants_mass:
            self._keep(*self._pending)  # everything fits: carried grows in place, no mass pass
        return kv[0:1, :, :end], kv[1:2, :, :end]

    def commit(self, mass: torch.Tensor) -> None:
        """Receive the attention mass (kv_heads, keys) and keep the top entries."""
        _, _, positions = self._pending
        mass = mass[:, self.pinned:]  # pinned entries are outside the budget
        decay = self.policy.score_decay
        if decay and self.carried_scores is not None:  # running score: carried entries first
            mass = mass.clone()
            mass[:, :self.carried_scores.shape[-1]].add_(self.carried_scores, alpha=decay)
        kept = self.policy.select(mass, positions)  # (kv_heads, budget), ascending
        kv, kept_positions = self._buffers.select(kept, self.pinned)
        self._keep(kv[0:1], kv[1:2], kept_positions)
        if decay:
            self.carried_scores = mass.gather(1, kept)
        self.wants_mass = False

    def _keep(self, keys, values, positions) -> None:
        self.carried_keys, self.carried_values, self.carried_positions = keys, values, positions
        self.carried_scores = None  # commit() sets it again for a running score
        self._pending = None
        if self.observer is not None:
            self.observer(self.index, self._chunk_end, positions)

    @property
    def carried_count(self) -> int:
        return 0 if self.carried_positions is None else self.carried_positions.shape[-1]

    def pin(self, tokens: int) -> None:
        """Keep the first `tokens` entries visible to every chunk, outside the budget."""
        self.pinned = tokens
        self.prefixing = False
        self.carried_keys = self.carried_values = self.carried_positions = None
        self.carried_scores = None
        if self.is_initialized and not self.policy.recency:
            self._buffers.pin(self.keys[0, :, :tokens], self.values[0, :, :tokens])

    def finish_prefill(self) -> None:
        """Drop the carried state (only the detailed cache is used for answers)."""
        self.carried_keys = self.carried_values = self.carried_positions = None
        self.carried_scores = None
        self._pending = None
        self._buffers = _CarriedBuffers()
        self.answering = True


class _CarriedBuffers:
    """Two fixed buffers for [pinned ; carried ; chunk], used in turn: a selection gathers the
    kept entries of one into the other, so no buffer is reallocated or concatenated per chunk.

    Each is (kv: (2, kv_heads, capacity, head_dim) keys and values, positions: (kv_heads,
    capacity) token indices). Grown (rarely) only if a chunk is larger than planned.
    """

    def __init__(self) -> None:
        self.slots: list[tuple[torch.Tensor, torch.Tensor] | None] = [None, None]
        self.like: torch.Tensor | None = None  # a chunk's keys: dtype, device, head sizes
        self.current = 0

    def init(self, keys: torch.Tensor) -> None:
        self.like = keys

    def _alloc(self, capacity: int, old=None) -> tuple[torch.Tensor, torch.Tensor]:
        """A buffer of `capacity` entries, starting with a copy of `old`'s entries."""
        _, kv_heads, _, head_dim = self.like.shape
        kv = self.like.new_empty((2, kv_heads, capacity, head_dim))
        positions = torch.empty((kv_heads, capacity), dtype=torch.long, device=self.like.device)
        if old is not None:
            keep = min(capacity, old[0].shape[2])
            kv[:, :, :keep] = old[0][:, :, :keep]
            positions[:, :keep] = old[1][:, :keep]
        return kv, positions

    def front(self, needed: int, planned: int):
        """The buffer holding the carried state, with room for `needed` entries."""
        slot = self.slots[self.current]
        if slot is None or slot[0].shape[2] < needed:
            slot = self.slots[self.current] = self._alloc(max(needed, planned), slot)
        return slot

    def select(self, kept: torch.Tensor, pinned: int):
        """Gather the kept candidates (indices after the pinned entries) into the other buffer;
        return its (keys+values (2, kv_heads, kept, head_dim), positions (kv_heads, kept)) views."""
        src_kv, src_positions = self.slots[self.current]
        other = 1 - self.current
        dst = self.slots[other]
        if dst is None or dst[0].shape[2] < src_kv.shape[2]:
            dst = self.slots[other] = self._alloc(src_kv.shape[2], (src_kv, src_positions))
        dst_kv, dst_positions = dst
        kv_heads, count = kept.shape
        end = pinned + count
        # One index_select per (keys|values, head) straight into the other buffer: each moves
        # whole head_dim rows in one pass (a `gather` with an expanded index is ~5x slower).
        for head in range(kv_heads):
            rows = kept[head] + pinned if pinned else kept[head]
            for plane in (0, 1):
                torch.index_select(src_kv[plane, head], 0, rows, out=dst_kv[plane, head, pinned:end])
        torch.gather(src_positions[:, pinned:], 1, kept, out=dst_positions[:, pinned:end])
        self.current = other
        return dst_kv[:, :, pinned:end], dst_positions[:, pinned:end]

    def pin(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Put the pinned prefix (kv_heads, tokens, head_dim) at the front of both buffers."""
        tokens = keys.shape[1]
        for index in (0, 1):
            slot = self.slots[index]
            if slot is None or slot[0].shape[2] < tokens:
                slot = self.slots[index] = self._alloc(tokens, slot)
            slot[0][0, :, :tokens] = keys
            slot[0][1, :, :tokens] = values
            slot[1][:, :tokens] = torch.arange(tokens, device=keys.device)


class StateCache(Cache):
    """Carried state + detailed cache for every decoder layer of the language model."""

    def __init__(self, policy: Policy, num_layers: int, reserve_tokens: int,
                 attention: str = "sdpa") -> None:
        super().__init__(layers=[StateLayer(policy, reserve_tokens) for _ in range(num_layers)])
        for index, layer in enumerate(self.layers):
            layer.index = index
        self.policy = policy
        self.attention = attention
        self.video_tokens = 0
        # the prefill's statekv.threads.SerialSmallOps while it runs (None otherwise): large
        # attention calls of small chunks get every thread back (its `attention` context)
        self.serial = None

    def observe(self, observer: Callable[[int, int, torch.Tensor], None] | None) -> None:
        """Call `observer(layer, tokens_seen, kept_positions)` whenever a layer keeps its
        carried state (selecting policies only; recency policies keep a contiguous tail)."""
        for layer in self.layers:
            layer.observer = observer

    def observe_mass(self, observer: Callable[[int, int, torch.Tensor], None] | None) -> None:
        """Call `observer(layer, chunk_start, mass)` after each prefill chunk's attention with
        the per-key mass (kv_heads, keys) over the keys that chunk attended to, in cache order
        ([pinned ; carried ; chunk]; for `full` without pinning, key j is position j)."""
        for layer in self.layers:
            layer.mass_observer = observer

    def begin_group(self, token_counts: list[int]) -> None:
        """The next forward holds several chunks of these token counts, in order: each layer
        attends them one at a time against its own state (see `StateLayer.group`)."""
        for layer in self.layers:
            layer.group = list(token_counts)

    def end_group(self) -> None:
        for layer in self.layers:
            layer.group = None

    def begin_prefix(self) -> None:
        """The next chunk is the text prefix, to be pinned after it: attend, do not select."""
        for layer in self.layers:
            layer.prefixing = True

    def pin(self, tokens: int) -> None:
        for layer in self.layers:
            layer.pin(tokens)

    def finish_prefill(self) -> None:
        """Switch to answering: mark the end of the video so questions can be rewound."""
        self.video_tokens = self.layers[0].seen
        for layer in self.layers:
            layer.finish_prefill()

    def rewind(self) -> None:
        """Forget the last question and answer; the video stays."""
        for layer in self.layers:
            layer.rewind(self.video_tokens)

    @property
    def detailed_tokens(self) -> int:
        return self.layers[0].seen

    @property
    def carried_tokens(self) -> int:
        """Largest carried state any layer and KV head held (pinned prefix included)."""
        return max(layer.max_carried for layer in self.layers)

    def detailed_bytes(self) -> int:
        """Exact bytes of the keys and values stored in the detailed cache."""
        return sum(_bytes_per_token(layer) * layer.seen for layer in self.layers)

    def carried_bytes_per_token(self) -> int:
        return _bytes_per_token(self.layers[0]) * len(self.layers)


def _bytes_per_token(layer: StateLayer) -> int:
    if layer.keys is None:
        return 0
    _, kv_heads, _, head_dim = layer.keys.shape
    return 2 * kv_heads * head_dim * layer.keys.element_size()
