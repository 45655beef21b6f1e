"""The scaling benchmark: a fast smoke run of the library and of `statekv bench`."""

from __future__ import annotations

import csv
import json

import pytest
import typer
from typer.testing import CliRunner

from statekv.commands import bench
from statekv_cli.bench import bench as bench_command

FAST = {"budget": 128, "window_frames": 2, "repeats": 1, "warmup": False, "threads": 1}
TINY_PRESET = """
name: bench-micro
model: none
family: internvl
budget: 32
window_frames: 2
architecture: {layers: 2, hidden: 64, heads: 4, kv_heads: 2, head_dim: 16, intermediate: 128,
               tokens_per_frame: 8}
"""


@pytest.fixture(scope="module")
def rows():
    return bench.run_bench("bench-tiny", frames=[4, 8], methods=["full", "window", "statekv"], **FAST)


def test_measured_rows(rows):
    assert [(r.frames, r.method) for r in rows] == [
        (n, m) for n in (4, 8) for m in ("full", "window", "statekv")]
    by = {(r.frames, r.method): r for r in rows}
    for r in rows:
        assert r.lm_prefill_seconds > 0 and r.lm_prefill_flops > 0 and not r.analytic
        assert r.tokens == bench.PREFIX_TOKENS + 64 * r.frames
        assert r.peak_memory_bytes >= 0 and r.detailed_cache_bytes > 0
        assert r.full_lm_prefill_flops == by[(r.frames, "full")].lm_prefill_flops
    # 8 frames x 64 tokens exceed the 128-token budget and the 2-frame window: both carry less.
    assert by[(8, "statekv")].carried_tokens == 128
    assert by[(8, "window")].carried_tokens == 128
    assert by[(8, "statekv")].lm_prefill_flops < by[(8, "full")].lm_prefill_flops
    assert by[(8, "statekv")].flatness is not None and by[(8, "statekv")].budget == 128


def test_analytic_rows_equal_the_measured_flops(rows):
    analytic = bench.analytic_bench("bench-tiny", frames=[4, 8],
                                    methods=["full", "window", "statekv"], budget=128,
                                    window_frames=2)
    assert [r.lm_prefill_flops for r in analytic] == [r.lm_prefill_flops for r in rows]
    assert all(r.analytic and r.lm_prefill_seconds is None for r in analytic)


def test_analytic_real_checkpoint_has_the_paper_shape():
    rows = bench.analytic_bench("internvl3-1b", frames=[512, 3600])
    flops = {(r.frames, r.method): r.lm_prefill_flops for r in rows}
    ratio_512 = flops[(512, "statekv")] / flops[(512, "full")]
    assert 0.1 < ratio_512 < 0.3  # the paper: about 1/6 at 512 frames for InternVL3-1B
    assert flops[(3600, "statekv")] / flops[(3600, "full")] < ratio_512 / 4  # linear vs quadratic
    last = {(r.frames, r.method): r.last_chunk_flops for r in rows}
    assert last[(512, "statekv")] == last[(3600, "statekv")]  # flat per frame
    assert last[(3600, "full")] > 5 * last[(512, "full")]  # grows per frame


def test_flatness_uses_chunks_after_the_state_fills():
    times = [1.0] * 10 + [2.0] * 80 + [2.2] * 10
    first, last, ratio = bench.flatness(times, fill_chunk=10)
    assert (first, last) == (2000.0, 2200.0) and ratio == pytest.approx(1.1)
    assert bench.flatness([1.0] * 5, fill_chunk=5) is None


def test_csv_and_plot(rows, tmp_path):
    path = tmp_path / "bench.csv"
    bench.write_csv(rows, str(path))
    read = list(csv.DictReader(path.open()))
    assert len(read) == len(rows) and read[0]["method"] == "full"
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    bench.plot(rows, str(png))
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_bad_options_are_usage_errors():
    from statekv.errors import UsageError

    with pytest.raises(UsageError):
        bench.run_bench("bench-tiny", frames=[4], methods=["nope"], repeats=1)
    with pytest.raises(UsageError):
        bench.run_bench("bench-tiny", frames=[0], repeats=1)


# the command, through a throwaway app until the main app registers it -------------------------
@pytest.fixture(scope="module")
def cli():
    app = typer.Typer()
    app.command("bench")(bench_command)
    app.command("noop")(lambda: None)  # two commands: `bench` stays a subcommand, as in the app
    runner = CliRunner()
    return lambda *args: runner.invoke(app, ["bench", *args])


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    path = tmp_path_factory.mktemp("presets") / "micro.yaml"
    path.write_text(TINY_PRESET)
    return str(path)


def test_command_json_csv_and_table(cli, micro, tmp_path):
    result = cli("--preset", micro, "--frames", "4,8", "--methods", "full,statekv",
                 "--budget", "24", "--repeats", "1", "--threads", "1", "--json",
                 "--csv", str(tmp_path / "b.csv"))
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    assert [(r["frames"], r["method"]) for r in records] == [
        (4, "full"), (4, "statekv"), (8, "full"), (8, "statekv")]
    assert records[-1]["lm_prefill_seconds"] > 0 and records[-1]["budget"] == 24
    assert records[-1]["carried_tokens"] == 24
    assert (tmp_path / "b.csv").exists()
    table = cli("--preset", micro, "--frames", "4", "--methods", "full,window", "--repeats", "1",
                "--threads", "1")
    assert table.exit_code == 0, table.output
    assert "window" in table.stdout and "flatness" in table.stdout


def test_command_analytic(cli):
    result = cli("--analytic", "--preset", "internvl3-8b", "--frames", "512,3600")
    assert result.exit_code == 0, result.output
    assert "3600" in result.stdout and "statekv" in result.stdout and "analytic" in result.stdout


def test_command_says_where_it_wrote_the_plot(cli, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "b.png"
    result = cli("--analytic", "--preset", "internvl3-8b", "--frames", "512,1024", "--plot", str(png))
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {png}" in result.stderr


@pytest.mark.parametrize("args,code", [
    (["--frames", "a,b"], 2),
    (["--methods", "nope", "--frames", "4"], 2),
    (["--preset", "no-such-preset", "--frames", "4"], 2),
    (["--preset", "missing.yaml", "--frames", "4"], 3),
])
def test_command_errors(cli, args, code):
    result = cli(*args, "--repeats", "1")
    assert result.exit_code == code, result.output


@pytest.mark.slow
def test_decode_rate_does_not_fall_with_questions_asked():
    rates = bench.decode_rates("bench-tiny", frames=64, questions=8, new_tokens=32)
    assert min(rates[-3:]) > 0.75 * max(rates[:3])


def test_transformers_runner_in_the_lm_benchmark(cli, micro):
    """`--methods ...,transformers`: one plain forward over the same tokens, full attention's
    FLOPs, and each method's speed-up over it against their FLOP ratio."""
    rows = bench.run_bench(micro, frames=[6], methods=["full", "statekv", "transformers"],
                           budget=24, repeats=2, warmup=False, threads=1)
    full, statekv, plain = rows
    assert plain.method == "transformers" and plain.tokens == full.tokens
    assert plain.lm_prefill_flops == full.lm_prefill_flops  # the same causal attention
    assert len(plain.lm_prefill_seconds_runs) == 2 and plain.lm_prefill_seconds > 0
    verdicts = bench.transformers_verdicts(rows)
    assert [v["method"] for v in verdicts] == ["full", "statekv"]
    v = verdicts[1]
    assert v["flop_ratio"] == pytest.approx(plain.lm_prefill_flops / statekv.lm_prefill_flops)
    assert v["speedup"] == pytest.approx(plain.lm_prefill_seconds / statekv.lm_prefill_seconds)
    assert v["of_limit"] == pytest.approx(v["speedup"] / v["flop_ratio"])
    table = cli("--preset", micro, "--frames", "4", "--methods", "statekv,transformers",
                "--repeats", "1", "--threads", "1")
    assert table.exit_code == 0, table.output
    assert "of the limit" in table.stdout and "transformers" in table.stdout
    for extra in (["--analytic"], ["--under-load", "1"]):
        refused = cli("--preset", micro, "--frames", "4", "--methods", "transformers", *extra)
        assert refused.exit_code == 2 and "transformers" in refused.output


def test_repeats_are_interleaved_across_methods(monkeypatch, micro):
    """Every method runs once per round, so drift on the machine moves all medians alike."""
    order = []
    real_run, real_plain = bench._run_once, bench._transformers_run
    monkeypatch.setattr(bench, "_run_once", lambda adapter, policy, *a: (
        order.append(policy.name), real_run(adapter, policy, *a))[1])
    monkeypatch.setattr(bench, "_transformers_run", lambda *a: (
        order.append("transformers"), real_plain(*a))[1])
    bench.run_bench(micro, frames=[3], methods=["full", "statekv", "transformers"], budget=24,
                    repeats=2, warmup=False, threads=1)
    assert order == ["full", "statekv", "transformers"] * 2
