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
        self.wants_mass = False
        self.carried_keys: torch.Tensor | None = None  # (1, kv_heads, carried, head_dim)
        self.carried_values: torch.Tensor | None = None
        self.carried_positions: torch.Tensor | None = None  # (kv_heads, carried) token indices
        self.max_carried = 0
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # transformers' layer contract -------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        _, kv_heads, tokens, head_dim = key_states.shape
        shape = (1, kv_heads, max(self.reserve_tokens, tokens), head_dim)
        self.keys = torch.empty(shape, dtype=key_states.dtype, device=key_states.device)
        self.values = torch.empty(shape, dtype=value_states.dtype, device=value_states.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """Append the chunk to the detailed cache; return the keys/values it attends to."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.seen
        self._append(key_states, value_states)
        if self.answering or self.policy.recency:
            return self._recent(start)
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
    def _recent(self, start: int):
        """Keys for recency policies (and answering): views of the detailed cache."""
        capacity = None if self.answering else self.policy.capacity
        lo = self.pinned if capacity is None else max(self.pinned, start - capacity)
        if not self.answering:
            self.max_carried = max(self.max_carried, start - lo + self.pinned)
        if lo == self.pinned:
            return self.keys[:, :, : self.seen], self.values[:, :, : self.seen]
        pinned = slice(0, self.pinned)
        recent = slice(lo, self.seen)
        return (torch.cat([self.keys[:, :, pinned], self.keys[:, :, recent]], dim=2),
                torch.cat([self.values[:, :, pinned], self.values[:, :, recent]], dim=2))

    def _candidates(self, key_states, value_states, start: int):
        """Keys for StateKV: [pinned ; carried ; chunk]; selection waits for the mass."""
        tokens = key_states.shape[-2]
        kv_heads = key_states.shape[1]
        chunk_positions = torch.arange(start, start + tokens, device=key_states.device)
        chunk_positions = chunk_positions.expand(kv_heads, -1)
        keys, values, positions = [key_states], [value_states], [chunk_positions]
        if self.carried_keys is not None:
            keys.insert(0, self.carried_keys)
            values.insert(0, self.carried_values)
            positions.insert(0, self.carried_positions)
        self.max_carried = max(self.max_carried, self.carried_count + self.pinned)
        candidates = (torch.cat(keys, dim=2), torch.cat(values, dim=2), torch.cat(positions, dim=1))
        self._pending = candidates
        self.wants_mass = candidates[2].shape[-1] > self.policy.capacity
        if not self.wants_mass:
            self._keep(*candidates)  # everything fits: no mass pass needed
        if self.pinned:
            return (torch.cat([self.keys[:, :, : self.pinned], candidates[0]], dim=2),
                    torch.cat([self.values[:, :, : self.pinned], candidates[1]], dim=2))
        return candidates[0], candidates[1]

    def commit(self, mass: torch.Tensor) -> None:
        """Receive the attention mass (kv_heads, keys) and keep the top entries."""
        keys, values, positions = self._pending
        mass = mass[:, self.pinned:]  # pinned entries are outside the budget
        kept = self.policy.select(mass, positions)  # (kv_heads, budget)
        gather = kept[None, :, :, None].expand(1, -1, -1, keys.shape[-1])
        self._keep(keys.gather(2, gather), values.gather(2, gather), positions.gather(1, kept))
        self.wants_mass = False

    def _keep(self, keys, values, positions) -> None:
        self.carried_keys, self.carried_values, self.carried_positions = keys, values, positions
        self._pending = None

    @property
    def carried_count(self) -> int:
        return 0 if self.carried_positions is None else self.carried_positions.shape[-1]

    def pin(self, tokens: int) -> None:
        """Keep the first `tokens` entries visible to every chunk, outside the budget."""
        self.pinned = tokens
        self.carried_keys = self.carried_values = self.carried_positions = None

    def finish_prefill(self) -> None:
        """Drop the carried state (only the detailed cache is used for answers)."""
        self.carried_keys = self.carried_values = self.carried_positions = None
        self._pending = None
        self.answering = True


class StateCache(Cache):
    """Carried state + detailed cache for every decoder layer of the language model."""

    def __init__(self, policy: Policy, num_layers: int, reserve_tokens: int,
                 attention: str = "sdpa") -> None:
        super().__init__(layers=[StateLayer(policy, reserve_tokens) for _ in range(num_layers)])
        self.policy = policy
        self.attention = attention
        self.video_tokens = 0

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
