"""Thread control (statekv.threads, --threads, STATEKV_THREADS) and the load benchmark."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from statekv import threads
from statekv.commands import bench
from statekv.errors import UsageError
from statekv_cli.app import app

runner = CliRunner()


# resolving N | auto ---------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["0", "-2", "abc", "2.5", "", 0, True])
def test_bad_thread_counts_are_usage_errors(value):
    with pytest.raises(UsageError, match="--threads"):
        threads.parse(value)


def test_numbers_and_auto(monkeypatch):
    monkeypatch.setattr(threads, "affinity_cores", lambda: 3)
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    assert threads.parse("4") == 4 and threads.parse(2) == 2 and threads.parse(None) is None
    assert threads.parse("auto") == threads.parse(" AUTO ") == 3


def _cgroup_v2(tmp_path, cpu_max: str | None, group: str = "/job/step"):
    (tmp_path / "self").write_text(f"0::{group}\n")
    directory = tmp_path / group.strip("/")
    directory.mkdir(parents=True, exist_ok=True)
    if cpu_max is not None:
        (directory / "cpu.max").write_text(cpu_max + "\n")
    return tmp_path


def test_cgroup_v2_quota(tmp_path):
    root = _cgroup_v2(tmp_path, "150000 100000")
    assert threads.cgroup_cpu_limit(root, root / "self") == pytest.approx(1.5)
    (root / "job" / "step" / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_cpu_limit(root, root / "self") is None
    (root / "job" / "cpu.max").write_text("100000 100000\n")  # a parent's limit also binds
    assert threads.cgroup_cpu_limit(root, root / "self") == pytest.approx(1.0)


def test_cgroup_v1_quota(tmp_path):
    (tmp_path / "self").write_text("4:cpu,cpuacct:/slurm/job1\n3:memory:/slurm/job1\n")
    job = tmp_path / "cpu,cpuacct" / "slurm" / "job1"
    job.mkdir(parents=True)
    (job / "cpu.cfs_quota_us").write_text("300000\n")
    (job / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.cgroup_cpu_limit(tmp_path, tmp_path / "self") == pytest.approx(3.0)
    (job / "cpu.cfs_quota_us").write_text("-1\n")
    assert threads.cgroup_cpu_limit(tmp_path, tmp_path / "self") is None
    assert threads.cgroup_cpu_limit(tmp_path, tmp_path / "missing") is None


@pytest.mark.parametrize("affinity,quota,expected", [
    (8, None, 8), (8, 2.0, 2), (8, 1.5, 2), (8, 0.5, 1), (2, 16.0, 2)])
def test_auto_is_affinity_capped_by_the_quota(monkeypatch, affinity, quota, expected):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(affinity)),
                        raising=False)
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: quota)
    assert threads.available_cores() == expected


def test_resolution_order(monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 5)
    assert threads.resolve(None, {}) == 5
    assert threads.resolve(None, {"OMP_NUM_THREADS": "3"}) == 3
    assert threads.resolve(None, {"OMP_NUM_THREADS": "3", threads.ENV: "auto"}) == 5
    assert threads.resolve(None, {threads.ENV: "2"}) == 2
    assert threads.resolve("1", {threads.ENV: "2"}) == 1
    with pytest.raises(UsageError, match=threads.ENV):
        threads.resolve(None, {threads.ENV: "many"})
    # the Python API leaves torch alone unless asked
    assert threads.requested(None, {"OMP_NUM_THREADS": "3"}) is None
    assert threads.requested(None, {threads.ENV: "2"}) == 2


def test_apply_sets_torch_threads():
    before = torch.get_num_threads()
    try:
        assert threads.apply(2) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# the OpenMP wait policy ------------------------------------------------------------------------
def test_wait_policy_is_set_only_before_torch_and_never_over_the_users():
    env: dict[str, str] = {}
    assert threads.prepare_openmp(env, modules={}) == "short-spin"
    assert env == {"GOMP_SPINCOUNT": "10000"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert threads.prepare_openmp(env, modules={}) == "user" and env["OMP_WAIT_POLICY"] == "ACTIVE"
    env = {}
    assert threads.prepare_openmp(env, modules={"torch": object()}) == "too-late" and env == {}


def test_importing_statekv_first_makes_openmp_threads_spin_briefly():
    code = ("import os, statekv, torch, statekv.threads as t; "
            "print(os.environ.get('GOMP_SPINCOUNT'), t.openmp_wait_policy())")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                           check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert first.stdout.split() == ["10000", "short-spin"]
    late = subprocess.run([sys.executable, "-c", "import torch; " + code], env=env,
                          capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert late.stdout.split() == ["None", "default"]


# the command line ------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [
    ["ask", "{clip}", "q?"], ["compare", "{clip}", "q?"], ["summarize", "{clip}", "--out", "-"],
    ["demo"], ["eval"], ["bench", "--frames", "2"]])
@pytest.mark.parametrize("value,message", [("0", "at least 1"), ("abc", "positive integer")])
def test_bad_threads_option_exits_2_in_one_line(clip, command, value, message):
    argv = [a.format(clip=clip) for a in command] + ["--threads", value]
    result = runner.invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "--threads" in result.stderr
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_environment_variable_exits_2(clip, monkeypatch):
    monkeypatch.setenv(threads.ENV, "lots")
    result = runner.invoke(app, ["ask", str(clip), "q?"])
    assert result.exit_code == 2 and threads.ENV in result.stderr


def test_settings_record_the_threads(clip, tiny_internvl_dir, monkeypatch):
    before = torch.get_num_threads()
    try:
        result = runner.invoke(app, ["ask", str(clip), "q?", "--model", str(tiny_internvl_dir),
                                     "--max-frames", "2", "--max-new-tokens", "1", "--json",
                                     "--threads", "2"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["settings"]["threads"] == 2
        monkeypatch.setenv(threads.ENV, "1")
        result = runner.invoke(app, ["ask", str(clip), "q?", "--model", str(tiny_internvl_dir),
                                     "--max-frames", "2", "--max-new-tokens", "1", "--json"])
        assert json.loads(result.stdout)["settings"]["threads"] == 1
    finally:
        torch.set_num_threads(before)


def test_python_api_threads_argument(tiny_internvl_dir, frames):
    import statekv

    before = torch.get_num_threads()
    try:
        model = statekv.load(str(tiny_internvl_dir), device="cpu", dtype="float32", threads=2)
        torch.set_num_threads(1)  # someone else changed it: the model's own count is restored
        session = model.prefill_frames(frames[:2], method="statekv", budget=16, max_new_tokens=1)
        assert session.settings.threads == 2 and session.settings.to_dict()["threads"] == 2
    finally:
        torch.set_num_threads(before)


# results do not depend on the thread count ------------------------------------------------------
def test_single_thread_prefill_gives_the_same_results():
    from statekv.models.synthetic import SyntheticAdapter, build_language_model, synthetic_chunks
    from statekv.policies import make_policy
    from statekv.prefill import prefill_chunks

    arch, _ = bench.resolve_architecture("bench-tiny")
    adapter = SyntheticAdapter(build_language_model(arch), arch.tokens_per_frame)

    def run(count):
        kept = []
        before = torch.get_num_threads()
        threads.apply(count)
        try:
            result = prefill_chunks(adapter, synthetic_chunks(6, 1), make_policy("statekv", budget=96),
                                    frame_count=6, timestamps=(),
                                    on_carried=lambda layer, seen, pos: kept.append(pos.clone()))
        finally:
            torch.set_num_threads(before)
        layer = result.cache.layers[-1]
        return kept, layer.keys[:, :, :layer.seen].clone()

    kept_1, keys_1 = run(1)
    kept_2, keys_2 = run(2)
    assert len(kept_1) == len(kept_2) > 0
    assert all(torch.equal(a, b) for a, b in zip(kept_1, kept_2))
    torch.testing.assert_close(keys_1, keys_2, rtol=1e-4, atol=1e-5)


def _synthetic(preset: str = "bench-tiny"):
    from statekv.models.synthetic import SyntheticAdapter, build_language_model

    arch, _ = bench.resolve_architecture(preset)
    return SyntheticAdapter(build_language_model(arch), arch.tokens_per_frame), arch


def test_small_chunks_run_small_ops_on_one_thread_and_linear_layers_on_all():
    """During a small chunk only nn.Linear runs with every thread; torch gets its count back."""
    from statekv.models.synthetic import synthetic_chunks
    from statekv.policies import make_policy
    from statekv.prefill import prefill_chunks

    adapter, arch = _synthetic()
    seen = {"linear": set(), "norm": set()}
    model = adapter.language_model
    handles = [m.register_forward_pre_hook(lambda m, a, kind=kind: seen[kind].add(
        torch.get_num_threads())) for m, kind in
        [(m, "linear") for m in model.modules() if isinstance(m, torch.nn.Linear)]
        + [(model.norm, "norm")]]
    before = torch.get_num_threads()
    threads.apply(2)
    try:
        prefill_chunks(adapter, synthetic_chunks(3, 1), make_policy("statekv", budget=96),
                       frame_count=3, timestamps=())
        assert torch.get_num_threads() == 2  # given back after the prefill
        hooks = sum(len(m._forward_pre_hooks) for m in model.modules())
        assert hooks == len(handles)  # statekv's hooks are gone
    finally:
        for h in handles:
            h.remove()
        torch.set_num_threads(before)
    assert seen == {"linear": {2}, "norm": {1}}


def test_serial_small_ops_only_for_small_chunks_and_restored_on_errors():
    adapter, arch = _synthetic()
    serial = threads.SerialSmallOps(adapter.language_model, threads=2)
    try:
        assert serial.applies(64, 576) and not serial.applies(4096, 576)
        before = torch.get_num_threads()
        with pytest.raises(RuntimeError, match="boom"):
            with serial.chunk(64, 576):
                assert torch.get_num_threads() == 1
                raise RuntimeError("boom")
        assert torch.get_num_threads() == 2 and not serial.active
        with serial.chunk(4096, 576):  # a large chunk keeps every thread for every op
            assert torch.get_num_threads() == 2
    finally:
        serial.close()
        torch.set_num_threads(before)
    one = threads.SerialSmallOps(adapter.language_model, threads=1)  # also: not on the CPU
    assert not one.applies(64, 576)
    torch.set_num_threads(2)
    try:
        one.close()  # nothing was hooked: the caller's thread count stays
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_serial_small_ops_change_no_result(monkeypatch):
    """The same prefill with the small ops on one thread and with every op on two threads."""
    from statekv.models.synthetic import synthetic_chunks
    from statekv.policies import make_policy
    from statekv.prefill import prefill_chunks

    adapter, _ = _synthetic()

    def run(limit):
        monkeypatch.setattr(threads, "SERIAL_SMALL_OPS_ELEMENTS", limit)
        kept = []
        result = prefill_chunks(adapter, synthetic_chunks(6, 1),
                                make_policy("statekv", budget=96), frame_count=6, timestamps=(),
                                on_carried=lambda layer, seen, pos: kept.append(pos.clone()))
        layer = result.cache.layers[-1]
        return kept, layer.keys[:, :, :layer.seen].clone()

    before = torch.get_num_threads()
    threads.apply(2)
    try:
        kept_serial, keys_serial = run(1 << 19)
        kept_plain, keys_plain = run(0)
    finally:
        torch.set_num_threads(before)
    assert len(kept_serial) == len(kept_plain) > 0
    assert all(torch.equal(a, b) for a, b in zip(kept_serial, kept_plain))
    torch.testing.assert_close(keys_serial, keys_plain, rtol=1e-4, atol=1e-5)



def test_large_attention_of_a_small_chunk_runs_on_every_thread(monkeypatch):
    """Inside a serial chunk an attention call of at least WIDE_ATTENTION_SCORES scores gets
    every thread; smaller ones stay on one; the selection is the same either way."""
    from statekv import attention
    from statekv.models.synthetic import synthetic_chunks
    from statekv.policies import make_policy
    from statekv.prefill import prefill_chunks

    adapter, _ = _synthetic()
    calls = []
    plain = attention.attend

    def watched(query, key, *args, **kwargs):
        calls.append((query.shape[1] * query.shape[2] * key.shape[2], torch.get_num_threads()))
        return plain(query, key, *args, **kwargs)

    monkeypatch.setattr(attention, "attend", watched)

    def run(limit):
        monkeypatch.setattr(threads, "WIDE_ATTENTION_SCORES", limit)
        calls.clear()
        kept = []
        result = prefill_chunks(adapter, synthetic_chunks(6, 1),
                                make_policy("statekv", budget=96), frame_count=6, timestamps=(),
                                on_carried=lambda layer, seen, pos: kept.append(pos.clone()))
        layer = result.cache.layers[-1]
        return list(calls), kept, layer.keys[:, :, :layer.seen].clone()

    before = torch.get_num_threads()
    threads.apply(2)
    try:
        sizes = sorted({scores for scores, _ in run(0)[0]})
        limit = sizes[len(sizes) // 2]  # some calls above the limit, some below
        wide_calls, kept_wide, keys_wide = run(limit)
        narrow_calls, kept_narrow, keys_narrow = run(0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert {n for scores, n in wide_calls if scores >= limit} == {2}
    assert {n for scores, n in wide_calls if scores < limit} == {1}
    assert {n for _, n in narrow_calls} == {1}  # 0: attention stays on one thread
    assert len(kept_wide) == len(kept_narrow) > 0
    assert all(torch.equal(a, b) for a, b in zip(kept_wide, kept_narrow))
    torch.testing.assert_close(keys_wide, keys_narrow, rtol=1e-4, atol=1e-5)

# the load benchmark ------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_busy_processes_stop_on_exit_and_on_interrupt():
    with bench.BusyProcesses(2, seconds=60) as busy:
        pids = [p.pid for p in busy.processes]
        assert len(pids) == 2 and all(p.poll() is None for p in busy.processes)
    assert not any(_alive(pid) for pid in pids)
    with pytest.raises(KeyboardInterrupt):
        with bench.BusyProcesses(1, seconds=60) as busy:
            pids = [p.pid for p in busy.processes]
            raise KeyboardInterrupt
    assert not any(_alive(pid) for pid in pids)


def test_busy_processes_end_by_themselves():
    busy = bench.BusyProcesses(1, seconds=0.5).__enter__()
    try:
        assert busy.processes[0].wait(timeout=30) == 0  # its own deadline, not a kill
    finally:
        busy.stop()


def test_under_load_reports_both_runners_and_leaves_no_process(monkeypatch):
    started = []
    original = bench.BusyProcesses.__enter__

    def spy(self):
        result = original(self)
        started.extend(p.pid for p in self.processes)
        return result

    monkeypatch.setattr(bench.BusyProcesses, "__enter__", spy)
    result = runner.invoke(app, ["bench", "--preset", "bench-tiny", "--frames", "2",
                                 "--methods", "statekv,full", "--repeats", "1", "--threads", "1",
                                 "--under-load", "1", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    rows = record["rows"]
    assert [r["runner"] for r in rows] == ["statekv", "full", "transformers"]
    for r in rows:
        assert r["busy"] == 1 and r["threads"] == 1 and r["tokens"] == bench.PREFIX_TOKENS + 2 * 64
        assert r["quiet_seconds"] > 0 and r["loaded_seconds"] > 0
        assert r["slowdown"] == pytest.approx(r["loaded_seconds"] / r["quiet_seconds"])
        assert len(r["quiet_seconds_runs"]) == len(r["loaded_seconds_runs"]) == 1
    assert [v["method"] for v in record["verdicts"]] == ["statekv", "full"]
    assert all(v["limit"] == pytest.approx(1.5 * rows[2]["slowdown"]) for v in record["verdicts"])
    assert len(started) == 1 and not any(_alive(pid) for pid in started)


def test_transformers_forward_sees_the_same_tokens():
    from statekv.models.synthetic import SyntheticAdapter, build_language_model

    arch, _ = bench.resolve_architecture("bench-tiny")
    adapter = SyntheticAdapter(build_language_model(arch), arch.tokens_per_frame)
    whole = adapter.whole_video(3)
    pieces = [adapter.prefix_chunk()] + [adapter.video_chunk([None], i, 0) for i in range(3)]
    assert whole.tokens == sum(p.tokens for p in pieces)
    assert torch.equal(whole.inputs_embeds, torch.cat([p.inputs_embeds for p in pieces], dim=1))
    assert adapter.language_model.config._attn_implementation == "statekv"
    assert bench.transformers_forward(adapter, 3) > 0
    assert adapter.language_model.config._attn_implementation == "statekv"  # restored


def test_under_load_refuses_analytic_and_negative_counts():
    result = runner.invoke(app, ["bench", "--under-load", "1", "--analytic"])
    assert result.exit_code == 2 and "--analytic" in result.stderr
    with pytest.raises(UsageError, match="--under-load"):
        bench.load_bench("bench-tiny", [2], busy=-1)
