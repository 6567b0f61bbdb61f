"""DeepSpeed ZeRO-3: SAPO's partitioned EMA and reference on two CPU processes (torchrun, gloo).

The worker (`zero3_worker.py`) partitions a tiny Llama with a DeepSpeed engine (DeepSpeed's CPU
accelerator) and checks SAPO's pieces directly; `test_distributed.py` runs the whole trainer.
"""

import json
from pathlib import Path

import launch
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "distributed" / "zero3_worker.py"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    output = tmp_path_factory.mktemp("zero3")
    launch.torchrun(SCRIPT, output)
    return json.loads((output / "report.json").read_text())["ranks"]


def test_ema_is_a_float32_copy_partitioned_like_the_policy(ranks):
    for rank in ranks:
        assert rank["initial_error"] == 0.0
        assert rank["ema_partitioned"] and rank["ema_dtypes"] == ["torch.float32"]


def test_ema_update_is_local_and_matches_the_formula(ranks):
    for rank in ranks:
        assert rank["policy_moved"] > 1e-3  # the optimizer steps did change the policy's slices
        assert rank["update_error"] <= 1e-6  # d * ema + (1 - d) * policy on whole tensors
        assert rank["update_collectives"] == [0, 0]
        assert rank["update_in_place"] and rank["num_updates"] == 2
        assert rank["gather_collectives"] > 0  # the counter does see collectives


def test_generation_gathers_once_and_matches_whole_weights(ranks):
    for rank in ranks:
        assert rank["generation_equal"]
        assert rank["whole_inside"] and rank["distributed_after"]
        # the same collectives for 2 tokens as for 8: one gather per call, none per token
        counts = rank["generation_collectives"]
        assert counts["2"] == counts["8"] > 0
    # each rank decodes its own length: no rank waits for the other
    assert [rank["generated"] for rank in ranks] == [6, 10]


def test_reference_sync_copies_the_ema_slice_to_slice(ranks):
    for rank in ranks:
        assert rank["sync_error"] == 0.0 and rank["sync_collectives"] == 0
        assert rank["scoring_error"] <= 1e-5
        # its forward is collective: cached pairs are scored again so every rank scores together
        assert rank["cached_pairs_scored"] == [2]


def test_checkpoint_round_trip_restores_the_same_slices(ranks):
    for rank in ranks:
        assert rank["files"] == ["sapo_ema.safetensors", "sapo_reference.safetensors"]
        assert rank["ema_reload_error"] == 0.0 and rank["reference_reload_error"] == 0.0
        assert rank["plain_reload_error"] == 0.0  # the whole format: a plain EMA loads it


def test_policy_partitioned_at_loading_gets_partitioned_copies_directly(ranks):
    for rank in ranks:
        assert rank["partitioned_at_loading"]
        assert rank["copies"] == ["ZeroEMA", "ZeroReference"] and rank["copies_error"] == 0.0
        assert rank["already_partitioned_left_alone"]


def test_whole_copies_are_partitioned_when_training_starts(ranks):
    for rank in ranks:
        assert rank["handover"] == ["ZeroEMA", "ZeroReference"]
        assert rank["handover_error"] == 0.0 and rank["handover_updates"] == 7
        assert rank["whole_policy_left_alone"]


def test_lora_adapters_are_partitioned_with_the_model(ranks):
    for rank in ranks:
        assert rank["lora_partitioned"] and rank["lora_sharded_flags"] == [True, True]
        # the whole float32 average on every rank, written into the partitioned EMA adapter
        assert rank["lora_shadow_error"] <= 1e-6 and rank["lora_update_error"] <= 1e-6
        assert rank["lora_update_gathers"]  # the policy adapter (small) is gathered for the update
        assert rank["lora_sync_error"] <= 1e-6 and rank["lora_reference_file"]


def test_lora_generation_gathers_the_model_with_the_ema_adapter_active(ranks):
    for rank in ranks:
        whole_inside, active_inside, _ = rank["lora_generation"]
        assert whole_inside and active_inside == "sapo_ema" and rank["lora_active_after"] == "default"
    assert [rank["lora_generation"][2] for rank in ranks] == [6, 10]  # each rank its own length
