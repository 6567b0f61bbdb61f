"""experiments/paper_table.py: learning rates chosen on validation only, summaries, cost accounting."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import paper_methods, paper_table
from sapo.builtin import BUILTIN_CHECKPOINTS

ROOT = Path(__file__).resolve().parents[2]


def run(method, rate, seed, validation, test, task="addition"):
    return {
        "task": task, "method": method, "learning_rate": rate, "seed": seed,
        "validation_accuracy": validation, "test_accuracy": test, "generated_tokens": 10, "seconds": 1.0,
        "validation_edit_distance": 1 - validation, "test_edit_distance": 1 - test,
    }  # fmt: skip


def test_learning_rate_is_chosen_on_validation_never_on_test():
    runs = [
        run("DPO", 1e-5, 0, validation=0.50, test=0.90),  # best on test, worse on validation
        run("DPO", 3e-5, 0, validation=0.60, test=0.40),
        run("DPO", 1e-4, 1, validation=0.99, test=0.99),  # another seed does not take part
    ]
    # DPO's ablations (``DPO, RPO``) take the rate chosen for DPO
    ablations = [name for name, (base, _) in paper_methods.ABLATIONS.items() if base == "DPO"]
    expected = {("addition", method): 3e-5 for method in ["DPO", *ablations]}
    assert paper_table.choose_rates(runs, seed=0) == expected


def test_ablations_take_the_rate_chosen_for_the_method_they_ablate():
    runs = [run("SAPO-DPO", 1e-5, 0, 0.5, 0.1), run("SAPO-DPO", 3e-5, 0, 0.6, 0.1)]
    rates = paper_table.choose_rates(runs, seed=0)
    for ablation, (base, _) in paper_methods.ABLATIONS.items():
        assert base in paper_methods.FAMILY
        if base == "SAPO-DPO":
            assert rates[("addition", ablation)] == 3e-5
    assert ("addition", "SAPO-ORPO, ties skipped") not in rates  # SAPO-ORPO was not tuned


def test_ablations_change_only_their_own_field():
    def job(method):
        return paper_methods.Job(
            task="sorting", method=method, learning_rate=1e-4, seed=0, steps=10, batch_size=8, beta=0.5,
            segment_length=8, ref_model_sync_steps=5, validation_rows=4, test_rows=4, output_dir="out",
            warm_start="builtin:tiny",
        )  # fmt: skip

    assert paper_methods.sapo_overrides(job("SAPO-DPO")) == {}
    assert paper_methods.sapo_overrides(job("SAPO-DPO, full answers")) == {"segment_length": 80}
    assert paper_methods.sapo_overrides(job("SAPO-DPO, on-policy")) == {"replay_buffer_size": 8}
    assert paper_methods.sapo_overrides(job("SAPO-DPO, EMA decay 0")) == {"ema_decay": 0.0}
    assert paper_methods.sapo_overrides(job("SAPO-ORPO, ties skipped")) == {"skip_tied_pairs": True}
    assert paper_methods.runner("SAPO-ORPO, ties skipped") is paper_methods.train_sapo


def test_ties_go_to_the_smaller_learning_rate():
    runs = [run("ORPO", 3e-4, 0, 0.5, 0.1), run("ORPO", 1e-4, 0, 0.5, 0.2)]
    assert paper_table.choose_rates(runs, seed=0) == {("addition", "ORPO"): 1e-4}


def test_summary_averages_the_chosen_rate_over_seeds_only():
    runs = [
        run("DPO", 3e-5, 0, 0.6, 0.40),
        run("DPO", 3e-5, 1, 0.7, 0.50),
        run("DPO", 3e-5, 2, 0.8, 0.60),
        run("DPO", 1e-5, 0, 0.5, 0.99),  # a rate that was not chosen
    ]
    summary = paper_table.summarize(runs, {("addition", "DPO"): 3e-5}, ["addition"], ["DPO"])
    row = summary[("addition", "DPO")]
    assert row["seeds"] == 3
    assert row["test_mean"] == pytest.approx(0.5)
    assert row["test_std"] == pytest.approx(0.1)
    assert row["validation_mean"] == pytest.approx(0.7)
    assert row["edit_distance_mean"] == pytest.approx(0.5)
    document = paper_table.results_document(summary, ["addition"], ["DPO"], {"addition": 6.0})
    entry = document["tasks"]["addition"]
    assert entry["mean_answer_tokens"] == 6.0
    assert entry["methods"]["DPO"]["mean"] == pytest.approx(0.5)
    assert entry["methods"]["DPO"]["std"] == pytest.approx(0.1)
    assert entry["methods"]["DPO"]["learning_rate"] == 3e-5  # a rate is not rounded away


def test_docs_results_json_has_every_method_of_the_table():
    document = json.loads((ROOT / "docs" / "results.json").read_text())
    assert document["tasks"]
    for task, entry in document["tasks"].items():
        assert isinstance(entry["mean_answer_tokens"], float), task
        methods = entry["methods"]
        for name in ("continued SFT", "SPIN", "DPO", "ORPO", "SAPO-DPO", "SAPO-ORPO"):
            assert {"mean", "std"} <= set(methods[name]), (task, name)
            assert 0.0 <= methods[name]["mean"] <= 1.0 and methods[name]["std"] >= 0.0
            assert methods[name]["learning_rate"] > 0, (task, name)
    assert any(entry["mean_answer_tokens"] >= 30 for entry in document["tasks"].values())


def test_segment_tokens_add_up_each_logging_window():
    history = [
        {"step": 10, "sapo/segment_tokens": 90.0},
        {"step": 20, "sapo/segment_tokens": 80.0},
        {"step": 25, "sapo/segment_tokens": 70.0},
        {"step": 25, "train_runtime": 1.0},
    ]
    assert paper_methods.segment_tokens(history) == 10 * 90 + 10 * 80 + 5 * 70


def test_quick_grid_covers_every_method_and_steps_must_be_multiples_of_ten():
    args = paper_table.parse_args(["--quick"])
    assert args.methods == list(paper_methods.METHODS)
    assert len(args.seeds) >= 3 and len(args.tasks) >= 2
    for family in paper_methods.FAMILY.values():
        assert family is None or len(args.grid[family]) >= 2
    with pytest.raises(SystemExit):
        paper_table.parse_args(["--steps", "15"])
    for task in args.tasks:  # every default task has its warm start shipped
        assert paper_methods.warm_start_name(task).removeprefix("builtin:") in BUILTIN_CHECKPOINTS
    with pytest.raises(SystemExit):  # addition has none: SFT learns it almost perfectly
        paper_table.parse_args(["--tasks", "addition"])


@pytest.mark.parametrize(
    "method", ["SAPO-DPO, full answers", "SAPO-DPO, on-policy", "SAPO-DPO, ties skipped", "ORPO"]
)
def test_a_method_trains_and_reports_its_cost(tmp_path, method):
    job = paper_methods.Job(
        task="multiplication", method=method, learning_rate=1e-4, seed=0, steps=10, batch_size=8,
        beta=0.5, segment_length=3, ref_model_sync_steps=5, validation_rows=16, test_rows=16,
        output_dir=str(tmp_path / "run"), warm_start="builtin:tiny-multiplication-sft",
    )  # fmt: skip
    result = paper_methods.run_job(job)
    assert result["method"] == method
    assert 0.0 <= result["test_accuracy"] <= 1.0 and 0.0 <= result["validation_accuracy"] <= 1.0
    assert 0.0 <= result["test_edit_distance"] and 0.0 <= result["validation_edit_distance"]
    if method.startswith("SAPO"):
        assert 0.0 <= result["tied_fraction"] <= 1.0
    # SAPO generates every step; ORPO samples one rejected answer per training row up front
    assert (
        result["generated_tokens"] >= 10 * 8
        if method.startswith("SAPO")
        else result["generated_tokens"] >= 80
    )
    if method == "SAPO-DPO, full answers":
        # a whole answer (3-5 tokens) per row, not a 3-token segment of it
        assert result["generated_tokens"] > 10 * 8 * 3
    assert (tmp_path / "run" / "train.log").stat().st_size > 0


def test_a_finished_run_is_read_back_not_trained_again(tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    trained = []

    def fake_run_job(job):
        trained.append(job.method)
        return run(job.method, job.learning_rate, job.seed, 0.5, 0.5)

    monkeypatch.setattr(paper_table, "run_job", fake_run_job)
    args = paper_table.parse_args(["--quick", "--output_dir", str(tmp_path)])
    jobs = [paper_table.make_job(args, "sorting", method, 1e-4, 0) for method in ("DPO", "ORPO")]
    with ThreadPoolExecutor(max_workers=1) as pool:
        first = paper_table.run_all(args, jobs, pool, "first")
        again = paper_table.run_all(
            args, [*jobs, paper_table.make_job(args, "sorting", "DPO", 1e-4, 1)], pool, "again"
        )
    assert trained == ["DPO", "ORPO", "DPO"]  # only the new seed trains the second time
    assert again[:2] == first and [row["method"] for row in again] == ["DPO", "ORPO", "DPO"]


def test_equal_exact_match_goes_to_the_lower_edit_distance():
    runs = [run("SAPO-DPO", 1e-5, 0, 0.0, 0.0), run("SAPO-DPO", 3e-5, 0, 0.0, 0.0)]
    runs[1]["validation_edit_distance"] = 0.2  # the helper's default is 1 - exact match = 1.0
    assert paper_table.choose_rates(runs, seed=0)[("addition", "SAPO-DPO")] == 3e-5


def test_rates_can_be_borrowed_from_an_earlier_run(tmp_path):
    earlier = {"tasks": {"sorting": {"mean_answer_tokens": 33.0, "methods": {
        "SFT": {"mean": 0.7, "std": 0.0, "learning_rate": 0.0},
        "DPO": {"mean": 0.7, "std": 0.0, "learning_rate": 3e-5},
    }}}}  # fmt: skip
    path = tmp_path / "results.json"
    path.write_text(json.dumps(earlier))
    rates = paper_table.borrowed_rates(path, ["worked-multiplication"], ["SFT", "DPO"])
    assert rates == {("worked-multiplication", "SFT"): 0.0, ("worked-multiplication", "DPO"): 3e-5}
    with pytest.raises(SystemExit, match="ORPO"):
        paper_table.borrowed_rates(path, ["worked-multiplication"], ["ORPO"])


DRIVER = """
import multiprocessing, os, time
from concurrent.futures import ProcessPoolExecutor
from experiments.paper_table import end_with_the_driver
context = multiprocessing.get_context("spawn")
pool = ProcessPoolExecutor(1, mp_context=context, initializer=end_with_the_driver)
print(pool.submit(os.getpid).result(), flush=True)
time.sleep(600)
"""


def running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, ended and not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal")
def test_workers_end_with_a_killed_driver():
    """A driver killed by a signal runs no cleanup: its workers must not train on, orphaned."""
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        worker = int(driver.stdout.readline())
        assert running(worker)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
        deadline = time.monotonic() + 30
        while running(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not running(worker)
    finally:
        driver.kill()
