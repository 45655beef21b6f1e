"""FLOP counts and memory readings: every number users see is computed here.

Conventions (docs/measurement.md): FLOPs = multiply-adds x 2. Linear layers cost 2 x in x out per
token. Attention for a chunk of T queries over C carried keys costs, per layer,
4 x heads x head_dim x (T x C + T(T+1)/2): QK^T and PV over exactly the keys each query may
see (carried keys all, the chunk's own keys causally). StateKV's mass pass is one more
QK^T-sized pass, half of that.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # predictions need no torch: `info` and the preflight stay fast
    import torch
    from torch import nn


@dataclass(frozen=True)
class LMShape:
    """The numbers of a language model that its prefill FLOPs depend on."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    linear_params: int  # sum of in x out over the decoder layers' linear maps (all layers)

    @classmethod
    def from_model(cls, language_model: nn.Module, text_config: Any) -> "LMShape":
        from torch import nn

        layers = getattr(language_model, "layers", None)
        modules = layers.modules() if layers is not None else language_model.modules()
        linear = sum(m.in_features * m.out_features for m in modules if isinstance(m, nn.Linear))
        return cls._with(text_config, linear)

    @classmethod
    def from_config(cls, text_config: Any) -> "LMShape":
        """Estimate from a config alone (no weights): attention + gated MLP projections."""
        hidden = text_config.hidden_size
        shape = cls._with(text_config, 0)
        attention = hidden * shape.head_dim * (2 * shape.heads + 2 * shape.kv_heads)
        mlp = 3 * hidden * text_config.intermediate_size
        return cls._with(text_config, shape.layers * (attention + mlp))

    @classmethod
    def _with(cls, cfg: Any, linear_params: int) -> "LMShape":
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        return cls(cfg.num_hidden_layers, heads, kv_heads, head_dim, int(linear_params))

    def kv_bytes_per_token(self, element_size: int) -> int:
        """Detailed-cache bytes per token over all layers (keys and values)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * element_size


def linear_flops(shape: LMShape, tokens: int) -> int:
    """Linear-layer FLOPs of `tokens` tokens through every decoder layer."""
    return 2 * shape.linear_params * tokens


def attention_flops(shape: LMShape, queries: int, carried: int, causal: bool = True) -> int:
    """QK^T + PV FLOPs of a chunk of `queries` tokens over `carried` earlier keys, all layers.

    `causal` (the convention) counts only the (query, key) pairs a query may see; False counts
    the whole rectangle, which is what dense matmuls (the eager path) actually multiply.
    """
    own = queries * (queries + 1) // 2 if causal else queries * queries
    return 4 * shape.heads * shape.head_dim * (queries * carried + own) * shape.layers


def mass_flops(shape: LMShape, queries: int, carried: int, causal: bool = True) -> int:
    """The extra QK^T pass StateKV runs to measure each key's attention mass."""
    return attention_flops(shape, queries, carried, causal) // 2


def chunk_flops(shape: LMShape, queries: int, carried: int, mass: bool,
                bidirectional: bool = False) -> int:
    """LM prefill FLOPs of one chunk as it actually ran. A bidirectional mass (a scoring
    variant) costs two QK^T passes over the whole rectangle (log-sum-exp, then masses)."""
    flops = linear_flops(shape, queries) + attention_flops(shape, queries, carried)
    if mass and bidirectional:
        return flops + attention_flops(shape, queries, carried, causal=False)
    return flops + (mass_flops(shape, queries, carried) if mass else 0)


def policy_chunk_flops(shape: LMShape, chunk_tokens: list[int], policy: Any,
                       pin_prefix: bool = False) -> list[int]:
    """LM FLOPs of each chunk (text prefix first) under a policy, as the prefill loop counts them.

    The carried state a chunk sees is the pinned prefix plus min(capacity, history); the mass
    pass runs when [carried ; chunk] exceeds the capacity (a selection is needed).
    """
    pinning = pin_prefix or policy.pins_prefix
    flops, seen, pinned = [], 0, 0
    for index, tokens in enumerate(chunk_tokens):
        carried = carried_before(policy, seen, pinned)
        # A prefix about to be pinned runs as plain causal attention: nothing is selected.
        mass = not (pinning and index == 0) and mass_pass(policy, carried, pinned, tokens)
        flops.append(chunk_flops(shape, tokens, carried, mass, policy.bidirectional_scores))
        seen += tokens
        if pinned == 0 and pinning:
            pinned = seen
    return flops


def carried_before(policy: Any, seen: int, pinned: int) -> int:
    """Keys a chunk sees besides its own (pinned prefix + carried state) after `seen` tokens."""
    first = policy.first_visible(seen)
    return seen if first is None else pinned + seen - min(seen, max(pinned, first))


def mass_pass(policy: Any, carried: int, pinned: int, tokens: int) -> bool:
    """Whether the chunk measures masses: StateKV, when [carried ; chunk] exceeds the budget."""
    return policy.needs_mass and carried - pinned + tokens > (policy.capacity or 0)


# Score entries per block of the two-pass mass pass (4M float32 = 16 MB): bounds its memory.
# Defined here, torch-free, because the memory estimate needs it before any model loads.
MASS_BLOCK_ENTRIES = 1 << 22
RUNTIME_BYTES = 64 * 2**20  # processor, tokenizer, kernels' workspaces, decoder: measured ~60-70 MB
ANSWER_ROOM = 512  # tokens the detailed cache reserves after the video for a question


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


def activation_bytes_per_token(hidden: int, intermediate: int, element_size: int) -> int:
    """Bytes one token's activations take inside a decoder layer (hidden states, MLP)."""
    return element_size * (4 * hidden + 2 * intermediate)


def estimate_memory(shape: LMShape, parameters: int, element_size: int, total_tokens: int,
                    chunk_tokens: int, carried_tokens: int, hidden: int, intermediate: int,
                    mass: bool) -> MemoryEstimate:
    """Peak bytes of a prefill and its answers, before any weights load.

    Weights + the detailed cache + (StateKV, `mass`) its two fixed carried-state buffers of
    [carried ; chunk] + the largest chunk's activations, the mass pass's float32 scores (one
    block at most) and the detailed cache's room for a question + a fixed runtime allowance.
    Recency policies serve their carried state as views of the detailed cache: no extra bytes.
    """
    per_token = shape.kv_bytes_per_token(element_size)
    carried = 2 * (carried_tokens + chunk_tokens) * per_token if mass else 0
    activations = chunk_tokens * activation_bytes_per_token(hidden, intermediate, element_size)
    activations += ANSWER_ROOM * per_token
    if mass:
        rows = shape.heads * chunk_tokens
        activations += 4 * min(rows * (carried_tokens + chunk_tokens),
                               max(MASS_BLOCK_ENTRIES, rows * chunk_tokens))
    return MemoryEstimate(parameters * element_size, total_tokens * per_token, carried, activations)


def full_prefill_flops(shape: LMShape, chunk_tokens: list[int]) -> int:
    """What ordinary causal attention would cost over the same chunks."""
    total, seen = 0, 0
    for tokens in chunk_tokens:
        total += chunk_flops(shape, tokens, seen, mass=False)
        seen += tokens
    return total


# vision ----------------------------------------------------------------------------------
def _register_cpu_sdpa_formula() -> None:
    # torch has no FLOP formula for the CPU flash kernel, so the counter would see 0 for
    # vision attention on the CPU; give it the same formula as the CUDA kernels.
    import torch
    from torch.utils import flop_counter

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if op in flop_counter.flop_registry or op.default in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(fn, *args, **kwargs) -> tuple[Any, int]:
    """Run `fn` under torch's FLOP counter; return (result, FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    _register_cpu_sdpa_formula()
    with FlopCounterMode(display=False) as counter:
        result = fn(*args, **kwargs)
    return result, int(counter.get_total_flops())


# memory ----------------------------------------------------------------------------------
_process: Any = None


def rss_bytes() -> int:
    """Current resident set size of this process."""
    global _process
    try:
        import psutil

        if _process is None or _process.pid != os.getpid():  # one handle per process (fork-safe)
            _process = psutil.Process(os.getpid())
        return int(_process.memory_info().rss)
    except ImportError:  # pragma: no cover - psutil is a dependency
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory during a block, above the level just before it began.

    On CUDA: max allocated bytes. On the CPU: process RSS sampled by a thread every ~10 ms.
    `peak_above(level)` reads the same peak against another baseline, e.g. one taken once
    before several methods run one after another (`compare`), so no method's figure depends
    on what ran before it.
    """

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.01) -> None:
        self.cuda = getattr(device, "type", str(device).split(":")[0]) == "cuda"
        self.interval = interval
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = False

    def __enter__(self) -> "PeakMemory":
        """Start (or resume) sampling; the baseline is the level at the first start."""
        first = not self._started
        self._started = True
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            if first:
                torch.cuda.reset_peak_memory_stats()
                self.baseline = torch.cuda.memory_allocated()
            return self
        if first:
            self.baseline = self.peak = rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def current(self) -> int:
        """Bytes in use now (RSS, or CUDA allocated)."""
        return memory_in_use("cuda" if self.cuda else "cpu")

    def peak_level(self) -> int:
        """The highest level seen so far (absolute bytes, not above the baseline)."""
        if self.cuda:
            import torch

            return int(torch.cuda.max_memory_allocated())
        self.peak = max(self.peak, rss_bytes())
        return self.peak

    def peak_bytes(self) -> int:
        """Peak so far above the baseline."""
        return self.peak_above(self.baseline)

    def peak_above(self, level: int) -> int:
        """Peak so far above `level` (a baseline taken elsewhere, e.g. before several runs)."""
        return max(0, self.peak_level() - level)

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self.peak_bytes()


def memory_in_use(device: Any = "cpu") -> int:
    """Bytes in use now: process RSS, or CUDA allocated bytes."""
    if getattr(device, "type", str(device).split(":")[0]) == "cuda":
        import torch

        return int(torch.cuda.memory_allocated())
    return rss_bytes()


def release_memory(device: Any = "cpu") -> int:
    """Free what is no longer referenced and hand it back to the system; the level after.

    Python's garbage, torch's CUDA cache, and (glibc) the heap pages malloc keeps after
    frees, so a following measurement starts from the same level whatever ran before.
    """
    import gc

    gc.collect()
    if getattr(device, "type", str(device).split(":")[0]) == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    else:
        _malloc_trim()
    return memory_in_use(device)


def _malloc_trim() -> None:
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl): nothing to trim with
        pass


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock readings mean what they say."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


class Stopwatch:
    """Accumulates wall-clock seconds (after CUDA synchronisation) under named keys."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    def add(self, key: str, started: float) -> None:
        synchronize(self.device)
        self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - started


def chunk_sizes(layout: list[int], chunk_frames: int) -> list[int]:
    """Prefix, then the tokens of each chunk of `chunk_frames` frames (from a per-frame layout)."""
    prefix, frames = layout[0], layout[1:]
    return [prefix] + [sum(frames[i:i + chunk_frames]) for i in range(0, len(frames), chunk_frames)]


def predict_lm_flops(shape: LMShape, chunks: list[int], policy: Any,
                     pin_prefix: bool = False) -> int:
    """LM prefill FLOPs of `chunks` (prefix first) under `policy`, as the loop counts them.

    The prediction walks the same chunks with the same carried-state sizes and per-chunk
    formula as the prefill loop, so with the checkpoint's processor at hand it equals what
    the run then reports.
    """
    return sum(policy_chunk_flops(shape, chunks, policy, pin_prefix))


def available_memory(device: Any) -> int:
    """Bytes free for a run: available RAM, or free memory on the CUDA device."""
    if getattr(device, "type", str(device).split(":")[0]) == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def prefill_file_header_bytes(layers: int, frames: int) -> int:
    """A generous estimate of a prefill file's header (8-byte length + JSON) for `layers`
    decoder layers and `frames` frames; `statekv info` adds it to the detailed cache's bytes
    (statekv/saved.py writes the file)."""
    return 8 + 4096 + 400 * layers + 48 * frames

