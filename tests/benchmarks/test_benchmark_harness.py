"""benchmarks/harness.py: a configuration in a fresh process, its peak above a baseline process,
peaks per interval, the machine; and every benchmark runs as a module of its package."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks import harness


def test_a_fresh_process_reports_its_peak_above_the_baseline_process():
    settings = {"mib": 64}
    runs = {
        config: harness.run_fresh("tests.benchmarks.peak_worker", config, settings)
        for config in ("baseline", "allocates")
    }
    assert runs["allocates"]["held"] == 64 * 2**20
    above = harness.above_baseline({config: run["peak_mib"] for config, run in runs.items()})
    assert set(above) == {"allocates"}
    assert 60 <= above["allocates"] <= 72  # the 64 MiB it touched, not the interpreter both load


def test_a_failing_worker_ends_the_benchmark_naming_it():
    with pytest.raises(SystemExit, match="error: the allocates worker of tests.benchmarks.peak_worker"):
        harness.run_fresh("tests.benchmarks.peak_worker", "allocates", {})  # no "mib": a KeyError


def test_serve_worker_answers_only_a_worker_call(capsys):
    def run_worker(config, settings):
        return {"config": config, **settings}

    assert harness.serve_worker(run_worker, ["--worker", "lora", '{"steps": 2}'])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"config": "lora", "steps": 2}
    assert not harness.serve_worker(run_worker, ["--quick"])
    assert harness.serve_worker(lambda config, settings: None, ["--worker", "rank1", "{}"])
    assert capsys.readouterr().out == ""  # a rank other than 0 prints nothing


def test_peak_log_restarts_the_count_at_each_mark():
    log = harness.PeakLog(per_interval=True)
    log.mark("start")
    block = b"x" * (64 * 2**20)
    del block
    allocated = log.mark("allocated")
    idle = log.mark("idle")
    assert allocated["interval_peak_mib"] - idle["interval_peak_mib"] >= 48
    assert idle["peak_mib"] == allocated["peak_mib"]  # the peak since the start keeps the highest


def test_above_baseline_never_goes_below_zero():
    assert harness.above_baseline({"baseline": 100.0, "a": 130.5, "b": 90.0}) == {"a": 30.5, "b": 0.0}


def test_the_machine_names_cpu_versions_code_and_load():
    measured_on = harness.machine(harness.load_average(), torch_threads=3)
    assert measured_on["cpu_count"] >= measured_on["cores_available"] >= 1
    assert measured_on["torch_threads"] == 3
    assert measured_on["torch"] and measured_on["transformers"] and measured_on["trl"]
    assert len(measured_on["code"]["source_sha256"]) == 16
    assert len(measured_on["load_average_after"]) == 3
    assert f"{measured_on['cpu_count']} CPUs" in harness.describe(measured_on)


def test_a_benchmark_started_as_a_file_runs_as_its_module():
    done = subprocess.run(
        [sys.executable, "benchmarks/memory.py", "--configs", "nonsense"],
        capture_output=True, text=True, cwd=harness.ROOT,
    )  # fmt: skip
    # the module's own argument check answered: the file ran as ``benchmarks.memory``
    assert done.returncode == 2 and "unknown configuration" in done.stderr
