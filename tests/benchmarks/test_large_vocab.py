"""benchmarks/large_vocab.py: the quick setting runs both trainers and reports its ratios."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import large_vocab  # noqa: E402


def test_quick_run_reports_time_and_memory_ratios(capsys):
    summary = large_vocab.main(["--quick"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    assert summary["vocab_size"] == 4096
    for key in ("update_vs_trl_dpo", "peak_memory_vs_trl_dpo", "update_cpu_vs_trl_dpo"):
        assert summary[key] > 0, key
    assert set(summary["above_baseline_mib"]) == {"trl_dpo", "sapo_update"}
    # the head runs on fewer positions than TRL's, which scores every position on CPU
    positions = summary["head_positions_per_pair"]
    assert 0 < positions["sapo"] < positions["trl_dpo_cpu"]
