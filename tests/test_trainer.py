"""End-to-end behaviour of SAPOTrainer on a tiny Llama and a two-digit addition task."""

import copy

import pytest
import torch
from conftest import addition_rows
from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainerCallback

from sapo import SAPOConfig, SAPOTrainer
from sapo.builtin.tiny import tiny_llama
from sapo.data import prepare_dataset
from sapo.evaluation import held_out_scores

DPO_METRICS = {
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
}
ORPO_METRICS = {"nll_loss", "log_odds_ratio", "log_odds_chosen"}
SAPO_METRICS = {
    "sapo/buffer_size",
    "sapo/mean_times_sampled",
    "sapo/mean_pair_age",
    "sapo/segment_tokens",
    "sapo/generation_seconds",
}


def make_args(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        segment_length=4,
        learning_rate=1e-3,
        max_steps=40,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return SAPOConfig(**settings)


def held_out_margin(model, tokenizer, seed=123):
    rows = prepare_dataset(Dataset.from_list(addition_rows(256, seed=999)), tokenizer, 64, 32)
    pairs = list(zip(rows["prompt_ids"], rows["gold_ids"]))
    # generate's exact tokens for the model's own segments: the thresholds below were set on them
    return held_out_scores(
        model, pairs, tokenizer.pad_token_id, [tokenizer.eos_token_id], 4, False, seed=seed, batch_size=128,
        backend="transformers",
    )  # fmt: skip


@pytest.mark.parametrize(
    "loss_type, expected_metrics",
    [("dpo", DPO_METRICS | SAPO_METRICS), ("orpo", ORPO_METRICS | DPO_METRICS | SAPO_METRICS)],
)
def test_training_raises_gold_over_own_segment_margin(
    tmp_path, tokenizer, tiny_model, addition_dataset, loss_type, expected_metrics
):
    before = held_out_margin(tiny_model, tokenizer)
    trainer = SAPOTrainer(
        model=tiny_model,
        args=make_args(tmp_path, loss_type=loss_type, max_steps=30),
        train_dataset=addition_dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    after = held_out_margin(trainer.model, tokenizer)
    # seeded runs moved the margin -0.56 -> +0.32 (DPO) and -0.56 -> -0.02 (ORPO)
    assert after["margin"] > before["margin"] + 0.3, (before, after)
    assert after["win_rate"] > before["win_rate"], (before, after)
    assert after["gold_logp"] > before["gold_logp"], (before, after)

    logged = set().union(*(entry.keys() for entry in trainer.state.log_history))
    assert expected_metrics <= logged, expected_metrics - logged

    trainer.save_model(str(tmp_path / "final"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"))
    ids = torch.tensor([[4, 20, 21, 30]])
    torch.testing.assert_close(reloaded(ids).logits, trainer.model.cpu()(ids).logits)


class RecordPolicy(TrainerCallback):
    """Snapshots the policy after every optimizer step (runs before SAPO's EMA update)."""

    def __init__(self):
        self.snapshots = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.snapshots[state.global_step] = {k: v.detach().clone() for k, v in model.named_parameters()}


def test_ema_follows_the_formula(tmp_path, tokenizer, tiny_model, addition_dataset):
    initial = {k: v.detach().clone() for k, v in tiny_model.named_parameters()}
    recorder = RecordPolicy()
    trainer = SAPOTrainer(
        model=tiny_model,
        args=make_args(tmp_path, max_steps=4, ema_decay=0.75, ema_update_interval=2),
        train_dataset=addition_dataset,
        processing_class=tokenizer,
        callbacks=[recorder],
    )
    trainer.train()
    assert trainer.ema.num_updates == 2  # steps 2 and 4
    expected = {
        name: 0.75 * (0.75 * initial[name] + 0.25 * recorder.snapshots[2][name])
        + 0.25 * recorder.snapshots[4][name]
        for name in initial
    }
    for name, param in trainer.ema.model.named_parameters():
        assert param.dtype == torch.float32
        torch.testing.assert_close(param, expected[name], rtol=1e-6, atol=1e-7)
    # the policy moved, so the EMA is not the policy
    assert any(not torch.equal(p, recorder.snapshots[4][n]) for n, p in trainer.ema.model.named_parameters())


def test_reference_equals_ema_right_after_sync(tmp_path, tokenizer, tiny_model, addition_dataset):
    initial = copy.deepcopy(tiny_model)
    trainer = SAPOTrainer(
        model=tiny_model,
        args=make_args(tmp_path, max_steps=2, ref_model_sync_steps=3),
        train_dataset=addition_dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    for (name, ref), init in zip(trainer.ref_model.named_parameters(), initial.parameters()):
        torch.testing.assert_close(ref, init, rtol=0, atol=0, msg=f"{name} changed before the first sync")

    trainer = SAPOTrainer(
        model=copy.deepcopy(initial),
        args=make_args(tmp_path, max_steps=3, ref_model_sync_steps=3),
        train_dataset=addition_dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    for (name, ref), ema in zip(trainer.ref_model.named_parameters(), trainer.ema.model.parameters()):
        torch.testing.assert_close(
            ref, ema, rtol=0, atol=0, msg=f"{name} differs from the EMA after the sync"
        )
    assert any(not torch.equal(r, i) for r, i in zip(trainer.ref_model.parameters(), initial.parameters()))


def test_default_sync_is_once_per_epoch(tmp_path, tokenizer, tiny_model, addition_dataset):
    trainer = SAPOTrainer(
        model=tiny_model,
        args=make_args(tmp_path, max_steps=2, per_device_train_batch_size=8, gradient_accumulation_steps=2),
        train_dataset=addition_dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    assert trainer.ref_model_sync_steps == 4  # 64 rows / 8 per batch / 2 accumulation steps


def test_gradient_accumulation_counts_once(tmp_path, tokenizer, tiny_model, addition_dataset):
    trainer = SAPOTrainer(
        model=tiny_model,
        args=make_args(tmp_path, max_steps=3, gradient_accumulation_steps=2, per_device_train_batch_size=4),
        train_dataset=addition_dataset,
        processing_class=tokenizer,
    )
    calls = []
    original = trainer.sampler.generate
    trainer.sampler.generate = lambda *a, **k: calls.append(len(a[1])) or original(*a, **k)
    trainer.train()
    assert calls == [8, 8, 8]  # one call per optimizer step, for both micro-batches' rows
    assert trainer.ema.num_updates == 3
    assert sum(trainer.buffer.times_sampled()) == 3 * 2 * 4


@pytest.mark.parametrize("every", [2, 3])
def test_every_row_gets_a_segment_when_generating_every_n_steps(tmp_path, tokenizer, tiny_model, every):
    dataset = Dataset.from_list(addition_rows(28, seed=5))
    trainer = SAPOTrainer(
        model=tiny_model,
        args=make_args(
            tmp_path,
            max_steps=-1,
            num_train_epochs=1,
            per_device_train_batch_size=4,
            sample_every_n_steps=every,
        ),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    calls = []
    original = trainer.sampler.generate
    trainer.sampler.generate = lambda *a, **k: calls.append(len(a[1])) or original(*a, **k)
    trainer.train()
    assert trainer.state.global_step == 7
    assert sum(calls) == 28 and len(calls) == -(-7 // every)
    gold = sorted(tuple(item.chosen_ids) for item in trainer.buffer.items())
    expected = sorted(tuple(ids) for ids in trainer.train_dataset["gold_ids"])
    assert gold == expected


def test_orpo_builds_no_reference_and_rejects_one(tmp_path, tokenizer, tiny_model, addition_dataset):
    trainer = SAPOTrainer(
        model=tiny_model,
        args=make_args(tmp_path, loss_type="orpo", max_steps=1),
        train_dataset=addition_dataset,
        processing_class=tokenizer,
    )
    assert trainer.ref_model is None
    with pytest.raises(ValueError, match="ref_model"):
        SAPOTrainer(
            model=tiny_model,
            args=make_args(tmp_path, loss_type="orpo"),
            train_dataset=addition_dataset,
            processing_class=tokenizer,
            ref_model=tiny_llama(tokenizer, seed=1),
        )


def test_explicit_reference_is_used(tmp_path, tokenizer, tiny_model, addition_dataset):
    reference = tiny_llama(tokenizer, seed=1)
    trainer = SAPOTrainer(
        model=tiny_model,
        args=make_args(tmp_path, max_steps=1),
        train_dataset=addition_dataset,
        processing_class=tokenizer,
        ref_model=reference,
    )
    assert trainer.ref_model is reference
    assert not any(p.requires_grad for p in reference.parameters())


def test_model_given_as_a_path(tmp_path, tokenizer, tiny_model, addition_dataset):
    tiny_model.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    trainer = SAPOTrainer(
        model=str(tmp_path / "policy"),
        args=make_args(tmp_path, max_steps=2),
        train_dataset=addition_dataset,
    )
    trainer.train()
    assert trainer.state.global_step == 2
    assert trainer.processing_class.eos_token == tokenizer.eos_token


def test_same_seed_same_run(tmp_path, tokenizer, addition_dataset):
    finals = []
    for _ in range(2):
        trainer = SAPOTrainer(
            model=tiny_llama(tokenizer, seed=0),
            args=make_args(tmp_path, max_steps=5),
            train_dataset=addition_dataset,
            processing_class=tokenizer,
        )
        trainer.train()
        finals.append([p.detach().clone() for p in trainer.model.parameters()])
    for a, b in zip(*finals):
        assert torch.equal(a, b)


def test_reference_logps_are_reused_until_the_next_sync(tmp_path, tokenizer, tiny_model, addition_dataset):
    from sapo.scoring import collate_pairs, completion_logps

    trainer = SAPOTrainer(
        model=tiny_model,
        args=make_args(tmp_path, max_steps=7, replay_buffer_size=16, ref_model_sync_steps=4, logging_steps=1),
        train_dataset=addition_dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    reuse = [
        entry["sapo/reference_reuse"]
        for entry in trainer.state.log_history
        if "sapo/reference_reuse" in entry
    ]
    assert reuse[0] == 0.0 and max(reuse) > 0.0
    assert trainer.progress.reference_version == 1
    cached = [pair for pair in trainer.buffer.items() if pair.reference_cached(1)]
    assert cached  # pairs drawn since the sync at step 4
    with torch.no_grad():
        fresh, _ = completion_logps(trainer.ref_model, collate_pairs(cached, tokenizer.pad_token_id))
    expected = torch.stack(fresh.chunk(2), dim=1)
    torch.testing.assert_close(
        torch.tensor([pair.reference_logps for pair in cached], dtype=torch.float64),
        expected.double(),
        atol=1e-5,
        rtol=0,
    )


def test_generation_threads_apply_while_sampling_and_are_restored(
    tmp_path, tokenizer, tiny_model, addition_dataset
):
    trainer = SAPOTrainer(
        model=tiny_model,
        args=make_args(tmp_path, max_steps=2, generation_num_threads=1),
        train_dataset=addition_dataset,
        processing_class=tokenizer,
    )
    seen = []  # threads at each forward of the EMA model, which only samples
    trainer.ema.model.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    torch.set_num_threads(2)
    try:
        trainer.train()
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(2)
