"""The METHOD.md contracts, proven on a tiny random InternVL against the unmodified model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from statekv.cache import StateLayer

QUESTION = "what happens in the video?"


def reference_inputs(processor, frames, question=QUESTION):
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    n = len(frames)
    return processor(text=text, videos=[frames], do_sample_frames=False, return_tensors="pt",
                     video_metadata=[{"total_num_frames": n, "fps": 1.0, "duration": float(n),
                                      "frames_indices": list(range(n))}])


@pytest.fixture(scope="module")
def reference_run(reference, frames):
    model, processor = reference
    inputs = reference_inputs(processor, frames)
    with torch.inference_mode():
        logits = model(**inputs).logits[0].float()
        generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    answer = generated[0, inputs["input_ids"].shape[1]:].tolist()
    return inputs["input_ids"][0].tolist(), logits, answer


def engine_ids(model, session, question=QUESTION):
    """The token ids the engine fed: every chunk joined, then the question."""
    adapter = model.adapter
    ids = adapter.prefix_chunk().token_ids
    frames = session.state.frames
    for i in range(frames):
        ids += adapter.video_chunk(np.zeros((1, 64, 64, 3), np.uint8), i, 0).token_ids
    return ids + adapter.text_chunk(session.state.prompt.question_text(question), 0).token_ids


def test_layout_matches_processor(tiny_model, frames, reference_run):
    ref_ids, _, _ = reference_run
    session = tiny_model.prefill_frames(frames, method="full")
    assert engine_ids(tiny_model, session) == ref_ids
    assert session.stats.detailed_tokens + len(
        tiny_model.adapter.text_chunk(session.state.prompt.question_text(QUESTION), 0).token_ids
    ) == len(ref_ids)


@pytest.mark.parametrize("method,options", [
    ("full", {}),
    ("statekv", {"budget": 100_000}),
    ("window", {"window_frames": 10_000}),
    ("statekv", {"budget": 100_000, "chunk_frames": 3}),
])
def test_equals_full_attention_when_nothing_is_dropped(tiny_model, frames, reference_run, method, options):
    _, ref_logits, ref_answer = reference_run
    session = tiny_model.prefill_frames(frames, method=method, **options)
    logits = session.question_logits(QUESTION)
    expected = ref_logits[-logits.shape[0]:]
    assert (logits - expected).abs().max().item() < 1e-4
    answer = session.ask([QUESTION], max_new_tokens=6)[0]
    assert answer.token_ids == until_eos(ref_answer, tiny_model.adapter.eos_token_ids())


def until_eos(tokens, eos):
    out = []
    for token in tokens:
        if token in eos:
            break
        out.append(token)
    return out


@pytest.mark.parametrize("method,options", [("statekv", {"budget": 20}), ("window", {"window_frames": 1}),
                                            ("isolated", {})])
def test_dropping_history_changes_the_logits(tiny_model, frames, reference_run, method, options):
    # The control for the test above: it can fail, because a small carried state does change things.
    _, ref_logits, _ = reference_run
    logits = tiny_model.prefill_frames(frames, method=method, **options).question_logits(QUESTION)
    assert (logits - ref_logits[-logits.shape[0]:]).abs().max().item() > 1e-3


def test_eager_attention_equals_full_too(tiny_model, frames, reference_run):
    _, ref_logits, _ = reference_run
    session = tiny_model.prefill_frames(frames, method="statekv", budget=100_000, attention="eager")
    logits = session.question_logits(QUESTION)
    assert (logits - ref_logits[-logits.shape[0]:]).abs().max().item() < 1e-4


@pytest.fixture
def commits(monkeypatch):
    """Record every carried-state selection: (layer, candidate positions, mass, kept positions, kept keys)."""
    records = []
    original = StateLayer.commit

    def spy(self, mass):
        _, _, positions = self._pending
        original(self, mass)
        records.append({"layer": self, "positions": positions.clone(), "mass": mass[:, self.pinned:].clone(),
                        "kept": self.carried_positions.clone(), "keys": self.carried_keys.clone(),
                        "values": self.carried_values.clone()})

    monkeypatch.setattr(StateLayer, "commit", spy)
    return records


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_small_budget_keeps_exactly_the_top_masses(tiny_model, frames, commits, attention):
    budget = 37
    tiny_model.prefill_frames(frames, method="statekv", budget=budget, attention=attention)
    assert commits, "a budget below the history must trigger selections"
    for record in commits:
        kept, mass, positions = record["kept"], record["mass"], record["positions"]
        assert kept.shape[-1] <= budget
        for head in range(kept.shape[0]):
            top = set(positions[head, mass[head].topk(budget).indices].tolist())
            assert set(kept[head].tolist()) == top
            assert kept[head].tolist() == sorted(kept[head].tolist())


def test_fast_and_eager_masses_agree(tiny_model, frames, commits):
    tiny_model.prefill_frames(frames, method="statekv", budget=37, attention="sdpa")
    fast = [(r["mass"], r["kept"]) for r in commits]
    commits.clear()
    tiny_model.prefill_frames(frames, method="statekv", budget=37, attention="eager")
    eager = [(r["mass"], r["kept"]) for r in commits]
    assert len(fast) == len(eager)
    for (m1, k1), (m2, k2) in zip(fast, eager):
        torch.testing.assert_close(m1, m2, rtol=1e-5, atol=1e-6)
        assert torch.equal(k1, k2)


def test_carried_keys_keep_their_original_rotation(tiny_model, frames, commits, reference):
    session = tiny_model.prefill_frames(frames, method="statekv", budget=29)
    for record in commits:
        layer, kept = record["layer"], record["kept"]
        for head in range(kept.shape[0]):
            detailed = layer.keys[0, head, kept[head]]
            torch.testing.assert_close(record["keys"][0, head], detailed, rtol=0, atol=0)
            torch.testing.assert_close(record["values"][0, head], layer.values[0, head, kept[head]], rtol=0, atol=0)
    # Layer 0's keys depend only on the tokens and their positions: they must equal the
    # unmodified model's keys at the same absolute positions, whatever was evicted.
    model, processor = reference
    inputs = reference_inputs(processor, frames)
    with torch.inference_mode():
        out = model(**inputs, use_cache=True)
    ref_keys = out.past_key_values.layers[0].keys[0]
    ours = session.state.cache.layers[0].keys[0, :, : session.stats.detailed_tokens]
    torch.testing.assert_close(ours, ref_keys[:, : ours.shape[1]], rtol=1e-5, atol=1e-5)


def test_window_keeps_most_recent_tokens(tiny_model, frames):
    session = tiny_model.prefill_frames(frames, method="window", window_frames=1)
    assert session.stats.carried_tokens == session.stats.tokens_per_frame


def test_two_questions_one_prefill(tiny_model, frames, monkeypatch):
    calls = {"chunks": 0}
    adapter = tiny_model.adapter
    original = adapter.video_chunk

    def counting(*args, **kwargs):
        calls["chunks"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(adapter, "video_chunk", counting)
    questions = ["what happens?", "what color is the room?"]
    together = tiny_model.prefill_frames(frames, method="statekv", budget=40).ask(questions, 5)
    assert calls["chunks"] == len(frames)
    apart = [tiny_model.prefill_frames(frames, method="statekv", budget=40).ask([q], 5)[0] for q in questions]
    assert [a.token_ids for a in together] == [a.token_ids for a in apart]
    for a, b in zip(together, apart):
        torch.testing.assert_close(a.first_token_logprobs, b.first_token_logprobs)


def test_prefill_cost_per_chunk_flattens_only_for_bounded_methods(tiny_model):
    from statekv.tiny import tiny_video_frames

    frames = tiny_video_frames(24)
    per_chunk = {}
    for method in ("full", "statekv", "window"):
        events = []
        tiny_model.prefill_frames(frames, method=method, budget=64, window_frames=3, on_event=events.append)
        flops = [e.lm_prefill_flops for e in events]
        per_chunk[method] = np.diff(flops)
    full, statekv, window = per_chunk["full"], per_chunk["statekv"], per_chunk["window"]
    assert all(b > a for a, b in zip(full[1:], full[2:]))  # full grows every chunk
    assert len(set(statekv[-10:].tolist())) == 1  # flat once the state is full
    assert len(set(window[-10:].tolist())) == 1
    assert statekv[-1] < full[-1]


def test_stats_are_consistent(tiny_model, frames):
    session = tiny_model.prefill_frames(frames, method="statekv", budget=40)
    stats = session.stats
    assert stats.frames == len(frames)
    assert stats.frame_timestamps == [float(i) for i in range(len(frames))]
    assert stats.carried_tokens == 40
    assert stats.lm_prefill_flops < stats.full_lm_prefill_flops
    assert stats.vision_flops > 0
    assert stats.detailed_cache_bytes > 0
    assert stats.carried_cache_bytes < stats.detailed_cache_bytes
    full = tiny_model.prefill_frames(frames, method="full").stats
    assert full.lm_prefill_flops == full.full_lm_prefill_flops == stats.full_lm_prefill_flops


def test_budget_below_a_chunk_warns(tiny_model, frames):
    session = tiny_model.prefill_frames(frames, method="statekv", budget=4)
    assert any("below one chunk" in w for w in session.warnings)
    assert session.stats.carried_tokens == 4


def test_isolated_sees_only_the_prefix(tiny_model, frames):
    session = tiny_model.prefill_frames(frames, method="isolated")
    prefix = len(tiny_model.adapter.prefix_chunk().token_ids)
    assert session.stats.carried_tokens == prefix
