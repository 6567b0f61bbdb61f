#!/usr/bin/env bash
# sapo on one GPU at a realistic size, in a few minutes (under 10 on an H100-class GPU):
# SAPO-DPO full (float32 master weights, bfloat16 compute) and LoRA on a ~0.5B-parameter model
# built from a config (no download), peak GPU memory next to `sapo plan`'s figure, sapo's
# sampling loop against `generate`, and whether training moved the model; where vLLM is installed,
# the same full run and a LoRA run in sleep mode with generation_backend=vllm, their generation
# seconds beside the own loop's and the engine's greedy tokens against the loop's. One JSON line.
#   bash scripts/gpu_check.sh           # needs CUDA; without it, runs the tiny CPU mode
#   bash scripts/gpu_check.sh --tiny    # a tiny model on the CPU (what the test suite runs)
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" scripts/gpu_check.py "$@"
