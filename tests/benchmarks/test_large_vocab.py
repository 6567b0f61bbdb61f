"""benchmarks/large_vocab.py: the quick setting runs both trainers and reports its ratios."""

from __future__ import annotations

import json

from benchmarks import large_vocab


def test_quick_run_reports_time_and_memory_ratios(capsys):
    summary = large_vocab.main(["--quick"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    assert summary["vocab_size"] == 4096
    for key in ("update_vs_trl_dpo", "update_cpu_vs_trl_dpo", "total_vs_trl_dpo"):
        assert summary[key] > 0, key
    # the whole SAPO step generates its pairs: its generation is timed and counted
    assert 0 < summary["generation_s_per_step"] < summary["median_step_ms"]["sapo_total"] / 1000
    assert summary["generation_tokens_per_s"] > 0
    # at a 1M-parameter model the memory above the baseline process is tens of MiB, the size of
    # the run-to-run spread of a process's peak: the quick setting checks that it is measured and
    # reported, the default setting (docs/performance.md) what it is
    assert set(summary["above_baseline_mib"]) == {"trl_dpo", "sapo_update", "sapo_total"}
    assert all(value >= 0 for value in summary["above_baseline_mib"].values())
    assert summary["peak_memory_vs_trl_dpo"] is not None and summary["peak_memory_vs_trl_dpo"] >= 0
    peaks = summary["peak_mib"]
    assert all(peaks[config] > 0 for config in ("baseline", "trl_dpo", "sapo_update", "sapo_total"))
    # the head runs on fewer positions than TRL's, which scores every position on CPU
    positions = summary["head_positions_per_pair"]
    assert 0 < positions["sapo"] < positions["trl_dpo_cpu"]
