"""`scripts/gpu_check.sh` in its tiny CPU mode, and `sapo plan` on a built-in model and on bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

from sapo.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_tiny_mode_prints_one_json_report():
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--tiny"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert report["tiny"] is True and report["device"] == "cpu"
    full, lora = report["full"], report["lora"]
    # float32 masters at lr 5e-7: nearly every weight moves (in bfloat16 almost none would)
    assert full["weights_moved_fraction"] > 0.9
    assert (
        lora["weights_moved_fraction"] > 0.9 and lora["trainable_parameters"] < full["trainable_parameters"]
    )
    for run in (full, lora):
        assert len(run["losses"]) == run["steps"] and run["plan_peak_gb"] > 0
    generation = full["generation"]
    assert generation["sapo_tokens_per_s"] > 0 and generation["generate_tokens_per_s"] > 0


def test_plan_of_a_builtin_model_from_flags(capsys):
    flags = ["--model_name_or_path", "builtin:tiny", "--max_length", "64", "--segment_length", "8"]
    assert main(["plan", *flags, "--num_gpus", "2", "--distributed", "zero3", "--gpu_memory_gb", "2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    plan = json.loads(out[-1])
    assert plan["fits"] is True and 1 < plan["per_device_gb"] < 1.1  # the CUDA runtime and a tiny model
    assert (plan["distributed"], plan["num_gpus"], plan["parameters"]) == ("zero3", 2, 80_576)
    assert any(line.startswith("peak (") for line in out)


def test_plan_refuses_bad_input_in_one_line(capsys):
    assert main(["plan", "--model_name_or_path", "builtin:tiny", "--distributed", "zero4"]) == 2
    assert "distributed" in capsys.readouterr().err
    assert main(["plan", "--model_name_or_path", "no/such-model-here"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: model_config: cannot read a model config")
