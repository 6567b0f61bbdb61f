"""FSDP2: SAPO's sharded EMA and reference on two CPU processes under torchrun (gloo).

The worker (`sharded_worker.py`) shards a tiny Llama with `fully_shard` per decoder layer and at
the root; transformers' Trainer ignores FSDP on the CPU, so the pieces are tested directly.
"""

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import launch
import pytest

from sapo.copies import check_supported

SCRIPT = Path(__file__).resolve().parents[1] / "distributed" / "sharded_worker.py"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    output = tmp_path_factory.mktemp("fsdp2")
    launch.torchrun(SCRIPT, output)
    return json.loads((output / "report.json").read_text())["ranks"]


def test_ema_is_a_float32_copy_sharded_like_the_policy(ranks):
    for rank in ranks:
        assert rank["initial_error"] == 0.0
        assert rank["sharded_placements"] == ["(Shard(dim=0),)"]
        assert rank["fsdp_units"] == 3  # two decoder layers and the root


def test_ema_update_is_local_and_matches_the_formula(ranks):
    for rank in ranks:
        assert rank["update_error"] <= 1e-6  # d * ema + (1 - d) * policy on whole tensors
        assert rank["update_collectives"] == [0, 0]
        assert rank["update_in_place"] and rank["num_updates"] == 2
        assert rank["gather_collectives"] > 0  # the counter does see collectives


def test_generation_gathers_once_and_matches_unsharded_weights(ranks):
    for rank in ranks:
        assert rank["generation_equal"]
        assert rank["whole_inside"] and rank["distributed_after"]
        # one all-gather per FSDP unit per call, whatever the number of tokens
        assert rank["generation_collectives"] == {"2": 3, "8": 3}
    # each rank decodes its own length: no rank waits for the other
    assert [rank["generated"] for rank in ranks] == [6, 10]


def test_reference_sync_copies_the_ema_shard_to_shard(ranks):
    for rank in ranks:
        assert rank["sync_error"] == 0.0 and rank["sync_collectives"] == 0
        assert rank["scoring_error"] <= 1e-5
        # its forward is collective: cached pairs are scored again so every rank scores together
        assert rank["cached_pairs_scored"] == [2]


def test_checkpoint_round_trip_restores_the_same_shards(ranks):
    for rank in ranks:
        assert rank["files"] == ["sapo_ema.safetensors", "sapo_reference.safetensors"]
        assert rank["ema_reload_error"] == 0.0 and rank["reference_reload_error"] == 0.0
        assert rank["plain_reload_error"] == 0.0  # the unsharded format: a whole EMA loads it


def test_sharded_policy_dispatch_and_handover_from_whole_copies(ranks):
    for rank in ranks:
        assert rank["dispatch"] == ["ShardedEMA", "ShardedReference"] and rank["dispatch_error"] == 0.0
        assert rank["handover"] == ["ShardedEMA", "ShardedReference"]
        assert rank["handover_error"] == 0.0 and rank["handover_updates"] == 7


def accelerate_state(fsdp_version=None, zero_stage=None, **zero):
    """The parts of an accelerate state that ``check_supported`` reads."""
    fsdp = None if fsdp_version is None else SimpleNamespace(fsdp_version=fsdp_version)
    deepspeed = None
    if zero_stage is not None:
        deepspeed = SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": zero_stage, **zero}})
    return SimpleNamespace(fsdp_plugin=fsdp, deepspeed_plugin=deepspeed)


def test_fsdp1_is_refused_naming_the_alternatives():
    with pytest.raises(ValueError, match="FSDP1") as error:
        check_supported(accelerate_state(fsdp_version=1))
    assert all(name in str(error.value) for name in ("FSDP2", "ZeRO-3", "ZeRO-2", "LoRA"))


@pytest.mark.parametrize(
    ("zero", "refused"),
    [
        ({"zero_hpz_partition_size": 8}, "zero_hpz_partition_size"),
        ({"offload_param": {"device": "nvme"}}, "nvme"),
    ],
)
def test_zero3_options_that_break_slice_alignment_are_refused(zero, refused):
    with pytest.raises(ValueError, match=refused):
        check_supported(accelerate_state(zero_stage=3, **zero))


@pytest.mark.parametrize("state", [accelerate_state(fsdp_version=2), accelerate_state(zero_stage=3)])
def test_fsdp2_and_zero3_are_allowed_with_a_warning(state, caplog):
    with caplog.at_level(logging.WARNING):
        check_supported(state)
    assert "not been run on GPUs" in caplog.text


def test_fsdp2_and_zero3_accept_a_peft_policy():
    for state in (accelerate_state(fsdp_version=2), accelerate_state(zero_stage=3)):
        check_supported(state)


def test_ddp_zero2_and_single_device_pass_silently_also_with_peft():
    for state in (accelerate_state(), accelerate_state(zero_stage=2), SimpleNamespace()):
        check_supported(state)
