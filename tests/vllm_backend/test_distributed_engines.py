"""Two CPU processes (torchrun, gloo), each with its own vLLM engine (vLLM's `external_launcher`,
as TRL's colocate mode): the EMA partitioned by ZeRO-3 or sharded by FSDP2 reaches each engine
gathered a weight at a time, and the engine's greedy tokens are the own loop's on the whole EMA."""

import importlib.util
import json
from pathlib import Path

import launch
import pytest
from vllm_required import needs_vllm

pytestmark = needs_vllm
WORKER = Path(__file__).with_name("distributed_worker.py")


@pytest.mark.parametrize(
    "placement, ema",
    [
        pytest.param(
            "zero3", "ZeroEMA",
            marks=pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed"),
        ),
        ("fsdp2", "ShardedEMA"),
    ],
)  # fmt: skip
def test_a_distributed_ema_reaches_each_ranks_engine(tmp_path, monkeypatch, placement, ema):
    monkeypatch.setenv("PYTHONPATH", str(Path(launch.__file__).parent))  # the worker's fsdp_on_cpu
    launch.torchrun(WORKER, tmp_path, placement)
    ranks = json.loads((tmp_path / "report.json").read_text())
    assert len(ranks) == 2
    for rank in ranks:
        assert rank["ema"] == ema and rank["sharded"]
        assert rank["pushes"] == 3  # one per step (the EMA moved every step), one for the check
        assert len(rank["tied"]) == 2 and sum(rank["tied"]) < 2  # real negatives
        assert rank["engine"] == rank["loop"]
