"""The contracts of docs/method.md, proven for every model family against the unmodified model.

One test body per contract, parametrised over `FAMILIES` in conftest.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import statekv.answer
import statekv.prefill
from statekv.cache import StateLayer

QUESTION = "what happens in the video?"


def until_eos(tokens, eos):
    out = []
    for token in tokens:
        if token in eos:
            break
        out.append(token)
    return out


@pytest.fixture(scope="session")
def reference_run(family):
    """The unmodified model on the whole sequence: ids, logits, greedy answer, layer-0 keys."""
    inputs = family.reference_inputs(QUESTION)
    with torch.inference_mode():
        out = family.reference(**inputs, use_cache=True)
        generated = family.reference.generate(**inputs, max_new_tokens=6, do_sample=False)
    answer = generated[0, inputs["input_ids"].shape[1]:].tolist()
    keys0 = out.past_key_values.layers[0].keys[0]
    return inputs["input_ids"][0].tolist(), out.logits[0].float(), answer, keys0


@pytest.fixture
def fed_ids(monkeypatch):
    """Every token id the engine feeds the language model, in order."""
    ids: list[int] = []
    original = statekv.prefill.forward_chunk

    def spy(adapter, cache, chunk):
        ids.extend(chunk.token_ids)
        return original(adapter, cache, chunk)

    monkeypatch.setattr(statekv.prefill, "forward_chunk", spy)
    monkeypatch.setattr(statekv.answer, "forward_chunk", spy)
    return ids


def test_layout_matches_the_family_processor(family, reference_run, fed_ids):
    ref_ids = reference_run[0]
    session = family.model.prefill_frames(family.frames, method="full")
    session.question_logits(QUESTION)
    assert fed_ids == ref_ids
    assert session.stats.frames == len(family.frames)


@pytest.mark.parametrize("method,options", [
    ("full", {}),
    ("statekv", {"budget": 100_000}),
    ("window", {"window_frames": 10_000}),
    ("statekv", {"budget": 100_000, "chunk_frames": 4}),
])
def test_equals_full_attention_when_nothing_is_dropped(family, reference_run, method, options):
    _, ref_logits, ref_answer, _ = reference_run
    session = family.model.prefill_frames(family.frames, method=method, **options)
    logits = session.question_logits(QUESTION)
    assert (logits - ref_logits[-logits.shape[0]:]).abs().max().item() < 1e-4
    answer = session.ask([QUESTION], max_new_tokens=6)[0]
    assert answer.token_ids == until_eos(ref_answer, family.model.adapter.eos_token_ids())


def test_eager_reference_attention_equals_full_too(family, reference_run):
    ref_logits = reference_run[1]
    session = family.model.prefill_frames(family.frames, method="statekv", budget=100_000,
                                          attention="eager")
    logits = session.question_logits(QUESTION)
    assert (logits - ref_logits[-logits.shape[0]:]).abs().max().item() < 1e-4


@pytest.mark.parametrize("method", ["statekv", "window", "isolated"])
def test_dropping_history_changes_the_logits(family, reference_run, method):
    # The control for the equality tests: they can fail, since a small carried state changes things.
    ref_logits = reference_run[1]
    session = family.model.prefill_frames(family.frames, method=method, budget=20, window_frames=1)
    logits = session.question_logits(QUESTION)
    assert (logits - ref_logits[-logits.shape[0]:]).abs().max().item() > 1e-3


@pytest.fixture
def commits(monkeypatch):
    """Record every carried-state selection of every layer."""
    records = []
    original = StateLayer.commit

    def spy(self, mass):
        _, _, positions = self._pending
        original(self, mass)
        records.append({"layer": self, "pinned": self.pinned, "positions": positions.clone(),
                        "mass": mass[:, self.pinned:].clone(), "kept": self.carried_positions.clone(),
                        "keys": self.carried_keys.clone(), "values": self.carried_values.clone()})

    monkeypatch.setattr(StateLayer, "commit", spy)
    return records


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("pin_prefix", [False, True])
def test_small_budget_keeps_exactly_the_top_masses(family, commits, attention, pin_prefix):
    budget = 37
    session = family.model.prefill_frames(family.frames, method="statekv", budget=budget,
                                          attention=attention, pin_prefix=pin_prefix)
    assert commits, "a budget below the history must trigger selections"
    pinned = commits[0]["layer"].pinned
    assert (pinned > 0) == pin_prefix
    for record in commits:
        kept, mass, positions = record["kept"], record["mass"], record["positions"]
        assert kept.shape[-1] == budget
        assert bool((positions >= pinned).all())  # pinned entries are outside the budget
        for head in range(kept.shape[0]):
            top = positions[head, mass[head].topk(budget).indices]
            assert sorted(kept[head].tolist()) == sorted(top.tolist()) == kept[head].tolist()
    assert session.stats.carried_tokens == budget + pinned


def test_fast_and_eager_masses_agree(family, commits):
    family.model.prefill_frames(family.frames, method="statekv", budget=37, attention="sdpa")
    fast = [(r["mass"], r["kept"]) for r in commits]
    commits.clear()
    family.model.prefill_frames(family.frames, method="statekv", budget=37, attention="eager")
    eager = [(r["mass"], r["kept"]) for r in commits]
    assert len(fast) == len(eager) > 0
    for (m1, k1), (m2, k2) in zip(fast, eager):
        torch.testing.assert_close(m1, m2, rtol=1e-5, atol=1e-6)
        assert torch.equal(k1, k2)


def test_carried_keys_keep_their_original_rotation(family, reference_run, commits):
    session = family.model.prefill_frames(family.frames, method="statekv", budget=29)
    for record in commits:
        layer, kept = record["layer"], record["kept"]
        for head in range(kept.shape[0]):
            assert torch.equal(record["keys"][0, head], layer.keys[0, head, kept[head]])
            assert torch.equal(record["values"][0, head], layer.values[0, head, kept[head]])
    # Layer 0's keys depend only on the tokens and their positions: they equal the unmodified
    # model's keys at the same absolute positions, whatever was evicted (no renumbering).
    ref_keys = reference_run[3]
    ours = session.state.cache.layers[0].keys[0, :, : session.stats.detailed_tokens]
    torch.testing.assert_close(ours, ref_keys[:, : ours.shape[1]], rtol=1e-5, atol=1e-5)


def test_window_carries_exactly_the_last_whole_frames(family, monkeypatch):
    # --window-frames N: before each chunk, the last N whole frames with their labels and
    # delimiters, from the tokens the chunks really held; FLOPs are counted for that window.
    from statekv import accounting

    visible = []
    original = StateLayer._recent

    def spy(self, start, end=None):
        keys, values = original(self, start, end)
        if self.index == 0 and not self.answering:  # keys before the chunk (of a grouped forward)
            visible.append(keys.shape[2] - ((self.seen if end is None else end) - start))
        return keys, values

    monkeypatch.setattr(StateLayer, "_recent", spy)
    session = family.model.prefill_frames(family.frames, method="window", window_frames=2)
    chunks = session.state.chunk_tokens  # prefix, then one chunk per unit of frames
    per_window = 2 // family.model.adapter.frames_per_unit  # chunks the 2 frames fill
    for index, seen in enumerate(visible[1:], start=1):
        done = chunks[1:index]
        assert seen == (sum(chunks[:index]) if len(done) < per_window else sum(done[-per_window:]))
    assert session.stats.carried_tokens == max(visible)
    shape = accounting.LMShape.from_model(family.model.adapter.language_model,
                                          family.model.adapter.text_config)
    predicted = accounting.policy_chunk_flops(shape, chunks, session.state.cache.policy)
    assert session.stats.lm_prefill_flops == sum(predicted)


def test_isolated_sees_only_the_prefix(family, fed_ids):
    session = family.model.prefill_frames(family.frames, method="isolated")
    assert session.stats.carried_tokens == session.state.chunk_tokens[0]


def test_two_questions_cost_one_prefill(family, monkeypatch):
    adapter = family.model.adapter
    calls = {"chunks": 0}
    original = adapter.video_chunk

    def counting(*args, **kwargs):
        calls["chunks"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(adapter, "video_chunk", counting)
    questions = ["what happens?", "what color is the room?"]
    session = family.model.prefill_frames(family.frames, method="statekv", budget=40)
    together = session.ask(questions, 5)
    assert calls["chunks"] == len(session.state.chunk_tokens) - 1  # one pass over the video
    apart = [family.model.prefill_frames(family.frames, method="statekv", budget=40).ask([q], 5)[0]
             for q in questions]
    assert [a.token_ids for a in together] == [a.token_ids for a in apart]
    for a, b in zip(together, apart):
        torch.testing.assert_close(a.first_token_logprobs, b.first_token_logprobs)


def test_cost_per_chunk_flattens_only_for_bounded_methods(family):
    frames = np.concatenate([family.frames] * 3)
    per_chunk = {}
    for method in ("full", "statekv", "window"):
        events = []
        family.model.prefill_frames(frames, method=method, budget=64, window_frames=2,
                                    on_event=events.append)
        per_chunk[method] = np.diff([e.lm_prefill_flops for e in events])
    full, statekv, window = per_chunk["full"], per_chunk["statekv"], per_chunk["window"]
    assert all(b > a for a, b in zip(full[1:], full[2:]))  # full grows every chunk
    # flat once the state is full (the last chunk may close the video, e.g. LLaVA-OV's newline)
    assert len(set(statekv[-6:-1].tolist())) == 1
    assert len(set(window[-6:-1].tolist())) == 1
    assert statekv[-1] < full[-1]


def test_stats_are_consistent(family):
    frames = family.frames
    session = family.model.prefill_frames(frames, method="statekv", budget=40)
    stats = session.stats
    assert stats.frames == len(frames)
    assert stats.frame_timestamps == [float(i) for i in range(len(frames))]
    assert stats.carried_tokens == 40
    assert stats.lm_prefill_flops < stats.full_lm_prefill_flops
    assert stats.vision_flops > 0
    assert 0 < stats.carried_cache_bytes < stats.detailed_cache_bytes
    full = family.model.prefill_frames(frames, method="full").stats
    assert full.lm_prefill_flops == full.full_lm_prefill_flops == stats.full_lm_prefill_flops
    assert full.vision_flops == stats.vision_flops


def test_budget_below_a_chunk_warns(family):
    session = family.model.prefill_frames(family.frames, method="statekv", budget=4)
    assert any("below one chunk" in w for w in session.warnings)
    assert session.stats.carried_tokens == 4


def test_a_pinned_prefix_longer_than_the_budget_is_never_selected(family, commits):
    from statekv import accounting

    prompt = " ".join(["describe every frame of the video in detail"] * 6)
    session = family.model.prefill_frames(family.frames, method="statekv", budget=12,
                                          pin_prefix=True, system_prompt=prompt)
    prefix = session.state.chunk_tokens[0]
    assert prefix > 12
    assert commits and all(record["pinned"] == prefix for record in commits)
    assert session.stats.carried_tokens == prefix + 12
    shape = accounting.LMShape.from_model(family.model.adapter.language_model,
                                          family.model.adapter.text_config)
    predicted = accounting.policy_chunk_flops(shape, session.state.chunk_tokens,
                                              session.state.cache.policy, pin_prefix=True)
    assert session.stats.lm_prefill_flops == sum(predicted)


def test_bfloat16_stays_close_to_full_attention(tiny_internvl_dir, frames):
    # docs/method.md: bf16 correctness is checked on the CPU with a looser tolerance (1e-2).
    import statekv
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from conftest import chat_video_inputs

    model = statekv.load(str(tiny_internvl_dir), device="cpu", dtype="bfloat16")
    reference = AutoModelForImageTextToText.from_pretrained(
        tiny_internvl_dir, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    inputs = chat_video_inputs(AutoProcessor.from_pretrained(tiny_internvl_dir), frames, QUESTION)
    with torch.inference_mode():
        expected = reference(**inputs).logits[0].float()
    for method, options in (("full", {}), ("statekv", {"budget": 100_000})):
        logits = model.prefill_frames(frames, method=method, **options).question_logits(QUESTION)
        expected_tail = expected[-logits.shape[0]:]
        relative = (logits - expected_tail).norm() / expected_tail.norm()
        assert relative.item() < 1e-2, (method, relative.item())


@pytest.mark.parametrize("method", ["full", "window"])
def test_a_pinned_prefix_stays_visible_to_chunks_and_answers(tiny_model, frames, method):
    """Pinning changes nothing when the method keeps everything anyway: the prefix must be
    seen by the first chunk after it and by every question (it once was dropped there)."""
    reference = tiny_model.prefill_frames(frames, method="full").question_logits("what?")
    pinned = tiny_model.prefill_frames(frames, method=method, window_frames=len(frames) + 1,
                                       pin_prefix=True).question_logits("what?")
    assert (pinned - reference).abs().max().item() < 1e-4


def test_isolated_chunks_and_answers_see_the_prefix(tiny_model, frames):
    """isolated keeps only the text prefix: its answer still attends to the prefix, so its
    logits differ from a run whose answer could not see it, and one frame is exactly full."""
    one = frames[:1]
    isolated = tiny_model.prefill_frames(one, method="isolated").question_logits("what?")
    full = tiny_model.prefill_frames(one, method="full").question_logits("what?")
    assert (isolated - full).abs().max().item() < 1e-4


# issue 18: `full` in large chunks ---------------------------------------------------------
def _forward_sizes(monkeypatch):
    sizes: list[int] = []
    original = statekv.prefill.forward_chunk

    def spy(adapter, cache, chunk):
        sizes.append(chunk.tokens)
        return original(adapter, cache, chunk)

    monkeypatch.setattr(statekv.prefill, "forward_chunk", spy)
    return sizes


def _assert_same_results(one, other):
    """Two prefills of the same video that must not differ: logits, LM FLOPs, answers."""
    a, b = one.question_logits(QUESTION), other.question_logits(QUESTION)
    assert (a - b).abs().max().item() < 1e-4
    assert one.stats.lm_prefill_flops == other.stats.lm_prefill_flops
    assert (one.ask([QUESTION], max_new_tokens=4)[0].token_ids
            == other.ask([QUESTION], max_new_tokens=4)[0].token_ids)


def test_full_in_large_chunks_equals_full_chunk_by_chunk(family, monkeypatch):
    frames = np.concatenate([family.frames] * 2)
    unit = family.model.adapter.frames_per_unit
    sizes = _forward_sizes(monkeypatch)
    chunked = family.model.prefill_frames(frames, method="full")  # default: grouped
    grouped_sizes = list(sizes)
    sizes.clear()
    statekv.prefill.FULL_FORWARD_TOKENS, saved = 0, statekv.prefill.FULL_FORWARD_TOKENS
    try:
        single = family.model.prefill_frames(frames, method="full")
    finally:
        statekv.prefill.FULL_FORWARD_TOKENS = saved
    assert len(sizes) == 1 + len(frames) // unit  # prefix, then one chunk per unit
    assert len(grouped_sizes) < len(sizes)  # fewer, larger forwards ...
    assert sum(grouped_sizes) == sum(sizes)  # ... over the same tokens
    assert chunked.state.frame_timestamps == single.state.frame_timestamps
    _assert_same_results(chunked, single)
    assert chunked.stats.vision_flops == single.stats.vision_flops


def test_large_chunks_respect_the_memory_cap(family, monkeypatch):
    from statekv import accounting
    from statekv.prefill import forward_tokens_cap

    adapter = family.model.adapter
    frames = np.concatenate([family.frames] * 2)
    cfg = adapter.text_config
    per_token = accounting.activation_bytes_per_token(cfg.hidden_size, cfg.intermediate_size, 4)
    tokens = adapter.tokens_per_frame(*frames.shape[1:3], frames=len(frames))
    budget_tokens = 3 * tokens * adapter.frames_per_unit  # room for about three units
    shape = accounting.LMShape.from_model(adapter.language_model, cfg)
    cap = forward_tokens_cap(adapter, shape, memory_bytes=4 * per_token * budget_tokens)
    assert cap == min(statekv.prefill.FULL_FORWARD_TOKENS, budget_tokens)
    monkeypatch.setattr(statekv.prefill, "forward_tokens_cap", lambda *a, **k: cap)
    sizes = _forward_sizes(monkeypatch)
    events = []
    session = family.model.prefill_frames(frames, method="full", on_event=events.append)
    per_frame = sum(sizes[1:]) / len(frames)  # the grouping sizes runs by the average frame
    assert max(np.diff([e.frames_done for e in events])) <= max(
        adapter.frames_per_unit, cap // per_frame)
    assert max(sizes[2:]) <= cap  # (the first frame may carry an intro sentence)
    assert len(sizes) > 3  # the cap split the video
    assert session.stats.frames == len(frames)


def test_chunks_run_alone_without_grouped_forwards(family, monkeypatch):
    monkeypatch.setattr(statekv.prefill, "GROUP_FORWARD_TOKENS", 0)
    sizes = _forward_sizes(monkeypatch)
    family.model.prefill_frames(family.frames, method="window", window_frames=2)
    unit = family.model.adapter.frames_per_unit
    assert len(sizes) == 1 + len(family.frames) // unit


# grouped prefill: several chunks per forward, each layer attending them one by one ---------
GROUPED_CASES = [
    ("statekv", {"budget": 24}),
    ("statekv", {"budget": 24, "pin_prefix": True}),
    ("window", {"window_frames": 2}),
    ("window", {"window_frames": 2, "pin_prefix": True}),
    ("statekv", {"budget": 40, "chunk_frames": 4}),
]


def _run_observed(family, frames, method, options):
    kept: list[tuple[int, int, list]] = []
    masses: list[tuple[int, int, list]] = []
    session = family.model.prefill_frames(
        frames, method=method, **options,
        on_carried=lambda layer, seen, positions: kept.append((layer, seen, positions.tolist())),
        on_mass=lambda layer, start, mass: masses.append((layer, start, mass.shape)))
    return session, kept, masses


@pytest.mark.parametrize("method,options", GROUPED_CASES)
def test_grouped_forwards_equal_one_forward_per_chunk(family, monkeypatch, method, options):
    frames = np.concatenate([family.frames] * 2)
    sizes = _forward_sizes(monkeypatch)
    grouped, kept, masses = _run_observed(family, frames, method, options)
    grouped_sizes = list(sizes)
    sizes.clear()
    monkeypatch.setattr(statekv.prefill, "GROUP_FORWARD_TOKENS", 0)
    single, single_kept, single_masses = _run_observed(family, frames, method, options)
    chunk_frames = options.get("chunk_frames", family.model.adapter.frames_per_unit)
    assert len(sizes) == 1 + len(frames) // chunk_frames  # prefix, then one forward per chunk
    assert len(grouped_sizes) < len(sizes) and sum(grouped_sizes) == sum(sizes)
    # the same selections at every layer after every chunk, and the same masses measured (a
    # grouped forward reports them layer by layer, so in another order)
    def order(records):
        return sorted(records, key=lambda r: (r[0], r[1]))

    assert order(kept) == order(single_kept) and order(masses) == order(single_masses)
    if method == "statekv":
        assert kept  # the budget made it select
    assert grouped.state.chunk_tokens == single.state.chunk_tokens
    _assert_same_results(grouped, single)
    assert grouped.stats.carried_tokens == single.stats.carried_tokens


@pytest.mark.parametrize("variant", [{"decay": 0.5}, {"bidirectional": True}])
def test_grouped_forwards_keep_scoring_variants_exact(tiny_model, frames, monkeypatch, variant):
    from statekv.policies import StateKV

    policy = StateKV(tokens=24, **variant)
    grouped = tiny_model.prefill_frames(frames, method=policy)
    monkeypatch.setattr(statekv.prefill, "GROUP_FORWARD_TOKENS", 0)
    single = tiny_model.prefill_frames(frames, method=policy)
    a, b = grouped.question_logits(QUESTION), single.question_logits(QUESTION)
    assert (a - b).abs().max().item() < 1e-4
    assert grouped.stats.lm_prefill_flops == single.stats.lm_prefill_flops


def test_grouped_forwards_respect_their_token_cap(tiny_model, frames, monkeypatch):
    sizes = _forward_sizes(monkeypatch)
    tokens = tiny_model.adapter.tokens_per_frame(*frames.shape[1:3])
    monkeypatch.setattr(statekv.prefill, "GROUP_FORWARD_TOKENS", 3 * tokens + 10)
    events = []
    tiny_model.prefill_frames(frames, method="statekv", budget=24, on_event=events.append)
    assert max(sizes[1:]) <= 3 * tokens + 10 and len(sizes) > 2
    assert [e.frames_done for e in events][1:] == list(range(1, len(frames) + 1))


# issue 18: --dtype auto -----------------------------------------------------------------
@pytest.mark.parametrize("capability,flags,expected", [
    ("AVX512", "fpu avx512f avx512_bf16", torch.bfloat16),
    ("AVX512", "fpu amx_tile amx_bf16", torch.bfloat16),
    ("AVX512", "fpu avx512f", torch.float32),
    ("AVX2", "fpu avx2 avx512_bf16", torch.float32),
    ("DEFAULT", "", torch.float32),
])
def test_dtype_auto_picks_bfloat16_only_on_native_bf16_cpus(monkeypatch, tmp_path, capability,
                                                            flags, expected):
    from statekv import loading

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    monkeypatch.setenv(loading.CPU_BF16_ENV, "1")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(loading, "CPUINFO", str(cpuinfo))
    assert loading.resolve_dtype("auto", torch.device("cpu")) == expected
    assert loading.resolve_dtype("float32", torch.device("cpu")) == torch.float32
    monkeypatch.setenv(loading.CPU_BF16_ENV, "0")  # the opt-out keeps float32
    assert loading.resolve_dtype("auto", torch.device("cpu")) == torch.float32



def test_dtype_auto_times_bf16_where_the_flag_is_not_enough(monkeypatch, tmp_path):
    from statekv import loading

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n")
    monkeypatch.setattr(loading, "CPUINFO", str(cpuinfo))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.delenv(loading.CPU_BF16_ENV, raising=False)  # the default: flags, then timing
    for speedup, expected in ((0.74, torch.float32), (1.1, torch.float32), (2.7, torch.bfloat16)):
        monkeypatch.setattr(loading, "bf16_matmul_speedup", lambda s=speedup: s)
        assert loading.resolve_dtype("auto", torch.device("cpu")) == expected
        assert loading.dtype_name("auto", "cpu") == str(expected).removeprefix("torch.")
    monkeypatch.setattr(loading, "bf16_matmul_speedup", lambda: 0.5)
    monkeypatch.setenv(loading.CPU_BF16_ENV, "1")  # trust the flags, no timing
    assert loading.resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16


def test_bf16_matmul_speedup_is_a_measured_ratio():
    from statekv import loading

    loading.bf16_matmul_speedup.cache_clear()
    ratio = loading.bf16_matmul_speedup()
    assert 0.01 < ratio < 100
    assert loading.bf16_matmul_speedup() == ratio  # measured once per process
