"""The shape of the source tree: no import cycles, adapters used through their contract,
method names in one registry, and policies from outside the package accepted."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("statekv", "statekv_cli")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Every package module `module` imports, at any depth of its code (lazy imports too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in known:  # `from a.b import c`: c may be a function
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
    return targets


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph = {m: _imports(m, p, known) for m, p in modules.items()}
    for module, targets in graph.items():  # a package's own __init__ re-exports are not cycles
        targets.discard(module.rpartition(".")[0])
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_package_has_no_import_cycle():
    graph = _graph()
    assert graph["statekv.loading"], "the walker found no imports: it is broken"
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_walker_finds_a_cycle_when_there_is_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_imports_point_one_way():
    graph = _graph()
    for module, targets in graph.items():
        if module.startswith("statekv.") or module == "statekv":
            assert not any(t.startswith("statekv_cli") for t in targets), module
        if module.startswith("statekv.models."):  # families never import the workloads
            assert not any(t.startswith(("statekv.commands", "statekv.demo")) for t in targets), module
    engine = {"statekv.session", "statekv.prefill", "statekv.cache", "statekv.attention",
              "statekv.policies", "statekv.answer", "statekv.accounting", "statekv.loading",
              "statekv.video", "statekv.presets", "statekv.errors", "statekv.units"}
    for module in engine:
        assert not any(t.startswith(("statekv.commands", "statekv.demo", "statekv.testing"))
                       for t in graph[module]), module


def _private_adapter_reads(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            continue
        owner = node.value
        name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
        if name == "adapter" or name.endswith("_adapter"):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}.{node.attr}")
    return found


def test_nothing_outside_models_reads_private_adapter_attributes():
    files = [p for d in ("statekv", "statekv_cli", "tools", "tests") for p in (ROOT / d).rglob("*.py")
             if "models" not in p.relative_to(ROOT).parts[:2]]
    assert len(files) > 20
    found = [hit for path in files for hit in _private_adapter_reads(path)]
    assert found == []


def test_the_private_read_check_catches_one(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f(model):\n    return model.adapter._frame_ids(1)\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert _private_adapter_reads(sample) == ["sample.py:2: adapter._frame_ids"]
    finally:
        ROOT = saved


def test_method_names_are_listed_only_in_the_registry():
    """A literal tuple/list of several method names appears nowhere but policies.py."""
    names = {"full", "window", "statekv", "isolated"}
    offenders = []
    for module, path in _modules().items():
        if module == "statekv.policies":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                values = {e.value for e in node.elts if isinstance(e, ast.Constant)}
                if len(values & names) >= 3 and "isolated" in values:
                    offenders.append(f"{module}:{node.lineno}")
    assert offenders == []


# a policy from outside the package ------------------------------------------------------
from statekv.policies import Policy  # noqa: E402


@dataclass(frozen=True)
class KeepOldest(Policy):
    """Carry the `tokens` oldest entries: a policy defined by a user, not by statekv."""

    name: ClassVar[str] = "keep-oldest"
    recency: ClassVar[bool] = False
    tokens: int = 8

    @property
    def capacity(self) -> int:
        return self.tokens

    def scores(self, mass, positions):
        return -positions.to(torch.float32)


def test_a_policy_defined_outside_the_package_runs(tiny_model, frames):
    session = tiny_model.prefill_frames(frames, method=KeepOldest(tokens=12))
    assert session.settings.method == "keep-oldest"
    assert 0 < session.stats.carried_tokens <= 12
    assert session.stats.lm_prefill_flops < session.stats.full_lm_prefill_flops
    assert isinstance(session.ask("what happens?", max_new_tokens=2)[0].answer, str)


def test_an_outside_policy_that_keeps_everything_matches_full(tiny_model, frames):
    everything = KeepOldest(tokens=10_000)
    ours = tiny_model.prefill_frames(frames, method=everything).question_logits("what?")
    full = tiny_model.prefill_frames(frames, method="full").question_logits("what?")
    assert (ours - full).abs().max().item() < 1e-4


def test_a_bad_method_is_a_usage_error(tiny_model, frames):
    from statekv.errors import UsageError

    with pytest.raises(UsageError, match="unknown method"):
        tiny_model.prefill_frames(frames, method="nope")
    with pytest.raises(UsageError, match="Policy"):
        tiny_model.prefill_frames(frames, method=3)
