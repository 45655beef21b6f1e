"""StateKV's scoring variants (off by default): bidirectional in-chunk scores, a decayed running
score. Each changes nothing while the budget covers the history, and keeps the budget."""

from __future__ import annotations

import pytest
import torch

from statekv.attention import attend, attention_mass, causal_mask
from statekv.errors import UsageError
from statekv.policies import BENCHMARK_METHODS, StateKV, VARIANTS, make_policy

QUESTION = "what happens in the video?"
VARIANT_POLICIES = [StateKV(tokens=100_000, bidirectional=True), StateKV(tokens=100_000, decay=0.5),
                    StateKV(tokens=100_000, bidirectional=True, decay=0.9)]


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_bidirectional_mass_keeps_the_output_causal(implementation):
    torch.manual_seed(0)
    query = torch.randn(1, 4, 6, 8)  # (1, heads, chunk queries, head_dim); 2 KV heads
    key, value = torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)  # 4 carried + 6 chunk keys
    causal_out, causal = attend(query, key, value, 0.35, True, implementation)
    out, mass = attend(query, key, value, 0.35, True, implementation, causal_mass=False)
    assert torch.allclose(out, causal_out, atol=1e-5)  # the forward is unchanged
    assert torch.allclose(mass, attention_mass(query, key, 0.35, None), atol=1e-5)
    assert torch.allclose(causal, attention_mass(query, key, 0.35, causal_mask(6, 10, "cpu")),
                          atol=1e-5)
    assert not torch.allclose(mass, causal, atol=1e-3)  # the chunk's last keys gain scorers
    assert torch.allclose(mass.sum(-1), torch.full((2,), 2 * 6.0), atol=1e-4)


@pytest.mark.parametrize("policy", VARIANT_POLICIES, ids=["bidir", "decay", "both"])
def test_variants_equal_full_attention_while_nothing_is_dropped(family, policy):
    model, frames = family.model, family.frames
    reference = model.prefill_frames(frames, method="full").question_logits(QUESTION)
    logits = model.prefill_frames(frames, method=policy).question_logits(QUESTION)
    assert (logits - reference).abs().max().item() < 1e-4


@pytest.mark.parametrize("variant", [dict(bidirectional=True), dict(decay=0.5),
                                     dict(bidirectional=True, decay=0.8)])
def test_variants_keep_the_budget_and_the_top_running_scores(tiny_model, frames, variant):
    """Replay the selection from the observed masses: kept = top-B of mass + decay x previous."""
    budget, decay = 29, variant.get("decay", 0.0)
    policy = StateKV(tokens=budget, **variant)
    state: dict[int, dict] = {}
    checked = []

    def on_mass(layer, start, mass):  # after the chunk's attention (a fit keeps before it)
        state.setdefault(layer, {}).setdefault("mass", {})[start] = mass.clone()

    def on_carried(layer, seen, kept):
        mine = state.setdefault(layer, {})
        start = mine.get("seen", 0)
        mine["seen"] = seen
        previous = mine.get("kept", torch.empty(kept.shape[0], 0, dtype=torch.long))
        candidates = torch.cat([previous, torch.arange(start, seen).expand(kept.shape[0], -1)], 1)
        assert kept.shape[-1] == min(budget, candidates.shape[-1])
        if candidates.shape[-1] <= budget:
            assert torch.equal(kept, candidates)
        else:
            score = mine["mass"].pop(start).clone()
            if "score" in mine:
                score[:, :previous.shape[-1]] += decay * mine["score"]
            top = score.topk(budget, dim=-1).indices.sort(dim=-1).values
            assert torch.equal(candidates.gather(1, top), kept)
            mine["score"] = score.gather(1, top)
            checked.append(layer)
        mine["kept"] = kept.clone()

    session = tiny_model.prefill_frames(frames, method=policy, on_mass=on_mass,
                                        on_carried=on_carried)
    assert checked and session.stats.carried_tokens == budget


def test_bidirectional_scores_change_the_selection(tiny_model, frames):
    kept = {}
    for name, policy in (("paper", StateKV(tokens=29)), ("bidir", StateKV(tokens=29, bidirectional=True))):
        runs = []
        tiny_model.prefill_frames(frames, method=policy,
                                  on_carried=lambda layer, seen, p: runs.append(p.clone()))
        kept[name] = runs
    assert any(not torch.equal(a, b) for a, b in zip(kept["paper"], kept["bidir"]))


def test_variant_registry_and_validation():
    assert StateKV().bidirectional_scores is False and StateKV().score_decay == 0.0  # paper's rule
    for name in VARIANTS:
        assert name in BENCHMARK_METHODS
        policy = make_policy(name, budget=64)
        assert isinstance(policy, StateKV) and policy.budget == 64
        assert policy.bidirectional_scores or policy.score_decay > 0
    with pytest.raises(UsageError):
        make_policy("statekv-bidir")


def test_variants_by_name_through_the_python_api(tiny_model, frames):
    session = tiny_model.prefill_frames(frames, method="statekv-decay", budget=29)
    assert session.settings.method == "statekv" and session.settings.budget == 29
    assert session.stats.carried_tokens == 29
    for bad in (-0.1, 1.0):
        with pytest.raises(UsageError):
            StateKV(tokens=8, decay=bad)
