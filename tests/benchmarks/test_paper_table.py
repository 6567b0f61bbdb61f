"""benchmarks/paper_table.py: learning rates chosen on validation only, summaries, cost accounting."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import paper_methods  # noqa: E402
import paper_table  # noqa: E402

from sapo.builtin import BUILTIN_CHECKPOINTS  # noqa: E402


def run(method, rate, seed, validation, test, task="addition"):
    return {
        "task": task, "method": method, "learning_rate": rate, "seed": seed,
        "validation_accuracy": validation, "test_accuracy": test, "generated_tokens": 10, "seconds": 1.0,
    }  # fmt: skip


def test_learning_rate_is_chosen_on_validation_never_on_test():
    runs = [
        run("DPO", 1e-5, 0, validation=0.50, test=0.90),  # best on test, worse on validation
        run("DPO", 3e-5, 0, validation=0.60, test=0.40),
        run("DPO", 1e-4, 1, validation=0.99, test=0.99),  # another seed does not take part
    ]
    assert paper_table.choose_rates(runs, seed=0) == {("addition", "DPO"): 3e-5}


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
    for method in paper_methods.METHODS:
        family = paper_methods.FAMILY[method]
        assert family is None or len(args.grid[family]) >= 2
    with pytest.raises(SystemExit):
        paper_table.parse_args(["--steps", "15"])
    for task in args.tasks:  # every default task has its warm start shipped
        assert paper_methods.warm_start_name(task).removeprefix("builtin:") in BUILTIN_CHECKPOINTS
    with pytest.raises(SystemExit):  # addition has none: SFT learns it almost perfectly
        paper_table.parse_args(["--tasks", "addition"])


@pytest.mark.parametrize("method", ["SAPO-DPO, full answers", "SAPO-DPO, on-policy", "ORPO"])
def test_a_method_trains_and_reports_its_cost(tmp_path, method):
    job = paper_methods.Job(
        task="multiplication", method=method, learning_rate=1e-4, seed=0, steps=10, batch_size=8,
        beta=0.5, segment_length=3, ref_model_sync_steps=5, validation_rows=16, test_rows=16,
        output_dir=str(tmp_path / "run"), warm_start="builtin:tiny-multiplication-sft",
    )  # fmt: skip
    result = paper_methods.run_job(job)
    assert result["method"] == method
    assert 0.0 <= result["test_accuracy"] <= 1.0 and 0.0 <= result["validation_accuracy"] <= 1.0
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
